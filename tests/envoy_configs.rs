#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! Every Envoy configuration in `envoy/` against a real Envoy:
//!
//! - each file, rendered for this machine (absolute wasm path, the real SHA-256 of the
//!   module, a CA made with `openssl` at test time), passes `envoy --mode validate`, which
//!   also loads the filter and runs its `on_configure` for local modules;
//! - the per-route opt-out, the remote (sha256-pinned) module, TLS with a service token
//!   and the two-replica setup (round-robin, retry on the other replica) are run end to end.
//!
//! `make test` runs this file against the Envoy in `.venv` (`$ENVOY`), and `make
//! envoy-compat` runs it again against the oldest supported Envoy (`.venv-1.36`).

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const KEY: &str = "fbk-envoy-configs-7d1e";
const ACCOUNT: &str = "acct-envoy-configs";
/// The service token written in envoy/envoy-tls.yaml.
const TLS_SERVICE_TOKEN: &str = "change-me-service-token";
/// The name the balance service's certificate is issued for in envoy/envoy-tls.yaml.
const TLS_SERVER_NAME: &str = "balance.internal";
const CA_PLACEHOLDER: &str = "/etc/farebox/balance-ca.pem";
const SHA_PLACEHOLDER: &str = "${FAREBOX_WASM_SHA256}";

fn envoy_dir() -> PathBuf {
    repo_root().join("envoy")
}

/// `envoy/*.yaml`, sorted.
fn envoy_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(envoy_dir())
        .expect("read envoy/")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn wasm_sha256_hex() -> String {
    let bytes = fs::read(wasm_path()).expect("read the wasm module");
    common::sha256_hex(&bytes)
}

/// Test certificates: a CA, and a server certificate for `balance.internal` signed by it.
struct Certs {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (needed to make test certificates): {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certs(dir: &Path) -> Certs {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca_args = vec!["req", "-x509"];
    ca_args.extend(ec);
    ca_args.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=farebox test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca_args);
    let san = format!("subjectAltName=DNS:{TLS_SERVER_NAME}");
    let subj = format!("/CN={TLS_SERVER_NAME}");
    let mut csr_args = vec!["req", "-new"];
    csr_args.extend(ec);
    csr_args.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        &subj,
        "-addext",
        &san,
    ]);
    openssl(dir, &csr_args);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-copy_extensions",
            "copy",
            "-out",
            "server.pem",
        ],
    );
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
    }
}

/// A config from `envoy/` made runnable here: the absolute wasm path, the module's real
/// SHA-256, the test CA. Fails if a placeholder is left over, so a new one cannot slip in
/// unrendered.
fn render(name: &str, yaml: &str, ca: &Path) -> String {
    let out = yaml
        .replace(
            "filename: build/farebox.wasm",
            &format!("filename: {}", wasm_path().display()),
        )
        .replace(SHA_PLACEHOLDER, &wasm_sha256_hex())
        .replace(CA_PLACEHOLDER, &ca.display().to_string());
    let body: String = out
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for leftover in ["${", "/etc/farebox/", "filename: build/"] {
        assert!(
            !body.contains(leftover),
            "envoy/{name}: `{leftover}` is left after rendering; teach tests/envoy_configs.rs \
             the new placeholder"
        );
    }
    out
}

fn replace_once(text: &str, from: &str, to: &str, what: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{what}: expected `{from}` exactly once"
    );
    text.replacen(from, to, 1)
}

struct Validation {
    ok: bool,
    output: String,
}

fn validate(path: &Path) -> Validation {
    let out = Command::new(envoy_bin())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(path)
        .arg("--log-level")
        .arg("warn")
        .stdin(Stdio::null())
        .output()
        .expect("run envoy --mode validate");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Validation {
        ok: out.status.success() && output.contains(" OK"),
        output,
    }
}

fn envoy_version() -> String {
    let out = Command::new(envoy_bin())
        .arg("--version")
        .output()
        .expect("envoy --version");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn every_envoy_config_passes_validate() {
    let tmp = TempDir::new("envoy-validate");
    let certs = make_certs(tmp.path());
    let files = envoy_configs();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "envoy.yaml",
        "envoy-tls.yaml",
        "envoy-per-route.yaml",
        "envoy-remote.yaml",
        "envoy-replicas.yaml",
    ] {
        assert!(names.iter().any(|n| n == want), "envoy/{want} is missing");
    }
    eprintln!("validating {names:?} with {}", envoy_version());
    let mut failures = Vec::new();
    for (file, name) in files.iter().zip(&names) {
        let rendered = render(name, &read(file), &certs.ca);
        let path = tmp.join(name);
        fs::write(&path, rendered).expect("write rendered config");
        let v = validate(&path);
        if !v.ok {
            failures.push(format!("envoy/{name}:\n{}", tail(&v.output, 15)));
        }
    }
    assert!(
        failures.is_empty(),
        "`envoy --mode validate` refused:\n{}",
        failures.join("\n\n")
    );
}

/// Validate mode really loads the filter: a config the filter refuses fails validation.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn validate_mode_runs_the_filters_config_check() {
    let tmp = TempDir::new("envoy-validate-bad");
    let certs = make_certs(tmp.path());
    // The demo with its plugin config (between the farebox-config markers) replaced.
    let bad = render_envoy_yaml(
        &demo_envoy_yaml(),
        &wasm_path(),
        Some(r#"{"cluster": "balance", "timeout_ms": 0}"#),
        None,
        None,
        false,
    );
    let bad = render("envoy.yaml", &bad, &certs.ca);
    let path = tmp.join("bad.yaml");
    fs::write(&path, bad).unwrap();
    let v = validate(&path);
    assert!(!v.ok, "a config with timeout_ms 0 passed validation");
    assert!(
        v.output.contains("timeout_ms"),
        "the refusal should name the field:\n{}",
        tail(&v.output, 10)
    );
}

// ---------------------------------------------------------------------------------------
// Running a rendered config
// ---------------------------------------------------------------------------------------

/// The demo's ports, rewritten: admin and ingress ephemeral, balance and upstream given.
fn with_ports(yaml: &str, what: &str, balance: SocketAddr, upstream: SocketAddr) -> String {
    let mut out = replace_once(yaml, "port_value: 9901", "port_value: 0", what);
    out = replace_once(&out, "port_value: 10000", "port_value: 0", what);
    out = replace_once(
        &out,
        "port_value: 8081",
        &format!("port_value: {}", balance.port()),
        what,
    );
    replace_once(
        &out,
        "port_value: 8082",
        &format!("port_value: {}", upstream.port()),
        what,
    )
}

fn get(envoy: &Envoy, path: &str, headers: &[(&str, &str)]) -> Response {
    http(envoy.addr, "GET", path, headers, b"")
}

fn assert_status(resp: &Response, status: u16, what: &str) {
    assert_eq!(resp.status, status, "{what}: {}", resp.dump());
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn per_route_opt_out_skips_the_filter() {
    let tmp = TempDir::new("per-route");
    let certs = make_certs(tmp.path());
    let echo = Echo::start(tmp.path());
    // No balance service at all: anything that reaches the filter and needs a decision
    // fails closed, so a 200 proves the filter did not run.
    let nowhere = closed_port_addr();
    let yaml = render(
        "envoy-per-route.yaml",
        &read(&envoy_dir().join("envoy-per-route.yaml")),
        &certs.ca,
    );
    let yaml = with_ports(&yaml, "envoy/envoy-per-route.yaml", nowhere, echo.addr);
    let envoy = Envoy::start_yaml(tmp.path(), &yaml, 1, &[]);

    let forged = [("x-farebox-account", "forged")];
    for path in ["/health", "/metrics"] {
        let resp = get(&envoy, path, &forged);
        assert_status(&resp, 200, path);
        assert!(
            echoed_header_values(&resp, "x-farebox-account").is_empty(),
            "{path}: a client's x-farebox-account reached the upstream: {}",
            resp.dump()
        );
    }
    // Not opted out: priced, and without a credential refused by the filter.
    for path in ["/healthz", "/health/x", "/v1/data"] {
        assert_status(&get(&envoy, path, &[]), 401, path);
    }
    // A free rule of the plugin config still runs through the filter.
    assert_status(&get(&envoy, "/docs/intro", &forged), 200, "/docs/intro");
    // Only /docs/intro was seen as free, and nothing called the service.
    expect_metrics(
        &envoy,
        &[("free", 1), ("callouts", 0)],
        Duration::from_secs(5),
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn remote_module_is_fetched_and_pinned_by_sha256() {
    let wasm = fs::read(wasm_path()).unwrap();
    let served = wasm.clone();
    let modules = FakeService::start(move |req, _| {
        if req.method == "GET" && req.path == "/farebox.wasm" {
            FakeAction::raw(200, "application/wasm", &served)
        } else {
            FakeAction::raw(404, "text/plain", b"no such module")
        }
    });
    let source = read(&envoy_dir().join("envoy-remote.yaml"));

    // 1. The real digest: Envoy fetches the module and the filter runs.
    let tmp = TempDir::new("remote-ok");
    let certs = make_certs(tmp.path());
    let echo = Echo::start(tmp.path());
    let yaml = render("envoy-remote.yaml", &source, &certs.ca);
    let yaml = with_ports(
        &yaml,
        "envoy/envoy-remote.yaml",
        closed_port_addr(),
        echo.addr,
    );
    let yaml = replace_once(
        &yaml,
        "port_value: 8090",
        &format!("port_value: {}", modules.addr.port()),
        "envoy/envoy-remote.yaml",
    );
    let envoy = Envoy::start_yaml(tmp.path(), &yaml, 1, &[]);
    assert!(
        modules.requests().iter().any(|r| r.path == "/farebox.wasm"),
        "Envoy never asked the module server"
    );
    assert_status(&get(&envoy, "/health", &[]), 200, "free route");
    assert_status(&get(&envoy, "/v1/data", &[]), 401, "priced route, no key");
    drop(envoy);

    // 2. A wrong digest: the module is refused and the filter fails closed.
    let tmp = TempDir::new("remote-bad-sha");
    let wrong = common::sha256_hex(b"not the module");
    let bad = replace_once(
        &yaml,
        &format!("sha256: \"{}\"", wasm_sha256_hex()),
        &format!("sha256: \"{wrong}\""),
        "rendered remote config",
    );
    let bad = replace_once(&bad, "num_retries: 5", "num_retries: 1", "remote config");
    let envoy = Envoy::start_yaml(tmp.path(), &bad, 1, &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !envoy.log().contains("failed to load") {
        assert!(
            Instant::now() < deadline,
            "Envoy did not refuse the module:\n{}",
            tail(&envoy.log(), 30)
        );
        thread::sleep(Duration::from_millis(100));
    }
    for path in ["/health", "/v1/data"] {
        let resp = get(&envoy, path, &[("x-api-key", KEY)]);
        assert_status(&resp, 503, path);
    }
}

/// The extra listener the TLS test puts in front of the balance service: TLS with a
/// certificate for balance.internal, accepting only that SNI.
fn tls_terminator(port: u16, certs: &Certs) -> serde_yaml::Value {
    let text = format!(
        r#"
name: balance_tls_terminator
address:
  socket_address: {{address: 127.0.0.1, port_value: {port}}}
listener_filters:
  - name: envoy.filters.listener.tls_inspector
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
filter_chains:
  - filter_chain_match:
      server_names: ["{TLS_SERVER_NAME}"]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
        common_tls_context:
          tls_certificates:
            - certificate_chain: {{filename: "{cert}"}}
              private_key: {{filename: "{key}"}}
    filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: terminator
          route_config:
            virtual_hosts:
              - name: all
                domains: ["*"]
                routes:
                  - match: {{prefix: "/"}}
                    route: {{cluster: balance_plain}}
          http_filters:
            - name: envoy.filters.http.router
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        cert = certs.server_cert.display(),
        key = certs.server_key.display(),
    );
    serde_yaml::from_str(&text).expect("terminator yaml")
}

fn plain_cluster(addr: SocketAddr) -> serde_yaml::Value {
    let text = format!(
        r#"
name: balance_plain
type: STATIC
connect_timeout: 1s
load_assignment:
  cluster_name: balance_plain
  endpoints:
    - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{address: 127.0.0.1, port_value: {}}}
"#,
        addr.port()
    );
    serde_yaml::from_str(&text).expect("cluster yaml")
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn tls_to_the_balance_service_with_a_service_token() {
    let tmp = TempDir::new("tls");
    let certs = make_certs(tmp.path());
    let echo = Echo::start(tmp.path());
    let balance = BalanceService::start(
        tmp.path(),
        &BalanceOpts {
            service_token: Some(TLS_SERVICE_TOKEN.to_string()),
            ..BalanceOpts::default()
        },
    );
    balance.create_account(ACCOUNT, KEY, 10);
    let terminator_port = closed_port_addr().port();

    let yaml = render(
        "envoy-tls.yaml",
        &read(&envoy_dir().join("envoy-tls.yaml")),
        &certs.ca,
    );
    let mut yaml = replace_once(&yaml, "port_value: 9901", "port_value: 0", "envoy-tls");
    yaml = replace_once(&yaml, "port_value: 10000", "port_value: 0", "envoy-tls");
    yaml = replace_once(
        &yaml,
        "port_value: 8443",
        &format!("port_value: {terminator_port}"),
        "envoy-tls",
    );
    yaml = replace_once(
        &yaml,
        "port_value: 8082",
        &format!("port_value: {}", echo.addr.port()),
        "envoy-tls",
    );
    // The test's TLS terminator lives in the same Envoy, on its own listener.
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("envoy-tls is YAML");
    let resources = &mut doc["static_resources"];
    resources["listeners"]
        .as_sequence_mut()
        .expect("listeners")
        .push(tls_terminator(terminator_port, &certs));
    resources["clusters"]
        .as_sequence_mut()
        .expect("clusters")
        .push(plain_cluster(balance.addr));
    let yaml = serde_yaml::to_string(&doc).unwrap();
    let envoy = Envoy::start_yaml(tmp.path(), &yaml, 1, &[]);

    let resp = get(&envoy, "/v1/data", &[("x-api-key", KEY)]);
    assert_status(&resp, 200, "paid request over the TLS callout");
    assert_eq!(
        echoed_header_values(&resp, "x-farebox-account"),
        vec![ACCOUNT.to_string()]
    );
    assert_eq!(balance.authorize_calls(), 1);
    assert_eq!(
        balance.account(ACCOUNT)["balance"],
        json!(9),
        "the request was debited"
    );
    assert_status(&get(&envoy, "/health", &[]), 200, "free route");
    let unknown = get(&envoy, "/v1/data", &[("x-api-key", "fbk-unknown")]);
    assert_status(
        &unknown,
        401,
        "unknown key, answered by the service over TLS",
    );
}

/// envoy/envoy-replicas.yaml: the callouts go round-robin over both replicas (through the
/// internal listener that carries the retry policy), and when one replica is killed the
/// other one answers every call, without a single failed request. The two replicas share
/// one SQLite file here, so this runs on every Envoy without PostgreSQL; tests/replicas.rs
/// runs the same config on PostgreSQL under load.
#[test]
fn replicas_config_round_robin_and_retry_on_the_other_replica() {
    let ledger_dir = TempDir::new("replicas-ledger");
    let ledger = BalanceOpts {
        db_path: Some(ledger_dir.join("ledger.sqlite")),
        extra_args: vec!["--quiet".into()],
        ..BalanceOpts::default()
    };
    let plugin = envoy_plugin_config("envoy-replicas.yaml");
    let mut stack = ReplicaStack::start("replicas-config", &ledger, &plugin, 1, 1, &[]);
    stack.admin().create_account(ACCOUNT, KEY, 100);
    let envoy = stack.envoys[0].addr;
    let get = || http(envoy, "GET", "/v1/data", &[("x-api-key", KEY)], b"");

    for i in 0..20 {
        assert_status(&get(), 200, &format!("request {i} with both replicas up"));
    }
    let calls = stack.authorize_calls();
    assert_eq!(
        calls.iter().sum::<u64>(),
        20,
        "one authorize per request: {calls:?}"
    );
    assert!(
        calls.iter().all(|&c| c >= 5),
        "round-robin uses both replicas: {calls:?}"
    );

    stack.replicas[1].stop();
    for i in 0..20 {
        assert_status(
            &get(),
            200,
            &format!("request {i} after replica B was killed"),
        );
    }
    assert_eq!(
        stack.replicas[0].authorize_calls(),
        calls[0] + 20,
        "replica A answered every call once B was gone"
    );
    let acct = stack.admin().account(ACCOUNT);
    assert_eq!(
        (acct["balance"].as_i64(), acct["charged"].as_i64()),
        (Some(60), Some(40)),
        "40 requests, 40 units: {acct}"
    );
    assert_eq!(
        stack.admin().charges(ACCOUNT).len(),
        40,
        "one charge per request"
    );
}
