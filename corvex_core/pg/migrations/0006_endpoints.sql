-- Reserved endpoints (issue 17) in a cluster: an endpoint runs on the replicas of one core's
-- capacity pool (its home core, which bills it), and every core reads it here to list it,
-- authorize calls that name it and send its requests home.
--
-- An endpoint's periods are charged at their start, one transaction each, straight from the
-- workspace's balance that no lease holds (and within the spend cap less what is leased), so
-- a period is charged at most once (its charge id), only while the endpoint is not deleted,
-- and never beyond what the workspace has. Nothing is held ahead: what the single core holds
-- for the next period in memory, a cluster charges when the period starts.

CREATE TABLE endpoints (
    id              TEXT PRIMARY KEY,
    workspace_id    TEXT NOT NULL REFERENCES workspaces (id),
    name            TEXT NOT NULL,
    -- What the workspace's keys send: `<workspace-slug>/<name>`.
    model_id        TEXT NOT NULL,
    offering_id     TEXT NOT NULL,
    base_model      TEXT NOT NULL,
    replicas        INTEGER NOT NULL CHECK (replicas >= 1),
    created_at      TIMESTAMPTZ NOT NULL,
    -- The core whose pool runs its replicas (cores.core_id): only that core bills it.
    core_id         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'active'
        CHECK (status IN ('active', 'suspended', 'deleted')),
    suspended_by    TEXT CHECK (suspended_by IN ('balance', 'spend_cap')),
    -- The last period charged (0: none yet) and where it ends.
    period          INTEGER NOT NULL DEFAULT 0 CHECK (period >= 0),
    paid_until      TIMESTAMPTZ,
    charged_nano    BIGINT NOT NULL DEFAULT 0 CHECK (charged_nano >= 0),
    -- Resizes that charged (numbering their charge ids).
    resizes         INTEGER NOT NULL DEFAULT 0 CHECK (resizes >= 0),
    -- What its home core last said of its replicas (starting, running, failed, ...) and why,
    -- for the cores that list it.
    phase           TEXT NOT NULL DEFAULT 'starting',
    reason          TEXT NOT NULL DEFAULT '',
    CONSTRAINT suspended_by_suspended CHECK ((status = 'suspended') = (suspended_by IS NOT NULL)),
    CONSTRAINT paid_when_billed CHECK ((period = 0) = (paid_until IS NULL))
);
-- A workspace's live endpoints have names of their own (a race between cores loses here).
CREATE UNIQUE INDEX endpoints_live_model ON endpoints (workspace_id, model_id)
    WHERE status <> 'deleted';
CREATE INDEX endpoints_by_core ON endpoints (core_id) WHERE status <> 'deleted';

-- What an endpoint was charged: each period ('<endpoint>:p<period>') and each resize that
-- added replicas for the rest of a period ('<endpoint>:r<n>'). The usage of reserved time.
CREATE TABLE endpoint_charges (
    charge_id          TEXT PRIMARY KEY,
    endpoint_id        TEXT NOT NULL REFERENCES endpoints (id),
    workspace_id       TEXT NOT NULL REFERENCES workspaces (id),
    core_id            TEXT NOT NULL,
    replica_seconds    BIGINT NOT NULL CHECK (replica_seconds >= 0),
    cost_nano          BIGINT NOT NULL CHECK (cost_nano >= 0),
    rate_card_version  TEXT NOT NULL,
    at                 TIMESTAMPTZ NOT NULL
);
CREATE INDEX endpoint_charges_by_workspace ON endpoint_charges (workspace_id, at);
