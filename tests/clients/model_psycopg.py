"""psycopg 3 as a driver of tests/safe_cutover.rs's model: one connection, transactions read
as JSON lines on stdin, their answers written as JSON lines on stdout.

A transaction: {"mode": "client" | "server" | "prepared" | "pipeline", "begin": bool,
"end": "COMMIT" | "ROLLBACK" | null, "statements": [{"sql", "params": [[...]], "returns"}]}.
`sql` has `$n` parameters; `params` holds one list of values per execution (more than one:
`executemany`); a value is a JSON number or string, or {"numeric": "1.25"}.

- client: ClientCursor (values merged into the SQL by psycopg, the simple protocol);
- server: the default cursor (the extended protocol, unnamed statements);
- prepared: prepare=True (named prepared statements);
- pipeline: the whole transaction in one pipeline (psycopg's pipeline mode; every statement
  sent before the answers are read).

An answer: {"rows": [[str | null]]} (sorted), {"count": n} or {"error": {...}}. Columns in
`MASKED` are left out: timestamps taken by now() differ between the two databases.
"""

import decimal
import json
import re
import sys

import logging

import psycopg

# psycopg warns when a pipeline that failed is left; the model leaves them on purpose.
logging.getLogger("psycopg").setLevel(logging.ERROR)

MASKED = {"registration_date", "created_at", "updated_at", "level_1_referrals"}


def value(v):
    if isinstance(v, dict):
        return decimal.Decimal(v["numeric"])
    return v


def to_psycopg(sql):
    # $n -> %(pn)s; a literal % would need doubling (the model's SQL has none).
    return re.sub(r"\$(\d+)", lambda m: "%(p" + m.group(1) + ")s", sql)


def args(values):
    return {f"p{i + 1}": value(v) for i, v in enumerate(values)}


def text(v):
    if v is None:
        return None
    if isinstance(v, bool):
        return "t" if v else "f"
    return str(v)


def error(e):
    d = e.diag
    return {
        "error": {
            "code": d.sqlstate or type(e).__name__,
            "message": d.message_primary or str(e),
            "schema": d.schema_name,
            "table": d.table_name,
            "column": d.column_name,
            "constraint": d.constraint_name,
            "detail": d.message_detail,
        }
    }


def rows_of(cur):
    """The rows of every result set the cursor holds (executemany with returning)."""
    rows = []
    while True:
        if cur.description is not None:
            keep = [i for i, c in enumerate(cur.description) if c.name not in MASKED]
            rows.extend([text(r[i]) for i in keep] for r in cur.fetchall())
        if not cur.nextset():
            break
    rows.sort(key=lambda r: [(x is None, x or "") for x in r])
    return {"rows": rows}


def answer(cur, statement):
    if statement["returns"]:
        return rows_of(cur)
    return {"count": cur.rowcount}


def execute(conn, cur, statement, mode):
    sql = to_psycopg(statement["sql"])
    params = [args(p) for p in statement["params"]]
    if len(params) > 1:
        cur.executemany(sql, params, returning=statement["returns"])
    else:
        cur.execute(sql, params[0] if params and params[0] else None, prepare=(mode == "prepared") or None)


def plain(conn, tx):
    """Statements one at a time, each answer read before the next is sent."""
    answers = []
    factory = psycopg.ClientCursor if tx["mode"] == "client" else psycopg.Cursor
    if tx["begin"]:
        try:
            conn.execute("BEGIN")
        except psycopg.Error as e:
            answers.append(error(e))
    for statement in tx["statements"]:
        cur = factory(conn)
        try:
            execute(conn, cur, statement, tx["mode"])
            answers.append(answer(cur, statement))
        except psycopg.Error as e:
            answers.append(error(e))
    if tx["end"]:
        try:
            conn.execute(tx["end"])
            answers.append({"count": 0})
        except psycopg.Error as e:
            answers.append(error(e))
    return answers


def pipelined(conn, tx):
    """The whole transaction in one pipeline: sent, then answered.

    Where psycopg raises a statement's error depends on timing (at a later execute(), at the
    sync), so the answers are: every error raised, in order, but the aborted-pipeline ones
    (the first is the failing statement's); then each statement's result, or none (failed or
    skipped); then the end's.
    """
    raised = []
    cursors = []
    end = None
    try:
        with conn.pipeline() as p:
            if tx["begin"]:
                conn.execute("BEGIN")
            for statement in tx["statements"]:
                cur = conn.cursor()
                cursors.append((cur, statement))
                try:
                    execute(conn, cur, statement, "server")
                except psycopg.Error as e:
                    raised.append(e)
            if tx["end"]:
                end = conn.cursor()
                try:
                    end.execute(tx["end"])
                except psycopg.Error as e:
                    raised.append(e)
            try:
                p.sync()
            except psycopg.Error as e:
                raised.append(e)
    except psycopg.Error as e:
        raised.append(e)
    real = [error(e)["error"] for e in raised if not isinstance(e, psycopg.errors.PipelineAborted)]
    answers = [{"pipeline_errors": real}]
    for cur, statement in cursors + ([(end, {"returns": False})] if end else []):
        try:
            answers.append(answer(cur, statement))
        except psycopg.Error:
            answers.append({"none": True})
    return answers


def main():
    conn = psycopg.connect(sys.argv[1], autocommit=True)
    for line in sys.stdin:
        tx = json.loads(line)
        try:
            out = pipelined(conn, tx) if tx["mode"] == "pipeline" else plain(conn, tx)
        except psycopg.OperationalError as e:
            out = [{"fatal": str(e)}]
        except psycopg.Error as e:
            out = [{"uncaught": error(e)["error"]}]
        # A transaction left open by an error is closed, as the Rust drivers close theirs;
        # what psycopg still had to say then (an error of the last pipeline) is part of the
        # answers.
        # (psycopg may raise a pipeline's error at the first ROLLBACK, then roll back.)
        for _ in range(3):
            try:
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    conn.execute("ROLLBACK")
                break
            except psycopg.Error as e:
                out.append({"cleanup": error(e)["error"]})
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
