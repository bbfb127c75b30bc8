//! Budgets (spend limits per period), webhook events and the usage export,
//! over real HTTP, on the backend of `FAREBOX_TEST_BACKEND` (SQLite or
//! PostgreSQL; `make test-postgres`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

fn admin(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Resp {
    let auth = admin_auth();
    let text = body.map(Value::to_string);
    request(
        addr,
        method,
        path,
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        text.as_deref(),
    )
}

fn set_budget(addr: SocketAddr, id: &str, limit: u64, period: &str, tz: &str) -> Resp {
    admin(
        addr,
        "PUT",
        &format!("/admin/accounts/{id}/budget"),
        Some(&json!({"limit": limit, "period": period, "time_zone": tz})),
    )
}

fn budget_of(addr: SocketAddr, id: &str) -> Value {
    let r = admin(addr, "GET", &format!("/admin/accounts/{id}/budget"), None);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["budget"].clone()
}

/// The start of the next month in `tz`, as the service should name it.
fn next_month(tz: &str) -> String {
    let now = jiff::Timestamp::now().in_tz(tz).unwrap();
    let first = now
        .date()
        .first_of_month()
        .checked_add(jiff::Span::new().months(1))
        .unwrap();
    let z = first
        .to_zoned(jiff::tz::TimeZone::get(tz).unwrap())
        .unwrap();
    z.timestamp().display_with_offset(z.offset()).to_string()
}

#[test]
fn a_budget_limits_authorizes_and_names_its_reset() {
    let b = seeded(&[]);
    let a = b.addr();
    // Without a budget the answer has none.
    let r = authorize(a, "demo-key-alice", 1, "nb-1");
    assert_eq!((r.status, r.json().get("budget")), (200, None), "{r:?}");

    let r = set_budget(a, "acct_alice", 10, "month", "Europe/Berlin");
    assert_eq!(r.status, 200, "{r:?}");
    let reset = next_month("Europe/Berlin");
    assert_eq!(r.json()["budget"]["resets_at"], reset.as_str());
    assert_eq!(
        (
            r.json()["budget"]["limit"].clone(),
            r.json()["budget"]["remaining"].clone()
        ),
        (json!(10), json!(10)),
        "a budget counts from when it is set"
    );

    let r = authorize(a, "demo-key-alice", 4, "b-1");
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["balance"].clone(), j["budget"]["remaining"].clone()),
        (json!(95), json!(6))
    );
    assert_eq!(j["budget"]["period"], "month");
    assert_eq!(j["budget"]["time_zone"], "Europe/Berlin");
    // A replay debits nothing and shows the budget as it is.
    let r = authorize(a, "demo-key-alice", 4, "b-1");
    assert_eq!(
        (
            r.json()["replay"].clone(),
            r.json()["budget"]["remaining"].clone()
        ),
        (json!(true), json!(6))
    );

    // Over the budget (not the balance): 402 naming the limit and the reset.
    let r = authorize(a, "demo-key-alice", 7, "b-2");
    assert_eq!(r.status, 402, "{r:?}");
    let j = r.json();
    let detail = j["detail"].as_str().unwrap();
    assert!(
        detail.contains("budget of 10 units per month (Europe/Berlin)"),
        "{detail}"
    );
    assert!(detail.contains(&format!("resets at {reset}")), "{detail}");
    assert_eq!(
        (j["reason"].clone(), j["price"].clone()),
        (json!("budget"), json!(7))
    );
    assert_eq!(j["budget"]["remaining"], 6);
    assert_eq!(account(a, "acct_alice")["balance"], 95, "nothing debited");
    // Cost 0 passes, the rest of the budget can be spent exactly.
    assert_eq!(authorize(a, "demo-key-alice", 0, "b-3").status, 200);
    let r = authorize(a, "demo-key-alice", 6, "b-4");
    assert_eq!(
        (r.status, r.json()["budget"]["remaining"].clone()),
        (200, json!(0))
    );
    assert_eq!(authorize(a, "demo-key-alice", 1, "b-5").status, 402);

    // A refund gives the budget back in the period it was charged.
    assert_eq!(refund(a, "demo-key-alice", 4, "b-1", 503).status, 200);
    assert_eq!(budget_of(a, "acct_alice")["remaining"], 4);
    assert_eq!(budget_of(a, "acct_alice")["spent"], 6);

    // Raising the limit keeps the period's spend.
    let r = set_budget(a, "acct_alice", 20, "month", "Europe/Berlin");
    assert_eq!(r.json()["budget"]["remaining"], 14);

    // Clearing: answered with the budget as it was, then none.
    let r = admin(a, "DELETE", "/admin/accounts/acct_alice/budget", None);
    assert_eq!(
        (r.status, r.json()["cleared"].clone()),
        (200, json!(true)),
        "{r:?}"
    );
    let r = admin(a, "GET", "/admin/accounts/acct_alice/budget", None);
    assert_eq!((r.status, r.json()), (404, json!({"error": "no_budget"})));
    let r = admin(a, "DELETE", "/admin/accounts/acct_alice/budget", None);
    assert_eq!(r.status, 404);
    let r = authorize(a, "demo-key-alice", 30, "b-6");
    assert_eq!((r.status, r.json().get("budget")), (200, None));
    check_ledger(a, "acct_alice");
}

#[test]
fn the_budget_admin_api_refuses_bad_input() {
    let b = seeded(&[]);
    let a = b.addr();
    for (body, needle) in [
        (
            json!({"limit": 5, "period": "year", "time_zone": "UTC"}),
            "period must be day, week or month",
        ),
        (
            json!({"limit": 5, "period": "day", "time_zone": "Mars/Olympus"}),
            "IANA time zone",
        ),
        (
            json!({"limit": -1, "period": "day", "time_zone": "UTC"}),
            "invalid body",
        ),
        (json!({"limit": 5, "period": "day"}), "invalid body"),
    ] {
        let r = admin(a, "PUT", "/admin/accounts/acct_alice/budget", Some(&body));
        assert_eq!(r.status, 400, "{body} {r:?}");
        assert!(
            r.json()["error"].as_str().unwrap().contains(needle),
            "{r:?}"
        );
    }
    let r = set_budget(a, "acct_nope", 5, "day", "UTC");
    assert_eq!(
        (r.status, r.json()),
        (404, json!({"error": "unknown_account"}))
    );
    let r = admin(a, "GET", "/admin/accounts/acct_bob/budget", None);
    assert_eq!((r.status, r.json()), (404, json!({"error": "no_budget"})));
    // The service token of the admin API, as for every admin endpoint.
    let r = request(a, "GET", "/admin/accounts/acct_alice/budget", &[], None);
    assert_eq!(r.status, 401);
    let r = request(
        a,
        "GET",
        "/admin/charges",
        &[("authorization", "Bearer wrong")],
        None,
    );
    assert_eq!(r.status, 401);
}

#[test]
fn leases_reserve_budget_and_closing_gives_the_unused_part_back() {
    let b = seeded(&[]);
    let a = b.addr();
    assert_eq!(set_budget(a, "acct_alice", 20, "day", "UTC").status, 200);
    // The grant is capped by the budget, and reserves it.
    let r = lease(a, "demo-key-alice", 30, 5, "l-1");
    assert_eq!(r.status, 200, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["granted"].clone(), j["budget"]["remaining"].clone()),
        (json!(20), json!(0))
    );
    let id = j["lease_id"].as_str().unwrap().to_owned();
    // Nothing left for authorize.
    let r = authorize(a, "demo-key-alice", 1, "l-a");
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (402, json!("budget")),
        "{r:?}"
    );
    // Settling below the grant gives the rest back.
    let r = settle(a, &id, 8, true);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(budget_of(a, "acct_alice")["remaining"], 12);
    // A lease whose minimum the budget cannot cover (the balance can).
    let r = lease(a, "demo-key-alice", 13, 13, "l-2");
    assert_eq!(
        (r.status, r.json()["reason"].clone()),
        (402, json!("budget")),
        "{r:?}"
    );
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("the minimum lease of 13 units"));
    // A refund on the closed lease gives its units back too.
    assert_eq!(lease_refund(a, &id, "l-rf", 3, 503).status, 200);
    assert_eq!(budget_of(a, "acct_alice")["remaining"], 15);
    // A cancelled lease gives its whole grant back.
    let r = lease(a, "demo-key-alice", 5, 5, "l-3");
    assert_eq!(
        (r.status, r.json()["budget"]["remaining"].clone()),
        (200, json!(10))
    );
    assert_eq!(cancel(a, "l-3").status, 200);
    assert_eq!(budget_of(a, "acct_alice")["remaining"], 15);
    // Budget below `min` while an unspent lease is open: it is recalled
    // (its units come back when it settles).
    let r = lease(a, "demo-key-alice", 15, 15, "l-4");
    assert_eq!(r.status, 200, "{r:?}");
    let r = lease(a, "demo-key-alice", 2, 2, "l-5");
    assert_eq!(
        (r.status, r.json()["recall"].clone()),
        (402, json!(true)),
        "{r:?}"
    );
    check_ledger(a, "acct_alice");
}

#[test]
fn usage_moves_the_budget_with_the_cost() {
    let b = seeded(&[]);
    let a = b.addr();
    assert_eq!(
        set_budget(a, "acct_alice", 50, "week", "America/New_York").status,
        200
    );
    assert_eq!(authorize(a, "demo-key-alice", 10, "u-1").status, 200);
    let usage = |rid: &str, actual: u64| {
        post_json(
            a,
            "/v1/usage",
            &[],
            &json!({"request_id": rid, "account": "demo-key-alice", "actual": actual}),
        )
    };
    assert_eq!(usage("u-1", 4).status, 200);
    assert_eq!(budget_of(a, "acct_alice")["spent"], 4);
    assert_eq!(authorize(a, "demo-key-alice", 10, "u-2").status, 200);
    // Usage beyond the estimate is owed: it counts, even past the limit.
    assert_eq!(usage("u-2", 60).status, 200);
    let bud = budget_of(a, "acct_alice");
    assert_eq!(
        (bud["spent"].clone(), bud["remaining"].clone()),
        (json!(64), json!(0))
    );
    assert_eq!(authorize(a, "demo-key-alice", 1, "u-3").status, 402);
}

/// Many concurrent authorizes against a budget below the balance: exactly
/// the budget is spent (on PostgreSQL, calls run on parallel connections).
///
/// On PostgreSQL the calls on one account queue on its row lock, 16 pool
/// connections at a time, and a call that waits longer than the pool's 2 s
/// for a connection is answered 503 without touching the ledger (fail fast,
/// well within the filter's timeout). On a loaded machine 80 calls at once
/// get there. A 503 is retried with the same request id, as a client would
/// after the filter's 503: the sum must still be exactly the budget.
#[test]
fn concurrent_authorizes_spend_exactly_the_budget() {
    let b = Balance::start(&["--admin-token", ADMIN, "--quiet"]);
    let a = b.addr();
    assert_eq!(create_account(a, "acct_cb", "key-cb", 1000).status, 201);
    assert_eq!(
        set_budget(a, "acct_cb", 37, "day", "Asia/Tokyo").status,
        200
    );
    const CALLS: usize = 80;
    let barrier = Arc::new(Barrier::new(CALLS));
    let handles: Vec<_> = (0..CALLS)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                let rid = format!("cb-{i}");
                let mut unavailable = 0;
                loop {
                    let r = authorize(a, "key-cb", 1, &rid);
                    if r.status != 503 || unavailable == 10 {
                        return (r.status, unavailable);
                    }
                    assert_eq!(r.json(), json!({"error": "storage unavailable"}));
                    unavailable += 1;
                }
            })
        })
        .collect();
    let answers: Vec<(u16, usize)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let allowed = answers.iter().filter(|(s, _)| *s == 200).count();
    let denied = answers.iter().filter(|(s, _)| *s == 402).count();
    let retried: usize = answers.iter().map(|(_, n)| n).sum();
    eprintln!(
        "concurrent budget: {CALLS} authorizes, {allowed} allowed, {denied} denied \
         ({retried} answers 503 on a busy pool, retried with the same request id)"
    );
    assert_eq!((allowed, denied), (37, CALLS - 37), "{answers:?}");
    let acct = account(a, "acct_cb");
    assert_eq!(
        (acct["balance"].clone(), acct["charges"].clone()),
        (json!(963), json!(37))
    );
    let bud = budget_of(a, "acct_cb");
    assert_eq!(
        (bud["spent"].clone(), bud["remaining"].clone()),
        (json!(37), json!(0))
    );
}

// ------------------------------------------------------------ webhooks

/// One POST the receiver saw.
#[derive(Clone, Debug)]
struct Delivery {
    event_id: String,
    signature: String,
    raw: Vec<u8>,
    signature_ok: bool,
    body: Value,
    answered: u16,
    /// When it arrived.
    at: std::time::Instant,
}

/// How the receiver answers.
const FAIL: u8 = 0;
const OK: u8 = 1;
/// Holds the POST for `STALL` before it answers 500: a receiver that hangs.
const STALL_THEN_FAIL: u8 = 2;
const STALL: Duration = Duration::from_secs(2);

/// A local webhook receiver (axum) that checks every signature and answers
/// as `mode` says.
struct Receiver {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Delivery>>>,
    mode: Arc<std::sync::atomic::AtomicU8>,
    /// POSTs being answered right now.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    _rt: tokio::runtime::Runtime,
}

const SECRET: &str = "whsec_test_secret";

/// The receiver's own check of `farebox-signature: t=T,v1=HEX` over `T.BODY`.
fn verify(header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v),
            Some(("v1", v)) => v1 = Some(v),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else {
        return false;
    };
    let ts: i64 = t.parse().unwrap_or(0);
    let now = jiff::Timestamp::now().as_second();
    if (now - ts).abs() > 300 {
        return false;
    }
    sign(SECRET, t, body) == v1
}

/// Hex HMAC-SHA256 of `T.BODY` keyed with `secret`.
fn sign(secret: &str, t: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Receiver {
    fn start(mode: u8) -> Receiver {
        use axum::http::{HeaderMap, StatusCode};
        use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering::SeqCst};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let mode = Arc::new(AtomicU8::new(mode));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (s, m, busy) = (seen.clone(), mode.clone(), in_flight.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (s, m, busy) = (s.clone(), m.clone(), busy.clone());
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    let mode = m.load(SeqCst);
                    let code = if mode == OK {
                        StatusCode::OK
                    } else {
                        StatusCode::INTERNAL_SERVER_ERROR
                    };
                    s.lock().unwrap().push(Delivery {
                        event_id: h("farebox-event-id"),
                        signature: h("farebox-signature"),
                        raw: body.to_vec(),
                        signature_ok: verify(&h("farebox-signature"), &body),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        answered: code.as_u16(),
                        at: std::time::Instant::now(),
                    });
                    if mode == STALL_THEN_FAIL {
                        busy.fetch_add(1, SeqCst);
                        tokio::time::sleep(STALL).await;
                        busy.fetch_sub(1, SeqCst);
                    }
                    code
                }
            }),
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await });
        Receiver {
            addr,
            seen,
            mode,
            in_flight,
            _rt: rt,
        }
    }

    fn seen(&self) -> Vec<Delivery> {
        self.seen.lock().unwrap().clone()
    }

    fn set_mode(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Base delay of the retries in the webhook test: above the outbox's 200 ms
/// poll, so that a doubled delay is told apart from a constant one.
const RETRY_BASE: Duration = Duration::from_millis(400);

#[test]
fn webhooks_are_signed_retried_durable_and_deduplicable() {
    let rx = Receiver::start(STALL_THEN_FAIL);
    let url = format!("http://{}/hook", rx.addr);
    let dir = TempDir::new("hooks");
    let base_ms = RETRY_BASE.as_millis().to_string();
    let args = [
        "--admin-token",
        ADMIN,
        "--webhook-url",
        &url,
        "--webhook-secret",
        SECRET,
        "--webhook-low-balance",
        "50",
        "--webhook-budget-thresholds",
        "50,100",
        "--webhook-retry-base-ms",
        &base_ms,
    ];
    let p = Balance::start_on(&dir, &args);
    let a = p.addr;
    assert_eq!(create_account(a, "acct_w", "key-w", 60).status, 201);
    assert_eq!(set_budget(a, "acct_w", 20, "day", "UTC").status, 200);
    // A receiver that hangs holds up no debit: while it holds the first
    // event's POST, the next debits (and the events they raise) go through.
    assert_eq!(authorize(a, "key-w", 10, "w-1").status, 200); // budget 50 %
    assert!(
        wait_until(Duration::from_secs(10), || rx.in_flight() == 1),
        "the first event was never posted: {:?}",
        rx.seen()
    );
    let started = std::time::Instant::now();
    assert_eq!(authorize(a, "key-w", 10, "w-2").status, 200); // 100 %, balance 40 < 50
    assert_eq!(authorize(a, "key-w", 1, "w-3").status, 402); // no event
    let took = started.elapsed();
    assert_eq!(
        rx.in_flight(),
        1,
        "the debits must finish while the receiver still holds the POST"
    );
    assert!(
        took < STALL,
        "two debits took {took:?} behind a hung receiver"
    );
    rx.set_mode(FAIL);
    // The receiver fails every delivery: each of the three events is
    // attempted at least three times, the delays doubling.
    let attempts = |rx: &Receiver| {
        let mut n: BTreeMap<String, Vec<std::time::Instant>> = BTreeMap::new();
        for d in rx.seen() {
            n.entry(d.event_id).or_default().push(d.at);
        }
        n
    };
    assert!(
        wait_until(Duration::from_secs(30), || {
            let n = attempts(&rx);
            n.len() == 3 && n.values().all(|c| c.len() >= 3)
        }),
        "retries never seen: {:?}",
        attempts(&rx)
    );
    let mut gaps = Vec::new();
    for (id, at) in attempts(&rx) {
        let (first, second) = (at[1] - at[0], at[2] - at[1]);
        // An attempt is made no sooner than its delay after the failure
        // before it: base, then twice the base.
        assert!(
            first >= RETRY_BASE && second >= 2 * RETRY_BASE,
            "{id}: attempts {first:?} and {second:?} apart, want >= {RETRY_BASE:?} and >= {:?}",
            2 * RETRY_BASE
        );
        gaps.push(format!("{}/{} ms", first.as_millis(), second.as_millis()));
    }
    // A restart loses nothing: the outbox is in the ledger.
    assert!(p.terminate());
    rx.set_mode(OK);
    let p = Balance::start_on(&dir, &args);
    let delivered = || -> BTreeSet<String> {
        rx.seen()
            .into_iter()
            .filter(|d| d.answered == 200)
            .map(|d| d.event_id)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(30), || delivered().len() == 3),
        "not delivered: {:?}",
        rx.seen()
    );
    let seen = rx.seen();
    assert!(seen.iter().all(|d| d.signature_ok), "{seen:?}");
    // The receiver deduplicates by id: three distinct events, whatever the
    // number of attempts, each with the same body on every attempt.
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    for d in &seen {
        assert_eq!(d.body["id"], d.event_id.as_str());
        let prev = by_id.entry(d.event_id.clone()).or_insert(d.body.clone());
        assert_eq!(prev, &d.body, "a retry carries the same event");
    }
    assert_eq!(by_id.len(), 3, "{by_id:?}");
    let mut kinds: Vec<(String, Value)> = by_id
        .values()
        .map(|b| {
            let key = if b["type"] == "balance.low" {
                "threshold"
            } else {
                "threshold_percent"
            };
            (
                b["type"].as_str().unwrap().to_owned(),
                b["data"][key].clone(),
            )
        })
        .collect();
    kinds.sort_by(|x, y| format!("{x:?}").cmp(&format!("{y:?}")));
    assert_eq!(
        kinds,
        vec![
            ("balance.low".to_owned(), json!(50)),
            ("budget.threshold".to_owned(), json!(100)),
            ("budget.threshold".to_owned(), json!(50)),
        ]
    );
    let low = by_id.values().find(|b| b["type"] == "balance.low").unwrap();
    assert_eq!(
        low["data"],
        json!({"account_id": "acct_w", "balance": 40, "threshold": 50})
    );
    let full = by_id
        .values()
        .find(|b| b["data"]["threshold_percent"] == 100)
        .unwrap();
    assert_eq!(
        (
            full["data"]["spent"].clone(),
            full["data"]["remaining"].clone()
        ),
        (json!(20), json!(0))
    );
    assert!(
        full["data"]["resets_at"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00+00:00"),
        "{full}"
    );
    let retried = seen.iter().filter(|d| d.answered == 500).count();
    eprintln!(
        "webhooks: {} deliveries seen, {retried} answered 500 and retried, {} distinct events, \
         all signatures valid; two debits took {} ms behind a hung receiver; retry gaps \
         (base {} ms) {}",
        seen.len(),
        by_id.len(),
        took.as_millis(),
        RETRY_BASE.as_millis(),
        gaps.join(", ")
    );
    readme_recipe_verifies(&seen);
    drop(p);
}

/// The Python verification recipe of the README ("Verifying a delivery"),
/// run as it is printed: it must accept every delivery the receiver got and
/// refuse a changed body, a changed signature, the wrong secret and a
/// correctly signed but stale timestamp.
fn readme_recipe_verifies(seen: &[Delivery]) {
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).unwrap();
    let section = text
        .split_once("**Verifying a delivery.**")
        .expect("README: the \"Verifying a delivery\" paragraph")
        .1;
    let code = section
        .split_once("```python\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("README: a python block after \"Verifying a delivery\"")
        .0;
    let python = std::env::var("FAREBOX_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let mut cases = Vec::new();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for d in seen {
        cases.push(json!([SECRET, d.signature, hex(&d.raw), true]));
    }
    let d = &seen[0];
    let mut changed = d.raw.clone();
    changed.push(b' ');
    cases.push(json!([SECRET, d.signature, hex(&changed), false]));
    // The signature with its last hex digit changed.
    let (head, digit) = d.signature.split_at(d.signature.len() - 1);
    let other = if digit == "0" { "1" } else { "0" };
    cases.push(json!([
        SECRET,
        format!("{head}{other}"),
        hex(&d.raw),
        false
    ]));
    cases.push(json!(["whsec_other", d.signature, hex(&d.raw), false]));
    let stale = (jiff::Timestamp::now().as_second() - 3600).to_string();
    cases.push(json!([
        SECRET,
        format!("t={stale},v1={}", sign(SECRET, &stale, &d.raw)),
        hex(&d.raw),
        false
    ]));
    let harness = format!(
        "{code}\nimport json, sys\nfor secret, header, body, want in json.load(sys.stdin):\n    \
         got = verify(secret.encode(), header, bytes.fromhex(body))\n    \
         print(json.dumps([got, want]))\n"
    );
    let child = std::process::Command::new(&python)
        .args(["-c", &harness])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            // Without Python the recipe cannot run: a failure under CI.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{python} (FAREBOX_PYTHON) cannot run the README's recipe under CI=true: {e}"
            );
            eprintln!("SKIPPED the README's Python recipe: {python} cannot run: {e}");
            return;
        }
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(Value::Array(cases.clone()).to_string().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the README's recipe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), cases.len());
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r[0], r[1], "case {i} of the README's recipe: {}", cases[i]);
    }
    eprintln!(
        "README recipe ({python}): {} real deliveries accepted, 4 forgeries refused",
        seen.len()
    );
}

// ------------------------------------------------------------ usage export

/// Every page of `GET /admin/charges?{query}` (`limit` rows each), parsed
/// as JSON lines.
fn export_all(a: SocketAddr, query: &str, limit: usize) -> (Vec<Value>, usize) {
    let mut rows = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let r = admin_get(
            a,
            &format!("/admin/charges?{query}&limit={limit}&cursor={cursor}"),
        );
        assert_eq!(r.status, 200, "{r:?}");
        pages += 1;
        let page: Vec<Value> = r
            .text()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(page.len() <= limit);
        let empty = page.is_empty();
        rows.extend(page);
        match r.header("farebox-next-cursor") {
            Some(c) if !empty => cursor = c.to_owned(),
            _ => return (rows, pages),
        }
        assert!(pages < 1000, "pagination does not end");
    }
}

fn ids(rows: &[Value]) -> Vec<String> {
    rows.iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_usage_export_in_every_format_and_page_size() {
    let b = seeded(&["--export-settle-ms", "0"]);
    let a = b.addr();
    let t0 = jiff::Timestamp::now();
    for i in 0..5 {
        assert_eq!(
            authorize(a, "demo-key-alice", 2, &format!("e-a{i}")).status,
            200
        );
    }
    assert_eq!(authorize(a, "demo-key-bob", 1, "e-b0").status, 200);
    assert_eq!(refund(a, "demo-key-alice", 2, "e-a1", 502).status, 200);
    let id = lease_id(a, "demo-key-alice", 10, 1, "e-l0");
    assert_eq!(settle(a, &id, 6, true).status, 200);
    assert_eq!(lease_refund(a, &id, "e-lr0", 2, 503).status, 200);

    let (all, _) = export_all(a, "", 1000);
    let want: BTreeSet<String> = [
        "charge:e-a0",
        "charge:e-a1",
        "charge:e-a2",
        "charge:e-a3",
        "charge:e-a4",
        "charge:e-b0",
        "refund:e-a1",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .chain([format!("lease:{id}"), "lease_refund:e-lr0".to_owned()])
    .collect();
    assert_eq!(ids(&all).into_iter().collect::<BTreeSet<_>>(), want);
    assert_eq!(all.len(), want.len());
    // Sorted by time; the money adds up to what the ledger charged.
    let times: Vec<i64> = all.iter().map(|r| r["at_ms"].as_i64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let alice: i64 = all
        .iter()
        .filter(|r| r["account_id"] == "acct_alice")
        .map(|r| r["units"].as_i64().unwrap())
        .sum();
    assert_eq!(alice, account(a, "acct_alice")["charged"].as_i64().unwrap());
    let refund_row = all.iter().find(|r| r["id"] == "refund:e-a1").unwrap();
    assert_eq!(
        (
            refund_row["units"].clone(),
            refund_row["upstream_status"].clone(),
            refund_row["type"].clone()
        ),
        (json!(-2), json!(502), json!("refund"))
    );
    let lease_row = all.iter().find(|r| r["type"] == "lease").unwrap();
    assert_eq!(
        (lease_row["units"].clone(), lease_row["lease_id"].clone()),
        (json!(6), json!(id))
    );
    let charge = all.iter().find(|r| r["id"] == "charge:e-a0").unwrap();
    assert_eq!(
        (
            charge["route"].clone(),
            charge["method"].clone(),
            charge["path"].clone()
        ),
        (json!("test-route"), json!("GET"), json!("/things?x=1"))
    );
    let at: jiff::Timestamp = charge["at"].as_str().unwrap().parse().unwrap();
    assert_eq!(at.as_millisecond(), charge["at_ms"].as_i64().unwrap());

    // Every page size gives the same rows in the same order.
    for limit in [1, 2, 3, 4, 8] {
        let (rows, pages) = export_all(a, "", limit);
        assert_eq!(ids(&rows), ids(&all), "limit {limit}");
        assert!(pages >= all.len() / limit, "limit {limit}: {pages} pages");
    }
    // Account and time filters.
    let (bob, _) = export_all(a, "account=acct_bob", 2);
    assert_eq!(ids(&bob), vec!["charge:e-b0"]);
    let from = t0.checked_sub(jiff::Span::new().hours(1)).unwrap();
    let (ranged, _) = export_all(
        a,
        &format!(
            "from={from}&to={}",
            t0.checked_add(jiff::Span::new().hours(1)).unwrap()
        ),
        3,
    );
    assert_eq!(ids(&ranged), ids(&all));
    let (none, _) = export_all(a, &format!("to={from}"), 3);
    assert!(none.is_empty());
    // A bound between two rows splits them: `from <= at < to`.
    let pivot = all
        .iter()
        .find(|r| r["at_ms"].as_i64() > all[0]["at_ms"].as_i64())
        .expect("the rows span more than one millisecond");
    let pivot_ms = pivot["at_ms"].as_i64().unwrap();
    let at = pivot["at"].as_str().unwrap();
    let (later, _) = export_all(a, &format!("from={at}"), 2);
    let (earlier, _) = export_all(a, &format!("to={at}"), 2);
    let split = |keep: &dyn Fn(i64) -> bool| -> Vec<String> {
        ids(&all
            .iter()
            .filter(|r| keep(r["at_ms"].as_i64().unwrap()))
            .cloned()
            .collect::<Vec<_>>())
    };
    assert_eq!(ids(&later), split(&|ms| ms >= pivot_ms), "from={at}");
    assert_eq!(ids(&earlier), split(&|ms| ms < pivot_ms), "to={at}");
    assert!(!later.is_empty() && !earlier.is_empty());
    let (alice_later, _) = export_all(a, &format!("from={at}&account=acct_alice"), 2);
    assert_eq!(
        ids(&alice_later),
        ids(&later
            .iter()
            .filter(|r| r["account_id"] == "acct_alice")
            .cloned()
            .collect::<Vec<_>>()),
        "both filters at once"
    );

    // CSV: the same rows under the documented header.
    let r = admin_get(a, "/admin/charges?format=csv");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(r.header("content-type").unwrap().starts_with("text/csv"));
    let mut reader = csv::Reader::from_reader(r.body.as_slice());
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        vec![
            "id",
            "type",
            "account_id",
            "request_id",
            "lease_id",
            "route",
            "method",
            "path",
            "units",
            "upstream_status",
            "at",
            "at_ms"
        ]
    );
    let recs: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
    assert_eq!(
        recs.iter().map(|r| r[0].to_owned()).collect::<Vec<_>>(),
        ids(&all)
    );
    let rf = recs.iter().find(|r| &r[0] == "refund:e-a1").unwrap();
    assert_eq!((&rf[8], &rf[9], &rf[4]), ("-2", "502", ""));
    // A JSON line has the CSV's columns, no more, and docs/balance-service.md
    // (12.3) names each of them, in the CSV's order.
    let columns: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_owned)
        .collect();
    for row in &all {
        let keys: BTreeSet<&String> = row.as_object().unwrap().keys().collect();
        assert_eq!(keys, columns.iter().collect(), "{row}");
    }
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/balance-service.md"),
    )
    .unwrap();
    let export_docs = docs
        .split_once("### 12.3 Usage export")
        .expect("docs/balance-service.md: 12.3")
        .1;
    let fields = export_docs
        .split_once("Fields (JSON lines")
        .and_then(|(_, rest)| rest.split_once("CloudEvents ("))
        .expect("12.3: the Fields paragraph")
        .0;
    let mut from = 0;
    for c in &columns {
        let at = fields[from..]
            .find(&format!("`{c}`"))
            .unwrap_or_else(|| panic!("12.3 does not name the field `{c}` (after {from})"));
        from += at + c.len();
    }

    // CloudEvents, structured mode, one per line.
    let r = admin_get(a, "/admin/charges?format=cloudevents&limit=100");
    assert_eq!(r.status, 200, "{r:?}");
    let events: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), all.len());
    for (e, row) in events.iter().zip(&all) {
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["id"], row["id"]);
        assert_eq!(e["source"], "farebox-balance");
        assert_eq!(
            e["type"],
            format!("dev.farebox.{}", row["type"].as_str().unwrap()).as_str()
        );
        assert_eq!(e["time"], row["at"]);
        assert_eq!(e["subject"], row["account_id"]);
        assert_eq!(e["datacontenttype"], "application/json");
        assert_eq!(e["data"]["units"], row["units"]);
        assert_eq!(e["data"]["request_id"], row["request_id"]);
        // Each data field is the row's, and the docs name it.
        let ce_docs = export_docs
            .split_once("CloudEvents (`format=cloudevents`)")
            .and_then(|(_, rest)| rest.split_once("**Pages.**"))
            .expect("12.3: the CloudEvents paragraph")
            .0;
        for (k, v) in e.as_object().unwrap() {
            assert!(
                ce_docs.contains(&format!("\"{k}\"")),
                "12.3 does not name {k}"
            );
            if k == "data" {
                for (dk, dv) in v.as_object().unwrap() {
                    assert_eq!(dv, &row[dk], "data.{dk}");
                    assert!(
                        ce_docs.contains(&format!("\"{dk}\"")),
                        "12.3 does not name data.{dk}"
                    );
                }
            }
        }
    }

    // Bad parameters: 400 with a reason.
    for q in [
        "format=xml",
        "from=yesterday",
        "limit=0",
        "limit=10001",
        "cursor=abc",
        "account=a%20b",
    ] {
        let r = admin_get(a, &format!("/admin/charges?{q}"));
        assert_eq!(r.status, 400, "{q}: {r:?}");
        assert!(r.json()["error"].is_string());
    }
}

#[test]
fn export_pages_lose_and_repeat_nothing_while_charges_arrive() {
    let b = seeded(&["--export-settle-ms", "0", "--quiet"]);
    let a = b.addr();
    assert_eq!(
        admin_post(
            a,
            "/admin/accounts/acct_alice/topup",
            &json!({"amount": 100000})
        )
        .status,
        200
    );
    for i in 0..40 {
        assert_eq!(
            authorize(a, "demo-key-alice", 1, &format!("p-{i}")).status,
            200
        );
    }
    let before: BTreeSet<String> = ids(&export_all(a, "", 1000).0).into_iter().collect();
    assert_eq!(before.len(), 40);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && n < 400 {
                assert_eq!(
                    authorize(a, "demo-key-alice", 1, &format!("q-{n}")).status,
                    200
                );
                n += 1;
            }
            n
        })
    };
    let (rows, pages) = export_all(a, "", 3);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().unwrap();
    let got = ids(&rows);
    let unique: BTreeSet<String> = got.iter().cloned().collect();
    assert_eq!(unique.len(), got.len(), "a row repeated across pages");
    assert!(
        before.is_subset(&unique),
        "a row present before the export was lost"
    );
    let after: BTreeSet<String> = ids(&export_all(a, "", 1000).0).into_iter().collect();
    assert!(unique.is_subset(&after));
    eprintln!(
        "export while writing: {pages} pages of 3, {} rows ({} new during the export, {written} written)",
        got.len(),
        got.len() - before.len()
    );
}
