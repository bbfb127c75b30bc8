//! End-to-end tests of `POST /v1/usage` (final cost of metered responses).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;

fn usage(addr: SocketAddr, key: &str, request_id: &str, actual: u64) -> Resp {
    post_json(
        addr,
        "/v1/usage",
        &[("x-request-id", request_id)],
        &json!({"request_id": request_id, "account": key, "actual": actual}),
    )
}

fn charges(addr: SocketAddr, id: &str) -> Vec<Value> {
    let r = admin_get(addr, &format!("/admin/accounts/{id}/charges"));
    assert_eq!(r.status, 200, "{r:?}");
    r.json().as_array().unwrap().clone()
}

fn charge(addr: SocketAddr, id: &str, request_id: &str) -> Value {
    charges(addr, id)
        .into_iter()
        .find(|c| c["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no charge {request_id}"))
}

/// `initial_balance + topups = balance + reserved + charged`, and `charged`
/// agrees with the charge and lease lists. Unlike `check_ledger`, the
/// balance may be negative (usage beyond the hold is owed).
fn invariant(addr: SocketAddr, id: &str) -> Value {
    let acct = account(addr, id);
    let int = |k: &str| acct[k].as_i64().unwrap_or_else(|| panic!("{k}: {acct}"));
    assert_eq!(
        int("initial_balance") + int("topups"),
        int("balance") + int("reserved") + int("charged"),
        "{acct}"
    );
    let rows = charges(addr, id);
    let charged: i64 = rows
        .iter()
        .filter(|c| c["status"] == "charged")
        .map(|c| c["cost"].as_i64().unwrap())
        .sum();
    let leases = admin_get(addr, &format!("/admin/accounts/{id}/leases")).json();
    let lease_charged: i64 = leases
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["charged"].as_i64().unwrap())
        .sum();
    assert_eq!(charged + lease_charged, int("charged"), "{acct}");
    acct
}

#[test]
fn adjust_down_refunds_the_difference_and_is_idempotent() {
    let b = seeded(&[]);
    let a = b.addr();
    let r = authorize(a, "demo-key-alice", 10, "u-1");
    assert_eq!(r.json()["balance"], 90);

    let r = usage(a, "demo-key-alice", "u-1", 4);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"request_id": "u-1", "account_id": "acct_alice", "cost": 4, "balance": 96})
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let c = charge(a, "acct_alice", "u-1");
    assert_eq!(
        (c["cost"].clone(), c["status"].clone()),
        (json!(4), json!("charged"))
    );
    assert_eq!(c["route"], "test-route");

    // The same actual again: nothing changes.
    let r = usage(a, "demo-key-alice", "u-1", 4);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"request_id": "u-1", "account_id": "acct_alice", "cost": 4, "balance": 96,
               "replay": true})
    );
    // Another actual: the charge is final.
    let r = usage(a, "demo-key-alice", "u-1", 7);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json(), json!({"error": "usage_final", "cost": 4}));
    assert_eq!(account(a, "acct_alice")["balance"], 96);
    // A replayed authorize does not debit again.
    let r = authorize(a, "demo-key-alice", 10, "u-1");
    assert_eq!((r.status, r.json()["balance"].clone()), (200, json!(96)));
    check_ledger(a, "acct_alice");

    // A refund credits back the final cost.
    let r = refund(a, "demo-key-alice", 10, "u-1", 503);
    assert_eq!(r.json()["balance"], 100, "{r:?}");
    check_ledger(a, "acct_alice");

    // Actual 0 gives the whole estimate back; the row stays (cost 0).
    authorize(a, "demo-key-alice", 5, "u-2");
    let r = usage(a, "demo-key-alice", "u-2", 0);
    assert_eq!((r.status, r.json()["balance"].clone()), (200, json!(100)));
    assert_eq!(charge(a, "acct_alice", "u-2")["cost"], 0);
    check_ledger(a, "acct_alice");
}

#[test]
fn adjust_up_may_take_the_balance_negative() {
    let b = seeded(&[]);
    let a = b.addr();
    assert_eq!(authorize(a, "demo-key-bob", 3, "up-1").json()["balance"], 0);
    let r = usage(a, "demo-key-bob", "up-1", 10);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"request_id": "up-1", "account_id": "acct_bob", "cost": 10, "balance": -7})
    );
    let acct = invariant(a, "acct_bob");
    assert_eq!(
        (acct["balance"].clone(), acct["charged"].clone()),
        (json!(-7), json!(10))
    );

    // An account in debt is denied until it is topped up.
    let r = authorize(a, "demo-key-bob", 1, "up-2");
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.json()["balance"], -7);
    let r = lease(a, "demo-key-bob", 5, 1, "up-lease");
    assert_eq!(r.status, 402, "{r:?}");
    let r = admin_post(a, "/admin/accounts/acct_bob/topup", &json!({"amount": 10}));
    assert_eq!(r.json()["balance"], 3, "{r:?}");
    assert_eq!(authorize(a, "demo-key-bob", 1, "up-2").status, 200);
    invariant(a, "acct_bob");

    // A refund of an adjusted charge credits the final cost.
    let r = refund(a, "demo-key-bob", 3, "up-1", 500);
    assert_eq!(r.json()["balance"], 12, "{r:?}");
    let r = usage(a, "demo-key-bob", "up-1", 10);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json(), json!({"error": "charge_refunded"}));
    invariant(a, "acct_bob");
}

#[test]
fn overage_without_a_charge_creates_one() {
    let b = seeded(&[]);
    let a = b.addr();
    // The hold came from a lease: no charge row for the request id.
    let id = lease_id(a, "demo-key-alice", 20, 5, "ov-lease");
    let r = usage(a, "demo-key-alice", "ov-1", 6);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"request_id": "ov-1", "account_id": "acct_alice", "cost": 6, "balance": 74})
    );
    let c = charge(a, "acct_alice", "ov-1");
    assert_eq!(c["cost"], 6);
    assert_eq!(c["route"], "usage");
    assert_eq!(c["status"], "charged");
    let r = usage(a, "demo-key-alice", "ov-1", 6);
    assert_eq!(r.json()["replay"], true, "{r:?}");
    assert_eq!(r.json()["balance"], 74);
    let r = usage(a, "demo-key-alice", "ov-1", 8);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["error"], "usage_final");
    invariant(a, "acct_alice");
    assert_eq!(settle(a, &id, 20, true).status, 200);
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(acct["balance"], 74);
    assert_eq!(acct["charged"], 26);

    // Overage beyond the balance: owed.
    let r = usage(a, "demo-key-bob", "ov-2", 5);
    assert_eq!(r.json()["balance"], -2, "{r:?}");
    invariant(a, "acct_bob");
    // A request id created by usage belongs to its account.
    let r = authorize(a, "demo-key-alice", 1, "ov-2");
    assert_eq!(r.status, 409, "{r:?}");
}

#[test]
fn errors_and_conflicts() {
    let b = seeded(&["--service-token", "svc"]);
    let a = b.addr();
    let svc = [("authorization", "Bearer svc")];
    let call = |body: &Value| post_json(a, "/v1/usage", &svc, body);
    let body = |key: &str, rid: &str, actual: Value| json!({"request_id": rid, "account": key, "actual": actual});
    let r = post_json(
        a,
        "/v1/authorize",
        &svc,
        &json!({"account": "demo-key-alice", "cost": 5, "route": "r", "method": "GET",
                "path": "/", "request_id": "e-1"}),
    );
    assert_eq!(r.status, 200, "{r:?}");

    // Service token.
    let r = post_json(
        a,
        "/v1/usage",
        &[],
        &body("demo-key-alice", "e-1", json!(1)),
    );
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.json(), json!({"error": "service token rejected"}));
    // Unknown credential.
    let r = call(&body("nope", "e-1", json!(1)));
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json(), json!({"error": "unknown_credential"}));
    // Another account's charge.
    let r = call(&body("demo-key-bob", "e-1", json!(1)));
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["error"], "request_id belongs to another account");
    // Bad bodies.
    for bad in [
        json!({"account": "demo-key-alice", "actual": 1}),
        json!({"request_id": "e-1", "actual": 1}),
        json!({"request_id": "e-1", "account": "demo-key-alice"}),
        body("demo-key-alice", "e-1", json!(-1)),
        body("demo-key-alice", "e-1", json!(1.5)),
        body("demo-key-alice", "e-1", json!("1")),
        body("demo-key-alice", "e-1", json!(9_223_372_036_854_775_808u64)),
        body("demo-key-alice", "", json!(1)),
        json!([1]),
    ] {
        let r = call(&bad);
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert!(r.json()["error"].is_string());
    }
    let r = request(a, "POST", "/v1/usage", &svc, Some("{"));
    assert_eq!(r.status, 400);
    // Nothing changed.
    assert_eq!(account(a, "acct_alice")["balance"], 95);
    assert_eq!(charge(a, "acct_alice", "e-1")["cost"], 5);
    // A disabled account still settles what it used.
    admin_post(a, "/admin/accounts/acct_alice/disable", &json!({}));
    let r = call(&body("demo-key-alice", "e-1", json!(2)));
    assert_eq!((r.status, r.json()["balance"].clone()), (200, json!(98)));

    let s = admin_get(a, "/admin/stats").json();
    assert_eq!(s["usage_calls"], 14, "{s}");
    let s = admin_post(a, "/admin/stats/reset", &json!({})).json();
    assert_eq!(s["usage_calls"], 0);
    assert!(b
        .proc
        .log_text()
        .contains("POST /v1/usage 200 account=acct_alice"));
    assert!(!b.proc.log_text().contains("demo-key-alice"));
}

#[test]
fn finality_survives_a_restart() {
    let dir = TempDir::new("usage-restart");
    let args = ["--admin-token", ADMIN, "--seed-demo"];
    let p = Balance::start_on(&dir, &args);
    authorize(p.addr, "demo-key-alice", 10, "r-1");
    assert_eq!(usage(p.addr, "demo-key-alice", "r-1", 3).status, 200);
    assert!(p.terminate());
    let p = Balance::start_on(&dir, &args);
    let r = usage(p.addr, "demo-key-alice", "r-1", 3);
    assert_eq!(r.json()["replay"], true, "{r:?}");
    assert_eq!(usage(p.addr, "demo-key-alice", "r-1", 4).status, 409);
    assert_eq!(account(p.addr, "acct_alice")["balance"], 97);
}

#[test]
fn invariant_under_concurrent_authorize_usage_refund_and_leases() {
    let b = seeded(&[]);
    let a = b.addr();
    create_account(a, "acct_load", "load-key", 1_000);
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            std::thread::spawn(move || {
                // A small deterministic generator per thread.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                let mut next = move |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n
                };
                for i in 0..25u64 {
                    let rid = format!("c-{t}-{i}");
                    match next(4) {
                        0 | 1 => {
                            let r = authorize(a, "load-key", 1 + next(9), &rid);
                            assert!(r.status == 200 || r.status == 402, "{r:?}");
                            let r = usage(a, "load-key", &rid, next(15));
                            assert_eq!(r.status, 200, "{r:?}");
                            if next(3) == 0 {
                                let r = refund(a, "load-key", 0, &rid, 500);
                                assert_eq!(r.status, 200, "{r:?}");
                            }
                        }
                        2 => {
                            let r = usage(a, "load-key", &rid, next(5));
                            assert_eq!(r.status, 200, "{r:?}");
                        }
                        _ => {
                            let r = lease(a, "load-key", 10, 1, &rid);
                            if r.status == 200 {
                                let id = r.json()["lease_id"].as_str().unwrap().to_owned();
                                let used = next(11);
                                assert_eq!(settle(a, &id, used, true).status, 200);
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let acct = invariant(a, "acct_load");
    assert_eq!(acct["reserved"], 0);
    let s = admin_get(a, "/admin/stats").json();
    assert!(s["usage_calls"].as_u64().unwrap() > 0);
}

/// A usage line's tokens: input, cached input, cache-creation input, output, reasoning.
fn tokens(t: [u64; 5]) -> Value {
    json!({"input": t[0], "cached_input": t[1], "cache_creation_input": t[2],
           "output": t[3], "reasoning": t[4]})
}

fn usage_line(
    addr: SocketAddr,
    request_id: &str,
    actual: u64,
    (route, model, t): (&str, Option<&str>, [u64; 5]),
) -> Resp {
    post_json(
        addr,
        "/v1/usage",
        &[("x-request-id", request_id)],
        &json!({"request_id": request_id, "account": "demo-key-alice", "actual": actual,
                "route": route, "model": model, "tokens": tokens(t)}),
    )
}

fn lease_line(
    addr: SocketAddr,
    lease_id: &str,
    request_id: &str,
    units: u64,
    (route, model, t): (&str, Option<&str>, [u64; 5]),
) -> Resp {
    post_json(
        addr,
        &format!("/v1/leases/{lease_id}/usage"),
        &[("x-request-id", request_id)],
        &json!({"request_id": request_id, "units": units, "route": route, "model": model,
                "tokens": tokens(t)}),
    )
}

fn itemised(addr: SocketAddr, id: &str) -> Value {
    let r = admin_get(addr, &format!("/admin/accounts/{id}/usage"));
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

#[test]
fn usage_lines_itemise_the_bill_once_per_request_in_both_modes() {
    let b = seeded(&[]);
    let a = b.addr();
    // Authorize mode: the line rides on the usage call, also when the price is the hold.
    assert_eq!(authorize(a, "demo-key-alice", 10, "i-1").status, 200);
    assert_eq!(authorize(a, "demo-key-alice", 10, "i-2").status, 200);
    assert_eq!(authorize(a, "demo-key-alice", 10, "i-3").status, 200);
    let claude = ("claude", Some("sonnet"), [4, 7, 2, 6, 0]);
    for _ in 0..3 {
        // Retried: one line, one adjustment.
        let r = usage_line(a, "i-1", 8, claude);
        assert_eq!(r.status, 200, "{r:?}");
    }
    assert_eq!(usage_line(a, "i-2", 10, claude).status, 200);
    let gpt = ("gpt", Some("mini"), [3, 1, 0, 7, 3]);
    assert_eq!(usage_line(a, "i-3", 12, gpt).status, 200);
    // A later call with another line changes nothing: the first line stands.
    let r = usage_line(a, "i-3", 12, ("gpt", Some("other"), [1, 0, 0, 0, 0]));
    assert_eq!(
        (r.status, r.json()["replay"].clone()),
        (200, json!(true)),
        "{r:?}"
    );
    // Lease mode: the line is recorded against the lease and moves no money.
    let lease = lease_id(a, "demo-key-alice", 40, 1, "l-1");
    let before = account(a, "acct_alice")["balance"].clone();
    for _ in 0..2 {
        let r = lease_line(a, &lease, "i-4", 5, gpt);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json()["units"], 5);
    }
    assert!(r_json_replay(&lease_line(a, &lease, "i-4", 5, gpt)));
    let r = lease_line(a, &lease, "i-4", 6, gpt);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (409, json!("usage_recorded"))
    );
    assert_eq!(account(a, "acct_alice")["balance"], before);
    let r = lease_line(a, "ls_nope", "i-5", 5, gpt);
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(settle(a, &lease, 5, true).status, 200);

    let bill = itemised(a, "acct_alice");
    let items = bill["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{bill}");
    assert_eq!(
        items
            .iter()
            .map(|i| (
                i["request_id"].clone(),
                i["units"].clone(),
                i["lease_id"].clone()
            ))
            .collect::<Vec<_>>(),
        vec![
            (json!("i-1"), json!(8), Value::Null),
            (json!("i-2"), json!(10), Value::Null),
            (json!("i-3"), json!(12), Value::Null),
            (json!("i-4"), json!(5), json!(lease)),
        ]
    );
    assert_eq!(
        bill["by_route_model"],
        json!([
            {"route": "claude", "model": "sonnet", "requests": 2, "units": 18,
             "tokens": tokens([8, 14, 4, 12, 0])},
            {"route": "gpt", "model": "mini", "requests": 2, "units": 17,
             "tokens": tokens([6, 2, 0, 14, 6])},
        ])
    );
    assert_eq!(bill["units"], 35);
    // The lines equal what the ledger charged: 8 + 10 + 12 by usage, 5 by the lease.
    let acct = invariant(a, "acct_alice");
    assert_eq!(acct["charged"], 35, "{acct}");
    assert_eq!(
        admin_get(a, "/admin/accounts/acct_nope/usage").status,
        404,
        "unknown account"
    );
}

fn r_json_replay(r: &Resp) -> bool {
    r.json()["replay"] == json!(true)
}

#[test]
fn usage_lines_are_checked() {
    let b = seeded(&[]);
    let a = b.addr();
    assert_eq!(authorize(a, "demo-key-alice", 10, "c-1").status, 200);
    let post = |body: Value| post_json(a, "/v1/usage", &[("x-request-id", "c-1")], &body);
    let base = json!({"request_id": "c-1", "account": "demo-key-alice", "actual": 3});
    let with = |extra: Value| {
        let mut b = base.clone();
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for bad in [
        json!({"route": "r"}),
        json!({"tokens": tokens([1, 0, 0, 0, 0])}),
        json!({"model": "m"}),
        json!({"route": "", "tokens": tokens([1, 0, 0, 0, 0])}),
        json!({"route": "r", "tokens": {"input": -1}}),
        json!({"route": "r", "tokens": {"input": 9223372036854775808u64}}),
        json!({"route": "r", "model": "m".repeat(257), "tokens": {}}),
    ] {
        let r = post(with(bad.clone()));
        assert_eq!(r.status, 400, "{bad}: {r:?}");
        assert!(r.json()["error"].is_string(), "{r:?}");
    }
    // Nothing changed: the charge is still the hold, no line recorded.
    assert_eq!(charge(a, "acct_alice", "c-1")["cost"], 10);
    assert_eq!(itemised(a, "acct_alice")["items"], json!([]));
    // A class left out is 0; a line with no model is kept as null.
    let r = post(with(json!({"route": "r", "tokens": {"output": 3}})));
    assert_eq!(r.status, 200, "{r:?}");
    let bill = itemised(a, "acct_alice");
    assert_eq!(bill["items"][0]["tokens"], tokens([0, 0, 0, 3, 0]));
    assert_eq!(bill["items"][0]["model"], Value::Null);
    let lease = lease_id(a, "demo-key-alice", 5, 1, "l-c");
    let r = post_json(
        a,
        &format!("/v1/leases/{lease}/usage"),
        &[("x-request-id", "c-2")],
        &json!({"request_id": "c-2", "units": 1}),
    );
    assert_eq!(r.status, 400, "a lease usage call needs its line: {r:?}");
}
