-- A batch of charges as one statement: `LeaseStore.charge` calls corvex_charge, one round trip
-- where the same steps sent one by one took eight (BEGIN, lock the lease, insert, take the
-- token leases, pay the lease, the workspace, lock and count the keys, COMMIT), which is what
-- group commit costs per batch on a core's hot path. The steps and their lock order are
-- unchanged (the lease, its token leases by id, the workspace, keys by id: see leases.py), so
-- it deadlocks with nothing. Refusals carry SQLSTATEs of their own, which the store turns back
-- into its exceptions: CX001 the lease (or a token lease) is gone, CX002 the charges exceed it.
CREATE FUNCTION corvex_charge(
    p_lease BIGINT,
    p_month TEXT,
    p_give_back BIGINT,
    p_ids TEXT[],
    p_request_ids TEXT[],
    p_key_ids TEXT[],
    p_models TEXT[],
    p_prompt BIGINT[],
    p_completion BIGINT[],
    p_cached BIGINT[],
    p_cost BIGINT[],
    p_versions TEXT[],
    p_at TIMESTAMPTZ[],
    p_token_leases BIGINT[]
) RETURNS TEXT[] LANGUAGE plpgsql AS $$
DECLARE
    v_core TEXT;
    v_ws TEXT;
    v_new TEXT[];
    v_cost BIGINT;
    v_token_leases BIGINT[];
    v_count BIGINT;
BEGIN
    SELECT core_id, workspace_id INTO v_core, v_ws FROM leases WHERE id = p_lease
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        -- A retry of a batch that committed before its lease ended is "nothing new".
        IF (SELECT count(*) FROM charges WHERE charge_id = ANY(p_ids)) = cardinality(p_ids) THEN
            RETURN ARRAY[]::TEXT[];
        END IF;
        RAISE EXCEPTION 'lease % was released or has expired', p_lease USING ERRCODE = 'CX001';
    END IF;

    WITH inserted AS (
        INSERT INTO charges (charge_id, request_id, workspace_id, key_id, core_id, model,
                             prompt_tokens, completion_tokens, cached_prompt_tokens, cost_nano,
                             rate_card_version, at)
        SELECT u.id, u.request_id, v_ws, u.key_id, v_core, u.model, u.prompt, u.completion,
               u.cached, u.cost, u.version, u.at
        FROM unnest(p_ids, p_request_ids, p_key_ids, p_models, p_prompt, p_completion,
                    p_cached, p_cost, p_versions, p_at)
             AS u(id, request_id, key_id, model, prompt, completion, cached, cost, version, at)
        ON CONFLICT (charge_id) DO NOTHING
        RETURNING charge_id
    )
    SELECT coalesce(array_agg(charge_id), ARRAY[]::TEXT[]) INTO v_new FROM inserted;

    IF cardinality(v_new) > 0 THEN
        -- The tokens of the new charges come out of the token leases they name.
        SELECT coalesce(array_agg(DISTINCT u.token_lease ORDER BY u.token_lease),
                        ARRAY[]::BIGINT[])
        INTO v_token_leases
        FROM unnest(p_ids, p_token_leases) AS u(id, token_lease)
        WHERE u.token_lease IS NOT NULL AND u.id = ANY(v_new);
        IF cardinality(v_token_leases) > 0 THEN
            PERFORM 1 FROM token_leases WHERE id = ANY(v_token_leases) ORDER BY id
            FOR NO KEY UPDATE;
            SELECT count(*) INTO v_count FROM token_leases WHERE id = ANY(v_token_leases);
            IF v_count <> cardinality(v_token_leases) THEN
                RAISE EXCEPTION 'a token lease was released or has expired'
                    USING ERRCODE = 'CX001';
            END IF;
            IF EXISTS (
                SELECT 1 FROM unnest(p_ids, p_key_ids, p_token_leases) AS u(id, key_id, token_lease)
                JOIN token_leases AS t ON t.id = u.token_lease
                WHERE u.id = ANY(v_new) AND t.key_id <> u.key_id
            ) THEN
                RAISE EXCEPTION 'a token lease is not of the key charged' USING ERRCODE = 'CX002';
            END IF;
            WITH needed AS (
                SELECT u.token_lease, sum(u.prompt + u.completion) AS tokens
                FROM unnest(p_ids, p_token_leases, p_prompt, p_completion)
                     AS u(id, token_lease, prompt, completion)
                WHERE u.token_lease IS NOT NULL AND u.id = ANY(v_new)
                GROUP BY u.token_lease
            ), taken AS (
                UPDATE token_leases AS t SET tokens = t.tokens - n.tokens
                FROM needed AS n WHERE t.id = n.token_lease AND t.tokens >= n.tokens
                RETURNING t.id
            )
            SELECT count(*) INTO v_count FROM taken;
            IF v_count <> cardinality(v_token_leases) THEN
                RAISE EXCEPTION 'charges take more tokens than their token lease holds'
                    USING ERRCODE = 'CX002';
            END IF;
        END IF;

        SELECT sum(u.cost) INTO v_cost FROM unnest(p_ids, p_cost) AS u(id, cost)
        WHERE u.id = ANY(v_new);
        UPDATE leases SET credit_nano = credit_nano - v_cost
        WHERE id = p_lease AND credit_nano >= v_cost;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'charges of % nano-USD exceed lease %', v_cost, p_lease
                USING ERRCODE = 'CX002';
        END IF;
        UPDATE workspaces
        SET balance_nano = balance_nano - v_cost,
            leased_nano = leased_nano - v_cost,
            month_spend_nano = CASE WHEN p_month > month THEN 0 ELSE month_spend_nano END + v_cost,
            month = GREATEST(month, p_month)
        WHERE id = v_ws;

        PERFORM 1 FROM keys WHERE id IN (
            SELECT u.key_id FROM unnest(p_ids, p_key_ids) AS u(id, key_id) WHERE u.id = ANY(v_new)
        ) ORDER BY id FOR NO KEY UPDATE;
        WITH per_key AS (
            SELECT u.key_id, sum(u.prompt + u.completion) AS tokens,
                   sum(CASE WHEN u.token_lease IS NULL THEN 0 ELSE u.prompt + u.completion END)
                       AS leased
            FROM unnest(p_ids, p_key_ids, p_prompt, p_completion, p_token_leases)
                 AS u(id, key_id, prompt, completion, token_lease)
            WHERE u.id = ANY(v_new)
            GROUP BY u.key_id
        )
        UPDATE keys AS k
        SET month_tokens = CASE WHEN p_month > k.month THEN 0 ELSE k.month_tokens END + p.tokens,
            month = GREATEST(k.month, p_month),
            tokens_leased = k.tokens_leased - p.leased
        FROM per_key AS p WHERE k.id = p.key_id;
    END IF;

    IF p_give_back > 0 THEN
        UPDATE leases SET credit_nano = credit_nano - p_give_back
        WHERE id = p_lease AND credit_nano >= p_give_back;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'lease % holds less than the % nano-USD given back', p_lease,
                p_give_back USING ERRCODE = 'CX002';
        END IF;
        UPDATE workspaces SET leased_nano = leased_nano - p_give_back WHERE id = v_ws;
    END IF;
    RETURN v_new;
END
$$;
