#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! End-to-end tests: the farebox wasm filter inside a real Envoy, configured from
//! `envoy/envoy.yaml`, in front of the echo upstream and the reference balance service
//! (or a scripted fake one). Every test has its own processes and temporary directory.
//!
//! Run with `make test` (it builds the wasm and the services and installs Envoy first).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ACCOUNT: &str = "acct-e2e";
const KEY: &str = "fbk-e2e-4d61c0ffee93";
/// How long an asynchronous refund may take to reach the ledger.
const REFUND_WAIT: Duration = Duration::from_secs(5);

/// The demo configuration with a generous callout timeout, so that a loaded CI machine
/// does not turn a slow first callout into a 503.
fn relaxed(label: &str) -> StackBuilder {
    stack(label).plugin(|c| c["timeout_ms"] = json!(3000))
}

/// Polls the ledger until the account's `refunded` total reaches `want`.
fn wait_refunded(balance: &BalanceService, account: &str, want: i64) -> Value {
    let mut last = Value::Null;
    let ok = wait_until(REFUND_WAIT, || {
        last = balance.account(account);
        num(&last, "refunded") >= want
    });
    assert!(
        ok,
        "no refund within {REFUND_WAIT:?}: account {last}, charges {:?}",
        balance.charges(account)
    );
    last
}

// ---------------------------------------------------------------------------------------
// The demo configuration itself
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn demo_config_validates() {
    let dir = TempDir::new("validate");
    let yaml = render_envoy_yaml(&demo_envoy_yaml(), &wasm_path(), None, None, None, false);
    let path = dir.join("envoy.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(envoy_bin())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&path)
        .output()
        .expect("run envoy --mode validate");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "validation failed:\n{}",
        tail(&log, 40)
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn demo_plugin_config_is_the_documented_one() {
    let c = demo_plugin_config();
    assert_eq!(c["cluster"], "balance");
    assert_eq!(
        c["credential"],
        json!({"source": "header", "name": "x-api-key"})
    );
    assert_eq!(c["failure_mode"], "closed");
    assert_eq!(c["balance_header"], "x-farebox-balance");
    assert_eq!(c["routes"].as_array().map(Vec::len), Some(3));
}

// ---------------------------------------------------------------------------------------
// Allowing, identifying, charging
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn funded_account_is_forwarded_with_its_account_id() {
    // The unmodified demo configuration.
    let s = stack("funded").start();
    s.balance().create_account(ACCOUNT, KEY, 10);

    let resp = s.get(
        "/v1/things?x=1",
        &[("x-api-key", KEY), ("x-farebox-account", "acct-mallory")],
    );
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(
        echoed_header_values(&resp, "x-farebox-account"),
        vec![ACCOUNT.to_string()],
        "the upstream must see exactly the real account id, never the client's forged one"
    );
    assert_eq!(
        resp.header("x-farebox-balance"),
        Some("9"),
        "{}",
        resp.dump()
    );

    let acct = s.balance().account(ACCOUNT);
    assert_eq!(
        (num(&acct, "balance"), num(&acct, "charged")),
        (9, 1),
        "{acct}"
    );
    let charges = s.balance().charges(ACCOUNT);
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0]["route"], "default");
    assert_eq!(charges[0]["method"], "GET");
    assert_eq!(charges[0]["cost"], 1);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn forged_account_header_is_stripped_on_free_routes_too() {
    let s = relaxed("forged-free").start();
    let resp = s.get("/health", &[("x-farebox-account", "acct-mallory")]);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert!(
        echoed_header_values(&resp, "x-farebox-account").is_empty(),
        "{}",
        resp.text()
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn bearer_credential_source() {
    let s = relaxed("bearer")
        .plugin(|c| c["credential"] = json!({"source": "bearer"}))
        .start();
    s.balance().create_account(ACCOUNT, KEY, 5);

    let auth = format!("Bearer {KEY}");
    let resp = s.get("/v1/x", &[("authorization", &auth)]);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(
        echoed_header_values(&resp, "x-farebox-account"),
        vec![ACCOUNT]
    );

    // The header source is not consulted any more.
    let resp = s.get_with_key("/v1/x", KEY);
    assert_problem(&resp, 401);
    let challenge = resp.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer"), "{}", resp.dump());
    assert_eq!(num(&s.balance().account(ACCOUNT), "balance"), 4);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn query_credential_source() {
    let s = relaxed("query")
        .plugin(|c| c["credential"] = json!({"source": "query", "name": "api_key"}))
        .start();
    s.balance().create_account(ACCOUNT, KEY, 5);

    let resp = s.get(&format!("/v1/x?a=1&api_key={KEY}&b=2"), &[]);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(
        echoed_header_values(&resp, "x-farebox-account"),
        vec![ACCOUNT]
    );

    assert_problem(&s.get("/v1/x?a=1", &[("x-api-key", KEY)]), 401);
    assert_eq!(num(&s.balance().account(ACCOUNT), "balance"), 4);
    // The ledger records the path without the query, so not the credential either.
    let charges = s.balance().charges(ACCOUNT);
    assert_eq!(charges[0]["path"], "/v1/x", "{charges:?}");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn path_tricks_cannot_dodge_the_price() {
    let s = relaxed("paths").start();
    s.balance().create_account(ACCOUNT, KEY, 20);
    let key = [("x-api-key", KEY)];

    // Envoy merges slashes and resolves dot segments before the filter prices the path.
    let resp = s.request("POST", "/v1//models/m1/./x/../infer", &key, b"{}");
    assert_eq!(resp.status, 200, "{}", resp.dump());
    let resp = s.request("POST", "/docs/../v1/models/m1/infer", &key, b"{}");
    assert_eq!(resp.status, 200, "{}", resp.dump());
    let charges = s.balance().charges(ACCOUNT);
    let routes: Vec<&str> = charges
        .iter()
        .map(|c| c["route"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(routes, vec!["infer", "infer"], "{charges:?}");
    assert_eq!(num(&s.balance().account(ACCOUNT), "balance"), 10);

    // Escaped slashes: Envoy redirects to the unescaped path; nothing reaches the filter.
    let resp = s.get("/docs/..%2Fv1%2Fx", &[]);
    assert_eq!(resp.status, 307, "{}", resp.dump());
    assert_eq!(s.balance().authorize_calls(), 2);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn routes_are_priced_first_match_wins() {
    let s = relaxed("pricing").start();
    s.balance().create_account(ACCOUNT, KEY, 7);
    let key = [("x-api-key", KEY)];

    // POST on the glob route costs 5.
    let resp = s.request("POST", "/v1/models/m1/infer", &key, b"{}");
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(resp.header("x-farebox-balance"), Some("2"));
    // Same path with another method: default route, cost 1.
    let resp = s.get("/v1/models/m1/infer", &key);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    // `*` is exactly one segment: this is the default route.
    let resp = s.request("POST", "/v1/models/a/b/infer", &key, b"{}");
    assert_eq!(resp.status, 200, "{}", resp.dump());
    // Balance 0 now: the infer route is refused with its own price.
    let body = assert_problem(&s.request("POST", "/v1/models/m2/infer", &key, b"{}"), 402);
    assert_eq!(body["price"], 5, "{body}");
    assert_eq!(body["route"], "infer", "{body}");

    let routes: Vec<String> = s
        .balance()
        .charges(ACCOUNT)
        .iter()
        .map(|c| format!("{}:{}", c["route"].as_str().unwrap_or("?"), c["cost"]))
        .collect();
    let mut sorted = routes.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["default:1", "default:1", "infer:5"],
        "{routes:?}"
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn free_routes_never_reach_the_balance_service() {
    let s = relaxed("free").start();
    for (path, headers) in [
        ("/health", vec![]),
        ("/docs/intro", vec![]),
        ("/docs/a/b/c", vec![("x-api-key", "unknown-key")]),
    ] {
        let resp = s.get(path, &headers);
        assert_eq!(resp.status, 200, "{path}: {}", resp.dump());
    }
    assert_eq!(s.balance().authorize_calls(), 0);
    expect_metrics(
        &s.envoy,
        &[("free", 3), ("callouts", 0)],
        Duration::from_secs(5),
    );
}

// ---------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn running_out_of_balance_gives_402() {
    let s = relaxed("run-out")
        .balance_opts(BalanceOpts {
            deny_max_age: Some(0),
            deny_retry_after: Some(7),
            ..Default::default()
        })
        .start();
    s.balance().create_account(ACCOUNT, KEY, 3);

    for left in ["2", "1", "0"] {
        let resp = s.get_with_key("/v1/x", KEY);
        assert_eq!(resp.status, 200, "{}", resp.dump());
        assert_eq!(
            resp.header("x-farebox-balance"),
            Some(left),
            "{}",
            resp.dump()
        );
    }
    for _ in 0..2 {
        let resp = s.get_with_key("/v1/x", KEY);
        let body = assert_problem(&resp, 402);
        assert_eq!(body["balance"], 0, "{body}");
        assert_eq!(body["price"], 1, "{body}");
        assert_eq!(body["route"], "default", "{body}");
        assert_eq!(
            resp.header("cache-control"),
            Some("no-store"),
            "{}",
            resp.dump()
        );
        assert_eq!(resp.header("retry-after"), Some("7"), "{}", resp.dump());
    }

    let acct = s.balance().account(ACCOUNT);
    assert_eq!(num(&acct, "balance"), 0, "{acct}");
    assert_eq!(num(&acct, "charged"), 3, "{acct}");
    assert_eq!(s.balance().charges(ACCOUNT).len(), 3);
    expect_metrics(
        &s.envoy,
        &[("allowed", 3), ("denied", 2)],
        Duration::from_secs(5),
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn missing_credential_is_401() {
    let s = relaxed("missing").start();
    let resp = s.get("/v1/x", &[]);
    assert_problem(&resp, 401);
    assert!(resp.header("www-authenticate").is_some(), "{}", resp.dump());
    // An empty credential is no credential.
    assert_problem(&s.get("/v1/x", &[("x-api-key", "")]), 401);
    assert_eq!(s.balance().authorize_calls(), 0);
    assert!(wait_metric(&s.envoy, "unauthenticated", 1, Duration::from_secs(2)) >= 1);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn unknown_credential_is_401() {
    let s = relaxed("unknown").start();
    s.balance().create_account(ACCOUNT, KEY, 5);
    let resp = s.get_with_key("/v1/x", "fbk-not-a-key");
    assert_problem(&resp, 401);
    assert!(resp.header("www-authenticate").is_some(), "{}", resp.dump());
    assert_eq!(s.balance().authorize_calls(), 1);
    assert_eq!(num(&s.balance().account(ACCOUNT), "balance"), 5);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn disabled_account_is_403() {
    let s = relaxed("disabled").start();
    s.balance().create_account_full(ACCOUNT, KEY, 5, true);
    assert_problem(&s.get_with_key("/v1/x", KEY), 403);
    assert!(wait_metric(&s.envoy, "forbidden", 1, Duration::from_secs(2)) >= 1);
    assert_eq!(num(&s.balance().account(ACCOUNT), "balance"), 5);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn rate_limit_from_the_service_is_passed_on() {
    let fake = FakeService::start(|_, _| FakeAction::Respond {
        status: 429,
        headers: vec![("retry-after".into(), "11".into())],
        body: b"{}".to_vec(),
    });
    let s = relaxed("rate-limited").balance_addr(fake.addr).start();
    let resp = s.get_with_key("/v1/x", KEY);
    assert_problem(&resp, 429);
    assert_eq!(resp.header("retry-after"), Some("11"), "{}", resp.dump());
    assert!(wait_metric(&s.envoy, "rate_limited", 1, Duration::from_secs(2)) >= 1);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn cacheable_deny_is_served_from_cache() {
    let s = relaxed("deny-cache")
        .balance_opts(BalanceOpts {
            deny_max_age: Some(30),
            ..Default::default()
        })
        .start();
    s.balance().create_account(ACCOUNT, KEY, 0);

    for i in 0..10 {
        let resp = s.get_with_key("/v1/x", KEY);
        let body = assert_problem(&resp, 402);
        assert_eq!(body["price"], 1, "{body}");
        let cc = resp.header("cache-control").unwrap_or_default();
        assert!(
            cc.starts_with("private"),
            "request {i}: cache-control {cc:?}"
        );
        let n = max_age(cc).unwrap_or(0);
        assert!(n > 0 && n <= 30, "request {i}: cache-control {cc:?}");
    }
    assert_eq!(
        s.balance().authorize_calls(),
        1,
        "later denials come from the cache"
    );
    expect_metrics(
        &s.envoy,
        &[("cache_hits", 9), ("callouts", 1)],
        Duration::from_secs(5),
    );
}

// ---------------------------------------------------------------------------------------
// Refunds
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn upstream_5xx_is_refunded() {
    let s = relaxed("refund-5xx").start();
    s.balance().create_account(ACCOUNT, KEY, 10);

    let ok = s.get_with_key("/v1/ok", KEY);
    assert_eq!(ok.status, 200, "{}", ok.dump());
    let failed = s.get_with_key("/status/503", KEY);
    assert_eq!(failed.status, 503, "{}", failed.dump());

    let acct = wait_refunded(s.balance(), ACCOUNT, 1);
    assert_eq!(num(&acct, "balance"), 9, "{acct}");
    assert_eq!(
        num(&acct, "charged"),
        1,
        "only the 200 stays charged: {acct}"
    );
    assert_eq!(num(&acct, "refunded"), 1, "{acct}");

    let charges = s.balance().charges(ACCOUNT);
    assert_eq!(charges.len(), 2, "{charges:?}");
    let refunded: Vec<&Value> = charges
        .iter()
        .filter(|c| c["status"] == "refunded")
        .collect();
    assert_eq!(refunded.len(), 1, "{charges:?}");
    assert_eq!(refunded[0]["refund_status"], 503, "{charges:?}");
    assert_eq!(refunded[0]["path"], "/status/503", "{charges:?}");
    expect_metrics(
        &s.envoy,
        &[("refunds", 1), ("refund_failures", 0)],
        Duration::from_secs(5),
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn upstream_down_is_refunded() {
    let s = relaxed("refund-down")
        .upstream_addr(closed_port_addr())
        .start();
    s.balance().create_account(ACCOUNT, KEY, 10);

    let resp = s.get_with_key("/v1/x", KEY);
    assert_eq!(
        resp.status,
        503,
        "Envoy's own 503 expected: {}",
        resp.dump()
    );
    let acct = wait_refunded(s.balance(), ACCOUNT, 1);
    assert_eq!(num(&acct, "balance"), 10, "{acct}");
    assert_eq!(num(&acct, "charged"), 0, "{acct}");
    let charges = s.balance().charges(ACCOUNT);
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0]["status"], "refunded", "{charges:?}");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn no_charge_statuses_are_configurable() {
    // One worker: its outbox sends refunds in the order the responses ended, so once
    // the refunds of the two later 404s are in, a (wrong) refund of the 500 would be too.
    let s = relaxed("no-charge-cfg")
        .plugin(|c| c["no_charge_statuses"] = json!([404]))
        .concurrency(1)
        .start();
    s.balance().create_account(ACCOUNT, KEY, 10);
    assert_eq!(s.get_with_key("/status/500", KEY).status, 500);
    assert_eq!(s.get_with_key("/status/404", KEY).status, 404);
    wait_refunded(s.balance(), ACCOUNT, 1);
    assert_eq!(s.get_with_key("/status/404", KEY).status, 404);
    let acct = wait_refunded(s.balance(), ACCOUNT, 2);
    expect_metrics(
        &s.envoy,
        &[("refunds", 2), ("refund_failures", 0)],
        Duration::from_secs(5),
    );
    assert_eq!(s.balance().refund_calls(), 2, "no refund call for the 500");
    assert_eq!(num(&acct, "refunded"), 2, "exactly the two 404s: {acct}");
    assert_eq!(num(&acct, "charged"), 1, "the 500 stays charged: {acct}");
    assert_eq!(num(&acct, "balance"), 9, "{acct}");
}

// ---------------------------------------------------------------------------------------
// Balance service failures
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn balance_service_down_fails_closed() {
    let mut s = relaxed("fail-closed").start();
    s.balance().create_account(ACCOUNT, KEY, 10);
    s.balance_mut().stop();

    let resp = s.get_with_key("/v1/x", KEY);
    assert_problem(&resp, 503);
    assert_eq!(resp.header("retry-after"), Some("5"), "{}", resp.dump());
    expect_metrics(
        &s.envoy,
        &[
            ("fail_closed", 1),
            ("callout_failures", 1),
            ("fail_open", 0),
        ],
        Duration::from_secs(5),
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn balance_service_down_fails_open() {
    let mut s = relaxed("fail-open")
        .plugin(|c| c["failure_mode"] = json!("open"))
        .start();
    s.balance().create_account(ACCOUNT, KEY, 10);
    s.balance_mut().stop();

    let resp = s.get(
        "/v1/x",
        &[("x-api-key", KEY), ("x-farebox-account", "acct-mallory")],
    );
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert!(
        echoed_header_values(&resp, "x-farebox-account").is_empty(),
        "no account id can be vouched for: {}",
        resp.text()
    );
    expect_metrics(
        &s.envoy,
        &[
            ("fail_open", 1),
            ("callout_failures", 1),
            ("fail_closed", 0),
        ],
        Duration::from_secs(5),
    );
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn slow_balance_service_times_out() {
    let fake = FakeService::start(|_, _| {
        FakeAction::delay_json(
            3000,
            200,
            &json!({"allow": true, "account_id": "acct-slow"}),
        )
    });
    let s = stack("slow")
        .plugin(|c| c["timeout_ms"] = json!(300))
        .balance_addr(fake.addr)
        .start();

    let started = Instant::now();
    let resp = s.get_with_key("/v1/x", KEY);
    let took = started.elapsed();
    assert_problem(&resp, 503);
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(
        took >= Duration::from_millis(250),
        "answered before the timeout: {took:?}"
    );
    assert_eq!(fake.count(), 1);
    assert!(wait_metric(&s.envoy, "fail_closed", 1, Duration::from_secs(2)) >= 1);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn budget_header_shows_what_is_left_and_the_402_names_the_reset() {
    let s = relaxed("budget")
        .plugin(|c| c["budget_header"] = json!("x-farebox-budget-remaining"))
        .start();
    s.balance().create_account(ACCOUNT, KEY, 100);
    // No budget: no header.
    let resp = s.get_with_key("/v1/things", KEY);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(resp.header("x-farebox-budget-remaining"), None);
    s.balance().admin(
        "PUT",
        &format!("/admin/accounts/{ACCOUNT}/budget"),
        Some(&json!({"limit": 3, "period": "day", "time_zone": "UTC"})),
    );
    for left in ["2", "1", "0"] {
        let resp = s.get_with_key("/v1/things", KEY);
        assert_eq!(resp.status, 200, "{}", resp.dump());
        assert_eq!(
            resp.header("x-farebox-budget-remaining"),
            Some(left),
            "{}",
            resp.dump()
        );
    }
    // The balance (96) could pay; the budget cannot.
    let problem = assert_problem(&s.get_with_key("/v1/things", KEY), 402);
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("budget of 3 units per day (UTC)") && detail.contains("resets at "),
        "{problem}"
    );
    let reset = detail.rsplit("resets at ").next().unwrap_or_default();
    assert!(reset.ends_with("T00:00:00+00:00"), "{detail}");
    assert_eq!(num(&s.balance().account(ACCOUNT), "balance"), 96);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn connection_closed_by_the_service_fails_closed() {
    let fake = FakeService::start(|_, _| FakeAction::Close);
    let s = relaxed("closed-conn").balance_addr(fake.addr).start();
    assert_problem(&s.get_with_key("/v1/x", KEY), 503);
    assert!(fake.count() >= 1);
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn garbage_answer_fails_closed_and_the_vm_survives() {
    let fake = FakeService::start(|req, i| {
        if req.path != "/v1/authorize" {
            return FakeAction::json(404, &json!({}));
        }
        if i == 0 {
            FakeAction::raw(200, "application/json", b"{\"allow\": tr")
        } else {
            FakeAction::json(
                200,
                &json!({"allow": true, "account_id": "acct-fake", "balance": 41}),
            )
        }
    });
    let s = relaxed("garbage").balance_addr(fake.addr).start();

    assert_problem(&s.get_with_key("/v1/first", KEY), 503);
    let resp = s.get_with_key("/v1/second?q=1", KEY);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(
        echoed_header_values(&resp, "x-farebox-account"),
        vec!["acct-fake"]
    );
    assert_eq!(resp.header("x-farebox-balance"), Some("41"));

    // The callout itself follows the contract. The garbage answer may have charged, so the
    // outbox also sends an undo refund for the first request; it arrives on the root timer, at
    // a time of its own, so only the authorize calls are counted here.
    let reqs: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/authorize")
        .collect();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    let first_id = reqs[0].json()["request_id"].clone();
    assert!(
        wait_until(REFUND_WAIT, || fake.requests().iter().any(|r| r.path
            == "/v1/refund"
            && r.json()["request_id"] == first_id)),
        "no undo refund for the garbage-answered call {first_id}: {:?}",
        fake.requests()
    );
    let r = &reqs[1];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/authorize");
    assert_eq!(
        r.header("host"),
        Some("balance"),
        "authority defaults to the cluster"
    );
    let body = r.json();
    assert_eq!(body["account"], KEY, "{body}");
    assert_eq!(body["cost"], 1, "{body}");
    assert_eq!(body["route"], "default", "{body}");
    assert_eq!(body["method"], "GET", "{body}");
    assert!(
        body["path"]
            .as_str()
            .unwrap_or_default()
            .starts_with("/v1/second"),
        "{body}"
    );
    assert!(
        !body["request_id"].as_str().unwrap_or_default().is_empty(),
        "{body}"
    );
    assert!(wait_metric(&s.envoy, "callout_failures", 1, Duration::from_secs(5)) >= 1);
}

// ---------------------------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn invalid_plugin_config_refuses_to_start() {
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "bad-glob",
            {
                let mut c = demo_plugin_config();
                c["routes"][0] = json!({"name": "bad", "glob": "/a/**", "cost": 1});
                c
            },
            "invalid plugin config: routes[0].glob",
        ),
        (
            "unknown-field",
            {
                let mut c = demo_plugin_config();
                c["cluser"] = json!("balance");
                c
            },
            "invalid plugin config: cluser",
        ),
        (
            "zero-timeout",
            {
                let mut c = demo_plugin_config();
                c["timeout_ms"] = json!(0);
                c
            },
            "invalid plugin config: timeout_ms",
        ),
    ];
    for (label, config, want) in cases {
        let dir = TempDir::new(label);
        let opts = EnvoyOpts::new(&config, closed_port_addr(), closed_port_addr());
        let (status, log) = Envoy::run_expect_exit(dir.path(), &opts, Duration::from_secs(30));
        let status = status.unwrap_or_else(|| {
            panic!(
                "{label}: Envoy still running after 30 s; log:\n{}",
                tail(&log, 30)
            )
        });
        assert!(!status.success(), "{label}: Envoy exited with {status}");
        assert!(
            log.contains(want),
            "{label}: no `{want}` in the log:\n{}",
            tail(&log, 30)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Concurrency, metrics, service token, secrecy, request ids
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn concurrent_requests_never_overspend() {
    let s = stack("concurrent")
        .plugin(|c| c["timeout_ms"] = json!(10000))
        .start();
    s.balance().create_account(ACCOUNT, KEY, 10);

    let answers = parallel_requests(s.envoy.addr, 50, "GET", "/v1/x", &[("x-api-key", KEY)]);
    let ok = answers.iter().filter(|r| r.status == 200).count();
    let denied = answers.iter().filter(|r| r.status == 402).count();
    let others: Vec<String> = answers
        .iter()
        .filter(|r| r.status != 200 && r.status != 402)
        .map(Response::dump)
        .collect();
    assert!(others.is_empty(), "unexpected answers: {others:?}");
    assert_eq!((ok, denied), (10, 40));

    let acct = s.balance().account(ACCOUNT);
    assert_eq!(num(&acct, "balance"), 0, "{acct}");
    assert_eq!(num(&acct, "charged"), 10, "{acct}");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn metrics_are_in_stats_and_prometheus() {
    let s = relaxed("metrics")
        .balance_opts(BalanceOpts {
            deny_max_age: Some(0),
            ..Default::default()
        })
        .start();
    s.balance().create_account(ACCOUNT, KEY, 2);
    for _ in 0..3 {
        s.get_with_key("/v1/x", KEY); // 200, 200, 402
    }
    s.get("/health", &[]);
    s.get("/v1/x", &[]); // 401, no callout

    expect_metrics(
        &s.envoy,
        &[
            ("allowed", 2),
            ("denied", 1),
            ("free", 1),
            ("unauthenticated", 1),
            ("callouts", 3),
            ("callout_failures", 0),
        ],
        Duration::from_secs(5),
    );
    assert_eq!(s.envoy.stat("wasmcustom.farebox_allowed"), Some(2));

    let prom = s.envoy.stats_prometheus();
    let line = prom
        .lines()
        .find(|l| !l.starts_with('#') && l.contains("farebox_allowed"))
        .unwrap_or_else(|| panic!("no farebox_allowed in /stats/prometheus:\n{prom}"));
    assert!(line.trim_end().ends_with(" 2"), "{line}");
    for name in ["denied", "free", "unauthenticated", "callouts"] {
        assert!(
            prom.contains(&format!("farebox_{name}")),
            "no farebox_{name} in /stats/prometheus"
        );
    }
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn service_token_is_sent_to_the_service() {
    let token = "svc-e2e-6b2f0a9d";
    let s = relaxed("service-token")
        .balance_opts(BalanceOpts {
            service_token: Some(token.to_string()),
            ..Default::default()
        })
        .plugin(|c| c["service_token"] = json!(token))
        .start();
    s.balance().create_account(ACCOUNT, KEY, 5);
    let resp = s.get_with_key("/v1/x", KEY);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(num(&s.balance().account(ACCOUNT), "balance"), 4);
    assert!(!resp.dump().contains(token), "{}", resp.dump());
}

/// The filter's own log (wasm component at debug) never shows a credential.
/// Envoy's other components are left at info: at debug, Envoy itself prints every
/// request header (x-api-key and authorization included) whatever the filter does.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn credentials_never_appear_in_answers_or_logs() {
    let unknown = "fbk-e2e-unknown-5a0e77";
    let s = relaxed("secrecy")
        .balance_opts(BalanceOpts {
            deny_max_age: Some(0),
            ..Default::default()
        })
        .envoy_args(&["--component-log-level", "wasm:debug"])
        .start();
    s.balance().create_account(ACCOUNT, KEY, 2);

    let mut answers = vec![
        s.get_with_key("/v1/x", KEY),       // 200
        s.get_with_key("/status/503", KEY), // 503, refunded
    ];
    wait_refunded(s.balance(), ACCOUNT, 1);
    answers.extend([
        s.get_with_key("/v1/x", KEY),     // 200
        s.get_with_key("/v1/x", KEY),     // 402
        s.get_with_key("/v1/x", unknown), // 401
        s.get("/v1/x", &[]),              // 401
    ]);
    let statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 503, 200, 402, 401, 401]);

    for resp in &answers[3..] {
        // (The first three are the echo's, which reflects the request by design.)
        let dump = resp.dump();
        assert!(!dump.contains(KEY) && !dump.contains(unknown), "{dump}");
    }
    let log = s.envoy.log();
    assert!(log.contains("[wasm]"), "the filter logged nothing at all?");
    assert!(
        !log.contains(KEY),
        "credential in Envoy's log:\n{}",
        grep(&log, KEY)
    );
    assert!(
        !log.contains(unknown),
        "credential in Envoy's log:\n{}",
        grep(&log, unknown)
    );
}

/// Same with a broken balance service and the bearer source: failure paths log too.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn credentials_never_logged_on_failures() {
    let fake = FakeService::start(|_, i| {
        if i % 2 == 0 {
            FakeAction::raw(200, "application/json", b"not json")
        } else {
            FakeAction::Close
        }
    });
    let s = relaxed("secrecy-fail")
        .plugin(|c| c["credential"] = json!({"source": "bearer"}))
        .balance_addr(fake.addr)
        .envoy_args(&["--component-log-level", "wasm:debug"])
        .start();
    let auth = format!("Bearer {KEY}");
    for _ in 0..2 {
        let resp = s.get("/v1/x", &[("authorization", &auth)]);
        assert_problem(&resp, 503);
        assert!(!resp.dump().contains(KEY), "{}", resp.dump());
    }
    let log = s.envoy.log();
    assert!(
        !log.contains(KEY),
        "credential in Envoy's log:\n{}",
        grep(&log, KEY)
    );
}

fn grep(text: &str, needle: &str) -> String {
    text.lines()
        .filter(|l| l.contains(needle))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn client_cannot_choose_the_request_id() {
    let forged = "forged-request-id-0001";
    let s = relaxed("request-id").start();
    s.balance().create_account(ACCOUNT, KEY, 5);
    let resp = s.get("/v1/x", &[("x-api-key", KEY), ("x-request-id", forged)]);
    assert_eq!(resp.status, 200, "{}", resp.dump());

    let charges = s.balance().charges(ACCOUNT);
    assert_eq!(charges.len(), 1, "{charges:?}");
    let recorded = charges[0]["request_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!recorded.is_empty(), "{charges:?}");
    assert_ne!(recorded, forged, "the client chose the ledger's request id");
    assert_eq!(
        echoed_header_values(&resp, "x-request-id"),
        vec![recorded],
        "the upstream and the ledger see the same (Envoy-generated) request id"
    );
}
