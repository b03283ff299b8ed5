"""The customer's reads through asyncpg (named prepared statements, binary): run directly on
legacy and through a proxy serving them from the target by tests/routing_clients.rs, which
compares the two transcripts."""
import asyncio
import json
import sys

import asyncpg

BY_ID = "SELECT * FROM affiliates WHERE affiliate_id = $1"
CHILDREN = """SELECT affiliate_id, name, registration_date FROM affiliates
WHERE parent_affiliate_id = $1 ORDER BY registration_date, affiliate_id"""
NETWORK = """WITH RECURSIVE downline AS (
    SELECT affiliate_id, 1 AS depth FROM affiliates WHERE parent_affiliate_id = $1
    UNION ALL
    SELECT a.affiliate_id, d.depth + 1
    FROM affiliates a JOIN downline d ON a.parent_affiliate_id = d.affiliate_id
    WHERE d.depth < $2
)
SELECT COUNT(*) FROM downline"""


async def main(url):
    conn = await asyncpg.connect(url)
    out = []
    by_id = await conn.prepare(BY_ID)
    children = await conn.prepare(CHILDREN)
    for rnd in range(2):
        for i in range(1, 41):
            out.append(["by_id", [list(r.items()) for r in await by_id.fetch(i)]])
            out.append(["children", [list(r.items()) for r in await children.fetch(i)]])
            out.append(["network", await conn.fetchval(NETWORK, i, 3)])
    await conn.close()
    for line in out:
        print(json.dumps(line, default=str, ensure_ascii=False))


asyncio.run(main(sys.argv[1]))
