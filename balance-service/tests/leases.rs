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
        json!({"lease_id": id, "state": "open", "used": 12, "granted": 30, "balance": 70, "seq": 0})
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
    let done = json!({"lease_id": id, "state": "settled", "used": 10, "granted": 30, "balance": 90, "seq": 0});
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

// ------------------------------------------------------------ fleets (issue 12)

/// The `granted` of a 200 lease answer (asserts the 200).
fn granted_of(r: &Resp) -> i64 {
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json().get("recall"), None, "a grant never recalls: {r:?}");
    r.json()["granted"].as_i64().unwrap()
}

#[test]
fn fair_share_sizing_with_one_two_and_four_holders() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    for n in [1u64, 2, 4] {
        let (id, key) = (format!("acct_fs{n}"), format!("key-fs{n}"));
        assert_eq!(create_account(a, &id, &key, 1000).status, 201);
        // n - 1 other holders hold one small lease each.
        for h in 1..n {
            let r = lease_as(a, &key, 1, 1, &format!("fs{n}-h{h}"), &format!("h{h}"));
            assert_eq!(granted_of(&r), 1);
        }
        let available = 1000 - (n as i64 - 1);
        let r = lease_as(a, &key, 600, 1, &format!("fs{n}-me"), "me");
        // 600 (alone), 999 / 2 = 499, 997 / 4 = 249.
        let want = (available / n as i64).min(600);
        assert_eq!(granted_of(&r), want, "{n} holders");
        assert_eq!(r.json()["balance"], available - want);
        // The holder's own lease does not count: a second lease of "me"
        // shares with the same n - 1 others.
        let left = available - want;
        let r = lease_as(a, &key, 1000, 1, &format!("fs{n}-me-2"), "me");
        assert_eq!(granted_of(&r), left / n as i64, "{n} holders, second lease");
        check_ledger(a, &id);
    }

    // Later holders get shares of what is left; never below min, never
    // above want, and the last units go in small grants.
    assert_eq!(create_account(a, "acct_fs", "key-fs", 160).status, 201);
    let steps: [(&str, u64, u64, i64); 6] = [
        ("h1", 100, 1, 100), // alone: what it wants
        ("h2", 100, 1, 30),  // 60 / 2
        ("h3", 100, 1, 10),  // 30 / 3
        ("h4", 4, 1, 4),     // 20 / 4 = 5, but it wants 4
        ("h5", 100, 7, 7),   // 16 / 5 = 3, but it needs 7
        ("h2", 100, 1, 1),   // 9 / 5 (others h1 h3 h4 h5)
    ];
    for (i, (holder, want, min, expect)) in steps.iter().enumerate() {
        let r = lease_as(a, "key-fs", *want, *min, &format!("fs-{i}"), holder);
        assert_eq!(granted_of(&r), *expect, "step {i} ({holder})");
    }
    let acct = check_ledger(a, "acct_fs");
    assert_eq!(
        (acct["balance"].clone(), acct["reserved"].clone()),
        (json!(8), json!(152))
    );
}

#[test]
fn recall_moves_unspent_units_to_the_asking_holder() {
    let b = seeded(&["--lease-recall-retry-ms", "250", "--deny-retry-after", "2"]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_r", "key-r", 100).status, 201);
    let id1 = {
        let r = lease_as(a, "key-r", 100, 1, "r-1", "gw-1");
        assert_eq!(granted_of(&r), 100);
        r.json()["lease_id"].as_str().unwrap().to_owned()
    };
    assert_eq!(settle_seq(a, &id1, 40, false, 1).json().get("recall"), None);

    // gw-2 finds nothing available, but gw-1 holds 60 unspent units.
    let r = lease_as(a, "key-r", 20, 5, "r-2", "gw-2");
    assert_eq!(r.status, 402, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["recall"].clone(), j["retry_after_ms"].clone()),
        (json!(true), json!(250))
    );
    assert_eq!(
        (j["allow"].clone(), j["balance"].clone(), j["price"].clone()),
        (json!(false), json!(0), json!(5))
    );
    assert_eq!(j["account_id"], "acct_r");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("retry-after"), None);
    let rows = leases_of(a, "acct_r");
    assert_eq!(rows.len(), 1, "nothing reserved for gw-2: {rows:?}");
    let recalled_at = rows[0]["recalled_at"].as_i64().expect("recalled_at set");
    assert!(recalled_at >= rows[0]["created_at"].as_i64().unwrap());
    let acct = check_ledger(a, "acct_r");
    assert_eq!(
        (acct["balance"].clone(), acct["reserved"].clone()),
        (json!(0), json!(100))
    );

    // Asking again keeps the first mark's time.
    assert_eq!(
        lease_as(a, "key-r", 20, 5, "r-2", "gw-2").json()["recall"],
        true
    );
    assert_eq!(leases_of(a, "acct_r")[0]["recalled_at"], recalled_at);

    // gw-1's next settle (a heartbeat, same used) carries the recall.
    let r = settle_seq(a, &id1, 40, false, 2);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.json()["state"].clone(), r.json()["recall"].clone()),
        (json!("open"), json!(true))
    );
    // Its final settle returns the unused units; the answer no longer recalls.
    let r = settle_seq(a, &id1, 45, true, 3);
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["state"].clone(), j["balance"].clone(), j["seq"].clone()),
        (json!("settled"), json!(55), json!(3))
    );
    assert_eq!(j.get("recall"), None, "{j}");

    // The retry of gw-2's lease call now succeeds (alone now: what it wants).
    let r = lease_as(a, "key-r", 20, 5, "r-2", "gw-2");
    assert_eq!(granted_of(&r), 20);
    assert_eq!(r.json()["balance"], 35);
    let acct = check_ledger(a, "acct_r");
    assert_eq!(
        (
            acct["balance"].clone(),
            acct["reserved"].clone(),
            acct["charged"].clone()
        ),
        (json!(35), json!(20), json!(45))
    );
    // A new lease of gw-1 is not recalled.
    let r = lease_as(a, "key-r", 30, 1, "r-3", "gw-1");
    let id3 = r.json()["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(granted_of(&r), 17); // 35 / 2
    assert_eq!(settle(a, &id3, 1, false).json().get("recall"), None);
    let rows = leases_of(a, "acct_r");
    assert_eq!(rows[2]["recalled_at"], Value::Null, "{rows:?}");
    check_ledger(a, "acct_r");
}

#[test]
fn honest_402_has_no_recall() {
    let b = seeded(&["--deny-retry-after", "2"]);
    let a = b.addr();
    let is_honest = |r: &Resp| {
        assert_eq!(r.status, 402, "{r:?}");
        assert_eq!(r.json().get("recall"), None, "{r:?}");
        assert_eq!(r.json().get("retry_after_ms"), None, "{r:?}");
        assert_eq!(r.header("cache-control"), Some("max-age=5"));
        assert_eq!(r.header("retry-after"), Some("2"));
    };
    // No leases at all.
    is_honest(&lease_as(a, "demo-key-bob", 10, 5, "h-0", "gw-2"));
    // Another holder's lease fully spent (last report): nothing to recall.
    let id = lease_id(a, "demo-key-bob", 3, 1, "h-1");
    assert_eq!(settle(a, &id, 3, false).status, 200);
    is_honest(&lease_as(a, "demo-key-bob", 10, 1, "h-2", "gw-2"));
    assert_eq!(leases_of(a, "acct_bob")[0]["recalled_at"], Value::Null);
    // The asking holder's own unspent lease is recalled too: it may be a lease
    // that holder replaced, whose final settle is still on its way; an honest
    // 402 then would be followed by the units coming back.
    assert_eq!(settle(a, &id, 1, false).status, 200);
    let r = lease(a, "demo-key-bob", 10, 1, "h-3");
    assert_eq!(
        (r.status, r.json()["recall"].clone()),
        (402, json!(true)),
        "{r:?}"
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let rows = leases_of(a, "acct_bob");
    assert_eq!(rows.len(), 1);
    assert_ne!(rows[0]["recalled_at"], Value::Null);
    let r = settle(a, &id, 1, false);
    assert_eq!(r.json()["recall"], json!(true), "{r:?}");
    check_ledger(a, "acct_bob");
}

#[test]
fn settle_sequence_numbers() {
    let b = seeded(&[]);
    let a = b.addr();
    let id = lease_id(a, "demo-key-alice", 30, 5, "q-1");
    let row = |a| leases_of(a, "acct_alice")[0].clone();

    let r = settle_seq(a, &id, 10, false, 2);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"lease_id": id, "state": "open", "used": 10, "granted": 30, "balance": 70, "seq": 2})
    );
    assert_eq!(row(a)["settle_seq"], 2);
    // A late older settle changes nothing.
    let r = settle_seq(a, &id, 3, false, 1);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"lease_id": id, "state": "open", "used": 10, "granted": 30, "balance": 70,
               "seq": 2, "stale": true})
    );
    let r = settle_seq(a, &id, 3, true, 1);
    assert_eq!(
        (
            r.status,
            r.json()["stale"].clone(),
            r.json()["state"].clone()
        ),
        (200, json!(true), json!("open"))
    );
    assert_eq!(
        (row(a)["used"].clone(), row(a)["state"].clone()),
        (json!(10), json!("open"))
    );
    // A retry of the same settle.
    let r = settle_seq(a, &id, 10, false, 2);
    assert_eq!(
        (
            r.status,
            r.json()["replay"].clone(),
            r.json()["used"].clone()
        ),
        (200, json!(true), json!(10))
    );
    // Without seq: today's rules (the total may go down), seq unchanged.
    let r = settle(a, &id, 8, false);
    assert_eq!(
        r.json(),
        json!({"lease_id": id, "state": "open", "used": 8, "granted": 30, "balance": 70, "seq": 2})
    );
    // Newer: processed.
    let r = settle_seq(a, &id, 12, true, 3);
    assert_eq!(
        r.json(),
        json!({"lease_id": id, "state": "settled", "used": 12, "granted": 30, "balance": 88, "seq": 3})
    );
    // After the final settle: older settles are stale (200, nothing moves),
    // also ones that today's rules would refuse.
    for (used, fin, seq) in [(10, false, 2), (5, true, 1), (30, true, 2)] {
        let r = settle_seq(a, &id, used, fin, seq);
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            r.json(),
            json!({"lease_id": id, "state": "settled", "used": 12, "granted": 30, "balance": 88,
                   "seq": 3, "stale": true})
        );
    }
    let r = settle_seq(a, &id, 12, true, 3);
    assert_eq!((r.status, r.json()["replay"].clone()), (200, json!(true)));
    let r = settle(a, &id, 12, true);
    assert_eq!((r.status, r.json().get("replay")), (200, None));
    assert_eq!(settle(a, &id, 11, true).status, 409);
    assert_eq!(settle_seq(a, &id, 11, true, 4).status, 409);
    let r = settle_seq(a, &id, 31, true, 5);
    assert_eq!(r.status, 400, "{r:?}");
    let l = row(a);
    assert_eq!(
        (
            l["used"].clone(),
            l["charged"].clone(),
            l["settle_seq"].clone()
        ),
        (json!(12), json!(12), json!(3))
    );
    for bad in [
        json!(0),
        json!(-1),
        json!("2"),
        json!(1.5),
        json!(9_223_372_036_854_775_808u64),
    ] {
        let r = post_json(
            a,
            &format!("/v1/leases/{id}/settle"),
            &[],
            &json!({"used": 12, "final": true, "seq": bad}),
        );
        assert_eq!(r.status, 400, "{bad}: {r:?}");
    }

    // Cancelled: a stale settle still answers 200 stale; a newer one 409.
    let id2 = lease_id(a, "demo-key-alice", 5, 5, "q-2");
    assert_eq!(settle_seq(a, &id2, 0, false, 2).status, 200);
    assert_eq!(cancel(a, "q-2").json()["cancelled"], true);
    let r = settle_seq(a, &id2, 4, true, 1);
    assert_eq!(
        (
            r.status,
            r.json()["state"].clone(),
            r.json()["stale"].clone()
        ),
        (200, json!("cancelled"), json!(true))
    );
    assert_eq!(
        settle_seq(a, &id2, 0, true, 3).json()["error"],
        "lease_cancelled"
    );
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (acct["balance"].clone(), acct["charged"].clone()),
        (json!(88), json!(12))
    );
}

#[test]
fn stale_settle_on_an_expired_lease() {
    let b = seeded(&["--lease-ttl-ms", "300", "--lease-expiry-policy", "reported"]);
    let a = b.addr();
    let id = lease_id(a, "demo-key-alice", 20, 1, "qe-1");
    assert_eq!(settle_seq(a, &id, 6, false, 5).status, 200);
    assert!(wait_until(Duration::from_secs(5), || leases_of(
        a,
        "acct_alice"
    )[0]["state"]
        == "expired"));
    let r = settle_seq(a, &id, 2, true, 4);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"lease_id": id, "state": "expired", "used": 6, "granted": 20, "balance": 94,
               "seq": 5, "stale": true})
    );
    let r = settle_seq(a, &id, 6, true, 6);
    assert_eq!(r.json(), json!({"error": "lease_expired", "charged": 6}));
    assert_eq!(check_ledger(a, "acct_alice")["charged"], 6);
}

#[test]
fn lease_refunds_on_settled_open_and_cancelled_leases() {
    let b = seeded(&[]);
    let a = b.addr();
    // Settled: refunded at once, out of its charge.
    let id = lease_id(a, "demo-key-alice", 30, 1, "lr-1");
    assert_eq!(settle(a, &id, 20, true).json()["balance"], 80);
    let r = lease_refund(a, &id, "rf-1", 5, 503);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let first = json!({"refunded": true, "lease_id": id, "units": 5, "account_id": "acct_alice",
                       "balance": 85, "charged": 15});
    assert_eq!(r.json(), first);
    let l = &leases_of(a, "acct_alice")[0];
    assert_eq!(
        (
            l["charged"].clone(),
            l["refunded"].clone(),
            l["used"].clone()
        ),
        (json!(15), json!(5), json!(20))
    );
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (acct["charged"].clone(), acct["refunded"].clone()),
        (json!(15), json!(5))
    );
    // Replay: same answer, nothing moves. Reuse with other units or lease: 409.
    let mut again = first.clone();
    again["replay"] = json!(true);
    assert_eq!(lease_refund(a, &id, "rf-1", 5, 503).json(), again);
    let conflict = json!({"error": "request_id belongs to another lease"});
    let r = lease_refund(a, &id, "rf-1", 4, 503);
    assert_eq!((r.status, r.json()), (409, conflict.clone()));
    let id2 = lease_id(a, "demo-key-alice", 10, 1, "lr-2");
    let r = lease_refund(a, &id2, "rf-1", 5, 503);
    assert_eq!((r.status, r.json()), (409, conflict));
    assert_eq!(check_ledger(a, "acct_alice")["balance"], 75);
    // Over-refund.
    let over = json!({"error": "refund_exceeds_charge"});
    let r = lease_refund(a, &id, "rf-2", 16, 503);
    assert_eq!((r.status, r.json()), (409, over.clone()));
    assert_eq!(lease_refund(a, &id, "rf-2", 15, 503).json()["charged"], 0);
    let r = lease_refund(a, &id, "rf-3", 1, 503);
    assert_eq!((r.status, r.json()), (409, over.clone()));
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (
            acct["balance"].clone(),
            acct["charged"].clone(),
            acct["refunded"].clone()
        ),
        (json!(90), json!(0), json!(20))
    );

    // Open: pending, applied by the final settle.
    let r = lease_refund(a, &id2, "rf-4", 4, 502);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"refunded": true, "lease_id": id2, "units": 4, "account_id": "acct_alice",
               "balance": 90, "charged": null, "pending": true})
    );
    let l = &leases_of(a, "acct_alice")[1];
    assert_eq!(
        (l["refund_pending"].clone(), l["refunded"].clone()),
        (json!(4), json!(0))
    );
    check_ledger(a, "acct_alice");
    let r = lease_refund(a, &id2, "rf-4", 4, 502);
    assert_eq!(
        (r.json()["replay"].clone(), r.json()["pending"].clone()),
        (json!(true), json!(true))
    );
    // Pending refunds never exceed the grant; a pending refund blocks cancel.
    let r = lease_refund(a, &id2, "rf-5", 7, 502);
    assert_eq!((r.status, r.json()), (409, over.clone()));
    assert_eq!(cancel(a, "lr-2").json()["error"], "lease_in_use");
    let r = settle(a, &id2, 9, true);
    assert_eq!(
        (r.json()["state"].clone(), r.json()["balance"].clone()),
        (json!("settled"), json!(95))
    );
    let l = &leases_of(a, "acct_alice")[1];
    assert_eq!(
        (
            l["charged"].clone(),
            l["refunded"].clone(),
            l["refund_pending"].clone()
        ),
        (json!(5), json!(4), json!(0))
    );
    let r = lease_refund(a, &id2, "rf-4", 4, 502);
    assert_eq!(
        r.json(),
        json!({"refunded": true, "lease_id": id2, "units": 4, "account_id": "acct_alice",
               "balance": 95, "charged": 5, "replay": true})
    );
    // Pending refunds beyond the final use: the charge stops at 0.
    let id3 = lease_id(a, "demo-key-alice", 10, 1, "lr-3");
    assert_eq!(lease_refund(a, &id3, "rf-6", 6, 503).status, 200);
    assert_eq!(lease_refund(a, &id3, "rf-7", 3, 503).status, 200);
    assert_eq!(settle(a, &id3, 5, true).json()["balance"], 95);
    let l = &leases_of(a, "acct_alice")[2];
    assert_eq!(
        (l["charged"].clone(), l["refunded"].clone()),
        (json!(0), json!(5))
    );
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (acct["charged"].clone(), acct["refunded"].clone()),
        (json!(5), json!(29))
    );

    // Cancelled: nothing was charged.
    lease_id(a, "demo-key-alice", 10, 1, "lr-4");
    assert_eq!(cancel(a, "lr-4").json()["cancelled"], true);
    let id4 = leases_of(a, "acct_alice")[3]["lease_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = lease_refund(a, &id4, "rf-8", 1, 503);
    assert_eq!(
        (r.status, r.json()),
        (409, json!({"error": "lease_cancelled"}))
    );
    // Unknown lease, bad bodies.
    let r = lease_refund(a, "ls_nope", "rf-9", 1, 503);
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "unknown_lease"}))
    );
    for body in [
        json!({}),
        json!({"request_id": "", "units": 1}),
        json!({"request_id": "x", "units": 0}),
        json!({"request_id": "x", "units": -1}),
        json!({"request_id": "x"}),
        json!({"request_id": "x", "units": 9_223_372_036_854_775_808u64}),
    ] {
        let r = post_json(a, &format!("/v1/leases/{id}/refund"), &[], &body);
        assert_eq!(r.status, 400, "{body}: {r:?}");
    }
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (acct["balance"].clone(), acct["reserved"].clone()),
        (json!(95), json!(0))
    );
    // Every call counted, rejected ones included.
    let s = admin_get(a, "/admin/stats").json();
    assert_eq!(s["lease_refund_calls"], 21, "{s}");
    let s = admin_post(a, "/admin/stats/reset", &json!({})).json();
    assert_eq!(s["lease_refund_calls"], 0);
    let log = b.proc.log_text();
    assert!(
        log.contains(&format!(
            "POST /v1/leases/{id}/refund 200 account=acct_alice request_id=\"rf-1\""
        )),
        "{log}"
    );
}

fn refund_after_expiry(policy: &str, charged_then: i64) {
    let b = seeded(&["--lease-ttl-ms", "300", "--lease-expiry-policy", policy]);
    let a = b.addr();
    let id = lease_id(a, "demo-key-alice", 20, 1, "rx-1");
    assert_eq!(settle(a, &id, 7, false).status, 200);
    // Recorded while open or (if the lease ran out first) applied at once:
    // either way it comes out of the expiry charge.
    assert_eq!(lease_refund(a, &id, "rx-r1", 2, 503).status, 200);
    assert!(wait_until(Duration::from_secs(5), || leases_of(
        a,
        "acct_alice"
    )[0]["state"]
        == "expired"));
    let l = &leases_of(a, "acct_alice")[0];
    assert_eq!(
        (l["charged"].clone(), l["refunded"].clone()),
        (json!(charged_then), json!(2)),
        "{policy}"
    );
    let r = lease_refund(a, &id, "rx-r2", 3, 503);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["charged"], charged_then - 3);
    assert_eq!(r.json().get("pending"), None);
    let r = lease_refund(a, &id, "rx-r3", (charged_then - 2) as u64, 503);
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (409, json!("refund_exceeds_charge"))
    );
    let r = lease_refund(a, &id, "rx-r3", (charged_then - 3) as u64, 503);
    assert_eq!(r.json()["charged"], 0, "{r:?}");
    let acct = check_ledger(a, "acct_alice");
    assert_eq!(
        (acct["balance"].clone(), acct["charged"].clone()),
        (json!(100), json!(0))
    );
    // The settle answer tells the filter what was charged after refunds.
    assert_eq!(
        settle(a, &id, 7, true).json(),
        json!({"error": "lease_expired", "charged": 0})
    );
}

#[test]
fn lease_refund_after_expiry_full_policy() {
    refund_after_expiry("full", 18);
}

#[test]
fn lease_refund_after_expiry_reported_policy() {
    refund_after_expiry("reported", 5);
}

/// Totals observed by one fleet load thread.
#[derive(Default)]
struct Seen {
    recall_402: u64,
    recall_settles: u64,
    stale: u64,
    refunds: u64,
}

#[test]
fn ledger_invariant_under_fleet_load_with_recalls_and_refunds() {
    let b = Balance::start(&["--admin-token", ADMIN, "--quiet", "--lease-ttl-ms", "600"]);
    let a = b.addr();
    for i in 0..2 {
        assert_eq!(
            create_account(a, &format!("acct_f{i}"), &format!("key-f{i}"), 40).status,
            201
        );
    }
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let holder = format!("gw-{t}");
                let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64 ^ (t + 1));
                let mut seen = Seen::default();
                barrier.wait();
                for n in 0..40 {
                    let key = format!("key-f{}", next() % 2);
                    let rid = format!("fl-{t}-{n}");
                    if next().is_multiple_of(12) {
                        let r = admin_post(
                            a,
                            &format!("/admin/accounts/acct_f{}/topup", next() % 2),
                            &json!({"amount": next() % 6 + 1}),
                        );
                        assert_eq!(r.status, 200);
                        continue;
                    }
                    let want = next() % 25 + 5;
                    let min = next() % 5 + 1;
                    let r = lease_as(a, &key, want, min, &rid, &holder);
                    if r.status == 402 {
                        if r.json()["recall"] == true {
                            seen.recall_402 += 1;
                            assert_eq!(r.header("cache-control"), Some("no-store"));
                        }
                        continue;
                    }
                    assert_eq!(r.status, 200, "{r:?}");
                    let j = r.json();
                    let id = j["lease_id"].as_str().unwrap().to_owned();
                    let granted = j["granted"].as_u64().unwrap();
                    let mut used = 0;
                    let mut seq = 0;
                    let mut closed = false;
                    for step in 0..(next() % 4 + 1) {
                        used = (used + next() % 4).min(granted);
                        seq += 1;
                        let fin = step == 3 || next().is_multiple_of(4);
                        let r = settle_seq(a, &id, used, fin, seq);
                        assert!(r.status == 200 || r.status == 409, "{r:?}");
                        if r.status == 409 {
                            closed = true;
                            break;
                        }
                        let j = r.json();
                        // A late retry of the previous settle.
                        if seq > 1 && next().is_multiple_of(3) {
                            let r = settle_seq(a, &id, used.saturating_sub(1), false, seq - 1);
                            assert_eq!(
                                (r.status, r.json()["stale"].clone()),
                                (200, json!(true)),
                                "{r:?}"
                            );
                            seen.stale += 1;
                        }
                        if used > 0 && next().is_multiple_of(3) {
                            let r = lease_refund(a, &id, &format!("{rid}-rf{step}"), 1, 503);
                            assert!(r.status == 200 || r.status == 409, "{r:?}");
                            seen.refunds += u64::from(r.status == 200);
                        }
                        if fin {
                            closed = true;
                            break;
                        }
                        if j["recall"] == true {
                            seen.recall_settles += 1;
                            seq += 1;
                            let r = settle_seq(a, &id, used, true, seq);
                            assert!(r.status == 200 || r.status == 409, "{r:?}");
                            closed = true;
                            break;
                        }
                    }
                    // Some leases are left open for the next lease calls to
                    // recall (or to expire).
                    if !closed && next().is_multiple_of(2) {
                        let r = settle_seq(a, &id, used, true, seq + 1);
                        assert!(r.status == 200 || r.status == 409, "{r:?}");
                    }
                }
                seen
            })
        })
        .collect();
    let mut total = Seen::default();
    for h in handles {
        let s = h.join().unwrap();
        total.recall_402 += s.recall_402;
        total.recall_settles += s.recall_settles;
        total.stale += s.stale;
        total.refunds += s.refunds;
    }
    for i in 0..2 {
        check_ledger(a, &format!("acct_f{i}"));
    }
    // Once everything left open expired.
    for i in 0..2 {
        let id = format!("acct_f{i}");
        assert!(wait_until(Duration::from_secs(10), || account(a, &id)
            ["reserved"]
            == 0));
        check_ledger(a, &id);
    }
    let s = admin_get(a, "/admin/stats").json();
    assert!(s["lease_refund_calls"].as_u64().unwrap() > 0, "{s}");
    eprintln!(
        "fleet load: {} recall 402s, {} settles answered recall, {} stale settles, {} lease refunds",
        total.recall_402, total.recall_settles, total.stale, total.refunds
    );
    // The load exercised what it is about.
    assert!(total.recall_402 > 0, "no recall 402");
    assert!(total.recall_settles > 0, "no settle answered recall");
    assert!(total.stale > 0 && total.refunds > 0);
}

#[test]
fn recall_seq_and_pending_refunds_survive_restart() {
    let dir = TempDir::new("fleet-restart");
    let args = [
        "--admin-token",
        ADMIN,
        "--seed-demo",
        "--lease-ttl-ms",
        "60000",
    ];
    let p = Balance::start_on(&dir, &args);
    let r = lease_as(p.addr, "demo-key-alice", 100, 1, "fr-1", "gw-1");
    assert_eq!(granted_of(&r), 100);
    let id = r.json()["lease_id"].as_str().unwrap().to_owned();
    assert_eq!(settle_seq(p.addr, &id, 10, false, 3).status, 200);
    assert_eq!(
        lease_refund(p.addr, &id, "fr-rf", 4, 503).json()["pending"],
        true
    );
    assert_eq!(
        lease_as(p.addr, "demo-key-alice", 5, 1, "fr-2", "gw-2").json()["recall"],
        true
    );
    drop(p); // SIGKILL
    let p = Balance::start_on(&dir, &args);
    let r = settle_seq(p.addr, &id, 2, false, 2);
    assert_eq!(
        (
            r.json()["stale"].clone(),
            r.json()["recall"].clone(),
            r.json()["used"].clone()
        ),
        (json!(true), json!(true), json!(10)),
        "{r:?}"
    );
    let r = settle_seq(p.addr, &id, 10, true, 4);
    assert_eq!(r.json()["balance"], 94, "{r:?}");
    let l = &leases_of(p.addr, "acct_alice")[0];
    assert_eq!(
        (
            l["charged"].clone(),
            l["refunded"].clone(),
            l["settle_seq"].clone()
        ),
        (json!(6), json!(4), json!(4))
    );
    assert_eq!(
        granted_of(&lease_as(p.addr, "demo-key-alice", 5, 1, "fr-2", "gw-2")),
        5
    );
    check_ledger(p.addr, "acct_alice");
}
