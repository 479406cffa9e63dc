-- pglease control plane, version 3: people signed in with the identity provider
-- (`pglease login`). A row is found by the SHA-256 of its session token; the token itself is
-- only ever with the person. The identity provider's refresh token is kept sealed with a key
-- derived from the session token, so this table alone opens nothing.
CREATE TABLE pglease.logins (
    token_sha256  text PRIMARY KEY,
    body          jsonb NOT NULL,
    expires_at    timestamptz NOT NULL
);
CREATE INDEX logins_expires_at ON pglease.logins (expires_at);
