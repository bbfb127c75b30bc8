#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The crate split holds: the logic (`farebox`, the repository root) cannot reach the
//! proxy-wasm SDK, and the glue (`farebox-filter`, filter/) is what links it. Read from
//! `cargo metadata`'s resolved graph, so a proxy-wasm dependency added to the logic,
//! directly or through another crate, fails here.

use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::process::Command;

const SDK: &str = "proxy-wasm";

/// `cargo metadata` for this workspace (every platform, every feature).
fn metadata() -> Value {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--all-features"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// The names of the packages `root` builds against in a normal build (no dev- or
/// build-dependencies), itself included, on any target: what its code can reach.
fn reachable(meta: &Value, root: &str) -> BTreeSet<String> {
    let name_of: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &Value> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .collect();
    let start = members
        .iter()
        .copied()
        .find(|id| name_of.get(id) == Some(&root))
        .unwrap_or_else(|| panic!("{root} is not a workspace member"));
    let mut seen = BTreeSet::new();
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let normal = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null());
            if normal {
                todo.push(dep["pkg"].as_str().unwrap());
            }
        }
    }
    seen.iter().map(|id| name_of[id].to_string()).collect()
}

#[test]
fn the_logic_cannot_reach_proxy_wasm() {
    let meta = metadata();
    let logic = reachable(&meta, "farebox");
    // The walk sees the logic's real dependencies, so an empty answer cannot pass.
    assert!(logic.contains("serde_json"), "logic reaches: {logic:?}");
    assert!(
        !logic.contains(SDK),
        "the farebox crate (src/) reaches {SDK}: only farebox-filter (filter/) may depend \
         on the SDK; the logic talks to the host through the traits in src/host.rs"
    );
}

#[test]
fn the_glue_links_the_logic_and_the_sdk() {
    let meta = metadata();
    let glue = reachable(&meta, "farebox-filter");
    assert!(glue.contains(SDK), "farebox-filter reaches: {glue:?}");
    assert!(glue.contains("farebox"), "farebox-filter reaches: {glue:?}");
    let filter = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "farebox-filter")
        .unwrap();
    let kinds: Vec<&str> = filter["targets"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["crate_types"].as_array().unwrap())
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["cdylib"], "farebox-filter builds the wasm module");
}
