-- farebox-balance schema version 1 (SQLite): the ledger as of the first
-- versioned release. Every statement is IF NOT EXISTS, so databases created
-- before migrations were versioned (PRAGMA user_version 1 or 2, with or
-- without the leases and usages tables) are brought to version 1 as they are.
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
    closed_at  INTEGER
);
CREATE INDEX IF NOT EXISTS leases_by_account ON leases(account_id, state, expires_at);
CREATE INDEX IF NOT EXISTS leases_by_state ON leases(state, expires_at);
CREATE TABLE IF NOT EXISTS usages (
    request_id TEXT PRIMARY KEY NOT NULL REFERENCES charges(request_id),
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    estimate   INTEGER,
    actual     INTEGER NOT NULL,
    at         INTEGER NOT NULL
);
