"""The customer's reads through psycopg 3 (server-side binding, prepared after the first
execution): run directly on legacy and through a proxy serving them from the target by
tests/routing_clients.rs, which compares the two transcripts."""
import json
import sys

import psycopg

BY_ID = "SELECT * FROM affiliates WHERE affiliate_id = %s"
CHILDREN = """SELECT affiliate_id, name, registration_date FROM affiliates
WHERE parent_affiliate_id = %s ORDER BY registration_date, affiliate_id"""
NETWORK = """WITH RECURSIVE downline AS (
    SELECT affiliate_id, 1 AS depth FROM affiliates WHERE parent_affiliate_id = %s
    UNION ALL
    SELECT a.affiliate_id, d.depth + 1
    FROM affiliates a JOIN downline d ON a.parent_affiliate_id = d.affiliate_id
    WHERE d.depth < %s
)
SELECT COUNT(*) FROM downline"""
ACTIVE = "SELECT COUNT(*) FROM affiliates WHERE status = 'active'"

out = []
with psycopg.connect(sys.argv[1], prepare_threshold=1, autocommit=True) as conn:
    for rnd in range(2):
        for i in range(1, 41):
            cur = conn.execute(BY_ID, (i,))
            out.append(["by_id", [d.name for d in cur.description], cur.fetchall()])
            out.append(["children", conn.execute(CHILDREN, (i,)).fetchall()])
            out.append(["network", conn.execute(NETWORK, (i, 3)).fetchall()])
        out.append(["active", conn.execute(ACTIVE).fetchall()])
    # Pipeline mode: many Parse/Bind/Execute before one Sync, the proxy's own messages
    # in between.
    with conn.pipeline():
        curs = [conn.execute(BY_ID, (i,)) for i in range(41, 61)]
        curs += [conn.execute(CHILDREN, (i,)) for i in range(41, 61)]
    for cur in curs:
        out.append(["pipelined", cur.fetchall()])
    # An error inside a pipeline: the rest up to the Sync is skipped, as the server does.
    try:
        with conn.pipeline():
            conn.execute(BY_ID, (5,))
            conn.execute("SELECT 1/0")
            conn.execute(BY_ID, (6,))
    except psycopg.errors.DivisionByZero as e:
        out.append(["pipeline error", e.sqlstate])
    out.append(["after the error", conn.execute(BY_ID, (7,)).fetchall()])
    # Binary results too.
    cur = conn.cursor(binary=True)
    for i in range(1, 11):
        cur.execute(BY_ID, (i,))
        out.append(["binary", cur.fetchall()])


def outcome(conn, sql, args, **kw):
    try:
        return ["ok", conn.execute(sql, args, **kw).fetchall()]
    except psycopg.Error as e:
        return ["error", e.sqlstate, e.diag.message_primary]


# Prepared statements the server does not have: the answers must be the server's own, with
# the client's names, whatever the proxy prepared beside them.
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    # Prepared inside a pipeline that an error aborted: never created.
    try:
        with conn.pipeline():
            conn.execute("SELECT 1/0")
            conn.execute(BY_ID, (8,), prepare=True)
    except psycopg.Error as e:
        out.append(["aborted pipeline", e.sqlstate])
    out.append(["after it", outcome(conn, BY_ID, (9,), prepare=True)])
    out.append(["again", outcome(conn, BY_ID, (10,), prepare=True)])
# Prepared by executemany inside a transaction an error aborted: psycopg takes it as
# prepared, the server never created it.
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    try:
        with conn.transaction():
            conn.execute("SELECT 1/0")
    except psycopg.Error as e:
        out.append(["aborted", e.sqlstate])
    conn.execute("BEGIN")
    out.append(["in error", outcome(conn, "SELECT 1/0", None)])
    try:
        conn.cursor().executemany(BY_ID, [(15,), (16,)])
        out.append(["executemany", "ok"])
    except psycopg.Error as e:
        out.append(["executemany", e.sqlstate])
    conn.execute("ROLLBACK")
    for i in range(17, 20):
        out.append(["after", outcome(conn, BY_ID, (i,))])
for drop in ["DEALLOCATE _pg3_0", "DEALLOCATE ALL", "DISCARD ALL"]:
    with psycopg.connect(sys.argv[1], autocommit=True) as conn:
        out.append(["prepared", outcome(conn, BY_ID, (11,), prepare=True)])
        out.append(["prepared", outcome(conn, BY_ID, (12,), prepare=True)])
        conn.execute(drop)
        out.append([drop, outcome(conn, BY_ID, (13,), prepare=True)])
        out.append([drop, outcome(conn, BY_ID, (14,), prepare=True)])
for line in out:
    print(json.dumps(line, default=str, ensure_ascii=False))
