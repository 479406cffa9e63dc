//! Micro-benchmarks of the per-statement hot path, no network: the policy decision (from
//! scratch, from the exact-text cache, from the shape cache) over a corpus of real statements,
//! audit record sealing (canonical JSON + SHA-256), and framing a result set.
//!
//! `cargo bench --bench hotpath`

mod common;


use bytes::{BufMut, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pglease::audit::record::{Body, GENESIS, ResultRecord, SessionInfo, StatementRecord, seal};
use pglease::codec::{FramedReader, ReadEvent};
use pglease::codec::frame::FrameLimits;
use pglease::policy::ScopePolicy;

/// What clients really send: pgbench, psql's `\d` machinery, ORM-style statements.
const CORPUS: &[(&str, &str)] = &[
    ("pgbench -S", "SELECT abalance FROM pgbench_accounts WHERE aid = 48211;"),
    ("pgbench update", "UPDATE pgbench_accounts SET abalance = abalance + -4157 WHERE aid = 48211;"),
    ("pgbench insert", "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (7, 1, 48211, -4157, CURRENT_TIMESTAMP);"),
    (
        "psql \\dt",
        "SELECT n.nspname as \"Schema\", c.relname as \"Name\", CASE c.relkind WHEN 'r' THEN 'table' WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view' WHEN 'i' THEN 'index' WHEN 'S' THEN 'sequence' WHEN 't' THEN 'TOAST table' WHEN 'f' THEN 'foreign table' WHEN 'p' THEN 'partitioned table' WHEN 'I' THEN 'partitioned index' END as \"Type\", pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\" FROM pg_catalog.pg_class c LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_catalog.pg_am am ON am.oid = c.relam WHERE c.relkind IN ('r','p','') AND n.nspname <> 'pg_catalog' AND n.nspname !~ '^pg_toast' AND n.nspname <> 'information_schema' AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 1,2;",
    ),
    (
        "ORM select",
        "SELECT \"pgbench_accounts\".\"aid\", \"pgbench_accounts\".\"bid\", \"pgbench_accounts\".\"abalance\" FROM \"pgbench_accounts\" INNER JOIN \"pgbench_branches\" ON (\"pgbench_accounts\".\"bid\" = \"pgbench_branches\".\"bid\") WHERE (\"pgbench_branches\".\"bbalance\" > $1 AND \"pgbench_accounts\".\"aid\" IN (SELECT \"aid\" FROM \"pgbench_history\" WHERE \"delta\" < $2)) ORDER BY \"pgbench_accounts\".\"aid\" DESC LIMIT 21",
    ),
];

fn bench_scope() -> ScopePolicy {
    let scopes = common::bench_scopes("bench_role");
    ScopePolicy::from_config("bench", &scopes["bench"])
}

/// The same statement with its first number changed, so the exact-text cache misses.
fn vary(sql: &str, i: u64) -> String {
    match sql.find("48211") {
        Some(at) => format!("{}{}{}", &sql[..at], 10_000 + i % 80_000, &sql[at + 5..]),
        None => sql.to_owned(),
    }
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    for (name, sql) in CORPUS {
        let scope = bench_scope();
        g.bench_function(format!("uncached/{name}"), |b| b.iter(|| scope.decide_uncached(sql)));
        scope.decide(sql);
        g.bench_function(format!("exact hit/{name}"), |b| b.iter(|| scope.decide(sql)));
        if sql.contains("48211") {
            let mut i = 0;
            g.bench_function(format!("shape hit/{name}"), |b| {
                b.iter_batched(
                    || {
                        i += 1;
                        vary(sql, i)
                    },
                    |s| scope.decide(&s),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn audit(c: &mut Criterion) {
    let session = SessionInfo {
        session: 42,
        grant: Some("g-7f3a".into()),
        user: "alice".into(),
        scope: Some("bench".into()),
        login: "alice_g7f3a".into(),
        client: "127.0.0.1:50432".into(),
        database: "bench".into(),
    };
    let statement = Body::Statement {
        session: session.into(),
        statement: StatementRecord {
            stmt: 1234,
            protocol: "extended".into(),
            sql: CORPUS[0].1.into(),
            decision: "allow".into(),
            ..StatementRecord::default()
        },
    };
    let result = Body::Result { session: 42, result: ResultRecord { stmt: 1234, tags: vec!["SELECT 1".into()], rows: 1, duration_us: 87, ..ResultRecord::default() } };
    let mut g = c.benchmark_group("audit");
    g.bench_function("seal statement record", |b| b.iter(|| seal(&statement, 99, GENESIS, "2026-11-27T08:00:00.000Z")));
    g.bench_function("seal result record", |b| b.iter(|| seal(&result, 100, GENESIS, "2026-11-27T08:00:00.001Z")));
    g.finish();
}

fn framing(c: &mut Criterion) {
    // A result set as Postgres sends it: RowDescription, 1,000 DataRows, CommandComplete, ReadyForQuery.
    let mut wire = BytesMut::new();
    let message = |wire: &mut BytesMut, tag: u8, body: &[u8]| {
        wire.put_u8(tag);
        wire.put_i32(body.len() as i32 + 4);
        wire.put_slice(body);
    };
    message(&mut wire, b'T', &[0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 23, 0, 4, 255, 255, 255, 255, 0, 0]);
    for i in 0..1000u32 {
        let value = format!("{:0>40}", i);
        let mut row = vec![0, 1];
        row.extend_from_slice(&(value.len() as i32).to_be_bytes());
        row.extend_from_slice(value.as_bytes());
        message(&mut wire, b'D', &row);
    }
    message(&mut wire, b'C', b"SELECT 1000\0");
    message(&mut wire, b'Z', b"I");
    let wire = wire.freeze();
    let limits = FrameLimits { max_frame: 1 << 20, streamable: b"dD", stream_threshold: 1 << 20 };
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(wire.len() as u64));
    g.bench_function("1000-row result set", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut reader = FramedReader::new(&wire[..], limits.clone());
                let mut n = 0;
                while let Some(ReadEvent::Frame(f)) = reader.next().await.unwrap() {
                    n += f.len();
                }
                n
            })
        })
    });
    g.finish();
}

criterion_group!(benches, policy, audit, framing);
criterion_main!(benches);
