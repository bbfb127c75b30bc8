//! Helpers of the hardening suites (tests/faults.rs, tests/lease_faults.rs, tests/hostile.rs)
//! on top of tests/common (whose fake service, HTTP parsers and Envoy launcher they use):
//!
//! - VM health: Envoy's wasm crash counters and the log's panic markers;
//! - Envoy configs the tests write themselves (static bootstraps, LDS listeners);
//! - small assertion helpers shared by the suites.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{admin_stats, wasm_path, Envoy};

// ---------------------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------------------

pub fn grep(text: &str, needle: &str) -> String {
    text.lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A loopback port that is free right now (bound, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Sends a request and measures how long the answer took.
pub fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

// ---------------------------------------------------------------------------------------
// VM health
// ---------------------------------------------------------------------------------------

/// The crash-related wasm stats: `wasm.<plugin>.vm_reload*` (a crashed VM reloaded under
/// FAIL_RELOAD) and how many VMs the runtime created (a reload creates one more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHealth {
    pub reloads: Vec<(String, u64)>,
    pub vms_created: u64,
}

pub fn vm_health(admin: SocketAddr) -> VmHealth {
    let stats = admin_stats(admin);
    let reloads = stats
        .iter()
        .filter(|(n, _)| n.starts_with("wasm.") && n.contains("vm_reload"))
        .cloned()
        .collect();
    let vms_created = stats
        .iter()
        .filter(|(n, _)| n.starts_with("wasm.envoy.wasm.runtime.") && n.ends_with(".created"))
        .map(|(_, v)| *v)
        .sum();
    VmHealth {
        reloads,
        vms_created,
    }
}

/// Lines of an Envoy log that show a wasm VM failing (a Rust panic, a trap, a reload).
pub fn crash_lines(log: &str) -> Vec<String> {
    const MARKERS: &[&str] = &[
        "panicked at",
        "Uncaught",
        "RuntimeError",
        "unreachable executed",
        "VM failed",
        "vm failed",
        "wasm vm crashed",
        "Plugin configured to fail",
        "reloading",
    ];
    log.lines()
        .filter(|l| MARKERS.iter().any(|m| l.contains(m)))
        .map(str::to_string)
        .collect()
}

/// The VM never crashed since `baseline` was taken: no reload, no new VM, no trap in the log.
pub fn assert_vm_alive(admin: SocketAddr, baseline: &VmHealth, log: &str, what: &str) {
    assert_no_vm_crash(admin, log, what);
    assert_eq!(
        vm_health(admin).vms_created,
        baseline.vms_created,
        "{what}: the wasm runtime created VMs after start (a crash and reload?)"
    );
}

/// No reload and no trap in the log. (For a config update, which legitimately creates VMs.)
pub fn assert_no_vm_crash(admin: SocketAddr, log: &str, what: &str) {
    let now = vm_health(admin);
    assert!(
        !now.reloads.is_empty(),
        "{what}: no wasm.*.vm_reload* stats at all; names changed?"
    );
    for (name, value) in &now.reloads {
        assert_eq!(*value, 0, "{what}: {name} = {value}");
    }
    let crashes = crash_lines(log);
    assert!(
        crashes.is_empty(),
        "{what}: crash lines in the log:\n{}",
        crashes.join("\n")
    );
}

/// Same for a harness-started Envoy.
pub fn assert_envoy_vm_alive(envoy: &Envoy, baseline: &VmHealth, what: &str) {
    assert_vm_alive(envoy.admin, baseline, &envoy.log(), what);
}

// ---------------------------------------------------------------------------------------
// Envoy configs written by the test (started with `Envoy::start_yaml`)
// ---------------------------------------------------------------------------------------

/// A STATIC cluster with one loopback endpoint.
pub fn cluster(name: &str, addr: SocketAddr) -> Value {
    assert!(addr.ip().is_loopback());
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": addr.ip().to_string(), "port_value": addr.port()}}}}]}]
        }
    })
}

/// The path handling of the HTTP connection manager.
#[derive(Clone, Debug)]
pub struct Hcm {
    pub stat_prefix: String,
    pub normalize_path: bool,
    pub merge_slashes: bool,
    /// `UNESCAPE_AND_REDIRECT` (the demo), `KEEP_UNCHANGED` (Envoy's default), ...
    pub escaped_slashes: &'static str,
}

impl Hcm {
    /// As in envoy/envoy.yaml.
    pub fn demo() -> Hcm {
        Hcm {
            stat_prefix: "ingress_http".into(),
            normalize_path: true,
            merge_slashes: true,
            escaped_slashes: "UNESCAPE_AND_REDIRECT",
        }
    }
}

/// The demo's listener (same filter chain and request-id settings) with `hcm`'s path
/// handling, as a Listener resource (static or LDS). Port 0 picks a free port.
pub fn listener(port: u16, plugin: &Value, hcm: &Hcm) -> Value {
    let wasm = wasm_path();
    json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": "ingress",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": hcm.stat_prefix,
                "normalize_path": hcm.normalize_path,
                "merge_slashes": hcm.merge_slashes,
                "path_with_escaped_slashes_action": hcm.escaped_slashes,
                "use_remote_address": true,
                "preserve_external_request_id": false,
                "generate_request_id": true,
                "always_set_request_id_in_response": true,
                "internal_address_config": {"unix_sockets": false, "cidr_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 32}]},
                "route_config": {"name": "local_route", "virtual_hosts": [{"name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "15s"}}]}]},
                "http_filters": [
                    {"name": "envoy.filters.http.wasm", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                        "config": {
                            "name": "farebox", "root_id": "farebox", "failure_policy": "FAIL_RELOAD",
                            "vm_config": {"runtime": "envoy.wasm.runtime.v8", "vm_id": "farebox",
                                "code": {"local": {"filename": wasm.display().to_string()}}},
                            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                "value": plugin.to_string()}
                        }}},
                    {"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
                ]
            }
        }]}]
    })
}

/// A bootstrap with one static listener (`hcm`'s path handling) and the two clusters.
pub fn static_bootstrap(
    plugin: &Value,
    hcm: &Hcm,
    balance: SocketAddr,
    upstream: SocketAddr,
) -> Value {
    let mut l = listener(0, plugin, hcm);
    // A static listener is a plain message; only an LDS resource names its type.
    l.as_object_mut().map(|o| o.remove("@type"));
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [l],
            "clusters": [cluster("balance", balance), cluster("upstream", upstream)]
        }
    })
}
