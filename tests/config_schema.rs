#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! schema/farebox.schema.json is the one description of the plugin configuration that
//! tools see (editors, Kong's config_schema, CI checks of manifests). These tests keep it
//! in sync with the filter's own parser (`farebox::config::Config::parse`):
//!
//! - every configuration in the repository (the plugin JSON of every envoy/*.yaml, the
//!   Istio WasmPlugin and TrafficExtension pluginConfig, the Envoy Gateway
//!   EnvoyExtensionPolicy config, the Kong filter config, schema/examples/valid) is
//!   accepted by both;
//! - every schema/examples/invalid configuration is refused by both;
//! - the two documented gaps (schema/examples/parser-only, schema/examples/schema-stricter)
//!   stay exactly what they claim to be;
//! - the schema's properties are the parser's known fields, read from its serde types
//!   (top level, route, credential, usage, prices, mcp), its defaults are the parser's
//!   defaults, and the README's configuration table lists the same top-level fields;
//! - deploy/kong/farebox.meta.json carries the same schema as draft 4, and draft 4, draft 7
//!   and 2020-12 validators all agree on every example.

mod deploy_common;

use deploy_common::*;
use farebox::config::{self, Config};
use serde_json::{json, Value};
use std::collections::BTreeSet;

fn all_accepted_examples() -> Vec<Example> {
    let envoy = envoy_examples();
    let istio = istio_examples();
    let kong = kong_examples();
    let gateway = envoy_gateway_examples();
    let valid = schema_examples("valid");
    assert!(
        envoy.len() >= 4,
        "expected the plugin JSON of 4+ envoy/*.yaml files"
    );
    assert!(
        !istio.is_empty(),
        "no WasmPlugin pluginConfig in deploy/istio"
    );
    assert!(
        istio.len() >= 2,
        "expected the plugin config of the WasmPlugin and the TrafficExtension"
    );
    assert!(
        !gateway.is_empty(),
        "no EnvoyExtensionPolicy wasm config in deploy/envoy-gateway"
    );
    assert!(
        !kong.is_empty(),
        "no farebox filter config in deploy/kong/kong.yaml"
    );
    assert!(
        valid.len() >= 10,
        "schema/examples/valid: {} files",
        valid.len()
    );
    envoy
        .into_iter()
        .chain(istio)
        .chain(kong)
        .chain(gateway)
        .chain(valid)
        .collect()
}

fn all_examples() -> Vec<Example> {
    let mut out = all_accepted_examples();
    for kind in ["invalid", "parser-only", "schema-stricter"] {
        out.extend(schema_examples(kind));
    }
    out
}

#[test]
fn the_schema_is_a_valid_json_schema() {
    let schema = farebox_schema();
    assert_eq!(
        schema["$schema"], "http://json-schema.org/draft-07/schema#",
        "tests/config_schema.rs assumes draft-07"
    );
    jsonschema::draft7::meta::validate(&schema)
        .unwrap_or_else(|e| panic!("schema/farebox.schema.json is not a draft-07 schema: {e}"));
    farebox_validator();
}

#[test]
fn every_config_in_the_repository_passes_schema_and_parser() {
    let examples = all_accepted_examples();
    assert_accepted(&examples);
    eprintln!("{} configurations accepted by both", examples.len());
}

#[test]
fn invalid_examples_are_refused_by_schema_and_parser() {
    let invalid = schema_examples("invalid");
    assert!(
        invalid.len() >= 12,
        "schema/examples/invalid: want at least 12 files, found {}",
        invalid.len()
    );
    let validator = farebox_validator();
    let mut failures = Vec::new();
    for ex in &invalid {
        if validator.is_valid(&ex.json) {
            failures.push(format!("{}: accepted by the schema", ex.origin));
        }
        if parser_verdict(&ex.raw).is_ok() {
            failures.push(format!("{}: accepted by Config::parse", ex.origin));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// What JSON Schema cannot say (unique route names) and what the schema says more strictly
/// than the parser (null for "absent"), each pinned by examples so that a change on either
/// side shows up here.
#[test]
fn the_documented_gaps_are_exactly_these() {
    let validator = farebox_validator();
    let parser_only = schema_examples("parser-only");
    assert!(!parser_only.is_empty());
    for ex in &parser_only {
        let errors = schema_errors(&validator, &ex.json);
        assert!(
            errors.is_empty(),
            "{}: should pass the schema: {errors:?}",
            ex.origin
        );
        assert!(
            parser_verdict(&ex.raw).is_err(),
            "{}: should be refused by Config::parse",
            ex.origin
        );
    }
    let stricter = schema_examples("schema-stricter");
    assert!(!stricter.is_empty());
    for ex in &stricter {
        assert!(
            !validator.is_valid(&ex.json),
            "{}: should be refused by the schema",
            ex.origin
        );
        if let Err(e) = parser_verdict(&ex.raw) {
            panic!("{}: should pass Config::parse: {e}", ex.origin);
        }
    }
}

/// The fields each object of the configuration accepts, from the parser's serde types
/// (`farebox::config::known_fields`: the list `deny_unknown_fields` checks), by object.
fn known_fields(object: &str) -> BTreeSet<String> {
    let (_, fields) = config::known_fields()
        .into_iter()
        .find(|(name, _)| *name == object)
        .unwrap_or_else(|| panic!("no object {object} in config::known_fields()"));
    fields.iter().map(|f| f.to_string()).collect()
}

fn property_names(schema: &Value) -> BTreeSet<String> {
    schema["properties"]
        .as_object()
        .expect("properties")
        .keys()
        .cloned()
        .collect()
}

#[test]
fn schema_properties_are_the_parsers_known_fields() {
    let schema = farebox_schema();
    assert_eq!(
        property_names(&schema),
        known_fields("top"),
        "top-level fields"
    );
    assert_eq!(
        property_names(&schema["definitions"]["route"]),
        known_fields("route"),
        "route fields"
    );
    let mut credential_fields = BTreeSet::new();
    for variant in schema["properties"]["credential"]["oneOf"]
        .as_array()
        .expect("credential.oneOf")
    {
        credential_fields.extend(property_names(variant));
    }
    assert_eq!(
        credential_fields,
        known_fields("credential"),
        "credential fields"
    );
    let defs = &schema["definitions"];
    assert_eq!(
        property_names(&defs["usage"]),
        known_fields("usage"),
        "route usage fields"
    );
    assert_eq!(
        property_names(&defs["prices"]),
        known_fields("prices"),
        "model price fields"
    );
    assert_eq!(
        property_names(&defs["mcp"]),
        known_fields("mcp"),
        "route mcp fields"
    );
    assert_eq!(
        schema["required"],
        json!(["cluster"]),
        "only `cluster` is required"
    );
}

/// `Config` as parsed from `raw`, without the digest of the raw text.
fn parsed(raw: &str) -> Config {
    let mut c =
        Config::parse(raw.as_bytes()).unwrap_or_else(|e| panic!("Config::parse({raw}): {e}"));
    c.fingerprint = [0; 32];
    c
}

#[test]
fn schema_defaults_are_the_parsers_defaults() {
    let schema = farebox_schema();
    let base = parsed(r#"{"cluster": "balance"}"#);
    let mut checked = 0;
    for (name, prop) in schema["properties"].as_object().unwrap() {
        let Some(default) = prop.get("default") else {
            continue;
        };
        let raw = json!({"cluster": "balance", name.as_str(): default}).to_string();
        assert!(
            farebox_validator().is_valid(&serde_json::from_str(&raw).unwrap()),
            "the default of `{name}` does not pass the schema itself"
        );
        assert_eq!(
            parsed(&raw),
            base,
            "`{name}`: the schema's default {default} is not what the parser uses"
        );
        checked += 1;
    }
    assert!(checked >= 15, "only {checked} defaults checked");
}

/// The field names of the README's configuration reference table.
fn readme_fields() -> BTreeSet<String> {
    let readme = read(&root().join("README.md"));
    let section = readme
        .split_once("## Configuration reference")
        .map(|(_, rest)| rest)
        .expect("README.md has a `## Configuration reference` section");
    let mut fields = BTreeSet::new();
    let mut in_table = false;
    for line in section.lines() {
        let line = line.trim();
        if line.starts_with("| field |") {
            in_table = true;
            continue;
        }
        if in_table {
            if !line.starts_with('|') {
                break;
            }
            if let Some(name) = line
                .trim_start_matches('|')
                .trim_start()
                .strip_prefix('`')
                .and_then(|rest| rest.split_once('`'))
                .map(|(name, _)| name)
            {
                fields.insert(name.to_string());
            }
        }
    }
    fields
}

#[test]
fn the_readme_documents_the_same_fields() {
    assert_eq!(
        readme_fields(),
        known_fields("top"),
        "README.md's configuration table and the parser's fields differ"
    );
}

/// deploy/kong/farebox.meta.json as scripts/gen-kong-meta.py writes it.
fn expected_kong_config_schema() -> Value {
    let mut schema = farebox_schema();
    let map = schema.as_object_mut().unwrap();
    map.remove("$id");
    map.insert(
        "$schema".into(),
        json!("http://json-schema.org/draft-04/schema#"),
    );
    schema
}

#[test]
fn kong_metadata_carries_the_same_schema_as_draft4() {
    let meta = read_json(&root().join("deploy/kong/farebox.meta.json"));
    let config_schema = &meta["config_schema"];
    assert_eq!(
        config_schema,
        &expected_kong_config_schema(),
        "deploy/kong/farebox.meta.json is stale: run `make kong-meta`"
    );
    jsonschema::draft4::meta::validate(config_schema)
        .unwrap_or_else(|e| panic!("config_schema is not a draft-04 schema: {e}"));
}

/// The schema uses only keywords that mean the same in draft 4 (what Kong supports),
/// draft 7 and 2020-12: all three agree on every example, good or bad.
#[test]
fn draft4_draft7_and_2020_12_agree_on_every_example() {
    let schema = farebox_schema();
    let d4 = jsonschema::draft4::new(&expected_kong_config_schema()).expect("draft 4");
    let d7 = jsonschema::draft7::new(&schema).expect("draft 7");
    let d2020 = jsonschema::draft202012::new(&schema).expect("2020-12");
    let examples = all_examples();
    for ex in &examples {
        let verdicts = (
            d4.is_valid(&ex.json),
            d7.is_valid(&ex.json),
            d2020.is_valid(&ex.json),
        );
        assert!(
            verdicts.0 == verdicts.1 && verdicts.1 == verdicts.2,
            "{}: draft4/draft7/2020-12 verdicts differ: {verdicts:?}",
            ex.origin
        );
    }
}
