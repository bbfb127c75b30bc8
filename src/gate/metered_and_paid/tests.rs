use super::*;
use crate::payments;

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

    let search =
        json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {"name": "search"}});
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
        let (host, _, flow) = mcp_call(&fx, json!({"jsonrpc": "2.0", "id": 1, "method": method}));
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
    let bytes = body.as_bytes();
    let half = bytes.len() / 2;
    mcp_answered_in(
        fx,
        content_type,
        &[(&bytes[..half], false), (&bytes[half..], true)],
    )
}

/// An MCP tool call answered with `chunks` (each with its end-of-stream flag).
fn mcp_answered_in(fx: &Fixture, content_type: &str, chunks: &[(&[u8], bool)]) -> FakeHost {
    let call =
        json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call", "params": {"name": "search"}});
    let (host, mut gate, flow) = mcp_call(fx, call);
    assert_eq!(flow, Flow::Pause(Some(host.last_call().token)));
    respond(&mut gate, &host, host.last_call().token, &allow("acct", 95));
    upstream_answers(&host, &mut gate, content_type, chunks);
    host
}

/// The upstream answers a forwarded request with 200 and `chunks`.
fn upstream_answers(
    host: &FakeHost,
    gate: &mut Gate,
    content_type: &str,
    chunks: &[(&[u8], bool)],
) {
    host.set_status(200);
    host.response_headers
        .borrow_mut()
        .push(("content-type".into(), content_type.as_bytes().to_vec()));
    gate.on_response_headers(host);
    for (chunk, eos) in chunks {
        *host.response_chunk.borrow_mut() = chunk.to_vec();
        gate.on_response_body(host, chunk.len(), *eos);
    }
}

#[test]
fn a_failed_open_mcp_call_answered_with_an_error_is_given_back() {
    // Failing open keeps what the service may have charged, and the answer is still
    // read for a JSON-RPC error, which gives it back as for an allowed call.
    let fx = Fixture::new(&CFG.replace(
        r#""html_402": true"#,
        r#""html_402": true, "failure_mode": "open""#,
    ));
    let (host, mut gate, flow) = mcp_call(&fx, search_call(42, "search"));
    assert_eq!(flow, Flow::Pause(Some(host.last_call().token)));
    respond(
        &mut gate,
        &host,
        host.last_call().token,
        &status_only(Some(500)),
    );
    assert_eq!(host.count_of(Metric::FailOpen), 1);
    let err = br#"{"jsonrpc":"2.0","id":42,"error":{"code":-32602,"message":"Unknown tool"}}"#;
    upstream_answers(&host, &mut gate, "application/json", &[(err, true)]);
    assert_eq!(host.count_of(Metric::McpErrorRefunds), 1);
    assert_eq!(fx.queued_refunds(), 1);
}

#[test]
fn only_a_single_paid_call_with_an_id_is_read_for_its_error() {
    // An error answer that is not one call's own (a batch's, or one with a null id
    // for a notification) does not undo the charge.
    let fx = Fixture::new(CFG);
    let batch = json!([search_call(1, "search"), search_call(2, "search")]);
    let (host, mut gate, flow) = mcp_call(&fx, batch);
    assert_eq!(flow, Flow::Pause(Some(host.last_call().token)));
    assert_eq!(host.last_call().body["cost"], 10);
    respond(&mut gate, &host, host.last_call().token, &allow("acct", 95));
    let err = br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"Unknown tool"}}"#;
    upstream_answers(&host, &mut gate, "application/json", &[(err, true)]);
    assert_eq!(host.count_of(Metric::McpErrorRefunds), 0);

    let claim = [("mcp-method", "tools/call"), ("mcp-name", "search")];
    let mut note = search_call(0, "search");
    note.as_object_mut().unwrap().remove("id");
    let (host, mut gate, _) = mcp_claimed(&fx, &claim, &note);
    respond(&mut gate, &host, host.last_call().token, &allow("acct", 95));
    assert_eq!(send_body(&host, &mut gate), Flow::Continue);
    let err = br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#;
    upstream_answers(&host, &mut gate, "application/json", &[(err, true)]);
    assert_eq!(host.count_of(Metric::McpErrorRefunds), 0);
    assert_eq!(fx.queued_refunds(), 0);
}

#[test]
fn an_mcp_answers_empty_last_chunk_is_not_read() {
    let fx = Fixture::new(CFG);
    let err = r#"{"jsonrpc":"2.0","id":42,"error":{"code":-32602,"message":"Unknown tool"}}"#;
    let host = mcp_answered_in(
        &fx,
        "application/json",
        &[(err.as_bytes(), false), (b"", true)],
    );
    assert_eq!(fx.queued_refunds(), 1, "the error is still seen at the end");
    assert_eq!(
        host.host_calls
            .borrow()
            .get(&crate::fake::HostCall::ResponseBody),
        Some(&1)
    );
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

/// A `tools/call` of `search` exactly `len` bytes long (padded in its arguments).
fn search_call_of_len(id: u64, len: usize) -> Value {
    let mut call = search_call(id, "search");
    call["params"]["arguments"] = json!({"pad": ""});
    let pad = len - call.to_string().len();
    call["params"]["arguments"]["pad"] = json!("x".repeat(pad));
    assert_eq!(call.to_string().len(), len);
    call
}

#[test]
fn a_body_of_exactly_max_body_bytes_is_read() {
    let fx = Fixture::new(CFG);
    // Priced from the body, read whole at the limit.
    let (host, _, flow) = mcp_call(&fx, search_call_of_len(42, 200));
    assert_eq!(flow, Flow::Pause(Some(host.last_call().token)));
    assert_eq!(host.last_call().body["cost"], 5);
    // Priced from its headers: the body held at the limit is checked and goes on.
    let claim = [("mcp-method", "tools/call"), ("mcp-name", "search")];
    let (host, mut gate, _) = mcp_claimed(&fx, &claim, &search_call_of_len(5, 200));
    respond(&mut gate, &host, host.last_call().token, &allow("acct", 95));
    assert_eq!(send_body(&host, &mut gate), Flow::Continue);
    assert!(host.reply().is_none());
    assert_eq!(host.count_of(Metric::BodyTooLarge), 0);
}

#[test]
fn trailers_end_a_body_that_prices_the_request() {
    let fx = Fixture::new(CFG);
    let host = FakeHost::request("POST", "/mcp", &[("x-api-key", "k")]);
    *host.request_body.borrow_mut() = search_call(42, "search").to_string().into_bytes();
    let mut gate = fx.gate();
    assert_eq!(gate.on_request_headers_eos(&host, false), Flow::Continue);
    host.headers_locked.set(true);
    let size = host.request_body.borrow().len();
    assert_eq!(gate.on_request_body(&host, size, false), Flow::Pause(None));
    assert!(host.calls.borrow().is_empty());
    assert_eq!(
        gate.on_request_trailers(&host),
        Flow::Pause(Some(host.last_call().token)),
        "priced by the body the trailers ended"
    );
    assert_eq!(host.last_call().body["cost"], 5);
}

#[test]
fn trailers_end_a_held_body_which_is_then_checked() {
    let fx = Fixture::new(CFG);
    // Free by its headers, a paid call by its body: refused once the trailers end it.
    let (host, mut gate, flow) = mcp_claimed(
        &fx,
        &[("mcp-method", "tools/list")],
        &search_call(9, "search"),
    );
    assert_eq!(flow, Flow::Continue);
    host.headers_locked.set(true);
    let size = host.request_body.borrow().len();
    assert_eq!(gate.on_request_body(&host, size, false), Flow::Pause(None));
    assert_eq!(gate.on_request_trailers(&host), Flow::Pause(None));
    assert_eq!(host.reply().map(|r| r.status), Some(400));
    assert_eq!(host.count_of(Metric::McpHeaderMismatch), 1);

    // Trailers while the decision is pending wait for it, body checked or not.
    let claim = [("mcp-method", "tools/call"), ("mcp-name", "search")];
    let (host, mut gate, flow) = mcp_claimed(&fx, &claim, &search_call(5, "search"));
    assert_eq!(flow, Flow::Pause(Some(host.last_call().token)));
    assert_eq!(gate.on_request_trailers(&host), Flow::Pause(None));
    assert_eq!(host.count_of(Metric::Allowed), 0);
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
    let host = interrupted_stream(&fx, "data: {\"choices\":[]}\n\n");
    assert_eq!(host.count_of(Metric::UsageUnread), 1);
    assert_eq!(fx.queued_refunds(), 0);
}

#[test]
fn lease_mode_usage_adjusts_the_lease() {
    let (_, host) = leased_chat(1000, 15, |h| assert_eq!(lease_used(h), 100, "the hold"));
    assert_eq!(
        lease_used(&host),
        30,
        "15 tokens at 2: the rest of the hold is back in the lease"
    );
}

/// A lease-mode chat request granted `granted` units whose response reports
/// `tokens` (at 2 units each, over a hold of 100); `meanwhile` runs on the host
/// between the response headers and its body. Returns the fixture and the host.
fn leased_chat(granted: u64, tokens: u64, meanwhile: impl Fn(&FakeHost)) -> (Fixture, FakeHost) {
    let fx = Fixture::new(&CFG.replace(
        "\"html_402\": true",
        "\"mode\": \"lease\", \"lease_want\": 1000",
    ));
    *fx.worker.holder.borrow_mut() = "h".into();
    let grant = answer(
        200,
        &[],
        json!({"lease_id": "ls_1", "granted": granted, "expires_in_ms": 30000, "account_id": "a"}),
    );
    let host = FakeHost::request(
        "POST",
        "/v1/chat/x",
        &[("x-api-key", "k"), ("x-request-id", "r")],
    );
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    respond(&mut gate, &host, host.last_call().token, &grant);
    host.set_status(200);
    host.response_headers
        .borrow_mut()
        .push(("content-type".into(), b"application/json".to_vec()));
    gate.on_response_headers(&host);
    meanwhile(&host);
    let body = format!(r#"{{"usage": {{"total_tokens": {tokens}}}}}"#);
    *host.response_chunk.borrow_mut() = body.clone().into_bytes();
    gate.on_response_body(&host, body.len(), true);
    (fx, host)
}

fn lease_used(host: &FakeHost) -> u64 {
    let (bytes, _) = host
        .shared
        .borrow()
        .get(&crate::lease::LeaseKey::new("balance", "k").slot_key(16_384))
        .cloned()
        .expect("a lease slot");
    crate::lease::LeaseRecord::decode(&bytes)
        .expect("a lease record")
        .used
}

/// What the outbox sends now: (path, body) of each call.
fn outbox_calls(fx: &Fixture) -> Vec<(String, Value)> {
    let root = FakeHost::request("GET", "/", &[]);
    fx.worker.outbox.borrow_mut().flush(&root, &fx.cfg);
    let calls = root.calls.borrow();
    calls
        .iter()
        .map(|c| {
            (
                c.header(":path").unwrap_or_default().to_string(),
                c.body.clone(),
            )
        })
        .collect()
}

#[test]
fn usage_over_the_hold_is_spent_from_the_lease() {
    // 60 tokens at 2 = 120 against a hold of 100: the 20 more come from the lease.
    let (fx, host) = leased_chat(1000, 60, |_| {});
    assert_eq!(lease_used(&host), 120);
    assert!(outbox_calls(&fx).is_empty(), "the lease paid it all");
}

#[test]
fn usage_over_what_the_lease_has_left_is_charged_directly() {
    // 110 granted, 100 held: the overage of 20 does not fit in the 10 left.
    let (fx, host) = leased_chat(110, 60, |_| {});
    assert_eq!(lease_used(&host), 100, "the lease keeps only the hold");
    let calls = outbox_calls(&fx);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].0, "/v1/usage");
    assert_eq!(calls[0].1["request_id"], "r-overage");
    assert_eq!(calls[0].1["actual"], 20, "only the overage, charged once");
}

#[test]
fn usage_equal_to_the_hold_settles_nothing_even_without_the_lease() {
    // The lease is gone by the time the body ends (replaced, closed): an exact
    // hold has nothing to give back or charge, so no call of zero units is queued.
    let key = crate::lease::LeaseKey::new("balance", "k").slot_key(16_384);
    let (fx, _) = leased_chat(1000, 50, |h| {
        h.shared.borrow_mut().remove(&key);
    });
    let calls = outbox_calls(&fx);
    assert!(calls.is_empty(), "{calls:?}");
}

#[test]
fn usage_equal_to_the_hold_sends_no_adjustment() {
    let fx = Fixture::new(CFG);
    let body = json!({"usage": {"total_tokens": 50}}).to_string();
    let (host, _) = chat(&fx, &body, "application/json", 200);
    assert_eq!(host.count_of(Metric::UsageMetered), 1);
    assert!(
        queued_usage(&fx).is_empty(),
        "50 tokens at 2 is the hold of 100"
    );
}

/// A stream whose first chunk is `chunk`, then cut short.
fn interrupted_stream(fx: &Fixture, chunk: &str) -> FakeHost {
    let host = FakeHost::request(
        "POST",
        "/v1/chat/x",
        &[("x-api-key", "k"), ("x-request-id", "req-1")],
    );
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
    *host.response_chunk.borrow_mut() = chunk.as_bytes().to_vec();
    gate.on_response_body(&host, chunk.len(), false);
    gate.on_log(&host);
    host
}

fn usage_event(tokens: u64) -> String {
    format!("data: {{\"usage\":{{\"total_tokens\":{tokens}}}}}\n\n")
}

#[test]
fn an_interrupted_stream_pays_what_it_reported_but_never_more_than_the_hold() {
    let fx = Fixture::new(CFG);
    let host = interrupted_stream(&fx, &usage_event(20));
    assert_eq!(host.count_of(Metric::UsageMetered), 1);
    assert_eq!(
        queued_usage(&fx)[0].clone(),
        Job::Usage {
            request_id: "req-1".into(),
            account: "k".into(),
            actual: 40,
            line: None,
        }
    );
    for tokens in [50, 70] {
        // At or over the hold, a partial report is no final price: the hold stands.
        let fx = Fixture::new(CFG);
        let host = interrupted_stream(&fx, &usage_event(tokens));
        assert_eq!(host.count_of(Metric::UsageUnread), 1, "{tokens} tokens");
        assert_eq!(host.count_of(Metric::UsageMetered), 0, "{tokens} tokens");
        assert!(queued_usage(&fx).is_empty(), "{tokens} tokens");
    }
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
fn a_paid_request_is_told_its_balance() {
    // Paid by its payment, so nothing to give back or meter: the balance is still told.
    let fx = Fixture::new(&CFG.replace(
        "\"html_402\": true",
        "\"html_402\": true, \"balance_header\": \"x-farebox-balance\"",
    ));
    let host = FakeHost::request(
        "GET",
        "/v1/data",
        &[("payment-signature", "eyJwYXkiOnRydWV9")],
    );
    let mut gate = fx.gate();
    gate.on_request_headers(&host);
    let paid = answer(
        200,
        &[],
        json!({"allow": true, "account_id": "payer_1", "balance": 7, "payment_response": {"success": true, "transaction": "0x1"}}),
    );
    respond(&mut gate, &host, host.last_call().token, &paid);
    host.set_status(200);
    gate.on_response_headers(&host);
    assert_eq!(
        host.client_header("x-farebox-balance").as_deref(),
        Some("7")
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
fn a_payment_credential_gets_its_receipt_on_success_only() {
    let fx = Fixture::new(CFG);
    let receipt = json!({"status": "success", "method": "evm", "reference": "0x1",
                         "timestamp": "2026-12-01T00:00:00Z"});
    let paid = answer(
        200,
        &[],
        json!({"allow": true, "account_id": "payer_1", "payment_receipt": receipt}),
    );
    for (status, told) in [(200, true), (204, true), (500, false), (404, false)] {
        let host = FakeHost::request(
            "GET",
            "/v1/data",
            &[
                ("authorization", "Payment eyJjIjoxfQ"),
                ("x-request-id", "r"),
            ],
        );
        let mut gate = fx.gate();
        assert_eq!(
            gate.on_request_headers(&host),
            Flow::Pause(Some(host.last_call().token))
        );
        let call = host.last_call();
        assert_eq!(call.body["payment"], "eyJjIjoxfQ");
        assert_eq!(call.body["payment_scheme"], "payment");
        respond(&mut gate, &host, call.token, &paid);
        host.set_status(status);
        host.set_response_header("cache-control", "public, max-age=60");
        gate.on_response_headers(&host);
        let header = host.client_header("payment-receipt");
        assert_eq!(header.is_some(), told, "{status}");
        if let Some(h) = header {
            assert_eq!(h, payments::payment_receipt_header(&receipt));
        }
        assert_eq!(host.client_header("payment-response"), None);
        if told {
            assert_eq!(
                host.client_header("cache-control").as_deref(),
                Some("private, max-age=60"),
                "a paid response is the payer's alone"
            );
        }
        assert!(
            host.shared.borrow().is_empty(),
            "a paid decision is not cached"
        );
    }
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
    // A client that asks for something else gets the problem document.
    let host = FakeHost::request(
        "GET",
        "/v1/data",
        &[("x-api-key", "k"), ("accept", "application/json")],
    );
    let (host, _) = with_answer(&fx, host, answer(402, &[], json!({"price": 3})));
    assert_eq!(
        reply_header(&host, "content-type").as_deref(),
        Some("application/problem+json")
    );
}
