//! The ledger: accounts, hashed API keys, charges, top-ups, credit leases and
//! usage settlements, on SQLite (the embedded default) or PostgreSQL.
//!
//! - [`rules`]: the money rules as pure functions (grant sizing, expiry
//!   charges, overflow limits), shared by both backends.
//! - [`ops`]: each call of the contract as one transaction script, written
//!   once against the [`Tx`] interface, so the two backends cannot drift.
//! - [`sqlite`], [`postgres`]: the backends (one `Tx` implementation each)
//!   and their migrations ([`migrations`]).
//!
//! Every call runs in one transaction that first locks the account row it
//! changes (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: `SELECT … FOR UPDATE` at
//! READ COMMITTED), so concurrent calls, also from several service replicas,
//! never overdraw an account. Request ids, lease request ids and top-up ids
//! are unique keys; a call that loses a race on one is retried and then
//! answers as a replay.

pub mod migrations;
mod ops;
pub mod postgres;
mod rows;
pub mod rules;
pub mod sqlite;

use crate::config::{ExpiryPolicy, SyncMode};
use std::fmt;

pub use ops::DEMO_ACCOUNTS;

#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    Postgres(tokio_postgres::Error),
    /// The database cannot be reached (no connection within the pool's
    /// timeout, or the connection broke).
    Unavailable(String),
    /// Crediting an account would overflow its balance. Unreachable while
    /// top-ups and refunds keep `balance + reserved <= i64::MAX`.
    Overflow(String),
    /// A stored value the service does not understand (e.g. an unknown
    /// lease state): the database was changed by something else.
    Corrupt(String),
    /// The schema cannot be used or migrated.
    Schema(String),
}

impl StoreError {
    /// Whether the database could not be reached (answered 503, not 500).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Postgres(e) => postgres::connection_lost(e) || e.code().is_none(),
            StoreError::Sqlite(_)
            | StoreError::Overflow(_)
            | StoreError::Corrupt(_)
            | StoreError::Schema(_) => false,
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "sqlite: {e}"),
            StoreError::Postgres(e) => match e.as_db_error() {
                Some(db) => write!(f, "postgres: {} ({})", db.message(), db.code().code()),
                None => write!(f, "postgres: {e}"),
            },
            StoreError::Unavailable(e) => write!(f, "database unavailable: {e}"),
            StoreError::Overflow(account) => write!(f, "balance overflow on account {account}"),
            StoreError::Corrupt(e) => write!(f, "unexpected stored value: {e}"),
            StoreError::Schema(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

// ------------------------------------------------------------ stored enums

/// The state of a lease. Stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    Open,
    Settled,
    Expired,
    Cancelled,
}

impl LeaseState {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Open => "open",
            LeaseState::Settled => "settled",
            LeaseState::Expired => "expired",
            LeaseState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Result<LeaseState> {
        match s {
            "open" => Ok(LeaseState::Open),
            "settled" => Ok(LeaseState::Settled),
            "expired" => Ok(LeaseState::Expired),
            "cancelled" => Ok(LeaseState::Cancelled),
            other => Err(StoreError::Corrupt(format!("lease state {other:?}"))),
        }
    }
}

/// The state of a charge. Stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChargeStatus {
    Charged,
    Refunded,
}

impl ChargeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ChargeStatus::Charged => "charged",
            ChargeStatus::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Result<ChargeStatus> {
        match s {
            "charged" => Ok(ChargeStatus::Charged),
            "refunded" => Ok(ChargeStatus::Refunded),
            other => Err(StoreError::Corrupt(format!("charge status {other:?}"))),
        }
    }
}

// ------------------------------------------------------------ inputs and outcomes

/// What the authorize call needs from the request (already validated).
#[derive(Debug, Clone)]
pub struct AuthorizeInput {
    pub credential: String,
    /// Validated to be in `0..=i64::MAX`.
    pub cost: i64,
    pub route: String,
    pub method: String,
    pub path: String,
    pub request_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeOutcome {
    /// Debited (or replayed: the request id was already charged to this
    /// account, nothing debited again).
    Allowed {
        account_id: String,
        balance: i64,
        replay: bool,
        /// The account's budget after the debit, if it has one.
        budget: Option<BudgetState>,
    },
    /// Balance below cost; nothing written.
    Denied {
        account_id: String,
        balance: i64,
    },
    /// The cost exceeds what is left of the account's budget this period;
    /// nothing written.
    BudgetExceeded {
        account_id: String,
        balance: i64,
        budget: BudgetState,
    },
    UnknownCredential,
    Disabled {
        account_id: String,
    },
    /// The request id is recorded for another account.
    Conflict {
        account_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    Refunded {
        account_id: String,
        balance: i64,
    },
    AlreadyRefunded {
        account_id: String,
        balance: i64,
    },
    UnknownRequest,
    /// The credential does not resolve to the charge's account.
    Conflict {
        account_id: Option<String>,
    },
    /// Crediting back would overflow the balance.
    Overflow {
        account_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    AccountExists,
    KeyExists,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopupOutcome {
    Done {
        balance: i64,
        replay: bool,
    },
    UnknownAccount,
    /// The top-up id is recorded for another account.
    Conflict,
    Overflow,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    pub account_id: String,
    pub balance: i64,
    pub initial_balance: i64,
    pub topups: i64,
    pub disabled: bool,
    /// Σ cost of charges still charged + Σ charged of closed leases (net
    /// of lease refunds).
    pub charged: i64,
    /// Σ cost of refunded charges + Σ units credited back by lease refunds.
    pub refunded: i64,
    pub charges: i64,
    /// Σ granted of open leases.
    pub reserved: i64,
    /// Number of lease rows (any state).
    pub leases: i64,
}

/// Lease behaviour, from the `--lease-*` flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Lifetime of a lease (ms).
    pub ttl_ms: i64,
    /// Largest single grant; `None`: unlimited.
    pub max_units: Option<i64>,
    pub policy: ExpiryPolicy,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            ttl_ms: 30_000,
            max_units: None,
            policy: ExpiryPolicy::Full,
        }
    }
}

/// What the lease call needs from the request (already validated:
/// `1 <= min <= want <= i64::MAX`).
#[derive(Debug, Clone)]
pub struct LeaseInput {
    pub credential: String,
    pub want: i64,
    pub min: i64,
    pub request_id: String,
    pub holder: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// Reserved (or replayed: an open lease already exists for this request
    /// id and account; nothing reserved again).
    Granted {
        lease_id: String,
        granted: i64,
        expires_in_ms: i64,
        account_id: String,
        balance: i64,
        replay: bool,
        budget: Option<BudgetState>,
    },
    /// What is left of the budget this period is below `min` (and no
    /// unspent lease could be recalled); nothing reserved.
    BudgetExceeded {
        account_id: String,
        balance: i64,
        budget: BudgetState,
    },
    /// Available balance below `min`; nothing reserved. `recall`: other
    /// open leases with unspent units were marked recalled (the
    /// caller should retry shortly); otherwise the denial is final.
    Denied {
        account_id: String,
        balance: i64,
        recall: bool,
    },
    UnknownCredential,
    Disabled {
        account_id: String,
    },
    /// The request id belongs to a lease of another account.
    Conflict {
        account_id: String,
    },
    /// The request id belongs to an open lease of another holder: a replay
    /// would let two holders spend one reservation.
    HolderConflict {
        account_id: String,
    },
    /// The request id's lease exists for this account but is no longer open.
    Closed {
        account_id: String,
        lease_id: String,
        state: LeaseState,
    },
}

/// The answer of a successful settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub lease_id: String,
    pub account_id: String,
    pub request_id: String,
    pub state: LeaseState,
    pub used: i64,
    pub granted: i64,
    pub balance: i64,
    /// The stored `settle_seq` after the call.
    pub seq: i64,
    /// Still open and marked recalled: the holder must stop spending and
    /// settle finally.
    pub recall: bool,
    /// `seq` was below the stored one: nothing changed.
    pub stale: bool,
    /// `seq` equal to the stored one with the same `used` and `final`.
    pub replay: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    /// Recorded (open lease), or an idempotent retry on a settled lease.
    Done(Settled),
    UnknownLease,
    /// `used` exceeds the lease's `granted`; nothing written.
    TooMuch {
        account_id: String,
        request_id: String,
        granted: i64,
    },
    /// Already settled with another `used` (the recorded one).
    AlreadySettled {
        account_id: String,
        request_id: String,
        used: i64,
    },
    /// Expired; `charged` is what the expiry policy charged.
    Expired {
        account_id: String,
        request_id: String,
        charged: i64,
    },
    Cancelled {
        account_id: String,
        request_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled {
        lease_id: String,
        account_id: String,
        balance: i64,
    },
    AlreadyCancelled {
        lease_id: String,
        account_id: String,
        balance: i64,
    },
    UnknownLease,
    /// Open, but usage was reported: it must be settled instead.
    InUse {
        lease_id: String,
        account_id: String,
        used: i64,
    },
    /// Settled or expired.
    Closed {
        lease_id: String,
        account_id: String,
        state: LeaseState,
    },
}

/// What a lease refund (`POST /v1/leases/{id}/refund`) needs (validated:
/// `request_id` non-empty, `units >= 1`).
#[derive(Debug, Clone)]
pub struct LeaseRefundInput {
    pub lease_id: String,
    pub request_id: String,
    pub units: i64,
    pub status: Option<u16>,
}

/// The answer of an accepted lease refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRefunded {
    pub lease_id: String,
    pub account_id: String,
    pub units: i64,
    pub balance: i64,
    /// The lease's `charged` now; `None` while it is open.
    pub charged: Option<i64>,
    /// Recorded on an open lease: applied when it closes.
    pub pending: bool,
    /// The request id was already recorded for this lease and units.
    pub replay: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRefundOutcome {
    Done(LeaseRefunded),
    UnknownLease,
    /// The request id is recorded for another lease or other units.
    Conflict {
        account_id: String,
    },
    /// More than the lease was charged (closed), or than it granted (open,
    /// counting its pending refunds).
    ExceedsCharge {
        account_id: String,
    },
    /// Cancelled: nothing was charged.
    Cancelled {
        account_id: String,
    },
    /// Crediting back would overflow the balance.
    Overflow {
        account_id: String,
    },
}

/// A lease row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub lease_id: String,
    pub account_id: String,
    pub holder: String,
    pub request_id: String,
    pub granted: i64,
    pub used: i64,
    pub state: LeaseState,
    pub charged: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub closed_at: Option<i64>,
    /// Units credited back by lease refunds (at the refund, or at the close
    /// for refunds recorded while open).
    pub refunded: i64,
    /// Σ units of refunds recorded while open, not applied yet (0 once
    /// closed). Computed when read; never written.
    pub refund_pending: i64,
    pub settle_seq: i64,
    /// When another holder's lease call first recalled it (`None`: never).
    pub recalled_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRow {
    pub request_id: String,
    pub cost: i64,
    pub route: String,
    pub method: String,
    pub path: String,
    pub status: ChargeStatus,
    pub refund_status: Option<i64>,
    pub at: i64,
}

/// Route, method and path recorded with an overage charge created by
/// [`Store::usage`].
pub const USAGE_ROUTE: &str = "usage";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageOutcome {
    /// The charge's cost is now `actual` (or it already was, by an earlier
    /// identical usage call: `replay`).
    Settled {
        account_id: String,
        balance: i64,
        replay: bool,
    },
    UnknownCredential,
    /// The request id is charged to another account.
    Conflict {
        account_id: String,
    },
    /// Already settled by a usage call with another `cost`.
    Final {
        account_id: String,
        cost: i64,
    },
    /// The charge was refunded.
    Refunded {
        account_id: String,
    },
    /// The adjustment would overflow the balance.
    Overflow {
        account_id: String,
    },
}

/// Tokens per class of a usage line (contract 9.1), each in 0..=i64::MAX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenCounts {
    pub input: i64,
    pub cached_input: i64,
    pub cache_creation_input: i64,
    pub output: i64,
    pub reasoning: i64,
}

/// What one metered request is billed for: the route rule, the model it was
/// priced by, and its tokens per class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageLine {
    pub route: String,
    pub model: Option<String>,
    pub tokens: TokenCounts,
}

/// A stored usage line: one metered request of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageItemRow {
    pub request_id: String,
    pub account_id: String,
    /// The lease that paid for it; `None` when it came with `/v1/usage`.
    pub lease_id: Option<String>,
    pub line: UsageLine,
    pub units: i64,
    pub at: i64,
}

impl UsageItemRow {
    /// The same request reported again with the same content (a retry).
    fn same_as(&self, lease_id: Option<&str>, line: &UsageLine, units: i64) -> bool {
        self.lease_id.as_deref() == lease_id && &self.line == line && self.units == units
    }
}

/// `POST /v1/leases/{lease_id}/usage`: what was done with a usage line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseUsageOutcome {
    /// Recorded now, or an identical line already was (`replay`).
    Recorded {
        account_id: String,
        replay: bool,
    },
    UnknownLease,
    /// The request id already has another line (or one of another lease).
    Conflict {
        account_id: String,
    },
}

/// The account that pays for requests paid by a (demo) payment.
pub const DEMO_PAYER: &str = "payer_demo";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaidOutcome {
    /// Recorded (or replayed: the request id was already paid).
    Paid {
        account_id: String,
        balance: i64,
        replay: bool,
    },
    /// The request id is charged to another account.
    Conflict { account_id: String },
    /// The payment already paid another request (a replay).
    PaymentUsed { account_id: String },
    /// The credential that names the paying account is not known.
    UnknownCredential,
}

/// Why a verified payment is not settled: recording it would fail, or charge
/// the request twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayRefusal {
    /// The key that names the paying account is not known.
    UnknownCredential,
    /// The request id is charged to another account.
    OtherAccount { account_id: String },
    /// The request id is charged to this account already, not by this payment.
    AlreadyCharged { account_id: String },
}

/// Who a payment is recorded for.
#[derive(Debug, Clone)]
pub enum Payer {
    /// The account of this API key (a keyed client that paid).
    Key(String),
    /// This account, created on first use (the payer's own, for anonymous payments).
    Account(String),
}

/// A request paid by a payment: recorded as a top-up of exactly the cost and
/// the charge that spends it.
#[derive(Debug, Clone)]
pub struct PaidCharge {
    pub payer: Payer,
    /// The payment's unique id (the top-up id): a second request with it is refused.
    pub payment_id: Option<String>,
    pub request_id: String,
    pub cost: i64,
    pub route: String,
    pub method: String,
    pub path: String,
}

// ------------------------------------------------------------ budgets, webhooks, export

pub use rules::Period;

/// A budget as the admin API sets it (validated: `limit >= 0`, a known
/// IANA time zone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSpec {
    pub limit: i64,
    pub period: Period,
    pub time_zone: String,
}

/// A budget in the period that contains a given time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetState {
    pub limit: i64,
    /// Units counted against the budget in this period (may exceed `limit`
    /// after usage beyond an estimate).
    pub spent: i64,
    /// `max(limit - spent, 0)`.
    pub remaining: i64,
    pub period: Period,
    pub time_zone: String,
    /// The period's start and end (the reset) as RFC 3339 with the zone's
    /// offset.
    pub period_start: String,
    pub resets_at: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BudgetOutcome {
    Budget(BudgetState),
    NoBudget,
    UnknownAccount,
}

/// What raises webhook events, from the `--webhook-*` flags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AlertSettings {
    /// Write events to the outbox at all (a webhook URL is configured).
    pub enabled: bool,
    /// `balance.low` when a debit takes the balance from `>= t` to `< t`.
    pub low_balance: Vec<i64>,
    /// `budget.threshold` when the period's spend reaches `p` % of the limit.
    pub budget_percent: Vec<u32>,
}

/// A webhook event to write to the outbox.
pub(crate) struct NewEvent<'a> {
    pub event_id: &'a str,
    pub kind: &'a str,
    pub account_id: &'a str,
    pub body: &'a str,
    pub at: i64,
}

/// An outbox event claimed for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRow {
    pub seq: i64,
    pub event_id: String,
    pub body: String,
    /// Delivery attempts before this one.
    pub attempts: i64,
}

/// `GET /admin/charges`: rows with `from <= at < to`, optionally of one
/// account, after `after` in the export order, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    pub from: i64,
    pub to: i64,
    pub account: Option<String>,
    pub after: Option<ExportKey>,
    pub limit: i64,
}

/// A row's place in the export order: `(at, kind, id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportKey {
    pub at: i64,
    pub kind: ExportKind,
    pub id: String,
}

/// What an export row records. Stored nowhere: derived from the table the
/// row comes from; `order` breaks ties of `at`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportKind {
    /// A charge (`/v1/authorize`, or an overage from `/v1/usage`): `units` > 0.
    Charge,
    /// A charge given back by `/v1/refund`: `units` < 0.
    Refund,
    /// A settled or expired lease: `units` = what it charged when it closed.
    Lease,
    /// A lease refund (`/v1/leases/{id}/refund`): `units` < 0.
    LeaseRefund,
}

impl ExportKind {
    pub fn order(self) -> i64 {
        match self {
            ExportKind::Charge => 0,
            ExportKind::Refund => 1,
            ExportKind::Lease => 2,
            ExportKind::LeaseRefund => 3,
        }
    }

    pub fn from_order(n: i64) -> Option<ExportKind> {
        [
            ExportKind::Charge,
            ExportKind::Refund,
            ExportKind::Lease,
            ExportKind::LeaseRefund,
        ]
        .into_iter()
        .find(|k| k.order() == n)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExportKind::Charge => "charge",
            ExportKind::Refund => "refund",
            ExportKind::Lease => "lease",
            ExportKind::LeaseRefund => "lease_refund",
        }
    }
}

/// One row of the usage export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRow {
    pub key: ExportKey,
    pub account_id: String,
    pub request_id: String,
    /// The lease of a lease or lease-refund row.
    pub lease_id: Option<String>,
    pub route: String,
    pub method: String,
    pub path: String,
    /// Signed: refunds are negative.
    pub units: i64,
    /// The upstream status recorded with a refund.
    pub upstream_status: Option<i64>,
}

// ------------------------------------------------------------ the storage interface

/// An account row, locked for the rest of the transaction.
#[derive(Debug, Clone)]
pub(crate) struct AccountRow {
    pub account_id: String,
    pub balance: i64,
    pub initial_balance: i64,
    pub disabled: bool,
}

/// A charge as read inside a transaction.
#[derive(Debug, Clone)]
pub(crate) struct ChargeRec {
    pub account_id: String,
    pub cost: i64,
    pub status: ChargeStatus,
    pub at: i64,
}

/// An account to insert, with its API key unless it has none.
pub(crate) struct NewAccount<'a> {
    pub account_id: &'a str,
    pub key_hash: Option<&'a str>,
    pub balance: i64,
    pub disabled: bool,
    pub at: i64,
}

/// The refund of a charge, to record on it.
pub(crate) struct ChargeRefund<'a> {
    pub request_id: &'a str,
    /// The upstream's status that caused it, if the filter sent one.
    pub status: Option<u16>,
    pub at: i64,
}

/// A usage settlement to insert.
pub(crate) struct NewUsage<'a> {
    pub request_id: &'a str,
    pub account_id: &'a str,
    pub estimate: Option<i64>,
    pub actual: i64,
    pub at: i64,
}

/// A top-up to insert.
pub(crate) struct NewTopup<'a> {
    pub topup_id: Option<&'a str>,
    pub account_id: &'a str,
    pub amount: i64,
    pub at: i64,
}

/// A lease refund to insert.
pub(crate) struct NewLeaseRefund<'a> {
    pub input: &'a LeaseRefundInput,
    pub account_id: &'a str,
    pub at: i64,
}

/// A charge to insert.
pub(crate) struct NewCharge<'a> {
    pub request_id: &'a str,
    pub account_id: &'a str,
    pub cost: i64,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub at: i64,
}

/// Sums over one account's rows, for the admin summary.
#[derive(Debug, Clone, Default)]
pub(crate) struct Totals {
    pub charged: i64,
    pub refunded: i64,
    pub charges: i64,
    pub reserved: i64,
    pub lease_charged: i64,
    pub lease_refunded: i64,
    pub leases: i64,
    pub topups: i64,
}

/// The primitive reads and writes of one transaction: everything a backend
/// must provide. The rules and their order live in [`ops`], written once.
///
/// Every method that returns an [`AccountRow`] locks that row until the end
/// of the transaction.
#[allow(async_fn_in_trait)] // used with concrete backends only
pub(crate) trait Tx {
    async fn account_by_key(&mut self, key_hash: &str) -> Result<Option<AccountRow>>;
    async fn account(&mut self, account_id: &str) -> Result<Option<AccountRow>>;
    /// Adds `delta` to the balance; returns the new balance.
    async fn add_balance(&mut self, account_id: &str, delta: i64) -> Result<i64>;
    async fn key_exists(&mut self, key_hash: &str) -> Result<bool>;
    async fn insert_account(&mut self, a: &NewAccount<'_>) -> Result<()>;
    async fn set_disabled(&mut self, account_id: &str, disabled: bool) -> Result<bool>;

    async fn charge(&mut self, request_id: &str) -> Result<Option<ChargeRec>>;
    async fn insert_charge(&mut self, c: &NewCharge<'_>) -> Result<()>;
    async fn mark_refunded(&mut self, r: &ChargeRefund<'_>) -> Result<()>;
    async fn set_charge_cost(&mut self, request_id: &str, cost: i64) -> Result<()>;
    async fn usage_actual(&mut self, request_id: &str) -> Result<Option<i64>>;
    async fn insert_usage(&mut self, u: &NewUsage<'_>) -> Result<()>;
    async fn usage_item(&mut self, request_id: &str) -> Result<Option<UsageItemRow>>;
    async fn insert_usage_item(&mut self, item: &UsageItemRow) -> Result<()>;
    /// The account's usage lines, oldest first.
    async fn usage_items_of(&mut self, account_id: &str) -> Result<Vec<UsageItemRow>>;

    async fn topup_owner(&mut self, topup_id: &str) -> Result<Option<String>>;
    async fn insert_topup(&mut self, t: &NewTopup<'_>) -> Result<()>;

    /// Σ granted over the account's open leases.
    async fn reserved(&mut self, account_id: &str) -> Result<i64>;
    async fn totals(&mut self, account_id: &str) -> Result<Totals>;
    async fn charges_of(&mut self, account_id: &str) -> Result<Vec<ChargeRow>>;
    async fn leases_of(&mut self, account_id: &str) -> Result<Vec<LeaseRow>>;

    async fn lease_by_id(&mut self, lease_id: &str) -> Result<Option<LeaseRow>>;
    async fn lease_by_request(&mut self, request_id: &str) -> Result<Option<LeaseRow>>;
    async fn insert_lease(&mut self, l: &LeaseRow) -> Result<()>;
    /// Writes `used`, `state`, `charged`, `refunded`, `settle_seq` and
    /// `closed_at`.
    async fn update_lease(&mut self, l: &LeaseRow) -> Result<()>;
    /// How many distinct holders other than `holder` have an open lease on
    /// the account.
    async fn other_holders(&mut self, account_id: &str, holder: &str) -> Result<i64>;
    /// Marks recalled (keeping the first mark's time) the account's open
    /// leases with unspent units (`used < granted`), the asking holder's own
    /// included (a lease it replaced may still await its final settle);
    /// returns how many there are.
    async fn recall_unspent(&mut self, account_id: &str, now: i64) -> Result<u64>;
    /// The (lease id, units) of the lease refund recorded for `request_id`.
    async fn lease_refund(&mut self, request_id: &str) -> Result<Option<(String, i64)>>;
    async fn insert_lease_refund(&mut self, r: &NewLeaseRefund<'_>) -> Result<()>;
    /// The account's open leases with `expires_at <= now`, oldest first.
    async fn due_leases(&mut self, account_id: &str, now: i64) -> Result<Vec<LeaseRow>>;
    /// Accounts that have open leases with `expires_at <= now`.
    async fn accounts_with_due_leases(&mut self, now: i64) -> Result<Vec<String>>;

    /// The account's budget: (limit, period, time zone) as stored.
    async fn budget(&mut self, account_id: &str) -> Result<Option<(i64, String, String)>>;
    async fn put_budget(&mut self, account_id: &str, b: &BudgetSpec, at: i64) -> Result<()>;
    /// Deletes the budget and its spend rows; false if there was none.
    async fn delete_budget(&mut self, account_id: &str) -> Result<bool>;
    async fn budget_spent(&mut self, account_id: &str, period_start: i64) -> Result<i64>;
    /// Adds `delta` to the period's spend (never below 0); returns the new spend.
    async fn add_budget_spent(
        &mut self,
        account_id: &str,
        period_start: i64,
        delta: i64,
    ) -> Result<i64>;

    async fn insert_event(&mut self, e: &NewEvent<'_>) -> Result<()>;
    /// Claims up to `limit` undelivered events due at `now` (oldest first)
    /// by moving their next attempt to `until`, so no other delivery task
    /// takes them meanwhile.
    async fn claim_events(&mut self, now: i64, until: i64, limit: i64) -> Result<Vec<EventRow>>;
    async fn event_delivered(&mut self, seq: i64, at: i64) -> Result<()>;
    /// Records a failed attempt: retried at `next`, or given up (`None`).
    async fn event_failed(
        &mut self,
        seq: i64,
        next: Option<i64>,
        error: &str,
        at: i64,
    ) -> Result<()>;

    async fn export(&mut self, q: &ExportQuery) -> Result<Vec<ExportRow>>;
}

// ------------------------------------------------------------ the store

/// Where the ledger lives, from `--database-url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite:PATH` (or a bare path from `--db`).
    Sqlite(String),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl DatabaseUrl {
    pub fn parse(url: &str) -> std::result::Result<DatabaseUrl, String> {
        if let Some(path) = url.strip_prefix("sqlite:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err("sqlite: URL needs a path (sqlite:PATH)".to_owned());
            }
            return Ok(DatabaseUrl::Sqlite(path.to_owned()));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseUrl::Postgres(url.to_owned()));
        }
        Err(format!(
            "expected sqlite:PATH or postgres://USER@HOST:PORT/DATABASE, got {:?}",
            redact(url)
        ))
    }

    /// The URL without any password, for messages.
    pub fn display(&self) -> String {
        match self {
            DatabaseUrl::Sqlite(path) => format!("sqlite:{path}"),
            DatabaseUrl::Postgres(url) => redact(url),
        }
    }
}

/// The URL with every password masked, for messages:
/// `scheme://user:password@host…` → `scheme://user:***@host…`, and a
/// `password=` query parameter → `password=***` (the client accepts both).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (head, query) = match rest.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (rest, None),
    };
    // The user info ends at the last `@` (a password may hold `@` or `/`).
    let mut out = match head.rsplit_once('@') {
        Some((user, host)) => match user.split_once(':') {
            Some((name, _)) => format!("{scheme}://{name}:***@{host}"),
            None => format!("{scheme}://{head}"),
        },
        None => format!("{scheme}://{head}"),
    };
    if let Some(query) = query {
        let params: Vec<&str> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => "password=***",
                _ => p,
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

enum Backend {
    Sqlite(sqlite::Db),
    Postgres(postgres::Db),
}

/// The ledger on one backend. Cheap to share (`Arc`).
pub struct Store {
    db: Backend,
    leases: LeaseSettings,
    alerts: std::sync::Arc<AlertSettings>,
}

/// Runs `$body` (an `ops::…` future using `$tx: &mut impl Tx`) in one
/// transaction of the store's backend. SQLite runs on the blocking pool;
/// PostgreSQL retries deadlocks, serialization failures and lost
/// unique-key races.
macro_rules! in_tx {
    ($store:expr, |$tx:ident| $body:expr) => {
        match &$store.db {
            Backend::Sqlite(db) => db.run(move |$tx| sqlite::ready($body)).await,
            Backend::Postgres(db) => {
                let mut attempt = 0u32;
                loop {
                    let mut client = db.client().await?;
                    // A pooled connection the server has just ended can still look open
                    // (the pool's fast recycling only asks the client, which learns of the
                    // end a moment later): its BEGIN fails, and that is retried like a
                    // failure inside the transaction.
                    let outcome = match postgres::PgTx::begin(&mut client).await {
                        Ok(mut pg) => {
                            let $tx = &mut pg;
                            match $body.await {
                                Ok(v) => break pg.commit().await.map(|()| v),
                                Err(e) => e,
                            }
                        }
                        Err(e) => e,
                    };
                    if !(postgres::retryable(&outcome) && attempt < postgres::MAX_RETRIES) {
                        break Err(outcome);
                    }
                    attempt += 1;
                    if postgres::is_connection_lost(&outcome) {
                        // Never hand this connection out again.
                        drop(deadpool_postgres::Object::take(client));
                    }
                    tracing::debug!(attempt, cause = %outcome, "retrying transaction");
                }
            }
        }
    };
}

impl Store {
    /// Opens the database and brings its schema up to date (the migrations
    /// of [`migrations`]). Refuses a schema newer than this build knows.
    pub async fn open(url: &DatabaseUrl, sync: SyncMode) -> Result<Store> {
        let db = match url {
            DatabaseUrl::Sqlite(path) => Backend::Sqlite(sqlite::Db::open(path, sync, true)?),
            DatabaseUrl::Postgres(url) => Backend::Postgres(postgres::Db::open(url, true).await?),
        };
        Ok(Store {
            db,
            leases: LeaseSettings::default(),
            alerts: Default::default(),
        })
    }

    /// Applies the pending migrations only; returns (version before, version after).
    pub async fn migrate(url: &DatabaseUrl) -> Result<(i64, i64)> {
        match url {
            DatabaseUrl::Sqlite(path) => sqlite::migrate_path(path),
            DatabaseUrl::Postgres(url) => postgres::migrate_url(url).await,
        }
    }

    /// A warning about the backend's set-up, if any (SQLite not in WAL mode).
    pub fn warning(&self) -> Option<String> {
        match &self.db {
            Backend::Sqlite(db) => db.warning(),
            Backend::Postgres(_) => None,
        }
    }

    /// Sets the lease behaviour (TTL, cap, expiry policy).
    pub fn with_lease_settings(mut self, settings: LeaseSettings) -> Store {
        self.leases = settings;
        self
    }

    /// Sets what raises webhook events.
    pub fn with_alerts(mut self, alerts: AlertSettings) -> Store {
        self.alerts = std::sync::Arc::new(alerts);
        self
    }

    pub async fn authorize(&self, input: AuthorizeInput) -> Result<AuthorizeOutcome> {
        let alerts = self.alerts.clone();
        in_tx!(self, |tx| ops::authorize(tx, &input, &alerts))
    }

    pub async fn refund(
        &self,
        request_id: String,
        credential: String,
        upstream_status: Option<u16>,
    ) -> Result<RefundOutcome> {
        in_tx!(self, |tx| ops::refund(
            tx,
            &request_id,
            &credential,
            upstream_status
        ))
    }

    /// Creates an account with one API key. `balance` must be >= 0.
    pub async fn create_account(
        &self,
        account_id: String,
        key: String,
        balance: i64,
        disabled: bool,
    ) -> Result<CreateOutcome> {
        in_tx!(self, |tx| ops::create_account(
            tx,
            &account_id,
            &key,
            balance,
            disabled
        ))
    }

    /// Creates the demo accounts that do not exist yet; existing ones are
    /// left exactly as they are.
    pub async fn seed_demo(&self) -> Result<usize> {
        in_tx!(self, |tx| ops::seed_demo(tx))
    }

    /// Adds `amount` (> 0) to the balance. With a `topup_id`, a repeated
    /// top-up for the same account changes nothing.
    pub async fn topup(
        &self,
        account_id: String,
        amount: i64,
        topup_id: Option<String>,
    ) -> Result<TopupOutcome> {
        in_tx!(self, |tx| ops::topup(
            tx,
            &account_id,
            amount,
            topup_id.as_deref()
        ))
    }

    /// Returns false if the account does not exist.
    pub async fn set_disabled(&self, account_id: String, disabled: bool) -> Result<bool> {
        in_tx!(self, |tx| ops::set_disabled(tx, &account_id, disabled))
    }

    /// The account's totals. Expires the account's due leases first.
    pub async fn account(&self, account_id: String) -> Result<Option<AccountSummary>> {
        let policy = self.leases.policy;
        in_tx!(self, |tx| ops::account(tx, &account_id, policy))
    }

    /// The account's charges, oldest first; `None` if the account does not exist.
    pub async fn charges(&self, account_id: String) -> Result<Option<Vec<ChargeRow>>> {
        in_tx!(self, |tx| ops::charges(tx, &account_id))
    }

    /// `POST /v1/leases`: reserves part of the balance.
    pub async fn lease(&self, input: LeaseInput) -> Result<LeaseOutcome> {
        let settings = self.leases;
        let alerts = self.alerts.clone();
        in_tx!(self, |tx| ops::lease(tx, &input, settings, &alerts))
    }

    /// `POST /v1/leases/{lease_id}/settle`. `used` is the total spent so far;
    /// `seq` (>= 1) the holder's number of this settle, if it sent one.
    pub async fn settle(
        &self,
        lease_id: String,
        used: i64,
        is_final: bool,
        seq: Option<i64>,
    ) -> Result<SettleOutcome> {
        let policy = self.leases.policy;
        in_tx!(self, |tx| ops::settle(
            tx, &lease_id, used, is_final, seq, policy
        ))
    }

    /// `POST /v1/leases/{lease_id}/refund`: gives back units a closed lease
    /// charged (at once), or records them against an open lease (applied
    /// when it closes). Idempotent by `request_id`.
    pub async fn lease_refund(&self, input: LeaseRefundInput) -> Result<LeaseRefundOutcome> {
        let policy = self.leases.policy;
        in_tx!(self, |tx| ops::lease_refund(tx, &input, policy))
    }

    /// `POST /v1/leases/cancel`: releases an open lease that reported no use.
    pub async fn cancel(&self, request_id: String) -> Result<CancelOutcome> {
        let policy = self.leases.policy;
        in_tx!(self, |tx| ops::cancel(tx, &request_id, policy))
    }

    /// Expires every open lease whose time is up (the background sweep),
    /// one transaction per account. Returns how many expired.
    pub async fn expire_due(&self) -> Result<usize> {
        let policy = self.leases.policy;
        let now = crate::util::now_ms();
        let accounts = in_tx!(self, |tx| tx.accounts_with_due_leases(now))?;
        let mut n = 0;
        for account_id in accounts {
            n += in_tx!(self, |tx| ops::expire_account(tx, &account_id, now, policy))?;
        }
        Ok(n)
    }

    /// The account's leases, oldest first (after expiring its due ones);
    /// `None` if the account does not exist.
    pub async fn leases(&self, account_id: String) -> Result<Option<Vec<LeaseRow>>> {
        let policy = self.leases.policy;
        in_tx!(self, |tx| ops::leases(tx, &account_id, policy))
    }

    /// `POST /v1/usage`: sets the final cost of `request_id` to `actual`, and
    /// records its usage line if it has one.
    pub async fn usage(
        &self,
        request_id: String,
        credential: String,
        actual: i64,
        line: Option<UsageLine>,
    ) -> Result<UsageOutcome> {
        let alerts = self.alerts.clone();
        in_tx!(self, |tx| ops::usage(
            tx,
            &request_id,
            &credential,
            actual,
            line.as_ref(),
            &alerts
        ))
    }

    /// `POST /v1/leases/{lease_id}/usage`: records the usage line of a request
    /// paid from the lease. Idempotent by `request_id`; moves no money.
    pub async fn lease_usage(
        &self,
        lease_id: String,
        request_id: String,
        units: i64,
        line: UsageLine,
    ) -> Result<LeaseUsageOutcome> {
        in_tx!(self, |tx| ops::lease_usage(
            tx,
            &lease_id,
            &request_id,
            units,
            &line
        ))
    }

    /// The account's usage lines, oldest first; `None` if the account does not exist.
    pub async fn usage_items(&self, account_id: String) -> Result<Option<Vec<UsageItemRow>>> {
        in_tx!(self, |tx| ops::usage_items(tx, &account_id))
    }

    /// Whether payment `payment_id` paid already: `None` no, `Some(true)` this
    /// request (a retry), `Some(false)` another one.
    pub async fn payment_use(
        &self,
        payment_id: String,
        request_id: String,
    ) -> Result<Option<bool>> {
        in_tx!(self, |tx| ops::payment_use(tx, &payment_id, &request_id))
    }

    /// Why a payment for `payer` and `request_id` must not be settled (see
    /// [`ops::pay_refusal`]); asked after [`Store::payment_use`].
    pub async fn pay_refusal(
        &self,
        payer: Payer,
        request_id: String,
    ) -> Result<Option<PayRefusal>> {
        in_tx!(self, |tx| ops::pay_refusal(tx, &payer, &request_id))
    }

    /// Records a request paid by a verified payment (see [`PaidCharge`]).
    pub async fn pay(&self, paid: PaidCharge) -> Result<PaidOutcome> {
        in_tx!(self, |tx| ops::pay(tx, &paid))
    }

    /// `PUT /admin/accounts/{id}/budget`: sets (or replaces) the budget.
    pub async fn set_budget(&self, account_id: String, spec: BudgetSpec) -> Result<BudgetOutcome> {
        in_tx!(self, |tx| ops::set_budget(tx, &account_id, &spec))
    }

    /// The budget in the current period.
    pub async fn budget(&self, account_id: String) -> Result<BudgetOutcome> {
        in_tx!(self, |tx| ops::get_budget(tx, &account_id))
    }

    /// Removes the budget; answers it as it was.
    pub async fn clear_budget(&self, account_id: String) -> Result<BudgetOutcome> {
        in_tx!(self, |tx| ops::clear_budget(tx, &account_id))
    }

    /// Claims up to `limit` due webhook events for delivery until `until`.
    pub async fn claim_events(&self, now: i64, until: i64, limit: i64) -> Result<Vec<EventRow>> {
        in_tx!(self, |tx| tx.claim_events(now, until, limit))
    }

    pub async fn event_delivered(&self, seq: i64, at: i64) -> Result<()> {
        in_tx!(self, |tx| tx.event_delivered(seq, at))
    }

    /// A failed delivery: retried at `next`, or given up (`None`).
    pub async fn event_failed(
        &self,
        seq: i64,
        next: Option<i64>,
        error: String,
        at: i64,
    ) -> Result<()> {
        in_tx!(self, |tx| tx.event_failed(seq, next, &error, at))
    }

    /// One page of the usage export.
    pub async fn export(&self, q: ExportQuery) -> Result<Vec<ExportRow>> {
        in_tx!(self, |tx| tx.export(&q))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            DatabaseUrl::parse("sqlite:/tmp/x.db"),
            Ok(DatabaseUrl::Sqlite("/tmp/x.db".into()))
        );
        assert_eq!(
            DatabaseUrl::parse("sqlite::memory:"),
            Ok(DatabaseUrl::Sqlite(":memory:".into()))
        );
        assert!(matches!(
            DatabaseUrl::parse("postgres://u@h/db"),
            Ok(DatabaseUrl::Postgres(_))
        ));
        assert!(DatabaseUrl::parse("mysql://x").is_err());
        assert!(DatabaseUrl::parse("sqlite:").is_err());
        let e = DatabaseUrl::parse("mysql://u:hunter2@h/db").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert_eq!(
            redact("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("postgres://u@h/db?password=hunter2"),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(
            redact("postgres://u:hunter1@h/db?sslmode=disable&password=hunter2"),
            "postgres://u:***@h/db?sslmode=disable&password=***"
        );
        assert_eq!(redact("postgres://u:p/w@h/db"), "postgres://u:***@h/db");
    }

    #[test]
    fn states_round_trip() {
        for s in [
            LeaseState::Open,
            LeaseState::Settled,
            LeaseState::Expired,
            LeaseState::Cancelled,
        ] {
            assert_eq!(LeaseState::parse(s.as_str()).ok(), Some(s));
        }
        assert!(LeaseState::parse("bogus").is_err());
        for s in [ChargeStatus::Charged, ChargeStatus::Refunded] {
            assert_eq!(ChargeStatus::parse(s.as_str()).ok(), Some(s));
        }
        assert!(ChargeStatus::parse("").is_err());
    }
}
