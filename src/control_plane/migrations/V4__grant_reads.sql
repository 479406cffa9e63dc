-- pglease control plane, version 4: read budgets. What each grant has read over its whole life,
-- every instance's reads added into one row (an instance adds what it counted about once a
-- second and reads back the total).
CREATE TABLE pglease.grant_reads (
    grant_id    text PRIMARY KEY,
    rows_read   bigint NOT NULL DEFAULT 0 CHECK (rows_read >= 0),
    bytes_read  bigint NOT NULL DEFAULT 0 CHECK (bytes_read >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
