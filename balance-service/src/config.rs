//! Command-line flags (`--flag value` or `--flag=value`) with environment
//! fallbacks `FAREBOX_BALANCE_<FLAG>` (upper case, `-` becomes `_`), both read by
//! `clap`. Precedence: flag, then environment variable, then default.

use crate::store::DatabaseUrl;
use clap::parser::ValueSource;
use std::collections::HashMap;

/// SQLite `synchronous` setting (the database always runs in WAL mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Survives a crash of the process; a power loss or OS crash may roll
    /// back the last few committed transactions (never corrupts).
    Normal,
    /// Every commit is fsynced: also survives power loss / OS crash.
    Full,
}

impl SyncMode {
    pub fn as_pragma(self) -> &'static str {
        match self {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        }
    }
}

/// What the service charges for a lease that expired while still open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryPolicy {
    /// Charge the whole reservation (`granted`): the holder may have spent
    /// units it never reported, so the operator never loses money.
    Full,
    /// Charge the last reported `used` and credit the rest back: spend that
    /// was never reported is lost to the operator.
    Reported,
}

impl ExpiryPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ExpiryPolicy::Full => "full",
            ExpiryPolicy::Reported => "reported",
        }
    }
}

/// Payment challenges and payments (`--x402-*`; see `payments.rs`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X402 {
    /// Recipient address (`payTo`, the challenge's `recipient`).
    pub pay_to: String,
    /// CAIP-2 network id (e.g. `eip155:84532`, Base Sepolia).
    pub network: String,
    /// Asset (token contract) address (`asset`, the challenge's `currency`).
    pub asset: String,
    /// Atomic units of the asset per unit of price (>= 1).
    pub amount_per_unit: u64,
    /// The token's EIP-712 domain name and version (the offer's `extra`), which
    /// the client signs over: they must be the contract's.
    pub asset_name: String,
    pub asset_version: String,
    /// The token's decimals (the Payment-scheme request's `methodDetails.decimals`).
    pub asset_decimals: u8,
    /// The Payment-scheme challenges' `realm`; `None`: the filter names the
    /// request's host.
    pub realm: Option<String>,
    /// Key of the HMAC that makes a Payment-scheme challenge id; `None`: a
    /// random key per process (replicas behind one filter need the same key).
    pub challenge_secret: Option<String>,
    /// The x402 facilitator that verifies and settles; `None`: demo payments only.
    pub facilitator: Option<Facilitator>,
}

/// An x402 facilitator's HTTP API (`--x402-facilitator-url`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facilitator {
    /// `http://HOST:PORT[/PREFIX]`, without a trailing `/`.
    pub url: String,
    /// An extra request header (`Name: value`), e.g. the facilitator's API key.
    pub auth_header: Option<(String, String)>,
    /// How long one facilitator call may take, in milliseconds.
    pub timeout_ms: u64,
    /// The chain's JSON-RPC endpoint (`--x402-rpc-url`): an unknown settle
    /// outcome is reconciled by asking the token whether the authorization was
    /// used. `None`: such a payment stays held.
    pub rpc_url: Option<String>,
}

/// A CAIP-2 chain id: `namespace:reference` (`[-a-z0-9]{3,8}` and `[-_a-zA-Z0-9]{1,32}`).
pub fn is_caip2(v: &str) -> bool {
    let Some((ns, reference)) = v.split_once(':') else {
        return false;
    };
    (3..=8).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && (1..=32).contains(&reference.len())
        && reference
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An EVM address: `0x` and 40 hex digits.
pub fn is_evm_address(v: &str) -> bool {
    v.len() == 42 && v.starts_with("0x") && v.bytes().skip(2).all(|b| b.is_ascii_hexdigit())
}

/// Webhook delivery (`--webhook-*`; docs/balance-service.md, README "Webhooks").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Webhook {
    /// Where events are POSTed (`http://…`).
    pub url: String,
    /// The HMAC-SHA256 key of the `farebox-signature` header.
    pub secret: String,
    /// `balance.low` thresholds (units).
    pub low_balance: Vec<i64>,
    /// `budget.threshold` thresholds (percent of the limit, 1-100).
    pub budget_percent: Vec<u32>,
    /// First retry delay; doubles per failed attempt (capped at an hour).
    pub retry_base_ms: u64,
    /// Attempts before an event is given up.
    pub max_attempts: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: String,
    /// Where the ledger lives (`--database-url`, or `--db PATH` = `sqlite:PATH`).
    pub database_url: DatabaseUrl,
    pub sync: SyncMode,
    pub admin_token: Option<String>,
    pub service_token: Option<String>,
    pub allow_max_age: u64,
    pub deny_max_age: u64,
    pub auth_max_age: u64,
    pub deny_retry_after: Option<u64>,
    pub seed_demo: bool,
    pub quiet: bool,
    /// Lifetime of a lease in milliseconds (>= 1).
    pub lease_ttl_ms: u64,
    /// Upper bound of a single grant (>= 1); `None`: unlimited.
    pub lease_max_units: Option<u64>,
    pub lease_expiry_policy: ExpiryPolicy,
    /// `retry_after_ms` of a lease 402 that recalled other holders' leases (>= 1).
    pub lease_recall_retry_ms: u64,
    /// Payment challenges on 402s and demo payments; `None`: off. (Boxed:
    /// rarely set, and keeps `Config` small.)
    pub x402: Option<Box<X402>>,
    /// Webhook events; `None`: off (no events are recorded).
    pub webhook: Option<Box<Webhook>>,
    /// `GET /admin/charges` leaves out rows younger than this (ms), so a
    /// transaction that committed late cannot slip behind a cursor.
    pub export_settle_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8081".to_owned(),
            database_url: DatabaseUrl::Sqlite("farebox-balance.sqlite".to_owned()),
            sync: SyncMode::Normal,
            admin_token: None,
            service_token: None,
            allow_max_age: 0,
            deny_max_age: 5,
            auth_max_age: 0,
            deny_retry_after: None,
            seed_demo: false,
            quiet: false,
            lease_ttl_ms: 30_000,
            lease_max_units: None,
            lease_expiry_policy: ExpiryPolicy::Full,
            lease_recall_retry_ms: 100,
            x402: None,
            webhook: None,
            export_settle_ms: 2_000,
        }
    }
}

pub const USAGE: &str = "\
usage: farebox-balance [flags]
       farebox-balance migrate [--database-url URL | --db PATH]

  --listen ADDR            listen address (default 127.0.0.1:8081; port 0 picks one)
  --database-url URL       the ledger: sqlite:PATH (default sqlite:farebox-balance.sqlite)
                           or postgres://USER[:PASSWORD]@HOST:PORT/DATABASE
  --db PATH                same as --database-url sqlite:PATH
  --sync normal|full       SQLite synchronous mode in WAL (default normal)
  --admin-token TOKEN      bearer token for /admin/*; without it the admin API answers 503
  --service-token TOKEN    if set, /v1/* requests must carry 'authorization: Bearer TOKEN'
  --allow-max-age N        Cache-Control max-age on 200 allow answers (default 0 = no-store)
  --deny-max-age N         Cache-Control max-age on 402 answers (default 5; 0 = no-store)
  --auth-max-age N         Cache-Control max-age on 401/403 answers (default 0 = no-store)
  --deny-retry-after N     if set, 402 answers carry 'Retry-After: N'
  --lease-ttl-ms N         lifetime of a credit lease in ms (default 30000)
  --lease-max-units N      largest single lease grant (default unlimited)
  --lease-expiry-policy full|reported
                           what an expired open lease is charged: the whole
                           reservation (full, default) or the last reported use
  --lease-recall-retry-ms N
                           retry_after_ms of a lease 402 that recalled other
                           holders' unspent leases (default 100)
  --x402-pay-to ADDR --x402-network CAIP2 --x402-asset ADDR --x402-amount-per-unit N
                           (all four together) 402 answers carry x402 'accepts'
                           and Payment 'challenges' for price x N atomic units of
                           the token ADDR (0x + 40 hex) on CAIP2 (eip155:CHAIN,
                           e.g. eip155:84532); without a facilitator the demo
                           payment 'demo-paid' is accepted (reference-only)
  --x402-asset-name NAME --x402-asset-version V
                           the token's EIP-712 domain (default USDC, 2)
  --x402-asset-decimals N  the token's decimals (default 6)
  --x402-realm REALM       realm of the Payment-scheme challenges (default: the
                           request's host, as the filter names it)
  --x402-challenge-secret S
                           HMAC key of the Payment-scheme challenge ids (default:
                           random per process; give replicas the same one)
  --x402-facilitator-url URL
                           verify and settle payments through this x402
                           facilitator (http://HOST:PORT[/PATH]; /supported,
                           /verify, /settle); offers follow its /supported
  --x402-facilitator-auth 'NAME: VALUE'
                           a header sent with every facilitator call
  --x402-facilitator-timeout-ms N
                           bound of one facilitator call (default 30000)
  --x402-rpc-url URL       the chain's JSON-RPC (http://): a settle whose outcome
                           is unknown is retried, then reconciled on chain
  --webhook-url URL        POST low-balance and budget-threshold events to this
                           http:// URL (signed; needs --webhook-secret)
  --webhook-secret SECRET  HMAC-SHA256 key of the farebox-signature header
  --webhook-low-balance N[,N...]
                           balance.low when a debit takes the balance below N
  --webhook-budget-thresholds P[,P...]
                           budget.threshold when a period's spend reaches P % of
                           the budget (default 80,100)
  --webhook-retry-base-ms N
                           first retry after N ms, doubling (default 1000, max 1 h)
  --webhook-max-attempts N attempts before an event is given up (default 15)
  --export-settle-ms N     GET /admin/charges leaves out rows younger than N ms
                           (default 2000)
  --seed-demo              create the demo accounts (idempotent)
  --quiet                  do not log one line per request to stderr
  --help                   print this help

`migrate` applies the schema migrations and exits (the service also applies
them at start-up); it refuses a database migrated by a newer version.

Every flag falls back to the environment variable FAREBOX_BALANCE_<FLAG>
(e.g. FAREBOX_BALANCE_ADMIN_TOKEN); an empty variable counts as unset.
Boolean variables accept 1/true/yes/on and 0/false/no/off.
";

const VALUE_FLAGS: &[&str] = &[
    "listen",
    "database-url",
    "db",
    "sync",
    "admin-token",
    "service-token",
    "allow-max-age",
    "deny-max-age",
    "auth-max-age",
    "deny-retry-after",
    "lease-ttl-ms",
    "lease-max-units",
    "lease-expiry-policy",
    "lease-recall-retry-ms",
    "x402-pay-to",
    "x402-network",
    "x402-asset",
    "x402-amount-per-unit",
    "x402-asset-name",
    "x402-asset-version",
    "x402-facilitator-url",
    "x402-facilitator-auth",
    "x402-facilitator-timeout-ms",
    "x402-asset-decimals",
    "x402-realm",
    "x402-challenge-secret",
    "x402-rpc-url",
    "webhook-url",
    "webhook-secret",
    "webhook-low-balance",
    "webhook-budget-thresholds",
    "webhook-retry-base-ms",
    "webhook-max-attempts",
    "export-settle-ms",
];
const BOOL_FLAGS: &[&str] = &["seed-demo", "quiet"];

#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Run(Box<Config>),
    /// `farebox-balance migrate`: apply the migrations to this database.
    Migrate(DatabaseUrl),
    Help,
}

fn env_name(flag: &str) -> String {
    format!(
        "FAREBOX_BALANCE_{}",
        flag.to_ascii_uppercase().replace('-', "_")
    )
}

fn parse_u64(flag: &str, v: &str) -> Result<u64, String> {
    v.trim()
        .parse::<u64>()
        .map_err(|_| format!("--{flag}: expected a non-negative integer, got {v:?}"))
}

/// `--x402-facilitator-url`, `--x402-rpc-url`: plain `http://` (the reference
/// service speaks no TLS: reach a remote one through a local TLS proxy such as Envoy).
fn http_url(flag: &str, v: &str) -> Result<String, String> {
    let rest = v
        .strip_prefix("http://")
        .ok_or_else(|| format!("--{flag}: expected http://HOST:PORT[/PATH], got {v:?}"))?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || v.contains(['?', '#', ' ']) {
        return Err(format!(
            "--{flag}: expected http://HOST:PORT[/PATH], got {v:?}"
        ));
    }
    Ok(v.trim_end_matches('/').to_owned())
}

/// `--x402-facilitator-auth`: `Name: value` (the value is a secret: never echoed).
fn auth_header(v: &str) -> Result<(String, String), String> {
    match v.split_once(':') {
        Some((name, value))
            if !name.trim().is_empty()
                && name
                    .trim()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !value.trim().is_empty() =>
        {
            Ok((name.trim().to_owned(), value.trim().to_owned()))
        }
        _ => Err("--x402-facilitator-auth: expected 'Header-Name: value'".to_owned()),
    }
}

/// A positive integer that also fits an `i64` (amounts and times are signed
/// in the ledger).
fn parse_positive(flag: &str, v: &str) -> Result<u64, String> {
    match v.trim().parse::<u64>() {
        Ok(n) if n >= 1 && i64::try_from(n).is_ok() => Ok(n),
        _ => Err(format!(
            "--{flag}: expected an integer between 1 and 9223372036854775807, got {v:?}"
        )),
    }
}

fn parse_bool(flag: &str, v: &str) -> Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "--{flag} / {}: expected a boolean, got {v:?}",
            env_name(flag)
        )),
    }
}

/// The flags as a `clap` command, each with its environment fallback (the help
/// text is [`USAGE`]). Values are checked afterwards.
fn command() -> clap::Command {
    use clap::{Arg, ArgAction};
    let mut cmd = clap::Command::new("farebox-balance")
        .override_help(USAGE)
        .args_override_self(true);
    for flag in VALUE_FLAGS {
        cmd = cmd.arg(
            Arg::new(*flag)
                .long(*flag)
                .env(env_name(flag))
                .num_args(1)
                .allow_hyphen_values(true)
                .action(ArgAction::Set),
        );
    }
    for flag in BOOL_FLAGS {
        cmd = cmd.arg(
            Arg::new(*flag)
                .long(*flag)
                .env(env_name(flag))
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true")
                .action(ArgAction::Set),
        );
    }
    cmd
}

/// Parses the arguments (without the program name), with the environment
/// fallbacks of the process's environment.
pub fn parse<I>(args: I) -> Result<Parsed, String>
where
    I: IntoIterator<Item = String>,
{
    let mut args = args.into_iter().peekable();
    let migrate = args.next_if(|a| a == "migrate").is_some();
    let matches = match command()
        .try_get_matches_from(std::iter::once("farebox-balance".to_owned()).chain(args))
    {
        Ok(m) => m,
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelp => return Ok(Parsed::Help),
        Err(e) => return Err(e.render().to_string().trim_end().to_owned()),
    };
    // A flag's value, or its environment variable's; an empty variable counts as unset.
    let given = |flag: &str| {
        matches.get_one::<String>(flag).filter(|v| {
            !v.is_empty() || matches.value_source(flag) != Some(ValueSource::EnvVariable)
        })
    };
    let mut values: HashMap<&'static str, String> = HashMap::new();
    let mut bools: HashMap<&'static str, bool> = HashMap::new();
    for flag in VALUE_FLAGS {
        if let Some(v) = given(flag) {
            values.insert(flag, v.clone());
        }
    }
    for flag in BOOL_FLAGS {
        if let Some(v) = given(flag) {
            bools.insert(flag, parse_bool(flag, v)?);
        }
    }
    let from_args: Vec<&'static str> = VALUE_FLAGS
        .iter()
        .copied()
        .filter(|flag| matches.value_source(flag) == Some(ValueSource::CommandLine))
        .collect();

    let mut cfg = Config::default();
    if let Some(v) = values.remove("listen") {
        cfg.listen = v;
    }
    // --database-url wins over --db when both come from the same place; a
    // flag wins over an environment variable.
    let url = values.remove("database-url");
    let db = values.remove("db");
    let url_flag = url
        .as_ref()
        .is_some_and(|_| from_args.contains(&"database-url"));
    let db_flag = db.as_ref().is_some_and(|_| from_args.contains(&"db"));
    cfg.database_url = match (url, db) {
        (Some(_), Some(_)) if url_flag && db_flag => {
            return Err(
                "--database-url and --db name the same setting: give one of them".to_owned(),
            )
        }
        (Some(_), Some(path)) if db_flag => db_url(&path)?,
        (Some(u), _) => DatabaseUrl::parse(&u).map_err(|e| format!("--database-url: {e}"))?,
        (None, Some(path)) => db_url(&path)?,
        (None, None) => cfg.database_url,
    };
    if migrate {
        return Ok(Parsed::Migrate(cfg.database_url));
    }
    if let Some(v) = values.remove("sync") {
        cfg.sync = match v.trim().to_ascii_lowercase().as_str() {
            "normal" => SyncMode::Normal,
            "full" => SyncMode::Full,
            _ => return Err(format!("--sync: expected normal or full, got {v:?}")),
        };
    }
    for (flag, slot) in [
        ("admin-token", &mut cfg.admin_token),
        ("service-token", &mut cfg.service_token),
    ] {
        if let Some(v) = values.remove(flag) {
            if v.is_empty() {
                return Err(format!("--{flag} must not be empty"));
            }
            *slot = Some(v);
        }
    }
    for (flag, slot) in [
        ("allow-max-age", &mut cfg.allow_max_age),
        ("deny-max-age", &mut cfg.deny_max_age),
        ("auth-max-age", &mut cfg.auth_max_age),
    ] {
        if let Some(v) = values.remove(flag) {
            *slot = parse_u64(flag, &v)?;
        }
    }
    if let Some(v) = values.remove("deny-retry-after") {
        cfg.deny_retry_after = Some(parse_u64("deny-retry-after", &v)?);
    }
    if let Some(v) = values.remove("lease-ttl-ms") {
        cfg.lease_ttl_ms = parse_positive("lease-ttl-ms", &v)?;
    }
    if let Some(v) = values.remove("lease-max-units") {
        cfg.lease_max_units = Some(parse_positive("lease-max-units", &v)?);
    }
    if let Some(v) = values.remove("lease-recall-retry-ms") {
        cfg.lease_recall_retry_ms = parse_positive("lease-recall-retry-ms", &v)?;
    }
    if let Some(v) = values.remove("lease-expiry-policy") {
        cfg.lease_expiry_policy = match v.trim().to_ascii_lowercase().as_str() {
            "full" => ExpiryPolicy::Full,
            "reported" => ExpiryPolicy::Reported,
            _ => {
                return Err(format!(
                    "--lease-expiry-policy: expected full or reported, got {v:?}"
                ))
            }
        };
    }
    let x402 = [
        "x402-pay-to",
        "x402-network",
        "x402-asset",
        "x402-amount-per-unit",
    ]
    .map(|flag| values.remove(flag));
    if let [Some(pay_to), Some(network), Some(asset), Some(per_unit)] = &x402 {
        let (pay_to, network, asset) = (pay_to.trim(), network.trim(), asset.trim());
        if !is_caip2(network) {
            return Err(format!(
                "--x402-network: expected a CAIP-2 chain id such as eip155:84532, got {network:?}"
            ));
        }
        if !network.starts_with("eip155:") {
            return Err(format!(
                "--x402-network: the exact scheme here is EIP-3009 on EVM chains (eip155:*), got {network:?}"
            ));
        }
        for (flag, v) in [("x402-pay-to", pay_to), ("x402-asset", asset)] {
            if !is_evm_address(v) {
                return Err(format!(
                    "--{flag}: expected an address (0x and 40 hex digits), got {v:?}"
                ));
            }
        }
        let text =
            |values: &mut HashMap<&'static str, String>, flag: &str, default: &str| match values
                .remove(flag)
            {
                Some(v) if v.trim().is_empty() => Err(format!("--{flag} must not be empty")),
                Some(v) => Ok(v.trim().to_owned()),
                None => Ok(default.to_owned()),
            };
        let asset_name = text(&mut values, "x402-asset-name", "USDC")?;
        let asset_version = text(&mut values, "x402-asset-version", "2")?;
        let asset_decimals = match values.remove("x402-asset-decimals") {
            None => 6,
            Some(v) => v
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|d| *d <= 36)
                .ok_or_else(|| {
                    format!("--x402-asset-decimals: expected an integer from 0 to 36, got {v:?}")
                })?,
        };
        let realm = match values.remove("x402-realm") {
            None => None,
            Some(r) if r.trim().is_empty() || r.contains(['"', '\\']) || r.chars().any(char::is_control) => {
                return Err(
                    "--x402-realm: a non-empty name without quotes, backslashes or control characters"
                        .to_owned(),
                )
            }
            Some(r) => Some(r.trim().to_owned()),
        };
        let challenge_secret = match values.remove("x402-challenge-secret") {
            Some(v) if v.trim().len() < 16 => {
                return Err("--x402-challenge-secret: at least 16 characters".to_owned())
            }
            v => v.map(|v| v.trim().to_owned()),
        };
        let facilitator = match values.remove("x402-facilitator-url") {
            None => None,
            Some(url) => Some(Facilitator {
                url: http_url("x402-facilitator-url", url.trim())?,
                rpc_url: match values.remove("x402-rpc-url") {
                    None => None,
                    Some(u) => Some(http_url("x402-rpc-url", u.trim())?),
                },
                auth_header: match values.remove("x402-facilitator-auth") {
                    None => None,
                    Some(h) => Some(auth_header(&h)?),
                },
                timeout_ms: match values.remove("x402-facilitator-timeout-ms") {
                    None => 30_000,
                    Some(v) => parse_positive("x402-facilitator-timeout-ms", &v)?,
                },
            }),
        };
        cfg.x402 = Some(Box::new(X402 {
            pay_to: pay_to.to_owned(),
            network: network.to_owned(),
            asset: asset.to_owned(),
            amount_per_unit: parse_positive("x402-amount-per-unit", per_unit)?,
            asset_name,
            asset_version,
            asset_decimals,
            realm,
            challenge_secret,
            facilitator,
        }));
    } else if x402.iter().any(Option::is_some) {
        return Err(
            "--x402-pay-to, --x402-network, --x402-asset and --x402-amount-per-unit \
                    go together"
                .to_owned(),
        );
    }
    // Left over: given without what they refine.
    for flag in [
        "x402-asset-name",
        "x402-asset-version",
        "x402-asset-decimals",
        "x402-realm",
        "x402-challenge-secret",
        "x402-facilitator-url",
    ] {
        if values.contains_key(flag) {
            return Err(format!(
                "--{flag} needs --x402-pay-to, --x402-network, --x402-asset and --x402-amount-per-unit"
            ));
        }
    }
    for flag in [
        "x402-facilitator-auth",
        "x402-facilitator-timeout-ms",
        "x402-rpc-url",
    ] {
        if values.contains_key(flag) {
            return Err(format!("--{flag} needs --x402-facilitator-url"));
        }
    }
    cfg.webhook = webhook(&mut values)?;
    if let Some(v) = values.remove("export-settle-ms") {
        cfg.export_settle_ms = parse_u64("export-settle-ms", &v)?;
    }
    cfg.seed_demo = bools.get("seed-demo").copied().unwrap_or(false);
    cfg.quiet = bools.get("quiet").copied().unwrap_or(false);
    Ok(Parsed::Run(Box::new(cfg)))
}

/// The `--webhook-*` flags: all but the URL need it, the URL needs a secret.
fn webhook(values: &mut HashMap<&'static str, String>) -> Result<Option<Box<Webhook>>, String> {
    let url = values.remove("webhook-url");
    let secret = values.remove("webhook-secret");
    let low = values.remove("webhook-low-balance");
    let pct = values.remove("webhook-budget-thresholds");
    let base = values.remove("webhook-retry-base-ms");
    let attempts = values.remove("webhook-max-attempts");
    let Some(url) = url else {
        if [&secret, &low, &pct, &base, &attempts]
            .iter()
            .any(|v| v.is_some())
        {
            return Err("--webhook-* flags need --webhook-url".to_owned());
        }
        return Ok(None);
    };
    let url = url.trim().to_owned();
    if !url.starts_with("http://") || url.len() <= "http://".len() {
        return Err(format!(
            "--webhook-url: expected an http:// URL (put a TLS proxy in front for https), got {url:?}"
        ));
    }
    let secret = match secret {
        Some(s) if !s.is_empty() => s,
        _ => return Err("--webhook-url needs --webhook-secret (the signing key)".to_owned()),
    };
    let list = |flag: &str, v: Option<String>| -> Result<Vec<u64>, String> {
        let Some(v) = v else { return Ok(Vec::new()) };
        v.split(',')
            .map(|n| parse_u64(flag, n))
            .collect::<Result<Vec<u64>, String>>()
    };
    let low_balance = list("webhook-low-balance", low)?
        .into_iter()
        .map(|n| i64::try_from(n).map_err(|_| "--webhook-low-balance: too large".to_owned()))
        .collect::<Result<Vec<i64>, String>>()?;
    let budget_percent = match pct {
        None => vec![80, 100],
        Some(v) => list("webhook-budget-thresholds", Some(v))?
            .into_iter()
            .map(|p| match u32::try_from(p) {
                Ok(p) if (1..=100).contains(&p) => Ok(p),
                _ => Err(format!(
                    "--webhook-budget-thresholds: expected percentages 1-100, got {p}"
                )),
            })
            .collect::<Result<Vec<u32>, String>>()?,
    };
    Ok(Some(Box::new(Webhook {
        url,
        secret,
        low_balance,
        budget_percent,
        retry_base_ms: match base {
            Some(v) => parse_positive("webhook-retry-base-ms", &v)?,
            None => 1_000,
        },
        max_attempts: match attempts {
            Some(v) => parse_positive("webhook-max-attempts", &v)?,
            None => 15,
        },
    })))
}

/// `--db PATH`: a SQLite file.
fn db_url(path: &str) -> Result<DatabaseUrl, String> {
    if path.is_empty() {
        return Err("--db must not be empty".to_owned());
    }
    Ok(DatabaseUrl::Sqlite(path.to_owned()))
}

/// [`parse`] with the `FAREBOX_BALANCE_*` variables `env` gives set, and the others
/// unset, for the call (tests). The environment is the process's, so calls take turns.
#[cfg(test)]
pub(crate) fn parse_with_env<I, E>(args: I, env: E) -> Result<Parsed, String>
where
    I: IntoIterator<Item = String>,
    E: Fn(&str) -> Option<String>,
{
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let names: Vec<String> = VALUE_FLAGS
        .iter()
        .chain(BOOL_FLAGS)
        .map(|f| env_name(f))
        .collect();
    for name in &names {
        match env(name) {
            Some(v) => std::env::set_var(name, v),
            None => std::env::remove_var(name),
        }
    }
    let parsed = parse(args);
    for name in &names {
        std::env::remove_var(name);
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::parse_with_env as parse;
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults() {
        assert_eq!(parse(args(&[]), no_env), Ok(Parsed::Run(Box::default())));
    }

    #[test]
    fn flags_and_inline_values() {
        let p = parse(
            args(&[
                "--listen",
                "127.0.0.1:0",
                "--db=/tmp/x.sqlite",
                "--sync",
                "FULL",
                "--admin-token",
                "adm",
                "--service-token=svc",
                "--allow-max-age",
                "3",
                "--deny-max-age=0",
                "--auth-max-age",
                "9",
                "--deny-retry-after",
                "2",
                "--seed-demo",
                "--quiet=false",
                "--lease-ttl-ms",
                "300",
                "--lease-max-units=40",
                "--lease-expiry-policy",
                "Reported",
                "--lease-recall-retry-ms=250",
            ]),
            no_env,
        );
        let want = Config {
            listen: "127.0.0.1:0".into(),
            database_url: DatabaseUrl::Sqlite("/tmp/x.sqlite".into()),
            sync: SyncMode::Full,
            admin_token: Some("adm".into()),
            service_token: Some("svc".into()),
            allow_max_age: 3,
            deny_max_age: 0,
            auth_max_age: 9,
            deny_retry_after: Some(2),
            seed_demo: true,
            quiet: false,
            lease_ttl_ms: 300,
            lease_max_units: Some(40),
            lease_expiry_policy: ExpiryPolicy::Reported,
            lease_recall_retry_ms: 250,
            x402: None,
            webhook: None,
            export_settle_ms: 2_000,
        };
        assert_eq!(p, Ok(Parsed::Run(Box::new(want))));
    }

    #[test]
    fn env_fallback_and_precedence() {
        let env = |k: &str| match k {
            "FAREBOX_BALANCE_ADMIN_TOKEN" => Some("from-env".to_owned()),
            "FAREBOX_BALANCE_LISTEN" => Some("127.0.0.1:9999".to_owned()),
            "FAREBOX_BALANCE_SERVICE_TOKEN" => Some(String::new()),
            "FAREBOX_BALANCE_SEED_DEMO" => Some("yes".to_owned()),
            "FAREBOX_BALANCE_LEASE_EXPIRY_POLICY" => Some("reported".to_owned()),
            "FAREBOX_BALANCE_LEASE_TTL_MS" => Some("1234".to_owned()),
            "FAREBOX_BALANCE_LEASE_RECALL_RETRY_MS" => Some("40".to_owned()),
            _ => None,
        };
        let Ok(Parsed::Run(cfg)) = parse(args(&["--listen", "127.0.0.1:1"]), env) else {
            unreachable!()
        };
        assert_eq!(cfg.listen, "127.0.0.1:1");
        assert_eq!(cfg.admin_token.as_deref(), Some("from-env"));
        assert_eq!(cfg.service_token, None);
        assert!(cfg.seed_demo);
        assert_eq!(cfg.lease_expiry_policy, ExpiryPolicy::Reported);
        assert_eq!(cfg.lease_ttl_ms, 1234);
        assert_eq!(cfg.lease_max_units, None);
        assert_eq!(cfg.lease_recall_retry_ms, 40);
    }

    #[test]
    fn errors() {
        assert!(parse(args(&["--bogus"]), no_env).is_err());
        assert!(parse(args(&["--listen"]), no_env).is_err());
        assert!(parse(args(&["--sync", "sometimes"]), no_env).is_err());
        assert!(parse(args(&["--deny-max-age", "-1"]), no_env).is_err());
        assert!(parse(args(&["--admin-token", ""]), no_env).is_err());
        assert!(parse(args(&["positional"]), no_env).is_err());
        assert!(parse(args(&["--lease-ttl-ms", "0"]), no_env).is_err());
        assert!(parse(args(&["--lease-max-units", "0"]), no_env).is_err());
        assert!(parse(args(&["--lease-max-units", "9223372036854775808"]), no_env).is_err());
        assert!(parse(args(&["--lease-expiry-policy", "half"]), no_env).is_err());
        assert!(parse(args(&["--lease-recall-retry-ms", "0"]), no_env).is_err());
        assert!(parse(args(&["--lease-recall-retry-ms", "x"]), no_env).is_err());
        assert_eq!(parse(args(&["--help"]), no_env), Ok(Parsed::Help));
        assert!(parse(args(&["--database-url", "mysql://x"]), no_env).is_err());
        assert!(parse(args(&["--database-url", "sqlite:a", "--db", "b"]), no_env).is_err());
        for bad in [
            &["--webhook-secret", "s"][..],
            &["--webhook-url", "http://127.0.0.1:1/h"],
            &["--webhook-url", "https://x/h", "--webhook-secret", "s"],
            &[
                "--webhook-url",
                "http://x/h",
                "--webhook-secret",
                "s",
                "--webhook-budget-thresholds",
                "0",
            ],
            &[
                "--webhook-url",
                "http://x/h",
                "--webhook-secret",
                "s",
                "--webhook-low-balance",
                "a",
            ],
        ] {
            assert!(parse(args(bad), no_env).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn webhook_flags() {
        let Ok(Parsed::Run(cfg)) = parse(
            args(&[
                "--webhook-url",
                "http://127.0.0.1:9/hook",
                "--webhook-secret",
                "whsec",
                "--webhook-low-balance",
                "50,10",
                "--webhook-retry-base-ms=20",
            ]),
            no_env,
        ) else {
            unreachable!()
        };
        let w = cfg.webhook.unwrap_or_else(|| unreachable!());
        assert_eq!(w.url, "http://127.0.0.1:9/hook");
        assert_eq!(w.low_balance, vec![50, 10]);
        assert_eq!(w.budget_percent, vec![80, 100]);
        assert_eq!((w.retry_base_ms, w.max_attempts), (20, 15));
    }

    #[test]
    fn database_url_and_db() {
        let url = |a: &[&str], env: &dyn Fn(&str) -> Option<String>| match parse(args(a), env) {
            Ok(Parsed::Run(cfg)) => cfg.database_url,
            Ok(Parsed::Migrate(url)) => url,
            other => unreachable!("{other:?}"),
        };
        let pg = DatabaseUrl::Postgres("postgres://postgres@127.0.0.1:5432/x".into());
        assert_eq!(
            url(
                &["--database-url", "postgres://postgres@127.0.0.1:5432/x"],
                &no_env
            ),
            pg
        );
        assert_eq!(
            url(&["--db", "f.sqlite"], &no_env),
            DatabaseUrl::Sqlite("f.sqlite".into())
        );
        assert_eq!(
            url(&["--database-url=sqlite:g.sqlite"], &no_env),
            DatabaseUrl::Sqlite("g.sqlite".into())
        );
        // A flag wins over the environment, --database-url over --db.
        let env = |k: &str| match k {
            "FAREBOX_BALANCE_DATABASE_URL" => Some("postgres://postgres@127.0.0.1:5432/x".into()),
            "FAREBOX_BALANCE_DB" => Some("env.sqlite".into()),
            _ => None,
        };
        assert_eq!(url(&[], &env), pg);
        assert_eq!(
            url(&["--db", "flag.sqlite"], &env),
            DatabaseUrl::Sqlite("flag.sqlite".into())
        );
        assert_eq!(url(&["migrate"], &env), pg);
        assert_eq!(
            url(&["migrate", "--db", "m.sqlite"], &no_env),
            DatabaseUrl::Sqlite("m.sqlite".into())
        );
    }
}
