//! What the balance service decided for one account and route.

/// The outcome of an authorization, as the filter acts on it. Cached as is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward the request; the upstream learns the account.
    Allow {
        account_id: String,
        balance: Option<i64>,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub balance: Option<i64>,
    pub price: u64,
    pub detail: String,
    pub retry_after_s: Option<u32>,
}
