//! The relay through the real proxy to a real Postgres, with tokio-postgres: simple and
//! extended protocol, parameters, pipelining, COPY both ways, LISTEN/NOTIFY, cancel, errors.
//! Results through the proxy are compared with the same queries run directly.

mod common;

use std::time::Duration;

use common::{TestProxy, sqlstate};
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

fn simple_rows(messages: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect()),
            _ => None,
        })
        .collect()
}

fn command_tags(messages: &[SimpleQueryMessage]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simple_query_with_several_statements_matches_direct() {
    let proxy = TestProxy::start().await;
    let via = proxy.connect().await;
    let direct = proxy.connect_direct().await;
    via.batch_execute("CREATE TABLE t (id int primary key, name text, at timestamptz default '2026-01-01')").await.unwrap();
    let sql = "INSERT INTO t (id, name) SELECT i, 'n' || i FROM generate_series(1, 50) i; \
               SELECT id, name, at FROM t WHERE id % 7 = 0 ORDER BY id; \
               UPDATE t SET name = upper(name) WHERE id < 5; \
               SELECT count(*), string_agg(name, ',' ORDER BY id) FROM t WHERE id < 10";
    let through = via.simple_query(sql).await.unwrap();
    // The same statements directly, against the rows the proxy wrote.
    let check = direct.simple_query("SELECT id, name, at FROM t WHERE id % 7 = 0 ORDER BY id; SELECT count(*), string_agg(name, ',' ORDER BY id) FROM t WHERE id < 10").await.unwrap();
    assert_eq!(command_tags(&through), vec![50, 7, 4, 1]);
    assert_eq!(simple_rows(&through), simple_rows(&check));
    assert_eq!(simple_rows(&through).last().unwrap()[1].as_deref(), Some("N1,N2,N3,N4,n5,n6,n7,n8,n9"));
}

#[tokio::test]
async fn extended_protocol_with_text_and_binary_parameters_matches_direct() {
    let proxy = TestProxy::start().await;
    let via = proxy.connect().await;
    let direct = proxy.connect_direct().await;
    via.batch_execute("CREATE TABLE p (i int8, f float8, t text, b bytea, j jsonb, ts timestamptz, n int4)").await.unwrap();
    // tokio-postgres sends parameters in binary.
    let insert = via.prepare("INSERT INTO p VALUES ($1, $2, $3, $4, $5::text::jsonb, now(), $6)").await.unwrap();
    for i in 0..20i64 {
        let bytes: Vec<u8> = (0..=255u8).cycle().skip(i as usize).take(300).collect();
        let text = format!("row {i} ünïcødé \u{1F418}");
        let none: Option<i32> = None;
        via.execute(&insert, &[&i, &(i as f64 / 3.0), &text, &bytes, &format!("{{\"k\": {i}}}"), &none]).await.unwrap();
    }
    // Text-format parameters through an explicitly typed statement.
    let typed = via.prepare_typed("SELECT $1::int8 + 1, $2::text || '!'", &[Type::INT8, Type::TEXT]).await.unwrap();
    let row = via.query_one(&typed, &[&41i64, &"hi"]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, String>(1)), (42, "hi!".to_owned()));

    let q = "SELECT i, f, t, b, j::text, n FROM p WHERE i >= $1 ORDER BY i";
    let through = via.query(q, &[&5i64]).await.unwrap();
    let direct_rows = direct.query(q, &[&5i64]).await.unwrap();
    assert_eq!(through.len(), 15);
    for (a, b) in through.iter().zip(direct_rows.iter()) {
        assert_eq!(a.get::<_, i64>(0), b.get::<_, i64>(0));
        assert_eq!(a.get::<_, f64>(1), b.get::<_, f64>(1));
        assert_eq!(a.get::<_, String>(2), b.get::<_, String>(2));
        assert_eq!(a.get::<_, Vec<u8>>(3), b.get::<_, Vec<u8>>(3));
        assert_eq!(a.get::<_, String>(4), b.get::<_, String>(4));
        assert_eq!(a.get::<_, Option<i32>>(5), None);
    }
}

#[tokio::test]
async fn pipelined_queries_return_in_order() {
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    let stmt = client.prepare("SELECT $1::int4 * 2, pg_sleep(0.001)::text").await.unwrap();
    // tokio-postgres pipelines concurrent queries on one connection.
    let futures: Vec<_> = (0..200i32).map(|i| {
        let client = &client;
        let stmt = &stmt;
        async move { client.query_one(stmt, &[&i]).await.map(|r| r.get::<_, i32>(0)) }
    }).collect();
    let results = futures_util::future::join_all(futures).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r.unwrap(), i as i32 * 2);
    }
}

#[tokio::test]
async fn errors_inside_and_outside_transactions_behave_like_postgres() {
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    let e = client.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22012"));
    // Still usable.
    assert_eq!(client.query_one("SELECT 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);

    client.batch_execute("BEGIN").await.unwrap();
    assert!(client.simple_query("SELECT 1/0").await.is_err());
    let e = client.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P02"), "aborted transaction");
    client.batch_execute("ROLLBACK").await.unwrap();

    // An empty query is answered with EmptyQueryResponse, not an error.
    assert!(client.simple_query("").await.unwrap().iter().all(|m| !matches!(m, SimpleQueryMessage::Row(_))));
    // A syntax error in the extended protocol.
    let e = client.prepare("SELEC 1").await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("42601"));
    assert_eq!(client.query_one("SELECT 2::int4", &[]).await.unwrap().get::<_, i32>(0), 2);
}

#[tokio::test]
async fn copy_in_and_out_round_trip_including_rows_over_a_megabyte() {
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    client.batch_execute("CREATE TABLE c (id int, payload text)").await.unwrap();

    let big = "x".repeat(3 << 20); // 3 MiB: streamed, not buffered, in both directions
    let mut data = String::new();
    for i in 0..1000 {
        data.push_str(&format!("{i}\trow-{i}\n"));
    }
    data.push_str(&format!("1000\t{big}\n"));
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in data.as_bytes().chunks(1 << 20).chain(std::iter::once(&b""[..])).filter(|c| !c.is_empty()) {
        sink.send(bytes::Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 1001);

    let direct = proxy.connect_direct().await;
    let row = direct.query_one("SELECT count(*), sum(length(payload)) FROM c", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 1001);

    let out = client.copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT").await.unwrap();
    let chunks: Vec<bytes::Bytes> = out.try_collect().await.unwrap();
    let copied: Vec<u8> = chunks.concat();
    assert_eq!(copied, data.as_bytes());

    // A single DataRow over the streaming threshold.
    let row = client.query_one("SELECT payload FROM c WHERE id = 1000", &[]).await.unwrap();
    assert_eq!(row.get::<_, String>(0).len(), big.len());

    // COPY FROM that fails is reported, and the session goes on.
    let sink = client.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(bytes::Bytes::from_static(b"not-a-number\tx\n")).await.unwrap();
    assert_eq!(sqlstate(&sink.finish().await.unwrap_err()).as_deref(), Some("22P02"));
    assert_eq!(client.query_one("SELECT count(*) FROM c", &[]).await.unwrap().get::<_, i64>(0), 1001);
}

#[tokio::test]
async fn listen_notify_is_relayed() {
    let proxy = TestProxy::start().await;
    let config = proxy.client_config();
    let (listener, mut connection) = config.connect(common::tls_connector()).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(n) = m {
                let _ = tx.send((n.channel().to_owned(), n.payload().to_owned()));
            }
        }
    });
    listener.batch_execute("LISTEN jobs").await.unwrap();
    let sender = proxy.connect().await;
    sender.batch_execute("NOTIFY jobs, 'first'; SELECT pg_notify('jobs', 'second')").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap();
    assert_eq!(first, ("jobs".to_owned(), "first".to_owned()));
    assert_eq!(second, ("jobs".to_owned(), "second".to_owned()));
}

#[tokio::test]
async fn cancel_request_stops_pg_sleep_through_the_proxy() {
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    let token = client.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("SELECT pg_sleep(60)").await;
        (r, client)
    });
    // Wait until the sleep is running upstream, then cancel through the proxy.
    let direct = proxy.connect_direct().await;
    let running = common::eventually(Duration::from_secs(10), || async {
        let n: i64 = direct.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND state = 'active'", &[]).await.unwrap().get(0);
        (n == 1).then_some(())
    })
    .await;
    assert!(running.is_some(), "pg_sleep started");
    token.cancel_query(common::tls_connector()).await.unwrap();
    let (result, client) = tokio::time::timeout(Duration::from_secs(20), sleeper).await.unwrap().unwrap();
    assert_eq!(sqlstate(&result.unwrap_err()).as_deref(), Some("57014"));
    assert_eq!(client.query_one("SELECT 3::int4", &[]).await.unwrap().get::<_, i32>(0), 3);
}

#[tokio::test]
async fn cancel_with_a_wrong_key_is_ignored() {
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
    let direct = proxy.connect_direct().await;
    let backend: i32 = common::eventually(Duration::from_secs(10), || async {
        let rows = direct.query("SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(1.5)' AND state = 'active'", &[]).await.unwrap();
        (rows.len() == 1).then(|| rows[0].get(0))
    })
    .await
    .expect("sleep started");
    // The session's pid is the backend's own (anyone can read it in pg_stat_activity): with a
    // wrong secret it cancels nothing, and neither do made-up pids.
    for pid in [backend, backend, 1, 12345, i32::MAX] {
        let mut raw = common::raw::Raw::plain(proxy.addr).await;
        let mut body = 80877102u32.to_be_bytes().to_vec();
        body.extend_from_slice(&pid.to_be_bytes());
        body.extend_from_slice(&[0, 0, 0, 0]);
        let mut packet = 16i32.to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        raw.send(&packet).await;
        assert!(raw.recv().await.is_none(), "cancel requests get no answer");
    }
    tokio::time::timeout(Duration::from_secs(20), sleeper).await.unwrap().unwrap().expect("the sleep was not cancelled");
}

/// Guessing a session's secret is throttled: the pid is public, only the 4-byte secret guards
/// a cancel. After 32 misses from one address, its next cancel requests are dropped unread,
/// the right one included; its logins are not slowed.
#[tokio::test]
async fn an_address_that_keeps_missing_cancel_keys_is_ignored_for_a_while() {
    let metrics = pglease::admin::metrics_handle();
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    let token = client.cancel_token();
    let direct = proxy.connect_direct().await;
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    for guess in 0..32u32 {
        let mut raw = common::raw::Raw::plain(proxy.addr).await;
        raw.send(&cancel_request(pid, guess)).await;
        assert!(raw.recv().await.is_none());
    }
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
    sleep_started(&direct).await;
    token.cancel_query(common::tls_connector()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), sleeper).await.unwrap().unwrap().expect("the right key, from a throttled address, cancelled nothing");
    // Logins from the address are not slowed by it.
    let started = std::time::Instant::now();
    proxy.connect().await.simple_query("SELECT 1").await.unwrap();
    eprintln!("login after the throttle: {:?}", started.elapsed());
    assert!(metrics.render().contains("result=\"throttled\""), "counted as throttled");
}

/// Guesses spread over many addresses are still bounded: a live session's pid takes no more
/// cancel requests after 32 wrong secrets, from wherever they came.
#[tokio::test]
async fn a_pid_takes_no_more_cancels_after_32_wrong_secrets_from_anywhere() {
    let proxy = TestProxy::start().await;
    let client = proxy.connect().await;
    let token = client.cancel_token();
    let direct = proxy.connect_direct().await;
    let pid: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    for guess in 0..32u32 {
        // One guess from each of 32 loopback addresses: no address is throttled.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from(([127, 0, 1, 1 + guess as u8], 0))).unwrap();
        let stream = socket.connect(proxy.addr).await.unwrap();
        let mut raw = common::raw::Raw::from_io(Box::new(stream));
        raw.send(&cancel_request(pid, guess)).await;
        assert!(raw.recv().await.is_none());
    }
    let sleeper = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(1.5)").await.map(|_| ()) });
    sleep_started(&direct).await;
    // The right key, from a fresh address.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from(([127, 0, 2, 1], 0))).unwrap();
    let tls = tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(&mut common::tls_connector(), "localhost").unwrap();
    token.cancel_query_raw(socket.connect(proxy.addr).await.unwrap(), tls).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), sleeper).await.unwrap().unwrap().expect("the locked pid's statement was not cancelled");
}

/// A CancelRequest packet for `pid` with a 4-byte secret.
fn cancel_request(pid: i32, secret: u32) -> Vec<u8> {
    [16i32.to_be_bytes(), 80877102u32.to_be_bytes(), pid.to_be_bytes(), secret.to_be_bytes()].concat()
}

/// Waits until this database's `SELECT pg_sleep(1.5)` runs upstream.
async fn sleep_started(direct: &tokio_postgres::Client) {
    let running = common::eventually(Duration::from_secs(10), || async {
        let n: i64 = direct.query_one("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(1.5)' AND state = 'active' AND datname = current_database()", &[]).await.unwrap().get(0);
        (n == 1).then_some(())
    })
    .await;
    assert!(running.is_some(), "sleep started");
}
