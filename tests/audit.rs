//! The audit log through the real proxy: a record for every statement kind, tamper evidence,
//! fail-closed writes, replay, and no lost records when the proxy is killed mid-benchmark.

mod common;

use std::time::Duration;

use common::grants::{EnvOptions, GrantsEnv};
use common::raw::{Raw, message, query, startup_packet};
use common::{postgres_saw, sqlstate};
use futures_util::SinkExt;
use pglease::audit::reader;
use serde_json::{Value, json};

fn records(env: &GrantsEnv) -> Vec<Value> {
    common::audit_lines(&env.audit_log).iter().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Waits until the writer has caught up with results and events.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

fn statements_of(all: &[Value], session: u64) -> Vec<(Value, Option<Value>)> {
    let stmts: Vec<&Value> = all.iter().filter(|r| r["kind"] == "statement" && r["session"] == session).collect();
    stmts
        .into_iter()
        .map(|s| {
            let result = all.iter().find(|r| r["kind"] == "result" && r["session"] == session && r["stmt"] == s["stmt"]).cloned();
            (s.clone(), result)
        })
        .collect()
}

#[tokio::test]
async fn every_statement_kind_is_recorded_with_its_outcome() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let (grant, login, password) = env.active_grant("write", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    // Simple, several statements in one message.
    client.simple_query("SELECT id FROM t ORDER BY id; UPDATE t SET id = id WHERE id = 1").await.unwrap();
    // Extended, with a binary parameter (tokio-postgres sends binary).
    client.query("SELECT id FROM t WHERE id = $1", &[&2i32]).await.unwrap();
    // An error from Postgres.
    assert!(client.simple_query("SELECT 1/0").await.is_err());
    // A refusal.
    assert_eq!(sqlstate(&client.simple_query("DELETE FROM t").await.unwrap_err()).as_deref(), Some("42501"));
    // COPY in and out.
    let sink = client.copy_in("COPY t (id) FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"7\n8\n")).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 2);
    drop(client);
    // Text parameters, pipelining with an error mid-batch (later Executes are skipped).
    let mut raw = Raw::tls(env.proxy_addr).await;
    raw.send(&startup_packet(3 << 16, &[("user", &login), ("database", &env.database)])).await;
    raw.scram(&password).await.unwrap();
    raw.until_ready().await;
    let mut batch = Vec::new();
    for (name, sql) in [("a", "SELECT $1::int + 1"), ("b", "SELECT 1/$1::int"), ("c", "SELECT 3")] {
        let mut p = format!("{name}\0{sql}\0").into_bytes();
        p.extend_from_slice(&0i16.to_be_bytes());
        batch.extend(message(b'P', &p));
    }
    let bind = |stmt: &str, param: Option<&str>| {
        let mut b = format!("\0{stmt}\0").into_bytes();
        b.extend_from_slice(&0i16.to_be_bytes());
        match param {
            Some(v) => {
                b.extend_from_slice(&1i16.to_be_bytes());
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&0i16.to_be_bytes()),
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        message(b'B', &b)
    };
    for (stmt, param) in [("a", Some("41")), ("b", Some("0")), ("c", None)] {
        batch.extend(bind(stmt, param));
        batch.extend(message(b'E', &[0, 0, 0, 0, 0]));
    }
    batch.extend(message(b'S', &[]));
    raw.send(&batch).await;
    raw.until_ready().await;
    raw.send(&query("SELECT pg_sleep(0)")).await;
    raw.until_ready().await;
    drop(raw);
    settle().await;

    let all = records(&env);
    let sessions: Vec<u64> = all.iter().filter(|r| r["kind"] == "statement").filter_map(|r| r["session"].as_u64()).collect();
    let (first, second) = (sessions[0], *sessions.last().unwrap());
    let s1 = statements_of(&all, first);
    let sql: Vec<&str> = s1.iter().map(|(s, _)| s["sql"].as_str().unwrap()).collect();
    assert_eq!(sql[0], "SELECT id FROM t ORDER BY id; UPDATE t SET id = id WHERE id = 1");
    let (s, r) = &s1[0];
    assert_eq!((s["protocol"].as_str(), s["decision"].as_str(), s["grant"].as_str()), (Some("simple"), Some("allow"), Some(grant.as_str())));
    assert_eq!(r.as_ref().unwrap()["tags"], json!(["SELECT 2", "UPDATE 1"]));
    assert_eq!(r.as_ref().unwrap()["rows"], 3);
    let (s, r) = s1.iter().find(|(s, _)| s["sql"] == "SELECT id FROM t WHERE id = $1").unwrap();
    assert_eq!(s["protocol"], "extended");
    // tokio-postgres lets the server infer parameter types: the Parse names none (oid 0).
    assert_eq!(s["params"], json!([{"oid": 0, "format": "binary", "value": "AAAAAg=="}]));
    assert_eq!(r.as_ref().unwrap()["tags"], json!(["SELECT 1"]));
    let (_, r) = s1.iter().find(|(s, _)| s["sql"] == "SELECT 1/0").unwrap();
    assert_eq!(r.as_ref().unwrap()["error_code"], "22012");
    let (s, r) = s1.iter().find(|(s, _)| s["sql"] == "DELETE FROM t").unwrap();
    assert_eq!(s["decision"], "deny");
    assert!(s["reason"].as_str().unwrap().contains("without WHERE"));
    assert_eq!(r.as_ref().unwrap()["error_code"], "42501");
    let (_, r) = s1.iter().find(|(s, _)| s["sql"] == "COPY t (id) FROM STDIN").unwrap();
    assert_eq!(r.as_ref().unwrap()["tags"], json!(["COPY 2"]));

    let s2 = statements_of(&all, second);
    assert_eq!(s2[0].0["params"], json!([{"oid": 0, "format": "text", "value": "41"}]));
    assert_eq!(s2[0].1.as_ref().unwrap()["tags"], json!(["SELECT 1"]));
    assert_eq!(s2[1].1.as_ref().unwrap()["error_code"], "22012");
    assert_eq!(s2[2].1.as_ref().unwrap()["skipped"], true, "c was skipped after b's error");
    // Lifecycle events are records too, and the chain verifies.
    for event in ["grant_requested", "grant_approved", "session_opened", "session_closed"] {
        assert!(all.iter().any(|r| r["kind"] == "event" && r["event"] == event), "{event}");
    }
    let report = reader::verify(&env.audit_log, None).unwrap();
    assert_eq!(report.records, all.len() as u64);
    // A 1 MB statement is logged whole.
    let client = env.connect(&login, &password).await.unwrap();
    let big = format!("SELECT '{}' AS x FROM t WHERE id = 1", "y".repeat(1 << 20));
    client.simple_query(&big).await.unwrap();
    settle().await;
    assert!(records(&env).iter().any(|r| r["sql"].as_str() == Some(big.as_str())));
}

#[tokio::test]
async fn verify_names_the_first_tampered_record() {
    let mut env = GrantsEnv::start(EnvOptions::default()).await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    for i in 0..5 {
        client.simple_query(&format!("SELECT id, {i} FROM t")).await.unwrap();
    }
    drop(client);
    settle().await;
    // Stopped: the file is tampered with below, and pglease owns the live one (it is mapped).
    // Stopping anchors the head.
    env.stop().await;
    let original = std::fs::read_to_string(&env.audit_log).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(reader::verify(&env.audit_log, None).is_ok());
    let n = lines.len();
    let tamper = |f: &dyn Fn(&mut Vec<String>)| {
        let mut l: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        f(&mut l);
        std::fs::write(&env.audit_log, l.join("\n") + "\n").unwrap();
        let e = reader::verify(&env.audit_log, None).unwrap_err();
        std::fs::write(&env.audit_log, &original).unwrap();
        e
    };
    // The statement record of `SELECT id, 2 FROM t`, and the records around it.
    let i = lines.iter().position(|l| l.contains("SELECT id, 2 FROM t") && l.contains("\"kind\":\"statement\"")).unwrap();
    assert!(i >= 2 && i + 1 < n);
    let seq = |k: usize| format!("seq={}", k + 1);
    let e = tamper(&|l| l[i] = l[i].replace("SELECT id, 2", "SELECT id, 3"));
    assert!(e.contains(&seq(i)) && e.contains("modified"), "{e}");
    let e = tamper(&|l| {
        l.remove(i);
    });
    assert!(e.contains(&seq(i)) && e.contains("deleted"), "{e}");
    let e = tamper(&|l| l.swap(i - 1, i));
    assert!(e.contains(&seq(i - 1)), "{e}");
    let e = tamper(&|l| {
        let copy = l[i - 1].clone();
        l.insert(i, copy);
    });
    assert!(e.contains(&seq(i)), "{e}");
    // Cutting off the tail leaves a valid chain, but not one that matches the anchors.
    std::thread::sleep(Duration::from_millis(1200));
    let env2_anchor = env.audit_anchor.clone();
    let anchored = std::fs::read_to_string(&env2_anchor).unwrap_or_default();
    if !anchored.trim().is_empty() {
        let last_seq: u64 = anchored.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter_map(|v| v["seq"].as_u64()).max().unwrap();
        std::fs::write(&env.audit_log, lines[..(last_seq as usize - 1).min(n - 1)].join("\n") + "\n").unwrap();
        let e = reader::verify(&env.audit_log, Some(&env2_anchor)).unwrap_err();
        assert!(e.contains("cut off"), "{e}");
        std::fs::write(&env.audit_log, &original).unwrap();
    } else {
        panic!("no anchor was written");
    }
    // The CLI exits 0 for an intact log and 1 for a broken one.
    let bin = env!("CARGO_BIN_EXE_pglease");
    let ok = std::process::Command::new(bin).args(["audit", "verify"]).arg(&env.audit_log).output().unwrap();
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stdout));
    std::fs::write(&env.audit_log, original.replacen("SELECT id, 2", "SELECT id, 9", 1)).unwrap();
    let bad = std::process::Command::new(bin).args(["audit", "verify"]).arg(&env.audit_log).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("BROKEN"));
}

#[tokio::test]
async fn an_unwritable_audit_log_refuses_statements_and_recovers() {
    let mut env = GrantsEnv::start(EnvOptions::default()).await;
    // Point the log at a full disk (/dev/full) through a symlink the writer reopens after errors.
    env.stop().await;
    let _ = std::fs::remove_file(&env.audit_log);
    std::os::unix::fs::symlink("/dev/full", &env.audit_log).unwrap();
    env.boot().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let marker = "audit_full_marker_4711";
    let e = client.simple_query(&format!("SELECT id, '{marker}' FROM t")).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("58030"));
    assert!(e.as_db_error().unwrap().message().contains("audit log cannot be written"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!postgres_saw(marker).await, "nothing reaches Postgres unrecorded");
    // The disk comes back: service resumes by itself, on the same session.
    std::fs::remove_file(&env.audit_log).unwrap();
    let rows = client.query("SELECT id FROM t", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    settle().await;
    assert!(reader::verify(&env.audit_log, None).is_ok());
}

#[tokio::test]
async fn replay_matches_a_fresh_copy_and_reports_a_changed_one() {
    let env = GrantsEnv::start(EnvOptions::default()).await;
    let h = common::harness().await;
    for copy in ["fresh", "changed"] {
        h.cluster.execute("postgres", &format!("CREATE DATABASE {}_{copy} TEMPLATE {}", env.database, env.database)).await.unwrap();
    }
    h.cluster.execute(&format!("{}_changed", env.database), "DELETE FROM t WHERE id = 2").await.unwrap();
    let (_, login, password) = env.active_grant("write", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client.execute("UPDATE t SET id = id + 10 WHERE id >= $1", &[&1i32]).await.unwrap();
    client.batch_execute("COMMIT").await.unwrap();
    client.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap();
    drop(client);
    settle().await;
    let session = records(&env).iter().find(|r| r["kind"] == "statement").unwrap()["session"].as_u64().unwrap();
    let bin = env!("CARGO_BIN_EXE_pglease");
    let target = |db: &str| format!("host={} port={} user={} password={} dbname={db} sslmode=disable", h.cluster.socket_dir().display(), h.cluster.port, h.cluster.superuser, h.cluster.password);
    let run = |db: String| std::process::Command::new(bin).args(["audit", "replay"]).arg(&env.audit_log).args(["--session", &session.to_string(), "--target", &target(&db)]).output().unwrap();
    let same = run(format!("{}_fresh", env.database));
    assert_eq!(same.status.code(), Some(0), "{}{}", String::from_utf8_lossy(&same.stdout), String::from_utf8_lossy(&same.stderr));
    assert!(String::from_utf8_lossy(&same.stdout).contains("4 statements replayed, 0 differ"));
    let changed = run(format!("{}_changed", env.database));
    assert_eq!(changed.status.code(), Some(1));
    let out = String::from_utf8_lossy(&changed.stdout);
    assert!(out.contains("DIFFERS") && out.contains("UPDATE t SET id = id + 10"), "{out}");
    let dry = std::process::Command::new(bin).args(["audit", "replay"]).arg(&env.audit_log).args(["--session", &session.to_string(), "--dry-run"]).output().unwrap();
    assert!(String::from_utf8_lossy(&dry.stdout).contains("UPDATE t SET id = id + 10 WHERE id >= $1;"));
    let sessions = std::process::Command::new(bin).args(["audit", "sessions"]).arg(&env.audit_log).args(["--json", "--user", "alice"]).output().unwrap();
    let line: Value = serde_json::from_str(String::from_utf8_lossy(&sessions.stdout).lines().next().unwrap()).unwrap();
    for key in ["session", "grant", "user", "scope", "login", "started_at", "ended_at", "statements", "denied", "errors"] {
        assert!(line.get(key).is_some(), "{key}");
    }
}

#[tokio::test]
async fn kill_9_mid_pgbench_loses_no_committed_transaction() {
    kill_9_mid_pgbench("write").await;
}

/// The same in `fsync` mode, where sessions copy their records into the mapped file and one
/// thread flushes for all of them.
#[tokio::test]
async fn kill_9_mid_pgbench_loses_no_committed_transaction_in_fsync_mode() {
    kill_9_mid_pgbench("fsync").await;
}

async fn kill_9_mid_pgbench(durability: &str) {
    let h = common::harness().await;
    let database = common::fresh_database().await;
    let (ok, _, err) = common::run_client_with_password(
        "pgbench",
        &["-i", "-q", "-s", "1", "-h", h.cluster.socket_dir().to_str().unwrap(), "-p", &h.cluster.port.to_string(), "-U", &h.cluster.superuser, &database],
        &h.cluster.password,
    )
    .await;
    assert!(ok.success(), "{err}");
    let role = format!("{database}_bench");
    let dir = tempfile::tempdir().unwrap();
    let (token, hash) = pglease::people::new_token();
    let (alice_token, alice_hash) = pglease::people::new_token();
    let config = format!(
        r#"
        [listen]
        addr = "127.0.0.1:0"
        tls_cert = "{cert}"
        tls_key = "{key}"
        [upstream]
        host = "127.0.0.1"
        port = {port}
        user = "{role}"
        password_env = "BENCH_PW"
        tls = "require"
        [admin]
        addr = "127.0.0.1:0"
        [grants]
        store = "{dir}/grants.jsonl"
        [audit]
        path = "{dir}/audit.jsonl"
        durability = "{durability}"
        [scopes.bench]
        database = "{database}"
        role = "{role}"
        password_env = "BENCH_PW"
        tables = [{{ name = "public.pgbench_*", allow = ["read", "insert", "update", "delete"] }}]
        [people.bob]
        roles = ["approver"]
        token_sha256 = "{hash}"
        [people.alice]
        roles = ["engineer"]
        token_sha256 = "{alice_hash}"
        "#,
        cert = h.cert_file.display(),
        key = h.key_file.display(),
        port = h.cluster.port,
        dir = dir.path().display(),
    );
    let scopes: toml::Value = toml::from_str(&config).unwrap();
    let scope: pglease::config::ScopeConfig = scopes["scopes"]["bench"].clone().try_into().unwrap();
    h.cluster.execute(&database, &(pglease::policy::sql::scope_sql("bench", &scope) + &format!("ALTER ROLE \"{role}\" PASSWORD 'bench-pw';"))).await.unwrap();
    // Fixed ports: the serve command prints its addresses only to its log.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = config.replacen("addr = \"127.0.0.1:0\"", &format!("addr = \"127.0.0.1:{port}\""), 1).replacen("addr = \"127.0.0.1:0\"", &format!("addr = \"127.0.0.1:{admin_port}\""), 1);
    std::fs::write(dir.path().join("pglease.toml"), &config).unwrap();
    let bin = env!("CARGO_BIN_EXE_pglease");
    let mut proxy = tokio::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(dir.path().join("pglease.toml"))
        .env("BENCH_PW", "bench-pw")
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let grant = common::eventually(Duration::from_secs(30), || {
        let (admin, token) = (admin.clone(), token.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                pglease::cli::ApiClient::new(&admin, Some(token)).post("/grants/issue", json!({"user": "alice", "scope": "bench", "duration": "30m", "reason": "kill -9 test"}))
            })
            .await
            .unwrap()
            .ok()
        }
    })
    .await
    .expect("proxy up");
    // Bob issued it; alice takes its secret.
    let id = grant["id"].as_str().unwrap().to_owned();
    let (admin2, alice2) = (admin.clone(), alice_token.clone());
    let grant = tokio::task::spawn_blocking(move || pglease::cli::ApiClient::new(&admin2, Some(alice2)).post(&format!("/grants/{id}/secret"), json!({})))
        .await
        .unwrap()
        .expect("alice takes the secret");
    let conn = format!("host=127.0.0.1 port={port} user={} dbname={database} sslmode=require", grant["login"].as_str().unwrap());
    let bench = tokio::process::Command::new(common::pg_bin("pgbench"))
        .args(["-n", "-M", "prepared", "-c", "4", "-j", "2", "-T", "30", &conn])
        .env("PGPASSWORD", grant["password"].as_str().unwrap())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Let it run, then kill the proxy without warning.
    let direct = {
        let (c, conn) = h.cluster.superuser_config(&database).connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        c
    };
    common::eventually(Duration::from_secs(30), || async {
        let n: i64 = direct.query_one("SELECT count(*) FROM pgbench_history", &[]).await.unwrap().get(0);
        (n > 200).then_some(())
    })
    .await
    .expect("transactions committed through the proxy");
    proxy.start_kill().unwrap(); // SIGKILL
    proxy.wait().await.unwrap();
    drop(bench);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed: i64 = direct.query_one("SELECT count(*) FROM pgbench_history", &[]).await.unwrap().get(0);
    let log = dir.path().join("audit.jsonl");
    let recorded = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"kind\":\"statement\"") && l.contains("INSERT INTO pgbench_history"))
        .count() as i64;
    eprintln!("committed {committed} transactions; {recorded} history inserts recorded");
    assert!(recorded >= committed, "every committed INSERT has its record ({recorded} < {committed})");
    let report = reader::verify(&log, None).expect("the chain verifies after kill -9");
    assert!(report.records > 0);
}

#[tokio::test]
async fn records_are_copied_into_a_postgres_table() {
    let env = GrantsEnv::start(EnvOptions { audit_pg: true, ..Default::default() }).await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    for i in 0..20 {
        client.simple_query(&format!("SELECT id, {i} FROM t")).await.unwrap();
    }
    drop(client);
    settle().await;
    let in_file = records(&env).len() as i64;
    let h = common::harness().await;
    let (audit_db, conn) = h.cluster.superuser_config(&format!("{}_audit", env.database)).connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let copied = common::eventually(Duration::from_secs(15), || async {
        let n: i64 = audit_db.query_one("SELECT count(*) FROM audit.records", &[]).await.ok()?.get(0);
        (n >= in_file).then_some(n)
    })
    .await;
    assert_eq!(copied, Some(in_file), "every record of the file is in the table");
    // The table keeps the chain: an auditor can check it with SQL.
    let row = audit_db
        .query_one("SELECT count(*) FROM audit.records a JOIN audit.records b ON b.seq = a.seq + 1 WHERE b.prev <> a.hash", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 0);
    let n: i64 = audit_db.query_one("SELECT count(*) FROM audit.records WHERE kind = 'statement' AND record->>'sql' LIKE 'SELECT id, %'", &[]).await.unwrap().get(0);
    assert_eq!(n, 20);
}
