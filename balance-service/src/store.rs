//! The ledger: accounts, hashed API keys, charges and top-ups in SQLite.
//!
//! One connection behind a mutex. Every state change runs in a single
//! `BEGIN IMMEDIATE` transaction, so checks and writes are atomic even if
//! another process opens the same database file.

use crate::config::SyncMode;
use crate::util::{now_ms, sha256_hex};
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
PRAGMA user_version = 1;
";

const LOOKUP_KEY: &str = "SELECT a.account_id, a.balance, a.disabled
     FROM keys k JOIN accounts a ON a.account_id = k.account_id
     WHERE k.key_hash = ?1";

#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "sqlite: {e}"),
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
    pub charged: i64,
    pub refunded: i64,
    pub charges: i64,
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
        conn.set_prepared_statement_cache_capacity(64);
        Ok((
            Store {
                conn: Mutex::new(conn),
            },
            mode,
        ))
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
        tx.prepare_cached("UPDATE accounts SET balance = ?1 WHERE account_id = ?2")?
            .execute(params![new_balance, account_id])?;
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
        let charge: Option<(String, i64, String)> = tx
            .prepare_cached("SELECT account_id, cost, status FROM charges WHERE request_id = ?1")?
            .query_row(params![request_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
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
        let Some(new_balance) = balance.checked_add(cost) else {
            return Ok(RefundOutcome::Overflow { account_id });
        };
        tx.prepare_cached("UPDATE accounts SET balance = ?1 WHERE account_id = ?2")?
            .execute(params![new_balance, account_id])?;
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
        let Some(new_balance) = balance.checked_add(amount) else {
            return Ok(TopupOutcome::Overflow);
        };
        tx.prepare_cached("UPDATE accounts SET balance = ?1 WHERE account_id = ?2")?
            .execute(params![new_balance, account_id])?;
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

    pub fn account(&self, account_id: &str) -> Result<Option<AccountSummary>> {
        let conn = self.lock();
        let row: Option<(i64, i64, bool)> = conn
            .prepare_cached(
                "SELECT balance, initial_balance, disabled FROM accounts WHERE account_id = ?1",
            )?
            .query_row(params![account_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((balance, initial_balance, disabled)) = row else {
            return Ok(None);
        };
        let (charged, refunded, charges): (i64, i64, i64) = conn
            .prepare_cached(
                "SELECT COALESCE(SUM(CASE WHEN status = 'charged' THEN cost END), 0),
                        COALESCE(SUM(CASE WHEN status = 'refunded' THEN cost END), 0),
                        COUNT(*)
                 FROM charges WHERE account_id = ?1",
            )?
            .query_row(params![account_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        let topups: i64 = conn
            .prepare_cached("SELECT COALESCE(SUM(amount), 0) FROM topups WHERE account_id = ?1")?
            .query_row(params![account_id], |r| r.get(0))?;
        Ok(Some(AccountSummary {
            account_id: account_id.to_owned(),
            balance,
            initial_balance,
            topups,
            disabled,
            charged,
            refunded,
            charges,
        }))
    }

    /// The account's charges, oldest first; `None` if the account does not exist.
    pub fn charges(&self, account_id: &str) -> Result<Option<Vec<ChargeRow>>> {
        let conn = self.lock();
        let exists: Option<i64> = conn
            .prepare_cached("SELECT 1 FROM accounts WHERE account_id = ?1")?
            .query_row(params![account_id], |r| r.get(0))
            .optional()?;
        if exists.is_none() {
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
    let account_exists = conn
        .prepare_cached("SELECT 1 FROM accounts WHERE account_id = ?1")?
        .exists(params![account_id])?;
    if account_exists {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
}
