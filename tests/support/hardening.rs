//! Helpers of the hardening suites (tests/faults.rs, tests/lease_faults.rs, tests/hostile.rs),
//! kept apart from tests/common so that the shared harness is not edited:
//!
//! - [`RawFake`]: a scripted balance service (or upstream) that can also misbehave at the
//!   socket level: accept and never answer, reset the connection in the middle of a body,
//!   send a 10 MB body;
//! - VM health: Envoy's wasm crash counters and the log's panic markers;
//! - [`EnvoyYaml`]: an Envoy started from a YAML text the test writes itself (used for the
//!   LDS hot-reload test, where the listener comes from a watched file);
//! - small assertion helpers shared by the suites.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{
    admin_stats, envoy_bin, find, http, read_more, split_head, try_http, wait_until, wasm_path,
    Envoy, Proc, Response,
};

// ---------------------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------------------

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
// A scripted fake HTTP service that can misbehave at the socket level
// ---------------------------------------------------------------------------------------

/// A request the fake received.
#[derive(Clone, Debug)]
pub struct RawRequest {
    pub method: String,
    pub path: String,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl RawRequest {
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

/// What the fake does with one request.
#[derive(Clone, Debug)]
pub enum Act {
    /// Answer (after `delay_ms`, 0 for at once).
    Answer {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        delay_ms: u64,
    },
    /// Accept the request and never answer: hold the connection for `ms`, then close it.
    Hang { ms: u64 },
    /// Send the status line, the headers with `content-length: declared` and `body` (shorter
    /// than declared), then reset the connection (RST, via SO_LINGER 0).
    ResetMidBody {
        status: u16,
        declared: usize,
        body: Vec<u8>,
    },
    /// Close the connection without a word.
    Close,
}

impl Act {
    pub fn json(status: u16, body: &Value) -> Act {
        Act::raw(status, &[], body.to_string().as_bytes())
    }

    /// `headers` besides content-type (application/json) and content-length.
    pub fn raw(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Act {
        let mut hs = vec![("content-type".to_string(), "application/json".to_string())];
        hs.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Act::Answer {
            status,
            headers: hs,
            body: body.to_vec(),
            delay_ms: 0,
        }
    }

    pub fn delayed(self, ms: u64) -> Act {
        match self {
            Act::Answer {
                status,
                headers,
                body,
                ..
            } => Act::Answer {
                status,
                headers,
                body,
                delay_ms: ms,
            },
            other => other,
        }
    }
}

type RawHandler = dyn Fn(&RawRequest) -> Act + Send + Sync;

/// A fake on 127.0.0.1:0; every request is recorded and answered by the handler's [`Act`].
/// Stops (and closes held connections) on drop.
pub struct RawFake {
    pub addr: SocketAddr,
    requests: Arc<Mutex<Vec<RawRequest>>>,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RawFake {
    pub fn start(handler: impl Fn(&RawRequest) -> Act + Send + Sync + 'static) -> RawFake {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake");
        let addr = listener.local_addr().expect("addr");
        listener.set_nonblocking(true).expect("nonblocking");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let handler: Arc<RawHandler> = Arc::new(handler);
        let thread = {
            let (requests, stop, connections) =
                (requests.clone(), stop.clone(), connections.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            connections.fetch_add(1, Ordering::SeqCst);
                            let (requests, stop, handler) =
                                (requests.clone(), stop.clone(), handler.clone());
                            thread::spawn(move || serve(conn, &requests, &stop, &*handler));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        RawFake {
            addr,
            requests,
            stop,
            connections,
            thread: Some(thread),
        }
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Requests to this path.
    pub fn to(&self, path: &str) -> Vec<RawRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawFake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sleeps `ms` in small steps, returning early once `stop` is set.
fn nap(ms: u64, stop: &AtomicBool) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(10));
    }
}

fn serve(
    mut conn: TcpStream,
    requests: &Mutex<Vec<RawRequest>>,
    stop: &AtomicBool,
    handler: &RawHandler,
) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some((req, used)) = parse_request(&buf) {
            buf.drain(..used);
            if let Ok(mut r) = requests.lock() {
                r.push(req.clone());
            }
            match handler(&req) {
                Act::Close => {
                    let _ = conn.shutdown(Shutdown::Both);
                    return;
                }
                Act::Hang { ms } => {
                    nap(ms, stop);
                    let _ = conn.shutdown(Shutdown::Both);
                    return;
                }
                Act::ResetMidBody {
                    status,
                    declared,
                    body,
                } => {
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(&body);
                    let _ = conn.flush();
                    thread::sleep(Duration::from_millis(20));
                    reset(conn);
                    return;
                }
                Act::Answer {
                    status,
                    headers,
                    body,
                    delay_ms,
                } => {
                    if delay_ms > 0 {
                        nap(delay_ms, stop);
                    }
                    let mut out = format!("HTTP/1.1 {status} X\r\n");
                    for (k, v) in &headers {
                        let _ = write!(out, "{k}: {v}\r\n");
                    }
                    let _ = write!(out, "content-length: {}\r\n\r\n", body.len());
                    let mut bytes = out.into_bytes();
                    bytes.extend_from_slice(&body);
                    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
                    if conn.write_all(&bytes).is_err() {
                        return;
                    }
                }
            }
        }
        if !read_more(&mut conn, &mut chunk, &mut buf, stop) {
            return;
        }
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

fn parse_request(buf: &[u8]) -> Option<(RawRequest, usize)> {
    let (start, headers, body_start) = split_head(buf)?;
    let mut first = start.split_whitespace();
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let cl: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let rest = &buf[body_start..];
    if rest.len() < cl {
        return None;
    }
    Some((
        RawRequest {
            method,
            path,
            headers,
            body: rest[..cl].to_vec(),
            at: Instant::now(),
        },
        body_start + cl,
    ))
}

// ---------------------------------------------------------------------------------------
// Envoy from a YAML text
// ---------------------------------------------------------------------------------------

/// An Envoy started from a YAML the test wrote (killed on drop).
pub struct EnvoyYaml {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
}

impl EnvoyYaml {
    pub fn start(dir: &Path, yaml: &str, extra_args: &[&str]) -> EnvoyYaml {
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml).expect("write envoy.yaml");
        let admin_path = dir.join("admin.txt");
        let _ = std::fs::remove_file(&admin_path);
        let mut cmd = Command::new(envoy_bin());
        cmd.arg("-c")
            .arg(&config_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "2",
                "--log-level",
                "info",
            ])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(extra_args)
            .current_dir(dir);
        let mut proc = Proc::spawn("envoy", cmd, &dir.join("envoy.log"));
        let deadline = Instant::now() + Duration::from_secs(60);
        let admin = loop {
            if let Some(a) = std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break a;
            }
            assert!(
                proc.try_wait().is_none() && Instant::now() < deadline,
                "Envoy did not start; log:\n{}",
                proc.log_tail(60)
            );
            thread::sleep(Duration::from_millis(50));
        };
        let ready = wait_until(Duration::from_secs(60), || {
            try_http(admin, "GET", "/ready", &[], b"")
                .is_ok_and(|r| r.status == 200 && r.text().trim() == "LIVE")
        });
        assert!(ready, "Envoy not LIVE; log:\n{}", proc.log_tail(60));
        EnvoyYaml {
            proc,
            admin,
            config_path,
        }
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }
}

impl EnvoyYaml {
    /// The address of the listener named `ingress` (a port-0 listener gets its port here).
    pub fn listener_addr(&self) -> SocketAddr {
        let listeners = http(self.admin, "GET", "/listeners?format=json", &[], b"").json();
        let port = listeners["listener_statuses"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == "ingress"))
            .and_then(|l| l["local_address"]["socket_address"]["port_value"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("no ingress listener in {listeners}"));
        SocketAddr::from(([127, 0, 0, 1], port))
    }
}

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

// ---------------------------------------------------------------------------------------
// Raw requests with arbitrary bytes
// ---------------------------------------------------------------------------------------

/// What came back for a raw request: `Ok` with the status and the parsed answer (if the
/// body could be read), or the I/O error.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub response: Option<Response>,
}

/// Sends `METHOD TARGET HTTP/1.1` with exactly these header lines (any bytes), plus Host and
/// `Connection: close`, and reads the answer. Works for HEAD (no body is expected).
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &[u8])],
) -> RawAnswer {
    let mut req =
        format!("{method} {target} HTTP/1.1\r\nHost: farebox.test\r\nConnection: close\r\n")
            .into_bytes();
    for (k, v) in headers {
        req.extend_from_slice(k.as_bytes());
        req.extend_from_slice(b": ");
        req.extend_from_slice(v);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"\r\n");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(&req).expect("write");
    // Read until the answer is complete by its framing (Envoy may keep the connection open
    // after an error of its own), or EOF, or the read timeout.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let done = if method == "HEAD" {
            find(&buf, b"\r\n\r\n").is_some()
        } else {
            parse_answer(&buf, false).is_some()
        };
        if done {
            break;
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {target}: no HTTP answer: {text:?}"));
    let response = if method == "HEAD" {
        None
    } else {
        parse_answer(&buf, true)
    };
    RawAnswer { status, response }
}

/// A complete HTTP/1.1 answer (content-length or chunked framing; with `at_eof`, also one
/// framed by the end of the connection), or None.
fn parse_answer(buf: &[u8], at_eof: bool) -> Option<Response> {
    let (start, headers, body_start) = split_head(buf)?;
    let status = start.split_whitespace().nth(1)?.parse().ok()?;
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let rest = &buf[body_start..];
    let body = if get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        crate::common::decode_chunked(rest)?.0
    } else {
        let cl: usize = match get("content-length").and_then(|v| v.parse().ok()) {
            Some(cl) => cl,
            None if at_eof => rest.len(),
            None => return None,
        };
        rest.get(..cl)?.to_vec()
    };
    Some(Response {
        status,
        headers,
        body,
    })
}
