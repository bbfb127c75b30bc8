//! MCP requests priced from their `Mcp-Method`/`Mcp-Name` headers (MCP 2026-07-28's
//! streamable HTTP transport), in a real Envoy with the real .wasm, the reference
//! balance service and the mock MCP server: decided at the headers (so the upstream
//! learns the account), the body held until it is checked against them, and a
//! mismatch refused with 400 and given back, its body never completed upstream (the
//! mock's call log shows the tool never ran).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ACCOUNT: &str = "acct-mcp-headers";
const KEY: &str = "fbk-mcp-headers-5eed";

fn routes() -> Value {
    json!([{"name": "mcp", "exact": "/mcp", "cost": 1,
        "mcp": {"tools": {"search": 5, "fetch": 2}}}])
}

fn start(label: &str, upstream: Option<std::net::SocketAddr>) -> Stack {
    let mut b = stack(label).plugin(|c| {
        c["timeout_ms"] = json!(3000);
        c["routes"] = routes();
    });
    if let Some(addr) = upstream {
        b = b.upstream_addr(addr);
    }
    let s = b.start();
    s.balance().create_account(ACCOUNT, KEY, 100);
    s
}

fn call(id: u64, tool: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": tool, "arguments": {"query": "x"}}})
}

/// A POST to /mcp with the given MCP headers (none: an older client).
fn post(s: &Stack, key: &str, mcp: &[(&str, &str)], body: &Value) -> Response {
    let mut headers = vec![
        ("x-api-key", key),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
    ];
    headers.extend_from_slice(mcp);
    s.request("POST", "/mcp", &headers, body.to_string().as_bytes())
}

fn tool_calls(mcp: std::net::SocketAddr) -> Value {
    http(mcp, "GET", "/stats", &[], b"").json()["calls"].clone()
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn mcp_headers_price_at_the_headers_and_mismatches_never_run() {
    let dir = TempDir::new("mcp-headers-upstream");
    let (_mock, mcp) = start_service("farebox-mcp", dir.path());
    let s = start("mcp-headers", Some(mcp));

    // Priced from the headers, served whole.
    let r = post(
        &s,
        KEY,
        &[("mcp-method", "tools/call"), ("mcp-name", "search")],
        &call(1, "search"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"]["isError"], false, "{}", r.text());
    assert_eq!(tool_calls(mcp), json!({"search": 1}));

    // Headers claiming a free method, a paid call in the body: refused, never charged,
    // never run.
    let before = s.balance().authorize_calls();
    let r = post(&s, KEY, &[("mcp-method", "tools/list")], &call(2, "search"));
    assert_eq!(r.status, 400, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (body["id"].clone(), body["error"]["code"].clone()),
        (json!(2), json!(-32020)),
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Mcp-Method"),
        "{body}"
    );
    assert_eq!(s.balance().authorize_calls(), before, "nothing to pay for");

    // A cheaper tool in the headers: charged 2 at the headers, refused at the body,
    // given back, never run.
    let r = post(
        &s,
        KEY,
        &[("mcp-method", "tools/call"), ("mcp-name", "fetch")],
        &call(3, "search"),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Mcp-Name"));
    let ok = wait_until(Duration::from_secs(5), || {
        num(&s.balance().account(ACCOUNT), "refunded") == 2
    });
    assert!(ok, "{}", s.balance().account(ACCOUNT));

    // Refused for want of money: the refusal answers the body's id once the body is in.
    s.balance()
        .create_account("acct-mcp-poor", "fbk-mcp-poor", 3);
    let r = post(
        &s,
        "fbk-mcp-poor",
        &[("mcp-method", "tools/call"), ("mcp-name", "search")],
        &call(99, "search"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(
        (body["id"].clone(), body["result"]["isError"].clone()),
        (json!(99), json!(true)),
        "{body}"
    );
    assert_eq!(body["result"]["structuredContent"]["price"], 5);

    // An older client, without the headers, is priced by its body as before.
    let r = post(&s, KEY, &[], &call(4, "fetch"));
    assert_eq!(r.status, 200, "{}", r.text());

    // The mismatching and the unpaid bodies never reached the tools.
    assert_eq!(tool_calls(mcp), json!({"search": 1, "fetch": 1}));
    assert_eq!(
        http(mcp, "GET", "/stats", &[], b"").json()["methods"]["tools/call"],
        2,
        "no other tools/call body was read whole"
    );
    // What Envoy did with them: their headers went upstream (the decision let them on, or
    // they went on to let the body in), the body was held, and the local reply reset the
    // upstream request, before or after its connection was up. Only the two served completed.
    let stat = |name: &str| s.envoy.stat(&format!("cluster.upstream.{name}")).unwrap();
    let mut reset = 0;
    let all_reset = wait_until(Duration::from_secs(5), || {
        reset = stat("upstream_cx_destroy_local_with_active_rq") + stat("upstream_rq_cancelled");
        reset >= 3
    });
    assert!(all_reset, "{reset} upstream requests reset, 3 expected");
    assert_eq!((reset, stat("upstream_rq_completed")), (3, 2));
    expect_metrics(
        &s.envoy,
        &[("mcp_header_mismatch", 2), ("denied", 1)],
        Duration::from_secs(5),
    );
    // The ledger: search 5 and fetch 2 served; the mismatching fetch charged and refunded once.
    let charges = s.balance().charges(ACCOUNT);
    let rows: Vec<(String, i64, String)> = charges
        .iter()
        .map(|c| {
            (
                c["route"].as_str().unwrap().to_string(),
                c["cost"].as_i64().unwrap(),
                c["status"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows.iter().filter(|r| r.2 == "refunded").count(),
        1,
        "{rows:?}"
    );
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(
        (
            num(&acct, "charged"),
            num(&acct, "refunded"),
            num(&acct, "balance")
        ),
        (7, 2, 93),
        "{acct}: {rows:?}"
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn mcp_headers_let_the_upstream_learn_the_account() {
    // The echo upstream shows what it was sent.
    let s = start("mcp-headers-account", None);
    let r = post(
        &s,
        KEY,
        &[("mcp-method", "tools/call"), ("mcp-name", "search")],
        &call(1, "search"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        echoed_header_values(&r, "x-farebox-account"),
        vec![ACCOUNT.to_string()]
    );
    // The body path cannot: the headers went on before the decision.
    let r = post(&s, KEY, &[], &call(2, "search"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(echoed_header_values(&r, "x-farebox-account").is_empty());
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(num(&acct, "charged"), 10, "{acct}");
}
