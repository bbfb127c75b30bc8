//! What farebox tells Envoy's access log about a request: who paid (the account id,
//! never the credential), for which route, how much, what was decided, whether the
//! decision came from the cache, and which lease paid.
//!
//! Each field is published as a filter-state value named `farebox.<field>` (Envoy keeps
//! it under `wasm.farebox.<field>`, printed by `%FILTER_STATE(wasm.farebox.<field>:PLAIN)%`).
//! This module is the pure part: which fields, their values, and which changed since
//! they were last published. The glue layer hands the changes to the host, so a field
//! is written once when it is known and again only if it changes (a refund turns the
//! decision into `refunded`).

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

/// The published fields, in this order: the property names the filter sets.
pub const FIELDS: [&str; 6] = [
    "farebox.account",
    "farebox.route",
    "farebox.cost",
    "farebox.decision",
    "farebox.cache",
    "farebox.lease",
];

const ACCOUNT: u8 = 1 << 0;
const ROUTE: u8 = 1 << 1;
const COST: u8 = 1 << 2;
const DECISION: u8 = 1 << 3;
const CACHE: u8 = 1 << 4;
const LEASE: u8 = 1 << 5;
const USAGE: u8 = 1 << 6;

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

    /// The fields that changed since last time, as (property name, value); marks them
    /// published. The cache field is `hit` or absent; an unknown field is never written.
    pub fn changes(&mut self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        self.publish(|name, value| out.push((name, value.to_string())));
        out
    }

    /// Hands each field that changed since last time to `set` (property name, value)
    /// and marks them published, without building anything: the values are borrowed
    /// and numbers are written on the stack, as this runs on every request.
    pub fn publish(&mut self, mut set: impl FnMut(&'static str, &str)) {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty == 0 {
            return;
        }
        let [account, route, cost, decision, cache, lease] = FIELDS;
        let mut number = itoa::Buffer::new();
        if let (true, Some(v)) = (dirty & ACCOUNT != 0, &self.account) {
            set(account, v);
        }
        if let (true, Some(v)) = (dirty & ROUTE != 0, &self.route) {
            set(route, v);
        }
        if let (true, Some(v)) = (dirty & COST != 0, self.cost) {
            set(cost, number.format(v));
        }
        if let (true, Some(v)) = (dirty & DECISION != 0, self.decision) {
            set(decision, v.as_str());
        }
        if dirty & CACHE != 0 && self.cache_hit {
            set(cache, "hit");
        }
        if let (true, Some(v)) = (dirty & LEASE != 0, &self.lease_id) {
            set(lease, v);
        }
        if let (true, Some(m)) = (dirty & USAGE != 0, &self.usage) {
            let [cost, model, input, cached, creation, output, reasoning] = USAGE_FIELDS;
            set(cost, number.format(m.cost));
            if let Some(name) = &m.model {
                set(model, name);
            }
            if let Some(t) = &m.tokens {
                for (field, n) in [
                    (input, t.input),
                    (cached, t.cached_input),
                    (creation, t.cache_creation_input),
                    (output, t.output),
                    (reasoning, t.reasoning),
                ] {
                    set(field, number.format(n));
                }
            }
        }
    }
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
