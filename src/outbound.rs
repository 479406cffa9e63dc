//! HTTP clients for the services pglease calls (notification receivers, the identity
//! provider): bounded in time, redirects not followed, errors as statuses, and an optional
//! private CA instead of the public web roots.

use std::path::Path;
use std::time::Duration;

/// An agent for one service. `key` names the config key in errors (`notify[0].ca_file`).
pub fn agent(ca_file: Option<&Path>, key: &str) -> Result<ureq::Agent, String> {
    let mut tls = ureq::tls::TlsConfig::builder();
    if let Some(ca) = ca_file {
        let pem = std::fs::read(ca).map_err(|e| format!("{key}: cannot read {}: {e}", ca.display()))?;
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{key}: no certificate in {}", ca.display()));
        }
        tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
    }
    Ok(ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(10)))
        .tls_config(tls.build())
        .build()
        .into())
}
