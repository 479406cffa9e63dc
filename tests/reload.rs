//! `pglease serve` reloads its config file on SIGHUP, as an operator does it: the real binary,
//! a real file, `kill -HUP`. A broken file changes nothing and the log names the key at fault; a
//! good one rotates the TLS certificate, changes a scope (ending that scope's live sessions, not
//! the others') and the admin API's people, without dropping anyone else.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::grants::BOB;
use pglease::config::Config;
use sha2::Digest;

const ALICE: &str = "tok-alice-reload";
const ERIN: &str = "tok-erin";

struct Files {
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

/// What the config file refers to.
struct Setup<'a> {
    h: &'a common::Harness,
    db: &'a str,
    proxy_port: u16,
    admin_port: u16,
    files: &'a Files,
}

/// The config file as a DBA would write it; `read_extra` goes into the `read` scope.
fn config_text(setup: &Setup, cert: &Path, key: &Path, read_extra: &str, with_erin: bool) -> String {
    let Setup { h, db, proxy_port, admin_port, files } = setup;
    let hash = |t: &str| pglease::people::hex(&sha2::Sha256::digest(t.as_bytes()));
    let erin = if with_erin { format!("[people.erin]\nroles = [\"approver\"]\ntoken_sha256 = \"{}\"\n", hash(ERIN)) } else { String::new() };
    format!(
        r#"
[listen]
addr = "127.0.0.1:{proxy_port}"
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

[scopes.read]
database = "{db}"
role = "{db}_read"
password_env = "PGLEASE_TEST_READ_PW"
tables = [{{ name = "public.t", allow = ["read"] }}]
{read_extra}

[scopes.other]
database = "{db}"
role = "{db}_other"
password_env = "PGLEASE_TEST_OTHER_PW"
tables = [{{ name = "public.t", allow = ["read"] }}]

[people.bob]
roles = ["approver"]
token_sha256 = "{bob}"
[people.alice]
roles = ["engineer"]
token_sha256 = "{alice}"
{erin}
"#,
        cert = cert.display(),
        key = key.display(),
        alice = hash(ALICE),
        pg_port = h.cluster.port,
        upstream_user = common::UPSTREAM_ROLE,
        pg_ca = h.cluster.ca_file.display(),
        dir = files.dir.display(),
        bob = hash(BOB),
    )
}

async fn api(admin_port: u16, token: &str, method: &'static str, path: &str, body: serde_json::Value) -> Result<serde_json::Value, String> {
    let client = pglease::cli::ApiClient::new(&format!("http://127.0.0.1:{admin_port}"), Some(token.to_owned()));
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || if method == "GET" { client.get(&path) } else { client.post(&path, body) }).await.unwrap().map_err(|e| e.to_string())
}

/// A session through the proxy, and how its connection ended (the FATAL the proxy sent).
struct Session {
    client: tokio_postgres::Client,
    ended: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

async fn connect(port: u16, db: &str, login: &str, password: &str, ca: &Path) -> Result<Session, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port).user(login).password(password).dbname(db).ssl_mode(tokio_postgres::config::SslMode::Require);
    let (client, connection) = config.connect(common::tls_connector_trusting(ca)).await?;
    Ok(Session { client, ended: tokio::spawn(connection) })
}

/// The error that ended a session, as "SQLSTATE message". The proxy's FATAL reaches either the
/// next query or, when it arrived first, the connection itself.
async fn fatal_of(session: Session) -> String {
    let query = session.client.query("select 1", &[]).await.expect_err("the session was ended");
    let ended = tokio::time::timeout(Duration::from_secs(10), session.ended).await.expect("the session ends").unwrap();
    let text = |e: &tokio_postgres::Error| e.as_db_error().map(|d| format!("{} {}", d.code().code(), d.message()));
    text(&query).or_else(|| ended.as_ref().err().and_then(text)).unwrap_or_else(|| format!("no FATAL: query {query}, connection {ended:?}"))
}

/// Waits until the proxy's log has `count` lines containing `needle`; returns the last one.
async fn log_line(files: &Files, needle: &str, count: usize) -> String {
    common::eventually(Duration::from_secs(30), || async {
        let log = std::fs::read_to_string(&files.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(needle)).collect();
        (lines.len() >= count).then(|| lines.last().unwrap().to_string())
    })
    .await
    .unwrap_or_else(|| panic!("log line {needle:?} #{count} within 30 s; log:\n{}", std::fs::read_to_string(&files.log).unwrap_or_default()))
}

fn hup(child: &tokio::process::Child) {
    let pid = child.id().expect("child running") as i32;
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
}

async fn rows(session: &Session) -> Result<usize, tokio_postgres::Error> {
    Ok(session.client.query("select id from t", &[]).await?.len())
}

#[tokio::test]
async fn sighup_reloads_scopes_people_and_certificates_and_a_broken_file_changes_nothing() {
    let h = common::harness().await;
    let db = common::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let files = Files { dir: dir.path().to_owned(), config: dir.path().join("pglease.toml"), log: dir.path().join("pglease.log") };

    // A second certificate from another CA: a client trusting only it can tell which one the
    // proxy shows.
    let next = pglease::tls::generate_dev_certificates(&["localhost", "127.0.0.1"]).unwrap();
    let (next_ca, next_cert, next_key) = (dir.path().join("next-ca.crt"), dir.path().join("next.crt"), dir.path().join("next.key"));
    std::fs::write(&next_ca, &next.ca_pem).unwrap();
    std::fs::write(&next_cert, &next.cert_pem).unwrap();
    std::fs::write(&next_key, &next.key_pem).unwrap();
    std::fs::set_permissions(&next_key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    let (proxy_port, admin_port) = (pglease::cluster::free_port().unwrap(), pglease::cluster::free_port().unwrap());
    let setup = Setup { h, db: &db, proxy_port, admin_port, files: &files };
    let first = config_text(&setup, &h.cert_file, &h.key_file, "", false);
    std::fs::write(&files.config, &first).unwrap();

    // The scopes' roles, exactly as `pglease scope sql` prints them.
    let config = Config::parse(&first).unwrap();
    let mut sql = String::from("CREATE TABLE public.t (id int); INSERT INTO t VALUES (1), (2);\n");
    for (name, scope) in &config.scopes {
        sql.push_str(&pglease::policy::sql::scope_sql(name, scope));
        sql.push_str(&format!("ALTER ROLE \"{}\" PASSWORD 'pw-{name}';\n", scope.role));
    }
    h.cluster.execute(&db, &sql).await.unwrap();

    let log = std::fs::File::create(&files.log).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pglease"))
        .args(["serve", "--config"])
        .arg(&files.config)
        .env("PGLEASE_TEST_UPSTREAM_PW", common::UPSTREAM_PASSWORD)
        .env("PGLEASE_TEST_READ_PW", "pw-read")
        .env("PGLEASE_TEST_OTHER_PW", "pw-other")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    log_line(&files, "pglease serving", 1).await;

    let issue = |scope: &'static str| async move {
        let g = api(admin_port, BOB, "POST", "/grants/issue", serde_json::json!({"user": "alice", "scope": scope, "duration": "1h", "reason": "reload test"})).await.unwrap();
        let id = g["id"].as_str().unwrap();
        let g = api(admin_port, ALICE, "POST", &format!("/grants/{id}/secret"), serde_json::json!({})).await.unwrap();
        (g["login"].as_str().unwrap().to_owned(), g["password"].as_str().unwrap().to_owned())
    };
    let (read_login, read_pw) = issue("read").await;
    let (other_login, other_pw) = issue("other").await;
    let read_session = connect(proxy_port, &db, &read_login, &read_pw, &h.ca_file).await.unwrap();
    let other_session = connect(proxy_port, &db, &other_login, &other_pw, &h.ca_file).await.unwrap();
    assert_eq!(rows(&read_session).await.unwrap(), 2);
    assert!(api(admin_port, ERIN, "GET", "/grants", serde_json::json!({})).await.unwrap_err().contains("401"));

    // A broken file: the reload is refused naming the key, and nothing changes.
    let broken = config_text(&setup, &next_cert, &next_key, "row_limit = \"many\"", true);
    std::fs::write(&files.config, broken).unwrap();
    hup(&child);
    let failed = log_line(&files, "configuration reload failed", 1).await;
    assert!(failed.contains("scopes.read.row_limit"), "the error names the key: {failed}");
    assert_eq!(rows(&read_session).await.unwrap(), 2, "the session goes on under the old rules");
    let fresh = connect(proxy_port, &db, &read_login, &read_pw, &h.ca_file).await.expect("the old certificate is still shown");
    assert_eq!(rows(&fresh).await.unwrap(), 2, "no row cap: the old scope is in force");
    assert!(connect(proxy_port, &db, &read_login, &read_pw, &next_ca).await.is_err(), "the new certificate is not in use");
    assert!(api(admin_port, ERIN, "GET", "/grants", serde_json::json!({})).await.unwrap_err().contains("401"));

    // A missing file is refused the same way.
    std::fs::write(&files.config, first.replace(&h.key_file.display().to_string(), "/nonexistent/key.pem")).unwrap();
    hup(&child);
    let failed = log_line(&files, "configuration reload failed", 2).await;
    assert!(failed.contains("listen.tls_key"), "the error names the key: {failed}");

    // A good file: new certificate, a row cap on `read`, erin can use the API.
    let good = config_text(&setup, &next_cert, &next_key, "row_limit = 1", true);
    std::fs::write(&files.config, good).unwrap();
    hup(&child);
    let reloaded = log_line(&files, "configuration reloaded", 1).await;
    assert!(reloaded.contains("read") && reloaded.contains("sessions_ended=2"), "{reloaded}");

    // Sessions of the changed scope are ended, naming why; the other scope's session goes on.
    for session in [read_session, fresh] {
        let text = fatal_of(session).await;
        assert!(text.starts_with("57P01") && text.contains("changed by a configuration reload"), "{text}");
    }
    assert_eq!(rows(&other_session).await.unwrap(), 2, "an unchanged scope's session is untouched");

    // New handshakes show the new certificate; the new scope rules apply.
    assert!(connect(proxy_port, &db, &read_login, &read_pw, &h.ca_file).await.is_err(), "the old certificate is gone");
    let after = connect(proxy_port, &db, &read_login, &read_pw, &next_ca).await.expect("the new certificate is shown");
    assert_eq!(rows(&after).await.unwrap(), 1, "row_limit = 1 now");
    api(admin_port, ERIN, "GET", "/grants", serde_json::json!({})).await.expect("erin's token works after the reload");

    // Reloads are counted for monitoring.
    let metrics = ureq::get(&format!("http://127.0.0.1:{admin_port}/metrics")).call().unwrap().into_body().read_to_string().unwrap();
    assert!(metrics.contains("pglease_config_reloads_total{result=\"error\"} 2"), "{metrics}");
    assert!(metrics.contains("pglease_config_reloads_total{result=\"ok\"} 1"), "{metrics}");

    // A change that needs a restart is reported, and the old value stays in force.
    let elsewhere = Setup { admin_port: pglease::cluster::free_port().unwrap(), ..setup };
    let moved = config_text(&elsewhere, &next_cert, &next_key, "row_limit = 1", true);
    std::fs::write(&files.config, moved).unwrap();
    hup(&child);
    let warned = log_line(&files, "take effect only at restart", 1).await;
    assert!(warned.contains("admin"), "{warned}");
    api(admin_port, BOB, "GET", "/grants", serde_json::json!({})).await.expect("the admin API stays where it was");

    // SIGTERM still stops it.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("stops on SIGTERM").unwrap();
    assert!(status.success(), "{status}");
}

/// A reload checks every scope's backing role again: a role that was granted more than its
/// scope allows since the start takes its scope out of service, live sessions included.
#[tokio::test]
async fn a_reload_rechecks_backing_roles_and_ends_sessions_of_a_scope_it_disables() {
    use common::grants::{EnvOptions, GrantsEnv};
    let mut env = GrantsEnv::start(EnvOptions::default()).await;
    let (_, login, password) = env.active_grant("read", "1h").await;
    let (_, other_login, other_password) = env.active_grant("write", "1h").await;
    let session = env.connect(&login, &password).await.unwrap();
    let other = env.connect(&other_login, &other_password).await.unwrap();
    session.simple_query("select 1").await.unwrap();

    // Someone grants the read scope's role more than the scope says.
    let direct = env.direct().await;
    direct.batch_execute(&format!("GRANT SELECT ON public.people TO \"{}_read\"", env.database)).await.unwrap();

    let report = env.reload(|_| {}).await.expect("the reload itself succeeds");
    assert!(report.scopes_changed.is_empty(), "{report:?}");
    assert_eq!(report.sessions_ended, 1, "{report:?}");
    assert!(report.scopes_disabled.iter().any(|d| d.starts_with("read: ") && d.contains("public.people")), "{report:?}");
    assert!(session.simple_query("select 1").await.is_err(), "the read session is ended");
    other.simple_query("select 1").await.expect("the write scope's session goes on");

    let refused = env.connect(&login, &password).await.expect_err("the scope is not served");
    let db = refused.as_db_error().expect("a FATAL from the proxy");
    assert_eq!(db.code().code(), "42501");
    assert!(db.message().contains("scope \"read\" is disabled") && db.message().contains("public.people"), "{}", db.message());

    // Put right, and reloaded: served again.
    direct.batch_execute(&format!("REVOKE SELECT ON public.people FROM \"{}_read\"", env.database)).await.unwrap();
    let report = env.reload(|_| {}).await.unwrap();
    assert!(!report.scopes_disabled.iter().any(|d| d.starts_with("read: ")), "{report:?}");
    env.connect(&login, &password).await.expect("served again").simple_query("select 1").await.unwrap();
}
