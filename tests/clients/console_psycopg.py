"""The console through psycopg 3: SCRAM, the extended protocol with $n parameters (psycopg's
server-side binding), its own BEGIN/ROLLBACK, a prepared statement and a pipeline. Prints one
JSON line per step; tests/console.rs checks them. Argument: the console URL."""

import json
import sys

import psycopg


def say(*values):
    print(json.dumps(values, default=str), flush=True)


url = sys.argv[1]

# autocommit off (psycopg's default): psycopg sends BEGIN before the first command.
with psycopg.connect(url) as conn:
    cur = conn.cursor()
    cur.execute("SHOW VERSION")
    say("version", cur.fetchone()[0])
    cur.execute("SHOW QUERY_TYPES")
    names = [d.name for d in cur.description]
    say("columns", names)
    rows = {r[0]: r for r in cur.fetchall()}
    say("percent type", type(rows["top_referrers"][2]).__name__)
    # Parameters, bound by the server side: $1, $2.
    cur.execute(
        "MARK %s KIND drift COLUMNS %s CLASS %s NOTE %s",
        ("top_referrers", "level_1_referrals", "counter_drift", "from psycopg, it's here"),
    )
    say("mark", cur.statusmessage)
    conn.rollback()
    cur.execute("SHOW MARKS")
    say("marks", cur.fetchone()[4])
    try:
        cur.execute("SET STAGE %s shadow REASON %s", ("no_such_type", "why"))
    except psycopg.Error as e:
        say("unknown", e.sqlstate)
        conn.rollback()

with psycopg.connect(url, autocommit=True) as conn:
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    cur = conn.cursor()
    cur.execute(
        "SET STAGE %s shadow REASON %s", ("top_referrers", "psycopg, with 'quotes'")
    )
    say("set stage", cur.statusmessage)
    # prepare=True: a named prepared statement, executed twice.
    for _ in range(2):
        cur.execute("SHOW STATS", prepare=True)
        stats = {r[0]: r for r in cur.fetchall()}
    say("stats columns", [d.name for d in cur.description][:3])
    say("stats has", "top_referrers" in stats)
    with conn.pipeline():
        a = conn.execute("SHOW VERSION")
        b = conn.execute("SELECT 1")
    say("pipeline", a.fetchone()[0].startswith("cutover"), b.fetchone()[0])
    try:
        cur.execute("DROP TABLE affiliates")
    except psycopg.Error as e:
        say("unknown command", e.sqlstate)
    cur.execute("RESUME")
    say("resume notice", notices)

# A transaction block: the change stays, and ROLLBACK says so.
with psycopg.connect(url) as conn:
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute(
        "MARK top_referrers KIND error COLUMNS x CLASS in_a_block NOTE 'inside a block'"
    )
    conn.rollback()
    say("rollback notice", notices)
