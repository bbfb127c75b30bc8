//! Result rows read the same way on both backends: each kind of row is
//! mapped from its columns once, here, next to the column list it reads.

use super::{
    AccountRow, ChargeRec, ChargeRow, ChargeStatus, EventRow, ExportKey, ExportKind, ExportRow,
    LeaseRow, LeaseState, Result, StoreError, TokenCounts, Totals, UsageItemRow, UsageLine,
};

/// One result row of a backend, read by column position.
pub(crate) trait Columns {
    fn text(&self, i: usize) -> Result<String>;
    fn int(&self, i: usize) -> Result<i64>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>>;
    fn opt_text(&self, i: usize) -> Result<Option<String>>;
    fn flag(&self, i: usize) -> Result<bool>;
}

/// The columns [`account`] reads, in order.
pub(crate) const ACCOUNT_COLUMNS: &str = "account_id, balance, initial_balance, disabled";

pub(crate) fn account(r: &impl Columns) -> Result<AccountRow> {
    Ok(AccountRow {
        account_id: r.text(0)?,
        balance: r.int(1)?,
        initial_balance: r.int(2)?,
        disabled: r.flag(3)?,
    })
}

/// The columns [`charge_rec`] reads, in order.
pub(crate) const CHARGE_REC_COLUMNS: &str = "account_id, cost, status, at";

pub(crate) fn charge_rec(r: &impl Columns) -> Result<ChargeRec> {
    Ok(ChargeRec {
        account_id: r.text(0)?,
        cost: r.int(1)?,
        status: ChargeStatus::parse(&r.text(2)?)?,
        at: r.int(3)?,
    })
}

/// The columns [`charge`] reads, in order.
pub(crate) const CHARGE_COLUMNS: &str =
    "request_id, cost, route, method, path, status, refund_status, at";

pub(crate) fn charge(r: &impl Columns) -> Result<ChargeRow> {
    Ok(ChargeRow {
        request_id: r.text(0)?,
        cost: r.int(1)?,
        route: r.text(2)?,
        method: r.text(3)?,
        path: r.text(4)?,
        status: ChargeStatus::parse(&r.text(5)?)?,
        refund_status: r.opt_int(6)?,
        at: r.int(7)?,
    })
}

/// The columns [`lease`] reads, in order, with the pending refunds of an
/// open lease.
pub(crate) const LEASE_COLUMNS: &str = "lease_id, account_id, holder, request_id, granted, used, \
     state, charged, created_at, expires_at, closed_at, refunded, \
     CASE WHEN state = 'open' THEN (SELECT CAST(COALESCE(SUM(units), 0) AS BIGINT) \
     FROM lease_refunds r WHERE r.lease_id = leases.lease_id) ELSE 0 END, \
     settle_seq, recalled_at";

pub(crate) fn lease(r: &impl Columns) -> Result<LeaseRow> {
    Ok(LeaseRow {
        lease_id: r.text(0)?,
        account_id: r.text(1)?,
        holder: r.text(2)?,
        request_id: r.text(3)?,
        granted: r.int(4)?,
        used: r.int(5)?,
        state: LeaseState::parse(&r.text(6)?)?,
        charged: r.int(7)?,
        created_at: r.int(8)?,
        expires_at: r.int(9)?,
        closed_at: r.opt_int(10)?,
        refunded: r.int(11)?,
        refund_pending: r.int(12)?,
        settle_seq: r.int(13)?,
        recalled_at: r.opt_int(14)?,
    })
}

/// One account's sums for the admin summary, as the one row [`totals`]
/// reads (`$1`: the account id; aggregates without `GROUP BY` always give
/// one row).
pub(crate) const TOTALS: &str = "
    SELECT c.charged, c.refunded, c.n, l.reserved, l.charged, l.refunded, l.n, t.amount
    FROM (SELECT CAST(COALESCE(SUM(CASE WHEN status = 'charged' THEN cost END), 0)
                      AS BIGINT) AS charged,
                 CAST(COALESCE(SUM(CASE WHEN status = 'refunded' THEN cost END), 0)
                      AS BIGINT) AS refunded,
                 COUNT(*) AS n
          FROM charges WHERE account_id = $1) c,
         (SELECT CAST(COALESCE(SUM(CASE WHEN state = 'open' THEN granted END), 0)
                      AS BIGINT) AS reserved,
                 CAST(COALESCE(SUM(charged), 0) AS BIGINT) AS charged,
                 CAST(COALESCE(SUM(refunded), 0) AS BIGINT) AS refunded,
                 COUNT(*) AS n
          FROM leases WHERE account_id = $1) l,
         (SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) AS amount
          FROM topups WHERE account_id = $1) t";

pub(crate) fn totals(r: &impl Columns) -> Result<Totals> {
    Ok(Totals {
        charged: r.int(0)?,
        refunded: r.int(1)?,
        charges: r.int(2)?,
        reserved: r.int(3)?,
        lease_charged: r.int(4)?,
        lease_refunded: r.int(5)?,
        leases: r.int(6)?,
        topups: r.int(7)?,
    })
}

/// The columns [`event`] reads, in order.
pub(crate) const EVENT_COLUMNS: &str = "seq, event_id, body, attempts";

pub(crate) fn event(r: &impl Columns) -> Result<EventRow> {
    Ok(EventRow {
        seq: r.int(0)?,
        event_id: r.text(1)?,
        body: r.text(2)?,
        attempts: r.int(3)?,
    })
}

/// The usage export (`GET /admin/charges`), the same SQL on both backends:
/// charges, refunded charges (a row of their own at the refund's time),
/// closed leases that charged something and lease refunds, in the order
/// `(at, k, id)`. Parameters: `$1` from, `$2` to (exclusive), `$3` the
/// account (empty: all), `$4 $5 $6` the key to start after, `$7` the limit.
/// (On SQLite `$N` are named parameters numbered by first appearance, so
/// they must first appear in this order.)
pub(crate) const EXPORT: &str = "
    SELECT at, k, id, account_id, request_id, lease_id, route, method, path, units, upstream
    FROM (SELECT at, CAST(0 AS BIGINT) AS k, request_id AS id, account_id, request_id,
                 CAST(NULL AS TEXT) AS lease_id, route, method, path, cost AS units,
                 CAST(NULL AS BIGINT) AS upstream
          FROM charges
          UNION ALL
          SELECT refunded_at, CAST(1 AS BIGINT), request_id, account_id, request_id,
                 CAST(NULL AS TEXT), route, method, path, -cost, refund_status
          FROM charges WHERE status = 'refunded' AND refunded_at IS NOT NULL
          UNION ALL
          SELECT closed_at, CAST(2 AS BIGINT), lease_id, account_id, request_id, lease_id,
                 'lease', '-', '-', charged + refunded, CAST(NULL AS BIGINT)
          FROM leases
          WHERE state IN ('settled', 'expired') AND closed_at IS NOT NULL
                AND charged + refunded > 0
          UNION ALL
          SELECT at, CAST(3 AS BIGINT), request_id, account_id, request_id, lease_id,
                 'lease', '-', '-', -units, status
          FROM lease_refunds) x
    WHERE at >= $1 AND at < $2 AND ($3 = '' OR account_id = $3)
          AND (at > $4 OR (at = $4 AND (k > $5 OR (k = $5 AND id > $6))))
    ORDER BY at, k, id
    LIMIT $7";

pub(crate) fn export_row(r: &impl Columns) -> Result<ExportRow> {
    let k = r.int(1)?;
    let kind =
        ExportKind::from_order(k).ok_or_else(|| StoreError::Corrupt(format!("export kind {k}")))?;
    Ok(ExportRow {
        key: ExportKey {
            at: r.int(0)?,
            kind,
            id: r.text(2)?,
        },
        account_id: r.text(3)?,
        request_id: r.text(4)?,
        lease_id: r.opt_text(5)?,
        route: r.text(6)?,
        method: r.text(7)?,
        path: r.text(8)?,
        units: r.int(9)?,
        upstream_status: r.opt_int(10)?,
    })
}

/// The columns [`usage_item`] reads, in order (also the insert's column order).
pub(crate) const USAGE_ITEM_COLUMNS: &str = "request_id, account_id, lease_id, route, model, \
     input_tokens, cached_input_tokens, cache_creation_input_tokens, output_tokens, \
     reasoning_tokens, units, at";

pub(crate) fn usage_item(r: &impl Columns) -> Result<UsageItemRow> {
    Ok(UsageItemRow {
        request_id: r.text(0)?,
        account_id: r.text(1)?,
        lease_id: r.opt_text(2)?,
        line: UsageLine {
            route: r.text(3)?,
            model: r.opt_text(4)?,
            tokens: TokenCounts {
                input: r.int(5)?,
                cached_input: r.int(6)?,
                cache_creation_input: r.int(7)?,
                output: r.int(8)?,
                reasoning: r.int(9)?,
            },
        },
        units: r.int(10)?,
        at: r.int(11)?,
    })
}
