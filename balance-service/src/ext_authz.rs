//! Envoy `ext_authz` front end of the ledger (the HTTP-service flavour of
//! `envoy.filters.http.ext_authz`).
//!
//! This lets Envoy's own external-authorization filter charge the same ledger
//! as the farebox wasm filter, with exactly the same work per request (one
//! call to [`Store::authorize`], i.e. the one `BEGIN IMMEDIATE` transaction of
//! `/v1/authorize`). It exists for the benchmark (`make bench`), which compares
//! the two, and as a fallback for operators who cannot load wasm.
//!
//! Envoy's HTTP ext_authz protocol: for every client request Envoy sends the
//! authorization service a request with the client's method, the path
//! `<path_prefix><client path>` and the client headers allowed by the filter's
//! `allowed_headers`, with an empty body. A `200` lets the request through (the
//! answer's headers listed in `allowed_upstream_headers` are set on the
//! upstream request, replacing a client's copy); any other status is sent to
//! the client as the answer, with its body and headers.
//!
//! Served under [`PREFIX`] (configure `path_prefix: /ext_authz`):
//!
//! | input | from |
//! | --- | --- |
//! | credential | the `x-api-key` header (allow it in `allowed_headers`) |
//! | request id (idempotency key of the charge) | the `x-request-id` header, Envoy's own (allow it in `allowed_headers`); required |
//! | cost | the `x-farebox-cost` header if present (set it with `headers_to_add`, never from the client), else 1 |
//! | route | the `x-farebox-route` header if present, else `ext_authz` |
//! | method, path | the request's method and its path without the prefix, with the query |
//!
//! | answer | when |
//! | --- | --- |
//! | `200`, `x-farebox-account: <account id>`, empty body | debited (or a replay of the same request id) |
//! | `402` problem+json with `balance`, `price`, `route` | balance below the cost |
//! | `401` problem+json and `WWW-Authenticate` | no, malformed or unknown credential |
//! | `403` problem+json | account disabled |
//! | `409` problem+json | the request id was charged to another account |
//! | `400` `{"error"}` | no `x-request-id`, or a bad `x-farebox-cost` (a configuration error) |
//! | `500` `{"error"}` | storage failure, or a missing/wrong service token |
//!
//! With `--service-token`, the call must carry `authorization: Bearer <token>`
//! (in Envoy: `authorization_request.headers_to_add`, which replaces the
//! client's `authorization` header on the call). Every answer carries
//! `Cache-Control: no-store`: ext_authz does not cache, so every request is
//! one ledger transaction.

use crate::config::Config;
use crate::store::{AuthorizeInput, AuthorizeOutcome, Store};
use crate::util::{bearer_token, ct_eq};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use serde_json::{json, Value};
use std::sync::Arc;

/// Path prefix of the ext_authz calls (Envoy's `http_service.path_prefix`).
pub const PREFIX: &str = "/ext_authz";
/// Header holding the client's credential.
pub const CREDENTIAL_HEADER: &str = "x-api-key";
/// Optional header with the cost of the request (set by Envoy's configuration).
pub const COST_HEADER: &str = "x-farebox-cost";
/// Optional header with the route name recorded with the charge.
pub const ROUTE_HEADER: &str = "x-farebox-route";
/// Header of the allow answer naming the account (for `allowed_upstream_headers`).
pub const ACCOUNT_HEADER: &str = "x-farebox-account";
/// Cost when [`COST_HEADER`] is absent.
pub const DEFAULT_COST: i64 = 1;
/// Route name when [`ROUTE_HEADER`] is absent.
pub const DEFAULT_ROUTE: &str = "ext_authz";

const PROBLEM_BASE: &str = "https://farebox.dev/problems/";
const MAX_CREDENTIAL: usize = 4096;
const MAX_REQUEST_ID: usize = 256;

struct ExtAuthz {
    store: Arc<Store>,
    service_token: Option<String>,
}

/// The ext_authz routes, to be merged into the service's router.
pub fn router<S>(store: Arc<Store>, cfg: &Config) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    let state = Arc::new(ExtAuthz {
        store,
        service_token: cfg.service_token.clone(),
    });
    Router::new()
        .route(PREFIX, any(check))
        .route("/ext_authz/", any(check))
        .route("/ext_authz/{*rest}", any(check))
        .with_state(state)
}

fn no_store(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error(status: StatusCode, msg: &str) -> Response {
    no_store((status, axum::Json(json!({ "error": msg }))).into_response())
}

fn problem(status: StatusCode, kind: &str, title: &str, detail: &str, extra: Value) -> Response {
    let mut body = json!({
        "type": format!("{PROBLEM_BASE}{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let (Some(map), Value::Object(more)) = (body.as_object_mut(), extra) {
        map.extend(more);
    }
    let mut resp = (status, body.to_string()).into_response();
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    no_store(resp)
}

fn unauthorized(detail: &str) -> Response {
    let mut resp = problem(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
        Value::Null,
    );
    resp.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("ApiKey realm=\"farebox\", header=\"x-api-key\""),
    );
    resp
}

/// The single value of `name`, or `Err` if it is repeated. Envoy joins
/// repeated client headers with commas, so a comma also makes a value ambiguous.
fn single<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a [u8]>, ()> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first.map(HeaderValue::as_bytes))
}

/// Visible ASCII without commas, 1..=max bytes (the filter's own rule).
fn token_text(value: &[u8], max: usize) -> Option<&str> {
    let ok = !value.is_empty()
        && value.len() <= max
        && value
            .iter()
            .all(|b| (0x21..=0x7e).contains(b) && *b != b',');
    if ok {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// The client's path and query, without the prefix.
fn client_path(uri: &Uri) -> String {
    let full = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    let rest = full.strip_prefix(PREFIX).unwrap_or(full);
    if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    }
}

async fn check(
    State(st): State<Arc<ExtAuthz>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if let Some(expected) = st.service_token.as_deref() {
        let ok = headers
            .get(AUTHORIZATION)
            .and_then(|v| bearer_token(v.as_bytes()))
            .is_some_and(|t| ct_eq(t, expected.as_bytes()));
        if !ok {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "service token rejected");
        }
    }
    let credential = match single(&headers, CREDENTIAL_HEADER) {
        Ok(Some(v)) => match token_text(v, MAX_CREDENTIAL) {
            Some(c) => c.to_owned(),
            None => return unauthorized("the credential is malformed"),
        },
        Ok(None) => return unauthorized("no credential: send it in the x-api-key header"),
        Err(()) => return unauthorized("the credential is malformed"),
    };
    let request_id = match single(&headers, "x-request-id") {
        Ok(Some(v)) => match token_text(v, MAX_REQUEST_ID) {
            Some(id) => id.to_owned(),
            None => return error(StatusCode::BAD_REQUEST, "malformed x-request-id"),
        },
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "no x-request-id: add it to the ext_authz filter's allowed_headers",
            )
        }
    };
    let cost = match single(&headers, COST_HEADER) {
        Ok(None) => DEFAULT_COST,
        Ok(Some(v)) => match std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        {
            Some(c) if c >= 0 => c,
            _ => return error(StatusCode::BAD_REQUEST, "bad x-farebox-cost"),
        },
        Err(()) => return error(StatusCode::BAD_REQUEST, "bad x-farebox-cost"),
    };
    let route = match single(&headers, ROUTE_HEADER) {
        Ok(None) => DEFAULT_ROUTE.to_owned(),
        Ok(Some(v)) => match token_text(v, 256) {
            Some(r) => r.to_owned(),
            None => return error(StatusCode::BAD_REQUEST, "bad x-farebox-route"),
        },
        Err(()) => return error(StatusCode::BAD_REQUEST, "bad x-farebox-route"),
    };
    let path = client_path(&uri);
    let store = st.store.clone();
    let route_for_store = route.clone();
    let outcome = store
        .authorize(AuthorizeInput {
            credential,
            cost,
            route: route_for_store,
            method: method.as_str().to_owned(),
            path,
            request_id,
        })
        .await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(cause = %e, "ext_authz: storage error");
            return if e.is_unavailable() {
                error(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
            } else {
                error(StatusCode::INTERNAL_SERVER_ERROR, "internal")
            };
        }
    };
    match outcome {
        AuthorizeOutcome::Allowed { account_id, .. } => {
            let mut resp = no_store(StatusCode::OK.into_response());
            match HeaderValue::try_from(account_id) {
                Ok(v) => {
                    resp.headers_mut()
                        .insert(HeaderName::from_static(ACCOUNT_HEADER), v);
                    resp
                }
                // Account ids are validated at creation; never forward an allow
                // without the account.
                Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "bad account id"),
            }
        }
        AuthorizeOutcome::Denied { balance, .. } => problem(
            StatusCode::PAYMENT_REQUIRED,
            "payment-required",
            "Payment Required",
            &format!(
                "balance {balance} is below the price {cost} of route {route:?}; top up the account"
            ),
            json!({ "balance": balance, "price": cost, "route": route }),
        ),
        AuthorizeOutcome::BudgetExceeded {
            balance, budget, ..
        } => problem(
            StatusCode::PAYMENT_REQUIRED,
            "payment-required",
            "Payment Required",
            &crate::service::budget_detail(
                &budget,
                &format!("the price {cost} of route {route:?}"),
            ),
            json!({
                "balance": balance,
                "price": cost,
                "route": route,
                "budget": crate::service::budget_json(&budget),
            }),
        ),
        AuthorizeOutcome::UnknownCredential => unauthorized("unknown credential"),
        AuthorizeOutcome::Disabled { .. } => problem(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            "this credential may not be used",
            Value::Null,
        ),
        AuthorizeOutcome::Conflict { .. } => problem(
            StatusCode::CONFLICT,
            "conflict",
            "Conflict",
            "the request id belongs to another account",
            Value::Null,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_path_strips_the_prefix() {
        let p = |s: &str| client_path(&s.parse::<Uri>().unwrap_or_default());
        assert_eq!(p("/ext_authz/v1/data?x=1"), "/v1/data?x=1");
        assert_eq!(p("/ext_authz"), "/");
        assert_eq!(p("/ext_authz/"), "/");
        assert_eq!(p("/ext_authz?a=b"), "/?a=b");
    }

    #[test]
    fn token_text_rules() {
        assert_eq!(token_text(b"abc", 10), Some("abc"));
        assert_eq!(token_text(b"", 10), None);
        assert_eq!(token_text(b"a,b", 10), None);
        assert_eq!(token_text(b"a b", 10), None);
        assert_eq!(token_text(b"abcdef", 3), None);
    }
}
