-- farebox-balance schema version 3 (PostgreSQL): budgets, webhook outbox, export
-- indexes (issue 17).
-- budgets: one spend limit per account per period (day, week or month in an
-- IANA time zone). budget_spend: units counted against the budget in each
-- period, keyed by the period's start (Unix ms); written in the transaction
-- of the debit, so the limit holds under concurrency.
CREATE TABLE budgets (
    account_id  TEXT PRIMARY KEY REFERENCES accounts(account_id),
    limit_units BIGINT NOT NULL CHECK (limit_units >= 0),
    period      TEXT NOT NULL CHECK (period IN ('day', 'week', 'month')),
    time_zone   TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);
CREATE TABLE budget_spend (
    account_id   TEXT NOT NULL REFERENCES accounts(account_id),
    period_start BIGINT NOT NULL,
    spent        BIGINT NOT NULL CHECK (spent >= 0),
    PRIMARY KEY (account_id, period_start)
);
-- The webhook outbox: written in the transaction of the debit that caused the
-- event, delivered (and retried) by a background task.
CREATE TABLE webhook_events (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        TEXT NOT NULL UNIQUE,
    kind            TEXT NOT NULL,
    account_id      TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    delivered_at    BIGINT,
    gave_up_at      BIGINT,
    last_error      TEXT
);
CREATE INDEX webhook_events_due ON webhook_events(next_attempt_at)
    WHERE delivered_at IS NULL AND gave_up_at IS NULL;
-- GET /admin/charges reads by time.
CREATE INDEX charges_by_time ON charges(at);
CREATE INDEX charges_by_refund_time ON charges(refunded_at) WHERE refunded_at IS NOT NULL;
CREATE INDEX leases_by_close_time ON leases(closed_at) WHERE closed_at IS NOT NULL;
CREATE INDEX lease_refunds_by_time ON lease_refunds(at);
