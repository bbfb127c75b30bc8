//! The harness of the `request_flow` fuzz target (fuzz/fuzz_targets/request_flow.rs), a
//! library module so that the sequences it found can be replayed as plain tests
//! (fuzz/tests/request_flow.rs).
//!
//! Whole requests through the gate (src/gate.rs and its phases in src/gate/) against the
//! in-memory host: random sequences of every callback Envoy makes (request headers, body
//! and trailers, callout answers of every shape or none at all, timers, response headers
//! and body, the log),
//! several streams at once on one worker, with host errors switched on and off on any call.
//! The balance service is a model that keeps a ledger of what it charged and refunded.
//!
//! Checked after every step:
//! - nothing reaches the upstream without an allow, a counted fail-open or a free route;
//!   nothing is both answered by the gate and forwarded;
//! - a refund names a request the service was asked to charge, for what it was asked to
//!   charge, and every refund of a request is the same one (retries, never a second refund);
//! - a lease never has more units spent than it was granted, and a settle never reports more;
//! - no panic.
//!
//! At the end every stream is logged, the host errors stop, and the outbox is drained
//! with the service answering: every charge the service made for a request that was never
//! forwarded has then been refunded, or its refund refused for good by the service (a `4xx`
//! the contract calls final) or given up after every attempt failed; and
//! `farebox_refund_failures` counts every refund attempt that did not succeed.
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use crate::Json;
use arbitrary::Arbitrary;
use farebox::balance_api::CalloutResponse;
use farebox::config::Config;
use farebox::fake::FakeHost;
use farebox::gate::{Flow, Gate, Worker};
use farebox::host::{Host, HttpHost};
use farebox::lease::LeaseRecord;
use farebox::metrics::Metric;
use farebox::outbox::MAX_ATTEMPTS;
use farebox::response::Reply;
use serde_json::{json, Value};

/// Plugin configs the sequences run against: authorize and lease mode, both failure modes,
/// priced, free, MCP (priced by the body) and usage-priced routes.
const CONFIGS: [&str; 4] = [
    r#"{"cluster": "balance", "timeout_ms": 300, "failure_mode": "closed",
        "routes": [{"name": "free", "exact": "/free", "cost": 0},
                   {"name": "mcp", "methods": ["POST"], "exact": "/mcp", "cost": 1,
                    "mcp": {"methods": {"initialize": 0}, "tools": {"search": 5}}},
                   {"name": "chat", "prefix": "/v1/chat/", "usage":
                    {"json_pointer": "/usage/total_tokens", "unit_cost": 2, "estimate": 10}},
                   {"name": "paid", "prefix": "/v1/", "cost": 3}]}"#,
    r#"{"cluster": "balance", "timeout_ms": 300, "failure_mode": "open", "cache_max_entries": 64,
        "routes": [{"name": "free", "exact": "/free", "cost": 0},
                   {"name": "mcp", "methods": ["POST"], "exact": "/mcp", "cost": 1,
                    "mcp": {"tools": {"search": 5}}},
                   {"name": "paid", "prefix": "/v1/", "cost": 2}]}"#,
    r#"{"cluster": "balance", "mode": "lease", "lease_want": 5, "settle_interval_ms": 1000,
        "lease_expiry_margin_ms": 2000, "timeout_ms": 300, "lease_max_entries": 2,
        "routes": [{"name": "free", "exact": "/free", "cost": 0},
                   {"name": "chat", "prefix": "/v1/chat/", "usage":
                    {"json_pointer": "/usage/total_tokens", "unit_cost": 1, "estimate": 3}},
                   {"name": "paid", "prefix": "/v1/", "cost": 2}]}"#,
    r#"{"cluster": "balance", "mode": "lease", "lease_want": 4, "failure_mode": "open",
        "timeout_ms": 300, "routes": [{"name": "paid", "prefix": "/", "cost": 1}]}"#,
];

const PATHS: [&str; 6] = [
    "/free",
    "/mcp",
    "/v1/chat/completions",
    "/v1/thing",
    "/other",
    "/v1/../free",
];
const KEYS: [Option<&str>; 4] = [Some("key-a"), Some("key-b"), None, Some("")];
const MAX_STREAMS: usize = 6;

#[derive(Arbitrary, Debug)]
pub struct Input {
    pub config: u8,
    pub ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
pub enum Op {
    Start {
        path: u8,
        key: u8,
        post: bool,
        request_id: bool,
        end_of_stream: bool,
    },
    Body {
        stream: u8,
        body: RequestBody,
        end_of_stream: bool,
    },
    Trailers {
        stream: u8,
    },
    /// Answers one of the calls in flight (any context's).
    Answer {
        call: u8,
        answer: Answer,
    },
    Wake {
        stream: u8,
    },
    ResponseHeaders {
        stream: u8,
        status: u16,
        json: bool,
    },
    ResponseBody {
        stream: u8,
        body: ResponseBody,
        end_of_stream: bool,
    },
    Log {
        stream: u8,
    },
    Tick,
    Advance {
        ms: u16,
    },
    Fault {
        fault: Fault,
        on: bool,
    },
}

#[derive(Arbitrary, Debug)]
pub enum RequestBody {
    ToolCall,
    Initialize,
    Chat,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
pub enum ResponseBody {
    Usage(u16),
    McpError,
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    Dispatch,
    SharedGet,
    SharedSet,
    RequestBody,
    ResponseBody,
    ResponseHeaders,
}

#[derive(Arbitrary, Debug)]
pub enum Answer {
    /// What the service answers when all is well: allow, a grant, or done.
    Ok {
        balance: i64,
        max_age: Option<u8>,
    },
    Deny {
        recall: bool,
        retry_after_ms: u16,
    },
    Grant {
        granted: u8,
        expires_in_ms: u16,
    },
    Status(u16),
    /// No answer at all (timeout, reset); `processed`: the service did the work anyway.
    Lost {
        processed: bool,
    },
    TooLarge,
    Json {
        status: u16,
        body: Json,
    },
    Garbage(Vec<u8>),
}

/// Host errors, shared by every context.
#[derive(Default)]
struct Faults(std::cell::RefCell<HashSet<Fault>>);

impl Faults {
    fn on(&self, f: Fault) -> bool {
        self.0.borrow().contains(&f)
    }
}

/// The in-memory host with host errors on demand, and the dispatches it refused.
struct FuzzHost {
    inner: FakeHost,
    faults: Rc<Faults>,
    refused: std::cell::RefCell<Vec<(String, Value)>>,
}

impl Host for FuzzHost {
    fn shared_get(&self, key: &str) -> Option<(Vec<u8>, Option<u32>)> {
        if self.faults.on(Fault::SharedGet) {
            return None;
        }
        self.inner.shared_get(key)
    }
    fn shared_set(&self, key: &str, value: &[u8], cas: Option<u32>) -> bool {
        !self.faults.on(Fault::SharedSet) && self.inner.shared_set(key, value, cas)
    }
    fn dispatch(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        timeout: Duration,
    ) -> Result<u32, String> {
        if self.faults.on(Fault::Dispatch) {
            let path = headers
                .iter()
                .find(|(k, _)| *k == ":path")
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            let body = serde_json::from_slice(body).unwrap_or(Value::Null);
            self.refused.borrow_mut().push((path, body));
            return Err("BadArgument".into());
        }
        self.inner.dispatch(cluster, headers, body, timeout)
    }
    fn now_ms(&self) -> u64 {
        self.inner.now_ms()
    }
    fn add(&self, metric: Metric, n: u64) {
        self.inner.add(metric, n)
    }
}

impl HttpHost for FuzzHost {
    fn request_header(&self, name: &str) -> Option<Vec<u8>> {
        self.inner.request_header(name)
    }
    fn request_headers(&self) -> Option<Vec<u8>> {
        self.inner.request_headers()
    }
    fn set_request_header(&self, name: &str, value: Option<&str>) {
        self.inner.set_request_header(name, value)
    }
    fn response_header(&self, name: &str) -> Option<Vec<u8>> {
        if self.faults.on(Fault::ResponseHeaders) {
            return None;
        }
        self.inner.response_header(name)
    }
    fn set_response_header(&self, name: &str, value: &str) {
        self.inner.set_response_header(name, value)
    }
    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        if self.faults.on(Fault::RequestBody) {
            return None;
        }
        self.inner.request_body(size)
    }
    fn set_request_body(&self, size: usize, body: &[u8]) -> bool {
        !self.faults.on(Fault::RequestBody) && self.inner.set_request_body(size, body)
    }
    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        if self.faults.on(Fault::ResponseBody) {
            return None;
        }
        self.inner.response_body(size)
    }
    fn send_reply(&self, reply: &Reply) {
        self.inner.send_reply(reply)
    }
    fn resume_request(&self) {
        self.inner.resume_request()
    }
    fn set_property(&self, name: &str, value: &[u8]) {
        self.inner.set_property(name, value)
    }
}

struct Stream {
    host: FuzzHost,
    gate: Gate,
    /// The request went (or may now go) upstream with its body.
    forwarded: bool,
    /// Headers went on before the decision (priced by the body): only the body's
    /// release counts as forwarding.
    body_priced: bool,
    logged: bool,
    /// The gate had answered the request itself before the last callback.
    replied_before: bool,
    /// The upstream served it (a status the gate charges for).
    served: bool,
    /// A paid MCP call answered with a JSON-RPC error, or a usage response: the gate
    /// gives money back or adjusts it even though it forwarded.
    adjusts: bool,
    /// Request ids this stream's calls named.
    ids: HashSet<String>,
    seen_calls: usize,
    seen_refused: usize,
}

/// A call in flight: whose, its token, what it asks.
struct InFlight {
    owner: Option<usize>,
    token: u32,
    path: String,
    body: Value,
}

#[derive(Default)]
struct Ledger {
    /// Authorize calls: request id -> cost asked.
    asked: HashMap<String, u64>,
    /// What the service charged: request id -> cost.
    charged: HashMap<String, u64>,
    /// The one refund each request may have (its body); a second, different one is a bug.
    refund_of: HashMap<String, Value>,
    refunded: HashSet<String>,
    /// Refund attempts that failed and are retried (refused by the host, no answer, or a
    /// status the contract calls retryable).
    refund_failures: HashMap<String, u32>,
    /// Refunds the service refused for good (a final `4xx`, docs/balance-service.md 3.3):
    /// the filter stops there, and counts and logs it.
    refund_rejected: HashSet<String>,
    /// What `farebox_refund_failures` must read, summed over every context: one per
    /// refund or lease refund attempt that was refused by the host or not answered `2xx`,
    /// except a refund answered `404` (nothing charged, nothing lost).
    refund_failure_count: u64,
    /// Leases granted: id -> units.
    granted: HashMap<String, u64>,
    next_lease: u32,
}

struct World {
    cfg: Rc<Config>,
    worker: Rc<Worker>,
    root: FuzzHost,
    faults: Rc<Faults>,
    streams: Vec<Stream>,
    in_flight: Vec<InFlight>,
    root_seen_calls: usize,
    root_seen_refused: usize,
    ledger: Ledger,
    request_seq: u32,
}

fn fuzz_host(
    shared_with: &FakeHost,
    faults: &Rc<Faults>,
    headers: &[(&str, &str)],
    method: &str,
    path: &str,
) -> FuzzHost {
    FuzzHost {
        inner: shared_with.sibling(method, path, headers),
        faults: faults.clone(),
        refused: Default::default(),
    }
}

impl World {
    fn new(cfg: Config) -> World {
        let faults = Rc::new(Faults::default());
        let base = FakeHost::request("GET", "/", &[]);
        let root = FuzzHost {
            inner: base,
            faults: faults.clone(),
            refused: Default::default(),
        };
        World {
            cfg: Rc::new(cfg),
            worker: Rc::new(Worker::default()),
            root,
            faults,
            streams: Vec::new(),
            in_flight: Vec::new(),
            root_seen_calls: 0,
            root_seen_refused: 0,
            ledger: Ledger::default(),
            request_seq: 0,
        }
    }

    fn stream(&mut self, i: u8) -> Option<usize> {
        if self.streams.is_empty() {
            return None;
        }
        Some(usize::from(i) % self.streams.len())
    }

    fn now(&self) -> u64 {
        self.root.inner.now.get()
    }

    fn advance(&mut self, ms: u64) {
        let now = self.now() + ms;
        self.root.inner.now.set(now);
        for s in &self.streams {
            s.host.inner.now.set(now);
        }
    }

    fn flow(&mut self, i: usize, flow: Flow, releases: bool) {
        let s = &mut self.streams[i];
        // After a local reply Envoy forwards nothing, whatever the filter returns.
        if flow == Flow::Continue && releases && !s.logged && !s.replied_before {
            s.forwarded = true;
        }
        s.replied_before = s.host.inner.reply().is_some();
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Start {
                path,
                key,
                post,
                request_id,
                end_of_stream,
            } => {
                if self.streams.len() >= MAX_STREAMS {
                    return;
                }
                self.request_seq += 1;
                let path = PATHS[usize::from(path) % PATHS.len()];
                let id = format!("req-{}", self.request_seq);
                let mut headers = Vec::new();
                if let Some(k) = KEYS[usize::from(key) % KEYS.len()] {
                    headers.push(("x-api-key", k));
                }
                if request_id {
                    headers.push(("x-request-id", id.as_str()));
                }
                let method = if post { "POST" } else { "GET" };
                let host = fuzz_host(&self.root.inner, &self.faults, &headers, method, path);
                host.inner.now.set(self.now());
                let body_priced = post && (path == "/mcp" || path.starts_with("/v1/chat/"));
                let mut gate = Gate::new(Some(self.cfg.clone()), self.worker.clone());
                let flow = gate.on_request_headers_eos(&host, end_of_stream);
                self.streams.push(Stream {
                    host,
                    gate,
                    forwarded: false,
                    body_priced: body_priced && !end_of_stream,
                    logged: false,
                    replied_before: false,
                    served: false,
                    adjusts: false,
                    ids: HashSet::new(),
                    seen_calls: 0,
                    seen_refused: 0,
                });
                let i = self.streams.len() - 1;
                let releases = !self.streams[i].body_priced;
                self.flow(i, flow, releases);
            }
            Op::Body {
                stream,
                ref body,
                end_of_stream,
            } => {
                let Some(i) = self.stream(stream) else { return };
                let bytes = match body {
                    RequestBody::ToolCall => {
                        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                        "params": {"name": "search", "arguments": {}}})
                        .to_string()
                        .into_bytes()
                    }
                    RequestBody::Initialize => {
                        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize"})
                            .to_string()
                            .into_bytes()
                    }
                    RequestBody::Chat => json!({"model": "m", "messages": []})
                        .to_string()
                        .into_bytes(),
                    RequestBody::Raw(b) => b.clone(),
                };
                let s = &mut self.streams[i];
                if s.logged {
                    return;
                }
                s.host
                    .inner
                    .request_body
                    .borrow_mut()
                    .extend_from_slice(&bytes);
                let size = s.host.inner.request_body.borrow().len();
                let flow = s.gate.on_request_body(&s.host, size, end_of_stream);
                // Envoy forwards a body chunk the filter lets continue.
                self.flow(i, flow, true);
            }
            Op::Trailers { stream } => {
                let Some(i) = self.stream(stream) else { return };
                let s = &mut self.streams[i];
                if s.logged {
                    return;
                }
                let flow = s.gate.on_request_trailers(&s.host);
                self.flow(i, flow, true);
            }
            Op::Answer { call, ref answer } => {
                if self.in_flight.is_empty() {
                    return;
                }
                let c = self
                    .in_flight
                    .remove(usize::from(call) % self.in_flight.len());
                let resp = self.service(&c, answer);
                match c.owner {
                    None => self
                        .worker
                        .on_outbox_response(&self.root, &self.cfg, c.token, &resp),
                    Some(i) => {
                        let s = &mut self.streams[i];
                        // Envoy cancels a stream's calls when it ends: no answer comes.
                        if s.logged {
                            return;
                        }
                        let flow = s.gate.on_callout_response(&s.host, c.token, &resp);
                        if flow == Flow::Continue {
                            s.host.resume_request();
                        }
                        self.flow(i, flow, true);
                    }
                }
            }
            Op::Wake { stream } => {
                let Some(i) = self.stream(stream) else { return };
                let s = &mut self.streams[i];
                if s.logged {
                    return;
                }
                let flow = s.gate.on_wake(&s.host);
                self.flow(i, flow, true);
            }
            Op::ResponseHeaders {
                stream,
                status,
                json,
            } => {
                let Some(i) = self.stream(stream) else { return };
                let cfg = self.cfg.clone();
                let s = &mut self.streams[i];
                if s.logged || !s.host.inner.response_headers.borrow().is_empty() {
                    return;
                }
                // A local reply goes through the response callbacks too.
                let status = match s.host.inner.reply() {
                    Some(r) => u16::try_from(r.status).unwrap_or(500),
                    None => 100 + status % 500,
                };
                s.host.inner.set_status(status);
                if json {
                    s.host
                        .inner
                        .response_headers
                        .borrow_mut()
                        .push(("content-type".into(), b"application/json".to_vec()));
                }
                s.served = s.forwarded && !cfg.no_charge_statuses.contains(status);
                s.gate.on_response_headers(&s.host);
            }
            Op::ResponseBody {
                stream,
                ref body,
                end_of_stream,
            } => {
                let Some(i) = self.stream(stream) else { return };
                let s = &mut self.streams[i];
                if s.logged {
                    return;
                }
                let bytes = match body {
                    ResponseBody::Usage(n) => json!({"usage": {"total_tokens": n}})
                        .to_string()
                        .into_bytes(),
                    ResponseBody::McpError => json!({"jsonrpc": "2.0", "id": 1,
                        "error": {"code": -32000, "message": "no"}})
                    .to_string()
                    .into_bytes(),
                    ResponseBody::Raw(b) => b.clone(),
                };
                if matches!(body, ResponseBody::McpError) {
                    s.adjusts = true;
                }
                let size = bytes.len();
                *s.host.inner.response_chunk.borrow_mut() = bytes;
                s.gate.on_response_body(&s.host, size, end_of_stream);
            }
            Op::Log { stream } => {
                let Some(i) = self.stream(stream) else { return };
                self.log(i);
            }
            Op::Tick => self.worker.tick(&self.root, &self.cfg),
            Op::Advance { ms } => self.advance(u64::from(ms)),
            Op::Fault { fault, on } => {
                let mut f = self.faults.0.borrow_mut();
                if on {
                    f.insert(fault);
                } else {
                    f.remove(&fault);
                }
            }
        }
        self.collect_calls();
    }

    fn log(&mut self, i: usize) {
        let s = &mut self.streams[i];
        if s.logged {
            return;
        }
        s.gate.on_log(&s.host);
        s.logged = true;
        // Its calls die with it: the service may have done their work or not.
        self.in_flight.retain(|c| c.owner != Some(i));
    }

    /// Picks up the calls every context made since the last step.
    fn collect_calls(&mut self) {
        let mut new: Vec<(Option<usize>, u32, String, Value)> = Vec::new();
        let mut refused: Vec<(String, Value)> = Vec::new();
        {
            let calls = self.root.inner.calls.borrow();
            for c in calls.iter().skip(self.root_seen_calls) {
                new.push((
                    None,
                    c.token,
                    c.header(":path").unwrap_or("").to_string(),
                    c.body.clone(),
                ));
            }
            self.root_seen_calls = calls.len();
            let r = self.root.refused.borrow();
            refused.extend(r.iter().skip(self.root_seen_refused).cloned());
            self.root_seen_refused = r.len();
        }
        for (i, s) in self.streams.iter_mut().enumerate() {
            let calls = s.host.inner.calls.borrow();
            for c in calls.iter().skip(s.seen_calls) {
                new.push((
                    Some(i),
                    c.token,
                    c.header(":path").unwrap_or("").to_string(),
                    c.body.clone(),
                ));
            }
            s.seen_calls = calls.len();
            let r = s.host.refused.borrow();
            refused.extend(r.iter().skip(s.seen_refused).cloned());
            s.seen_refused = r.len();
        }
        for (path, body) in refused {
            self.check_call(None, &path, &body);
            if path == self.cfg.refund_path {
                let id = text(&body, "request_id");
                *self.ledger.refund_failures.entry(id).or_default() += 1;
            }
            if path == self.cfg.refund_path || self.is_lease_refund(&path) {
                self.ledger.refund_failure_count += 1;
            }
        }
        for (owner, token, path, body) in new {
            self.check_call(owner, &path, &body);
            self.in_flight.push(InFlight {
                owner,
                token,
                path,
                body,
            });
        }
    }

    /// A call's own checks (when it is made): what a refund or a settle may ask.
    fn check_call(&mut self, owner: Option<usize>, path: &str, body: &Value) {
        let id = text(body, "request_id");
        if path == self.cfg.authorize_path {
            let cost = body.get("cost").and_then(Value::as_u64).unwrap_or(0);
            if let Some(i) = owner {
                self.streams[i].ids.insert(id.clone());
            }
            if let Some(prev) = self.ledger.asked.insert(id.clone(), cost) {
                assert_eq!(
                    prev, cost,
                    "request {id} asked to be charged twice, differently"
                );
            }
        } else if path == self.cfg.refund_path {
            let Some(asked) = self.ledger.asked.get(&id) else {
                panic!("refund of request {id}, which no authorize call named: {body}");
            };
            assert_eq!(
                body.get("cost").and_then(Value::as_u64),
                Some(*asked),
                "refund {body} of a charge of {asked}"
            );
            match self.ledger.refund_of.get(&id) {
                Some(first) => assert_eq!(first, body, "request {id} refunded twice, differently"),
                None => {
                    self.ledger.refund_of.insert(id, body.clone());
                }
            }
        } else if path.ends_with("/settle") {
            let lease_id = path
                .trim_end_matches("/settle")
                .rsplit('/')
                .next()
                .unwrap_or("");
            let used = body.get("used").and_then(Value::as_u64).unwrap_or(0);
            if let Some(granted) = self.ledger.granted.get(lease_id) {
                assert!(
                    used <= *granted,
                    "lease {lease_id}: settle of {used} units, {granted} granted"
                );
            }
        }
    }

    /// The balance service's answer to `c`, and what it did in its ledger.
    fn service(&mut self, c: &InFlight, answer: &Answer) -> CalloutResponse {
        let id = text(&c.body, "request_id");
        let is_authorize = c.path == self.cfg.authorize_path;
        let is_refund = c.path == self.cfg.refund_path;
        let is_lease = c.path == self.cfg.lease.path;
        let done = |status: u16, body: Value| CalloutResponse {
            status: Some(status),
            headers: Vec::new(),
            body: body.to_string().into_bytes(),
            body_too_large: false,
        };
        let mut resp = match answer {
            Answer::Ok { balance, max_age } => {
                let mut resp = if is_lease {
                    let lease_id = self.grant(5);
                    done(
                        200,
                        json!({"lease_id": lease_id, "granted": 5, "expires_in_ms": 30_000,
                        "account_id": "acct", "balance": balance}),
                    )
                } else {
                    done(
                        200,
                        json!({"allow": true, "account_id": "acct", "balance": balance}),
                    )
                };
                if let Some(s) = max_age {
                    resp.headers
                        .push(("cache-control".into(), format!("max-age={s}").into_bytes()));
                }
                resp
            }
            Answer::Deny {
                recall,
                retry_after_ms,
            } => done(
                402,
                json!({"balance": 0, "price": 3, "recall": recall,
                "retry_after_ms": retry_after_ms}),
            ),
            Answer::Grant {
                granted,
                expires_in_ms,
            } => {
                let units = u64::from(*granted);
                let lease_id = self.grant(units);
                done(
                    200,
                    json!({"lease_id": lease_id, "granted": units,
                    "expires_in_ms": expires_in_ms, "account_id": "acct"}),
                )
            }
            Answer::Status(s) => done(*s, Value::Null),
            Answer::Lost { .. } => CalloutResponse::default(),
            Answer::TooLarge => CalloutResponse {
                status: Some(200),
                body_too_large: true,
                ..CalloutResponse::default()
            },
            Answer::Json { status, body } => CalloutResponse {
                status: Some(*status),
                headers: Vec::new(),
                body: body.to_value(0).to_string().into_bytes(),
                body_too_large: false,
            },
            Answer::Garbage(b) => CalloutResponse {
                status: Some(200),
                headers: Vec::new(),
                body: b.clone(),
                body_too_large: false,
            },
        };
        // A service keeping the contract never answers 404 ("nothing charged") to a refund
        // of a charge it made (docs/balance-service.md 3.3); it refuses it instead.
        if is_refund && resp.status == Some(404) && self.ledger.charged.contains_key(&id) {
            resp.status = Some(409);
        }
        // What the service did: it charges on an allow (or when it did the work but the
        // answer was lost), refunds on a 2xx.
        let processed = matches!(answer, Answer::Lost { processed: true });
        if is_authorize {
            let allowed = resp.status == Some(200)
                && !resp.body_too_large
                && serde_json::from_slice::<Value>(&resp.body)
                    .ok()
                    .and_then(|v| v.get("allow").cloned())
                    == Some(Value::Bool(true));
            if allowed || processed {
                let cost = self.ledger.asked.get(&id).copied().unwrap_or(0);
                self.ledger.charged.insert(id, cost);
            }
        } else if is_refund {
            let reading = refund_reading(resp.status, false);
            if reading != RefundReading::Done && reading != RefundReading::NothingCharged {
                self.ledger.refund_failure_count += 1;
            }
            if processed || reading == RefundReading::Done {
                self.ledger.refunded.insert(id);
            } else if reading == RefundReading::Final {
                self.ledger.refund_rejected.insert(id);
            } else if reading == RefundReading::Retry {
                *self.ledger.refund_failures.entry(id).or_default() += 1;
            }
        } else if self.is_lease_refund(&c.path)
            && refund_reading(resp.status, true) != RefundReading::Done
        {
            self.ledger.refund_failure_count += 1;
        }
        resp
    }

    /// `POST {lease path}/{lease_id}/refund` (docs/balance-service.md 4.6).
    fn is_lease_refund(&self, path: &str) -> bool {
        path.strip_prefix(self.cfg.lease.path.as_str())
            .is_some_and(|rest| rest.starts_with('/') && rest.ends_with("/refund"))
    }

    fn grant(&mut self, units: u64) -> String {
        self.ledger.next_lease += 1;
        let id = format!("ls_{}", self.ledger.next_lease);
        self.ledger.granted.insert(id.clone(), units);
        id
    }

    /// The checks that hold after every step.
    fn check(&self) {
        // Every refund attempt that did not succeed is counted, when it fails.
        let counted = self.root.inner.count_of(Metric::RefundFailures)
            + self
                .streams
                .iter()
                .map(|s| s.host.inner.count_of(Metric::RefundFailures))
                .sum::<u64>();
        assert_eq!(
            counted, self.ledger.refund_failure_count,
            "farebox_refund_failures reads {counted}; refund attempts that failed: {}",
            self.ledger.refund_failure_count
        );
        for (i, s) in self.streams.iter().enumerate() {
            let m = |metric| s.host.inner.count_of(metric);
            if s.forwarded {
                assert!(
                    m(Metric::Allowed) + m(Metric::FailOpen) + m(Metric::Free) > 0,
                    "stream {i} forwarded without an allow or a counted fail-open"
                );
                if let Some(r) = s.host.inner.reply() {
                    panic!("stream {i} forwarded and answered {} by the gate", r.status);
                }
            }
        }
        for (key, (value, _)) in self.root.inner.shared.borrow().iter() {
            let Some(rec) = LeaseRecord::decode(value) else {
                continue;
            };
            assert!(
                rec.used <= rec.granted,
                "{key}: lease {} spent {} of {} units",
                rec.lease_id,
                rec.used,
                rec.granted
            );
            if let Some(g) = self.ledger.granted.get(&rec.lease_id) {
                assert_eq!(
                    rec.granted, *g,
                    "lease {}: granted {g}, recorded {}",
                    rec.lease_id, rec.granted
                );
            }
        }
    }

    /// Ends every stream, stops the host errors and lets the outbox drain with the service
    /// answering; then every charge of a request never forwarded has been refunded.
    fn finish(&mut self) {
        for i in 0..self.streams.len() {
            self.log(i);
        }
        self.faults.0.borrow_mut().clear();
        self.collect_calls();
        for _ in 0..16 {
            self.advance(70_000);
            self.worker.tick(&self.root, &self.cfg);
            self.collect_calls();
            while let Some(c) = self.in_flight.pop() {
                let resp = self.service(&c, &Answer::Status(200));
                if c.owner.is_none() {
                    self.worker
                        .on_outbox_response(&self.root, &self.cfg, c.token, &resp);
                }
                self.collect_calls();
            }
            self.check();
            if self.worker.outbox.borrow().is_empty() {
                break;
            }
        }
        for s in &self.streams {
            for id in &s.ids {
                let Some(cost) = self.ledger.charged.get(id) else {
                    continue;
                };
                let refunded = self.ledger.refunded.contains(id);
                // Refused for good by the service, or every attempt failed: counted in
                // `farebox_refund_failures` (checked above) and logged by the filter.
                let rejected = self.ledger.refund_rejected.contains(id);
                let gave_up =
                    self.ledger.refund_failures.get(id).copied().unwrap_or(0) >= MAX_ATTEMPTS;
                if !s.forwarded {
                    assert!(
                        refunded || rejected || gave_up,
                        "request {id} charged {cost}, never forwarded, not refunded"
                    );
                }
                if refunded && s.served && !s.adjusts {
                    panic!("request {id} served and charged {cost}, yet refunded");
                }
            }
        }
    }
}

/// How the contract says the filter reads an answer to a refund (docs/balance-service.md
/// 3.3) or to a lease refund (4.6), written out from the contract, not from the code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RefundReading {
    Done,
    /// `404` to a refund: nothing was charged (an undo asks again first); not a failure.
    NothingCharged,
    /// A `4xx` other than 408 and 429 (and, for a lease refund, 404 too): never retried.
    Final,
    /// No answer, `408`, `429`, `5xx` or any other status: tried again.
    Retry,
}

fn refund_reading(status: Option<u16>, lease: bool) -> RefundReading {
    match status {
        Some(200..=299) => RefundReading::Done,
        Some(404) if !lease => RefundReading::NothingCharged,
        Some(408 | 429) => RefundReading::Retry,
        Some(400..=499) => RefundReading::Final,
        _ => RefundReading::Retry,
    }
}

fn text(v: &Value, field: &str) -> String {
    v.get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Runs one sequence and checks the invariants after every step and at the end; panics
/// (with what broke) when one fails.
pub fn run(input: &Input) {
    let raw = CONFIGS[usize::from(input.config) % CONFIGS.len()];
    let Ok(cfg) = Config::parse(raw.as_bytes()) else {
        panic!("fuzz config {raw} refused");
    };
    let mut world = World::new(cfg);
    for op in input.ops.iter().take(256) {
        world.step(op);
        world.check();
    }
    world.finish();
}
