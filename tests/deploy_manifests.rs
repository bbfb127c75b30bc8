#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The deployment manifests in deploy/:
//!
//! - Istio (deploy/istio): the WasmPlugin, the TrafficExtension and the ServiceEntry,
//!   validated against Istio's own CRD schemas (the openAPIV3Schema of each CRD in
//!   `../shared/schemas/istio/`, made strict with `additionalProperties: false` so unknown
//!   fields fail), plus the CEL rules of those CRDs that apply, checked here, plus what
//!   farebox needs. `make istio-check` runs a second, portable check of the WasmPlugin and
//!   the ServiceEntry with Istio models from a package registry.
//! - Envoy Gateway (deploy/envoy-gateway): the EnvoyExtensionPolicy against Envoy Gateway's
//!   CRD (`../shared/schemas/envoy-gateway/`, strict in the same way), its CEL rules
//!   (which JSON Schema validators do not evaluate) checked by code here, and the wiring:
//!   the policy's target, the balance service's route, Service and cluster name.
//! - Kong (deploy/kong): the declarative config against deploy/kong/declarative.schema.json,
//!   plus the settings farebox needs in kong.conf.
//! - The balance service (deploy/balance-service): what running two replicas on
//!   PostgreSQL needs (replicas, probes, the database URL from a Secret, the migration
//!   Job, Services that select the pods). `make k8s-check` validates the same files against
//!   Kubernetes' own schemas (strict) from a package registry.
//!
//! The CRD folders sit beside the project's own checkout only. Elsewhere the CRD checks are
//! SKIPPED with a message, except under `CI=true`, where they FAIL: a check that cannot run
//! is not a pass. The structural checks always run.
//!
//! The plugin configurations inside all of them are checked against the plugin schema and
//! the filter's parser by tests/config_schema.rs.

mod deploy_common;
#[path = "support/skip.rs"]
mod skip;

use std::collections::BTreeMap;

use deploy_common::*;
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------
// Istio, against the CRDs
// ---------------------------------------------------------------------------------------

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

/// A named change to a manifest that a check must refuse.
type Mutation = (&'static str, fn(&mut Value));

fn skipped(test: &str, name: &str) {
    skip::cannot_run(
        test,
        &format!(
            "{} is absent (the CRD schemas are provided beside the project's own checkout \
             only; elsewhere point FAREBOX_SHARED_SCHEMAS at them). The structural checks \
             still ran.",
            shared_schemas_root().join(name).display()
        ),
    );
}

/// Validates every document of `manifests` against `schemas`; returns "file: kind name"
/// of each valid one, fails the test on any error.
fn validate_all(
    schemas: &BTreeMap<(String, String), Value>,
    manifests: &[(String, Vec<Value>)],
    kinds: &[&str],
) -> Vec<String> {
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    for (file, docs) in manifests {
        for doc in docs
            .iter()
            .filter(|d| kinds.contains(&d["kind"].as_str().unwrap_or("")))
        {
            let errors = crd_errors(schemas, doc);
            let what = format!("{file}: {} {}", doc["kind"], doc["metadata"]["name"]);
            if errors.is_empty() {
                checked.push(what);
            } else {
                failures.push(format!("{what}:\n  {}", errors.join("\n  ")));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for kind in kinds {
        assert!(
            checked
                .iter()
                .any(|c| c.contains(&format!(": \"{kind}\" "))),
            "no {kind} checked in {:?}",
            manifests.iter().map(|(f, _)| f).collect::<Vec<_>>()
        );
    }
    checked
}

fn first_of<'a>(manifests: &'a [(String, Vec<Value>)], kind: &str) -> &'a Value {
    manifests
        .iter()
        .flat_map(|(_, docs)| docs)
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn istio_manifests_match_istios_crd_schemas() {
    let Some(dir) = shared_schemas("istio") else {
        return skipped("istio_manifests_match_istios_crd_schemas", "istio");
    };
    let schemas = crd_schemas(&dir);
    let manifests = istio_manifests();
    let checked = validate_all(
        &schemas,
        &manifests,
        &["WasmPlugin", "TrafficExtension", "ServiceEntry"],
    );
    eprintln!("valid against Istio's CRDs: {checked:?}");

    // The strict schemas do catch what Kubernetes would silently drop or refuse.
    let plugin = first_of(&manifests, "WasmPlugin");
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

    let ext = first_of(&manifests, "TrafficExtension");
    let mutations: [Mutation; 5] = [
        ("unknown field under wasm", |d| {
            d["spec"]["wasm"]["pluginConfg"] = json!({})
        }),
        ("WasmPlugin's top-level url", |d| {
            d["spec"]["url"] = d["spec"]["wasm"]["url"].clone()
        }),
        ("bad failStrategy", |d| {
            d["spec"]["wasm"]["failStrategy"] = json!("FAIL_SOMETIMES")
        }),
        ("sha256 with a prefix", |d| {
            d["spec"]["wasm"]["sha256"] = json!(format!("sha256:{}", stand_in_sha256()))
        }),
        ("wasm and lua at once", |d| {
            d["spec"]["lua"] = json!({"inlineCode": "function envoy_on_request(h) end"})
        }),
    ];
    for (what, mutate) in mutations {
        let mut bad = ext.clone();
        mutate(&mut bad);
        assert!(
            !crd_errors(&schemas, &bad).is_empty(),
            "TrafficExtension: {what} passed the CRD schema"
        );
    }
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

/// The CEL rules (`x-kubernetes-validations`) of Istio's WasmPlugin, TrafficExtension and
/// ServiceEntry CRDs, as code (JSON Schema validators do not evaluate them).
/// `istio_cel_rules_are_all_checked` fails when a CRD has a rule this does not know.
fn istio_cel_errors(doc: &Value) -> Vec<String> {
    if doc["kind"] == "ServiceEntry" {
        return service_entry_cel_errors(&doc["spec"]);
    }
    let spec = &doc["spec"];
    let mut errors = Vec::new();
    let selection = ["selector", "targetRef", "targetRefs"]
        .iter()
        .filter(|k| spec.get(**k).is_some())
        .count();
    // Both CRDs: "only one of targetRefs or selector can be set" (none applies the
    // plugin to every workload of the namespace, which is not what farebox wants).
    if selection != 1 {
        errors.push("exactly one of selector/targetRef/targetRefs".to_string());
    }
    if let Some(labels) = spec["selector"]["matchLabels"].as_object() {
        for (k, v) in labels {
            if k.is_empty() || k.contains('*') || v.as_str().is_some_and(|v| v.contains('*')) {
                errors.push(format!(
                    "selector.matchLabels {k:?}: no wildcards, no empty key"
                ));
            }
        }
    }
    let refs = spec["targetRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec.get("targetRef"));
    for r in refs {
        if r.get("namespace")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
        {
            errors.push("targetRef(s): cross namespace referencing is not supported".into());
        }
    }
    if doc["kind"] == "TrafficExtension" && spec.get("wasm").is_some() == spec.get("lua").is_some()
    {
        errors.push("exactly one of wasm or lua must be set".into());
    }
    // Both CRDs, on the Wasm fields (top level in a WasmPlugin, under `wasm` in a
    // TrafficExtension).
    let (wasm, _) = istio_wasm_fields(doc);
    let url = wasm["url"].as_str().unwrap_or_default();
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if !["", "http", "https", "file", "oci"].contains(&scheme) {
        errors.push(format!(
            "url {url:?}: scheme must be one of http, https, file, oci"
        ));
    }
    for env in wasm["vmConfig"]["env"].as_array().into_iter().flatten() {
        if env["valueFrom"] == "HOST" && env.get("value").is_some() {
            errors.push(format!(
                "vmConfig.env {}: value may only be set when valueFrom is INLINE",
                env["name"]
            ));
        }
    }
    errors
}

/// The ServiceEntry CRD's CEL rules (networking.istio.io/v1), as code.
fn service_entry_cel_errors(spec: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let port_ok = |p: &Value| p.as_u64().is_some_and(|n| (1..=65535).contains(&n));
    let endpoints: Vec<&Value> = spec["endpoints"].as_array().into_iter().flatten().collect();
    let resolution = spec["resolution"].as_str();
    if spec.get("workloadSelector").is_some() && spec.get("endpoints").is_some() {
        errors.push("only one of WorkloadSelector or Endpoints can be set".into());
    }
    let cidr = spec["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|a| a.as_str().is_some_and(|a| a.contains('/')));
    if cidr && !["STATIC", "NONE"].contains(&resolution.unwrap_or("NONE")) {
        errors.push("CIDR addresses are allowed only for NONE/STATIC resolution types".into());
    }
    if resolution.unwrap_or("NONE") == "NONE" && spec.get("endpoints").is_some() {
        errors.push("NONE mode cannot set endpoints".into());
    }
    if resolution == Some("DNS_ROUND_ROBIN") && endpoints.len() > 1 {
        errors.push("DNS_ROUND_ROBIN mode cannot have multiple endpoints".into());
    }
    for e in &endpoints {
        let address = e["address"].as_str().unwrap_or_default();
        if e.get("address").is_none() && e.get("network").is_none() {
            errors.push("endpoints: Address is required".into());
        }
        if let Some(path) = address.strip_prefix("unix://") {
            if e.get("ports").is_some() {
                errors.push(format!("endpoint {address}: UDS may not include ports"));
            }
            if !path.starts_with('/') && !path.starts_with('@') {
                errors.push(format!(
                    "endpoint {address}: UDS must be an absolute path or abstract socket"
                ));
            }
            if path.ends_with('/') {
                errors.push(format!("endpoint {address}: UDS may not be a dir"));
            }
        }
        for (name, port) in e["ports"].as_object().into_iter().flatten() {
            let valid_name = name.len() < 63
                && !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-');
            if !valid_name {
                errors.push(format!("endpoint port name {name:?} must be valid"));
            }
            if !port_ok(port) {
                errors.push(format!("endpoint port {port}: must be between 1-65535"));
            }
        }
    }
    for h in spec["hosts"].as_array().into_iter().flatten() {
        if h == "*" {
            errors.push("hostname cannot be wildcard".into());
        }
    }
    let ports: Vec<&Value> = spec["ports"].as_array().into_iter().flatten().collect();
    for (i, p) in ports.iter().enumerate() {
        if ports[..i].iter().any(|q| q["number"] == p["number"]) {
            errors.push(format!("port number {} cannot be duplicated", p["number"]));
        }
        if !port_ok(&p["number"]) {
            errors.push(format!("port {}: must be between 1-65535", p["number"]));
        }
        if p.get("targetPort").is_some_and(|t| !port_ok(t)) {
            errors.push(format!(
                "targetPort {}: must be between 1-65535",
                p["targetPort"]
            ));
        }
    }
    for (k, v) in spec["workloadSelector"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
    {
        if v.as_str().is_some_and(|v| v.contains('*')) {
            errors.push(format!(
                "workloadSelector.labels {k:?}: wildcard is not supported"
            ));
        }
    }
    errors
}

/// What farebox needs of a WasmPlugin or TrafficExtension: (where the Wasm fields are,
/// the plugin config).
fn istio_wasm_fields(doc: &Value) -> (&Value, &Value) {
    match doc["kind"].as_str() {
        Some("TrafficExtension") => (&doc["spec"]["wasm"], &doc["spec"]["wasm"]["pluginConfig"]),
        _ => (&doc["spec"], &doc["spec"]["pluginConfig"]),
    }
}

#[test]
fn istio_manifests_are_wired_for_farebox() {
    let mut plugins = istio_docs("WasmPlugin");
    plugins.extend(istio_docs("TrafficExtension"));
    let entries = istio_docs("ServiceEntry");
    assert!(
        plugins.iter().any(|(_, d)| d["kind"] == "WasmPlugin")
            && plugins.iter().any(|(_, d)| d["kind"] == "TrafficExtension"),
        "deploy/istio needs a WasmPlugin and a TrafficExtension"
    );
    for (file, _) in istio_manifests() {
        let raw = read(&root().join(&file));
        for doc in yaml_docs(&raw, &file) {
            assert!(
                ["WasmPlugin", "TrafficExtension", "ServiceEntry"]
                    .contains(&doc["kind"].as_str().unwrap_or("")),
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
        let cel = istio_cel_errors(se);
        assert!(cel.is_empty(), "{file}: ServiceEntry: {cel:?}");
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
        let what = format!("{file}: {} {}", plugin["kind"], plugin["metadata"]["name"]);
        assert_eq!(
            plugin["apiVersion"], "extensions.istio.io/v1alpha1",
            "{what}"
        );
        let cel = istio_cel_errors(plugin);
        assert!(cel.is_empty(), "{what}: {cel:?}");
        let (wasm, conf) = istio_wasm_fields(plugin);
        let url = str_of(&wasm["url"], "url");
        assert_eq!(url, format!("oci://{TEST_IMAGE}"), "{what}: url");
        let sha = str_of(&wasm["sha256"], "sha256");
        assert!(
            sha.len() == 64
                && sha
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{what}: sha256 must be 64 lower-case hex digits (the image manifest digest without `sha256:`)"
        );
        assert_eq!(plugin["spec"]["phase"], "AUTHZ", "{what}: phase");
        assert_eq!(
            wasm["failStrategy"], "FAIL_CLOSE",
            "{what}: an unloadable filter must not let requests through unpaid"
        );
        assert!(
            ["IfNotPresent", "Always"]
                .contains(&str_of(&wasm["imagePullPolicy"], "imagePullPolicy")),
            "{what}: imagePullPolicy"
        );
        assert_eq!(wasm["type"], "HTTP", "{what}: type");
        assert_eq!(
            wasm["pluginName"], "farebox",
            "{what}: the filter's root id"
        );

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

    // The two are alternatives for the same gateway: same workloads, same config.
    let (_, wp) = &plugins
        .iter()
        .find(|(_, d)| d["kind"] == "WasmPlugin")
        .unwrap();
    let (_, te) = &plugins
        .iter()
        .find(|(_, d)| d["kind"] == "TrafficExtension")
        .unwrap();
    assert_eq!(
        istio_wasm_fields(wp).1,
        istio_wasm_fields(te).1,
        "pluginConfig differs"
    );
    assert_eq!(
        wp["spec"]["selector"], te["spec"]["selector"],
        "selector differs"
    );
    for field in ["url", "sha256", "failStrategy", "pluginName", "type"] {
        assert_eq!(
            istio_wasm_fields(wp).0[field],
            istio_wasm_fields(te).0[field],
            "{field} differs between the WasmPlugin and the TrafficExtension"
        );
    }
}

#[test]
fn istio_cel_checks_can_fail() {
    let (_, te) = istio_docs("TrafficExtension").into_iter().next().unwrap();
    assert!(istio_cel_errors(&te).is_empty());
    let mutations: [Mutation; 5] = [
        (
            "selector and targetRefs",
            |d| {
                d["spec"]["targetRefs"] = json!([{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "api"}])
            },
        ),
        ("no lua nor wasm", |d| {
            d["spec"].as_object_mut().unwrap().remove("wasm");
        }),
        ("ftp url", |d| {
            d["spec"]["wasm"]["url"] = json!("ftp://example.com/farebox.wasm")
        }),
        ("wildcard label", |d| {
            d["spec"]["selector"]["matchLabels"]["istio"] = json!("ingress*")
        }),
        ("cross-namespace targetRef", |d| {
            let spec = d["spec"].as_object_mut().unwrap();
            spec.remove("selector");
            spec.insert("targetRefs".into(), json!([{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "api", "namespace": "other"}]));
        }),
    ];
    for (what, mutate) in mutations {
        let mut bad = te.clone();
        mutate(&mut bad);
        assert!(
            !istio_cel_errors(&bad).is_empty(),
            "{what} passed the CEL checks"
        );
    }
}

/// A change to a manifest and a fragment of the error the CEL check must give for it.
type CelMutation = (&'static str, &'static str, fn(&mut Value));

/// Applies each mutation to a copy of `doc` and wants the CEL error it names.
fn assert_cel_refuses(doc: &Value, mutations: &[CelMutation]) {
    assert!(
        istio_cel_errors(doc).is_empty(),
        "{:?}",
        istio_cel_errors(doc)
    );
    for (what, want, mutate) in mutations {
        let mut bad = doc.clone();
        mutate(&mut bad);
        let errors = istio_cel_errors(&bad);
        assert!(
            errors.iter().any(|e| e.contains(want)),
            "{} with {what}: want an error with {want:?}, got {errors:?}",
            doc["kind"]
        );
    }
}

#[test]
fn istio_cel_checks_of_the_wasmplugin_and_serviceentry_can_fail() {
    let (_, wp) = istio_docs("WasmPlugin").into_iter().next().unwrap();
    assert_cel_refuses(
        &wp,
        &[
            ("an ftp url", "scheme must be one of", |d| {
                d["spec"]["url"] = json!("ftp://example.com/farebox.wasm")
            }),
            ("a cross-namespace targetRef", "cross namespace", |d| {
                let spec = d["spec"].as_object_mut().unwrap();
                spec.remove("selector");
                spec.insert(
                    "targetRef".into(),
                    json!({"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "api", "namespace": "other"}),
                );
            }),
            ("selector and targetRef", "exactly one of selector", |d| {
                d["spec"]["targetRef"] =
                    json!({"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "api"})
            }),
            ("an empty label key", "no empty key", |d| {
                d["spec"]["selector"]["matchLabels"][""] = json!("x")
            }),
            ("a HOST env var with a value", "valueFrom is INLINE", |d| {
                d["spec"]["vmConfig"] =
                    json!({"env": [{"name": "POD_NAME", "valueFrom": "HOST", "value": "x"}]})
            }),
        ],
    );
    let (_, te) = istio_docs("TrafficExtension").into_iter().next().unwrap();
    assert_cel_refuses(
        &te,
        &[("a HOST env var with a value", "valueFrom is INLINE", |d| {
            d["spec"]["wasm"]["vmConfig"] =
                json!({"env": [{"name": "POD_NAME", "valueFrom": "HOST", "value": "x"}]})
        })],
    );
    let (_, se) = istio_docs("ServiceEntry").into_iter().next().unwrap();
    assert_cel_refuses(
        &se,
        &[
            ("a wildcard host", "cannot be wildcard", |d| {
                d["spec"]["hosts"] = json!(["*"])
            }),
            ("a duplicated port", "cannot be duplicated", |d| {
                let p = d["spec"]["ports"][0].clone();
                d["spec"]["ports"].as_array_mut().unwrap().push(p);
            }),
            ("port 0", "between 1-65535", |d| {
                d["spec"]["ports"][0]["number"] = json!(0)
            }),
            ("targetPort 70000", "targetPort", |d| {
                d["spec"]["ports"][0]["targetPort"] = json!(70000)
            }),
            ("a CIDR with DNS resolution", "CIDR", |d| {
                d["spec"]["addresses"] = json!(["10.0.0.0/8"])
            }),
            ("endpoints with NONE resolution", "NONE mode", |d| {
                d["spec"]["resolution"] = json!("NONE");
                d["spec"]["endpoints"] = json!([{"address": "10.0.0.1"}]);
            }),
            (
                "two endpoints with DNS_ROUND_ROBIN",
                "DNS_ROUND_ROBIN",
                |d| {
                    d["spec"]["resolution"] = json!("DNS_ROUND_ROBIN");
                    d["spec"]["endpoints"] =
                        json!([{"address": "a.internal"}, {"address": "b.internal"}]);
                },
            ),
            (
                "endpoints and a workloadSelector",
                "WorkloadSelector or Endpoints",
                |d| {
                    d["spec"]["endpoints"] = json!([{"address": "a.internal"}]);
                    d["spec"]["workloadSelector"] = json!({"labels": {"app": "balance"}});
                },
            ),
            (
                "an endpoint without address or network",
                "Address is required",
                |d| d["spec"]["endpoints"] = json!([{"labels": {"a": "b"}}]),
            ),
            (
                "a UDS endpoint with ports",
                "UDS may not include ports",
                |d| {
                    d["spec"]["resolution"] = json!("STATIC");
                    d["spec"]["endpoints"] =
                        json!([{"address": "unix:///run/b.sock", "ports": {"http": 1}}]);
                },
            ),
            ("a relative UDS path", "absolute path", |d| {
                d["spec"]["resolution"] = json!("STATIC");
                d["spec"]["endpoints"] = json!([{"address": "unix://run/b.sock"}]);
            }),
            ("a UDS directory", "may not be a dir", |d| {
                d["spec"]["resolution"] = json!("STATIC");
                d["spec"]["endpoints"] = json!([{"address": "unix:///run/"}]);
            }),
            ("a bad endpoint port name", "port name", |d| {
                d["spec"]["endpoints"] =
                    json!([{"address": "a.internal", "ports": {"-http": 8081}}])
            }),
            ("endpoint port 0", "endpoint port 0", |d| {
                d["spec"]["endpoints"] = json!([{"address": "a.internal", "ports": {"http": 0}}])
            }),
            (
                "a wildcard workload label",
                "wildcard is not supported",
                |d| d["spec"]["workloadSelector"] = json!({"labels": {"app": "bal*"}}),
            ),
        ],
    );
}

/// Every CEL rule of Istio's WasmPlugin, TrafficExtension and ServiceEntry CRDs is one
/// `istio_cel_errors` checks: a new rule in a newer CRD must be taught to it.
#[test]
fn istio_cel_rules_are_all_checked() {
    let Some(dir) = shared_schemas("istio") else {
        return skipped("istio_cel_rules_are_all_checked", "istio");
    };
    let known: [(&str, &[&str]); 3] = [
        (
            "wasmplugin.crd.yaml",
            &[
                "spec: only one of targetRefs or selector can be set",
                "spec.selector.matchLabels: wildcard not allowed in label key match",
                "spec.selector.matchLabels: key must not be empty",
                "spec.selector.matchLabels{}: wildcard not allowed in label value match",
                "spec.targetRef.namespace: cross namespace referencing is not currently supported",
                "spec.targetRefs[].namespace: cross namespace referencing is not currently supported",
                "spec.url: url must have schema one of [http, https, file, oci]",
                "spec.vmConfig.env[]: value may only be set when valueFrom is INLINE",
            ],
        ),
        (
            "trafficextension.crd.yaml",
            &[
                "spec: only one of targetRefs or selector can be set",
                "spec: exactly one of wasm or lua must be set",
                "spec.selector.matchLabels: wildcard not allowed in label key match",
                "spec.selector.matchLabels: key must not be empty",
                "spec.selector.matchLabels{}: wildcard not allowed in label value match",
                "spec.targetRefs[].namespace: cross namespace referencing is not currently supported",
                "spec.wasm.url: url must have schema one of [http, https, file, oci]",
                "spec.wasm.vmConfig.env[]: value may only be set when valueFrom is INLINE",
            ],
        ),
        (
            "serviceentry.crd.yaml",
            &[
                "spec: only one of WorkloadSelector or Endpoints can be set",
                "spec: CIDR addresses are allowed only for NONE/STATIC resolution types",
                "spec: NONE mode cannot set endpoints",
                "spec: DNS_ROUND_ROBIN mode cannot have multiple endpoints",
                "spec.endpoints[]: Address is required",
                "spec.endpoints[]: UDS may not include ports",
                "spec.endpoints[].address: UDS must be an absolute path or abstract socket",
                "spec.endpoints[].address: UDS may not be a dir",
                "spec.endpoints[].ports: port name must be valid",
                "spec.endpoints[].ports{}: port must be between 1-65535",
                "spec.hosts[]: hostname cannot be wildcard",
                "spec.ports: port number cannot be duplicated",
                "spec.ports[].number: port must be between 1-65535",
                "spec.ports[].targetPort: port must be between 1-65535",
                "spec.workloadSelector.labels{}: wildcard is not supported in selector",
            ],
        ),
    ];
    let mut total = 0;
    for (file, known) in known {
        let crd = yaml_docs(&read(&dir.join(file)), file);
        for version in crd[0]["spec"]["versions"].as_array().unwrap() {
            let mut rules = Vec::new();
            collect_cel_rules(
                &version["schema"]["openAPIV3Schema"]["properties"]["spec"],
                "spec",
                &mut rules,
            );
            for rule in &rules {
                assert!(
                    known.contains(&rule.as_str()),
                    "{file} {}: a CEL rule istio_cel_errors does not check: {rule}",
                    version["name"]
                );
            }
            total += rules.len();
        }
    }
    eprintln!("CEL rules of Istio's CRDs (all versions) checked in code: {total}");
}

// ---------------------------------------------------------------------------------------
// Envoy Gateway
// ---------------------------------------------------------------------------------------

const GATEWAY_KINDS: [&str; 7] = [
    "Gateway",
    "ListenerSet",
    "HTTPRoute",
    "GRPCRoute",
    "UDPRoute",
    "TCPRoute",
    "TLSRoute",
];
const X_ROUTES: [&str; 5] = ["HTTPRoute", "GRPCRoute", "UDPRoute", "TCPRoute", "TLSRoute"];

fn is_sha256_hex(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The CEL rules (`x-kubernetes-validations`) of the EnvoyExtensionPolicy CRD, and the
/// sha256 pattern it states only in a kubebuilder comment, as code.
fn eep_cel_errors(doc: &Value) -> Vec<String> {
    let spec = &doc["spec"];
    let mut errors = Vec::new();
    let has = |k: &str| spec.get(k).is_some();
    let selectors = spec["targetSelectors"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    if !((has("targetRef") != has("targetRefs")) || selectors) {
        errors.push("either targetRef or targetRefs must be used".to_string());
    }
    let mut refs: Vec<&Value> = spec["targetRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    if has("targetRef") {
        refs.push(&spec["targetRef"]);
    }
    for r in &refs {
        if r["group"] != "gateway.networking.k8s.io" {
            errors.push(format!(
                "targetRef group {}: must be gateway.networking.k8s.io",
                r["group"]
            ));
        }
        if !GATEWAY_KINDS.contains(&r["kind"].as_str().unwrap_or("")) {
            errors.push(format!(
                "targetRef kind {}: must be one of {GATEWAY_KINDS:?}",
                r["kind"]
            ));
        }
    }
    if has("mergeType") {
        let sel_kinds = spec["targetSelectors"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| &s["kind"]);
        if !refs
            .iter()
            .map(|r| &r["kind"])
            .chain(sel_kinds)
            .all(|k| X_ROUTES.contains(&k.as_str().unwrap_or("")))
        {
            errors.push("mergeType can only be used with xRoute targets".into());
        }
    }
    for (i, wasm) in spec["wasm"].as_array().into_iter().flatten().enumerate() {
        let code = &wasm["code"];
        let ty = code["type"].as_str().unwrap_or("");
        if (ty == "HTTP") != code.get("http").is_some() {
            errors.push(format!(
                "wasm[{i}]: If type is HTTP, http field needs to be set (and only then)"
            ));
        }
        if (ty == "Image") != code.get("image").is_some() {
            errors.push(format!(
                "wasm[{i}]: If type is Image, image field needs to be set (and only then)"
            ));
        }
        if let Some(secret) = code["image"].get("pullSecretRef") {
            if secret.get("kind").is_some_and(|k| k != "Secret") {
                errors.push(format!(
                    "wasm[{i}]: pullSecretRef: only support Secret kind."
                ));
            }
        }
        for source in ["http", "image"] {
            if let Some(sha) = code[source].get("sha256") {
                if !is_sha256_hex(sha) {
                    errors.push(format!(
                        "wasm[{i}].code.{source}.sha256 {sha}: must match ^[a-f0-9]{{64}}$"
                    ));
                }
            }
        }
    }
    errors
}

fn gateway_docs(kind: &str) -> Vec<(String, Value)> {
    envoy_gateway_manifests()
        .into_iter()
        .flat_map(|(file, docs)| docs.into_iter().map(move |d| (file.clone(), d)))
        .filter(|(_, d)| d["kind"] == kind)
        .collect()
}

#[test]
fn envoy_gateway_policy_matches_the_crd_schema() {
    let Some(dir) = shared_schemas("envoy-gateway") else {
        return skipped(
            "envoy_gateway_policy_matches_the_crd_schema",
            "envoy-gateway",
        );
    };
    let source = read(&dir.join("SOURCE.txt"));
    assert!(
        source.contains("envoyproxy/gateway"),
        "SOURCE.txt should name the repository the CRD comes from"
    );
    let schemas = crd_schemas(&dir);
    assert!(
        schemas.contains_key(&(
            "gateway.envoyproxy.io/v1alpha1".to_string(),
            "EnvoyExtensionPolicy".to_string()
        )),
        "no EnvoyExtensionPolicy v1alpha1 in {}",
        dir.display()
    );
    let manifests = envoy_gateway_manifests();
    let checked = validate_all(&schemas, &manifests, &["EnvoyExtensionPolicy"]);
    eprintln!("valid against Envoy Gateway's CRD: {checked:?}");

    // The strict schema catches what the API server would drop or refuse.
    let policy = first_of(&manifests, "EnvoyExtensionPolicy");
    let mutations: [Mutation; 6] = [
        ("unknown spec field", |d| d["spec"]["wasms"] = json!([])),
        ("unknown wasm field", |d| {
            d["spec"]["wasm"][0]["failopen"] = json!(false)
        }),
        ("rootId instead of rootID", |d| {
            let w = d["spec"]["wasm"][0].as_object_mut().unwrap();
            let v = w.remove("rootID").unwrap();
            w.insert("rootId".into(), v);
        }),
        ("bad code type", |d| {
            d["spec"]["wasm"][0]["code"]["type"] = json!("OCI")
        }),
        ("failOpen as a string", |d| {
            d["spec"]["wasm"][0]["failOpen"] = json!("false")
        }),
        ("targetRef without a name", |d| {
            d["spec"]["targetRefs"][0]
                .as_object_mut()
                .unwrap()
                .remove("name");
        }),
    ];
    for (what, mutate) in mutations {
        let mut bad = policy.clone();
        mutate(&mut bad);
        assert!(
            !crd_errors(&schemas, &bad).is_empty(),
            "EnvoyExtensionPolicy: {what} passed the CRD schema"
        );
    }

    // Every CEL rule of the CRD that the policy is subject to is one this file checks:
    // a new rule in a newer CRD must be taught to eep_cel_errors.
    let crd = yaml_docs(&read(&dir.join("envoyextensionpolicy.crd.yaml")), "crd");
    let mut rules = Vec::new();
    collect_cel_rules(
        &crd[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"],
        "spec",
        &mut rules,
    );
    let known = [
        "spec: either targetRef or targetRefs must be used",
        "spec: this policy can only have a targetRef.group of gateway.networking.k8s.io",
        "spec: this policy can only have a targetRef.kind of Gateway/ListenerSet/HTTPRoute/GRPCRoute/TCPRoute/UDPRoute/TLSRoute",
        "spec: this policy can only have a targetRefs[*].group of gateway.networking.k8s.io",
        "spec: this policy can only have a targetRefs[*].kind of Gateway/ListenerSet/HTTPRoute/GRPCRoute/TCPRoute/UDPRoute/TLSRoute",
        "spec: mergeType can only be used with xRoute targets",
        "spec.wasm[].code: If type is HTTP, http field needs to be set.",
        "spec.wasm[].code: If type is Image, image field needs to be set.",
        "spec.wasm[].code.image.pullSecretRef: only support Secret kind.",
    ];
    let relevant: Vec<&String> = rules
        .iter()
        .filter(|r| r.starts_with("spec: ") || r.starts_with("spec.wasm"))
        .collect();
    for rule in &relevant {
        assert!(
            known.contains(&rule.as_str()),
            "a CEL rule of the CRD is not checked by eep_cel_errors: {rule}"
        );
    }
    eprintln!("CEL rules of the CRD checked in code: {}", relevant.len());
}

/// "<path>: <message>" of every `x-kubernetes-validations` rule under `schema`.
fn collect_cel_rules(schema: &Value, path: &str, out: &mut Vec<String>) {
    for rule in schema["x-kubernetes-validations"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push(format!(
            "{path}: {}",
            rule["message"].as_str().unwrap_or("")
        ));
    }
    if let Some(props) = schema["properties"].as_object() {
        for (k, v) in props {
            collect_cel_rules(v, &format!("{path}.{k}"), out);
        }
    }
    if schema.get("items").is_some() {
        collect_cel_rules(&schema["items"], &format!("{path}[]"), out);
    }
    // The values of a map (labels and the like).
    if schema["additionalProperties"].is_object() {
        collect_cel_rules(&schema["additionalProperties"], &format!("{path}{{}}"), out);
    }
}

#[test]
fn envoy_gateway_cel_checks_can_fail() {
    let (_, policy) = gateway_docs("EnvoyExtensionPolicy")
        .into_iter()
        .next()
        .unwrap();
    assert!(
        eep_cel_errors(&policy).is_empty(),
        "{:?}",
        eep_cel_errors(&policy)
    );
    let mutations: [Mutation; 9] = [
        ("no target", |d| {
            d["spec"].as_object_mut().unwrap().remove("targetRefs");
        }),
        ("targetRef and targetRefs", |d| {
            d["spec"]["targetRef"] = d["spec"]["targetRefs"][0].clone()
        }),
        ("core group", |d| {
            d["spec"]["targetRefs"][0]["group"] = json!("")
        }),
        ("Service target", |d| {
            d["spec"]["targetRefs"][0]["kind"] = json!("Service")
        }),
        ("mergeType on a Gateway", |d| {
            d["spec"]["targetRefs"][0]["kind"] = json!("Gateway");
            d["spec"]["mergeType"] = json!("StrategicMerge");
        }),
        ("Image without image", |d| {
            d["spec"]["wasm"][0]["code"]
                .as_object_mut()
                .unwrap()
                .remove("image");
        }),
        ("HTTP type with an image", |d| {
            d["spec"]["wasm"][0]["code"]["type"] = json!("HTTP")
        }),
        ("sha256 with its prefix", |d| {
            d["spec"]["wasm"][0]["code"]["image"]["sha256"] =
                json!(format!("sha256:{}", stand_in_sha256()))
        }),
        ("pull secret of another kind", |d| {
            d["spec"]["wasm"][0]["code"]["image"]["pullSecretRef"] =
                json!({"kind": "ConfigMap", "name": "x"})
        }),
    ];
    for (what, mutate) in mutations {
        let mut bad = policy.clone();
        mutate(&mut bad);
        assert!(
            !eep_cel_errors(&bad).is_empty(),
            "{what} passed the CEL checks"
        );
    }
}

#[test]
fn envoy_gateway_manifests_are_wired_for_farebox() {
    for (file, docs) in envoy_gateway_manifests() {
        for doc in docs {
            assert!(
                [
                    "EnvoyExtensionPolicy",
                    "HTTPRoute",
                    "Service",
                    "SecurityPolicy"
                ]
                .contains(&doc["kind"].as_str().unwrap_or("")),
                "{file}: unexpected kind {} (teach tests/deploy_manifests.rs about it)",
                doc["kind"]
            );
        }
    }
    let routes = gateway_docs("HTTPRoute");
    let services = gateway_docs("Service");
    let security = gateway_docs("SecurityPolicy");
    let policies = gateway_docs("EnvoyExtensionPolicy");
    assert_eq!(
        policies.len(),
        1,
        "one EnvoyExtensionPolicy in deploy/envoy-gateway"
    );
    let (file, policy) = &policies[0];
    let what = format!(
        "{file}: EnvoyExtensionPolicy {}",
        policy["metadata"]["name"]
    );
    assert_eq!(
        policy["apiVersion"], "gateway.envoyproxy.io/v1alpha1",
        "{what}"
    );
    let cel = eep_cel_errors(policy);
    assert!(cel.is_empty(), "{what}: {cel:?}");
    let ns = str_of(&policy["metadata"]["namespace"], "metadata.namespace");

    // Its targets are routes (or Gateways) of this folder's namespace.
    let targets = policy["spec"]["targetRefs"].as_array().expect("targetRefs");
    for t in targets {
        if t["kind"] == "HTTPRoute" {
            assert!(
                routes
                    .iter()
                    .any(|(_, r)| r["metadata"]["name"] == t["name"]
                        && r["metadata"]["namespace"] == ns),
                "{what}: targetRef HTTPRoute {} is not in deploy/envoy-gateway",
                t["name"]
            );
        }
    }

    let wasm = policy["spec"]["wasm"].as_array().expect("spec.wasm");
    assert_eq!(wasm.len(), 1, "{what}: one wasm extension");
    let w = &wasm[0];
    assert_eq!(w["rootID"], "farebox", "{what}: the filter's root id");
    assert_eq!(
        w["failOpen"], false,
        "{what}: failOpen must be false, or a broken module lets requests through unpaid"
    );
    assert_eq!(w["code"]["type"], "Image", "{what}: the OCI image");
    let image = &w["code"]["image"];
    assert_eq!(
        image["url"], TEST_IMAGE,
        "{what}: Envoy Gateway wants registry/image:tag, without oci://"
    );
    assert!(
        is_sha256_hex(&image["sha256"]),
        "{what}: the image is pinned by sha256"
    );

    // The plugin's cluster is the one Envoy Gateway makes for a route rule whose backend
    // is the balance Service: httproute/<namespace>/<name>/rule/<index>.
    let conf = &w["config"];
    let cluster = str_of(&conf["cluster"], "config.cluster");
    let parts: Vec<&str> = cluster.split('/').collect();
    assert!(
        parts.len() == 5 && parts[0] == "httproute" && parts[3] == "rule",
        "{what}: config.cluster {cluster:?} is not httproute/<namespace>/<name>/rule/<index>"
    );
    let (route_ns, route_name, rule) = (
        parts[1],
        parts[2],
        parts[4].parse::<usize>().expect("rule index"),
    );
    let (_, route) = routes
        .iter()
        .find(|(_, r)| {
            r["metadata"]["name"] == route_name && r["metadata"]["namespace"] == route_ns
        })
        .unwrap_or_else(|| {
            panic!("{what}: no HTTPRoute {route_ns}/{route_name} for cluster {cluster:?}")
        });
    let backends = route["spec"]["rules"][rule]["backendRefs"]
        .as_array()
        .unwrap_or_else(|| panic!("HTTPRoute {route_name}: rule {rule} has no backendRefs"));
    assert_eq!(
        backends.len(),
        1,
        "HTTPRoute {route_name}: one backend, the balance service"
    );
    let backend = &backends[0];
    assert!(
        backend["kind"] == "Service" && backend.get("namespace").is_none(),
        "HTTPRoute {route_name}: the backend is a Service of the same namespace"
    );
    let (_, service) = services
        .iter()
        .find(|(_, s)| {
            s["metadata"]["name"] == backend["name"] && s["metadata"]["namespace"] == route_ns
        })
        .unwrap_or_else(|| panic!("no Service {} in deploy/envoy-gateway", backend["name"]));
    assert!(
        service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["port"] == backend["port"]),
        "Service {}: no port {}",
        backend["name"],
        backend["port"]
    );
    assert_eq!(
        conf["authority"],
        format!(
            "{}.{route_ns}.svc.cluster.local",
            str_of(&backend["name"], "backend name")
        ),
        "{what}: config.authority is the Service's host name"
    );
    // The route exists for its cluster only: clients are refused on it.
    assert!(
        security.iter().any(|(_, sp)| {
            sp["metadata"]["namespace"] == route_ns
                && sp["spec"]["authorization"]["defaultAction"] == "Deny"
                && sp["spec"]["authorization"].get("rules").is_none()
                && sp["spec"]["targetRefs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["kind"] == "HTTPRoute" && t["name"] == route_name)
        }),
        "HTTPRoute {route_name} must be closed to clients by a deny-all SecurityPolicy"
    );
    // And the filter does not run on it.
    assert!(
        !targets.iter().any(|t| t["name"] == route_name),
        "{what}: the balance route must not be priced"
    );
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
