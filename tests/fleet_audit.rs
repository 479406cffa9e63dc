//! Audit across a fleet: each instance keeps its own hash chain (its file) and its own `seq`,
//! and copies it into the control plane's `pglease.audit`, keyed by (instance, seq).
//! `pglease audit verify --control-plane` checks every instance's chain from the table and
//! names the instance with a gap or a break; `audit sessions/show/replay` read the table as
//! they read a file. And `kill -9` of one of three instances under pgbench: the others carry on,
//! and after its restart every record of its file is in the table.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use common::grants::{ALICE, BOB, EnvOptions, GrantsEnv};
use serde_json::{Value, json};
use sha2::Digest;

/// The control plane's connection string, password included, as an auditor would pass it.
async fn control_plane_dsn(database: &str) -> String {
    let c = &common::harness().await.cluster;
    format!("host=127.0.0.1 port={} user={} password='{}' dbname={database}_cp sslmode=verify-full sslrootcert={}", c.port, c.superuser, c.password, c.ca_file.display())
}

/// A superuser connection to the control-plane database, to look at (and tamper with) the table.
async fn control_plane(database: &str) -> tokio_postgres::Client {
    let h = common::harness().await;
    let (client, conn) = h.cluster.superuser_config(&format!("{database}_cp")).connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Runs `pglease` with `args`; the control plane from PGLEASE_CONTROL_PLANE only when given.
fn pglease(args: &[&str], env_dsn: Option<&str>) -> Output {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pglease"));
    c.args(args).env_remove("PGLEASE_CONTROL_PLANE").env_remove("PGPASSWORD");
    if let Some(dsn) = env_dsn {
        c.env("PGLEASE_CONTROL_PLANE", dsn);
    }
    c.output().unwrap()
}

fn text(out: &Output) -> String {
    format!("exit {:?}\nstdout:\n{}\nstderr:\n{}", out.status.code(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The complete records of a file log as (seq, hash). A torn last line (the writer killed
/// mid-write) was never acknowledged and is left out.
fn file_chain(log: &Path) -> Vec<(i64, String)> {
    let content = std::fs::read_to_string(log).unwrap_or_default();
    let complete = &content[..content.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", log.display()));
            (v["seq"].as_i64().unwrap(), v["hash"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// One instance's rows of `pglease.audit` as (seq, hash), in order.
async fn table_chain(cp: &tokio_postgres::Client, instance: &str) -> Vec<(i64, String)> {
    cp.query("SELECT seq, hash FROM pglease.audit WHERE instance = $1 ORDER BY seq", &[&instance]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Waits until the table holds exactly the records of the instance's file (all of them copied,
/// nothing else); returns how many.
async fn fully_copied(cp: &tokio_postgres::Client, instance: &str, log: &Path) -> usize {
    let copied = common::eventually(Duration::from_secs(60), || async {
        let in_file = file_chain(log);
        (!in_file.is_empty() && in_file == table_chain(cp, instance).await).then_some(in_file.len())
    })
    .await;
    copied.unwrap_or_else(|| panic!("instance {instance}: not all of the {} records of its file are in the table", file_chain(log).len()))
}

/// The number of statement records in a file log.
fn statements_in(log: &Path) -> usize {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.contains("\"kind\":\"statement\"")).count()
}

/// A TLS session through a proxy at `port` with a grant's login.
async fn connect(port: u16, database: &str, login: &str, password: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user(login).password(password).dbname(database).ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, conn) = config.connect(common::tls_connector()).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// Waits until a proxy knows the grant (the control plane told it) and lets its login in.
async fn connect_when_known(port: u16, database: &str, login: &str, password: &str) -> tokio_postgres::Client {
    common::eventually(Duration::from_secs(30), || async { connect(port, database, login, password).await.ok() }).await.unwrap_or_else(|| panic!("the proxy on port {port} lets {login} in"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_chain_is_in_the_control_plane_and_verified_on_its_own() {
    let mut env = GrantsEnv::start(EnvOptions { control_plane: true, ..Default::default() }).await;
    let first = pglease::control_plane::default_instance_id(env.proxy_addr.port());
    // A second instance on the same control plane, with an audit file and a name of its own.
    let second_dir = tempfile::tempdir().unwrap();
    let second_log = second_dir.path().join("audit.jsonl");
    let (second_addr, _, second) = env
        .another_instance_with(|c| {
            c.audit.path = second_log.clone();
            c.audit.anchor = Some(second_dir.path().join("audit.anchor"));
            c.control_plane.as_mut().unwrap().instance_id = Some("second".into());
        })
        .await;

    // Statements through both proxies, under one grant (the control plane shares it).
    let (_, login, password) = env.active_grant("read", "30m").await;
    for (port, tag) in [(env.proxy_addr.port(), "one"), (second_addr.port(), "two")] {
        let client = connect_when_known(port, &env.database, &login, &password).await;
        for i in 0..8 {
            assert_eq!(client.query(&format!("SELECT id, '{tag}', {i} FROM t"), &[]).await.unwrap().len(), 2);
        }
        assert_eq!(common::sqlstate(&client.simple_query("DELETE FROM t").await.unwrap_err()).as_deref(), Some("42501"));
    }

    // Each instance's records arrive under its own name, as its file has them.
    let cp = control_plane(&env.database).await;
    let first_records = fully_copied(&cp, &first, &env.audit_log).await;
    let second_records = fully_copied(&cp, "second", &second_log).await;
    assert!(first_records > 16 && second_records > 16, "{first_records} {second_records}");
    let instances: Vec<String> = cp.query("SELECT DISTINCT instance FROM pglease.audit ORDER BY 1", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    let mut expected = vec![first.clone(), "second".to_owned()];
    expected.sort();
    assert_eq!(instances, expected);
    // Each chain has its own sequence, from 1.
    for instance in [&first, "second"] {
        assert_eq!(table_chain(&cp, instance).await[0].0, 1);
    }
    let n: i64 = cp.query_one("SELECT count(*) FROM pglease.audit WHERE instance = 'second' AND record->>'sql' LIKE 'SELECT id, ''two''%'", &[]).await.unwrap().get(0);
    assert_eq!(n, 8);

    // Verify: both intact, from --control-plane or from PGLEASE_CONTROL_PLANE.
    let dsn = control_plane_dsn(&env.database).await;
    let ok = pglease(&["audit", "verify", "--control-plane", &dsn], None);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    for name in [&first, "second"] {
        assert!(stdout(&ok).contains(&format!("{name}: intact")), "{}", text(&ok));
    }
    let ok = pglease(&["audit", "verify", "--json"], Some(&dsn));
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let report: Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(report["intact"], true);
    for (name, log, records) in [(&first, &env.audit_log, first_records), (&"second".to_owned(), &second_log, second_records)] {
        let r = report["instances"].as_array().unwrap().iter().find(|r| r["instance"] == **name).unwrap_or_else(|| panic!("{name} in {report}"));
        let head = file_chain(log).last().unwrap().1.clone();
        assert_eq!((r["records"].as_u64(), r["first_seq"].as_u64(), r["last_seq"].as_u64(), r["head"].as_str()), (Some(records as u64), Some(1), Some(records as u64), Some(head.as_str())), "{r}");
        assert_eq!((r["gaps"].clone(), r["breaks"].clone()), (json!([]), json!([])));
    }

    // The readers take the table as they take a file: the same sessions, statements and replay.
    let ambiguous = pglease(&["audit", "sessions", "--control-plane", &dsn], None);
    assert_eq!(ambiguous.status.code(), Some(2), "{}", text(&ambiguous));
    let err = String::from_utf8_lossy(&ambiguous.stderr);
    assert!(err.contains("--instance") && err.contains(&first) && err.contains("second"), "{err}");
    let unknown = pglease(&["audit", "sessions", "--control-plane", &dsn, "--instance", "nope"], None);
    assert!(unknown.status.code() == Some(2) && String::from_utf8_lossy(&unknown.stderr).contains("\"nope\""), "{}", text(&unknown));
    let log = second_log.to_str().unwrap();
    let from_table = pglease(&["audit", "sessions", "--control-plane", &dsn, "--instance", "second", "--json"], None);
    let from_file = pglease(&["audit", "sessions", log, "--json"], None);
    assert!(from_table.status.success() && !from_table.stdout.is_empty(), "{}", text(&from_table));
    assert_eq!(stdout(&from_table), stdout(&from_file));
    let session = serde_json::from_str::<Value>(stdout(&from_file).lines().next().unwrap()).unwrap()["session"].as_u64().unwrap().to_string();
    for args in [vec!["show", "--session", &session], vec!["show", "--session", &session, "--json"], vec!["replay", "--session", &session, "--dry-run"]] {
        let from_table = pglease(&[&["audit"], &args[..], &["--instance", "second"]].concat(), Some(&dsn));
        let from_file = pglease(&[&["audit"], &args[..], &[log]].concat(), Some(&dsn));
        assert!(from_table.status.success() && stdout(&from_table).contains("SELECT id, 'two', 3 FROM t"), "{args:?}: {}", text(&from_table));
        assert_eq!(stdout(&from_table), stdout(&from_file), "{args:?}");
    }
    let missing = pglease(&["audit", "show", "--session", "999999", "--control-plane", &dsn, "--instance", "second"], None);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));

    // `show --follow` follows a live session through the table as it does through a file.
    let live = connect_when_known(second_addr.port(), &env.database, &login, &password).await;
    live.simple_query("SELECT id, 'live' FROM t").await.unwrap();
    let session = common::eventually(Duration::from_secs(30), || async {
        let row = cp.query_opt("SELECT session FROM pglease.audit WHERE instance = 'second' AND record->>'sql' = 'SELECT id, ''live'' FROM t'", &[]).await.unwrap();
        row.map(|r| r.get::<_, i64>(0).to_string())
    })
    .await
    .expect("the live session's statement is copied");
    let mut follow = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglease"))
        .args(["audit", "show", "--follow", "--session", &session, "--control-plane", &dsn, "--instance", "second"])
        .env_remove("PGLEASE_CONTROL_PLANE")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(follow.stdout.take().unwrap()));
    let mut until = async |needle: &str| {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(needle) {
                    return;
                }
            }
            panic!("show --follow ended before {needle:?}");
        })
        .await
        .unwrap_or_else(|_| panic!("show --follow prints {needle:?}"))
    };
    until("SELECT id, 'live' FROM t").await;
    live.simple_query("SELECT id, 'later' FROM t").await.unwrap();
    until("SELECT id, 'later' FROM t").await;
    follow.start_kill().unwrap();
    drop(live);

    // A record changed in the table: that instance's chain is broken there, the other's is not.
    let mid = second_records as i64 / 2;
    let original: String = cp.query_one("SELECT record::text FROM pglease.audit WHERE instance = 'second' AND seq = $1", &[&mid]).await.unwrap().get(0);
    cp.execute("UPDATE pglease.audit SET record = jsonb_set(record, '{at}', '\"2000-01-01T00:00:00.000Z\"') WHERE instance = 'second' AND seq = $1", &[&mid]).await.unwrap();
    let broken = pglease(&["audit", "verify", "--control-plane", &dsn], None);
    assert_eq!(broken.status.code(), Some(1), "{}", text(&broken));
    let out = stdout(&broken);
    assert!(out.contains("second: BROKEN") && out.contains(&format!("{first}: intact")), "{out}");
    assert!(out.contains(&format!("record seq={mid}: its contents do not match its hash: it was modified")), "{out}");
    let one = pglease(&["audit", "verify", "--control-plane", &dsn, "--instance", &first], None);
    assert_eq!(one.status.code(), Some(0), "only the named instance is checked: {}", text(&one));
    // The same goes for a change to a column the record repeats.
    cp.execute("UPDATE pglease.audit SET record = $2::text::jsonb WHERE instance = 'second' AND seq = $1", &[&mid, &original]).await.unwrap();
    assert_eq!(pglease(&["audit", "verify", "--control-plane", &dsn], None).status.code(), Some(0), "put back: intact again");
    cp.execute("UPDATE pglease.audit SET prev = hash WHERE instance = 'second' AND seq = $1", &[&mid]).await.unwrap();
    let json_out = pglease(&["audit", "verify", "--control-plane", &dsn, "--json"], None);
    assert_eq!(json_out.status.code(), Some(1), "{}", text(&json_out));
    let report: Value = serde_json::from_slice(&json_out.stdout).unwrap();
    let second_report = report["instances"].as_array().unwrap().iter().find(|r| r["instance"] == "second").unwrap();
    assert_eq!((report["intact"].as_bool(), second_report["intact"].as_bool(), second_report["breaks"][0]["seq"].as_i64()), (Some(false), Some(false), Some(mid)), "{report}");
    cp.execute("UPDATE pglease.audit SET prev = record->>'prev' WHERE instance = 'second' AND seq = $1", &[&mid]).await.unwrap();

    // Rows deleted from the middle of a chain: a gap, for that instance only.
    let gone = first_records as i64 / 2;
    cp.execute("DELETE FROM pglease.audit WHERE instance = $1 AND seq IN ($2::bigint, $2::bigint + 1)", &[&first, &gone]).await.unwrap();
    let gap = pglease(&["audit", "verify", "--control-plane", &dsn], None);
    assert_eq!(gap.status.code(), Some(1), "{}", text(&gap));
    let out = stdout(&gap);
    assert!(out.contains(&format!("{first}: BROKEN")) && out.contains("second: intact"), "{out}");
    assert!(out.contains(&format!("gap: seq {gone}..{} missing", gone + 1)), "{out}");
    let report: Value = serde_json::from_slice(&pglease(&["audit", "verify", "--control-plane", &dsn, "--json"], None).stdout).unwrap();
    let first_report = report["instances"].as_array().unwrap().iter().find(|r| r["instance"] == *first).unwrap();
    assert_eq!(first_report["gaps"], json!([{"from": gone, "to": gone + 1}]), "{report}");
    assert_eq!((first_report["breaks"].clone(), first_report["records"].as_u64()), (json!([]), Some(first_records as u64 - 2)), "the record after the gap is not blamed");

    second.stop().await;
    env.stop().await;
}

/// One `pglease serve` of the fleet, as a subprocess.
struct Instance {
    name: String,
    dir: PathBuf,
    port: u16,
    admin_port: u16,
    child: Option<tokio::process::Child>,
    starts: usize,
}

impl Instance {
    fn config(&self) -> PathBuf {
        self.dir.join("pglease.toml")
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// Starts (or restarts) it from its config file; waits until it serves.
    async fn start(&mut self, database: &str) {
        let h = common::harness().await;
        self.starts += 1;
        let log_file = self.dir.join(format!("pglease.{}.log", self.starts));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglease"))
            .args(["serve", "--config"])
            .arg(self.config())
            .env("PGLEASE_TEST_UPSTREAM_PW", common::UPSTREAM_PASSWORD)
            .env("PGLEASE_TEST_BENCH_PW", format!("pw-{database}-bench"))
            .env("PGLEASE_TEST_CP_PW", &h.cluster.password)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_file).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let serving = common::eventually(Duration::from_secs(60), || async { std::fs::read_to_string(&log_file).unwrap_or_default().contains("pglease serving").then_some(()) }).await;
        assert!(serving.is_some(), "{} serves; its log:\n{}", self.name, std::fs::read_to_string(&log_file).unwrap_or_default());
    }

    /// `kill -9`.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }
}

/// The config file of fleet instance `n`: its own ports, audit file and instance id, the shared
/// control plane and upstream.
fn fleet_config(h: &common::Harness, database: &str, instance: &Instance) -> String {
    let hash = |t: &str| pglease::people::hex(&sha2::Sha256::digest(t.as_bytes()));
    format!(
        r#"
[listen]
addr = "127.0.0.1:{port}"
tls_cert = "{cert}"
tls_key = "{key}"
shutdown_grace = "1s"

[upstream]
host = "127.0.0.1"
port = {pg_port}
user = "{upstream_user}"
password_env = "PGLEASE_TEST_UPSTREAM_PW"
tls = "verify-full"
ca_file = "{pg_ca}"
server_name = "localhost"

[admin]
addr = "127.0.0.1:{admin_port}"

[grants]
store = "{dir}/grants.jsonl"

[audit]
path = "{dir}/audit.jsonl"

[control_plane]
dsn = "host=127.0.0.1 port={pg_port} user={superuser} dbname={database}_cp sslmode=verify-full sslrootcert={pg_ca}"
password_env = "PGLEASE_TEST_CP_PW"
instance_id = "{name}"

[scopes.bench]
database = "{database}"
role = "{database}_bench"
password_env = "PGLEASE_TEST_BENCH_PW"
tables = [{{ name = "public.pgbench_*", allow = ["read"] }}]

[people.bob]
roles = ["approver"]
token_sha256 = "{bob}"
[people.alice]
roles = ["engineer"]
token_sha256 = "{alice}"
"#,
        port = instance.port,
        admin_port = instance.admin_port,
        name = instance.name,
        dir = instance.dir.display(),
        cert = h.cert_file.display(),
        key = h.key_file.display(),
        pg_port = h.cluster.port,
        pg_ca = h.cluster.ca_file.display(),
        upstream_user = common::UPSTREAM_ROLE,
        superuser = h.cluster.superuser,
        bob = hash(BOB),
        alice = hash(ALICE),
    )
}

async fn api(admin_port: u16, token: &str, path: &str, body: Value) -> Result<Value, String> {
    let client = pglease::cli::ApiClient::new(&format!("http://127.0.0.1:{admin_port}"), Some(token.to_owned()));
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || client.post(&path, body)).await.unwrap().map_err(|e| e.to_string())
}

/// pgbench's select-only load through one instance, for `seconds`.
fn pgbench(port: u16, database: &str, login: &str, password: &str, seconds: u32) -> tokio::process::Child {
    let conn = format!("host=127.0.0.1 port={port} user={login} dbname={database} sslmode=require");
    tokio::process::Command::new(common::pg_bin("pgbench"))
        .args(["-n", "-S", "-c", "2", "-j", "1", "-T", &seconds.to_string(), &conn])
        .env("PGPASSWORD", password)
        .env_remove("PGHOST")
        .env_remove("PGPORT")
        .env_remove("PGUSER")
        .env_remove("PGDATABASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_of_three_instances_loses_no_acknowledged_record() {
    let h = common::harness().await;
    let database = common::fresh_database().await;
    h.cluster.execute("postgres", &format!("CREATE DATABASE {database}_cp")).await.unwrap();
    let (ok, _, err) = common::run_client_with_password(
        "pgbench",
        &["-i", "-q", "-s", "1", "-h", h.cluster.socket_dir().to_str().unwrap(), "-p", &h.cluster.port.to_string(), "-U", &h.cluster.superuser, &database],
        &h.cluster.password,
    )
    .await;
    assert!(ok.success(), "pgbench -i: {err}");

    let root = tempfile::tempdir().unwrap();
    let mut fleet: Vec<Instance> = (1..=3)
        .map(|n| {
            let dir = root.path().join(format!("fleet-{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            Instance { name: format!("fleet-{n}"), dir, port: pglease::cluster::free_port().unwrap(), admin_port: pglease::cluster::free_port().unwrap(), child: None, starts: 0 }
        })
        .collect();
    for instance in &fleet {
        std::fs::write(instance.config(), fleet_config(h, &database, instance)).unwrap();
    }
    // The scope's role, as `pglease scope sql` prints it.
    let config = pglease::config::Config::parse(&std::fs::read_to_string(fleet[0].config()).unwrap()).unwrap();
    let scope = &config.scopes["bench"];
    h.cluster
        .execute(&database, &(pglease::policy::sql::scope_sql("bench", scope) + &format!("ALTER ROLE \"{}\" PASSWORD 'pw-{database}-bench';", scope.role)))
        .await
        .unwrap();
    // All three start at once on the empty control plane (they take turns migrating it).
    futures_util::future::join_all(fleet.iter_mut().map(|i| i.start(&database))).await;

    // Bob issues a grant on instance 1; alice takes its secret; every instance lets her in.
    let g = api(fleet[0].admin_port, BOB, "/grants/issue", json!({"user": "alice", "scope": "bench", "duration": "30m", "reason": "fleet kill -9 test"})).await.unwrap();
    let g = api(fleet[0].admin_port, ALICE, &format!("/grants/{}/secret", g["id"].as_str().unwrap()), json!({})).await.unwrap();
    let (login, password) = (g["login"].as_str().unwrap().to_owned(), g["password"].as_str().unwrap().to_owned());
    for instance in &fleet {
        let client = connect_when_known(instance.port, &database, &login, &password).await;
        let n: i64 = client.query_one("SELECT count(*) FROM pgbench_branches", &[]).await.unwrap().get(0);
        assert_eq!(n, 1);
    }

    // Load through all three; instance 2 is killed once each has served a good number.
    let mut benches: Vec<tokio::process::Child> = fleet.iter().map(|i| pgbench(i.port, &database, &login, &password, 8)).collect();
    let busy = common::eventually(Duration::from_secs(60), || async { fleet.iter().all(|i| statements_in(&i.audit_log()) >= 200).then_some(()) }).await;
    assert!(busy.is_some(), "load through every instance: {:?}", fleet.iter().map(|i| statements_in(&i.audit_log())).collect::<Vec<_>>());
    fleet[1].kill().await;
    // What instance 2 had acknowledged: every complete record of its file.
    let acknowledged = file_chain(&fleet[1].audit_log());
    let at_kill = [statements_in(&fleet[0].audit_log()), statements_in(&fleet[2].audit_log())];
    let cp = control_plane(&database).await;
    eprintln!("instance 2 killed with {} records in its file, {} in the table", acknowledged.len(), table_chain(&cp, "fleet-2").await.len());

    // Instances 1 and 3 carry on under the same pgbench runs, which finish without errors.
    let carried_on = common::eventually(Duration::from_secs(60), || async {
        (statements_in(&fleet[0].audit_log()) >= at_kill[0] + 200 && statements_in(&fleet[2].audit_log()) >= at_kill[1] + 200).then_some(())
    })
    .await;
    assert!(carried_on.is_some(), "instances 1 and 3 keep serving after instance 2 died");
    let third = benches.pop().unwrap();
    let killed = benches.pop().unwrap();
    let first = benches.pop().unwrap();
    for (name, bench) in [("fleet-1", first), ("fleet-3", third)] {
        let out = tokio::time::timeout(Duration::from_secs(60), bench.wait_with_output()).await.expect("pgbench ends").unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "pgbench through {name}: {report}{}", String::from_utf8_lossy(&out.stderr));
        let processed: u64 = report
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|n| n.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .unwrap_or_else(|| panic!("{report}"));
        assert!(processed > 0, "{report}");
    }
    let out = tokio::time::timeout(Duration::from_secs(60), killed.wait_with_output()).await.expect("pgbench ends").unwrap();
    assert!(!out.status.success(), "pgbench through the killed instance lost its sessions");

    // Instance 2 comes back on the same config and file: its chain goes on, and the table ends up
    // with every record it had acknowledged, and the rest of its file.
    fleet[1].start(&database).await;
    assert!(acknowledged.len() > 200, "{}", acknowledged.len());
    let mut copied = 0;
    for instance in &fleet {
        copied += fully_copied(&cp, &instance.name, &instance.audit_log()).await;
    }
    let in_table = table_chain(&cp, "fleet-2").await;
    let lost: Vec<&(i64, String)> = acknowledged.iter().filter(|r| !in_table.contains(r)).collect();
    assert!(lost.is_empty(), "records of instance 2's file missing from the control plane: {lost:?}");
    assert!(pglease::audit::reader::verify(&fleet[1].audit_log(), None).is_ok(), "instance 2's file chain survived kill -9");

    // Every instance's chain verifies from the table.
    let dsn = control_plane_dsn(&database).await;
    let verified = pglease(&["audit", "verify", "--json"], Some(&dsn));
    assert_eq!(verified.status.code(), Some(0), "{}", text(&verified));
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    let instances = report["instances"].as_array().unwrap();
    let names: Vec<&str> = instances.iter().map(|r| r["instance"].as_str().unwrap()).collect();
    assert_eq!(names, ["fleet-1", "fleet-2", "fleet-3"]);
    assert!(instances.iter().all(|r| r["intact"] == true));
    let total: u64 = instances.iter().map(|r| r["records"].as_u64().unwrap()).sum();
    assert!(total >= copied as u64, "{total} < {copied}");

    for instance in &mut fleet {
        if let Some(child) = &instance.child {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
        }
        if let Some(mut child) = instance.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
        }
    }
}

/// A text parameter with a NUL byte (Postgres refuses it, but a client may send it) is recorded
/// exactly, in base64, and does not stop the copy into the control plane (jsonb has no NUL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_in_a_parameter_is_recorded_exactly_and_copied() {
    use common::raw::{Raw, message, startup_packet};
    let env = GrantsEnv::start(EnvOptions { control_plane: true, ..EnvOptions::default() }).await;
    let (_, login, password) = env.active_grant("read", "10m").await;
    let mut raw = Raw::tls(env.proxy_addr).await;
    raw.send(&startup_packet(3 << 16, &[("user", &login), ("database", &env.database)])).await;
    raw.scram(&password).await.expect("login");
    raw.until_ready().await;
    let cstr = |s: &str| [s.as_bytes(), b"\0"].concat();
    let parse = [cstr(""), cstr("SELECT $1::text"), 0i16.to_be_bytes().to_vec()].concat();
    let value = b"a\0b";
    let bind = [cstr(""), cstr(""), 0i16.to_be_bytes().to_vec(), 1i16.to_be_bytes().to_vec(), (value.len() as i32).to_be_bytes().to_vec(), value.to_vec(), 0i16.to_be_bytes().to_vec()].concat();
    let execute = [cstr(""), 0i32.to_be_bytes().to_vec()].concat();
    raw.send(&[message(b'P', &parse), message(b'B', &bind), message(b'E', &execute), message(b'S', &[])].concat()).await;
    let answer = raw.until_ready().await;
    assert!(answer.iter().any(|m| m.tag == b'E' && m.code() == "22021"), "Postgres refused the NUL");
    // A statement after it, so that the copy must get past the NUL's record.
    let client = env.connect(&login, &password).await.unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let recorded = std::fs::read_to_string(&env.audit_log).unwrap();
    let param = recorded.lines().find(|l| l.contains("text-base64")).expect("the parameter recorded in base64");
    assert!(param.contains(&base64::Engine::encode(&base64::engine::general_purpose::STANDARD, value)), "{param}");
    let instance = {
        let url = format!("{}/healthz", env.admin_url);
        let health: Value = tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().body_mut().read_json().unwrap()).await.unwrap();
        health["instance"].as_str().unwrap().to_owned()
    };
    let cp = control_plane(&env.database).await;
    fully_copied(&cp, &instance, &env.audit_log).await;
}

/// A new audit file under an instance id used before (a replaced disk, a copied config) is not
/// spliced into the old chain in the control plane: the sink finds the table's last record is
/// not the file's and copies nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_audit_file_under_an_old_instance_id_is_not_spliced_in() {
    let mut env = GrantsEnv::start(EnvOptions { control_plane: true, ..EnvOptions::default() }).await;
    let (_, login, password) = env.active_grant("read", "10m").await;
    let client = env.connect(&login, &password).await.unwrap();
    for _ in 0..3 {
        client.simple_query("SELECT 1").await.unwrap();
    }
    let url = format!("{}/healthz", env.admin_url);
    let health: Value = tokio::task::spawn_blocking(move || ureq::get(&url).call().unwrap().body_mut().read_json().unwrap()).await.unwrap();
    let instance = health["instance"].as_str().unwrap().to_owned();
    let cp = control_plane(&env.database).await;
    fully_copied(&cp, &instance, &env.audit_log).await;
    drop(client);
    env.stop().await;
    let before = table_chain(&cp, &instance).await;

    // The same id, a fresh file.
    let fresh = env.audit_log.with_file_name("fresh-audit.jsonl");
    let (id, path) = (instance.clone(), fresh.clone());
    let (proxy, _admin, second) = env
        .another_instance_with(move |c| {
            c.control_plane.as_mut().unwrap().instance_id = Some(id);
            c.audit.path = path;
            c.audit.anchor = None;
        })
        .await;
    let client = connect_when_known(proxy.port(), &env.database, &login, &password).await;
    // More records than the old chain had: without the check, those past its end would be
    // copied after it.
    for _ in 0..30 {
        client.simple_query("SELECT 2").await.unwrap();
    }
    assert!(file_chain(&fresh).len() > before.len(), "the new instance audits to its own file, past the old chain's length");
    // Given time to copy, it copied nothing: the table holds the old chain, unchanged.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(table_chain(&cp, &instance).await, before);
    second.stop().await;
}
