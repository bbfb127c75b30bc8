//! Answers the filter gives itself: RFC 9457 problem details with caching hints.
//! Nothing here ever sees the credential, so no reply can echo it.

use serde_json::{Map, Value};

use crate::config::Config;
use crate::decision::Denial;
use crate::identity::CredentialSource;
use crate::payments::{self, PROBLEM_REGISTRY};
use crate::problem::summary;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u32,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

/// How long a client or shared cache may keep a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    NoStore,
    /// Only the caller's own cache (the answer is about one account).
    Private(u32),
}

impl Freshness {
    pub fn from_max_age(max_age_s: Option<u32>) -> Freshness {
        max_age_s.map_or(Freshness::NoStore, Freshness::Private)
    }
    fn header(self) -> String {
        match self {
            Freshness::NoStore => "no-store".to_string(),
            Freshness::Private(s) => format!("private, max-age={s}"),
        }
    }
}

fn problem(
    cfg: &Config,
    status: u32,
    slug: &str,
    title: &str,
    detail: &str,
    extra: Map<String, Value>,
    freshness: Freshness,
) -> Reply {
    let type_uri = format!("{}{slug}", cfg.problem_type_base);
    typed_problem(type_uri, status, title, detail, extra, freshness)
}

fn typed_problem(
    type_uri: String,
    status: u32,
    title: &str,
    detail: &str,
    extra: Map<String, Value>,
    freshness: Freshness,
) -> Reply {
    let mut body = Map::new();
    body.insert("type".into(), Value::String(type_uri));
    body.insert("title".into(), title.into());
    body.insert("status".into(), status.into());
    body.insert("detail".into(), detail.into());
    body.extend(extra);
    Reply {
        status,
        headers: vec![
            ("content-type", "application/problem+json".to_string()),
            ("cache-control", freshness.header()),
        ],
        body: Value::Object(body).to_string().into_bytes(),
    }
}

impl Reply {
    fn with(mut self, name: &'static str, value: Option<String>) -> Reply {
        if let Some(v) = value {
            self.headers.push((name, v));
        }
        self
    }
}

pub fn payment_required(cfg: &Config, route: &str, denial: &Denial, freshness: Freshness) -> Reply {
    let mut extra = Map::new();
    if let Some(b) = denial.balance {
        extra.insert("balance".into(), b.into());
    }
    extra.insert("price".into(), denial.price.into());
    extra.insert("route".into(), route.into());
    // A payment failure has the Payment scheme's registered type (the draft's
    // registry); a balance too low for the price has farebox's own.
    let reply = match denial.problem {
        Some(slug) => {
            let title: Vec<String> = slug
                .split('-')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                        .unwrap_or_default()
                })
                .collect();
            typed_problem(
                format!("{PROBLEM_REGISTRY}{slug}"),
                payments::problem_status(slug),
                &title.join(" "),
                &denial.detail,
                extra,
                freshness,
            )
        }
        None => problem(
            cfg,
            402,
            "payment-required",
            "Payment Required",
            &denial.detail,
            extra,
            freshness,
        ),
    };
    reply.with("retry-after", denial.retry_after_s.map(|s| s.to_string()))
}

/// Why the caller is not authenticated; decides the `WWW-Authenticate` error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthProblem {
    Missing,
    Invalid,
}

pub fn unauthorized(cfg: &Config, why: AuthProblem, detail: &str, freshness: Freshness) -> Reply {
    let challenge = match (&cfg.credential, why) {
        (CredentialSource::Bearer, AuthProblem::Missing) => "Bearer realm=\"farebox\"".to_string(),
        (CredentialSource::Bearer, AuthProblem::Invalid) => {
            "Bearer realm=\"farebox\", error=\"invalid_token\"".to_string()
        }
        (CredentialSource::Header(name), _) => {
            format!("ApiKey realm=\"farebox\", header=\"{name}\"")
        }
        (CredentialSource::Query(name), _) => format!("ApiKey realm=\"farebox\", query=\"{name}\""),
    };
    problem(
        cfg,
        401,
        "unauthorized",
        "Unauthorized",
        detail,
        Map::new(),
        freshness,
    )
    .with("www-authenticate", Some(challenge))
}

pub fn forbidden(cfg: &Config, freshness: Freshness) -> Reply {
    let detail = "this credential may not be used for this API";
    problem(
        cfg,
        403,
        "forbidden",
        "Forbidden",
        detail,
        Map::new(),
        freshness,
    )
}

pub fn rate_limited(cfg: &Config, retry_after_s: Option<u32>, freshness: Freshness) -> Reply {
    let detail = "the balance service asks this account to slow down";
    problem(
        cfg,
        429,
        "rate-limited",
        "Too Many Requests",
        detail,
        Map::new(),
        freshness,
    )
    .with("retry-after", retry_after_s.map(|s| s.to_string()))
}

pub fn unavailable(cfg: &Config) -> Reply {
    let detail = "the payment check could not be completed; try again later";
    problem(
        cfg,
        503,
        "service-unavailable",
        "Service Unavailable",
        detail,
        Map::new(),
        Freshness::NoStore,
    )
    .with("retry-after", Some(cfg.failure_retry_after_s.to_string()))
}

pub fn too_large(cfg: &Config, detail: &str) -> Reply {
    problem(
        cfg,
        413,
        "content-too-large",
        "Content Too Large",
        detail,
        Map::new(),
        Freshness::NoStore,
    )
}

/// 400 for an MCP request whose `Mcp-Method`/`Mcp-Name` headers do not match its body.
pub fn header_mismatch(cfg: &Config, detail: &str) -> Reply {
    problem(
        cfg,
        400,
        "header-mismatch",
        "Bad Request",
        detail,
        Map::new(),
        Freshness::NoStore,
    )
}

/// The same refusal with OpenAI's `error: {message, type, code}` beside the problem
/// fields (RFC 9457 allows extension members): OpenAI's SDKs build the exception's
/// message, `type` and `code` from `error`, and show only the status without it.
pub fn with_openai_error(reply: &Reply) -> Reply {
    let Ok(Value::Object(mut problem)) = serde_json::from_slice::<Value>(&reply.body) else {
        return reply.clone();
    };
    let (kind, code) = match reply.status {
        // The one 400 farebox sends: a model the route's price table refuses (OpenAI's
        // own answer for an unknown model has this type and code).
        400 => ("invalid_request_error", "model_not_found"),
        401 => ("invalid_request_error", "invalid_api_key"),
        402 => ("insufficient_quota", "payment_required"),
        403 => ("permission_error", "forbidden"),
        413 => ("invalid_request_error", "content_too_large"),
        429 => ("rate_limit_error", "rate_limit_exceeded"),
        _ => ("server_error", "service_unavailable"),
    };
    let message = summary(&Value::Object(problem.clone()));
    problem.insert(
        "error".into(),
        serde_json::json!({"message": message, "type": kind, "code": code}),
    );
    let mut out = reply.clone();
    out.body = Value::Object(problem).to_string().into_bytes();
    out
}

/// The same refusal as a JSON-RPC answer (see [`crate::mcp::refusal_body`]), with HTTP
/// status 200: MCP clients read the JSON-RPC answer only from a 2xx (the TypeScript SDK
/// turns any other status into a transport error that has lost the body). The refusal's
/// status stays in the body; its headers (`retry-after`, `payment-required`) are kept.
/// 400 for a model the route's price table has no prices for (`model` is bounded
/// and JSON-escaped; `null` when the request named none).
pub fn unknown_model(cfg: &Config, model: Option<&str>) -> Reply {
    let detail = match model {
        Some(m) => format!("the model {m:?} has no price on this route"),
        None => "the request names no model, and this route prices by model".to_string(),
    };
    let mut extra = Map::new();
    extra.insert(
        "model".into(),
        model.map_or(Value::Null, |m| Value::String(m.into())),
    );
    problem(
        cfg,
        400,
        "unknown-model",
        "Bad Request",
        &detail,
        extra,
        Freshness::NoStore,
    )
}

/// The same refusal with a JSON-RPC error body (MCP clients show `error.message`).
pub fn as_json_rpc(reply: &Reply, body: &[u8]) -> Reply {
    let mut out = reply.clone();
    out.status = 200;
    for (k, v) in out.headers.iter_mut() {
        if *k == "content-type" {
            *v = "application/json".to_string();
        }
    }
    out.body = body.to_vec();
    out
}

/// The same refusal as a small page for people (the problem stays in a comment-free
/// `<pre>` so nothing of the machine-readable answer is lost).
pub fn as_html(reply: &Reply) -> Reply {
    let problem: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    let field = |k: &str| {
        problem
            .get(k)
            .and_then(Value::as_str)
            .map(html_escape)
            .unwrap_or_default()
    };
    let price = problem
        .get("price")
        .map(|p| html_escape(&p.to_string()))
        .unwrap_or_default();
    let body = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
         <body><h1>{title}</h1><p>{detail}</p><p>Price: {price}</p>\n<pre>{json}</pre></body></html>\n",
        title = field("title"),
        detail = field("detail"),
        json = html_escape(&String::from_utf8_lossy(&reply.body)),
    );
    let mut out = reply.clone();
    for (k, v) in out.headers.iter_mut() {
        if *k == "content-type" {
            *v = "text/html; charset=utf-8".to_string();
        }
    }
    out.body = body.into_bytes();
    out
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Marker for tests and logs: the body is JSON we built, not an upstream's.
pub fn is_problem(reply: &Reply) -> bool {
    reply
        .headers
        .iter()
        .any(|(k, v)| *k == "content-type" && v == "application/problem+json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(extra: &str) -> Config {
        Config::parse(format!(r#"{{"cluster": "b"{extra}}}"#).as_bytes()).unwrap()
    }

    fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    fn body(r: &Reply) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn payment_required_is_rfc9457_with_money_fields() {
        let d = Denial {
            balance: Some(2),
            price: 5,
            detail: "top up".into(),
            retry_after_s: Some(30),
            offer: Default::default(),
            account_id: None,
            problem: None,
        };
        let r = payment_required(&cfg(""), "infer", &d, Freshness::Private(12));
        assert_eq!(r.status, 402);
        assert!(is_problem(&r));
        assert_eq!(header(&r, "cache-control"), Some("private, max-age=12"));
        assert_eq!(header(&r, "retry-after"), Some("30"));
        assert_eq!(
            body(&r),
            json!({"type": "https://farebox.dev/problems/payment-required", "title": "Payment Required",
                   "status": 402, "detail": "top up", "balance": 2, "price": 5, "route": "infer"})
        );
        let d = Denial {
            balance: None,
            price: 1,
            detail: "x".into(),
            retry_after_s: None,
            offer: Default::default(),
            account_id: None,
            problem: None,
        };
        let r = payment_required(&cfg(""), "r", &d, Freshness::NoStore);
        assert_eq!(header(&r, "cache-control"), Some("no-store"));
        assert_eq!(header(&r, "retry-after"), None);
        assert!(body(&r).get("balance").is_none());
        // A payment's failure: the Payment scheme's registered problem type.
        let d = Denial {
            problem: Some("verification-failed"),
            ..d
        };
        let r = payment_required(&cfg(""), "r", &d, Freshness::NoStore);
        assert_eq!(
            body(&r)["type"],
            "https://paymentauth.org/problems/verification-failed"
        );
        assert_eq!(body(&r)["title"], "Verification Failed");
        assert_eq!(r.status, 402);
        // A method the server does not take: 400, as the registry gives it.
        let d = Denial {
            problem: Some("method-unsupported"),
            ..d
        };
        let r = payment_required(&cfg(""), "r", &d, Freshness::NoStore);
        assert_eq!(r.status, 400);
        assert_eq!(body(&r)["status"], 400);
    }

    #[test]
    fn unauthorized_challenges_fit_the_credential_source() {
        let r = unauthorized(
            &cfg(""),
            AuthProblem::Missing,
            "no credential",
            Freshness::NoStore,
        );
        assert_eq!(r.status, 401);
        assert_eq!(
            header(&r, "www-authenticate"),
            Some("ApiKey realm=\"farebox\", header=\"x-api-key\"")
        );
        assert_eq!(body(&r)["status"], 401);
        let bearer = cfg(r#", "credential": {"source": "bearer"}"#);
        let r = unauthorized(&bearer, AuthProblem::Invalid, "unknown", Freshness::NoStore);
        assert_eq!(
            header(&r, "www-authenticate"),
            Some("Bearer realm=\"farebox\", error=\"invalid_token\"")
        );
    }

    #[test]
    fn unavailable_and_others() {
        let r = unavailable(&cfg(r#", "failure_retry_after_s": 7"#));
        assert_eq!(
            (
                r.status,
                header(&r, "retry-after"),
                header(&r, "cache-control")
            ),
            (503, Some("7"), Some("no-store"))
        );
        assert_eq!(
            body(&r)["type"],
            "https://farebox.dev/problems/service-unavailable"
        );
        assert_eq!(forbidden(&cfg(""), Freshness::NoStore).status, 403);
        let r = rate_limited(&cfg(""), Some(3), Freshness::NoStore);
        assert_eq!((r.status, header(&r, "retry-after")), (429, Some("3")));
    }
}
