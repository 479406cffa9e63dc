//! `pglease demo` as a new user meets it: start it, connect with the printed psql command, use
//! the admin commands with the printed tokens, stop it with SIGTERM, and find nothing left.

use std::process::Stdio;
use std::time::{Duration, Instant};

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
    // One instance, described by the fields above too.
    let instances = info["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 1, "{info}");
    assert_eq!((&instances[0]["proxy"], &instances[0]["admin_url"]), (&info["proxy"], &info["admin_url"]));

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
    // Under support, `SELECT *` on customers works, ssn masked but its last four digits.
    let out = admin(tokens["alice"].as_str().unwrap(), &["grant", "request", "--scope", "support", "--for", "30m", "--reason", "ticket 7", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let g: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let out = admin(tokens["bob"].as_str().unwrap(), &["grant", "approve", g["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conn = conninfo_of(g["psql"].as_str().unwrap()) + &format!(" sslrootcert={}", info["ca_cert"].as_str().unwrap());
    let (ok, out, err) = psql(&conn, g["password"].as_str().unwrap(), "select * from customers where id = 7").await;
    assert!(ok, "{err}");
    // Customer 7: ssn 433-07-0217 in SHOP_SCHEMA's formula.
    assert_eq!(out, "7|Customer 7|customer7@example.com|*******0217");
    assert!(err.contains("NOTICE:  pglease: scope \"support\" masked column ssn of public.customers"), "{err}");
    let (ok, _, err) = psql(&conn, g["password"].as_str().unwrap(), "select id from customers where ssn like '433%'").await;
    assert!(!ok && err.contains("does not allow masked column ssn of public.customers outside a select list"), "{err}");
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

/// `pglease` with an admin URL and token; its exit status, stdout and stderr.
fn admin_at(url: &str, token: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pglease")).args(args).env("PGLEASE_ADMIN_URL", url).env("PGLEASE_ADMIN_TOKEN", token).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
async fn within(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[tokio::test]
async fn three_demo_instances_share_grants_and_revokes() {
    let bin = env!("CARGO_BIN_EXE_pglease");
    let mut child = tokio::process::Command::new(bin)
        .args(["demo", "--instances", "3", "--json", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.expect("demo up within 120s").unwrap().expect("a JSON line");
    let info: serde_json::Value = serde_json::from_str(&line).unwrap();
    for key in ["proxy", "admin_url", "tokens", "upstream", "database", "audit_log", "ca_cert", "grant"] {
        assert!(info.get(key).is_some(), "{key} in {info}");
    }
    let instances = info["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 3, "{info}");
    let field = |key: &str| instances.iter().map(|i| i[key].as_str().unwrap_or_else(|| panic!("{key} in {i}")).to_owned()).collect::<Vec<_>>();
    let (ids, proxies, admins) = (field("id"), field("proxy"), field("admin_url"));
    for values in [&ids, &proxies, &admins] {
        assert_eq!(values.iter().collect::<std::collections::BTreeSet<_>>().len(), 3, "distinct: {values:?}");
    }
    // The old fields describe instance 1.
    assert_eq!((proxies[0].as_str(), admins[0].as_str()), (info["proxy"].as_str().unwrap(), info["admin_url"].as_str().unwrap()));
    let token = |who: &str| info["tokens"][who].as_str().unwrap().to_owned();
    let (alice, bob) = (token("alice"), token("bob"));
    let ca = info["ca_cert"].as_str().unwrap();

    // The banner's grant works through every instance.
    let password = info["grant"]["password"].as_str().unwrap();
    let login = info["grant"]["login"].as_str().unwrap();
    let conninfo = |n: usize, login: &str| {
        let (host, port) = proxies[n].rsplit_once(':').unwrap();
        format!("host={host} port={port} user={login} dbname=shop sslmode=verify-full sslrootcert={ca}")
    };
    for (n, id) in ids.iter().enumerate() {
        let (ok, out, err) = psql(&conninfo(n, login), password, "select count(*) from orders.orders").await;
        assert!(ok && out == "5000", "through {id}: {out} {err}");
    }

    // Requested and approved on instance 1; the other instances' admin APIs accept the same
    // tokens and soon know it as active.
    let (ok, out, err) = admin_at(&admins[0], &alice, &["grant", "request", "--scope", "orders-read", "--for", "30m", "--reason", "ticket 7", "--json"]);
    assert!(ok, "{err}");
    let g: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (id, login, password) = (g["id"].as_str().unwrap(), g["login"].as_str().unwrap(), g["password"].as_str().unwrap());
    let (ok, _, err) = admin_at(&admins[0], &bob, &["grant", "approve", id]);
    assert!(ok, "{err}");
    for n in 1..3 {
        let active = within(Duration::from_secs(10), || {
            let (ok, out, _) = admin_at(&admins[n], &alice, &["grant", "show", id, "--json"]);
            ok && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|v| v["status"] == "active")
        })
        .await;
        assert!(active, "{} knows the approval", ids[n]);
        // The scope's row cap holds there too (orders.items has 10,000 rows).
        let (ok, out, err) = psql(&conninfo(n, login), password, "select sku from orders.items").await;
        assert!(ok && out.lines().count() == 1000, "through {}: {} rows {err}", ids[n], out.lines().count());
    }

    // A session on instance 1, seen from instance 2, ended by a revoke on instance 3.
    let psql_bin = pglease::cluster::find_bin_dir().unwrap().join("psql");
    let held = tokio::process::Command::new(psql_bin)
        .args(["-X", "-tA", "-d", &conninfo(0, login), "-c", "select pg_sleep(25)"])
        .env("PGPASSWORD", password)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let seen = within(Duration::from_secs(10), || {
        let (ok, out, _) = admin_at(&admins[1], &bob, &["session", "list", "--json"]);
        ok && serde_json::from_str::<serde_json::Value>(&out).is_ok_and(|v| {
            v.as_array().is_some_and(|s| s.iter().any(|s| s["login"] == login && s["instance"] == ids[0].as_str()))
        })
    })
    .await;
    assert!(seen, "{} lists the session on {}", ids[1], ids[0]);
    let revoked_at = Instant::now();
    let (ok, _, err) = admin_at(&admins[2], &bob, &["grant", "revoke", id, "--reason", "ticket closed"]);
    assert!(ok, "{err}");
    let out = tokio::time::timeout(Duration::from_secs(10), held.wait_with_output()).await.expect("the session on instance 1 ends within 10s").unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(id) && err.contains("ticket closed"), "{err}");
    assert!(revoked_at.elapsed() < Duration::from_secs(10));
    // And the grant no longer logs in anywhere.
    for (n, id) in ids.iter().enumerate() {
        let (ok, _, err) = psql(&conninfo(n, login), password, "select 1").await;
        assert!(!ok && err.contains("password authentication failed"), "through {id}: {err}");
    }

    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.expect("demo exits within 60s").unwrap();
    assert!(status.success(), "{status}");
    let dir = std::path::Path::new(ca).parent().unwrap().parent().unwrap();
    assert!(!dir.exists(), "{} removed", dir.display());
}
