//! Where grants are kept. The trait is small on purpose: a shared, Postgres-backed store for
//! several proxy instances implements the same two calls (with `put` as an upsert keyed by id
//! and `load` as a SELECT), plus change notification, which the file store does not need.

use std::io::Write;
use std::path::{Path, PathBuf};

use tokio::sync::Mutex;

use super::Grant;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("grant store {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("grant store {path} is corrupt at line {line}: {why}")]
    Corrupt { path: String, line: usize, why: String },
    /// The shared store cannot be reached or answered with an error: nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// Someone changed the grant since it was read (another instance, another approver).
    #[error("grant {0} was changed meanwhile; read it again")]
    Conflict(String),
}

#[async_trait::async_trait]
pub trait GrantStore: Send + Sync + 'static {
    /// Every grant, latest version of each.
    async fn load(&self) -> Result<Vec<Grant>, StoreError>;
    /// Records the new version of a grant durably before returning, if `grant.version` is
    /// still the stored one (0: a new grant); returns the version stored now.
    async fn put(&self, grant: &Grant) -> Result<u64, StoreError>;
    /// Whether other processes write to it too (then memory is refreshed from it).
    fn shared(&self) -> bool {
        false
    }
    /// Where the grants' read budgets are counted, kept with the grants.
    fn reads(&self) -> std::sync::Arc<dyn super::reads::ReadStore>;
}

/// An append-only JSON Lines file: one full grant record per line, the last line for an id
/// wins. Every `put` is written and fsynced before it returns, so a grant is never lost or
/// resurrected by a crash. A torn last line (a crash mid-append, never acknowledged) is cut
/// off; any other unreadable line stops startup with its line number.
pub struct FileStore {
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
}

impl FileStore {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_owned(), file: Mutex::new(None) }
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: self.path.display().to_string(), source }
    }

    /// Rewrites the file with one line per grant (atomically: temp file, fsync, rename).
    fn compact(&self, grants: &[Grant]) -> Result<(), StoreError> {
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| self.io(e))?;
        for g in grants {
            let mut line = serde_json::to_vec(g).expect("grants serialize");
            line.push(b'\n');
            f.write_all(&line).map_err(|e| self.io(e))?;
        }
        f.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        sync_dir(&self.path);
        Ok(())
    }
}

fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
}

#[async_trait::async_trait]
impl GrantStore for FileStore {
    async fn load(&self) -> Result<Vec<Grant>, StoreError> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.io(e)),
        };
        let mut grants: Vec<Grant> = Vec::new();
        let mut index = std::collections::HashMap::new();
        let mut records = 0usize;
        let complete = text.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        if complete < text.len() {
            tracing::warn!(path = %self.path.display(), bytes = text.len() - complete, "grant store ends with a torn record (crash mid-write); dropping it");
        }
        for (n, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let grant: Grant = serde_json::from_slice(line).map_err(|e| StoreError::Corrupt {
                path: self.path.display().to_string(),
                line: n + 1,
                why: e.to_string(),
            })?;
            records += 1;
            match index.get(&grant.id) {
                Some(&i) => grants[i] = grant,
                None => {
                    index.insert(grant.id.clone(), grants.len());
                    grants.push(grant);
                }
            }
        }
        // Keep the log short, and drop a torn tail for good.
        if complete < text.len() || records > 2 * grants.len() + 100 {
            self.compact(&grants)?;
            // The append handle, if any, points at the file the rename replaced.
            *self.file.lock().await = None;
        }
        Ok(grants)
    }

    async fn put(&self, grant: &Grant) -> Result<u64, StoreError> {
        // One process owns the file: the version only counts changes.
        let grant = &Grant { version: grant.version + 1, ..grant.clone() };
        let mut slot = self.file.lock().await;
        if slot.is_none() {
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).map_err(|e| self.io(e))?;
            sync_dir(&self.path);
            *slot = Some(f);
        }
        let file = slot.as_mut().expect("opened above");
        let mut line = serde_json::to_vec(grant).expect("grants serialize");
        line.push(b'\n');
        // NOTE: blocking writes on the runtime: grants change a few times a minute at most.
        file.write_all(&line).map_err(|e| self.io(e))?;
        file.sync_data().map_err(|e| self.io(e))?;
        Ok(grant.version)
    }

    fn reads(&self) -> std::sync::Arc<dyn super::reads::ReadStore> {
        std::sync::Arc::new(super::reads::FileReads::new(&self.path))
    }
}

/// Grants in memory only, for tests.
#[derive(Default)]
pub struct MemoryStore {
    grants: std::sync::Mutex<Vec<Grant>>,
    reads: std::sync::Arc<super::reads::MemoryReads>,
}

#[async_trait::async_trait]
impl GrantStore for MemoryStore {
    async fn load(&self) -> Result<Vec<Grant>, StoreError> {
        Ok(self.grants.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }

    async fn put(&self, grant: &Grant) -> Result<u64, StoreError> {
        let mut all = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let stored = Grant { version: grant.version + 1, ..grant.clone() };
        match all.iter_mut().find(|g| g.id == grant.id) {
            Some(g) if g.version != grant.version => return Err(StoreError::Conflict(grant.id.clone())),
            Some(g) => *g = stored,
            None => all.push(stored),
        }
        Ok(grant.version + 1)
    }

    fn reads(&self) -> std::sync::Arc<dyn super::reads::ReadStore> {
        self.reads.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grants::GrantStatus;
    use std::time::SystemTime;

    fn grant(id: &str, status: GrantStatus) -> Grant {
        Grant {
            id: id.into(),
            user: "alice".into(),
            scope: "read".into(),
            database: "shop".into(),
            login: format!("alice.{id}"),
            verifier: "SCRAM-SHA-256$4096:c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            status,
            reason: "r".into(),
            requested_by: "alice".into(),
            requested_at: SystemTime::UNIX_EPOCH,
            duration_secs: 60,
            break_glass: false,
            decided_by: None,
            decided_at: None,
            expires_at: None,
            ended_at: None,
            ended_by: None,
            end_reason: None,
            version: 0,
            expiry_noticed: false,
        }
    }

    #[tokio::test]
    async fn last_record_wins_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.jsonl");
        let store = FileStore::new(&path);
        store.put(&grant("g1", GrantStatus::Pending)).await.unwrap();
        store.put(&grant("g2", GrantStatus::Pending)).await.unwrap();
        store.put(&grant("g1", GrantStatus::Revoked)).await.unwrap();
        // A crash in the middle of appending the next record.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"g3\",\"us").unwrap();
        drop(f);
        let loaded = FileStore::new(&path).load().await.unwrap();
        assert_eq!(loaded.len(), 2);
        assert_eq!(loaded.iter().find(|g| g.id == "g1").unwrap().status, GrantStatus::Revoked);
        // The torn tail was cut off for good.
        assert!(std::fs::read_to_string(&path).unwrap().ends_with("}\n"));
    }

    #[tokio::test]
    async fn a_corrupt_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.jsonl");
        let store = FileStore::new(&path);
        store.put(&grant("g1", GrantStatus::Pending)).await.unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"garbage\n").unwrap();
        drop(f);
        store.put(&grant("g2", GrantStatus::Pending)).await.unwrap();
        let e = FileStore::new(&path).load().await.unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[tokio::test]
    async fn a_write_after_a_compacting_load_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.jsonl");
        let store = FileStore::new(&path);
        // Enough versions of one grant that the next load compacts the file.
        for _ in 0..120 {
            store.put(&grant("g1", GrantStatus::Pending)).await.unwrap();
        }
        assert_eq!(store.load().await.unwrap().len(), 1);
        store.put(&grant("g1", GrantStatus::Revoked)).await.unwrap();
        // A fresh process reads what was written after the compaction.
        let reread = FileStore::new(&path).load().await.unwrap();
        assert_eq!(reread[0].status, GrantStatus::Revoked);
    }
}
