//! End-to-end tests of the reference-only payment challenges and demo
//! payments (`--x402-*`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::Command;

const X402: &[&str] = testkit::DEMO_X402_ARGS;

fn with_x402(extra: &[&str]) -> Balance {
    let mut args = X402.to_vec();
    args.extend_from_slice(extra);
    seeded(&args)
}

fn pay(addr: SocketAddr, payment: Option<&str>, scheme: &str, cost: u64, rid: &str) -> Resp {
    post_json(
        addr,
        "/v1/authorize",
        &[("x-request-id", rid)],
        &json!({
            "account": null,
            "cost": cost,
            "route": "inference",
            "method": "POST",
            "path": "/v1/chat/completions",
            "request_id": rid,
            "payment": payment,
            "payment_scheme": scheme,
        }),
    )
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Checks the `accepts` and `challenges` of a 402 for `amount` and
/// `description`.
fn assert_challenges(j: &Value, amount: &str, description: &str) {
    assert_eq!(
        j["accepts"],
        json!([{
            "scheme": "exact",
            "network": "eip155:84532",
            "amount": amount,
            "asset": "0x00000000000000000000000000000000000000a0",
            "payTo": "0x00000000000000000000000000000000000000b0",
            "maxTimeoutSeconds": 60,
            "extra": {"name": "USDC", "version": "2"},
        }]),
        "{j}"
    );
    let c = j["challenges"].as_array().unwrap();
    assert_eq!(c.len(), 1, "{j}");
    let c = &c[0];
    // The Payment scheme's `evm` method, `charge` intent, as pympp and mppx pay it.
    assert_eq!(c["method"], "evm");
    assert_eq!(c["intent"], "charge");
    assert_eq!(
        c["request"],
        json!({"amount": amount, "currency": "0x00000000000000000000000000000000000000a0",
               "recipient": "0x00000000000000000000000000000000000000b0",
               "methodDetails": {"chainId": 84532, "credentialTypes": ["authorization"], "decimals": 6}})
    );
    assert_eq!(c["description"], description);
    assert!(c.get("realm").is_none(), "the filter names the host: {c}");
    // A salt (16 hex digits) and an HMAC (base64url of 32 bytes).
    let id = c["id"].as_str().unwrap();
    assert!(
        id.len() == 59
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{id}"
    );
    // RFC 3339, UTC: 2026-01-02T03:04:05Z.
    let e = c["expires"].as_str().unwrap().as_bytes();
    assert_eq!(e.len(), 20, "{c}");
    for (i, b) in e.iter().enumerate() {
        match i {
            4 | 7 => assert_eq!(*b, b'-'),
            10 => assert_eq!(*b, b'T'),
            13 | 16 => assert_eq!(*b, b':'),
            19 => assert_eq!(*b, b'Z'),
            _ => assert!(b.is_ascii_digit(), "{c}"),
        }
    }
}

#[test]
fn without_flags_nothing_changes() {
    let b = seeded(&[]);
    let a = b.addr();
    let r = authorize(a, "demo-key-bob", 5, "n-1");
    assert_eq!(r.status, 402);
    assert!(r.json().get("accepts").is_none() && r.json().get("challenges").is_none());
    // No payments without the flags: an anonymous authorize is malformed.
    let r = pay(a, Some("demo-paid"), "x402", 5, "n-2");
    assert_eq!(r.status, 400, "{r:?}");
    let r = admin_get(a, "/admin/accounts/payer_demo");
    assert_eq!(r.status, 404);
}

#[test]
fn denials_carry_challenges() {
    let b = with_x402(&["--deny-max-age", "5", "--allow-max-age", "9"]);
    let a = b.addr();
    let r = authorize(a, "demo-key-bob", 5, "d-1");
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("max-age=5"));
    let j = r.json();
    assert_eq!(j["account_id"], "acct_bob");
    assert_eq!(j["price"], 5);
    assert_eq!(j["balance"], 3);
    assert!(j["detail"].is_string());
    assert_challenges(&j, "5000", "test-route");
    // A balance too low is not a payment's failure: no registered problem type,
    // so the filter's 402 keeps farebox's own (README, "Payments").
    assert!(j.get("problem").is_none(), "{j}");
    // A fresh challenge id every time.
    let again = authorize(a, "demo-key-bob", 5, "d-2").json();
    assert_ne!(again["challenges"][0]["id"], j["challenges"][0]["id"]);

    // Leases: priced at `min`.
    let r = lease(a, "demo-key-bob", 50, 4, "d-lease");
    assert_eq!(r.status, 402, "{r:?}");
    assert_challenges(&r.json(), "4000", "lease");
    assert!(r.json().get("problem").is_none(), "{r:?}");

    // Allows and other answers are untouched.
    let r = authorize(a, "demo-key-alice", 2, "d-3");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        json!({"allow": true, "account_id": "acct_alice", "balance": 98})
    );
    assert_eq!(r.header("cache-control"), Some("max-age=9"));
    let r = authorize(a, "nope", 2, "d-4");
    assert_eq!(r.status, 401);
    assert!(r.json().get("accepts").is_none());
    // Malformed stays malformed.
    let r = post_json(a, "/v1/authorize", &[], &json!({"cost": 1}));
    assert_eq!(r.status, 400, "{r:?}");
    let r = request(a, "POST", "/v1/authorize", &[], Some("not json"));
    assert_eq!(r.status, 400);
}

#[test]
fn demo_payments_are_recorded_for_payer_demo() {
    let b = with_x402(&["--allow-max-age", "9"]);
    let a = b.addr();

    // Anonymous without a payment: the challenges.
    let r = pay(a, None, "x402", 7, "p-0");
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    assert_eq!(j["allow"], false);
    assert_eq!(j["price"], 7);
    assert!(j["detail"].as_str().unwrap().contains("payment required"));
    assert_challenges(&j, "7000", "inference");

    // An invalid payment.
    let r = pay(a, Some("not-a-payment"), "x402", 7, "p-1");
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.json()["detail"], "payment invalid");
    assert_challenges(&r.json(), "7000", "inference");

    // The literal demo payment.
    let r = pay(a, Some("demo-paid"), "x402", 7, "p-2");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let j = r.json();
    assert_eq!(j["allow"], true);
    assert_eq!(j["account_id"], "payer_demo");
    assert_eq!(j["balance"], 0);
    let pr = &j["payment_response"];
    assert_eq!(pr["success"], true);
    assert_eq!(pr["network"], "eip155:84532");
    assert_eq!(pr["payer"], "payer_demo");
    let tx = pr["transaction"].as_str().unwrap();
    assert!(tx.starts_with("0xdemo") && tx.len() > 6, "{tx}");

    // Retried: the same answer, nothing recorded again.
    let r = pay(a, Some("demo-paid"), "x402", 7, "p-2");
    assert_eq!(r.json()["replay"], true, "{r:?}");
    assert_eq!(r.json()["payment_response"]["transaction"], tx);

    // base64 JSON containing "demo": "paid" (x402 header shape), and the
    // Payment scheme with and without its auth-scheme token.
    let payload = b64(br#"{"x402Version":2,"payload":{"demo":"paid"}}"#);
    assert_eq!(pay(a, Some(&payload), "x402", 3, "p-3").status, 200);
    let cred = b64(br#"{"challenge":{"id":"x"},"demo":"paid"}"#);
    let r = pay(a, Some(&format!("Payment {cred}")), "payment", 2, "p-4");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(pay(a, Some("demo-paid"), "payment", 1, "p-5").status, 200);
    let bad = b64(br#"{"demo":"unpaid"}"#);
    let r = pay(a, Some(&bad), "payment", 1, "p-6");
    assert_eq!(r.json()["detail"], "payment invalid", "{r:?}");

    // The ledger: one charge per paid request, balanced by a top-up.
    let rows = admin_get(a, "/admin/accounts/payer_demo/charges").json();
    let rows: Vec<(String, i64, String)> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["request_id"].as_str().unwrap().to_owned(),
                c["cost"].as_i64().unwrap(),
                c["route"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want: Vec<(String, i64, String)> = [("p-2", 7), ("p-3", 3), ("p-4", 2), ("p-5", 1)]
        .iter()
        .map(|(r, c)| ((*r).to_owned(), *c, "inference".to_owned()))
        .collect();
    assert_eq!(rows, want);
    let acct = check_ledger(a, "payer_demo");
    assert_eq!(acct["balance"], 0);
    assert_eq!(acct["topups"], 13);
    assert_eq!(acct["charged"], 13);

    // A request id charged to an account cannot be paid for again.
    authorize(a, "demo-key-alice", 1, "p-7");
    let r = pay(a, Some("demo-paid"), "x402", 1, "p-7");
    assert_eq!(r.status, 409, "{r:?}");
    // And a paid request id cannot be charged to an account.
    let r = authorize(a, "demo-key-alice", 1, "p-2");
    assert_eq!(r.status, 409, "{r:?}");

    // Malformed payment requests.
    let base = json!({"account": null, "cost": 1, "route": "r", "method": "GET", "path": "/",
                      "request_id": "p-8", "payment": "demo-paid"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        post_json(a, "/v1/authorize", &[], &b)
    };
    assert_eq!(with("payment_scheme", json!("card")).status, 400);
    assert_eq!(with("cost", json!(-1)).status, 400);
    assert_eq!(with("request_id", json!("")).status, 400);
    assert_eq!(with("route", Value::Null).status, 400);

    // A keyed request with a payment: the payment pays, the key names the account,
    // whose balance is left as it was (a top-up of the price, and its charge).
    let before = check_ledger(a, "acct_alice")["balance"].as_i64().unwrap();
    let r = with("account", json!("demo-key-alice"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["account_id"], "acct_alice");
    assert_eq!(r.json()["payment_response"]["success"], true);
    assert_eq!(
        check_ledger(a, "acct_alice")["balance"].as_i64().unwrap(),
        before
    );
    let r = post_json(
        a,
        "/v1/authorize",
        &[],
        &json!({"account": "no-such-key", "cost": 1, "route": "r", "method": "GET", "path": "/",
                "request_id": "p-9", "payment": "demo-paid"}),
    );
    assert_eq!(r.status, 401, "{r:?}");
    let s = admin_get(a, "/admin/stats").json();
    assert_eq!(s["authorize_by_account"]["payer_demo"], 5, "{s}");
}

#[test]
fn malformed_payment_requests() {
    let b = with_x402(&[]);
    let a = b.addr();
    let base = json!({"account": null, "cost": 1, "route": "r", "method": "GET", "path": "/",
                      "request_id": "p-8", "payment": "demo-paid"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        post_json(a, "/v1/authorize", &[], &b)
    };
    assert_eq!(with("payment_scheme", json!("card")).status, 400);
    assert_eq!(with("cost", json!(-1)).status, 400);
    assert_eq!(with("request_id", json!("")).status, 400);
    assert_eq!(with("route", Value::Null).status, 400);
}

#[test]
fn payments_respect_the_service_token() {
    let b = with_x402(&["--service-token", "svc"]);
    let a = b.addr();
    let r = pay(a, Some("demo-paid"), "x402", 1, "t-1");
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.json(), json!({"error": "service token rejected"}));
    let r = post_json(
        a,
        "/v1/authorize",
        &[("authorization", "Bearer svc")],
        &json!({"account": null, "cost": 1, "route": "r", "method": "GET", "path": "/",
                "request_id": "t-1", "payment": "demo-paid", "payment_scheme": "x402"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn x402_flags_go_together() {
    let dir = TempDir::new("x402-flags");
    let out = Command::new(env!("CARGO_BIN_EXE_farebox-balance"))
        .args(["--listen", "127.0.0.1:0", "--db"])
        .arg(dir.path("db.sqlite"))
        .args([
            "--x402-pay-to",
            "0x00000000000000000000000000000000000000b0",
            "--x402-network",
            "base",
        ])
        .env_remove("FAREBOX_BALANCE_X402_ASSET")
        .env_remove("FAREBOX_BALANCE_X402_AMOUNT_PER_UNIT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("go together"));
}

/// What the mock facilitator does on its second `/settle` of a payment, and
/// what the chain says of the authorization.
#[derive(Clone, Copy)]
struct Script {
    /// The first `/settle` answers after the service's bound (else at once).
    first_late: bool,
    second_settles: bool,
    used_on_chain: bool,
}

/// A facilitator whose first `/settle` answers after the service gave up on it
/// (the outcome is unknown), and a chain RPC, on one port. Counts the settles.
struct MockFacilitator {
    addr: SocketAddr,
    settles: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl MockFacilitator {
    fn start(script: Script) -> MockFacilitator {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let settles = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = settles.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        r.read_line(&mut h).unwrap();
                        if h.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                    let answer = match path.as_str() {
                        "/supported" => json!({"kinds": [{"x402Version": 2, "scheme": "exact",
                                                          "network": "eip155:84532"}]}),
                        "/verify" => {
                            json!({"isValid": true, "payer": "0x00000000000000000000000000000000000000cc"})
                        }
                        "/settle" => {
                            let n = counter.fetch_add(1, Ordering::SeqCst);
                            if n == 0 && script.first_late {
                                // Settled, but the answer comes after the service's bound.
                                std::thread::sleep(std::time::Duration::from_millis(6000));
                            }
                            if n == 0 || script.second_settles {
                                json!({"success": true, "transaction": format!("0x{n:064x}"),
                                       "network": "eip155:84532"})
                            } else {
                                json!({"success": false, "errorReason": "invalid_exact_evm_nonce_used",
                                       "transaction": "", "network": "eip155:84532"})
                            }
                        }
                        "/rpc" => {
                            let call: Value = serde_json::from_slice(&body).unwrap();
                            let data = call["params"][0]["data"].as_str().unwrap();
                            assert!(data.starts_with("0xe94a0102"), "authorizationState: {data}");
                            json!({"jsonrpc": "2.0", "id": 1,
                                   "result": format!("0x{:064x}", u8::from(script.used_on_chain))})
                        }
                        _ => json!({}),
                    };
                    let body = answer.to_string();
                    let mut w = conn;
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        MockFacilitator { addr, settles }
    }

    fn settles(&self) -> usize {
        self.settles.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// An x402 payment of the offer for 1 unit (1000 atomic units), with `nonce`.
fn x402_payment(nonce: &str) -> String {
    x402_payment_until(nonce, "4102444800")
}

/// The same, whose authorization is valid before `valid_before` (Unix seconds).
fn x402_payment_until(nonce: &str, valid_before: &str) -> String {
    let payload = json!({
        "x402Version": 2,
        "accepted": {"scheme": "exact", "network": "eip155:84532", "amount": "1000",
                     "asset": "0x00000000000000000000000000000000000000a0",
                     "payTo": "0x00000000000000000000000000000000000000b0"},
        "payload": {"signature": "0x00", "authorization": {
            "from": "0x00000000000000000000000000000000000000cc",
            "to": "0x00000000000000000000000000000000000000b0", "value": "1000",
            "validAfter": "0", "validBefore": valid_before, "nonce": nonce}},
    });
    b64(payload.to_string().as_bytes())
}

/// A settle without an answer is an unknown outcome: reconciled (settled again,
/// then the chain asked), so the request is either served and paid once or not
/// served and not paid; without a chain to ask, the payment stays held.
#[test]
fn unknown_settle_outcomes_are_reconciled() {
    const PAYER: &str = "x402:0x00000000000000000000000000000000000000cc";
    let charged = |a: SocketAddr| {
        let r = admin_get(a, &format!("/admin/accounts/{PAYER}"));
        (r.status == 200).then(|| r.json()["charged"].as_i64().unwrap())
    };
    let service = |mock: &MockFacilitator, rpc: bool| {
        let url = format!("http://{}", mock.addr);
        let rpc_url = format!("http://{}/rpc", mock.addr);
        let mut args = vec![
            "--x402-facilitator-url",
            &url,
            "--x402-facilitator-timeout-ms",
            "2000",
        ];
        if rpc {
            args.extend(["--x402-rpc-url", &rpc_url]);
        }
        with_x402(&args)
    };
    // A facilitator whose first settle is late (its second settles or not, the
    // chain says the nonce is used or not), and a service with or without the RPC.
    let late = |second_settles: bool, used_on_chain: bool, rpc: bool| {
        let mock = MockFacilitator::start(Script {
            first_late: true,
            second_settles,
            used_on_chain,
        });
        let b = service(&mock, rpc);
        (mock, b)
    };

    // The first settle landed (the chain says the nonce is used): served, paid once.
    let (mock, b) = late(false, true, true);
    let r = pay(b.addr(), Some(&x402_payment("0x01")), "x402", 1, "u-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["payment_response"]["reconciled"], true, "{r:?}");
    assert_eq!((mock.settles(), charged(b.addr())), (2, Some(1)));

    // The second settle is refused and the nonce is unused, but the
    // authorization is still valid: the first settlement may be pending and
    // land later, so the outcome stays unknown (503, held), not "unpaid".
    let (mock, b) = late(false, false, true);
    let r = pay(b.addr(), Some(&x402_payment("0x05")), "x402", 1, "u-6");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.text().contains("may still land"), "{r:?}");
    let again = pay(b.addr(), Some(&x402_payment("0x05")), "x402", 1, "u-7");
    assert_eq!(again.status, 402, "held: {again:?}");
    assert_eq!((mock.settles(), charged(b.addr())), (2, None));

    // Nothing landed and nothing can (the second settle is refused, the nonce
    // is unused and the authorization has expired): not served, not paid, and
    // the payment is free again.
    let (mock, b) = late(false, false, true);
    let r = pay(
        b.addr(),
        Some(&x402_payment_until("0x02", "1")),
        "x402",
        1,
        "u-2",
    );
    assert_eq!(r.status, 402, "{r:?}");
    assert_eq!(r.json()["problem"], "verification-failed", "{r:?}");
    assert!(
        r.json()["detail"].as_str().unwrap().contains("not settled"),
        "{r:?}"
    );
    assert_eq!((mock.settles(), charged(b.addr())), (2, None));

    // The second settle settles (the first had not): served, paid once.
    let (mock, b) = late(true, false, true);
    let r = pay(b.addr(), Some(&x402_payment("0x03")), "x402", 1, "u-3");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        r.json()["payment_response"]["transaction"],
        format!("0x{:064x}", 1)
    );
    assert_eq!((mock.settles(), charged(b.addr())), (2, Some(1)));

    // No chain to ask: the outcome stays unknown, 503, and the payment is held
    // (sent again by another request, refused without settling again).
    let (mock, b) = late(false, true, false);
    let r = pay(b.addr(), Some(&x402_payment("0x04")), "x402", 1, "u-4");
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.text().contains("outcome unknown"), "{r:?}");
    let again = pay(b.addr(), Some(&x402_payment("0x04")), "x402", 1, "u-5");
    assert_eq!(again.status, 402, "{again:?}");
    assert!(
        again.json()["detail"]
            .as_str()
            .unwrap()
            .contains("unresolved"),
        "{again:?}"
    );
    assert_eq!((mock.settles(), charged(b.addr())), (2, None));
}

/// A facilitator that settles at once, and a service settling through it.
fn settling_at_once() -> (MockFacilitator, Balance) {
    let mock = MockFacilitator::start(Script {
        first_late: false,
        second_settles: true,
        used_on_chain: false,
    });
    let url = format!("http://{}", mock.addr);
    let b = with_x402(&["--x402-facilitator-url", &url]);
    (mock, b)
}

/// A payment is settled only when the request it pays can be recorded: a key
/// that names no account, or a request id already charged to another account,
/// is refused before the facilitator is asked to settle (a settled payment
/// cannot be given back, and recording it would fail).
#[test]
fn payments_that_cannot_be_recorded_are_not_settled() {
    let (mock, b) = settling_at_once();
    let a = b.addr();
    let keyed = |key: &str, payment: &str, rid: &str| {
        post_json(
            a,
            "/v1/authorize",
            &[("x-request-id", rid)],
            &json!({"account": key, "cost": 1, "route": "inference", "method": "POST",
                    "path": "/v1/chat/completions", "request_id": rid,
                    "payment": payment, "payment_scheme": "x402"}),
        )
    };

    // A key that names no account.
    let r = keyed("no-such-key", &x402_payment("0x11"), "k-1");
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(mock.settles(), 0, "settled for a request that was refused");

    // A request id already charged to another account (alice's).
    let r = post_json(
        a,
        "/v1/authorize",
        &[("x-request-id", "k-2")],
        &json!({"account": "demo-key-alice", "cost": 1, "route": "inference",
                "method": "POST", "path": "/v1/chat/completions", "request_id": "k-2"}),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let r = pay(a, Some(&x402_payment("0x12")), "x402", 1, "k-2");
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(mock.settles(), 0, "settled for a request that was refused");
    // The same request id, charged to the same account from its balance, then
    // sent with a payment: settling it would charge the request twice.
    let r = keyed("demo-key-alice", &x402_payment("0x13"), "k-2");
    assert_eq!(r.status, 409, "{r:?}");
    assert_eq!(mock.settles(), 0, "settled a request already charged");

    // The control: the same payment for a request that can be recorded is settled.
    let r = keyed("demo-key-bob", &x402_payment("0x11"), "k-3");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["account_id"], "acct_bob", "{r:?}");
    assert_eq!(mock.settles(), 1);
}

/// A Payment-scheme credential paid once: sent again by another request, its
/// challenge is an already-used one, which the draft answers `invalid-challenge`
/// (x402 has no challenge: its replay stays `verification-failed`).
#[test]
fn a_used_payment_challenge_is_an_invalid_challenge() {
    use farebox_balance::mpp::challenge_hash;
    let (mock, b) = settling_at_once();
    let a = b.addr();
    let offer = pay(a, None, "payment", 1, "m-0").json();
    let c = &offer["challenges"][0];
    let id = c["id"].as_str().unwrap();
    let b64url = |v: &Value| {
        b64(v.to_string().as_bytes())
            .trim_end_matches('=')
            .replace('+', "-")
            .replace('/', "_")
    };
    let credential = b64url(&json!({
        "challenge": {"id": id, "realm": "api.test", "method": c["method"], "intent": c["intent"],
                      "request": b64url(&c["request"]), "expires": c["expires"]},
        "payload": {"type": "authorization", "from": "0x00000000000000000000000000000000000000cc",
                    "to": c["request"]["recipient"], "value": c["request"]["amount"],
                    "validAfter": "0", "validBefore": "4102444800",
                    "nonce": challenge_hash(id, "api.test"), "signature": "0x00"},
    }));
    let r = pay(a, Some(&credential), "payment", 1, "m-1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["payment_receipt"]["challengeId"], id, "{r:?}");
    let again = pay(a, Some(&credential), "payment", 1, "m-2");
    assert_eq!(again.status, 402, "{again:?}");
    assert_eq!(again.json()["problem"], "invalid-challenge", "{again:?}");
    // An x402 replay of the same authorization: no challenge, verification-failed.
    let x402 = pay(
        a,
        Some(&x402_payment(&challenge_hash(id, "api.test"))),
        "x402",
        1,
        "m-3",
    );
    assert_eq!(x402.status, 402, "{x402:?}");
    assert_eq!(x402.json()["problem"], "verification-failed", "{x402:?}");
    assert_eq!(mock.settles(), 1, "paid once");
}
