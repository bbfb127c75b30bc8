-- farebox-balance schema version 2 (PostgreSQL): fleet leases (issue 12).
-- recalled_at: when another holder's lease call recalled the lease's unspent
-- units; settle_seq: the highest settle sequence number seen; refunded: units
-- credited back by lease refunds. lease_refunds: one row per refunded client
-- request (its request id is the idempotency key).
ALTER TABLE leases ADD COLUMN recalled_at BIGINT;
ALTER TABLE leases ADD COLUMN settle_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE leases ADD COLUMN refunded BIGINT NOT NULL DEFAULT 0;
CREATE TABLE lease_refunds (
    request_id TEXT PRIMARY KEY,
    lease_id   TEXT NOT NULL REFERENCES leases(lease_id),
    account_id TEXT NOT NULL REFERENCES accounts(account_id),
    units      BIGINT NOT NULL CHECK (units > 0),
    status     BIGINT,
    at         BIGINT NOT NULL
);
CREATE INDEX lease_refunds_by_lease ON lease_refunds(lease_id);
