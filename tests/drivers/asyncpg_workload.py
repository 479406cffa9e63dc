"""asyncpg through pglease: the driver workload of tests/drivers.rs.

asyncpg speaks the protocol itself (binary format, its own statement cache). It has no SCRAM
channel binding; TLS is verified against the test CA. Connection settings come from the PG*
environment variables. Prints "ok <name>" per check and exits non-zero at the first failure.
"""

import asyncio
import os
import ssl
import sys
import time

import asyncpg


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok {name}", flush=True)


def tls():
    ctx = ssl.create_default_context(cafile=os.environ["PGSSLROOTCERT"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def connect():
    return await asyncpg.connect(ssl=tls(), statement_cache_size=100)


async def main():
    marker = os.environ["DRIVER_MARKER"]
    conn = await connect()
    check("tls", conn.get_settings() is not None and conn._transport.get_extra_info("sslcontext") is not None)

    # Simple protocol (execute without arguments), several statements in one message.
    status = await conn.execute("INSERT INTO t VALUES (100); INSERT INTO t VALUES (103)")
    check("simple multi-statement", status == "INSERT 0 1", status)

    # Extended protocol; asyncpg prepares and caches every statement, parameters are binary.
    for i in range(6):
        v = await conn.fetchval("SELECT id + $1 FROM t WHERE id = $2", i, 100)
        check(f"extended #{i}", v == 100 + i)
    stmt = await conn.prepare("SELECT $1::int4 * 2, $2::bytea, $3::text")
    check("binary", tuple(await stmt.fetchrow(21, b"\x00\x01\xff", "héllo")) == (42, b"\x00\x01\xff", "héllo"))

    # Transactions and savepoints (nested transaction blocks are savepoints).
    async with conn.transaction():
        await conn.execute("INSERT INTO t VALUES (101)")
        try:
            async with conn.transaction():
                await conn.execute("INSERT INTO t VALUES (102)")
                await conn.execute("SELECT 1 / 0")
        except asyncpg.DivisionByZeroError:
            pass
    ids = [r[0] for r in await conn.fetch("SELECT id FROM t WHERE id IN (101, 102) ORDER BY id")]
    check("savepoint rolled back, transaction committed", ids == [101], str(ids))

    # COPY in and out.
    await conn.copy_records_to_table("t", records=[(i,) for i in range(200, 210)], columns=["id"])
    out = []

    class Sink:
        async def write(self, data):
            out.append(data)

    await conn.copy_from_query("SELECT id FROM t WHERE id >= 200 ORDER BY id", output=Sink().write)
    got = [int(x) for x in b"".join(out).decode().split()]
    check("copy in and out", got == list(range(200, 210)), str(got))

    # LISTEN / NOTIFY between two sessions.
    other = await connect()
    received = asyncio.get_running_loop().create_future()
    await conn.add_listener("driver_channel", lambda *args: received.done() or received.set_result(args[3]))
    await other.execute("NOTIFY driver_channel, 'hello'")
    check("listen/notify", await asyncio.wait_for(received, 10) == "hello")
    await other.close()

    # Cancel: asyncpg sends a CancelRequest when the awaiting task is cancelled or times out.
    started = time.monotonic()
    try:
        await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
        check("cancel", False, "pg_sleep was not cancelled")
    except asyncio.TimeoutError:
        check("cancel", time.monotonic() - started < 10)
    check("after cancel", await conn.fetchval("SELECT 1") == 1)

    # A statement the scope denies: SQLSTATE 42501, and the session goes on.
    try:
        await conn.fetch(f"SELECT * FROM people /* {marker} */")
        check("denied", False, "people was readable")
    except asyncpg.InsufficientPrivilegeError as e:
        check("denied", e.sqlstate == "42501" and "scope" in str(e), str(e))
    check("after denial", await conn.fetchval("SELECT count(*) FROM t WHERE id = 100") == 1)

    # A non-builtin type: asyncpg introspects it, wrapped in set_config('jit', 'off', false).
    check("enum type", await conn.fetchval("SELECT 'happy'::mood") == "happy")
    check("enum array", await conn.fetchval("SELECT ARRAY['sad', 'happy']::mood[]") == ["sad", "happy"])
    check("pid is the backend's", conn.get_server_pid() == await conn.fetchval("SELECT pg_backend_pid()"))
    await conn.close()

    # A pool: every release runs pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL.
    # server_settings are startup parameters, decided by the scope's settings rule.
    pool = await asyncpg.create_pool(ssl=tls(), min_size=1, max_size=2, server_settings={"statement_timeout": "10s"})
    for i in range(6):
        async with pool.acquire() as pc:
            check(f"pool #{i}", await pc.fetchval("SELECT count(*) FROM t WHERE id = 100") == 1)
            check(f"pool setting #{i}", await pc.fetchval("SHOW statement_timeout") == "10s")
            check(f"pool enum #{i}", await pc.fetchval("SELECT $1::mood", "sad") == "sad")
    await pool.close()
    print("done", flush=True)


asyncio.run(main())
