-- The cluster ledger: accounts, credit and token leases, charges, and the cores that spend.
--
-- Money is BIGINT nano-USD (1e-9 USD), never a float and never NUMERIC (drivers hand NUMERIC
-- to code as floats too easily). Times are TIMESTAMPTZ written by the caller's clock, never
-- now() here, so that tests can move time. Months are UTC calendar months, 'YYYY-MM'.
--
-- Invariants that one row can state are CHECKs below. Two span tables and are kept by
-- corvex_core/pg/leases.py (and asserted by its tests):
--   workspaces.leased_nano = sum of leases.credit_nano of that workspace
--   keys.tokens_leased     = sum of token_leases.tokens of that key
-- The spend cap is not a CHECK: an admin may lower a cap below what was already spent this
-- month. Leases enforce it instead: month_spend_nano + leased_nano never grows past the cap.

CREATE TABLE workspaces (
    id                          TEXT PRIMARY KEY,
    name                        TEXT NOT NULL,
    created_at                  TIMESTAMPTZ NOT NULL,
    balance_nano                BIGINT NOT NULL DEFAULT 0,
    -- Credit currently leased to cores: part of the balance that no other core may lease.
    leased_nano                 BIGINT NOT NULL DEFAULT 0,
    -- month_spend_nano is the spend of `month`; the first write in a later month resets it.
    month                       TEXT NOT NULL,
    month_spend_nano            BIGINT NOT NULL DEFAULT 0,
    spend_cap_nano              BIGINT,
    auto_reload_threshold_nano  BIGINT,
    auto_reload_amount_nano     BIGINT,
    auto_reload_error           TEXT NOT NULL DEFAULT '',
    CONSTRAINT balance_not_negative CHECK (balance_nano >= 0),
    CONSTRAINT leased_within_balance CHECK (leased_nano >= 0 AND leased_nano <= balance_nano),
    CONSTRAINT month_spend_not_negative CHECK (month_spend_nano >= 0),
    CONSTRAINT month_is_utc_month CHECK (month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    CONSTRAINT cap_not_negative CHECK (spend_cap_nano >= 0),
    CONSTRAINT auto_reload_whole CHECK (
        (auto_reload_threshold_nano IS NULL) = (auto_reload_amount_nano IS NULL)
    ),
    CONSTRAINT auto_reload_amounts CHECK (
        auto_reload_threshold_nano >= 0 AND auto_reload_amount_nano > 0
    )
);

CREATE TABLE keys (
    id                    TEXT PRIMARY KEY,
    workspace_id          TEXT NOT NULL REFERENCES workspaces (id),
    name                  TEXT NOT NULL,
    prefix                TEXT NOT NULL,
    -- Only the hash of the secret is stored; authentication looks keys up by it.
    secret_sha256         BYTEA NOT NULL UNIQUE,
    created_at            TIMESTAMPTZ NOT NULL,
    revoked_at            TIMESTAMPTZ,
    -- Limits: NULL means none of that kind.
    limit_rpm             BIGINT,
    limit_tpm             BIGINT,
    limit_monthly_tokens  BIGINT,
    -- Tokens (prompt + completion) charged in `month`, and tokens leased to cores.
    month                 TEXT NOT NULL,
    month_tokens          BIGINT NOT NULL DEFAULT 0,
    tokens_leased         BIGINT NOT NULL DEFAULT 0,
    -- Lets charges name (workspace, key) and so refuse a key of another workspace.
    UNIQUE (workspace_id, id),
    CONSTRAINT secret_sha256_is_sha256 CHECK (length(secret_sha256) = 32),
    CONSTRAINT limits_positive CHECK (
        limit_rpm > 0 AND limit_tpm > 0 AND limit_monthly_tokens > 0
    ),
    CONSTRAINT month_is_utc_month CHECK (month ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'),
    CONSTRAINT month_tokens_not_negative CHECK (month_tokens >= 0),
    CONSTRAINT tokens_leased_not_negative CHECK (tokens_leased >= 0)
);

-- Invoice numbers are global and without gaps, as on a single core (INV-000001, ...): the one
-- row below is locked by each top-up, which serialises top-ups (rare) and nothing else. A
-- sequence would leave a gap at every rolled-back top-up.
CREATE TABLE invoice_counter (
    singleton    BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    next_number  BIGINT NOT NULL CHECK (next_number >= 1)
);
INSERT INTO invoice_counter (next_number) VALUES (1);

CREATE TABLE invoices (
    number              BIGINT PRIMARY KEY CHECK (number >= 1),
    workspace_id        TEXT NOT NULL REFERENCES workspaces (id),
    created_at          TIMESTAMPTZ NOT NULL,
    amount_nano         BIGINT NOT NULL CHECK (amount_nano > 0),
    method              TEXT NOT NULL CHECK (method IN ('manual', 'starter', 'auto_reload')),
    balance_after_nano  BIGINT NOT NULL CHECK (balance_after_nano >= amount_nano),
    idempotency_key     TEXT NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    -- A top-up retried with the same key is the same top-up.
    UNIQUE (workspace_id, idempotency_key)
);

-- The usage records. A charge id is made by the core once per request, so a charge retried
-- (a lost commit acknowledgement, a journal shipped twice) is stored and counted once.
CREATE TABLE charges (
    charge_id             TEXT PRIMARY KEY,
    request_id            TEXT NOT NULL,
    workspace_id          TEXT NOT NULL REFERENCES workspaces (id),
    key_id                TEXT NOT NULL,
    core_id               TEXT NOT NULL,
    model                 TEXT NOT NULL,
    prompt_tokens         BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens     BIGINT NOT NULL CHECK (completion_tokens >= 0),
    cached_prompt_tokens  BIGINT NOT NULL
        CHECK (cached_prompt_tokens >= 0 AND cached_prompt_tokens <= prompt_tokens),
    cost_nano             BIGINT NOT NULL CHECK (cost_nano >= 0),
    rate_card_version     TEXT NOT NULL,
    at                    TIMESTAMPTZ NOT NULL,
    FOREIGN KEY (workspace_id, key_id) REFERENCES keys (workspace_id, id)
);
CREATE INDEX charges_by_workspace ON charges (workspace_id, at);

-- A credit lease: part of a workspace's balance (and of its cap headroom) that one core may
-- spend without asking. A row exists exactly while the lease does; release and expiry delete
-- it and give its remaining credit back to the workspace.
CREATE TABLE leases (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    core_id       TEXT NOT NULL,
    workspace_id  TEXT NOT NULL REFERENCES workspaces (id),
    credit_nano   BIGINT NOT NULL CHECK (credit_nano >= 0),
    granted_at    TIMESTAMPTZ NOT NULL,
    expires_at    TIMESTAMPTZ NOT NULL,
    CHECK (expires_at > granted_at)
);
CREATE INDEX leases_by_expiry ON leases (expires_at);
CREATE INDEX leases_by_workspace ON leases (workspace_id);

-- The same for a key's monthly token limit.
CREATE TABLE token_leases (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    core_id     TEXT NOT NULL,
    key_id      TEXT NOT NULL REFERENCES keys (id),
    tokens      BIGINT NOT NULL CHECK (tokens >= 0),
    granted_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    CHECK (expires_at > granted_at)
);
CREATE INDEX token_leases_by_expiry ON token_leases (expires_at);
CREATE INDEX token_leases_by_key ON token_leases (key_id);

-- Membership: each core upserts its row as a heartbeat.
CREATE TABLE cores (
    core_id       TEXT PRIMARY KEY,
    address       TEXT NOT NULL,
    heartbeat_at  TIMESTAMPTZ NOT NULL
);
