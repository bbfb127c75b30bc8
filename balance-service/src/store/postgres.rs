//! The PostgreSQL backend: `tokio-postgres` through a `deadpool-postgres`
//! connection pool, statements prepared once per connection.
//!
//! Transactions run at READ COMMITTED. Each call first locks the account row
//! it changes (`SELECT … FOR UPDATE`), so calls on one account serialise
//! across connections and service replicas, while calls on different
//! accounts run in parallel; every read after the lock sees all earlier
//! commits. Amounts move with relative updates (`balance = balance + $1`).
//! Request ids, lease request ids and top-up ids are unique keys: a call
//! that loses an insert race (SQLSTATE 23505), or hits a deadlock (40P01) or
//! serialization failure (40001), is rolled back and run again, and then
//! sees the winner's row and answers as a replay.

use super::migrations;
use super::rows::{
    self, Columns, ACCOUNT_COLUMNS, CHARGE_COLUMNS, CHARGE_REC_COLUMNS, EVENT_COLUMNS, EXPORT,
    LEASE_COLUMNS, TOTALS, USAGE_ITEM_COLUMNS,
};
use super::{
    AccountRow, BudgetSpec, ChargeRec, ChargeRefund, ChargeRow, EventRow, ExportQuery, ExportRow,
    LeaseRow, NewAccount, NewCharge, NewEvent, NewLeaseRefund, NewTopup, NewUsage, Result,
    StoreError, Totals, Tx, UsageItemRow,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::str::FromStr;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{FromSql, ToSql};
use tokio_postgres::{NoTls, Row};

/// How often a call is run again after a retryable failure.
pub const MAX_RETRIES: u32 = 8;
/// Connections per service process.
const POOL_SIZE: usize = 16;
/// Longest wait for a connection (also bounds connecting at start-up).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a connection on the request path: a call fails fast
/// (503) while the database is down, well within the filter's timeout.
const REQUEST_TIMEOUTS: deadpool_postgres::Timeouts = deadpool_postgres::Timeouts {
    wait: Some(Duration::from_secs(2)),
    create: Some(Duration::from_secs(1)),
    recycle: Some(Duration::from_secs(1)),
};
/// Key of the advisory lock that serialises migrations across replicas.
const MIGRATION_LOCK: i64 = 0x0066_6172_6562_6f78; // "farebox"

pub struct Db {
    pool: Pool,
}

/// Whether the connection is gone: it broke, or the server ended the
/// session (shutdown, restart, failover, `pg_terminate_backend`: SQLSTATE
/// 57P01–57P03, sent to a call in flight). Either way its open transaction
/// was rolled back.
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(
            e.code(),
            Some(c) if *c == SqlState::ADMIN_SHUTDOWN
                || *c == SqlState::CRASH_SHUTDOWN
                || *c == SqlState::CANNOT_CONNECT_NOW
        )
}

/// Whether a store error is a lost connection ([`connection_lost`]).
pub fn is_connection_lost(e: &StoreError) -> bool {
    matches!(e, StoreError::Postgres(e) if connection_lost(e))
}

/// Whether a failed call may be run again (it was rolled back). Only
/// failures inside the transaction come here, never a failed commit (whose
/// outcome is unknown).
pub fn retryable(e: &StoreError) -> bool {
    let StoreError::Postgres(e) = e else {
        return false;
    };
    if connection_lost(e) {
        // The transaction never committed; run it on a fresh connection.
        return true;
    }
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
            || *c == SqlState::UNIQUE_VIOLATION
    )
}

/// A client or pool error with its causes (the server's message for a
/// database error, the OS error for a failed connect).
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
        if let Some(db) = pg.as_db_error() {
            return format!("{} (SQLSTATE {})", db.message(), db.code().code());
        }
    }
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(src) = next {
        let text = src.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = src.source();
    }
    out
}

fn pool_error(e: deadpool_postgres::PoolError) -> String {
    match &e {
        deadpool_postgres::PoolError::Backend(pg) => cause(pg),
        _ => cause(&e),
    }
}

/// "host:port database D as user U", never the password.
fn describe(cfg: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "PostgreSQL at {}:{port} (database {:?}, user {:?})",
        hosts.join(","),
        cfg.get_dbname().unwrap_or("-"),
        cfg.get_user().unwrap_or("-")
    )
}

fn pool_for(url: &str) -> Result<(Pool, String)> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| {
        StoreError::Schema(format!("bad PostgreSQL URL {}: {e}", super::redact(url)))
    })?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("farebox-balance");
    }
    let what = describe(&cfg);
    let mgr = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(mgr)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| StoreError::Schema(format!("cannot set up the pool for {what}: {e}")))?;
    Ok((pool, what))
}

/// Applies the pending migrations in one transaction, under an advisory
/// lock so replicas starting together migrate once. Returns (before, after).
async fn migrate(pool: &Pool, what: &str) -> Result<(i64, i64)> {
    let mut client = pool.get().await.map_err(|e| {
        StoreError::Unavailable(format!("cannot connect to {what}: {}", pool_error(e)))
    })?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS {} (
             version    BIGINT PRIMARY KEY,
             name       TEXT NOT NULL,
             applied_at BIGINT NOT NULL
         )",
        migrations::TABLE
    ))
    .await?;
    let before: i64 = tx
        .query_one(
            &format!(
                "SELECT COALESCE(MAX(version), 0)::BIGINT FROM {}",
                migrations::TABLE
            ),
            &[],
        )
        .await?
        .try_get(0)?;
    migrations::check_known(before)?;
    let mut after = before;
    for m in migrations::pending(migrations::POSTGRES, before) {
        tx.batch_execute(m.sql).await.map_err(|e| {
            StoreError::Schema(format!(
                "migration {} ({}) failed: {}",
                m.version,
                m.name,
                StoreError::Postgres(e)
            ))
        })?;
        tx.execute(
            &format!(
                "INSERT INTO {} (version, name, applied_at) VALUES ($1, $2, $3)",
                migrations::TABLE
            ),
            &[&m.version, &m.name, &crate::util::now_ms()],
        )
        .await?;
        after = m.version;
    }
    tx.commit().await?;
    Ok((before, after))
}

/// `farebox-balance migrate` on a PostgreSQL URL.
pub async fn migrate_url(url: &str) -> Result<(i64, i64)> {
    let (pool, what) = pool_for(url)?;
    migrate(&pool, &what).await
}

impl Db {
    /// Connects (failing within seconds when the server does not answer)
    /// and brings the schema up to date.
    pub async fn open(url: &str, apply: bool) -> Result<Db> {
        let (pool, what) = pool_for(url)?;
        if apply {
            migrate(&pool, &what).await?;
        }
        Ok(Db { pool })
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Client> {
        self.pool
            .timeout_get(&REQUEST_TIMEOUTS)
            .await
            .map_err(|e| StoreError::Unavailable(pool_error(e)))
    }
}

pub struct PgTx<'c> {
    tx: deadpool_postgres::Transaction<'c>,
}

type Params<'a> = [&'a (dyn ToSql + Sync)];

impl Columns for Row {
    fn text(&self, i: usize) -> Result<String> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>> {
        Ok(self.try_get(i)?)
    }
    fn flag(&self, i: usize) -> Result<bool> {
        Ok(self.try_get(i)?)
    }
}

impl<'c> PgTx<'c> {
    pub async fn begin(client: &'c mut deadpool_postgres::Client) -> Result<PgTx<'c>> {
        Ok(PgTx {
            tx: client.transaction().await?,
        })
    }

    pub async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }

    async fn opt(&self, sql: &str, p: &Params<'_>) -> Result<Option<Row>> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query_opt(&stmt, p).await?)
    }

    async fn one(&self, sql: &str, p: &Params<'_>) -> Result<Row> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query_one(&stmt, p).await?)
    }

    async fn all(&self, sql: &str, p: &Params<'_>) -> Result<Vec<Row>> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query(&stmt, p).await?)
    }

    /// The first column of the one row `sql` returns.
    async fn value<T: for<'r> FromSql<'r>>(&self, sql: &str, p: &Params<'_>) -> Result<T> {
        Ok(self.one(sql, p).await?.try_get(0)?)
    }

    /// The first column of the row `sql` returns, if there is one.
    async fn opt_value<T: for<'r> FromSql<'r>>(
        &self,
        sql: &str,
        p: &Params<'_>,
    ) -> Result<Option<T>> {
        self.opt(sql, p)
            .await?
            .map(|r| r.try_get(0).map_err(StoreError::from))
            .transpose()
    }

    async fn account_query(&self, sql: &str, key: &str) -> Result<Option<AccountRow>> {
        self.opt(sql, &[&key])
            .await?
            .as_ref()
            .map(rows::account)
            .transpose()
    }

    async fn exec(&self, sql: &str, p: &Params<'_>) -> Result<u64> {
        let stmt = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.execute(&stmt, p).await?)
    }

    async fn leases_where(&self, cond: &str, p: &Params<'_>) -> Result<Vec<LeaseRow>> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE {cond} ORDER BY seq");
        self.all(&sql, p).await?.iter().map(rows::lease).collect()
    }

    async fn lease_where(&self, cond: &str, key: &str) -> Result<Option<LeaseRow>> {
        let sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE {cond}");
        self.opt(&sql, &[&key])
            .await?
            .as_ref()
            .map(rows::lease)
            .transpose()
    }
}

impl Tx for PgTx<'_> {
    async fn account_by_key(&mut self, key_hash: &str) -> Result<Option<AccountRow>> {
        self.account_query(
            "SELECT a.account_id, a.balance, a.initial_balance, a.disabled
             FROM keys k JOIN accounts a ON a.account_id = k.account_id
             WHERE k.key_hash = $1
             FOR UPDATE OF a",
            key_hash,
        )
        .await
    }

    async fn account(&mut self, account_id: &str) -> Result<Option<AccountRow>> {
        self.account_query(
            &format!("SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE account_id = $1 FOR UPDATE"),
            account_id,
        )
        .await
    }

    async fn add_balance(&mut self, account_id: &str, delta: i64) -> Result<i64> {
        self.value(
            "UPDATE accounts SET balance = balance + $1 WHERE account_id = $2
             RETURNING balance",
            &[&delta, &account_id],
        )
        .await
    }

    async fn key_exists(&mut self, key_hash: &str) -> Result<bool> {
        Ok(self
            .opt("SELECT 1 FROM keys WHERE key_hash = $1", &[&key_hash])
            .await?
            .is_some())
    }

    async fn insert_account(&mut self, a: &NewAccount<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO accounts (account_id, balance, initial_balance, disabled, created_at)
             VALUES ($1, $2, $2, $3, $4)",
            &[&a.account_id, &a.balance, &a.disabled, &a.at],
        )
        .await?;
        if let Some(key_hash) = a.key_hash {
            self.exec(
                "INSERT INTO keys (key_hash, account_id) VALUES ($1, $2)",
                &[&key_hash, &a.account_id],
            )
            .await?;
        }
        Ok(())
    }

    async fn set_disabled(&mut self, account_id: &str, disabled: bool) -> Result<bool> {
        let n = self
            .exec(
                "UPDATE accounts SET disabled = $1 WHERE account_id = $2",
                &[&disabled, &account_id],
            )
            .await?;
        Ok(n > 0)
    }

    async fn charge(&mut self, request_id: &str) -> Result<Option<ChargeRec>> {
        let sql = format!("SELECT {CHARGE_REC_COLUMNS} FROM charges WHERE request_id = $1");
        self.opt(&sql, &[&request_id])
            .await?
            .as_ref()
            .map(rows::charge_rec)
            .transpose()
    }

    async fn insert_charge(&mut self, c: &NewCharge<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO charges (request_id, account_id, cost, route, method, path, status, at)
             VALUES ($1, $2, $3, $4, $5, $6, 'charged', $7)",
            &[
                &c.request_id,
                &c.account_id,
                &c.cost,
                &c.route,
                &c.method,
                &c.path,
                &c.at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn mark_refunded(&mut self, r: &ChargeRefund<'_>) -> Result<()> {
        let status = r.status.map(i64::from);
        self.exec(
            "UPDATE charges SET status = 'refunded', refund_status = $1, refunded_at = $2
             WHERE request_id = $3",
            &[&status, &r.at, &r.request_id],
        )
        .await?;
        Ok(())
    }

    async fn set_charge_cost(&mut self, request_id: &str, cost: i64) -> Result<()> {
        self.exec(
            "UPDATE charges SET cost = $1 WHERE request_id = $2",
            &[&cost, &request_id],
        )
        .await?;
        Ok(())
    }

    async fn usage_actual(&mut self, request_id: &str) -> Result<Option<i64>> {
        self.opt_value(
            "SELECT actual FROM usages WHERE request_id = $1",
            &[&request_id],
        )
        .await
    }

    async fn insert_usage(&mut self, u: &NewUsage<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO usages (request_id, account_id, estimate, actual, at)
             VALUES ($1, $2, $3, $4, $5)",
            &[&u.request_id, &u.account_id, &u.estimate, &u.actual, &u.at],
        )
        .await?;
        Ok(())
    }

    async fn usage_item(&mut self, request_id: &str) -> Result<Option<UsageItemRow>> {
        let sql = format!("SELECT {USAGE_ITEM_COLUMNS} FROM usage_items WHERE request_id = $1");
        self.opt(&sql, &[&request_id])
            .await?
            .as_ref()
            .map(rows::usage_item)
            .transpose()
    }

    async fn insert_usage_item(&mut self, u: &UsageItemRow) -> Result<()> {
        let t = &u.line.tokens;
        self.exec(
            &format!(
                "INSERT INTO usage_items ({USAGE_ITEM_COLUMNS})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            ),
            &[
                &u.request_id,
                &u.account_id,
                &u.lease_id,
                &u.line.route,
                &u.line.model,
                &t.input,
                &t.cached_input,
                &t.cache_creation_input,
                &t.output,
                &t.reasoning,
                &u.units,
                &u.at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn usage_items_of(&mut self, account_id: &str) -> Result<Vec<UsageItemRow>> {
        let sql = format!(
            "SELECT {USAGE_ITEM_COLUMNS} FROM usage_items WHERE account_id = $1 ORDER BY seq"
        );
        self.all(&sql, &[&account_id])
            .await?
            .iter()
            .map(rows::usage_item)
            .collect()
    }

    async fn topup_owner(&mut self, topup_id: &str) -> Result<Option<String>> {
        self.opt_value(
            "SELECT account_id FROM topups WHERE topup_id = $1",
            &[&topup_id],
        )
        .await
    }

    async fn insert_topup(&mut self, t: &NewTopup<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO topups (topup_id, account_id, amount, at) VALUES ($1, $2, $3, $4)",
            &[&t.topup_id, &t.account_id, &t.amount, &t.at],
        )
        .await?;
        Ok(())
    }

    async fn reserved(&mut self, account_id: &str) -> Result<i64> {
        self.value(
            "SELECT COALESCE(SUM(granted), 0)::BIGINT FROM leases
             WHERE account_id = $1 AND state = 'open'",
            &[&account_id],
        )
        .await
    }

    async fn totals(&mut self, account_id: &str) -> Result<Totals> {
        rows::totals(&self.one(TOTALS, &[&account_id]).await?)
    }

    async fn charges_of(&mut self, account_id: &str) -> Result<Vec<ChargeRow>> {
        let sql =
            format!("SELECT {CHARGE_COLUMNS} FROM charges WHERE account_id = $1 ORDER BY seq");
        self.all(&sql, &[&account_id])
            .await?
            .iter()
            .map(rows::charge)
            .collect()
    }

    async fn leases_of(&mut self, account_id: &str) -> Result<Vec<LeaseRow>> {
        self.leases_where("account_id = $1", &[&account_id]).await
    }

    async fn lease_by_id(&mut self, lease_id: &str) -> Result<Option<LeaseRow>> {
        self.lease_where("lease_id = $1", lease_id).await
    }

    async fn lease_by_request(&mut self, request_id: &str) -> Result<Option<LeaseRow>> {
        self.lease_where("request_id = $1", request_id).await
    }

    async fn insert_lease(&mut self, l: &LeaseRow) -> Result<()> {
        self.exec(
            "INSERT INTO leases (lease_id, account_id, holder, request_id, granted, used,
                                 state, charged, created_at, expires_at, closed_at,
                                 refunded, settle_seq, recalled_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            &[
                &l.lease_id,
                &l.account_id,
                &l.holder,
                &l.request_id,
                &l.granted,
                &l.used,
                &l.state.as_str(),
                &l.charged,
                &l.created_at,
                &l.expires_at,
                &l.closed_at,
                &l.refunded,
                &l.settle_seq,
                &l.recalled_at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn update_lease(&mut self, l: &LeaseRow) -> Result<()> {
        self.exec(
            "UPDATE leases SET used = $1, state = $2, charged = $3, closed_at = $4,
                               refunded = $5, settle_seq = $6
             WHERE lease_id = $7",
            &[
                &l.used,
                &l.state.as_str(),
                &l.charged,
                &l.closed_at,
                &l.refunded,
                &l.settle_seq,
                &l.lease_id,
            ],
        )
        .await?;
        Ok(())
    }

    async fn other_holders(&mut self, account_id: &str, holder: &str) -> Result<i64> {
        self.value(
            "SELECT COUNT(DISTINCT holder)::BIGINT FROM leases
             WHERE account_id = $1 AND state = 'open' AND holder <> $2",
            &[&account_id, &holder],
        )
        .await
    }

    async fn recall_unspent(&mut self, account_id: &str, now: i64) -> Result<u64> {
        self.exec(
            "UPDATE leases SET recalled_at = COALESCE(recalled_at, $2)
             WHERE account_id = $1 AND state = 'open' AND used < granted",
            &[&account_id, &now],
        )
        .await
    }

    async fn lease_refund(&mut self, request_id: &str) -> Result<Option<(String, i64)>> {
        let Some(r) = self
            .opt(
                "SELECT lease_id, units FROM lease_refunds WHERE request_id = $1",
                &[&request_id],
            )
            .await?
        else {
            return Ok(None);
        };
        Ok(Some((r.try_get(0)?, r.try_get(1)?)))
    }

    async fn insert_lease_refund(&mut self, r: &NewLeaseRefund<'_>) -> Result<()> {
        let status = r.input.status.map(i64::from);
        self.exec(
            "INSERT INTO lease_refunds (request_id, lease_id, account_id, units, status, at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &r.input.request_id,
                &r.input.lease_id,
                &r.account_id,
                &r.input.units,
                &status,
                &r.at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn due_leases(&mut self, account_id: &str, now: i64) -> Result<Vec<LeaseRow>> {
        self.leases_where(
            "account_id = $1 AND state = 'open' AND expires_at <= $2",
            &[&account_id, &now],
        )
        .await
    }

    async fn accounts_with_due_leases(&mut self, now: i64) -> Result<Vec<String>> {
        self.all(
            "SELECT DISTINCT account_id FROM leases WHERE state = 'open' AND expires_at <= $1",
            &[&now],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(StoreError::from))
        .collect()
    }

    async fn budget(&mut self, account_id: &str) -> Result<Option<(i64, String, String)>> {
        let Some(r) = self
            .opt(
                "SELECT limit_units, period, time_zone FROM budgets WHERE account_id = $1",
                &[&account_id],
            )
            .await?
        else {
            return Ok(None);
        };
        Ok(Some((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
    }

    async fn put_budget(&mut self, account_id: &str, b: &BudgetSpec, at: i64) -> Result<()> {
        self.exec(
            "INSERT INTO budgets (account_id, limit_units, period, time_zone, updated_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (account_id) DO UPDATE SET limit_units = $2, period = $3,
                 time_zone = $4, updated_at = $5",
            &[&account_id, &b.limit, &b.period.as_str(), &b.time_zone, &at],
        )
        .await?;
        Ok(())
    }

    async fn delete_budget(&mut self, account_id: &str) -> Result<bool> {
        self.exec(
            "DELETE FROM budget_spend WHERE account_id = $1",
            &[&account_id],
        )
        .await?;
        let n = self
            .exec("DELETE FROM budgets WHERE account_id = $1", &[&account_id])
            .await?;
        Ok(n > 0)
    }

    async fn budget_spent(&mut self, account_id: &str, period_start: i64) -> Result<i64> {
        Ok(self
            .opt_value(
                "SELECT spent FROM budget_spend WHERE account_id = $1 AND period_start = $2",
                &[&account_id, &period_start],
            )
            .await?
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
             VALUES ($1, $2, GREATEST($3::BIGINT, 0))
             ON CONFLICT (account_id, period_start)
                 DO UPDATE SET spent = GREATEST(budget_spend.spent + $3::BIGINT, 0)
             RETURNING spent",
            &[&account_id, &period_start, &delta],
        )
        .await
    }

    async fn insert_event(&mut self, e: &NewEvent<'_>) -> Result<()> {
        self.exec(
            "INSERT INTO webhook_events (event_id, kind, account_id, body, created_at,
                                         next_attempt_at)
             VALUES ($1, $2, $3, $4, $5, $5)",
            &[&e.event_id, &e.kind, &e.account_id, &e.body, &e.at],
        )
        .await?;
        Ok(())
    }

    async fn claim_events(&mut self, now: i64, until: i64, limit: i64) -> Result<Vec<EventRow>> {
        // SKIP LOCKED: replicas delivering at once each take other events.
        let sql = format!(
            "UPDATE webhook_events SET next_attempt_at = $2
             WHERE seq IN (SELECT seq FROM webhook_events
                           WHERE delivered_at IS NULL AND gave_up_at IS NULL
                                 AND next_attempt_at <= $1
                           ORDER BY seq LIMIT $3 FOR UPDATE SKIP LOCKED)
             RETURNING {EVENT_COLUMNS}"
        );
        let mut out = self
            .all(&sql, &[&now, &until, &limit])
            .await?
            .iter()
            .map(rows::event)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    async fn event_delivered(&mut self, seq: i64, at: i64) -> Result<()> {
        self.exec(
            "UPDATE webhook_events SET delivered_at = $2, attempts = attempts + 1,
                                       last_error = NULL
             WHERE seq = $1",
            &[&seq, &at],
        )
        .await?;
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
            "UPDATE webhook_events SET attempts = attempts + 1, last_error = $2,
                   next_attempt_at = COALESCE($3::BIGINT, next_attempt_at),
                   gave_up_at = CASE WHEN $3::BIGINT IS NULL THEN $4::BIGINT END
             WHERE seq = $1",
            &[&seq, &error, &next, &at],
        )
        .await?;
        Ok(())
    }

    async fn export(&mut self, q: &ExportQuery) -> Result<Vec<ExportRow>> {
        let (at, k, id) = match &q.after {
            Some(key) => (key.at, key.kind.order(), key.id.as_str()),
            None => (i64::MIN, -1, ""),
        };
        let account = q.account.as_deref().unwrap_or("");
        self.all(EXPORT, &[&q.from, &q.to, &account, &at, &k, &id, &q.limit])
            .await?
            .iter()
            .map(rows::export_row)
            .collect()
    }
}
