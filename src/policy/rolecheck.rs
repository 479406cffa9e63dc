//! Defense in depth: the Postgres role behind a scope must not be able to do more than the
//! scope allows. Checked at startup by logging in as the role (with the password only the proxy
//! holds) and asking Postgres what it may do; a scope whose role has more is not served.

use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use super::ScopePolicy;
use crate::codec::messages::ErrorFields;
use crate::codec::{FramedReader, ReadEvent};
use crate::config::Action;
use crate::upstream::{Upstream, UpstreamLogin};

/// Runs one simple query and returns its rows as text. Only for short catalog queries.
pub(crate) async fn query(reader: &mut FramedReader<crate::stream::Stream>, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let mut msg = BytesMut::new();
    msg.put_u8(b'Q');
    msg.put_i32((sql.len() + 5) as i32);
    msg.put_slice(sql.as_bytes());
    msg.put_u8(0);
    reader.get_mut().write_all(&msg).await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let frame = match reader.next().await.map_err(|e| e.to_string())? {
            Some(ReadEvent::Frame(f)) => f,
            Some(ReadEvent::Large { .. }) => return Err("oversized row in a catalog query".into()),
            None => return Err("connection closed".into()),
        };
        match frame.tag() {
            b'D' => {
                let body = frame.body();
                let n = u16::from_be_bytes([body[0], body[1]]) as usize;
                let mut at = 2;
                let mut row = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
                    at += 4;
                    if len < 0 {
                        row.push(None);
                    } else {
                        row.push(Some(String::from_utf8_lossy(&body[at..at + len as usize]).into_owned()));
                        at += len as usize;
                    }
                }
                rows.push(row);
            }
            b'E' => error = ErrorFields::decode(&frame).ok().and_then(|f| f.message().map(str::to_owned)),
            b'Z' => return error.map_or(Ok(rows), Err),
            _ => {}
        }
    }
}

const DANGEROUS_ROLES: &[&str] = &[
    "pg_read_server_files", "pg_write_server_files", "pg_execute_server_program", "pg_signal_backend", "pg_read_all_data",
    "pg_write_all_data", "pg_checkpoint", "pg_create_subscription", "pg_use_reserved_connections",
];

/// What the scope's role can do beyond the scope; empty when it matches.
pub async fn excess_privileges(upstream: &Upstream, login: &UpstreamLogin, database: &str, policy: &ScopePolicy) -> Result<Vec<String>, String> {
    let session = upstream.connect(login, database, &[("application_name".into(), "pglease role check".into())]).await.map_err(|e| e.to_string())?;
    let mut reader = FramedReader::with_buffer(session.stream, crate::upstream::upstream_limits(1 << 20), session.leftover);
    let mut excess = Vec::new();

    let attrs = query(&mut reader, "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication FROM pg_roles WHERE rolname = current_user").await?;
    if let Some(row) = attrs.first() {
        for (i, what) in ["SUPERUSER", "BYPASSRLS", "CREATEROLE", "CREATEDB", "REPLICATION"].iter().enumerate() {
            if row.get(i).cloned().flatten().as_deref() == Some("t") {
                excess.push(format!("role attribute {what}"));
            }
        }
    }
    let list = DANGEROUS_ROLES.iter().map(|r| format!("'{r}'")).collect::<Vec<_>>().join(",");
    let members = query(
        &mut reader,
        &format!("SELECT r.rolname FROM pg_roles r WHERE r.rolname IN ({list}) AND pg_has_role(current_user, r.oid, 'MEMBER') ORDER BY 1"),
    )
    .await?;
    excess.extend(members.into_iter().filter_map(|r| r.into_iter().next().flatten()).map(|r| format!("membership in {r}")));

    let tables = query(
        &mut reader,
        "SELECT n.nspname, c.relname, has_table_privilege(c.oid, 'SELECT'), has_table_privilege(c.oid, 'INSERT'), \
                has_table_privilege(c.oid, 'UPDATE'), has_table_privilege(c.oid, 'DELETE'), has_table_privilege(c.oid, 'TRUNCATE') \
         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r','p','v','m','f') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
         ORDER BY 1, 2",
    )
    .await?;
    for row in &tables {
        let (Some(schema), Some(table)) = (row[0].clone(), row[1].clone()) else { continue };
        for (i, (privilege, actions)) in [
            ("SELECT", &[Action::Read, Action::CopyOut][..]),
            ("INSERT", &[Action::Insert, Action::CopyIn][..]),
            ("UPDATE", &[Action::Update][..]),
            ("DELETE", &[Action::Delete][..]),
            ("TRUNCATE", &[Action::Truncate][..]),
        ]
        .iter()
        .enumerate()
        {
            if row[2 + i].as_deref() == Some("t") && !actions.iter().any(|a| policy.allows(&schema, &table, *a)) {
                excess.push(format!("{privilege} on {schema}.{table}"));
            }
        }
        // A row filter must be a row-level security policy of the role too.
        if policy.rule_of(&schema, &table).is_some_and(|r| r.row_filter.is_some()) && row[2].as_deref() == Some("t") {
            let q = format!(
                "SELECT c.relrowsecurity AND EXISTS (SELECT 1 FROM pg_policies p WHERE p.schemaname = '{s}' AND p.tablename = '{t}' AND p.policyname = '{name}' \
                   AND p.permissive = 'RESTRICTIVE' AND current_user = ANY (p.roles)) \
                 FROM pg_class c WHERE c.oid = '{qs}.{qt}'::regclass",
                s = schema.replace('\'', "''"),
                t = table.replace('\'', "''"),
                name = super::sql::policy_name(&policy.name).replace('\'', "''"),
                qs = quote(&schema),
                qt = quote(&table),
            );
            if query(&mut reader, &q).await?.first().and_then(|r| r[0].clone()).as_deref() != Some("t") {
                excess.push(format!("every row of {schema}.{table} (its row filter has no row-level security policy: run pglease scope sql)"));
            }
        }
        // Denied columns must not be readable through column privileges either.
        let denied = policy.denied_columns(&[], Some(&schema), &table);
        for col in denied {
            let q = format!(
                "SELECT has_column_privilege('{}.{}'::regclass, '{}', 'SELECT') FROM pg_attribute WHERE attrelid = '{}.{}'::regclass AND attname = '{}'",
                quote(&schema), quote(&table), col.replace('\'', "''"), quote(&schema), quote(&table), col.replace('\'', "''")
            );
            if query(&mut reader, &q).await?.first().and_then(|r| r[0].clone()).as_deref() == Some("t") {
                excess.push(format!("SELECT on column {col} of {schema}.{table}"));
            }
        }
    }
    let schemas = query(
        &mut reader,
        "SELECT nspname FROM pg_namespace WHERE has_schema_privilege(oid, 'CREATE') AND nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema' ORDER BY 1",
    )
    .await?;
    for s in schemas.into_iter().filter_map(|r| r.into_iter().next().flatten()) {
        if !policy.allows(&s, "*", Action::Ddl) {
            excess.push(format!("CREATE on schema {s}"));
        }
    }
    let _ = reader.get_mut().write_all(&[b'X', 0, 0, 0, 4]).await;
    Ok(excess)
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\"").replace('\'', "''"))
}
