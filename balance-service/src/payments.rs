//! Payment challenges and demo payments (x402 and the `Payment` HTTP
//! authentication scheme) in front of `/v1/authorize` and `/v1/leases`.
//! **Reference-only behaviour** for demos: nothing here talks to a chain or a
//! payment processor. Contract: `docs/balance-service.md`, "Payments (x402,
//! Payment scheme)".
//!
//! Active only with the `--x402-*` flags. It is a middleware around the
//! router (so the authorize and lease handlers stay untouched):
//!
//! - a `402` from `/v1/authorize` or `/v1/leases` gains `accepts` (x402
//!   payment requirements) and `challenges` (Payment-scheme challenges) for
//!   the price it names;
//! - an authorize with a `payment` field, or without an account
//!   (`"account": null`), is answered here: the literal payment `demo-paid`,
//!   or base64 of a JSON object containing `"demo": "paid"`, counts as
//!   verified and is recorded as a charge of the account `payer_demo`;
//!   anything else is a `402` with the challenges.
//!
//! This file is a child module of `service` (declared there with `#[path]`),
//! so it shares the service's private helpers and state.

use super::{error, reply, request_id_conflict, stored, with_log, Shared, UNKNOWN};
use crate::config::X402;
use crate::store::PaidOutcome;
use crate::util::{now_ms, random_hex, sha256_hex};
use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;

/// Largest request body the middleware buffers (as axum's default limit).
const MAX_BODY: usize = 2 << 20;
/// Largest `402` body it rewrites.
const MAX_ANSWER: usize = 1 << 20;
/// Lifetime of a Payment-scheme challenge.
const CHALLENGE_TTL_SECS: i64 = 300;
/// `maxTimeoutSeconds` of the x402 requirements.
const MAX_TIMEOUT_SECONDS: u64 = 60;
/// The literal payment the reference service accepts.
pub const DEMO_PAYMENT: &str = "demo-paid";

/// The middleware. Does nothing unless the `--x402-*` flags are set.
pub(super) async fn gate(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let Some(x402) = st.cfg.x402.clone() else {
        return next.run(req).await;
    };
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    match req.uri().path() {
        "/v1/authorize" => authorize_gate(st, &x402, req, next).await,
        "/v1/leases" => {
            let resp = next.run(req).await;
            with_challenges(resp, &x402, "lease").await
        }
        _ => next.run(req).await,
    }
}

async fn authorize_gate(st: Shared, x402: &X402, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let bytes = match to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(_) => {
            st.stats.authorize_calls.fetch_add(1, Ordering::Relaxed);
            st.stats.count_account(UNKNOWN);
            let resp = error(StatusCode::BAD_REQUEST, "authorize body too large");
            return with_log(resp, UNKNOWN, None);
        }
    };
    if let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(&bytes) {
        let has_payment = doc.get("payment").is_some_and(|p| !p.is_null());
        let anonymous = doc.get("account").is_none_or(Value::is_null);
        if has_payment || anonymous {
            return paid_authorize(st, x402, &parts.headers, doc).await;
        }
        let route = doc
            .get("route")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let resp = next
            .run(Request::from_parts(parts, Body::from(bytes)))
            .await;
        return with_challenges(resp, x402, &route).await;
    }
    // Not a JSON object: the authorize handler answers the 400.
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// `price × amount_per_unit`, as the decimal string of the challenges.
fn amount(x402: &X402, price: u64) -> String {
    (u128::from(price) * u128::from(x402.amount_per_unit)).to_string()
}

/// The `accepts` and `challenges` members for `price` units of `description`.
fn challenge_fields(x402: &X402, price: u64, description: &str) -> (Value, Value) {
    let amount = amount(x402, price);
    let accepts = json!([{
        "scheme": "exact",
        "network": x402.network,
        "amount": amount,
        "asset": x402.asset,
        "payTo": x402.pay_to,
        "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
        "extra": {"name": "USDC", "version": "2"},
    }]);
    let expires = rfc3339(now_ms() / 1000 + CHALLENGE_TTL_SECS);
    let challenges = json!([{
        "id": random_hex(16),
        "method": "x402",
        "intent": "charge",
        "request": {"amount": amount, "currency": x402.asset, "recipient": x402.pay_to},
        "expires": expires,
        "description": description,
    }]);
    (accepts, challenges)
}

/// Adds `accepts` and `challenges` to a `402` JSON answer (priced by its
/// `price`); any other answer is returned unchanged.
async fn with_challenges(resp: Response, x402: &X402, description: &str) -> Response {
    if resp.status() != StatusCode::PAYMENT_REQUIRED {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let Ok(bytes) = to_bytes(body, MAX_ANSWER).await else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
    };
    let Ok(Value::Object(mut doc)) = serde_json::from_slice::<Value>(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let price = doc.get("price").and_then(Value::as_u64).unwrap_or(0);
    let (accepts, challenges) = challenge_fields(x402, price, description);
    doc.insert("accepts".into(), accepts);
    doc.insert("challenges".into(), challenges);
    parts.headers.remove(CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(Value::Object(doc).to_string()))
}

#[derive(Deserialize)]
struct PaidReq {
    #[serde(default)]
    account: Option<String>,
    cost: u64,
    route: String,
    method: String,
    path: String,
    request_id: String,
    #[serde(default)]
    payment: Option<String>,
    #[serde(default)]
    payment_scheme: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scheme {
    /// `X-PAYMENT` / `PAYMENT-SIGNATURE` header value (base64 JSON).
    X402,
    /// `Authorization: Payment <credential>` header value.
    Payment,
}

/// An authorize paid by a payment (or anonymous, asking for one).
async fn paid_authorize(
    st: Shared,
    x402: &X402,
    headers: &HeaderMap,
    doc: Map<String, Value>,
) -> Response {
    st.stats.authorize_calls.fetch_add(1, Ordering::Relaxed);
    let unknown = |resp: Response, rid: Option<&str>| {
        st.stats.count_account(UNKNOWN);
        with_log(resp, UNKNOWN, rid)
    };
    let req: PaidReq = match st.open_call(headers, "authorize", || {
        serde_json::from_value(Value::Object(doc))
    }) {
        Ok(r) => r,
        Err(resp) => {
            st.stats.count_account(UNKNOWN);
            return *resp;
        }
    };
    let rid = req.request_id.clone();
    let bad = |msg: &str| unknown(error(StatusCode::BAD_REQUEST, msg), Some(&rid));
    if req.request_id.is_empty() {
        return bad("request_id must not be empty");
    }
    let Ok(cost) = i64::try_from(req.cost) else {
        return bad("cost out of range (max 9223372036854775807)");
    };
    if req.account.is_some() && req.payment.is_some() {
        return bad("account and payment are exclusive: send account null with a payment");
    }
    let scheme = match req.payment_scheme.as_deref() {
        None => Scheme::X402,
        Some(s) if s.eq_ignore_ascii_case("x402") => Scheme::X402,
        Some(s) if s.eq_ignore_ascii_case("payment") => Scheme::Payment,
        Some(_) => return bad("payment_scheme must be \"x402\" or \"payment\""),
    };
    let required = |detail: &str| {
        let (accepts, challenges) = challenge_fields(x402, req.cost, &req.route);
        let body = json!({
            "allow": false,
            "price": req.cost,
            "detail": detail,
            "accepts": accepts,
            "challenges": challenges,
        });
        unknown(reply(StatusCode::PAYMENT_REQUIRED, body, 0), Some(&rid))
    };
    let Some(payment) = req.payment.as_deref() else {
        return required("payment required: this route needs a payment or an API key");
    };
    if !demo_verified(payment, scheme) {
        return required("payment invalid");
    }
    let store = st.store.clone();
    let (route, method, path, request_id) = (
        req.route.clone(),
        req.method.clone(),
        req.path.clone(),
        req.request_id.clone(),
    );
    let outcome = match stored(store.pay_demo(request_id, cost, route, method, path)).await {
        Ok(o) => o,
        Err(resp) => return unknown(resp, Some(&rid)),
    };
    let (resp, account) = match outcome {
        PaidOutcome::Paid {
            account_id,
            balance,
            replay,
        } => {
            let tx = format!(
                "0xdemo{}",
                sha256_hex(rid.as_bytes()).get(..32).unwrap_or_default()
            );
            let mut body = json!({
                "allow": true,
                "account_id": account_id,
                "balance": balance,
                "payment_response": {
                    "success": true,
                    "transaction": tx,
                    "network": x402.network,
                    "payer": account_id,
                },
            });
            if replay {
                body["replay"] = Value::Bool(true);
            }
            // Never cacheable: the payment paid for this request only.
            (reply(StatusCode::OK, body, 0), account_id)
        }
        PaidOutcome::Conflict { account_id } => (request_id_conflict(), account_id),
    };
    st.stats.count_account(&account);
    with_log(resp, &account, Some(&rid))
}

/// Whether a payment header value is the reference service's demo payment:
/// `demo-paid`, or base64 (either alphabet, padding optional) of a JSON
/// object that contains `"demo": "paid"` (at any depth up to 4). With the
/// Payment scheme a leading `Payment ` auth-scheme token is ignored.
fn demo_verified(value: &str, scheme: Scheme) -> bool {
    let mut v = value.trim();
    if scheme == Scheme::Payment {
        if let Some((head, rest)) = v.split_once(' ') {
            if head.eq_ignore_ascii_case("payment") {
                v = rest.trim();
            }
        }
    }
    if v == DEMO_PAYMENT {
        return true;
    }
    let Some(bytes) = base64_decode(v) else {
        return false;
    };
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(doc @ Value::Object(_)) => has_demo_paid(&doc, 0),
        _ => false,
    }
}

fn has_demo_paid(v: &Value, depth: u32) -> bool {
    if depth > 4 {
        return false;
    }
    match v {
        Value::Object(m) => {
            m.get("demo").and_then(Value::as_str) == Some("paid")
                || m.values().any(|x| has_demo_paid(x, depth + 1))
        }
        Value::Array(a) => a.iter().any(|x| has_demo_paid(x, depth + 1)),
        _ => false,
    }
}

/// Decodes standard or URL-safe base64, with or without `=` padding.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    if s.is_empty() || s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time in seconds (UTC).
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from a day count (proleptic Gregorian, 400-year eras).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn base64_both_alphabets() {
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert_eq!(base64_decode("aGk").unwrap(), b"hi");
        assert_eq!(
            base64_decode("-_8").unwrap(),
            base64_decode("+/8=").unwrap()
        );
        assert_eq!(base64_decode("+/8=").unwrap(), [0xfb, 0xff]);
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("").is_none());
        assert!(base64_decode("a b c").is_none());
    }

    #[test]
    fn demo_payments() {
        assert!(demo_verified("demo-paid", Scheme::X402));
        assert!(demo_verified(" demo-paid ", Scheme::Payment));
        assert!(demo_verified("Payment demo-paid", Scheme::Payment));
        assert!(!demo_verified("Payment demo-paid", Scheme::X402));
        // {"demo":"paid"}
        assert!(demo_verified("eyJkZW1vIjoicGFpZCJ9", Scheme::X402));
        // {"x402Version":2,"payload":{"demo":"paid"}}
        assert!(demo_verified(
            "eyJ4NDAyVmVyc2lvbiI6MiwicGF5bG9hZCI6eyJkZW1vIjoicGFpZCJ9fQ==",
            Scheme::X402
        ));
        // {"demo":"unpaid"}
        assert!(!demo_verified("eyJkZW1vIjoidW5wYWlkIn0", Scheme::X402));
        assert!(!demo_verified("demo-paid!", Scheme::X402));
        assert!(!demo_verified("", Scheme::X402));
    }

    #[test]
    fn x402_flags_go_together() {
        use crate::config::{parse, Parsed};
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let all = [
            "--x402-pay-to",
            "0xpay",
            "--x402-network=base-sepolia",
            "--x402-asset",
            "0xasset",
            "--x402-amount-per-unit",
            "10000",
        ];
        let want = X402 {
            pay_to: "0xpay".into(),
            network: "base-sepolia".into(),
            asset: "0xasset".into(),
            amount_per_unit: 10_000,
        };
        match parse(args(&all), |_| None) {
            Ok(Parsed::Run(cfg)) => assert_eq!(cfg.x402.as_deref(), Some(&want)),
            other => unreachable!("{other:?}"),
        }
        // Environment fallbacks count.
        let env = |k: &str| (k == "FAREBOX_BALANCE_X402_ASSET").then(|| "0xasset".to_owned());
        let mut partial: Vec<&str> = all.to_vec();
        partial.drain(3..5);
        match parse(args(&partial), env) {
            Ok(Parsed::Run(cfg)) => assert_eq!(cfg.x402.as_deref(), Some(&want)),
            other => unreachable!("{other:?}"),
        }
        assert!(parse(args(&partial), |_| None).is_err());
        assert!(parse(args(&["--x402-pay-to", "0xpay"]), |_| None).is_err());
        let mut zero = all.to_vec();
        zero[6] = "0";
        assert!(parse(args(&zero), |_| None).is_err());
        let mut empty = all.to_vec();
        empty[1] = " ";
        assert!(parse(args(&empty), |_| None).is_err());
        match parse(args(&[]), |_| None) {
            Ok(Parsed::Run(cfg)) => assert_eq!(cfg.x402, None),
            other => unreachable!("{other:?}"),
        }
    }

    #[test]
    fn amounts_do_not_overflow() {
        let x = X402 {
            pay_to: "0xpay".into(),
            network: "base-sepolia".into(),
            asset: "0xasset".into(),
            amount_per_unit: u64::MAX,
        };
        assert_eq!(amount(&x, 2), "36893488147419103230");
        let (accepts, challenges) = challenge_fields(&x, 3, "inference");
        assert_eq!(accepts[0]["amount"], "55340232221128654845");
        assert_eq!(accepts[0]["payTo"], "0xpay");
        assert_eq!(challenges[0]["request"]["recipient"], "0xpay");
        assert_eq!(challenges[0]["description"], "inference");
        assert_eq!(challenges[0]["id"].as_str().unwrap().len(), 32);
    }
}
