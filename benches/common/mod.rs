//! What the benchmarks share.
#![allow(dead_code)]

use std::collections::BTreeMap;

use pglease::config::ScopeConfig;

/// The scope every benchmark runs pgbench under: the four pgbench tables, read and write.
pub fn bench_scopes(role: &str) -> BTreeMap<String, ScopeConfig> {
    toml::from_str(&format!(
        r#"[bench]
        database = "bench"
        role = "{role}"
        password_env = "UNUSED"
        tables = [{{ name = "public.pgbench_*", allow = ["read", "insert", "update", "delete"] }}]"#
    ))
    .expect("the bench scope parses")
}

/// TLS for tokio-postgres clients, trusting only the CA certificates in `ca_pem`.
pub fn tls_trusting(ca_pem: &[u8]) -> tokio_postgres_rustls::MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(pglease::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}
