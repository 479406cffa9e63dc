-- pglease control plane, version 1: the shared grant store.
-- Every row is the latest version of one grant; `version` grows by one with each change, and a
-- writer names the version it read, so two instances cannot both decide the same grant.
CREATE SCHEMA IF NOT EXISTS pglease;

CREATE TABLE pglease.grants (
    id          text PRIMARY KEY,
    version     bigint NOT NULL CHECK (version > 0),
    -- The grant as pglease serializes it. It holds the secret's SCRAM verifier, never the secret.
    body        jsonb NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
