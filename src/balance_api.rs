//! The wire contract with the balance service (docs/balance-service.md):
//! request bodies we send and the answers we accept.

use std::fmt;

use serde_json::{json, Value};

use crate::amount::MAX_AMOUNT;
use crate::config::Config;
use crate::decision::{Decision, Denial, Paid};
use crate::host::Host;
use crate::lease::Grant;
use crate::payments::{self, Offer, Payment};
use crate::tokens::Tokens;

/// Larger answers are not read: no sane decision needs more, and a lying
/// service must not make us copy megabytes into the VM.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
const MAX_DETAIL_CHARS: usize = 512;
const MAX_ACCOUNT_ID_LEN: usize = 256;
/// A day: a longer lease is taken as a day (the filter settles long before).
const MAX_LEASE_MS: u64 = 86_400_000;

/// An answer to a callout as the host delivered it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CalloutResponse {
    /// `None` when the host gave no `:status` (or an unreadable one).
    pub status: Option<u16>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// The host reported a body larger than [`MAX_ANSWER_BYTES`]; `body` is empty then.
    pub body_too_large: bool,
}

impl CalloutResponse {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// A decision and how long it may be reused (`None`: ask every time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub max_age_s: Option<u32>,
}

/// Why an answer could not be used. Every one of these is handled by `failure_mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceFailure {
    /// No status at all: the call never completed.
    NoAnswer,
    /// Envoy's own answer for a failed call (503 unreachable, 504 timeout) or the service's 5xx.
    Unavailable(u16),
    /// A status the contract does not define.
    UnexpectedStatus(u16),
    /// The body is not what the contract says.
    BadAnswer(&'static str),
    TooLarge,
}

impl ServiceFailure {
    /// A stable, machine-readable name of the failure, written as `code=…` in the log line
    /// (operators and tests match on it, not on the wording).
    pub fn code(&self) -> &'static str {
        match self {
            ServiceFailure::NoAnswer => "no_answer",
            // Envoy synthesizes 504 for a callout that timed out.
            ServiceFailure::Unavailable(504) => "service_timeout",
            ServiceFailure::Unavailable(_) => "service_unavailable",
            ServiceFailure::UnexpectedStatus(_) => "unexpected_status",
            ServiceFailure::BadAnswer(_) => "bad_answer",
            ServiceFailure::TooLarge => "answer_too_large",
        }
    }
}

impl fmt::Display for ServiceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code={}: ", self.code())?;
        match self {
            ServiceFailure::NoAnswer => f.write_str("no answer from the balance service"),
            ServiceFailure::Unavailable(s) => write!(f, "balance service unavailable (status {s})"),
            ServiceFailure::UnexpectedStatus(s) => write!(
                f,
                "balance service answered status {s}, which the contract does not define"
            ),
            ServiceFailure::BadAnswer(why) => write!(f, "balance service answer rejected: {why}"),
            ServiceFailure::TooLarge => write!(
                f,
                "balance service answer larger than {MAX_ANSWER_BYTES} bytes"
            ),
        }
    }
}

pub struct AuthorizeRequest<'a> {
    /// `None` for an anonymous request (no credential; it may carry a payment).
    pub account: Option<&'a str>,
    pub cost: u64,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub request_id: &'a str,
    pub payment: Option<&'a Payment>,
}

pub fn authorize_body(r: &AuthorizeRequest<'_>) -> Vec<u8> {
    let mut body = json!({
        "account": r.account,
        "cost": r.cost,
        "route": r.route,
        "method": r.method,
        "path": r.path,
        "request_id": r.request_id,
    });
    if let (Some(p), Some(obj)) = (r.payment, body.as_object_mut()) {
        obj.insert("payment".into(), Value::String(p.value.clone()));
        obj.insert("payment_scheme".into(), Value::String(p.scheme.into()));
    }
    body.to_string().into_bytes()
}

/// Starts a call to the balance service with the contract's headers.
pub fn call(
    host: &impl Host,
    cfg: &Config,
    path: &str,
    request_id: &str,
    body: &[u8],
) -> Result<u32, String> {
    let auth = cfg.service_token.as_ref().map(|t| format!("Bearer {t}"));
    let mut headers = vec![
        (":method", "POST"),
        (":path", path),
        (":authority", cfg.authority.as_str()),
        ("content-type", "application/json"),
        ("x-request-id", request_id),
    ];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    host.dispatch(&cfg.cluster, &headers, body, cfg.timeout)
}

/// What one metered response is billed for, so the ledger can itemise it (contract 9.1):
/// the route rule's name, the model it was priced by, and its tokens per class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLine {
    pub route: String,
    pub model: Option<String>,
    pub tokens: Tokens,
}

impl UsageLine {
    /// Adds the line's members to a usage body.
    fn put(&self, body: &mut Value) {
        let t = &self.tokens;
        if let Some(obj) = body.as_object_mut() {
            obj.insert("route".into(), Value::String(self.route.clone()));
            obj.insert("model".into(), json!(self.model));
            obj.insert(
                "tokens".into(),
                json!({
                    "input": t.input,
                    "cached_input": t.cached_input,
                    "cache_creation_input": t.cache_creation_input,
                    "output": t.output,
                    "reasoning": t.reasoning,
                }),
            );
        }
    }
}

/// `POST /v1/usage`: the final cost of a request paid through authorize (or an overage),
/// with its usage line when it has one.
pub fn usage_body(
    request_id: &str,
    account: &str,
    actual: u64,
    line: Option<&UsageLine>,
) -> Vec<u8> {
    let mut body = json!({"request_id": request_id, "account": account, "actual": actual});
    if let Some(line) = line {
        line.put(&mut body);
    }
    body.to_string().into_bytes()
}

/// `POST /v1/leases/{id}/usage` (4.8): the usage line of a request paid from a lease.
/// It records what the lease's settles pay for; it moves no money.
pub fn lease_usage_body(request_id: &str, units: u64, line: &UsageLine) -> Vec<u8> {
    let mut body = json!({"request_id": request_id, "units": units});
    line.put(&mut body);
    body.to_string().into_bytes()
}

pub fn refund_body(request_id: &str, account: &str, cost: u64, status: u16) -> Vec<u8> {
    json!({"request_id": request_id, "account": account, "cost": cost, "status": status})
        .to_string()
        .into_bytes()
}

/// Reads an authorize answer. `cost` fills in the price of a 402 that gives none;
/// `max_ttl_s` caps how long any answer may be cached.
pub fn parse_authorize(
    resp: &CalloutResponse,
    cost: u64,
    max_ttl_s: u32,
) -> Result<Verdict, ServiceFailure> {
    let status = resp.status.ok_or(ServiceFailure::NoAnswer)?;
    if resp.body_too_large {
        return Err(ServiceFailure::TooLarge);
    }
    let decision = match status {
        200 => {
            let body = json_object(&resp.body)?;
            if body.get("allow") != Some(&Value::Bool(true)) {
                return Err(ServiceFailure::BadAnswer(
                    "a 200 answer must carry \"allow\": true",
                ));
            }
            let account_id = match body.get("account_id").and_then(Value::as_str) {
                Some(a) if valid_account_id(a) => a.to_string(),
                Some(_) => {
                    return Err(ServiceFailure::BadAnswer(
                        "account_id is empty, too long or not a valid header value",
                    ))
                }
                None => {
                    return Err(ServiceFailure::BadAnswer(
                        "a 200 answer must carry a string account_id",
                    ))
                }
            };
            let balance = optional_i64(body.get("balance"))?;
            let object = |k: &str| body.get(k).filter(|v| v.is_object()).cloned();
            let paid = object("payment_receipt")
                .map(Paid::Receipt)
                .or_else(|| object("payment_response").map(Paid::X402));
            Decision::Allow {
                account_id,
                balance,
                budget: budget_remaining(&body),
                paid,
            }
        }
        // A 402 is a refusal whatever its body says, so a poor body only loses detail.
        402 => {
            let body = serde_json::from_slice::<Value>(&resp.body).unwrap_or(Value::Null);
            let price = body
                .get("price")
                .and_then(Value::as_u64)
                .filter(|p| *p <= MAX_AMOUNT)
                .unwrap_or(cost);
            let detail = body
                .get("detail")
                .and_then(Value::as_str)
                .map(|d| d.chars().take(MAX_DETAIL_CHARS).collect())
                .unwrap_or_else(|| "the account cannot pay for this request".to_string());
            Decision::Deny(Denial {
                balance: body.get("balance").and_then(Value::as_i64),
                price,
                detail,
                retry_after_s: resp.header("retry-after").and_then(parse_retry_after),
                offer: Offer::from_answer(&body),
                account_id: body
                    .get("account_id")
                    .and_then(Value::as_str)
                    .filter(|a| valid_account_id(a))
                    .map(str::to_string),
                problem: body
                    .get("problem")
                    .and_then(Value::as_str)
                    .and_then(payments::registered_problem),
            })
        }
        401 => Decision::Unauthenticated,
        403 => Decision::Forbidden,
        429 => Decision::RateLimited {
            retry_after_s: resp.header("retry-after").and_then(parse_retry_after),
        },
        500..=599 => return Err(ServiceFailure::Unavailable(status)),
        other => return Err(ServiceFailure::UnexpectedStatus(other)),
    };
    let max_age_s = resp
        .header("cache-control")
        .and_then(|v| parse_max_age(v, max_ttl_s));
    Ok(Verdict {
        decision,
        max_age_s,
    })
}

fn json_object(body: &[u8]) -> Result<serde_json::Map<String, Value>, ServiceFailure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ServiceFailure::BadAnswer("the body is not a JSON object")),
        Err(_) => Err(ServiceFailure::BadAnswer("the body is not valid JSON")),
    }
}

fn optional_i64(v: Option<&Value>) -> Result<Option<i64>, ServiceFailure> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or(ServiceFailure::BadAnswer("balance is not a whole number")),
    }
}

/// The account id goes into a request header for the upstream, so it must be one.
fn valid_account_id(a: &str) -> bool {
    !a.is_empty() && a.len() <= MAX_ACCOUNT_ID_LEN && a.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// `Cache-Control` → seconds the answer may be reused, or `None` (ask every time).
/// `no-store`/`no-cache` win over `max-age`; a malformed directive makes the whole
/// header count as "do not cache", since guessing wrong would serve stale money.
pub fn parse_max_age(value: &[u8], cap_s: u32) -> Option<u32> {
    let text = std::str::from_utf8(value).ok()?;
    let mut max_age = None;
    for directive in text.split(',') {
        let directive = directive.trim();
        let (name, arg) = match directive.split_once('=') {
            Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
            None => (directive, None),
        };
        if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
            return None;
        }
        if name.eq_ignore_ascii_case("max-age") {
            let digits = arg?;
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            // Any number too long for u32 is "very long": the cap applies.
            max_age = Some(digits.parse::<u32>().unwrap_or(u32::MAX));
        }
    }
    max_age.map(|s| s.min(cap_s)).filter(|s| *s > 0)
}

/// `Retry-After` in delta-seconds. HTTP dates and garbage are dropped rather than passed on.
pub fn parse_retry_after(value: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || text.len() > 9 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

pub fn settle_body(used: u64, last: bool, seq: u64) -> Vec<u8> {
    json!({"used": used, "final": last, "seq": seq})
        .to_string()
        .into_bytes()
}

/// Credits units of a request whose lease is no longer the current one (4.6).
pub fn lease_refund_body(request_id: &str, units: u64, status: u16) -> Vec<u8> {
    json!({"request_id": request_id, "units": units, "status": status})
        .to_string()
        .into_bytes()
}

/// A settle answer asks the holder to give its unspent units back now (4.3 recall).
pub fn settle_recalls(resp: &CalloutResponse) -> bool {
    resp.status == Some(200)
        && serde_json::from_slice::<Value>(&resp.body)
            .ok()
            .and_then(|v| v.get("recall").and_then(Value::as_bool))
            == Some(true)
}

pub fn cancel_body(request_id: &str) -> Vec<u8> {
    json!({"request_id": request_id}).to_string().into_bytes()
}

pub struct LeaseRequest<'a> {
    pub account: &'a str,
    pub want: u64,
    pub min: u64,
    pub request_id: &'a str,
    pub holder: &'a str,
}

pub fn lease_body(r: &LeaseRequest<'_>) -> Vec<u8> {
    json!({"account": r.account, "want": r.want, "min": r.min, "request_id": r.request_id, "holder": r.holder})
        .to_string()
        .into_bytes()
}

/// The answer to a lease call: a grant, or a decision like authorize's (402, 401, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAnswer {
    Granted(Grant),
    Decided(Verdict),
    /// A 402 while other holders keep unspent units: they are being recalled,
    /// ask again after `retry_after_ms` (clamped to 10..=1000).
    Recall {
        verdict: Verdict,
        retry_after_ms: u64,
    },
}

/// Bounds on a recall's `retry_after_ms`: never a busy loop, never a long stall.
const RECALL_RETRY_MS: (u64, u64) = (10, 1_000);

/// `min` is what the request needs: a grant below it is a broken answer.
pub fn parse_lease(
    resp: &CalloutResponse,
    min: u64,
    max_ttl_s: u32,
) -> Result<LeaseAnswer, ServiceFailure> {
    if resp.status != Some(200) {
        let verdict = parse_authorize(resp, min, max_ttl_s)?;
        if resp.status == Some(402) {
            let body: Option<Value> = serde_json::from_slice(&resp.body).ok();
            let field = |name: &str| body.as_ref().and_then(|b| b.get(name).cloned());
            if field("recall").and_then(|v| v.as_bool()) == Some(true) {
                let retry_after_ms = field("retry_after_ms")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(100)
                    .clamp(RECALL_RETRY_MS.0, RECALL_RETRY_MS.1);
                // Never cacheable, whatever the headers said.
                let verdict = Verdict {
                    max_age_s: None,
                    ..verdict
                };
                return Ok(LeaseAnswer::Recall {
                    verdict,
                    retry_after_ms,
                });
            }
        }
        return Ok(LeaseAnswer::Decided(verdict));
    }
    if resp.body_too_large {
        return Err(ServiceFailure::TooLarge);
    }
    let body = json_object(&resp.body)?;
    let lease_id = match body.get("lease_id").and_then(Value::as_str) {
        Some(id) if valid_lease_id(id) => id.to_string(),
        _ => {
            return Err(ServiceFailure::BadAnswer(
                "lease_id must be 1-128 characters of A-Z a-z 0-9 _ - . :",
            ))
        }
    };
    let granted = match body.get("granted").and_then(Value::as_u64) {
        Some(g) if g >= min && g <= MAX_AMOUNT => g,
        Some(_) => {
            return Err(ServiceFailure::BadAnswer(
                "granted is below the request's cost or too large",
            ))
        }
        None => return Err(ServiceFailure::BadAnswer("granted must be a whole number")),
    };
    let expires_in_ms = match body.get("expires_in_ms").and_then(Value::as_u64) {
        Some(ms) if ms >= 1 => ms.min(MAX_LEASE_MS),
        _ => {
            return Err(ServiceFailure::BadAnswer(
                "expires_in_ms must be a positive whole number",
            ))
        }
    };
    let account_id = match body.get("account_id").and_then(Value::as_str) {
        Some(a) if valid_account_id(a) => a.to_string(),
        _ => {
            return Err(ServiceFailure::BadAnswer(
                "account_id is missing or not a valid header value",
            ))
        }
    };
    let balance = optional_i64(body.get("balance"))?;
    Ok(LeaseAnswer::Granted(Grant {
        lease_id,
        account_id,
        granted,
        expires_in_ms,
        balance,
        budget: budget_remaining(&body),
    }))
}

/// `budget.remaining` of an allow or grant answer: only shown to the client,
/// so anything but a whole number is left out rather than refused.
fn budget_remaining(body: &serde_json::Map<String, Value>) -> Option<i64> {
    body.get("budget")
        .and_then(|b| b.get("remaining"))
        .and_then(Value::as_i64)
}

/// A lease id goes into the settle URL, so it is kept to URL-safe characters.
fn valid_lease_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}

/// What to do with an outbox call after the service answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    Done,
    /// The service will never accept it (unknown, settled, other account): do not retry.
    Rejected(u16),
    /// Try again later.
    Retry(Option<u16>),
}

pub fn classify_outcome(status: Option<u16>) -> CallOutcome {
    match status {
        Some(200..=299) => CallOutcome::Done,
        Some(s @ 400..=499) if s != 408 && s != 429 => CallOutcome::Rejected(s),
        other => CallOutcome::Retry(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_logs_its_own_code() {
        let failures = [
            (ServiceFailure::NoAnswer, "no_answer"),
            (ServiceFailure::Unavailable(504), "service_timeout"),
            (ServiceFailure::Unavailable(503), "service_unavailable"),
            (ServiceFailure::UnexpectedStatus(418), "unexpected_status"),
            (ServiceFailure::BadAnswer("x"), "bad_answer"),
            (ServiceFailure::TooLarge, "answer_too_large"),
        ];
        for (failure, code) in &failures {
            assert_eq!(failure.code(), *code);
            assert!(
                failure.to_string().starts_with(&format!("code={code}: ")),
                "{failure}"
            );
        }
        // The outcome of a real answer carries the code too.
        let too_late = parse_authorize(&resp(Some(504), &[], ""), 1, 300).unwrap_err();
        assert_eq!(too_late.code(), "service_timeout");
    }

    fn resp(status: Option<u16>, headers: &[(&str, &str)], body: &str) -> CalloutResponse {
        CalloutResponse {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: body.as_bytes().to_vec(),
            body_too_large: false,
        }
    }

    fn parse(r: &CalloutResponse) -> Result<Verdict, ServiceFailure> {
        parse_authorize(r, 7, 300)
    }

    #[test]
    fn allow() {
        let v = parse(&resp(
            Some(200),
            &[],
            r#"{"allow": true, "account_id": "acct_a", "balance": 93}"#,
        ))
        .unwrap();
        assert_eq!(
            v.decision,
            Decision::Allow {
                account_id: "acct_a".into(),
                balance: Some(93),
                budget: None,
                paid: None,
            }
        );
        assert_eq!(v.max_age_s, None);
        let v = parse(&resp(
            Some(200),
            &[("Cache-Control", "private, max-age=10")],
            r#"{"allow": true, "account_id": "a"}"#,
        ))
        .unwrap();
        assert_eq!(
            v.decision,
            Decision::Allow {
                account_id: "a".into(),
                balance: None,
                budget: None,
                paid: None,
            }
        );
        assert_eq!(v.max_age_s, Some(10));
        let v = parse(&resp(
            Some(200),
            &[],
            r#"{"allow": true, "account_id": "a", "balance": -5}"#,
        ))
        .unwrap();
        assert_eq!(
            v.decision,
            Decision::Allow {
                account_id: "a".into(),
                balance: Some(-5),
                budget: None,
                paid: None,
            }
        );
        // The remaining budget, if the answer has one; a malformed one is
        // only not shown.
        for (budget, want) in [
            (r#"{"remaining": 7, "limit": 10}"#, Some(7)),
            (r#"{"remaining": "7"}"#, None),
            (r#"{"remaining": 1.5}"#, None),
            ("3", None),
        ] {
            let body = format!(r#"{{"allow": true, "account_id": "a", "budget": {budget}}}"#);
            match parse(&resp(Some(200), &[], &body)).unwrap().decision {
                Decision::Allow { budget, .. } => assert_eq!(budget, want, "{body}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn deny() {
        let v = parse(&resp(
            Some(402),
            &[("cache-control", "max-age=30"), ("retry-after", "60")],
            r#"{"allow": false, "balance": 2, "price": 5, "detail": "top up"}"#,
        ))
        .unwrap();
        assert_eq!(
            v.decision,
            Decision::Deny(Denial {
                balance: Some(2),
                price: 5,
                detail: "top up".into(),
                retry_after_s: Some(60),
                offer: Default::default(),
                account_id: None,
                problem: None,
            })
        );
        assert_eq!(v.max_age_s, Some(30));
        // A bare 402 still denies, priced at the request's cost.
        let v = parse(&resp(Some(402), &[("retry-after", "soon")], "")).unwrap();
        match v.decision {
            Decision::Deny(d) => {
                assert_eq!((d.balance, d.price, d.retry_after_s), (None, 7, None));
                assert!(!d.detail.is_empty());
            }
            other => panic!("{other:?}"),
        }
        let long = format!(
            r#"{{"detail": "{}", "price": -1, "balance": "x"}}"#,
            "d".repeat(5000)
        );
        match parse(&resp(Some(402), &[], &long)).unwrap().decision {
            Decision::Deny(d) => {
                assert_eq!(d.detail.len(), MAX_DETAIL_CHARS);
                assert_eq!((d.price, d.balance), (7, None));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_defined_answers() {
        assert_eq!(
            parse(&resp(Some(401), &[], "")).unwrap().decision,
            Decision::Unauthenticated
        );
        assert_eq!(
            parse(&resp(Some(403), &[], "{}")).unwrap().decision,
            Decision::Forbidden
        );
        let v = parse(&resp(Some(429), &[("retry-after", "3")], "")).unwrap();
        assert_eq!(
            v.decision,
            Decision::RateLimited {
                retry_after_s: Some(3)
            }
        );
    }

    #[test]
    fn garbage_is_a_failure() {
        let bad = |status: Option<u16>, body: &str| parse(&resp(status, &[], body)).unwrap_err();
        assert_eq!(bad(None, ""), ServiceFailure::NoAnswer);
        assert_eq!(bad(Some(503), ""), ServiceFailure::Unavailable(503));
        assert_eq!(bad(Some(504), ""), ServiceFailure::Unavailable(504));
        assert_eq!(
            bad(Some(500), r#"{"allow": true}"#),
            ServiceFailure::Unavailable(500)
        );
        assert_eq!(bad(Some(302), ""), ServiceFailure::UnexpectedStatus(302));
        assert_eq!(bad(Some(404), ""), ServiceFailure::UnexpectedStatus(404));
        assert!(matches!(bad(Some(200), ""), ServiceFailure::BadAnswer(_)));
        assert!(matches!(
            bad(Some(200), "{\"allow\": tr"),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(bad(Some(200), "[]"), ServiceFailure::BadAnswer(_)));
        assert!(matches!(
            bad(Some(200), r#"{"allow": "yes", "account_id": "a"}"#),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(
            bad(Some(200), r#"{"allow": false, "account_id": "a"}"#),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(
            bad(Some(200), r#"{"allow": true}"#),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(
            bad(Some(200), r#"{"allow": true, "account_id": 5}"#),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(
            bad(Some(200), r#"{"allow": true, "account_id": ""}"#),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(
            bad(
                Some(200),
                r#"{"allow": true, "account_id": "a\r\nx-evil: 1"}"#
            ),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(
            bad(
                Some(200),
                r#"{"allow": true, "account_id": "a", "balance": 1.5}"#
            ),
            ServiceFailure::BadAnswer(_)
        ));
        assert!(matches!(
            bad(
                Some(200),
                r#"{"allow": true, "account_id": "a", "balance": 1e40}"#
            ),
            ServiceFailure::BadAnswer(_)
        ));
        let mut big = resp(Some(200), &[], "");
        big.body_too_large = true;
        assert_eq!(parse(&big).unwrap_err(), ServiceFailure::TooLarge);
    }

    #[test]
    fn cache_control() {
        assert_eq!(parse_max_age(b"max-age=30", 300), Some(30));
        assert_eq!(parse_max_age(b"private, max-age=\"12\"", 300), Some(12));
        assert_eq!(parse_max_age(b"MAX-AGE=5", 300), Some(5));
        assert_eq!(parse_max_age(b"max-age=31536000", 300), Some(300));
        assert_eq!(
            parse_max_age(b"max-age=99999999999999999999", 300),
            Some(300)
        );
        assert_eq!(parse_max_age(b"max-age=0", 300), None);
        assert_eq!(parse_max_age(b"no-store", 300), None);
        assert_eq!(parse_max_age(b"max-age=30, no-cache", 300), None);
        assert_eq!(parse_max_age(b"max-age=-1", 300), None);
        assert_eq!(parse_max_age(b"max-age=abc", 300), None);
        assert_eq!(parse_max_age(b"max-age", 300), None);
        assert_eq!(parse_max_age(b"public", 300), None);
        assert_eq!(parse_max_age(b"\xff", 300), None);
        assert_eq!(parse_max_age(b"max-age=30", 0), None);
    }

    #[test]
    fn retry_after() {
        assert_eq!(parse_retry_after(b"120"), Some(120));
        assert_eq!(parse_retry_after(b" 5 "), Some(5));
        assert_eq!(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after(b"-1"), None);
        assert_eq!(parse_retry_after(b"99999999999"), None);
        assert_eq!(parse_retry_after(b""), None);
    }

    #[test]
    fn request_bodies_are_the_contract() {
        let body = authorize_body(&AuthorizeRequest {
            account: Some("k\"ey"),
            cost: 5,
            route: "infer",
            method: "POST",
            path: "/v1/x",
            request_id: "r1",
            payment: None,
        });
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            json!({"account": "k\"ey", "cost": 5, "route": "infer", "method": "POST", "path": "/v1/x", "request_id": "r1"})
        );
        // Anonymous, paying: no account, the payment as sent.
        let payment = Payment {
            scheme: "x402",
            value: "eyJwYXkiOjF9".into(),
        };
        let body = authorize_body(&AuthorizeRequest {
            account: None,
            cost: 5,
            route: "infer",
            method: "POST",
            path: "/v1/x",
            request_id: "r2",
            payment: Some(&payment),
        });
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["account"], Value::Null);
        assert_eq!(
            (v["payment"].as_str(), v["payment_scheme"].as_str()),
            (Some("eyJwYXkiOjF9"), Some("x402"))
        );
        let v: Value = serde_json::from_slice(&usage_body("r1", "k", 42, None)).unwrap();
        assert_eq!(v, json!({"request_id": "r1", "account": "k", "actual": 42}));
        let line = UsageLine {
            route: "claude".into(),
            model: Some("m".into()),
            tokens: Tokens {
                input: 1,
                cached_input: 2,
                cache_creation_input: 3,
                output: 4,
                reasoning: 5,
            },
        };
        let tokens = json!({"input": 1, "cached_input": 2, "cache_creation_input": 3,
            "output": 4, "reasoning": 5});
        let v: Value = serde_json::from_slice(&usage_body("r1", "k", 42, Some(&line))).unwrap();
        assert_eq!(
            v,
            json!({"request_id": "r1", "account": "k", "actual": 42, "route": "claude",
                "model": "m", "tokens": tokens})
        );
        let v: Value = serde_json::from_slice(&lease_usage_body("r2", 9, &line)).unwrap();
        assert_eq!(
            v,
            json!({"request_id": "r2", "units": 9, "route": "claude", "model": "m", "tokens": tokens})
        );
        let v: Value = serde_json::from_slice(&refund_body("r1", "k", 5, 503)).unwrap();
        assert_eq!(
            v,
            json!({"request_id": "r1", "account": "k", "cost": 5, "status": 503})
        );
    }

    #[test]
    fn call_outcomes() {
        assert_eq!(classify_outcome(Some(200)), CallOutcome::Done);
        assert_eq!(classify_outcome(Some(404)), CallOutcome::Rejected(404));
        assert_eq!(classify_outcome(Some(409)), CallOutcome::Rejected(409));
        assert_eq!(classify_outcome(Some(429)), CallOutcome::Retry(Some(429)));
        assert_eq!(classify_outcome(Some(503)), CallOutcome::Retry(Some(503)));
        assert_eq!(classify_outcome(None), CallOutcome::Retry(None));
    }

    #[test]
    fn lease_answers() {
        let ok = resp(
            Some(200),
            &[],
            r#"{"lease_id": "ls_1", "granted": 100, "expires_in_ms": 30000, "account_id": "a", "balance": 400}"#,
        );
        assert_eq!(
            parse_lease(&ok, 5, 300).unwrap(),
            LeaseAnswer::Granted(Grant {
                lease_id: "ls_1".into(),
                account_id: "a".into(),
                granted: 100,
                expires_in_ms: 30_000,
                balance: Some(400),
                budget: None,
            })
        );
        let deny = resp(
            Some(402),
            &[("cache-control", "max-age=3")],
            r#"{"balance": 0, "price": 5}"#,
        );
        match parse_lease(&deny, 5, 300).unwrap() {
            LeaseAnswer::Decided(v) => {
                assert!(matches!(v.decision, Decision::Deny(_)));
                assert_eq!(v.max_age_s, Some(3));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_lease(&resp(Some(503), &[], ""), 1, 300).unwrap_err(),
            ServiceFailure::Unavailable(503)
        );
        for body in [
            r#"{"lease_id": "ls/../x", "granted": 100, "expires_in_ms": 1, "account_id": "a"}"#,
            r#"{"lease_id": "ls_1", "granted": 4, "expires_in_ms": 1, "account_id": "a"}"#,
            r#"{"lease_id": "ls_1", "granted": -1, "expires_in_ms": 1, "account_id": "a"}"#,
            r#"{"lease_id": "ls_1", "granted": 100, "expires_in_ms": 0, "account_id": "a"}"#,
            r#"{"lease_id": "ls_1", "granted": 100, "expires_in_ms": 1}"#,
            r#"{"lease_id": "ls_1", "granted": "100", "expires_in_ms": 1, "account_id": "a"}"#,
            "nope",
        ] {
            assert!(
                matches!(
                    parse_lease(&resp(Some(200), &[], body), 5, 300),
                    Err(ServiceFailure::BadAnswer(_))
                ),
                "{body}"
            );
        }
        let long = resp(
            Some(200),
            &[],
            r#"{"lease_id": "l", "granted": 5, "expires_in_ms": 99999999999, "account_id": "a"}"#,
        );
        match parse_lease(&long, 5, 300).unwrap() {
            LeaseAnswer::Granted(g) => assert_eq!(g.expires_in_ms, MAX_LEASE_MS),
            other => panic!("{other:?}"),
        }
        let v: Value = serde_json::from_slice(&lease_body(&LeaseRequest {
            account: "k",
            want: 100,
            min: 5,
            request_id: "r",
            holder: "h",
        }))
        .unwrap();
        assert_eq!(
            v,
            json!({"account": "k", "want": 100, "min": 5, "request_id": "r", "holder": "h"})
        );
        let v: Value = serde_json::from_slice(&settle_body(7, true, 3)).unwrap();
        assert_eq!(v, json!({"used": 7, "final": true, "seq": 3}));
        let v: Value = serde_json::from_slice(&lease_refund_body("r", 2, 504)).unwrap();
        assert_eq!(v, json!({"request_id": "r", "units": 2, "status": 504}));
    }

    #[test]
    fn recalls() {
        let recall = |body: &str| {
            parse_lease(
                &resp(Some(402), &[("cache-control", "max-age=5")], body),
                1,
                300,
            )
            .unwrap()
        };
        match recall(r#"{"balance": 0, "price": 1, "recall": true, "retry_after_ms": 5}"#) {
            LeaseAnswer::Recall {
                verdict,
                retry_after_ms,
            } => {
                assert_eq!((verdict.max_age_s, retry_after_ms), (None, 10));
                assert!(matches!(verdict.decision, Decision::Deny(_)));
            }
            other => panic!("{other:?}"),
        }
        match recall(r#"{"balance": 0, "recall": true, "retry_after_ms": 99999}"#) {
            LeaseAnswer::Recall { retry_after_ms, .. } => assert_eq!(retry_after_ms, 1_000),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            recall(r#"{"balance": 0, "recall": false}"#),
            LeaseAnswer::Decided(_)
        ));
        assert!(settle_recalls(&resp(Some(200), &[], r#"{"recall": true}"#)));
        assert!(!settle_recalls(&resp(Some(200), &[], r#"{"used": 1}"#)));
        assert!(!settle_recalls(&resp(
            Some(409),
            &[],
            r#"{"recall": true}"#
        )));
    }

    #[test]
    fn the_answer_cap_takes_the_largest_refusal_kept_whole_but_no_megabytes() {
        // The longest detail the filter keeps (512 four-byte characters) and the longest
        // account id: such a 402 must be read, not refused as too large.
        let body = format!(
            r#"{{"allow": false, "balance": -9223372036854775808, "price": 1000000000000, "detail": "{}", "account_id": "{}"}}"#,
            "€".repeat(MAX_DETAIL_CHARS),
            "a".repeat(MAX_ACCOUNT_ID_LEN)
        );
        assert!(body.len() <= MAX_ANSWER_BYTES, "{} bytes", body.len());
        match parse(&resp(Some(402), &[], &body)).unwrap().decision {
            Decision::Deny(d) => assert_eq!(
                (d.detail.chars().count(), d.account_id.map(|a| a.len())),
                (MAX_DETAIL_CHARS, Some(MAX_ACCOUNT_ID_LEN))
            ),
            other => panic!("{other:?}"),
        }
        // A lying service copies no megabytes into the VM.
        const { assert!(MAX_ANSWER_BYTES < 1024 * 1024) };
    }

    #[test]
    fn retry_after_is_at_most_nine_plain_digits() {
        assert_eq!(parse_retry_after(b"999999999"), Some(999_999_999));
        // Ten digits would still fit a u32, and a sign would still parse: both dropped.
        assert_eq!(parse_retry_after(b"1234567890"), None);
        assert_eq!(parse_retry_after(b"+5"), None);
    }

    #[test]
    fn a_grant_whose_account_id_is_no_header_value_is_refused() {
        // The account id of a grant goes to the upstream in a header, as an allow's does.
        for account in ["", "a b", "acct\u{e9}", &"a".repeat(MAX_ACCOUNT_ID_LEN + 1)] {
            let body = json!({"lease_id": "ls_1", "granted": 100, "expires_in_ms": 1000,
                              "account_id": account})
            .to_string();
            assert!(
                matches!(
                    parse_lease(&resp(Some(200), &[], &body), 5, 300),
                    Err(ServiceFailure::BadAnswer(_))
                ),
                "{account:?}"
            );
        }
    }
}
