"""psycopg 3 (libpq) through pglease: the driver workload of tests/drivers.rs.

Connection settings come from the standard PG* environment variables. Prints one line per
check ("ok <name>") and exits non-zero at the first failure.
"""

import os
import sys
import threading
import time

import psycopg
from psycopg import errors, sql


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok {name}", flush=True)


def connect(**kw):
    # TLS verified against the test CA, SCRAM with channel binding required.
    return psycopg.connect(sslmode="verify-full", channel_binding="require", **kw)


marker = os.environ["DRIVER_MARKER"]

with connect(autocommit=True) as conn:
    check("tls", conn.info.pgconn.ssl_in_use)

    # Simple protocol, several statements in one message (client-side binding cursor).
    cur = psycopg.ClientCursor(conn)
    cur.execute("INSERT INTO t VALUES (100); SELECT count(*) FROM t WHERE id = 100")
    check("simple multi-statement", cur.statusmessage == "INSERT 0 1" and cur.nextset() and cur.fetchone()[0] == 1)

    # Extended protocol with text parameters, then the prepared-statement cache (libpq named
    # statements after prepare_threshold executions).
    conn.prepare_threshold = 2
    for i in range(6):
        row = conn.execute("SELECT id + %s FROM t WHERE id = %s", (i, 100)).fetchone()
        check(f"extended #{i}", row[0] == 100 + i)

    # Binary parameters and results.
    with conn.cursor(binary=True) as bcur:
        bcur.execute("SELECT %b::int4 * 2, %b::bytea, %b::text", (21, b"\x00\x01\xff", "héllo"))
        check("binary", bcur.fetchone() == (42, b"\x00\x01\xff", "héllo"))

    # Transactions and savepoints.
    conn.autocommit = False
    conn.execute("INSERT INTO t VALUES (101)")
    try:
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (102)")
            conn.execute("SELECT 1 / 0")
    except errors.DivisionByZero:
        pass
    conn.commit()
    conn.autocommit = True
    ids = [r[0] for r in conn.execute("SELECT id FROM t WHERE id IN (101, 102) ORDER BY id")]
    check("savepoint rolled back, transaction committed", ids == [101], str(ids))

    # COPY in and out.
    with conn.cursor().copy("COPY t (id) FROM STDIN") as copy:
        for i in range(200, 210):
            copy.write_row((i,))
    out = []
    with conn.cursor().copy("COPY (SELECT id FROM t WHERE id >= 200 ORDER BY id) TO STDOUT") as copy:
        for row in copy.rows():
            out.append(int(row[0]))
    check("copy in and out", out == list(range(200, 210)), str(out))

    # LISTEN / NOTIFY between two sessions.
    with connect(autocommit=True) as other:
        conn.execute("LISTEN driver_channel")
        other.execute("NOTIFY driver_channel, 'hello'")
        got = next(conn.notifies(timeout=10), None)
        check("listen/notify", got is not None and got.payload == "hello", str(got))

    # Cancel a running statement; the session goes on.
    timer = threading.Timer(0.5, conn.cancel)
    timer.start()
    started = time.monotonic()
    try:
        conn.execute("SELECT pg_sleep(30)")
        check("cancel", False, "pg_sleep was not cancelled")
    except errors.QueryCanceled:
        check("cancel", time.monotonic() - started < 10)
    check("after cancel", conn.execute("SELECT 1").fetchone()[0] == 1)

    # A statement the scope denies: SQLSTATE 42501, and the session goes on.
    try:
        conn.execute(f"SELECT * FROM people /* {marker} */")
        check("denied", False, "people was readable")
    except errors.InsufficientPrivilege as e:
        check("denied", e.sqlstate == "42501" and "scope" in str(e), str(e))
    check("after denial", conn.execute("SELECT count(*) FROM t WHERE id = 100").fetchone()[0] == 1)

    # The pid the client was told is the backend's own: its notifications and pg_backend_pid()
    # carry it, so a client can tell its own notifications apart (psycopg, many apps do).
    pid = conn.info.backend_pid
    check("pid is the backend's", conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid)
    conn.execute("LISTEN self_channel")
    conn.execute("NOTIFY self_channel, 'me'")
    got = next(conn.notifies(timeout=10), None)
    check("own notification carries own pid", got is not None and got.pid == pid, str(got))

    # libpq 17+ cancels over TLS (PQcancelBlocking) and reads the connection to its end.
    errors_seen = []

    def cancel_safe():
        try:
            conn.cancel_safe(timeout=10)
        except Exception as e:  # noqa: BLE001 - reported below
            errors_seen.append(e)

    timer = threading.Timer(0.5, cancel_safe)
    timer.start()
    try:
        conn.execute("SELECT pg_sleep(30)")
        check("cancel_safe", False, "pg_sleep was not cancelled")
    except errors.QueryCanceled:
        timer.join()
        check("cancel_safe", not errors_seen, str(errors_seen))

    # SET search_path where the scope allows it: names resolve under the path in force.
    conn.execute("SET search_path TO app")
    check("search_path set", conn.execute("SELECT name FROM items").fetchone()[0] == "widget")
    conn.execute("RESET search_path")
    try:
        conn.execute("SELECT name FROM items")
        check("search_path reset", False, "public.items was allowed")
    except errors.InsufficientPrivilege as e:
        check("search_path reset", "public.items" in str(e), str(e))

# The client's own application_name, while pg_stat_activity shows who is behind the session.
with connect(autocommit=True, application_name="driver-app") as conn:
    check("application_name reported", conn.info.parameter_status("application_name") == "driver-app",
          str(conn.info.parameter_status("application_name")))
    check("SHOW application_name", conn.execute("SHOW application_name").fetchone()[0] == "driver-app")
    conn.execute("SET application_name = 'renamed'")
    check("SET application_name reported", conn.info.parameter_status("application_name") == "renamed")
    stamped = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0]
    check("pg_stat_activity stamp", stamped.startswith("pglease alice ") and stamped.endswith(" / renamed"), stamped)

# Startup settings, as the scope's settings rule decides them.
with connect(autocommit=True, options="-c statement_timeout=5s -c jit=off") as conn:
    check("startup settings", conn.execute("SHOW statement_timeout").fetchone()[0] == "5s")
try:
    connect(options="-c work_mem=1GB").close()
    check("startup setting refused", False, "work_mem was accepted")
except psycopg.OperationalError as e:
    check("startup setting refused", "does not allow changing setting work_mem" in str(e), str(e))

# The scope's second database.
with connect(autocommit=True, dbname=os.environ["PGDATABASE"] + "_2") as conn:
    check("second database", conn.execute("SELECT id FROM t").fetchone()[0] == 2002)

print("done", flush=True)
