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

#[test]
fn a_model_name_that_is_empty_or_too_long_is_no_model() {
    let fx = Fixture::new(CFG);
    let longest = "m".repeat(crate::tokens::MAX_MODEL_LEN);
    let too_long = "m".repeat(crate::tokens::MAX_MODEL_LEN + 1);
    for (model, named) in [
        ("", Value::Null),
        (too_long.as_str(), Value::Null),
        (longest.as_str(), json!(longest)),
    ] {
        let (host, _) = message(&fx, &json!({"model": model, "max_tokens": 1}));
        assert_eq!(host.reply().map(|r| r.status), Some(400));
        let body: Value = serde_json::from_slice(&host.reply().unwrap().body).unwrap();
        assert_eq!(body["model"], named, "model of {} bytes", model.len());
    }
}
