-- Customers in the cluster ledger (issue 16): users, their sessions, the starter claim,
-- checkouts, alert settings, sign-in failures and the recent-request log, so that the web app
-- works on every core. Times are written by the caller's clock, as everywhere here.

-- A user and the workspace it signed up with. Emails are stored as the Accounts service
-- normalised them (trimmed, lower case); one account per email.
CREATE TABLE users (
    id               TEXT PRIMARY KEY,
    email            TEXT NOT NULL UNIQUE,
    -- passwords.py's format; never the password.
    password_hash    TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    -- The invoice of the starter claim; NULL: not claimed. Once per user.
    starter_invoice  BIGINT UNIQUE REFERENCES invoices (number),
    CONSTRAINT email_bounded CHECK (length(email) BETWEEN 3 AND 254)
);

ALTER TABLE workspaces
    -- The user who signed up with it; NULL for a workspace an operator made.
    ADD COLUMN owner_user_id TEXT REFERENCES users (id),
    -- Alert settings (corvex_core/alerts.py): NULL threshold means none.
    ADD COLUMN alert_below_nano BIGINT CHECK (alert_below_nano >= 0),
    ADD COLUMN alert_webhook_url TEXT NOT NULL DEFAULT '',
    ADD COLUMN alert_webhook_secret TEXT NOT NULL DEFAULT '',
    -- The alert kinds in force when a core last looked, comma-separated: the core whose
    -- compare-and-set moves it is the one that sends the webhooks of the new ones.
    ADD COLUMN alerts_in_force TEXT NOT NULL DEFAULT '',
    ADD COLUMN alert_delivery_error TEXT NOT NULL DEFAULT '';
CREATE INDEX workspaces_by_owner ON workspaces (owner_user_id) WHERE owner_user_id IS NOT NULL;

-- A session: only the SHA-256 of its secret is stored; a call presents the secret.
CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    user_id        TEXT NOT NULL REFERENCES users (id),
    token_sha256   BYTEA NOT NULL UNIQUE,
    created_at     TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    CONSTRAINT token_sha256_is_sha256 CHECK (length(token_sha256) = 32),
    CHECK (expires_at > created_at)
);
CREATE INDEX sessions_by_user ON sessions (user_id, created_at);

-- A checkout opened with the payment provider; `invoice_number` once it was credited (its
-- credits carry the idempotency key 'checkout:<id>', so a double submit credits once).
CREATE TABLE checkouts (
    id               TEXT PRIMARY KEY,
    workspace_id     TEXT NOT NULL REFERENCES workspaces (id),
    amount_nano      BIGINT NOT NULL CHECK (amount_nano > 0),
    idempotency_key  TEXT NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    provider_id      TEXT NOT NULL,
    approve_url      TEXT NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL,
    invoice_number   BIGINT UNIQUE REFERENCES invoices (number),
    UNIQUE (workspace_id, idempotency_key)
);

-- Failed sign-ins per email, for the attempt limit every core shares.
CREATE TABLE sign_in_failures (
    email  TEXT NOT NULL,
    at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX sign_in_failures_by_email ON sign_in_failures (email, at);
CREATE INDEX sign_in_failures_by_time ON sign_in_failures (at);

-- The last metered requests of each workspace (refusals included), as the dashboard lists
-- them; at most a few hundred per workspace are kept (older ones are deleted as new ones come).
CREATE TABLE request_log (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workspace_id       TEXT NOT NULL REFERENCES workspaces (id),
    request_id         TEXT NOT NULL,
    at                 TIMESTAMPTZ NOT NULL,
    key_id             TEXT NOT NULL,
    model              TEXT NOT NULL,
    rpc                TEXT NOT NULL,
    status             TEXT NOT NULL,
    prompt_tokens      BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens  BIGINT NOT NULL CHECK (completion_tokens >= 0),
    cost_nano          BIGINT NOT NULL CHECK (cost_nano >= 0)
);
CREATE INDEX request_log_by_workspace ON request_log (workspace_id, id);
