//! The real clients against farebox in a real Envoy: the official MCP SDKs (Python `mcp`,
//! TypeScript `@modelcontextprotocol/sdk`) and the official OpenAI Python client, installed
//! from the package registries by `make interop-clients` (.venv-interop and
//! tests/interop/node/node_modules). Each check asserts what the client hands its caller
//! (the exception's class, a message with the detail, the price and the balance) and the
//! ledger, exact to the unit. A client that is not installed fails the test under CI=true.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const RICH: (&str, &str) = ("acct-interop", "fbk-interop-5eed");
const EMPTY: (&str, &str) = ("acct-interop-empty", "fbk-interop-empty");
const BAD_KEY: &str = "fbk-interop-unknown";

/// The interpreter of .venv-interop (or $FAREBOX_INTEROP_PYTHON), if the clients are there.
fn interop_python(test: &str) -> Option<PathBuf> {
    let python = std::env::var_os("FAREBOX_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".venv-interop/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import mcp, openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        cannot_run(
            test,
            &format!(
                "{} cannot import mcp and openai (run `make interop-clients`)",
                python.display()
            ),
        );
        return None;
    }
    Some(python)
}

/// tests/interop/node, if `npm ci` installed the TypeScript SDK there.
fn interop_node(test: &str) -> Option<PathBuf> {
    let dir = repo_root().join("tests/interop/node");
    let sdk = dir.join("node_modules/@modelcontextprotocol/sdk/package.json");
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node || !sdk.exists() {
        cannot_run(
            test,
            "node or tests/interop/node/node_modules is missing (run `make interop-clients`)",
        );
        return None;
    }
    Some(dir)
}

/// Runs a client script; its stdout is one JSON object.
fn run_client(mut cmd: Command) -> Value {
    let out = cmd.output().expect("start the client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // What the client showed, in the test's output when it fails (and with --nocapture).
    println!("{}", stdout.trim());
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn plugin(routes: Value) -> Value {
    let mut c = demo_plugin_config();
    c["timeout_ms"] = json!(3000);
    c["routes"] = routes;
    c
}

/// Envoy and farebox in front of the mock MCP server, the README's MCP rule, and the
/// accounts: one with credit, one empty.
/// Also a second Envoy in front of the same server whose balance service is down (503).
fn mcp_stack(label: &str) -> (Stack, Stack, Proc, std::net::SocketAddr) {
    let dir = TempDir::new(&format!("{label}-upstream"));
    let (proc, addr) = start_service("farebox-mcp", dir.path());
    std::mem::forget(dir);
    // resources/read priced too: a refusal that is a JSON-RPC error, not a tool result.
    let routes = json!([{"name": "mcp", "exact": "/mcp", "cost": 1,
        "mcp": {"tools": {"search": 5, "fetch": 2, "echo": 0},
                "methods": {"resources/read": 3}}}]);
    let down_routes = routes.clone();
    let s = stack(label)
        .plugin(|c| *c = plugin(routes))
        .upstream_addr(addr)
        .start();
    s.balance().create_account(RICH.0, RICH.1, 100);
    s.balance().create_account(EMPTY.0, EMPTY.1, 0);
    let down = stack(&format!("{label}-down"))
        .plugin(|c| *c = plugin(down_routes))
        .balance_addr(closed_port_addr())
        .upstream_addr(addr)
        .start();
    (s, down, proc, addr)
}

/// The plumbing reached the server (so the ledger's silence about it means it was free).
fn assert_plumbing_served(mcp: std::net::SocketAddr, methods: &[&str]) {
    let stats = http(mcp, "GET", "/stats", &[], b"").json();
    for m in methods {
        assert!(
            stats["methods"][m].as_u64().is_some_and(|n| n >= 1),
            "{m} never reached the server: {stats}"
        );
    }
}

/// The `x-farebox-account` values the server saw on the tool calls it served, counted.
fn upstream_accounts(mcp: std::net::SocketAddr) -> Value {
    http(mcp, "GET", "/stats", &[], b"").json()["accounts"].clone()
}

/// The ledger after a whole session on each account: exactly the two paid tools (5 + 2).
fn assert_session_ledger(s: &Stack, client: &str) {
    let routes = s.balance().charge_routes(RICH.0);
    assert_eq!(
        routes,
        vec![
            ("mcp/tools/call:search".to_string(), 5),
            ("mcp/tools/call:fetch".to_string(), 2)
        ],
        "{client}: the session paid for its tools and nothing else"
    );
    let acct = s.balance().account(RICH.0);
    assert_eq!(
        (num(&acct, "charged"), num(&acct, "balance")),
        (7, 93),
        "{client}: {acct}"
    );
    let empty = s.balance().account(EMPTY.0);
    assert_eq!(
        (num(&empty, "charged"), num(&empty, "balance")),
        (0, 0),
        "{client}: {empty}"
    );
}

/// What both SDKs must hand the caller for a whole session.
fn assert_session_seen(out: &Value) {
    let client = format!("{} {}", out["sdk"], out["version"]);
    assert_eq!(
        out["tools"],
        json!(["echo", "fetch", "search"]),
        "{client}: {out}"
    );
    assert_eq!(out["free"]["isError"], false, "{client}: {out}");
    assert_eq!(out["free"]["text"], r#"echo ok: {"text":"hi"}"#, "{client}");
    assert_eq!(out["search"]["isError"], false, "{client}: {out}");
    assert_eq!(out["free_on_empty"]["isError"], false, "{client}: {out}");
    // The unpaid call is a tool result (x402's MCP transport): no exception, and the text
    // the agent reads says why, the price and the balance.
    let unpaid = &out["unpaid"];
    assert_eq!(unpaid["isError"], true, "{client}: {unpaid}");
    let text = unpaid["text"].as_str().unwrap();
    let detail = unpaid["structured"]["detail"].as_str().unwrap_or_default();
    assert!(!detail.is_empty(), "{client}: no detail in {unpaid}");
    assert_eq!(
        text,
        format!("Payment Required: {detail} (price 5, balance 0)"),
        "{client}"
    );
    assert_eq!(unpaid["structured"]["status"], 402, "{client}: {unpaid}");
    assert_eq!(unpaid["structured"]["price"], 5, "{client}: {unpaid}");
    assert_eq!(unpaid["structured"]["balance"], 0, "{client}: {unpaid}");
    // An unpaid priced method that is not a tool call is a JSON-RPC error (code 402),
    // which both SDKs raise (assert_refusal checks the class and the message).
    let read = &out["unpaid_read"]["data"];
    assert_eq!(
        (read["price"].clone(), read["balance"].clone()),
        (json!(3), json!(0)),
        "{client}: {read}"
    );
}

/// The client's report `out[what]` of a refusal the SDK raises (a JSON-RPC error): the
/// exception class, the code farebox chose (the HTTP status), and a message that is
/// `prefix` (farebox's title, after the SDK's own prefix) and the detail in `data`.
fn assert_refusal(out: &Value, what: &str, class: &str, code: i64, prefix: &str) {
    let r = &out[what];
    assert_eq!(
        (r["class"].clone(), r["code"].clone()),
        (json!(class), json!(code)),
        "{what}: {out}"
    );
    // The message is the title and the detail farebox put in `data`.
    let message = r["message"].as_str().unwrap_or_default();
    let detail = r["data"]["detail"].as_str().unwrap_or_default();
    assert!(!detail.is_empty(), "{what}: no detail in {r}");
    let shown = format!("{prefix}{detail}");
    if code == 402 {
        // A payment refusal also says the price and the balance.
        let (price, balance) = (&r["data"]["price"], &r["data"]["balance"]);
        assert_eq!(
            message,
            format!("{shown} (price {price}, balance {balance})"),
            "{what}: {r}"
        );
    } else {
        assert_eq!(message, shown, "{what}: {r}");
    }
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy, the wasm and the interop clients; run `make test`"
)]
fn python_mcp_sdk_whole_session() {
    let Some(python) = interop_python("python_mcp_sdk_whole_session") else {
        return;
    };
    let (s, down, _mcp, mcp) = mcp_stack("interop-py-mcp");
    let url = format!("http://{}/mcp", s.envoy.addr);
    let down_url = format!("http://{}/mcp", down.envoy.addr);
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/interop/mcp_session.py"))
        .args([&url, RICH.1, EMPTY.1, BAD_KEY, &down_url]);
    let out = run_client(cmd);
    assert_session_seen(&out);
    // A refusal that is not a payment: the SDK raises MCPError with farebox's code and text.
    assert_refusal(&out, "unpaid_read", "MCPError", 402, "Payment Required: ");
    assert_refusal(&out, "unauthorized", "MCPError", 401, "Unauthorized: ");
    assert_refusal(
        &out,
        "unavailable",
        "MCPError",
        503,
        "Service Unavailable: ",
    );
    // mcp 2.3.0 speaks MCP 2026-07-28 to a server that answers server/discover (the mock
    // does): no initialize, and every POST carries Mcp-Method (and Mcp-Name on tools/call).
    assert_plumbing_served(mcp, &["server/discover", "tools/list", "ping"]);
    // So farebox priced its calls from the headers, before their bodies, and the paid
    // calls reached the server with the account (the body path cannot send it).
    assert_eq!(
        upstream_accounts(mcp),
        json!({RICH.0: 2}),
        "search and fetch went the header path"
    );
    wait_for_ledger(&s);
    assert_session_ledger(&s, "python mcp");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy, the wasm and the interop clients; run `make test`"
)]
fn typescript_mcp_sdk_whole_session() {
    let Some(dir) = interop_node("typescript_mcp_sdk_whole_session") else {
        return;
    };
    let (s, down, _mcp, mcp) = mcp_stack("interop-ts-mcp");
    let url = format!("http://{}/mcp", s.envoy.addr);
    let down_url = format!("http://{}/mcp", down.envoy.addr);
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg("mcp_session.mjs")
        .args([&url, RICH.1, EMPTY.1, BAD_KEY, &down_url]);
    let out = run_client(cmd);
    assert_session_seen(&out);
    // The TypeScript SDK prefixes the message with "MCP error <code>: ".
    assert_refusal(
        &out,
        "unpaid_read",
        "McpError",
        402,
        "MCP error 402: Payment Required: ",
    );
    assert_refusal(
        &out,
        "unauthorized",
        "McpError",
        401,
        "MCP error 401: Unauthorized: ",
    );
    assert_refusal(
        &out,
        "unavailable",
        "McpError",
        503,
        "MCP error 503: Service Unavailable: ",
    );
    assert_plumbing_served(
        mcp,
        &[
            "initialize",
            "notifications/initialized",
            "tools/list",
            "ping",
        ],
    );
    // @modelcontextprotocol/sdk 1.32.2 sends no Mcp-Method: its calls are priced by
    // their bodies, and the headers went on before the decision, without the account.
    assert_eq!(upstream_accounts(mcp), json!({}));
    wait_for_ledger(&s);
    assert_session_ledger(&s, "typescript mcp");
}

/// Envoy and farebox in front of the mock MCP server for callers without an account:
/// `anonymous`, and the reference service offering its demo x402 payments.
fn mcp_x402_stack(label: &str) -> (Stack, Proc) {
    let dir = TempDir::new(&format!("{label}-upstream"));
    let (proc, addr) = start_service("farebox-mcp", dir.path());
    std::mem::forget(dir);
    let routes = json!([{"name": "mcp", "exact": "/mcp", "cost": 1,
        "mcp": {"tools": {"search": 5, "fetch": 2, "echo": 0}}}]);
    let s = stack(label)
        .plugin(|c| {
            *c = plugin(routes);
            c["anonymous"] = json!(true);
        })
        .balance_opts(x402_balance_opts())
        .upstream_addr(addr)
        .start();
    (s, proc)
}

/// What both SDKs must hand the caller on x402's MCP transport: the offer as a tool
/// result, a payment the service refuses as another, and the paid call served; the
/// ledger holds the one paid call.
fn assert_x402_meta_seen(s: &Stack, out: &Value) {
    let client = format!("{} {}", out["sdk"], out["version"]);
    assert_eq!(
        out["tools"],
        json!(["echo", "fetch", "search"]),
        "{client}: {out}"
    );
    let offer = &out["offer"];
    assert_eq!(offer["isError"], true, "{client}: {offer}");
    let required = &offer["structured"];
    assert_eq!(required["x402Version"], 2, "{client}: {required}");
    assert_eq!(
        required["accepts"][0]["payTo"], "0x00000000000000000000000000000000000000b0",
        "{client}: {required}"
    );
    assert_eq!(
        required["accepts"][0]["amount"], "5000",
        "{client}: {required}"
    );
    assert_eq!(required["price"], 5, "{client}: {required}");
    // No account, so no balance: the text says why and the price.
    let text = offer["text"].as_str().unwrap();
    let detail = required["detail"].as_str().unwrap();
    assert_eq!(
        text,
        format!("Payment Required: {detail} (price 5)"),
        "{client}"
    );
    // The payment is read from params._meta["x402/payment"]: one the demo verifier
    // refuses is refused (the service's verdict, with the offer again), the one it
    // accepts pays.
    let bad = &out["bad"];
    assert_eq!(bad["isError"], true, "{client}: {bad}");
    assert_eq!(
        (
            bad["structured"]["title"].clone(),
            bad["structured"]["detail"].clone()
        ),
        (json!("Verification Failed"), json!("payment invalid")),
        "{client}: {bad}"
    );
    assert_eq!(
        bad["text"], "Verification Failed: payment invalid (price 5)",
        "{client}: {bad}"
    );
    assert_eq!(bad["structured"]["x402Version"], 2, "{client}: {bad}");
    let paid = &out["paid"];
    assert_eq!(
        (paid["isError"].clone(), paid["structured"].clone()),
        (json!(false), Value::Null),
        "{client}: {paid}"
    );
    assert!(
        paid["text"].as_str().unwrap().starts_with("search ok"),
        "{client}: {paid}"
    );
    let ok = wait_until(Duration::from_secs(2), || {
        !s.balance().charges("payer_demo").is_empty()
    });
    assert!(ok, "{client}: the paid call has no ledger row");
    let rows = s.balance().charge_routes("payer_demo");
    assert_eq!(
        rows,
        vec![("mcp/tools/call:search".to_string(), 5)],
        "{client}: the paid call, and no other"
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy, the wasm and the interop clients; run `make test`"
)]
fn python_mcp_sdk_pays_with_x402_in_meta() {
    let Some(python) = interop_python("python_mcp_sdk_pays_with_x402_in_meta") else {
        return;
    };
    let (s, _mcp) = mcp_x402_stack("interop-py-x402");
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/interop/mcp_x402.py"))
        .arg(format!("http://{}/mcp", s.envoy.addr));
    let out = run_client(cmd);
    assert_x402_meta_seen(&s, &out);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy, the wasm and the interop clients; run `make test`"
)]
fn typescript_mcp_sdk_pays_with_x402_in_meta() {
    let Some(dir) = interop_node("typescript_mcp_sdk_pays_with_x402_in_meta") else {
        return;
    };
    let (s, _mcp) = mcp_x402_stack("interop-ts-x402");
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg("mcp_x402.mjs")
        .arg(format!("http://{}/mcp", s.envoy.addr));
    let out = run_client(cmd);
    assert_x402_meta_seen(&s, &out);
}

/// Charges are written before the answer goes out; this only guards against reading the
/// ledger before the last refund (there should be none) lands.
fn wait_for_ledger(s: &Stack) {
    wait_until(Duration::from_secs(2), || {
        s.balance().charges(RICH.0).len() >= 2
    });
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy, the wasm and the interop clients; run `make test`"
)]
fn openai_client_shows_farebox_errors() {
    let Some(python) = interop_python("openai_client_shows_farebox_errors") else {
        return;
    };
    let dir = TempDir::new("interop-llm-upstream");
    let (_llm, addr) = start_service("farebox-llm", dir.path());
    let mut cfg = plugin(json!([{"name": "chat", "exact": "/v1/chat/completions",
        "usage": {"json_pointer": "/usage/total_tokens", "unit_cost": 2, "estimate": 1000}}]));
    cfg["credential"] = json!({"source": "bearer"});
    let down_cfg = cfg.clone();
    let s = stack("interop-openai")
        .plugin(|c| *c = cfg)
        .upstream_addr(addr)
        .start();
    s.balance().create_account(RICH.0, RICH.1, 100_000);
    s.balance().create_account(EMPTY.0, EMPTY.1, 0);
    // The same route with the balance service unreachable: 503.
    let down = stack("interop-openai-down")
        .plugin(|c| *c = down_cfg)
        .balance_addr(closed_port_addr())
        .upstream_addr(addr)
        .start();
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/interop/openai_errors.py"))
        .args([
            &format!("http://{}/v1", s.envoy.addr),
            RICH.1,
            EMPTY.1,
            BAD_KEY,
            &format!("http://{}/v1", down.envoy.addr),
        ]);
    let out = run_client(cmd);
    let client = format!("openai {}", out["version"]);

    let served = &out["served"];
    assert_eq!(served["ok"], true, "{client}: {out}");
    let id = served["request_id"]
        .as_str()
        .expect("x-request-id reaches the client");
    let tokens = served["total_tokens"].as_i64().unwrap();
    let ok = wait_until(Duration::from_secs(5), || {
        s.balance()
            .charges(RICH.0)
            .iter()
            .any(|c| c["request_id"] == id && c["cost"].as_i64() == Some(2 * tokens))
    });
    assert!(
        ok,
        "{client}: no ledger row {id} of {} units: {:?}",
        2 * tokens,
        s.balance().charges(RICH.0)
    );

    for (case, class, status, code, start) in [
        (
            "unpaid",
            "APIStatusError",
            402,
            "payment_required",
            "Payment Required: ",
        ),
        (
            "unauthorized",
            "AuthenticationError",
            401,
            "invalid_api_key",
            "Unauthorized: ",
        ),
        (
            "unavailable",
            "InternalServerError",
            503,
            "service_unavailable",
            "Service Unavailable: ",
        ),
    ] {
        let e = &out[case];
        assert_eq!(
            (e["class"].clone(), e["status"].clone(), e["code"].clone()),
            (json!(class), json!(status), json!(code)),
            "{client} {case}: {e}"
        );
        // The message carries farebox's title and the detail of its problem document.
        let message = e["message"].as_str().unwrap();
        let detail = e["detail"].as_str().unwrap_or_default();
        assert!(!detail.is_empty(), "{client} {case}: no detail in {e}");
        assert!(
            message.contains(&format!("{start}{detail}")),
            "{client} {case}: {message}"
        );
        assert!(
            e["request_id"].as_str().is_some_and(|id| !id.is_empty()),
            "{client} {case}: {e}"
        );
    }
    let unpaid = out["unpaid"]["message"].as_str().unwrap();
    assert!(
        unpaid.contains("(price 1000, balance 0)"),
        "{client}: {unpaid}"
    );
    let empty = s.balance().account(EMPTY.0);
    assert_eq!(num(&empty, "charged"), 0, "{empty}");
}
