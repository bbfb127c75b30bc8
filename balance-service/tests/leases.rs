//! End-to-end tests of credit leases (`/v1/leases*`) over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use std::time::Duration;

fn leases_of(a: std::net::SocketAddr, id: &str) -> Vec<Value> {
    let r = admin_get(a, &format!("/admin/accounts/{id}/leases"));
    assert_eq!(r.status, 200, "{r:?}");
    r.json().as_array().unwrap().clone()
}

#[test]
fn grant_and_partial_grant() {
    let b = seeded(&[]);
    let a = b.addr();
    let r = lease(a, "demo-key-alice", 30, 5, "g-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    let id = j["lease_id"].as_str().unwrap();
    assert!(
        id.len() == 35 && id.starts_with("ls_") && id[3..].bytes().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(j["granted"], 30);
    assert_eq!(j["expires_in_ms"], 30_000);
    assert_eq!(j["account_id"], "acct_alice");
    assert_eq!(j["balance"], 70);
    assert_eq!(j.get("replay"), None);

    // want > available: granted = available (>= min).
    let r = lease(a, "demo-key-bob", 10, 2, "g-2");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.json()["granted"].clone(), r.json()["balance"].clone()),
        (json!(3), json!(0))
    );

    let alice = check_ledger(a, "acct_alice");
    assert_eq!(
        (
            alice["balance"].clone(),
            alice["reserved"].clone(),
            alice["charged"].clone()
        ),
        (json!(70), json!(30), json!(0))
    );
    assert_eq!(alice["leases"], 1);
    let bob = check_ledger(a, "acct_bob");
    assert_eq!(
        (bob["balance"].clone(), bob["reserved"].clone()),
        (json!(0), json!(3))
    );

    let list = leases_of(a, "acct_alice");
    assert_eq!(list.len(), 1);
    let l = &list[0];
    assert_eq!(l["lease_id"], id);
    assert_eq!(l["holder"], "envoy-test-1");
    assert_eq!(l["request_id"], "g-1");
    assert_eq!(
        (l["granted"].clone(), l["used"].clone()),
        (json!(30), json!(0))
    );
    assert_eq!(
        (l["state"].clone(), l["charged"].clone()),
        (json!("open"), json!(0))
    );
    let created = l["created_at"].as_i64().unwrap();
    assert!(created > 1_600_000_000_000);
    assert_eq!(l["expires_at"].as_i64().unwrap(), created + 30_000);
    assert_eq!(admin_get(a, "/admin/accounts/acct_nope/leases").status, 404);

    // Authorize spends the unreserved balance only.
    assert_eq!(authorize(a, "demo-key-alice", 71, "g-3").status, 402);
    assert_eq!(authorize(a, "demo-key-alice", 70, "g-4").status, 200);
    check_ledger(a, "acct_alice");
}

#[test]
fn lease_max_units_caps_the_grant() {
    let b = seeded(&["--lease-max-units", "8", "--lease-ttl-ms", "1000"]);
    let a = b.addr();
    let r = lease(a, "demo-key-alice", 30, 5, "cap-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["granted"], 8);
    assert_eq!(r.json()["expires_in_ms"], 1000);
    // The cap never goes below the caller's minimum.
    let r = lease(a, "demo-key-alice", 30, 12, "cap-2");
    assert_eq!(r.json()["granted"], 12, "{r:?}");
    assert_eq!(r.json()["balance"], 80);
}

#[test]
fn denials_and_bad_requests() {
    let b = seeded(&["--deny-retry-after", "2", "--auth-max-age", "3"]);
    let a = b.addr();
    let r = lease(a, "demo-key-bob", 10, 5, "d-1");
    assert_eq!(r.status, 402, "{r:?}");
    let j = r.json();
    assert_eq!(j["allow"], false);
    assert_eq!(j["account_id"], "acct_bob");
    assert_eq!(j["balance"], 3);
    assert_eq!(j["price"], 5);
    assert!(j["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(r.header("cache-control"), Some("max-age=5"));
    assert_eq!(r.header("retry-after"), Some("2"));
    // Nothing reserved or recorded; the retry is evaluated afresh.
    let bob = check_ledger(a, "acct_bob");
    assert_eq!(
        (bob["reserved"].clone(), bob["leases"].clone()),
        (json!(0), json!(0))
    );
    admin_post(a, "/admin/accounts/acct_bob/topup", &json!({"amount": 2}));
    let r = lease(a, "demo-key-bob", 10, 5, "d-1");
    assert_eq!((r.status, r.json()["granted"].clone()), (200, json!(5)));

    let r = lease(a, "no-such-key", 1, 1, "d-2");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json(),
        json!({"allow": false, "error": "unknown_credential"})
    );
    assert_eq!(r.header("cache-control"), Some("max-age=3"));
    let r = lease(a, "demo-key-carol", 1, 1, "d-3");
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json(),
        json!({"allow": false, "error": "account_disabled"})
    );
    assert_eq!(r.header("cache-control"), Some("max-age=3"));

    let good = json!({"account": "demo-key-alice", "want": 5, "min": 1, "request_id": "d-4", "holder": "h"});
    let mut cases = vec![json!("x"), json!({})];
    for field in ["account", "want", "min", "request_id", "holder"] {
        let mut v = good.clone();
        v.as_object_mut().unwrap().remove(field);
        cases.push(v);
    }
    for (field, bad) in [
        ("want", json!(0)),
        ("want", json!(-1)),
        ("want", json!(1.5)),
        ("want", json!(9_223_372_036_854_775_808u64)),
        ("min", json!(0)),
        ("min", json!(6)),
        ("request_id", json!("")),
        ("holder", json!(7)),
        ("holder", json!("h".repeat(1025))),
    ] {
        let mut v = good.clone();
        v[field] = bad;
        cases.push(v);
    }
    for body in &cases {
        let r = post_json(a, "/v1/leases", &[], body);
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert!(r.json()["error"].is_string());
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    assert_eq!(check_ledger(a, "acct_alice")["leases"], 0);
    assert_eq!(post_json(a, "/v1/leases", &[], &good).status, 200);
}

#[test]
fn lease_is_idempotent_by_request_id() {
    let b = seeded(&[]);
    let a = b.addr();
    let first = lease(a, "demo-key-alice", 30, 5, "i-1").json();
    std::thread::sleep(Duration::from_millis(20));
    // Same request id, other amounts: the same lease, nothing reserved again.
    let r = lease(a, "demo-key-alice", 60, 1, "i-1");
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(j["lease_id"], first["lease_id"]);
    assert_eq!(j["granted"], 30);
    assert_eq!(j["balance"], 70);
    assert_eq!(j["replay"], true);
    let left = j["expires_in_ms"].as_i64().unwrap();
    assert!(left > 0 && left < 30_000, "{j}");
    assert_eq!(check_ledger(a, "acct_alice")["reserved"], 30);

    let r = lease(a, "demo-key-bob", 1, 1, "i-1");
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["error"], "request_id belongs to another account");
    assert_eq!(check_ledger(a, "acct_bob")["leases"], 0);

    let id = first["lease_id"].as_str().unwrap();
    assert_eq!(settle(a, id, 4, true).status, 200);
    let r = lease(a, "demo-key-alice", 30, 5, "i-1");
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["error"], "lease_closed");
    assert_eq!(check_ledger(a, "acct_alice")["balance"], 96);
}

#[test]
fn settle_flow() {
    let b = seeded(&[]);
    let a = b.addr();
    let id = lease_id(a, "demo-key-alice", 30, 5, "s-1");

    // Non-final: the running total, up and down.
    let r = settle(a, &id, 12, false);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        r.json(),
        json!({"lease_id": id, "state": "open", "used": 12, "granted": 30, "balance": 70})
    );
    let r = settle(a, &id, 8, false);
    assert_eq!(r.json()["used"], 8, "{r:?}");
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (
            acct["balance"].clone(),
            acct["reserved"].clone(),
            acct["charged"].clone()
        ),
        (json!(70), json!(30), json!(0))
    );
    assert_eq!(leases_of(a, "acct_alice")[0]["used"], 8);

    // used > granted.
    let r = settle(a, &id, 31, true);
    assert_eq!(r.status, 400, "{r:?}");

    // Final.
    let r = settle(a, &id, 10, true);
    assert_eq!(r.status, 200, "{r:?}");
    let done =
        json!({"lease_id": id, "state": "settled", "used": 10, "granted": 30, "balance": 90});
    assert_eq!(r.json(), done);
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (
            acct["balance"].clone(),
            acct["reserved"].clone(),
            acct["charged"].clone()
        ),
        (json!(90), json!(0), json!(10))
    );

    // Retries with the same used (final or not) change nothing.
    for fin in [true, false] {
        let r = settle(a, &id, 10, fin);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.json(), done);
    }
    // Another used after the settle.
    let r = settle(a, &id, 11, true);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json(), json!({"error": "lease_settled", "used": 10}));
    let r = settle(a, &id, 9, false);
    assert_eq!(r.status, 409, "{r:?}");
    let l = &leases_of(a, "acct_alice")[0];
    assert_eq!(
        (l["state"].clone(), l["charged"].clone()),
        (json!("settled"), json!(10))
    );

    // Unknown lease, bad bodies.
    let r = settle(a, "ls_0000", 1, true);
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.json(), json!({"error": "unknown_lease"}));
    let id2 = lease_id(a, "demo-key-alice", 5, 5, "s-2");
    for body in [
        json!({}),
        json!({"used": -1, "final": true}),
        json!({"used": "1", "final": true}),
        json!({"used": 1, "final": "yes"}),
        json!({"used": 9_223_372_036_854_775_808u64, "final": true}),
    ] {
        let r = post_json(a, &format!("/v1/leases/{id2}/settle"), &[], &body);
        assert_eq!(r.status, 400, "{body}: {r:?}");
    }
    // Settling everything or nothing.
    assert_eq!(settle(a, &id2, 5, true).json()["balance"], 85);
    let id3 = lease_id(a, "demo-key-alice", 5, 5, "s-3");
    assert_eq!(settle(a, &id3, 0, true).json()["balance"], 85);
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (acct["charged"].clone(), acct["leases"].clone()),
        (json!(15), json!(3))
    );
}

fn expiry(policy: &str, charged: i64, balance: i64) {
    let b = seeded(&["--lease-ttl-ms", "300", "--lease-expiry-policy", policy]);
    let a = b.addr();
    let id = lease_id(a, "demo-key-alice", 20, 1, "e-1");
    assert_eq!(settle(a, &id, 7, false).status, 200);
    // The background sweep expires it without anybody touching the account.
    assert!(
        wait_until(Duration::from_secs(5), || b
            .proc
            .log_text()
            .contains("expired 1 lease(s)")),
        "{}",
        b.proc.log_text()
    );
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(acct["reserved"], 0);
    assert_eq!(acct["charged"], charged);
    assert_eq!(acct["balance"], balance);
    let l = &leases_of(a, "acct_alice")[0];
    assert_eq!(l["state"], "expired");
    assert_eq!(l["charged"], charged);
    assert_eq!(l["used"], 7);
    for fin in [true, false] {
        let r = settle(a, &id, 7, fin);
        assert_eq!(r.status, 409, "{r:?}");
        assert_eq!(
            r.json(),
            json!({"error": "lease_expired", "charged": charged})
        );
    }
    let r = lease(a, "demo-key-alice", 20, 1, "e-1");
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (409, json!("lease_closed"))
    );
    let r = cancel(a, "e-1");
    assert_eq!(r.status, 409, "{r:?}");

    // A lease nobody reported on: full charges it all, reported nothing.
    let id = lease_id(a, "demo-key-bob", 3, 1, "e-2");
    assert!(wait_until(Duration::from_secs(5), || {
        leases_of(a, "acct_bob")[0]["state"] == "expired"
    }));
    let r = settle(a, &id, 0, true);
    let want = if policy == "full" { 3 } else { 0 };
    assert_eq!(r.json(), json!({"error": "lease_expired", "charged": want}));
    assert_eq!(check_ledger(a, "acct_bob")["balance"], 3 - want);
}

#[test]
fn expiry_full_policy_charges_the_reservation() {
    expiry("full", 20, 80);
}

#[test]
fn expiry_reported_policy_charges_the_reported_use() {
    expiry("reported", 7, 93);
}

#[test]
fn open_leases_survive_restart_and_expire_after_it() {
    let dir = TempDir::new("lease-restart");
    let args = [
        "--admin-token",
        ADMIN,
        "--seed-demo",
        "--lease-ttl-ms",
        "400",
    ];
    let p = Balance::start_on(&dir, &args);
    let id = lease_id(p.addr, "demo-key-alice", 10, 1, "rs-1");
    assert_eq!(settle(p.addr, &id, 2, false).status, 200);
    drop(p); // SIGKILL
    std::thread::sleep(Duration::from_millis(500));
    let p = Balance::start_on(&dir, &args);
    // The first sweep runs at start-up.
    assert!(wait_until(Duration::from_secs(5), || p
        .log_text()
        .contains("expired 1 lease(s)")));
    let acct = check_ledger(p.addr, "acct_alice");
    assert_eq!(
        (acct["balance"].clone(), acct["charged"].clone()),
        (json!(90), json!(10))
    );
}

#[test]
fn cancel_flow() {
    let b = seeded(&[]);
    let a = b.addr();
    lease_id(a, "demo-key-alice", 30, 5, "c-1");
    let r = cancel(a, "c-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.json()["cancelled"], true);
    assert_eq!(r.json()["balance"], 100);
    let r = cancel(a, "c-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["cancelled"], false);
    assert_eq!(r.json()["reason"], "already_cancelled");
    let l = &leases_of(a, "acct_alice")[0];
    assert_eq!(
        (l["state"].clone(), l["charged"].clone()),
        (json!("cancelled"), json!(0))
    );
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (acct["balance"].clone(), acct["reserved"].clone()),
        (json!(100), json!(0))
    );
    // A cancelled lease cannot be settled nor leased again.
    let id = l["lease_id"].as_str().unwrap();
    let r = settle(a, id, 0, true);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["error"], "lease_cancelled");
    assert_eq!(lease(a, "demo-key-alice", 30, 5, "c-1").status, 409);

    // Unknown.
    let r = cancel(a, "c-never");
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.json(), json!({"error": "unknown_lease"}));
    assert_eq!(
        post_json(a, "/v1/leases/cancel", &[], &json!({"request_id": ""})).status,
        400
    );
    assert_eq!(
        post_json(a, "/v1/leases/cancel", &[], &json!({})).status,
        400
    );

    // With reported usage (even if reported back down to zero later it is
    // the settle's business): 409.
    let id = lease_id(a, "demo-key-alice", 10, 1, "c-2");
    settle(a, &id, 3, false);
    let r = cancel(a, "c-2");
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["error"], "lease_in_use");
    assert_eq!(r.json()["used"], 3);
    // A non-final report of 0 makes it cancellable again (nothing spent).
    settle(a, &id, 0, false);
    assert_eq!(cancel(a, "c-2").json()["cancelled"], true);

    // Settled: 409.
    let id = lease_id(a, "demo-key-alice", 10, 1, "c-3");
    settle(a, &id, 0, true);
    let r = cancel(a, "c-3");
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(r.json()["error"], "lease_closed");
    assert_eq!(check_ledger(a, "acct_alice")["balance"], 100);
}

#[test]
fn concurrent_leases_never_over_reserve() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_cl", "key-cl", 50).status, 201);
    let barrier = Arc::new(Barrier::new(40));
    let handles: Vec<_> = (0..40)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let r = lease(a, "key-cl", 7, 2, &format!("cl-{i}"));
                match r.status {
                    200 => r.json()["granted"].as_i64().unwrap(),
                    402 => 0,
                    other => panic!("status {other}: {r:?}"),
                }
            })
        })
        .collect();
    let grants: Vec<i64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let total: i64 = grants.iter().sum();
    assert!(
        grants.iter().all(|g| *g == 0 || (2..=7).contains(g)),
        "{grants:?}"
    );
    assert!(total <= 50, "{grants:?}");
    // Demand (280) exceeds the balance: at most one unit can be left
    // (a remainder below min = 2).
    assert!(total >= 49, "{grants:?}");
    let acct = check_ledger(a, "acct_cl");
    assert_eq!(acct["reserved"], total);
    assert_eq!(acct["balance"], 50 - total);
    assert_eq!(acct["leases"], grants.iter().filter(|g| **g > 0).count());
    let stats = admin_get(a, "/admin/stats").json();
    assert_eq!(stats["lease_calls"], 40);
}

fn mixed_load(policy: &str) {
    let b = Balance::start(&[
        "--admin-token",
        ADMIN,
        "--quiet",
        "--lease-ttl-ms",
        "400",
        "--lease-expiry-policy",
        policy,
    ]);
    let a = b.addr();
    let accounts = ["acct_m0", "acct_m1", "acct_m2"];
    for (i, id) in accounts.iter().enumerate() {
        assert_eq!(create_account(a, id, &format!("key-m{i}"), 60).status, 201);
    }
    let handles: Vec<_> = (0..6u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut next = xorshift(0x2545_f491_4f6c_dd1du64 ^ (t + 1));
                for n in 0..50 {
                    let who = (next() % 3) as usize;
                    let key = format!("key-m{who}");
                    let rid = format!("mx-{t}-{n}");
                    match next() % 10 {
                        0 => {
                            let r = admin_post(
                                a,
                                &format!("/admin/accounts/acct_m{who}/topup"),
                                &json!({"amount": next() % 9 + 1}),
                            );
                            assert_eq!(r.status, 200);
                        }
                        1..=3 => {
                            let cost = next() % 5 + 1;
                            let r = authorize(a, &key, cost, &rid);
                            assert!(r.status == 200 || r.status == 402, "{r:?}");
                            if r.status == 200 && next().is_multiple_of(3) {
                                assert_eq!(refund(a, &key, cost, &rid, 503).status, 200);
                            }
                        }
                        _ => {
                            let want = next() % 12 + 1;
                            let min = next() % want + 1;
                            let r = lease(a, &key, want, min, &rid);
                            assert!(r.status == 200 || r.status == 402, "{r:?}");
                            if r.status != 200 {
                                continue;
                            }
                            let j = r.json();
                            let id = j["lease_id"].as_str().unwrap().to_owned();
                            let granted = j["granted"].as_u64().unwrap();
                            let used = next() % (granted + 1);
                            match next() % 5 {
                                // Settled at once.
                                0 | 1 => {
                                    let r = settle(a, &id, used, true);
                                    assert!(r.status == 200 || r.status == 409, "{r:?}");
                                }
                                // Reported, then settled (or expired meanwhile).
                                2 => {
                                    let r = settle(a, &id, used, false);
                                    assert!(r.status == 200 || r.status == 409, "{r:?}");
                                    let r = settle(a, &id, used / 2, true);
                                    assert!(r.status == 200 || r.status == 409, "{r:?}");
                                }
                                // Lost answer: cancelled.
                                3 => {
                                    let r = cancel(a, &rid);
                                    assert!(r.status == 200 || r.status == 409, "{r:?}");
                                }
                                // Reported and abandoned: left to expire.
                                _ => {
                                    let r = settle(a, &id, used, false);
                                    assert!(r.status == 200 || r.status == 409, "{r:?}");
                                }
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // With leases possibly still open, then after all of them expired.
    for id in accounts {
        check_ledger(a, id);
    }
    std::thread::sleep(Duration::from_millis(1000));
    let mut states = std::collections::BTreeMap::new();
    for id in accounts {
        let acct = check_ledger(a, id);
        assert_eq!(acct["reserved"], 0, "{acct}");
        for l in leases_of(a, id) {
            *states
                .entry(l["state"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    // The load exercised every way a lease can end.
    for s in ["settled", "expired", "cancelled"] {
        assert!(states.get(s).is_some_and(|n| *n > 0), "{states:?}");
    }
}

#[test]
fn ledger_invariant_with_leases_full_policy() {
    mixed_load("full");
}

#[test]
fn ledger_invariant_with_leases_reported_policy() {
    mixed_load("reported");
}

#[test]
fn service_token_and_stats() {
    let b = seeded(&["--service-token", "svc-secret"]);
    let a = b.addr();
    let r = lease(a, "demo-key-alice", 5, 1, "t-1");
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.json(), json!({"error": "service token rejected"}));
    assert_eq!(settle(a, "ls_x", 1, true).status, 500);
    assert_eq!(cancel(a, "t-1").status, 500);
    let ok = [("authorization", "Bearer svc-secret")];
    let body = json!({"account": "demo-key-alice", "want": 5, "min": 1, "request_id": "t-1", "holder": "h"});
    let r = post_json(a, "/v1/leases", &ok, &body);
    assert_eq!(r.status, 200, "{r:?}");
    let id = r.json()["lease_id"].as_str().unwrap().to_owned();
    let r = post_json(
        a,
        &format!("/v1/leases/{id}/settle"),
        &ok,
        &json!({"used": 1, "final": false}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = post_json(a, "/v1/leases/cancel", &ok, &json!({"request_id": "t-1"}));
    assert_eq!(r.status, 409, "{r:?}");

    let s = admin_get(a, "/admin/stats").json();
    assert_eq!(
        (
            s["lease_calls"].clone(),
            s["settle_calls"].clone(),
            s["cancel_calls"].clone()
        ),
        (json!(2), json!(2), json!(2))
    );
    assert_eq!(s["authorize_calls"], 0);
    let s = admin_post(a, "/admin/stats/reset", &json!({})).json();
    assert_eq!(
        (
            s["lease_calls"].clone(),
            s["settle_calls"].clone(),
            s["cancel_calls"].clone()
        ),
        (json!(0), json!(0), json!(0))
    );

    // The access log names the account and request id, never the key.
    let log = b.proc.log_text();
    assert!(
        log.contains("POST /v1/leases 200 account=acct_alice"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "POST /v1/leases/{id}/settle 200 account=acct_alice request_id=\"t-1\""
        )),
        "{log}"
    );
    assert!(
        !log.contains("demo-key-alice") && !log.contains("svc-secret"),
        "{log}"
    );
}
