// node-postgres through pglease: the driver workload of tests/drivers.rs.
//
// TLS verified against the test CA, SCRAM-SHA-256-PLUS (channel binding). node-postgres has no
// COPY of its own (pg-copy-streams adds it), so COPY is not part of this workload. Connection
// settings come from the PG* environment variables. Prints "ok <name>" per check and exits
// non-zero at the first failure.
'use strict';

const fs = require('fs');
const { Client } = require('pg');

function check(name, cond, detail = '') {
  if (!cond) {
    console.log(`FAIL ${name} ${detail}`);
    process.exit(1);
  }
  console.log(`ok ${name}`);
}

function connect(extra = {}) {
  return new Client({
    ssl: { ca: fs.readFileSync(process.env.PGSSLROOTCERT), minVersion: 'TLSv1.2' },
    enableChannelBinding: true,
    ...extra,
  });
}

async function main() {
  const marker = process.env.DRIVER_MARKER;
  const conn = connect();
  await conn.connect();
  check('tls', conn.connection.stream.encrypted === true);

  // Simple protocol (no values), several statements in one message.
  const results = await conn.query('INSERT INTO t VALUES (100); SELECT count(*)::int AS n FROM t WHERE id = 100');
  check('simple multi-statement', results.length === 2 && results[1].rows[0].n === 1);

  // Extended protocol; a named statement is prepared once per connection and reused.
  for (let i = 0; i < 6; i++) {
    const r = await conn.query({ name: 'add', text: 'SELECT id + $1::int AS v FROM t WHERE id = $2', values: [i, 100] });
    check(`extended #${i}`, r.rows[0].v === 100 + i);
  }

  // Binary results (values are sent as text by node-postgres; results asked in binary).
  const b = await conn.query({ text: 'SELECT $1::int4 * 2 AS n, $2::text AS s', values: [21, 'héllo'], binary: true });
  check('binary', b.fields.every((f) => f.format === 'binary') && b.rows[0].n === 42 && b.rows[0].s === 'héllo', JSON.stringify(b.rows[0]));

  // Transactions and savepoints.
  await conn.query('BEGIN');
  await conn.query('INSERT INTO t VALUES (101)');
  await conn.query('SAVEPOINT s');
  await conn.query('INSERT INTO t VALUES (102)');
  await conn.query('SELECT 1 / 0').then(() => check('division by zero', false), (e) => check('division by zero', e.code === '22012', e.code));
  await conn.query('ROLLBACK TO SAVEPOINT s');
  await conn.query('COMMIT');
  const ids = (await conn.query('SELECT id FROM t WHERE id IN (101, 102) ORDER BY id')).rows.map((r) => r.id);
  check('savepoint rolled back, transaction committed', ids.length === 1 && ids[0] === 101, JSON.stringify(ids));

  // LISTEN / NOTIFY between two sessions.
  const other = connect();
  await other.connect();
  const received = new Promise((resolve) => conn.on('notification', (n) => resolve(n.payload)));
  await conn.query('LISTEN driver_channel');
  await other.query("NOTIFY driver_channel, 'hello'");
  const payload = await Promise.race([received, new Promise((r) => setTimeout(() => r('timeout'), 10000).unref())]);
  check('listen/notify', payload === 'hello', payload);
  await other.end();

  // Cancel with the backend key the proxy issued, over a second (plaintext) connection, as
  // node-postgres does it.
  const started = Date.now();
  const sleeping = conn.query('SELECT pg_sleep(30)').then(() => null, (e) => e);
  await new Promise((r) => setTimeout(r, 500));
  const canceller = connect();
  canceller.cancel(conn, conn.activeQuery);
  const err = await sleeping;
  check('cancel', err && err.code === '57014' && Date.now() - started < 10000, err && err.code);
  check('after cancel', (await conn.query('SELECT 1 AS one')).rows[0].one === 1);

  // A statement the scope denies: SQLSTATE 42501, and the session goes on.
  const denied = await conn.query(`SELECT * FROM people /* ${marker} */`).then(() => null, (e) => e);
  check('denied', denied && denied.code === '42501' && /scope/.test(denied.message), denied && denied.message);
  check('after denial', (await conn.query('SELECT count(*)::int AS n FROM t WHERE id = 100')).rows[0].n === 1);
  await conn.end();

  // Settings from the connection config are startup parameters, decided by the scope's
  // settings rule; the client's application_name is the one it sees back.
  const timed = connect({ statement_timeout: 1000, idle_in_transaction_session_timeout: 60000, application_name: 'node-app' });
  await timed.connect();
  check('startup statement_timeout', (await timed.query('SHOW statement_timeout')).rows[0].statement_timeout === '1s');
  const timeout = await timed.query('SELECT pg_sleep(5)').then(() => null, (e) => e);
  check('statement_timeout applies', timeout && timeout.code === '57014' && /statement timeout/.test(timeout.message), timeout && timeout.message);
  check('application_name', (await timed.query('SHOW application_name')).rows[0].application_name === 'node-app');
  await timed.end();
  console.log('done');
}

main().catch((e) => {
  console.log(`FAIL exception ${e.stack}`);
  process.exit(1);
});
