//! The ledger: accounts, hashed API keys, charges, top-ups and credit leases
//! in SQLite.
//!
//! One connection behind a mutex. Every state change runs in a single
//! `BEGIN IMMEDIATE` transaction, so checks and writes are atomic even if
//! another process opens the same database file.

use crate::config::{ExpiryPolicy, SyncMode};
use crate::util::{now_ms, random_hex, sha256_hex};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    account_id      TEXT PRIMARY KEY NOT NULL,
    balance         INTEGER NOT NULL,
    initial_balance INTEGER NOT NULL,
    disabled        INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    key_hash   TEXT PRIMARY KEY NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts(account_id)
);
CREATE TABLE IF NOT EXISTS charges (
    request_id    TEXT PRIMARY KEY NOT NULL,
    account_id    TEXT NOT NULL REFERENCES accounts(account_id),
    cost          INTEGER NOT NULL,
    route         TEXT NOT NULL,
    method        TEXT NOT NULL,
    path          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('charged', 'refunded')),
    refund_status INTEGER,
    at            INTEGER NOT NULL,
    refunded_at   INTEGER
);
CREATE INDEX IF NOT EXISTS charges_by_account ON charges(account_id);
CREATE TABLE IF NOT EXISTS topups (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    topup_id   TEXT UNIQUE,
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    amount     INTEGER NOT NULL,
    at         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS topups_by_account ON topups(account_id);
CREATE TABLE IF NOT EXISTS leases (
    lease_id   TEXT PRIMARY KEY NOT NULL,
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    holder     TEXT NOT NULL,
    request_id TEXT NOT NULL UNIQUE,
    granted    INTEGER NOT NULL CHECK (granted > 0),
    used       INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0 AND used <= granted),
    state      TEXT NOT NULL CHECK (state IN ('open', 'settled', 'expired', 'cancelled')),
    charged    INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    closed_at  INTEGER,
    recalled_at INTEGER,
    settle_seq INTEGER NOT NULL DEFAULT 0,
    refunded   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS leases_by_account ON leases(account_id, state, expires_at);
CREATE INDEX IF NOT EXISTS leases_by_state ON leases(state, expires_at);
CREATE TABLE IF NOT EXISTS lease_refunds (
    request_id TEXT PRIMARY KEY NOT NULL,
    lease_id   TEXT NOT NULL REFERENCES leases(lease_id),
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    units      INTEGER NOT NULL CHECK (units > 0),
    status     INTEGER,
    at         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS lease_refunds_by_lease ON lease_refunds(lease_id);
PRAGMA user_version = 3;
";

/// Columns added to `leases` after version 2 (recall, settle sequence
/// numbers, refunds after turnover): (name, declaration). A database of an
/// earlier version gains them when it is opened.
const LEASE_COLUMNS_V3: &[(&str, &str)] = &[
    ("recalled_at", "INTEGER"),
    ("settle_seq", "INTEGER NOT NULL DEFAULT 0"),
    ("refunded", "INTEGER NOT NULL DEFAULT 0"),
];

/// Adds the [`LEASE_COLUMNS_V3`] a `leases` table of an earlier version lacks.
fn migrate_leases(conn: &Connection) -> Result<()> {
    let mut have = Vec::new();
    {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('leases')")?;
        for name in stmt.query_map([], |r| r.get::<_, String>(0))? {
            have.push(name?);
        }
    }
    for (name, decl) in LEASE_COLUMNS_V3 {
        if !have.iter().any(|h| h == name) {
            conn.execute_batch(&format!("ALTER TABLE leases ADD COLUMN {name} {decl}"))?;
        }
    }
    Ok(())
}

const LOOKUP_KEY: &str = "SELECT a.account_id, a.balance, a.disabled
     FROM keys k JOIN accounts a ON a.account_id = k.account_id
     WHERE k.key_hash = ?1";

#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    /// Crediting an account would overflow its balance. Unreachable while
    /// top-ups and refunds keep `balance + reserved <= i64::MAX`.
    Overflow(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "sqlite: {e}"),
            StoreError::Overflow(account) => write!(f, "balance overflow on account {account}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(e)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What the authorize call needs from the request (already validated).
#[derive(Debug, Clone)]
pub struct AuthorizeInput<'a> {
    pub credential: &'a str,
    /// Validated to be in `0..=i64::MAX`.
    pub cost: i64,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub request_id: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthorizeOutcome {
    /// Debited (or replayed: the request id was already charged to this
    /// account, nothing debited again).
    Allowed {
        account_id: String,
        balance: i64,
        replay: bool,
    },
    /// Balance below cost; nothing written.
    Denied {
        account_id: String,
        balance: i64,
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
pub struct LeaseInput<'a> {
    pub credential: &'a str,
    pub want: i64,
    pub min: i64,
    pub request_id: &'a str,
    pub holder: &'a str,
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
    },
    /// Available balance below `min`; nothing reserved. `recall`: other
    /// holders' open leases with unspent units were marked recalled (the
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
    /// The request id's lease exists for this account but is no longer open.
    Closed {
        account_id: String,
        lease_id: String,
        state: String,
    },
}

/// The answer of a successful settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settled {
    pub lease_id: String,
    pub account_id: String,
    pub request_id: String,
    pub state: String,
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
        state: String,
    },
}

/// What a lease refund (`POST /v1/leases/{id}/refund`) needs (validated:
/// `request_id` non-empty, `units >= 1`).
#[derive(Debug, Clone)]
pub struct LeaseRefundInput<'a> {
    pub lease_id: &'a str,
    pub request_id: &'a str,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub lease_id: String,
    pub holder: String,
    pub request_id: String,
    pub granted: i64,
    pub used: i64,
    pub state: String,
    pub charged: i64,
    pub created_at: i64,
    pub expires_at: i64,
    pub closed_at: Option<i64>,
    /// Units credited back by lease refunds (at the refund, or at the close
    /// for refunds recorded while open).
    pub refunded: i64,
    /// Σ units of refunds recorded while open, not applied yet (0 once closed).
    pub refund_pending: i64,
    pub settle_seq: i64,
    pub recalled_at: Option<i64>,
}

/// A lease as read inside a transaction.
struct LeaseState {
    lease_id: String,
    account_id: String,
    request_id: String,
    granted: i64,
    used: i64,
    state: String,
    charged: i64,
    expires_at: i64,
    recalled: bool,
    settle_seq: i64,
}

const LEASE_COLUMNS: &str = "lease_id, account_id, request_id, granted, used, state, charged, \
     expires_at, recalled_at IS NOT NULL, settle_seq";

fn lease_state(r: &rusqlite::Row<'_>) -> rusqlite::Result<LeaseState> {
    Ok(LeaseState {
        lease_id: r.get(0)?,
        account_id: r.get(1)?,
        request_id: r.get(2)?,
        granted: r.get(3)?,
        used: r.get(4)?,
        state: r.get(5)?,
        charged: r.get(6)?,
        expires_at: r.get(7)?,
        recalled: r.get(8)?,
        settle_seq: r.get(9)?,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRow {
    pub request_id: String,
    pub cost: i64,
    pub route: String,
    pub method: String,
    pub path: String,
    pub status: String,
    pub refund_status: Option<i64>,
    pub at: i64,
}

pub struct Store {
    conn: Mutex<Connection>,
    leases: LeaseSettings,
}

/// The demo accounts created by `--seed-demo`: (account, key, balance, disabled).
pub const DEMO_ACCOUNTS: &[(&str, &str, i64, bool)] = &[
    ("acct_alice", "demo-key-alice", 100, false),
    ("acct_bob", "demo-key-bob", 3, false),
    ("acct_carol", "demo-key-carol", 50, true),
];

impl Store {
    /// Opens (creating if needed) the database at `path` in WAL mode.
    /// Returns the store and the journal mode SQLite settled on.
    pub fn open(path: &str, sync: SyncMode) -> Result<(Store, String)> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        conn.pragma_update(None, "synchronous", sync.as_pragma())?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(SCHEMA)?;
        migrate_leases(&conn)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok((
            Store {
                conn: Mutex::new(conn),
                leases: LeaseSettings::default(),
            },
            mode,
        ))
    }

    /// Sets the lease behaviour (TTL, cap, expiry policy).
    pub fn with_lease_settings(mut self, settings: LeaseSettings) -> Store {
        self.leases = settings;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied
        // transaction behind (the transaction rolls back on drop), so a
        // poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn authorize(&self, input: &AuthorizeInput<'_>) -> Result<AuthorizeOutcome> {
        let key_hash = sha256_hex(input.credential.as_bytes());
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = lookup_key(&tx, &key_hash)?;
        let Some((account_id, balance, disabled)) = found else {
            return Ok(AuthorizeOutcome::UnknownCredential);
        };
        let existing: Option<String> = tx
            .prepare_cached("SELECT account_id FROM charges WHERE request_id = ?1")?
            .query_row(params![input.request_id], |r| r.get(0))
            .optional()?;
        if let Some(owner) = existing {
            if owner != account_id {
                return Ok(AuthorizeOutcome::Conflict { account_id });
            }
            return Ok(AuthorizeOutcome::Allowed {
                account_id,
                balance,
                replay: true,
            });
        }
        if disabled {
            return Ok(AuthorizeOutcome::Disabled { account_id });
        }
        if balance < input.cost {
            return Ok(AuthorizeOutcome::Denied {
                account_id,
                balance,
            });
        }
        if input.cost == 0 {
            // Free: allowed, nothing recorded.
            return Ok(AuthorizeOutcome::Allowed {
                account_id,
                balance,
                replay: false,
            });
        }
        let new_balance = balance - input.cost;
        set_balance(&tx, &account_id, new_balance)?;
        tx.prepare_cached(
            "INSERT INTO charges (request_id, account_id, cost, route, method, path, status, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'charged', ?7)",
        )?
        .execute(params![
            input.request_id,
            account_id,
            input.cost,
            input.route,
            input.method,
            input.path,
            now_ms()
        ])?;
        tx.commit()?;
        Ok(AuthorizeOutcome::Allowed {
            account_id,
            balance: new_balance,
            replay: false,
        })
    }

    pub fn refund(
        &self,
        request_id: &str,
        credential: &str,
        upstream_status: Option<u16>,
    ) -> Result<RefundOutcome> {
        let key_hash = sha256_hex(credential.as_bytes());
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let charge = charge_of(&tx, request_id)?;
        let Some((owner, cost, status)) = charge else {
            return Ok(RefundOutcome::UnknownRequest);
        };
        let Some((account_id, balance, _disabled)) = lookup_key(&tx, &key_hash)? else {
            return Ok(RefundOutcome::Conflict { account_id: None });
        };
        if account_id != owner {
            return Ok(RefundOutcome::Conflict {
                account_id: Some(account_id),
            });
        }
        if status != "charged" {
            return Ok(RefundOutcome::AlreadyRefunded {
                account_id,
                balance,
            });
        }
        let reserved = reserved_in(&tx, &account_id)?;
        let Some(new_balance) = balance
            .checked_add(cost)
            .filter(|b| b.checked_add(reserved).is_some())
        else {
            return Ok(RefundOutcome::Overflow { account_id });
        };
        set_balance(&tx, &account_id, new_balance)?;
        tx.prepare_cached(
            "UPDATE charges SET status = 'refunded', refund_status = ?1, refunded_at = ?2
             WHERE request_id = ?3",
        )?
        .execute(params![upstream_status, now_ms(), request_id])?;
        tx.commit()?;
        Ok(RefundOutcome::Refunded {
            account_id,
            balance: new_balance,
        })
    }

    /// Creates an account with one API key. `balance` must be >= 0.
    pub fn create_account(
        &self,
        account_id: &str,
        key: &str,
        balance: i64,
        disabled: bool,
    ) -> Result<CreateOutcome> {
        let key_hash = sha256_hex(key.as_bytes());
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let outcome = create_in(&tx, account_id, &key_hash, balance, disabled)?;
        if outcome == CreateOutcome::Created {
            tx.commit()?;
        }
        Ok(outcome)
    }

    /// Creates the demo accounts that do not exist yet; existing ones are
    /// left exactly as they are.
    pub fn seed_demo(&self) -> Result<usize> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut created = 0;
        for (account_id, key, balance, disabled) in DEMO_ACCOUNTS {
            let key_hash = sha256_hex(key.as_bytes());
            if create_in(&tx, account_id, &key_hash, *balance, *disabled)? == CreateOutcome::Created
            {
                created += 1;
            }
        }
        tx.commit()?;
        Ok(created)
    }

    /// Adds `amount` (> 0) to the balance. With a `topup_id`, a repeated
    /// top-up for the same account changes nothing.
    pub fn topup(
        &self,
        account_id: &str,
        amount: i64,
        topup_id: Option<&str>,
    ) -> Result<TopupOutcome> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let balance: Option<i64> = tx
            .prepare_cached("SELECT balance FROM accounts WHERE account_id = ?1")?
            .query_row(params![account_id], |r| r.get(0))
            .optional()?;
        let Some(balance) = balance else {
            return Ok(TopupOutcome::UnknownAccount);
        };
        if let Some(tid) = topup_id {
            let owner: Option<String> = tx
                .prepare_cached("SELECT account_id FROM topups WHERE topup_id = ?1")?
                .query_row(params![tid], |r| r.get(0))
                .optional()?;
            if let Some(owner) = owner {
                if owner != account_id {
                    return Ok(TopupOutcome::Conflict);
                }
                return Ok(TopupOutcome::Done {
                    balance,
                    replay: true,
                });
            }
        }
        // Keep balance + reserved within i64, so releasing a reservation
        // can never overflow.
        let reserved = reserved_in(&tx, account_id)?;
        let Some(new_balance) = balance
            .checked_add(amount)
            .filter(|b| b.checked_add(reserved).is_some())
        else {
            return Ok(TopupOutcome::Overflow);
        };
        set_balance(&tx, account_id, new_balance)?;
        tx.prepare_cached(
            "INSERT INTO topups (topup_id, account_id, amount, at) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![topup_id, account_id, amount, now_ms()])?;
        tx.commit()?;
        Ok(TopupOutcome::Done {
            balance: new_balance,
            replay: false,
        })
    }

    /// Returns false if the account does not exist.
    pub fn set_disabled(&self, account_id: &str, disabled: bool) -> Result<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx
            .prepare_cached("UPDATE accounts SET disabled = ?1 WHERE account_id = ?2")?
            .execute(params![disabled, account_id])?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// The account's totals. Expires the account's due leases first (so it
    /// takes a write transaction).
    pub fn account(&self, account_id: &str) -> Result<Option<AccountSummary>> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(i64, i64, bool)> = tx
            .prepare_cached(
                "SELECT balance, initial_balance, disabled FROM accounts WHERE account_id = ?1",
            )?
            .query_row(params![account_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((_, initial_balance, disabled)) = row else {
            return Ok(None);
        };
        expire_due_in(&tx, Some(account_id), now_ms(), self.leases.policy)?;
        let balance = balance_of(&tx, account_id)?;
        let (charged, refunded, charges): (i64, i64, i64) = tx
            .prepare_cached(
                "SELECT COALESCE(SUM(CASE WHEN status = 'charged' THEN cost END), 0),
                        COALESCE(SUM(CASE WHEN status = 'refunded' THEN cost END), 0),
                        COUNT(*)
                 FROM charges WHERE account_id = ?1",
            )?
            .query_row(params![account_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        let (reserved, lease_charged, lease_refunded, leases): (i64, i64, i64, i64) = tx
            .prepare_cached(
                "SELECT COALESCE(SUM(CASE WHEN state = 'open' THEN granted END), 0),
                        COALESCE(SUM(charged), 0),
                        COALESCE(SUM(refunded), 0),
                        COUNT(*)
                 FROM leases WHERE account_id = ?1",
            )?
            .query_row(params![account_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?;
        let topups: i64 = tx
            .prepare_cached("SELECT COALESCE(SUM(amount), 0) FROM topups WHERE account_id = ?1")?
            .query_row(params![account_id], |r| r.get(0))?;
        tx.commit()?;
        Ok(Some(AccountSummary {
            account_id: account_id.to_owned(),
            balance,
            initial_balance,
            topups,
            disabled,
            charged: charged.saturating_add(lease_charged),
            refunded: refunded.saturating_add(lease_refunded),
            charges,
            reserved,
            leases,
        }))
    }

    /// The account's charges, oldest first; `None` if the account does not exist.
    pub fn charges(&self, account_id: &str) -> Result<Option<Vec<ChargeRow>>> {
        let conn = self.lock();
        if !account_exists(&conn, account_id)? {
            return Ok(None);
        }
        let mut stmt = conn.prepare_cached(
            "SELECT request_id, cost, route, method, path, status, refund_status, at
             FROM charges WHERE account_id = ?1 ORDER BY at, rowid",
        )?;
        let rows = stmt.query_map(params![account_id], |r| {
            Ok(ChargeRow {
                request_id: r.get(0)?,
                cost: r.get(1)?,
                route: r.get(2)?,
                method: r.get(3)?,
                path: r.get(4)?,
                status: r.get(5)?,
                refund_status: r.get(6)?,
                at: r.get(7)?,
            })
        })?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row?);
        }
        Ok(Some(out))
    }

    // ------------------------------------------------------------ leases

    /// `POST /v1/leases`: reserves part of the balance.
    pub fn lease(&self, input: &LeaseInput<'_>) -> Result<LeaseOutcome> {
        let key_hash = sha256_hex(input.credential.as_bytes());
        let now = now_ms();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some((account_id, _, disabled)) = lookup_key(&tx, &key_hash)? else {
            return Ok(LeaseOutcome::UnknownCredential);
        };
        expire_due_in(&tx, Some(&account_id), now, self.leases.policy)?;
        let balance = balance_of(&tx, &account_id)?;
        let existing = tx
            .prepare_cached(&format!(
                "SELECT {LEASE_COLUMNS} FROM leases WHERE request_id = ?1"
            ))?
            .query_row(params![input.request_id], lease_state)
            .optional()?;
        let outcome = if let Some(l) = existing {
            if l.account_id != account_id {
                LeaseOutcome::Conflict { account_id }
            } else if l.state != "open" {
                LeaseOutcome::Closed {
                    account_id,
                    lease_id: l.lease_id,
                    state: l.state,
                }
            } else {
                LeaseOutcome::Granted {
                    lease_id: l.lease_id,
                    granted: l.granted,
                    expires_in_ms: l.expires_at.saturating_sub(now).max(0),
                    account_id,
                    balance,
                    replay: true,
                }
            }
        } else if disabled {
            LeaseOutcome::Disabled { account_id }
        } else if balance < input.min {
            let recall = recall_others(&tx, &account_id, input.holder, now)? > 0;
            LeaseOutcome::Denied {
                account_id,
                balance,
                recall,
            }
        } else {
            let others = other_holders(&tx, &account_id, input.holder)?;
            let granted = fair_share_grant(
                input.want,
                input.min,
                balance,
                self.leases.max_units,
                others,
            );
            let new_balance = balance - granted;
            let lease_id = new_lease_id(&tx)?;
            let expires_at = now.saturating_add(self.leases.ttl_ms);
            set_balance(&tx, &account_id, new_balance)?;
            tx.prepare_cached(
                "INSERT INTO leases (lease_id, account_id, holder, request_id, granted, used,
                                     state, charged, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, 'open', 0, ?6, ?7)",
            )?
            .execute(params![
                lease_id,
                account_id,
                input.holder,
                input.request_id,
                granted,
                now,
                expires_at
            ])?;
            LeaseOutcome::Granted {
                lease_id,
                granted,
                expires_in_ms: expires_at - now,
                account_id,
                balance: new_balance,
                replay: false,
            }
        };
        // Commit also when nothing was granted: due leases may have expired.
        tx.commit()?;
        Ok(outcome)
    }

    /// `POST /v1/leases/{lease_id}/settle`. `used` is the total spent so far;
    /// `seq` (>= 1) the holder's number of this settle, if it sent one.
    pub fn settle(
        &self,
        lease_id: &str,
        used: i64,
        is_final: bool,
        seq: Option<i64>,
    ) -> Result<SettleOutcome> {
        let now = now_ms();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(l) = lease_by_id(&tx, lease_id)? else {
            return Ok(SettleOutcome::UnknownLease);
        };
        let l = if expire_due_in(&tx, Some(&l.account_id), now, self.leases.policy)? > 0 {
            lease_by_id(&tx, lease_id)?.unwrap_or(l)
        } else {
            l
        };
        let same_report = used == l.used && is_final == (l.state == "settled");
        let rule = settle_seq_rule(l.settle_seq, seq, same_report);
        // The answer of a settle that is accepted (200) in state `state`.
        let done = |tx: &Connection, l: LeaseState, state: &str, used: i64, seq: i64| {
            let balance = balance_of(tx, &l.account_id)?;
            Ok::<_, StoreError>(SettleOutcome::Done(Settled {
                recall: state == "open" && l.recalled,
                lease_id: l.lease_id,
                account_id: l.account_id,
                request_id: l.request_id,
                state: state.to_owned(),
                used,
                granted: l.granted,
                balance,
                seq,
                stale: rule == SeqRule::Stale,
                replay: rule == SeqRule::Replay,
            }))
        };
        let new_seq = l.settle_seq.max(seq.unwrap_or(0));
        let outcome = match l.state.as_str() {
            // A late retry of an older settle: nothing changes, in any state.
            _ if rule == SeqRule::Stale => {
                let (state, used, seq) = (l.state.clone(), l.used, l.settle_seq);
                done(&tx, l, &state, used, seq)?
            }
            _ if used > l.granted => SettleOutcome::TooMuch {
                account_id: l.account_id,
                request_id: l.request_id,
                granted: l.granted,
            },
            "open" => {
                tx.prepare_cached(
                    "UPDATE leases SET used = ?1, settle_seq = ?2 WHERE lease_id = ?3",
                )?
                .execute(params![used, new_seq, lease_id])?;
                let state = if is_final {
                    close_lease(
                        &tx,
                        &l.lease_id,
                        &l.account_id,
                        l.granted,
                        used,
                        "settled",
                        now,
                    )?;
                    "settled"
                } else {
                    "open"
                };
                done(&tx, l, state, used, new_seq)?
            }
            "settled" if l.used == used => {
                tx.prepare_cached("UPDATE leases SET settle_seq = ?1 WHERE lease_id = ?2")?
                    .execute(params![new_seq, lease_id])?;
                done(&tx, l, "settled", used, new_seq)?
            }
            "settled" => SettleOutcome::AlreadySettled {
                account_id: l.account_id,
                request_id: l.request_id,
                used: l.used,
            },
            "expired" => SettleOutcome::Expired {
                account_id: l.account_id,
                request_id: l.request_id,
                charged: l.charged,
            },
            _ => SettleOutcome::Cancelled {
                account_id: l.account_id,
                request_id: l.request_id,
            },
        };
        // Commit whatever the outcome: due leases may have expired.
        tx.commit()?;
        Ok(outcome)
    }

    /// `POST /v1/leases/cancel`: releases an open lease that reported no use.
    pub fn cancel(&self, request_id: &str) -> Result<CancelOutcome> {
        let now = now_ms();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let query = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE request_id = ?1");
        let find = |tx: &Connection| -> Result<Option<LeaseState>> {
            Ok(tx
                .prepare_cached(&query)?
                .query_row(params![request_id], lease_state)
                .optional()?)
        };
        let Some(l) = find(&tx)? else {
            return Ok(CancelOutcome::UnknownLease);
        };
        let l = if expire_due_in(&tx, Some(&l.account_id), now, self.leases.policy)? > 0 {
            find(&tx)?.unwrap_or(l)
        } else {
            l
        };
        let outcome = match l.state.as_str() {
            "cancelled" => CancelOutcome::AlreadyCancelled {
                balance: balance_of(&tx, &l.account_id)?,
                lease_id: l.lease_id,
                account_id: l.account_id,
            },
            "open" if l.used == 0 && pending_refunds(&tx, &l.lease_id)? == 0 => {
                let balance = credit(&tx, &l.account_id, l.granted)?;
                tx.prepare_cached(
                    "UPDATE leases SET state = 'cancelled', charged = 0, closed_at = ?1
                     WHERE lease_id = ?2",
                )?
                .execute(params![now, l.lease_id])?;
                CancelOutcome::Cancelled {
                    lease_id: l.lease_id,
                    account_id: l.account_id,
                    balance,
                }
            }
            "open" => CancelOutcome::InUse {
                lease_id: l.lease_id,
                account_id: l.account_id,
                used: l.used,
            },
            _ => CancelOutcome::Closed {
                lease_id: l.lease_id,
                account_id: l.account_id,
                state: l.state,
            },
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// `POST /v1/leases/{lease_id}/refund`: gives back units a closed lease
    /// charged (at once), or records them against an open lease (applied
    /// when it closes). Idempotent by `request_id`.
    pub fn lease_refund(&self, input: &LeaseRefundInput<'_>) -> Result<LeaseRefundOutcome> {
        let now = now_ms();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let Some(l) = lease_by_id(&tx, input.lease_id)? else {
            return Ok(LeaseRefundOutcome::UnknownLease);
        };
        let l = if expire_due_in(&tx, Some(&l.account_id), now, self.leases.policy)? > 0 {
            lease_by_id(&tx, input.lease_id)?.unwrap_or(l)
        } else {
            l
        };
        let recorded: Option<(String, i64)> = tx
            .prepare_cached("SELECT lease_id, units FROM lease_refunds WHERE request_id = ?1")?
            .query_row(params![input.request_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let answer = |tx: &Connection, l: &LeaseState, charged: Option<i64>, replay: bool| {
            Ok::<_, StoreError>(LeaseRefundOutcome::Done(LeaseRefunded {
                lease_id: l.lease_id.clone(),
                account_id: l.account_id.clone(),
                units: input.units,
                balance: balance_of(tx, &l.account_id)?,
                charged,
                pending: charged.is_none(),
                replay,
            }))
        };
        let open_charge = |l: &LeaseState| (l.state != "open").then_some(l.charged);
        let outcome = match recorded {
            Some((lease, units)) if lease == l.lease_id && units == input.units => {
                answer(&tx, &l, open_charge(&l), true)?
            }
            Some(_) => LeaseRefundOutcome::Conflict {
                account_id: l.account_id,
            },
            None => match l.state.as_str() {
                "settled" | "expired" if input.units > l.charged => {
                    LeaseRefundOutcome::ExceedsCharge {
                        account_id: l.account_id,
                    }
                }
                "settled" | "expired" => {
                    let balance = balance_of(&tx, &l.account_id)?;
                    let reserved = reserved_in(&tx, &l.account_id)?;
                    let fits = balance
                        .checked_add(input.units)
                        .and_then(|b| b.checked_add(reserved))
                        .is_some();
                    if !fits {
                        return Ok(LeaseRefundOutcome::Overflow {
                            account_id: l.account_id,
                        });
                    }
                    credit(&tx, &l.account_id, input.units)?;
                    tx.prepare_cached(
                        "UPDATE leases SET charged = charged - ?1, refunded = refunded + ?1
                         WHERE lease_id = ?2",
                    )?
                    .execute(params![input.units, l.lease_id])?;
                    record_lease_refund(&tx, input, &l.account_id, now)?;
                    answer(&tx, &l, Some(l.charged - input.units), false)?
                }
                // A lease never charges more than it granted.
                "open"
                    if pending_refunds(&tx, &l.lease_id)?.saturating_add(input.units)
                        > l.granted =>
                {
                    LeaseRefundOutcome::ExceedsCharge {
                        account_id: l.account_id,
                    }
                }
                "open" => {
                    record_lease_refund(&tx, input, &l.account_id, now)?;
                    answer(&tx, &l, None, false)?
                }
                _ => LeaseRefundOutcome::Cancelled {
                    account_id: l.account_id,
                },
            },
        };
        // Commit whatever the outcome: due leases may have expired.
        tx.commit()?;
        Ok(outcome)
    }

    /// Expires every open lease whose time is up (the background sweep).
    /// Returns how many expired.
    pub fn expire_due(&self) -> Result<usize> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = expire_due_in(&tx, None, now_ms(), self.leases.policy)?;
        tx.commit()?;
        Ok(n)
    }

    /// The account's leases, oldest first (after expiring its due ones);
    /// `None` if the account does not exist.
    pub fn leases(&self, account_id: &str) -> Result<Option<Vec<LeaseRow>>> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if !account_exists(&tx, account_id)? {
            return Ok(None);
        }
        expire_due_in(&tx, Some(account_id), now_ms(), self.leases.policy)?;
        let mut out = Vec::new();
        {
            let mut stmt = tx.prepare_cached(
                "SELECT lease_id, holder, request_id, granted, used, state, charged,
                        created_at, expires_at, closed_at, refunded,
                        CASE WHEN state = 'open' THEN
                            (SELECT COALESCE(SUM(units), 0) FROM lease_refunds r
                             WHERE r.lease_id = leases.lease_id)
                        ELSE 0 END,
                        settle_seq, recalled_at
                 FROM leases WHERE account_id = ?1 ORDER BY created_at, rowid",
            )?;
            let rows = stmt.query_map(params![account_id], |r| {
                Ok(LeaseRow {
                    lease_id: r.get(0)?,
                    holder: r.get(1)?,
                    request_id: r.get(2)?,
                    granted: r.get(3)?,
                    used: r.get(4)?,
                    state: r.get(5)?,
                    charged: r.get(6)?,
                    created_at: r.get(7)?,
                    expires_at: r.get(8)?,
                    closed_at: r.get(9)?,
                    refunded: r.get(10)?,
                    refund_pending: r.get(11)?,
                    settle_seq: r.get(12)?,
                    recalled_at: r.get(13)?,
                })
            })?;
            for row in rows {
                out.push(row?);
            }
        }
        tx.commit()?;
        Ok(Some(out))
    }
}

fn balance_of(conn: &Connection, account_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT balance FROM accounts WHERE account_id = ?1")?
        .query_row(params![account_id], |r| r.get(0))?)
}

fn account_exists(conn: &Connection, account_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM accounts WHERE account_id = ?1")?
        .exists(params![account_id])?)
}

/// The charge recorded for `request_id`: (account, cost, status).
fn charge_of(conn: &Connection, request_id: &str) -> Result<Option<(String, i64, String)>> {
    Ok(conn
        .prepare_cached("SELECT account_id, cost, status FROM charges WHERE request_id = ?1")?
        .query_row(params![request_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?)
}

fn set_balance(conn: &Connection, account_id: &str, balance: i64) -> Result<()> {
    conn.prepare_cached("UPDATE accounts SET balance = ?1 WHERE account_id = ?2")?
        .execute(params![balance, account_id])?;
    Ok(())
}

/// Adds `amount` (>= 0) to the balance; returns the new balance.
fn credit(conn: &Connection, account_id: &str, amount: i64) -> Result<i64> {
    let balance = balance_of(conn, account_id)?;
    if amount == 0 {
        return Ok(balance);
    }
    let new_balance = balance
        .checked_add(amount)
        .ok_or_else(|| StoreError::Overflow(account_id.to_owned()))?;
    set_balance(conn, account_id, new_balance)?;
    Ok(new_balance)
}

/// Σ granted over the account's open leases.
fn reserved_in(conn: &Connection, account_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT COALESCE(SUM(granted), 0) FROM leases
             WHERE account_id = ?1 AND state = 'open'",
        )?
        .query_row(params![account_id], |r| r.get(0))?)
}

fn lease_by_id(conn: &Connection, lease_id: &str) -> Result<Option<LeaseState>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE lease_id = ?1"
        ))?
        .query_row(params![lease_id], lease_state)
        .optional()?)
}

/// A fresh `ls_<32 hex>` id not used by any lease.
fn new_lease_id(conn: &Connection) -> Result<String> {
    loop {
        let id = format!("ls_{}", random_hex(16));
        let taken = conn
            .prepare_cached("SELECT 1 FROM leases WHERE lease_id = ?1")?
            .exists(params![id])?;
        if !taken {
            return Ok(id);
        }
    }
}

/// Expires the open leases whose `expires_at <= now` (of one account, or of
/// all), applying the expiry policy. Returns how many expired.
fn expire_due_in(
    conn: &Connection,
    account: Option<&str>,
    now: i64,
    policy: ExpiryPolicy,
) -> Result<usize> {
    let map = |r: &rusqlite::Row<'_>| -> rusqlite::Result<(String, String, i64, i64)> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    };
    let mut due = Vec::new();
    match account {
        Some(account_id) => {
            let mut stmt = conn.prepare_cached(
                "SELECT lease_id, account_id, granted, used FROM leases
                 WHERE account_id = ?1 AND state = 'open' AND expires_at <= ?2
                 ORDER BY expires_at, rowid",
            )?;
            for row in stmt.query_map(params![account_id, now], map)? {
                due.push(row?);
            }
        }
        None => {
            let mut stmt = conn.prepare_cached(
                "SELECT lease_id, account_id, granted, used FROM leases
                 WHERE state = 'open' AND expires_at <= ?1
                 ORDER BY expires_at, rowid",
            )?;
            for row in stmt.query_map(params![now], map)? {
                due.push(row?);
            }
        }
    }
    for (lease_id, account_id, granted, used) in &due {
        let base = expiry_charge(policy, *granted, *used);
        close_lease(conn, lease_id, account_id, *granted, base, "expired", now)?;
    }
    Ok(due.len())
}

// ------------------------------------------------------------ lease money rules

/// The grant of a new lease (4.2 step 6): a fair share of what is available
/// among the holders with open leases on the account (`others`: how many
/// distinct other holders), capped by `want` and `max_units`, never below
/// `min`. The caller guarantees `1 <= min <= available`.
pub fn fair_share_grant(
    want: i64,
    min: i64,
    available: i64,
    max_units: Option<i64>,
    others: i64,
) -> i64 {
    let fair = available / others.saturating_add(1).max(1);
    let capped = want
        .min(available)
        .min(fair)
        .min(max_units.unwrap_or(i64::MAX));
    capped.max(min)
}

/// What an expiring lease is charged before refunds (4.4).
pub fn expiry_charge(policy: ExpiryPolicy, granted: i64, used: i64) -> i64 {
    match policy {
        ExpiryPolicy::Full => granted,
        ExpiryPolicy::Reported => used,
    }
}

/// A closing lease's `(charged, refunded)`: its `base` charge (the final
/// `used`, or the expiry charge) minus the refunds recorded while it was
/// open, never below 0.
pub fn close_charge(base: i64, pending: i64) -> (i64, i64) {
    let refunded = pending.clamp(0, base);
    (base - refunded, refunded)
}

/// How a settle's `seq` relates to the lease's stored `settle_seq` (4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqRule {
    /// Older than the stored one: answered, nothing changes.
    Stale,
    /// Equal, with the same `used` and `final`: a retry (processed as usual,
    /// which changes nothing).
    Replay,
    /// Newer, equal with another report, or absent: processed as usual.
    Process,
}

pub fn settle_seq_rule(stored: i64, seq: Option<i64>, same_report: bool) -> SeqRule {
    match seq {
        Some(n) if n < stored => SeqRule::Stale,
        Some(n) if n == stored && same_report => SeqRule::Replay,
        _ => SeqRule::Process,
    }
}

/// Closes an open lease as `state` ("settled" or "expired") with charge
/// `base` less its pending refunds; credits the rest of `granted` back.
fn close_lease(
    conn: &Connection,
    lease_id: &str,
    account_id: &str,
    granted: i64,
    base: i64,
    state: &str,
    now: i64,
) -> Result<()> {
    let (charged, refunded) = close_charge(base, pending_refunds(conn, lease_id)?);
    credit(conn, account_id, granted - charged)?;
    conn.prepare_cached(
        "UPDATE leases SET state = ?1, charged = ?2, refunded = ?3, closed_at = ?4
         WHERE lease_id = ?5",
    )?
    .execute(params![state, charged, refunded, now, lease_id])?;
    Ok(())
}

/// Σ units of the refunds recorded for a lease (while it is open: the
/// pending ones).
fn pending_refunds(conn: &Connection, lease_id: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(SUM(units), 0) FROM lease_refunds WHERE lease_id = ?1")?
        .query_row(params![lease_id], |r| r.get(0))?)
}

/// How many distinct holders other than `holder` have an open lease on the
/// account.
fn other_holders(conn: &Connection, account_id: &str, holder: &str) -> Result<i64> {
    Ok(conn
        .prepare_cached(
            "SELECT COUNT(DISTINCT holder) FROM leases
             WHERE account_id = ?1 AND state = 'open' AND holder <> ?2",
        )?
        .query_row(params![account_id, holder], |r| r.get(0))?)
}

/// Marks recalled (keeping the first mark's time) the open leases of the
/// account held by holders other than `holder` with unspent units (last
/// reported `used < granted`). Returns how many there are.
fn recall_others(conn: &Connection, account_id: &str, holder: &str, now: i64) -> Result<usize> {
    Ok(conn
        .prepare_cached(
            "UPDATE leases SET recalled_at = COALESCE(recalled_at, ?3)
             WHERE account_id = ?1 AND state = 'open' AND holder <> ?2 AND used < granted",
        )?
        .execute(params![account_id, holder, now])?)
}

fn record_lease_refund(
    conn: &Connection,
    input: &LeaseRefundInput<'_>,
    account_id: &str,
    now: i64,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO lease_refunds (request_id, lease_id, account_id, units, status, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        input.request_id,
        input.lease_id,
        account_id,
        input.units,
        input.status,
        now
    ])?;
    Ok(())
}

fn lookup_key(conn: &Connection, key_hash: &str) -> Result<Option<(String, i64, bool)>> {
    Ok(conn
        .prepare_cached(LOOKUP_KEY)?
        .query_row(params![key_hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?)
}

fn create_in(
    conn: &Connection,
    account_id: &str,
    key_hash: &str,
    balance: i64,
    disabled: bool,
) -> Result<CreateOutcome> {
    if account_exists(conn, account_id)? {
        return Ok(CreateOutcome::AccountExists);
    }
    let key_exists = conn
        .prepare_cached("SELECT 1 FROM keys WHERE key_hash = ?1")?
        .exists(params![key_hash])?;
    if key_exists {
        return Ok(CreateOutcome::KeyExists);
    }
    conn.prepare_cached(
        "INSERT INTO accounts (account_id, balance, initial_balance, disabled, created_at)
         VALUES (?1, ?2, ?2, ?3, ?4)",
    )?
    .execute(params![account_id, balance, disabled, now_ms()])?;
    conn.prepare_cached("INSERT INTO keys (key_hash, account_id) VALUES (?1, ?2)")?
        .execute(params![key_hash, account_id])?;
    Ok(CreateOutcome::Created)
}

// ------------------------------------------------------------ usage (metered responses)

/// Final costs set by `POST /v1/usage`, one row per settled request id.
/// Created on first use (so databases of earlier versions need no
/// migration). `estimate` is the cost authorize had debited, NULL for an
/// overage charge created by the usage call itself.
const USAGE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usages (
    request_id TEXT PRIMARY KEY NOT NULL REFERENCES charges(request_id),
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    estimate   INTEGER,
    actual     INTEGER NOT NULL,
    at         INTEGER NOT NULL
);
";

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
}

impl Store {
    /// `POST /v1/usage`: sets the final cost of `request_id` to `actual`
    /// (`0..=i64::MAX`), in one transaction. An authorize charge is adjusted
    /// once (the balance moves by `old cost - actual` and may go negative);
    /// without a charge, an overage charge of `actual` is created. A repeat
    /// with the same `actual` changes nothing.
    pub fn usage(&self, request_id: &str, credential: &str, actual: i64) -> Result<UsageOutcome> {
        let key_hash = sha256_hex(credential.as_bytes());
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(USAGE_SCHEMA)?;
        let Some((account_id, balance, _disabled)) = lookup_key(&tx, &key_hash)? else {
            return Ok(UsageOutcome::UnknownCredential);
        };
        let charge = charge_of(&tx, request_id)?;
        let estimate = match charge {
            Some((owner, _, _)) if owner != account_id => {
                return Ok(UsageOutcome::Conflict { account_id });
            }
            Some((_, _, status)) if status != "charged" => {
                return Ok(UsageOutcome::Refunded { account_id });
            }
            Some((_, cost, _)) => {
                let settled: Option<i64> = tx
                    .prepare_cached("SELECT actual FROM usages WHERE request_id = ?1")?
                    .query_row(params![request_id], |r| r.get(0))
                    .optional()?;
                match settled {
                    Some(done) if done == actual => {
                        return Ok(UsageOutcome::Settled {
                            account_id,
                            balance,
                            replay: true,
                        });
                    }
                    Some(done) => {
                        return Ok(UsageOutcome::Final {
                            account_id,
                            cost: done,
                        });
                    }
                    None => Some(cost),
                }
            }
            None => None,
        };
        // Both amounts are in 0..=i64::MAX, so the difference fits.
        let delta = estimate.unwrap_or(0) - actual;
        let reserved = reserved_in(&tx, &account_id)?;
        let Some(new_balance) = balance
            .checked_add(delta)
            .filter(|b| delta <= 0 || b.checked_add(reserved).is_some())
        else {
            return Ok(UsageOutcome::Overflow { account_id });
        };
        let now = now_ms();
        set_balance(&tx, &account_id, new_balance)?;
        if estimate.is_some() {
            tx.prepare_cached("UPDATE charges SET cost = ?1 WHERE request_id = ?2")?
                .execute(params![actual, request_id])?;
        } else {
            tx.prepare_cached(
                "INSERT INTO charges (request_id, account_id, cost, route, method, path, status, at)
                 VALUES (?1, ?2, ?3, ?4, '-', '-', 'charged', ?5)",
            )?
            .execute(params![request_id, account_id, actual, USAGE_ROUTE, now])?;
        }
        tx.prepare_cached(
            "INSERT INTO usages (request_id, account_id, estimate, actual, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?
        .execute(params![request_id, account_id, estimate, actual, now])?;
        tx.commit()?;
        Ok(UsageOutcome::Settled {
            account_id,
            balance: new_balance,
            replay: false,
        })
    }

    /// Records a request paid by a verified (demo) payment as a charge of
    /// [`DEMO_PAYER`] (created on the fly, balance 0): the payment is
    /// credited as a top-up and the charge debits it in the same
    /// transaction, so the ledger stays balanced. `cost` 0 records nothing.
    pub fn pay_demo(
        &self,
        request_id: &str,
        cost: i64,
        route: &str,
        method: &str,
        path: &str,
    ) -> Result<PaidOutcome> {
        let now = now_ms();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached(
            "INSERT OR IGNORE INTO accounts (account_id, balance, initial_balance, disabled, created_at)
             VALUES (?1, 0, 0, 0, ?2)",
        )?
        .execute(params![DEMO_PAYER, now])?;
        let owner: Option<String> = tx
            .prepare_cached("SELECT account_id FROM charges WHERE request_id = ?1")?
            .query_row(params![request_id], |r| r.get(0))
            .optional()?;
        let replay = match owner {
            Some(owner) if owner != DEMO_PAYER => {
                return Ok(PaidOutcome::Conflict { account_id: owner });
            }
            Some(_) => true,
            None => false,
        };
        if !replay && cost > 0 {
            tx.prepare_cached(
                "INSERT INTO topups (topup_id, account_id, amount, at) VALUES (NULL, ?1, ?2, ?3)",
            )?
            .execute(params![DEMO_PAYER, cost, now])?;
            tx.prepare_cached(
                "INSERT INTO charges (request_id, account_id, cost, route, method, path, status, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'charged', ?7)",
            )?
            .execute(params![request_id, DEMO_PAYER, cost, route, method, path, now])?;
        }
        let balance = balance_of(&tx, DEMO_PAYER)?;
        tx.commit()?;
        Ok(PaidOutcome::Paid {
            account_id: DEMO_PAYER.to_owned(),
            balance,
            replay,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::open(":memory:", SyncMode::Normal).unwrap().0
    }

    fn authz<'a>(cred: &'a str, cost: i64, rid: &'a str) -> AuthorizeInput<'a> {
        AuthorizeInput {
            credential: cred,
            cost,
            route: "r",
            method: "GET",
            path: "/p",
            request_id: rid,
        }
    }

    #[test]
    fn seed_is_idempotent() {
        let s = store();
        assert_eq!(s.seed_demo().unwrap(), 3);
        s.authorize(&authz("demo-key-alice", 10, "a")).unwrap();
        assert_eq!(s.seed_demo().unwrap(), 0);
        assert_eq!(s.account("acct_alice").unwrap().unwrap().balance, 90);
        assert!(s.account("acct_carol").unwrap().unwrap().disabled);
    }

    #[test]
    fn authorize_paths() {
        let s = store();
        s.seed_demo().unwrap();
        assert_eq!(
            s.authorize(&authz("nope", 1, "x")).unwrap(),
            AuthorizeOutcome::UnknownCredential
        );
        assert_eq!(
            s.authorize(&authz("demo-key-carol", 1, "x")).unwrap(),
            AuthorizeOutcome::Disabled {
                account_id: "acct_carol".into()
            }
        );
        assert_eq!(
            s.authorize(&authz("demo-key-bob", 4, "b1")).unwrap(),
            AuthorizeOutcome::Denied {
                account_id: "acct_bob".into(),
                balance: 3
            }
        );
        assert_eq!(
            s.authorize(&authz("demo-key-bob", 3, "b1")).unwrap(),
            AuthorizeOutcome::Allowed {
                account_id: "acct_bob".into(),
                balance: 0,
                replay: false
            }
        );
        assert_eq!(
            s.authorize(&authz("demo-key-bob", 3, "b1")).unwrap(),
            AuthorizeOutcome::Allowed {
                account_id: "acct_bob".into(),
                balance: 0,
                replay: true
            }
        );
        assert_eq!(
            s.authorize(&authz("demo-key-alice", 1, "b1")).unwrap(),
            AuthorizeOutcome::Conflict {
                account_id: "acct_alice".into()
            }
        );
        // Free requests leave no record.
        s.authorize(&authz("demo-key-bob", 0, "free")).unwrap();
        let bob = s.account("acct_bob").unwrap().unwrap();
        assert_eq!((bob.balance, bob.charged, bob.charges), (0, 3, 1));
    }

    #[test]
    fn refund_paths() {
        let s = store();
        s.seed_demo().unwrap();
        s.authorize(&authz("demo-key-alice", 7, "r1")).unwrap();
        assert_eq!(
            s.refund("nope", "demo-key-alice", Some(503)).unwrap(),
            RefundOutcome::UnknownRequest
        );
        assert_eq!(
            s.refund("r1", "demo-key-bob", Some(503)).unwrap(),
            RefundOutcome::Conflict {
                account_id: Some("acct_bob".into())
            }
        );
        assert_eq!(
            s.refund("r1", "demo-key-alice", Some(503)).unwrap(),
            RefundOutcome::Refunded {
                account_id: "acct_alice".into(),
                balance: 100
            }
        );
        assert_eq!(
            s.refund("r1", "demo-key-alice", Some(503)).unwrap(),
            RefundOutcome::AlreadyRefunded {
                account_id: "acct_alice".into(),
                balance: 100
            }
        );
        let rows = s.charges("acct_alice").unwrap().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].status, "refunded");
        assert_eq!(rows[0].refund_status, Some(503));
    }

    #[test]
    fn topup_and_overflow() {
        let s = store();
        assert_eq!(
            s.create_account("a", "k", i64::MAX - 1, false).unwrap(),
            CreateOutcome::Created
        );
        assert_eq!(
            s.create_account("a", "k2", 0, false).unwrap(),
            CreateOutcome::AccountExists
        );
        assert_eq!(
            s.create_account("b", "k", 0, false).unwrap(),
            CreateOutcome::KeyExists
        );
        assert_eq!(s.topup("a", 2, None).unwrap(), TopupOutcome::Overflow);
        assert_eq!(
            s.topup("a", 1, Some("t1")).unwrap(),
            TopupOutcome::Done {
                balance: i64::MAX,
                replay: false
            }
        );
        assert_eq!(
            s.topup("a", 1, Some("t1")).unwrap(),
            TopupOutcome::Done {
                balance: i64::MAX,
                replay: true
            }
        );
        s.create_account("b", "kb", 0, false).unwrap();
        assert_eq!(s.topup("b", 1, Some("t1")).unwrap(), TopupOutcome::Conflict);
        assert_eq!(
            s.topup("zz", 1, None).unwrap(),
            TopupOutcome::UnknownAccount
        );
        assert!(s.set_disabled("b", true).unwrap());
        assert!(!s.set_disabled("zz", true).unwrap());
    }

    fn lease_store(ttl_ms: i64, policy: ExpiryPolicy) -> Store {
        let s = store().with_lease_settings(LeaseSettings {
            ttl_ms,
            max_units: None,
            policy,
        });
        s.seed_demo().unwrap();
        s
    }

    fn lease_in<'a>(cred: &'a str, want: i64, min: i64, rid: &'a str) -> LeaseInput<'a> {
        LeaseInput {
            credential: cred,
            want,
            min,
            request_id: rid,
            holder: "envoy-1",
        }
    }

    fn granted(o: LeaseOutcome) -> (String, i64, i64) {
        match o {
            LeaseOutcome::Granted {
                lease_id,
                granted,
                balance,
                ..
            } => (lease_id, granted, balance),
            other => panic!("not granted: {other:?}"),
        }
    }

    fn invariant(s: &Store, account: &str) {
        let a = s.account(account).unwrap().unwrap();
        assert_eq!(
            a.initial_balance + a.topups,
            a.balance + a.reserved + a.charged,
            "{a:?}"
        );
    }

    #[test]
    fn lease_grant_settle_cancel() {
        let s = lease_store(60_000, ExpiryPolicy::Full);
        let (id, g, bal) = granted(s.lease(&lease_in("demo-key-alice", 30, 5, "l1")).unwrap());
        assert!(id.starts_with("ls_") && id.len() == 35, "{id}");
        assert_eq!((g, bal), (30, 70));
        // Replay: same lease, nothing reserved again.
        match s.lease(&lease_in("demo-key-alice", 99, 1, "l1")).unwrap() {
            LeaseOutcome::Granted {
                lease_id,
                granted,
                balance,
                replay,
                ..
            } => assert_eq!(
                (lease_id, granted, balance, replay),
                (id.clone(), 30, 70, true)
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.lease(&lease_in("demo-key-bob", 1, 1, "l1")).unwrap(),
            LeaseOutcome::Conflict { .. }
        ));
        // Partial grant, then a denial below min.
        let (_, g, bal) = granted(s.lease(&lease_in("demo-key-bob", 10, 2, "b1")).unwrap());
        assert_eq!((g, bal), (3, 0));
        assert_eq!(
            s.lease(&lease_in("demo-key-bob", 10, 1, "b2")).unwrap(),
            LeaseOutcome::Denied {
                account_id: "acct_bob".into(),
                balance: 0,
                // Its only open lease is the same holder's: nothing to recall.
                recall: false,
            }
        );
        assert!(matches!(
            s.lease(&lease_in("demo-key-carol", 1, 1, "c1")).unwrap(),
            LeaseOutcome::Disabled { .. }
        ));
        assert_eq!(
            s.lease(&lease_in("nope", 1, 1, "n1")).unwrap(),
            LeaseOutcome::UnknownCredential
        );

        // Settle: non-final, down again, then final.
        let done = |o: SettleOutcome| match o {
            SettleOutcome::Done(d) => (d.state, d.used, d.balance),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            done(s.settle(&id, 12, false, None).unwrap()),
            ("open".into(), 12, 70)
        );
        assert_eq!(
            done(s.settle(&id, 10, false, None).unwrap()),
            ("open".into(), 10, 70)
        );
        assert!(matches!(
            s.settle(&id, 31, true, None).unwrap(),
            SettleOutcome::TooMuch { granted: 30, .. }
        ));
        invariant(&s, "acct_alice");
        assert_eq!(s.account("acct_alice").unwrap().unwrap().reserved, 30);
        assert_eq!(
            done(s.settle(&id, 10, true, None).unwrap()),
            ("settled".into(), 10, 90)
        );
        assert_eq!(
            done(s.settle(&id, 10, false, None).unwrap()),
            ("settled".into(), 10, 90)
        );
        assert!(matches!(
            s.settle(&id, 11, true, None).unwrap(),
            SettleOutcome::AlreadySettled { used: 10, .. }
        ));
        assert_eq!(
            s.settle("ls_nope", 1, true, None).unwrap(),
            SettleOutcome::UnknownLease
        );
        let a = s.account("acct_alice").unwrap().unwrap();
        assert_eq!((a.balance, a.reserved, a.charged, a.leases), (90, 0, 10, 1));
        assert!(matches!(
            s.lease(&lease_in("demo-key-alice", 1, 1, "l1")).unwrap(),
            LeaseOutcome::Closed { .. }
        ));

        // Cancel.
        let (id2, _, bal) = granted(s.lease(&lease_in("demo-key-alice", 5, 5, "l2")).unwrap());
        assert_eq!(bal, 85);
        assert!(matches!(
            s.cancel("l2").unwrap(),
            CancelOutcome::Cancelled { balance: 90, .. }
        ));
        assert!(matches!(
            s.cancel("l2").unwrap(),
            CancelOutcome::AlreadyCancelled { balance: 90, .. }
        ));
        assert!(matches!(
            s.settle(&id2, 0, true, None).unwrap(),
            SettleOutcome::Cancelled { .. }
        ));
        assert_eq!(s.cancel("zz").unwrap(), CancelOutcome::UnknownLease);
        granted(s.lease(&lease_in("demo-key-alice", 5, 5, "l3")).unwrap());
        let l3 = s.leases("acct_alice").unwrap().unwrap();
        let l3 = &l3[2].lease_id;
        s.settle(l3, 1, false, None).unwrap();
        assert!(matches!(
            s.cancel("l3").unwrap(),
            CancelOutcome::InUse { used: 1, .. }
        ));
        assert!(matches!(
            s.cancel("l1").unwrap(),
            CancelOutcome::Closed { .. }
        ));
        invariant(&s, "acct_alice");
    }

    #[test]
    fn lease_cap_and_minimum() {
        let s = store().with_lease_settings(LeaseSettings {
            ttl_ms: 60_000,
            max_units: Some(4),
            policy: ExpiryPolicy::Full,
        });
        s.seed_demo().unwrap();
        let (_, g, _) = granted(s.lease(&lease_in("demo-key-alice", 50, 2, "a")).unwrap());
        assert_eq!(g, 4);
        // The cap never goes below the caller's minimum.
        let (_, g, bal) = granted(s.lease(&lease_in("demo-key-alice", 50, 9, "b")).unwrap());
        assert_eq!((g, bal), (9, 87));
    }

    #[test]
    fn lease_expiry_policies() {
        for (policy, charged) in [(ExpiryPolicy::Full, 20), (ExpiryPolicy::Reported, 0)] {
            // TTL 0: due as soon as the lease call returns; the settle finds
            // it expired on access (nothing was reported).
            let s = lease_store(0, policy);
            let (id, _, _) = granted(s.lease(&lease_in("demo-key-alice", 20, 1, "e")).unwrap());
            assert_eq!(
                s.settle(&id, 7, true, None).unwrap(),
                SettleOutcome::Expired {
                    account_id: "acct_alice".into(),
                    request_id: "e".into(),
                    charged,
                }
            );
            invariant(&s, "acct_alice");
        }
        for (policy, charged, balance) in [
            (ExpiryPolicy::Full, 20, 80),
            (ExpiryPolicy::Reported, 7, 93),
        ] {
            let s = lease_store(60_000, policy);
            let (id, _, _) = granted(s.lease(&lease_in("demo-key-alice", 20, 1, "e")).unwrap());
            s.settle(&id, 7, false, None).unwrap();
            // Move the deadline into the past, then sweep.
            s.lock()
                .execute("UPDATE leases SET expires_at = 0", [])
                .unwrap();
            assert_eq!(s.expire_due().unwrap(), 1);
            assert_eq!(s.expire_due().unwrap(), 0);
            let a = s.account("acct_alice").unwrap().unwrap();
            assert_eq!((a.balance, a.reserved, a.charged), (balance, 0, charged));
            assert_eq!(
                s.settle(&id, 7, true, None).unwrap(),
                SettleOutcome::Expired {
                    account_id: "acct_alice".into(),
                    request_id: "e".into(),
                    charged,
                }
            );
            assert!(matches!(
                s.cancel("e").unwrap(),
                CancelOutcome::Closed { .. }
            ));
            invariant(&s, "acct_alice");
        }
    }

    #[test]
    fn reserved_units_count_against_overflow() {
        let s = store();
        s.create_account("a", "k", i64::MAX - 10, false).unwrap();
        granted(s.lease(&lease_in("k", 10, 10, "r")).unwrap());
        // balance + reserved must stay within i64.
        assert_eq!(s.topup("a", 11, None).unwrap(), TopupOutcome::Overflow);
        assert_eq!(
            s.topup("a", 10, None).unwrap(),
            TopupOutcome::Done {
                balance: i64::MAX - 10,
                replay: false
            }
        );
        assert!(matches!(
            s.cancel("r").unwrap(),
            CancelOutcome::Cancelled { .. }
        ));
        assert_eq!(s.account("a").unwrap().unwrap().balance, i64::MAX);
    }

    #[test]
    fn fair_share_sizing() {
        // (want, min, available, cap, others) -> granted
        for (args, want) in [
            ((100, 1, 100, None, 0), 100),
            ((100, 1, 100, None, 1), 50),
            ((100, 1, 99, None, 3), 24),
            ((10, 1, 100, None, 1), 10),
            ((100, 1, 100, Some(8), 1), 8),
            ((100, 5, 6, None, 3), 5),
            ((100, 1, 1, None, 9), 1),
        ] {
            let (w, m, a, c, o) = args;
            assert_eq!(fair_share_grant(w, m, a, c, o), want, "{args:?}");
        }
    }

    #[test]
    fn close_charge_and_seq_rules() {
        assert_eq!(close_charge(10, 0), (10, 0));
        assert_eq!(close_charge(10, 3), (7, 3));
        assert_eq!(close_charge(10, 12), (0, 10));
        assert_eq!(expiry_charge(ExpiryPolicy::Full, 9, 4), 9);
        assert_eq!(expiry_charge(ExpiryPolicy::Reported, 9, 4), 4);
        assert_eq!(settle_seq_rule(3, Some(2), true), SeqRule::Stale);
        assert_eq!(settle_seq_rule(3, Some(2), false), SeqRule::Stale);
        assert_eq!(settle_seq_rule(3, Some(3), true), SeqRule::Replay);
        assert_eq!(settle_seq_rule(3, Some(3), false), SeqRule::Process);
        assert_eq!(settle_seq_rule(3, Some(4), true), SeqRule::Process);
        assert_eq!(settle_seq_rule(3, None, true), SeqRule::Process);
    }

    #[test]
    fn version_2_database_gains_the_new_columns() {
        let path = std::env::temp_dir().join(format!(
            "farebox-store-v2-{}-{}.sqlite",
            std::process::id(),
            random_hex(4)
        ));
        let path = path.to_str().unwrap().to_owned();
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "CREATE TABLE leases (
                    lease_id TEXT PRIMARY KEY NOT NULL, account_id TEXT NOT NULL,
                    holder TEXT NOT NULL, request_id TEXT NOT NULL UNIQUE,
                    granted INTEGER NOT NULL CHECK (granted > 0),
                    used INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL,
                    charged INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL,
                    expires_at INTEGER NOT NULL, closed_at INTEGER);
                 INSERT INTO leases VALUES ('ls_old', 'acct_alice', 'h', 'old', 5, 2,
                    'settled', 2, 1, 2, 2);
                 PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        let s = Store::open(&path, SyncMode::Normal).unwrap().0;
        s.seed_demo().unwrap();
        let rows = s.leases("acct_alice").unwrap().unwrap();
        assert_eq!(
            (rows[0].refunded, rows[0].settle_seq, rows[0].recalled_at),
            (0, 0, None)
        );
        // The new call works on the old row.
        let out = s
            .lease_refund(&LeaseRefundInput {
                lease_id: "ls_old",
                request_id: "rf-old",
                units: 2,
                status: Some(503),
            })
            .unwrap();
        assert!(matches!(out, LeaseRefundOutcome::Done(_)), "{out:?}");
        assert_eq!(s.leases("acct_alice").unwrap().unwrap()[0].charged, 0);
        drop(s);
        // Opening again is a no-op.
        Store::open(&path, SyncMode::Normal).unwrap();
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{path}{suffix}"));
        }
    }
}
