-- pglease control plane, version 2: the fleet. Each instance announces itself (and keeps
-- announcing: a heartbeat), publishes its live sessions, and copies its audit chain here.

-- One row per instance that ever ran; `heartbeat_at` tells the live ones. `process` is random
-- per start: a second live process with the same id finds the row taken and does not serve.
CREATE TABLE pglease.instances (
    id            text PRIMARY KEY,
    process       text NOT NULL,
    proxy         text NOT NULL,
    admin         text NOT NULL,
    version       text NOT NULL,
    started_at    timestamptz NOT NULL,
    heartbeat_at  timestamptz NOT NULL
);

-- The live sessions of every instance, as `session list` shows them. An instance replaces its
-- own rows; the rows of an instance whose heartbeat stopped are not shown, and are removed.
CREATE TABLE pglease.sessions (
    instance     text NOT NULL REFERENCES pglease.instances (id) ON DELETE CASCADE,
    id           bigint NOT NULL,
    person       text NOT NULL,
    login        text NOT NULL,
    grant_id     text,
    scope        text,
    database     text NOT NULL,
    client       text NOT NULL,
    started_at   timestamptz NOT NULL,
    statements   bigint NOT NULL,
    -- The upstream backend's pid: where a cancel request for it is forwarded.
    backend_pid  integer NOT NULL,
    PRIMARY KEY (instance, id)
);
CREATE INDEX sessions_backend_pid ON pglease.sessions (backend_pid);

-- Every instance's audit records, copied from its file log (the file stays the source of
-- truth). Each instance has a hash chain and a sequence of its own.
CREATE TABLE pglease.audit (
    instance  text NOT NULL,
    seq       bigint NOT NULL,
    at        timestamptz NOT NULL,
    kind      text NOT NULL,
    session   bigint,
    hash      text NOT NULL,
    prev      text NOT NULL,
    record    jsonb NOT NULL,
    PRIMARY KEY (instance, seq)
);

-- Grant lifecycle events (requested, approved, session opened…) from every instance.
CREATE TABLE pglease.events (
    id        bigserial PRIMARY KEY,
    instance  text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    kind      text NOT NULL,
    body      jsonb NOT NULL
);
CREATE INDEX events_at ON pglease.events (at);

-- What one instance is asked to do by another: end a session, cancel a statement. Only
-- pglease's role may read or write it (a new table grants nothing to PUBLIC). LISTEN and NOTIFY
-- need no privilege at all, so a notification carries no request, only "look in the table".
-- `process` names the process meant: a restarted instance ignores its predecessor's requests.
CREATE TABLE pglease.requests (
    id         bigserial PRIMARY KEY,
    instance   text NOT NULL,
    process    text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('kill', 'cancel')),
    session    bigint,
    by_person  text,
    pid        integer,
    secret     bytea,
    made_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX requests_instance ON pglease.requests (instance);
REVOKE ALL ON SCHEMA pglease FROM PUBLIC;
