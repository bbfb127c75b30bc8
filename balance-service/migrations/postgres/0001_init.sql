-- farebox-balance schema version 1 (PostgreSQL). Amounts and times are
-- BIGINT (Unix milliseconds); states are TEXT restricted by CHECK to the
-- names of the service's enums. `seq` columns keep insertion order for the
-- admin lists.
CREATE TABLE accounts (
    account_id      TEXT PRIMARY KEY,
    balance         BIGINT NOT NULL,
    initial_balance BIGINT NOT NULL,
    disabled        BOOLEAN NOT NULL DEFAULT FALSE,
    created_at      BIGINT NOT NULL
);
CREATE TABLE keys (
    key_hash   TEXT PRIMARY KEY,
    account_id TEXT NOT NULL REFERENCES accounts(account_id)
);
CREATE TABLE charges (
    request_id    TEXT PRIMARY KEY,
    seq           BIGINT GENERATED ALWAYS AS IDENTITY,
    account_id    TEXT NOT NULL REFERENCES accounts(account_id),
    cost          BIGINT NOT NULL,
    route         TEXT NOT NULL,
    method        TEXT NOT NULL,
    path          TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('charged', 'refunded')),
    refund_status BIGINT,
    at            BIGINT NOT NULL,
    refunded_at   BIGINT
);
CREATE INDEX charges_by_account ON charges(account_id, seq);
CREATE TABLE topups (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topup_id   TEXT UNIQUE,
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    amount     BIGINT NOT NULL,
    at         BIGINT NOT NULL
);
CREATE INDEX topups_by_account ON topups(account_id);
CREATE TABLE leases (
    lease_id   TEXT PRIMARY KEY,
    seq        BIGINT GENERATED ALWAYS AS IDENTITY,
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    holder     TEXT NOT NULL,
    request_id TEXT NOT NULL UNIQUE,
    granted    BIGINT NOT NULL CHECK (granted > 0),
    used       BIGINT NOT NULL DEFAULT 0 CHECK (used >= 0 AND used <= granted),
    state      TEXT NOT NULL CHECK (state IN ('open', 'settled', 'expired', 'cancelled')),
    charged    BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    closed_at  BIGINT
);
CREATE INDEX leases_by_account ON leases(account_id, state, expires_at);
CREATE INDEX leases_by_state ON leases(state, expires_at);
CREATE TABLE usages (
    request_id TEXT PRIMARY KEY REFERENCES charges(request_id),
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    estimate   BIGINT,
    actual     BIGINT NOT NULL,
    at         BIGINT NOT NULL
);
