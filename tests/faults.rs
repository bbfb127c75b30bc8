#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! The fault matrix in a real Envoy: every way the balance service can fail, in both
//! `failure_mode`s, checking what the client gets, how long it waits, that nothing is
//! charged for a request the client saw fail, and that the wasm VM lives on. Also: Envoy
//! killed with requests in flight, and a plugin config swapped at run time (LDS from a
//! watched file) while decisions of the old config sit in the shared-data cache.
//!
//! Run with `make test`. docs/security.md points here for the claims these tests prove.

mod common;
#[path = "support/hardening.rs"]
mod hardening;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use hardening::*;
use serde_json::{json, Value};

/// The callout timeout of every stack here: short, so the matrix runs quickly.
const TIMEOUT_MS: u64 = 400;
/// How much longer than the callout timeout any answer may take on a loaded 2-core box.
const SLACK: Duration = Duration::from_millis(1600);
/// How long a refund may take to leave the outbox (its timer runs every 100 ms).
const REFUND_WAIT: Duration = Duration::from_secs(5);
/// The account the fake balance service vouches for on a normal request.
const GOOD_KEY: &str = "fk-good";
const GOOD_ACCOUNT: &str = "acct-good";

fn limit() -> Duration {
    Duration::from_millis(TIMEOUT_MS) + SLACK
}

// ---------------------------------------------------------------------------------------
// The scripted faults
// ---------------------------------------------------------------------------------------

/// How the fake balance service answers an authorize for this fault's credential.
fn fault_act(key: &str) -> FakeAction {
    let allow = |account: &str| json!({"allow": true, "account_id": account, "balance": 7});
    match key {
        GOOD_KEY => FakeAction::json(200, &allow(GOOD_ACCOUNT)),
        // Service failures.
        "fk-hang" => FakeAction::Hang { ms: 4000 },
        "fk-late" => FakeAction::json(200, &allow("acct-late")).delayed(TIMEOUT_MS + 600),
        "fk-reset" => FakeAction::ResetMidBody {
            status: 200,
            declared: 200,
            body: br#"{"allow": true, "account_id": "acct-re"#.to_vec(),
        },
        "fk-500" => FakeAction::json(500, &json!({"error": "boom"})),
        "fk-502" => FakeAction::answer(502, &[], b"<html>bad gateway</html>"),
        "fk-503" => FakeAction::answer(503, &[("retry-after", "30")], b""),
        "fk-empty" => FakeAction::answer(200, &[], b""),
        "fk-truncated" => {
            FakeAction::answer(200, &[], br#"{"allow": true, "account_id": "acct-tr"#)
        }
        "fk-missing-fields" => FakeAction::json(200, &json!({"allow": true})),
        "fk-no-allow" => FakeAction::json(200, &json!({"account_id": "acct-x", "balance": 1})),
        "fk-wrong-types" => FakeAction::json(
            200,
            &json!({"allow": true, "account_id": 42, "balance": "ten"}),
        ),
        "fk-allow-yes" => FakeAction::json(200, &json!({"allow": "yes", "account_id": "acct-yes"})),
        "fk-allow-false-200" => {
            FakeAction::json(200, &json!({"allow": false, "account_id": "acct-f"}))
        }
        "fk-fraction" => FakeAction::json(
            200,
            &json!({"allow": true, "account_id": "acct-frac", "balance": 1.5}),
        ),
        "fk-huge-balance" => FakeAction::answer(
            200,
            &[],
            br#"{"allow": true, "account_id": "acct-huge", "balance": 99999999999999999999999}"#,
        ),
        "fk-bad-account-id" => FakeAction::json(
            200,
            &json!({"allow": true, "account_id": "acct with\r\nx-injected: 1"}),
        ),
        "fk-array" => FakeAction::json(200, &json!([true, "acct-arr"])),
        "fk-oversized" => {
            let mut body = br#"{"allow": true, "account_id": "acct-big", "pad": ""#.to_vec();
            // Four times the filter's 64 KiB cap: big enough to be refused for its size,
            // small enough that Envoy takes it in well inside the callout timeout on a
            // loaded machine (10 MiB was not, and read as a timeout or a reset).
            body.resize(body.len() + 256 * 1024, b'a');
            body.extend_from_slice(b"\"}");
            FakeAction::answer(200, &[], &body)
        }
        "fk-418" => FakeAction::json(418, &json!({"error": "teapot"})),
        "fk-409" => FakeAction::json(
            409,
            &json!({"error": "request_id belongs to another account"}),
        ),
        // Valid but odd: a negative balance is an i64 the contract allows.
        "fk-negative-balance" => FakeAction::json(
            200,
            &json!({"allow": true, "account_id": "acct-neg", "balance": -5}),
        ),
        // Decisions with odd headers or bodies (not failures).
        "fk-cc-malformed" => FakeAction::answer(
            402,
            &[("cache-control", "max-age=banana")],
            br#"{"allow": false, "balance": 0, "price": 1, "detail": "broke"}"#,
        ),
        "fk-cc-year" => FakeAction::answer(
            402,
            &[("cache-control", "max-age=31536000")],
            br#"{"allow": false, "balance": 0, "price": 1, "detail": "broke"}"#,
        ),
        "fk-cc-overflow" => FakeAction::answer(
            402,
            &[("cache-control", "public, max-age=99999999999999999999999")],
            br#"{"allow": false, "balance": 0, "price": 1}"#,
        ),
        "fk-402-bare" => FakeAction::Respond {
            status: 402,
            headers: vec![],
            body: vec![],
        },
        "fk-402-wrong-shape" => FakeAction::json(
            402,
            &json!({"allow": "no", "balance": "lots", "price": -3, "detail": 12}),
        ),
        "fk-402-retry-garbage" => FakeAction::answer(
            402,
            &[("retry-after", "soon")],
            br#"{"allow": false, "balance": 0, "price": 1}"#,
        ),
        "fk-429-retry-date" => FakeAction::answer(
            429,
            &[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")],
            b"{}",
        ),
        other => panic!("no fault scripted for {other:?}"),
    }
}

/// Faults the filter must treat as a service failure (failure_mode decides).
const FAILURES: &[&str] = &[
    "fk-hang",
    "fk-late",
    "fk-reset",
    "fk-500",
    "fk-502",
    "fk-503",
    "fk-empty",
    "fk-truncated",
    "fk-missing-fields",
    "fk-no-allow",
    "fk-wrong-types",
    "fk-allow-yes",
    "fk-allow-false-200",
    "fk-fraction",
    "fk-huge-balance",
    "fk-bad-account-id",
    "fk-array",
    "fk-oversized",
    "fk-418",
    "fk-409",
];

/// What the filter logs (at warn) as the reason for each failure.
/// The failure code (`ServiceFailure::code`) the filter logs for each fault.
fn expected_code(fault: &str) -> &'static str {
    match fault {
        "fk-hang" | "fk-late" => "service_timeout",
        "fk-reset" => "no_answer",
        "fk-500" | "fk-502" | "fk-503" => "service_unavailable",
        "fk-empty" | "fk-truncated" | "fk-missing-fields" | "fk-wrong-types" | "fk-no-allow"
        | "fk-allow-yes" | "fk-allow-false-200" | "fk-fraction" | "fk-huge-balance"
        | "fk-bad-account-id" | "fk-array" => "bad_answer",
        "fk-oversized" => "answer_too_large",
        "fk-418" | "fk-409" => "unexpected_status",
        other => panic!("no failure code for {other}"),
    }
}

/// The `code=…` of a log line, if it has one.
fn log_code(line: &str) -> Option<&str> {
    let rest = line.split_once("code=")?.1;
    let end = rest
        .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

fn fake_balance() -> FakeService {
    FakeService::start(|req, _| match req.path.as_str() {
        "/v1/authorize" => fault_act(req.json()["account"].as_str().unwrap_or_default()),
        "/v1/refund" => FakeAction::json(
            200,
            &json!({"refunded": true, "account_id": "acct-any", "balance": 0}),
        ),
        _ => FakeAction::json(404, &json!({"error": "not found"})),
    })
}

fn fault_stack(label: &str, mode: &str, balance: SocketAddr) -> Stack {
    stack(label)
        .plugin(|c| {
            c["timeout_ms"] = json!(TIMEOUT_MS);
            c["failure_mode"] = json!(mode);
        })
        .balance_addr(balance)
        .start()
}

/// A normal request right after a fault: served, with the service's account id.
fn assert_normal_request(s: &Stack, after: &str) {
    let resp = s.get_with_key("/v1/normal", GOOD_KEY);
    assert_eq!(resp.status, 200, "after {after}: {}", resp.dump());
    assert_eq!(
        echoed_header_values(&resp, "x-farebox-account"),
        vec![GOOD_ACCOUNT],
        "after {after}"
    );
}

/// The request id the filter sent with the authorize call for `key`'s `nth` request.
fn authorize_request_ids(fake: &FakeService, key: &str) -> Vec<String> {
    fake.to("/v1/authorize")
        .iter()
        .filter(|r| r.json()["account"] == key)
        .map(|r| {
            r.json()["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn refunds(fake: &FakeService) -> Vec<Value> {
    fake.to("/v1/refund")
        .iter()
        .map(FakeRequest::json)
        .collect()
}

/// One row of the report the matrix prints.
fn row(fault: &str, mode: &str, status: u16, took: Duration, charged: &str) -> String {
    format!(
        "| {fault} | {mode} | {status} | {} ms | {charged} | yes |",
        took.as_millis()
    )
}

fn run_failure_matrix(mode: &str) {
    let fake = fake_balance();
    let s = fault_stack(&format!("faults-{mode}"), mode, fake.addr);
    let baseline = vm_health(s.envoy.admin);
    assert_normal_request(&s, "start");

    let mut report = Vec::new();
    for fault in FAILURES {
        let path = format!("/v1/fault/{fault}");
        let (resp, took) = timed(|| s.get(&path, &[("x-api-key", fault)]));
        assert!(took < limit(), "{fault} ({mode}): took {took:?}");
        match mode {
            "closed" => {
                assert_problem(&resp, 503);
                assert_eq!(
                    resp.header("retry-after"),
                    Some("5"),
                    "{fault}: {}",
                    resp.dump()
                );
                assert_eq!(resp.header("cache-control"), Some("no-store"), "{fault}");
            }
            _ => {
                assert_eq!(resp.status, 200, "{fault} ({mode}): {}", resp.dump());
                // The upstream's answer (the echo), unpaid and without an account id.
                assert_eq!(resp.json()["path"], json!(path), "{fault}: {}", resp.dump());
                assert!(
                    echoed_header_values(&resp, "x-farebox-account").is_empty(),
                    "{fault}: no account can be vouched for: {}",
                    resp.text()
                );
            }
        }
        let ids = authorize_request_ids(&fake, fault);
        assert_eq!(
            ids.len(),
            1,
            "{fault}: one authorize call, never retried: {ids:?}"
        );
        let charged = if mode == "closed" {
            "refund sent"
        } else {
            "kept (served)"
        };
        report.push(row(fault, mode, resp.status, took, charged));
        assert_normal_request(&s, fault);
    }

    // Closed: every call reached the service, so each is undone by request id (the service
    // may have debited before its answer was lost). Open: the client was served, so the
    // charge (if any) stands and nothing is refunded.
    let wanted: Vec<(String, String)> = FAILURES
        .iter()
        .map(|f| (f.to_string(), authorize_request_ids(&fake, f)[0].clone()))
        .collect();
    if mode == "closed" {
        let all_refunded = wait_until(REFUND_WAIT, || {
            let got = refunds(&fake);
            wanted
                .iter()
                .all(|(_, id)| got.iter().any(|r| r["request_id"] == json!(id)))
        });
        let got = refunds(&fake);
        assert!(all_refunded, "missing refunds; sent: {got:?}");
        for (fault, id) in &wanted {
            let r: Vec<&Value> = got
                .iter()
                .filter(|r| r["request_id"] == json!(id))
                .collect();
            assert_eq!(
                r.len(),
                1,
                "{fault}: one refund (the service answered 200): {r:?}"
            );
            assert_eq!(r[0]["account"], json!(fault), "{fault}: {r:?}");
            assert_eq!(r[0]["cost"], 1, "{fault}: {r:?}");
            assert_eq!(r[0]["status"], 503, "{fault}: {r:?}");
        }
        assert_eq!(
            got.len(),
            wanted.len(),
            "refunds only for the failed requests: {got:?}"
        );
    } else {
        // The positive signal that the outbox has run: a paid request the upstream fails
        // is refunded. A wrong refund of a fault, queued long before it, is in by then.
        let resp = s.get_with_key("/status/503", GOOD_KEY);
        assert_eq!(resp.status, 503, "{}", resp.dump());
        let refunded = wait_until(REFUND_WAIT, || !refunds(&fake).is_empty());
        let got = refunds(&fake);
        assert!(refunded, "the upstream's 503 was not refunded");
        assert_eq!(got.len(), 1, "a served request was refunded: {got:?}");
        assert_eq!(
            (&got[0]["account"], &got[0]["status"]),
            (&json!(GOOD_KEY), &json!(503)),
            "{got:?}"
        );
    }

    // Each failure is read for the right reason: the filter logs its code with the
    // request id.
    let log = s.envoy.log();
    for (fault, id) in &wanted {
        let line = grep(&log, id);
        assert_eq!(
            log_code(&line),
            Some(expected_code(fault)),
            "{fault}: the failure code in the log line for {id}: {line:?}"
        );
    }

    // (Counters are flushed by the filter's timer: wait for the expected one.)
    let n = FAILURES.len() as u64;
    let (closed, open) = if mode == "closed" { (n, 0) } else { (0, n) };
    expect_metrics(
        &s.envoy,
        &[
            ("fail_closed", closed),
            ("fail_open", open),
            ("callout_failures", n),
        ],
        Duration::from_secs(5),
    );
    assert_envoy_vm_alive(&s.envoy, &baseline, &format!("{mode} matrix"));
    assert_normal_request(&s, "the whole matrix");
    eprintln!("fault matrix, failure_mode {mode}:\n{}", report.join("\n"));
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn service_failures_fail_closed_with_a_refund_and_the_vm_lives() {
    run_failure_matrix("closed");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn service_failures_fail_open_to_the_upstream_and_the_vm_lives() {
    run_failure_matrix("open");
}

/// A slow service commits a charge after the filter gave up on the call. The filter's
/// refund (sent at once, closed mode) arrives before that commit and is answered 404
/// ("unknown request"). The client saw a 503, so the late charge must still be undone: the
/// filter retries an undo refund answered 404. (Found by this suite: the filter used to take
/// that 404 as final. The reference service is not affected, since it serialises every
/// write, but any service that can be slower than `timeout_ms` to commit is.)
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn late_commit_after_a_lost_answer_is_still_undone() {
    let ledger: Arc<Mutex<Vec<(String, &'static str)>>> = Arc::default();
    let fake = {
        let ledger = ledger.clone();
        FakeService::start(move |req, _| {
            let id = req.json()["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            match req.path.as_str() {
                "/v1/authorize" => {
                    // Slower than the filter's timeout, then commit.
                    thread::sleep(Duration::from_millis(TIMEOUT_MS + 700));
                    ledger.lock().unwrap().push((id, "charged"));
                    FakeAction::json(
                        200,
                        &json!({"allow": true, "account_id": "acct-slow", "balance": 1}),
                    )
                }
                "/v1/refund" => {
                    let mut l = ledger.lock().unwrap();
                    match l.iter_mut().find(|(i, _)| *i == id) {
                        Some(entry) => {
                            entry.1 = "refunded";
                            FakeAction::json(
                                200,
                                &json!({"refunded": true, "account_id": "acct-slow", "balance": 2}),
                            )
                        }
                        None => FakeAction::json(404, &json!({"error": "unknown_request"})),
                    }
                }
                _ => FakeAction::json(404, &json!({})),
            }
        })
    };
    let s = fault_stack("late-commit", "closed", fake.addr);
    assert_problem(&s.get_with_key("/v1/x", "fk-slow"), 503);
    // Well past the commit and a few refund retries.
    let refunded = wait_until(Duration::from_secs(8), || {
        ledger
            .lock()
            .unwrap()
            .iter()
            .all(|(_, state)| *state == "refunded")
            && !ledger.lock().unwrap().is_empty()
    });
    let refund_answers = fake.to("/v1/refund").len();
    assert!(
        refunded,
        "the client saw a 503 but the late charge stays: ledger {:?}, {refund_answers} refund call(s)",
        ledger.lock().unwrap()
    );
}

// ---------------------------------------------------------------------------------------
// Decisions with odd headers and bodies: the same in both modes
// ---------------------------------------------------------------------------------------

fn odd_decisions(mode: &str) {
    let fake = fake_balance();
    let s = fault_stack(&format!("odd-{mode}"), mode, fake.addr);
    let baseline = vm_health(s.envoy.admin);
    let calls = |key: &str| authorize_request_ids(&fake, key).len();

    // A malformed Cache-Control means "do not cache": every request asks again.
    for _ in 0..2 {
        let resp = s.get_with_key("/v1/x", "fk-cc-malformed");
        let body = assert_problem(&resp, 402);
        assert_eq!(body["detail"], "broke", "{body}");
        assert_eq!(
            resp.header("cache-control"),
            Some("no-store"),
            "{}",
            resp.dump()
        );
    }
    assert_eq!(calls("fk-cc-malformed"), 2);

    // A year (or a number too long for any integer) is capped at cache_max_ttl_s (300).
    for key in ["fk-cc-year", "fk-cc-overflow"] {
        for i in 0..3 {
            let resp = s.get_with_key("/v1/x", key);
            assert_problem(&resp, 402);
            let cc = resp.header("cache-control").unwrap_or_default();
            assert!(cc.starts_with("private"), "{key} #{i}: {cc:?}");
            let age = max_age(cc).unwrap_or(0);
            assert!(age > 0 && age <= 300, "{key} #{i}: cache-control {cc:?}");
        }
        assert_eq!(calls(key), 1, "{key}: the later 402s come from the cache");
    }

    // A 402 without a body is still a 402, priced at the request's cost.
    let resp = s.get_with_key("/v1/x", "fk-402-bare");
    let body = assert_problem(&resp, 402);
    assert_eq!(body["price"], 1, "{body}");
    assert!(body.get("balance").is_none(), "{body}");
    // A 402 whose fields have the wrong types: still a 402; the bad fields are dropped.
    let body = assert_problem(&s.get_with_key("/v1/x", "fk-402-wrong-shape"), 402);
    assert_eq!(body["price"], 1, "{body}");
    assert!(body.get("balance").is_none(), "{body}");
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );

    // A Retry-After that is not delta-seconds is dropped, not passed on.
    let resp = s.get_with_key("/v1/x", "fk-402-retry-garbage");
    assert_problem(&resp, 402);
    assert_eq!(resp.header("retry-after"), None, "{}", resp.dump());
    let resp = s.get_with_key("/v1/x", "fk-429-retry-date");
    assert_problem(&resp, 429);
    assert_eq!(resp.header("retry-after"), None, "{}", resp.dump());

    // A negative balance is a valid (signed) balance: allowed and reported as is.
    let resp = s.get_with_key("/v1/x", "fk-negative-balance");
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(
        resp.header("x-farebox-balance"),
        Some("-5"),
        "{}",
        resp.dump()
    );

    // None of these is a service failure, and nothing is refunded. (Counters are flushed by
    // the filter's timer: wait until the decisions above are counted before reading zeros.)
    assert!(wait_metric(&s.envoy, "denied", 10, Duration::from_secs(3)) >= 10);
    assert_eq!(
        s.envoy.metric("fail_closed") + s.envoy.metric("fail_open"),
        0
    );
    assert_eq!(s.envoy.metric("callout_failures"), 0);
    assert!(refunds(&fake).is_empty(), "{:?}", refunds(&fake));
    assert_envoy_vm_alive(&s.envoy, &baseline, &format!("odd decisions ({mode})"));
    assert_normal_request(&s, "odd decisions");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn odd_decisions_fail_closed_config() {
    odd_decisions("closed");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn odd_decisions_fail_open_config() {
    odd_decisions("open");
}

// ---------------------------------------------------------------------------------------
// The reference service not listening, then back (charging observable in its ledger)
// ---------------------------------------------------------------------------------------

const ACCOUNT: &str = "acct-faults";
const KEY: &str = "fbk-faults-0b5e55ed";

fn service_not_listening(mode: &str) {
    let mut s = stack(&format!("down-{mode}"))
        .plugin(|c| {
            c["timeout_ms"] = json!(TIMEOUT_MS);
            c["failure_mode"] = json!(mode);
        })
        // One worker, so one outbox: refunds go out in the order the requests ended.
        .concurrency(1)
        .start();
    let baseline = vm_health(s.envoy.admin);
    s.balance().create_account(ACCOUNT, KEY, 10);
    let addr = s.balance().addr;
    s.balance_mut().stop();

    for i in 0..3 {
        let (resp, took) = timed(|| s.get_with_key(&format!("/v1/down/{i}"), KEY));
        assert!(took < limit(), "{mode}: took {took:?}");
        if mode == "closed" {
            assert_problem(&resp, 503);
            assert_eq!(resp.header("retry-after"), Some("5"));
        } else {
            assert_eq!(resp.status, 200, "{}", resp.dump());
            assert!(echoed_header_values(&resp, "x-farebox-account").is_empty());
        }
    }

    // Back on the same port and database.
    let dir = s.dir.path().to_path_buf();
    s.balance = Some(BalanceService::start(
        &dir,
        &BalanceOpts {
            listen: Some(addr),
            ..Default::default()
        },
    ));
    let resp = s.get_with_key("/v1/back", KEY);
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(
        echoed_header_values(&resp, "x-farebox-account"),
        vec![ACCOUNT]
    );

    // The positive signal that the outbox has run after /v1/back: a later request the
    // upstream fails (503) is refunded; a wrong refund of /v1/back would be in before it.
    let failed = s.get_with_key("/status/503", KEY);
    assert_eq!(failed.status, 503, "{}", failed.dump());
    let refunded = wait_until(REFUND_WAIT, || {
        num(&s.balance().account(ACCOUNT), "refunded") >= 1
    });
    assert!(refunded, "the upstream's 503 was not refunded");

    // Exactly the one request served after the restart is charged.
    let acct = s.balance().account(ACCOUNT);
    assert_eq!(
        (
            num(&acct, "balance"),
            num(&acct, "charged"),
            num(&acct, "refunded")
        ),
        (9, 1, 1),
        "{acct}"
    );
    let charges = s.balance().charges(ACCOUNT);
    assert_eq!(charges.len(), 2, "{charges:?}");
    let charged: Vec<&Value> = charges
        .iter()
        .filter(|c| c["status"] != "refunded")
        .collect();
    assert_eq!(charged.len(), 1, "{charges:?}");
    assert_eq!(charged[0]["path"], "/v1/back", "{charges:?}");
    assert_envoy_vm_alive(&s.envoy, &baseline, &format!("service down ({mode})"));
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn service_not_listening_fails_closed_and_charges_nothing() {
    service_not_listening("closed");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn service_not_listening_fails_open_and_charges_nothing() {
    service_not_listening("open");
}

// ---------------------------------------------------------------------------------------
// Envoy killed with requests in flight
// ---------------------------------------------------------------------------------------

/// Envoy dies (SIGKILL) while requests wait for a slow upstream; a new Envoy takes over.
/// No request id is charged twice, every answered 200 is charged exactly once, and every
/// charge is a 200, a refund, or a request the upstream received (the documented rule:
/// a request that was forwarded is paid for, since the upstream did the work).
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn envoy_killed_with_requests_in_flight_charges_nothing_twice() {
    const IN_FLIGHT: usize = 6;
    const AFTER: usize = 6;
    let dir = TempDir::new("envoy-kill");
    let balance = BalanceService::start(dir.path(), &BalanceOpts::default());
    balance.create_account(ACCOUNT, KEY, 100);
    // An upstream that takes 800 ms and tells which request id it served.
    // (`/v1/fail`: a 503 at once, the marker the ledger shows as refunded.)
    let upstream = FakeService::start(|req, _| {
        let id = req.header("x-request-id").unwrap_or_default().to_string();
        if req.path == "/v1/fail" {
            return FakeAction::json(503, &json!({"request_id": id}));
        }
        FakeAction::json(200, &json!({"request_id": id})).delayed(800)
    });
    let mut plugin = demo_plugin_config();
    plugin["timeout_ms"] = json!(2000);
    let opts = EnvoyOpts::new(&plugin, balance.addr, upstream.addr);

    let first = dir.join("envoy-1");
    std::fs::create_dir_all(&first).unwrap();
    let mut envoy = Envoy::start(&first, &opts);
    let addr = envoy.addr;
    let answers: Arc<Mutex<Vec<Result<Response, String>>>> = Arc::default();
    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let answers = answers.clone();
            thread::spawn(move || {
                let r = try_http(
                    addr,
                    "GET",
                    &format!("/v1/inflight/{i}"),
                    &[("x-api-key", KEY)],
                    b"",
                );
                answers.lock().unwrap().push(r);
            })
        })
        .collect();
    // Wait until every request is paid for and waiting at the upstream, then kill Envoy.
    let at_upstream = wait_until(Duration::from_secs(10), || {
        upstream.requests().len() >= IN_FLIGHT
    });
    assert!(
        at_upstream,
        "only {} requests reached the upstream",
        upstream.requests().len()
    );
    envoy.stop_now();
    for c in clients {
        c.join().unwrap();
    }

    let second = dir.join("envoy-2");
    std::fs::create_dir_all(&second).unwrap();
    // One worker, so one outbox: its refunds go out in the order the requests ended.
    let envoy = Envoy::start(
        &second,
        &EnvoyOpts {
            concurrency: 1,
            ..opts.clone()
        },
    );
    let mut after = Vec::new();
    for i in 0..AFTER {
        let resp = http(
            envoy.addr,
            "GET",
            &format!("/v1/after/{i}"),
            &[("x-api-key", KEY)],
            b"",
        );
        assert_eq!(resp.status, 200, "{}", resp.dump());
        after.push(
            resp.json()["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    // The positive signal that the outbox has run after the requests above: a later
    // request the upstream fails is refunded (a wrong refund of one of them is in by then).
    // The first Envoy was killed: nothing of it can arrive late.
    let failed = http(envoy.addr, "GET", "/v1/fail", &[("x-api-key", KEY)], b"");
    assert_eq!(failed.status, 503, "{}", failed.dump());
    let refunded = wait_until(REFUND_WAIT, || {
        balance
            .charges(ACCOUNT)
            .iter()
            .any(|c| c["path"] == "/v1/fail" && c["status"] == "refunded")
    });
    assert!(refunded, "the upstream's 503 was not refunded");

    let answers = answers.lock().unwrap().clone();
    let served_before: Vec<String> = answers
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter(|r| r.status == 200)
        .map(|r| {
            r.json()["request_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    let client_failures = answers.iter().filter(|r| r.is_err()).count();
    let upstream_ids: Vec<String> = upstream
        .requests()
        .iter()
        .filter_map(|r| r.header("x-request-id").map(str::to_string))
        .collect();

    let charges = balance.charges(ACCOUNT);
    let ids: Vec<String> = charges
        .iter()
        .map(|c| c["request_id"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        ids.len(),
        "a request id charged twice: {charges:?}"
    );
    for id in served_before.iter().chain(&after) {
        let n = charges
            .iter()
            .filter(|c| c["request_id"] == json!(id) && c["status"] == "charged")
            .count();
        assert_eq!(
            n, 1,
            "served request {id} is charged {n} times: {charges:?}"
        );
    }
    let mut forwarded_unanswered = 0;
    for c in &charges {
        let id = c["request_id"].as_str().unwrap_or_default().to_string();
        if c["status"] == "refunded" || served_before.contains(&id) || after.contains(&id) {
            continue;
        }
        assert!(
            upstream_ids.contains(&id),
            "charge {c} was neither served, refunded nor received by the upstream"
        );
        forwarded_unanswered += 1;
    }
    let acct = balance.account(ACCOUNT);
    assert_eq!(
        num(&acct, "balance") + num(&acct, "charged"),
        100,
        "ledger arithmetic: {acct}"
    );
    assert_eq!(
        num(&acct, "charged") as usize,
        served_before.len() + AFTER + forwarded_unanswered,
        "{acct}"
    );
    eprintln!(
        "envoy kill: {IN_FLIGHT} in flight ({client_failures} saw the connection die, {} served), \
         {forwarded_unanswered} charged while forwarded and unanswered, {AFTER} served after the restart",
        served_before.len()
    );
}

// ---------------------------------------------------------------------------------------
// Plugin config changed at run time (LDS from a watched file)
// ---------------------------------------------------------------------------------------

/// Writes the LDS file the way Envoy wants to see it change: a complete new file moved
/// into the watched directory.
fn publish_lds(xds: &std::path::Path, version: &str, port: u16, plugin: &Value) {
    // The stat prefix changes with every version, so that each one is a new filter chain
    // even where the plugin config stays the same.
    let prefix = format!("ingress_{}", version.to_ascii_lowercase());
    let hcm = Hcm {
        stat_prefix: prefix,
        ..Hcm::demo()
    };
    let doc = json!({"version_info": version, "resources": [listener(port, plugin, &hcm)]});
    let tmp = xds.join(".lds.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    std::fs::rename(&tmp, xds.join("lds.json")).unwrap();
}

/// The LDS version Envoy accepted, once no listener is warming any more (an in-place
/// filter chain update does not refresh the config dump's `version_info`, the stat does).
fn active_listener_version(admin: SocketAddr) -> Option<String> {
    let text = http(admin, "GET", "/stats?filter=^listener_manager\\.", &[], b"").text();
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ").map(str::to_string))
    };
    if stat("listener_manager.total_listeners_warming").as_deref() != Some("0") {
        return None;
    }
    stat("listener_manager.lds.version_text").map(|v| v.trim_matches('"').to_string())
}

fn wait_for_version(envoy: &Envoy, version: &str) {
    let active = wait_until(Duration::from_secs(20), || {
        active_listener_version(envoy.admin).as_deref() == Some(version)
    });
    assert!(
        active,
        "listener version {version} never became active:\n{}",
        envoy.log_tail(40)
    );
}

/// A 402 cached under config A (max-age 300) is not served under config B: the cache key
/// includes the digest of the plugin config, and the shared data outlives the swap.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn config_swap_at_run_time_does_not_reuse_old_decisions() {
    let dir = TempDir::new("lds-swap");
    let balance = BalanceService::start(
        dir.path(),
        &BalanceOpts {
            deny_max_age: Some(300),
            ..Default::default()
        },
    );
    let echo = Echo::start(dir.path());
    balance.create_account(ACCOUNT, KEY, 0);
    let xds = dir.join("xds");
    std::fs::create_dir_all(&xds).unwrap();
    let port = free_port();
    let mut config_a = demo_plugin_config();
    config_a["timeout_ms"] = json!(3000);
    let mut config_b = config_a.clone();
    config_b["default_cost"] = json!(2);
    publish_lds(&xds, "A", port, &config_a);

    let bootstrap = json!({
        "node": {"id": "farebox-lds-test", "cluster": "farebox"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {"lds_config": {"resource_api_version": "V3", "path_config_source": {
            "path": xds.join("lds.json").display().to_string(),
            "watched_directory": {"path": xds.display().to_string()}}}},
        "static_resources": {"clusters": [cluster("balance", balance.addr), cluster("upstream", echo.addr)]}
    });
    let envoy = Envoy::start_yaml(
        dir.path(),
        &bootstrap.to_string(),
        2,
        &[
            "--component-log-level",
            "file:debug,config:debug,upstream:debug,init:debug,wasm:debug",
        ],
    );
    let ready = wait_until(Duration::from_secs(20), || {
        active_listener_version(envoy.admin).as_deref() == Some("A")
    });
    assert!(
        ready,
        "listener A never became active:\n{}",
        envoy.log_tail(40)
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let get = || http(addr, "GET", "/v1/x", &[("x-api-key", KEY)], b"");

    // Config A: denied, and the denial is cached.
    let first = get();
    assert_problem(&first, 402);
    assert_eq!(balance.authorize_calls(), 1);
    balance.topup(ACCOUNT, 10);
    let cached = get();
    let body = assert_problem(&cached, 402);
    assert_eq!(body["price"], 1, "{body}");
    assert!(
        cached
            .header("cache-control")
            .is_some_and(|c| c.starts_with("private")),
        "{}",
        cached.dump()
    );
    assert_eq!(
        balance.authorize_calls(),
        1,
        "served from the cache under config A"
    );

    // Control: a new listener (filter chain) with the very same plugin config still serves
    // the cached 402. The shared data outlived the swap; only the config digest tells apart.
    publish_lds(&xds, "A2", port, &config_a);
    wait_for_version(&envoy, "A2");
    assert_problem(&get(), 402);
    assert_eq!(
        balance.authorize_calls(),
        1,
        "same config, same cache entry"
    );

    // Config B (another price) replaces the listener while Envoy runs.
    publish_lds(&xds, "B", port, &config_b);
    wait_for_version(&envoy, "B");

    // The old 402 is not applied: the service is asked, and B's price is charged.
    let resp = get();
    assert_eq!(resp.status, 200, "{}", resp.dump());
    assert_eq!(
        resp.header("x-farebox-balance"),
        Some("8"),
        "{}",
        resp.dump()
    );
    assert_eq!(balance.authorize_calls(), 2);
    let charges = balance.charges(ACCOUNT);
    assert_eq!(charges.len(), 1, "{charges:?}");
    assert_eq!(charges[0]["cost"], 2, "{charges:?}");
    // A config update builds new VMs (for the new plugin config), so only reloads and traps
    // tell a crash here.
    assert_no_vm_crash(envoy.admin, &envoy.log(), "after the swap");
}
