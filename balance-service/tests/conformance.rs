//! Ledger conformance across service replicas: two farebox-balance processes
//! share one ledger (the same SQLite file, or the same PostgreSQL database
//! under `FAREBOX_TEST_BACKEND=postgres`) and receive the same calls at the
//! same time, as behind a load balancer that retries on the other replica.
//! Each request id must be charged once, each lease request id reserved
//! once, each top-up id credited once, and the ledger must balance.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};

/// Two replicas on one ledger (the first seeds the demo accounts).
fn replicas(dir: &TempDir, extra: &[&str]) -> (Proc, Proc) {
    let mut args = vec!["--admin-token", ADMIN];
    args.extend_from_slice(extra);
    let a = Balance::start_on(dir, &args);
    let b = Balance::start_on(dir, &args);
    (a, b)
}

/// Runs `f(thread, replica)` on `threads` threads released together, each
/// thread alternating between the two replicas.
fn together<T: Send + 'static>(
    addrs: [SocketAddr; 2],
    threads: usize,
    f: impl Fn(usize, SocketAddr) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (f, barrier) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(t, addrs[t % 2])
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn the_same_authorize_on_both_replicas_charges_once() {
    let dir = TempDir::new("conf-authz");
    let (a, b) = replicas(&dir, &[]);
    assert_eq!(create_account(a.addr, "acct_c", "key-c", 500).status, 201);
    // 40 request ids, each sent 4 times at once (2 per replica).
    for round in 0..40 {
        let rid = format!("same-{round}");
        let answers = together([a.addr, b.addr], 4, move |_, addr| {
            let r = authorize(addr, "key-c", 7, &rid);
            (r.status, r.json())
        });
        for (status, body) in &answers {
            assert_eq!(*status, 200, "{body}");
        }
        let fresh = answers.iter().filter(|(_, j)| j["replay"] != true).count();
        assert_eq!(fresh, 1, "one charge per request id: {answers:?}");
    }
    let acct = check_ledger(b.addr, "acct_c");
    assert_eq!(acct["charges"], 40);
    assert_eq!(acct["charged"], 280);
    assert_eq!(acct["balance"], 220);
    // Refunds race too: exactly one credits back.
    let answers = together([a.addr, b.addr], 4, |_, addr| {
        refund(addr, "key-c", 7, "same-0", 503).json()
    });
    assert_eq!(
        answers.iter().filter(|j| j["refunded"] == true).count(),
        1,
        "{answers:?}"
    );
    assert_eq!(check_ledger(a.addr, "acct_c")["balance"], 227);
}

#[test]
fn concurrent_authorizes_on_two_replicas_never_overdraw() {
    let dir = TempDir::new("conf-overdraw");
    let (a, b) = replicas(&dir, &[]);
    assert_eq!(create_account(a.addr, "acct_o", "key-o", 100).status, 201);
    // 8 threads x 30 distinct requests of cost 1 on a 100-unit account.
    let served: usize = together([a.addr, b.addr], 8, |t, addr| {
        let mut ok = 0;
        for n in 0..30 {
            let r = authorize(addr, "key-o", 1, &format!("od-{t}-{n}"));
            assert!(r.status == 200 || r.status == 402, "{r:?}");
            ok += usize::from(r.status == 200);
        }
        ok
    })
    .into_iter()
    .sum();
    assert_eq!(served, 100, "exactly the balance is served");
    let acct = check_ledger(a.addr, "acct_o");
    assert_eq!(
        (acct["balance"].clone(), acct["charged"].clone()),
        (json!(0), json!(100))
    );
}

#[test]
fn leases_and_topups_race_across_replicas() {
    let dir = TempDir::new("conf-lease");
    let (a, b) = replicas(&dir, &[]);
    assert_eq!(create_account(a.addr, "acct_l", "key-l", 90).status, 201);
    // The same lease request on both replicas: one reservation.
    let answers = together([a.addr, b.addr], 4, |_, addr| {
        let r = lease(addr, "key-l", 30, 5, "lease-same");
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    });
    let ids: std::collections::HashSet<_> = answers.iter().map(|j| j["lease_id"].clone()).collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(check_ledger(a.addr, "acct_l")["reserved"], 30);
    // Distinct lease requests from many holders never reserve more than
    // the balance.
    let granted: i64 = together([a.addr, b.addr], 6, |t, addr| {
        let r = lease_as(
            addr,
            "key-l",
            40,
            1,
            &format!("lease-{t}"),
            &format!("gw-{t}"),
        );
        match r.status {
            200 => r.json()["granted"].as_i64().unwrap(),
            402 => 0,
            other => panic!("{other}: {r:?}"),
        }
    })
    .into_iter()
    .sum();
    assert!(granted <= 60, "{granted}");
    let acct = check_ledger(a.addr, "acct_l");
    assert_eq!(acct["reserved"].as_i64().unwrap(), 30 + granted);
    // The same top-up id on both replicas: credited once.
    let answers = together([a.addr, b.addr], 4, |_, addr| {
        let r = admin_post(
            addr,
            "/admin/accounts/acct_l/topup",
            &json!({"amount": 10, "topup_id": "tp-same"}),
        );
        assert_eq!(r.status, 200, "{r:?}");
        r.json()
    });
    assert_eq!(
        answers.iter().filter(|j| j["replay"] != true).count(),
        1,
        "{answers:?}"
    );
    let acct = check_ledger(b.addr, "acct_l");
    assert_eq!(acct["topups"], 10);
    // Settle and cancel everything; the ledger still balances.
    let lid = answers_lease_id(&ids);
    assert_eq!(settle(a.addr, &lid, 12, true).status, 200);
    for t in 0..6 {
        let r = cancel(b.addr, &format!("lease-{t}"));
        assert!(r.status == 200 || r.status == 404, "{r:?}");
    }
    let acct = check_ledger(a.addr, "acct_l");
    assert_eq!(
        (
            acct["reserved"].clone(),
            acct["charged"].clone(),
            acct["balance"].clone()
        ),
        (json!(0), json!(12), json!(88))
    );
}

fn answers_lease_id(ids: &std::collections::HashSet<serde_json::Value>) -> String {
    ids.iter()
        .next()
        .and_then(|v| v.as_str())
        .expect("a lease id")
        .to_owned()
}

#[test]
fn usage_races_across_replicas_settle_once() {
    let dir = TempDir::new("conf-usage");
    let (a, b) = replicas(&dir, &[]);
    assert_eq!(create_account(a.addr, "acct_u", "key-u", 100).status, 201);
    assert_eq!(authorize(a.addr, "key-u", 10, "u-1").status, 200);
    let body = |rid: &str| json!({"request_id": rid, "account": "key-u", "actual": 4});
    // The adjustment of an authorize charge, and an overage without one.
    for rid in ["u-1", "u-over"] {
        let answers = together([a.addr, b.addr], 4, move |_, addr| {
            let r = post_json(addr, "/v1/usage", &[], &body(rid));
            assert_eq!(r.status, 200, "{r:?}");
            r.json()
        });
        assert_eq!(
            answers.iter().filter(|j| j["replay"] != true).count(),
            1,
            "{answers:?}"
        );
    }
    let acct = check_ledger(b.addr, "acct_u");
    assert_eq!(
        (acct["balance"].clone(), acct["charged"].clone()),
        (json!(92), json!(8))
    );
}
