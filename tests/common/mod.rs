//! End-to-end test harness: starts the reference balance service, the echo upstream and
//! Envoy (with the farebox wasm filter, configured from the real `envoy/envoy.yaml`) as
//! child processes, one private set per test, and talks to them over plain HTTP/1.1.
//!
//! Everything a test starts is owned by a guard that kills it on drop, so processes die
//! even when the test panics. Run the suite with `make test`, which builds the wasm, the
//! services and installs Envoy first.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../support/skip.rs"]
mod skip;
#[allow(unused_imports)]
pub use skip::*;
pub mod postgres;

/// Admin token of every reference balance service the harness starts.
pub const ADMIN_TOKEN: &str = "test-admin";
/// How long Envoy may take to become ready.
const ENVOY_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a service may take to print its "listening on" line.
const SERVICE_READY_TIMEOUT: Duration = Duration::from_secs(20);

const CONFIG_BEGIN: &str = "# farebox-config-begin";
const CONFIG_END: &str = "# farebox-config-end";

// ---------------------------------------------------------------------------------------
// Locating things
// ---------------------------------------------------------------------------------------

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn missing(what: &str, path: &Path, env_var: Option<&str>) -> ! {
    let hint = env_var
        .map(|v| format!(" (set {v} to override)"))
        .unwrap_or_default();
    panic!(
        "{what} not found at {}{hint}. Run the end-to-end tests with `make test`, \
         which builds and installs everything they need.",
        path.display()
    );
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The Envoy binary: `$ENVOY`, else `<repo>/.venv/bin/envoy`.
pub fn envoy_bin() -> PathBuf {
    let path = env_path("ENVOY").unwrap_or_else(|| repo_root().join(".venv/bin/envoy"));
    if !path.is_file() {
        missing("Envoy", &path, Some("ENVOY"));
    }
    path
}

/// The filter: `$FAREBOX_WASM`, else `<repo>/build/farebox.wasm`.
pub fn wasm_path() -> PathBuf {
    let path = env_path("FAREBOX_WASM").unwrap_or_else(|| repo_root().join("build/farebox.wasm"));
    if !path.is_file() {
        missing("The farebox wasm filter", &path, Some("FAREBOX_WASM"));
    }
    fs::canonicalize(&path).unwrap_or(path)
}

pub fn target_dir() -> PathBuf {
    match env_path("CARGO_TARGET_DIR") {
        Some(p) if p.is_absolute() => p,
        Some(p) => repo_root().join(p),
        None => repo_root().join("target"),
    }
}

/// A binary of the `farebox-balance` package (`farebox-balance`, `farebox-echo`).
pub fn service_bin(name: &str) -> PathBuf {
    let path = target_dir().join("debug").join(name);
    if !path.is_file() {
        missing(name, &path, None);
    }
    path
}

pub fn demo_envoy_yaml() -> String {
    envoy_yaml_file("envoy.yaml")
}

/// `envoy/envoy-access-log.yaml` with its one access log (to stdout) written to `log`.
pub fn access_log_envoy_yaml(log: &Path) -> String {
    let yaml = envoy_yaml_file("envoy-access-log.yaml");
    assert_eq!(
        yaml.matches("path: /dev/stdout").count(),
        1,
        "envoy/envoy-access-log.yaml: one access log to /dev/stdout"
    );
    yaml.replace("path: /dev/stdout", &format!("path: {}", log.display()))
}

/// The text of `envoy/<file>`.
pub fn envoy_yaml_file(file: &str) -> String {
    let path = repo_root().join("envoy").join(file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The plugin configuration of the demo (`envoy/envoy.yaml`, between the markers).
pub fn demo_plugin_config() -> Value {
    envoy_plugin_config("envoy.yaml")
}

/// The plugin configuration of `envoy/<file>`, between the farebox-config markers.
pub fn envoy_plugin_config(file: &str) -> Value {
    let path = repo_root().join("envoy").join(file);
    let yaml =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let (begin, end) = config_block(&yaml);
    let block: Vec<&str> = yaml.lines().skip(begin + 1).take(end - begin - 1).collect();
    let first = block.first().map(|l| l.trim()).unwrap_or_default();
    assert_eq!(
        first, "value: |",
        "envoy/{file}: the plugin config block must start with `value: |`"
    );
    let text: String = block.iter().skip(1).map(|l| format!("{l}\n")).collect();
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("envoy/{file}: plugin config is not JSON: {e}\n{text}"))
}

/// Line indexes of the begin and end markers.
fn config_block(yaml: &str) -> (usize, usize) {
    let find = |marker: &str| {
        let hits: Vec<usize> = yaml
            .lines()
            .enumerate()
            .filter(|(_, l)| l.trim() == marker)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            hits.len(),
            1,
            "envoy/envoy.yaml must contain exactly one `{marker}` line"
        );
        hits[0]
    };
    let (b, e) = (find(CONFIG_BEGIN), find(CONFIG_END));
    assert!(b < e, "envoy/envoy.yaml: config markers out of order");
    (b, e)
}

// ---------------------------------------------------------------------------------------
// Temporary directories and processes
// ---------------------------------------------------------------------------------------

/// A private temporary directory, removed on drop unless the test failed (then kept and
/// its path printed, with the logs inside).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let path = std::env::temp_dir().join(format!(
            "farebox-e2e-{label}-{}-{n}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() || std::env::var_os("FAREBOX_KEEP_TMP").is_some() {
            eprintln!("[harness] kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A child process that is killed (and reaped) when the guard is dropped.
pub struct Proc {
    name: String,
    child: Option<Child>,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr appended to `log_path`, stdin closed.
    pub fn spawn(name: &str, mut cmd: Command, log_path: &Path) -> Proc {
        let log = File::create(log_path).expect("create log file");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log);
        Proc::spawn_configured(name, cmd, log_path)
    }

    fn spawn_configured(name: &str, mut cmd: Command, log_path: &Path) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("[harness] cannot start {name} ({cmd:?}): {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log_path: log_path.to_path_buf(),
            status: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has exited (without blocking).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.status = Some(status);
                    self.child = None;
                }
            }
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit on its own; kills it after that.
    /// Returns the status if it exited by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.stop();
        None
    }

    /// Kills and reaps the process (no-op if it is gone already).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            self.status = child.wait().ok();
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far.
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "[harness] ---- last lines of {} ({}) ----\n{}\n[harness] ---- end of {} ----",
                self.name,
                self.log_path.display(),
                self.log_tail(80),
                self.name
            );
        }
    }
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

pub use testkit::wait_until;

/// A loopback port that nothing listens on (bound, then released).
pub fn closed_port_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr")
}

// ---------------------------------------------------------------------------------------
// The services of the farebox-balance package
// ---------------------------------------------------------------------------------------

/// Starts a service binary that prints exactly one line `<name> listening on ADDR` to
/// stdout; the rest of its output goes to `<dir>/<name>.log`.
/// Starts one of the package's service binaries (`farebox-llm`, `farebox-mcp`, …) on a
/// free loopback port; the process dies with the returned guard.
pub fn start_service(name: &str, dir: &Path) -> (Proc, SocketAddr) {
    start_listening_service(
        name,
        &["--listen".to_string(), "127.0.0.1:0".to_string()],
        dir,
    )
}

fn start_listening_service(name: &str, args: &[String], dir: &Path) -> (Proc, SocketAddr) {
    let log_path = dir.join(format!("{name}.log"));
    let stderr_log = File::create(&log_path).expect("create log");
    let mut cmd = Command::new(service_bin(name));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr_log.try_clone().expect("clone log"));
    let mut proc = Proc::spawn_configured(name, cmd, &log_path);
    let stdout = proc
        .child
        .as_mut()
        .and_then(|c| c.stdout.take())
        .expect("piped stdout");

    let (tx, rx) = mpsc::channel::<String>();
    let mut sink = stderr_log;
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        if reader.read_line(&mut first).unwrap_or(0) == 0 {
            return; // EOF: the process died; dropping tx tells the waiter
        }
        let _ = tx.send(first);
        // Keep draining stdout so the service never blocks on a full pipe.
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    rest.extend_from_slice(&buf[..n]);
                    let _ = sink.write_all(&buf[..n]);
                }
            }
        }
    });

    let line = match rx.recv_timeout(SERVICE_READY_TIMEOUT) {
        Ok(line) => line,
        Err(_) => {
            let status = proc.wait_timeout(Duration::from_millis(200));
            panic!(
                "[harness] {name} did not print `{name} listening on ADDR` (exit: {status:?}); log:\n{}",
                proc.log_tail(40)
            );
        }
    };
    let prefix = format!("{name} listening on ");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix(&prefix)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "[harness] {name}: unexpected first stdout line {line:?}, want `{prefix}IP:PORT`"
            )
        });
    (proc, addr)
}

/// Options of the reference balance service.
#[derive(Clone, Debug, Default)]
pub struct BalanceOpts {
    pub service_token: Option<String>,
    pub allow_max_age: Option<u64>,
    pub deny_max_age: Option<u64>,
    pub auth_max_age: Option<u64>,
    pub deny_retry_after: Option<u64>,
    pub extra_args: Vec<String>,
    /// Where to listen (default: a free loopback port), e.g. to restart on the same port.
    pub listen: Option<SocketAddr>,
    /// `--database-url` (e.g. a [`postgres::TestDatabase`]'s URL); when set, no `--db`.
    pub database_url: Option<String>,
    /// The SQLite file (default `<dir>/balance.sqlite`), e.g. one shared by two replicas.
    pub db_path: Option<PathBuf>,
}

/// The reference service with its demo x402 payments on (1,000 atomic units per unit).
pub fn x402_balance_opts() -> BalanceOpts {
    BalanceOpts {
        extra_args: testkit::DEMO_X402_ARGS
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    }
}

/// The reference balance service (`farebox-balance`).
pub struct BalanceService {
    proc: Proc,
    pub addr: SocketAddr,
}

impl BalanceService {
    pub fn start(dir: &Path, opts: &BalanceOpts) -> BalanceService {
        let mut args = vec![
            "--listen".to_string(),
            opts.listen
                .map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string()),
            "--admin-token".to_string(),
            ADMIN_TOKEN.to_string(),
        ];
        match &opts.database_url {
            Some(url) => args.extend(["--database-url".to_string(), url.clone()]),
            None => {
                let db = opts
                    .db_path
                    .clone()
                    .unwrap_or_else(|| dir.join("balance.sqlite"));
                args.extend(["--db".to_string(), db.display().to_string()]);
            }
        }
        if let Some(t) = &opts.service_token {
            args.push("--service-token".into());
            args.push(t.clone());
        }
        for (flag, value) in [
            ("--allow-max-age", opts.allow_max_age),
            ("--deny-max-age", opts.deny_max_age),
            ("--auth-max-age", opts.auth_max_age),
            ("--deny-retry-after", opts.deny_retry_after),
        ] {
            if let Some(v) = value {
                args.push(flag.into());
                args.push(v.to_string());
            }
        }
        args.extend(opts.extra_args.iter().cloned());
        let (proc, addr) = start_listening_service("farebox-balance", &args, dir);
        BalanceService { proc, addr }
    }

    /// Kills the service (SIGKILL: no drain, no graceful shutdown), e.g. to test the
    /// filter's failure modes.
    pub fn stop(&mut self) {
        self.proc.stop();
    }

    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// An admin API call; panics unless the answer is 2xx.
    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let resp = self.admin_raw(method, path, body);
        assert!(
            (200..300).contains(&resp.status),
            "[harness] balance admin {method} {path} -> {} {}",
            resp.status,
            resp.text()
        );
        if resp.body.is_empty() {
            Value::Null
        } else {
            resp.json()
        }
    }

    pub fn admin_raw(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut headers = vec![("authorization", auth.as_str())];
        if !body.is_empty() {
            headers.push(("content-type", "application/json"));
        }
        http(self.addr, method, path, &headers, body.as_bytes())
    }

    pub fn create_account(&self, id: &str, key: &str, balance: i64) -> Value {
        self.create_account_full(id, key, balance, false)
    }

    pub fn create_account_full(&self, id: &str, key: &str, balance: i64, disabled: bool) -> Value {
        self.admin(
            "POST",
            "/admin/accounts",
            Some(&json!({"account_id": id, "key": key, "balance": balance, "disabled": disabled})),
        )
    }

    pub fn topup(&self, id: &str, amount: i64) -> Value {
        self.admin(
            "POST",
            &format!("/admin/accounts/{id}/topup"),
            Some(&json!({ "amount": amount })),
        )
    }

    /// `{"account_id","balance","disabled","charged","refunded","charges"}`
    pub fn account(&self, id: &str) -> Value {
        self.admin("GET", &format!("/admin/accounts/{id}"), None)
    }

    /// The account's charges, as a list (accepts a bare array or `{"charges": [...]}`).
    pub fn charges(&self, id: &str) -> Vec<Value> {
        let v = self.admin("GET", &format!("/admin/accounts/{id}/charges"), None);
        match v {
            Value::Array(items) => items,
            Value::Object(mut map) => match map.remove("charges") {
                Some(Value::Array(items)) => items,
                other => panic!("[harness] unexpected charges answer: {other:?}"),
            },
            other => panic!("[harness] unexpected charges answer: {other}"),
        }
    }

    /// The account's charges as (route, cost), in ledger order: what most ledger assertions
    /// compare. A charge without a route or a cost fails the test, naming it.
    pub fn charge_routes(&self, id: &str) -> Vec<(String, i64)> {
        self.charges(id)
            .iter()
            .map(|c| match (c["route"].as_str(), c["cost"].as_i64()) {
                (Some(route), Some(cost)) => (route.to_string(), cost),
                _ => panic!("[harness] a charge of {id} without a route or a cost: {c}"),
            })
            .collect()
    }

    /// `{"authorize_calls","refund_calls","authorize_by_account":{...}}`
    pub fn stats(&self) -> Value {
        self.admin("GET", "/admin/stats", None)
    }

    pub fn authorize_calls(&self) -> u64 {
        self.stats()["authorize_calls"]
            .as_u64()
            .expect("stats.authorize_calls is a number")
    }

    pub fn refund_calls(&self) -> u64 {
        self.stats()["refund_calls"]
            .as_u64()
            .expect("stats.refund_calls is a number")
    }
}

/// The echo upstream (`farebox-echo`).
pub struct Echo {
    proc: Proc,
    pub addr: SocketAddr,
}

impl Echo {
    pub fn start(dir: &Path) -> Echo {
        let args = vec!["--listen".to_string(), "127.0.0.1:0".to_string()];
        let (proc, addr) = start_listening_service("farebox-echo", &args, dir);
        Echo { proc, addr }
    }
}

/// The request headers the echo upstream reports having received, lower-cased names.
/// Accepts `{"headers": {name: value | [values]}}` or `{"headers": [[name, value], ...]}`
/// or `{"headers": [{"name","value"}, ...]}`.
pub fn echoed_headers(resp: &Response) -> Vec<(String, String)> {
    let v = resp.json();
    let headers = v.get("headers").unwrap_or_else(|| {
        panic!(
            "echo answer has no `headers`: {}",
            String::from_utf8_lossy(&resp.body)
        )
    });
    let mut out = Vec::new();
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    match headers {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::Array(items) => {
                        out.extend(items.iter().map(|i| (k.to_ascii_lowercase(), text(i))));
                    }
                    other => out.push((k.to_ascii_lowercase(), text(other))),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match item {
                    Value::Array(pair) if pair.len() == 2 => {
                        out.push((text(&pair[0]).to_ascii_lowercase(), text(&pair[1])));
                    }
                    Value::Object(o) => out.push((
                        o.get("name")
                            .map(text)
                            .unwrap_or_default()
                            .to_ascii_lowercase(),
                        o.get("value").map(text).unwrap_or_default(),
                    )),
                    other => panic!("unexpected echo header entry {other}"),
                }
            }
        }
        other => panic!("unexpected echo headers {other}"),
    }
    out
}

pub fn echoed_header_values(resp: &Response, name: &str) -> Vec<String> {
    echoed_headers(resp)
        .into_iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v)
        .collect()
}

// ---------------------------------------------------------------------------------------
// Envoy
// ---------------------------------------------------------------------------------------

/// How to run Envoy.
#[derive(Clone, Debug)]
pub struct EnvoyOpts {
    /// The plugin config JSON (raw text, so tests can also pass broken JSON).
    pub plugin_config: String,
    pub balance_addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    pub concurrency: u32,
    pub log_level: String,
    /// Defaults to [`wasm_path`].
    pub wasm: Option<PathBuf>,
    /// More command-line arguments, e.g. `--component-log-level wasm:debug`.
    pub extra_args: Vec<String>,
    /// The config to render instead of `envoy/envoy.yaml` (same markers and ports), e.g.
    /// `envoy_yaml_file("envoy-replicas.yaml")`.
    pub base_yaml: Option<String>,
    /// More `(from, to)` text substitutions, each of which must match exactly once, e.g.
    /// the second replica's port of `envoy/envoy-replicas.yaml`.
    pub replacements: Vec<(String, String)>,
}

impl EnvoyOpts {
    pub fn new(plugin_config: &Value, balance_addr: SocketAddr, upstream_addr: SocketAddr) -> Self {
        EnvoyOpts {
            plugin_config: plugin_config.to_string(),
            balance_addr,
            upstream_addr,
            concurrency: 2,
            log_level: "info".to_string(),
            wasm: None,
            extra_args: Vec::new(),
            base_yaml: None,
            replacements: Vec::new(),
        }
    }
}

fn replace_once(text: &str, from: &str, to: &str) -> String {
    let count = text.matches(from).count();
    assert_eq!(
        count, 1,
        "envoy/envoy.yaml must contain `{from}` exactly once (found {count}); the test harness substitutes it"
    );
    text.replacen(from, to, 1)
}

/// Renders `envoy/envoy.yaml` for a test: ports, wasm path and plugin config replaced.
pub fn render_envoy_yaml(
    yaml: &str,
    wasm: &Path,
    plugin_config: Option<&str>,
    balance: Option<SocketAddr>,
    upstream: Option<SocketAddr>,
    ephemeral_ports: bool,
) -> String {
    let mut out = replace_once(
        yaml,
        "filename: build/farebox.wasm",
        &format!("filename: {}", wasm.display()),
    );
    if ephemeral_ports {
        out = replace_once(&out, "port_value: 9901", "port_value: 0");
        out = replace_once(&out, "port_value: 10000", "port_value: 0");
    }
    if let Some(addr) = balance {
        assert!(
            addr.ip().is_loopback(),
            "balance service must be on loopback"
        );
        out = replace_once(
            &out,
            "port_value: 8081",
            &format!("port_value: {}", addr.port()),
        );
    }
    if let Some(addr) = upstream {
        assert!(addr.ip().is_loopback(), "upstream must be on loopback");
        out = replace_once(
            &out,
            "port_value: 8082",
            &format!("port_value: {}", addr.port()),
        );
    }
    if let Some(config) = plugin_config {
        let (begin, end) = config_block(&out);
        let lines: Vec<&str> = out.lines().collect();
        let marker = lines[begin];
        let indent = &marker[..marker.len() - marker.trim_start().len()];
        let mut rendered = String::new();
        for line in &lines[..=begin] {
            rendered.push_str(line);
            rendered.push('\n');
        }
        let _ = writeln!(rendered, "{indent}value: |");
        for line in config.lines() {
            let _ = writeln!(rendered, "{indent}  {line}");
        }
        for line in &lines[end..] {
            rendered.push_str(line);
            rendered.push('\n');
        }
        out = rendered;
    }
    out
}

/// A running Envoy.
pub struct Envoy {
    proc: Proc,
    /// The listener (client-facing) address.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
}

impl Envoy {
    /// Kills Envoy at once (SIGKILL): no drain, no goodbye to the balance service.
    pub fn stop_now(&mut self) {
        self.proc.stop();
    }

    fn command(dir: &Path, opts: &EnvoyOpts) -> (Command, PathBuf, PathBuf) {
        let wasm = opts.wasm.clone().unwrap_or_else(wasm_path);
        let base = opts.base_yaml.clone().unwrap_or_else(demo_envoy_yaml);
        let mut yaml = render_envoy_yaml(
            &base,
            &wasm,
            Some(&opts.plugin_config),
            Some(opts.balance_addr),
            Some(opts.upstream_addr),
            true,
        );
        for (from, to) in &opts.replacements {
            yaml = replace_once(&yaml, from, to);
        }
        Envoy::command_for_yaml(dir, &yaml, opts)
    }

    /// The Envoy command for a complete config (written to `dir/envoy.yaml`); only the
    /// process options of `opts` are used.
    fn command_for_yaml(dir: &Path, yaml: &str, opts: &EnvoyOpts) -> (Command, PathBuf, PathBuf) {
        let config_path = dir.join("envoy.yaml");
        fs::write(&config_path, yaml).expect("write envoy.yaml");
        let admin_path = dir.join("admin.txt");
        let _ = fs::remove_file(&admin_path);
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c")
            .arg(&config_path)
            .arg("--disable-hot-restart")
            .arg("--concurrency")
            .arg(opts.concurrency.to_string())
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-level")
            .arg(&opts.log_level)
            .args(&opts.extra_args)
            .current_dir(dir);
        (cmd, config_path, admin_path)
    }

    /// Starts Envoy and waits until it is ready to serve.
    pub fn start(dir: &Path, opts: &EnvoyOpts) -> Envoy {
        let (cmd, config_path, admin_path) = Envoy::command(dir, opts);
        Envoy::launch(dir, cmd, config_path, admin_path)
    }

    /// Starts Envoy on a complete config of its own (admin port 0; e.g. one of
    /// `envoy/*.yaml` rendered for the test, or a bootstrap the test wrote) and waits until
    /// it is ready. `addr` is then the listener named `ingress`, else the first one.
    pub fn start_yaml(dir: &Path, yaml: &str, concurrency: u32, extra_args: &[&str]) -> Envoy {
        let unused = SocketAddr::from(([127, 0, 0, 1], 0));
        let opts = EnvoyOpts {
            concurrency,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            ..EnvoyOpts::new(&Value::Null, unused, unused)
        };
        let (cmd, config_path, admin_path) = Envoy::command_for_yaml(dir, yaml, &opts);
        Envoy::launch(dir, cmd, config_path, admin_path)
    }

    fn launch(dir: &Path, cmd: Command, config_path: PathBuf, admin_path: PathBuf) -> Envoy {
        let mut proc = Proc::spawn("envoy", cmd, &dir.join("envoy.log"));
        let deadline = Instant::now() + ENVOY_READY_TIMEOUT;
        let fail = |proc: &mut Proc, why: &str| -> ! {
            let status = proc.try_wait();
            let log = proc.log_tail(60);
            proc.stop();
            panic!("[harness] Envoy did not become ready: {why} (exit status: {status:?}); log tail:\n{log}");
        };
        // 1. The admin address file.
        let admin: SocketAddr = loop {
            if let Some(addr) = fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break addr;
            }
            if proc.try_wait().is_some() {
                fail(&mut proc, "Envoy exited");
            }
            if Instant::now() > deadline {
                fail(&mut proc, "timed out waiting for the admin address");
            }
            thread::sleep(Duration::from_millis(50));
        };
        // 2. /ready says LIVE.
        loop {
            if let Ok(resp) = try_http(admin, "GET", "/ready", &[], b"") {
                if resp.status == 200 && resp.text().trim() == "LIVE" {
                    break;
                }
            }
            if proc.try_wait().is_some() {
                fail(&mut proc, "Envoy exited");
            }
            if Instant::now() > deadline {
                fail(&mut proc, "timed out waiting for /ready to say LIVE");
            }
            thread::sleep(Duration::from_millis(50));
        }
        // 3. The real listener port.
        let listeners = http(admin, "GET", "/listeners?format=json", &[], b"").json();
        let port = listeners["listener_statuses"]
            .as_array()
            .and_then(|ls| {
                ls.iter()
                    .find(|l| l["name"] == "ingress")
                    .or_else(|| ls.first())
            })
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| fail(&mut proc, &format!("no listener port in {listeners}")));
        Envoy {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin,
            config_path,
        }
    }

    /// Runs Envoy with a config expected to be refused: returns its exit status (None if
    /// it was still running after `timeout` and had to be killed) and its log.
    pub fn run_expect_exit(
        dir: &Path,
        opts: &EnvoyOpts,
        timeout: Duration,
    ) -> (Option<ExitStatus>, String) {
        let (cmd, _, _) = Envoy::command(dir, opts);
        let mut proc = Proc::spawn("envoy", cmd, &dir.join("envoy.log"));
        let status = proc.wait_timeout(timeout);
        (status, proc.log())
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.proc.log_tail(lines)
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// `GET /stats` as `name -> value` (counters and gauges; histograms skipped).
    pub fn stats(&self) -> Vec<(String, u64)> {
        admin_stats(self.admin)
    }

    /// A counter or gauge from `/stats`, None if Envoy does not know it (yet).
    pub fn stat(&self, name: &str) -> Option<u64> {
        self.stats()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// A farebox counter as Envoy has it now, e.g. `metric("allowed")` =
    /// `wasmcustom.farebox_allowed`. The filter defines every metric when it is configured,
    /// so a stat Envoy does not know is a typo or a renamed metric: the test fails naming it.
    /// The filter hands its counts to Envoy on its timer, not on each request: to read a
    /// count some requests made, use [`wait_metric`] or [`expect_metrics`].
    pub fn metric(&self, name: &str) -> u64 {
        let stat = format!("wasmcustom.farebox_{name}");
        self.stat(&stat).unwrap_or_else(|| {
            panic!("[harness] Envoy has no stat `{stat}`: not a metric the filter defines")
        })
    }

    /// [`Envoy::metric`] for a metric that may legitimately not exist yet (None then), e.g.
    /// before the filter is configured, or in a config the filter refused.
    pub fn metric_or_absent(&self, name: &str) -> Option<u64> {
        self.stat(&format!("wasmcustom.farebox_{name}"))
    }

    pub fn stats_prometheus(&self) -> String {
        let resp = http(self.admin, "GET", "/stats/prometheus", &[], b"");
        assert_eq!(resp.status, 200, "/stats/prometheus");
        resp.text()
    }
}

/// Waits until `envoy.metric(name) >= at_least` (the filter flushes its counts on its
/// timer, and refunds and settles happen from a timer) and returns the value; fails the
/// test, naming the metric and the last value, if that does not happen within `timeout`.
pub fn wait_metric(envoy: &Envoy, name: &str, at_least: u64, timeout: Duration) -> u64 {
    let mut last = 0;
    let reached = wait_until(timeout, || {
        last = envoy.metric(name);
        last >= at_least
    });
    assert!(
        reached,
        "[harness] metric {name} = {last} after {timeout:?}, expected at least {at_least}"
    );
    last
}

/// Asserts the exact values of some farebox metrics. Waits (up to `timeout`) until every
/// metric with a positive expected value has reached it, then compares them all: the
/// zeros too, which are checked only once the positive counts of the same requests have
/// been seen (the positive signal that the counting is done), never after a fixed sleep.
pub fn expect_metrics(envoy: &Envoy, expected: &[(&str, u64)], timeout: Duration) {
    assert!(
        expected.iter().any(|&(_, v)| v > 0),
        "[harness] expect_metrics needs a positive expected count to know the counting is done"
    );
    let read = || -> Vec<u64> { expected.iter().map(|&(n, _)| envoy.metric(n)).collect() };
    let mut last = read();
    wait_until(timeout, || {
        last = read();
        expected
            .iter()
            .zip(&last)
            .all(|(&(_, want), &got)| got >= want)
    });
    let got: Vec<(&str, u64)> = expected.iter().map(|&(n, _)| n).zip(last).collect();
    assert_eq!(
        got, expected,
        "[harness] farebox metrics (after up to {timeout:?})"
    );
}

// ---------------------------------------------------------------------------------------
// A whole stack: balance service + echo + Envoy
// ---------------------------------------------------------------------------------------

pub enum BalanceChoice {
    /// The reference service with these options.
    Reference(BalanceOpts),
    /// Some address (a fake service, or a closed port).
    Addr(SocketAddr),
}

pub enum UpstreamChoice {
    Echo,
    Addr(SocketAddr),
}

pub struct StackBuilder {
    label: String,
    plugin: Value,
    balance: BalanceChoice,
    upstream: UpstreamChoice,
    concurrency: u32,
    log_level: String,
    envoy_args: Vec<String>,
    base_yaml: Option<String>,
}

/// A test's private stack, starting from the demo configuration.
pub fn stack(label: &str) -> StackBuilder {
    StackBuilder {
        label: label.to_string(),
        plugin: demo_plugin_config(),
        balance: BalanceChoice::Reference(BalanceOpts::default()),
        upstream: UpstreamChoice::Echo,
        concurrency: 2,
        log_level: "info".to_string(),
        envoy_args: Vec::new(),
        base_yaml: None,
    }
}

impl StackBuilder {
    /// Edits the plugin config (starting from the demo one).
    pub fn plugin(mut self, edit: impl FnOnce(&mut Value)) -> Self {
        edit(&mut self.plugin);
        self
    }

    pub fn balance_opts(mut self, opts: BalanceOpts) -> Self {
        self.balance = BalanceChoice::Reference(opts);
        self
    }

    pub fn balance_addr(mut self, addr: SocketAddr) -> Self {
        self.balance = BalanceChoice::Addr(addr);
        self
    }

    pub fn upstream_addr(mut self, addr: SocketAddr) -> Self {
        self.upstream = UpstreamChoice::Addr(addr);
        self
    }

    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// More Envoy command-line arguments.
    pub fn envoy_args(mut self, args: &[&str]) -> Self {
        self.envoy_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Renders this Envoy config (with the demo's markers and ports) instead of
    /// `envoy/envoy.yaml`.
    pub fn envoy_yaml(mut self, yaml: String) -> Self {
        self.base_yaml = Some(yaml);
        self
    }

    pub fn start(self) -> Stack {
        let dir = TempDir::new(&self.label);
        let (balance, balance_addr) = match &self.balance {
            BalanceChoice::Reference(opts) => {
                let service = BalanceService::start(dir.path(), opts);
                let addr = service.addr;
                (Some(service), addr)
            }
            BalanceChoice::Addr(addr) => (None, *addr),
        };
        let (echo, upstream_addr) = match &self.upstream {
            UpstreamChoice::Echo => {
                let echo = Echo::start(dir.path());
                let addr = echo.addr;
                (Some(echo), addr)
            }
            UpstreamChoice::Addr(addr) => (None, *addr),
        };
        let mut opts = EnvoyOpts::new(&self.plugin, balance_addr, upstream_addr);
        opts.concurrency = self.concurrency;
        opts.log_level = self.log_level.clone();
        opts.extra_args = self.envoy_args.clone();
        opts.base_yaml = self.base_yaml.clone();
        let envoy = Envoy::start(dir.path(), &opts);
        Stack {
            envoy,
            balance,
            echo,
            plugin: self.plugin,
            dir,
        }
    }
}

/// Field order matters: Envoy is dropped (killed) first, the temp dir last.
pub struct Stack {
    pub envoy: Envoy,
    pub balance: Option<BalanceService>,
    pub echo: Option<Echo>,
    pub plugin: Value,
    pub dir: TempDir,
}

impl Stack {
    /// The reference balance service (panics if the stack uses another one).
    pub fn balance(&self) -> &BalanceService {
        self.balance
            .as_ref()
            .expect("stack has a reference balance service")
    }

    pub fn balance_mut(&mut self) -> &mut BalanceService {
        self.balance
            .as_mut()
            .expect("stack has a reference balance service")
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        http(self.envoy.addr, method, path, headers, body)
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.request("GET", path, headers, b"")
    }

    /// GET with the demo credential header.
    pub fn get_with_key(&self, path: &str, key: &str) -> Response {
        self.get(path, &[("x-api-key", key)])
    }
}

// ---------------------------------------------------------------------------------------
// Two balance-service replicas behind envoy/envoy-replicas.yaml
// ---------------------------------------------------------------------------------------

/// The second replica's port line in `envoy/envoy-replicas.yaml` (the first one is the
/// demo's balance port, 8081).
pub const REPLICA_B_PORT_LINE: &str = "port_value: 8083";

/// Envoy options for `envoy/envoy-replicas.yaml` in front of `replicas`.
pub fn replicas_envoy_opts(
    plugin: &Value,
    replicas: [SocketAddr; 2],
    upstream: SocketAddr,
) -> EnvoyOpts {
    let mut opts = EnvoyOpts::new(plugin, replicas[0], upstream);
    opts.base_yaml = Some(envoy_yaml_file("envoy-replicas.yaml"));
    opts.replacements = vec![(
        REPLICA_B_PORT_LINE.to_string(),
        format!("port_value: {}", replicas[1].port()),
    )];
    opts
}

/// Two reference balance services on one ledger (`ledger`: its `database_url`, or a
/// shared SQLite `db_path`), the echo upstream, and `envoys` Envoys running
/// `envoy/envoy-replicas.yaml` in front of both replicas (with `replacements` of its text,
/// each matching exactly once).
pub struct ReplicaStack {
    /// Field order matters: the Envoys go first, the temporary directory last.
    pub envoys: Vec<Envoy>,
    pub replicas: Vec<BalanceService>,
    pub echo: Echo,
    pub plugin: Value,
    pub dir: TempDir,
}

impl ReplicaStack {
    pub fn start(
        label: &str,
        ledger: &BalanceOpts,
        plugin: &Value,
        envoys: usize,
        concurrency: u32,
        replacements: &[(&str, &str)],
    ) -> ReplicaStack {
        let dir = TempDir::new(label);
        let replicas: Vec<BalanceService> = ["replica-a", "replica-b"]
            .iter()
            .map(|name| {
                let sub = dir.join(name);
                fs::create_dir_all(&sub).expect("create replica dir");
                BalanceService::start(&sub, ledger)
            })
            .collect();
        let echo = Echo::start(dir.path());
        let envoys = (0..envoys)
            .map(|i| {
                let sub = dir.join(&format!("envoy-{i}"));
                fs::create_dir_all(&sub).expect("create envoy dir");
                let mut opts =
                    replicas_envoy_opts(plugin, [replicas[0].addr, replicas[1].addr], echo.addr);
                opts.concurrency = concurrency;
                opts.replacements.extend(
                    replacements
                        .iter()
                        .map(|(from, to)| (from.to_string(), to.to_string())),
                );
                Envoy::start(&sub, &opts)
            })
            .collect();
        ReplicaStack {
            envoys,
            replicas,
            echo,
            plugin: plugin.clone(),
            dir,
        }
    }

    /// The client-facing addresses of the Envoys.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.envoys.iter().map(|e| e.addr).collect()
    }

    /// A replica for admin calls (the ledger is the same through either).
    pub fn admin(&self) -> &BalanceService {
        &self.replicas[0]
    }

    /// `authorize_calls` of each replica.
    pub fn authorize_calls(&self) -> Vec<u64> {
        self.replicas
            .iter()
            .map(BalanceService::authorize_calls)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The HTTP/1.1 client is testkit's (one for the whole workspace)
// ---------------------------------------------------------------------------------------

pub use testkit::http::*;

/// Asserts an RFC 9457 problem answer from the filter and returns its body.
pub fn assert_problem(resp: &Response, status: u16) -> Value {
    assert_eq!(resp.status, status, "unexpected answer: {}", resp.dump());
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct:?}: {}",
        resp.dump()
    );
    let body = resp.json();
    assert_eq!(body["status"], json!(status), "status: {body}");
    assert!(
        body["type"].is_string() && body["title"].is_string(),
        "{body}"
    );
    assert!(body["detail"].is_string(), "detail: {body}");
    body
}

pub fn num(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("`{field}` is not a number in {v}"))
}

pub fn max_age(cache_control: &str) -> Option<u64> {
    cache_control
        .split(',')
        .map(str::trim)
        .find_map(|d| d.strip_prefix("max-age="))
        .and_then(|n| n.parse().ok())
}

/// `/stats` of an Envoy admin endpoint as `name -> value` (counters and gauges;
/// histograms skipped).
pub fn admin_stats(admin: SocketAddr) -> Vec<(String, u64)> {
    http(admin, "GET", "/stats", &[], b"")
        .text()
        .lines()
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(": ")?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Reads more of a fake's connection into `buf` (a read timeout just returns);
/// false once the connection is done or `stop` is set.
pub fn read_more(
    conn: &mut TcpStream,
    chunk: &mut [u8],
    buf: &mut Vec<u8>,
    stop: &AtomicBool,
) -> bool {
    if stop.load(Ordering::SeqCst) {
        return false;
    }
    match conn.read(chunk) {
        Ok(0) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        Err(e)
            if e.kind() == std::io::ErrorKind::WouldBlock
                || e.kind() == std::io::ErrorKind::TimedOut =>
        {
            true
        }
        Err(_) => false,
    }
}

/// Sends many requests in parallel (one thread each) and returns the answers in order.
/// `total` requests over `connections` threads, each sending its share one after another.
pub fn load(
    addr: SocketAddr,
    total: usize,
    connections: usize,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Vec<Response> {
    load_spread(&[addr], total, connections, method, path, headers)
}

/// [`load`] over several gateways: connection `i` talks to `addrs[i % addrs.len()]`.
pub fn load_spread(
    addrs: &[SocketAddr],
    total: usize,
    connections: usize,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Vec<Response> {
    LoadRun::start(addrs, total, connections, method, path, headers)
        .join()
        .into_iter()
        .map(|t| t.response)
        .collect()
}

/// One answer of a [`LoadRun`], with when its request was sent and answered.
#[derive(Clone, Debug)]
pub struct Timed {
    pub sent: Instant,
    pub answered: Instant,
    pub response: Response,
}

/// A load running in the background: `total` requests at most, over `connections`
/// threads (connection `i` talks to `addrs[i % addrs.len()]`), each sending its share one
/// after another, until its share is done or [`LoadRun::stop`]. The test can watch it
/// while it runs (e.g. to kill something mid-load on a positive signal).
pub struct LoadRun {
    threads: Vec<thread::JoinHandle<Vec<Timed>>>,
    /// (answered at, status) of every answer so far.
    seen: Arc<Mutex<Vec<(Instant, u16)>>>,
    stop: Arc<AtomicBool>,
}

impl LoadRun {
    pub fn start(
        addrs: &[SocketAddr],
        total: usize,
        connections: usize,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> LoadRun {
        assert!(!addrs.is_empty(), "a load needs at least one address");
        let owned: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..connections)
            .map(|i| {
                let share = total / connections + usize::from(i < total % connections);
                let addr = addrs[i % addrs.len()];
                let (owned, method, path) = (owned.clone(), method.to_string(), path.to_string());
                let (seen, stop) = (seen.clone(), stop.clone());
                thread::spawn(move || {
                    let hs: Vec<(&str, &str)> = owned
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    let mut out = Vec::with_capacity(share);
                    for _ in 0..share {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let sent = Instant::now();
                        let response = http(addr, &method, &path, &hs, b"");
                        let answered = Instant::now();
                        if let Ok(mut s) = seen.lock() {
                            s.push((answered, response.status));
                        }
                        out.push(Timed {
                            sent,
                            answered,
                            response,
                        });
                    }
                    out
                })
            })
            .collect();
        LoadRun {
            threads,
            seen,
            stop,
        }
    }

    /// Answers so far.
    pub fn completed(&self) -> usize {
        self.seen.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Answers with `status` answered at or after `since`.
    pub fn count_since(&self, status: u16, since: Instant) -> usize {
        self.seen
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|(at, st)| *st == status && *at >= since)
                    .count()
            })
            .unwrap_or(0)
    }

    /// When the first answer with `status` at or after `since` came, if one did.
    pub fn first_since(&self, status: u16, since: Instant) -> Option<Instant> {
        self.seen.lock().ok().and_then(|s| {
            s.iter()
                .filter(|(at, st)| *st == status && *at >= since)
                .map(|(at, _)| *at)
                .min()
        })
    }

    /// No new requests after the ones in flight.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for every connection to finish; the answers, in no particular order.
    pub fn join(mut self) -> Vec<Timed> {
        std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|h| h.join().expect("load thread panicked"))
            .collect()
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        // A test that panics mid-load must not leave threads sending requests.
        self.stop.store(true, Ordering::SeqCst);
    }
}

pub fn parallel_requests(
    addr: SocketAddr,
    n: usize,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Vec<Response> {
    let owned: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let barrier = Arc::new(std::sync::Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let owned = owned.clone();
            let barrier = barrier.clone();
            let method = method.to_string();
            let path = path.to_string();
            thread::spawn(move || {
                let hs: Vec<(&str, &str)> = owned
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                barrier.wait();
                http(addr, &method, &path, &hs, b"")
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("request thread panicked"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// A scripted fake service (a balance service or an upstream) that can also misbehave at
// the socket level: accept and never answer, reset the connection in the middle of a body
// ---------------------------------------------------------------------------------------

/// A request the fake service received.
#[derive(Clone, Debug)]
pub struct FakeRequest {
    pub method: String,
    pub path: String,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FakeRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What the fake service does with a request.
#[derive(Clone, Debug)]
pub enum FakeAction {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Sleep, then respond (the peer has usually given up by then).
    Delay {
        ms: u64,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// Close the connection without answering.
    Close,
    /// Accept the request and never answer: hold the connection for `ms`, then close it.
    Hang { ms: u64 },
    /// Send the status line, the headers with `content-length: declared` and `body` (shorter
    /// than declared), then reset the connection (RST, via SO_LINGER 0).
    ResetMidBody {
        status: u16,
        declared: usize,
        body: Vec<u8>,
    },
}

impl FakeAction {
    pub fn json(status: u16, body: &Value) -> FakeAction {
        FakeAction::Respond {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }

    pub fn raw(status: u16, content_type: &str, body: &[u8]) -> FakeAction {
        FakeAction::Respond {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.to_vec(),
        }
    }

    /// A JSON answer with more `headers` (besides content-type and content-length).
    pub fn answer(status: u16, headers: &[(&str, &str)], body: &[u8]) -> FakeAction {
        let mut hs = vec![("content-type".to_string(), "application/json".to_string())];
        hs.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        FakeAction::Respond {
            status,
            headers: hs,
            body: body.to_vec(),
        }
    }

    /// The same answer after `ms`.
    pub fn delayed(self, ms: u64) -> FakeAction {
        match self {
            FakeAction::Respond {
                status,
                headers,
                body,
            }
            | FakeAction::Delay {
                status,
                headers,
                body,
                ..
            } => FakeAction::Delay {
                ms,
                status,
                headers,
                body,
            },
            other => other,
        }
    }

    pub fn delay_json(ms: u64, status: u16, body: &Value) -> FakeAction {
        FakeAction::Delay {
            ms,
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
        }
    }
}

type Handler = dyn Fn(&FakeRequest, usize) -> FakeAction + Send + Sync;

/// A fake balance service on 127.0.0.1:0 answering each request with the handler's
/// action; the handler also gets the 0-based index of the request. Stops on drop.
pub struct FakeService {
    pub addr: SocketAddr,
    count: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<FakeRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FakeService {
    pub fn start(
        handler: impl Fn(&FakeRequest, usize) -> FakeAction + Send + Sync + 'static,
    ) -> FakeService {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake service");
        let addr = listener.local_addr().expect("local addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let count = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let (count, requests, stop) = (count.clone(), requests.clone(), stop.clone());
            let connections = connections.clone();
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            connections.fetch_add(1, Ordering::SeqCst);
                            let (count, requests, stop, handler) = (
                                count.clone(),
                                requests.clone(),
                                stop.clone(),
                                handler.clone(),
                            );
                            thread::spawn(move || {
                                serve_fake_connection(conn, &count, &requests, &stop, &*handler);
                            });
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        FakeService {
            addr,
            count,
            connections,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// Number of requests received so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> Vec<FakeRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The requests to this path.
    pub fn to(&self, path: &str) -> Vec<FakeRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FakeService {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_fake_connection(
    mut conn: TcpStream,
    count: &AtomicUsize,
    requests: &Mutex<Vec<FakeRequest>>,
    stop: &AtomicBool,
    handler: &Handler,
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf: Vec<u8> = Vec::new();
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        // Serve every complete request in the buffer.
        while let Some((req, used)) = parse_request(&buf) {
            buf.drain(..used);
            let index = count.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut r) = requests.lock() {
                r.push(req.clone());
            }
            let (status, headers, body) = match handler(&req, index) {
                FakeAction::Close => {
                    let _ = conn.shutdown(Shutdown::Both);
                    return;
                }
                FakeAction::Respond {
                    status,
                    headers,
                    body,
                } => (status, headers, body),
                FakeAction::Delay {
                    ms,
                    status,
                    headers,
                    body,
                } => {
                    nap(ms, stop);
                    (status, headers, body)
                }
                FakeAction::Hang { ms } => {
                    nap(ms, stop);
                    let _ = conn.shutdown(Shutdown::Both);
                    return;
                }
                FakeAction::ResetMidBody {
                    status,
                    declared,
                    body,
                } => {
                    let head = format!(
                        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n",
                        reason(status)
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&body);
                    let _ = conn.flush();
                    // (Let the bytes leave before the reset discards what is unsent.)
                    thread::sleep(Duration::from_millis(20));
                    reset(conn);
                    return;
                }
            };
            let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
            for (k, v) in &headers {
                let _ = write!(out, "{k}: {v}\r\n");
            }
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
            {
                let _ = write!(out, "content-length: {}\r\n", body.len());
            }
            out.push_str("\r\n");
            let mut bytes = out.into_bytes();
            bytes.extend_from_slice(&body);
            if conn.write_all(&bytes).is_err() {
                return;
            }
        }
        if !read_more(&mut conn, &mut chunk, &mut buf, stop) {
            return;
        }
    }
}

/// Sleeps `ms` in small steps, returning early once `stop` is set (the fake is dropped).
fn nap(ms: u64, stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
}

/// Closes with RST rather than FIN: SO_LINGER {on, 0} then close.
#[cfg(target_os = "linux")]
fn reset(conn: TcpStream) {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Linger {
        l_onoff: i32,
        l_linger: i32,
    }
    extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, value: *const Linger, len: u32) -> i32;
    }
    const SOL_SOCKET: i32 = 1;
    const SO_LINGER: i32 = 13;
    let linger = Linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a properly sized, live `struct linger`.
    let rc = unsafe {
        setsockopt(
            conn.as_raw_fd(),
            SOL_SOCKET,
            SO_LINGER,
            &linger,
            std::mem::size_of::<Linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "setsockopt(SO_LINGER)");
    drop(conn);
}

#[cfg(not(target_os = "linux"))]
fn reset(conn: TcpStream) {
    let _ = conn.shutdown(Shutdown::Both);
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn parse_request(buf: &[u8]) -> Option<(FakeRequest, usize)> {
    let (start, headers, body_start) = split_head(buf)?;
    let mut first = start.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let rest = &buf[body_start..];
    let (body, used) =
        if get("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
            decode_chunked(rest)?
        } else {
            let cl: usize = get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if rest.len() < cl {
                return None;
            }
            (rest[..cl].to_vec(), cl)
        };
    Some((
        FakeRequest {
            method,
            path,
            headers,
            body,
        },
        body_start + used,
    ))
}

// ---------------------------------------------------------------------------------------
// A fleet: several Envoy processes in front of one balance service
// ---------------------------------------------------------------------------------------

/// `n` Envoy processes (`--concurrency 1` each, like gateways behind a load balancer)
/// sharing one reference balance service and one upstream.
/// Field order matters: the Envoys are dropped (killed) first, the temp dir last.
pub struct Fleet {
    pub envoys: Vec<Envoy>,
    pub balance: BalanceService,
    pub echo: Option<Echo>,
    pub plugin: Value,
    pub dir: TempDir,
}

impl Fleet {
    /// Starts the service (`opts`), the echo upstream unless `upstream` is given, and
    /// `n` Envoys with `plugin`.
    pub fn start(
        label: &str,
        n: usize,
        plugin: &Value,
        opts: &BalanceOpts,
        upstream: Option<SocketAddr>,
    ) -> Fleet {
        let dir = TempDir::new(label);
        let balance = BalanceService::start(dir.path(), opts);
        let (echo, upstream_addr) = match upstream {
            Some(addr) => (None, addr),
            None => {
                let echo = Echo::start(dir.path());
                let addr = echo.addr;
                (Some(echo), addr)
            }
        };
        let mut envoy_opts = EnvoyOpts::new(plugin, balance.addr, upstream_addr);
        envoy_opts.concurrency = 1;
        let envoys = (0..n)
            .map(|i| {
                let sub = dir.join(&format!("envoy-{i}"));
                fs::create_dir_all(&sub).expect("create an Envoy's directory");
                Envoy::start(&sub, &envoy_opts)
            })
            .collect();
        Fleet {
            envoys,
            balance,
            echo,
            plugin: plugin.clone(),
            dir,
        }
    }

    /// The sum of a farebox metric over the Envoys still running.
    pub fn metric(&mut self, name: &str) -> u64 {
        self.envoys
            .iter_mut()
            .filter_map(|e| e.is_running().then(|| e.metric(name)))
            .sum()
    }
}

/// An integer field of an admin answer.
pub fn acct_num(v: &Value, field: &str) -> i64 {
    v[field]
        .as_i64()
        .unwrap_or_else(|| panic!("[harness] no integer `{field}` in {v}"))
}

/// The ledger invariant: initial + topups = balance + reserved + charged.
pub fn assert_ledger_exact(acct: &Value) {
    assert_eq!(
        acct_num(acct, "initial_balance") + acct_num(acct, "topups"),
        acct_num(acct, "balance") + acct_num(acct, "reserved") + acct_num(acct, "charged"),
        "ledger does not balance: {acct}"
    );
}

/// Lower-case hex SHA-256 of `data` (the `sha256` of a module in Envoy and Istio configs).
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        })
}
