//! Real drivers through the proxy: each runs a scripted workload (TLS, SCRAM, simple and
//! extended queries, the driver's statement cache, binary values, transactions and savepoints,
//! COPY where the driver has it, LISTEN/NOTIFY, cancel, and a statement the scope denies) with a
//! grant's login. The scripts are in `tests/drivers/`; `scripts/dev.sh test` installs the drivers
//! (psycopg 3 and asyncpg from PyPI, node-postgres from npm, the JDBC driver from Debian).

mod common;

use std::path::Path;
use std::process::Command;

use common::grants::{EnvOptions, GrantsEnv};

/// Runs a driver workload with the grant's login in the standard PG* variables; returns its
/// output after checking it finished every step.
async fn run_workload(env: &GrantsEnv, program: &str, args: &[&str], dir: &Path) -> String {
    let marker = format!("driver_denied_{}", std::process::id());
    let stdout = run_script(env, program, args, dir, &marker).await;
    assert!(!common::postgres_saw(&marker).await, "the denied statement reached Postgres");
    let direct = env.direct().await;
    let rows: i64 = direct.query_one("SELECT count(*) FROM t WHERE id = 100", &[]).await.unwrap().get(0);
    assert_eq!(rows, 1, "the workload's insert is in Postgres");
    stdout
}

/// Runs a script with a fresh `app` grant's login; returns its output once it printed "done".
async fn run_script(env: &GrantsEnv, program: &str, args: &[&str], dir: &Path, marker: &str) -> String {
    run_script_as(env, "app", program, args, dir, marker).await
}

/// Runs a script with a fresh grant of `scope`; returns its output once it printed "done".
async fn run_script_as(env: &GrantsEnv, scope: &str, program: &str, args: &[&str], dir: &Path, marker: &str) -> String {
    let h = common::harness().await;
    let (_, login, password) = env.active_grant(scope, "1h").await;
    let (program, args, dir) = (program.to_owned(), args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), dir.to_owned());
    let port = env.proxy_addr.port().to_string();
    let database = env.database.clone();
    let ca = h.ca_file.clone();
    let marker2 = marker.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .args(&args)
            .current_dir(&dir)
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", port)
            .env("PGUSER", &login)
            .env("PGPASSWORD", &password)
            .env("PGDATABASE", database)
            .env("PGSSLROOTCERT", ca)
            .env("DRIVER_MARKER", marker2)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program} (scripts/dev.sh test installs the drivers): {e}"))
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && stdout.lines().last() == Some("done"), "workload failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn drivers_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/drivers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_workload() {
    let env = GrantsEnv::start(EnvOptions { second_database: true, ..EnvOptions::default() }).await;
    let out = run_workload(&env, "python3", &["psycopg_workload.py"], &drivers_dir()).await;
    for step in ["ok binary", "ok copy in and out", "ok denied", "ok own notification carries own pid", "ok cancel_safe", "ok search_path reset", "ok SHOW application_name", "ok startup setting refused", "ok second database"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
}

/// libpq's async API (psycopg 3.3.4 bundles libpq 18.0) hung on large results through pglease
/// in about half of the runs when its TLS records were 16 KiB; 100 connections must not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg3_large_results_never_hang() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let out = run_script(&env, "python3", &["psycopg_large_results.py", "100"], &drivers_dir(), "unused").await;
    assert!(out.contains("ok 100 runs"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_workload() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let out = run_workload(&env, "python3", &["asyncpg_workload.py"], &drivers_dir()).await;
    for step in ["ok binary", "ok cancel", "ok denied", "ok enum type", "ok pool #5", "ok pool setting #5", "ok pool enum #5"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_workload() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let out = run_workload(&env, "node", &["workload.js"], &drivers_dir().join("node")).await;
    for step in ["ok binary", "ok cancel", "ok denied", "ok startup statement_timeout", "ok statement_timeout applies", "ok application_name"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_workload() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let out = run_workload(&env, "java", &["-cp", "/usr/share/java/postgresql.jar", "Workload.java"], &drivers_dir().join("jdbc")).await;
    for step in ["ok binary #3", "ok copy in and out", "ok denied", "ok application_name", "ok pg_stat_activity stamp"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
}

/// Masked columns reach psycopg (text and binary results, COPY) and JDBC (server-prepared,
/// simple protocol, COPY) masked, and a masked column used to filter or sort is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn masked_columns_reach_drivers_masked() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let out = run_script_as(&env, "masked", "python3", &["psycopg_masked.py"], &drivers_dir(), "unused").await;
    for step in ["ok binary masked", "ok text masked", "ok notice", "ok copy masked", "ok where refused"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
    let out = run_script_as(&env, "masked", "java", &["-cp", "/usr/share/java/postgresql.jar", "Masked.java"], &drivers_dir().join("jdbc"), "unused").await;
    for step in ["ok extended masked #3", "ok simple masked #3", "ok extended copy masked", "ok simple order by refused"] {
        assert!(out.contains(step), "{step}:\n{out}");
    }
}
