//! What the gate records for the access log (src/access_log.rs), request by request,
//! through the in-memory host. Kept apart from tests.rs: only the fields are checked here.

use std::rc::Rc;

use serde_json::{json, Value};

use super::*;
use crate::balance_api::CalloutResponse;
use crate::fake::FakeHost;

const CONFIG: &str = r#"{
    "cluster": "balance",
    "routes": [{"name": "health", "exact": "/health", "cost": 0},
               {"name": "infer", "methods": ["POST"], "glob": "/v1/models/*/infer", "cost": 5}]
}"#;

fn gate(config: &str, worker: &Rc<Worker>) -> Gate {
    Gate::new(
        Some(Rc::new(Config::parse(config.as_bytes()).unwrap())),
        worker.clone(),
    )
}

fn answer(status: u16, headers: &[(&str, &str)], body: Value) -> CalloutResponse {
    CalloutResponse {
        status: Some(status),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.to_string().into_bytes(),
        body_too_large: false,
    }
}

fn keyed(method: &str, path: &str, key: &str) -> FakeHost {
    FakeHost::request(method, path, &[("x-api-key", key), ("x-request-id", "r-1")])
}

/// Publishes like the glue after each callback; returns every field set so far.
fn published(gate: &mut Gate, fields: &mut Vec<(&'static str, String)>) -> Value {
    fields.extend(gate.access_log_changes());
    let mut out = serde_json::Map::new();
    for (k, v) in fields.iter() {
        out.insert((*k).to_string(), json!(v));
    }
    Value::Object(out)
}

#[test]
fn an_authorized_request_then_its_refund() {
    let worker = Rc::new(Worker::default());
    let mut g = gate(CONFIG, &worker);
    let host = keyed("POST", "/v1/models/m/infer", "secret-key");
    let mut fields = Vec::new();
    assert_eq!(
        g.on_request_headers(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    // Priced before the answer: route and cost are known, nothing else.
    assert_eq!(
        published(&mut g, &mut fields),
        json!({"farebox.route": "infer", "farebox.cost": "5"})
    );
    let token = host.last_call().token;
    let ok = answer(
        200,
        &[],
        json!({"allow": true, "account_id": "acct_a", "balance": 5}),
    );
    assert_eq!(g.on_callout_response(&host, token, &ok), Flow::Continue);
    assert_eq!(
        published(&mut g, &mut fields),
        json!({"farebox.route": "infer", "farebox.cost": "5",
               "farebox.account": "acct_a", "farebox.decision": "allow"})
    );
    host.set_status(503);
    g.on_response_headers(&host);
    let changes = g.access_log_changes();
    assert_eq!(changes, vec![("farebox.decision", "refunded".to_string())]);
    // The credential is in no field.
    assert!(!fields
        .iter()
        .chain(&changes)
        .any(|(_, v)| v.contains("secret-key")));
}

#[test]
fn a_denial_names_the_account_from_the_service_and_from_the_cache() {
    let worker = Rc::new(Worker::default());
    let host = keyed("GET", "/v1/x", "k");
    let mut first = gate(CONFIG, &worker);
    assert_eq!(
        first.on_request_headers(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    let token = host.last_call().token;
    let deny = answer(
        402,
        &[("cache-control", "max-age=30")],
        json!({"allow": false, "account_id": "acct_poor", "balance": 0, "price": 1}),
    );
    first.on_callout_response(&host, token, &deny);
    let mut fields = Vec::new();
    assert_eq!(
        published(&mut first, &mut fields),
        json!({"farebox.route": "default", "farebox.cost": "1",
               "farebox.account": "acct_poor", "farebox.decision": "deny"})
    );
    // The same account again: the 402 comes from the cache, with the account it named.
    let again = host.sibling(
        "GET",
        "/v1/x",
        &[("x-api-key", "k"), ("x-request-id", "r-2")],
    );
    let mut second = gate(CONFIG, &worker);
    assert_eq!(second.on_request_headers(&again), Flow::Pause(None));
    assert!(again.calls.borrow().is_empty(), "served from the cache");
    let mut fields = Vec::new();
    assert_eq!(
        published(&mut second, &mut fields),
        json!({"farebox.route": "default", "farebox.cost": "1", "farebox.cache": "hit",
               "farebox.account": "acct_poor", "farebox.decision": "deny"})
    );
}

#[test]
fn free_unauthenticated_and_failed_requests() {
    let worker = Rc::new(Worker::default());
    let mut fields = Vec::new();
    let mut g = gate(CONFIG, &worker);
    assert_eq!(
        g.on_request_headers(&FakeHost::request("GET", "/health", &[])),
        Flow::Continue
    );
    assert_eq!(
        published(&mut g, &mut fields),
        json!({"farebox.route": "health", "farebox.cost": "0", "farebox.decision": "free"})
    );

    let mut fields = Vec::new();
    let mut g = gate(CONFIG, &worker);
    g.on_request_headers(&FakeHost::request("GET", "/v1/x", &[]));
    assert_eq!(
        published(&mut g, &mut fields)["farebox.decision"],
        "unauthenticated"
    );

    // The service answers 500: closed and open failure modes.
    for (mode, decision) in [("closed", "fail-closed"), ("open", "fail-open")] {
        let config = format!(r#"{{"cluster": "balance", "failure_mode": "{mode}"}}"#);
        let mut g = gate(&config, &worker);
        let host = keyed("GET", "/v1/x", "k2");
        g.on_request_headers(&host);
        let token = host.last_call().token;
        g.on_callout_response(&host, token, &answer(500, &[], json!({})));
        let mut fields = Vec::new();
        let all = published(&mut g, &mut fields);
        assert_eq!(all["farebox.decision"], decision, "{mode}");
        assert!(
            all.get("farebox.account").is_none(),
            "{mode}: nobody was named"
        );
    }
}

#[test]
fn a_lease_spend_names_the_lease() {
    let worker = Rc::new(Worker::default());
    let config = r#"{"cluster": "balance", "mode": "lease", "lease_want": 10}"#;
    let host = keyed("GET", "/v1/x", "k");
    let mut g = gate(config, &worker);
    assert_eq!(
        g.on_request_headers(&host),
        Flow::Pause(Some(host.last_call().token))
    );
    let token = host.last_call().token;
    let grant = answer(
        200,
        &[],
        json!({"lease_id": "ls_9", "granted": 10, "expires_in_ms": 30000, "account_id": "acct_l"}),
    );
    assert_eq!(g.on_callout_response(&host, token, &grant), Flow::Continue);
    let mut fields = Vec::new();
    assert_eq!(
        published(&mut g, &mut fields),
        json!({"farebox.route": "default", "farebox.cost": "1", "farebox.account": "acct_l",
               "farebox.lease": "ls_9", "farebox.decision": "allow"})
    );
    // The next request spends from the same lease with no call.
    let next = host.sibling(
        "GET",
        "/v1/x",
        &[("x-api-key", "k"), ("x-request-id", "r-2")],
    );
    let mut g = gate(config, &worker);
    assert_eq!(g.on_request_headers(&next), Flow::Continue);
    let mut fields = Vec::new();
    assert_eq!(published(&mut g, &mut fields)["farebox.lease"], "ls_9");
}

#[test]
fn access_log_false_publishes_nothing() {
    let worker = Rc::new(Worker::default());
    let mut g = gate(r#"{"cluster": "balance", "access_log": false}"#, &worker);
    let host = keyed("GET", "/v1/x", "k");
    g.on_request_headers(&host);
    let token = host.last_call().token;
    let ok = answer(200, &[], json!({"allow": true, "account_id": "acct_a"}));
    assert_eq!(g.on_callout_response(&host, token, &ok), Flow::Continue);
    host.set_status(503);
    g.on_response_headers(&host);
    assert!(g.access_log_changes().is_empty());
}
