//! The statement policy through the real proxy: refused statements never reach Postgres (its
//! own log is the witness), allowed ones behave as direct, refusals keep Postgres's semantics,
//! rewrites cap rows, pinned settings stay pinned, and the backing roles hold exactly the
//! scope's privileges.

mod common;

use std::time::Duration;

use common::grants::{EnvOptions, GrantsEnv};
use common::raw::{Raw, message, query, startup_packet};
use common::{postgres_saw, sqlstate};

async fn env() -> GrantsEnv {
    GrantsEnv::start(EnvOptions::default()).await
}

fn marker(name: &str) -> String {
    use rand::RngCore;
    format!("{name}_{}", rand::rngs::OsRng.next_u32())
}

/// Gives Postgres's logger a moment to write out what it received.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn refused_statements_never_reach_postgres_and_allowed_ones_do() {
    let env = env().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let (ok, bad, multi, ext) = (marker("allowed"), marker("refused"), marker("multi"), marker("extended"));
    // Markers are string literals: comments do not survive the row-cap rewrite.
    client.simple_query(&format!("SELECT id, '{ok}' FROM t WHERE id > 0")).await.unwrap();
    let e = client.simple_query(&format!("DELETE FROM t WHERE id = 1 AND '{bad}' <> ''")).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    let scope_msg = "pglease: scope \"read\" does not allow DELETE on public.t".to_string();
    assert_eq!(e.as_db_error().unwrap().message(), scope_msg);
    // One refused statement in a message: none of it runs.
    let e = client.simple_query(&format!("SELECT '{multi}'; INSERT INTO t VALUES (3); SELECT 2")).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    // Extended protocol: the Parse is refused before it is sent.
    let e = client.prepare(&format!("UPDATE t SET id = 9 WHERE id = 1 AND '{ext}' <> ''")).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    settle().await;
    assert!(postgres_saw(&ok).await, "the allowed statement reached Postgres");
    for m in [&bad, &multi, &ext] {
        assert!(!postgres_saw(m).await, "{m} must never reach Postgres");
    }
    let direct = env.direct().await;
    let n: i64 = direct.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 2);
    // The session goes on.
    assert_eq!(client.query("SELECT id FROM t ORDER BY id", &[]).await.unwrap().len(), 2);
}

#[tokio::test]
async fn refusals_inside_transactions_behave_like_postgres_errors() {
    let env = env().await;
    let (_, login, password) = env.active_grant("write", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    client.batch_execute("INSERT INTO t VALUES (10)").await.unwrap();
    let e = client.batch_execute("DELETE FROM t").await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().message(), "pglease: scope \"write\" does not allow DELETE without WHERE");
    assert_eq!(sqlstate(&client.simple_query("SELECT 1").await.unwrap_err()).as_deref(), Some("25P02"));
    client.batch_execute("COMMIT").await.unwrap(); // rolls back
    let direct = env.direct().await;
    let n: i64 = direct.query_one("SELECT count(*) FROM t WHERE id = 10", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "the failed transaction rolled back");
    // Writes within the scope work as direct.
    let n = client.execute("UPDATE t SET id = id WHERE id = 1", &[]).await.unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn bind_to_a_statement_the_proxy_has_not_vetted_is_refused() {
    let env = env().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let mut raw = Raw::tls(env.proxy_addr).await;
    raw.send(&startup_packet(3 << 16, &[("user", &login), ("database", &env.database)])).await;
    raw.scram(&password).await.unwrap();
    raw.until_ready().await;
    // Bind to "s1", which no Parse created through the proxy, then Execute and Sync.
    let mut batch = message(b'B', b"\0s1\0\0\0\0\0\0\0");
    batch.extend(message(b'E', &[0, 0, 0, 0, 0]));
    batch.extend(message(b'S', &[]));
    raw.send(&batch).await;
    let answer = raw.until_ready().await;
    let err = answer.iter().find(|m| m.tag == b'E').expect("an error");
    assert_eq!(err.code(), "42501");
    assert!(err.field(b'M').unwrap().contains("has not checked"), "{err:?}");
    // A statement prepared through the proxy, by Parse or by SQL PREPARE, binds fine.
    raw.send(&query("PREPARE p1 AS SELECT id FROM t WHERE id = $1")).await;
    raw.until_ready().await;
    let mut batch = message(b'B', b"\0p1\0\0\0\0\x01\0\0\0\x011\0\0");
    batch.extend(message(b'E', &[0, 0, 0, 0, 0]));
    batch.extend(message(b'S', &[]));
    raw.send(&batch).await;
    let tags: Vec<u8> = raw.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(tags, b"2DCZ".to_vec());
}

#[tokio::test]
async fn rows_are_capped_by_rewriting_the_statement() {
    let env = env().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let rows = client.query("SELECT g FROM generate_series(1, 10) g", &[]).await.unwrap();
    assert_eq!(rows.len(), 3, "row_limit = 3");
    let rows = client.query("SELECT g FROM generate_series(1, 10) g LIMIT 2", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    let rows = client.query("SELECT g FROM generate_series(1, 10) g LIMIT $1", &[&8i64]).await.unwrap();
    assert_eq!(rows.len(), 3);
    let simple = client.simple_query("SELECT g FROM generate_series(1, 10) g; SELECT 1").await.unwrap();
    let n = simple.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count();
    assert_eq!(n, 4);
    // What ran is the rewritten statement.
    settle().await;
    assert!(postgres_saw("FROM generate_series(1, 10) g LIMIT 3").await);
}

#[tokio::test]
async fn pinned_settings_stay_pinned() {
    let env = env().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let show = |name: &'static str| {
        let client = &client;
        async move {
            let m = client.simple_query(&format!("SHOW {name}")).await.unwrap();
            m.iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap()
        }
    };
    assert_eq!(show("default_transaction_read_only").await, "on");
    assert_eq!(show("statement_timeout").await, "20s");
    assert_eq!(show("search_path").await, "public");
    for sql in ["SET search_path = pg_temp, public", "SET ROLE postgres", "SET statement_timeout = 0", "BEGIN READ WRITE", "SELECT set_config('search_path', 'x', false)"] {
        let e = client.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}");
    }
    // Even a write the policy missed would hit a read-only transaction upstream.
    assert_eq!(show("transaction_read_only").await, "on");
    // application_name keeps pglease's stamp in pg_stat_activity; a client's SET (JDBC sends
    // one) adds its name there, and the client sees just its own name.
    let stamp = || async {
        let rows = client.simple_query("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()").await.unwrap();
        rows.iter().find_map(|m| if let tokio_postgres::SimpleQueryMessage::Row(r) = m { r.get(0).map(str::to_owned) } else { None }).unwrap()
    };
    client.simple_query("SET application_name = 'it''s mine'").await.unwrap();
    assert_eq!(show("application_name").await, "it's mine");
    let stamped = stamp().await;
    assert!(stamped.starts_with("pglease alice ") && stamped.ends_with(" / it's mine"), "{stamped}");
    // SET LOCAL lasts as long as Postgres says it does.
    client.simple_query("BEGIN").await.unwrap();
    client.simple_query("SET LOCAL application_name = 'local'").await.unwrap();
    assert_eq!(show("application_name").await, "local");
    client.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(show("application_name").await, "it's mine");
    client.simple_query("RESET application_name").await.unwrap();
    assert_eq!(show("application_name").await, "");
    let reset = stamp().await;
    assert!(reset.starts_with("pglease alice ") && !reset.contains(" / "), "{reset}");
}

#[tokio::test]
async fn column_rules_and_the_backing_role_agree() {
    let env = env().await;
    let (_, login, password) = env.active_grant("support", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let rows = client.query("SELECT id, name FROM people ORDER BY id", &[]).await.unwrap();
    assert_eq!(rows.len(), 2);
    for sql in ["SELECT ssn FROM people", "SELECT id FROM people WHERE ssn LIKE '1%'", "SELECT p FROM people p", "SELECT * FROM people JOIN people q USING (id)"] {
        let e = client.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}");
    }
    // Defense in depth: the role itself (as `scope sql` made it) cannot read ssn either.
    let h = common::harness().await;
    let mut config = h.cluster.superuser_config(&env.database);
    config.user(format!("{}_support", env.database)).password(format!("pw-{}_support", env.database));
    let (direct, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let e = direct.simple_query("SELECT ssn FROM people").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    direct.simple_query("SELECT id, name FROM people").await.unwrap();
}

/// `*` over a table with denied columns returns the other columns, with a NOTICE naming what
/// it left out, in every protocol and client; the columns follow DDL run through pglease.
#[tokio::test]
async fn star_over_denied_columns_returns_the_permitted_ones() {
    let env = env().await;
    let (_, login, password) = env.active_grant("support", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    // Extended protocol, binary results.
    let rows = client.query("SELECT * FROM people ORDER BY id", &[]).await.unwrap();
    let columns: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
    assert_eq!(columns, ["id", "name"]);
    assert_eq!((rows[1].get::<_, i32>(0), rows[1].get::<_, String>(1)), (2, "bo".to_owned()));
    // Simple protocol, text results: `TABLE`, `p.*`, a subquery's `*`.
    for sql in ["TABLE people", "SELECT p.* FROM people p ORDER BY 1", "SELECT * FROM (SELECT * FROM people) s ORDER BY 1"] {
        let messages = client.simple_query(sql).await.unwrap();
        let rows: Vec<_> = messages.iter().filter_map(|m| if let tokio_postgres::SimpleQueryMessage::Row(r) = m { Some(r) } else { None }).collect();
        assert_eq!(rows.len(), 2, "{sql}");
        let names: Vec<&str> = rows[0].columns().iter().map(|c| c.name()).collect();
        assert_eq!(names, ["id", "name"], "{sql}");
        assert!(rows.iter().all(|r| (0..r.len()).all(|i| !r.get(i).unwrap_or("").contains("-11-") && !r.get(i).unwrap_or("").contains("-22-"))), "{sql}");
    }
    // psql shows the notice.
    let h = common::harness().await;
    let conn = format!("host=127.0.0.1 port={} user={login} dbname={} sslmode=verify-full sslrootcert={}", env.proxy_addr.port(), env.database, h.ca_file.display());
    let (status, stdout, stderr) = common::run_client_with_password("psql", &["-X", "-A", "-d", &conn, "-c", "SELECT * FROM people ORDER BY id"], &password).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.lines().next(), Some("id|name"), "{stdout}");
    assert!(!stdout.contains("111-11-1111"), "{stdout}");
    assert!(stderr.contains("NOTICE:  pglease: scope \"support\" left out column ssn of public.people from *"), "{stderr}");
    // A column added through pglease (under another scope) shows up in `*` soon after.
    let direct = env.direct().await;
    direct.simple_query(&format!("ALTER TABLE people OWNER TO \"{}_dba\"", env.database)).await.unwrap();
    let (_, dba_login, dba_password) = env.active_grant("dba", "30m").await;
    let dba = env.connect(&dba_login, &dba_password).await.unwrap();
    dba.simple_query("ALTER TABLE people ADD COLUMN nickname text").await.unwrap();
    // (The backing role reads the new column only once granted it, as `scope sql` would.)
    direct.simple_query(&format!("GRANT SELECT (nickname) ON people TO \"{}_support\"", env.database)).await.unwrap();
    let seen = common::eventually(Duration::from_secs(10), || {
        let client = &client;
        async move {
            let rows = client.query("SELECT * FROM people ORDER BY id", &[]).await.ok()?;
            let names: Vec<String> = rows[0].columns().iter().map(|c| c.name().to_owned()).collect();
            (names == ["id", "name", "nickname"]).then_some(())
        }
    })
    .await;
    assert!(seen.is_some(), "the new column never showed in *");
}

/// The `hash` mask is HMAC-SHA256 under a key the backing role cannot read: equal values hash
/// equal, the hash is the real HMAC of the value, and nobody may call the function themselves.
#[tokio::test]
async fn hash_masks_are_keyed_hmacs_no_one_can_compute_for_guesses() {
    use hmac::Mac;
    let env = env().await;
    let (_, login, password) = env.active_grant("masked", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let rows = client.query("SELECT id, number FROM cards ORDER BY id", &[]).await.unwrap();
    let hashes: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    assert_eq!(hashes[0], hashes[2], "equal values hash equal");
    assert_ne!(hashes[0], hashes[1]);
    assert!(hashes.iter().all(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())), "{hashes:?}");
    // It is HMAC-SHA256 under the role's key (which the superuser can read).
    let role = format!("{}_masked", env.database);
    let direct = env.direct().await;
    let key = direct.query_one("SELECT inner_pad FROM pglease_masks.keys WHERE role = $1", &[&role]).await.unwrap();
    let key: Vec<u8> = key.get::<_, Vec<u8>>(0).iter().map(|b| b ^ 0x36).collect();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(b"4111111111111111");
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hashes[0], expected);
    // Hashing a guess to compare is refused; so is joining on the real value.
    for sql in ["SELECT pglease_masks.hash('4111111111111111')", "SELECT c.id FROM cards c JOIN cards d ON c.number = d.number"] {
        let e = client.simple_query(sql).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{sql}");
    }
    // The backing role itself cannot read the keys.
    let h = common::harness().await;
    let mut config = h.cluster.superuser_config(&env.database);
    config.user(&role).password(format!("pw-{role}"));
    let (as_role, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let e = as_role.simple_query("SELECT * FROM pglease_masks.keys").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
}

/// A row filter holds for reads, joins, UPDATE, DELETE and COPY through pglease, with the
/// session's person bound from the grant, and for the backing role connecting straight to
/// Postgres (row-level security, as `scope sql` wrote it).
#[tokio::test]
async fn row_filters_hold_through_pglease_and_in_postgres() {
    let env = env().await;
    let (_, login, password) = env.active_grant("masked", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let ids = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>();
    // alice sees the EU tickets and her own.
    assert_eq!(ids(client.query("SELECT id FROM tickets ORDER BY id", &[]).await.unwrap()), [1, 2, 4]);
    // The settings the filter reads are among the session's pinned ones, which `audit replay`
    // runs a replay under.
    let opened = env.events.events().into_iter().find_map(|e| match e {
        pglease::events::Event::SessionOpened { login: l, settings, .. } if l == login => Some(settings),
        _ => None,
    });
    let settings = opened.expect("session_opened");
    assert_eq!((settings.get("pglease.person").map(String::as_str), settings.get("pglease.scope").map(String::as_str)), (Some("alice"), Some("masked")));
    assert_eq!(ids(client.query("SELECT t.id FROM tickets t JOIN tickets u ON u.id = t.id WHERE t.id > $1 ORDER BY 1", &[&0i32]).await.unwrap()), [1, 2, 4]);
    assert_eq!(ids(client.query("SELECT id FROM (SELECT * FROM tickets) s WHERE id IN (SELECT id FROM tickets) ORDER BY 1", &[]).await.unwrap()), [1, 2, 4]);
    // UPDATE and DELETE touch only those rows; COPY copies only those.
    assert_eq!(client.execute("UPDATE tickets SET id = id + 10 WHERE id < 4 OR region = 'eu'", &[]).await.unwrap(), 3);
    // A row may not leave the filter by an update (the role's policy checks new rows).
    assert!(client.execute("UPDATE tickets SET owner = 'bob' WHERE owner = 'alice'", &[]).await.is_err());
    assert_eq!(client.execute("DELETE FROM tickets WHERE region = 'us'", &[]).await.unwrap(), 1);
    let copied = {
        use futures_util::TryStreamExt;
        let stream = client.copy_out("COPY tickets TO STDOUT").await.unwrap();
        let chunks: Vec<bytes::Bytes> = stream.try_collect().await.unwrap();
        String::from_utf8(chunks.concat()).unwrap()
    };
    assert_eq!(copied.lines().count(), 2, "{copied}");
    let direct = env.direct().await;
    let all: Vec<(i32, String)> = direct.query("SELECT id, owner FROM tickets ORDER BY id", &[]).await.unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(all, [(3, "bob".to_owned()), (11, "x".to_owned()), (14, "y".to_owned())]);
    // The session cannot change whose it is.
    let e = client.simple_query("SET pglease.person = 'bob'").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    // The backing role, straight to Postgres: the same rows, by row-level security.
    let h = common::harness().await;
    let role = format!("{}_masked", env.database);
    let mut config = h.cluster.superuser_config(&env.database);
    config.user(&role).password(format!("pw-{role}"));
    let (as_role, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    assert!(as_role.query("SELECT id FROM tickets", &[]).await.is_err(), "without the session's person, nothing");
    as_role.batch_execute("SET pglease.person = 'bob'").await.unwrap();
    assert_eq!(ids(as_role.query("SELECT id FROM tickets ORDER BY id", &[]).await.unwrap()), [3, 11, 14]);
    assert_eq!(as_role.execute("DELETE FROM tickets WHERE owner = 'y'", &[]).await.unwrap(), 1);
    assert_eq!(direct.query_one("SELECT count(*) FROM tickets", &[]).await.unwrap().get::<_, i64>(0), 2);
    // Other roles still see every row.
    assert_eq!(direct.query("SELECT id FROM tickets", &[]).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_scope_whose_role_can_do_more_is_not_served() {
    let env = env().await;
    let (_, login, password) = env.active_grant("leaky", "30m").await;
    let e = env.connect(&login, &password).await.expect_err("refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    let m = e.as_db_error().unwrap().message().to_owned();
    assert!(m.contains("scope \"leaky\" is disabled") && m.contains("SELECT on public.people"), "{m}");
}

#[tokio::test]
async fn psql_catalog_commands_work_under_read_scopes() {
    let env = env().await;
    let h = common::harness().await;
    for scope in ["read", "support"] {
        let (_, login, password) = env.active_grant(scope, "30m").await;
        let conn = format!(
            "host=127.0.0.1 port={} user={login} dbname={} sslmode=verify-full sslrootcert={}",
            env.proxy_addr.port(),
            env.database,
            h.ca_file.display()
        );
        for meta in ["\\d", "\\dt", "\\dt public.*", "\\d+ public.t", "\\d public.people", "\\l", "\\dn", "\\df", "\\dv", "\\di", "\\du", "\\dx", "\\dT", "\\conninfo"] {
            let (status, stdout, stderr) = common::run_client_with_password("psql", &["-X", "-d", &conn, "-c", meta], &password).await;
            assert!(status.success() && !stderr.contains("ERROR"), "{scope}: {meta}: {stderr}");
            assert!(!stdout.is_empty() || stderr.contains("Did not find"), "{scope}: {meta}");
        }
    }
}

/// Startup settings are decided like a SET of them, once the login's scope is known: a pinned
/// one is refused with the same message, an allowed one is in force from the first statement.
#[tokio::test]
async fn startup_settings_are_decided_by_the_scope() {
    let env = env().await;
    let connect = |login: String, password: String, options: &'static str| {
        let port = env.proxy_addr.port();
        let database = env.database.clone();
        async move {
            let mut config = tokio_postgres::Config::new();
            config.host("127.0.0.1").port(port).user(&login).password(&password).dbname(&database).options(options);
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            let (client, connection) = config.connect(common::tls_connector()).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        }
    };
    // `read` pins statement_timeout and allows no other settings.
    let (_, login, password) = env.active_grant("read", "30m").await;
    for (options, setting) in [("-c statement_timeout=0", "statement_timeout"), ("-c jit=off", "jit")] {
        let e = connect(login.clone(), password.clone(), options).await.err().expect("refused");
        assert_eq!(sqlstate(&e).as_deref(), Some("42501"), "{e}");
        assert_eq!(e.as_db_error().unwrap().message(), format!("pglease: scope \"read\" does not allow changing setting {setting}"));
    }
    let client = connect(login, password, "-c DateStyle=German").await.unwrap();
    assert_eq!(client.query_one("SHOW statement_timeout", &[]).await.unwrap().get::<_, String>(0), "20s");
    // `app` allows these ones.
    let (_, login, password) = env.active_grant("app", "30m").await;
    let client = connect(login, password, "-c statement_timeout=7s --lock-timeout=2s").await.unwrap();
    assert_eq!(client.query_one("SHOW statement_timeout", &[]).await.unwrap().get::<_, String>(0), "7s");
    assert_eq!(client.query_one("SHOW lock_timeout", &[]).await.unwrap().get::<_, String>(0), "2s");
}

/// A result the row cap cut says so: one NOTICE with the cap, and `capped` in its audit
/// result. A result under the cap, or a statement the cap did not touch, says nothing.
#[tokio::test]
async fn a_capped_result_says_so() {
    let env = env().await;
    let h = common::harness().await;
    let (_, login, password) = env.active_grant("read", "30m").await;
    let conn = format!("host=127.0.0.1 port={} user={login} dbname={} sslmode=verify-full sslrootcert={}", env.proxy_addr.port(), env.database, h.ca_file.display());
    let psql = |sql: &'static str| {
        let (conn, password) = (conn.clone(), password.clone());
        async move { common::run_client_with_password("psql", &["-X", "-At", "-d", &conn, "-c", sql], &password).await }
    };
    let (status, stdout, stderr) = psql("SELECT g FROM generate_series(1, 10) g").await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert_eq!(stderr.matches("NOTICE:").count(), 1, "{stderr}");
    assert!(stderr.contains("scope \"read\" caps results at 3 rows"), "{stderr}");
    for quiet in ["SELECT g FROM generate_series(1, 2) g", "SELECT g FROM generate_series(1, 10) g LIMIT 2"] {
        let (status, _, stderr) = psql(quiet).await;
        assert!(status.success() && !stderr.contains("NOTICE"), "{quiet}: {stderr}");
    }
    // Extended protocol too (tokio-postgres prepares every statement).
    let client = env.connect(&login, &password).await.unwrap();
    assert_eq!(client.query("SELECT id FROM t UNION ALL SELECT id FROM t UNION ALL SELECT id FROM t", &[]).await.unwrap().len(), 3);
    // The audit log has it on the capped results only (result records follow their replies).
    let capped = common::eventually(Duration::from_secs(10), || async {
        let results: Vec<serde_json::Value> = common::audit_lines(&env.audit_log).iter().map(|l| serde_json::from_str(l).unwrap()).filter(|r: &serde_json::Value| r["kind"] == "result").collect();
        let capped: Vec<serde_json::Value> = results.into_iter().filter(|r| r["capped"] == true).collect();
        (capped.len() == 2).then_some(capped)
    })
    .await
    .expect("two capped results in the audit log");
    assert!(capped.iter().all(|r| r["rows"] == 3), "{capped:?}");
}
