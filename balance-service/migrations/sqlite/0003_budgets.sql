-- farebox-balance schema version 3 (SQLite): budgets, webhook outbox, export
-- indexes (issue 17).
-- budgets: one spend limit per account per period (day, week or month in an
-- IANA time zone). budget_spend: units counted against the budget in each
-- period, keyed by the period's start (Unix ms); written in the transaction
-- of the debit, so the limit holds under concurrency.
CREATE TABLE budgets (
    account_id  TEXT PRIMARY KEY NOT NULL REFERENCES accounts(account_id),
    limit_units INTEGER NOT NULL CHECK (limit_units >= 0),
    period      TEXT NOT NULL CHECK (period IN ('day', 'week', 'month')),
    time_zone   TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE budget_spend (
    account_id   TEXT NOT NULL REFERENCES accounts(account_id),
    period_start INTEGER NOT NULL,
    spent        INTEGER NOT NULL CHECK (spent >= 0),
    PRIMARY KEY (account_id, period_start)
);
-- The webhook outbox: written in the transaction of the debit that caused the
-- event, delivered (and retried) by a background task.
CREATE TABLE webhook_events (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    delivered_at    INTEGER,
    gave_up_at      INTEGER,
    last_error      TEXT
);
CREATE INDEX webhook_events_due ON webhook_events(next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
-- GET /admin/charges reads by time.
CREATE INDEX charges_by_time ON charges(at);
CREATE INDEX charges_by_refund_time ON charges(refunded_at) WHERE refunded_at IS NOT NULL;
CREATE INDEX leases_by_close_time ON leases(closed_at) WHERE closed_at IS NOT NULL;
CREATE INDEX lease_refunds_by_time ON lease_refunds(at);
