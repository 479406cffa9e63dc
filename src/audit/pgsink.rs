//! The second audit sink: the same records, batched into a table of a separate Postgres
//! database (`[audit.postgres]`), for SQL-minded auditors; and, with a control plane, into its
//! `pglease.audit`, where every instance's chain lies next to the others', keyed by
//! (instance, seq): each instance keeps its own chain and sequence.
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
    /// Table name (created if missing, except the control plane's: its migrations make it).
    pub table: String,
    /// The file log to follow.
    pub log: PathBuf,
    /// With a control plane: this instance's id. Records then go to the control plane's
    /// `pglease.audit`, keyed by (instance, seq), next to every other instance's.
    pub instance: Option<String>,
    /// While this says so, nothing is written (another live process holds the instance id:
    /// its records and these would share one key).
    pub hold: Option<std::sync::Arc<dyn Fn() -> bool + Send + Sync>>,
}

const BATCH: usize = 1000;

/// The `[audit.postgres]` database, as it always was: tokio-postgres parses the string, and TLS
/// (when not disabled) is not verified.
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
            // The live file's reserved zeros (see `segment`): nothing more yet.
            if std::io::BufRead::fill_buf(&mut reader).map_err(|e| e.to_string())?.first() == Some(&0) {
                break;
            }
            let mut line = String::new();
            let n = reader.read_line(&mut line).map_err(|e| e.to_string())?;
            if n == 0 || !line.ends_with('\n') {
                break; // end, or a record still being written
            }
            // A line that does not read as a record is not passed over: it is read again next
            // time (a copy seen half done), and a line that never reads stops the copy, visibly.
            let Some(seq) = serde_json::from_str::<serde_json::Value>(&line).ok().and_then(|v| v["seq"].as_u64()) else {
                tracing::warn!(file = %file.display(), offset = pos, "audit sink: a line of the log does not read as a record; waiting");
                return Ok(out);
            };
            pos += n as u64;
            *cursor = Some((file.clone(), pos));
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

/// Where the records go, and how that table is keyed.
struct Target {
    table: String,
    /// `Some`: the control plane's shared table, keyed by (instance, seq).
    instance: Option<String>,
}

impl Target {
    /// Connects, makes sure the table is there, and prepares the insert; returns the
    /// connection, the insert and the highest `seq` the table holds (for this instance).
    async fn open(&self, dsn: &str) -> Result<(tokio_postgres::Client, tokio_postgres::Statement, u64), String> {
        let table = &self.table;
        // The columns both tables share, taken from each record of a batch (a JSON array).
        let values = "(r->>'seq')::bigint, (r->>'at')::timestamptz, r->>'kind', (r->>'session')::bigint, r->>'hash', r->>'prev', r \
                      FROM jsonb_array_elements($1::text::jsonb) r";
        let (client, insert, max) = match &self.instance {
            None => {
                let client = connect(dsn).await?;
                client
                    .batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {table} (seq bigint PRIMARY KEY, at timestamptz NOT NULL, kind text NOT NULL, \
                         session bigint, hash text NOT NULL, prev text NOT NULL, record jsonb NOT NULL)"
                    ))
                    .await
                    .map_err(|e| e.to_string())?;
                let insert = format!("INSERT INTO {table} (seq, at, kind, session, hash, prev, record) SELECT {values} ON CONFLICT (seq) DO NOTHING");
                (client, insert, format!("SELECT coalesce(max(seq), 0) FROM {table}"))
            }
            // The control plane's migrations made the table. Its connection string is libpq's
            // (sslmode=verify-full with sslrootcert, a quoted password), as every other
            // control-plane connection reads it.
            Some(_) => {
                let client = crate::control_plane::connect(dsn).await?;
                let insert = format!(
                    "INSERT INTO {table} (instance, seq, at, kind, session, hash, prev, record) SELECT $2::text, {values} ON CONFLICT (instance, seq) DO NOTHING"
                );
                (client, insert, format!("SELECT coalesce(max(seq), 0) FROM {table} WHERE instance = $1"))
            }
        };
        let insert = client.prepare(&insert).await.map_err(|e| crate::conninfo::describe_error(&e))?;
        let max = match &self.instance {
            None => client.query_one(&max, &[]).await,
            Some(instance) => client.query_one(&max, &[instance]).await,
        };
        let after = max.map_err(|e| crate::conninfo::describe_error(&e))?.get::<_, i64>(0);
        Ok((client, insert, after.max(0) as u64))
    }

    /// Inserts one batch (a JSON array of records); records already there are left alone.
    async fn insert(&self, client: &tokio_postgres::Client, insert: &tokio_postgres::Statement, batch: &str) -> Result<u64, String> {
        let inserted = match &self.instance {
            None => client.execute(insert, &[&batch]).await,
            Some(instance) => client.execute(insert, &[&batch, instance]).await,
        };
        inserted.map_err(|e| crate::conninfo::describe_error(&e))
    }

    /// The `sink` label of this sink's metrics.
    fn label(&self) -> &'static str {
        if self.instance.is_some() { "control_plane" } else { "postgres" }
    }
}

/// Follows the log into the table until `shutdown`.
pub async fn run(options: PgSinkOptions, shutdown: CancellationToken) {
    let target = Target { table: quote(&options.table), instance: options.instance.clone() };
    let mut cursor: Option<(PathBuf, u64)> = None;
    loop {
        // NOTE: dropping `follow` at shutdown is safe: the batch in flight either committed or
        // not, and the next start resumes from the table's highest `seq`.
        let Err(e) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = follow(&target, &options, &mut cursor) => r,
        };
        metrics::counter!("pglease_audit_failures_total", "sink" => target.label()).increment(1);
        let pause = match e {
            FollowError::Retry(e) => {
                tracing::warn!(error = %e, table = %options.table, instance = ?options.instance, "audit Postgres sink failed; retrying (records wait in the file log)");
                Duration::from_secs(1)
            }
            FollowError::Mismatch(e) => {
                tracing::error!(table = %options.table, "{e}");
                Duration::from_secs(30)
            }
        };
        cursor = None;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Checks that the table's last record of this instance is this file's record of that seq: a
/// new audit file under an instance id used before (a replaced disk, a copied config) would
/// otherwise have its first records skipped without a word.
async fn continues(client: &tokio_postgres::Client, table: &str, instance: &str, log: &Path, seq: u64) -> Result<(), FollowError> {
    let row = client
        .query_one(&format!("SELECT hash FROM {table} WHERE instance = $1 AND seq = $2"), &[&instance, &(seq as i64)])
        .await
        .map_err(|e| crate::conninfo::describe_error(&e))?;
    let stored: String = row.get(0);
    let log = log.to_owned();
    let mine = tokio::task::spawn_blocking(move || read_after(&log, seq - 1, &mut None)).await.map_err(|e| e.to_string())??;
    match mine.first().and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        Some(v) if v["seq"].as_u64() == Some(seq) && v["hash"].as_str() == Some(stored.as_str()) => Ok(()),
        // The file starts later (its older part was moved away): nothing to compare.
        Some(v) if v["seq"].as_u64() > Some(seq) => Ok(()),
        _ => Err(FollowError::Mismatch(format!(
            "the control plane holds records up to seq {seq} for instance {instance:?} that are not this audit file's \
             (a new file under an instance_id used before?): nothing is copied until that is resolved \
             (give this instance an id of its own, or move the old rows aside)"
        ))),
    }
}

/// Why following stopped.
enum FollowError {
    /// Worth trying again soon (a connection, a query).
    Retry(String),
    /// The table and the file disagree: an operator must act; looked at again now and then.
    Mismatch(String),
}

impl From<String> for FollowError {
    fn from(e: String) -> Self {
        Self::Retry(e)
    }
}

/// Connects and copies, batch after batch, until something fails.
async fn follow(target: &Target, options: &PgSinkOptions, cursor: &mut Option<(PathBuf, u64)>) -> Result<std::convert::Infallible, FollowError> {
    let (client, insert, mut after) = target.open(&options.dsn).await?;
    if let Some(instance) = &target.instance
        && after > 0
    {
        continues(&client, &target.table, instance, &options.log, after).await?;
    }
    loop {
        // Held: the records wait in the file until it ends (nothing read meanwhile).
        if options.hold.as_ref().is_some_and(|hold| hold()) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let log = options.log.clone();
        let mut c = cursor.clone();
        let (lines, c) = tokio::task::spawn_blocking(move || read_after(&log, after, &mut c).map(|l| (l, c))).await.map_err(|e| e.to_string())??;
        *cursor = c;
        if lines.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let batch = format!("[{}]", lines.join(","));
        target.insert(&client, &insert, &batch).await?;
        after = serde_json::from_str::<serde_json::Value>(lines.last().expect("non-empty")).ok().and_then(|v| v["seq"].as_u64()).unwrap_or(after);
        metrics::counter!("pglease_audit_pg_records_total", "sink" => target.label()).increment(lines.len() as u64);
        metrics::gauge!("pglease_audit_pg_seq", "sink" => target.label()).set(after as f64);
    }
}
