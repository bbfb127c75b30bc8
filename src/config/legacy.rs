//! TEMPORARY: the hand-written parser this module replaced, kept only to diff the two on
//! a corpus (see `differential` below). Removed in the next commit.
#![allow(dead_code)]
use super::*;
use crate::pricing::{PathPattern, Route};
use serde_json::{Map, Value};
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
    pub fn legacy_parse(raw: &[u8]) -> Result<Config, ConfigError> {
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
mod differential {
    use super::*;
    use serde::Deserialize;
    use std::path::{Path, PathBuf};

    fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                files(&p, ext, out);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }

    fn from_yaml(v: &serde_yaml::Value, out: &mut Vec<Value>) {
        match v {
            serde_yaml::Value::String(s) => {
                if let Ok(j @ Value::Object(_)) = serde_json::from_str::<Value>(s) {
                    out.push(j);
                }
            }
            serde_yaml::Value::Mapping(m) => {
                if m.contains_key("cluster") {
                    if let Ok(j) = serde_json::to_value(v) {
                        out.push(j);
                    }
                }
                m.values().for_each(|v| from_yaml(v, out));
            }
            serde_yaml::Value::Sequence(s) => s.iter().for_each(|v| from_yaml(v, out)),
            serde_yaml::Value::Tagged(t) => from_yaml(&t.value, out),
            _ => {}
        }
    }

    fn corpus() -> Vec<Value> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out = Vec::new();
        let mut json = Vec::new();
        files(&root.join("schema/examples"), "json", &mut json);
        files(&root.join("fuzz/seeds/config_parse"), "json", &mut json);
        for p in json {
            out.push(serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap());
        }
        let mut yaml = Vec::new();
        files(&root.join("envoy"), "yaml", &mut yaml);
        files(&root.join("deploy"), "yaml", &mut yaml);
        for p in yaml {
            let text = std::fs::read_to_string(&p).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                if let Ok(v) = serde_yaml::Value::deserialize(doc) {
                    from_yaml(&v, &mut out);
                }
            }
        }
        out
    }

    /// Every document with one value (at any depth) removed or replaced by each of a set
    /// of wrong and edge values, and with an unknown field added to each object.
    fn mutations(v: &Value, out: &mut Vec<Value>) {
        let replacements: Vec<Value> = serde_json::from_str(
            r#"[null, 0, 1, 5, 60001, -1, 1.5, 1.0, 9007199254740991, 9007199254740992,
                "", "x", "/x", "5xx", "lease", "open", "bearer", "query", "header", "response",
                "openai_chat", "x402", "a b", "X-Up", true, false, [], [1], ["x"], ["5xx", 429],
                [null], {}, {"a": 1}, {"lease": null}, {"source": "bearer"}]"#,
        )
        .unwrap();
        match v {
            Value::Object(m) => {
                let mut extra = m.clone();
                extra.insert("zz_unknown".into(), Value::from(1));
                out.push(Value::Object(extra));
                for (k, child) in m {
                    let mut without = m.clone();
                    without.remove(k);
                    out.push(Value::Object(without));
                    for r in &replacements {
                        let mut with = m.clone();
                        with.insert(k.clone(), r.clone());
                        out.push(Value::Object(with));
                    }
                    let mut inner = Vec::new();
                    mutations(child, &mut inner);
                    for c in inner {
                        let mut with = m.clone();
                        with.insert(k.clone(), c);
                        out.push(Value::Object(with));
                    }
                }
            }
            Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    let mut without = items.clone();
                    without.remove(i);
                    out.push(Value::Array(without));
                    for r in &replacements {
                        let mut with = items.clone();
                        with[i] = r.clone();
                        out.push(Value::Array(with));
                    }
                    let mut inner = Vec::new();
                    mutations(child, &mut inner);
                    for c in inner {
                        let mut with = items.clone();
                        with[i] = c;
                        out.push(Value::Array(with));
                    }
                }
            }
            _ => {}
        }
    }

    #[test]
    fn old_and_new_parsers_agree() {
        let base = corpus();
        assert!(base.len() >= 100, "corpus of {}", base.len());
        let mut docs: Vec<String> = Vec::new();
        for v in &base {
            docs.push(v.to_string());
            let mut m = Vec::new();
            mutations(v, &mut m);
            docs.extend(m.iter().map(Value::to_string));
        }
        docs.extend(
            [
                "",
                "null",
                "[]",
                "[1]",
                "1",
                "\"x\"",
                "{",
                r#"{"cluster": "a", "cluster": "b"}"#,
            ]
            .map(String::from),
        );
        let (mut accepted, mut refused, mut verdicts, mut fields) = (0, 0, Vec::new(), Vec::new());
        let mut reasons = Vec::new();
        for d in &docs {
            match (
                Config::legacy_parse(d.as_bytes()),
                Config::parse(d.as_bytes()),
            ) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{d}");
                    accepted += 1;
                }
                (Err(a), Err(b)) => {
                    refused += 1;
                    if a.field == b.field && a.reason != b.reason {
                        reasons.push(format!("{} | {} | {}", a.field, a.reason, b.reason));
                    }
                    if a.field != b.field {
                        // Only where the document's shape is wrong: the new parser reads
                        // every type first, the old one checked types between its rules.
                        let v: Value = serde_json::from_str(d).unwrap();
                        assert!(
                            RawConfig::deserialize(reader::Reader {
                                value: &v,
                                at: &reader::At::Root
                            })
                            .is_err(),
                            "{d}: old {a}, new {b}"
                        );
                        fields.push(format!("{d}\n  old {a}\n  new {b}"));
                    }
                }
                // The one difference: `null` reads as absent, also for a bearer's name
                // (the old parser refused the key itself).
                (Err(a), Ok(_))
                    if d == r#"{"cluster":"b","credential":{"name":null,"source":"bearer"}}"# =>
                {
                    assert_eq!(a.field, "credential.name");
                }
                (a, b) => verdicts.push(format!("{d}\n  old {:?}\n  new {:?}", a.err(), b.err())),
            }
        }
        eprintln!(
            "{} docs from {} in the repository: {accepted} accepted by both, {refused} refused by both, {} refused at another field",
            docs.len(),
            base.len(),
            fields.len()
        );
        eprintln!(
            "{} refused at the same field with another reason",
            reasons.len()
        );
        for r in &reasons {
            eprintln!("REASON {r}");
        }
        assert!(
            verdicts.is_empty(),
            "{} verdicts differ:\n{}",
            verdicts.len(),
            verdicts.join("\n")
        );
    }
}
