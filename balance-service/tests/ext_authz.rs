//! The `/ext_authz/*` endpoint (Envoy's HTTP ext_authz protocol) over real HTTP:
//! it debits the same ledger, in the same transaction, as `/v1/authorize`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;

fn check(addr: std::net::SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    // Envoy sends the client's method and headers, with an empty body.
    let mut h = vec![("content-length", "0")];
    h.extend_from_slice(headers);
    request(addr, method, path, &h, None)
}

#[test]
fn ext_authz_debits_the_ledger() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_x", "key-x", 3).status, 201);

    // Allowed: 200 with the account for the upstream, debited by 1, no caching.
    let r = check(
        a,
        "GET",
        "/ext_authz/v1/data?q=1",
        &[("x-api-key", "key-x"), ("x-request-id", "rid-1")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-farebox-account"), Some("acct_x"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(account(a, "acct_x")["balance"], 2);

    // The charge is recorded like one from /v1/authorize: path without the prefix.
    let charges = admin_get(a, "/admin/accounts/acct_x/charges").json();
    let c = &charges[0];
    assert_eq!(c["request_id"], "rid-1");
    assert_eq!(c["method"], "GET");
    assert_eq!(c["path"], "/v1/data?q=1");
    assert_eq!(c["route"], "ext_authz");
    assert_eq!(c["cost"], 1);

    // Idempotent by x-request-id: a retried check debits nothing again, and
    // /v1/authorize sees the same charge.
    let r = check(
        a,
        "POST",
        "/ext_authz/v1/data",
        &[("x-api-key", "key-x"), ("x-request-id", "rid-1")],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(account(a, "acct_x")["balance"], 2);
    let r = authorize(a, "key-x", 1, "rid-1");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["replay"], true);

    // Cost and route from the headers Envoy's configuration adds.
    let r = check(
        a,
        "POST",
        "/ext_authz/v1/models/m/infer",
        &[
            ("x-api-key", "key-x"),
            ("x-request-id", "rid-2"),
            ("x-farebox-cost", "2"),
            ("x-farebox-route", "infer"),
        ],
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(account(a, "acct_x")["balance"], 0);
    let charges = admin_get(a, "/admin/accounts/acct_x/charges").json();
    assert_eq!(charges[1]["route"], "infer");
    assert_eq!(charges[1]["method"], "POST");
    assert_eq!(charges[1]["cost"], 2);

    // Broke: a 402 problem for the client, nothing written.
    let r = check(
        a,
        "GET",
        "/ext_authz/v1/data",
        &[("x-api-key", "key-x"), ("x-request-id", "rid-3")],
    );
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["status"], 402);
    assert_eq!(p["balance"], 0);
    assert_eq!(p["price"], 1);
    assert_eq!(p["type"], "https://farebox.dev/problems/payment-required");
    assert!(r.header("x-farebox-account").is_none());
    assert_eq!(account(a, "acct_x")["charges"], 2);

    // The same transaction as /v1/authorize: ledger invariant holds.
    let acct = account(a, "acct_x");
    assert_eq!(
        acct["initial_balance"].as_i64().unwrap() + acct["topups"].as_i64().unwrap(),
        acct["balance"].as_i64().unwrap() + acct["charged"].as_i64().unwrap()
    );
}

#[test]
fn ext_authz_rejections() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_y", "key-y", 10).status, 201);
    let r = admin_post(a, "/admin/accounts/acct_y/disable", &json!({}));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(create_account(a, "acct_z", "key-z", 10).status, 201);

    let rid = ("x-request-id", "rid-r");
    // No credential, malformed, unknown: 401 with a challenge.
    for headers in [
        vec![rid],
        vec![rid, ("x-api-key", "has,comma")],
        vec![rid, ("x-api-key", "key-a"), ("x-api-key", "key-b")],
        vec![rid, ("x-api-key", "no-such-key")],
    ] {
        let r = check(a, "GET", "/ext_authz/x", &headers);
        assert_eq!(r.status, 401, "{headers:?}: {r:?}");
        assert!(r.header("www-authenticate").is_some());
        assert_eq!(r.json()["status"], 401);
    }
    // Disabled: 403.
    let r = check(a, "GET", "/ext_authz/x", &[rid, ("x-api-key", "key-y")]);
    assert_eq!(r.status, 403, "{r:?}");
    // No request id, bad cost: configuration errors, 400.
    let r = check(a, "GET", "/ext_authz/x", &[("x-api-key", "key-z")]);
    assert_eq!(r.status, 400, "{r:?}");
    for cost in ["-1", "x", "1.5", "99999999999999999999"] {
        let r = check(
            a,
            "GET",
            "/ext_authz/x",
            &[rid, ("x-api-key", "key-z"), ("x-farebox-cost", cost)],
        );
        assert_eq!(r.status, 400, "{cost}: {r:?}");
    }
    // A request id charged to acct_z cannot be reused by another account.
    let r = check(a, "GET", "/ext_authz/x", &[rid, ("x-api-key", "key-z")]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(create_account(a, "acct_w", "key-w", 10).status, 201);
    let r = check(a, "GET", "/ext_authz/x", &[rid, ("x-api-key", "key-w")]);
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(account(a, "acct_z")["balance"], 9);
    assert_eq!(account(a, "acct_w")["balance"], 10);
    // Any method, and the bare prefix.
    for (method, path) in [
        ("PUT", "/ext_authz"),
        ("DELETE", "/ext_authz/"),
        ("HEAD", "/ext_authz/h"),
    ] {
        let id = format!("rid-{method}");
        let r = check(
            a,
            method,
            path,
            &[("x-request-id", &id), ("x-api-key", "key-z")],
        );
        assert_eq!(r.status, 200, "{method} {path}: {r:?}");
    }
    assert_eq!(account(a, "acct_z")["balance"], 6);
}

#[test]
fn ext_authz_requires_the_service_token_when_configured() {
    let b = Balance::start(&["--admin-token", ADMIN, "--service-token", "svc-secret"]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_t", "key-t", 10).status, 201);
    let base = [("x-api-key", "key-t"), ("x-request-id", "rid-t")];
    let r = check(a, "GET", "/ext_authz/x", &base);
    assert_eq!(r.status, 500, "{r:?}");
    let mut h = base.to_vec();
    h.push(("authorization", "Bearer wrong"));
    assert_eq!(check(a, "GET", "/ext_authz/x", &h).status, 500);
    let mut h = base.to_vec();
    h.push(("authorization", "Bearer svc-secret"));
    let r = check(a, "GET", "/ext_authz/x", &h);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(account(a, "acct_t")["balance"], 9);
}

#[test]
fn ext_authz_enforces_the_budget_with_a_problem_naming_the_reset() {
    let b = Balance::start(&["--admin-token", ADMIN]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_eb", "key-eb", 50).status, 201);
    let auth = admin_auth();
    let r = request(
        a,
        "PUT",
        "/admin/accounts/acct_eb/budget",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        Some(&json!({"limit": 1, "period": "week", "time_zone": "UTC"}).to_string()),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let h = |rid: &'static str| [("x-api-key", "key-eb"), ("x-request-id", rid)];
    assert_eq!(check(a, "GET", "/ext_authz/v1/a", &h("eb-1")).status, 200);
    let r = check(a, "GET", "/ext_authz/v1/a", &h("eb-2"));
    assert_eq!(r.status, 402, "{r:?}");
    let p = r.json();
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("budget of 1 units per week (UTC)"), "{p}");
    assert_eq!(p["budget"]["remaining"], 0, "{p}");
    assert_eq!(
        p["budget"]["resets_at"]
            .as_str()
            .map(|s| detail.ends_with(s)),
        Some(true)
    );
    assert_eq!(account(a, "acct_eb")["balance"], 49);
}
