//! Plugin configuration: parsed from the JSON Envoy hands to `on_configure`,
//! validated field by field so that a refusal names the field and the reason.

use std::fmt;
use std::time::Duration;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::amount::MAX_AMOUNT;
use crate::identity::CredentialSource;
use crate::mcp::McpPricing;
use crate::pricing::{PathPattern, Pricing, Route};
use crate::sha256;
use crate::tokens::{Api, ModelFrom, PriceTable, Prices, UnknownModel, MAX_MODEL_LEN};
use crate::usage::UsageSpec;

const MAX_TIMEOUT_MS: u64 = 60_000;
const MAX_CACHE_ENTRIES: u64 = 10_000_000;

/// How requests are paid for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One authorize call per request (unless a decision is cached).
    Authorize,
    /// Spend from a lease reserved per Envoy process; call the service only to renew and settle.
    Lease,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub path: String,
    /// Units asked for per lease.
    pub want: u64,
    pub settle_interval_ms: u64,
    /// Stop spending this long before the service expires a lease.
    pub expiry_margin_ms: u64,
    /// How long a request may wait, in all, for credit the service is recalling
    /// from other gateways before it is answered 402.
    pub recall_wait_ms: u64,
    /// Slots of the lease table in shared data (its memory bound).
    pub max_entries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Challenges {
    /// x402 v2: a `PAYMENT-REQUIRED` header.
    pub x402: bool,
    /// The HTTP Payment authentication scheme: `WWW-Authenticate: Payment …`.
    pub payment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureMode {
    /// Refuse with 503 when the balance service cannot answer.
    Closed,
    /// Let the request through unpaid (and count it).
    Open,
}

/// HTTP statuses (100..=599) as a bit set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub fn insert(&mut self, status: u16) {
        if let Some(word) = self.0.get_mut(usize::from(status / 64)) {
            *word |= 1 << (status % 64);
        }
    }
    pub fn contains(&self, status: u16) -> bool {
        self.0
            .get(usize::from(status / 64))
            .is_some_and(|w| w & (1 << (status % 64)) != 0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub lease: LeaseConfig,
    pub cluster: String,
    pub authority: String,
    pub authorize_path: String,
    pub refund_path: String,
    pub usage_path: String,
    pub timeout: Duration,
    pub service_token: Option<String>,
    pub credential: CredentialSource,
    pub failure_mode: FailureMode,
    pub failure_retry_after_s: u32,
    pub pricing: Pricing,
    pub no_charge_statuses: StatusSet,
    pub account_header: String,
    pub balance_header: Option<String>,
    /// Response header that tells the client what is left of its budget this
    /// period (when the balance service answers one).
    pub budget_header: Option<String>,
    pub cache_max_entries: u32,
    pub cache_max_ttl_s: u32,
    pub problem_type_base: String,
    /// Which machine-payable challenges a 402 carries when the service supplies them.
    pub challenges: Challenges,
    /// Forward `PAYMENT-SIGNATURE` / `Authorization: Payment` to the service.
    pub accept_payments: bool,
    /// Ask the service about requests with no credential (so it can offer a payment)
    /// instead of answering 401 here.
    pub anonymous: bool,
    /// Browsers (`Accept: text/html`) get a small HTML page with the 402.
    pub html_402: bool,
    /// Publish the access-log fields (src/access_log.rs) as filter state.
    pub access_log: bool,
    /// Largest request body read to price an MCP call; larger ones get 413.
    pub max_body_bytes: usize,
    /// Bytes of a JSON response kept to find its usage.
    pub usage_tail_bytes: usize,
    /// Digest of the raw configuration. Part of every cache key, so a decision
    /// made under one configuration is never served under another.
    pub fingerprint: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the problem is, as a JSON path (`routes[2].glob`); `(root)` for the document.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid plugin config: {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        reason: reason.into(),
    })
}

// The fields the parser knows, per object. The parser refuses any other field with these
// lists, and the schema checks (tests/config_schema.rs) compare them with the schema.

/// Top-level fields of the plugin configuration.
pub const TOP_FIELDS: &[&str] = &[
    "mode",
    "lease_path",
    "lease_want",
    "settle_interval_ms",
    "lease_expiry_margin_ms",
    "lease_recall_wait_ms",
    "lease_max_entries",
    "cluster",
    "authority",
    "authorize_path",
    "refund_path",
    "usage_path",
    "timeout_ms",
    "service_token",
    "credential",
    "failure_mode",
    "failure_retry_after_s",
    "default_cost",
    "default_route",
    "routes",
    "no_charge_statuses",
    "account_header",
    "balance_header",
    "budget_header",
    "cache_max_entries",
    "cache_max_ttl_s",
    "problem_type_base",
    "challenges",
    "accept_payments",
    "anonymous",
    "html_402",
    "access_log",
    "max_body_bytes",
    "usage_tail_bytes",
];

/// Fields of a `credential` with a header or query source.
pub const CREDENTIAL_FIELDS: &[&str] = &["source", "name"];
/// Fields of a `credential` with `"source": "bearer"` (no name: it is `authorization`).
pub const BEARER_CREDENTIAL_FIELDS: &[&str] = &["source"];
/// Fields of an entry of `routes`.
pub const ROUTE_FIELDS: &[&str] = &[
    "name", "methods", "exact", "prefix", "glob", "cost", "usage", "mcp",
];
/// Fields of a route's `usage`.
pub const USAGE_FIELDS: &[&str] = &[
    "json_pointer",
    "unit_cost",
    "input_pointer",
    "input_unit_cost",
    "output_pointer",
    "output_unit_cost",
    "estimate",
    "api",
    "per_tokens",
    "models",
    "default_prices",
    "model_from",
    "max_hold",
    "stream_include_usage",
];
/// Fields of a model's prices (`usage.models.NAME`, `usage.default_prices`).
pub const PRICE_FIELDS: &[&str] = &[
    "input",
    "cached_input",
    "cache_creation_input",
    "output",
    "reasoning",
];
/// Fields of a route's `mcp`.
pub const MCP_FIELDS: &[&str] = &["methods", "tools"];

/// A JSON object whose fields are read by name; any field not in `allowed` is an error.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Obj<'a> {
    fn new(value: &'a Value, path: &str, allowed: &[&str]) -> Result<Obj<'a>, ConfigError> {
        let Some(map) = value.as_object() else {
            return err(path, format!("must be an object, not {}", kind(value)));
        };
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return err(
                join(path, unknown),
                format!("unknown field (known fields: {})", allowed.join(", ")),
            );
        }
        Ok(Obj {
            map,
            path: path.to_string(),
        })
    }

    fn field(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Refuses the first of `keys` that is present, naming it, for `reason`.
    fn refuse_any(&self, keys: &[&str], reason: &str) -> Result<(), ConfigError> {
        match keys.iter().find(|k| self.get(k).is_some()) {
            Some(k) => err(self.field(k), reason),
            None => Ok(()),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => err(
                self.field(key),
                format!("must be a string, not {}", kind(v)),
            ),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => err(
                self.field(key),
                format!("must be true or false, not {}", kind(v)),
            ),
        }
    }

    fn u64(&self, key: &str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                Some(n) => err(
                    self.field(key),
                    format!("{n} is out of range {min}..={max}"),
                ),
                None => err(
                    self.field(key),
                    format!(
                        "must be a whole number from {min} to {max}, not {}",
                        show(v)
                    ),
                ),
            },
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

fn header_name(field: String, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        err(
            field,
            format!("{name:?} is not a lower-case HTTP header name"),
        )
    }
}

fn http_path(field: String, path: &str) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return err(field, format!("{path:?} must start with '/'"));
    }
    if path.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return err(field, "must not contain spaces or control characters");
    }
    Ok(path.to_string())
}

fn visible(field: String, value: &str, what: &str) -> Result<String, ConfigError> {
    if value.is_empty() {
        return err(field, format!("{what} must not be empty"));
    }
    if value.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return err(
            field,
            format!("{what} must be visible ASCII without spaces"),
        );
    }
    Ok(value.to_string())
}

impl Config {
    pub fn parse(raw: &[u8]) -> Result<Config, ConfigError> {
        let value: Value = match serde_json::from_slice(raw) {
            Ok(v) => v,
            Err(e) => return err("(root)", format!("not valid JSON: {e}")),
        };
        let top = Obj::new(&value, "", TOP_FIELDS).map_err(|mut e| {
            if e.field.is_empty() {
                e.field = "(root)".into();
            }
            e
        })?;

        let cluster = match top.str("cluster")? {
            None => {
                return err(
                    "cluster",
                    "is required (the Envoy cluster of the balance service)",
                )
            }
            Some(c) if c.trim().is_empty() => return err("cluster", "must not be empty"),
            Some(c) => visible("cluster".into(), c, "cluster")?,
        };
        let authority = match top.str("authority")? {
            Some(a) => visible("authority".into(), a, "authority")?,
            None => cluster.clone(),
        };
        let authorize_path = http_path(
            "authorize_path".into(),
            top.str("authorize_path")?.unwrap_or("/v1/authorize"),
        )?;
        let refund_path = http_path(
            "refund_path".into(),
            top.str("refund_path")?.unwrap_or("/v1/refund"),
        )?;
        let usage_path = http_path(
            "usage_path".into(),
            top.str("usage_path")?.unwrap_or("/v1/usage"),
        )?;
        let timeout_ms = top.u64("timeout_ms", 1, MAX_TIMEOUT_MS)?.unwrap_or(500);
        let service_token = match top.str("service_token")? {
            Some(t) => Some(visible("service_token".into(), t, "service_token")?),
            None => None,
        };
        let credential = match top.get("credential") {
            None => CredentialSource::Header("x-api-key".into()),
            Some(v) => parse_credential(v)?,
        };
        let failure_mode = match top.str("failure_mode")? {
            None | Some("closed") => FailureMode::Closed,
            Some("open") => FailureMode::Open,
            Some(other) => {
                return err(
                    "failure_mode",
                    format!("{other:?} is not \"closed\" or \"open\""),
                )
            }
        };
        let failure_retry_after_s =
            top.u64("failure_retry_after_s", 0, 86_400)?.unwrap_or(5) as u32;
        let default_cost = top.u64("default_cost", 0, MAX_AMOUNT)?.unwrap_or(1);
        let default_route = match top.str("default_route")? {
            Some(n) => route_name("default_route".into(), n)?,
            None => "default".to_string(),
        };
        let routes = match top.get("routes") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut routes: Vec<Route> = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let route = parse_route(item, &format!("routes[{i}]"))?;
                    if routes.iter().any(|r| r.name == route.name) || route.name == default_route {
                        return err(
                            format!("routes[{i}].name"),
                            format!("{:?} is used twice", route.name),
                        );
                    }
                    routes.push(route);
                }
                routes
            }
            Some(v) => return err("routes", format!("must be an array, not {}", kind(v))),
        };
        let no_charge_statuses = match top.get("no_charge_statuses") {
            None => parse_statuses(
                &Value::Array(vec![Value::String("5xx".into())]),
                "no_charge_statuses",
            )?,
            Some(v) => parse_statuses(v, "no_charge_statuses")?,
        };
        let account_header = header_name(
            "account_header".into(),
            top.str("account_header")?.unwrap_or("x-farebox-account"),
        )?;
        let balance_header = match top.str("balance_header")? {
            Some(h) => Some(header_name("balance_header".into(), h)?),
            None => None,
        };
        let budget_header = match top.str("budget_header")? {
            Some(h) => Some(header_name("budget_header".into(), h)?),
            None => None,
        };
        let cache_max_entries = top
            .u64("cache_max_entries", 0, MAX_CACHE_ENTRIES)?
            .unwrap_or(10_000) as u32;
        let cache_max_ttl_s = top.u64("cache_max_ttl_s", 0, 86_400)?.unwrap_or(300) as u32;
        let problem_type_base = match top.str("problem_type_base")? {
            Some(b) => visible("problem_type_base".into(), b, "problem_type_base")?,
            None => "https://farebox.dev/problems/".to_string(),
        };

        let mode = match top.str("mode")? {
            None | Some("authorize") => Mode::Authorize,
            Some("lease") => Mode::Lease,
            Some(other) => {
                return err(
                    "mode",
                    format!("{other:?} is not \"authorize\" or \"lease\""),
                )
            }
        };
        let settle_interval_ms = top
            .u64("settle_interval_ms", 10, 3_600_000)?
            .unwrap_or(1_000);
        let lease = LeaseConfig {
            path: http_path(
                "lease_path".into(),
                top.str("lease_path")?.unwrap_or("/v1/leases"),
            )?,
            want: top.u64("lease_want", 1, MAX_AMOUNT)?.unwrap_or(100),
            settle_interval_ms,
            expiry_margin_ms: top
                .u64("lease_expiry_margin_ms", 0, 3_600_000)?
                .unwrap_or(2_000),
            recall_wait_ms: top
                .u64("lease_recall_wait_ms", 0, 60_000)?
                .unwrap_or(2 * settle_interval_ms + 500),
            max_entries: top
                .u64("lease_max_entries", 1, 1_000_000)?
                .unwrap_or(16_384) as u32,
        };

        let challenges = match top.get("challenges") {
            None => Challenges {
                x402: true,
                payment: true,
            },
            Some(Value::Array(items)) => {
                let mut c = Challenges {
                    x402: false,
                    payment: false,
                };
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some("x402") => c.x402 = true,
                        Some("payment") => c.payment = true,
                        _ => {
                            return err(
                                format!("challenges[{i}]"),
                                format!("{} is not \"x402\" or \"payment\"", show_str(item)),
                            )
                        }
                    }
                }
                c
            }
            Some(v) => return err("challenges", format!("must be an array, not {}", kind(v))),
        };
        let accept_payments = top.bool("accept_payments")?.unwrap_or(true);
        let anonymous = top.bool("anonymous")?.unwrap_or(false);
        let html_402 = top.bool("html_402")?.unwrap_or(false);
        let access_log = top.bool("access_log")?.unwrap_or(true);
        let max_body_bytes = top.u64("max_body_bytes", 1, 16 << 20)?.unwrap_or(65_536) as usize;
        let usage_tail_bytes =
            top.u64("usage_tail_bytes", 64, 16 << 20)?.unwrap_or(65_536) as usize;

        Ok(Config {
            challenges,
            accept_payments,
            anonymous,
            html_402,
            access_log,
            max_body_bytes,
            usage_tail_bytes,
            mode,
            lease,
            cluster,
            authority,
            authorize_path,
            refund_path,
            usage_path,
            timeout: Duration::from_millis(timeout_ms),
            service_token,
            credential,
            failure_mode,
            failure_retry_after_s,
            pricing: Pricing {
                routes,
                default_cost,
                default_route,
            },
            no_charge_statuses,
            account_header,
            balance_header,
            budget_header,
            cache_max_entries,
            cache_max_ttl_s,
            problem_type_base,
            fingerprint: sha256::digest(raw),
        })
    }
}

fn parse_credential(v: &Value) -> Result<CredentialSource, ConfigError> {
    let source = v.get("source").and_then(Value::as_str);
    let allowed = match source {
        Some("bearer") => BEARER_CREDENTIAL_FIELDS,
        _ => CREDENTIAL_FIELDS,
    };
    let obj = Obj::new(v, "credential", allowed)?;
    match obj.str("source")? {
        Some("header") => {
            let name = obj.str("name")?.unwrap_or("x-api-key");
            Ok(CredentialSource::Header(header_name(
                "credential.name".into(),
                name,
            )?))
        }
        Some("bearer") => Ok(CredentialSource::Bearer),
        Some("query") => match obj.str("name")? {
            Some(n) if !n.is_empty() => Ok(CredentialSource::Query(n.to_string())),
            _ => err(
                "credential.name",
                "is required for source \"query\" (the query parameter)",
            ),
        },
        Some(other) => err(
            "credential.source",
            format!("{other:?} is not one of \"header\", \"bearer\", \"query\""),
        ),
        None => err(
            "credential.source",
            "is required: \"header\", \"bearer\" or \"query\"",
        ),
    }
}

fn route_name(field: String, name: &str) -> Result<String, ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
    if ok {
        Ok(name.to_string())
    } else {
        err(
            field,
            format!("{name:?} must be 1-64 characters of letters, digits and - _ . : /"),
        )
    }
}

fn parse_route(v: &Value, path: &str) -> Result<Route, ConfigError> {
    let obj = Obj::new(v, path, ROUTE_FIELDS)?;
    let name = match obj.str("name")? {
        Some(n) => route_name(obj.field("name"), n)?,
        None => return err(obj.field("name"), "is required"),
    };
    let methods = match obj.get("methods") {
        None => None,
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut methods = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                let field = format!("{}.methods[{i}]", obj.path);
                match m.as_str() {
                    Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphabetic()) => {
                        methods.push(s.to_ascii_uppercase())
                    }
                    _ => return err(field, format!("{} is not an HTTP method name", show_str(m))),
                }
            }
            Some(methods)
        }
        Some(Value::Array(_)) => {
            return err(
                obj.field("methods"),
                "must not be empty (leave it out to match every method)",
            )
        }
        Some(v) => {
            return err(
                obj.field("methods"),
                format!("must be an array of strings, not {}", kind(v)),
            )
        }
    };
    let patterns = [
        ("exact", obj.str("exact")?),
        ("prefix", obj.str("prefix")?),
        ("glob", obj.str("glob")?),
    ];
    let mut given = patterns.iter().filter_map(|(k, v)| v.map(|v| (*k, v)));
    let pattern = match (given.next(), given.next()) {
        (Some(_), Some((second, _))) => {
            return err(obj.field(second), "give only one of exact, prefix, glob")
        }
        (None, _) => return err(obj.path.clone(), "needs one of exact, prefix, glob"),
        (Some(("glob", g)), None) => PathPattern::glob(g).map_err(|e| ConfigError {
            field: obj.field("glob"),
            reason: format!("{g:?}: {e}"),
        })?,
        (Some((key, p)), None) => {
            let p = http_path(obj.field(key), p)?;
            if key == "exact" {
                PathPattern::Exact(p)
            } else {
                PathPattern::Prefix(p)
            }
        }
    };
    let usage = match obj.get("usage") {
        Some(v) => Some(parse_usage(v, &obj.field("usage"))?),
        None => None,
    };
    let mcp = match obj.get("mcp") {
        Some(v) => Some(parse_mcp(v, &obj.field("mcp"))?),
        None => None,
    };
    let cost = match (obj.u64("cost", 0, MAX_AMOUNT)?, &usage) {
        (Some(_), Some(_)) => {
            return err(
                obj.field("cost"),
                "leave it out with usage: usage.estimate is the price held",
            )
        }
        (None, Some(u)) => u.estimate,
        (Some(c), None) => c,
        (None, None) => return err(obj.field("cost"), "is required (0 makes the route free)"),
    };
    Ok(Route {
        name,
        methods,
        pattern,
        cost,
        usage,
        mcp,
    })
}

fn json_pointer(field: String, v: Option<&str>) -> Result<String, ConfigError> {
    match v {
        Some(p) if p.starts_with('/') && p.len() > 1 => Ok(p.to_string()),
        Some(p) => err(
            field,
            format!("{p:?} is not a JSON pointer like \"/usage/total_tokens\""),
        ),
        None => err(field, "is required"),
    }
}

fn parse_usage(v: &Value, path: &str) -> Result<UsageSpec, ConfigError> {
    let obj = Obj::new(v, path, USAGE_FIELDS)?;
    let unit = |key: &str| -> Result<u64, ConfigError> {
        match obj.u64(key, 0, MAX_AMOUNT)? {
            Some(n) => Ok(n),
            None => err(obj.field(key), "is required"),
        }
    };
    let estimate_of = |obj: &Obj| match obj.u64("estimate", 1, MAX_AMOUNT)? {
        Some(e) => Ok(e),
        None => err(
            obj.field("estimate"),
            "is required (the units held until the response is in)",
        ),
    };
    if obj.get("api").is_some() {
        obj.refuse_any(
            &[
                "json_pointer",
                "input_pointer",
                "output_pointer",
                "unit_cost",
                "input_unit_cost",
                "output_unit_cost",
            ],
            "leave it out with api: the api says where usage is",
        )?;
        let table = parse_price_table(&obj)?;
        // On by default where it applies: Chat Completions streams report usage only
        // when asked. The other APIs always report it, so there is nothing to ask.
        let stream_include_usage = match (obj.bool("stream_include_usage")?, table.api) {
            (Some(on), Api::OpenAiChat) => on,
            (None, Api::OpenAiChat) => true,
            (Some(_), _) => {
                return err(
                    obj.field("stream_include_usage"),
                    "applies to api \"openai_chat\" only: the other APIs always report usage",
                )
            }
            (None, _) => false,
        };
        return Ok(UsageSpec {
            parts: Vec::new(),
            estimate: estimate_of(&obj)?,
            table: Some(std::sync::Arc::new(table)),
            stream_include_usage,
        });
    }
    obj.refuse_any(
        &[
            "per_tokens",
            "models",
            "default_prices",
            "model_from",
            "max_hold",
        ],
        "needs api (the usage shape the prices apply to)",
    )?;
    let parts = if obj.get("json_pointer").is_some() {
        vec![(
            json_pointer(obj.field("json_pointer"), obj.str("json_pointer")?)?,
            unit("unit_cost")?,
        )]
    } else if obj.get("input_pointer").is_some() || obj.get("output_pointer").is_some() {
        vec![
            (
                json_pointer(obj.field("input_pointer"), obj.str("input_pointer")?)?,
                unit("input_unit_cost")?,
            ),
            (
                json_pointer(obj.field("output_pointer"), obj.str("output_pointer")?)?,
                unit("output_unit_cost")?,
            ),
        ]
    } else {
        return err(
            path,
            "needs json_pointer and unit_cost, or input_/output_pointer and their unit costs",
        );
    };
    let first = |p: &str| {
        p.trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("")
            .to_string()
    };
    if let [(a, _), (b, _)] = parts.as_slice() {
        if first(a) != first(b) {
            return err(
                format!("{path}.output_pointer"),
                "must start with the same member as input_pointer",
            );
        }
    }
    let estimate = estimate_of(&obj)?;
    Ok(UsageSpec {
        parts,
        estimate,
        table: None,
        // Off by default: a route priced by pointers may be any API; on, it suits
        // OpenAI-compatible Chat Completions.
        stream_include_usage: obj.bool("stream_include_usage")?.unwrap_or(false),
    })
}

fn parse_price_table(obj: &Obj) -> Result<PriceTable, ConfigError> {
    let api = match obj.str("api")? {
        Some(name) => match Api::parse(name) {
            Some(a) => a,
            None => {
                return err(
                    obj.field("api"),
                    format!(
                        "{name:?} is not one of \"openai_chat\", \"openai_responses\", \"openai_embeddings\", \"anthropic_messages\""
                    ),
                )
            }
        },
        None => return err(obj.field("api"), "is required"),
    };
    let per_tokens = obj.u64("per_tokens", 1, 1_000_000_000)?.unwrap_or(1);
    let mut models = BTreeMap::new();
    match obj.get("models") {
        None => {}
        Some(Value::Object(m)) => {
            for (name, prices) in m {
                let field = format!("{}.{name}", obj.field("models"));
                if name.is_empty() || name.len() > MAX_MODEL_LEN {
                    return err(field, format!("a model name is 1 to {MAX_MODEL_LEN} bytes"));
                }
                models.insert(name.clone(), parse_prices(prices, &field)?);
            }
        }
        Some(v) => {
            return err(
                obj.field("models"),
                format!("must be an object of model: prices, not {}", kind(v)),
            )
        }
    }
    let unknown = match obj.get("default_prices") {
        Some(v) => UnknownModel::Default(parse_prices(v, &obj.field("default_prices"))?),
        None => UnknownModel::Refuse,
    };
    if models.is_empty() && unknown == UnknownModel::Refuse {
        return err(
            obj.field("models"),
            "is required with api (or give default_prices)",
        );
    }
    let model_from = match obj.str("model_from")? {
        None | Some("request") => ModelFrom::Request,
        Some("response") => ModelFrom::Response,
        Some(other) => {
            return err(
                obj.field("model_from"),
                format!("{other:?} is not \"request\" or \"response\""),
            )
        }
    };
    let max_hold = obj.u64("max_hold", 1, MAX_AMOUNT)?.unwrap_or(MAX_AMOUNT);
    Ok(PriceTable {
        api,
        per_tokens,
        models,
        unknown,
        model_from,
        max_hold,
    })
}

/// A model's prices: `input` and `output` required; cached and cache-creation input
/// cost what input does unless given, reasoning what output does.
fn parse_prices(v: &Value, path: &str) -> Result<Prices, ConfigError> {
    let obj = Obj::new(v, path, PRICE_FIELDS)?;
    let need = |key: &str| match obj.u64(key, 0, MAX_AMOUNT)? {
        Some(n) => Ok(n),
        None => err(obj.field(key), "is required"),
    };
    let input = need("input")?;
    let output = need("output")?;
    Ok(Prices {
        input,
        output,
        cached_input: obj.u64("cached_input", 0, MAX_AMOUNT)?.unwrap_or(input),
        cache_creation_input: obj
            .u64("cache_creation_input", 0, MAX_AMOUNT)?
            .unwrap_or(input),
        reasoning: obj.u64("reasoning", 0, MAX_AMOUNT)?.unwrap_or(output),
    })
}

fn parse_mcp(v: &Value, path: &str) -> Result<McpPricing, ConfigError> {
    let obj = Obj::new(v, path, MCP_FIELDS)?;
    let table = |key: &str| -> Result<BTreeMap<String, u64>, ConfigError> {
        let mut out = BTreeMap::new();
        match obj.get(key) {
            None => {}
            Some(Value::Object(m)) => {
                for (name, cost) in m {
                    match cost.as_u64().filter(|c| *c <= MAX_AMOUNT) {
                        Some(c) if !name.is_empty() => {
                            out.insert(name.clone(), c);
                        }
                        _ => {
                            return err(
                                format!("{}.{name}", obj.field(key)),
                                format!("must be a whole-number cost, not {}", show(cost)),
                            )
                        }
                    }
                }
            }
            Some(v) => {
                return err(
                    obj.field(key),
                    format!("must be an object of name: cost, not {}", kind(v)),
                )
            }
        }
        Ok(out)
    };
    Ok(McpPricing {
        methods: table("methods")?,
        tools: table("tools")?,
    })
}

fn show_str(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => show(other),
    }
}

fn parse_statuses(v: &Value, path: &str) -> Result<StatusSet, ConfigError> {
    let Some(items) = v.as_array() else {
        return err(
            path,
            format!(
                "must be an array of statuses or classes like \"5xx\", not {}",
                kind(v)
            ),
        );
    };
    let mut set = StatusSet::default();
    for (i, item) in items.iter().enumerate() {
        let field = format!("{path}[{i}]");
        match item {
            Value::Number(n) => match n.as_u64() {
                Some(s @ 100..=599) => set.insert(s as u16),
                _ => return err(field, format!("{n} is not an HTTP status (100-599)")),
            },
            Value::String(s) => match s.as_bytes() {
                [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                    let base = u16::from(c - b'0') * 100;
                    for status in base..base + 100 {
                        set.insert(status);
                    }
                }
                _ => return err(field, format!("{s:?} is not a status class like \"5xx\"")),
            },
            other => {
                return err(
                    field,
                    format!(
                        "must be a status or a class like \"5xx\", not {}",
                        kind(other)
                    ),
                )
            }
        }
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s.as_bytes())
    }

    fn field_of(s: &str) -> String {
        parse(s).unwrap_err().field
    }

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = parse(r#"{"cluster": "balance"}"#).unwrap();
        assert_eq!(c.authority, "balance");
        assert_eq!(c.authorize_path, "/v1/authorize");
        assert_eq!(c.refund_path, "/v1/refund");
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.credential, CredentialSource::Header("x-api-key".into()));
        assert_eq!(c.failure_mode, FailureMode::Closed);
        assert_eq!(c.failure_retry_after_s, 5);
        assert_eq!(c.pricing.default_cost, 1);
        assert_eq!(c.pricing.default_route, "default");
        assert!(c.pricing.routes.is_empty());
        assert!(c.no_charge_statuses.contains(500) && c.no_charge_statuses.contains(599));
        assert!(!c.no_charge_statuses.contains(499) && !c.no_charge_statuses.contains(200));
        assert_eq!(c.account_header, "x-farebox-account");
        assert_eq!(c.balance_header, None);
        assert_eq!(c.budget_header, None);
        assert_eq!(c.cache_max_entries, 10_000);
        assert_eq!(c.service_token, None);
        assert_eq!(c.mode, Mode::Authorize);
        assert_eq!(c.lease.path, "/v1/leases");
        assert_eq!(
            (
                c.lease.want,
                c.lease.settle_interval_ms,
                c.lease.expiry_margin_ms
            ),
            (100, 1_000, 2_000)
        );
    }

    #[test]
    fn usage_and_mcp_routes() {
        let c = parse(
            r#"{"cluster": "b", "routes": [
                {"name": "chat", "prefix": "/v1/chat/", "usage": {"json_pointer": "/usage/total_tokens", "unit_cost": 2, "estimate": 500}},
                {"name": "split", "prefix": "/v2/", "usage": {"input_pointer": "/usage/prompt_tokens", "input_unit_cost": 1,
                                                            "output_pointer": "/usage/completion_tokens", "output_unit_cost": 3, "estimate": 10}},
                {"name": "mcp", "exact": "/mcp", "cost": 1, "mcp": {"methods": {"tools/list": 0}, "tools": {"search": 5}}}
            ], "challenges": ["x402"], "anonymous": true, "html_402": true, "max_body_bytes": 1024}"#,
        )
        .unwrap();
        let chat = &c.pricing.routes[0];
        assert_eq!(chat.cost, 500);
        assert_eq!(
            chat.usage.as_ref().unwrap().parts,
            vec![("/usage/total_tokens".to_string(), 2)]
        );
        assert_eq!(c.pricing.routes[1].usage.as_ref().unwrap().parts.len(), 2);
        assert_eq!(
            c.pricing.routes[2]
                .mcp
                .as_ref()
                .unwrap()
                .tools
                .get("search"),
            Some(&5)
        );
        assert_eq!(
            c.challenges,
            Challenges {
                x402: true,
                payment: false
            }
        );
        assert!(c.anonymous && c.html_402 && c.accept_payments);
        assert_eq!(c.max_body_bytes, 1024);
        let d = parse(r#"{"cluster": "b"}"#).unwrap();
        assert_eq!(
            d.challenges,
            Challenges {
                x402: true,
                payment: true
            }
        );
        assert!(!d.anonymous && !d.html_402);

        let r = |route: &str| format!(r#"{{"cluster": "b", "routes": [{route}]}}"#);
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "cost": 1, "usage": {"json_pointer": "/u", "unit_cost": 1, "estimate": 1}}"#
            )),
            "routes[0].cost"
        );
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "usage": {"json_pointer": "u", "unit_cost": 1, "estimate": 1}}"#
            )),
            "routes[0].usage.json_pointer"
        );
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "usage": {"json_pointer": "/u", "estimate": 1}}"#
            )),
            "routes[0].usage.unit_cost"
        );
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "usage": {"json_pointer": "/u", "unit_cost": 1}}"#
            )),
            "routes[0].usage.estimate"
        );
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "usage": {"estimate": 1}}"#
            )),
            "routes[0].usage"
        );
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "usage": {"input_pointer": "/a/x", "input_unit_cost": 1, "output_pointer": "/b/y", "output_unit_cost": 1, "estimate": 1}}"#
            )),
            "routes[0].usage.output_pointer"
        );
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "cost": 1, "mcp": {"tools": {"s": -1}}}"#
            )),
            "routes[0].mcp.tools.s"
        );
        assert_eq!(
            field_of(&r(
                r#"{"name": "a", "prefix": "/", "cost": 1, "mcp": {"prompts": {}}}"#
            )),
            "routes[0].mcp.prompts"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "challenges": ["l402"]}"#),
            "challenges[0]"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "anonymous": "yes"}"#),
            "anonymous"
        );
    }

    #[test]
    fn token_price_tables() {
        let c = parse(
            r#"{"cluster": "b", "routes": [
                {"name": "claude", "prefix": "/v1/messages", "usage": {"api": "anthropic_messages", "per_tokens": 1000000,
                 "models": {"claude-x": {"input": 3000000, "output": 15000000, "cached_input": 300000}},
                 "max_hold": 5000, "estimate": 100}},
                {"name": "emb", "prefix": "/v1/embeddings", "usage": {"api": "openai_embeddings",
                 "default_prices": {"input": 1, "output": 0}, "model_from": "response", "estimate": 1}}
            ]}"#,
        )
        .unwrap();
        let t = c.pricing.routes[0]
            .usage
            .as_ref()
            .unwrap()
            .table
            .clone()
            .unwrap();
        assert_eq!(
            (t.api, t.per_tokens, t.max_hold),
            (Api::Anthropic, 1_000_000, 5000)
        );
        let p = t.models["claude-x"];
        assert_eq!(
            (
                p.input,
                p.cached_input,
                p.cache_creation_input,
                p.output,
                p.reasoning
            ),
            (3_000_000, 300_000, 3_000_000, 15_000_000, 15_000_000),
            "unset classes default to input and output"
        );
        assert_eq!(t.unknown, UnknownModel::Refuse);
        let e = c.pricing.routes[1]
            .usage
            .as_ref()
            .unwrap()
            .table
            .clone()
            .unwrap();
        assert_eq!(
            (e.model_from, e.max_hold),
            (ModelFrom::Response, MAX_AMOUNT)
        );
        assert!(matches!(e.unknown, UnknownModel::Default(_)));
        assert_eq!(c.pricing.routes[1].cost, 1);

        let r = |usage: &str| {
            field_of(&format!(
                r#"{{"cluster": "b", "routes": [{{"name": "a", "prefix": "/", "usage": {usage}}}]}}"#
            ))
        };
        let m = r#""models": {"x": {"input": 1, "output": 1}}"#;
        assert_eq!(
            r(&format!(r#"{{"api": "gemini", {m}, "estimate": 1}}"#)),
            "routes[0].usage.api"
        );
        assert_eq!(
            r(r#"{"api": "openai_chat", "estimate": 1}"#),
            "routes[0].usage.models"
        );
        assert_eq!(
            r(r#"{"api": "openai_chat", "models": {"x": {"input": 1}}, "estimate": 1}"#),
            "routes[0].usage.models.x.output"
        );
        assert_eq!(
            r(
                r#"{"api": "openai_chat", "models": {"x": {"input": 1, "output": 1, "audio": 2}}, "estimate": 1}"#
            ),
            "routes[0].usage.models.x.audio"
        );
        assert_eq!(
            r(&format!(
                r#"{{"api": "openai_chat", {m}, "unit_cost": 1, "estimate": 1}}"#
            )),
            "routes[0].usage.unit_cost"
        );
        assert_eq!(
            r(&format!(
                r#"{{"api": "openai_chat", {m}, "model_from": "body", "estimate": 1}}"#
            )),
            "routes[0].usage.model_from"
        );
        assert_eq!(
            r(&format!(
                r#"{{"api": "openai_chat", {m}, "per_tokens": 0, "estimate": 1}}"#
            )),
            "routes[0].usage.per_tokens"
        );
        assert_eq!(
            r(&format!(
                r#"{{"api": "openai_responses", {m}, "stream_include_usage": true, "estimate": 1}}"#
            )),
            "routes[0].usage.stream_include_usage"
        );
        assert_eq!(
            r(&format!(
                r#"{{"api": "openai_chat", {m}, "stream_include_usage": 1, "estimate": 1}}"#
            )),
            "routes[0].usage.stream_include_usage"
        );
        let include = |usage: &str| {
            let raw = format!(
                r#"{{"cluster": "b", "routes": [{{"name": "a", "prefix": "/", "usage": {usage}}}]}}"#
            );
            let c = Config::parse(raw.as_bytes()).unwrap();
            c.pricing.routes[0]
                .usage
                .as_ref()
                .unwrap()
                .stream_include_usage
        };
        assert!(include(&format!(
            r#"{{"api": "openai_chat", {m}, "estimate": 1}}"#
        )));
        assert!(!include(&format!(
            r#"{{"api": "openai_chat", {m}, "stream_include_usage": false, "estimate": 1}}"#
        )));
        assert!(!include(&format!(
            r#"{{"api": "anthropic_messages", {m}, "estimate": 1}}"#
        )));
        assert!(!include(
            r#"{"json_pointer": "/u/t", "unit_cost": 1, "estimate": 1}"#
        ));
        assert!(include(
            r#"{"json_pointer": "/u/t", "unit_cost": 1, "estimate": 1, "stream_include_usage": true}"#
        ));
        assert_eq!(
            r(&format!(r#"{{"api": "openai_chat", {m}}}"#)),
            "routes[0].usage.estimate"
        );
        assert_eq!(
            r(r#"{"json_pointer": "/u", "unit_cost": 1, "models": {}, "estimate": 1}"#),
            "routes[0].usage.models"
        );
    }

    #[test]
    fn lease_mode() {
        let c = parse(
            r#"{"cluster": "b", "mode": "lease", "lease_want": 50, "settle_interval_ms": 200}"#,
        )
        .unwrap();
        assert_eq!(
            (c.mode, c.lease.want, c.lease.settle_interval_ms),
            (Mode::Lease, 50, 200)
        );
        assert_eq!((c.lease.recall_wait_ms, c.lease.max_entries), (900, 16_384));
        let c = parse(r#"{"cluster": "b", "lease_recall_wait_ms": 0, "lease_max_entries": 1}"#)
            .unwrap();
        assert_eq!((c.lease.recall_wait_ms, c.lease.max_entries), (0, 1));
        assert_eq!(
            field_of(r#"{"cluster": "b", "lease_recall_wait_ms": 60001}"#),
            "lease_recall_wait_ms"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "lease_max_entries": 0}"#),
            "lease_max_entries"
        );
        assert_eq!(field_of(r#"{"cluster": "b", "mode": "prepaid"}"#), "mode");
        assert_eq!(
            field_of(r#"{"cluster": "b", "lease_want": 0}"#),
            "lease_want"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "settle_interval_ms": 5}"#),
            "settle_interval_ms"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "lease_path": "x"}"#),
            "lease_path"
        );
    }

    #[test]
    fn full_config_parses() {
        let c = parse(
            r#"{"cluster": "balance", "authority": "billing.internal", "timeout_ms": 250,
                "service_token": "s3cret", "credential": {"source": "query", "name": "api_key"},
                "failure_mode": "open", "default_cost": 2, "default_route": "other",
                "routes": [{"name": "health", "methods": ["get", "HEAD"], "exact": "/health", "cost": 0},
                           {"name": "infer", "glob": "/v1/*/infer", "cost": 5},
                           {"name": "docs", "prefix": "/docs/", "cost": 0}],
                "no_charge_statuses": [429, "5xx"], "balance_header": "x-farebox-balance",
                "budget_header": "x-farebox-budget-remaining",
                "cache_max_entries": 0, "account_header": "x-account"}"#,
        )
        .unwrap();
        assert_eq!(c.authority, "billing.internal");
        assert_eq!(
            c.budget_header.as_deref(),
            Some("x-farebox-budget-remaining")
        );
        assert_eq!(c.failure_mode, FailureMode::Open);
        assert_eq!(c.credential, CredentialSource::Query("api_key".into()));
        assert_eq!(c.pricing.routes.len(), 3);
        assert_eq!(
            c.pricing.routes[0].methods,
            Some(vec!["GET".to_string(), "HEAD".to_string()])
        );
        assert!(c.no_charge_statuses.contains(429) && !c.no_charge_statuses.contains(404));
        assert_eq!(c.cache_max_entries, 0);
        assert_eq!(c.pricing.price("POST", "/v1/m/infer").cost, 5);
        assert_eq!(c.pricing.price("GET", "/x").route, "other");
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(field_of("not json"), "(root)");
        assert_eq!(field_of("[1]"), "(root)");
        assert_eq!(field_of("{}"), "cluster");
        assert_eq!(field_of(r#"{"cluster": ""}"#), "cluster");
        assert_eq!(field_of(r#"{"cluster": 5}"#), "cluster");
        assert_eq!(field_of(r#"{"cluster": "b", "cluser": "x"}"#), "cluser");
        assert_eq!(
            field_of(r#"{"cluster": "b", "timeout_ms": 0}"#),
            "timeout_ms"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "timeout_ms": "5"}"#),
            "timeout_ms"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "timeout_ms": 1.5}"#),
            "timeout_ms"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "default_cost": -1}"#),
            "default_cost"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "failure_mode": "maybe"}"#),
            "failure_mode"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "credential": {"source": "cookie"}}"#),
            "credential.source"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "credential": {"source": "bearer", "name": "x"}}"#),
            "credential.name"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "credential": {"source": "query"}}"#),
            "credential.name"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "credential": {"source": "header", "name": "X Key"}}"#),
            "credential.name"
        );
        assert_eq!(field_of(r#"{"cluster": "b", "routes": {}}"#), "routes");
        assert_eq!(
            field_of(r#"{"cluster": "b", "routes": [{"name": "a", "glob": "/a/**", "cost": 1}]}"#),
            "routes[0].glob"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "routes": [{"name": "a", "glob": "/a*b", "cost": 1}]}"#),
            "routes[0].glob"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "routes": [{"name": "a", "glob": "a/b", "cost": 1}]}"#),
            "routes[0].glob"
        );
        assert_eq!(
            field_of(
                r#"{"cluster": "b", "routes": [{"name": "a", "exact": "/a", "prefix": "/b", "cost": 1}]}"#
            ),
            "routes[0].prefix"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "routes": [{"name": "a", "cost": 1}]}"#),
            "routes[0]"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "routes": [{"name": "a", "exact": "/a"}]}"#),
            "routes[0].cost"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "routes": [{"exact": "/a", "cost": 1}]}"#),
            "routes[0].name"
        );
        assert_eq!(
            field_of(
                r#"{"cluster": "b", "routes": [{"name": "a", "exact": "/a", "cost": 1, "x": 1}]}"#
            ),
            "routes[0].x"
        );
        assert_eq!(
            field_of(
                r#"{"cluster": "b", "routes": [{"name": "a", "exact": "/a", "cost": 1}, {"name": "a", "exact": "/b", "cost": 1}]}"#
            ),
            "routes[1].name"
        );
        assert_eq!(
            field_of(
                r#"{"cluster": "b", "routes": [{"name": "a", "methods": [], "exact": "/a", "cost": 1}]}"#
            ),
            "routes[0].methods"
        );
        assert_eq!(
            field_of(
                r#"{"cluster": "b", "routes": [{"name": "a", "methods": ["G T"], "exact": "/a", "cost": 1}]}"#
            ),
            "routes[0].methods[0]"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "no_charge_statuses": [600]}"#),
            "no_charge_statuses[0]"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "no_charge_statuses": ["6xx"]}"#),
            "no_charge_statuses[0]"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "account_header": "X-Upper"}"#),
            "account_header"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "authorize_path": "v1"}"#),
            "authorize_path"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "service_token": "a b"}"#),
            "service_token"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "default_cost": 9007199254740992}"#),
            "default_cost"
        );
    }

    #[test]
    fn error_message_is_actionable() {
        let e = parse(r#"{"cluster": "b", "routes": [{"name": "a", "glob": "/a/**", "cost": 1}]}"#)
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("invalid plugin config: routes[0].glob: "),
            "{text}"
        );
        assert!(text.contains("prefix"), "{text}");
        let e = parse(r#"{"cluster": "b", "cluser": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluser") && e.contains("known fields"), "{e}");
    }

    #[test]
    fn fingerprint_follows_the_config() {
        let a = parse(r#"{"cluster": "b", "default_cost": 1}"#).unwrap();
        let b = parse(r#"{"cluster": "b", "default_cost": 2}"#).unwrap();
        assert_ne!(a.fingerprint, b.fingerprint);
    }

    #[test]
    fn status_set() {
        let mut s = StatusSet::default();
        s.insert(503);
        s.insert(100);
        s.insert(599);
        assert!(s.contains(503) && s.contains(100) && s.contains(599));
        assert!(!s.contains(502) && !s.contains(0) && !s.contains(700));
    }
}
