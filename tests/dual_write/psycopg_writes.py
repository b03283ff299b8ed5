"""The application's writes from psycopg 3 (extended protocol, unnamed statements, then
prepared ones; executemany in pipeline mode; a transaction with a savepoint), run by
tests/dual_write.rs directly and through the proxy with dual-write on. Prints one JSON
object per line; nothing run-specific."""
import json
import sys
from decimal import Decimal

import psycopg

out = []


def emit(tag, value):
    out.append(json.dumps([tag, value], default=repr, sort_keys=True, ensure_ascii=False))


url = sys.argv[1]
notices = []
with psycopg.connect(url, autocommit=True, prepare_threshold=3) as conn:
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    cur = conn.cursor()
    for i in range(8):
        cur.execute(
            "INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date)"
            " VALUES (%s, %s, %s, %s, now()) RETURNING affiliate_id",
            (1 + i % 4, f"py-{i}", f"Py {i}", f"py{i}@example.com"),
        )
        emit("new_affiliate", cur.fetchone())
        cur.execute(
            "UPDATE affiliates SET total_deposits = total_deposits + %s, updated_at = now()"
            " WHERE affiliate_id = %s",
            (Decimal("12.34"), 30 + i),
        )
        emit("record_deposit", cur.rowcount)
    # executemany: psycopg pipelines it (many Parse/Bind/Execute before one Sync).
    cur.executemany(
        "UPDATE affiliates SET status = %s, updated_at = now() WHERE affiliate_id = %s",
        [("inactive", 40 + i) for i in range(10)],
    )
    emit("set_status many", cur.rowcount)
    cur.executemany(
        "INSERT INTO affiliates (external_id, name, email, registration_date)"
        " VALUES (%s, %s, %s, now())"
        " ON CONFLICT (external_id) DO UPDATE SET name = EXCLUDED.name, email = EXCLUDED.email, updated_at = now()",
        [(f"py-{i}", "Renamed", None) for i in range(0, 12, 2)],
    )
    emit("upsert many", cur.rowcount)
    with conn.pipeline():
        cur.execute("UPDATE affiliates SET parent_affiliate_id = %s WHERE external_id = %s", (5, "py-1"))
        cur.execute("DELETE FROM affiliates WHERE external_id = %s RETURNING affiliate_id", ("py-3",))
    emit("pipeline delete", cur.fetchall())
    try:
        cur.execute(
            "INSERT INTO affiliates (external_id, name, registration_date) VALUES (%s, %s, now())",
            ("py-0", "dup"),
        )
    except psycopg.Error as e:
        emit("error", [e.sqlstate, e.diag.message_primary, e.diag.message_detail])
    with conn.transaction():
        cur.execute(
            "INSERT INTO affiliates (parent_affiliate_id, external_id, name, registration_date)"
            " VALUES (%s, %s, %s, now()) RETURNING affiliate_id",
            (2, "py-tx", "Tx"),
        )
        emit("in transaction", cur.fetchone())
        try:
            with conn.transaction():
                cur.execute("UPDATE affiliates SET total_bets = 1 WHERE external_id = %s", ("py-tx",))
                raise RuntimeError("roll the savepoint back")
        except RuntimeError:
            pass
    cur.execute(
        "SELECT external_id, parent_affiliate_id, name, email, status, total_deposits, total_bets"
        " FROM affiliates WHERE external_id LIKE 'py-%%' ORDER BY external_id"
    )
    emit("legacy rows", cur.fetchall())
emit("notices", notices)
print("\n".join(out))
