//! Read budgets through the real proxy: a grant reads up to its scope's `max_rows_read` and not
//! one row more, whatever the protocol (simple, extended, COPY), across its sessions, a restart
//! and the instances of a fleet; then it runs nothing that returns rows, and an event says so.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{StreamExt, pin_mut};
use pglease::events::Event;

use common::grants::{ALICE, EnvOptions, GrantsEnv};
use common::sqlstate;

/// `public.t` holds ids 1..=100; grants of the `app` scope may read 50 rows each.
async fn env(options: EnvOptions) -> GrantsEnv {
    let mut env = GrantsEnv::start(options).await;
    env.direct().await.batch_execute("INSERT INTO t SELECT g FROM generate_series(3, 100) g").await.unwrap();
    env.reload(|c| c.scopes.get_mut("app").unwrap().max_rows_read = Some(50)).await.unwrap();
    env
}

/// Counts a stream's items as they arrive: how many came before the error that ended it, if any.
async fn count<T>(items: impl futures_util::Stream<Item = Result<T, tokio_postgres::Error>>) -> (usize, Option<tokio_postgres::Error>) {
    pin_mut!(items);
    let mut n = 0;
    while let Some(item) = items.next().await {
        match item {
            Ok(_) => n += 1,
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

/// A query's rows, read one by one (extended protocol).
async fn stream(client: &tokio_postgres::Client, sql: &str) -> (usize, Option<tokio_postgres::Error>) {
    match client.query_raw(sql, Vec::<i32>::new()).await {
        Ok(rows) => count(rows).await,
        Err(e) => (0, Some(e)),
    }
}

/// The rows (CopyData messages) of a `COPY … TO STDOUT`.
async fn copy_out(client: &tokio_postgres::Client, sql: &str) -> (usize, Option<tokio_postgres::Error>) {
    match client.copy_out(sql).await {
        Ok(data) => count(data).await,
        Err(e) => (0, Some(e)),
    }
}

fn rows_of(messages: &[tokio_postgres::SimpleQueryMessage]) -> usize {
    messages.iter().filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))).count()
}

fn severity_and_code(e: &tokio_postgres::Error) -> (String, String, String) {
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e:?}"));
    (db.severity().to_owned(), db.code().code().to_owned(), db.message().to_owned())
}

/// `grant show`'s read budget part.
async fn shown(env: &GrantsEnv, id: &str) -> serde_json::Value {
    env.api(Some(ALICE), "GET", &format!("/grants/{id}"), serde_json::json!({})).await.unwrap()["read"].clone()
}

fn spent_events(env: &GrantsEnv, grant: &str) -> Vec<Event> {
    env.events.events().into_iter().filter(|e| matches!(e, Event::ReadBudgetSpent { grant: g, .. } if g == grant)).collect()
}

#[tokio::test]
async fn a_grant_reads_its_budget_and_not_a_row_more() {
    let mut env = env(EnvOptions::default()).await;
    let (id, login, password) = env.active_grant("app", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    assert_eq!(rows_of(&client.simple_query("SELECT id FROM t WHERE id <= 30").await.unwrap()), 30);

    // The statement that would cross it: the 20 rows left reach the client, then the session ends.
    let (got, e) = stream(&client, "SELECT id FROM t ORDER BY id").await;
    assert_eq!(got, 20, "rows up to the budget, none beyond");
    let (severity, code, message) = severity_and_code(&e.expect("cut off"));
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "53400"));
    assert!(message.starts_with(&format!("pglease: grant {id} has used its read budget (scope \"app\" allows 50 rows per grant; counted so far: 50 rows,")), "{message}");
    assert!(common::eventually(Duration::from_secs(5), || async { client.is_closed().then_some(()) }).await.is_some(), "the session ended");

    // Its next session runs nothing that returns rows, in any protocol…
    let again = env.connect(&login, &password).await.unwrap();
    let e = again.simple_query("SELECT 1").await.unwrap_err();
    let (severity, code, message) = severity_and_code(&e);
    assert_eq!((severity.as_str(), code.as_str()), ("ERROR", "53400"));
    assert!(message.contains("refuses further statements that return rows under it"), "{message}");
    let refused = |e: tokio_postgres::Error| {
        let (severity, code, _) = severity_and_code(&e);
        assert_eq!((severity.as_str(), code.as_str()), ("ERROR", "53400"), "refused, not cut: {e:?}");
    };
    refused(again.query("SELECT id FROM t WHERE id = $1", &[&1i32]).await.unwrap_err()); // extended: at Execute
    refused(copy_out(&again, "COPY t TO STDOUT").await.1.unwrap());
    // A SQL cursor's portal is not one pglease bound.
    again.batch_execute("BEGIN").await.unwrap();
    refused(again.simple_query("DECLARE c CURSOR FOR SELECT id FROM t").await.unwrap_err());
    again.batch_execute("ROLLBACK").await.unwrap();
    // …but may end a transaction and change settings, so a pool can reset it and a person leave.
    again.batch_execute("BEGIN; SET LOCAL statement_timeout = '5s'; COMMIT").await.unwrap();
    again.batch_execute("ROLLBACK").await.unwrap();
    assert!(!again.is_closed());

    let spent = spent_events(&env, &id);
    assert_eq!(spent.len(), 1, "one event per grant: {spent:?}");
    assert!(matches!(&spent[0], Event::ReadBudgetSpent { scope, user, rows_read: 50, max_rows_read: Some(50), max_bytes_read: None, .. } if scope == "app" && user == "alice"), "{spent:?}");

    let read = shown(&env, &id).await;
    assert_eq!((read["rows"].as_u64(), read["max_rows"].as_u64(), read["max_bytes"].is_null()), (Some(50), Some(50), true), "grant show: {read}");

    // A restart does not give the budget back.
    env.stop().await;
    env.boot().await;
    assert_eq!(shown(&env, &id).await["rows"].as_u64(), Some(50), "as stored, before any session");
    let after = env.connect(&login, &password).await.unwrap();
    assert_eq!(sqlstate(&after.simple_query("SELECT 1").await.unwrap_err()).as_deref(), Some("53400"));

    // Another grant of the scope has a budget of its own; COPY is cut at the same line.
    let (_, other, other_password) = env.active_grant("app", "30m").await;
    let client = env.connect(&other, &other_password).await.unwrap();
    let (got, e) = copy_out(&client, "COPY t TO STDOUT").await;
    assert_eq!(got, 50);
    assert_eq!(severity_and_code(&e.expect("cut off")).1, "53400");
}

#[tokio::test]
async fn a_bytes_budget_ends_the_session_at_the_row_that_would_cross_it() {
    let mut env = GrantsEnv::start(EnvOptions::default()).await;
    // 40 rows of 1000 bytes each; a budget of 10 kB lets 9 through (each row is sent with its
    // 11-byte DataRow header).
    env.direct().await.batch_execute("INSERT INTO t SELECT g FROM generate_series(3, 40) g").await.unwrap();
    env.reload(|c| c.scopes.get_mut("app").unwrap().max_bytes_read = Some(bytesize::ByteSize(10_000))).await.unwrap();
    let (_, login, password) = env.active_grant("app", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let (got, e) = stream(&client, "SELECT repeat('x', 1000) FROM t").await;
    assert_eq!(got, 9);
    let (_, code, message) = severity_and_code(&e.expect("cut off"));
    assert_eq!(code, "53400");
    assert!(message.contains("allows 10.0 kB per grant; counted so far: 9 rows, 10.0 kB"), "{message}");
    // The cut spent the budget for good, though 9.1 kB were sent: not even a one-byte row now.
    let again = env.connect(&login, &password).await.unwrap();
    let (severity, code, _) = severity_and_code(&again.simple_query("SELECT 1").await.unwrap_err());
    assert_eq!((severity.as_str(), code.as_str()), ("ERROR", "53400"));

    // An error quotes what it failed on: its bytes count too. A whole column in one cast error
    // ends the session before the error is sent.
    let (_, login, password) = env.active_grant("app", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    let e = client.simple_query("SELECT string_agg(repeat('x', 1000), ',')::int FROM t").await.unwrap_err();
    let (severity, code, message) = severity_and_code(&e);
    assert_eq!((severity.as_str(), code.as_str()), ("FATAL", "53400"), "{message}");
    assert!(!message.contains("xxxx"), "the error's text was not sent");
    // A small error is only counted, and passes.
    let (_, login, password) = env.active_grant("app", "30m").await;
    let client = env.connect(&login, &password).await.unwrap();
    assert_eq!(sqlstate(&client.simple_query("SELECT 1 / 0").await.unwrap_err()).as_deref(), Some("22012"));
    assert_eq!(rows_of(&client.simple_query("SELECT 1").await.unwrap()), 1);
}

#[tokio::test]
async fn a_budget_holds_across_the_instances_of_a_fleet() {
    let env = env(EnvOptions { control_plane: true, ..EnvOptions::default() }).await;
    let (second, _, running) = env.another_instance().await;
    let (id, login, password) = env.active_grant("app", "30m").await;
    let on = |at: SocketAddr| {
        let (env, login, password) = (&env, login.clone(), password.clone());
        async move { env.connect_at(at, &login, &password, &env.database).await.unwrap() }
    };

    let first = on(env.proxy_addr).await;
    assert_eq!(rows_of(&first.simple_query("SELECT id FROM t WHERE id <= 30").await.unwrap()), 30);
    // The first instance stores what the grant read within a second or so.
    let h = common::harness().await;
    let (cp, conn) = h.cluster.superuser_config(&format!("{}_cp", env.database)).connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let stored = common::eventually(Duration::from_secs(10), || async {
        let row = cp.query_opt("SELECT rows_read FROM pglease.grant_reads WHERE grant_id = $1", &[&id]).await.unwrap()?;
        (row.get::<_, i64>(0) == 30).then_some(())
    })
    .await;
    assert!(stored.is_some(), "usage reached the control plane");

    // On the second instance the grant has 20 rows left, not 50.
    let (got, e) = stream(&on(second).await, "SELECT id FROM t ORDER BY id").await;
    assert_eq!(got, 20);
    assert_eq!(severity_and_code(&e.expect("cut off")).1, "53400");
    // And the first instance learns it: its next statement is refused.
    let refused = common::eventually(Duration::from_secs(10), || async {
        let e = first.simple_query("SELECT 1").await.err()?;
        (sqlstate(&e).as_deref() == Some("53400")).then_some(())
    })
    .await;
    assert!(refused.is_some(), "the first instance refuses once the fleet's total reached the budget");
    running.stop().await;
}
