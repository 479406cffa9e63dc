"""psycopg 3 under a scope that masks people.ssn (partial(0, 4)) and people.name (redact).

`SELECT *`, explicit columns, text and binary results, and COPY all return masked values; a
masked column in WHERE is refused. Connection settings come from the PG* variables. Prints
"ok <name>" per check and "done" at the end; exits non-zero at the first failure.
"""

import sys

import psycopg

REAL = ("111-11-1111", "222-22-2222", "ann", "bo")


def check(name, cond, detail=""):
    if not cond:
        print(f"FAIL {name} {detail}", flush=True)
        sys.exit(1)
    print(f"ok {name}", flush=True)


def no_real_value(rows):
    return not any(str(v) in REAL or any(r in str(v) for r in REAL[:2]) for row in rows for v in row)


notices = []
with psycopg.connect(sslmode="verify-full") as conn:
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    for binary in (False, True):
        kind = "binary" if binary else "text"
        with conn.cursor(binary=binary) as cur:
            cur.execute("SELECT * FROM people ORDER BY id")
            rows = cur.fetchall()
            names = [c.name for c in cur.description]
            check(f"{kind} columns", names == ["id", "name", "ssn"], names)
            check(f"{kind} masked", rows == [(1, "[redacted]", "*******1111"), (2, "[redacted]", "*******2222")], rows)
            cur.execute("SELECT ssn, upper(name) AS n FROM people WHERE id = %s", (2,))
            rows = cur.fetchall()
            check(f"{kind} parameters", rows == [("*******2222", "[REDACTED]")], rows)
            check(f"{kind} no real value", no_real_value(rows))
    check("notice", any("masked columns name, ssn of public.people" in n for n in notices), notices)
    with conn.cursor() as cur:
        with cur.copy("COPY people TO STDOUT") as copy:
            data = b"".join(bytes(b) for b in copy).decode()
        check("copy masked", "*******1111" in data and "111-11" not in data, data)
    try:
        conn.execute("SELECT id FROM people WHERE ssn = '111-11-1111'")
        check("where refused", False, "a masked column filtered")
    except psycopg.errors.InsufficientPrivilege as e:
        check("where refused", "masked column ssn" in str(e), str(e))
print("done", flush=True)
