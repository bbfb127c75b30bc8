//! Shared by tests/config_schema.rs and tests/deploy_manifests.rs: where the example
//! configurations live, how to read them, and the plugin JSON Schema.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

pub const WASM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
pub const STRING_VALUE_TYPE: &str = "type.googleapis.com/google.protobuf.StringValue";
/// What the Istio manifests are rendered with in tests (see deploy/istio/wasmplugin.yaml).
pub const TEST_IMAGE: &str = "registry.example.com/farebox:0.1.0";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every document of a (multi-document) YAML text, as JSON values; empty documents skipped.
pub fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| {
            Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: not valid YAML: {e}"))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Files directly in `dir` whose name ends with one of `exts`, sorted.
pub fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| exts.contains(&x))
        })
        .collect();
    out.sort();
    out
}

pub fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// Every JSON object inside `v` (depth first, `v` included) for which `pred` holds.
pub fn find_objects<'a>(v: &'a Value, pred: &dyn Fn(&Value) -> bool, out: &mut Vec<&'a Value>) {
    if pred(v) {
        out.push(v);
    }
    match v {
        Value::Object(map) => map.values().for_each(|c| find_objects(c, pred, out)),
        Value::Array(items) => items.iter().for_each(|c| find_objects(c, pred, out)),
        _ => {}
    }
}

/// A plugin configuration found in the repository, with where it came from.
pub struct Example {
    pub origin: String,
    /// The raw bytes the filter would get.
    pub raw: String,
    pub json: Value,
}

impl Example {
    fn from_value(origin: String, json: Value) -> Example {
        Example {
            origin,
            raw: json.to_string(),
            json,
        }
    }
}

/// The plugin JSON inside every wasm filter of every `envoy/*.yaml`.
pub fn envoy_examples() -> Vec<Example> {
    let mut out = Vec::new();
    for path in files(&root().join("envoy"), &["yaml", "yml"]) {
        for doc in yaml_docs(&read(&path), &rel(&path)) {
            let mut wasm = Vec::new();
            find_objects(&doc, &|v| v["@type"] == WASM_TYPE, &mut wasm);
            assert!(
                !wasm.is_empty(),
                "{}: no wasm filter ({WASM_TYPE})",
                rel(&path)
            );
            for (i, filter) in wasm.iter().enumerate() {
                let conf = &filter["config"]["configuration"];
                assert_eq!(
                    conf["@type"],
                    STRING_VALUE_TYPE,
                    "{}: the plugin configuration must be a StringValue",
                    rel(&path)
                );
                let raw = conf["value"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{}: configuration.value is missing", rel(&path)))
                    .to_string();
                let json = serde_json::from_str(&raw).unwrap_or_else(|e| {
                    panic!("{}: the plugin configuration is not JSON: {e}", rel(&path))
                });
                out.push(Example {
                    origin: format!("{} (wasm filter {i})", rel(&path)),
                    raw,
                    json,
                });
            }
        }
    }
    out
}

/// A 64-hex stand-in for the image digest in the Istio manifests.
pub fn stand_in_sha256() -> String {
    "0123456789abcdef".repeat(4)
}

/// `deploy/<dir>/*.yaml` with the image placeholders filled in (`image` for
/// `${FAREBOX_IMAGE}`), as (file, documents). A placeholder left outside a comment fails.
pub fn rendered_manifests(dir: &str, image: &str) -> Vec<(String, Vec<Value>)> {
    files(&root().join("deploy").join(dir), &["yaml", "yml"])
        .into_iter()
        .map(|path| {
            let text = read(&path)
                .replace("${FAREBOX_IMAGE_SHA256}", &stand_in_sha256())
                .replace("${FAREBOX_IMAGE}", image);
            let body: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .collect();
            assert!(
                !body.join("\n").contains("${"),
                "{}: a placeholder is left after rendering",
                rel(&path)
            );
            let docs = yaml_docs(&text, &rel(&path));
            (rel(&path), docs)
        })
        .collect()
}

/// `deploy/istio/*.yaml` with their placeholders filled in, as (file, documents).
pub fn istio_manifests() -> Vec<(String, Vec<Value>)> {
    rendered_manifests("istio", TEST_IMAGE)
}

/// `deploy/envoy-gateway/*.yaml` rendered (Envoy Gateway takes the image without a scheme).
pub fn envoy_gateway_manifests() -> Vec<(String, Vec<Value>)> {
    rendered_manifests("envoy-gateway", TEST_IMAGE)
}

/// Where a kind of Istio manifest keeps the plugin config.
pub fn istio_plugin_config(doc: &Value) -> Option<&Value> {
    match doc["kind"].as_str() {
        Some("WasmPlugin") => Some(&doc["spec"]["pluginConfig"]),
        Some("TrafficExtension") => Some(&doc["spec"]["wasm"]["pluginConfig"]),
        _ => None,
    }
}

pub fn istio_examples() -> Vec<Example> {
    let mut out = Vec::new();
    for (file, docs) in istio_manifests() {
        for doc in &docs {
            let Some(conf) = istio_plugin_config(doc) else {
                continue;
            };
            assert!(
                conf.is_object(),
                "{file}: {} without a plugin config",
                doc["kind"]
            );
            out.push(Example::from_value(
                format!("{file} ({} {})", doc["kind"], doc["metadata"]["name"]),
                conf.clone(),
            ));
        }
    }
    out
}

/// The `config` of every wasm extension of every EnvoyExtensionPolicy in deploy/envoy-gateway.
pub fn envoy_gateway_examples() -> Vec<Example> {
    let mut out = Vec::new();
    for (file, docs) in envoy_gateway_manifests() {
        for doc in docs.iter().filter(|d| d["kind"] == "EnvoyExtensionPolicy") {
            for (i, wasm) in doc["spec"]["wasm"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let conf = wasm["config"].clone();
                assert!(conf.is_object(), "{file}: wasm[{i}] without config");
                out.push(Example::from_value(
                    format!(
                        "{file} (EnvoyExtensionPolicy {} wasm[{i}])",
                        doc["metadata"]["name"]
                    ),
                    conf,
                ));
            }
        }
    }
    out
}

/// Where the shared schema folders are: `$FAREBOX_SHARED_SCHEMAS` if set (a git worktree
/// or a copy of the project elsewhere has no `../shared` beside it), else
/// `../shared/schemas` beside the checkout.
pub fn shared_schemas_root() -> PathBuf {
    match std::env::var_os("FAREBOX_SHARED_SCHEMAS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => root().join("../shared/schemas"),
    }
}

/// The schema folder `<shared schemas>/<name>`, if it is there (the caller reports a
/// check that cannot run without it through `skip::cannot_run`).
pub fn shared_schemas(name: &str) -> Option<PathBuf> {
    let dir = shared_schemas_root().join(name);
    dir.is_dir().then_some(dir)
}

pub fn kong_declarative() -> Value {
    let path = root().join("deploy/kong/kong.yaml");
    let mut docs = yaml_docs(&read(&path), &rel(&path));
    assert_eq!(docs.len(), 1, "deploy/kong/kong.yaml: one YAML document");
    docs.remove(0)
}

/// Every `farebox` filter of every filter chain in deploy/kong/kong.yaml.
pub fn kong_examples() -> Vec<Example> {
    let doc = kong_declarative();
    let mut chains = Vec::new();
    find_objects(
        &doc,
        &|v| v.get("filters").is_some_and(Value::is_array),
        &mut chains,
    );
    let mut out = Vec::new();
    for chain in chains {
        for filter in chain["filters"].as_array().into_iter().flatten() {
            if filter["name"] == "farebox" {
                out.push(Example::from_value(
                    format!("deploy/kong/kong.yaml (filter chain {})", chain["name"]),
                    filter["config"].clone(),
                ));
            }
        }
    }
    out
}

/// `schema/examples/<kind>/*.json`, raw text kept as is.
pub fn schema_examples(kind: &str) -> Vec<Example> {
    files(&root().join("schema/examples").join(kind), &["json"])
        .into_iter()
        .map(|path| {
            let raw = read(&path);
            let json = serde_json::from_str(&raw)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", rel(&path)));
            Example {
                origin: rel(&path),
                raw,
                json,
            }
        })
        .collect()
}

pub fn farebox_schema() -> Value {
    read_json(&root().join("schema/farebox.schema.json"))
}

/// The validator of schema/farebox.schema.json (draft from its `$schema`).
pub fn farebox_validator() -> jsonschema::Validator {
    jsonschema::validator_for(&farebox_schema())
        .unwrap_or_else(|e| panic!("schema/farebox.schema.json does not compile: {e}"))
}

/// Why `validator` refuses `instance`, one line per error (empty if it accepts it).
pub fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

/// Whether the filter's own parser accepts the raw configuration.
pub fn parser_verdict(raw: &str) -> Result<(), String> {
    farebox::config::Config::parse(raw.as_bytes())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks that every example is accepted by both the schema and the parser.
pub fn assert_accepted(examples: &[Example]) {
    let validator = farebox_validator();
    let mut failures = Vec::new();
    for ex in examples {
        let errors = schema_errors(&validator, &ex.json);
        if !errors.is_empty() {
            failures.push(format!(
                "{}: refused by schema/farebox.schema.json: {}",
                ex.origin,
                errors.join("; ")
            ));
        }
        if let Err(e) = parser_verdict(&ex.raw) {
            failures.push(format!("{}: refused by Config::parse: {e}", ex.origin));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
