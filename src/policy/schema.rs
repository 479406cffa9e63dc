//! What the policy knows of the tables behind a scope: their columns, in order, as the
//! upstream catalog lists them. `*` over a table with denied columns is rewritten to the
//! columns the scope may read (see [`super::expand`]), which needs them.
//!
//! The decision stays pure: a [`Schema`] is an input to it. pglease loads one per scope and
//! database at startup and on reload (as the scope's own role), then again every
//! [`REFRESH_EVERY`], and soon after a DDL statement runs through the proxy. A schema that
//! could not be refreshed for [`MAX_AGE`] is dropped: statements that need it are refused, as
//! they were before pglease knew any columns. Only tables a rule with denied or masked columns
//! covers are loaded.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::ScopePolicy;
use super::rolecheck::query;
use crate::codec::FramedReader;
use crate::upstream::{Upstream, UpstreamLogin};

/// How often every schema is loaded again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// How old a schema may get while refreshes fail before it is dropped.
pub const MAX_AGE: Duration = Duration::from_secs(600);

/// How soon after a DDL statement the schema is loaded again (statements of a migration come
/// in bursts: one load after the burst).
const AFTER_DDL: Duration = Duration::from_millis(200);

/// Bumped whenever a statement that may change columns runs through any session: every
/// scope's schema is loaded again (the DDL may have run under another scope than theirs).
static CHANGES: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> = std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

/// Tells every refresher that columns may have changed.
pub fn changed() {
    CHANGES.send_modify(|n| *n = n.wrapping_add(1));
}

/// The columns of the tables a scope's column rules cover, in one database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schema {
    /// Columns by (schema, table), in `attnum` order, dropped ones left out.
    tables: HashMap<(String, String), Vec<String>>,
    pub loaded_at: Option<SystemTime>,
}

impl Schema {
    /// A schema of these tables (schema, table, columns in order).
    pub fn of(tables: impl IntoIterator<Item = (String, String, Vec<String>)>) -> Self {
        Self { tables: tables.into_iter().map(|(s, t, c)| ((s, t), c)).collect(), loaded_at: Some(SystemTime::now()) }
    }

    pub fn columns(&self, schema: &str, table: &str) -> Option<&[String]> {
        self.tables.get(&(schema.to_owned(), table.to_owned())).map(Vec::as_slice)
    }

    pub fn len(&self) -> usize {
        self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

impl Schema {
    /// The tables `CREATE TABLE` statements in `sql` define (unqualified names are in
    /// `public`), for a schema known from its DDL rather than a catalog: the demo's.
    pub fn from_ddl(sql: &str) -> Result<Self, String> {
        use pg_query::NodeEnum;
        let parsed = pg_query::parse(sql, 0).map_err(|e| e.to_string())?;
        let mut tables = Vec::new();
        for raw in parsed.protobuf.stmts {
            let Some(NodeEnum::CreateStmt(create)) = raw.stmt.and_then(|s| s.node) else { continue };
            let Some(rel) = create.relation else { continue };
            let schema = if rel.schemaname.is_empty() { "public".to_owned() } else { rel.schemaname };
            let columns = create
                .table_elts
                .into_iter()
                .filter_map(|e| match e.node {
                    Some(NodeEnum::ColumnDef(c)) => Some(c.colname),
                    _ => None,
                })
                .collect();
            tables.push((schema, rel.relname, columns));
        }
        Ok(Self::of(tables))
    }

    /// A table's columns as `schema.table=col,col,…` (what `pglease scope check --columns` takes).
    pub fn parse_table(spec: &str) -> Result<(String, String, Vec<String>), String> {
        let (name, columns) = spec.split_once('=').ok_or_else(|| format!("{spec:?}: expected schema.table=column,column,…"))?;
        let (schema, table) = name.split_once('.').ok_or_else(|| format!("{name:?}: name the table with its schema (public.{name})"))?;
        let columns: Vec<String> = columns.split(',').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect();
        if columns.is_empty() {
            return Err(format!("{spec:?}: no columns"));
        }
        Ok((schema.to_owned(), table.to_owned(), columns))
    }
}

/// A LIKE pattern for one of a rule's glob patterns (`*` any run of characters).
fn like(glob: &str) -> String {
    let mut out = String::new();
    for c in glob.chars() {
        match c {
            '*' => out.push('%'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\'' => out.push_str("''"),
            c => out.push(c),
        }
    }
    out
}

/// The catalog query for the tables `policy`'s column rules cover; None when it has none.
pub fn catalog_query(policy: &ScopePolicy) -> Option<String> {
    let covered: Vec<String> = policy
        .column_rule_patterns()
        .map(|(schema, table)| format!("(n.nspname LIKE '{}' AND c.relname LIKE '{}')", like(schema), like(table)))
        .collect();
    if covered.is_empty() {
        return None;
    }
    Some(format!(
        "SELECT n.nspname, c.relname, a.attname \
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
         WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND a.attnum > 0 AND NOT a.attisdropped AND ({}) \
         ORDER BY n.nspname, c.relname, a.attnum",
        covered.join(" OR ")
    ))
}

/// Loads the schema of `database` as the scope's role; None when the scope needs none.
pub async fn load(upstream: &Upstream, login: &UpstreamLogin, database: &str, policy: &ScopePolicy) -> Result<Option<Schema>, String> {
    let Some(sql) = catalog_query(policy) else { return Ok(None) };
    let session = upstream.connect(login, database, &[("application_name".into(), "pglease schema".into())]).await.map_err(|e| e.to_string())?;
    let mut reader = FramedReader::with_buffer(session.stream, crate::upstream::upstream_limits(1 << 20), session.leftover);
    let rows = query(&mut reader, &sql).await;
    let _ = tokio::io::AsyncWriteExt::write_all(reader.get_mut(), &[b'X', 0, 0, 0, 4]).await;
    let mut tables: HashMap<(String, String), Vec<String>> = HashMap::new();
    for row in rows? {
        let [Some(schema), Some(table), Some(column)] = <[Option<String>; 3]>::try_from(row).map_err(|_| "unexpected catalog row")? else {
            return Err("unexpected NULL in the catalog".into());
        };
        tables.entry((schema, table)).or_default().push(column);
    }
    Ok(Some(Schema { tables, loaded_at: Some(SystemTime::now()) }))
}

/// Loads the schemas of `policy`'s databases now, as its role `login`.
pub async fn refresh(upstream: &Upstream, login: &UpstreamLogin, policy: &ScopePolicy) {
    if catalog_query(policy).is_none() {
        return;
    }
    for database in policy.databases() {
        match load(upstream, login, &database, policy).await {
            Ok(Some(schema)) => {
                tracing::debug!(scope = %policy.name, %database, tables = schema.len(), "schema loaded");
                policy.set_schema(&database, Some(Arc::new(schema)));
            }
            Ok(None) => {}
            Err(e) => {
                let too_old = policy
                    .schema(&database)
                    .and_then(|s| s.loaded_at)
                    .is_none_or(|at| SystemTime::now().duration_since(at).unwrap_or_default() >= MAX_AGE);
                if too_old {
                    tracing::warn!(scope = %policy.name, %database, error = %e, "the scope's columns are not known: `*` over tables with denied columns is refused");
                    policy.set_schema(&database, None);
                } else {
                    tracing::warn!(scope = %policy.name, %database, error = %e, "could not refresh the scope's columns; the last ones stay in use");
                }
            }
        }
    }
}

/// Keeps `policy`'s schemas fresh, every [`REFRESH_EVERY`] and soon after DDL, until the
/// policy is gone (a reload replaced it). One task per policy, however often this is called.
pub fn keep_fresh(upstream: Arc<Upstream>, policy: &Arc<ScopePolicy>, login: UpstreamLogin) {
    if catalog_query(policy).is_none() || policy.refresher_started.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let weak: Weak<ScopePolicy> = Arc::downgrade(policy);
    let mut changes = CHANGES.subscribe();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
                _ = changes.changed() => tokio::time::sleep(AFTER_DDL).await,
            }
            changes.mark_unchanged();
            let Some(policy) = weak.upgrade() else { return };
            refresh(&upstream, &login, &policy).await;
        }
    });
}
