//! The second audit sink: the same records, batched into a table of a separate Postgres
//! database, for several proxy instances and SQL-minded auditors.
//!
//! It follows the file log (the durable source of truth) from the highest `seq` the table
//! holds: if the database is slow or down it falls behind and catches up later, so it never
//! drops a record, never slows statements down, and holds one batch in memory at most.

use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::log::log_files;

pub struct PgSinkOptions {
    /// Connection string of the audit database.
    pub dsn: String,
    /// Table name (created if missing).
    pub table: String,
    /// The file log to follow.
    pub log: PathBuf,
    /// With a control plane: this instance's id. Records then go to the control plane's
    /// `pglease.audit`, keyed by (instance, seq), next to every other instance's.
    pub instance: Option<String>,
}

const BATCH: usize = 1000;

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, String> {
    let config: tokio_postgres::Config = dsn.parse().map_err(|e: tokio_postgres::Error| e.to_string())?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Disable {
        let (client, conn) = config.connect(tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(client)
    } else {
        let tls = crate::tls::upstream_client_config(crate::tls::UpstreamVerify::None, None).map_err(|e| e.to_string())?;
        let (client, conn) = config.connect(tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone())).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(client)
    }
}

fn quote(t: &str) -> String {
    t.split('.').map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect::<Vec<_>>().join(".")
}

/// Reads records with `seq > after` from the log files, at most `BATCH` of them.
fn read_after(log: &Path, after: u64, cursor: &mut Option<(PathBuf, u64)>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let files = log_files(log);
    // Resume from the remembered position when the file still exists.
    let start = cursor.as_ref().and_then(|(f, _)| files.iter().position(|p| p == f)).unwrap_or(0);
    for file in &files[start..] {
        let mut f = std::fs::File::open(file).map_err(|e| e.to_string())?;
        let offset = match cursor {
            Some((cf, off)) if cf == file => *off,
            _ => 0,
        };
        f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        let mut reader = std::io::BufReader::new(f);
        let mut pos = offset;
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).map_err(|e| e.to_string())?;
            if n == 0 || !line.ends_with('\n') {
                break; // end, or a record still being written
            }
            pos += n as u64;
            *cursor = Some((file.clone(), pos));
            let seq = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["seq"].as_u64()).unwrap_or(0);
            if seq > after {
                out.push(line.trim_end().to_owned());
                if out.len() >= BATCH {
                    return Ok(out);
                }
            }
        }
    }
    Ok(out)
}

/// Follows the log into the table until `shutdown`.
pub async fn run(options: PgSinkOptions, shutdown: CancellationToken) {
    let table = quote(&options.table);
    let mut cursor: Option<(PathBuf, u64)> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let result: Result<(), String> = async {
            let client = connect(&options.dsn).await?;
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {table} (seq bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, \
                     session bigint, hash text NOT NULL, prev text NOT NULL, record jsonb NOT NULL)"
                ))
                .await
                .map_err(|e| e.to_string())?;
            let insert = client
                .prepare(&format!(
                    "INSERT INTO {table} (seq, at, kind, session, hash, prev, record) \
                     SELECT (r->>'seq')::bigint, (r->>'at')::timestamptz, r->>'kind', (r->>'session')::bigint, r->>'hash', r->>'prev', r \
                     FROM jsonb_array_elements($1::text::jsonb) r ON CONFLICT (seq) DO NOTHING"
                ))
                .await
                .map_err(|e| e.to_string())?;
            let mut after: u64 = client
                .query_one(&format!("SELECT coalesce(max(seq), 0) FROM {table}"), &[])
                .await
                .map_err(|e| e.to_string())?
                .get::<_, i64>(0) as u64;
            loop {
                let log = options.log.clone();
                let mut c = cursor.clone();
                let (lines, c) = tokio::task::spawn_blocking(move || read_after(&log, after, &mut c).map(|l| (l, c)))
                    .await
                    .map_err(|e| e.to_string())??;
                cursor = c;
                if lines.is_empty() {
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                    }
                }
                let batch = format!("[{}]", lines.join(","));
                client.execute(&insert, &[&batch]).await.map_err(|e| e.to_string())?;
                after = serde_json::from_str::<serde_json::Value>(lines.last().expect("non-empty")).ok().and_then(|v| v["seq"].as_u64()).unwrap_or(after);
                metrics::counter!("pglease_audit_pg_records_total").increment(lines.len() as u64);
                metrics::gauge!("pglease_audit_pg_seq").set(after as f64);
            }
        }
        .await;
        if let Err(e) = result {
            metrics::counter!("pglease_audit_failures_total", "sink" => "postgres").increment(1);
            tracing::warn!(error = %e, "audit Postgres sink failed; retrying (records wait in the file log)");
            cursor = None;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        } else {
            return;
        }
    }
}
