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

print("done", flush=True)
