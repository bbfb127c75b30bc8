//! The hostcall budget: how many calls into Envoy each common path makes, pinned, so a
//! change that adds one fails here (deterministically, unlike a benchmark). Every call
//! that returns data is a V8 crossing plus an allocation callback into the module; the
//! access-log record is one property (written again only when a field changes: the
//! authorize path writes it when priced and when decided). The requests are the bench's
//! (bench/run.py `plugin_config`, bench/instructions.py): run the way the glue runs them.
//! Not counted: metrics (the glue adds them up and flushes them on the timer) and, on
//! the authorize path, the glue's two reads of the call's answer (headers and body).

use serde_json::json;

use super::*;
use crate::balance_api::CalloutResponse;
use crate::fake::{FakeHost, HostCall, HostCall::*};
use crate::header_snapshot::Snapshot;

/// bench/run.py's plugin config (authorize mode) and bench/instructions.py's lease one.
const BENCH: &str = r#"{"cluster": "balance", "credential": {"source": "header", "name": "x-api-key"},
    "failure_mode": "closed", "timeout_ms": 10000, "default_cost": 1, "cache_max_ttl_s": 3600,
    "routes": [{"name": "free", "prefix": "/free/", "cost": 0}]}"#;
const BENCH_LEASE: &str = r#"{"cluster": "balance", "credential": {"source": "header", "name": "x-api-key"},
    "failure_mode": "closed", "timeout_ms": 10000, "default_cost": 1, "cache_max_ttl_s": 3600,
    "routes": [{"name": "free", "prefix": "/free/", "cost": 0}],
    "mode": "lease", "lease_want": 1000000000, "settle_interval_ms": 600000}"#;

struct Bench {
    cfg: Rc<Config>,
    worker: Rc<Worker>,
    /// Where the shared data lives (another worker's requests would see the same).
    origin: FakeHost,
}

impl Bench {
    fn new(config: &str) -> Bench {
        let cfg = match Config::parse(config.as_bytes()) {
            Ok(cfg) => cfg,
            Err(e) => panic!("the bench config must parse: {e}"),
        };
        let worker = Rc::new(Worker::default());
        *worker.holder.borrow_mut() = "envoy-bench".into();
        Bench {
            cfg: Rc::new(cfg),
            worker,
            origin: FakeHost::request("GET", "/", &[]),
        }
    }

    /// A request as Envoy hands it to the filter in the bench (Python's http.client
    /// through Envoy's connection manager).
    fn request(&self, path: &str, key: &str) -> FakeHost {
        self.origin.sibling(
            "GET",
            path,
            &[
                (":authority", "127.0.0.1"),
                (":scheme", "http"),
                ("accept-encoding", "identity"),
                ("x-api-key", key),
                ("x-forwarded-proto", "http"),
                ("x-request-id", "0b5a3c7e-6d1f-4a8e-9c2b-3f4e5d6a7b8c"),
            ],
        )
    }

    /// One whole request the way the glue runs it; `answer` answers the call it makes.
    /// Returns the host calls it made, by kind.
    fn run(&self, host: &FakeHost, answer: Option<&CalloutResponse>) -> Vec<(HostCall, u32)> {
        let mut gate = Gate::new(Some(self.cfg.clone()), self.worker.clone());
        // As the glue does: the headers callback reads the headers through a snapshot.
        let mut flow = gate.on_request_headers_eos(&Snapshot::new(host), true);
        gate.publish_access_log(host);
        if let (Flow::Pause(Some(token)), Some(answer)) = (flow, answer) {
            flow = gate.on_callout_response(host, token, answer);
            gate.publish_access_log(host);
            if flow == Flow::Continue {
                host.resume_request();
            }
        }
        if flow == Flow::Continue {
            host.set_status(200);
            gate.on_response_headers(host);
            gate.publish_access_log(host);
            gate.on_response_body(host, 0, true);
            gate.publish_access_log(host);
        }
        gate.on_log(host);
        gate.publish_access_log(host);
        host.host_call_counts()
    }
}

fn allow_for(max_age: u32) -> CalloutResponse {
    let cache_control = format!("max-age={max_age}");
    CalloutResponse {
        status: Some(200),
        headers: vec![("cache-control".into(), cache_control.into_bytes())],
        body: json!({"allow": true, "account_id": "bench_allow", "balance": 1_000_000})
            .to_string()
            .into_bytes(),
        body_too_large: false,
    }
}

fn deny_for(max_age: u32) -> CalloutResponse {
    CalloutResponse {
        status: Some(402),
        headers: vec![(
            "cache-control".into(),
            format!("max-age={max_age}").into_bytes(),
        )],
        body: json!({"allow": false, "account_id": "bench_broke", "balance": 0, "price": 1})
            .to_string()
            .into_bytes(),
        body_too_large: false,
    }
}

fn grant() -> CalloutResponse {
    CalloutResponse {
        status: Some(200),
        headers: Vec::new(),
        body:
            json!({"lease_id": "ls_bench", "granted": 1_000_000_000u64, "expires_in_ms": 3_600_000,
                     "account_id": "bench_lease", "balance": 1_000_000_000u64})
            .to_string()
            .into_bytes(),
        body_too_large: false,
    }
}

#[test]
fn free_route() {
    let b = Bench::new(BENCH);
    let host = b.request("/free/bench", "bench-allow");
    assert_eq!(b.run(&host, None), [(RequestHeaders, 1), (SetProperty, 1)]);
    assert_eq!(host.properties.borrow()["farebox.decision"], "free");
}

#[test]
fn cached_allow() {
    let b = Bench::new(BENCH);
    let first = b.request("/v1/bench", "bench-allow");
    b.run(&first, Some(&allow_for(3600)));
    // The next request reads the shared cache and copies the entry to the worker's own.
    let second = b.request("/v1/bench", "bench-allow");
    assert!(b.run(&second, None).contains(&(SharedGet, 1)));
    let host = b.request("/v1/bench", "bench-allow");
    assert_eq!(
        b.run(&host, None),
        [
            (Clock, 1),
            (RequestHeaders, 1),
            (SetRequestHeader, 1),
            (SetProperty, 1)
        ]
    );
    assert_eq!(host.properties.borrow()["farebox.decision"], "cached");
    assert_eq!(
        host.upstream_header("x-farebox-account").as_deref(),
        Some("bench_allow")
    );
}

#[test]
fn cached_deny() {
    let b = Bench::new(BENCH);
    let first = b.request("/v1/bench", "bench-broke");
    b.run(&first, Some(&deny_for(3600)));
    let second = b.request("/v1/bench", "bench-broke");
    assert!(b.run(&second, None).contains(&(SharedGet, 1)));
    let host = b.request("/v1/bench", "bench-broke");
    assert_eq!(
        b.run(&host, None),
        [
            (Clock, 1),
            (RequestHeaders, 1),
            (SendReply, 1),
            (SetProperty, 1)
        ]
    );
    assert_eq!(host.reply().map(|r| r.status), Some(402));
}

#[test]
fn lease_spend() {
    let b = Bench::new(BENCH_LEASE);
    let first = b.request("/v1/bench", "bench-lease");
    b.run(&first, Some(&grant()));
    let host = b.request("/v1/bench", "bench-lease");
    assert_eq!(
        b.run(&host, None),
        [
            (SharedGet, 1),
            (SharedSet, 1),
            (Clock, 1),
            (RequestHeaders, 1),
            (SetRequestHeader, 1),
            (ResponseHeader, 1),
            (SetProperty, 1)
        ]
    );
    assert!(
        host.calls.borrow().is_empty(),
        "spent from the lease, no call"
    );
    assert_eq!(host.properties.borrow()["farebox.lease"], "ls_bench");
}

#[test]
fn authorize() {
    let b = Bench::new(BENCH);
    let host = b.request("/v1/bench", "bench-authorize");
    let answer = CalloutResponse {
        headers: Vec::new(),
        ..allow_for(0)
    };
    assert_eq!(
        b.run(&host, Some(&answer)),
        [
            (SharedGet, 1),
            (Dispatch, 1),
            (RequestHeaders, 1),
            (SetRequestHeader, 1),
            (ResponseHeader, 1),
            (Resume, 1),
            (SetProperty, 2)
        ]
    );
    assert_eq!(host.properties.borrow()["farebox.decision"], "allow");
}
