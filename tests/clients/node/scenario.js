// node-postgres scenario: run directly and through the proxy by tests/clients.rs, which
// compares the two transcripts.
const { Client } = require('pg');
const Cursor = require('pg-cursor');

const out = [];
const emit = (tag, value) => out.push(JSON.stringify([tag, value]));

async function main(url) {
  const client = new Client({ connectionString: url });
  await client.connect();
  client.on('notice', (n) => emit('notice', n.message));
  await client.query(`CREATE TABLE t (id int PRIMARY KEY, n numeric(12,3), at timestamptz,
                      j jsonb, a int[], b bytea, s text)`);
  for (const row of [
    [1, '10.500', '2024-01-02T03:04:05Z', { k: [1, 2] }, [1, 2, 3], Buffer.from([0, 255]), 'olá'],
    [2, null, null, null, null, null, null],
  ]) {
    const r = await client.query('INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6, $7)', row);
    emit('insert', [r.command, r.rowCount]);
  }
  const sel = await client.query('SELECT * FROM t ORDER BY id');
  emit('fields', sel.fields.map((f) => [f.name, f.dataTypeID]));
  emit('rows', sel.rows.map((r) => ({ ...r, at: r.at && r.at.toISOString(), b: r.b && r.b.toString('hex') })));
  for (let i = 0; i < 5; i++) {
    const r = await client.query({ name: 'by-id', text: 'SELECT s FROM t WHERE id = $1', values: [1 + (i % 2)] });
    emit('named', r.rows);
  }
  try {
    await client.query('SELECT * FROM nowhere');
  } catch (e) {
    emit('error', [e.code, e.message, e.severity, e.position]);
  }
  await client.query('BEGIN');
  const cursor = client.query(new Cursor('SELECT g FROM generate_series(1, 23) g'));
  const batches = [];
  for (;;) {
    const rows = await cursor.read(5);
    if (rows.length === 0) break;
    batches.push(rows.map((r) => r.g));
  }
  await cursor.close();
  await client.query('COMMIT');
  emit('cursor', batches);
  await client.query("DO $$ BEGIN RAISE NOTICE 'hi'; END $$");
  const multi = await client.query('SELECT 1 AS a; SELECT 2 AS b');
  emit('multi', multi.map((r) => r.rows));
  await client.end();
}

main(process.argv[2]).then(
  () => console.log(out.join('\n')),
  (e) => { console.error(e); process.exit(1); },
);
