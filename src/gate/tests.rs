use std::rc::Rc;

use serde_json::{json, Value};

use super::*;
use crate::balance_api::CalloutResponse;
use crate::fake::FakeHost;
use crate::host::Host;
use crate::metrics::Metric;
use crate::outbox::{Job, MAX_ATTEMPTS};

const CONFIG: &str = r#"{
    "cluster": "balance", "authority": "billing", "timeout_ms": 300, "service_token": "svc-tok",
    "routes": [{"name": "health", "exact": "/health", "cost": 0},
               {"name": "infer", "methods": ["POST"], "glob": "/v1/models/*/infer", "cost": 5}],
    "balance_header": "x-farebox-balance"
}"#;

struct Fixture {
    cfg: Rc<Config>,
    worker: Rc<Worker>,
}

impl Fixture {
    fn new(config: &str) -> Fixture {
        Fixture {
            cfg: Rc::new(Config::parse(config.as_bytes()).unwrap()),
            worker: Rc::new(Worker::default()),
        }
    }
    fn gate(&self) -> Gate {
        Gate::new(Some(self.cfg.clone()), self.worker.clone())
    }
    fn queued_refunds(&self) -> usize {
        self.worker.outbox.borrow().len()
    }
}

fn answer(status: u16, headers: &[(&str, &str)], body: Value) -> CalloutResponse {
    CalloutResponse {
        status: Some(status),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: if body.is_null() {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        },
        body_too_large: false,
    }
}

/// An answer with only a status (`None`: the call never completed).
fn status_only(status: Option<u16>) -> CalloutResponse {
    CalloutResponse {
        status,
        ..CalloutResponse::default()
    }
}

fn allow(account: &str, balance: i64) -> CalloutResponse {
    answer(
        200,
        &[],
        json!({"allow": true, "account_id": account, "balance": balance}),
    )
}

fn reply_body(host: &FakeHost) -> Value {
    serde_json::from_slice(&host.reply().expect("a reply").body).unwrap()
}

fn reply_header(host: &FakeHost, name: &str) -> Option<String> {
    host.reply()?
        .headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.clone())
}

/// Runs a request whose callout gets `resp`; returns the host and gate for more checks.
/// Delivers a callout answer as the glue does: resume when the gate says so.
fn respond(gate: &mut Gate, host: &FakeHost, token: u32, resp: &CalloutResponse) {
    if gate.on_callout_response(host, token, resp) == Flow::Continue {
        host.resume_request();
    }
}

fn with_answer(fx: &Fixture, host: FakeHost, resp: CalloutResponse) -> (FakeHost, Gate) {
    let mut gate = fx.gate();
    assert_eq!(
        gate.on_request_headers(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    let token = host.last_call().token;
    respond(&mut gate, &host, token, &resp);
    (host, gate)
}

fn keyed(path: &str, key: &str) -> FakeHost {
    FakeHost::request(
        "GET",
        path,
        &[("x-api-key", key), ("x-request-id", "req-1")],
    )
}

#[test]
fn free_route_skips_everything_and_strips_forged_account() {
    let fx = Fixture::new(CONFIG);
    let host = FakeHost::request(
        "GET",
        "/health?probe=1",
        &[("x-farebox-account", "acct_forged")],
    );
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&host), Flow::Continue);
    assert!(host.calls.borrow().is_empty());
    assert!(host.reply().is_none());
    assert_eq!(host.upstream_header("x-farebox-account"), None);
    assert_eq!(host.count_of(Metric::Free), 1);
}

#[test]
fn missing_or_malformed_credential_is_401_without_a_call() {
    let fx = Fixture::new(CONFIG);
    for headers in [
        vec![],
        vec![("x-api-key", "  ")],
        vec![("x-api-key", "a b")],
    ] {
        let host = FakeHost::request("GET", "/v1/data", &headers);
        assert_eq!(fx.gate().on_request_headers(&host), Flow::Pause(None));
        let reply = host.reply().unwrap();
        assert_eq!(reply.status, 401);
        assert!(reply_header(&host, "www-authenticate")
            .unwrap()
            .contains("x-api-key"));
        assert_eq!(reply_body(&host)["status"], 401);
        assert!(host.calls.borrow().is_empty());
    }
    let host = FakeHost::request("GET", "/v1/data", &[]);
    host.add_request_header("x-api-key", b"\xff\xfe");
    assert_eq!(fx.gate().on_request_headers(&host), Flow::Pause(None));
    assert_eq!(host.reply().unwrap().status, 401);
}

#[test]
fn allowed_request_carries_the_account_and_the_contract_call() {
    let fx = Fixture::new(CONFIG);
    let host = FakeHost::request(
        "POST",
        "/v1/models/m1/infer?x=1",
        &[
            ("x-api-key", "key-1"),
            ("x-request-id", "req-42"),
            ("x-farebox-account", "forged"),
        ],
    );
    let mut gate = fx.gate();
    // Nothing goes upstream while the decision is pending; the allow replaces the forged
    // copy (checked below).
    assert_eq!(
        gate.on_request_headers(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    assert_eq!(
        gate.on_request_body(&host, 0, false),
        Flow::Pause(None),
        "the body must wait for the decision"
    );
    let call = host.last_call();
    assert_eq!(call.cluster, "balance");
    assert_eq!(call.timeout, std::time::Duration::from_millis(300));
    assert_eq!(call.header(":method"), Some("POST"));
    assert_eq!(call.header(":path"), Some("/v1/authorize"));
    assert_eq!(call.header(":authority"), Some("billing"));
    assert_eq!(call.header("x-request-id"), Some("req-42"));
    assert_eq!(call.header("authorization"), Some("Bearer svc-tok"));
    assert_eq!(
        call.body,
        json!({"account": "key-1", "cost": 5, "route": "infer", "method": "POST", "path": "/v1/models/m1/infer", "request_id": "req-42"})
    );
    respond(&mut gate, &host, call.token, &allow("acct_1", 95));
    assert_eq!(host.resumed.get(), 1);
    assert!(host.reply().is_none());
    assert_eq!(
        host.upstream_header("x-farebox-account").as_deref(),
        Some("acct_1")
    );
    assert_eq!(gate.on_request_body(&host, 0, false), Flow::Continue);
    host.set_status(200);
    gate.on_response_headers(&host);
    assert_eq!(
        host.client_header("x-farebox-balance").as_deref(),
        Some("95")
    );
    assert_eq!(fx.queued_refunds(), 0);
    assert_eq!(host.count_of(Metric::Allowed), 1);
    assert_eq!(host.count_of(Metric::Callouts), 1);
}

#[test]
fn payment_required_with_cache_hint_then_served_from_cache() {
    let fx = Fixture::new(CONFIG);
    let deny = answer(
        402,
        &[("cache-control", "max-age=30"), ("retry-after", "60")],
        json!({"allow": false, "balance": 2, "price": 5, "detail": "top up"}),
    );
    let (host, _) = with_answer(&fx, keyed("/v1/data", "poor-key"), deny);
    let reply = host.reply().unwrap();
    assert_eq!(reply.status, 402);
    assert_eq!(
        reply_header(&host, "cache-control").as_deref(),
        Some("private, max-age=30")
    );
    assert_eq!(reply_header(&host, "retry-after").as_deref(), Some("60"));
    assert_eq!(
        reply_header(&host, "content-type").as_deref(),
        Some("application/problem+json")
    );
    let body = reply_body(&host);
    assert_eq!(
        (
            body["balance"].clone(),
            body["price"].clone(),
            body["route"].clone()
        ),
        (json!(2), json!(5), json!("default"))
    );
    assert_eq!(host.resumed.get(), 0);
    assert!(!String::from_utf8_lossy(&reply.body).contains("poor-key"));

    // Another worker of the same process, 10 s later: no callout, the remaining life.
    let again = host.sibling("GET", "/v1/data", &[("x-api-key", "poor-key")]);
    again.advance(10_000);
    assert_eq!(fx.gate().on_request_headers(&again), Flow::Pause(None));
    assert!(again.calls.borrow().is_empty());
    assert_eq!(again.reply().unwrap().status, 402);
    assert_eq!(
        reply_header(&again, "cache-control").as_deref(),
        Some("private, max-age=20")
    );
    assert_eq!(again.count_of(Metric::CacheHits), 1);

    // After expiry the service is asked again and the stale entry is cleared.
    let later = host.sibling("GET", "/v1/data", &[("x-api-key", "poor-key")]);
    later.advance(30_001);
    assert_eq!(
        fx.gate().on_request_headers(&later),
        Flow::Pause(Some(later.last_call().token))
    );
    assert_eq!(later.calls.borrow().len(), 1);
    assert!(later.shared.borrow().values().all(|(v, _)| v.is_empty()));
}

#[test]
fn a_cached_decision_is_never_served_to_another_account() {
    // One slot: every key collides, so only the digest check keeps accounts apart.
    let fx = Fixture::new(r#"{"cluster": "balance", "cache_max_entries": 1}"#);
    let (alice, _) = with_answer(
        &fx,
        keyed("/x", "alice"),
        answer(
            200,
            &[("cache-control", "max-age=60")],
            json!({"allow": true, "account_id": "acct_alice"}),
        ),
    );
    assert_eq!(
        alice.upstream_header("x-farebox-account").as_deref(),
        Some("acct_alice")
    );
    let mallory = alice.sibling("GET", "/x", &[("x-api-key", "mallory")]);
    assert_eq!(
        fx.gate().on_request_headers(&mallory),
        Flow::Pause(Some(mallory.last_call().token))
    );
    assert_eq!(
        mallory.calls.borrow().len(),
        1,
        "mallory must be asked about, not served alice's allow"
    );
    assert_eq!(mallory.upstream_header("x-farebox-account"), None);
    // Alice herself hits the cache.
    let alice2 = alice.sibling("GET", "/x", &[("x-api-key", "alice")]);
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&alice2), Flow::Continue);
    assert_eq!(
        alice2.upstream_header("x-farebox-account").as_deref(),
        Some("acct_alice")
    );
    // A cached allow was not charged for this request: nothing to refund.
    alice2.set_status(503);
    gate.on_response_headers(&alice2);
    assert_eq!(fx.queued_refunds(), 0);
}

#[test]
fn a_new_configuration_does_not_reuse_old_decisions() {
    let old = Fixture::new(r#"{"cluster": "balance", "default_cost": 1}"#);
    let (host, _) = with_answer(
        &old,
        keyed("/x", "k"),
        answer(402, &[("cache-control", "max-age=60")], Value::Null),
    );
    let new = Fixture::new(r#"{"cluster": "balance", "default_cost": 1, "timeout_ms": 400}"#);
    let again = host.sibling("GET", "/x", &[("x-api-key", "k")]);
    assert_eq!(
        new.gate().on_request_headers(&again),
        Flow::Pause(Some(again.last_call().token))
    );
    assert_eq!(again.calls.borrow().len(), 1);
}

#[test]
fn uncacheable_answers_ask_every_time() {
    let fx = Fixture::new(CONFIG);
    for hint in [
        None,
        Some("no-store"),
        Some("max-age=30, no-cache"),
        Some("max-age=abc"),
    ] {
        let headers: Vec<(&str, &str)> = hint.map(|h| ("cache-control", h)).into_iter().collect();
        let (host, _) = with_answer(
            &fx,
            keyed("/y", "k2"),
            answer(402, &headers, json!({"price": 1})),
        );
        assert_eq!(
            reply_header(&host, "cache-control").as_deref(),
            Some("no-store")
        );
        let again = host.sibling("GET", "/y", &[("x-api-key", "k2")]);
        fx.gate().on_request_headers(&again);
        assert_eq!(
            again.calls.borrow().len(),
            1,
            "hint {hint:?} must not be cached"
        );
    }
}

#[test]
fn service_401_403_429_map_to_the_client() {
    let fx = Fixture::new(CONFIG);
    let (h, _) = with_answer(
        &fx,
        keyed("/a", "k"),
        answer(401, &[], json!({"error": "unknown_credential"})),
    );
    assert_eq!(h.reply().unwrap().status, 401);
    assert_eq!(h.count_of(Metric::Unauthenticated), 1);
    let (h, _) = with_answer(&fx, keyed("/a", "k"), answer(403, &[], Value::Null));
    assert_eq!(h.reply().unwrap().status, 403);
    let (h, _) = with_answer(
        &fx,
        keyed("/a", "k"),
        answer(429, &[("retry-after", "7")], Value::Null),
    );
    assert_eq!(h.reply().unwrap().status, 429);
    assert_eq!(reply_header(&h, "retry-after").as_deref(), Some("7"));
    assert_eq!(fx.queued_refunds(), 0);
}

#[test]
fn failure_closed_is_503_and_refunds_a_possible_charge() {
    let fx = Fixture::new(CONFIG);
    for resp in [
        answer(503, &[], Value::Null),
        answer(504, &[], Value::Null),
        answer(200, &[], json!("garbage")),
        answer(200, &[], json!({"allow": "yes", "account_id": "a"})),
        CalloutResponse::default(),
    ] {
        let before = fx.queued_refunds();
        let (host, _) = with_answer(&fx, keyed("/a", "k"), resp.clone());
        let reply = host.reply().unwrap();
        assert_eq!(reply.status, 503, "{resp:?}");
        assert_eq!(reply_header(&host, "retry-after").as_deref(), Some("5"));
        assert_eq!(host.count_of(Metric::FailClosed), 1);
        assert_eq!(host.count_of(Metric::CalloutFailures), 1);
        assert_eq!(host.resumed.get(), 0);
        assert_eq!(fx.queued_refunds(), before + 1);
    }
}

#[test]
fn failure_open_lets_the_request_through_and_counts_it() {
    let fx = Fixture::new(r#"{"cluster": "balance", "failure_mode": "open"}"#);
    let host = keyed("/a", "k");
    host.add_request_header("x-farebox-account", b"forged");
    let (host, _) = with_answer(&fx, host, answer(500, &[], Value::Null));
    assert!(host.reply().is_none());
    assert_eq!(host.resumed.get(), 1);
    assert_eq!(host.count_of(Metric::FailOpen), 1);
    assert_eq!(
        host.upstream_header("x-farebox-account"),
        None,
        "an unpaid request carries no account"
    );
}

#[test]
fn undispatchable_call_fails_at_once() {
    let fx = Fixture::new(CONFIG);
    let host = keyed("/a", "k");
    host.refuse_dispatch.set(true);
    assert_eq!(fx.gate().on_request_headers(&host), Flow::Pause(None));
    assert_eq!(host.reply().unwrap().status, 503);
    assert_eq!(fx.queued_refunds(), 0, "nothing reached the service");
    let open = Fixture::new(r#"{"cluster": "balance", "failure_mode": "open"}"#);
    let host = keyed("/a", "k");
    host.refuse_dispatch.set(true);
    assert_eq!(open.gate().on_request_headers(&host), Flow::Continue);
}

#[test]
fn unserved_requests_are_refunded_served_ones_are_not() {
    let fx = Fixture::new(CONFIG);
    for (status, refunded) in [
        (200, false),
        (404, false),
        (499, false),
        (500, true),
        (503, true),
    ] {
        let before = fx.queued_refunds();
        let (host, mut gate) = with_answer(&fx, keyed("/a", "k"), allow("acct", 1));
        host.set_status(status);
        gate.on_response_headers(&host);
        gate.on_log(&host);
        assert_eq!(
            fx.queued_refunds(),
            before + usize::from(refunded),
            "status {status}"
        );
    }
}

#[test]
fn a_client_that_leaves_before_the_decision_is_refunded() {
    let fx = Fixture::new(CONFIG);
    let host = keyed("/a", "k");
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    gate.on_log(&host);
    assert_eq!(fx.queued_refunds(), 1);
    // A late answer for the abandoned call changes nothing.
    respond(&mut gate, &host, host.last_call().token, &allow("a", 1));
    assert_eq!(host.resumed.get(), 0);
}

#[test]
fn an_answer_for_another_call_is_ignored() {
    let fx = Fixture::new(CONFIG);
    let host = keyed("/a", "k");
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    respond(&mut gate, &host, 9999, &allow("a", 1));
    assert_eq!(host.resumed.get(), 0);
    assert_eq!(gate.on_request_body(&host, 0, false), Flow::Pause(None));
}

#[test]
fn request_id_is_envoys_or_made_up() {
    let fx = Fixture::new(CONFIG);
    let host = FakeHost::request(
        "GET",
        "/a",
        &[("x-api-key", "k"), ("x-request-id", "bad id")],
    );
    fx.gate().on_request_headers(&host);
    let host2 = FakeHost::request("GET", "/a", &[("x-api-key", "k")]);
    fx.gate().on_request_headers(&host2);
    let id1 = host.last_call().body["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    let id2 = host2.last_call().body["request_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(id1.starts_with("fbx-") && id2.starts_with("fbx-"));
    assert_ne!(id1, id2);
}

#[test]
fn refunds_are_sent_retried_and_given_up() {
    let fx = Fixture::new(CONFIG);
    let (host, mut gate) = with_answer(&fx, keyed("/a", "k"), allow("acct", 1));
    host.set_status(502);
    gate.on_response_headers(&host);
    let root = FakeHost::request("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    let call = root.last_call();
    assert_eq!(root.calls.borrow().len(), 1);
    assert_eq!(call.header(":path"), Some("/v1/refund"));
    assert_eq!(call.header("authorization"), Some("Bearer svc-tok"));
    assert_eq!(
        call.body,
        json!({"request_id": "req-1", "account": "k", "cost": 1, "status": 502})
    );

    // The service is down: retried with backoff, never more than MAX_ATTEMPTS times.
    fx.worker
        .on_outbox_response(&root, &fx.cfg, call.token, &status_only(Some(503)));
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(root.calls.borrow().len(), 1, "not before the backoff");
    for _ in 0..20 {
        root.advance(120_000);
        let before = root.calls.borrow().len();
        fx.worker.tick(&root, &fx.cfg);
        if root.calls.borrow().len() > before {
            fx.worker.on_outbox_response(
                &root,
                &fx.cfg,
                root.last_call().token,
                &status_only(None),
            );
        }
    }
    assert_eq!(root.calls.borrow().len() as u32, MAX_ATTEMPTS);
    assert!(fx.worker.outbox.borrow().is_empty());
    assert_eq!(
        root.count_of(Metric::RefundFailures),
        u64::from(MAX_ATTEMPTS)
    );
}

#[test]
fn refund_confirmed_or_unknown() {
    let fx = Fixture::new(CONFIG);
    for (status, refunds, failures) in [(Some(200), 1, 0), (Some(404), 0, 0), (Some(409), 0, 1)] {
        let root = FakeHost::request("GET", "/", &[]);
        let job = Job::Refund {
            request_id: "r".into(),
            account: "k".into(),
            cost: 1,
            status: 503,
            undo: false,
        };
        fx.worker.outbox.borrow_mut().push(&root, job);
        fx.worker.tick(&root, &fx.cfg);
        fx.worker
            .on_outbox_response(&root, &fx.cfg, root.last_call().token, &status_only(status));
        assert_eq!(root.count_of(Metric::Refunds), refunds, "{status:?}");
        assert_eq!(
            root.count_of(Metric::RefundFailures),
            failures,
            "{status:?}"
        );
        assert!(fx.worker.outbox.borrow().is_empty());
    }
}

#[test]
fn unconfigured_gate_refuses_with_503() {
    let host = keyed("/a", "k");
    let mut gate = Gate::new(None, Rc::new(Worker::default()));
    assert_eq!(gate.on_request_headers(&host), Flow::Pause(None));
    assert_eq!(host.reply().unwrap().status, 503);
}

mod lease_mode {
    use super::*;
    use crate::lease::{LeaseKey, LeaseRecord};

    const LEASE: &str = r#"{"cluster": "balance", "mode": "lease", "lease_want": 3, "settle_interval_ms": 1000,
                            "lease_expiry_margin_ms": 2000, "timeout_ms": 300}"#;

    fn grant(id: &str, granted: u64) -> CalloutResponse {
        answer(
            200,
            &[],
            json!({"lease_id": id, "granted": granted, "expires_in_ms": 30000, "account_id": "acct_l", "balance": 10}),
        )
    }

    fn record(host: &FakeHost) -> LeaseRecord {
        let key = LeaseKey::new("balance", "k").slot_key(16_384);
        let (bytes, _) = host
            .shared
            .borrow()
            .get(&key)
            .cloned()
            .expect("a lease slot");
        // An emptied slot holds nothing: no lease, no lock.
        if bytes.is_empty() {
            return LeaseRecord::default();
        }
        LeaseRecord::decode(&bytes).expect("a readable lease record")
    }

    fn fixture() -> Fixture {
        let fx = Fixture::new(LEASE);
        *fx.worker.holder.borrow_mut() = "envoy-test".into();
        fx
    }

    #[test]
    fn take_spend_locally_and_renew() {
        let fx = fixture();
        let first = keyed("/a", "k");
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&first),
            Flow::Pause(Some(first.last_call().token))
        );
        let call = first.last_call();
        assert_eq!(call.header(":path"), Some("/v1/leases"));
        assert_eq!(
            call.body,
            json!({"account": "k", "want": 3, "min": 1, "request_id": "req-1", "holder": "envoy-test"})
        );
        assert_eq!(
            gate.on_callout_response(&first, call.token, &grant("ls_1", 3)),
            Flow::Continue
        );
        assert_eq!(
            first.upstream_header("x-farebox-account").as_deref(),
            Some("acct_l")
        );
        assert_eq!((record(&first).used, record(&first).granted), (1, 3));

        // Two more requests, from another worker: spent locally, no call.
        for _ in 0..2 {
            let other = first.sibling("GET", "/a", &[("x-api-key", "k")]);
            assert_eq!(fx.gate().on_request_headers(&other), Flow::Continue);
            assert!(other.calls.borrow().is_empty());
            assert_eq!(
                other.upstream_header("x-farebox-account").as_deref(),
                Some("acct_l")
            );
        }
        assert_eq!(record(&first).used, 3);

        // The last unit went below the low-water mark: that spend queued a renewal
        // ahead of need, which the timer sends from the root context.
        let next = first.sibling("GET", "/a", &[("x-api-key", "k")]);
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers(&next), Flow::Park);
        assert!(next.calls.borrow().is_empty(), "the renewal is already out");
        let root = first.sibling("GET", "/", &[]);
        fx.worker.tick(&root, &fx.cfg);
        let renew = root.last_call();
        assert_eq!(renew.header(":path"), Some("/v1/leases"));
        assert_eq!(renew.body["want"], json!(3));
        fx.worker
            .on_outbox_response(&root, &fx.cfg, renew.token, &grant("ls_2", 3));
        assert_eq!(root.count_of(Metric::LeaseRenewals), 1);
        assert_eq!(root.count_of(Metric::LeaseAheadRenewals), 1);
        assert_eq!(record(&first).lease_id, "ls_2");
        // The parked request spends from it; the old lease is settled with its exact total.
        assert_eq!(gate.on_wake(&next), Flow::Continue);
        assert_eq!(record(&first).used, 1);
        fx.worker.tick(&root, &fx.cfg);
        let settle = root.last_call();
        assert_eq!(settle.header(":path"), Some("/v1/leases/ls_1/settle"));
        assert_eq!(settle.body, json!({"used": 3, "final": true, "seq": 1}));
        assert_eq!(settle.header("x-request-id"), Some("ls_1-settle-1"));
    }

    #[test]
    fn requests_wait_for_the_one_lease_call() {
        let fx = fixture();
        let first = keyed("/a", "k");
        let mut taker = fx.gate();
        assert_eq!(
            taker.on_request_headers(&first),
            Flow::Pause(Some(first.last_call().token))
        );
        let mut waiters: Vec<(FakeHost, Gate)> = Vec::new();
        for _ in 0..5 {
            let host = first.sibling("GET", "/a", &[("x-api-key", "k")]);
            let mut gate = fx.gate();
            assert_eq!(gate.on_request_headers(&host), Flow::Park);
            assert_eq!(gate.on_request_body(&host, 0, false), Flow::Pause(None));
            assert!(
                host.calls.borrow().is_empty(),
                "one lease call per account at a time"
            );
            waiters.push((host, gate));
        }
        // Still renewing: a wake changes nothing.
        let (h0, g0) = &mut waiters[0];
        assert_eq!(g0.on_wake(h0), Flow::Park);
        assert_eq!(
            taker.on_callout_response(&first, first.last_call().token, &grant("ls_1", 4)),
            Flow::Continue
        );
        let flows: Vec<Flow> = waiters.iter_mut().map(|(h, g)| g.on_wake(h)).collect();
        // 4 units: the taker's and three waiters'. The last of those queued a renewal
        // ahead of need; the other two wait for it, with no call of their own.
        assert_eq!(flows[..3], [Flow::Continue; 3]);
        assert_eq!(flows[3..], [Flow::Park; 2]);
        assert!(waiters.iter().all(|(h, _)| h.calls.borrow().is_empty()));
        assert_eq!(fx.worker.renewals.borrow().len(), 1);
    }

    #[test]
    fn a_waiter_is_not_left_hanging() {
        let fx = fixture();
        let first = keyed("/a", "k");
        fx.gate().on_request_headers(&first);
        let host = first.sibling("GET", "/a", &[("x-api-key", "k")]);
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers(&host), Flow::Park);
        host.advance(1_000);
        assert_eq!(gate.on_wake(&host), Flow::Park);
        host.advance(10_000);
        assert_eq!(gate.on_wake(&host), Flow::Pause(None));
        assert_eq!(host.reply().unwrap().status, 503);
    }

    #[test]
    fn lease_denied_is_402_and_frees_the_lock() {
        let fx = fixture();
        let deny = answer(
            402,
            &[("cache-control", "max-age=5")],
            json!({"balance": 0, "price": 1}),
        );
        let (host, _) = with_answer(&fx, keyed("/a", "k"), deny);
        assert_eq!(host.reply().unwrap().status, 402);
        assert_eq!(record(&host).renewing_until_ms, 0);
        assert_eq!(
            reply_header(&host, "cache-control").as_deref(),
            Some("no-store"),
            "a lease 402 holds only for this moment"
        );
        // Not served from the cache to a new request: it asks again, so that a top-up
        // while other gateways hold leases is usable at once.
        let again = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        assert_eq!(
            fx.gate().on_request_headers(&again),
            Flow::Pause(Some(again.last_call().token))
        );
        assert_eq!(again.last_call().header(":path"), Some("/v1/leases"));
    }

    #[test]
    fn lost_lease_answer_is_cancelled() {
        let fx = fixture();
        let (host, _) = with_answer(&fx, keyed("/a", "k"), answer(504, &[], Value::Null));
        assert_eq!(host.reply().unwrap().status, 503);
        assert_eq!(record(&host).renewing_until_ms, 0);
        let root = host.sibling("GET", "/", &[]);
        fx.worker.tick(&root, &fx.cfg);
        let cancel = root.last_call();
        assert_eq!(cancel.header(":path"), Some("/v1/leases/cancel"));
        assert_eq!(cancel.body, json!({"request_id": "req-1"}));
        assert_eq!(
            cancel.header("x-request-id"),
            Some("req-1"),
            "the same id as the body's"
        );
        // A client that leaves while the lease call is in flight: the same.
        let host = keyed("/a", "k");
        let mut gate = fx.gate();
        gate.on_request_headers(&host);
        gate.on_log(&host);
        assert_eq!(record(&host).renewing_until_ms, 0);
        // The first cancel is in flight, this one waits for the next tick.
        assert_eq!(fx.queued_refunds(), 2);
    }

    #[test]
    fn periodic_settle_then_final_at_expiry() {
        let fx = fixture();
        let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
        let root = host.sibling("GET", "/", &[]);
        fx.worker.tick(&root, &fx.cfg);
        assert!(root.calls.borrow().is_empty(), "not due yet");
        root.advance(1_000);
        fx.worker.tick(&root, &fx.cfg);
        let settle = root.last_call();
        assert_eq!(settle.body, json!({"used": 1, "final": false, "seq": 1}));
        fx.worker
            .on_outbox_response(&root, &fx.cfg, settle.token, &status_only(Some(200)));
        assert_eq!(record(&host).reported, 1);
        // Nothing new spent, but units unspent: a heartbeat at the next interval,
        // with the next seq (so that a recall reaches an idle holder).
        root.advance(1_000);
        fx.worker.tick(&root, &fx.cfg);
        let beat = root.last_call();
        assert_eq!(beat.body, json!({"used": 1, "final": false, "seq": 2}));
        assert_eq!(beat.header("x-request-id"), Some("ls_1-settle-2"));
        fx.worker
            .on_outbox_response(&root, &fx.cfg, beat.token, &status_only(Some(200)));
        // Past the spend deadline (30 s - 2 s margin): closed and settled for good.
        root.advance(27_000);
        fx.worker.tick(&root, &fx.cfg);
        let last = root.last_call();
        assert_eq!(last.body, json!({"used": 1, "final": true, "seq": 3}));
        assert!(!record(&host).has_lease());
        // And a request now needs a new lease.
        let later = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        later.advance(29_000);
        assert_eq!(
            fx.gate().on_request_headers(&later),
            Flow::Pause(Some(later.last_call().token))
        );
        assert_eq!(later.last_call().header(":path"), Some("/v1/leases"));
    }

    #[test]
    fn unserved_requests_give_their_units_back() {
        let fx = fixture();
        let (host, mut gate) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
        assert_eq!(record(&host).used, 1);
        host.set_status(503);
        gate.on_response_headers(&host);
        assert_eq!(record(&host).used, 0);
        assert_eq!(host.count_of(Metric::Refunds), 1);
        assert_eq!(fx.queued_refunds(), 0, "a lease refund is local");
    }

    #[test]
    fn a_recalled_lease_is_given_back_at_once() {
        let fx = fixture();
        let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
        let root = host.sibling("GET", "/", &[]);
        root.advance(1_000);
        fx.worker.tick(&root, &fx.cfg);
        let beat = root.last_call();
        assert_eq!(beat.body, json!({"used": 1, "final": false, "seq": 1}));
        let recall = answer(
            200,
            &[],
            json!({"lease_id": "ls_1", "state": "open", "used": 1, "recall": true}),
        );
        fx.worker
            .on_outbox_response(&root, &fx.cfg, beat.token, &recall);
        assert!(!record(&host).has_lease(), "no more spending from it");
        assert_eq!(root.count_of(Metric::LeaseRecalls), 1);
        // The final settle goes out at once, with the exact total and the next seq.
        let last = root.last_call();
        assert_eq!(last.header(":path"), Some("/v1/leases/ls_1/settle"));
        assert_eq!(last.body, json!({"used": 1, "final": true, "seq": 2}));
        // A retry of it sends the same seq.
        fx.worker
            .on_outbox_response(&root, &fx.cfg, last.token, &status_only(Some(503)));
        root.advance(1_000);
        fx.worker.tick(&root, &fx.cfg);
        assert_eq!(root.last_call().body, last.body);
        assert_ne!(root.last_call().token, last.token);
        // The next request takes a new lease.
        let next = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        next.advance(1_000);
        assert_eq!(
            fx.gate().on_request_headers(&next),
            Flow::Pause(Some(next.last_call().token))
        );
        assert_eq!(next.last_call().header(":path"), Some("/v1/leases"));
    }

    fn recall_402() -> CalloutResponse {
        answer(
            402,
            &[("cache-control", "no-store")],
            json!({"balance": 0, "price": 1, "recall": true, "retry_after_ms": 100}),
        )
    }

    #[test]
    fn a_recall_402_waits_for_the_credit() {
        let fx = fixture();
        let host = keyed("/a", "k");
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&host),
            Flow::Pause(Some(host.last_call().token))
        );
        let first = host.last_call();
        assert_eq!(
            gate.on_callout_response(&host, first.token, &recall_402()),
            Flow::Park
        );
        assert!(host.reply().is_none(), "no 402 while credit is recalled");
        assert_eq!(record(&host).renewing_until_ms, 0, "lock released");
        host.advance(50);
        assert_eq!(gate.on_wake(&host), Flow::Park);
        assert_eq!(host.calls.borrow().len(), 1, "not before retry_after_ms");
        host.advance(50);
        assert_eq!(
            gate.on_wake(&host),
            Flow::Pause(Some(host.last_call().token))
        );
        let second = host.last_call();
        assert_ne!(second.token, first.token);
        assert_eq!(second.header(":path"), Some("/v1/leases"));
        assert_eq!(
            gate.on_callout_response(&host, second.token, &grant("ls_1", 3)),
            Flow::Continue
        );
        assert_eq!(host.count_of(Metric::LeaseRecallWaits), 1);
    }

    #[test]
    fn a_recall_402_that_never_frees_credit_ends_in_402() {
        let fx = fixture();
        // lease_recall_wait_ms defaults to 2 x 1000 + 500.
        assert_eq!(fx.cfg.lease.recall_wait_ms, 2_500);
        let host = keyed("/a", "k");
        let mut gate = fx.gate();
        gate.on_request_headers(&host);
        let start = host.now_ms();
        let mut flow = gate.on_callout_response(&host, host.last_call().token, &recall_402());
        let mut calls = 1;
        while flow == Flow::Park {
            host.advance(10);
            if let Flow::Pause(Some(token)) = gate.on_wake(&host) {
                calls += 1;
                flow = gate.on_callout_response(&host, token, &recall_402());
            }
            assert!(host.now_ms() - start <= 2_500, "waited past the bound");
        }
        assert_eq!(host.reply().unwrap().status, 402);
        assert!(host.now_ms() - start >= 2_400, "gave up early");
        assert!(
            (20..=26).contains(&calls),
            "one call per retry_after_ms: {calls}"
        );
    }

    #[test]
    fn units_of_a_closed_lease_go_back_through_its_refund_call() {
        let fx = fixture();
        let (host, mut gate) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
        // The lease closes while the request is upstream (its spend deadline passed).
        let root = host.sibling("GET", "/", &[]);
        root.advance(28_000);
        fx.worker.tick(&root, &fx.cfg);
        assert_eq!(root.last_call().body["final"], json!(true));
        assert_eq!(root.last_call().body["used"], json!(1));
        host.set_status(504);
        gate.on_response_headers(&host);
        assert_eq!(
            fx.queued_refunds(),
            2,
            "final settle in flight, refund queued"
        );
        fx.worker.tick(&root, &fx.cfg);
        let refund = root.last_call();
        assert_eq!(refund.header(":path"), Some("/v1/leases/ls_1/refund"));
        let rid = refund.body["request_id"].as_str().unwrap().to_string();
        assert_eq!(
            refund.body,
            json!({"request_id": rid, "units": 1, "status": 504})
        );
        assert_eq!(refund.header("x-request-id"), Some(rid.as_str()));
        // 404: final, nothing to refund; counted and logged.
        fx.worker
            .on_outbox_response(&root, &fx.cfg, refund.token, &status_only(Some(404)));
        assert_eq!(root.count_of(Metric::RefundFailures), 1);
    }

    #[test]
    fn a_slot_held_by_another_account_pays_per_request() {
        let fx = Fixture::new(r#"{"cluster": "balance", "mode": "lease", "lease_max_entries": 1}"#);
        let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 100));
        assert_eq!(host.reply(), None);
        let other = host.sibling("GET", "/a", &[("x-api-key", "k2")]);
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&other),
            Flow::Pause(Some(other.last_call().token))
        );
        assert_eq!(other.last_call().header(":path"), Some("/v1/authorize"));
        assert_eq!(other.count_of(Metric::LeaseSlotBusy), 1);
        respond(
            &mut gate,
            &other,
            other.last_call().token,
            &allow("acct_2", 9),
        );
        assert_eq!(other.resumed.get(), 1);
        // The first account's lease is untouched.
        let again = host.sibling("GET", "/a", &[("x-api-key", "k")]);
        assert_eq!(fx.gate().on_request_headers(&again), Flow::Continue);
    }

    /// Issue 12's memory check, deterministic: 200,000 distinct unknown keys in
    /// lease mode leave shared data bounded by the two fixed tables, and the
    /// lease table holds no bytes at all for them.
    #[test]
    fn unknown_keys_leave_no_lasting_lease_state() {
        let fx = Fixture::new(
            r#"{"cluster": "balance", "mode": "lease", "lease_max_entries": 4096, "cache_max_entries": 1000}"#,
        );
        let root = FakeHost::request("GET", "/", &[]);
        let unknown = answer(
            401,
            &[("cache-control", "max-age=60")],
            json!({"error": "unknown"}),
        );
        for i in 0..200_000u32 {
            let key = format!("fbk-unknown-{i:08x}");
            let host = root.sibling("GET", "/a", &[("x-api-key", &key)]);
            let mut gate = fx.gate();
            assert_eq!(
                gate.on_request_headers(&host),
                Flow::Pause(Some(host.last_call().token))
            );
            respond(&mut gate, &host, host.last_call().token, &unknown);
            assert_eq!(host.reply().map(|r| r.status), Some(401));
            gate.on_log(&host);
        }
        let shared = root.shared.borrow();
        let lease_keys = shared
            .keys()
            .filter(|k| k.starts_with("farebox:lease2:"))
            .count();
        let lease_bytes: usize = shared
            .iter()
            .filter(|(k, _)| k.starts_with("farebox:lease2:"))
            .map(|(_, (v, _))| v.len())
            .sum();
        let all_bytes: usize = shared.iter().map(|(k, (v, _))| k.len() + v.len()).sum();
        eprintln!(
            "200000 unknown keys: {} shared keys ({lease_keys} lease slots, {lease_bytes} bytes in them), {all_bytes} bytes of keys and values",
            shared.len()
        );
        assert!(lease_keys <= 4096);
        assert_eq!(lease_bytes, 0, "a refused credential leaves an empty slot");
        assert!(shared.len() <= 4096 + 1000, "{} keys", shared.len());
        assert!(all_bytes <= 4096 * 24 + 1000 * 96, "{all_bytes} bytes");
        assert!(fx.worker.owned.borrow().is_empty());
    }

    #[test]
    fn many_workers_never_overspend_a_lease() {
        let fx = fixture();
        let (host, _) = with_answer(&fx, keyed("/a", "k"), grant("ls_1", 3));
        let mut allowed = 1;
        let mut calls = 0;
        for _ in 0..20 {
            let other = host.sibling("GET", "/a", &[("x-api-key", "k")]);
            match fx.gate().on_request_headers(&other) {
                Flow::Continue => allowed += 1,
                Flow::Pause(_) => calls += other.calls.borrow().len(),
                Flow::Park => {}
            }
        }
        assert_eq!(allowed, 3, "exactly the granted units");
        assert_eq!(calls, 0, "the rest wait for the one renewal");
        assert_eq!(fx.worker.renewals.borrow().len(), 1);
    }
}

#[test]
fn waiters_take_a_cached_refusal_instead_of_asking_again() {
    let fx = Fixture::new(r#"{"cluster": "balance", "mode": "lease", "lease_want": 3}"#);
    let first = keyed("/a", "k");
    let mut taker = fx.gate();
    taker.on_request_headers(&first);
    let waiter = first.sibling("GET", "/a", &[("x-api-key", "k")]);
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&waiter), Flow::Park);
    let deny = answer(
        402,
        &[("cache-control", "max-age=5")],
        json!({"balance": 0, "price": 1}),
    );
    taker.on_callout_response(&first, first.last_call().token, &deny);
    assert_eq!(gate.on_wake(&waiter), Flow::Pause(None));
    assert!(waiter.calls.borrow().is_empty(), "no second lease call");
    assert_eq!(waiter.reply().unwrap().status, 402);
}

mod metered_and_paid {
    use super::*;

    const CFG: &str = r#"{"cluster": "balance", "html_402": true, "max_body_bytes": 200, "routes": [
        {"name": "mcp", "methods": ["POST"], "exact": "/mcp", "cost": 1,
         "mcp": {"methods": {"initialize": 0, "tools/list": 0}, "tools": {"search": 5}}},
        {"name": "chat", "prefix": "/v1/chat/", "usage": {"json_pointer": "/usage/total_tokens", "unit_cost": 2, "estimate": 100}}
    ]}"#;

    fn mcp_call(fx: &Fixture, body: Value) -> (FakeHost, Gate, Flow) {
        let host = FakeHost::request(
            "POST",
            "/mcp",
            &[("x-api-key", "k"), ("x-request-id", "req-1")],
        );
        *host.request_body.borrow_mut() = body.to_string().into_bytes();
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers_eos(&host, false),
            Flow::Continue,
            "the headers go on, the body waits"
        );
        host.headers_locked.set(true);
        assert!(host.calls.borrow().is_empty());
        let size = host.request_body.borrow().len();
        assert_eq!(
            gate.on_request_body(&host, size / 2, false),
            Flow::Pause(None)
        );
        let flow = gate.on_request_body(&host, size, true);
        assert_eq!(
            host.late_header_access.get(),
            0,
            "no header access after the headers went on"
        );
        (host, gate, flow)
    }

    #[test]
    fn mcp_calls_are_priced_by_tool_and_method() {
        let fx = Fixture::new(CFG);
        let (host, _, flow) = mcp_call(
            &fx,
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        );
        assert_eq!(flow, Flow::Continue, "tools/list is free");
        assert!(host.calls.borrow().is_empty());

        let search = json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {"name": "search"}});
        let (host, mut gate, flow) = mcp_call(&fx, search);
        assert_eq!(flow, Flow::Pause(Some(host.last_call().token)));
        let call = host.last_call();
        assert_eq!(
            (call.body["cost"].clone(), call.body["route"].clone()),
            (json!(5), json!("mcp/tools/call:search"))
        );
        // Refused: HTTP 200 with a tool result an MCP client shows (x402's MCP transport).
        gate.on_callout_response(
            &host,
            call.token,
            &answer(
                402,
                &[],
                json!({"balance": 1, "price": 5, "detail": "top up"}),
            ),
        );
        let reply = host.reply().unwrap();
        assert_eq!(reply.status, 200, "MCP clients read only a 2xx");
        assert_eq!(
            reply_header(&host, "content-type").as_deref(),
            Some("application/json")
        );
        let body = reply_body(&host);
        assert_eq!(body["jsonrpc"], "2.0");
        assert_eq!(body["id"], 42);
        assert_eq!(body["result"]["isError"], true);
        assert_eq!(
            body["result"]["content"][0]["text"],
            "Payment Required: top up (price 5, balance 1)"
        );
        assert_eq!(body["result"]["structuredContent"]["status"], 402);
        assert_eq!(body["result"]["structuredContent"]["price"], 5);

        // Another priced method: a JSON-RPC error, code 402.
        let read = json!({"jsonrpc": "2.0", "id": "r1", "method": "resources/read"});
        let (host, mut gate, _) = mcp_call(&fx, read);
        let call = host.last_call();
        gate.on_callout_response(
            &host,
            call.token,
            &answer(
                402,
                &[],
                json!({"balance": 0, "price": 1, "detail": "top up"}),
            ),
        );
        let body = reply_body(&host);
        assert_eq!(host.reply().unwrap().status, 200);
        assert_eq!(body["id"], "r1");
        assert_eq!(body["error"]["code"], crate::mcp::PAYMENT_REQUIRED_CODE);
        assert_eq!(
            body["error"]["message"],
            "Payment Required: top up (price 1, balance 0)"
        );
        assert_eq!(body["error"]["data"]["price"], 1);
    }

    #[test]
    fn mcp_plumbing_is_free() {
        let fx = Fixture::new(
            r#"{"cluster": "balance", "routes": [
            {"name": "mcp", "exact": "/mcp", "cost": 1, "mcp": {"tools": {"search": 5}}}]}"#,
        );
        // GET (the event stream) and DELETE (closing the session) need no credential.
        for method in ["GET", "DELETE"] {
            let host = FakeHost::request(method, "/mcp", &[]);
            let mut gate = fx.gate();
            assert_eq!(gate.on_request_headers(&host), Flow::Continue, "{method}");
            assert!(host.calls.borrow().is_empty(), "{method}: no callout");
            assert_eq!(host.count_of(Metric::Free), 1);
        }
        for method in [
            "ping",
            "server/discover",
            "initialize",
            "prompts/list",
            "notifications/initialized",
        ] {
            let (host, _, flow) =
                mcp_call(&fx, json!({"jsonrpc": "2.0", "id": 1, "method": method}));
            assert_eq!(flow, Flow::Continue, "{method}");
            assert!(host.calls.borrow().is_empty(), "{method}: no callout");
        }
        // A rule before the MCP rule prices GET when an operator wants it priced.
        let fx = Fixture::new(
            r#"{"cluster": "balance", "routes": [
            {"name": "mcp-stream", "methods": ["GET"], "exact": "/mcp", "cost": 2},
            {"name": "mcp", "exact": "/mcp", "cost": 1, "mcp": {"methods": {"ping": 1}}}]}"#,
        );
        let host = FakeHost::request("GET", "/mcp", &[("x-api-key", "k")]);
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&host),
            Flow::Pause(Some(host.last_call().token))
        );
        assert_eq!(host.last_call().body["cost"], 2);
        let (host, _, flow) = mcp_call(&fx, json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}));
        assert_eq!(
            flow,
            Flow::Pause(Some(host.last_call().token)),
            "ping priced explicitly"
        );
        assert_eq!(host.last_call().body["cost"], 1);
    }

    /// A paid MCP call, allowed, then answered by the upstream with `body`.
    fn mcp_answered(fx: &Fixture, content_type: &str, body: &str) -> FakeHost {
        let call = json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {"name": "search"}});
        let (host, mut gate, flow) = mcp_call(fx, call);
        assert_eq!(flow, Flow::Pause(Some(host.last_call().token)));
        respond(&mut gate, &host, host.last_call().token, &allow("acct", 95));
        host.set_status(200);
        host.response_headers
            .borrow_mut()
            .push(("content-type".into(), content_type.as_bytes().to_vec()));
        gate.on_response_headers(&host);
        let bytes = body.as_bytes();
        let half = bytes.len() / 2;
        for (chunk, eos) in [(&bytes[..half], false), (&bytes[half..], true)] {
            *host.response_chunk.borrow_mut() = chunk.to_vec();
            gate.on_response_body(&host, chunk.len(), eos);
        }
        host
    }

    #[test]
    fn mcp_json_rpc_errors_are_not_charged() {
        let fx = Fixture::new(CFG);
        let err = r#"{"jsonrpc":"2.0","id":42,"error":{"code":-32602,"message":"Unknown tool"}}"#;
        let host = mcp_answered(&fx, "application/json", err);
        assert_eq!(fx.queued_refunds(), 1);
        assert_eq!(host.count_of(Metric::McpErrorRefunds), 1);
        let sse = format!("event: message\ndata: {err}\n\n");
        mcp_answered(&fx, "text/event-stream", &sse);
        assert_eq!(fx.queued_refunds(), 2);
        // Served calls, even a tool's own error, are charged.
        let ok = r#"{"jsonrpc":"2.0","id":42,"result":{"content":[],"isError":true}}"#;
        let host = mcp_answered(&fx, "application/json", ok);
        assert_eq!(fx.queued_refunds(), 2);
        assert_eq!(host.count_of(Metric::McpErrorRefunds), 0);
    }

    #[test]
    fn usage_routes_answer_openai_errors_beside_the_problem() {
        let fx = Fixture::new(CFG);
        let host = FakeHost::request("POST", "/v1/chat/completions", &[("x-api-key", "k")]);
        let (host, _) = with_answer(
            &fx,
            host,
            answer(
                402,
                &[],
                json!({"balance": 7, "price": 100, "detail": "top up"}),
            ),
        );
        assert_eq!(host.reply().unwrap().status, 402);
        let body = reply_body(&host);
        assert_eq!(
            (body["status"].clone(), body["price"].clone()),
            (json!(402), json!(100))
        );
        assert_eq!(
            body["error"],
            json!({"message": "Payment Required: top up (price 100, balance 7)",
                   "type": "insufficient_quota", "code": "payment_required"})
        );
        let host = FakeHost::request("POST", "/v1/chat/completions", &[]);
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers(&host), Flow::Pause(None));
        let body = reply_body(&host);
        assert_eq!(host.reply().unwrap().status, 401);
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Unauthorized: "));
        // Other routes keep the plain problem.
        let fx = Fixture::new(CONFIG);
        let (host, _) = with_answer(
            &fx,
            keyed("/anything", "k"),
            answer(
                402,
                &[],
                json!({"balance": 0, "price": 1, "detail": "top up"}),
            ),
        );
        assert_eq!(host.reply().unwrap().status, 402);
        assert!(reply_body(&host).get("error").is_none());
    }

    /// An MCP request with 2026-07-28 headers; `body` is what it really sends.
    fn mcp_claimed(fx: &Fixture, headers: &[(&str, &str)], body: &Value) -> (FakeHost, Gate, Flow) {
        let mut all = vec![("x-api-key", "k"), ("x-request-id", "req-1")];
        all.extend_from_slice(headers);
        let host = FakeHost::request("POST", "/mcp", &all);
        host.add_request_header("x-farebox-account", b"forged");
        *host.request_body.borrow_mut() = body.to_string().into_bytes();
        let mut gate = fx.gate();
        let flow = gate.on_request_headers_eos(&host, false);
        (host, gate, flow)
    }

    /// The body arrives after the headers went on: held in two chunks, then judged.
    fn send_body(host: &FakeHost, gate: &mut Gate) -> Flow {
        host.headers_locked.set(true);
        let size = host.request_body.borrow().len();
        assert_eq!(
            gate.on_request_body(host, size / 2, false),
            Flow::Pause(None),
            "held"
        );
        let flow = gate.on_request_body(host, size, true);
        assert_eq!(
            host.late_header_access.get(),
            0,
            "no header access after the headers went on"
        );
        flow
    }

    fn search_call(id: u64, name: &str) -> Value {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": name, "arguments": {}}})
    }

    #[test]
    fn mcp_headers_price_the_call_before_its_body() {
        let fx = Fixture::new(CFG);
        let claim = [("mcp-method", "tools/call"), ("mcp-name", "search")];
        let (host, mut gate, flow) = mcp_claimed(&fx, &claim, &search_call(42, "search"));
        assert_eq!(
            flow,
            Flow::Pause(Some(host.last_call().token)),
            "decided at the headers"
        );
        let call = host.last_call();
        assert_eq!(
            (call.body["cost"].clone(), call.body["route"].clone()),
            (json!(5), json!("mcp/tools/call:search"))
        );
        respond(&mut gate, &host, call.token, &allow("acct_7", 95));
        assert_eq!(host.resumed.get(), 1);
        assert_eq!(
            host.upstream_header("x-farebox-account").as_deref(),
            Some("acct_7"),
            "the upstream learns the account, as on any other route"
        );
        assert_eq!(send_body(&host, &mut gate), Flow::Continue);
        assert!(host.reply().is_none());
        // The answer is still read for a JSON-RPC error, given back.
        host.set_status(200);
        host.response_headers
            .borrow_mut()
            .push(("content-type".into(), b"application/json".to_vec()));
        gate.on_response_headers(&host);
        let err = r#"{"jsonrpc":"2.0","id":42,"error":{"code":-32602,"message":"bad"}}"#;
        *host.response_chunk.borrow_mut() = err.as_bytes().to_vec();
        gate.on_response_body(&host, err.len(), true);
        assert_eq!(host.count_of(Metric::McpErrorRefunds), 1);
        assert_eq!(fx.queued_refunds(), 1);

        // A free method is let through at once, and its body still checked.
        let ping = json!({"jsonrpc": "2.0", "id": 3, "method": "ping"});
        let (host, mut gate, flow) = mcp_claimed(&fx, &[("mcp-method", "ping")], &ping);
        assert_eq!(flow, Flow::Continue);
        assert!(host.calls.borrow().is_empty());
        assert_eq!(
            host.upstream_header("x-farebox-account"),
            None,
            "a forged copy is dropped"
        );
        assert_eq!(send_body(&host, &mut gate), Flow::Continue);
        // A name that is not plain ASCII comes base64-wrapped.
        let wrapped = "=?base64?c2VhcmNo?="; // "search"
        let (host, _, _) = mcp_claimed(
            &fx,
            &[("mcp-method", "tools/call"), ("mcp-name", wrapped)],
            &search_call(1, "search"),
        );
        assert_eq!(host.last_call().body["cost"], 5);
    }

    #[test]
    fn mcp_headers_that_disagree_with_the_body_are_refused_and_given_back() {
        let fx = Fixture::new(CFG);
        // Headers claiming a free method do not get a paid call served free.
        let (host, mut gate, flow) = mcp_claimed(
            &fx,
            &[("mcp-method", "tools/list")],
            &search_call(9, "search"),
        );
        assert_eq!(flow, Flow::Continue);
        assert_eq!(send_body(&host, &mut gate), Flow::Pause(None));
        let reply = host.reply().unwrap();
        assert_eq!(reply.status, 400);
        let body = reply_body(&host);
        assert_eq!(body["id"], 9);
        assert_eq!(body["error"]["code"], crate::mcp::HEADER_MISMATCH_CODE);
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Mcp-Method"));
        assert_eq!(body["error"]["data"]["status"], 400);
        assert_eq!(host.count_of(Metric::McpHeaderMismatch), 1);
        assert_eq!(fx.queued_refunds(), 0, "nothing was charged");

        // A cheaper tool named in the headers: charged 1 (the route's cost), refused,
        // given back once.
        let (host, mut gate, _) = mcp_claimed(
            &fx,
            &[("mcp-method", "tools/call"), ("mcp-name", "cheap")],
            &search_call(9, "search"),
        );
        assert_eq!(host.last_call().body["cost"], 1);
        respond(&mut gate, &host, host.last_call().token, &allow("acct", 99));
        assert_eq!(send_body(&host, &mut gate), Flow::Pause(None));
        assert_eq!(host.reply().unwrap().status, 400);
        assert!(reply_body(&host)["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Mcp-Name"));
        gate.on_response_headers(&host);
        gate.on_log(&host);
        assert_eq!(fx.queued_refunds(), 1, "given back exactly once");
        let root = FakeHost::request("GET", "/", &[]);
        fx.worker.tick(&root, &fx.cfg);
        let refund = root.last_call().body;
        assert_eq!(
            (
                refund["cost"].clone(),
                refund["status"].clone(),
                refund["request_id"].clone()
            ),
            (json!(1), json!(400), json!("req-1"))
        );

        // No Mcp-Name where the method needs one; a batch; not JSON-RPC at all.
        for (headers, body) in [
            (vec![("mcp-method", "tools/call")], search_call(1, "search")),
            (
                vec![("mcp-method", "ping")],
                json!([{"jsonrpc": "2.0", "id": 1, "method": "ping"}]),
            ),
            (vec![("mcp-method", "ping")], json!("ping")),
        ] {
            let (host, mut gate, _) = mcp_claimed(&fx, &headers, &body);
            if let Some(call) = host.calls.borrow().last() {
                gate.on_callout_response(&host, call.token, &allow("acct", 99));
            }
            assert_eq!(send_body(&host, &mut gate), Flow::Pause(None), "{body}");
            assert_eq!(host.reply().unwrap().status, 400, "{body}");
        }
    }

    #[test]
    fn mcp_header_priced_body_over_the_limit_is_413_and_given_back() {
        let fx = Fixture::new(CFG);
        let claim = [("mcp-method", "tools/call"), ("mcp-name", "search")];
        let (host, mut gate, _) = mcp_claimed(&fx, &claim, &search_call(5, "search"));
        respond(&mut gate, &host, host.last_call().token, &allow("acct", 95));
        host.headers_locked.set(true);
        assert_eq!(gate.on_request_body(&host, 201, false), Flow::Pause(None));
        assert_eq!(host.reply().unwrap().status, 413);
        assert_eq!(host.count_of(Metric::BodyTooLarge), 1);
        gate.on_log(&host);
        assert_eq!(fx.queued_refunds(), 1, "given back once");
    }

    #[test]
    fn mcp_refusals_from_headers_answer_the_body_id() {
        let fx = Fixture::new(CFG);
        let claim = [("mcp-method", "tools/call"), ("mcp-name", "search")];
        let (host, mut gate, _) = mcp_claimed(&fx, &claim, &search_call(77, "search"));
        let deny = answer(
            402,
            &[],
            json!({"balance": 1, "price": 5, "detail": "top up"}),
        );
        assert_eq!(
            gate.on_callout_response(&host, host.last_call().token, &deny),
            Flow::Continue,
            "the headers go on to let the body in"
        );
        assert!(host.reply().is_none());
        assert_eq!(host.upstream_header("x-farebox-account"), None);
        assert_eq!(
            send_body(&host, &mut gate),
            Flow::Pause(None),
            "the body never goes on"
        );
        let reply = host.reply().unwrap();
        assert_eq!(reply.status, 200);
        let body = reply_body(&host);
        assert_eq!(
            (body["id"].clone(), body["result"]["isError"].clone()),
            (json!(77), json!(true))
        );
        assert_eq!(body["result"]["structuredContent"]["price"], 5);

        // Without a credential, where payments are accepted, the body may pay: body path.
        let fx = Fixture::new(&CFG.replace(
            r#""html_402": true"#,
            r#""html_402": true, "accept_payments": true"#,
        ));
        let host = FakeHost::request(
            "POST",
            "/mcp",
            &[("mcp-method", "tools/call"), ("mcp-name", "search")],
        );
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers_eos(&host, false), Flow::Continue);
        assert!(host.calls.borrow().is_empty(), "waits for the body");
    }

    #[test]
    fn streaming_chat_requests_ask_for_usage() {
        let fx = Fixture::new(
            r#"{"cluster": "balance", "routes": [
            {"name": "chat", "prefix": "/v1/chat/", "usage": {"api": "openai_chat", "estimate": 4000,
             "models": {"m": {"input": 1, "output": 2}}}},
            {"name": "ptr", "prefix": "/v2/", "usage": {"json_pointer": "/usage/total_tokens", "unit_cost": 1,
             "estimate": 50, "stream_include_usage": true}}]}"#,
        );
        let stream = json!({"model": "m", "messages": [], "stream": true, "max_tokens": 3});
        // A token-table route reads the body anyway.
        let host = FakeHost::request(
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", "k"), ("content-length", "60")],
        );
        *host.request_body.borrow_mut() = stream.to_string().into_bytes();
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers_eos(&host, false), Flow::Continue);
        assert_eq!(
            host.upstream_header("content-length"),
            None,
            "the body may grow"
        );
        host.headers_locked.set(true);
        let size = host.request_body.borrow().len();
        assert_eq!(
            gate.on_request_body(&host, size, true),
            Flow::Pause(Some(host.last_call().token))
        );
        let sent: Value = serde_json::from_slice(&host.request_body.borrow()).unwrap();
        assert_eq!(sent["stream_options"], json!({"include_usage": true}));
        assert_eq!(
            (sent["model"].clone(), sent["max_tokens"].clone()),
            (json!("m"), json!(3))
        );
        assert_eq!(host.count_of(Metric::IncludeUsageAdded), 1);
        assert_eq!(host.last_call().body["route"], "chat/m");

        // A pointer route that asks for it: decided at the headers, the body held after.
        let host = FakeHost::request("POST", "/v2/chat", &[("x-api-key", "k")]);
        *host.request_body.borrow_mut() = stream.to_string().into_bytes();
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers_eos(&host, false),
            Flow::Pause(Some(host.last_call().token))
        );
        respond(
            &mut gate,
            &host,
            host.last_call().token,
            &allow("acct", 100),
        );
        host.headers_locked.set(true);
        assert_eq!(gate.on_request_body(&host, 10, false), Flow::Pause(None));
        assert_eq!(gate.on_request_body(&host, size, true), Flow::Continue);
        let sent: Value = serde_json::from_slice(&host.request_body.borrow()).unwrap();
        assert_eq!(sent["stream_options"]["include_usage"], true);

        // Off for a route that does not ask, and for a request that streams not.
        let fx = Fixture::new(CFG);
        let host = FakeHost::request(
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", "k"), ("content-length", "60")],
        );
        let mut gate = fx.gate();
        gate.on_request_headers_eos(&host, false);
        assert_eq!(
            host.upstream_header("content-length").as_deref(),
            Some("60")
        );
    }

    #[test]
    fn mcp_body_over_the_limit_is_413() {
        let fx = Fixture::new(CFG);
        let host = FakeHost::request("POST", "/mcp", &[("x-api-key", "k")]);
        let mut gate = fx.gate();
        gate.on_request_headers_eos(&host, false);
        assert_eq!(gate.on_request_body(&host, 201, false), Flow::Pause(None));
        assert_eq!(host.reply().unwrap().status, 413);
        assert_eq!(host.count_of(Metric::BodyTooLarge), 1);
    }

    fn chat(fx: &Fixture, body: &str, content_type: &str, status: u16) -> (FakeHost, Gate) {
        let host = FakeHost::request(
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", "k"), ("x-request-id", "req-1")],
        );
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&host),
            Flow::Pause(Some(host.last_call().token))
        );
        assert_eq!(host.last_call().body["cost"], 100, "the estimate is held");
        respond(
            &mut gate,
            &host,
            host.last_call().token,
            &allow("acct", 900),
        );
        host.set_status(status);
        host.response_headers
            .borrow_mut()
            .push(("content-type".into(), content_type.as_bytes().to_vec()));
        gate.on_response_headers(&host);
        let bytes = body.as_bytes();
        let half = bytes.len() / 2;
        for (chunk, eos) in [(&bytes[..half], false), (&bytes[half..], true)] {
            *host.response_chunk.borrow_mut() = chunk.to_vec();
            gate.on_response_body(&host, chunk.len(), eos);
        }
        (host, gate)
    }

    fn queued_usage(fx: &Fixture) -> Vec<Job> {
        let root = FakeHost::request("GET", "/", &[]);
        fx.worker.tick(&root, &fx.cfg);
        let jobs = root
            .calls
            .borrow()
            .iter()
            .map(|c| {
                assert_eq!(c.header(":path"), Some("/v1/usage"));
                Job::Usage {
                    request_id: c.body["request_id"].as_str().unwrap().into(),
                    account: c.body["account"].as_str().unwrap().into(),
                    actual: c.body["actual"].as_u64().unwrap(),
                    line: None,
                }
            })
            .collect();
        jobs
    }

    #[test]
    fn json_usage_sets_the_final_price() {
        let fx = Fixture::new(CFG);
        let body = json!({"choices": [], "usage": {"total_tokens": 30}}).to_string();
        let (host, _) = chat(&fx, &body, "application/json", 200);
        assert_eq!(host.count_of(Metric::UsageMetered), 1);
        assert_eq!(
            queued_usage(&fx),
            vec![Job::Usage {
                request_id: "req-1".into(),
                account: "k".into(),
                actual: 60,
                line: None,
            }]
        );
    }

    #[test]
    fn sse_usage_sets_the_final_price() {
        let fx = Fixture::new(CFG);
        let body = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"total_tokens\":70}}\n\ndata: [DONE]\n\n";
        chat(&fx, body, "text/event-stream", 200);
        assert_eq!(
            queued_usage(&fx),
            vec![Job::Usage {
                request_id: "req-1".into(),
                account: "k".into(),
                actual: 140,
                line: None,
            }]
        );
    }

    #[test]
    fn no_usage_keeps_the_hold_and_5xx_is_refunded() {
        let fx = Fixture::new(CFG);
        let (host, _) = chat(&fx, "data: {\"choices\":[]}\n\n", "text/event-stream", 200);
        assert_eq!(host.count_of(Metric::UsageUnread), 1);
        assert!(
            queued_usage(&fx).is_empty(),
            "charged at the hold: nothing to adjust"
        );
        let fx = Fixture::new(CFG);
        chat(&fx, "{\"error\": 1}", "application/json", 503);
        assert_eq!(fx.queued_refunds(), 1, "the whole hold comes back");
    }

    #[test]
    fn an_abandoned_stream_is_charged_the_hold() {
        let fx = Fixture::new(CFG);
        let host = FakeHost::request("POST", "/v1/chat/x", &[("x-api-key", "k")]);
        let mut gate = fx.gate();
        gate.on_request_headers(&host);
        respond(
            &mut gate,
            &host,
            host.last_call().token,
            &allow("acct", 900),
        );
        host.set_status(200);
        host.response_headers
            .borrow_mut()
            .push(("content-type".into(), b"text/event-stream".to_vec()));
        gate.on_response_headers(&host);
        *host.response_chunk.borrow_mut() = b"data: {\"choices\":[]}\n\n".to_vec();
        gate.on_response_body(&host, 22, false);
        gate.on_log(&host);
        assert_eq!(host.count_of(Metric::UsageUnread), 1);
        assert_eq!(fx.queued_refunds(), 0);
    }

    #[test]
    fn lease_mode_usage_adjusts_the_lease() {
        let fx = Fixture::new(&CFG.replace(
            "\"html_402\": true",
            "\"mode\": \"lease\", \"lease_want\": 1000",
        ));
        *fx.worker.holder.borrow_mut() = "h".into();
        let grant = answer(
            200,
            &[],
            json!({"lease_id": "ls_1", "granted": 1000, "expires_in_ms": 30000, "account_id": "a"}),
        );
        let host = FakeHost::request(
            "POST",
            "/v1/chat/x",
            &[("x-api-key", "k"), ("x-request-id", "r")],
        );
        let mut gate = fx.gate();
        gate.on_request_headers(&host);
        respond(&mut gate, &host, host.last_call().token, &grant);
        let used = |h: &FakeHost| {
            let (bytes, _) = h
                .shared
                .borrow()
                .get(&crate::lease::LeaseKey::new("balance", "k").slot_key(16_384))
                .cloned()
                .unwrap();
            crate::lease::LeaseRecord::decode(&bytes).unwrap().used
        };
        assert_eq!(used(&host), 100);
        host.set_status(200);
        host.response_headers
            .borrow_mut()
            .push(("content-type".into(), b"application/json".to_vec()));
        gate.on_response_headers(&host);
        *host.response_chunk.borrow_mut() = br#"{"usage": {"total_tokens": 15}}"#.to_vec();
        gate.on_response_body(&host, 31, true);
        assert_eq!(
            used(&host),
            30,
            "15 tokens at 2: the rest of the hold is back in the lease"
        );
    }

    #[test]
    fn a_402_offers_x402_and_payment_scheme_challenges() {
        let fx = Fixture::new(CFG);
        let host = FakeHost::request(
            "GET",
            "/v1/data",
            &[
                ("x-api-key", "k"),
                (":authority", "api.test"),
                (":scheme", "https"),
            ],
        );
        let mut gate = fx.gate();
        gate.on_request_headers(&host);
        let deny = answer(
            402,
            &[("cache-control", "max-age=60")],
            json!({
                "balance": 0, "price": 1, "detail": "insufficient balance",
                "accepts": [{"scheme": "exact", "network": "base", "amount": "10", "asset": "0xA", "payTo": "0xB", "maxTimeoutSeconds": 60, "extra": {}}],
                "challenges": [{"id": "c1", "method": "x402", "intent": "charge", "request": {"amount": "10"}}]
            }),
        );
        gate.on_callout_response(&host, host.last_call().token, &deny);
        let reply = host.reply().unwrap();
        assert_eq!(reply.status, 402);
        let pr = reply_header(&host, "payment-required").expect("x402 header");
        assert!(!pr.is_empty());
        let www: Vec<&String> = reply
            .headers
            .iter()
            .filter(|(k, _)| *k == "www-authenticate")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(www.len(), 1);
        assert!(
            www[0].starts_with("Payment id=\"c1\", realm=\"api.test\""),
            "{}",
            www[0]
        );
        assert_eq!(
            reply_header(&host, "cache-control").as_deref(),
            Some("no-store"),
            "challenges are one-time"
        );
        assert!(
            host.shared.borrow().is_empty(),
            "a denial with challenges is not cached"
        );
    }

    #[test]
    fn a_payment_without_credential_is_sent_to_the_service() {
        let fx = Fixture::new(CFG);
        let host = FakeHost::request(
            "GET",
            "/v1/data",
            &[
                ("payment-signature", "eyJwYXkiOnRydWV9"),
                ("x-request-id", "r"),
            ],
        );
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&host),
            Flow::Pause(Some(host.last_call().token))
        );
        let call = host.last_call();
        assert_eq!(call.body["account"], Value::Null);
        assert_eq!(call.body["payment"], "eyJwYXkiOnRydWV9");
        assert_eq!(call.body["payment_scheme"], "x402");
        let paid = answer(
            200,
            &[],
            json!({"allow": true, "account_id": "payer_1", "payment_response": {"success": true, "transaction": "0x1"}}),
        );
        respond(&mut gate, &host, call.token, &paid);
        assert_eq!(host.resumed.get(), 1);
        host.set_status(200);
        gate.on_response_headers(&host);
        let header = host
            .client_header("payment-response")
            .expect("PAYMENT-RESPONSE");
        assert!(!header.is_empty());
        assert!(
            host.shared.borrow().is_empty(),
            "a paid decision is not cached"
        );
        // Without the payment, the same request is a 401 (anonymous is off).
        let plain = FakeHost::request("GET", "/v1/data", &[]);
        fx.gate().on_request_headers(&plain);
        assert_eq!(plain.reply().unwrap().status, 401);
    }

    #[test]
    fn browsers_get_a_page() {
        let fx = Fixture::new(CFG);
        let host = FakeHost::request(
            "GET",
            "/v1/data",
            &[
                ("x-api-key", "k"),
                ("accept", "text/html,application/xhtml+xml"),
            ],
        );
        let (host, _) = with_answer(
            &fx,
            host,
            answer(402, &[], json!({"price": 3, "detail": "top <up>"})),
        );
        let reply = host.reply().unwrap();
        assert_eq!(reply.status, 402);
        assert_eq!(
            reply_header(&host, "content-type").as_deref(),
            Some("text/html; charset=utf-8")
        );
        let page = String::from_utf8(reply.body).unwrap();
        assert!(
            page.contains("<h1>Payment Required</h1>") && page.contains("top &lt;up&gt;"),
            "{page}"
        );
    }
}

#[test]
fn an_undo_answered_unknown_is_asked_again() {
    // The authorize answer was lost; the service may commit the charge after our undo.
    let fx = Fixture::new(CONFIG);
    let (host, _) = with_answer(&fx, keyed("/a", "k"), answer(504, &[], Value::Null));
    assert_eq!(host.reply().unwrap().status, 503);
    let root = FakeHost::request("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    fx.worker.on_outbox_response(
        &root,
        &fx.cfg,
        root.last_call().token,
        &status_only(Some(404)),
    );
    assert_eq!(fx.queued_refunds(), 1, "kept for another try");
    root.advance(1_000);
    fx.worker.tick(&root, &fx.cfg);
    assert_eq!(root.calls.borrow().len(), 2);
    fx.worker.on_outbox_response(
        &root,
        &fx.cfg,
        root.last_call().token,
        &status_only(Some(200)),
    );
    assert!(fx.worker.outbox.borrow().is_empty());
    assert_eq!(root.count_of(Metric::Refunds), 1);
}

#[test]
fn a_repeated_credential_reaches_the_upstream_as_the_one_that_pays() {
    let fx = Fixture::new(CONFIG);
    let host = FakeHost::request("GET", "/a", &[("x-api-key", "k1"), ("x-api-key", "k2")]);
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    assert_eq!(host.last_call().body["account"], "k1");
    let keys: Vec<String> = host
        .request_headers
        .borrow()
        .iter()
        .filter(|(k, _)| k == "x-api-key")
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(keys, vec!["k1".to_string()]);
}

mod token_tables {
    use super::*;

    const CFG: &str = r#"{"cluster": "balance", "routes": [
        {"name": "claude", "methods": ["POST"], "exact": "/v1/messages", "usage": {
         "api": "anthropic_messages", "models": {"m": {"input": 3, "output": 15}}, "estimate": 100}}
    ]}"#;

    /// A request for `body` up to its decision: the host and the gate.
    fn message(fx: &Fixture, body: &Value) -> (FakeHost, Gate) {
        let host = FakeHost::request(
            "POST",
            "/v1/messages",
            &[("x-api-key", "k"), ("x-request-id", "req-1")],
        );
        *host.request_body.borrow_mut() = body.to_string().into_bytes();
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers_eos(&host, false), Flow::Continue);
        host.headers_locked.set(true);
        let size = host.request_body.borrow().len();
        gate.on_request_body(&host, size, true);
        (host, gate)
    }

    #[test]
    fn the_hold_fits_the_request_and_the_route_names_the_model() {
        let fx = Fixture::new(CFG);
        let body = json!({"model": "m", "max_tokens": 10, "messages": []});
        let len = body.to_string().len() as u64;
        let (host, mut gate) = message(&fx, &body);
        let call = host.last_call();
        assert_eq!(call.body["cost"], json!(10 * 15 + len * 3));
        assert_eq!(call.body["route"], "claude/m");
        respond(&mut gate, &host, call.token, &allow("acct", 900));
        host.set_status(200);
        host.response_headers
            .borrow_mut()
            .push(("content-type".into(), b"text/event-stream".to_vec()));
        gate.on_response_headers(&host);
        // The stream breaks off after message_start: charged what it reported.
        let start = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":4,\"output_tokens\":1}}}\n\n";
        *host.response_chunk.borrow_mut() = start.as_bytes().to_vec();
        gate.on_response_body(&host, start.len(), false);
        gate.on_log(&host);
        assert_eq!(host.count_of(Metric::UsageMetered), 1);
        let root = FakeHost::request("GET", "/", &[]);
        fx.worker.tick(&root, &fx.cfg);
        let usage = root.last_call();
        assert_eq!(usage.header(":path"), Some("/v1/usage"));
        assert_eq!(usage.body["actual"], json!(4 * 3 + 15));
    }

    /// A whole JSON answer to a request `message` started.
    fn answer_json(gate: &mut Gate, host: &FakeHost, body: &Value) {
        host.set_status(200);
        host.response_headers
            .borrow_mut()
            .push(("content-type".into(), b"application/json".to_vec()));
        gate.on_response_headers(host);
        let bytes = body.to_string().into_bytes();
        let len = bytes.len();
        *host.response_chunk.borrow_mut() = bytes;
        gate.on_response_body(host, len, true);
    }

    fn sent(fx: &Fixture) -> Vec<crate::fake::Call> {
        let root = FakeHost::request("GET", "/", &[]);
        fx.worker.tick(&root, &fx.cfg);
        let calls = root.calls.borrow().clone();
        calls
    }

    const USAGE: &str = r#"{"model": "m", "usage": {"input_tokens": 4, "cache_read_input_tokens": 2, "output_tokens": 6}}"#;

    #[test]
    fn the_usage_line_reaches_the_ledger_even_when_the_price_is_the_hold() {
        let fx = Fixture::new(CFG);
        // No max_tokens: the hold is the estimate, 100. (A cached token is priced like an
        // input token when the table names no cached price.)
        let (host, mut gate) = message(&fx, &json!({"model": "m", "messages": []}));
        respond(
            &mut gate,
            &host,
            host.last_call().token,
            &allow("acct", 900),
        );
        let usage: Value =
            serde_json::from_str(&USAGE.replace("\"output_tokens\": 6", "\"output_tokens\": 296"))
                .unwrap();
        answer_json(&mut gate, &host, &usage);
        let calls = sent(&fx);
        let [call] = calls.as_slice() else {
            panic!("one usage call: {calls:?}")
        };
        assert_eq!(call.header(":path"), Some("/v1/usage"));
        assert_eq!(
            call.body,
            json!({"request_id": "req-1", "account": "k", "actual": (4 + 2) * 3 + 296 * 15,
                   "route": "claude", "model": "m",
                   "tokens": {"input": 4, "cached_input": 2, "cache_creation_input": 0, "output": 296, "reasoning": 0}})
        );
        // Exactly the hold: the call is still sent, for its line.
        let fx = Fixture::new(&CFG.replace("\"estimate\": 100", "\"estimate\": 108"));
        let (host, mut gate) = message(&fx, &json!({"model": "m"}));
        respond(
            &mut gate,
            &host,
            host.last_call().token,
            &allow("acct", 900),
        );
        answer_json(&mut gate, &host, &serde_json::from_str(USAGE).unwrap());
        let calls = sent(&fx);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].body["actual"], (4 + 2) * 3 + 6 * 15);
        assert_eq!(calls[0].body["route"], "claude");
    }

    #[test]
    fn a_leased_request_sends_its_usage_line_to_its_lease() {
        let fx = Fixture::new(&CFG.replace(
            "\"routes\"",
            "\"mode\": \"lease\", \"lease_want\": 1000, \"routes\"",
        ));
        *fx.worker.holder.borrow_mut() = "h".into();
        let (host, mut gate) = message(&fx, &json!({"model": "m"}));
        let grant = answer(
            200,
            &[],
            json!({"lease_id": "ls_1", "granted": 1000, "expires_in_ms": 30000, "account_id": "a"}),
        );
        respond(&mut gate, &host, host.last_call().token, &grant);
        answer_json(&mut gate, &host, &serde_json::from_str(USAGE).unwrap());
        let calls = sent(&fx);
        let line: Vec<_> = calls
            .iter()
            .filter(|c| c.header(":path") == Some("/v1/leases/ls_1/usage"))
            .collect();
        let [line] = line.as_slice() else {
            panic!("one usage line: {calls:?}")
        };
        assert_eq!(
            line.body,
            json!({"request_id": "req-1", "units": (4 + 2) * 3 + 6 * 15, "route": "claude", "model": "m",
                   "tokens": {"input": 4, "cached_input": 2, "cache_creation_input": 0, "output": 6, "reasoning": 0}})
        );
        assert!(
            calls.iter().all(|c| c.header(":path") != Some("/v1/usage")),
            "the lease pays: no usage charge"
        );
    }

    #[test]
    fn a_model_missing_from_the_table_is_refused_with_400() {
        let fx = Fixture::new(CFG);
        let (host, _) = message(&fx, &json!({"model": "other", "max_tokens": 1}));
        let reply = host.reply().expect("a reply");
        assert_eq!(reply.status, 400);
        let body: Value = serde_json::from_slice(&reply.body).unwrap();
        assert_eq!(body["model"], "other");
        assert!(
            host.calls.borrow().is_empty(),
            "nothing asked, nothing charged"
        );
        assert_eq!(host.count_of(Metric::UnknownModel), 1);
        // No bound on the output: the estimate is held.
        let fx = Fixture::new(CFG);
        let (host, _) = message(&fx, &json!({"model": "m"}));
        assert_eq!(host.last_call().body["cost"], 100);
    }
}

/// Found by fuzz/fuzz_targets/request_flow.rs: a wake for a stream that was not parked
/// dropped its pending authorization, and the request's trailers then let it through
/// unpaid. A stale wake must leave the request waiting for its answer.
#[test]
fn a_wake_while_authorizing_keeps_the_request_paused() {
    let fx = Fixture::new(CONFIG);
    let host = FakeHost::request("POST", "/v1/models/m/infer", &[("x-api-key", "key-1")]);
    let mut gate = fx.gate();
    assert_eq!(
        gate.on_request_headers_eos(&host, false),
        Flow::Pause(Some(host.last_call().token))
    );
    let token = host.last_call().token;
    assert_eq!(gate.on_wake(&host), Flow::Pause(None));
    assert_eq!(gate.on_request_trailers(&host), Flow::Pause(None));
    assert_eq!(gate.on_request_body(&host, 0, true), Flow::Pause(None));
    assert_eq!(host.count_of(Metric::Allowed), 0);
    // The answer still finds its request.
    assert_eq!(
        gate.on_callout_response(&host, token, &allow("acct_a", 5)),
        Flow::Continue
    );
    assert_eq!(host.count_of(Metric::Allowed), 1);
}
