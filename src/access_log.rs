//! What farebox tells Envoy's access log about a request: who paid (the account id,
//! never the credential), for which route, how much, what was decided, whether the
//! decision came from the cache, and which lease paid.
//!
//! Those six fields travel as one filter-state value, `wasm.farebox`: a
//! `google.protobuf.Struct` of strings (the glue declares the property with that type via
//! Envoy's `declare_property` foreign function). Envoy prints one field of it with the CEL
//! formatter, `%CEL(filter_state['wasm.farebox'].account)%`, and the whole object with
//! `%FILTER_STATE(wasm.farebox:TYPED)%`, on Envoy 1.36 to 1.40. One value instead of one
//! property per field because each property write is a host call that costs about 4 k
//! instructions per request (bench/INSTRUCTIONS.md), more than the rest of a free request.
//! The usage fields of a metered response (`farebox.usage_cost`, `farebox.model`, the
//! tokens) stay one plain property each: they are written once, at the end of a metered
//! response only, and a Lua filter reads them as plain strings.
//!
//! This module is the pure part: which fields, their values, and which changed since
//! they were last published. The glue layer hands the changes to the host, so the value
//! is written once when the fields are known and again only if one changes (a refund
//! turns the decision into `refunded`).

/// What happened to the request, as the `farebox.decision` field says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Paid (by the balance service or a lease) and forwarded.
    Allow,
    /// Forwarded on an allow served from the decision cache (not debited one by one).
    Cached,
    /// Answered 402.
    Deny,
    /// Answered 401: no, malformed or unknown credential.
    Unauthenticated,
    /// Answered 403.
    Forbidden,
    /// Answered 429.
    RateLimited,
    /// A free route (cost 0): forwarded, nobody asked.
    Free,
    /// The service could not decide; forwarded unpaid (`failure_mode: open`).
    FailOpen,
    /// The service could not decide; answered 503 (`failure_mode: closed`).
    FailClosed,
    /// Paid and forwarded, then given back because the upstream did not serve it.
    Refunded,
    /// Answered 413: the body to price was too large.
    TooLarge,
    /// Answered 400: the request names a model the route's price table refuses.
    UnknownModel,
    /// Answered 400: an MCP request whose `Mcp-Method`/`Mcp-Name` headers did not match its body.
    HeaderMismatch,
    /// The filter has no valid configuration: answered 503.
    Unconfigured,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Cached => "cached",
            Outcome::Deny => "deny",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate-limited",
            Outcome::Free => "free",
            Outcome::FailOpen => "fail-open",
            Outcome::FailClosed => "fail-closed",
            Outcome::Refunded => "refunded",
            Outcome::TooLarge => "too-large",
            Outcome::UnknownModel => "unknown-model",
            Outcome::HeaderMismatch => "header-mismatch",
            Outcome::Unconfigured => "unconfigured",
        }
    }

    pub const ALL: [Outcome; 14] = [
        Outcome::Allow,
        Outcome::Cached,
        Outcome::Deny,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::Free,
        Outcome::FailOpen,
        Outcome::FailClosed,
        Outcome::Refunded,
        Outcome::TooLarge,
        Outcome::UnknownModel,
        Outcome::HeaderMismatch,
        Outcome::Unconfigured,
    ];
}

/// The fields of the one published value, in this order, as [`Record::changes`] names
/// them; the value's keys are the names without `farebox.` ([`KEYS`]).
pub const FIELDS: [&str; 6] = [
    "farebox.account",
    "farebox.route",
    "farebox.cost",
    "farebox.decision",
    "farebox.cache",
    "farebox.lease",
];

/// The keys of the [`RECORD`] value's fields, in [`FIELDS`]' order.
pub const KEYS: [&str; 6] = ["account", "route", "cost", "decision", "cache", "lease"];

/// The property holding the six fields (Envoy's filter state `wasm.farebox`).
pub const RECORD: &str = "farebox";

/// The type the [`RECORD`] property is declared with, so that Envoy's CEL and `TYPED`
/// formatters see an object with fields instead of bytes.
pub const RECORD_TYPE: &str = "type.googleapis.com/google.protobuf.Struct";

const ACCOUNT: u8 = 1 << 0;
const ROUTE: u8 = 1 << 1;
const COST: u8 = 1 << 2;
const DECISION: u8 = 1 << 3;
const CACHE: u8 = 1 << 4;
const LEASE: u8 = 1 << 5;
const USAGE: u8 = 1 << 6;
/// The fields that live in the [`RECORD`] value.
const IN_RECORD: u8 = ACCOUNT | ROUTE | COST | DECISION | CACHE | LEASE;

/// Published at the end of a metered response: its final price, and on a route priced
/// by a token table the model and the tokens of each class.
pub const USAGE_FIELDS: [&str; 7] = [
    "farebox.usage_cost",
    "farebox.model",
    "farebox.input_tokens",
    "farebox.cached_input_tokens",
    "farebox.cache_creation_input_tokens",
    "farebox.output_tokens",
    "farebox.reasoning_tokens",
];

/// One request's access-log fields, and which of them changed since the last
/// [`Record::changes`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Record {
    /// Nothing is recorded (`access_log: false`).
    off: bool,
    account: Option<String>,
    route: Option<String>,
    cost: Option<u64>,
    decision: Option<Outcome>,
    cache_hit: bool,
    lease_id: Option<String>,
    usage: Option<crate::usage::Metered>,
    dirty: u8,
}

impl Record {
    /// A record that stays empty: every setter is a no-op.
    pub fn off() -> Record {
        Record {
            off: true,
            ..Record::default()
        }
    }

    /// The request was priced.
    pub fn priced(&mut self, route: &str, cost: u64) {
        if self.off {
            return;
        }
        if self.route.as_deref() != Some(route) {
            self.route = Some(route.to_string());
            self.dirty |= ROUTE;
        }
        if self.cost != Some(cost) {
            self.cost = Some(cost);
            self.dirty |= COST;
        }
    }

    /// The decision about to be acted on came from the decision cache.
    pub fn cache_hit(&mut self) {
        if !self.off && !self.cache_hit {
            self.cache_hit = true;
            self.dirty |= CACHE;
        }
    }

    /// The account the balance service named (an account id, never a credential).
    pub fn account(&mut self, account_id: &str) {
        if !self.off && self.account.as_deref() != Some(account_id) {
            self.account = Some(account_id.to_string());
            self.dirty |= ACCOUNT;
        }
    }

    pub fn lease(&mut self, lease_id: &str) {
        if !self.off && self.lease_id.as_deref() != Some(lease_id) {
            self.lease_id = Some(lease_id.to_string());
            self.dirty |= LEASE;
        }
    }

    /// The final price of a metered response.
    pub fn metered(&mut self, m: &crate::usage::Metered) {
        if !self.off && self.usage.as_ref() != Some(m) {
            self.usage = Some(m.clone());
            self.dirty |= USAGE;
        }
    }

    /// What was done. An allow served from the cache is reported as [`Outcome::Cached`].
    pub fn decided(&mut self, outcome: Outcome) {
        if self.off {
            return;
        }
        let outcome = match outcome {
            Outcome::Allow if self.cache_hit => Outcome::Cached,
            other => other,
        };
        if self.decision != Some(outcome) {
            self.decision = Some(outcome);
            self.dirty |= DECISION;
        }
    }

    pub fn decision(&self) -> Option<Outcome> {
        self.decision
    }

    /// Whether anything changed since the last [`Record::changes`] (a cheap check the
    /// glue makes after every callback).
    pub fn is_dirty(&self) -> bool {
        self.dirty != 0
    }

    /// The fields that changed since last time, as (field name, value); marks them
    /// published. The cache field is `hit` or absent; an unknown field is never written.
    /// (The logical view the tests check; [`Record::publish`] is what the host gets.)
    pub fn changes(&mut self) -> Vec<(&'static str, String)> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::new();
        let mut number = itoa::Buffer::new();
        self.each_field(dirty, &mut number, |name, value| {
            out.push((name, value.to_string()))
        });
        out
    }

    /// Calls `f` with (name, value) for each field in `mask` that has a value: the six
    /// of the record (named as in [`FIELDS`]), then the usage fields ([`USAGE_FIELDS`]).
    fn each_field<'a>(
        &'a self,
        mask: u8,
        number: &'a mut itoa::Buffer,
        mut f: impl FnMut(&'static str, &str),
    ) {
        let [account, route, cost, decision, cache, lease] = FIELDS;
        if let (true, Some(v)) = (mask & ACCOUNT != 0, &self.account) {
            f(account, v);
        }
        if let (true, Some(v)) = (mask & ROUTE != 0, &self.route) {
            f(route, v);
        }
        if let (true, Some(v)) = (mask & COST != 0, self.cost) {
            f(cost, number.format(v));
        }
        if let (true, Some(v)) = (mask & DECISION != 0, self.decision) {
            f(decision, v.as_str());
        }
        if mask & CACHE != 0 && self.cache_hit {
            f(cache, "hit");
        }
        if let (true, Some(v)) = (mask & LEASE != 0, &self.lease_id) {
            f(lease, v);
        }
        if let (true, Some(m)) = (mask & USAGE != 0, &self.usage) {
            let [cost, model, input, cached, creation, output, reasoning] = USAGE_FIELDS;
            f(cost, number.format(m.cost));
            if let Some(name) = &m.model {
                f(model, name);
            }
            if let Some(t) = &m.tokens {
                for (field, n) in [
                    (input, t.input),
                    (cached, t.cached_input),
                    (creation, t.cache_creation_input),
                    (output, t.output),
                    (reasoning, t.reasoning),
                ] {
                    f(field, number.format(n));
                }
            }
        }
    }

    /// Hands what changed since last time to `set` (property name, value) and marks it
    /// published: when any of the six record fields changed, the [`RECORD`] property with
    /// all of them (one host call, not one per field); each changed usage field as its
    /// own property. Numbers are written on the stack, as this runs on every request.
    pub fn publish(&mut self, mut set: impl FnMut(&str, &[u8])) {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty == 0 {
            return;
        }
        let mut number = itoa::Buffer::new();
        if dirty & IN_RECORD != 0 {
            let mut value = Vec::with_capacity(128);
            self.each_field(IN_RECORD, &mut number, |name, v| {
                let key = name.strip_prefix("farebox.").unwrap_or(name);
                struct_field(&mut value, key, v);
            });
            set(RECORD, &value);
        }
        if dirty & USAGE != 0 {
            self.each_field(USAGE, &mut number, |name, v| set(name, v.as_bytes()));
        }
    }
}

/// The arguments of Envoy's `declare_property` foreign function (a serialized
/// `envoy.source.extensions.common.wasm.DeclarePropertyArguments`) declaring [`RECORD`]
/// as a protobuf value of [`RECORD_TYPE`], mutable, for the filter chain's lifetime.
pub fn declare_record_args() -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    length_delimited(&mut out, 1, RECORD.as_bytes()); // name
    out.extend_from_slice(&[VARINT_3, 3]); // type = Protobuf (3)
    length_delimited(&mut out, 4, RECORD_TYPE.as_bytes()); // schema: the type URL
    out
}

/// Protobuf tags: field 1, 2 and 3 length-delimited (wire type 2), field 3 a varint.
const LEN_1: u8 = 0x0a;
const LEN_2: u8 = 0x12;
#[cfg(any(test, feature = "fake"))]
const LEN_3: u8 = 0x1a;
const VARINT_3: u8 = 0x18;

/// Appends one `fields` entry of a `google.protobuf.Struct` (map<string, Value>, field 1)
/// whose value is a `Value` with `string_value` (field 3).
fn struct_field(out: &mut Vec<u8>, key: &str, value: &str) {
    let value_len = 1 + varint_len(value.len()) + value.len();
    let entry_len = 1 + varint_len(key.len()) + key.len() + 1 + varint_len(value_len) + value_len;
    out.push(LEN_1);
    varint(out, entry_len);
    length_delimited(out, 1, key.as_bytes());
    out.push(LEN_2);
    varint(out, value_len);
    length_delimited(out, 3, value.as_bytes());
}

fn length_delimited(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    out.push((field << 3) | 2);
    varint(out, bytes.len());
    out.extend_from_slice(bytes);
}

fn varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n & 0x7f) as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn varint_len(n: usize) -> usize {
    let mut len = 1;
    let mut n = n >> 7;
    while n != 0 {
        len += 1;
        n >>= 7;
    }
    len
}

/// The string fields of a [`RECORD`] value as [`struct_field`] writes them, as (key,
/// value); `None` for anything else. For the in-memory host and the tests.
#[cfg(any(test, feature = "fake"))]
pub fn decode_record(mut bytes: &[u8]) -> Option<Vec<(String, String)>> {
    fn read_varint(bytes: &mut &[u8]) -> Option<usize> {
        let mut n = 0usize;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = bytes.split_first()?;
            *bytes = rest;
            n |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(n);
            }
        }
        None
    }
    fn read_delimited<'a>(bytes: &mut &'a [u8], tag: u8) -> Option<&'a [u8]> {
        let (&t, rest) = bytes.split_first()?;
        if t != tag {
            return None;
        }
        *bytes = rest;
        let len = read_varint(bytes)?;
        let (body, rest) = (bytes.get(..len)?, bytes.get(len..)?);
        *bytes = rest;
        Some(body)
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut entry = read_delimited(&mut bytes, LEN_1)?;
        let key = read_delimited(&mut entry, LEN_1)?;
        let mut value = read_delimited(&mut entry, LEN_2)?;
        let string = read_delimited(&mut value, LEN_3)?;
        if !entry.is_empty() || !value.is_empty() {
            return None;
        }
        out.push((
            String::from_utf8(key.to_vec()).ok()?,
            String::from_utf8(string.to_vec()).ok()?,
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metered_response_publishes_its_price_model_and_tokens() {
        let mut r = Record::default();
        r.priced("claude/m", 500);
        r.changes();
        let m = crate::usage::Metered {
            cost: 112,
            model: Some("m".into()),
            tokens: Some(crate::tokens::Tokens {
                input: 4,
                cached_input: 7,
                cache_creation_input: 2,
                output: 6,
                reasoning: 0,
            }),
        };
        r.metered(&m);
        let got = r.changes();
        assert_eq!(got.len(), 7);
        assert_eq!(got[0], ("farebox.usage_cost", "112".to_string()));
        assert_eq!(got[1], ("farebox.model", "m".to_string()));
        assert_eq!(got[3], ("farebox.cached_input_tokens", "7".to_string()));
        r.metered(&m);
        assert!(r.changes().is_empty(), "published once");
        let mut off = Record::off();
        off.metered(&m);
        assert!(off.changes().is_empty());
    }

    #[test]
    fn fields_are_published_once_and_again_when_they_change() {
        let mut r = Record::default();
        assert!(!r.is_dirty());
        assert!(r.changes().is_empty());
        r.priced("default", 3);
        r.account("acct_a");
        r.decided(Outcome::Allow);
        assert!(r.is_dirty());
        assert_eq!(
            r.changes(),
            vec![
                ("farebox.account", "acct_a".to_string()),
                ("farebox.route", "default".to_string()),
                ("farebox.cost", "3".to_string()),
                ("farebox.decision", "allow".to_string()),
            ]
        );
        assert!(!r.is_dirty());
        // Setting the same values again publishes nothing.
        r.priced("default", 3);
        r.account("acct_a");
        r.decided(Outcome::Allow);
        assert!(r.changes().is_empty());
        // A refund changes the decision only.
        r.decided(Outcome::Refunded);
        assert_eq!(
            r.changes(),
            vec![("farebox.decision", "refunded".to_string())]
        );
        assert_eq!(r.decision(), Some(Outcome::Refunded));
    }

    #[test]
    fn a_cached_allow_is_reported_as_cached_and_a_cached_refusal_keeps_its_kind() {
        let mut allow = Record::default();
        allow.priced("r", 1);
        allow.cache_hit();
        allow.account("acct_c");
        allow.decided(Outcome::Allow);
        let fields = allow.changes();
        assert!(fields.contains(&("farebox.decision", "cached".to_string())));
        assert!(fields.contains(&("farebox.cache", "hit".to_string())));

        let mut deny = Record::default();
        deny.priced("r", 1);
        deny.cache_hit();
        deny.decided(Outcome::Deny);
        let fields = deny.changes();
        assert!(fields.contains(&("farebox.decision", "deny".to_string())));
        assert!(fields.contains(&("farebox.cache", "hit".to_string())));
        assert!(
            !fields.iter().any(|(n, _)| *n == "farebox.account"),
            "an account nobody named is not written"
        );
    }

    #[test]
    fn an_off_record_publishes_nothing() {
        let mut r = Record::off();
        r.priced("r", 1);
        r.cache_hit();
        r.account("a");
        r.lease("l");
        r.decided(Outcome::Allow);
        assert!(!r.is_dirty());
        assert!(r.changes().is_empty());
    }

    #[test]
    fn lease_id_is_published_when_a_lease_paid() {
        let mut r = Record::default();
        r.priced("r", 2);
        r.account("acct_l");
        r.lease("lease-42");
        r.decided(Outcome::Allow);
        let fields = r.changes();
        assert!(fields.contains(&("farebox.lease", "lease-42".to_string())));
        assert!(!fields.iter().any(|(n, _)| *n == "farebox.cache"));
    }

    /// What `publish` hands the host, decoded: (property, fields or the plain value).
    fn published(r: &mut Record) -> Vec<(String, Vec<(String, String)>)> {
        let mut out = Vec::new();
        r.publish(|name, value| {
            let fields = if name == RECORD {
                decode_record(value).expect("a Struct of strings")
            } else {
                vec![(String::new(), String::from_utf8(value.to_vec()).unwrap())]
            };
            out.push((name.to_string(), fields));
        });
        out
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_six_fields_are_one_property_rewritten_whole_when_one_changes() {
        let mut r = Record::default();
        r.priced("default", 3);
        r.cache_hit();
        r.account("acct_a");
        r.decided(Outcome::Allow);
        let want = kv(&[
            ("account", "acct_a"),
            ("route", "default"),
            ("cost", "3"),
            ("decision", "cached"),
            ("cache", "hit"),
        ]);
        assert_eq!(published(&mut r), vec![(RECORD.to_string(), want)]);
        assert!(published(&mut r).is_empty(), "nothing changed");
        r.decided(Outcome::Refunded);
        let got = published(&mut r);
        assert_eq!(got.len(), 1);
        assert_eq!(
            got[0].1.iter().find(|(k, _)| k == "decision"),
            Some(&("decision".to_string(), "refunded".to_string()))
        );
        assert_eq!(got[0].1.len(), 5, "the other fields are still in it");
    }

    #[test]
    fn long_values_and_usage_fields_are_published_intact() {
        let mut r = Record::default();
        let route = "r".repeat(300);
        let lease = "l".repeat(20_000);
        r.priced(&route, u64::MAX);
        r.lease(&lease);
        r.metered(&crate::usage::Metered {
            cost: 7,
            model: None,
            tokens: None,
        });
        let got = published(&mut r);
        assert_eq!(
            got,
            vec![
                (
                    RECORD.to_string(),
                    kv(&[
                        ("route", &route),
                        ("cost", "18446744073709551615"),
                        ("lease", &lease)
                    ])
                ),
                ("farebox.usage_cost".to_string(), kv(&[("", "7")])),
            ]
        );
    }

    #[test]
    fn the_declaration_names_the_record_as_a_struct() {
        let args = declare_record_args();
        // name = 1 (length-delimited), type = 3 (varint, Protobuf = 3), schema = 4.
        let mut want = vec![0x0a, RECORD.len() as u8];
        want.extend_from_slice(RECORD.as_bytes());
        want.extend_from_slice(&[0x18, 3, 0x22, RECORD_TYPE.len() as u8]);
        want.extend_from_slice(RECORD_TYPE.as_bytes());
        assert_eq!(args, want);
    }

    #[test]
    fn keys_are_the_field_names_without_the_prefix() {
        for (field, key) in FIELDS.iter().zip(KEYS) {
            assert_eq!(field.strip_prefix("farebox."), Some(key));
        }
        assert_eq!(decode_record(b"\x0a\x01"), None, "truncated");
    }

    #[test]
    fn outcome_names_are_distinct_and_log_friendly() {
        let names: std::collections::HashSet<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(names.len(), Outcome::ALL.len());
        for n in names {
            assert!(
                n.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{n}"
            );
        }
    }
}
