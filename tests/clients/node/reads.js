// The customer's reads through node-postgres (unnamed statements each time, and a named one):
// run directly on legacy and through a proxy serving them from the target by
// tests/routing_clients.rs, which compares the two transcripts.
const { Client } = require('pg');

const BY_ID = 'SELECT * FROM affiliates WHERE affiliate_id = $1';
const CHILDREN = `SELECT affiliate_id, name, registration_date FROM affiliates
WHERE parent_affiliate_id = $1 ORDER BY registration_date, affiliate_id`;

async function main(url) {
  const client = new Client({ connectionString: url });
  await client.connect();
  const out = [];
  for (let round = 0; round < 2; round++) {
    for (let i = 1; i <= 40; i++) {
      const a = await client.query(BY_ID, [i]);
      out.push(['by_id', a.fields.map((f) => [f.name, f.dataTypeID]), a.rows]);
      const b = await client.query({ name: 'children', text: CHILDREN, values: [i] });
      out.push(['children', b.rows]);
    }
  }
  await client.end();
  for (const line of out) console.log(JSON.stringify(line));
}

main(process.argv[2]).catch((e) => { console.error(e); process.exit(1); });
