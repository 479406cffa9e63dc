//! Connection setup and malformed input, byte by byte, through the real proxy: TLS
//! negotiation, startup parameters, protocol versions, authentication failures, and every
//! kind of broken message. After each bad client the proxy keeps serving good ones.

mod common;

use std::time::Duration;

use common::raw::{GSSENC_REQUEST, Raw, SSL_REQUEST, message, query, startup_packet};
use common::{LOGIN, LOGIN_PASSWORD, ProxyOptions, TestProxy};
use tokio::io::AsyncWriteExt;

/// A good client still gets served.
async fn assert_still_serving(proxy: &TestProxy) {
    let client = proxy.connect().await;
    assert_eq!(client.query_one("SELECT 7::int4", &[]).await.unwrap().get::<_, i32>(0), 7);
}

async fn fatal_after_startup(proxy: &TestProxy, params: &[(&str, &str)]) -> common::raw::Msg {
    let mut raw = Raw::tls(proxy.addr).await;
    raw.send(&startup_packet(3 << 16, params)).await;
    let m = raw.recv().await.expect("an answer");
    assert_eq!(m.tag, b'E', "expected an ErrorResponse, got {m:?}");
    assert_eq!(m.field(b'S').as_deref(), Some("FATAL"));
    assert!(raw.recv().await.is_none(), "connection closed after FATAL");
    m
}

#[tokio::test]
async fn plaintext_startup_is_refused_when_tls_is_required() {
    let proxy = TestProxy::start().await;
    let mut raw = Raw::plain(proxy.addr).await;
    raw.send(&startup_packet(3 << 16, &[("user", LOGIN), ("database", &proxy.database)])).await;
    let m = raw.recv().await.unwrap();
    assert_eq!(m.tag, b'E');
    assert_eq!(m.code(), "28000");
    assert!(m.field(b'M').unwrap().contains("encrypted"), "{m:?}");
    // And psql with sslmode=disable gets the same message.
    let (status, _, stderr) = common::run_client("psql", &[&format!("host=127.0.0.1 port={} user={LOGIN} dbname={} sslmode=disable", proxy.addr.port(), proxy.database), "-c", "select 1"]).await;
    assert!(!status.success());
    assert!(stderr.contains("pglease requires an encrypted connection"), "{stderr}");
}

#[tokio::test]
async fn plaintext_works_only_when_allowed() {
    let proxy = TestProxy::start_with(ProxyOptions { allow_plaintext: true, ..Default::default() }).await;
    let (status, stdout, stderr) = common::run_client("psql", &[&format!("host=127.0.0.1 port={} user={LOGIN} dbname={} sslmode=disable", proxy.addr.port(), proxy.database), "-tAc", "select 40 + 2"]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "42");
}

#[tokio::test]
async fn gssenc_request_is_declined_and_ssl_follows() {
    let proxy = TestProxy::start().await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(&GSSENC_REQUEST).await.unwrap();
    let mut raw = Raw::from_io(Box::new(tcp));
    assert_eq!(raw.recv_byte().await, Some(b'N'));
    raw.send(&SSL_REQUEST).await;
    assert_eq!(raw.recv_byte().await, Some(b'S'));
    // libpq with gssencmode=prefer does exactly this dance.
    let (status, stdout, stderr) = common::run_client("psql", &[&proxy.conninfo("gssencmode=prefer"), "-tAc", "select 'ok'"]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "ok");
}

#[tokio::test]
async fn forbidden_and_unknown_startup_parameters_are_fatal() {
    let proxy = TestProxy::start().await;
    let db = proxy.database.clone();
    // Settings every session has pinned are refused wherever they are sent, naming the setting.
    for (key, value, code, named) in [
        ("options", "-c search_path=evil", "42501", "search_path"),
        ("options", "--session-authorization=postgres", "42501", "session_authorization"),
        ("options", "-B 1000", "08P01", "-B"),
        ("replication", "database", "42501", "replication"),
        ("search_path", "evil", "42501", "search_path"),
        ("session_authorization", "postgres", "42501", "session_authorization"),
        ("default_transaction_read_only", "off", "42501", "default_transaction_read_only"),
        ("work mem", "1GB", "08P01", "work mem"),
        ("client_encoding", "LATIN1", "08P01", "LATIN1"),
    ] {
        let m = fatal_after_startup(&proxy, &[("user", LOGIN), ("database", &db), (key, value)]).await;
        assert_eq!(m.code(), code, "{key}: {m:?}");
        assert!(m.field(b'M').unwrap().contains(named), "{m:?}");
    }
    let m = fatal_after_startup(&proxy, &[("database", &db)]).await;
    assert_eq!(m.code(), "28000");
    // psql's own way of passing options is decided setting by setting.
    let (status, _, stderr) = common::run_client("psql", &[&proxy.conninfo("options='-c default_transaction_read_only=off'"), "-c", "select 1"]).await;
    assert!(!status.success());
    assert!(stderr.contains("startup parameter \"default_transaction_read_only\" is not allowed"), "{stderr}");
    // A login without a scope (the proxy core on its own) takes the rest as Postgres would.
    let (status, stdout, stderr) = common::run_client("psql", &[&proxy.conninfo("options='-c work_mem=3MB'"), "-At", "-c", "show work_mem"]).await;
    assert!(status.success() && stdout.trim() == "3MB", "{stdout}{stderr}");
    assert_still_serving(&proxy).await;
}

#[tokio::test]
async fn newer_protocol_minor_versions_are_negotiated_down() {
    let proxy = TestProxy::start().await;
    let mut raw = Raw::tls(proxy.addr).await;
    // What PG 18 libpq sends with max_protocol_version=latest: 3.2 plus a _pq_ option.
    raw.send(&startup_packet((3 << 16) | 2, &[("user", LOGIN), ("database", &proxy.database), ("_pq_.test_option", "1")])).await;
    let m = raw.recv().await.unwrap();
    assert_eq!(m.tag, b'v', "NegotiateProtocolVersion first");
    assert_eq!(&m.body[..8], &[0, 3, 0, 0, 0, 0, 0, 1]);
    assert!(String::from_utf8_lossy(&m.body[8..]).contains("_pq_.test_option"));
    raw.scram(LOGIN_PASSWORD).await.unwrap();
    let hello = raw.until_ready().await;
    assert!(hello.iter().any(|m| m.tag == b'K'));
    raw.send(&query("SELECT 1")).await;
    let answer = raw.until_ready().await;
    assert_eq!(answer.iter().map(|m| m.tag).collect::<Vec<_>>(), b"TDCZ".to_vec());
}

#[tokio::test]
async fn protocol_2_and_garbage_startup_are_refused() {
    let proxy = TestProxy::start().await;
    let mut raw = Raw::tls(proxy.addr).await;
    raw.send(&startup_packet(2 << 16, &[("user", LOGIN)])).await;
    let m = raw.recv().await.unwrap();
    assert_eq!((m.tag, m.code().as_str()), (b'E', "08P01"));
    assert!(raw.recv().await.is_none());

    // A length of 0, of 2 GiB, and one over the 10,000-byte startup limit.
    for len in [0i32, 3, i32::MAX, 10_001] {
        let mut raw = Raw::plain(proxy.addr).await;
        let mut packet = len.to_be_bytes().to_vec();
        packet.extend_from_slice(&(3u32 << 16).to_be_bytes());
        raw.send(&packet).await;
        let answers = raw.until_closed().await;
        assert!(answers.iter().all(|m| m.tag == b'E' && m.code() == "08P01"), "len {len}: {answers:?}");
    }
    // A truncated startup packet: the client goes away mid-packet.
    let mut raw = Raw::plain(proxy.addr).await;
    raw.send(&[0, 0, 0, 50, 0, 3]).await;
    drop(raw);
    assert_still_serving(&proxy).await;
}

#[tokio::test]
async fn bytes_sent_with_ssl_request_are_refused_as_postgres_does() {
    let proxy = TestProxy::start().await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // SSLRequest immediately followed by a plaintext startup packet (CVE-2021-23214 shape).
    let mut bytes = SSL_REQUEST.to_vec();
    bytes.extend(startup_packet(3 << 16, &[("user", LOGIN), ("database", &proxy.database)]));
    tcp.write_all(&bytes).await.unwrap();
    let mut answer = [0u8; 1];
    tokio::io::AsyncReadExt::read_exact(&mut tcp, &mut answer).await.unwrap();
    assert_eq!(answer[0], b'S');
    // The injected bytes are never protocol: after the handshake, the same FATAL as Postgres's.
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(common::raw::tls_config()).connect(name, tcp).await.expect("TLS handshake");
    let mut raw = Raw::from_io(Box::new(tls));
    let msgs = raw.until_closed().await;
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(msgs[0].code(), "08P01");
    assert_eq!(msgs[0].field(b'M').as_deref(), Some("received unencrypted data after SSL request"));
    assert_still_serving(&proxy).await;
}

#[tokio::test]
async fn plaintext_after_the_ssl_answer_closes_without_a_tls_alert() {
    let proxy = TestProxy::start().await;
    let mut raw = Raw::plain(proxy.addr).await;
    raw.send(&SSL_REQUEST).await;
    assert_eq!(raw.recv_byte().await, Some(b'S'));
    raw.send(&startup_packet(3 << 16, &[("user", LOGIN), ("database", &proxy.database)])).await;
    // Postgres (OpenSSL) closes on plaintext where a ClientHello belongs, sending nothing.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tokio::io::AsyncReadExt::read_to_end(&mut raw.io, &mut rest)).await.expect("closed");
    assert!(rest.is_empty(), "nothing after 'S': {rest:?}");
    assert_still_serving(&proxy).await;
}

#[tokio::test]
async fn wrong_password_and_unknown_login_look_the_same() {
    let proxy = TestProxy::start().await;
    let db = proxy.database.clone();
    let mut answers = Vec::new();
    for user in [LOGIN, "nobody"] {
        let mut raw = Raw::tls(proxy.addr).await;
        raw.send(&startup_packet(3 << 16, &[("user", user), ("database", &db)])).await;
        let err = raw.scram("wrong password").await.unwrap_err();
        assert_eq!(err.code(), "28P01");
        answers.push(err.field(b'M').unwrap().replace(user, "<user>"));
    }
    assert_eq!(answers[0], answers[1]);
    // Through a real driver, too.
    let e = proxy.try_connect(LOGIN, "nope", |_| {}).await.err().unwrap();
    assert_eq!(common::sqlstate(&e).as_deref(), Some("28P01"));
    assert_still_serving(&proxy).await;
}

#[tokio::test]
async fn scram_with_and_without_channel_binding() {
    let proxy = TestProxy::start().await;
    for binding in [tokio_postgres::config::ChannelBinding::Require, tokio_postgres::config::ChannelBinding::Disable] {
        let client = proxy.try_connect(LOGIN, LOGIN_PASSWORD, |c| {
            c.channel_binding(binding);
        }).await.unwrap_or_else(|e| panic!("{binding:?}: {e}"));
        assert_eq!(client.query_one("SELECT 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);
    }
    // libpq too.
    let (status, stdout, stderr) = common::run_client("psql", &[&proxy.conninfo("channel_binding=require"), "-tAc", "select 'bound'"]).await;
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "bound");
}

#[tokio::test]
async fn malformed_messages_after_login_get_fatal_and_others_are_unaffected() {
    let proxy = TestProxy::start().await;
    let db = proxy.database.clone();
    // Keep a healthy session open across all the bad ones.
    let healthy = proxy.connect().await;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("length 0", vec![b'Q', 0, 0, 0, 0], "08P01"),
        ("length 2 GiB", { let mut v = vec![b'Q']; v.extend_from_slice(&(i32::MAX).to_be_bytes()); v }, "54000"),
        ("unknown type", message(b'z', b"hello"), "08P01"),
        ("Query without terminator", message(b'Q', b"select 1"), "08P01"),
        ("Query with invalid UTF-8", message(b'Q', b"select '\xff'\0"), "08P01"),
        ("Bind with a lying count", message(b'B', &[0, 0, 0, 0, 0x7f, 0xff]), "08P01"),
        ("Execute too short", message(b'E', b"\0\0"), "08P01"),
        ("password after login", message(b'p', b"secret\0"), "08P01"),
    ];
    for (what, bytes, code) in cases {
        let mut raw = Raw::login(proxy.addr, &db).await;
        raw.send(&bytes).await;
        let answers = raw.until_closed().await;
        let fatal = answers.iter().find(|m| m.tag == b'E').unwrap_or_else(|| panic!("{what}: no error in {answers:?}"));
        assert_eq!(fatal.code(), code, "{what}: {fatal:?}");
        assert_eq!(fatal.field(b'S').as_deref(), Some("FATAL"), "{what}");
    }
    // A message cut short by a client that goes away.
    let mut raw = Raw::login(proxy.addr, &db).await;
    raw.send(&[b'Q', 0, 0, 1, 0, b's', b'e']).await;
    drop(raw);
    assert_eq!(healthy.query_one("SELECT 5::int4", &[]).await.unwrap().get::<_, i32>(0), 5);
    assert_still_serving(&proxy).await;
}

#[tokio::test]
async fn function_call_is_refused_like_a_postgres_error() {
    let proxy = TestProxy::start().await;
    let mut raw = Raw::login(proxy.addr, &proxy.database).await;
    // FunctionCall: oid of int4pl(23, 1) = 177, two int4 args in binary.
    let mut body = Vec::new();
    body.extend_from_slice(&177i32.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&2i16.to_be_bytes());
    for v in [2i32, 3] {
        body.extend_from_slice(&4i32.to_be_bytes());
        body.extend_from_slice(&v.to_be_bytes());
    }
    body.extend_from_slice(&1i16.to_be_bytes());
    let call = message(b'F', &body);
    raw.send(&call).await;
    let answer = raw.until_ready().await;
    assert_eq!(answer.len(), 2, "{answer:?}");
    assert_eq!(answer[0].code(), "42501");
    assert!(answer[0].field(b'M').unwrap().starts_with("pglease:"));
    assert_eq!(answer[1].body, b"I");

    // Inside a transaction the refusal leaves it failed, as any error would.
    raw.send(&query("BEGIN")).await;
    raw.until_ready().await;
    raw.send(&call).await;
    let answer = raw.until_ready().await;
    assert_eq!(answer[0].code(), "42501");
    assert_eq!(answer.last().unwrap().body, b"E", "transaction failed");
    raw.send(&query("SELECT 1")).await;
    assert_eq!(raw.until_ready().await[0].code(), "25P02");
    raw.send(&query("ROLLBACK")).await;
    let done = raw.until_ready().await;
    assert_eq!(done.last().unwrap().body, b"I");
}

#[tokio::test]
async fn parameter_status_changes_are_relayed() {
    let proxy = TestProxy::start().await;
    let mut raw = Raw::login(proxy.addr, &proxy.database).await;
    raw.send(&query("SET application_name = 'relay-check'")).await;
    let answer = raw.until_ready().await;
    let status = answer.iter().find(|m| m.tag == b'S').expect("ParameterStatus");
    assert_eq!(status.body, b"application_name\0relay-check\0");
}

#[tokio::test]
async fn too_many_connections_get_53300() {
    let proxy = TestProxy::start_with(ProxyOptions { max_connections: 1, ..Default::default() }).await;
    let first = proxy.connect().await;
    let e = proxy.try_connect(LOGIN, LOGIN_PASSWORD, |_| {}).await.expect_err("second connection refused");
    assert_eq!(common::sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
    drop(first);
    // The slot frees when the first client leaves.
    let again = common::eventually(Duration::from_secs(10), || async { proxy.try_connect(LOGIN, LOGIN_PASSWORD, |_| {}).await.ok() }).await;
    assert!(again.is_some());
}

#[tokio::test]
async fn slow_handshakes_time_out() {
    let proxy = TestProxy::start_with(ProxyOptions { handshake_timeout: Duration::from_millis(300), ..Default::default() }).await;
    let mut raw = Raw::plain(proxy.addr).await;
    raw.send(&[0, 0]).await; // half a length word, then nothing
    assert!(raw.recv().await.is_none(), "closed by the proxy");
    assert_still_serving(&proxy).await;
}
