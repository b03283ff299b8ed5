"""asyncpg scenario (binary protocol, prepared statements): run directly and through the
proxy by tests/clients.rs, which compares the two transcripts."""
import asyncio
import datetime
import json
import sys
from decimal import Decimal

import asyncpg

out = []


def emit(tag, value):
    out.append(json.dumps([tag, value], default=repr, sort_keys=True, ensure_ascii=False))


async def main(url):
    conn = await asyncpg.connect(url)
    await conn.execute(
        "CREATE TABLE t (id int8 PRIMARY KEY, n numeric(12,3), at timestamptz, j jsonb,"
        " a int4[], b bytea, s text, f float8)"
    )
    at = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    await conn.executemany(
        "INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        [
            (1, Decimal("10.500"), at, '{"k": 1}', [1, 2], b"\x01", "um", 0.25),
            (2, None, None, None, None, None, None, None),
        ],
    )
    stmt = await conn.prepare("SELECT * FROM t WHERE id = $1")
    for i in (1, 2, 3, 1, 2):
        emit("prepared", [tuple(r) for r in await stmt.fetch(i)])
    emit("attributes", [(a.name, a.type.name) for a in stmt.get_attributes()])
    result = await conn.copy_records_to_table(
        "t", records=[(10 + i, Decimal(i), at, None, [i], None, f"r{i}", None) for i in range(50)],
        columns=["id", "n", "at", "j", "a", "b", "s", "f"],
    )
    emit("copy_records_to_table", result)
    emit("count", await conn.fetchval("SELECT count(*) FROM t"))
    try:
        await conn.execute("INSERT INTO t (id) VALUES (1)")
    except asyncpg.PostgresError as e:
        emit("error", [e.sqlstate, e.message, e.detail, e.constraint_name])
    async with conn.transaction():
        acc = []
        async for r in conn.cursor("SELECT g FROM generate_series(1, 30) g", prefetch=4):
            acc.append(r[0])
        emit("cursor", acc)
    try:
        async with conn.transaction():
            await conn.execute("UPDATE t SET s = 'rolled back' WHERE id = 1")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    emit("after rollback", await conn.fetchval("SELECT s FROM t WHERE id = 1"))
    await conn.close()


asyncio.run(main(sys.argv[1]))
print("\n".join(out))
