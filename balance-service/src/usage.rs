//! `POST /v1/usage`: settles the final cost of a metered request (an LLM
//! answer priced by its `usage`, for instance). Contract:
//! `docs/balance-service.md`, "Usage (metered responses)".
//!
//! This file is a child module of `service` (declared there with `#[path]`),
//! so it shares the service's private helpers and state.

use super::{bad_request, error, reply, stored, with_log, JsonBody, Shared, UNKNOWN};
use crate::store::UsageOutcome;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
pub(super) struct UsageReq {
    request_id: String,
    account: String,
    actual: u64,
}

pub(super) async fn usage(State(st): State<Shared>, JsonBody(req): JsonBody<UsageReq>) -> Response {
    let rid = req.request_id.clone();
    if rid.is_empty() {
        return bad_request("request_id must not be empty", None);
    }
    let Ok(actual) = i64::try_from(req.actual) else {
        return bad_request("actual out of range (max 9223372036854775807)", Some(&rid));
    };
    let store = st.store.clone();
    let outcome = match stored(store.usage(req.request_id, req.account, actual)).await {
        Ok(o) => o,
        Err(resp) => return with_log(resp, UNKNOWN, Some(&rid)),
    };
    let (resp, account) = match outcome {
        UsageOutcome::Settled {
            account_id,
            balance,
            replay,
        } => {
            let mut body = json!({
                "request_id": rid,
                "account_id": account_id,
                "cost": actual,
                "balance": balance,
            });
            if replay {
                body["replay"] = Value::Bool(true);
            }
            (reply(StatusCode::OK, body, 0), account_id)
        }
        UsageOutcome::UnknownCredential => (
            reply(
                StatusCode::UNAUTHORIZED,
                json!({ "error": "unknown_credential" }),
                0,
            ),
            UNKNOWN.to_owned(),
        ),
        UsageOutcome::Conflict { account_id } => (
            error(
                StatusCode::CONFLICT,
                "request_id belongs to another account",
            ),
            account_id,
        ),
        UsageOutcome::Final { account_id, cost } => (
            reply(
                StatusCode::CONFLICT,
                json!({ "error": "usage_final", "cost": cost }),
                0,
            ),
            account_id,
        ),
        UsageOutcome::Refunded { account_id } => {
            (error(StatusCode::CONFLICT, "charge_refunded"), account_id)
        }
        UsageOutcome::Overflow { account_id } => {
            (error(StatusCode::CONFLICT, "balance_overflow"), account_id)
        }
    };
    with_log(resp, &account, Some(&rid))
}
