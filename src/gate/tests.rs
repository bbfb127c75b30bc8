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

#[path = "lease_mode/tests.rs"]
mod lease_mode;

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

#[path = "metered_and_paid/tests.rs"]
mod metered_and_paid;

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

/// The sequence fuzz/fuzz_targets/request_flow.rs reported as "charged, never forwarded,
/// not refunded" (fuzz/tests/request_flow.rs replays it): the authorize answer is lost, the
/// undo refund is answered with a deny. A final `4xx` to a refund is given up at once and
/// counted, as docs/balance-service.md 3.3 says; nothing is retried behind it.
#[test]
fn an_undo_refused_with_a_final_4xx_is_given_up_and_counted() {
    let fx = Fixture::new(CONFIG);
    let (host, _) = with_answer(&fx, keyed("/a", "k"), status_only(None));
    assert_eq!(host.reply().unwrap().status, 503);
    assert_eq!(fx.queued_refunds(), 1);
    let root = FakeHost::request("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    let refund = root.last_call();
    assert_eq!(refund.header(":path"), Some("/v1/refund"));
    assert_eq!(refund.body["request_id"], "req-1");
    let deny = answer(402, &[], json!({"balance": 0, "price": 3}));
    fx.worker
        .on_outbox_response(&root, &fx.cfg, refund.token, &deny);
    assert!(fx.worker.outbox.borrow().is_empty(), "given up");
    assert_eq!(root.count_of(Metric::RefundFailures), 1);
    assert_eq!(root.count_of(Metric::Refunds), 0);
    for _ in 0..8 {
        root.advance(120_000);
        fx.worker.tick(&root, &fx.cfg);
    }
    assert_eq!(root.calls.borrow().len(), 1, "never sent again");
}

/// A second request with the same `x-request-id`, denied, leaves the first one's undo
/// queued: the outbox keys nothing by request id.
#[test]
fn a_repeated_request_id_denied_keeps_the_first_requests_undo() {
    let fx = Fixture::new(CONFIG);
    let (first, _) = with_answer(&fx, keyed("/a", "k"), status_only(None));
    assert_eq!(first.reply().unwrap().status, 503);
    let deny = answer(402, &[], json!({"balance": 0, "price": 1}));
    let (second, _) = with_answer(&fx, keyed("/a", "k"), deny);
    assert_eq!(second.last_call().body["request_id"], "req-1");
    assert_eq!(second.reply().unwrap().status, 402);
    assert_eq!(fx.queued_refunds(), 1);
    let root = FakeHost::request("GET", "/", &[]);
    fx.worker.tick(&root, &fx.cfg);
    let refund = root.last_call();
    assert_eq!(refund.body["request_id"], "req-1");
    assert_eq!(refund.body["status"], 503);
    fx.worker
        .on_outbox_response(&root, &fx.cfg, refund.token, &status_only(Some(200)));
    assert_eq!(root.count_of(Metric::Refunds), 1);
    assert!(fx.worker.outbox.borrow().is_empty());
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

#[path = "token_tables/tests.rs"]
mod token_tables;

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

#[test]
fn payments_never_reach_the_upstream_of_a_free_route() {
    // A payment is a bearer instrument until settled: the upstream must not get it,
    // even on a route that costs nothing.
    let fx = Fixture::new(CONFIG);
    let payments = [
        ("payment-signature", "eyJwYXkiOnRydWV9"),
        ("x-payment", "eyJ4NDAyIjp0cnVlfQ"),
        ("authorization", "Payment id=\"c1\", credential=\"e30\""),
    ];
    // All of them, and each alone: any one of them is enough to be looked for (a
    // Payment-scheme Authorization with no payment header too).
    let alone = payments.iter().map(std::slice::from_ref);
    for sent in std::iter::once(&payments[..]).chain(alone) {
        let host = FakeHost::request("GET", "/health", sent);
        let mut gate = fx.gate();
        assert_eq!(gate.on_request_headers(&host), Flow::Continue);
        for (name, _) in payments {
            assert_eq!(
                host.upstream_header(name),
                None,
                "{name} reached the upstream (sent: {sent:?})"
            );
        }
    }
}

#[test]
fn a_free_routes_own_authorization_goes_on() {
    let fx = Fixture::new(CONFIG);
    let host = FakeHost::request(
        "GET",
        "/health",
        &[
            ("x-payment", "eyJ4NDAyIjp0cnVlfQ"),
            ("authorization", "Bearer upstream-tok"),
        ],
    );
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&host), Flow::Continue);
    assert_eq!(host.upstream_header("x-payment"), None);
    assert_eq!(
        host.upstream_header("authorization").as_deref(),
        Some("Bearer upstream-tok"),
        "only a Payment-scheme Authorization is the gate's"
    );
}

/// An allow the service let the gate keep for 30 s, then a request served from it.
fn served_from_a_cached_allow(config: &str) -> FakeHost {
    let fx = Fixture::new(config);
    let cached_allow = answer(
        200,
        &[("cache-control", "max-age=30")],
        json!({"allow": true, "account_id": "acct_1", "balance": 95}),
    );
    let (host, _) = with_answer(&fx, keyed("/v1/data", "key-1"), cached_allow);
    let again = host.sibling("GET", "/v1/data", &[("x-api-key", "key-1")]);
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers(&again), Flow::Continue);
    assert!(again.calls.borrow().is_empty(), "served from the cache");
    again.set_status(200);
    again.host_calls.borrow_mut().clear();
    gate.on_response_headers(&again);
    again
}

#[test]
fn a_response_with_nothing_to_give_back_or_tell_is_not_read() {
    // A cached allow shows no (stale) balance and has no budget: both headers are
    // configured, neither has anything to tell.
    let config = CONFIG.replace(
        "\"balance_header\": \"x-farebox-balance\"",
        "\"balance_header\": \"x-farebox-balance\", \"budget_header\": \"x-farebox-budget\"",
    );
    let host = served_from_a_cached_allow(&config);
    assert_eq!(host.host_call_counts(), vec![]);
}

#[test]
fn made_up_ids_are_unique_across_workers_at_the_same_moment() {
    // Workers lay out memory alike and share the clock: only their random tag tells
    // their ids apart, and the service deduplicates by id.
    let host = FakeHost::request("GET", "/", &[]);
    let workers: Vec<Worker> = (0..8).map(|_| Worker::default()).collect();
    let ids: std::collections::HashSet<String> = workers.iter().map(|w| w.make_id(&host)).collect();
    assert_eq!(ids.len(), workers.len(), "{ids:?}");
    // One worker keeps its tag: its ids differ by sequence only.
    let w = Worker::default();
    let (a, b) = (w.make_id(&host), w.make_id(&host));
    assert_eq!(
        a.rsplit_once('-').map(|x| x.0),
        b.rsplit_once('-').map(|x| x.0)
    );
    assert_ne!(a, b);
}

#[test]
fn a_failed_open_request_that_is_not_served_is_refunded() {
    // The service may have charged before its answer was lost: if the upstream then
    // fails, that possible charge goes back like any other unserved request's.
    let fx = Fixture::new(r#"{"cluster": "balance", "failure_mode": "open"}"#);
    let (host, mut gate) = with_answer(&fx, keyed("/a", "k"), answer(500, &[], Value::Null));
    assert_eq!(host.count_of(Metric::FailOpen), 1);
    assert_eq!(fx.queued_refunds(), 0);
    host.set_status(503);
    gate.on_response_headers(&host);
    assert_eq!(fx.queued_refunds(), 1);
}

#[test]
fn an_empty_last_chunk_is_not_read() {
    let fx = Fixture::new(
        r#"{"cluster": "balance", "routes": [{"name": "chat", "prefix": "/v1/chat/",
            "usage": {"json_pointer": "/usage/total_tokens", "unit_cost": 2, "estimate": 100}}]}"#,
    );
    let (host, mut gate) = with_answer(&fx, keyed("/v1/chat/x", "k"), allow("acct", 900));
    host.set_status(200);
    host.response_headers
        .borrow_mut()
        .push(("content-type".into(), b"application/json".to_vec()));
    gate.on_response_headers(&host);
    host.host_calls.borrow_mut().clear();
    gate.on_response_body(&host, 0, true);
    assert_eq!(
        host.host_calls
            .borrow()
            .get(&crate::fake::HostCall::ResponseBody),
        None
    );
}

#[test]
fn an_anonymous_caller_is_asked_about_where_allowed() {
    // `anonymous`: a request with no credential at all goes to the service, which
    // answers with what to pay; a malformed credential is still refused here.
    let fx = Fixture::new(r#"{"cluster": "balance", "anonymous": true}"#);
    let host = FakeHost::request("GET", "/a", &[("x-request-id", "req-1")]);
    let mut gate = fx.gate();
    assert_eq!(
        gate.on_request_headers(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    assert_eq!(host.last_call().body["account"], Value::Null);
    let host = FakeHost::request("GET", "/a", &[("x-api-key", "a b")]);
    assert_eq!(fx.gate().on_request_headers(&host), Flow::Pause(None));
    assert_eq!(host.reply().map(|r| r.status), Some(401));
    assert!(host.calls.borrow().is_empty());
}

#[test]
fn a_missing_bearer_token_is_challenged_without_an_error() {
    // RFC 6750 §3.1: a request with no token gets no error code; a bad one gets invalid_token.
    let fx = Fixture::new(r#"{"cluster": "balance", "credential": {"source": "bearer"}}"#);
    for (sent, challenge) in [
        (None, "Bearer realm=\"farebox\""),
        (
            Some("Basic a2V5"),
            "Bearer realm=\"farebox\", error=\"invalid_token\"",
        ),
    ] {
        let headers: Vec<(&str, &str)> = sent.map(|v| ("authorization", v)).into_iter().collect();
        let host = FakeHost::request("GET", "/a", &headers);
        assert_eq!(fx.gate().on_request_headers(&host), Flow::Pause(None));
        assert_eq!(host.reply().map(|r| r.status), Some(401));
        assert_eq!(
            reply_header(&host, "www-authenticate").as_deref(),
            Some(challenge)
        );
    }
}

#[test]
fn a_route_not_priced_by_usage_is_not_metered() {
    // Only a usage rule meters its response (and counts one it cannot read).
    let fx = Fixture::new(CONFIG);
    let host = FakeHost::request("POST", "/v1/models/m1/infer", &[("x-api-key", "k")]);
    let (host, mut gate) = with_answer(&fx, host, allow("acct", 9));
    host.set_status(200);
    gate.on_response_headers(&host);
    gate.on_response_body(&host, 0, true);
    gate.on_log(&host);
    assert_eq!(host.count_of(Metric::UsageUnread), 0);
    assert_eq!(host.count_of(Metric::UsageMetered), 0);
}

#[test]
fn without_a_decision_cache_an_answer_is_never_kept() {
    // `cache_max_entries: 0` turns the cache off: an allow the service would let us
    // keep is asked about again by the next request.
    let fx = Fixture::new(r#"{"cluster": "balance", "cache_max_entries": 0}"#);
    let keep = answer(
        200,
        &[("cache-control", "max-age=60")],
        json!({"allow": true, "account_id": "acct_1"}),
    );
    let (host, _) = with_answer(&fx, keyed("/x", "k"), keep);
    assert_eq!(host.resumed.get(), 1);
    let again = host.sibling("GET", "/x", &[("x-api-key", "k")]);
    assert_eq!(
        fx.gate().on_request_headers(&again),
        Flow::Pause(Some(again.last_call().token)),
        "asked again, not served from a cache that is off"
    );
    assert_eq!(again.count_of(Metric::CacheHits), 0);
}
