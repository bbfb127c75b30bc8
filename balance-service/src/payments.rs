//! Payment challenges and payments (x402 and the `Payment` HTTP
//! authentication scheme) in front of `/v1/authorize` and `/v1/leases`.
//! Contract: `docs/balance-service.md`, "Payments (x402, Payment scheme)".
//!
//! Active only with the `--x402-*` flags. It is a middleware around the
//! router (so the authorize and lease handlers stay untouched):
//!
//! - a `402` from `/v1/authorize` or `/v1/leases` gains `accepts` (x402
//!   payment requirements) and `challenges` (Payment-scheme challenges) for
//!   the price it names;
//! - an authorize with a `payment` field, or without an account
//!   (`"account": null`), is answered here. With `--x402-facilitator-url` an
//!   x402 payment is verified, then settled, through the facilitator before
//!   the answer allows the request (farebox cannot take a response back once
//!   it is streaming, so it settles before it serves); without one, only the
//!   demo payment `demo-paid` is accepted (reference-only).
//!
//! A paid request is recorded as a top-up of exactly its price and the charge
//! that spends it: of the keyed account when the request also named one (the
//! payment pays, the key names the account), else of the payer's own account
//! (`x402:<payer address>`, or `payer_demo` for demo payments). The top-up's id
//! is the payment's (EIP-3009 payer and nonce), so a payment pays one request.
//!
//! This file is a child module of `service` (declared there with `#[path]`),
//! so it shares the service's private helpers and state.

use super::{error, reply, request_id_conflict, stored, with_log, ApiError, Shared, UNKNOWN};
use crate::config::{Facilitator, X402};
use crate::mpp::{self, Problem};
use crate::store::{PaidCharge, PaidOutcome, PayRefusal, Payer, DEMO_PAYER};
use crate::util::{base64_decode, now_ms, sha256_hex};
use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::header::CONTENT_LENGTH;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// Largest request body the middleware buffers (as axum's default limit).
const MAX_BODY: usize = 2 << 20;
/// Largest `402` body it rewrites.
const MAX_ANSWER: usize = 1 << 20;
/// Lifetime of a Payment-scheme challenge.
const CHALLENGE_TTL_SECS: i64 = 300;
/// `maxTimeoutSeconds` of the x402 requirements.
const MAX_TIMEOUT_SECONDS: u64 = 60;
/// How long after an authorization's `validBefore` (by this clock) the chain
/// is taken to refuse it: block times may lag the service's clock.
const VALID_BEFORE_MARGIN_SECS: i64 = 120;
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
            with_challenges(resp, &st.challenge_key, &x402, "lease").await
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
        return with_challenges(resp, &st.challenge_key, x402, &route).await;
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
fn challenge_fields(
    key: &mpp::ChallengeKey,
    x402: &X402,
    price: u64,
    description: &str,
) -> (Value, Value) {
    let amount = amount(x402, price);
    let accepts = json!([{
        "scheme": "exact",
        "network": x402.network,
        "amount": amount,
        "asset": x402.asset,
        "payTo": x402.pay_to,
        "maxTimeoutSeconds": MAX_TIMEOUT_SECONDS,
        "extra": {"name": x402.asset_name, "version": x402.asset_version},
    }]);
    let expires = rfc3339(now_ms() / 1000 + CHALLENGE_TTL_SECS);
    let challenges = json!([mpp::challenge(x402, key, &amount, description, &expires)]);
    (accepts, challenges)
}

/// Adds `accepts` and `challenges` to a `402` JSON answer (priced by its
/// `price`); any other answer is returned unchanged.
async fn with_challenges(
    resp: Response,
    key: &mpp::ChallengeKey,
    x402: &X402,
    description: &str,
) -> Response {
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
    let (accepts, challenges) = challenge_fields(key, x402, price, description);
    doc.insert("accepts".into(), accepts);
    // No `problem`: a balance too low is not a payment's failure, and the
    // filter keeps farebox's own problem type for it.
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

/// Payments in flight through `/settle`, and those whose settlement's outcome
/// is unknown (the call timed out or broke): a second request with the same
/// payment waits for neither, it is refused until the first is resolved.
#[derive(Default)]
pub(super) struct Settling(Mutex<HashSet<String>>);

impl Settling {
    /// Claims `id`; false if another request holds it.
    fn claim(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned())
    }
    fn release(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// At start: the facilitator must settle `exact` on the configured network
/// (the offers name only what `/supported` lists).
pub(super) async fn check_supported(x402: &X402) -> Result<(), String> {
    let Some(f) = &x402.facilitator else {
        return Ok(());
    };
    let answer = f
        .supported()
        .await
        .map_err(|e| format!("--x402-facilitator-url {}: GET /supported: {e}", f.url))?;
    let kinds = answer.get("kinds").and_then(Value::as_array);
    let listed = kinds.is_some_and(|k| {
        k.iter().any(|kind| {
            kind.get("x402Version").and_then(Value::as_u64) == Some(2)
                && kind.get("scheme").and_then(Value::as_str) == Some("exact")
                && kind.get("network").and_then(Value::as_str) == Some(x402.network.as_str())
        })
    });
    if !listed {
        return Err(format!(
            "--x402-network {}: the facilitator at {} does not list x402 v2 'exact' on it in GET /supported",
            x402.network, f.url
        ));
    }
    tracing::info!(
        "x402: verifying and settling through the facilitator at {} ({})",
        f.url,
        x402.network
    );
    Ok(())
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
    let scheme = match req.payment_scheme.as_deref() {
        None => Scheme::X402,
        Some(s) if s.eq_ignore_ascii_case("x402") => Scheme::X402,
        Some(s) if s.eq_ignore_ascii_case("payment") => Scheme::Payment,
        Some(_) => return bad("payment_scheme must be \"x402\" or \"payment\""),
    };
    let required = |problem: Problem, detail: &str| {
        unknown(required_body(&st, x402, &req, problem, detail), Some(&rid))
    };
    let unavailable = |detail: String| {
        tracing::warn!("x402: request {rid:?}: {detail}");
        unknown(error(StatusCode::SERVICE_UNAVAILABLE, detail), Some(&rid))
    };
    let Some(payment) = req.payment.as_deref() else {
        return required(
            Problem::PaymentRequired,
            "payment required: this route needs a payment or an API key",
        );
    };
    let keyed = |fallback: String| match &req.account {
        Some(key) => Payer::Key(key.clone()),
        None => Payer::Account(fallback),
    };
    let now_s = now_ms() / 1000;
    // A payment used already: for the Payment scheme its challenge is (the
    // nonce is the challenge's hash), which the draft calls invalid-challenge.
    let used = match scheme {
        Scheme::Payment => Problem::InvalidChallenge,
        Scheme::X402 => Problem::VerificationFailed,
    };
    let (payer, payment_id, settled, claimed, challenge_id) = match &x402.facilitator {
        None => {
            if !demo_verified(payment, scheme) {
                return required(Problem::VerificationFailed, "payment invalid");
            }
            let tx = format!(
                "0xdemo{}",
                sha256_hex(rid.as_bytes()).get(..32).unwrap_or_default()
            );
            let settled = json!({"success": true, "transaction": tx, "network": x402.network,
                                 "payer": DEMO_PAYER});
            (keyed(DEMO_PAYER.to_owned()), None, settled, None, None)
        }
        Some(f) => {
            let (requirements, _) = challenge_fields(&st.challenge_key, x402, req.cost, &req.route);
            let requirements = requirements.get(0).cloned().unwrap_or(Value::Null);
            // Both schemes carry an EIP-3009 authorization: a Payment credential
            // (`evm`/`charge`) is checked against its challenge, then settled as
            // the x402 payload it amounts to, under the same one-use id.
            let (decoded, challenge_id) = match scheme {
                Scheme::X402 => (X402Payment::decode(payment, &requirements), None),
                Scheme::Payment => {
                    let amount = amount(x402, req.cost);
                    match mpp::check(
                        payment,
                        x402,
                        &st.challenge_key,
                        &amount,
                        &requirements,
                        now_s,
                    ) {
                        Ok(c) => (
                            X402Payment::from_payload(c.payload, &requirements),
                            Some(c.challenge_id),
                        ),
                        Err(r) => {
                            return required(r.problem, &format!("payment invalid: {}", r.detail))
                        }
                    }
                }
            };
            let p = match decoded {
                Ok(p) => p,
                Err(why) => {
                    return required(
                        Problem::VerificationFailed,
                        &format!("payment invalid: {why}"),
                    )
                }
            };
            // Already recorded: the same request again is answered as before (below);
            // another request with it is a replay.
            if !st.settling.claim(&p.id) {
                return required(
                    used,
                    "payment invalid: this payment is already being settled, or its settlement is unresolved",
                );
            }
            match st.store.payment_use(p.id.clone(), rid.clone()).await {
                Ok(Some(false)) => {
                    st.settling.release(&p.id);
                    return required(
                        used,
                        "payment invalid: this payment already paid another request",
                    );
                }
                Ok(Some(true)) => {
                    st.settling.release(&p.id);
                    let settled =
                        json!({"success": true, "network": x402.network, "payer": p.payer});
                    (
                        keyed(format!("x402:{}", p.payer)),
                        Some(p.id),
                        settled,
                        None,
                        challenge_id,
                    )
                }
                Err(e) => {
                    st.settling.release(&p.id);
                    return unknown(ApiError::Storage(e).into_response(), Some(&rid));
                }
                Ok(None) => {
                    // A settled payment cannot be given back: what the ledger would
                    // refuse (an unknown key, the request id charged to another
                    // account) is refused before anything is settled.
                    let refusal = st
                        .store
                        .pay_refusal(keyed(format!("x402:{}", p.payer)), rid.clone())
                        .await;
                    match refusal {
                        Ok(None) => {}
                        Ok(Some(PayRefusal::OtherAccount { account_id })) => {
                            st.settling.release(&p.id);
                            st.stats.count_account(&account_id);
                            return with_log(request_id_conflict(), &account_id, Some(&rid));
                        }
                        Ok(Some(PayRefusal::AlreadyCharged { account_id })) => {
                            st.settling.release(&p.id);
                            st.stats.count_account(&account_id);
                            let resp = error(
                                StatusCode::CONFLICT,
                                "request_id is already charged, not by this payment: the payment was not used",
                            );
                            return with_log(resp, &account_id, Some(&rid));
                        }
                        Ok(Some(PayRefusal::UnknownCredential)) => {
                            st.settling.release(&p.id);
                            return unknown(
                                error(StatusCode::UNAUTHORIZED, "unknown credential"),
                                Some(&rid),
                            );
                        }
                        Err(e) => {
                            st.settling.release(&p.id);
                            return unknown(ApiError::Storage(e).into_response(), Some(&rid));
                        }
                    }
                    match f.verify(&p.payload, &requirements).await {
                        Ok(v) if v.is_valid => {}
                        Ok(v) => {
                            st.settling.release(&p.id);
                            return required(
                                Problem::VerificationFailed,
                                &format!("payment invalid: {}", v.reason),
                            );
                        }
                        Err(e) => {
                            st.settling.release(&p.id);
                            return unavailable(format!("payment not verified: {e}"));
                        }
                    }
                    match settle(f, x402, &p, &requirements).await {
                        Settlement::Paid(answer) => {
                            let payer = answer
                                .get("payer")
                                .and_then(Value::as_str)
                                .unwrap_or(&p.payer)
                                .to_ascii_lowercase();
                            (
                                keyed(format!("x402:{payer}")),
                                Some(p.id.clone()),
                                answer,
                                Some(p.id),
                                challenge_id,
                            )
                        }
                        Settlement::Refused(reason) => {
                            st.settling.release(&p.id);
                            return required(
                                Problem::VerificationFailed,
                                &format!("payment not settled: {reason}"),
                            );
                        }
                        // The transaction may be on its way: the payment stays claimed
                        // (refused if sent again) until an operator reconciles it.
                        Settlement::Unknown(why) => {
                            return unavailable(format!(
                                "settlement outcome unknown ({why}); payment {} held for reconciliation",
                                p.log_id()
                            ))
                        }
                    }
                }
            }
        }
    };
    // A receipt's reference when the settlement names no transaction (the
    // same request again, or a reconciled one): the authorization's nonce,
    // which the token's AuthorizationUsed event names on chain.
    let nonce = payment_id
        .as_deref()
        .and_then(|id| id.rsplit(':').next())
        .unwrap_or_default()
        .to_owned();
    let outcome = stored(st.store.pay(PaidCharge {
        payer,
        payment_id,
        request_id: req.request_id.clone(),
        cost,
        route: req.route.clone(),
        method: req.method.clone(),
        path: req.path.clone(),
    }))
    .await;
    if let Some(id) = &claimed {
        if outcome.is_err() {
            // Settled on chain but not recorded: the id stays claimed (a resend is
            // refused) and the operator is told which payment to reconcile.
            tracing::error!(
                "x402: request {rid:?}: payment {} settled but not recorded in the ledger",
                sha256_hex(id.as_bytes()).get(..16).unwrap_or_default()
            );
        } else {
            st.settling.release(id);
        }
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(resp) => return unknown(resp, Some(&rid)),
    };
    let (resp, account) = match outcome {
        PaidOutcome::Paid {
            account_id,
            balance,
            replay,
        } => {
            let mut body = json!({
                "allow": true,
                "account_id": account_id,
                "balance": balance,
            });
            // Each scheme's proof of payment: x402's settlement response
            // (PAYMENT-RESPONSE), or the Payment scheme's receipt (Payment-Receipt).
            match scheme {
                Scheme::X402 => body["payment_response"] = settled,
                Scheme::Payment => {
                    let reference = settled
                        .get("transaction")
                        .and_then(Value::as_str)
                        .filter(|t| !t.is_empty())
                        .unwrap_or(&nonce);
                    body["payment_receipt"] = mpp::receipt(
                        reference,
                        challenge_id.as_deref().unwrap_or_default(),
                        &rfc3339(now_s),
                    );
                }
            }
            if replay {
                body["replay"] = Value::Bool(true);
            }
            // Never cacheable: the payment paid for this request only.
            (reply(StatusCode::OK, body, 0), account_id)
        }
        PaidOutcome::Conflict { account_id } => (request_id_conflict(), account_id),
        PaidOutcome::PaymentUsed { account_id } => {
            st.stats.count_account(&account_id);
            return with_log(
                required_body(
                    &st,
                    x402,
                    &req,
                    used,
                    "payment invalid: this payment already paid another request",
                ),
                &account_id,
                Some(&rid),
            );
        }
        PaidOutcome::UnknownCredential => {
            return unknown(
                error(StatusCode::UNAUTHORIZED, "unknown credential"),
                Some(&rid),
            )
        }
    };
    st.stats.count_account(&account);
    with_log(resp, &account, Some(&rid))
}

/// A 402 with fresh offers; `problem` is the draft's problem type of the
/// failure, which the filter puts in the problem document's `type`.
fn required_body(
    st: &Shared,
    x402: &X402,
    req: &PaidReq,
    problem: Problem,
    detail: &str,
) -> Response {
    let (accepts, challenges) = challenge_fields(&st.challenge_key, x402, req.cost, &req.route);
    reply(
        StatusCode::PAYMENT_REQUIRED,
        json!({"allow": false, "price": req.cost, "detail": detail, "problem": problem.slug(),
               "accepts": accepts, "challenges": challenges}),
        0,
    )
}

/// What came of settling a verified payment.
enum Settlement {
    /// On chain: the facilitator's settle answer (PAYMENT-RESPONSE).
    Paid(Value),
    /// Not settled, and it cannot be later: the facilitator's reason.
    Refused(String),
    /// Maybe on chain: the payment stays claimed.
    Unknown(String),
}

/// Settles through the facilitator. A call without an answer (timeout, broken
/// connection) leaves the outcome unknown, so it is reconciled, never paid
/// twice: settle is called again with the same authorization, which the
/// token executes at most once (EIP-3009 nonces are single-use). If that
/// settles, the first had not; if it is refused, the chain is asked whether
/// the nonce is used (`--x402-rpc-url`): used means the first call's transfer
/// happened, unused means none did once the authorization has expired (until
/// then the first call's transaction may still land). Without an RPC URL, or
/// when the chain does not answer, the outcome stays unknown.
async fn settle(f: &Facilitator, x402: &X402, p: &X402Payment, requirements: &Value) -> Settlement {
    let first = match f.settle(&p.payload, requirements).await {
        Ok(s) if s.success => return Settlement::Paid(s.answer),
        Ok(s) => return Settlement::Refused(s.reason),
        Err(e) => e,
    };
    tracing::warn!(
        "x402: settle of payment {} has no answer ({first}): settling it again to reconcile",
        p.log_id()
    );
    let refused = match f.settle(&p.payload, requirements).await {
        Ok(s) if s.success => return Settlement::Paid(s.answer),
        Ok(s) => s.reason,
        Err(e) => return Settlement::Unknown(format!("{first}; again: {e}")),
    };
    match f.authorization_used(&x402.asset, &p.payer, &p.nonce).await {
        Some(Ok(true)) => {
            tracing::info!(
                "x402: payment {} reconciled: its authorization is used on chain (settled by the first call)",
                p.log_id()
            );
            Settlement::Paid(
                json!({"success": true, "network": x402.network, "payer": p.payer,
                                    "transaction": "", "reconciled": true}),
            )
        }
        // Unused now is "not paid" only once the authorization can no longer
        // be executed: until its validBefore the first call's transaction may
        // be pending and land after this answer (paid, not served).
        Some(Ok(false)) => match p.valid_before() {
            Some(before) if before.saturating_add(VALID_BEFORE_MARGIN_SECS) < now_ms() / 1000 => {
                Settlement::Refused(refused)
            }
            _ => Settlement::Unknown(format!(
                "{first}; settle again: {refused}; the authorization is unused on chain but still valid: the first settlement may still land"
            )),
        },
        Some(Err(e)) => {
            Settlement::Unknown(format!("{first}; settle again: {refused}; chain: {e}"))
        }
        None => Settlement::Unknown(format!(
            "{first}; settle again: {refused} (no --x402-rpc-url to reconcile it)"
        )),
    }
}

/// An x402 v2 `PaymentPayload` of the `exact` EVM scheme, checked against the offer.
struct X402Payment {
    payload: Value,
    /// The top-up id: `x402:<payer>:<nonce>` (EIP-3009 nonces are unique per payer).
    id: String,
    payer: String,
    nonce: String,
}

impl X402Payment {
    fn decode(header: &str, requirements: &Value) -> Result<X402Payment, String> {
        let bytes = base64_decode(header.trim()).ok_or("not base64")?;
        let payload: Value =
            serde_json::from_slice(&bytes).map_err(|_| "not a JSON PaymentPayload")?;
        X402Payment::from_payload(payload, requirements)
    }

    fn from_payload(payload: Value, requirements: &Value) -> Result<X402Payment, String> {
        if payload.get("x402Version").and_then(Value::as_u64) != Some(2) {
            return Err("x402Version must be 2".into());
        }
        let accepted = payload
            .get("accepted")
            .ok_or("no 'accepted' requirements")?;
        for k in ["scheme", "network", "amount", "asset", "payTo"] {
            let (a, b) = (
                accepted.get(k).and_then(Value::as_str).unwrap_or_default(),
                requirements
                    .get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            );
            if !a.eq_ignore_ascii_case(b) {
                return Err(format!("'accepted.{k}' is not the offer's ({b})"));
            }
        }
        let auth = payload
            .pointer("/payload/authorization")
            .ok_or("no EIP-3009 authorization")?;
        let field = |k: &str| {
            auth.get(k)
                .and_then(Value::as_str)
                .filter(|v| v.len() <= 80 && v.bytes().all(|b| b.is_ascii_alphanumeric()))
                .map(str::to_ascii_lowercase)
                .ok_or(format!("authorization.{k} missing or malformed"))
        };
        let (payer, nonce) = (field("from")?, field("nonce")?);
        // x402's payment-identifier extension: the client's idempotency key.
        // Checked for form here; the payment's nonce stays the key (one nonce
        // settles once on chain, whatever id it comes with).
        if let Some(pid) = payload.pointer("/extensions/payment-identifier/info/id") {
            let ok = pid.as_str().is_some_and(|v| {
                (16..=128).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
            if !ok {
                return Err("payment-identifier id must be 16-128 of [A-Za-z0-9_-]".into());
            }
        }
        Ok(X402Payment {
            id: format!("x402:{payer}:{nonce}"),
            payload,
            payer,
            nonce,
        })
    }

    /// The authorization's `validBefore` (Unix seconds), if it is a number.
    fn valid_before(&self) -> Option<i64> {
        self.payload
            .pointer("/payload/authorization/validBefore")
            .and_then(Value::as_str)
            .and_then(|v| v.parse().ok())
    }

    /// What a log line may say of the payment: a digest, not the payment.
    fn log_id(&self) -> String {
        sha256_hex(self.id.as_bytes())
            .get(..16)
            .unwrap_or_default()
            .to_owned()
    }
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
        use crate::config::{parse_with_env as parse, Parsed};
        let args = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let all = [
            "--x402-pay-to",
            "0x00000000000000000000000000000000000000b0",
            "--x402-network=eip155:84532",
            "--x402-asset",
            "0x00000000000000000000000000000000000000a0",
            "--x402-amount-per-unit",
            "10000",
        ];
        let want = X402 {
            pay_to: "0x00000000000000000000000000000000000000b0".into(),
            network: "eip155:84532".into(),
            asset: "0x00000000000000000000000000000000000000a0".into(),
            amount_per_unit: 10_000,
            asset_name: "USDC".into(),
            asset_version: "2".into(),
            asset_decimals: 6,
            realm: None,
            challenge_secret: None,
            facilitator: None,
        };
        match parse(args(&all), |_| None) {
            Ok(Parsed::Run(cfg)) => assert_eq!(cfg.x402.as_deref(), Some(&want)),
            other => unreachable!("{other:?}"),
        }
        // Environment fallbacks count.
        let env = |k: &str| {
            (k == "FAREBOX_BALANCE_X402_ASSET")
                .then(|| "0x00000000000000000000000000000000000000a0".to_owned())
        };
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
        // Checked at start, each refusal naming its flag.
        let refused = |i: usize, v: &'static str, flag: &str| {
            let mut a = all.to_vec();
            a[i] = v;
            match parse(args(&a), |_| None) {
                Err(e) => assert!(e.contains(flag), "{e}"),
                other => unreachable!("{v}: {other:?}"),
            }
        };
        refused(2, "--x402-network=base-sepolia", "--x402-network");
        refused(2, "--x402-network=eip155", "--x402-network");
        refused(
            2,
            "--x402-network=solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp",
            "--x402-network",
        );
        refused(1, "0xpay", "--x402-pay-to");
        refused(4, "USDC", "--x402-asset");
        refused(
            4,
            "0x00000000000000000000000000000000000000a",
            "--x402-asset",
        );
        refused(6, "1.5", "--x402-amount-per-unit");
        refused(6, "0x10", "--x402-amount-per-unit");
        let with = |extra: &[&'static str]| {
            let mut a = all.to_vec();
            a.extend_from_slice(extra);
            parse(args(&a), |_| None)
        };
        for (extra, flag) in [
            (
                &["--x402-facilitator-url", "https://f.example"][..],
                "--x402-facilitator-url",
            ),
            (
                &["--x402-facilitator-url", "http://"][..],
                "--x402-facilitator-url",
            ),
            (
                &["--x402-facilitator-auth", "X-Key: s"][..],
                "--x402-facilitator-auth",
            ),
            (
                &[
                    "--x402-facilitator-url",
                    "http://127.0.0.1:1",
                    "--x402-facilitator-auth",
                    "nocolon",
                ][..],
                "--x402-facilitator-auth",
            ),
        ] {
            match with(extra) {
                Err(e) => assert!(e.contains(flag) && !e.contains(" s"), "{e}"),
                other => unreachable!("{extra:?}: {other:?}"),
            }
        }
        match with(&[
            "--x402-facilitator-url",
            "http://127.0.0.1:4021/",
            "--x402-facilitator-auth",
            "X-Key: s3cret",
        ]) {
            Ok(Parsed::Run(cfg)) => {
                let f = cfg.x402.and_then(|x| x.facilitator).unwrap();
                assert_eq!(f.url, "http://127.0.0.1:4021");
                assert_eq!(f.auth_header, Some(("X-Key".into(), "s3cret".into())));
            }
            other => unreachable!("{other:?}"),
        }
        assert!(parse(args(&["--x402-asset-name", "T"]), |_| None).is_err());
    }

    #[test]
    fn x402_payments_are_checked_against_the_offer() {
        let offer = json!({"scheme": "exact", "network": "eip155:31337", "amount": "1000",
                           "asset": "0xAa", "payTo": "0xBb"});
        let encode = |v: &Value| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(v.to_string())
        };
        let payload = |accepted: Value, ext: Value| {
            json!({"x402Version": 2, "accepted": accepted, "extensions": ext,
                   "payload": {"signature": "0x00", "authorization": {
                       "from": "0xPAYER", "to": "0xbb", "value": "1000",
                       "validAfter": "0", "validBefore": "9", "nonce": "0xN0NCE"}}})
        };
        // Addresses compare without case; the id is the payer's and the nonce's.
        let mut accepted = offer.clone();
        accepted["payTo"] = json!("0xBB");
        let p = X402Payment::decode(&encode(&payload(accepted, json!({}))), &offer).unwrap();
        assert_eq!(p.id, "x402:0xpayer:0xn0nce");
        assert_eq!(p.payer, "0xpayer");
        assert_eq!(p.log_id().len(), 16);
        let mut cheaper = offer.clone();
        cheaper["amount"] = json!("1");
        let e = X402Payment::decode(&encode(&payload(cheaper, json!({}))), &offer)
            .err()
            .unwrap();
        assert!(e.contains("accepted.amount"), "{e}");
        let pid = |id: &str| json!({"payment-identifier": {"info": {"required": false, "id": id}}});
        assert!(X402Payment::decode(
            &encode(&payload(offer.clone(), pid("pay_7d5d747be160e280"))),
            &offer
        )
        .is_ok());
        let e = X402Payment::decode(&encode(&payload(offer.clone(), pid("short"))), &offer)
            .err()
            .unwrap();
        assert!(e.contains("payment-identifier"), "{e}");
        assert!(X402Payment::decode("demo-paid", &offer).is_err());
        assert!(X402Payment::decode(&encode(&json!({"x402Version": 1})), &offer).is_err());
    }

    #[test]
    fn amounts_do_not_overflow() {
        let x = X402 {
            pay_to: "0xpay".into(),
            network: "eip155:84532".into(),
            asset: "0xasset".into(),
            amount_per_unit: u64::MAX,
            asset_name: "USDC".into(),
            asset_version: "2".into(),
            asset_decimals: 6,
            realm: None,
            challenge_secret: None,
            facilitator: None,
        };
        assert_eq!(amount(&x, 2), "36893488147419103230");
        let key = mpp::ChallengeKey::new(Some(&x));
        let (accepts, challenges) = challenge_fields(&key, &x, 3, "inference");
        assert_eq!(accepts[0]["amount"], "55340232221128654845");
        assert_eq!(accepts[0]["payTo"], "0xpay");
        assert_eq!(challenges[0]["request"]["recipient"], "0xpay");
        assert_eq!(challenges[0]["description"], "inference");
        assert_eq!(challenges[0]["request"]["amount"], "55340232221128654845");
        assert_eq!(challenges[0]["method"], "evm");
        assert_eq!(challenges[0]["id"].as_str().unwrap().len(), 59);
    }
}
