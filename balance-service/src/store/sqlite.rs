//! The SQLite backend: one connection in WAL mode behind a mutex, prepared
//! statements cached, every call one `BEGIN IMMEDIATE` transaction (so it is
//! also correct when another process writes the same file). Calls run on
//! tokio's blocking pool.

use super::migrations::{self, Migration};
use super::rows::{
    self, Columns, ACCOUNT_COLUMNS, CHARGE_COLUMNS, CHARGE_REC_COLUMNS, EVENT_COLUMNS, EXPORT,
    LEASE_COLUMNS, TOTALS, USAGE_ITEM_COLUMNS,
};
use super::{
    AccountRow, BudgetSpec, ChargeRec, ChargeRefund, ChargeRow, EventRow, ExportQuery, ExportRow,
    LeaseRow, NewAccount, NewCharge, NewEvent, NewLeaseRefund, NewTopup, NewUsage, Result,
    StoreError, Totals, Tx, UsageItemRow,
};
use crate::config::SyncMode;
use rusqlite::types::FromSql;
use rusqlite::{params, Connection, Params, TransactionBehavior};
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

pub struct Db {
    conn: Arc<Mutex<Connection>>,
    journal_mode: String,
}

/// Opens the file and applies the pragmas of the service.
fn connect(path: &str, sync: SyncMode) -> Result<(Connection, String)> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    conn.pragma_update(None, "synchronous", sync.as_pragma())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok((conn, mode))
}

/// The schema version of the database (0: never migrated).
fn version(conn: &Connection) -> Result<i64> {
    let has_table: bool = conn
        .prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?
        .exists(params![migrations::TABLE])?;
    if !has_table {
        return Ok(0);
    }
    Ok(conn.query_row(
        &format!(
            "SELECT COALESCE(MAX(version), 0) FROM {}",
            migrations::TABLE
        ),
        [],
        |r| r.get(0),
    )?)
}

/// Applies the pending migrations, each in its own transaction. Returns
/// (version before, version after).
fn migrate(conn: &mut Connection, apply: bool) -> Result<(i64, i64)> {
    let before = version(conn)?;
    migrations::check_known(before)?;
    if !apply {
        return Ok((before, before));
    }
    let mut after = before;
    for m in migrations::pending(migrations::SQLITE, before) {
        apply_one(conn, m).map_err(|e| {
            StoreError::Schema(format!("migration {} ({}) failed: {e}", m.version, m.name))
        })?;
        after = m.version;
    }
    Ok((before, after))
}

fn apply_one(conn: &mut Connection, m: &Migration) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {} (
             version    INTEGER PRIMARY KEY NOT NULL,
             name       TEXT NOT NULL,
             applied_at INTEGER NOT NULL
         );",
        migrations::TABLE
    ))?;
    // Another process may have applied it meanwhile (we hold the write lock now).
    if version(&tx)? >= m.version {
        return Ok(());
    }
    tx.execute_batch(m.sql)?;
    tx.execute(
        &format!(
            "INSERT INTO {} (version, name, applied_at) VALUES (?1, ?2, ?3)",
            migrations::TABLE
        ),
        params![m.version, m.name, crate::util::now_ms()],
    )?;
    tx.pragma_update(None, "user_version", m.version)?;
    tx.commit()?;
    Ok(())
}

/// `farebox-balance migrate` on a SQLite file.
pub fn migrate_path(path: &str) -> Result<(i64, i64)> {
    let (mut conn, _) = connect(path, SyncMode::Full)?;
    migrate(&mut conn, true)
}

impl Db {
    /// Opens (creating if needed) the database at `path`, migrating it when
    /// `apply` (else only checking that its schema is current).
    pub fn open(path: &str, sync: SyncMode, apply: bool) -> Result<Db> {
        let (mut conn, journal_mode) = connect(path, sync)?;
        let (_, now) = migrate(&mut conn, apply)?;
        if now != migrations::LATEST {
            return Err(StoreError::Schema(format!(
                "database schema version {now}, this farebox-balance needs version {}: \
                 run farebox-balance migrate",
                migrations::LATEST
            )));
        }
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
            journal_mode,
        })
    }

    pub fn warning(&self) -> Option<String> {
        (!self.journal_mode.eq_ignore_ascii_case("wal")).then(|| {
            format!(
                "journal mode is {:?}, not WAL (in-memory database?)",
                self.journal_mode
            )
        })
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction on the blocking pool;
    /// commits when it returns `Ok`.
    pub async fn run<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut SqliteTx<'_>) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock cannot leave a half-applied
            // transaction behind (it rolls back on drop), so a poisoned lock
            // is safe to reuse.
            let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut t = SqliteTx { tx };
            let out = f(&mut t)?;
            t.tx.commit()?;
            Ok(out)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("sqlite worker failed: {e}")))?
    }
}

/// Drives a transaction script to completion. SQLite calls never wait, so
/// the script's future is ready at its first poll.
pub fn ready<R>(fut: impl Future<Output = Result<R>>) -> Result<R> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r,
        Poll::Pending => Err(StoreError::Corrupt(
            "a SQLite transaction script waited".to_owned(),
        )),
    }
}

pub struct SqliteTx<'c> {
    tx: rusqlite::Transaction<'c>,
}

impl Columns for rusqlite::Row<'_> {
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.get(i)?)
    }
}

/// Reads one result row into a value.
type RowFn<T> = fn(&rusqlite::Row<'_>) -> Result<T>;

impl SqliteTx<'_> {
    /// Runs `sql`; returns how many rows it changed.
    fn exec(&self, sql: &str, p: impl Params) -> Result<usize> {
        Ok(self.tx.prepare_cached(sql)?.execute(p)?)
    }

    /// The one row `sql` returns.
    fn one<T>(&self, sql: &str, p: impl Params, f: RowFn<T>) -> Result<T> {
        self.opt(sql, p, f)?
            .ok_or(StoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows))
    }

    /// The one row `sql` returns, if there is one.
    fn opt<T>(&self, sql: &str, p: impl Params, f: RowFn<T>) -> Result<Option<T>> {
        let mut stmt = self.tx.prepare_cached(sql)?;
        let mut rows = stmt.query(p)?;
        rows.next()?.map(f).transpose()
    }

    fn all<T>(&self, sql: &str, p: impl Params, f: RowFn<T>) -> Result<Vec<T>> {
        let mut stmt = self.tx.prepare_cached(sql)?;
        let mut rows = stmt.query(p)?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(f(row)?);
        }
        Ok(out)
    }

    /// The first column of the one row `sql` returns.
    fn value<T: FromSql>(&self, sql: &str, p: impl Params) -> Result<T> {
        self.one(sql, p, |r| Ok(r.get(0)?))
    }

    /// The first column of the row `sql` returns, if there is one.
    fn opt_value<T: FromSql>(&self, sql: &str, p: impl Params) -> Result<Option<T>> {
        self.opt(sql, p, |r| Ok(r.get(0)?))
    }

    fn leases_where(&self, cond: &str, p: impl Params) -> Result<Vec<LeaseRow>> {
        let sql =
            format!("SELECT {LEASE_COLUMNS} FROM leases WHERE {cond} ORDER BY created_at, rowid");
        self.all(&sql, p, |r| rows::lease(r))
    }

    fn lease_where(&self, cond: &str, key: &str) -> Result<Option<LeaseRow>> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE {cond}");
        self.opt(&sql, params![key], |r| rows::lease(r))
    }

    fn account_query(&self, sql: &str, key: &str) -> Result<Option<AccountRow>> {
        self.opt(sql, params![key], |r| rows::account(r))
    }
}

impl Tx for SqliteTx<'_> {
    async fn account_by_key(&mut self, key_hash: &str) -> Result<Option<AccountRow>> {
        self.account_query(
            "SELECT a.account_id, a.balance, a.initial_balance, a.disabled
             FROM keys k JOIN accounts a ON a.account_id = k.account_id
             WHERE k.key_hash = ?1",
            key_hash,
        )
    }

    async fn account(&mut self, account_id: &str) -> Result<Option<AccountRow>> {
        self.account_query(
            &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = ?1"),
            account_id,
        )
    }

    async fn add_balance(&mut self, account_id: &str, delta: i64) -> Result<i64> {
        self.value(
            "UPDATE accounts SET balance = balance + ?1 WHERE account_id = ?2
             RETURNING balance",
            params![delta, account_id],
        )
    }

    async fn key_exists(&mut self, key_hash: &str) -> Result<bool> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM keys WHERE key_hash = ?1")?
            .exists(params![key_hash])?)
    }

    async fn insert_account(&mut self, a: &NewAccount<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO accounts (account_id, balance, initial_balance, disabled, created_at)
             VALUES (?1, ?2, ?2, ?3, ?4)",
            params![a.account_id, a.balance, a.disabled, a.at],
        )?;
        if let Some(key_hash) = a.key_hash {
            self.exec(
                "INSERT INTO keys (key_hash, account_id) VALUES (?1, ?2)",
                params![key_hash, a.account_id],
            )?;
        }
        Ok(())
    }

    async fn set_disabled(&mut self, account_id: &str, disabled: bool) -> Result<bool> {
        let n = self.exec(
            "UPDATE accounts SET disabled = ?1 WHERE account_id = ?2",
            params![disabled, account_id],
        )?;
        Ok(n > 0)
    }

    async fn charge(&mut self, request_id: &str) -> Result<Option<ChargeRec>> {
        let sql = format!("SELECT {CHARGE_REC_COLUMNS} FROM charges WHERE request_id = ?1");
        self.opt(&sql, params![request_id], |r| rows::charge_rec(r))
    }

    async fn insert_charge(&mut self, c: &NewCharge<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO charges (request_id, account_id, cost, route, method, path, status, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'charged', ?7)",
            params![
                c.request_id,
                c.account_id,
                c.cost,
                c.route,
                c.method,
                c.path,
                c.at
            ],
        )?;
        Ok(())
    }

    async fn mark_refunded(&mut self, r: &ChargeRefund<'_>) -> Result<()> {
        self.exec(
            "UPDATE charges SET status = 'refunded', refund_status = ?1, refunded_at = ?2
             WHERE request_id = ?3",
            params![r.status, r.at, r.request_id],
        )?;
        Ok(())
    }

    async fn set_charge_cost(&mut self, request_id: &str, cost: i64) -> Result<()> {
        self.exec(
            "UPDATE charges SET cost = ?1 WHERE request_id = ?2",
            params![cost, request_id],
        )?;
        Ok(())
    }

    async fn usage_actual(&mut self, request_id: &str) -> Result<Option<i64>> {
        self.opt_value(
            "SELECT actual FROM usages WHERE request_id = ?1",
            params![request_id],
        )
    }

    async fn insert_usage(&mut self, u: &NewUsage<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO usages (request_id, account_id, estimate, actual, at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![u.request_id, u.account_id, u.estimate, u.actual, u.at],
        )?;
        Ok(())
    }

    async fn usage_item(&mut self, request_id: &str) -> Result<Option<UsageItemRow>> {
        let sql = format!("SELECT {USAGE_ITEM_COLUMNS} FROM usage_items WHERE request_id = ?1");
        self.opt(&sql, params![request_id], |r| rows::usage_item(r))
    }

    async fn insert_usage_item(&mut self, u: &UsageItemRow) -> Result<()> {
        let t = &u.line.tokens;
        self.exec(
            &format!(
                "INSERT INTO usage_items ({USAGE_ITEM_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            params![
                u.request_id,
                u.account_id,
                u.lease_id,
                u.line.route,
                u.line.model,
                t.input,
                t.cached_input,
                t.cache_creation_input,
                t.output,
                t.reasoning,
                u.units,
                u.at
            ],
        )?;
        Ok(())
    }

    async fn usage_items_of(&mut self, account_id: &str) -> Result<Vec<UsageItemRow>> {
        let sql = format!(
            "SELECT {USAGE_ITEM_COLUMNS} FROM usage_items WHERE account_id = ?1 ORDER BY at, rowid"
        );
        self.all(&sql, params![account_id], |r| rows::usage_item(r))
    }

    async fn topup_owner(&mut self, topup_id: &str) -> Result<Option<String>> {
        self.opt_value(
            "SELECT account_id FROM topups WHERE topup_id = ?1",
            params![topup_id],
        )
    }

    async fn insert_topup(&mut self, t: &NewTopup<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO topups (topup_id, account_id, amount, at) VALUES (?1, ?2, ?3, ?4)",
            params![t.topup_id, t.account_id, t.amount, t.at],
        )?;
        Ok(())
    }

    async fn reserved(&mut self, account_id: &str) -> Result<i64> {
        self.value(
            "SELECT COALESCE(SUM(granted), 0) FROM leases
             WHERE account_id = ?1 AND state = 'open'",
            params![account_id],
        )
    }

    async fn totals(&mut self, account_id: &str) -> Result<Totals> {
        // `$1` is SQLite's named parameter 1 here: it binds the same way.
        self.one(TOTALS, params![account_id], |r| rows::totals(r))
    }

    async fn charges_of(&mut self, account_id: &str) -> Result<Vec<ChargeRow>> {
        let sql = format!(
            "SELECT {CHARGE_COLUMNS} FROM charges WHERE account_id = ?1 ORDER BY at, rowid"
        );
        self.all(&sql, params![account_id], |r| rows::charge(r))
    }

    async fn leases_of(&mut self, account_id: &str) -> Result<Vec<LeaseRow>> {
        self.leases_where("account_id = ?1", params![account_id])
    }

    async fn lease_by_id(&mut self, lease_id: &str) -> Result<Option<LeaseRow>> {
        self.lease_where("lease_id = ?1", lease_id)
    }

    async fn lease_by_request(&mut self, request_id: &str) -> Result<Option<LeaseRow>> {
        self.lease_where("request_id = ?1", request_id)
    }

    async fn insert_lease(&mut self, l: &LeaseRow) -> Result<()> {
        self.exec(
            "INSERT INTO leases (lease_id, account_id, holder, request_id, granted, used,
                                 state, charged, created_at, expires_at, closed_at,
                                 refunded, settle_seq, recalled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
            params![
                l.lease_id,
                l.account_id,
                l.holder,
                l.request_id,
                l.granted,
                l.used,
                l.state.as_str(),
                l.charged,
                l.created_at,
                l.expires_at,
                l.closed_at,
                l.refunded,
                l.settle_seq,
                l.recalled_at
            ],
        )?;
        Ok(())
    }

    async fn update_lease(&mut self, l: &LeaseRow) -> Result<()> {
        self.exec(
            "UPDATE leases SET used = ?1, state = ?2, charged = ?3, closed_at = ?4,
                               refunded = ?5, settle_seq = ?6
             WHERE lease_id = ?7",
            params![
                l.used,
                l.state.as_str(),
                l.charged,
                l.closed_at,
                l.refunded,
                l.settle_seq,
                l.lease_id
            ],
        )?;
        Ok(())
    }

    async fn other_holders(&mut self, account_id: &str, holder: &str) -> Result<i64> {
        self.value(
            "SELECT COUNT(DISTINCT holder) FROM leases
             WHERE account_id = ?1 AND state = 'open' AND holder <> ?2",
            params![account_id, holder],
        )
    }

    async fn recall_unspent(&mut self, account_id: &str, now: i64) -> Result<u64> {
        let n = self.exec(
            "UPDATE leases SET recalled_at = COALESCE(recalled_at, ?2)
             WHERE account_id = ?1 AND state = 'open' AND used < granted",
            params![account_id, now],
        )?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    async fn lease_refund(&mut self, request_id: &str) -> Result<Option<(String, i64)>> {
        self.opt(
            "SELECT lease_id, units FROM lease_refunds WHERE request_id = ?1",
            params![request_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    async fn insert_lease_refund(&mut self, r: &NewLeaseRefund<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO lease_refunds (request_id, lease_id, account_id, units, status, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                r.input.request_id,
                r.input.lease_id,
                r.account_id,
                r.input.units,
                r.input.status,
                r.at
            ],
        )?;
        Ok(())
    }

    async fn due_leases(&mut self, account_id: &str, now: i64) -> Result<Vec<LeaseRow>> {
        self.leases_where(
            "account_id = ?1 AND state = 'open' AND expires_at <= ?2",
            params![account_id, now],
        )
    }

    async fn accounts_with_due_leases(&mut self, now: i64) -> Result<Vec<String>> {
        self.all(
            "SELECT DISTINCT account_id FROM leases WHERE state = 'open' AND expires_at <= ?1",
            params![now],
            |r| Ok(r.get(0)?),
        )
    }

    async fn budget(&mut self, account_id: &str) -> Result<Option<(i64, String, String)>> {
        self.opt(
            "SELECT limit_units, period, time_zone FROM budgets WHERE account_id = ?1",
            params![account_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
    }

    async fn put_budget(&mut self, account_id: &str, b: &BudgetSpec, at: i64) -> Result<()> {
        self.exec(
            "INSERT INTO budgets (account_id, limit_units, period, time_zone, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (account_id) DO UPDATE SET limit_units = ?2, period = ?3,
                 time_zone = ?4, updated_at = ?5",
            params![account_id, b.limit, b.period.as_str(), b.time_zone, at],
        )?;
        Ok(())
    }

    async fn delete_budget(&mut self, account_id: &str) -> Result<bool> {
        self.exec(
            "DELETE FROM budget_spend WHERE account_id = ?1",
            params![account_id],
        )?;
        let n = self.exec(
            "DELETE FROM budgets WHERE account_id = ?1",
            params![account_id],
        )?;
        Ok(n > 0)
    }

    async fn budget_spent(&mut self, account_id: &str, period_start: i64) -> Result<i64> {
        Ok(self
            .opt_value(
                "SELECT spent FROM budget_spend WHERE account_id = ?1 AND period_start = ?2",
                params![account_id, period_start],
            )?
            .unwrap_or(0))
    }

    async fn add_budget_spent(
        &mut self,
        account_id: &str,
        period_start: i64,
        delta: i64,
    ) -> Result<i64> {
        self.value(
            "INSERT INTO budget_spend (account_id, period_start, spent)
             VALUES (?1, ?2, MAX(?3, 0))
             ON CONFLICT (account_id, period_start)
                 DO UPDATE SET spent = MAX(budget_spend.spent + ?3, 0)
             RETURNING spent",
            params![account_id, period_start, delta],
        )
    }

    async fn insert_event(&mut self, e: &NewEvent<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO webhook_events (event_id, kind, account_id, body, created_at,
                                         next_attempt_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![e.event_id, e.kind, e.account_id, e.body, e.at],
        )?;
        Ok(())
    }

    async fn claim_events(&mut self, now: i64, until: i64, limit: i64) -> Result<Vec<EventRow>> {
        let sql = format!(
            "UPDATE webhook_events SET next_attempt_at = ?2
             WHERE seq IN (SELECT seq FROM webhook_events
                           WHERE delivered_at IS NULL AND gave_up_at IS NULL
                                 AND next_attempt_at <= ?1
                           ORDER BY seq LIMIT ?3)
             RETURNING {EVENT_COLUMNS}"
        );
        let mut out = self.all(&sql, params![now, until, limit], |r| rows::event(r))?;
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    async fn event_delivered(&mut self, seq: i64, at: i64) -> Result<()> {
        self.exec(
            "UPDATE webhook_events SET delivered_at = ?2, attempts = attempts + 1,
                                       last_error = NULL
             WHERE seq = ?1",
            params![seq, at],
        )?;
        Ok(())
    }

    async fn event_failed(
        &mut self,
        seq: i64,
        next: Option<i64>,
        error: &str,
        at: i64,
    ) -> Result<()> {
        self.exec(
            "UPDATE webhook_events SET attempts = attempts + 1, last_error = ?2,
                   next_attempt_at = COALESCE(?3, next_attempt_at),
                   gave_up_at = CASE WHEN ?3 IS NULL THEN ?4 END
             WHERE seq = ?1",
            params![seq, error, next, at],
        )?;
        Ok(())
    }

    async fn export(&mut self, q: &ExportQuery) -> Result<Vec<ExportRow>> {
        let (at, k, id) = match &q.after {
            Some(key) => (key.at, key.kind.order(), key.id.as_str()),
            None => (i64::MIN, -1, ""),
        };
        let account = q.account.as_deref().unwrap_or("");
        self.all(
            EXPORT,
            params![q.from, q.to, account, at, k, id, q.limit],
            |r| rows::export_row(r),
        )
    }
}
