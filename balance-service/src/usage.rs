//! `POST /v1/usage`: settles the final cost of a metered request (an LLM
//! answer priced by its `usage`, for instance). Contract:
//! `docs/balance-service.md`, "Usage (metered responses)".
//!
//! This file is a child module of `service` (declared there with `#[path]`),
//! so it shares the service's private helpers and state.

use super::{bad_request, error, reply, stored, with_log, JsonBody, Shared, UNKNOWN};
use crate::store::{LeaseUsageOutcome, TokenCounts, UsageItemRow, UsageLine, UsageOutcome};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
pub(super) struct UsageReq {
    request_id: String,
    account: String,
    actual: u64,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tokens: Option<TokensReq>,
}

/// A usage line's members (contract 9.1): all absent, or `route` and `tokens` given.
struct LineReq {
    route: Option<String>,
    model: Option<String>,
    tokens: Option<TokensReq>,
}

/// Tokens per class; a class left out is 0.
#[derive(Deserialize)]
pub(super) struct TokensReq {
    #[serde(default)]
    input: u64,
    #[serde(default)]
    cached_input: u64,
    #[serde(default)]
    cache_creation_input: u64,
    #[serde(default)]
    output: u64,
    #[serde(default)]
    reasoning: u64,
}

/// Longest route or model name recorded.
const MAX_NAME_LEN: usize = 256;

impl LineReq {
    /// The line, `None` when the call carries none, or why it is refused.
    fn line(self) -> Result<Option<UsageLine>, &'static str> {
        let (route, tokens) = match (self.route, self.tokens) {
            (None, None) if self.model.is_none() => return Ok(None),
            (Some(r), Some(t)) => (r, t),
            _ => return Err("a usage line needs both route and tokens"),
        };
        if route.is_empty() || route.len() > MAX_NAME_LEN {
            return Err("route must be 1 to 256 bytes");
        }
        if self.model.as_ref().is_some_and(|m| m.len() > MAX_NAME_LEN) {
            return Err("model must be at most 256 bytes");
        }
        let count =
            |n: u64| i64::try_from(n).map_err(|_| "tokens out of range (max 9223372036854775807)");
        Ok(Some(UsageLine {
            route,
            model: self.model,
            tokens: TokenCounts {
                input: count(tokens.input)?,
                cached_input: count(tokens.cached_input)?,
                cache_creation_input: count(tokens.cache_creation_input)?,
                output: count(tokens.output)?,
                reasoning: count(tokens.reasoning)?,
            },
        }))
    }
}

/// What both usage calls check before the ledger: a request id, an amount of units
/// (`field`) that fits the ledger's integers, and a well-formed usage line if any.
fn checked(
    rid: &str,
    amount: u64,
    field: &str,
    line: LineReq,
) -> Result<(i64, Option<UsageLine>), Box<Response>> {
    if rid.is_empty() {
        return Err(Box::new(bad_request("request_id must not be empty", None)));
    }
    let Ok(amount) = i64::try_from(amount) else {
        return Err(Box::new(bad_request(
            format!("{field} out of range (max 9223372036854775807)"),
            Some(rid),
        )));
    };
    let line = line
        .line()
        .map_err(|why| Box::new(bad_request(why, Some(rid))))?;
    Ok((amount, line))
}

pub(super) async fn usage(State(st): State<Shared>, JsonBody(req): JsonBody<UsageReq>) -> Response {
    let rid = req.request_id.clone();
    let line = LineReq {
        route: req.route,
        model: req.model,
        tokens: req.tokens,
    };
    let (actual, line) = match checked(&rid, req.actual, "actual", line) {
        Ok(checked) => checked,
        Err(resp) => return *resp,
    };
    let store = st.store.clone();
    let outcome = match stored(store.usage(req.request_id, req.account, actual, line)).await {
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

#[derive(Deserialize)]
pub(super) struct LeaseUsageReq {
    request_id: String,
    units: u64,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    tokens: Option<TokensReq>,
}

/// `POST /v1/leases/{lease_id}/usage`: the usage line of a request paid from the
/// lease (contract 4.8). Records it once per request id; moves no money.
pub(super) async fn lease_usage(
    State(st): State<Shared>,
    Path(lease_id): Path<String>,
    JsonBody(req): JsonBody<LeaseUsageReq>,
) -> Response {
    let rid = req.request_id.clone();
    let line = LineReq {
        route: req.route,
        model: req.model,
        tokens: req.tokens,
    };
    let (units, line) = match checked(&rid, req.units, "units", line) {
        Ok((units, Some(line))) => (units, line),
        Ok((_, None)) => {
            return bad_request("a usage line needs both route and tokens", Some(&rid))
        }
        Err(resp) => return *resp,
    };
    let store = st.store.clone();
    let outcome =
        match stored(store.lease_usage(lease_id.clone(), req.request_id, units, line)).await {
            Ok(o) => o,
            Err(resp) => return with_log(resp, UNKNOWN, Some(&rid)),
        };
    let (resp, account) = match outcome {
        LeaseUsageOutcome::Recorded { account_id, replay } => {
            let mut body = json!({
                "recorded": true,
                "request_id": rid,
                "lease_id": lease_id,
                "account_id": account_id,
                "units": units,
            });
            if replay {
                body["replay"] = Value::Bool(true);
            }
            (reply(StatusCode::OK, body, 0), account_id)
        }
        LeaseUsageOutcome::UnknownLease => (
            error(StatusCode::NOT_FOUND, "unknown_lease"),
            UNKNOWN.to_owned(),
        ),
        LeaseUsageOutcome::Conflict { account_id } => {
            (error(StatusCode::CONFLICT, "usage_recorded"), account_id)
        }
    };
    with_log(resp, &account, Some(&rid))
}

/// `GET /admin/accounts/{id}/usage`: the account's usage lines, oldest first, and
/// their sums per route and model (the itemised bill).
pub(super) async fn get_usage(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let store = st.store.clone();
    let resp = match stored(store.usage_items(id.clone())).await {
        Ok(Some(items)) => reply(StatusCode::OK, itemised(&items), 0),
        Ok(None) => error(StatusCode::NOT_FOUND, "unknown_account"),
        Err(resp) => resp,
    };
    with_log(resp, &id, None)
}

fn tokens_json(t: &TokenCounts) -> Value {
    json!({
        "input": t.input,
        "cached_input": t.cached_input,
        "cache_creation_input": t.cache_creation_input,
        "output": t.output,
        "reasoning": t.reasoning,
    })
}

/// Sums over `items` per (route, model), in the order each pair first appears.
/// Amounts are summed in i128 and saturate at i64::MAX (never wrap).
fn itemised(items: &[UsageItemRow]) -> Value {
    struct Sum {
        route: String,
        model: Option<String>,
        requests: i64,
        tokens: [i128; 5],
        units: i128,
    }
    let mut sums: Vec<Sum> = Vec::new();
    let mut total: i128 = 0;
    for it in items {
        let l = &it.line;
        let pos = match sums
            .iter()
            .position(|s| s.route == l.route && s.model == l.model)
        {
            Some(p) => p,
            None => {
                sums.push(Sum {
                    route: l.route.clone(),
                    model: l.model.clone(),
                    requests: 0,
                    tokens: [0; 5],
                    units: 0,
                });
                sums.len() - 1
            }
        };
        let t = &l.tokens;
        if let Some(s) = sums.get_mut(pos) {
            s.requests += 1;
            for (acc, n) in s.tokens.iter_mut().zip([
                t.input,
                t.cached_input,
                t.cache_creation_input,
                t.output,
                t.reasoning,
            ]) {
                *acc += i128::from(n);
            }
            s.units += i128::from(it.units);
        }
        total += i128::from(it.units);
    }
    let clamp = |n: i128| i64::try_from(n).unwrap_or(i64::MAX);
    let by_route_model: Vec<Value> = sums
        .iter()
        .map(|s| {
            let [input, cached_input, cache_creation_input, output, reasoning] =
                s.tokens.map(clamp);
            json!({
                "route": s.route,
                "model": s.model,
                "requests": s.requests,
                "tokens": tokens_json(&TokenCounts { input, cached_input, cache_creation_input, output, reasoning }),
                "units": clamp(s.units),
            })
        })
        .collect();
    let items: Vec<Value> = items
        .iter()
        .map(|it| {
            json!({
                "request_id": it.request_id,
                "lease_id": it.lease_id,
                "route": it.line.route,
                "model": it.line.model,
                "tokens": tokens_json(&it.line.tokens),
                "units": it.units,
                "at": it.at,
            })
        })
        .collect();
    json!({"items": items, "by_route_model": by_route_model, "units": clamp(total)})
}
