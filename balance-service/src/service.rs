//! HTTP layer: the `/v1/*` contract used by the filter, `/healthz`, and the
//! admin API.

use crate::config::Config;
use crate::store::{
    AlertSettings, AuthorizeInput, AuthorizeOutcome, BudgetState, CancelOutcome, CreateOutcome,
    LeaseInput, LeaseOutcome, LeaseRefundInput, LeaseRefundOutcome, LeaseSettings, LeaseState,
    RefundOutcome, SettleOutcome, Store, StoreError, TopupOutcome,
};
use crate::util::{bearer_token, ct_eq, shutdown_signal};
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// `/v1/usage` and the payment middleware live in their own files, as child
// modules so they share this module's private helpers.
#[path = "budget_api.rs"]
mod budget_api;
#[path = "export.rs"]
mod export;
#[path = "payments.rs"]
mod payments;
#[path = "usage.rs"]
mod usage;

/// Stats key for calls whose credential did not resolve to an account.
pub const UNKNOWN: &str = "unknown";

#[derive(Default)]
pub struct Stats {
    authorize_calls: AtomicU64,
    refund_calls: AtomicU64,
    lease_calls: AtomicU64,
    settle_calls: AtomicU64,
    cancel_calls: AtomicU64,
    lease_refund_calls: AtomicU64,
    usage_calls: AtomicU64,
    authorize_by_account: Mutex<HashMap<String, u64>>,
}

impl Stats {
    fn count_account(&self, account: &str) {
        let mut map = self
            .authorize_by_account
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match map.get_mut(account) {
            Some(n) => *n += 1,
            None => {
                map.insert(account.to_owned(), 1);
            }
        }
    }

    fn snapshot(&self) -> Value {
        let map = self
            .authorize_by_account
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let by: BTreeMap<&String, &u64> = map.iter().collect();
        json!({
            "authorize_calls": self.authorize_calls.load(Ordering::Relaxed),
            "refund_calls": self.refund_calls.load(Ordering::Relaxed),
            "lease_calls": self.lease_calls.load(Ordering::Relaxed),
            "settle_calls": self.settle_calls.load(Ordering::Relaxed),
            "cancel_calls": self.cancel_calls.load(Ordering::Relaxed),
            "lease_refund_calls": self.lease_refund_calls.load(Ordering::Relaxed),
            "usage_calls": self.usage_calls.load(Ordering::Relaxed),
            "authorize_by_account": by,
        })
    }

    fn reset(&self) {
        self.authorize_calls.store(0, Ordering::Relaxed);
        self.refund_calls.store(0, Ordering::Relaxed);
        self.lease_calls.store(0, Ordering::Relaxed);
        self.settle_calls.store(0, Ordering::Relaxed);
        self.cancel_calls.store(0, Ordering::Relaxed);
        self.lease_refund_calls.store(0, Ordering::Relaxed);
        self.usage_calls.store(0, Ordering::Relaxed);
        self.authorize_by_account
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

pub struct AppState {
    store: Arc<Store>,
    cfg: Config,
    stats: Stats,
    /// Payments being settled, or whose settlement's outcome is unknown (see payments.rs).
    settling: payments::Settling,
    /// The key of the Payment-scheme challenge ids (see mpp.rs).
    challenge_key: crate::mpp::ChallengeKey,
}

type Shared = Arc<AppState>;

/// Attached to responses so the access log can name the account (never the
/// credential).
#[derive(Clone)]
struct LogInfo {
    account: String,
    request_id: Option<String>,
}

fn cache_value(max_age: u64) -> HeaderValue {
    if max_age == 0 {
        return HeaderValue::from_static("no-store");
    }
    HeaderValue::try_from(format!("max-age={max_age}"))
        .unwrap_or_else(|_| HeaderValue::from_static("no-store"))
}

/// A JSON answer with `Cache-Control` (`max-age=N`, or `no-store` for 0).
fn reply(status: StatusCode, body: Value, max_age: u64) -> Response {
    let mut resp = (status, Json(body)).into_response();
    resp.headers_mut()
        .insert(CACHE_CONTROL, cache_value(max_age));
    resp
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    reply(status, json!({ "error": msg.into() }), 0)
}

fn with_log(mut resp: Response, account: &str, request_id: Option<&str>) -> Response {
    resp.extensions_mut().insert(LogInfo {
        account: account.to_owned(),
        request_id: request_id.map(str::to_owned),
    });
    resp
}

/// The answers of the service that are not outcomes of a ledger call: one
/// error type for the body extractor, the service-token middleware and the
/// storage layer. A storage error is logged with its cause; the client only
/// learns `503 storage unavailable` (the database cannot be reached) or
/// `500 internal`, never SQL.
#[derive(Debug)]
pub enum ApiError {
    /// A malformed request: `400 {"error": text}`.
    BadRequest(String),
    /// `/v1/*` without the right service token: `500` (section 1.2).
    ServiceToken,
    Storage(StoreError),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let resp = match self {
            ApiError::BadRequest(msg) => error(StatusCode::BAD_REQUEST, msg),
            ApiError::ServiceToken => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "service token rejected")
            }
            ApiError::Storage(e) if e.is_unavailable() => {
                tracing::error!(cause = %e, "storage unavailable");
                error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
            }
            ApiError::Storage(e) => {
                tracing::error!(cause = %e, "storage error");
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        with_log(resp, UNKNOWN, None)
    }
}

/// What a request body is called in the 400 text (`invalid <what> body: …`;
/// empty for the admin API's `invalid body: …`).
trait BodyName {
    const WHAT: &'static str;
}

/// A JSON request body, deserialised into `T`; a body that does not parse is
/// the contract's `400 {"error": "invalid <what> body: …"}` (whatever its
/// `content-type`, which the contract says not to check).
struct JsonBody<T>(T);

impl<S, T> axum::extract::FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + BodyName,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let invalid = |e: &dyn std::fmt::Display| {
            let what = if T::WHAT.is_empty() {
                String::new()
            } else {
                format!("{} ", T::WHAT)
            };
            ApiError::BadRequest(format!("invalid {what}body: {e}"))
        };
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| invalid(&e))?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| invalid(&e))
    }
}

macro_rules! body_name {
    ($($t:ty => $what:literal),* $(,)?) => {
        $(impl BodyName for $t { const WHAT: &'static str = $what; })*
    };
}

/// Awaits a store call; a storage error becomes its answer.
async fn stored<T>(
    f: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, Response> {
    f.await.map_err(|e| ApiError::Storage(e).into_response())
}

fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()))
        .is_some_and(|t| ct_eq(t, expected.as_bytes()))
}

impl AppState {
    /// `None` if the request may proceed, else the 500 answer.
    fn check_service_token(&self, headers: &HeaderMap) -> Option<Response> {
        let expected = self.cfg.service_token.as_deref()?;
        if bearer_matches(headers, expected) {
            None
        } else {
            Some(ApiError::ServiceToken.into_response())
        }
    }

    /// The first steps every `/v1/*` call shares: the service-token check,
    /// then the JSON body (`what` names it in the error). On failure, the
    /// answer to send, logged for the unknown account.
    fn open_call<T>(
        &self,
        headers: &HeaderMap,
        what: &str,
        parse: impl FnOnce() -> serde_json::Result<T>,
    ) -> Result<T, Box<Response>> {
        if let Some(resp) = self.check_service_token(headers) {
            return Err(Box::new(with_log(resp, UNKNOWN, None)));
        }
        parse().map_err(|e| {
            let resp = error(StatusCode::BAD_REQUEST, format!("invalid {what} body: {e}"));
            Box::new(with_log(resp, UNKNOWN, None))
        })
    }
}

/// A 400 answer logged for the unknown account.
fn bad_request(msg: impl Into<String>, rid: Option<&str>) -> Response {
    with_log(error(StatusCode::BAD_REQUEST, msg), UNKNOWN, rid)
}

/// The 402 answer of a denied authorize or lease (`Retry-After` if set).
fn payment_required(
    cfg: &Config,
    account_id: &str,
    balance: i64,
    price: impl serde::Serialize,
    detail: String,
) -> Response {
    let body = json!({
        "allow": false,
        "account_id": account_id,
        "balance": balance,
        "price": price,
        "detail": detail,
    });
    deny_reply(cfg, body)
}

/// A 402 with the deny answers' caching and `Retry-After` (if set).
fn deny_reply(cfg: &Config, body: Value) -> Response {
    let mut resp = reply(StatusCode::PAYMENT_REQUIRED, body, cfg.deny_max_age);
    if let Some(n) = cfg.deny_retry_after {
        resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(n));
    }
    resp
}

/// The 402 answer of a lease call that recalled other holders' unspent
/// leases: retry after `--lease-recall-retry-ms`. Never cacheable and without
/// `Retry-After` (the units come back within moments, not seconds).
fn recall_required(cfg: &Config, account_id: &str, balance: i64, min: i64) -> Response {
    let body = json!({
        "allow": false,
        "account_id": account_id,
        "balance": balance,
        "price": min,
        "detail": format!(
            "balance {balance} is below the minimum lease of {min} units; \
             unspent units held by other gateways were recalled: retry shortly"
        ),
        "recall": true,
        "retry_after_ms": cfg.lease_recall_retry_ms,
    });
    reply(StatusCode::PAYMENT_REQUIRED, body, 0)
}

/// A budget as the answers show it (`budget` of authorize, lease and the
/// admin API; docs/balance-service.md).
pub(crate) fn budget_json(b: &BudgetState) -> Value {
    json!({
        "limit": b.limit,
        "spent": b.spent,
        "remaining": b.remaining,
        "period": b.period.as_str(),
        "time_zone": b.time_zone,
        "period_start": b.period_start,
        "resets_at": b.resets_at,
    })
}

/// The `detail` of a 402 for a budget that cannot cover `what`: names the
/// limit and when it resets.
pub(crate) fn budget_detail(b: &BudgetState, what: &str) -> String {
    format!(
        "the budget of {} units per {} ({}) has {} left, below {what}; it resets at {}",
        b.limit,
        b.period.as_str(),
        b.time_zone,
        b.remaining,
        b.resets_at
    )
}

/// The 402 answer of an authorize or lease the budget cannot cover: the
/// balance 402 with `reason` and the `budget`.
fn budget_required(
    cfg: &Config,
    account_id: &str,
    balance: i64,
    price: impl serde::Serialize,
    budget: &BudgetState,
    what: &str,
) -> Response {
    let body = json!({
        "allow": false,
        "account_id": account_id,
        "balance": balance,
        "price": price,
        "detail": budget_detail(budget, what),
        "reason": "budget",
        "budget": budget_json(budget),
    });
    deny_reply(cfg, body)
}

fn unknown_credential(cfg: &Config) -> Response {
    reply(
        StatusCode::UNAUTHORIZED,
        json!({ "allow": false, "error": "unknown_credential" }),
        cfg.auth_max_age,
    )
}

fn account_disabled(cfg: &Config) -> Response {
    reply(
        StatusCode::FORBIDDEN,
        json!({ "allow": false, "error": "account_disabled" }),
        cfg.auth_max_age,
    )
}

fn request_id_conflict() -> Response {
    error(
        StatusCode::CONFLICT,
        "request_id belongs to another account",
    )
}

fn lease_closed(lease_id: String, state: LeaseState) -> Response {
    reply(
        StatusCode::CONFLICT,
        json!({ "error": "lease_closed", "lease_id": lease_id, "state": state.as_str() }),
        0,
    )
}

body_name! {
    AuthorizeReq => "authorize",
    RefundReq => "refund",
    LeaseReq => "lease",
    SettleReq => "settle",
    CancelReq => "cancel",
    LeaseRefundReq => "lease refund",
    CreateReq => "",
    TopupReq => "",
    usage::UsageReq => "usage",
    budget_api::BudgetReq => "",
    usage::LeaseUsageReq => "lease usage",
}

// ---------------------------------------------------------------- /v1/authorize

#[derive(Deserialize)]
struct AuthorizeReq {
    account: String,
    cost: u64,
    route: String,
    method: String,
    path: String,
    request_id: String,
}

async fn authorize(State(st): State<Shared>, JsonBody(req): JsonBody<AuthorizeReq>) -> Response {
    let rid = req.request_id.clone();
    let bad = |msg: &str| bad_request(msg, Some(&rid));
    if req.request_id.is_empty() {
        return bad("request_id must not be empty");
    }
    let Ok(cost) = i64::try_from(req.cost) else {
        return bad("cost out of range (max 9223372036854775807)");
    };
    let price = req.cost;
    let store = st.store.clone();
    let route = req.route.clone();
    let outcome = stored(store.authorize(AuthorizeInput {
        credential: req.account,
        cost,
        route: req.route,
        method: req.method,
        path: req.path,
        request_id: req.request_id,
    }))
    .await
    .map(|o| (o, route));
    let (outcome, route) = match outcome {
        Ok(v) => v,
        Err(resp) => return with_log(resp, UNKNOWN, Some(&rid)),
    };
    let cfg = &st.cfg;
    let (resp, account) = match outcome {
        AuthorizeOutcome::Allowed {
            account_id,
            balance,
            replay,
            budget,
        } => {
            let mut body = json!({ "allow": true, "account_id": account_id, "balance": balance });
            if replay {
                body["replay"] = Value::Bool(true);
            }
            if let Some(b) = &budget {
                body["budget"] = budget_json(b);
            }
            (reply(StatusCode::OK, body, cfg.allow_max_age), account_id)
        }
        AuthorizeOutcome::BudgetExceeded {
            account_id,
            balance,
            budget,
        } => {
            let what = format!("the price {price} of route {route:?}");
            let resp = budget_required(cfg, &account_id, balance, price, &budget, &what);
            (resp, account_id)
        }
        AuthorizeOutcome::Denied {
            account_id,
            balance,
        } => {
            let detail = format!(
                "balance {balance} is below the price {price} of route {route:?}; top up the account"
            );
            let resp = payment_required(cfg, &account_id, balance, price, detail);
            (resp, account_id)
        }
        AuthorizeOutcome::UnknownCredential => (unknown_credential(cfg), UNKNOWN.to_owned()),
        AuthorizeOutcome::Disabled { account_id } => (account_disabled(cfg), account_id),
        AuthorizeOutcome::Conflict { account_id } => (request_id_conflict(), account_id),
    };
    with_log(resp, &account, Some(&rid))
}

// ---------------------------------------------------------------- /v1/refund

#[derive(Deserialize)]
struct RefundReq {
    request_id: String,
    account: String,
    /// Claimed cost: type-checked, otherwise ignored (the recorded cost is
    /// what gets credited back).
    #[serde(default)]
    #[allow(dead_code)]
    cost: Option<u64>,
    /// Upstream status that caused the refund; recorded.
    #[serde(default)]
    status: Option<u16>,
}

async fn refund(State(st): State<Shared>, JsonBody(req): JsonBody<RefundReq>) -> Response {
    let rid = req.request_id.clone();
    if rid.is_empty() {
        return bad_request("request_id must not be empty", None);
    }
    let store = st.store.clone();
    let outcome = match stored(store.refund(req.request_id, req.account, req.status)).await {
        Ok(o) => o,
        Err(resp) => return with_log(resp, UNKNOWN, Some(&rid)),
    };
    let (resp, account) = match outcome {
        RefundOutcome::Refunded {
            account_id,
            balance,
        } => (
            reply(
                StatusCode::OK,
                json!({ "refunded": true, "account_id": account_id, "balance": balance }),
                0,
            ),
            account_id,
        ),
        RefundOutcome::AlreadyRefunded {
            account_id,
            balance,
        } => (
            reply(
                StatusCode::OK,
                json!({
                    "refunded": false,
                    "reason": "already_refunded",
                    "account_id": account_id,
                    "balance": balance,
                }),
                0,
            ),
            account_id,
        ),
        RefundOutcome::UnknownRequest => (
            error(StatusCode::NOT_FOUND, "unknown_request"),
            UNKNOWN.to_owned(),
        ),
        RefundOutcome::Conflict { account_id } => (
            request_id_conflict(),
            account_id.unwrap_or_else(|| UNKNOWN.to_owned()),
        ),
        RefundOutcome::Overflow { account_id } => {
            (error(StatusCode::CONFLICT, "balance_overflow"), account_id)
        }
    };
    with_log(resp, &account, Some(&rid))
}

// ---------------------------------------------------------------- /v1/leases

#[derive(Deserialize)]
struct LeaseReq {
    account: String,
    want: u64,
    min: u64,
    request_id: String,
    holder: String,
}

/// Longest accepted `holder` (bytes).
const MAX_HOLDER: usize = 1024;

async fn lease(State(st): State<Shared>, JsonBody(req): JsonBody<LeaseReq>) -> Response {
    let rid = req.request_id.clone();
    let bad = |msg: &str| bad_request(msg, Some(&rid));
    if req.request_id.is_empty() {
        return bad("request_id must not be empty");
    }
    if req.holder.len() > MAX_HOLDER {
        return bad("holder must be at most 1024 bytes");
    }
    let (Ok(want), Ok(min)) = (i64::try_from(req.want), i64::try_from(req.min)) else {
        return bad("want and min must be at most 9223372036854775807");
    };
    if min < 1 || min > want {
        return bad("min must be at least 1 and at most want");
    }
    let store = st.store.clone();
    let outcome = match stored(store.lease(LeaseInput {
        credential: req.account,
        want,
        min,
        request_id: req.request_id,
        holder: req.holder,
    }))
    .await
    {
        Ok(o) => o,
        Err(resp) => return with_log(resp, UNKNOWN, Some(&rid)),
    };
    let cfg = &st.cfg;
    let (resp, account) = match outcome {
        LeaseOutcome::Granted {
            lease_id,
            granted,
            expires_in_ms,
            account_id,
            balance,
            replay,
            budget,
        } => {
            let mut body = json!({
                "lease_id": lease_id,
                "granted": granted,
                "expires_in_ms": expires_in_ms,
                "account_id": account_id,
                "balance": balance,
            });
            if replay {
                body["replay"] = Value::Bool(true);
            }
            if let Some(b) = &budget {
                body["budget"] = budget_json(b);
            }
            (reply(StatusCode::OK, body, 0), account_id)
        }
        LeaseOutcome::BudgetExceeded {
            account_id,
            balance,
            budget,
        } => {
            let what = format!("the minimum lease of {min} units");
            let resp = budget_required(cfg, &account_id, balance, min, &budget, &what);
            (resp, account_id)
        }
        LeaseOutcome::Denied {
            account_id,
            balance,
            recall: false,
        } => {
            let detail = format!(
                "balance {balance} is below the minimum lease of {min} units; top up the account"
            );
            let resp = payment_required(cfg, &account_id, balance, min, detail);
            (resp, account_id)
        }
        LeaseOutcome::Denied {
            account_id,
            balance,
            recall: true,
        } => {
            let resp = recall_required(cfg, &account_id, balance, min);
            (resp, account_id)
        }
        LeaseOutcome::UnknownCredential => (unknown_credential(cfg), UNKNOWN.to_owned()),
        LeaseOutcome::Disabled { account_id } => (account_disabled(cfg), account_id),
        LeaseOutcome::Conflict { account_id } => (request_id_conflict(), account_id),
        LeaseOutcome::HolderConflict { account_id } => (
            error(StatusCode::CONFLICT, "request_id belongs to another holder"),
            account_id,
        ),
        LeaseOutcome::Closed {
            account_id,
            lease_id,
            state,
        } => (lease_closed(lease_id, state), account_id),
    };
    with_log(resp, &account, Some(&rid))
}

#[derive(Deserialize)]
struct SettleReq {
    used: u64,
    #[serde(default, rename = "final")]
    is_final: bool,
    /// The holder's number of this settle (>= 1); absent: no ordering.
    #[serde(default)]
    seq: Option<u64>,
}

async fn settle(
    State(st): State<Shared>,
    Path(lease_id): Path<String>,
    JsonBody(req): JsonBody<SettleReq>,
) -> Response {
    let Ok(used) = i64::try_from(req.used) else {
        return bad_request("used out of range (max 9223372036854775807)", None);
    };
    let seq = match req.seq.map(i64::try_from) {
        None => None,
        Some(Ok(n)) if n >= 1 => Some(n),
        Some(_) => {
            return bad_request("seq must be between 1 and 9223372036854775807", None);
        }
    };
    let store = st.store.clone();
    let id = lease_id.clone();
    let outcome = match stored(store.settle(id, used, req.is_final, seq)).await {
        Ok(o) => o,
        Err(resp) => return with_log(resp, UNKNOWN, None),
    };
    let (resp, account, rid) = match outcome {
        SettleOutcome::Done(s) => {
            let mut body = json!({
                "lease_id": s.lease_id,
                "state": s.state.as_str(),
                "used": s.used,
                "granted": s.granted,
                "balance": s.balance,
                "seq": s.seq,
            });
            for (flag, set) in [
                ("recall", s.recall),
                ("stale", s.stale),
                ("replay", s.replay),
            ] {
                if set {
                    body[flag] = Value::Bool(true);
                }
            }
            (
                reply(StatusCode::OK, body, 0),
                s.account_id,
                Some(s.request_id),
            )
        }
        SettleOutcome::UnknownLease => (
            error(StatusCode::NOT_FOUND, "unknown_lease"),
            UNKNOWN.to_owned(),
            None,
        ),
        SettleOutcome::TooMuch {
            account_id,
            request_id,
            granted,
        } => (
            error(
                StatusCode::BAD_REQUEST,
                format!("used {used} exceeds the granted {granted}"),
            ),
            account_id,
            Some(request_id),
        ),
        SettleOutcome::AlreadySettled {
            account_id,
            request_id,
            used,
        } => (
            reply(
                StatusCode::CONFLICT,
                json!({ "error": "lease_settled", "used": used }),
                0,
            ),
            account_id,
            Some(request_id),
        ),
        SettleOutcome::Expired {
            account_id,
            request_id,
            charged,
        } => (
            reply(
                StatusCode::CONFLICT,
                json!({ "error": "lease_expired", "charged": charged }),
                0,
            ),
            account_id,
            Some(request_id),
        ),
        SettleOutcome::Cancelled {
            account_id,
            request_id,
        } => (
            reply(
                StatusCode::CONFLICT,
                json!({ "error": "lease_cancelled", "charged": 0 }),
                0,
            ),
            account_id,
            Some(request_id),
        ),
    };
    with_log(resp, &account, rid.as_deref())
}

#[derive(Deserialize)]
struct CancelReq {
    request_id: String,
}

async fn cancel(State(st): State<Shared>, JsonBody(req): JsonBody<CancelReq>) -> Response {
    let rid = req.request_id;
    if rid.is_empty() {
        return bad_request("request_id must not be empty", None);
    }
    let store = st.store.clone();
    let id = rid.clone();
    let outcome = match stored(store.cancel(id)).await {
        Ok(o) => o,
        Err(resp) => return with_log(resp, UNKNOWN, Some(&rid)),
    };
    let (resp, account) = match outcome {
        CancelOutcome::Cancelled {
            lease_id,
            account_id,
            balance,
        } => (
            reply(
                StatusCode::OK,
                json!({
                    "cancelled": true,
                    "lease_id": lease_id,
                    "account_id": account_id,
                    "balance": balance,
                }),
                0,
            ),
            account_id,
        ),
        CancelOutcome::AlreadyCancelled {
            lease_id,
            account_id,
            balance,
        } => (
            reply(
                StatusCode::OK,
                json!({
                    "cancelled": false,
                    "reason": "already_cancelled",
                    "lease_id": lease_id,
                    "account_id": account_id,
                    "balance": balance,
                }),
                0,
            ),
            account_id,
        ),
        CancelOutcome::UnknownLease => (
            error(StatusCode::NOT_FOUND, "unknown_lease"),
            UNKNOWN.to_owned(),
        ),
        CancelOutcome::InUse {
            lease_id,
            account_id,
            used,
        } => (
            reply(
                StatusCode::CONFLICT,
                json!({ "error": "lease_in_use", "lease_id": lease_id, "used": used }),
                0,
            ),
            account_id,
        ),
        CancelOutcome::Closed {
            lease_id,
            account_id,
            state,
        } => (lease_closed(lease_id, state), account_id),
    };
    with_log(resp, &account, Some(&rid))
}

// ---------------------------------------------------------------- /v1/leases/{id}/refund

#[derive(Deserialize)]
struct LeaseRefundReq {
    request_id: String,
    units: u64,
    /// Upstream status that caused the refund; recorded.
    #[serde(default)]
    status: Option<u16>,
}

async fn lease_refund(
    State(st): State<Shared>,
    Path(lease_id): Path<String>,
    JsonBody(req): JsonBody<LeaseRefundReq>,
) -> Response {
    let rid = req.request_id.clone();
    if rid.is_empty() {
        return bad_request("request_id must not be empty", None);
    }
    let units = match i64::try_from(req.units) {
        Ok(n) if n >= 1 => n,
        _ => {
            return bad_request(
                "units must be between 1 and 9223372036854775807",
                Some(&rid),
            )
        }
    };
    let store = st.store.clone();
    let outcome = match stored(store.lease_refund(LeaseRefundInput {
        lease_id,
        request_id: req.request_id,
        units,
        status: req.status,
    }))
    .await
    {
        Ok(o) => o,
        Err(resp) => return with_log(resp, UNKNOWN, Some(&rid)),
    };
    let (resp, account) = match outcome {
        LeaseRefundOutcome::Done(r) => {
            let mut body = json!({
                "refunded": true,
                "lease_id": r.lease_id,
                "units": r.units,
                "account_id": r.account_id,
                "balance": r.balance,
                "charged": r.charged,
            });
            for (flag, set) in [("pending", r.pending), ("replay", r.replay)] {
                if set {
                    body[flag] = Value::Bool(true);
                }
            }
            (reply(StatusCode::OK, body, 0), r.account_id)
        }
        LeaseRefundOutcome::UnknownLease => (
            error(StatusCode::NOT_FOUND, "unknown_lease"),
            UNKNOWN.to_owned(),
        ),
        LeaseRefundOutcome::Conflict { account_id } => (
            error(StatusCode::CONFLICT, "request_id belongs to another lease"),
            account_id,
        ),
        LeaseRefundOutcome::ExceedsCharge { account_id } => (
            error(StatusCode::CONFLICT, "refund_exceeds_charge"),
            account_id,
        ),
        LeaseRefundOutcome::Cancelled { account_id } => {
            (error(StatusCode::CONFLICT, "lease_cancelled"), account_id)
        }
        LeaseRefundOutcome::Overflow { account_id } => {
            (error(StatusCode::CONFLICT, "balance_overflow"), account_id)
        }
    };
    with_log(resp, &account, Some(&rid))
}

// ---------------------------------------------------------------- /v1 middleware

/// `/v1/*` needs the service token when one is configured (section 1.2).
async fn service_auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    match st.check_service_token(req.headers()) {
        Some(rejected) => rejected,
        None => next.run(req).await,
    }
}

/// Counts every call of a `/v1/*` route for `/admin/stats`, rejected ones
/// included; authorizes also by the account they resolved to.
async fn count_calls(
    State(st): State<Shared>,
    path: MatchedPath,
    req: Request,
    next: Next,
) -> Response {
    let s = &st.stats;
    let counter = match path.as_str() {
        "/v1/authorize" => &s.authorize_calls,
        "/v1/refund" => &s.refund_calls,
        "/v1/leases" => &s.lease_calls,
        "/v1/leases/{lease_id}/settle" => &s.settle_calls,
        "/v1/leases/cancel" => &s.cancel_calls,
        "/v1/leases/{lease_id}/refund" => &s.lease_refund_calls,
        "/v1/usage" | "/v1/leases/{lease_id}/usage" => &s.usage_calls,
        _ => return next.run(req).await,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let resp = next.run(req).await;
    if path.as_str() == "/v1/authorize" {
        let info = resp.extensions().get::<LogInfo>();
        s.count_account(info.map_or(UNKNOWN, |i| i.account.as_str()));
    }
    resp
}

// ---------------------------------------------------------------- admin

async fn admin_auth(State(st): State<Shared>, req: Request, next: Next) -> Response {
    let Some(expected) = st.cfg.admin_token.as_deref() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "admin API disabled");
    };
    if !bearer_matches(req.headers(), expected) {
        return error(StatusCode::UNAUTHORIZED, "admin token required");
    }
    next.run(req).await
}

/// Account ids appear in URL paths and logs: 1-128 characters from
/// `A-Z a-z 0-9 _ - . : @`, and not the reserved stats key "unknown".
pub fn valid_account_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != UNKNOWN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

#[derive(Deserialize)]
struct CreateReq {
    account_id: String,
    key: String,
    #[serde(default)]
    balance: i64,
    #[serde(default)]
    disabled: bool,
}

async fn create_account(State(st): State<Shared>, JsonBody(req): JsonBody<CreateReq>) -> Response {
    if !valid_account_id(&req.account_id) {
        return error(
            StatusCode::BAD_REQUEST,
            "account_id must be 1-128 characters of A-Z a-z 0-9 _ - . : @ (and not \"unknown\")",
        );
    }
    if req.key.is_empty() || req.key.len() > 4096 {
        return error(StatusCode::BAD_REQUEST, "key must be 1-4096 bytes");
    }
    if req.balance < 0 {
        return error(StatusCode::BAD_REQUEST, "balance must not be negative");
    }
    let store = st.store.clone();
    let (id, balance, disabled) = (req.account_id.clone(), req.balance, req.disabled);
    let outcome =
        match stored(store.create_account(req.account_id, req.key, balance, disabled)).await {
            Ok(o) => o,
            Err(resp) => return resp,
        };
    let resp = match outcome {
        CreateOutcome::Created => reply(
            StatusCode::CREATED,
            json!({ "account_id": id, "balance": balance, "disabled": disabled }),
            0,
        ),
        CreateOutcome::AccountExists => error(StatusCode::CONFLICT, "account already exists"),
        CreateOutcome::KeyExists => error(StatusCode::CONFLICT, "key already in use"),
    };
    with_log(resp, &id, None)
}

#[derive(Deserialize)]
struct TopupReq {
    amount: u64,
    #[serde(default)]
    topup_id: Option<String>,
}

async fn topup(
    State(st): State<Shared>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<TopupReq>,
) -> Response {
    let amount = match i64::try_from(req.amount) {
        Ok(a) if a > 0 => a,
        _ => {
            let resp = error(
                StatusCode::BAD_REQUEST,
                "amount must be between 1 and 9223372036854775807",
            );
            return with_log(resp, &id, None);
        }
    };
    if req.topup_id.as_deref() == Some("") {
        return with_log(
            error(StatusCode::BAD_REQUEST, "topup_id must not be empty"),
            &id,
            None,
        );
    }
    let store = st.store.clone();
    let account = id.clone();
    let outcome = match stored(store.topup(account, amount, req.topup_id)).await {
        Ok(o) => o,
        Err(resp) => return with_log(resp, &id, None),
    };
    let resp = match outcome {
        TopupOutcome::Done { balance, replay } => {
            let mut body = json!({ "account_id": id, "balance": balance });
            if replay {
                body["replay"] = Value::Bool(true);
            }
            reply(StatusCode::OK, body, 0)
        }
        TopupOutcome::UnknownAccount => error(StatusCode::NOT_FOUND, "unknown_account"),
        TopupOutcome::Conflict => {
            error(StatusCode::CONFLICT, "topup_id belongs to another account")
        }
        TopupOutcome::Overflow => error(StatusCode::BAD_REQUEST, "balance would overflow"),
    };
    with_log(resp, &id, None)
}

async fn set_disabled(st: Shared, id: String, disabled: bool) -> Response {
    let store = st.store.clone();
    let account = id.clone();
    let resp = match stored(store.set_disabled(account, disabled)).await {
        Ok(true) => reply(
            StatusCode::OK,
            json!({ "account_id": id, "disabled": disabled }),
            0,
        ),
        Ok(false) => error(StatusCode::NOT_FOUND, "unknown_account"),
        Err(resp) => resp,
    };
    with_log(resp, &id, None)
}

async fn disable(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    set_disabled(st, id, true).await
}

async fn enable(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    set_disabled(st, id, false).await
}

async fn get_account(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let store = st.store.clone();
    let account = id.clone();
    let resp = match stored(store.account(account)).await {
        Ok(Some(a)) => reply(
            StatusCode::OK,
            json!({
                "account_id": a.account_id,
                "balance": a.balance,
                "disabled": a.disabled,
                "charged": a.charged,
                "refunded": a.refunded,
                "charges": a.charges,
                "initial_balance": a.initial_balance,
                "topups": a.topups,
                "reserved": a.reserved,
                "leases": a.leases,
            }),
            0,
        ),
        Ok(None) => error(StatusCode::NOT_FOUND, "unknown_account"),
        Err(resp) => resp,
    };
    with_log(resp, &id, None)
}

async fn get_charges(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let store = st.store.clone();
    let account = id.clone();
    let rows = stored(store.charges(account)).await;
    account_list(&id, rows, |c| {
        json!({
            "request_id": c.request_id,
            "cost": c.cost,
            "route": c.route,
            "method": c.method,
            "path": c.path,
            "status": c.status.as_str(),
            "refund_status": c.refund_status,
            "at": c.at,
        })
    })
}

async fn get_leases(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let store = st.store.clone();
    let account = id.clone();
    let rows = stored(store.leases(account)).await;
    account_list(&id, rows, |l| {
        json!({
            "lease_id": l.lease_id,
            "holder": l.holder,
            "request_id": l.request_id,
            "granted": l.granted,
            "used": l.used,
            "state": l.state.as_str(),
            "charged": l.charged,
            "created_at": l.created_at,
            "expires_at": l.expires_at,
            "closed_at": l.closed_at,
            "refunded": l.refunded,
            "refund_pending": l.refund_pending,
            "settle_seq": l.settle_seq,
            "recalled_at": l.recalled_at,
        })
    })
}

/// An admin list of one account's rows: the rows as JSON, or 404 for an unknown account.
fn account_list<R>(
    id: &str,
    rows: Result<Option<Vec<R>>, Response>,
    to_json: impl Fn(R) -> Value,
) -> Response {
    let resp = match rows {
        Ok(Some(rows)) => reply(
            StatusCode::OK,
            Value::Array(rows.into_iter().map(to_json).collect()),
            0,
        ),
        Ok(None) => error(StatusCode::NOT_FOUND, "unknown_account"),
        Err(resp) => resp,
    };
    with_log(resp, id, None)
}

async fn stats(State(st): State<Shared>) -> Response {
    reply(StatusCode::OK, st.stats.snapshot(), 0)
}

async fn stats_reset(State(st): State<Shared>) -> Response {
    st.stats.reset();
    reply(StatusCode::OK, st.stats.snapshot(), 0)
}

// ---------------------------------------------------------------- plumbing

async fn healthz() -> Response {
    let mut resp = (StatusCode::OK, "ok").into_response();
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found")
}

async fn access_log(State(st): State<Shared>, req: Request, next: Next) -> Response {
    if st.cfg.quiet {
        return next.run(req).await;
    }
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let info = resp.extensions().get::<LogInfo>();
    let account = info.map_or("-", |i| i.account.as_str());
    let rid = info.and_then(|i| i.request_id.as_deref()).unwrap_or("-");
    tracing::info!(
        "{method} {path} {} account={account} request_id={rid:?} {}us",
        resp.status().as_u16(),
        start.elapsed().as_micros()
    );
    resp
}

pub fn router(store: Arc<Store>, cfg: Config) -> Router {
    let state: Shared = Arc::new(AppState {
        challenge_key: crate::mpp::ChallengeKey::new(cfg.x402.as_deref()),
        store,
        cfg,
        stats: Stats::default(),
        settling: payments::Settling::default(),
    });
    let admin = Router::new()
        .route("/admin/accounts", post(create_account))
        .route("/admin/accounts/{id}", get(get_account))
        .route("/admin/accounts/{id}/topup", post(topup))
        .route("/admin/accounts/{id}/disable", post(disable))
        .route("/admin/accounts/{id}/enable", post(enable))
        .route("/admin/accounts/{id}/charges", get(get_charges))
        .route("/admin/accounts/{id}/leases", get(get_leases))
        .route(
            "/admin/accounts/{id}/budget",
            get(budget_api::get_budget)
                .put(budget_api::put_budget)
                .delete(budget_api::delete_budget),
        )
        .route("/admin/charges", get(export::charges))
        .route("/admin/accounts/{id}/usage", get(usage::get_usage))
        .route("/admin/stats", get(stats))
        .route("/admin/stats/reset", post(stats_reset))
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_auth));
    let v1 = Router::new()
        .route("/v1/authorize", post(authorize))
        .route("/v1/refund", post(refund))
        .route("/v1/leases", post(lease))
        .route("/v1/leases/cancel", post(cancel))
        .route("/v1/leases/{lease_id}/settle", post(settle))
        .route("/v1/leases/{lease_id}/refund", post(lease_refund))
        .route("/v1/leases/{lease_id}/usage", post(usage::lease_usage))
        .route("/v1/usage", post(usage::usage))
        .route_layer(middleware::from_fn_with_state(state.clone(), service_auth))
        .route_layer(middleware::from_fn_with_state(state.clone(), count_calls));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .merge(admin)
        .merge(crate::ext_authz::router(state.store.clone(), &state.cfg))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            payments::gate,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// How often open leases past their expiry are expired.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Background task: applies the expiry policy to due leases every
/// `SWEEP_EVERY` (the first sweep runs at once, catching leases that ran out
/// while the service was down). Errors are logged and retried next time.
async fn sweep_expired_leases(store: Arc<Store>, quiet: bool) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store.expire_due().await {
            Ok(0) => {}
            Ok(n) => {
                if !quiet {
                    tracing::info!("expired {n} lease(s)");
                }
            }
            Err(e) => tracing::error!(cause = %e, "lease expiry failed"),
        }
    }
}

/// Opens the store, binds, prints the listening line, serves until SIGINT
/// or SIGTERM.
pub async fn run(cfg: Config) -> Result<(), String> {
    let url = &cfg.database_url;
    let store = Store::open(url, cfg.sync)
        .await
        .map_err(|e| format!("cannot open {}: {e}", url.display()))?;
    if let Some(w) = store.warning() {
        tracing::warn!("{w}");
    }
    let store = store.with_lease_settings(LeaseSettings {
        ttl_ms: i64::try_from(cfg.lease_ttl_ms).unwrap_or(i64::MAX),
        max_units: cfg
            .lease_max_units
            .map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
        policy: cfg.lease_expiry_policy,
    });
    let store = store.with_alerts(match &cfg.webhook {
        Some(w) => AlertSettings {
            enabled: true,
            low_balance: w.low_balance.clone(),
            budget_percent: w.budget_percent.clone(),
        },
        None => AlertSettings::default(),
    });
    if cfg.seed_demo {
        let n = store
            .seed_demo()
            .await
            .map_err(|e| format!("cannot seed demo accounts: {e}"))?;
        tracing::info!("demo accounts created: {n}");
    }
    if cfg.admin_token.is_none() {
        tracing::info!("no admin token: the admin API answers 503");
    }
    if let Some(x402) = &cfg.x402 {
        payments::check_supported(x402).await?;
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the bound address: {e}"))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "farebox-balance listening on {addr}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write to stdout: {e}"))?;
    }
    let store = Arc::new(store);
    let sweeper = tokio::spawn(sweep_expired_leases(store.clone(), cfg.quiet));
    // Webhook delivery runs on its own: a slow or failing receiver never
    // holds up a debit (the debit only writes the outbox row).
    let deliverer = cfg
        .webhook
        .as_ref()
        .map(|w| tokio::spawn(crate::webhooks::run(store.clone(), (**w).clone())));
    let app = router(store, cfg);
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| format!("server error: {e}"))?;
    sweeper.abort();
    if let Some(d) = deliverer {
        d.abort();
    }
    tracing::info!("shut down");
    Ok(())
}
