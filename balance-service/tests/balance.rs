//! End-to-end tests of the farebox-balance binary over real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::{Arc, Barrier};

#[test]
fn healthz_and_unknown_path() {
    let b = Balance::start(&[]);
    let r = request(b.addr(), "GET", "/healthz", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    let r = request(b.addr(), "GET", "/nope", &[], None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "not_found");
}

#[test]
fn authorize_answer_shapes_and_cache_control() {
    let b = seeded(&[
        "--allow-max-age",
        "7",
        "--deny-max-age",
        "5",
        "--auth-max-age",
        "3",
        "--deny-retry-after",
        "2",
    ]);
    let a = b.addr();

    let r = authorize(a, "demo-key-alice", 1, "shape-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"allow": true, "account_id": "acct_alice", "balance": 99})
    );
    assert_eq!(r.header("cache-control"), Some("max-age=7"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("retry-after"), None);

    let r = authorize(a, "demo-key-bob", 5, "shape-2");
    assert_eq!(r.status, 402, "{r:?}");
    let j = r.json();
    assert_eq!(j["allow"], false);
    assert_eq!(j["account_id"], "acct_bob");
    assert_eq!(j["balance"], 3);
    assert_eq!(j["price"], 5);
    assert!(j["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(r.header("cache-control"), Some("max-age=5"));
    assert_eq!(r.header("retry-after"), Some("2"));

    let r = authorize(a, "no-such-key", 1, "shape-3");
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"allow": false, "error": "unknown_credential"})
    );
    assert_eq!(r.header("cache-control"), Some("max-age=3"));

    let r = authorize(a, "demo-key-carol", 1, "shape-4");
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"allow": false, "error": "account_disabled"})
    );
    assert_eq!(r.header("cache-control"), Some("max-age=3"));

    // Denials debit nothing and leave no record.
    let bob = account(a, "acct_bob");
    assert_eq!(
        (bob["balance"].clone(), bob["charges"].clone()),
        (json!(3), json!(0))
    );
    let carol = account(a, "acct_carol");
    assert_eq!(carol["balance"], 50);
    assert_eq!(carol["disabled"], true);
}

#[test]
fn default_cache_control_and_disabled_admin() {
    // No admin token: the admin API is off.
    let b = Balance::start(&["--seed-demo"]);
    let a = b.addr();
    let r = authorize(a, "demo-key-alice", 1, "d-1");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = authorize(a, "demo-key-bob", 4, "d-2");
    assert_eq!(r.status, 402);
    assert_eq!(r.header("cache-control"), Some("max-age=5"));
    assert_eq!(r.header("retry-after"), None);
    let r = authorize(a, "nope", 1, "d-3");
    assert_eq!(r.status, 401);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = authorize(a, "demo-key-carol", 1, "d-4");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("cache-control"), Some("no-store"));

    let r = request(
        a,
        "GET",
        "/admin/stats",
        &[("authorization", "Bearer x")],
        None,
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.json(), json!({"error": "admin API disabled"}));
}

#[test]
fn deny_max_age_zero_means_no_store() {
    let b = seeded(&["--deny-max-age", "0", "--allow-max-age", "30"]);
    let r = authorize(b.addr(), "demo-key-bob", 4, "z-1");
    assert_eq!(r.status, 402);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let r = authorize(b.addr(), "demo-key-bob", 1, "z-2");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), Some("max-age=30"));
}

#[test]
fn malformed_authorize_is_400() {
    let b = seeded(&[]);
    let a = b.addr();
    let good = json!({
        "account": "demo-key-alice", "cost": 1, "route": "r", "method": "GET",
        "path": "/", "request_id": "m-1",
    });
    let mut cases: Vec<String> = vec!["not json".into(), "{}".into(), "[]".into(), String::new()];
    for field in ["account", "cost", "route", "method", "path", "request_id"] {
        let mut v = good.clone();
        v.as_object_mut().unwrap().remove(field);
        cases.push(v.to_string());
    }
    for (field, bad) in [
        ("cost", json!("5")),
        ("cost", json!(-1)),
        ("cost", json!(1.5)),
        ("cost", json!(9_223_372_036_854_775_808u64)), // i64::MAX + 1
        ("cost", json!(null)),
        ("account", json!(5)),
        ("request_id", json!("")),
        ("request_id", json!(7)),
    ] {
        let mut v = good.clone();
        v[field] = bad;
        cases.push(v.to_string());
    }
    for body in &cases {
        let r = request(
            a,
            "POST",
            "/v1/authorize",
            &[("content-type", "application/json")],
            Some(body),
        );
        assert_eq!(r.status, 400, "body {body}: {r:?}");
        assert!(r.json()["error"].is_string(), "{r:?}");
        assert_eq!(r.header("cache-control"), Some("no-store"));
    }
    // None of them touched the ledger; the well-formed one works.
    assert_eq!(account(a, "acct_alice")["balance"], 100);
    let r = post_json(a, "/v1/authorize", &[], &good);
    assert_eq!(r.status, 200, "{r:?}");
    // Unknown extra fields are ignored.
    let mut extra = good.clone();
    extra["request_id"] = json!("m-2");
    extra["future_field"] = json!({"x": 1});
    assert_eq!(post_json(a, "/v1/authorize", &[], &extra).status, 200);
}

#[test]
fn concurrent_authorizes_never_overdraw() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_c", "key-c", 10).status, 201);
    let barrier = Arc::new(Barrier::new(50));
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                authorize(a, "key-c", 1, &format!("conc-{i}")).status
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10);
    assert_eq!(statuses.iter().filter(|s| **s == 402).count(), 40);
    let acct = account(a, "acct_c");
    assert_eq!(acct["balance"], 0);
    assert_eq!(acct["charged"], 10);
    assert_eq!(acct["charges"], 10);
    let stats = admin_get(a, "/admin/stats").json();
    assert_eq!(stats["authorize_calls"], 50);
    assert_eq!(stats["authorize_by_account"]["acct_c"], 50);
}

#[test]
fn authorize_is_idempotent_by_request_id() {
    let b = seeded(&[]);
    let a = b.addr();
    let r = authorize(a, "demo-key-alice", 10, "dup-1");
    assert_eq!((r.status, r.json()["balance"].clone()), (200, json!(90)));
    let r = authorize(a, "demo-key-alice", 10, "dup-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["allow"], true);
    assert_eq!(r.json()["balance"], 90);
    assert_eq!(r.json()["replay"], true);
    let alice = account(a, "acct_alice");
    assert_eq!(
        (alice["charged"].clone(), alice["charges"].clone()),
        (json!(10), json!(1))
    );

    // Same request id from another account.
    let r = authorize(a, "demo-key-bob", 1, "dup-1");
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"error": "request_id belongs to another account"})
    );
    assert_eq!(account(a, "acct_bob")["balance"], 3);

    // A denied request leaves no record: its retry is evaluated afresh.
    assert_eq!(authorize(a, "demo-key-bob", 5, "retry-1").status, 402);
    let r = admin_post(a, "/admin/accounts/acct_bob/topup", &json!({"amount": 10}));
    assert_eq!(r.json()["balance"], 13);
    let r = authorize(a, "demo-key-bob", 5, "retry-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["balance"], 8);
    assert_eq!(account(a, "acct_bob")["charges"], 1);

    // Cost 0 is allowed and records nothing.
    let r = authorize(a, "demo-key-alice", 0, "free-1");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["balance"], 90);
    assert_eq!(account(a, "acct_alice")["charges"], 1);
    // ... even with a zero balance.
    assert_eq!(authorize(a, "demo-key-bob", 8, "drain").status, 200);
    assert_eq!(authorize(a, "demo-key-bob", 0, "free-2").status, 200);
}

#[test]
fn refunds() {
    let b = seeded(&[]);
    let a = b.addr();
    assert_eq!(
        authorize(a, "demo-key-alice", 7, "r-1").json()["balance"],
        93
    );

    // The recorded cost is credited back, not the claimed one.
    let r = refund(a, "demo-key-alice", 1000, "r-1", 503);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"refunded": true, "account_id": "acct_alice", "balance": 100})
    );
    assert_eq!(r.header("cache-control"), Some("no-store"));

    let r = refund(a, "demo-key-alice", 7, "r-1", 503);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json(),
        json!({"refunded": false, "reason": "already_refunded", "account_id": "acct_alice", "balance": 100})
    );

    let r = refund(a, "demo-key-alice", 7, "never-charged", 503);
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(r.json(), json!({"error": "unknown_request"}));

    assert_eq!(authorize(a, "demo-key-alice", 4, "r-2").status, 200);
    let r = refund(a, "demo-key-bob", 4, "r-2", 502);
    assert_eq!(r.status, 409, "{r:?}");
    let r = refund(a, "not-a-key", 4, "r-2", 502);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(account(a, "acct_alice")["balance"], 96);

    // A replayed authorize of a refunded request charges nothing.
    let r = authorize(a, "demo-key-alice", 7, "r-1");
    assert_eq!((r.status, r.json()["balance"].clone()), (200, json!(96)));

    for body in [
        json!({"request_id": "", "account": "demo-key-alice", "cost": 4, "status": 500}),
        json!({"account": "demo-key-alice", "cost": 4, "status": 500}),
        json!({"request_id": "r-2", "cost": 4, "status": 500}),
        json!({"request_id": "r-2", "account": "demo-key-alice", "cost": -4, "status": 500}),
        json!({"request_id": "r-2", "account": "demo-key-alice", "cost": 4, "status": 70000}),
    ] {
        let r = post_json(a, "/v1/refund", &[], &body);
        assert_eq!(r.status, 400, "{body}: {r:?}");
    }

    let acct = account(a, "acct_alice");
    assert_eq!(acct["balance"], 96);
    assert_eq!(acct["charged"], 4);
    assert_eq!(acct["refunded"], 7);
    assert_eq!(acct["charges"], 2);

    let r = admin_get(a, "/admin/accounts/acct_alice/charges");
    assert_eq!(r.status, 200);
    let list = r.json();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["request_id"], "r-1");
    assert_eq!(list[0]["cost"], 7);
    assert_eq!(list[0]["route"], "test-route");
    assert_eq!(list[0]["method"], "GET");
    assert_eq!(list[0]["path"], "/things?x=1");
    assert_eq!(list[0]["status"], "refunded");
    assert_eq!(list[0]["refund_status"], 503);
    assert!(list[0]["at"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(list[1]["request_id"], "r-2");
    assert_eq!(list[1]["status"], "charged");
    assert_eq!(list[1]["refund_status"], Value::Null);
}

#[test]
fn service_token_enforced() {
    let b = seeded(&["--service-token", "svc-secret"]);
    let a = b.addr();
    let body = json!({
        "account": "demo-key-alice", "cost": 1, "route": "r", "method": "GET",
        "path": "/", "request_id": "s-1",
    });
    for auth in [
        None,
        Some("Bearer nope"),
        Some("Basic svc-secret"),
        Some("svc-secret"),
        Some(&*admin_auth()),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|v| ("authorization", *v)).collect();
        let r = post_json(a, "/v1/authorize", &headers, &body);
        assert_eq!(r.status, 500, "{auth:?}: {r:?}");
        assert_eq!(r.json(), json!({"error": "service token rejected"}));
        let r = refund(a, "demo-key-alice", 1, "s-1", 500);
        assert_eq!(r.status, 500, "{r:?}");
    }
    let ok = [("authorization", "Bearer svc-secret")];
    let r = post_json(a, "/v1/authorize", &ok, &body);
    assert_eq!(r.status, 200, "{r:?}");
    let r = post_json(
        a,
        "/v1/refund",
        &ok,
        &json!({"request_id": "s-1", "account": "demo-key-alice", "cost": 1, "status": 500}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    // The service token is no admin token, and health needs none.
    let r = request(
        a,
        "GET",
        "/admin/stats",
        &[("authorization", "Bearer svc-secret")],
        None,
    );
    assert_eq!(r.status, 401);
    assert_eq!(request(a, "GET", "/healthz", &[], None).status, 200);
    assert_eq!(account(a, "acct_alice")["balance"], 100);
}

#[test]
fn admin_token_enforced() {
    let b = seeded(&[]);
    let a = b.addr();
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/admin/stats", None),
        ("POST", "/admin/stats/reset", None),
        ("GET", "/admin/accounts/acct_alice", None),
        ("GET", "/admin/accounts/acct_alice/charges", None),
        ("GET", "/admin/accounts/acct_alice/leases", None),
        (
            "POST",
            "/admin/accounts/acct_alice/topup",
            Some(r#"{"amount": 5}"#),
        ),
        ("POST", "/admin/accounts/acct_alice/disable", Some("{}")),
        ("POST", "/admin/accounts/acct_alice/enable", Some("{}")),
        (
            "POST",
            "/admin/accounts",
            Some(r#"{"account_id": "acct_z", "key": "kz", "balance": 1}"#),
        ),
    ];
    let wrong = format!("Bearer {ADMIN}x");
    for (method, path, body) in cases {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some(wrong.as_str()),
            Some(ADMIN),
        ] {
            let headers: Vec<(&str, &str)> = auth.iter().map(|v| ("authorization", *v)).collect();
            let r = request(a, method, path, &headers, *body);
            assert_eq!(r.status, 401, "{method} {path} {auth:?}: {r:?}");
            assert_eq!(r.json(), json!({"error": "admin token required"}));
        }
    }
    assert_eq!(account(a, "acct_alice")["balance"], 100);
    let r = request(
        a,
        "GET",
        "/admin/accounts/acct_z",
        &[("authorization", &admin_auth())],
        None,
    );
    assert_eq!(r.status, 404);
    // The right token, scheme in any case.
    let auth = format!("bearer {ADMIN}");
    let r = request(a, "GET", "/admin/stats", &[("authorization", &auth)], None);
    assert_eq!(r.status, 200);
}

#[test]
fn admin_accounts() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    let r = create_account(a, "acct_x", "secret-key-x", 100);
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["account_id"], "acct_x");
    assert_eq!(r.json()["balance"], 100);
    assert_eq!(create_account(a, "acct_x", "other-key", 1).status, 409);
    assert_eq!(create_account(a, "acct_y", "secret-key-x", 1).status, 409);
    for body in [
        json!({"account_id": "acct/slash", "key": "k1", "balance": 1}),
        json!({"account_id": "", "key": "k1", "balance": 1}),
        json!({"account_id": "unknown", "key": "k1", "balance": 1}),
        json!({"account_id": "acct_n", "key": "k1", "balance": -1}),
        json!({"account_id": "acct_n", "key": "", "balance": 1}),
        json!({"account_id": "acct_n", "balance": 1}),
        json!({"account_id": "acct_n", "key": "k1", "balance": "1"}),
    ] {
        let r = admin_post(a, "/admin/accounts", &body);
        assert_eq!(r.status, 400, "{body}: {r:?}");
    }
    // Balance and disabled are optional.
    let r = admin_post(
        a,
        "/admin/accounts",
        &json!({"account_id": "acct_min", "key": "k-min"}),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(r.json()["balance"], 0);

    let topup =
        |id: &str, body: Value| admin_post(a, &format!("/admin/accounts/{id}/topup"), &body);
    let r = topup("acct_x", json!({"amount": 50}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json(), json!({"account_id": "acct_x", "balance": 150}));
    let r = topup("acct_x", json!({"amount": 25, "topup_id": "t-1"}));
    assert_eq!(r.json()["balance"], 175);
    let r = topup("acct_x", json!({"amount": 25, "topup_id": "t-1"}));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["balance"], 175);
    assert_eq!(r.json()["replay"], true);
    assert_eq!(
        topup("acct_min", json!({"amount": 25, "topup_id": "t-1"})).status,
        409
    );
    assert_eq!(topup("acct_nope", json!({"amount": 1})).status, 404);
    for bad in [
        json!({"amount": 0}),
        json!({"amount": -5}),
        json!({}),
        json!({"amount": 9_223_372_036_854_775_808u64}),
        json!({"amount": 1, "topup_id": ""}),
    ] {
        assert_eq!(topup("acct_x", bad.clone()).status, 400, "{bad}");
    }
    // Would overflow i64.
    let r = topup("acct_x", json!({"amount": i64::MAX}));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(account(a, "acct_x")["balance"], 175);

    let r = admin_post(a, "/admin/accounts/acct_x/disable", &json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(authorize(a, "secret-key-x", 1, "adm-1").status, 403);
    assert_eq!(account(a, "acct_x")["disabled"], true);
    let r = admin_post(a, "/admin/accounts/acct_x/enable", &json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(authorize(a, "secret-key-x", 1, "adm-2").status, 200);
    assert_eq!(
        admin_post(a, "/admin/accounts/acct_nope/disable", &json!({})).status,
        404
    );
    assert_eq!(admin_get(a, "/admin/accounts/acct_nope").status, 404);
    assert_eq!(
        admin_get(a, "/admin/accounts/acct_nope/charges").status,
        404
    );

    let acct = account(a, "acct_x");
    assert_eq!(
        acct,
        json!({
            "account_id": "acct_x", "balance": 174, "disabled": false, "charged": 1,
            "refunded": 0, "charges": 1, "initial_balance": 100, "topups": 75,
            "reserved": 0, "leases": 0,
        })
    );

    // Only the key's hash is stored.
    let bytes = b.dir.stored_bytes();
    assert!(!bytes.is_empty());
    let needle = b"secret-key-x";
    assert!(!bytes.windows(needle.len()).any(|w| w == needle));
}

#[test]
fn ledger_invariant_holds_under_mixed_load() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    let accounts = ["acct_i0", "acct_i1", "acct_i2"];
    for (i, id) in accounts.iter().enumerate() {
        assert_eq!(create_account(a, id, &format!("key-i{i}"), 40).status, 201);
    }
    let handles: Vec<_> = (0..6u64)
        .map(|t| {
            std::thread::spawn(move || {
                let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64 ^ (t + 1));
                for n in 0..60 {
                    let who = (next() % 3) as usize;
                    let key = format!("key-i{who}");
                    let rid = format!("mix-{t}-{n}");
                    match next() % 10 {
                        0 => {
                            let r = admin_post(
                                a,
                                &format!("/admin/accounts/acct_i{who}/topup"),
                                &json!({"amount": next() % 7 + 1}),
                            );
                            assert_eq!(r.status, 200);
                        }
                        _ => {
                            let cost = next() % 6;
                            let r = authorize(a, &key, cost, &rid);
                            assert!(r.status == 200 || r.status == 402, "{r:?}");
                            if r.status == 200 && next().is_multiple_of(3) {
                                let r = refund(a, &key, cost, &rid, 503);
                                // Cost 0 records nothing, so its refund is unknown.
                                let want = if cost == 0 { 404 } else { 200 };
                                assert_eq!(r.status, want, "{r:?}");
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
    for id in accounts {
        let acct = account(a, id);
        let int = |k: &str| acct[k].as_i64().unwrap();
        assert!(int("balance") >= 0);
        assert_eq!(
            int("initial_balance") + int("topups"),
            int("balance") + int("charged"),
            "{acct}"
        );
        let charges = admin_get(a, &format!("/admin/accounts/{id}/charges")).json();
        let sum = |status: &str| -> i64 {
            charges
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| c["status"] == status)
                .map(|c| c["cost"].as_i64().unwrap())
                .sum()
        };
        assert_eq!(sum("charged"), int("charged"));
        assert_eq!(sum("refunded"), int("refunded"));
    }
}

#[test]
fn balances_survive_restart() {
    let dir = TempDir::new("restart");
    let p = Balance::start_on(&dir, &["--admin-token", ADMIN]);
    assert_eq!(create_account(p.addr, "acct_d", "key-d", 100).status, 201);
    assert_eq!(authorize(p.addr, "key-d", 30, "dur-1").status, 200);
    assert_eq!(authorize(p.addr, "key-d", 10, "dur-2").status, 200);
    assert_eq!(refund(p.addr, "key-d", 10, "dur-2", 502).status, 200);
    drop(p); // SIGKILL: no graceful close.

    let p = Balance::start_on(&dir, &["--admin-token", ADMIN]);
    let acct = account(p.addr, "acct_d");
    assert_eq!(acct["balance"], 70);
    assert_eq!(acct["charged"], 30);
    assert_eq!(acct["refunded"], 10);
    // The charge record survived too: the retry is recognised.
    let r = authorize(p.addr, "key-d", 30, "dur-1");
    assert_eq!((r.status, r.json()["balance"].clone()), (200, json!(70)));
    assert_eq!(authorize(p.addr, "key-d", 5, "dur-3").status, 200);
    assert!(p.terminate(), "SIGTERM should exit 0");

    let p = Balance::start_on(&dir, &["--admin-token", ADMIN, "--sync", "full"]);
    assert_eq!(account(p.addr, "acct_d")["balance"], 65);
    assert!(p.log_text().is_empty() || !p.log_text().contains("error"));
}

#[test]
fn seed_demo_is_idempotent_across_restarts() {
    let dir = TempDir::new("seed");
    let p = Balance::start_on(&dir, &["--admin-token", ADMIN, "--seed-demo"]);
    assert_eq!(
        authorize(p.addr, "demo-key-alice", 25, "seed-1").status,
        200
    );
    assert_eq!(
        admin_post(p.addr, "/admin/accounts/acct_carol/enable", &json!({})).status,
        200
    );
    assert!(p.terminate());
    let p = Balance::start_on(&dir, &["--admin-token", ADMIN, "--seed-demo"]);
    assert_eq!(account(p.addr, "acct_alice")["balance"], 75);
    assert_eq!(account(p.addr, "acct_carol")["disabled"], false);
    assert_eq!(account(p.addr, "acct_bob")["balance"], 3);
}

#[test]
fn stats_count_callouts() {
    let b = seeded(&[]);
    let a = b.addr();
    authorize(a, "demo-key-alice", 1, "st-1");
    authorize(a, "demo-key-alice", 1000, "st-2");
    authorize(a, "nope", 1, "st-3");
    post_json(a, "/v1/authorize", &[], &json!({"cost": 1}));
    refund(a, "demo-key-alice", 1, "st-1", 500);
    let s = admin_get(a, "/admin/stats").json();
    assert_eq!(
        s,
        json!({
            "authorize_calls": 4,
            "refund_calls": 1,
            "lease_calls": 0,
            "settle_calls": 0,
            "cancel_calls": 0,
            "lease_refund_calls": 0,
            "usage_calls": 0,
            "authorize_by_account": {"acct_alice": 2, "unknown": 2},
        })
    );
    let r = admin_post(a, "/admin/stats/reset", &json!({}));
    assert_eq!(r.status, 200);
    assert_eq!(
        admin_get(a, "/admin/stats").json(),
        json!({
            "authorize_calls": 0, "refund_calls": 0, "lease_calls": 0, "settle_calls": 0,
            "cancel_calls": 0, "lease_refund_calls": 0, "usage_calls": 0,
            "authorize_by_account": {},
        })
    );
}

#[test]
fn access_log_names_accounts_never_credentials() {
    let b = seeded(&["--service-token", "svc-secret"]);
    let a = b.addr();
    let ok = [("authorization", "Bearer svc-secret")];
    let body = |key: &str, rid: &str| json!({"account": key, "cost": 1, "route": "r", "method": "GET", "path": "/", "request_id": rid});
    assert_eq!(
        post_json(a, "/v1/authorize", &ok, &body("demo-key-alice", "log-1")).status,
        200
    );
    assert_eq!(
        post_json(
            a,
            "/v1/authorize",
            &ok,
            &body("secret-unknown-key", "log-2")
        )
        .status,
        401
    );
    assert_eq!(
        post_json(a, "/v1/authorize", &[], &body("demo-key-bob", "log-3")).status,
        500
    );
    // Let the log lines land.
    let mut log = String::new();
    for _ in 0..50 {
        log = b.proc.log_text();
        if log.matches("/v1/authorize").count() >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(log.matches("/v1/authorize").count(), 3, "{log}");
    assert!(log.contains("account=acct_alice"), "{log}");
    assert!(log.contains("account=unknown"), "{log}");
    for secret in ["demo-key", "secret-unknown-key", "svc-secret", ADMIN] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
    }
}

#[test]
fn flags() {
    let bin = env!("CARGO_BIN_EXE_farebox-balance");
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    for flag in [
        "--service-token",
        "--lease-ttl-ms",
        "--lease-max-units",
        "--lease-expiry-policy",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    let out = Command::new(bin).arg("--no-such-flag").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(bin)
        .args(["--sync", "maybe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    for bad in [
        ["--lease-expiry-policy", "maybe"],
        ["--lease-ttl-ms", "0"],
        ["--lease-max-units", "-1"],
    ] {
        let out = Command::new(bin).args(bad).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }

    // Environment fallback.
    let dir = TempDir::new("env");
    let db = dir.path("env.sqlite");
    let mut child = Command::new(bin)
        .env("FAREBOX_BALANCE_LISTEN", "127.0.0.1:0")
        .env("FAREBOX_BALANCE_DB", &db)
        .env("FAREBOX_BALANCE_ADMIN_TOKEN", ADMIN)
        .env("FAREBOX_BALANCE_SEED_DEMO", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let child = Kill(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("farebox-balance listening on ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(account(addr, "acct_alice")["balance"], 100);
    drop(child);
}

#[test]
fn a_ledger_from_before_schema_versions_is_migrated() {
    let dir = TempDir::new("unversioned");
    let path = dir.path("old.sqlite");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(include_str!("fixtures/ledger-unversioned.sql"))
            .unwrap();
    }
    let db = path.to_str().unwrap();
    let p = Proc::spawn(
        env!("CARGO_BIN_EXE_farebox-balance"),
        "farebox-balance",
        &[
            "--listen",
            "127.0.0.1:0",
            "--db",
            db,
            "--admin-token",
            ADMIN,
        ],
        &dir.path("old.log"),
    );
    let acct = check_ledger(p.addr, "acct_old");
    assert_eq!(
        (
            acct["balance"].clone(),
            acct["charged"].clone(),
            acct["leases"].clone()
        ),
        (json!(78), json!(22), json!(1))
    );
    // Replays, usage (its table is new) and fleet-lease calls all work.
    assert_eq!(
        authorize(p.addr, "key-old", 20, "old-1").json()["replay"],
        true
    );
    let r = post_json(
        p.addr,
        "/v1/usage",
        &[],
        &json!({"request_id": "old-1", "account": "key-old", "actual": 15}),
    );
    assert_eq!(
        (r.status, r.json()["balance"].clone()),
        (200, json!(83)),
        "{r:?}"
    );
    let r = lease_refund(p.addr, "ls_old", "rf-old", 2, 503);
    assert_eq!(r.status, 200, "{r:?}");
    check_ledger(p.addr, "acct_old");
    drop(p);
    // The file is now at the current version: `migrate` has nothing to do.
    let out = Command::new(env!("CARGO_BIN_EXE_farebox-balance"))
        .args(["migrate", "--db", db])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let latest = farebox_balance::store::migrations::LATEST;
    assert!(
        text.contains(&format!("schema version {latest} (was {latest})")),
        "{text}"
    );
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = TempDir::new("newer");
    let url = dir.database_url();
    let bin = env!("CARGO_BIN_EXE_farebox-balance");
    let out = Command::new(bin)
        .args(["migrate", "--database-url", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Pretend a later release migrated it.
    match &dir.1 {
        Some(pg) => {
            let mut c = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
            c.batch_execute("INSERT INTO farebox_migrations VALUES (99, '0099_future.sql', 0)")
                .unwrap();
        }
        None => {
            let c = rusqlite::Connection::open(dir.path("ledger.sqlite")).unwrap();
            c.execute_batch("INSERT INTO farebox_migrations VALUES (99, '0099_future.sql', 0)")
                .unwrap();
        }
    }
    for args in [
        vec!["--listen", "127.0.0.1:0", "--database-url", &url],
        vec!["migrate", "--database-url", &url],
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("schema version 99")
                && err.contains(&format!(
                    "version {}",
                    farebox_balance::store::migrations::LATEST
                )),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "never listening: {out:?}");
    }
}

#[test]
fn a_database_password_is_never_printed() {
    // Port 1 on loopback refuses at once: every call fails and names the URL.
    let bin = env!("CARGO_BIN_EXE_farebox-balance");
    for url in [
        "postgres://farebox@127.0.0.1:1/ledger?password=hunter2",
        "postgres://farebox:hunter1@127.0.0.1:1/ledger?sslmode=disable&password=hunter2",
        "postgresql://farebox:hunter2@127.0.0.1:1/ledger",
    ] {
        for args in [
            vec!["migrate", "--database-url", url],
            vec!["--listen", "127.0.0.1:0", "--database-url", url],
        ] {
            let out = Command::new(bin).args(&args).output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("127.0.0.1:1"), "{text}");
            assert!(!text.contains("hunter"), "{text}");
        }
    }
}

/// A call whose database connection the server ends mid-transaction (a
/// restart, a failover, `pg_terminate_backend`: SQLSTATE 57P01) was rolled
/// back, so it is run again on a fresh connection: it charges once and
/// answers 200, not 500. On SQLite the call just waits for the lock.
#[test]
fn a_call_whose_connection_the_server_ends_is_run_again() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_cut", "key-cut", 10).status, 201);
    // Hold the account's row (SQLite: the write lock) so the authorize waits.
    let holder = match &b.dir.1 {
        Some(pg) => {
            let mut c = postgres::Client::connect(&pg.url, postgres::NoTls).unwrap();
            c.batch_execute(
                "BEGIN; SELECT 1 FROM accounts WHERE account_id = 'acct_cut' FOR UPDATE",
            )
            .unwrap();
            Ok(c)
        }
        None => {
            let c = rusqlite::Connection::open(b.dir.path("ledger.sqlite")).unwrap();
            c.execute_batch("BEGIN IMMEDIATE").unwrap();
            Err(c)
        }
    };
    let call = std::thread::spawn(move || authorize(a, "key-cut", 4, "cut-1"));
    match holder {
        Ok(mut c) => {
            // Wait (bounded) until the service's backend waits on our lock, then end it.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let pid: i32 = loop {
                let rows = c
                    .query(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = 'farebox-balance'
                         AND wait_event_type = 'Lock' AND datname = current_database()",
                        &[],
                    )
                    .unwrap();
                if let Some(r) = rows.first() {
                    break r.get(0);
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "the call never waited"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let ended: bool = c
                .query_one("SELECT pg_terminate_backend($1)", &[&pid])
                .unwrap()
                .get(0);
            assert!(ended);
            c.batch_execute("COMMIT").unwrap();
        }
        Err(c) => c.execute_batch("COMMIT").unwrap(),
    }
    let r = call.join().unwrap();
    assert_eq!(
        (r.status, r.json()["balance"].clone()),
        (200, json!(6)),
        "{r:?}"
    );
    let acct = account(a, "acct_cut");
    assert_eq!(
        (acct["balance"].clone(), acct["charges"].clone()),
        (json!(6), json!(1))
    );
}
