#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The access-log fields (src/access_log.rs) in a real Envoy: `envoy/envoy-access-log.yaml`
//! is run with its log pointed at a file, requests are sent, and every field of every
//! line is checked against what the request was and what the balance service recorded:
//! an allowed, a cached, a denied (first from the service, then from the cache), a
//! refunded, a free and an unauthenticated request in authorize mode, and one paid from a
//! lease. The credential must appear in no line, and `access_log: false` leaves every
//! field unset. On token-table routes the usage also reaches the log as dynamic metadata
//! (the Lua bridge in the same file), equal to the ledger's charge.
//!
//! Envoy writes the file on its own flush interval, so the test waits for the lines it
//! expects (by request id, with a deadline), never for a fixed time. `make test` runs it
//! on Envoy 1.40, `make envoy-compat` again on 1.36.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ALICE_KEY: &str = "fbk-alog-alice-secret";
const BOB_KEY: &str = "fbk-alog-bob-secret";
const CAROL_KEY: &str = "fbk-alog-carol-secret";
const LOG_WAIT: Duration = Duration::from_secs(20);

/// The log's lines as JSON objects.
fn read_lines(log: &Path) -> Vec<Value> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {e}: {l}")))
        .collect()
}

/// Waits until a line for each request id is in the log; returns them in that order.
fn lines_for(log: &Path, request_ids: &[&str]) -> Vec<Value> {
    let mut found = Vec::new();
    let ok = wait_until(LOG_WAIT, || {
        let lines = read_lines(log);
        found = request_ids
            .iter()
            .filter_map(|id| lines.iter().find(|l| l["request_id"] == *id).cloned())
            .collect();
        found.len() == request_ids.len()
    });
    assert!(
        ok,
        "no access-log line for some of {request_ids:?} within {LOG_WAIT:?}; log:\n{}",
        fs::read_to_string(log).unwrap_or_default()
    );
    found
}

/// Every farebox field of a line: (account, route, cost, decision, cache, lease).
fn assert_fields(line: &Value, want: &Value, what: &str) {
    for field in ["account", "route", "cost", "decision", "cache", "lease"] {
        assert_eq!(
            line[field], want[field],
            "{what}: field {field} of the access-log line {line}"
        );
    }
}

fn request_id(resp: &Response) -> String {
    // The echo upstream reports the x-request-id Envoy sent; for a local reply
    // (402/401), the id is taken from the log line of that path instead.
    echoed_header_values(resp, "x-request-id")
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("no x-request-id reached the upstream: {}", resp.dump()))
}

/// The request ids of the log lines for `path`, in log order.
fn ids_for_path(log: &Path, path: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let ok = wait_until(LOG_WAIT, || {
        ids = read_lines(log)
            .into_iter()
            .filter(|l| l["path"] == path)
            .filter_map(|l| l["request_id"].as_str().map(str::to_string))
            .collect();
        ids.len() >= n
    });
    assert!(ok, "expected {n} access-log lines for {path}, got {ids:?}");
    ids
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn access_log_shows_who_paid_what_and_why() {
    let log_dir = TempDir::new("access-log-file");
    let log = log_dir.join("access.log");
    // Allows may be cached for 30 s (so a second request is a cached allow), refusals
    // for 30 s (so a second 402 comes from the cache).
    let stack = stack("access-log")
        .balance_opts(BalanceOpts {
            allow_max_age: Some(30),
            deny_max_age: Some(30),
            ..BalanceOpts::default()
        })
        .envoy_yaml(access_log_envoy_yaml(&log))
        .concurrency(1)
        .start();
    let balance = stack.balance();
    balance.create_account("acct_alog_alice", ALICE_KEY, 100);
    balance.create_account("acct_alog_bob", BOB_KEY, 100);
    balance.create_account("acct_alog_carol", CAROL_KEY, 0);

    // 1. Allowed: paid by the service.
    let allowed = stack.get_with_key("/v1/data", ALICE_KEY);
    assert_eq!(allowed.status, 200, "{}", allowed.dump());
    let allowed_id = request_id(&allowed);
    // 2. Cached: the same account and route again, from the decision cache.
    let cached = stack.get_with_key("/v1/data", ALICE_KEY);
    assert_eq!(cached.status, 200, "{}", cached.dump());
    let cached_id = request_id(&cached);
    // 3. Refunded: paid, then the upstream answers 503.
    let refunded = stack.get_with_key("/status/503", BOB_KEY);
    assert_eq!(refunded.status, 503, "{}", refunded.dump());
    let refunded_id = request_id(&refunded);
    // 4. Denied by the service, then 5. denied from the cache.
    for _ in 0..2 {
        let denied = stack.get_with_key("/v1/denied", CAROL_KEY);
        assert_eq!(denied.status, 402, "{}", denied.dump());
    }
    // 6. Free, 7. no credential.
    assert_eq!(stack.get("/health", &[]).status, 200);
    assert_eq!(stack.get("/v1/anonymous", &[]).status, 401);

    let lines = lines_for(&log, &[&allowed_id, &cached_id, &refunded_id]);
    assert_fields(
        &lines[0],
        &json!({"account": "acct_alog_alice", "route": "default", "cost": "1",
                "decision": "allow", "cache": null, "lease": null}),
        "allowed request",
    );
    assert_fields(
        &lines[1],
        &json!({"account": "acct_alog_alice", "route": "default", "cost": "1",
                "decision": "cached", "cache": "hit", "lease": null}),
        "cached allow",
    );
    assert_fields(
        &lines[2],
        &json!({"account": "acct_alog_bob", "route": "default", "cost": "1",
                "decision": "refunded", "cache": null, "lease": null}),
        "refunded request",
    );
    assert_eq!(lines[2]["status"], json!(503));

    let denied_ids = ids_for_path(&log, "/v1/denied", 2);
    let denied = lines_for(&log, &[&denied_ids[0], &denied_ids[1]]);
    assert_fields(
        &denied[0],
        &json!({"account": "acct_alog_carol", "route": "default", "cost": "1",
                "decision": "deny", "cache": null, "lease": null}),
        "denied by the service",
    );
    assert_fields(
        &denied[1],
        &json!({"account": "acct_alog_carol", "route": "default", "cost": "1",
                "decision": "deny", "cache": "hit", "lease": null}),
        "denied from the cache",
    );
    for l in &denied {
        assert_eq!(l["status"], json!(402));
    }
    let free = ids_for_path(&log, "/health", 1);
    assert_fields(
        &lines_for(&log, &[&free[0]])[0],
        &json!({"account": null, "route": "health", "cost": "0",
                "decision": "free", "cache": null, "lease": null}),
        "free route",
    );
    let anonymous = ids_for_path(&log, "/v1/anonymous", 1);
    assert_fields(
        &lines_for(&log, &[&anonymous[0]])[0],
        &json!({"account": null, "route": "default", "cost": "1",
                "decision": "unauthenticated", "cache": null, "lease": null}),
        "no credential",
    );

    // The log and the ledger agree: the allowed request's id is Alice's one charge
    // (the cached allow is not debited), Bob's charge is refunded.
    let alice = balance.charges("acct_alog_alice");
    assert_eq!(alice.len(), 1, "{alice:?}");
    assert_eq!(alice[0]["request_id"], json!(allowed_id));
    let refunded_ok = wait_until(LOG_WAIT, || {
        let bob = balance.charges("acct_alog_bob");
        bob.len() == 1
            && bob[0]["request_id"] == json!(refunded_id)
            && bob[0]["status"] == "refunded"
    });
    assert!(
        refunded_ok,
        "Bob's charge {refunded_id} was not refunded: {:?}",
        balance.charges("acct_alog_bob")
    );

    // None of these is metered: the usage fields stay unset on every line.
    for line in read_lines(&log) {
        for field in [
            "usage_cost",
            "model",
            "input_tokens",
            "cached_input_tokens",
            "cache_creation_input_tokens",
            "output_tokens",
            "reasoning_tokens",
        ] {
            assert!(line[field].is_null(), "{field} set on {line}");
        }
    }

    // No credential is ever written.
    let text = fs::read_to_string(&log).unwrap();
    for key in [ALICE_KEY, BOB_KEY, CAROL_KEY] {
        assert!(!text.contains(key), "a credential is in the access log");
    }
    eprintln!(
        "access log checked: {} lines\n{text}",
        read_lines(&log).len()
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn access_log_names_the_lease_that_paid() {
    let log_dir = TempDir::new("access-log-lease-file");
    let log = log_dir.join("access.log");
    let stack = stack("access-log-lease")
        .plugin(|p| {
            p["mode"] = json!("lease");
            p["lease_want"] = json!(10);
        })
        .envoy_yaml(access_log_envoy_yaml(&log))
        .concurrency(1)
        .start();
    let balance = stack.balance();
    balance.create_account("acct_alog_lease", ALICE_KEY, 100);

    let mut ids = Vec::new();
    for _ in 0..2 {
        let resp = stack.get_with_key("/v1/data", ALICE_KEY);
        assert_eq!(resp.status, 200, "{}", resp.dump());
        ids.push(request_id(&resp));
    }
    let leases = balance.admin("GET", "/admin/accounts/acct_alog_lease/leases", None);
    let leases = leases
        .as_array()
        .or_else(|| leases["leases"].as_array())
        .cloned()
        .unwrap_or_else(|| panic!("unexpected leases answer {leases}"));
    assert_eq!(leases.len(), 1, "one lease pays both requests: {leases:?}");
    let lease_id = leases[0]["lease_id"].as_str().unwrap().to_string();

    let lines = lines_for(&log, &[&ids[0], &ids[1]]);
    for (i, line) in lines.iter().enumerate() {
        assert_fields(
            line,
            &json!({"account": "acct_alog_lease", "route": "default", "cost": "1",
                    "decision": "allow", "cache": null, "lease": lease_id}),
            &format!("request {i} paid from the lease"),
        );
    }
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn access_log_false_leaves_the_fields_unset() {
    let log_dir = TempDir::new("access-log-off-file");
    let log = log_dir.join("access.log");
    let stack = stack("access-log-off")
        .plugin(|p| p["access_log"] = json!(false))
        .envoy_yaml(access_log_envoy_yaml(&log))
        .concurrency(1)
        .start();
    stack
        .balance()
        .create_account("acct_alog_off", ALICE_KEY, 10);
    let resp = stack.get_with_key("/v1/data", ALICE_KEY);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    let id = request_id(&resp);
    assert_fields(
        &lines_for(&log, &[&id])[0],
        &json!({"account": null, "route": null, "cost": null,
                "decision": null, "cache": null, "lease": null}),
        "access_log: false",
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn access_log_says_fail_open_when_the_service_is_down() {
    let log_dir = TempDir::new("access-log-fail-open-file");
    let log = log_dir.join("access.log");
    let mut stack = stack("access-log-fail-open")
        .plugin(|p| p["failure_mode"] = json!("open"))
        .envoy_yaml(access_log_envoy_yaml(&log))
        .concurrency(1)
        .start();
    stack
        .balance()
        .create_account("acct_alog_open", ALICE_KEY, 10);
    stack.balance_mut().stop();
    let resp = stack.get_with_key("/v1/data", ALICE_KEY);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    let id = request_id(&resp);
    // Forwarded unpaid: nobody named an account, the price stands.
    assert_fields(
        &lines_for(&log, &[&id])[0],
        &json!({"account": null, "route": "default", "cost": "1",
                "decision": "fail-open", "cache": null, "lease": null}),
        "balance service down, failure_mode open",
    );
    assert!(!fs::read_to_string(&log).unwrap().contains(ALICE_KEY));
}

/// The usage of a token-table route as Envoy dynamic metadata: the Lua filter in
/// envoy/envoy-access-log.yaml copies farebox's usage fields (filter state) into the
/// namespace `farebox` under Envoy AI Gateway's key names. Here, and not only in
/// tests/llm_apis.rs, because `make envoy-compat` runs this suite on Envoy 1.36 too: the
/// bridge needs Lua's `filterState()`, and the README says it works on 1.36 and 1.40.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn access_log_shows_the_usage_as_dynamic_metadata() {
    let log_dir = TempDir::new("access-log-metadata-file");
    let log = log_dir.join("access.log");
    let (_llm, llm_addr) = start_service("farebox-llm", log_dir.path());
    let stack = stack("access-log-metadata")
        .plugin(|p| {
            p["routes"] = json!([
                {"name": "claude", "methods": ["POST"], "exact": "/v1/messages", "usage": {
                    "api": "anthropic_messages", "per_tokens": 1_000_000,
                    "models": {"claude-test": {"input": 3_000_000, "cached_input": 300_000,
                        "cache_creation_input": 3_750_000, "output": 15_000_000}},
                    "estimate": 5000}},
                {"name": "responses", "methods": ["POST"], "exact": "/v1/responses", "usage": {
                    "api": "openai_responses",
                    "models": {"gpt-test": {"input": 2, "cached_input": 1, "output": 8,
                        "reasoning": 10}},
                    "estimate": 150}}
            ]);
        })
        .envoy_yaml(access_log_envoy_yaml(&log))
        .upstream_addr(llm_addr)
        .concurrency(1)
        .start();
    let balance = stack.balance();
    balance.create_account("acct_alog_md", ALICE_KEY, 100_000);
    // The request id and the body's length (the hold's input part).
    let post = |path: &str, body: Value| {
        let body = body.to_string();
        let resp = stack.request(
            "POST",
            path,
            &[
                ("x-api-key", ALICE_KEY),
                ("content-type", "application/json"),
            ],
            body.as_bytes(),
        );
        assert_eq!(resp.status, 200, "{}", resp.dump());
        let id = resp
            .header("x-request-id")
            .unwrap_or_else(|| panic!("no x-request-id: {}", resp.dump()))
            .to_string();
        (id, u64::try_from(body.len()).unwrap())
    };
    let messages = json!([{"role": "user", "content": "one two three four"}]);
    // The mock's counts: 4 input words; output = max_tokens / max_output_tokens.
    // Anthropic JSON: 4 input, 7 cache reads, 2 cache writes, 6 output:
    // ceil((4×3 + 7×0.3 + 2×3.75 + 6×15)) = ceil(111.6) = 112.
    let (json_id, json_len) = post(
        "/v1/messages",
        json!({"model": "claude-test", "max_tokens": 6, "messages": messages,
               "x_cache_read": 7, "x_cache_creation": 2}),
    );
    // Anthropic stream: 4 input, 7 cache reads, 9 output: ceil(149.1) = 150.
    let (stream_id, stream_len) = post(
        "/v1/messages",
        json!({"model": "claude-test", "max_tokens": 9, "messages": messages,
               "x_cache_read": 7, "stream": true}),
    );
    // Responses stream: 3 input (1 cached), 7 output (3 reasoning):
    // 2×2 + 1×1 + 4×8 + 3×10 = 67.
    let (responses_id, responses_len) = post(
        "/v1/responses",
        json!({"model": "gpt-test", "input": "one two three", "max_output_tokens": 7,
               "x_cached": 1, "x_reasoning": 3, "stream": true}),
    );
    let lines = lines_for(&log, &[&json_id, &stream_id, &responses_id]);
    // The hold fitted to each request: max output × the output price + body bytes × the
    // dearest input price (Anthropic's cache writes, 3.75 per token; the Responses API's 2).
    let claude_hold = |max: u64, len: u64| (max * 15_000_000 + len * 3_750_000).div_ceil(1_000_000);
    let holds = [
        claude_hold(6, json_len),
        claude_hold(9, stream_len),
        7 * 10 + responses_len * 2,
    ];
    // (cost, model, all input, cached, cache writes, all output, reasoning, total)
    let want = [
        (112, "claude-test", 4 + 7 + 2, 7, 2, 6, 0, 19),
        (150, "claude-test", 4 + 7, 7, 0, 9, 0, 20),
        (67, "gpt-test", 3, 1, 0, 7, 3, 10),
    ];
    for ((line, hold), (cost, model, input, cached, creation, output, reasoning, total)) in
        lines.iter().zip(holds).zip(want)
    {
        assert_eq!(line["cost"], json!(hold.to_string()), "the hold of {line}");
        assert_eq!(
            (
                &line["md_cost"],
                &line["md_model"],
                &line["md_input_tokens"],
                &line["md_cached_input_tokens"],
                &line["md_cache_creation_input_tokens"],
                &line["md_output_tokens"],
                &line["md_reasoning_tokens"],
                &line["md_total_tokens"],
            ),
            (
                &json!(cost),
                &json!(model),
                &json!(input),
                &json!(cached),
                &json!(creation),
                &json!(output),
                &json!(reasoning),
                &json!(total),
            ),
            "the dynamic metadata of {line}"
        );
        assert_eq!(line["usage_cost"], json!(cost.to_string()), "{line}");
    }
    // The metadata's cost is what the ledger charged each request.
    let mut charged = Vec::new();
    let settled = wait_until(LOG_WAIT, || {
        let rows = balance.charges("acct_alog_md");
        charged = [&json_id, &stream_id, &responses_id]
            .iter()
            .map(|id| {
                rows.iter()
                    .find(|c| c["request_id"] == json!(id))
                    .and_then(|c| c["cost"].as_i64())
            })
            .collect();
        charged == [Some(112), Some(150), Some(67)]
    });
    assert!(settled, "ledger charges {charged:?}, metadata 112, 150, 67");
    eprintln!(
        "access log with dynamic metadata:\n{}",
        lines
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
