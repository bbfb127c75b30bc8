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
//! field unset.
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
