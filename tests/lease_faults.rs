#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
//! Lease mode under faults, in a real Envoy: the balance service dies between a lease and
//! its settle (in both failure modes), settles that keep failing, and two Envoy processes
//! spending one account. (tests/lease.rs covers the lease happy path and Envoy restarts.)

mod common;
#[path = "support/hardening.rs"]
mod hardening;

use std::thread;
use std::time::Duration;

use common::*;
use hardening::*;
use serde_json::{json, Value};

const ACCOUNT: &str = "acct-lease-faults";
const KEY: &str = "fbk-lease-faults-51a7e";
const TIMEOUT_MS: u64 = 400;
const SLACK: Duration = Duration::from_millis(1600);

fn lease_plugin(mode: &str, want: u64, settle_ms: u64) -> Value {
    let mut c = demo_plugin_config();
    c["mode"] = json!("lease");
    c["lease_want"] = json!(want);
    c["settle_interval_ms"] = json!(settle_ms);
    c["timeout_ms"] = json!(TIMEOUT_MS);
    c["failure_mode"] = json!(mode);
    c
}

fn leases(service: &BalanceService) -> Vec<Value> {
    match service.admin("GET", &format!("/admin/accounts/{ACCOUNT}/leases"), None) {
        Value::Array(items) => items,
        other => panic!("leases: {other}"),
    }
}

/// initial + topups = balance + reserved + charged.
fn assert_ledger_balances(acct: &Value) {
    assert_eq!(
        num(acct, "initial_balance") + num(acct, "topups"),
        num(acct, "balance") + num(acct, "reserved") + num(acct, "charged"),
        "ledger does not balance: {acct}"
    );
}

fn get(envoy: &Envoy, path: &str) -> (Response, Duration) {
    timed(|| http(envoy.addr, "GET", path, &[("x-api-key", KEY)], b""))
}

// ---------------------------------------------------------------------------------------
// The service dies between lease and settle
// ---------------------------------------------------------------------------------------

fn service_dies_between_lease_and_settle(mode: &str) {
    let dir = TempDir::new(&format!("lease-dies-{mode}"));
    let opts = BalanceOpts {
        extra_args: vec!["--lease-ttl-ms".into(), "60000".into()],
        ..Default::default()
    };
    let mut service = BalanceService::start(dir.path(), &opts);
    let echo = Echo::start(dir.path());
    service.create_account(ACCOUNT, KEY, 100);
    let envoy = Envoy::start(
        dir.path(),
        &EnvoyOpts::new(&lease_plugin(mode, 5, 100), service.addr, echo.addr),
    );
    let baseline = vm_health(envoy.admin);

    let (first, _) = get(&envoy, "/v1/lease/1");
    assert_eq!(first.status, 200, "{}", first.dump());
    assert_eq!(
        echoed_header_values(&first, "x-farebox-account"),
        vec![ACCOUNT]
    );
    let addr = service.addr;
    service.stop();

    // The lease (5 units) is spent on with the service gone, as fast as ever.
    for i in 2..=5 {
        let (resp, took) = get(&envoy, &format!("/v1/lease/{i}"));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.dump());
        assert_eq!(
            echoed_header_values(&resp, "x-farebox-account"),
            vec![ACCOUNT]
        );
        assert!(
            took < SLACK,
            "request {i} waited {took:?} on a dead service"
        );
    }
    let failures = wait_metric(&envoy, "settle_failures", 2, Duration::from_secs(5));
    assert!(failures >= 2, "failed settles are counted: {failures}");
    let settles_calls_before = envoy.metric("settles");

    // Lease used up: the next request needs the service, and failure_mode decides.
    let (resp, took) = get(&envoy, "/v1/lease/6");
    assert!(
        took < Duration::from_millis(TIMEOUT_MS) + SLACK,
        "took {took:?}"
    );
    if mode == "closed" {
        assert_problem(&resp, 503);
        assert_eq!(resp.header("retry-after"), Some("5"));
    } else {
        assert_eq!(resp.status, 200, "{}", resp.dump());
        assert!(echoed_header_values(&resp, "x-farebox-account").is_empty());
    }

    // The service comes back (same port, same database): the settle reports all 5 units.
    let service = BalanceService::start(
        dir.path(),
        &BalanceOpts {
            listen: Some(addr),
            ..opts
        },
    );
    let reported = wait_until(Duration::from_secs(10), || {
        leases(&service).first().is_some_and(|l| l["used"] == 5)
    });
    assert!(reported, "{:?}", leases(&service));
    assert!(
        wait_metric(
            &envoy,
            "settles",
            settles_calls_before + 1,
            Duration::from_secs(3)
        ) > settles_calls_before
    );

    // The next request takes a new lease; the old one is closed with its exact total.
    let (resp, _) = get(&envoy, "/v1/lease/7");
    assert_eq!(resp.status, 200, "{}", resp.dump());
    let settled = wait_until(Duration::from_secs(10), || {
        leases(&service)
            .first()
            .is_some_and(|l| l["state"] == "settled")
    });
    let ls = leases(&service);
    assert!(settled, "{ls:?}");
    assert_eq!(
        (ls[0]["used"].clone(), ls[0]["charged"].clone()),
        (json!(5), json!(5)),
        "{ls:?}"
    );
    let open: Vec<&Value> = ls.iter().filter(|l| l["state"] == "open").collect();
    assert_eq!(open.len(), 1, "{ls:?}");
    let acct = service.account(ACCOUNT);
    assert_eq!(num(&acct, "charged"), 5, "{acct}");
    assert_ledger_balances(&acct);
    assert_envoy_vm_alive(&envoy, &baseline, &format!("lease, service died ({mode})"));
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn lease_service_dies_between_lease_and_settle_fail_closed() {
    service_dies_between_lease_and_settle("closed");
}

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn lease_service_dies_between_lease_and_settle_fail_open() {
    service_dies_between_lease_and_settle("open");
}

// ---------------------------------------------------------------------------------------
// Settle answers 500, again and again
// ---------------------------------------------------------------------------------------

#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn settles_failing_with_500_are_counted_and_never_touch_requests() {
    let fake = FakeService::start(|req, _| match req.path.as_str() {
        "/v1/leases" => FakeAction::json(
            200,
            &json!({"lease_id": "ls_fake_0001", "granted": 1000, "expires_in_ms": 60000,
                    "account_id": "acct-fake-lease", "balance": 0}),
        ),
        p if p.ends_with("/settle") => FakeAction::json(500, &json!({"error": "settle broken"})),
        _ => FakeAction::json(500, &json!({"error": "broken"})),
    });
    let s = stack("lease-settle-500")
        .plugin(|c| *c = lease_plugin("closed", 1000, 50))
        .balance_addr(fake.addr)
        .start();
    let baseline = vm_health(s.envoy.admin);

    for i in 0..30 {
        let (resp, took) = timed(|| s.get_with_key(&format!("/v1/s/{i}"), KEY));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.dump());
        assert_eq!(
            echoed_header_values(&resp, "x-farebox-account"),
            vec!["acct-fake-lease"]
        );
        assert!(took < SLACK, "request {i} took {took:?}");
        if i % 10 == 9 {
            thread::sleep(Duration::from_millis(120)); // let a settle go out and fail
        }
    }
    let failures = wait_metric(&s.envoy, "settle_failures", 3, Duration::from_secs(5));
    assert!(failures >= 3, "settle_failures = {failures}");
    assert_eq!(s.envoy.metric("settles"), 0);
    assert_eq!(
        fake.to("/v1/leases").len(),
        1,
        "one lease served every request"
    );
    let settles = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/leases/ls_fake_0001/settle")
        .map(|r| r.json())
        .collect::<Vec<_>>();
    assert!(settles.len() >= 3, "{settles:?}");
    assert!(
        settles
            .iter()
            .all(|b| b["final"] == false && b["used"].as_u64().is_some_and(|u| u <= 30)),
        "{settles:?}"
    );
    assert_eq!(
        wait_metric(&s.envoy, "lease_units_spent", 30, Duration::from_secs(3)),
        30
    );
    assert_envoy_vm_alive(&s.envoy, &baseline, "settle 500");
}

// ---------------------------------------------------------------------------------------
// Two Envoy processes, one account
// ---------------------------------------------------------------------------------------

/// An account funded for N; 2N requests split over two Envoys (each its own shared data
/// and leases), concurrently. Exactly N are allowed, and the ledger is exact once the
/// leases are settled.
#[test]
#[cfg_attr(
    not(farebox_e2e),
    ignore = "end-to-end: needs Envoy and the wasm; run `make test`"
)]
fn two_envoys_share_one_account_exactly() {
    const N: usize = 20;
    let dir = TempDir::new("lease-two-envoys");
    let service = BalanceService::start(
        dir.path(),
        &BalanceOpts {
            deny_max_age: Some(0),
            extra_args: vec!["--lease-ttl-ms".into(), "3000".into()],
            ..Default::default()
        },
    );
    let echo = Echo::start(dir.path());
    service.create_account(ACCOUNT, KEY, N as i64);
    let plugin = lease_plugin("closed", 5, 100);
    let envoys: Vec<Envoy> = (0..2)
        .map(|i| {
            let d = dir.join(&format!("envoy-{i}"));
            std::fs::create_dir_all(&d).unwrap();
            Envoy::start(&d, &EnvoyOpts::new(&plugin, service.addr, echo.addr))
        })
        .collect();
    let addrs: Vec<_> = envoys.iter().map(|e| e.addr).collect();
    let handles: Vec<_> = addrs
        .into_iter()
        .map(|addr| {
            thread::spawn(move || {
                (0..N)
                    .map(|_| http(addr, "GET", "/v1/shared", &[("x-api-key", KEY)], b"").status)
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    let per_envoy: Vec<Vec<u16>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let all: Vec<u16> = per_envoy.iter().flatten().copied().collect();
    let allowed = all.iter().filter(|s| **s == 200).count();
    let denied = all.iter().filter(|s| **s == 402).count();
    assert_eq!(
        (allowed, denied),
        (N, N),
        "exactly N allowed over both Envoys; per Envoy: {per_envoy:?}"
    );

    // Every lease is closed with its exact total (final settles come at the spend deadline).
    let done = wait_until(Duration::from_secs(15), || {
        let a = service.account(ACCOUNT);
        num(&a, "reserved") == 0
    });
    let acct = service.account(ACCOUNT);
    let ls = leases(&service);
    assert!(done, "leases still open: {acct} {ls:?}");
    assert_eq!(
        (num(&acct, "balance"), num(&acct, "charged")),
        (0, N as i64),
        "{acct} {ls:?}"
    );
    assert_ledger_balances(&acct);
    let used: i64 = ls.iter().map(|l| l["used"].as_i64().unwrap_or(-1)).sum();
    assert_eq!(used, N as i64, "{ls:?}");
    assert!(
        ls.iter()
            .all(|l| l["state"] == "settled" && l["used"] == l["charged"]),
        "{ls:?}"
    );
    let holders: std::collections::BTreeSet<&str> =
        ls.iter().filter_map(|l| l["holder"].as_str()).collect();
    eprintln!(
        "two envoys: per Envoy {:?} allowed, {} leases from {} holders",
        per_envoy
            .iter()
            .map(|v| v.iter().filter(|s| **s == 200).count())
            .collect::<Vec<_>>(),
        ls.len(),
        holders.len()
    );
    // The filters count the settles the service accepted (on their timer): once they have
    // counted at least one per lease, a failed attempt before it is counted too.
    let counted = wait_until(Duration::from_secs(5), || {
        envoys.iter().map(|e| e.metric("settles")).sum::<u64>() >= ls.len() as u64
    });
    assert!(counted, "settles not counted: {ls:?}");
    for e in &envoys {
        assert_eq!(e.metric("settle_failures"), 0);
    }
}
