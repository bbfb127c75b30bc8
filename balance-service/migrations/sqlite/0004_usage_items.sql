-- farebox-balance schema version 3 (SQLite): usage lines (issue 16), so a bill can be
-- itemised by route and model. One row per metered request (its request id is the
-- idempotency key): the route rule, the model it was priced by, its tokens per class,
-- and the units it cost. lease_id is set when a lease paid for it (the line then moves
-- no money; the lease's settles do), NULL when it came with POST /v1/usage.
CREATE TABLE usage_items (
    request_id                  TEXT PRIMARY KEY NOT NULL,
    account_id                  TEXT NOT NULL REFERENCES accounts(account_id),
    lease_id                    TEXT REFERENCES leases(lease_id),
    route                       TEXT NOT NULL,
    model                       TEXT,
    input_tokens                INTEGER NOT NULL CHECK (input_tokens >= 0),
    cached_input_tokens         INTEGER NOT NULL CHECK (cached_input_tokens >= 0),
    cache_creation_input_tokens INTEGER NOT NULL CHECK (cache_creation_input_tokens >= 0),
    output_tokens               INTEGER NOT NULL CHECK (output_tokens >= 0),
    reasoning_tokens            INTEGER NOT NULL CHECK (reasoning_tokens >= 0),
    units                       INTEGER NOT NULL CHECK (units >= 0),
    at                          INTEGER NOT NULL
);
CREATE INDEX usage_items_by_account ON usage_items(account_id, at);
