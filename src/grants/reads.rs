//! Read budgets: how much a grant has read over its whole life, across its sessions and the
//! fleet's instances, and the line it may not cross (the scope's `max_rows_read` and
//! `max_bytes_read`): an exfiltration guard.
//!
//! The relay counts every row it sends a client (a `DataRow`, or a `CopyData` of `COPY … TO
//! STDOUT`) against the grant's [`ReadMeter`] before sending it. The row that would cross the
//! budget is not sent: the session ends there with `FATAL 53400` (its running statement is
//! cancelled, an open transaction rolls back). From then on the grant's budget is spent: no
//! session of it runs a statement that can return rows (they may still end a transaction or
//! change a setting; others get `ERROR 53400`), and a `read_budget` event tells whoever watches.
//!
//! Counts are exact within one instance (atomics, shared by the grant's sessions) and are added
//! to the store about once a second ([`FLUSH_EVERY`]); each addition returns the store's total,
//! every instance's reads included. So across instances a grant may overshoot by what the
//! others read in the last second, and a `kill -9` loses at most the last second's counts.
//! Fail closed: a session whose grant's usage cannot be read does not start, and once usage has
//! not been stored for [`UNRECORDED_LIMIT`], budgeted grants' statements are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::StoreError;
use crate::error::ClientError;
use crate::events::{Event, Events};

/// How often counts are added to the store (and other instances' reads learnt).
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Statements of budgeted grants are refused once usage could not be stored for this long.
pub const UNRECORDED_LIMIT: Duration = Duration::from_secs(15);

/// SQLSTATE `configuration_limit_exceeded`, as Postgres raises for `temp_file_limit`.
pub const BUDGET_SPENT: &str = "53400";

/// A scope's limits on what each of its grants may read. `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBudget {
    pub rows: Option<u64>,
    pub bytes: Option<u64>,
}

impl ReadBudget {
    /// The scope's budget, if it sets one.
    pub fn of(scope: &crate::config::ScopeConfig) -> Option<Self> {
        let budget = Self { rows: scope.max_rows_read, bytes: scope.max_bytes_read.map(|b| b.as_u64()) };
        (budget.rows.is_some() || budget.bytes.is_some()).then_some(budget)
    }

    /// "1000 rows, 5.0 MB" as a person reads it.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = [self.rows.map(|r| format!("{r} rows")), self.bytes.map(|b| human_bytes(b))].into_iter().flatten().collect();
        parts.join(" or ")
    }
}

/// A byte count in decimal units (`5.0 MB`), as `max_bytes_read = "5MB"` reads.
pub fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().si().to_string()
}

/// What a grant has read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadUsage {
    pub rows: u64,
    pub bytes: u64,
}

impl ReadUsage {
    fn is_zero(&self) -> bool {
        self.rows == 0 && self.bytes == 0
    }
}

/// Where usage is kept: a file next to the grant store, or the control plane.
#[async_trait::async_trait]
pub trait ReadStore: Send + Sync + 'static {
    /// What the grant has read so far (zero for a grant never seen).
    async fn load(&self, grant: &str) -> Result<ReadUsage, StoreError>;
    /// Adds each grant's delta (zero deltas too: the caller learns the latest totals) and
    /// returns the new totals, every writer's reads included.
    async fn add(&self, deltas: &[(String, ReadUsage)]) -> Result<Vec<(String, ReadUsage)>, StoreError>;
}

/// One grant's reads, shared by its sessions on this instance.
pub struct ReadMeter {
    pub grant: String,
    user: String,
    scope: String,
    /// The scope's limits (`u64::MAX`: none); a reload may change them.
    max_rows: AtomicU64,
    max_bytes: AtomicU64,
    /// Everything the grant has read as far as this instance knows: what the store held at the
    /// last flush, plus what was read here since. One atomic each, so a reader never sees a
    /// flush half done.
    used_rows: AtomicU64,
    used_bytes: AtomicU64,
    /// What was read here and is not in the store yet.
    pending_rows: AtomicU64,
    pending_bytes: AtomicU64,
    /// The store's total at the last flush (only the flush touches it).
    stored: std::sync::Mutex<ReadUsage>,
    /// A row would have crossed the budget: nothing more is read under it here.
    spent: AtomicBool,
    /// The `read_budget` event was sent by this meter.
    announced: AtomicBool,
    /// Milliseconds since `epoch` at the first failed flush since the last good one; 0: none.
    unrecorded_since: AtomicU64,
    epoch: Instant,
    events: Events,
}

impl std::fmt::Debug for ReadMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadMeter").field("grant", &self.grant).field("used", &self.used()).field("budget", &self.budget()).finish()
    }
}

/// Why a message may not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossed;

impl ReadMeter {
    fn new(grant: &GrantRef, budget: ReadBudget, stored: ReadUsage, epoch: Instant, events: Events) -> Self {
        let meter = Self {
            grant: grant.id.clone(),
            user: grant.user.clone(),
            scope: grant.scope.clone(),
            max_rows: AtomicU64::new(u64::MAX),
            max_bytes: AtomicU64::new(u64::MAX),
            used_rows: AtomicU64::new(stored.rows),
            used_bytes: AtomicU64::new(stored.bytes),
            pending_rows: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            stored: std::sync::Mutex::new(stored),
            spent: AtomicBool::new(false),
            announced: AtomicBool::new(false),
            unrecorded_since: AtomicU64::new(0),
            epoch,
            events,
        };
        meter.set_budget(budget);
        meter
    }

    fn set_budget(&self, budget: ReadBudget) {
        self.max_rows.store(budget.rows.unwrap_or(u64::MAX), Relaxed);
        self.max_bytes.store(budget.bytes.unwrap_or(u64::MAX), Relaxed);
    }

    pub fn budget(&self) -> ReadBudget {
        let limit = |v: u64| (v != u64::MAX).then_some(v);
        ReadBudget { rows: limit(self.max_rows.load(Relaxed)), bytes: limit(self.max_bytes.load(Relaxed)) }
    }

    /// Everything the grant has read, as far as this instance knows.
    pub fn used(&self) -> ReadUsage {
        ReadUsage { rows: self.used_rows.load(Relaxed), bytes: self.used_bytes.load(Relaxed) }
    }

    /// Counts one row of `bytes` about to be sent to a client. A row that would take the grant
    /// past its budget is not sent: it spends the budget, for good (the usage is raised to the
    /// limit it crossed, and stored so).
    pub fn take_row(&self, bytes: u64) -> Result<(), Crossed> {
        self.take(1, bytes, true)
    }

    /// Counts a message other than a row that carries what a statement computed (an error's or
    /// a notice's text, a notification's payload): bytes only. Under a spent budget only
    /// statements that read nothing run, so their messages pass uncounted.
    pub fn take_message(&self, bytes: u64) -> Result<(), Crossed> {
        if self.spent.load(Relaxed) {
            return Ok(());
        }
        self.take(0, bytes, false)
    }

    fn take(&self, rows: u64, bytes: u64, strict: bool) -> Result<(), Crossed> {
        if self.unrecorded_too_long() || (strict && self.spent.load(Relaxed)) {
            return Err(Crossed);
        }
        let (max_rows, max_bytes) = (self.max_rows.load(Relaxed), self.max_bytes.load(Relaxed));
        let r = self.used_rows.fetch_add(rows, Relaxed) + rows;
        let b = self.used_bytes.fetch_add(bytes, Relaxed) + bytes;
        if r > max_rows || b > max_bytes {
            self.used_rows.fetch_sub(rows, Relaxed);
            self.used_bytes.fetch_sub(bytes, Relaxed);
            self.spend();
            return Err(Crossed);
        }
        self.pending_rows.fetch_add(rows, Relaxed);
        self.pending_bytes.fetch_add(bytes, Relaxed);
        Ok(())
    }

    /// Whether the grant may run a statement that returns rows; the error if not.
    pub fn refusal(&self) -> Option<ClientError> {
        if self.unrecorded_too_long() {
            return Some(self.unrecorded_error());
        }
        let used = self.used();
        let reached = used.rows >= self.max_rows.load(Relaxed) || used.bytes >= self.max_bytes.load(Relaxed);
        (reached || self.spent.load(Relaxed)).then(|| self.spent_error("pglease refuses further statements that return rows under it"))
    }

    /// The `FATAL` a session gets when a row would cross the budget (or could not be recorded).
    pub fn cut_error(&self) -> ClientError {
        let mut e = if self.unrecorded_too_long() {
            self.unrecorded_error()
        } else {
            self.spent_error("pglease ended this session before the message that would cross it, and refuses further statements that return rows under it")
        };
        e.severity = crate::error::Severity::Fatal;
        e
    }

    fn spent_error(&self, what_now: &str) -> ClientError {
        let used = self.used();
        ClientError::error(
            BUDGET_SPENT,
            format!(
                "pglease: grant {} has used its read budget (scope \"{}\" allows {} per grant; counted so far: {} rows, {}); {what_now}",
                self.grant,
                self.scope,
                self.budget().describe(),
                used.rows,
                human_bytes(used.bytes)
            ),
        )
        .with_hint("Ask for a new grant if you need to read more.")
    }

    fn unrecorded_error(&self) -> ClientError {
        ClientError::error(
            crate::error::sqlstate::CANNOT_CONNECT_NOW,
            format!("pglease: cannot record what grant {} reads (its read budget's store is unavailable); statements that return rows are refused until it is", self.grant),
        )
    }

    /// A message would have crossed the budget: the usage is raised to the limit crossed, so
    /// that every instance, and this one after a restart, finds the budget used; one event.
    fn spend(&self) {
        if self.spent.swap(true, Relaxed) {
            return;
        }
        for (max, used, pending) in [(&self.max_rows, &self.used_rows, &self.pending_rows), (&self.max_bytes, &self.used_bytes, &self.pending_bytes)] {
            let (max, now) = (max.load(Relaxed), used.load(Relaxed));
            if max != u64::MAX && now < max {
                used.fetch_add(max - now, Relaxed);
                pending.fetch_add(max - now, Relaxed);
            }
        }
        if !self.announced.swap(true, Relaxed) {
            let used = self.used();
            let budget = self.budget();
            tracing::warn!(grant = %self.grant, scope = %self.scope, rows = used.rows, bytes = used.bytes, "grant used its read budget");
            metrics::counter!("pglease_read_budgets_spent_total").increment(1);
            self.events.emit(Event::ReadBudgetSpent {
                grant: self.grant.clone(),
                user: self.user.clone(),
                scope: self.scope.clone(),
                rows_read: used.rows,
                bytes_read: used.bytes,
                max_rows_read: budget.rows,
                max_bytes_read: budget.bytes,
            });
        }
    }

    fn unrecorded_too_long(&self) -> bool {
        let since = self.unrecorded_since.load(Relaxed);
        since != 0 && self.epoch.elapsed().as_millis() as u64 >= since + UNRECORDED_LIMIT.as_millis() as u64
    }

    /// Takes what is pending, for a flush.
    fn take_pending(&self) -> ReadUsage {
        ReadUsage { rows: self.pending_rows.swap(0, Relaxed), bytes: self.pending_bytes.swap(0, Relaxed) }
    }

    /// The store took `sent` and now holds `total`: what other instances read since the last
    /// flush (the total beyond what was stored then and what this flush sent) is added.
    fn stored(&self, sent: ReadUsage, total: ReadUsage) {
        let mut stored = self.stored.lock().unwrap_or_else(|p| p.into_inner());
        let others = |total: u64, before: u64, sent: u64| total.saturating_sub(before.saturating_add(sent));
        self.used_rows.fetch_add(others(total.rows, stored.rows, sent.rows), Relaxed);
        self.used_bytes.fetch_add(others(total.bytes, stored.bytes, sent.bytes), Relaxed);
        *stored = total;
        self.unrecorded_since.store(0, Relaxed);
    }

    /// The store did not take `sent`: it is pending again.
    fn failed(&self, sent: ReadUsage) {
        self.pending_rows.fetch_add(sent.rows, Relaxed);
        self.pending_bytes.fetch_add(sent.bytes, Relaxed);
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        let _ = self.unrecorded_since.compare_exchange(0, now, Relaxed, Relaxed);
    }
}

/// Who a meter is for.
pub struct GrantRef {
    pub id: String,
    pub user: String,
    pub scope: String,
}

/// Every budgeted grant's meter on this instance, and the task that stores their counts.
pub struct ReadLedger {
    store: Arc<dyn ReadStore>,
    meters: DashMap<String, Arc<ReadMeter>>,
    events: Events,
    epoch: Instant,
}

impl ReadLedger {
    pub fn new(store: Arc<dyn ReadStore>, events: Events) -> Self {
        Self { store, meters: DashMap::new(), events, epoch: Instant::now() }
    }

    /// The grant's meter, its usage read from the store the first time; under the scope's
    /// budget as in force now.
    pub async fn meter(&self, grant: GrantRef, budget: ReadBudget) -> Result<Arc<ReadMeter>, StoreError> {
        if let Some(m) = self.meters.get(&grant.id) {
            m.set_budget(budget);
            return Ok(m.clone());
        }
        let stored = self.store.load(&grant.id).await?;
        let meter = self.meters.entry(grant.id.clone()).or_insert_with(|| Arc::new(ReadMeter::new(&grant, budget, stored, self.epoch, self.events.clone())));
        meter.set_budget(budget);
        Ok(meter.clone())
    }

    /// What the grant has read, if this instance has its meter.
    pub fn usage(&self, grant: &str) -> Option<(ReadUsage, ReadBudget)> {
        self.meters.get(grant).map(|m| (m.used(), m.budget()))
    }

    /// Adds every meter's new counts to the store and takes back the totals. Meters no session
    /// holds any more are dropped once their counts are stored.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mut meters: Vec<Arc<ReadMeter>> = self.meters.iter().map(|m| m.value().clone()).collect();
        if meters.is_empty() {
            return Ok(());
        }
        // In one order on every instance: their upserts lock the rows alike, never in a cycle.
        meters.sort_by(|a, b| a.grant.cmp(&b.grant));
        let deltas: Vec<(String, ReadUsage)> = meters.iter().map(|m| (m.grant.clone(), m.take_pending())).collect();
        match self.store.add(&deltas).await {
            Ok(totals) => {
                let totals: HashMap<String, ReadUsage> = totals.into_iter().collect();
                for (meter, (_, sent)) in meters.iter().zip(&deltas) {
                    match totals.get(&meter.grant) {
                        Some(total) => meter.stored(*sent, *total),
                        // Nothing read anywhere yet: nothing to store.
                        None if sent.is_zero() => meter.unrecorded_since.store(0, Relaxed),
                        None => meter.failed(*sent),
                    }
                }
                // A meter of this flush that only the map and this list hold has no session
                // here now; one a login added or took meanwhile is kept (the shard lock orders
                // this against `meter`).
                for m in &meters {
                    self.meters.remove_if(&m.grant, |_, held| Arc::ptr_eq(held, m) && Arc::strong_count(held) == 2 && held.pending_rows.load(Relaxed) == 0 && held.pending_bytes.load(Relaxed) == 0);
                }
                Ok(())
            }
            Err(e) => {
                for (meter, (_, sent)) in meters.iter().zip(&deltas) {
                    meter.failed(*sent);
                }
                Err(e)
            }
        }
    }

    /// What the grant has read as stored (for `grant show` when no session of it is here).
    pub async fn stored_usage(&self, grant: &str) -> Result<ReadUsage, StoreError> {
        self.store.load(grant).await
    }

    /// Stores counts every [`FLUSH_EVERY`] until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.cancelled() => true,
            };
            match self.flush().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("read budgets: usage is stored again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "read budgets: cannot store what grants read; their statements are refused if this lasts");
                }
                Err(_) => {}
            }
            if stop {
                return;
            }
        }
    }
}

/// Usage in a JSON file next to the grant file (`grants.reads.json`), rewritten atomically at
/// each flush: one process owns it.
pub struct FileReads {
    path: PathBuf,
    totals: tokio::sync::Mutex<Option<HashMap<String, ReadUsage>>>,
}

impl FileReads {
    pub fn new(grant_store: &Path) -> Self {
        Self { path: grant_store.with_extension("reads.json"), totals: tokio::sync::Mutex::new(None) }
    }

    fn io(&self, source: std::io::Error) -> StoreError {
        StoreError::Io { path: self.path.display().to_string(), source }
    }

    fn read(&self) -> Result<HashMap<String, ReadUsage>, StoreError> {
        match std::fs::read(&self.path) {
            Ok(text) => serde_json::from_slice(&text).map_err(|e| StoreError::Corrupt { path: self.path.display().to_string(), line: e.line(), why: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
            Err(e) => Err(self.io(e)),
        }
    }

    async fn totals(&self) -> Result<tokio::sync::MappedMutexGuard<'_, HashMap<String, ReadUsage>>, StoreError> {
        let mut slot = self.totals.lock().await;
        if slot.is_none() {
            *slot = Some(self.read()?);
        }
        Ok(tokio::sync::MutexGuard::map(slot, |s| s.as_mut().expect("loaded above")))
    }
}

#[async_trait::async_trait]
impl ReadStore for FileReads {
    async fn load(&self, grant: &str) -> Result<ReadUsage, StoreError> {
        Ok(self.totals().await?.get(grant).copied().unwrap_or_default())
    }

    async fn add(&self, deltas: &[(String, ReadUsage)]) -> Result<Vec<(String, ReadUsage)>, StoreError> {
        let mut totals = self.totals().await?;
        let mut next = totals.clone();
        let mut out = Vec::with_capacity(deltas.len());
        for (grant, d) in deltas {
            let t = next.entry(grant.clone()).or_default();
            t.rows += d.rows;
            t.bytes += d.bytes;
            out.push((grant.clone(), *t));
        }
        if deltas.iter().any(|(_, d)| !d.is_zero()) {
            // NOTE: blocking writes on the runtime: one small file, at most once a second.
            let tmp = self.path.with_extension("json.tmp");
            let write = || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &serde_json::to_vec(&next).expect("usage serializes"))?;
                f.sync_all()?;
                std::fs::rename(&tmp, &self.path)
            };
            write().map_err(|e| self.io(e))?;
        }
        *totals = next;
        Ok(out)
    }
}

/// Usage in memory only, for tests (with the memory grant store).
#[derive(Default)]
pub struct MemoryReads {
    totals: std::sync::Mutex<HashMap<String, ReadUsage>>,
}

#[async_trait::async_trait]
impl ReadStore for MemoryReads {
    async fn load(&self, grant: &str) -> Result<ReadUsage, StoreError> {
        Ok(self.totals.lock().unwrap_or_else(|p| p.into_inner()).get(grant).copied().unwrap_or_default())
    }

    async fn add(&self, deltas: &[(String, ReadUsage)]) -> Result<Vec<(String, ReadUsage)>, StoreError> {
        let mut totals = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        Ok(deltas
            .iter()
            .map(|(grant, d)| {
                let t = totals.entry(grant.clone()).or_default();
                t.rows += d.rows;
                t.bytes += d.bytes;
                (grant.clone(), *t)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(id: &str) -> GrantRef {
        GrantRef { id: id.into(), user: "alice".into(), scope: "support".into() }
    }

    fn ledger(store: Arc<dyn ReadStore>) -> (Arc<ReadLedger>, Arc<crate::events::MemorySink>) {
        let sink = Arc::new(crate::events::MemorySink::default());
        (Arc::new(ReadLedger::new(store, Events::default().with_sink(sink.clone()))), sink)
    }

    #[tokio::test]
    async fn the_row_that_would_cross_is_refused_and_the_budget_is_spent_once() {
        let (ledger, sink) = ledger(Arc::new(MemoryReads::default()));
        let m = ledger.meter(grant("g1"), ReadBudget { rows: Some(3), bytes: None }).await.unwrap();
        for _ in 0..3 {
            m.take_row(10).unwrap();
        }
        // Exactly at the budget: nothing crossed yet, but nothing more can be read.
        assert!(m.refusal().is_some());
        assert_eq!(m.take_row(10), Err(Crossed));
        assert_eq!(m.used(), ReadUsage { rows: 3, bytes: 30 }, "the refused row is not counted");
        let e = m.cut_error();
        assert_eq!(e.code, BUDGET_SPENT);
        assert!(e.message.contains("grant g1 has used its read budget (scope \"support\" allows 3 rows per grant; counted so far: 3 rows, 30 B)"), "{}", e.message);
        let spent: Vec<_> = sink.events().into_iter().filter(|e| matches!(e, Event::ReadBudgetSpent { .. })).collect();
        assert_eq!(spent, vec![Event::ReadBudgetSpent { grant: "g1".into(), user: "alice".into(), scope: "support".into(), rows_read: 3, bytes_read: 30, max_rows_read: Some(3), max_bytes_read: None }]);
    }

    #[tokio::test]
    async fn bytes_budget_cuts_mid_stream() {
        let (ledger, _) = ledger(Arc::new(MemoryReads::default()));
        let m = ledger.meter(grant("g1"), ReadBudget { rows: None, bytes: Some(1000) }).await.unwrap();
        assert!(m.refusal().is_none());
        let sent = (0..100).take_while(|_| m.take_row(64).is_ok()).count();
        assert_eq!(sent, 15, "15 rows of 64 bytes fit in 1000");
        assert!(m.refusal().is_some(), "a cut spends the budget even below its bytes");
        assert_eq!(m.used().bytes, 1000, "…and counts it as used to the limit, so that it stays spent once stored");
        assert_eq!(m.take_row(1), Err(Crossed), "not even a small row passes");
        assert_eq!(m.take_message(500), Ok(()), "statements that read nothing may still say something");
        ledger.flush().await.unwrap();
        let (again, _) = super::tests::ledger(ledger.store.clone());
        let m = again.meter(grant("g1"), ReadBudget { rows: None, bytes: Some(1000) }).await.unwrap();
        assert!(m.refusal().is_some(), "spent as stored");
    }

    #[tokio::test]
    async fn usage_survives_a_new_ledger_on_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grants.jsonl");
        let budget = ReadBudget { rows: Some(10), bytes: None };
        {
            let (ledger, _) = ledger(Arc::new(FileReads::new(&path)));
            let m = ledger.meter(grant("g1"), budget).await.unwrap();
            (0..4).for_each(|_| m.take_row(5).unwrap());
            ledger.flush().await.unwrap();
        }
        assert!(dir.path().join("grants.reads.json").exists());
        let (ledger, _) = ledger(Arc::new(FileReads::new(&path)));
        let m = ledger.meter(grant("g1"), budget).await.unwrap();
        assert_eq!(m.used(), ReadUsage { rows: 4, bytes: 20 });
        assert_eq!((0..100).take_while(|_| m.take_row(5).is_ok()).count(), 6);
    }

    #[tokio::test]
    async fn two_instances_learn_each_others_reads_at_each_flush() {
        let store: Arc<dyn ReadStore> = Arc::new(MemoryReads::default());
        let budget = ReadBudget { rows: Some(10), bytes: None };
        let (a, _) = ledger(store.clone());
        let (b, _) = ledger(store);
        let ma = a.meter(grant("g1"), budget).await.unwrap();
        let mb = b.meter(grant("g1"), budget).await.unwrap();
        (0..6).for_each(|_| ma.take_row(1).unwrap());
        a.flush().await.unwrap();
        b.flush().await.unwrap();
        assert_eq!(mb.used().rows, 6);
        assert_eq!((0..100).take_while(|_| mb.take_row(1).is_ok()).count(), 4);
    }

    struct Down;

    #[async_trait::async_trait]
    impl ReadStore for Down {
        async fn load(&self, _: &str) -> Result<ReadUsage, StoreError> {
            Ok(ReadUsage::default())
        }
        async fn add(&self, _: &[(String, ReadUsage)]) -> Result<Vec<(String, ReadUsage)>, StoreError> {
            Err(StoreError::Unavailable("control plane: down".into()))
        }
    }

    #[tokio::test]
    async fn usage_that_cannot_be_stored_for_long_refuses_statements() {
        let (ledger, _) = ledger(Arc::new(Down));
        let m = ledger.meter(grant("g1"), ReadBudget { rows: Some(1000), bytes: None }).await.unwrap();
        m.take_row(1).unwrap();
        assert!(ledger.flush().await.is_err());
        assert!(m.refusal().is_none() && m.take_row(1).is_ok(), "a short outage is ridden out");
        // The first failure as if it were UNRECORDED_LIMIT ago (the meter's clock is std's).
        let long_ago = ReadMeter::new(&grant("g2"), ReadBudget { rows: Some(1000), bytes: None }, ReadUsage::default(), Instant::now() - UNRECORDED_LIMIT - Duration::from_secs(1), Events::default());
        long_ago.unrecorded_since.store(1, Relaxed);
        let e = long_ago.refusal().expect("refused");
        assert_eq!(e.code, crate::error::sqlstate::CANNOT_CONNECT_NOW);
        assert_eq!(long_ago.take_row(1), Err(Crossed));
        assert!(long_ago.announced.load(Relaxed) == false, "an outage is not a spent budget");
    }

    #[test]
    fn budgets_read_as_written() {
        assert_eq!(ReadBudget { rows: Some(1000), bytes: Some(5_000_000) }.describe(), "1000 rows or 5.0 MB");
    }
}
