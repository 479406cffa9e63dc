//! `pglease demo` as a new user meets it: start it, connect with the printed psql command, use
//! the admin commands with the printed tokens, stop it with SIGTERM, and find nothing left.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

async fn psql(conninfo: &str, password: &str, sql: &str) -> (bool, String, String) {
    let bin = pglease::cluster::find_bin_dir().unwrap().join("psql");
    let out = tokio::process::Command::new(bin)
        .args(["-X", "-tA", "-d", conninfo, "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCLIENTENCODING", "UTF8")
        .output()
        .await
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn conninfo_of(psql_line: &str) -> String {
    // `psql "host=… port=… …"`: the quoted part is the connection string.
    psql_line.split('"').nth(1).unwrap().to_owned()
}

#[tokio::test]
async fn the_demo_serves_grants_and_cleans_up_after_itself() {
    let bin = env!("CARGO_BIN_EXE_pglease");
    let mut child = tokio::process::Command::new(bin)
        .args(["demo", "--json", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.expect("demo up within 120s").unwrap().expect("a JSON line");
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    for key in ["proxy", "admin_url", "tokens", "upstream", "database", "audit_log", "ca_cert"] {
        assert!(info.get(key).is_some(), "{key} in {info}");
    }
    for who in ["alice", "bob", "carol"] {
        assert!(info["tokens"][who].is_string());
    }

    // The printed grant works with the printed psql command, within its scope's role.
    let grant = &info["grant"];
    let conn = conninfo_of(grant["psql"].as_str().unwrap());
    let password = grant["password"].as_str().unwrap();
    let (ok, out, err) = psql(&conn, password, "select count(*) from orders.orders").await;
    assert!(ok, "{err}");
    assert_eq!(out, "5000");
    // psql's catalog commands work under the read scope.
    for meta in ["\\d", "\\dt orders.*", "\\d orders.orders", "\\dn", "\\l", "\\df"] {
        let (ok, _, err) = psql(&conn, password, meta).await;
        assert!(ok && !err.contains("ERROR"), "{meta}: {err}");
    }
    // orders.items has 10,000 rows; orders-read returns at most 1,000 per result.
    let (ok, out, err) = psql(&conn, password, "select sku from orders.items").await;
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 1000);
    let (ok, _, err) = psql(&conn, password, "select ssn from public.customers limit 1").await;
    assert!(!ok && err.contains("pglease: scope \"orders-read\" does not allow SELECT on public.customers"), "orders-read cannot read customers: {err}");

    // An engineer asks, an approver approves, the new login works.
    let admin = |token: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args).env("PGLEASE_ADMIN_URL", info["admin_url"].as_str().unwrap()).env("PGLEASE_ADMIN_TOKEN", token);
        cmd.output().unwrap()
    };
    let tokens = &info["tokens"];
    let out = admin(tokens["alice"].as_str().unwrap(), &["grant", "request", "--scope", "orders-write", "--for", "30m", "--reason", "fix order 42", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = admin(tokens["bob"].as_str().unwrap(), &["grant", "approve", g["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conn = conninfo_of(g["psql"].as_str().unwrap()) + &format!(" sslrootcert={}", info["ca_cert"].as_str().unwrap());
    let (ok, out, err) = psql(&conn, g["password"].as_str().unwrap(), "update orders.orders set status = 'paid' where id = 42 returning status").await;
    assert!(ok, "{err}");
    assert!(out.starts_with("paid"), "{out}");
    // Lifecycle events were written.
    let events = std::fs::read_to_string(info["audit_log"].as_str().unwrap()).unwrap();
    assert!(events.contains("grant_approved") && events.contains("session_opened"), "{events}");

    // SIGTERM: everything stops and nothing is left behind.
    let dir = std::path::Path::new(info["ca_cert"].as_str().unwrap()).parent().unwrap().parent().unwrap().to_owned();
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("demo exits within 60s").unwrap();
    assert!(status.success(), "{status}");
    assert!(!dir.exists(), "{} removed", dir.display());
    let upstream_port: u16 = info["upstream"].as_str().unwrap().rsplit(':').next().unwrap().split('/').next().unwrap().parse().unwrap();
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await.is_err(), "Postgres stopped");
}
