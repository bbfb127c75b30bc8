#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The deployment manifests in deploy/:
//!
//! - Istio (deploy/istio): validated against Istio's own CRD schemas (the openAPIV3Schema
//!   of each CRD in `../shared/schemas/istio/`, made strict with `additionalProperties:
//!   false` so unknown fields fail). That folder sits beside the project's own checkout
//!   only; elsewhere the check is SKIPPED with a message. A structural check of our own
//!   always runs (what the CRDs' CEL rules and farebox itself require), and `make
//!   istio-check` runs a second, portable check with Istio models from a package registry.
//! - Kong (deploy/kong): the declarative config against deploy/kong/declarative.schema.json,
//!   plus the settings farebox needs in kong.conf.
//! - The balance service (deploy/balance-service): what running two replicas on
//!   PostgreSQL needs (replicas, probes, the database URL from a Secret, the migration
//!   Job, Services that select the pods). `make k8s-check` validates the same files against
//!   Kubernetes' own schemas (strict) from a package registry.
//!
//! The plugin configurations inside both are checked against the plugin schema and the
//! filter's parser by tests/config_schema.rs.

mod deploy_common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use deploy_common::*;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------
// Istio, against the CRDs
// ---------------------------------------------------------------------------------------

fn shared_istio_schemas() -> Option<PathBuf> {
    let dir = root().join("../shared/schemas/istio");
    dir.is_dir().then_some(dir)
}

/// Adds `additionalProperties: false` to every object schema that lists its properties
/// and does not already allow more (Kubernetes would silently prune unknown fields; here
/// they must fail).
fn strict(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let preserves = map.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !preserves
            {
                map.insert("additionalProperties".into(), json!(false));
            }
            for (key, child) in map.iter_mut() {
                // Enum values and defaults are data, not schemas.
                if key != "enum" && key != "default" && key != "example" {
                    strict(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

/// (apiVersion, kind) -> strict schema of the whole resource.
fn crd_schemas(dir: &std::path::Path) -> BTreeMap<(String, String), Value> {
    let mut out = BTreeMap::new();
    for path in files(dir, &["yaml", "yml"]) {
        for crd in yaml_docs(&read(&path), &path.display().to_string()) {
            assert_eq!(
                crd["kind"],
                "CustomResourceDefinition",
                "{}",
                path.display()
            );
            let group = crd["spec"]["group"].as_str().unwrap();
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap().to_string();
            for version in crd["spec"]["versions"].as_array().unwrap() {
                let name = version["name"].as_str().unwrap();
                let mut schema = version["schema"]["openAPIV3Schema"].clone();
                strict(&mut schema);
                // The CRD schemas leave the standard fields to the API server.
                let props = schema["properties"].as_object_mut().unwrap();
                props.insert(
                    "apiVersion".into(),
                    json!({"type": "string", "enum": [format!("{group}/{name}")]}),
                );
                props.insert("kind".into(), json!({"type": "string", "enum": [kind]}));
                props.insert(
                    "metadata".into(),
                    json!({
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                            "namespace": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
                        }
                    }),
                );
                let required = schema
                    .as_object_mut()
                    .unwrap()
                    .entry("required")
                    .or_insert_with(|| json!([]));
                for field in ["apiVersion", "kind", "metadata"] {
                    required.as_array_mut().unwrap().push(json!(field));
                }
                out.insert((format!("{group}/{name}"), kind.clone()), schema);
            }
        }
    }
    out
}

fn crd_errors(schemas: &BTreeMap<(String, String), Value>, doc: &Value) -> Vec<String> {
    let key = (
        doc["apiVersion"].as_str().unwrap_or_default().to_string(),
        doc["kind"].as_str().unwrap_or_default().to_string(),
    );
    let Some(schema) = schemas.get(&key) else {
        return vec![format!("no CRD for {key:?}")];
    };
    // OpenAPI v3.0 schemas: draft 4 semantics, plus x-kubernetes-* keywords that a JSON
    // Schema validator ignores (their CEL rules are checked structurally below).
    let validator = jsonschema::draft4::new(schema).expect("CRD schema compiles");
    schema_errors(&validator, doc)
}

#[test]
fn istio_manifests_match_istios_crd_schemas() {
    let Some(dir) = shared_istio_schemas() else {
        eprintln!(
            "SKIPPED istio_manifests_match_istios_crd_schemas: {} is absent (Istio's CRD \
             schemas are provided beside the project's own checkout only). The structural \
             check (istio_manifests_are_wired_for_farebox) still ran; `make istio-check` \
             validates with registry-provided Istio models.",
            root().join("../shared/schemas/istio").display()
        );
        return;
    };
    let schemas = crd_schemas(&dir);
    let manifests = istio_manifests();
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for (file, docs) in &manifests {
        for doc in docs {
            let errors = crd_errors(&schemas, doc);
            let what = format!("{file}: {} {}", doc["kind"], doc["metadata"]["name"]);
            if errors.is_empty() {
                checked.push(what);
            } else {
                failures.push(format!("{what}:\n  {}", errors.join("\n  ")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for kind in ["WasmPlugin", "ServiceEntry"] {
        assert!(
            checked.iter().any(|c| c.contains(kind)),
            "no {kind} in deploy/istio"
        );
    }
    eprintln!("valid against Istio's CRDs: {checked:?}");

    // The strict schemas do catch what Kubernetes would silently drop or refuse.
    let plugin = manifests
        .iter()
        .flat_map(|(_, docs)| docs)
        .find(|d| d["kind"] == "WasmPlugin")
        .unwrap();
    let mut typo = plugin.clone();
    typo["spec"]["phse"] = json!("AUTHZ");
    assert!(!crd_errors(&schemas, &typo).is_empty(), "unknown field");
    let mut bad_enum = plugin.clone();
    bad_enum["spec"]["failStrategy"] = json!("FAIL_SOMETIMES");
    assert!(
        !crd_errors(&schemas, &bad_enum).is_empty(),
        "bad enum value"
    );
    let mut bad_sha = plugin.clone();
    bad_sha["spec"]["sha256"] = json!("sha256:abc");
    assert!(!crd_errors(&schemas, &bad_sha).is_empty(), "bad sha256");
}

// ---------------------------------------------------------------------------------------
// Istio, structurally (always)
// ---------------------------------------------------------------------------------------

fn istio_docs(kind: &str) -> Vec<(String, Value)> {
    istio_manifests()
        .into_iter()
        .flat_map(|(file, docs)| docs.into_iter().map(move |d| (file.clone(), d)))
        .filter(|(_, d)| d["kind"] == kind)
        .collect()
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

#[test]
fn istio_manifests_are_wired_for_farebox() {
    let plugins = istio_docs("WasmPlugin");
    let entries = istio_docs("ServiceEntry");
    assert!(!plugins.is_empty(), "no WasmPlugin in deploy/istio");
    for (file, _) in istio_manifests() {
        let raw = read(&root().join(&file));
        for doc in yaml_docs(&raw, &file) {
            assert!(
                ["WasmPlugin", "ServiceEntry"].contains(&doc["kind"].as_str().unwrap_or("")),
                "{file}: unexpected kind {} (teach tests/deploy_manifests.rs about it)",
                doc["kind"]
            );
        }
    }

    // Cluster names Istio generates for the ServiceEntries: outbound|PORT||HOST.
    let mut clusters: BTreeMap<String, String> = BTreeMap::new();
    for (file, se) in &entries {
        assert_eq!(
            se["apiVersion"], "networking.istio.io/v1",
            "{file}: ServiceEntry"
        );
        let spec = &se["spec"];
        let hosts = spec["hosts"].as_array().expect("ServiceEntry hosts");
        let ports = spec["ports"].as_array().expect("ServiceEntry ports");
        assert!(!hosts.is_empty() && !ports.is_empty(), "{file}");
        for port in ports {
            assert!(
                port["number"]
                    .as_u64()
                    .is_some_and(|p| (1..=65535).contains(&p)),
                "{file}: port {port}"
            );
            assert_eq!(
                port["protocol"], "HTTP",
                "{file}: the callouts are plain HTTP/1.1 requests"
            );
            for host in hosts {
                let host = str_of(host, "host");
                clusters.insert(
                    format!("outbound|{}||{host}", port["number"]),
                    host.to_string(),
                );
            }
        }
    }

    for (file, plugin) in &plugins {
        let spec = &plugin["spec"];
        let what = format!("{file}: WasmPlugin {}", plugin["metadata"]["name"]);
        assert_eq!(
            plugin["apiVersion"], "extensions.istio.io/v1alpha1",
            "{what}"
        );
        // CEL rule of the CRD: only one of targetRefs or selector can be set.
        let selectors = ["selector", "targetRef", "targetRefs"]
            .iter()
            .filter(|k| spec.get(**k).is_some())
            .count();
        assert_eq!(
            selectors, 1,
            "{what}: exactly one of selector/targetRef/targetRefs"
        );
        let url = str_of(&spec["url"], "url");
        assert_eq!(url, format!("oci://{TEST_IMAGE}"), "{what}: url");
        let sha = str_of(&spec["sha256"], "sha256");
        assert!(
            sha.len() == 64
                && sha
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{what}: sha256 must be 64 lower-case hex digits (the image manifest digest without `sha256:`)"
        );
        assert_eq!(spec["phase"], "AUTHZ", "{what}: phase");
        assert_eq!(
            spec["failStrategy"], "FAIL_CLOSE",
            "{what}: an unloadable filter must not let requests through unpaid"
        );
        assert!(
            ["IfNotPresent", "Always"]
                .contains(&str_of(&spec["imagePullPolicy"], "imagePullPolicy")),
            "{what}: imagePullPolicy"
        );
        assert_eq!(spec["type"], "HTTP", "{what}: type");
        assert_eq!(
            spec["pluginName"], "farebox",
            "{what}: the filter's root id"
        );

        let conf = &spec["pluginConfig"];
        let cluster = str_of(&conf["cluster"], "pluginConfig.cluster");
        let host = if let Some(host) = clusters.get(cluster) {
            host.clone()
        } else {
            // An in-mesh Service: outbound|PORT||NAME.NAMESPACE.svc.cluster.local
            let parts: Vec<&str> = cluster.split('|').collect();
            assert!(
                parts.len() == 4
                    && parts[0] == "outbound"
                    && parts[1].parse::<u16>().is_ok()
                    && parts[2].is_empty()
                    && parts[3].ends_with(".svc.cluster.local"),
                "{what}: pluginConfig.cluster {cluster:?} is neither the cluster of a \
                 ServiceEntry in deploy/istio ({:?}) nor outbound|PORT||SVC.NS.svc.cluster.local",
                clusters.keys().collect::<Vec<_>>()
            );
            parts[3].to_string()
        };
        assert_eq!(
            conf["authority"], host,
            "{what}: set pluginConfig.authority to the host, or the callouts' Host is the cluster name"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Kong
// ---------------------------------------------------------------------------------------

fn kong_subset_validator() -> jsonschema::Validator {
    let schema = read_json(&root().join("deploy/kong/declarative.schema.json"));
    jsonschema::draft7::meta::validate(&schema)
        .unwrap_or_else(|e| panic!("deploy/kong/declarative.schema.json: {e}"));
    jsonschema::draft7::new(&schema).expect("declarative.schema.json compiles")
}

#[test]
fn kong_declarative_config_matches_its_schema() {
    let validator = kong_subset_validator();
    let doc = kong_declarative();
    let errors = schema_errors(&validator, &doc);
    assert!(
        errors.is_empty(),
        "deploy/kong/kong.yaml:\n  {}",
        errors.join("\n  ")
    );
    // The subset schema refuses what it does not know.
    let mut typo = doc.clone();
    typo["services"][0]["routes"][0]["filter_chain"] = json!([]);
    assert!(!validator.is_valid(&typo), "unknown route field accepted");
    let mut empty = doc.clone();
    empty["services"][0]["routes"][0]["filter_chains"][0]["filters"] = json!([]);
    assert!(!validator.is_valid(&empty), "empty filter list accepted");
}

#[test]
fn kong_filter_chain_is_wired_for_farebox() {
    let doc = kong_declarative();
    let mut chains = Vec::new();
    find_objects(
        &doc,
        &|v| v.get("filters").is_some_and(Value::is_array),
        &mut chains,
    );
    let farebox: Vec<&Map<String, Value>> = chains
        .iter()
        .flat_map(|c| c["filters"].as_array().unwrap())
        .filter(|f| f["name"] == "farebox")
        .map(|f| f.as_object().unwrap())
        .collect();
    assert_eq!(
        farebox.len(),
        1,
        "one farebox filter in deploy/kong/kong.yaml"
    );
    let config = &farebox[0]["config"];
    assert!(
        config.is_object(),
        "the filter config is a JSON object (Kong parses it with config_schema)"
    );
    // On Kong the callout target is host:port, not an Envoy cluster name.
    let cluster = str_of(&config["cluster"], "config.cluster");
    let (host, port) = cluster
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("Kong: cluster {cluster:?} must be host:port"));
    assert!(
        !host.is_empty() && !host.contains('|') && port.parse::<u16>().is_ok_and(|p| p > 0),
        "Kong: cluster {cluster:?} must be host:port"
    );
    // The filter name is the module's file name in wasm_filters_path; its metadata sits
    // beside it.
    assert!(root().join("deploy/kong/farebox.meta.json").is_file());

    let conf = read(&root().join("deploy/kong/kong.conf"));
    let settings: BTreeMap<String, String> = conf
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    assert_eq!(settings.get("wasm").map(String::as_str), Some("on"));
    assert!(settings.contains_key("wasm_filters_path"));
    let shm = settings
        .get("nginx_wasm_main_shm_kv")
        .expect("kong.conf: nginx_wasm_main_shm_kv (shared data for the cache and leases)");
    assert!(
        shm.trim_end_matches(['k', 'm', 'g']).parse::<u64>().is_ok(),
        "nginx_wasm_main_shm_kv = {shm}: a size like 32m"
    );
    assert_eq!(
        settings.get("declarative_config").map(String::as_str),
        Some("/etc/kong/kong.yaml")
    );
}

// ---------------------------------------------------------------------------------------
// The balance service on Kubernetes
// ---------------------------------------------------------------------------------------

fn balance_docs() -> Vec<(String, Value)> {
    let dir = root().join("deploy/balance-service");
    let mut out = Vec::new();
    for f in files(&dir, &["yaml"]) {
        let name = rel(&f);
        for doc in yaml_docs(&read(&f), &name) {
            out.push((name.clone(), doc));
        }
    }
    out
}

fn one_of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/balance-service: want exactly one {kind}"
    );
    found[0]
}

/// The container's env var `name`, which must come from the Secret `secret`, key `key`.
fn assert_secret_env(container: &Value, name: &str, secret: &str, key: &str) {
    let env = container["env"].as_array().expect("container env");
    let var = env
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{} has no env {name}", container["name"]));
    assert!(
        var.get("value").is_none(),
        "{name} must not be a literal value in the manifest"
    );
    assert_eq!(
        var["valueFrom"]["secretKeyRef"],
        json!({"name": secret, "key": key}),
        "{name} comes from the Secret"
    );
}

#[test]
fn balance_service_manifests_run_two_replicas_on_a_secret_database_url() {
    let docs = balance_docs();
    let deployment = one_of_kind(&docs, "Deployment");
    let spec = &deployment["spec"];
    assert_eq!(spec["replicas"], json!(2), "two replicas");
    assert_eq!(
        spec["strategy"]["rollingUpdate"]["maxUnavailable"],
        json!(0),
        "a rollout never drops below two serving replicas"
    );
    let pod_labels = &spec["template"]["metadata"]["labels"];
    let selector = &spec["selector"]["matchLabels"];
    for (k, v) in selector.as_object().expect("matchLabels") {
        assert_eq!(&pod_labels[k], v, "the Deployment selects its own pods");
    }
    let containers = spec["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let port = c["ports"][0]["containerPort"].as_u64().expect("port");
    let port_name = c["ports"][0]["name"].as_str().expect("port name");
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], json!("/healthz"), "{probe} on /healthz");
        assert!(
            get["port"] == json!(port_name) || get["port"] == json!(port),
            "{probe} probes the service's port: {get}"
        );
    }
    assert!(
        c["resources"]["requests"]["cpu"].is_string()
            && c["resources"]["requests"]["memory"].is_string(),
        "resource requests are set"
    );
    let listen = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "FAREBOX_BALANCE_LISTEN")
        .and_then(|e| e["value"].as_str())
        .expect("FAREBOX_BALANCE_LISTEN");
    assert_eq!(
        listen,
        format!("0.0.0.0:{port}"),
        "the service listens on the pod's address (its default is loopback)"
    );
    assert_secret_env(
        c,
        "FAREBOX_BALANCE_DATABASE_URL",
        "farebox-balance",
        "database-url",
    );
    assert_secret_env(
        c,
        "FAREBOX_BALANCE_ADMIN_TOKEN",
        "farebox-balance",
        "admin-token",
    );

    // The Secret the env vars name, with those keys (a placeholder in the repository).
    let secret = one_of_kind(&docs, "Secret");
    assert_eq!(secret["metadata"]["name"], json!("farebox-balance"));
    for key in ["database-url", "admin-token"] {
        let value = secret["stringData"][key].as_str().unwrap_or_default();
        assert!(
            value.contains("CHANGE-ME"),
            "the committed Secret is a placeholder ({key})"
        );
    }
    assert!(
        secret["stringData"]["database-url"]
            .as_str()
            .is_some_and(|u| u.starts_with("postgres://")),
        "the database URL selects PostgreSQL"
    );

    // The migration step: `farebox-balance migrate` with the same database URL.
    let job = one_of_kind(&docs, "Job");
    let jc = &job["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        jc["image"], c["image"],
        "the Job migrates with the service's image"
    );
    assert_eq!(
        jc["args"],
        json!(["migrate"]),
        "the Job runs `farebox-balance migrate`"
    );
    assert_secret_env(
        jc,
        "FAREBOX_BALANCE_DATABASE_URL",
        "farebox-balance",
        "database-url",
    );
    assert_eq!(
        job["spec"]["template"]["spec"]["restartPolicy"],
        json!("Never")
    );

    // Services: both select the pods and reach the container port; one is headless (for
    // Envoy's STRICT_DNS cluster of envoy/envoy-replicas.yaml).
    let services: Vec<&Value> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "Service")
        .map(|(_, d)| d)
        .collect();
    assert!(!services.is_empty(), "a Service");
    for svc in &services {
        for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
            assert_eq!(
                &pod_labels[k], v,
                "{} selects the pods",
                svc["metadata"]["name"]
            );
        }
        let target = &svc["spec"]["ports"][0]["targetPort"];
        assert!(
            *target == json!(port_name) || *target == json!(port),
            "{} targets the container port",
            svc["metadata"]["name"]
        );
    }
    assert!(
        services
            .iter()
            .any(|s| s["spec"]["clusterIP"] == json!("None")),
        "a headless Service, so that Envoy sees every replica"
    );
}
