//! What the balance service decided for one account and route.

use serde_json::Value;

use crate::payments::Offer;

/// The outcome of an authorization, as the filter acts on it. Cached as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward the request; the upstream learns the account.
    Allow {
        account_id: String,
        balance: Option<i64>,
        /// What is left of the account's budget this period (`budget.remaining`
        /// of the answer), if it has one. Shown once, like the balance.
        budget: Option<i64>,
        /// The proof of a payment the request carried, for the client.
        paid: Option<Paid>,
    },
    /// 402: the account cannot pay.
    Deny(Denial),
    /// 401: the service does not know the credential.
    Unauthenticated,
    /// 403: the credential is known but may not be used.
    Forbidden,
    /// 429: the service asks the client to slow down.
    RateLimited { retry_after_s: Option<u32> },
}

/// What a paid request's response tells the client of its payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Paid {
    /// x402: the facilitator's settlement (`PAYMENT-RESPONSE`).
    X402(Value),
    /// The Payment scheme: its receipt (`Payment-Receipt`, on 2xx responses).
    Receipt(Value),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Denial {
    pub balance: Option<i64>,
    pub price: u64,
    pub detail: String,
    pub retry_after_s: Option<u32>,
    /// Ways to pay right now (x402, Payment scheme), if the service offers any.
    pub offer: Offer,
    /// The account the service named in its refusal, for the access log (never shown
    /// to the client).
    pub account_id: Option<String>,
    /// The Payment scheme's problem type of a payment failure (a slug of the
    /// draft's registry: `payment-required`, `verification-failed`, ...).
    pub problem: Option<&'static str>,
}

impl Decision {
    /// Decisions about one payment, or carrying one-time challenges, are never reused.
    pub fn cacheable(&self) -> bool {
        match self {
            Decision::Allow { paid, .. } => paid.is_none(),
            // A payment's failure is about that payment.
            Decision::Deny(d) => d.offer.is_empty() && d.problem.is_none(),
            _ => true,
        }
    }

    pub fn allow(account_id: impl Into<String>, balance: Option<i64>) -> Decision {
        Decision::Allow {
            account_id: account_id.into(),
            balance,
            budget: None,
            paid: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn only_decisions_without_a_payment_or_a_challenge_are_cached() {
        assert!(Decision::allow("acct", Some(5)).cacheable());
        let paid = Decision::Allow {
            account_id: "acct".into(),
            balance: None,
            budget: None,
            paid: Some(Paid::X402(json!({"success": true}))),
        };
        assert!(!paid.cacheable());
        assert!(Decision::Deny(Denial::default()).cacheable());
        let offer = Offer {
            accepts: vec![json!({"scheme": "exact"})],
            ..Offer::default()
        };
        let with_offer = Decision::Deny(Denial {
            offer,
            ..Denial::default()
        });
        assert!(!with_offer.cacheable());
        assert!(Decision::Unauthenticated.cacheable());
        assert!(Decision::RateLimited {
            retry_after_s: None
        }
        .cacheable());
    }

    #[test]
    fn allow_names_the_account_and_carries_no_payment() {
        assert_eq!(
            Decision::allow("acct_1", Some(-3)),
            Decision::Allow {
                account_id: "acct_1".into(),
                balance: Some(-3),
                budget: None,
                paid: None,
            }
        );
    }
}
