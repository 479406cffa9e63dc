//! The control plane's schema, created and upgraded by pglease itself with versioned
//! migrations (`refinery`, files in `migrations/`). Two instances starting together do not
//! race: each takes a session-level advisory lock around the run.

use tokio_postgres::Client;

mod embedded {
    refinery::embed_migrations!("src/control_plane/migrations");
}

/// refinery's history table, named after the product so it is clear whose it is.
const HISTORY_TABLE: &str = "pglease_schema_history";

/// The advisory-lock key the runs serialize on (any fixed number; "pglease" in ASCII).
const LOCK_KEY: i64 = 0x70_67_6c_65_61_73_65;

/// A migration, as `control-plane migrate` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: i32,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("control plane: {0}")]
    Database(String),
    #[error("control plane: migration failed: {0}")]
    Migration(String),
    #[error("control plane: the database has migration {version} ({name}) this pglease does not know: it was upgraded by a newer pglease")]
    Newer { version: i32, name: String },
}

fn db(e: tokio_postgres::Error) -> MigrateError {
    MigrateError::Database(crate::conninfo::describe_error(&e))
}

fn runner() -> refinery::Runner {
    let mut runner = embedded::migrations::runner();
    runner.set_migration_table_name(HISTORY_TABLE);
    runner
}

/// How many migrations this pglease knows.
pub fn known() -> usize {
    runner().get_migrations().len()
}

/// The migrations this pglease knows that the database has not had yet.
pub async fn pending(client: &mut Client) -> Result<Vec<Migration>, MigrateError> {
    let runner = runner();
    let exists: bool = client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE]).await.map_err(db)?.get(0);
    let applied: Vec<i32> = if exists {
        let rows = client.query(&format!("SELECT version, name FROM {HISTORY_TABLE} ORDER BY version"), &[]).await.map_err(db)?;
        let known: Vec<i32> = runner.get_migrations().iter().map(|m| m.version()).collect();
        for r in &rows {
            let version: i32 = r.get(0);
            if !known.contains(&version) {
                return Err(MigrateError::Newer { version, name: r.get(1) });
            }
        }
        rows.iter().map(|r| r.get(0)).collect()
    } else {
        Vec::new()
    };
    Ok(runner
        .get_migrations()
        .iter()
        .filter(|m| !applied.contains(&(m.version())))
        .map(|m| Migration { version: m.version(), name: m.name().to_owned() })
        .collect())
}

/// Brings the schema up to date; returns what it applied. Safe to run from every instance at
/// once: they take turns on an advisory lock, and the later ones find nothing to do.
pub async fn migrate(client: &mut Client) -> Result<Vec<Migration>, MigrateError> {
    client.execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY]).await.map_err(db)?;
    let result = async {
        pending(client).await?;
        let report = runner().run_async(client).await.map_err(|e| MigrateError::Migration(e.to_string()))?;
        Ok(report.applied_migrations().iter().map(|m| Migration { version: m.version(), name: m.name().to_owned() }).collect())
    }
    .await;
    // The lock is the session's: released here, or with the connection if this fails.
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY]).await;
    result
}
