-- A credit grant as one statement: `LeaseStore.lease_credit` calls corvex_lease_credit, one
-- round trip where the same steps sent one by one took seven (BEGIN, lock the lease, lock the
-- workspace, count the grant onto it, make or grow the lease, COMMIT). Near $0 a core makes
-- one grant per admission, so this is a request's whole database cost there. The steps, the
-- lock order (the lease, then the workspace) and the policy are those of leases.py (`Want`):
-- nothing if less than `least` (or 1) is spendable, else up to `ahead` while spendable is at
-- least `exact_below`, up to `most` below it. Refusals carry their own SQLSTATEs: CX001 the
-- lease is gone, CX003 no such workspace.
CREATE FUNCTION corvex_lease_credit(
    p_workspace TEXT,
    p_core TEXT,
    p_lease BIGINT,
    p_least BIGINT,
    p_most BIGINT,
    p_ahead BIGINT,
    p_exact_below BIGINT,
    p_now TIMESTAMPTZ,
    p_expires TIMESTAMPTZ,
    p_month TEXT
) RETURNS TABLE (
    lease_id BIGINT,
    credit_nano BIGINT,
    expires_at TIMESTAMPTZ,
    granted_nano BIGINT,
    balance_nano BIGINT,
    leased_nano BIGINT,
    month TEXT,
    month_spend_nano BIGINT,
    spend_cap_nano BIGINT
) LANGUAGE plpgsql AS $$
DECLARE
    v_owner TEXT;
    w workspaces%ROWTYPE;
    v_month TEXT;
    v_spend BIGINT;
    v_room BIGINT;
    v_grant BIGINT;
BEGIN
    IF p_lease IS NOT NULL THEN
        SELECT l.workspace_id INTO v_owner FROM leases AS l
        WHERE l.id = p_lease AND l.expires_at > p_now FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'lease % was released or has expired', p_lease
                USING ERRCODE = 'CX001';
        END IF;
        IF v_owner <> p_workspace THEN
            RAISE EXCEPTION 'lease % is not of workspace %', p_lease, p_workspace
                USING ERRCODE = 'CX002';
        END IF;
    END IF;
    SELECT * INTO w FROM workspaces WHERE id = p_workspace FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no workspace %', p_workspace USING ERRCODE = 'CX003';
    END IF;
    v_month := GREATEST(w.month, p_month);
    v_spend := CASE WHEN v_month = w.month THEN w.month_spend_nano ELSE 0 END;
    v_room := w.balance_nano - w.leased_nano;
    IF w.spend_cap_nano IS NOT NULL THEN
        v_room := LEAST(v_room, w.spend_cap_nano - v_spend - w.leased_nano);
    END IF;
    v_grant := CASE
        WHEN v_room < GREATEST(p_least, 1) THEN 0
        WHEN v_room >= p_exact_below THEN LEAST(v_room, p_ahead)
        ELSE LEAST(v_room, p_most)
    END;
    IF v_grant > 0 THEN
        UPDATE workspaces AS u
        SET leased_nano = u.leased_nano + v_grant, month = v_month, month_spend_nano = v_spend
        WHERE u.id = p_workspace;
    END IF;
    balance_nano := w.balance_nano;
    leased_nano := w.leased_nano + v_grant;
    month := v_month;
    month_spend_nano := v_spend;
    spend_cap_nano := w.spend_cap_nano;
    granted_nano := v_grant;
    IF p_lease IS NULL THEN
        IF v_grant > 0 THEN
            INSERT INTO leases (core_id, workspace_id, credit_nano, granted_at, expires_at)
            VALUES (p_core, p_workspace, v_grant, p_now, p_expires)
            RETURNING leases.id, leases.credit_nano, leases.expires_at
            INTO lease_id, credit_nano, expires_at;
        END IF;
    ELSE
        UPDATE leases AS l SET credit_nano = l.credit_nano + v_grant, expires_at = p_expires
        WHERE l.id = p_lease
        RETURNING l.id, l.credit_nano, l.expires_at INTO lease_id, credit_nano, expires_at;
    END IF;
    RETURN NEXT;
END
$$;
