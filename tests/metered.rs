//! Metered AI and payments end to end: MCP tool prices, LLM token usage (JSON
//! and SSE), and machine-payable 402s, in a real Envoy with the reference
//! balance service and mock upstreams.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;

use common::*;
use serde_json::{json, Value};

const ACCOUNT: &str = "acct-meter";
const KEY: &str = "fbk-meter-5eed";

/// A stack whose upstream is one of the mock services.
fn stack_with_upstream(
    label: &str,
    upstream: &str,
    plugin: Value,
    balance: BalanceOpts,
) -> (Stack, Proc) {
    let dir = TempDir::new(&format!("{label}-upstream"));
    let (proc, addr) = start_service(upstream, dir.path());
    std::mem::forget(dir); // the upstream's log stays for a failing test to read
    let s = stack(label)
        .plugin(|c| *c = plugin)
        .balance_opts(balance)
        .upstream_addr(addr)
        .start();
    (s, proc)
}

fn plugin(routes: Value) -> Value {
    let mut c = demo_plugin_config();
    c["timeout_ms"] = json!(3000);
    c["routes"] = routes;
    c
}

fn charges_by_id(s: &Stack) -> std::collections::HashMap<String, Value> {
    s.balance()
        .charges(ACCOUNT)
        .into_iter()
        .map(|c| (c["request_id"].as_str().unwrap().to_string(), c))
        .collect()
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn mcp_session_is_priced_per_tool_and_method() {
    // The README's rule: plumbing, discovery and listing are free without naming them.
    let routes = json!([{"name": "mcp", "exact": "/mcp", "cost": 1,
        "mcp": {"tools": {"search": 5, "fetch": 2}}}]);
    let (s, _mcp) =
        stack_with_upstream("mcp", "farebox-mcp", plugin(routes), BalanceOpts::default());
    s.balance().create_account(ACCOUNT, KEY, 100);
    let rpc = |body: Value, key: Option<&str>| {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(k) = key {
            headers.push(("x-api-key", k));
        }
        s.request("POST", "/mcp", &headers, body.to_string().as_bytes())
    };
    let call = |id: u64, tool: &str| json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {"q": "x"}}});

    // Free methods: no credential needed, no callout.
    assert_eq!(
        rpc(
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}),
            None
        )
        .status,
        200
    );
    assert_eq!(
        rpc(
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            None
        )
        .status,
        202
    );
    let list = rpc(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        None,
    );
    assert_eq!(list.status, 200, "{}", list.text());
    // ping, discovery (server/discover: MCP 2026-07-28), the event stream (405 here) and
    // closing the session: all free, with or without a credential.
    for (method, key) in [("ping", None), ("server/discover", Some(KEY))] {
        let r = rpc(json!({"jsonrpc": "2.0", "id": 3, "method": method}), key);
        assert_eq!(r.status, 200, "{method}: {}", r.text());
    }
    for method in ["GET", "DELETE"] {
        let r = s.request(method, "/mcp", &[("x-api-key", KEY)], b"");
        assert_eq!(r.status, 405, "{method} reaches the server: {}", r.text());
    }
    assert_eq!(s.balance().authorize_calls(), 0);

    // Priced tools: 3 × search (5), 2 × fetch (2), 1 × echo (the rule's 1).
    for (i, tool) in ["search", "fetch", "search", "echo", "fetch", "search"]
        .iter()
        .enumerate()
    {
        let r = rpc(call(10 + i as u64, tool), Some(KEY));
        assert_eq!(r.status, 200, "{tool}: {}", r.text());
        assert_eq!(r.json()["result"]["isError"], false);
    }
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(
        (num(&acct, "charged"), num(&acct, "balance")),
        (20, 80),
        "{acct}"
    );
    let routes: Vec<String> = s
        .balance()
        .charges(ACCOUNT)
        .iter()
        .map(|c| c["route"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        routes
            .iter()
            .filter(|r| *r == "mcp/tools/call:search")
            .count(),
        3,
        "{routes:?}"
    );
    assert_eq!(
        routes
            .iter()
            .filter(|r| *r == "mcp/tools/call:echo")
            .count(),
        1,
        "{routes:?}"
    );

    // A paid call the server answers with a JSON-RPC error (an unknown tool: -32602)
    // is charged, then given back.
    let r = rpc(call(50, "nope"), Some(KEY));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], -32602);
    let acct = wait_until_account(&s, |a| num(a, "refunded") == 1);
    assert_eq!(
        (
            num(&acct, "charged"),
            num(&acct, "refunded"),
            num(&acct, "balance")
        ),
        (20, 1, 80),
        "{acct}: charged is net of refunds"
    );

    // A tool call the account cannot pay: HTTP 200 (MCP clients read only a 2xx) and a
    // tool result with isError, the PaymentRequired in structuredContent (x402's MCP
    // transport); the text says price, balance and why.
    s.balance().create_account("acct-poor", "fbk-poor", 3);
    let r = rpc(call(99, "search"), Some("fbk-poor"));
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (body["jsonrpc"].clone(), body["id"].clone()),
        (json!("2.0"), json!(99))
    );
    assert_eq!(body["result"]["isError"], true, "{body}");
    let text = body["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("Payment Required: ") && text.ends_with("(price 5, balance 3)"),
        "{text}"
    );
    let problem = &body["result"]["structuredContent"];
    assert_eq!(
        (problem["status"].clone(), problem["price"].clone()),
        (json!(402), json!(5))
    );
    assert_eq!(problem["route"], "mcp/tools/call:search");
    // Other refusals are JSON-RPC errors whose code is the refusal's HTTP status (402
    // for payment, 401 here for an unknown key): outside JSON-RPC's and MCP's ranges.
    let r = rpc(
        json!({"jsonrpc": "2.0", "id": 100, "method": "resources/read", "params": {"uri": "x"}}),
        Some("fbk-poor-none"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let err = &r.json()["error"];
    assert_eq!(err["code"], 401, "{err}");
    assert!(
        err["message"].as_str().unwrap().starts_with("Unauthorized"),
        "{err}"
    );

    // A body over max_body_bytes (default 64 KiB) is refused before any callout.
    let huge = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "search", "arguments": {"q": "x".repeat(70_000)}}});
    let before = s.balance().authorize_calls();
    assert_eq!(rpc(huge, Some(KEY)).status, 413);
    assert_eq!(s.balance().authorize_calls(), before);
    assert_eq!(
        num(&s.balance().account(ACCOUNT), "charged"),
        20,
        "the ledger is exact"
    );
}

/// Polls the account until `done` holds (refunds reach the ledger asynchronously).
fn wait_until_account(s: &Stack, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(5), || {
        last = s.balance().account(ACCOUNT);
        done(&last)
    });
    assert!(ok, "account never got there: {last}");
    last
}

fn chat(s: &Stack, body: Value, extra: &[(&str, &str)]) -> Response {
    let mut headers = vec![("x-api-key", KEY), ("content-type", "application/json")];
    headers.extend_from_slice(extra);
    s.request(
        "POST",
        "/v1/chat/completions",
        &headers,
        body.to_string().as_bytes(),
    )
}

fn wait_charge(s: &Stack, request_id: &str, want: i64) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(Duration::from_secs(5), || {
        last = charges_by_id(s)
            .get(request_id)
            .cloned()
            .unwrap_or(Value::Null);
        last["cost"].as_i64() == Some(want)
    });
    assert!(
        ok,
        "request {request_id}: want a charge of {want}, ledger has {last}"
    );
    last
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn llm_usage_is_charged_exactly_in_json_and_sse() {
    let routes = json!([{"name": "chat", "methods": ["POST"], "exact": "/v1/chat/completions",
        "usage": {"json_pointer": "/usage/total_tokens", "unit_cost": 2, "estimate": 1000}}]);
    let (s, _llm) =
        stack_with_upstream("llm", "farebox-llm", plugin(routes), BalanceOpts::default());
    s.balance().create_account(ACCOUNT, KEY, 100_000);
    let messages = json!([{"role": "user", "content": "one two three four"}]);

    // JSON: 4 prompt words + 6 completion tokens = 10 tokens at 2 = 20.
    let r = chat(
        &s,
        json!({"model": "m", "messages": messages, "max_tokens": 6}),
        &[],
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["usage"]["total_tokens"],
        10,
        "the body reaches the client unchanged"
    );
    let json_id = charges_by_id(&s).keys().next().unwrap().clone();
    wait_charge(&s, &json_id, 20);

    // JSON with the usage after 300 KB of content: read from the bounded tail.
    let r = chat(
        &s,
        json!({"model": "m", "messages": messages, "max_tokens": 7, "x_pad_bytes": 300_000}),
        &[],
    );
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 300_000);
    let ids_before: Vec<String> = vec![json_id.clone()];
    let padded_id = charges_by_id(&s)
        .keys()
        .find(|k| !ids_before.contains(k))
        .unwrap()
        .clone();
    wait_charge(&s, &padded_id, 22);

    // SSE with include_usage: 4 + 9 = 13 tokens at 2 = 26; the stream arrives whole.
    let r = chat(
        &s,
        json!({"model": "m", "messages": messages, "max_tokens": 9, "stream": true,
                             "stream_options": {"include_usage": true}}),
        &[],
    );
    assert_eq!(r.status, 200);
    let text = r.text();
    assert!(
        text.contains("data: [DONE]") && text.matches("data: ").count() >= 11,
        "{text}"
    );
    let known: Vec<String> = vec![json_id.clone(), padded_id.clone()];
    let sse_id = charges_by_id(&s)
        .keys()
        .find(|k| !known.contains(k))
        .unwrap()
        .clone();
    wait_charge(&s, &sse_id, 26);

    // A stream that ends without usage is charged at the hold (documented policy).
    let r = chat(
        &s,
        json!({"model": "m", "messages": messages, "max_tokens": 5, "stream": true}),
        &[],
    );
    assert_eq!(r.status, 200);
    let known = [json_id.clone(), padded_id.clone(), sse_id.clone()];
    let no_usage_id = charges_by_id(&s)
        .keys()
        .find(|k| !known.contains(k))
        .unwrap()
        .clone();

    // An upstream 5xx is not charged at all.
    let r = chat(
        &s,
        json!({"model": "m", "messages": messages}),
        &[("x-mock-status", "503")],
    );
    assert_eq!(r.status, 503);
    let known = [
        json_id.clone(),
        padded_id.clone(),
        sse_id.clone(),
        no_usage_id.clone(),
    ];
    let failed_id = charges_by_id(&s)
        .keys()
        .find(|k| !known.contains(k))
        .unwrap()
        .clone();
    let ok = wait_until(Duration::from_secs(5), || {
        charges_by_id(&s)[&failed_id]["status"] == "refunded"
    });
    assert!(ok, "{}", charges_by_id(&s)[&failed_id]);

    // The filter counts the stream without usage as unread when it ends: from then on a
    // (wrong) final price for it would already have been sent before the 5xx's refund.
    expect_metrics(
        &s.envoy,
        &[("usage_metered", 3), ("usage_unread", 1)],
        Duration::from_secs(5),
    );
    assert_eq!(
        charges_by_id(&s)[&no_usage_id]["cost"],
        1000,
        "no usage: the hold"
    );
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(num(&acct, "charged"), 20 + 22 + 26 + 1000, "{acct}");
    assert_eq!(
        num(&acct, "balance"),
        100_000 - (20 + 22 + 26 + 1000),
        "{acct}"
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn machine_payable_402_and_paying_with_x402() {
    let mut c = plugin(json!([]));
    c["anonymous"] = json!(true);
    let opts = x402_balance_opts();
    let s = stack("x402").plugin(|p| *p = c).balance_opts(opts).start();

    // No credential, no payment: the 402 says how to pay, in both schemes.
    let r = s.get("/v1/data?x=1", &[("host", "api.example")]);
    assert_eq!(r.status, 402, "{}", r.text());
    let required: Value = serde_json::from_slice(
        &STANDARD
            .decode(r.header("payment-required").expect("PAYMENT-REQUIRED"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(required["x402Version"], 2);
    assert!(required["error"].is_string());
    assert_eq!(required["resource"]["url"], "http://api.example/v1/data");
    assert!(
        required["resource"]["description"].is_string()
            && required["resource"]["mimeType"].is_string()
    );
    let accepts = required["accepts"].as_array().unwrap();
    assert_eq!(accepts.len(), 1);
    let a = &accepts[0];
    assert_eq!(
        (
            a["scheme"].clone(),
            a["network"].clone(),
            a["amount"].clone(),
            a["asset"].clone(),
            a["payTo"].clone()
        ),
        (
            json!("exact"),
            json!("eip155:84532"),
            json!("1000"),
            json!("0x00000000000000000000000000000000000000a0"),
            json!("0x00000000000000000000000000000000000000b0")
        )
    );
    assert!(a["maxTimeoutSeconds"].is_u64() && a["extra"].is_object());
    let www = r.header_all("www-authenticate");
    let payment = www
        .iter()
        .find(|h| h.starts_with("Payment "))
        .expect("a Payment challenge");
    for param in [
        "id=\"",
        "realm=\"api.example\"",
        "method=\"evm\"",
        "intent=\"charge\"",
        "request=\"",
        "expires=\"",
    ] {
        assert!(payment.contains(param), "{param} in {payment}");
    }
    let request_b64 = payment
        .split("request=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let request: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(request_b64).unwrap()).unwrap();
    assert_eq!(
        (request["amount"].clone(), request["recipient"].clone()),
        (
            json!("1000"),
            json!("0x00000000000000000000000000000000000000b0")
        )
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let problem = r.json();
    assert_eq!(problem["status"], 402);

    // Paying: the payment goes to the service, the settlement comes back.
    let paid_payload = "eyJ4NDAyVmVyc2lvbiI6MiwicGF5bG9hZCI6eyJkZW1vIjoicGFpZCJ9fQ=="; // {"x402Version":2,"payload":{"demo":"paid"}}
    let r = s.get("/v1/data", &[("payment-signature", paid_payload)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let settlement: Value = serde_json::from_slice(
        &STANDARD
            .decode(r.header("payment-response").expect("PAYMENT-RESPONSE"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(settlement["success"], true);
    assert!(settlement["transaction"]
        .as_str()
        .unwrap()
        .starts_with("0x"));
    assert_eq!(settlement["network"], "eip155:84532");
    assert_eq!(
        echoed_header_values(&r, "x-farebox-account"),
        vec!["payer_demo".to_string()]
    );

    // A bad payment is refused with fresh challenges; Authorization: Payment is forwarded too.
    assert_eq!(
        s.get("/v1/data", &[("payment-signature", "bm90LXBhaWQ=")])
            .status,
        402
    );
    let r = s.get("/v1/data", &[("authorization", "Payment demo-paid")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(num(&s.balance().account("payer_demo"), "charged"), 2);
}

/// A keyed client whose account is empty pays on the retry of its 402, keeping its
/// key: the payment goes to the service with the key, pays, and the key names the
/// account. No payment header reaches the upstream; neither the 402 nor the paid
/// decision is cached.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn a_keyed_client_pays_and_payments_stay_at_the_gate() {
    let s = stack("x402-keyed")
        .plugin(|p| *p = plugin(json!([])))
        .balance_opts(x402_balance_opts())
        .start();
    s.balance().create_account(ACCOUNT, KEY, 0);
    let paid_payload = "eyJ4NDAyVmVyc2lvbiI6MiwicGF5bG9hZCI6eyJkZW1vIjoicGFpZCJ9fQ=="; // {"x402Version":2,"payload":{"demo":"paid"}}

    let r = s.get("/v1/data", &[("x-api-key", KEY)]);
    assert_eq!(r.status, 402, "{}", r.text());
    assert!(r.header("payment-required").is_some(), "an x402 offer");

    // Paying with both headers a client may use; a v1 X-PAYMENT goes nowhere either.
    let r = s.get(
        "/v1/data",
        &[
            ("x-api-key", KEY),
            ("payment-signature", paid_payload),
            ("x-payment", "v1-payload"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("payment-response").is_some());
    assert_eq!(
        echoed_header_values(&r, "x-farebox-account"),
        vec![ACCOUNT.to_string()]
    );
    for h in ["payment-signature", "x-payment"] {
        assert_eq!(
            echoed_header_values(&r, h),
            Vec::<String>::new(),
            "{h} reached the upstream"
        );
    }
    assert_eq!(echoed_header_values(&r, "x-api-key"), vec![KEY.to_string()]);

    // The Payment scheme's Authorization is a payment too: stripped.
    let r = s.get(
        "/v1/data",
        &[("x-api-key", KEY), ("authorization", "Payment demo-paid")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        echoed_header_values(&r, "authorization"),
        Vec::<String>::new()
    );
    // An Authorization that is no payment is the upstream's business.
    let r = s.get(
        "/v1/data",
        &[("authorization", "Payment demo-paid"), ("x-api-key", KEY)],
    );
    assert_eq!(r.status, 200);

    // The payments paid; the account's balance did not move.
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(num(&acct, "charged"), 3, "{acct}");
    assert_eq!(num(&acct, "balance"), 0, "{acct}");
    // Nothing paid is remembered: the key alone is refused again, and the 402 was
    // not served from a cache to the paying retries above (they were answered 200).
    assert_eq!(s.get("/v1/data", &[("x-api-key", KEY)]).status, 402);
    let r = s.get(
        "/v1/data",
        &[("x-api-key", KEY), ("payment-signature", "bm90LXBhaWQ=")],
    );
    assert_eq!(
        r.status, 402,
        "a bad payment with a key is the service's to refuse"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
}

/// A body-priced route lets the headers go on before the decision: the payment is
/// kept for the decision and stripped before they go.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn payments_do_not_go_up_with_early_headers() {
    let routes = json!([{"name": "chat", "exact": "/v1/chat/completions",
        "methods": ["POST"], "usage": {"api": "openai_chat",
            "models": {"m": {"input": 1, "output": 4}}, "estimate": 5}}]);
    let s = stack("x402-early")
        .plugin(|p| *p = plugin(routes))
        .balance_opts(x402_balance_opts())
        .start();
    s.balance().create_account(ACCOUNT, KEY, 0);
    let paid_payload = "eyJ4NDAyVmVyc2lvbiI6MiwicGF5bG9hZCI6eyJkZW1vIjoicGFpZCJ9fQ==";
    let r = s.request(
        "POST",
        "/v1/chat/completions",
        &[
            ("x-api-key", KEY),
            ("content-type", "application/json"),
            ("payment-signature", paid_payload),
        ],
        br#"{"model":"m","messages":[]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        echoed_header_values(&r, "payment-signature"),
        Vec::<String>::new()
    );
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(
        (num(&acct, "charged"), num(&acct, "balance")),
        (5, 0),
        "{acct}"
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn browsers_get_a_page_for_402() {
    let mut c = plugin(json!([]));
    c["html_402"] = json!(true);
    let s = stack("html402").plugin(|p| *p = c).start();
    s.balance().create_account(ACCOUNT, KEY, 0);
    let r = s.get(
        "/v1/data",
        &[
            ("x-api-key", KEY),
            ("accept", "text/html,application/xhtml+xml"),
        ],
    );
    assert_eq!(r.status, 402);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(
        r.text().contains("<h1>Payment Required</h1>"),
        "{}",
        r.text()
    );
    let r = s.get("/v1/data", &[("x-api-key", KEY)]);
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn llm_refusals_are_openai_errors_and_carry_the_request_id() {
    let routes = json!([{"name": "chat", "exact": "/v1/chat/completions",
        "usage": {"json_pointer": "/usage/total_tokens", "unit_cost": 2, "estimate": 1000}}]);
    let (s, _llm) = stack_with_upstream(
        "llm-errors",
        "farebox-llm",
        plugin(routes),
        BalanceOpts::default(),
    );
    s.balance().create_account(ACCOUNT, KEY, 100);
    let body = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let r = chat(&s, body.clone(), &[]);
    assert_eq!(r.status, 402, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (v["status"].clone(), v["price"].clone()),
        (json!(402), json!(1000))
    );
    assert_eq!(v["error"]["type"], "insufficient_quota");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Payment Required: ") && message.ends_with("(price 1000, balance 100)"),
        "{message}"
    );
    assert!(
        r.header("x-request-id").is_some_and(|id| !id.is_empty()),
        "{:?}",
        r.headers
    );
    // A served call's x-request-id is its ledger row's.
    s.balance().create_account("acct-rich", "fbk-rich", 100_000);
    let r = s.request(
        "POST",
        "/v1/chat/completions",
        &[
            ("x-api-key", "fbk-rich"),
            ("content-type", "application/json"),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.header("x-request-id").unwrap().to_string();
    let ok = wait_until(Duration::from_secs(5), || {
        s.balance()
            .charges("acct-rich")
            .iter()
            .any(|c| c["request_id"] == id.as_str())
    });
    assert!(ok, "no ledger row for request {id}");
    let r = s.request(
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        b"{}",
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn mcp_pays_with_x402_in_meta() {
    // x402's MCP transport: the offer in the tool result's structuredContent, the payment
    // in params._meta["x402/payment"].
    let routes = json!([{"name": "mcp", "exact": "/mcp", "cost": 1,
        "mcp": {"tools": {"search": 5}}}]);
    let mut c = plugin(routes);
    c["anonymous"] = json!(true);
    let opts = x402_balance_opts();
    let (s, _mcp) = stack_with_upstream("mcp-x402", "farebox-mcp", c, opts);
    let call = |meta: Value| {
        let body = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
            "params": {"name": "search", "arguments": {"query": "x"}, "_meta": meta}});
        s.request(
            "POST",
            "/mcp",
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        )
    };
    let r = call(json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    let result = &r.json()["result"];
    assert_eq!(result["isError"], true, "{result}");
    let required = &result["structuredContent"];
    assert_eq!(required["x402Version"], 2, "{required}");
    assert_eq!(
        required["accepts"][0]["payTo"], "0x00000000000000000000000000000000000000b0",
        "{required}"
    );
    assert_eq!(required["accepts"][0]["amount"], "5000", "{required}");
    assert_eq!(required["price"], 5, "{required}");

    let r = call(json!({"x402/payment": {"x402Version": 2, "payload": {"demo": "paid"}}}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"]["isError"], false, "{}", r.text());
    let settlement: Value = serde_json::from_slice(
        &STANDARD
            .decode(r.header("payment-response").expect("PAYMENT-RESPONSE"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(settlement["success"], true);
    assert_eq!(num(&s.balance().account("payer_demo"), "charged"), 5);
}

/// The README's recipe: farebox pays with the client's key, then Envoy's credential
/// injector replaces it with the upstream's own, so the client's key never reaches it.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn the_upstream_key_replaces_the_clients() {
    let dir = TempDir::new("key-injector");
    let balance = BalanceService::start(dir.path(), &BalanceOpts::default());
    balance.create_account(ACCOUNT, KEY, 100);
    let echo = Echo::start(dir.path());
    let mut cfg = plugin(json!([{"name": "chat", "exact": "/v1/chat/completions", "cost": 3}]));
    cfg["credential"] = json!({"source": "bearer"});
    let mut opts = EnvoyOpts::new(&cfg, balance.addr, echo.addr);
    opts.replacements = vec![
        (
            "static_resources:\n".to_string(),
            "static_resources:\n  secrets:\n    - name: upstream-llm-key\n      generic_secret: {secret: {inline_string: \"Bearer sk-upstream-example\"}}\n".to_string(),
        ),
        (
            "                  - name: envoy.filters.http.router\n".to_string(),
            r#"                  - name: envoy.filters.http.credential_injector
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector
                      overwrite: true
                      credential:
                        name: envoy.http.injected_credentials.generic
                        typed_config:
                          "@type": type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic
                          credential: {name: upstream-llm-key}
                          header: Authorization
                  - name: envoy.filters.http.router
"#
            .to_string(),
        ),
    ];
    let envoy = Envoy::start(dir.path(), &opts);
    let bearer = format!("Bearer {KEY}");
    let r = http(
        envoy.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("authorization", &bearer),
            ("content-type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        echoed_header_values(&r, "authorization"),
        vec!["Bearer sk-upstream-example".to_string()],
        "the upstream sees its own key only"
    );
    assert_eq!(
        num(&balance.account(ACCOUNT), "charged"),
        3,
        "paid with the client's key"
    );
    let r = http(envoy.addr, "POST", "/v1/chat/completions", &[], b"{}");
    assert_eq!(r.status, 401, "no key: farebox refuses before the injector");
}
