//! The plug point for policy and audit: a hook sees each statement before Postgres does and may
//! forward, rewrite or refuse it; refusals behave exactly like Postgres errors (the rest of an
//! extended batch is skipped until Sync, an open transaction is left failed, the session goes
//! on); result events come back to the hook in order.

mod common;

use std::sync::{Arc, Mutex};

use common::raw::{Raw, message, query};
use common::{ProxyOptions, TestProxy, sqlstate};
use pglease::codec::messages::{Bind, Parse};
use pglease::error::ClientError;
use pglease::session::{BackendAction, BackendEvent, SessionContext, SessionHooks, Verdict};

/// Refuses SQL mentioning `forbidden`, rewrites `'rewrite-me'`, and records result events.
#[derive(Default)]
struct TestHooks {
    events: Mutex<Vec<String>>,
}

impl TestHooks {
    fn decide(sql: &str) -> Verdict {
        if sql.contains("forbidden") {
            Verdict::Refuse(ClientError::error("42501", "pglease: scope \"test\" does not allow that"))
        } else if sql.contains("'rewrite-me'") {
            Verdict::Rewrite { sql: sql.replace("'rewrite-me'", "'rewritten'"), notice: None }
        } else {
            Verdict::Forward
        }
    }
}

#[async_trait::async_trait]
impl SessionHooks for TestHooks {
    async fn on_query(&self, _ctx: &SessionContext, sql: &str) -> Verdict {
        Self::decide(sql)
    }

    async fn on_parse(&self, _ctx: &SessionContext, parse: &Parse) -> Verdict {
        Self::decide(&parse.sql)
    }

    async fn on_bind(&self, _ctx: &SessionContext, bind: &Bind) -> Verdict {
        if bind.params.iter().flatten().any(|p| p.as_ref() == b"forbidden-param") {
            Verdict::Refuse(ClientError::error("42501", "pglease: parameter refused"))
        } else {
            Verdict::Forward
        }
    }

    fn on_backend(&self, _ctx: &SessionContext, event: BackendEvent<'_>) -> BackendAction {
        let text = match event {
            BackendEvent::CommandComplete(tag) => format!("complete {tag}"),
            BackendEvent::Error(e) => format!("error {}", e.code().unwrap_or("?")),
            BackendEvent::Ready(tx) => format!("ready {tx:?}"),
            BackendEvent::ParameterStatus { name, .. } => format!("status {name}"),
            BackendEvent::EmptyQuery => "empty".to_owned(),
            BackendEvent::PortalSuspended => "suspended".to_owned(),
        };
        self.events.lock().unwrap().push(text);
        BackendAction::Continue
    }
}

async fn proxy_with_hooks() -> (TestProxy, Arc<TestHooks>) {
    let hooks = Arc::new(TestHooks::default());
    let proxy = TestProxy::start_with(ProxyOptions { hooks: Some(hooks.clone()), ..Default::default() }).await;
    (proxy, hooks)
}

#[tokio::test]
async fn refused_simple_query_is_a_normal_error_and_the_session_goes_on() {
    let (proxy, hooks) = proxy_with_hooks().await;
    let client = proxy.connect().await;
    client.batch_execute("CREATE TABLE t (v text)").await.unwrap();
    // If any statement of a message is refused, none of it runs.
    let e = client.simple_query("INSERT INTO t VALUES ('a'); SELECT 'forbidden'").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    assert_eq!(e.as_db_error().unwrap().message(), "pglease: scope \"test\" does not allow that");
    let n: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 0, "nothing of the refused message ran");
    assert!(hooks.events.lock().unwrap().contains(&"error 42501".to_owned()), "hooks see the refusal as the client does");
}

#[tokio::test]
async fn refusal_inside_a_transaction_leaves_it_failed() {
    let (proxy, _) = proxy_with_hooks().await;
    let client = proxy.connect().await;
    client.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    client.batch_execute("BEGIN; INSERT INTO t VALUES (1)").await.unwrap();
    assert_eq!(sqlstate(&client.simple_query("SELECT 'forbidden'").await.unwrap_err()).as_deref(), Some("42501"));
    assert_eq!(sqlstate(&client.simple_query("SELECT 1").await.unwrap_err()).as_deref(), Some("25P02"));
    // COMMIT of a failed transaction rolls back.
    client.batch_execute("COMMIT").await.unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM t", &[]).await.unwrap().get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn refused_parse_and_bind_in_the_extended_protocol() {
    let (proxy, _) = proxy_with_hooks().await;
    let client = proxy.connect().await;
    let e = client.prepare("SELECT 'forbidden'").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42501"));
    let e = client.query_one("SELECT $1::text", &[&"forbidden-param"]).await.unwrap_err();
    assert_eq!(e.as_db_error().unwrap().message(), "pglease: parameter refused");
    let row = client.query_one("SELECT $1::text", &[&"fine"]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "fine");
}

#[tokio::test]
async fn a_refusal_mid_pipeline_skips_to_sync_in_order() {
    let (proxy, _) = proxy_with_hooks().await;
    let mut raw = Raw::login(proxy.addr, &proxy.database).await;
    let parse = |sql: &str| {
        let mut b = vec![0u8];
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        message(b'P', &b)
    };
    let bind = message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]);
    let execute = message(b'E', &[0, 0, 0, 0, 0]);
    let sync = message(b'S', &[]);
    let mut batch = Vec::new();
    for sql in ["SELECT 1", "SELECT 'forbidden'", "SELECT 3"] {
        batch.extend(parse(sql));
        batch.extend(&bind);
        batch.extend(&execute);
    }
    batch.extend(&sync);
    // A second batch after the Sync runs normally.
    batch.extend(parse("SELECT 4"));
    batch.extend(&bind);
    batch.extend(&execute);
    batch.extend(&sync);
    raw.send(&batch).await;
    let first: Vec<u8> = raw.until_ready().await.iter().map(|m| m.tag).collect();
    assert_eq!(first, b"12DCEZ".to_vec(), "SELECT 1 ran, the refusal, then nothing until Sync");
    let second = raw.until_ready().await;
    assert_eq!(second.iter().map(|m| m.tag).collect::<Vec<_>>(), b"12DCZ".to_vec());
    assert_eq!(&second[2].body[6..], b"4");
}

#[tokio::test]
async fn rewrites_run_instead_of_the_original() {
    let (proxy, hooks) = proxy_with_hooks().await;
    let client = proxy.connect().await;
    let simple = client.simple_query("SELECT 'rewrite-me' AS v").await.unwrap();
    let value = simple.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    });
    assert_eq!(value.as_deref(), Some("rewritten"));
    let row = client.query_one("SELECT 'rewrite-me'::text", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "rewritten");
    let events = hooks.events.lock().unwrap().clone();
    assert!(events.iter().any(|e| e == "complete SELECT 1"), "{events:?}");
    assert!(events.iter().any(|e| e == "ready Idle"), "{events:?}");
}

#[tokio::test]
async fn the_sentinel_error_cannot_be_confused_with_an_earlier_real_error() {
    let (proxy, _) = proxy_with_hooks().await;
    let mut raw = Raw::login(proxy.addr, &proxy.database).await;
    // A real error first in the batch: Postgres skips everything after it, including the
    // refused statement, so the client sees the real error only (as it would directly).
    let mut batch = Vec::new();
    for sql in ["SELECT 1/0", "SELECT 'forbidden'"] {
        let mut b = vec![0u8];
        b.extend_from_slice(sql.as_bytes());
        b.extend_from_slice(&[0, 0, 0]);
        batch.extend(message(b'P', &b));
        batch.extend(message(b'B', &[0, 0, 0, 0, 0, 0, 0, 0]));
        batch.extend(message(b'E', &[0, 0, 0, 0, 0]));
    }
    batch.extend(message(b'S', &[]));
    raw.send(&batch).await;
    let answer = raw.until_ready().await;
    let errors: Vec<String> = answer.iter().filter(|m| m.tag == b'E').map(|m| m.code()).collect();
    assert_eq!(errors, vec!["22012".to_owned()]);
    raw.send(&query("SELECT 1")).await;
    assert_eq!(raw.until_ready().await.len(), 4);
}
