//! Plugin configuration: the JSON Envoy hands to `on_configure`, read into the serde types
//! of [`raw`] (unknown fields refused), then validated into [`Config`]. Every refusal names
//! the field, as a path like `routes[2].usage.unit_cost`, and the reason.

mod raw;
mod reader;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

pub use raw::known_fields;
use raw::{
    ChallengeName, Entries, FailureModeName, ModeName, ModelFromName, Num, RawConfig,
    RawCredential, RawMcp, RawPrices, RawRoute, RawUsage, SourceName, StatusItem,
};
use reader::{At, Reader};

use crate::amount::MAX_AMOUNT;
use crate::identity::CredentialSource;
use crate::mcp::McpPricing;
use crate::pricing::{PathPattern, Pricing, Route};
use crate::tokens::{Api, ModelFrom, PriceTable, Prices, UnknownModel, MAX_MODEL_LEN};
use crate::usage::UsageSpec;
use sha2::{Digest, Sha256};

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

fn err<T>(field: impl fmt::Display, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    })
}

/// A number that is a whole number in `min..=max`, or the refusal naming its field.
fn whole(field: &At, Num(n): &Num, min: u64, max: u64) -> Result<u64, ConfigError> {
    match n.as_u64() {
        Some(v) if (min..=max).contains(&v) => Ok(v),
        Some(v) => err(field, format!("{v} is out of range {min}..={max}")),
        None => err(
            field,
            format!("must be a whole number from {min} to {max}, not {n}"),
        ),
    }
}

/// An optional whole number in `min..=max` (see [`whole`]).
fn opt_whole(field: &At, n: Option<&Num>, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
    n.map(|n| whole(field, n, min, max)).transpose()
}

/// The path of field `key` of the object at `at`, for a refusal.
fn join(at: &At, key: &str) -> String {
    At::Key(at, key).to_string()
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
        // Through `Value` first: a key given twice is read as its last value, as it
        // always was (a derived struct would refuse it).
        let value: Value = match serde_json::from_slice(raw) {
            Ok(v) => v,
            Err(e) => return err("(root)", format!("not valid JSON: {e}")),
        };
        let top = RawConfig::deserialize(Reader {
            value: &value,
            at: &At::Root,
        })?;
        Config::validate(top, Sha256::digest(raw).into())
    }

    /// The typed configuration from the raw one: ranges, defaults and the rules between
    /// fields, each refusal naming its field.
    fn validate(top: RawConfig, fingerprint: [u8; 32]) -> Result<Config, ConfigError> {
        let num = |field: &str, n: &Option<Num>, min: u64, max: u64| {
            opt_whole(&At::Key(&At::Root, field), n.as_ref(), min, max)
        };
        let cluster = match top.cluster {
            None => {
                return err(
                    "cluster",
                    "is required (the Envoy cluster of the balance service)",
                )
            }
            Some(c) if c.trim().is_empty() => return err("cluster", "must not be empty"),
            Some(c) => visible("cluster".into(), c, "cluster")?,
        };
        let authority = match top.authority {
            Some(a) => visible("authority".into(), a, "authority")?,
            None => cluster.clone(),
        };
        let authorize_path = http_path(
            "authorize_path".into(),
            top.authorize_path.unwrap_or("/v1/authorize"),
        )?;
        let refund_path = http_path(
            "refund_path".into(),
            top.refund_path.unwrap_or("/v1/refund"),
        )?;
        let usage_path = http_path("usage_path".into(), top.usage_path.unwrap_or("/v1/usage"))?;
        let timeout_ms = num("timeout_ms", &top.timeout_ms, 1, MAX_TIMEOUT_MS)?.unwrap_or(500);
        let service_token = match top.service_token {
            Some(t) => Some(visible("service_token".into(), t, "service_token")?),
            None => None,
        };
        let credential = match &top.credential {
            None => CredentialSource::Header("x-api-key".into()),
            Some(c) => credential(c)?,
        };
        let failure_mode = match top.failure_mode {
            None | Some(FailureModeName::Closed) => FailureMode::Closed,
            Some(FailureModeName::Open) => FailureMode::Open,
        };
        let failure_retry_after_s = num(
            "failure_retry_after_s",
            &top.failure_retry_after_s,
            0,
            86_400,
        )?
        .unwrap_or(5) as u32;
        let default_cost = num("default_cost", &top.default_cost, 0, MAX_AMOUNT)?.unwrap_or(1);
        let default_route = match top.default_route {
            Some(n) => route_name("default_route".into(), n)?,
            None => "default".to_string(),
        };
        let items = top.routes.as_deref().unwrap_or_default();
        let mut routes: Vec<Route> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let route = route(item, &At::Index(&At::Key(&At::Root, "routes"), i))?;
            if routes.iter().any(|r| r.name == route.name) || route.name == default_route {
                return err(
                    format!("routes[{i}].name"),
                    format!("{:?} is used twice", route.name),
                );
            }
            routes.push(route);
        }
        let mut no_charge_statuses = StatusSet::default();
        let statuses = top.no_charge_statuses.as_deref();
        for item in statuses.unwrap_or(&[StatusItem::Class(500)]) {
            match *item {
                StatusItem::One(status) => no_charge_statuses.insert(status),
                StatusItem::Class(base) => {
                    for status in base..base + 100 {
                        no_charge_statuses.insert(status);
                    }
                }
            }
        }
        let account_header = header_name(
            "account_header".into(),
            top.account_header.unwrap_or("x-farebox-account"),
        )?;
        let balance_header = match top.balance_header {
            Some(h) => Some(header_name("balance_header".into(), h)?),
            None => None,
        };
        let budget_header = match top.budget_header {
            Some(h) => Some(header_name("budget_header".into(), h)?),
            None => None,
        };
        let cache_max_entries = num(
            "cache_max_entries",
            &top.cache_max_entries,
            0,
            MAX_CACHE_ENTRIES,
        )?
        .unwrap_or(10_000) as u32;
        let cache_max_ttl_s =
            num("cache_max_ttl_s", &top.cache_max_ttl_s, 0, 86_400)?.unwrap_or(300) as u32;
        let problem_type_base = match top.problem_type_base {
            Some(b) => visible("problem_type_base".into(), b, "problem_type_base")?,
            None => "https://farebox.dev/problems/".to_string(),
        };

        let mode = match top.mode {
            None | Some(ModeName::Authorize) => Mode::Authorize,
            Some(ModeName::Lease) => Mode::Lease,
        };
        let settle_interval_ms =
            num("settle_interval_ms", &top.settle_interval_ms, 10, 3_600_000)?.unwrap_or(1_000);
        let lease = LeaseConfig {
            path: http_path("lease_path".into(), top.lease_path.unwrap_or("/v1/leases"))?,
            want: num("lease_want", &top.lease_want, 1, MAX_AMOUNT)?.unwrap_or(100),
            settle_interval_ms,
            expiry_margin_ms: num(
                "lease_expiry_margin_ms",
                &top.lease_expiry_margin_ms,
                0,
                3_600_000,
            )?
            .unwrap_or(2_000),
            recall_wait_ms: num("lease_recall_wait_ms", &top.lease_recall_wait_ms, 0, 60_000)?
                .unwrap_or(2 * settle_interval_ms + 500),
            max_entries: num("lease_max_entries", &top.lease_max_entries, 1, 1_000_000)?
                .unwrap_or(16_384) as u32,
        };

        let challenges = match top.challenges.as_deref() {
            None => Challenges {
                x402: true,
                payment: true,
            },
            Some(items) => Challenges {
                x402: items.iter().any(|c| matches!(c, ChallengeName::X402)),
                payment: items.iter().any(|c| matches!(c, ChallengeName::Payment)),
            },
        };
        let max_body_bytes =
            num("max_body_bytes", &top.max_body_bytes, 1, 16 << 20)?.unwrap_or(65_536) as usize;
        let usage_tail_bytes = num("usage_tail_bytes", &top.usage_tail_bytes, 64, 16 << 20)?
            .unwrap_or(65_536) as usize;

        Ok(Config {
            challenges,
            accept_payments: top.accept_payments.unwrap_or(true),
            anonymous: top.anonymous.unwrap_or(false),
            html_402: top.html_402.unwrap_or(false),
            access_log: top.access_log.unwrap_or(true),
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
            fingerprint,
        })
    }
}

fn credential(c: &RawCredential) -> Result<CredentialSource, ConfigError> {
    match (c.source, c.name) {
        (Some(SourceName::Header), name) => Ok(CredentialSource::Header(header_name(
            "credential.name".into(),
            name.unwrap_or("x-api-key"),
        )?)),
        (Some(SourceName::Bearer), None) => Ok(CredentialSource::Bearer),
        (Some(SourceName::Bearer), Some(_)) => err(
            "credential.name",
            "leave it out with source \"bearer\": the credential is the Authorization header",
        ),
        (Some(SourceName::Query), Some(n)) if !n.is_empty() => {
            Ok(CredentialSource::Query(n.to_string()))
        }
        (Some(SourceName::Query), _) => err(
            "credential.name",
            "is required for source \"query\" (the query parameter)",
        ),
        (None, _) => err(
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

fn route(r: &RawRoute, path: &At) -> Result<Route, ConfigError> {
    let name = match r.name {
        Some(n) => route_name(join(path, "name"), n)?,
        None => return err(join(path, "name"), "is required"),
    };
    let methods = match r.methods.as_deref() {
        None => None,
        Some([]) => {
            return err(
                join(path, "methods"),
                "must not be empty (leave it out to match every method)",
            )
        }
        Some(items) => {
            let mut methods = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return err(
                        At::Index(&At::Key(path, "methods"), i),
                        format!("{m:?} is not an HTTP method name"),
                    );
                }
                methods.push(m.to_ascii_uppercase());
            }
            Some(methods)
        }
    };
    let patterns = [("exact", r.exact), ("prefix", r.prefix), ("glob", r.glob)];
    let mut given = patterns.iter().filter_map(|(k, v)| v.map(|v| (*k, v)));
    let pattern = match (given.next(), given.next()) {
        (Some(_), Some((second, _))) => {
            return err(join(path, second), "give only one of exact, prefix, glob")
        }
        (None, _) => return err(path, "needs one of exact, prefix, glob"),
        (Some(("glob", g)), None) => PathPattern::glob(g).map_err(|e| ConfigError {
            field: join(path, "glob"),
            reason: format!("{g:?}: {e}"),
        })?,
        (Some((key, p)), None) => {
            let p = http_path(join(path, key), p)?;
            if key == "exact" {
                PathPattern::Exact(p)
            } else {
                PathPattern::Prefix(p)
            }
        }
    };
    let usage = match &r.usage {
        Some(u) => Some(usage(u, &At::Key(path, "usage"))?),
        None => None,
    };
    let mcp = match &r.mcp {
        Some(m) => Some(mcp(m, &At::Key(path, "mcp"))?),
        None => None,
    };
    let cost_field = At::Key(path, "cost");
    let cost = match (
        opt_whole(&cost_field, r.cost.as_ref(), 0, MAX_AMOUNT)?,
        &usage,
    ) {
        (Some(_), Some(_)) => {
            return err(
                cost_field,
                "leave it out with usage: usage.estimate is the price held",
            )
        }
        (None, Some(u)) => u.estimate,
        (Some(c), None) => c,
        (None, None) => return err(cost_field, "is required (0 makes the route free)"),
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

/// Refuses the first of `fields` (name, whether it is given) that is given, for `reason`.
fn refuse_any(path: &At, fields: &[(&str, bool)], reason: &str) -> Result<(), ConfigError> {
    match fields.iter().find(|(_, given)| *given) {
        Some((name, _)) => err(join(path, name), reason),
        None => Ok(()),
    }
}

fn usage(u: &RawUsage, path: &At) -> Result<UsageSpec, ConfigError> {
    let unit = |key: &str, n: &Option<Num>| -> Result<u64, ConfigError> {
        let field = At::Key(path, key);
        match opt_whole(&field, n.as_ref(), 0, MAX_AMOUNT)? {
            Some(n) => Ok(n),
            None => err(field, "is required"),
        }
    };
    let estimate_of = || {
        let field = At::Key(path, "estimate");
        match opt_whole(&field, u.estimate.as_ref(), 1, MAX_AMOUNT)? {
            Some(e) => Ok(e),
            None => err(
                field,
                "is required (the units held until the response is in)",
            ),
        }
    };
    if let Some(api) = u.api {
        refuse_any(
            path,
            &[
                ("json_pointer", u.json_pointer.is_some()),
                ("input_pointer", u.input_pointer.is_some()),
                ("output_pointer", u.output_pointer.is_some()),
                ("unit_cost", u.unit_cost.is_some()),
                ("input_unit_cost", u.input_unit_cost.is_some()),
                ("output_unit_cost", u.output_unit_cost.is_some()),
            ],
            "leave it out with api: the api says where usage is",
        )?;
        let table = price_table(u, api, path)?;
        // On by default where it applies: Chat Completions streams report usage only
        // when asked. The other APIs always report it, so there is nothing to ask.
        let stream_include_usage = match (u.stream_include_usage, table.api) {
            (Some(on), Api::OpenAiChat) => on,
            (None, Api::OpenAiChat) => true,
            (Some(_), _) => {
                return err(
                    join(path, "stream_include_usage"),
                    "applies to api \"openai_chat\" only: the other APIs always report usage",
                )
            }
            (None, _) => false,
        };
        return Ok(UsageSpec {
            parts: Vec::new(),
            estimate: estimate_of()?,
            table: Some(std::sync::Arc::new(table)),
            stream_include_usage,
        });
    }
    refuse_any(
        path,
        &[
            ("per_tokens", u.per_tokens.is_some()),
            ("models", u.models.is_some()),
            ("default_prices", u.default_prices.is_some()),
            ("model_from", u.model_from.is_some()),
            ("max_hold", u.max_hold.is_some()),
        ],
        "needs api (the usage shape the prices apply to)",
    )?;
    let pointer = |key: &str, v: &Option<&str>| json_pointer(join(path, key), *v);
    let parts = if u.json_pointer.is_some() {
        vec![(
            pointer("json_pointer", &u.json_pointer)?,
            unit("unit_cost", &u.unit_cost)?,
        )]
    } else if u.input_pointer.is_some() || u.output_pointer.is_some() {
        vec![
            (
                pointer("input_pointer", &u.input_pointer)?,
                unit("input_unit_cost", &u.input_unit_cost)?,
            ),
            (
                pointer("output_pointer", &u.output_pointer)?,
                unit("output_unit_cost", &u.output_unit_cost)?,
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
                join(path, "output_pointer"),
                "must start with the same member as input_pointer",
            );
        }
    }
    let estimate = estimate_of()?;
    Ok(UsageSpec {
        parts,
        estimate,
        table: None,
        // Off by default: a route priced by pointers may be any API; on, it suits
        // OpenAI-compatible Chat Completions.
        stream_include_usage: u.stream_include_usage.unwrap_or(false),
    })
}

fn price_table(u: &RawUsage, api: &str, path: &At) -> Result<PriceTable, ConfigError> {
    let Some(api) = Api::parse(api) else {
        return err(
            join(path, "api"),
            format!(
                "{api:?} is not one of \"openai_chat\", \"openai_responses\", \"openai_embeddings\", \"anthropic_messages\""
            ),
        );
    };
    let per_tokens_field = At::Key(path, "per_tokens");
    let per_tokens =
        opt_whole(&per_tokens_field, u.per_tokens.as_ref(), 1, 1_000_000_000)?.unwrap_or(1);
    let models_field = At::Key(path, "models");
    let mut models = BTreeMap::new();
    for (name, p) in u.models.iter().flat_map(|Entries(e)| e) {
        let field = At::Key(&models_field, name);
        if name.is_empty() || name.len() > MAX_MODEL_LEN {
            return err(field, format!("a model name is 1 to {MAX_MODEL_LEN} bytes"));
        }
        models.insert(name.to_string(), prices(p, &field)?);
    }
    let unknown = match &u.default_prices {
        Some(p) => UnknownModel::Default(prices(p, &At::Key(path, "default_prices"))?),
        None => UnknownModel::Refuse,
    };
    if models.is_empty() && unknown == UnknownModel::Refuse {
        return err(
            models_field,
            "is required with api (or give default_prices)",
        );
    }
    let model_from = match u.model_from {
        None | Some(ModelFromName::Request) => ModelFrom::Request,
        Some(ModelFromName::Response) => ModelFrom::Response,
    };
    let max_hold_field = At::Key(path, "max_hold");
    let max_hold =
        opt_whole(&max_hold_field, u.max_hold.as_ref(), 1, MAX_AMOUNT)?.unwrap_or(MAX_AMOUNT);
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
fn prices(p: &RawPrices, path: &At) -> Result<Prices, ConfigError> {
    let amount =
        |key: &str, n: &Option<Num>| opt_whole(&At::Key(path, key), n.as_ref(), 0, MAX_AMOUNT);
    let need = |key: &str, n: &Option<Num>| match amount(key, n)? {
        Some(v) => Ok(v),
        None => err(join(path, key), "is required"),
    };
    let input = need("input", &p.input)?;
    let output = need("output", &p.output)?;
    Ok(Prices {
        input,
        output,
        cached_input: amount("cached_input", &p.cached_input)?.unwrap_or(input),
        cache_creation_input: amount("cache_creation_input", &p.cache_creation_input)?
            .unwrap_or(input),
        reasoning: amount("reasoning", &p.reasoning)?.unwrap_or(output),
    })
}

fn mcp(m: &RawMcp, path: &At) -> Result<McpPricing, ConfigError> {
    let table = |key: &str, t: &Option<Entries<Num>>| {
        let mut out = BTreeMap::new();
        for (name, cost) in t.iter().flat_map(|Entries(e)| e) {
            let Num(cost) = cost;
            match cost.as_u64().filter(|c| *c <= MAX_AMOUNT) {
                Some(c) if !name.is_empty() => {
                    out.insert(name.to_string(), c);
                }
                _ => {
                    return err(
                        At::Key(&At::Key(path, key), name),
                        format!("must be a whole-number cost, not {cost}"),
                    )
                }
            }
        }
        Ok(out)
    };
    Ok(McpPricing {
        methods: table("methods", &m.methods)?,
        tools: table("tools", &m.tools)?,
    })
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
        assert!(
            e.contains("cluser") && e.contains("known fields: mode, lease_path"),
            "{e}"
        );
        // Reasons in JSON's words, not serde's ("sequence", "u64", "variant").
        let reason = |raw: &str| parse(raw).unwrap_err().reason;
        assert_eq!(
            reason(r#"{"cluster": "b", "routes": {}}"#),
            "must be an array, not an object"
        );
        assert_eq!(
            reason(r#"{"cluster": "b", "mode": "prepaid"}"#),
            r#""prepaid" is not "authorize" or "lease""#
        );
        assert_eq!(
            reason(r#"{"cluster": "b", "credential": {"source": "cookie"}}"#),
            r#""cookie" is not one of "header", "bearer", "query""#
        );
        assert_eq!(
            reason(r#"{"cluster": "b", "timeout_ms": 1.5}"#),
            "must be a whole number from 1 to 60000, not 1.5"
        );
        assert_eq!(
            reason(r#"{"cluster": "b", "timeout_ms": "5"}"#),
            "must be a whole number, not a string"
        );
        assert_eq!(
            reason(r#"{"cluster": "b", "no_charge_statuses": [2.5]}"#),
            "2.5 is not an HTTP status (100-599)"
        );
        let e = parse("[1]").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("(root)", "must be an object, not an array")
        );
    }

    /// What serde would read differently from the JSON a user means, each refused or read
    /// as it always was.
    #[test]
    fn serde_forms_a_user_does_not_mean() {
        // A derived struct reads an array by position; a config names its fields.
        assert_eq!(field_of(r#"["b"]"#), "(root)");
        assert_eq!(
            field_of(r#"{"cluster": "b", "routes": [["r", null, "/a", null, null, 1]]}"#),
            "routes[0]"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "credential": ["bearer"]}"#),
            "credential"
        );
        // serde reads an enum from an object of one field; a mode is a string.
        assert_eq!(
            field_of(r#"{"cluster": "b", "mode": {"lease": null}}"#),
            "mode"
        );
        assert_eq!(
            field_of(r#"{"cluster": "b", "challenges": [{"x402": null}]}"#),
            "challenges[0]"
        );
        // A key given twice is read as its last value (a derived struct refuses it).
        let c = parse(r#"{"cluster": "a", "cluster": "b"}"#).unwrap();
        assert_eq!(c.cluster, "b");
        // `null` is absent, everywhere.
        let c = parse(r#"{"cluster": "b", "timeout_ms": null, "credential": {"source": "bearer", "name": null}}"#)
            .unwrap();
        assert_eq!(
            (c.timeout, c.credential),
            (Duration::from_millis(500), CredentialSource::Bearer)
        );
    }

    /// The field lists come from the serde types: every known field is accepted where it
    /// belongs (so the list is the one `deny_unknown_fields` checks), and one more is not.
    #[test]
    fn known_fields_are_the_ones_serde_accepts() {
        let known = known_fields();
        let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            ["top", "credential", "route", "usage", "prices", "mcp"]
        );
        for (object, fields) in known {
            assert!(fields.len() >= 2, "{object}: {fields:?}");
            for field in fields {
                let doc = |key: &str| {
                    let inner = format!(r#"{{"{key}": null}}"#);
                    match object {
                        "top" => inner.replacen('{', r#"{"cluster": "b", "#, 1),
                        "credential" => format!(r#"{{"cluster": "b", "credential": {inner}}}"#),
                        "route" => format!(r#"{{"cluster": "b", "routes": [{inner}]}}"#),
                        "usage" => format!(
                            r#"{{"cluster": "b", "routes": [{{"name": "a", "prefix": "/", "usage": {inner}}}]}}"#
                        ),
                        "prices" => format!(
                            r#"{{"cluster": "b", "routes": [{{"name": "a", "prefix": "/", "usage": {{"api": "openai_chat", "estimate": 1, "default_prices": {inner}}}}}]}}"#
                        ),
                        _ => format!(
                            r#"{{"cluster": "b", "routes": [{{"name": "a", "prefix": "/", "cost": 1, "mcp": {inner}}}]}}"#
                        ),
                    }
                };
                let unknown = |key: &str| match parse(&doc(key)) {
                    Err(e) => e.field.ends_with(key) && e.reason.starts_with("unknown field"),
                    Ok(_) => false,
                };
                assert!(!unknown(field), "{object}.{field} is refused as unknown");
                assert!(
                    unknown("zz_not_a_field"),
                    "{object}: an unknown field passes"
                );
            }
        }
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
