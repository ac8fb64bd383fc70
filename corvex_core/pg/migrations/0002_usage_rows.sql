-- A charge row may stand for several requests: `corvex ledger migrate` copies the usage a
-- single core kept only as daily totals (older than its last journal snapshot) as one row per
-- (day, key, model) with the number of requests it sums. A core's own charges are one each.
ALTER TABLE charges ADD COLUMN requests BIGINT NOT NULL DEFAULT 1 CHECK (requests >= 1);
