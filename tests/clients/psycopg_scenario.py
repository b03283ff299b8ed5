"""psycopg 3 scenario: run directly and through the proxy by tests/clients.rs, which
compares the two transcripts. Prints one JSON object per line; nothing run-specific."""
import json
import sys
from decimal import Decimal

import psycopg

out = []


def emit(tag, value):
    out.append(json.dumps([tag, value], default=repr, sort_keys=True, ensure_ascii=False))


url = sys.argv[1]
notices = []
with psycopg.connect(url, prepare_threshold=0) as conn:
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    cur = conn.cursor()
    cur.execute(
        "CREATE TABLE t (id int PRIMARY KEY, n numeric(12,3), at timestamptz, j jsonb,"
        " a int[], b bytea, s text, f float8, ok bool)"
    )
    rows = [
        (1, Decimal("10.500"), "2024-01-02 03:04:05+00", '{"k": [1, 2]}', [1, 2, 3], b"\x00\xff", "olá", 1.5, True),
        (2, None, None, None, None, None, None, None, None),
        (3, Decimal("-0.001"), "1999-12-31 23:59:59.999999+00", "[]", [], b"", "", -0.0, False),
    ]
    cur.executemany(
        "INSERT INTO t VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s)", rows
    )
    emit("rowcount", cur.rowcount)
    cur.execute("SELECT * FROM t ORDER BY id")
    emit("description", [(d.name, d.type_code) for d in cur.description])
    emit("rows", cur.fetchall())

    bcur = conn.cursor(binary=True)
    bcur.execute("SELECT * FROM t WHERE id = ANY(%s) ORDER BY id", ([1, 3],))
    emit("binary rows", bcur.fetchall())

    with conn.pipeline():
        cur.execute("UPDATE t SET s = %s WHERE id = %s", ("pipelined", 2))
        cur.execute("SELECT s FROM t WHERE id = %s", (2,))
        emit("pipeline", cur.fetchone())
        c2 = conn.cursor()
        c2.execute("SELECT count(*) FROM t")
    emit("pipeline after", c2.fetchone())

    with cur.copy("COPY t (id, s) FROM STDIN") as copy:
        for i in range(100, 110):
            copy.write_row((i, f"copied {i}"))
    with cur.copy("COPY (SELECT id, s FROM t WHERE id >= 100 ORDER BY id) TO STDOUT") as copy:
        emit("copy out", [bytes(b).decode() for b in copy])

    try:
        cur.execute("SELECT 1/0")
    except psycopg.Error as e:
        emit("error", [e.sqlstate, e.diag.message_primary, e.diag.severity_nonlocalized])
        conn.rollback()

    conn.autocommit = True
    cur.execute("DO $$ BEGIN RAISE NOTICE 'notice %', 1; END $$")
    big = "y" * (50 << 20)
    cur.execute("SELECT length(%s), md5(%s)", (big, big))
    emit("big", cur.fetchone())

    conn.autocommit = False
    with conn.cursor(name="server_side") as named:
        named.itersize = 7
        named.execute("SELECT g FROM generate_series(1, 25) g")
        emit("named cursor", [r[0] for r in named])
    conn.commit()
emit("notices", notices)
print("\n".join(out))
