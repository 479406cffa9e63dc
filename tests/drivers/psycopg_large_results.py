"""psycopg 3 (libpq's async API) fetching large results through pglease, over and over.

Each connection fetches 1,024 rows of 10 KiB five times. libpq up to 18.0 hung on such results
when the server's TLS records carried more than its input buffer takes in one read (see
`MAX_RECORD_PLAINTEXT` in src/tls.rs). An alarm turns a hang into a failure. Connection
settings come from the PG* variables; the number of connections is the first argument.
"""

import signal
import sys

import psycopg

runs = int(sys.argv[1])
QUERY = "SELECT i, repeat('x', 10240) FROM generate_series(1, 1024) i"


def hung(*_):
    print(f"FAIL hang (libpq {psycopg.pq.version()})", flush=True)
    sys.exit(1)


signal.signal(signal.SIGALRM, hung)
for run in range(runs):
    signal.alarm(60)
    with psycopg.connect(sslmode="verify-full") as conn:
        for _ in range(5):
            rows = conn.execute(QUERY).fetchall()
            if len(rows) != 1024 or len(rows[-1][1]) != 10240:
                print(f"FAIL run {run}: {len(rows)} rows", flush=True)
                sys.exit(1)
    signal.alarm(0)
print(f"ok {runs} runs (psycopg {psycopg.__version__}, libpq {psycopg.pq.version()})", flush=True)
print("done", flush=True)
