//! `pglease audit replay`: re-runs a recorded session's allowed statements, in order, with their
//! parameters (same formats, same types), on another database, and compares each outcome
//! (rows, error) with the recording.

use std::error::Error;
use base64::Engine;
use bytes::BytesMut;
use serde::Serialize;
use tokio_postgres::types::{Format, IsNull, ToSql, Type, to_sql_checked};

use super::reader::{ShownStatement, Source, show_session};

/// A parameter re-sent exactly as recorded.
#[derive(Debug)]
struct RawParam {
    bytes: Option<Vec<u8>>,
    binary: bool,
}

impl ToSql for RawParam {
    fn to_sql(&self, _ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        match &self.bytes {
            None => Ok(IsNull::Yes),
            Some(b) => {
                out.extend_from_slice(b);
                Ok(IsNull::No)
            }
        }
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        if self.binary { Format::Binary } else { Format::Text }
    }

    to_sql_checked!();
}

/// The outcome of one replayed statement.
#[derive(Debug, Serialize)]
pub struct Replayed {
    pub stmt: u64,
    pub sql: String,
    pub recorded_rows: Option<u64>,
    pub recorded_error: Option<String>,
    pub replayed_rows: Option<u64>,
    pub replayed_error: Option<String>,
    pub matches: bool,
}

/// The statements a replay runs: allowed ones that Postgres actually ran.
pub fn replayable(source: Source<'_>, session: u64) -> Result<Vec<ShownStatement>, String> {
    Ok(show_session(source, session)?.into_iter().filter(|s| s.decision != "deny" && !s.skipped).collect())
}

fn params_of(s: &ShownStatement) -> Result<(Vec<Type>, Vec<RawParam>), String> {
    let mut types = Vec::new();
    let mut params = Vec::new();
    for p in s.params.as_array().into_iter().flatten() {
        let oid = p["oid"].as_u64().unwrap_or(0) as u32;
        types.push(Type::from_oid(oid).unwrap_or(Type::UNKNOWN));
        let format = p["format"].as_str().unwrap_or("text");
        let binary = format == "binary";
        let bytes = match p["value"].as_str() {
            None => None,
            Some("<redacted>") => return Err("its parameters were redacted".into()),
            // Binary values, and text values that were not plain UTF-8, are kept in base64.
            Some(v) if binary || format == "text-base64" => Some(base64::engine::general_purpose::STANDARD.decode(v).map_err(|e| e.to_string())?),
            Some(v) => Some(v.as_bytes().to_vec()),
        };
        params.push(RawParam { bytes, binary });
    }
    Ok((types, params))
}

/// The settings pinned for the recorded session (from its `session_opened` event).
pub fn session_settings(source: Source<'_>, session: u64) -> Result<Vec<(String, String)>, String> {
    let mut settings = Vec::new();
    source.for_each(Some(session), |line| {
        let v = &line.value;
        if v["kind"] == "event" && v["event"] == "session_opened" && v["session"].as_u64() == Some(session)
            && let Some(m) = v["settings"].as_object()
        {
            settings = m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned())).collect();
        }
        Ok(())
    })?;
    Ok(settings)
}

/// Puts the target session under the recorded session's pinned settings.
pub async fn apply_settings(client: &tokio_postgres::Client, settings: &[(String, String)]) -> Result<(), String> {
    for (name, value) in settings {
        client.execute("SELECT pg_catalog.set_config($1, $2, false)", &[name, value]).await.map_err(|e| format!("cannot set {name}: {}", crate::conninfo::describe_error(&e)))?;
    }
    Ok(())
}

/// Runs the session's statements against `client`.
pub async fn replay(client: &tokio_postgres::Client, statements: &[ShownStatement]) -> Vec<Replayed> {
    let mut out = Vec::new();
    for s in statements {
        let sql = s.sql_ran.clone().unwrap_or_else(|| s.sql.clone());
        let outcome: Result<u64, String> = async {
            if s.protocol == "simple" {
                let msgs = client.simple_query(&sql).await.map_err(|e| code_of(&e))?;
                Ok(msgs
                    .iter()
                    .map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::CommandComplete(n) => *n,
                        _ => 0,
                    })
                    .sum())
            } else {
                let (types, params) = params_of(s)?;
                let stmt = client.prepare_typed(&sql, &types).await.map_err(|e| code_of(&e))?;
                let rows = client.query_raw(&stmt, params.iter()).await.map_err(|e| code_of(&e))?;
                futures_util::pin_mut!(rows);
                let mut n = 0u64;
                while let Some(r) = futures_util::StreamExt::next(&mut rows).await {
                    r.map_err(|e| code_of(&e))?;
                    n += 1;
                }
                Ok(rows.rows_affected().unwrap_or(n).max(n))
            }
        }
        .await;
        let (replayed_rows, replayed_error) = match outcome {
            Ok(n) => (Some(n), None),
            Err(e) => (None, Some(e)),
        };
        let recorded_error = s.error_code.clone();
        let matches = match (&recorded_error, &replayed_error) {
            (Some(a), Some(b)) => b.starts_with(a.as_str()),
            (None, None) => s.rows.is_none_or(|r| Some(r) == replayed_rows),
            _ => false,
        };
        out.push(Replayed { stmt: s.stmt, sql, recorded_rows: s.rows, recorded_error, replayed_rows, replayed_error, matches });
    }
    out
}

fn code_of(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => crate::conninfo::describe_error(e),
    }
}
