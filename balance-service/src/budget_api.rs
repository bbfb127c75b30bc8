//! The admin API of budgets: `PUT`, `GET` and `DELETE
//! /admin/accounts/{id}/budget` (docs/balance-service.md, "Budgets").

use super::*;
use crate::store::{BudgetOutcome, BudgetSpec, Period};

#[derive(Deserialize)]
pub(super) struct BudgetReq {
    limit: u64,
    period: String,
    time_zone: String,
}

/// The answer of a budget call: the budget, or why there is none.
fn answer(
    id: &str,
    outcome: Result<BudgetOutcome, Response>,
    extra: Option<(&str, Value)>,
) -> Response {
    let resp = match outcome {
        Ok(BudgetOutcome::Budget(b)) => {
            let mut body = json!({ "account_id": id, "budget": budget_json(&b) });
            if let Some((k, v)) = extra {
                body[k] = v;
            }
            reply(StatusCode::OK, body, 0)
        }
        Ok(BudgetOutcome::NoBudget) => error(StatusCode::NOT_FOUND, "no_budget"),
        Ok(BudgetOutcome::UnknownAccount) => error(StatusCode::NOT_FOUND, "unknown_account"),
        Err(resp) => resp,
    };
    with_log(resp, id, None)
}

pub(super) async fn put_budget(
    State(st): State<Shared>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<BudgetReq>,
) -> Response {
    let bad = |msg: String| with_log(error(StatusCode::BAD_REQUEST, msg), &id, None);
    let Ok(limit) = i64::try_from(req.limit) else {
        return bad("limit must be between 0 and 9223372036854775807".to_owned());
    };
    let Some(period) = Period::parse(&req.period) else {
        return bad(format!(
            "period must be day, week or month, got {:?}",
            req.period
        ));
    };
    if crate::store::rules::time_zone(&req.time_zone).is_none() {
        return bad(format!(
            "time_zone must be an IANA time zone name (e.g. Europe/Berlin or UTC), got {:?}",
            req.time_zone
        ));
    }
    let spec = BudgetSpec {
        limit,
        period,
        time_zone: req.time_zone,
    };
    let outcome = stored(st.store.set_budget(id.clone(), spec)).await;
    answer(&id, outcome, None)
}

pub(super) async fn get_budget(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let outcome = stored(st.store.budget(id.clone())).await;
    answer(&id, outcome, None)
}

pub(super) async fn delete_budget(State(st): State<Shared>, Path(id): Path<String>) -> Response {
    let outcome = stored(st.store.clear_budget(id.clone())).await;
    answer(&id, outcome, Some(("cleared", Value::Bool(true))))
}
