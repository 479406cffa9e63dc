//! The audit log writer: it assigns `seq`/`prev`, writes batches, and acknowledges each record
//! once it is as durable as the mode promises. With the `mapped` writer each session copies its
//! own record into the file at once ([`Direct`]); in `fsync` mode one thread then flushes for
//! all of them ([`Synced`], group commit). With the `append` writer, in `fsync` mode one OS
//! thread owns the file (group commit); in `write` mode the sessions write, combined
//! ([`Combined`]).
//!
//! - `write` (default): the record is in the kernel (write(2) returned) before the statement is
//!   forwarded, so it survives the proxy being killed (`kill -9`), not a power loss.
//! - `fsync`: the record is on disk (fdatasync) before the statement is forwarded; concurrent
//!   sessions share each fsync.
//!
//! A failed write leaves nothing half-written (the file is cut back to its last good length),
//! is reported to every waiting statement (which is then refused), and the next record tries
//! again: service resumes by itself when the disk does.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use std::sync::mpsc as std_mpsc;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::record::{Body, GENESIS, seal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// In the kernel before the statement runs: survives `kill -9` of the proxy.
    #[default]
    Write,
    /// On disk (fdatasync, group commit) before the statement runs.
    Fsync,
}

/// How records reach the live file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WriterKind {
    /// Copied into a shared mapping of the file (no system call per record; see `segment`).
    /// pglease must own the live file: it may not be truncated from outside while pglease runs.
    #[default]
    Mapped,
    /// Appended with `write(2)`, many records to a call. For file systems without `fallocate`,
    /// and where something else truncates the file (logrotate's `copytruncate`).
    Append,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ParamLogging {
    /// Parameter values are logged (what replay needs).
    #[default]
    Log,
    /// Types and formats are logged, values replaced by "<redacted>".
    Redact,
    /// No parameters at all.
    Omit,
}

#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub path: PathBuf,
    pub durability: Durability,
    /// Rotate to a new file past this size; the chain continues across files.
    pub rotate_bytes: u64,
    /// A second file that receives the chain head (`seq`, `hash`) about once a second, so that
    /// cutting off the log's tail is detectable.
    pub anchor: Option<PathBuf>,
    pub params: ParamLogging,
    pub writer: WriterKind,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("the audit log cannot be written: {0}")]
pub struct AuditError(pub String);

struct Pending {
    body: Body,
    ack: Option<oneshot::Sender<Result<u64, AuditError>>>,
}

/// Handle to the writer. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    sink: Sink,
    pub params: ParamLogging,
    pub path: PathBuf,
    health: Arc<Health>,
}

/// How writes have gone: watched to tell people (`AuditFailing` events). Failures are
/// counted, so that one that cleared before anybody looked is still seen.
#[derive(Default)]
pub struct Health {
    failing: std::sync::atomic::AtomicBool,
    failures: AtomicU64,
    error: Mutex<String>,
}

impl Health {
    fn record<T>(&self, result: &Result<T, AuditError>) {
        match result {
            Ok(_) => self.failing.store(false, std::sync::atomic::Ordering::Relaxed),
            Err(e) => {
                *unpoisoned(&self.error) = e.0.clone();
                self.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.failing.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Whether writes fail now.
    pub fn is_failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Failed writes so far, and the last one's error.
    pub fn failures(&self) -> (u64, String) {
        (self.failures.load(std::sync::atomic::Ordering::Relaxed), unpoisoned(&self.error).clone())
    }
}

#[derive(Clone)]
enum Sink {
    /// `fsync` mode: records go to the writer thread, which batches them into one fsync.
    // NOTE: unbounded, yet memory stays bounded: every statement waits for its record's
    // acknowledgement before it runs, so each session has at most one statement record and one
    // result record queued; lifecycle events are few.
    Thread(std_mpsc::Sender<Pending>),
    /// `write` mode, `append` writer: the sessions' tasks write the records themselves (a
    /// write(2) to the page cache is a few microseconds; a hop to another thread costs more),
    /// combined.
    Combined(Arc<Combined>),
    /// `write` mode, `mapped` writer: a record is a copy into the mapped file, so each caller
    /// writes its own at once under the lock: no queue, no hand-off, no task, no system call.
    Direct(Arc<Direct>),
    /// `fsync` mode, `mapped` writer: written as in `Direct`, then flushed by one thread for all.
    Synced(Arc<Synced>),
}

/// The `mapped` writer in `write` mode (see [`Sink::Direct`]).
struct Direct {
    file: Mutex<Inline>,
}

impl Direct {
    fn write(&self, body: Body, waited: bool) -> Result<u64, AuditError> {
        unpoisoned(&self.file).write_one(body, waited)
    }

    /// The idle-time duties: retry carried records, anchor the head (its file written and
    /// flushed outside the lock, so no statement waits for that flush).
    fn maintain(&self) {
        let due = {
            let mut file = unpoisoned(&self.file);
            if !file.carry.is_empty() {
                file.write(Vec::new());
            }
            file.writer.anchor_due(false)
        };
        if let Some((path, seq, line)) = due {
            let ok = write_anchor(&path, &line);
            unpoisoned(&self.file).writer.anchored(seq, ok);
        }
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        let mut file = unpoisoned(&self.file);
        file.write(Vec::new());
        // The last head is anchored when the log closes.
        file.writer.anchor(true);
    }
}

/// The `mapped` writer in `fsync` mode: each caller copies its record into the file at once, as
/// in [`Direct`], and then waits until a flush covers it. One thread flushes: everything written
/// since its last flush (and files rotated meanwhile), with one `fdatasync` outside the writers'
/// lock, and then wakes every caller it covered at once. Where a hand-off to a writer thread
/// cost two wake-ups per record (there and back), this costs one per flush.
///
/// A failed flush refuses every statement whose record was written by then, for good: after a
/// failed `fdatasync` Linux may have dropped those pages and reports the error only once, so a
/// later flush that succeeds says nothing about them. Their records stay in the file (as records
/// of refused attempts); should the disk have lost them, `audit verify` shows the gap.
struct Synced {
    direct: Direct,
    flush: Arc<FlushState>,
}

/// What callers and the flusher share. The flusher's thread holds this while it waits, not the
/// log, so the log is closed (and flushed a last time) by whoever lets go of it last.
struct FlushState {
    wanted: Mutex<Wanted>,
    wake: std::sync::Condvar,
    /// The last record written that the flusher has been told of (records nobody waits for).
    written: AtomicU64,
    flushed: tokio::sync::watch::Sender<Flushed>,
    health: Arc<Health>,
    /// Tests: the next flush fails.
    #[cfg(test)]
    fail_next: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Wanted {
    /// The highest record a caller waits to see flushed.
    seq: u64,
    /// The flusher waits: a caller wakes it.
    idle: bool,
    /// The flusher waits with nothing unflushed: a record nobody waits for wakes it too.
    sleeping: bool,
    /// The log is closed: the flusher ends.
    closed: bool,
}

/// What the flusher has done so far.
#[derive(Clone, Default)]
struct Flushed {
    /// Every record up to here is on disk, unless it is also at or below `failed_through`.
    through: u64,
    /// A flush failed while records up to here were written: they are not known to be on disk.
    failed_through: u64,
    error: Option<Arc<str>>,
}

/// Why the flusher's thread woke.
enum Wake {
    Flush,
    Idle,
    Closed,
}

impl FlushState {
    fn want(&self, seq: u64) {
        let mut wanted = unpoisoned(&self.wanted);
        wanted.seq = wanted.seq.max(seq);
        if std::mem::take(&mut wanted.idle) {
            wanted.sleeping = false;
            self.wake.notify_one();
        }
    }

    /// A record nobody waits for was written: flushed within [`UNSYNCED_FOR`].
    fn written(&self, seq: u64) {
        self.written.fetch_max(seq, std::sync::atomic::Ordering::Release);
        let mut wanted = unpoisoned(&self.wanted);
        if std::mem::take(&mut wanted.sleeping) {
            wanted.idle = false;
            self.wake.notify_one();
        }
    }

    /// Waits until a caller waits for a flush, or records have been left unflushed for
    /// [`UNSYNCED_FOR`]; or until the next idle-time duty is due.
    fn wait(&self) -> Wake {
        let through = self.flushed.borrow().through;
        let mut wanted = unpoisoned(&self.wanted);
        loop {
            if wanted.closed {
                return Wake::Closed;
            }
            if wanted.seq > through {
                return Wake::Flush;
            }
            let unflushed = self.written.load(std::sync::atomic::Ordering::Acquire) > through;
            wanted.idle = true;
            wanted.sleeping = !unflushed;
            let wait = if unflushed { UNSYNCED_FOR } else { MAINTAIN_EVERY };
            let (guard, timeout) = self.wake.wait_timeout(wanted, wait).unwrap_or_else(|p| p.into_inner());
            wanted = guard;
            wanted.idle = false;
            wanted.sleeping = false;
            if timeout.timed_out() {
                return if unflushed { Wake::Flush } else { Wake::Idle };
            }
        }
    }
}

/// How often the idle-time duties run (retry carried records, anchor the head).
const MAINTAIN_EVERY: Duration = Duration::from_millis(250);

impl Synced {
    /// Writes a record and resolves once a flush has put it on disk.
    async fn append(&self, body: Body) -> Result<u64, AuditError> {
        let seq = self.direct.write(body, true)?;
        let mut flushed = self.flush.flushed.subscribe();
        let stopped = || AuditError("the audit writer has stopped".into());
        let done = {
            let now = flushed.borrow();
            now.through >= seq || now.failed_through >= seq
        };
        if !done {
            self.flush.want(seq);
            flushed.wait_for(|f| f.through >= seq || f.failed_through >= seq).await.map_err(|_| stopped())?;
        }
        let now = flushed.borrow();
        if now.failed_through >= seq {
            return Err(AuditError(format!("cannot flush it to disk: {}", now.error.as_deref().unwrap_or("the flush failed"))));
        }
        Ok(seq)
    }

    /// A record nobody waits for: flushed with the next statement's, or within
    /// [`UNSYNCED_FOR`].
    fn append_nowait(&self, body: Body) {
        // A failure is carried to the next write, and counted in `health`.
        if let Ok(seq) = self.direct.write(body, false) {
            self.flush.written(seq);
        }
    }

    /// The flusher's thread: flushes when callers wait, and does the idle-time duties every
    /// [`MAINTAIN_EVERY`], until the log is closed.
    fn start(log: &Arc<Self>) -> Result<std::thread::JoinHandle<()>, String> {
        let (weak, state) = (Arc::downgrade(log), log.flush.clone());
        std::thread::Builder::new()
            .name("pglease-audit".into())
            .spawn(move || {
                let mut maintained = Instant::now();
                loop {
                    let wake = state.wait();
                    let Some(log) = weak.upgrade().filter(|_| !matches!(wake, Wake::Closed)) else { return };
                    if matches!(wake, Wake::Flush) {
                        log.flush_now();
                    }
                    if maintained.elapsed() >= MAINTAIN_EVERY {
                        log.maintain();
                        maintained = Instant::now();
                    }
                }
            })
            .map_err(|e| e.to_string())
    }

    /// Flushes what is written now: the files it is in are taken under the writers' lock and
    /// flushed outside it, so that no session waits for the disk to write its own record.
    fn flush_now(&self) {
        let target = unpoisoned(&self.direct.file).writer.flush_target();
        #[cfg(test)]
        let target = target.and_then(|t| if self.flush.fail_next.swap(false, std::sync::atomic::Ordering::Relaxed) { Err(std::io::Error::other("injected")) } else { Ok(t) });
        let flushed = target.and_then(|t| {
            for file in &t.rotated {
                file.sync_all()?;
            }
            if let Some(file) = &t.current {
                file.sync_data()?;
            }
            Ok(t)
        });
        match flushed {
            Ok(target) => {
                unpoisoned(&self.direct.file).writer.flushed(&target);
                self.flush.health.record(&Ok(()));
                self.flush.flushed.send_modify(|f| f.through = f.through.max(target.seq));
            }
            Err(e) => {
                // Everything written by now may have been in the writeback that failed.
                let seq = unpoisoned(&self.direct.file).writer.seq;
                let e = AuditError(e.to_string());
                self.flush.health.record(&Err::<(), _>(e.clone()));
                metrics::counter!("pglease_audit_failures_total").increment(1);
                tracing::error!(error = %e.0, through = seq, "cannot flush the audit log to disk; the statements waiting for it are refused");
                self.flush.flushed.send_modify(|f| {
                    f.failed_through = f.failed_through.max(seq);
                    f.error = Some(e.0.into());
                });
                // Not at once again: the disk is given a moment.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Retries carried records (then flushed within [`UNSYNCED_FOR`] like any), and anchors
    /// the head the last flush put on disk.
    fn maintain(&self) {
        let due = {
            let mut file = unpoisoned(&self.direct.file);
            if !file.carry.is_empty() {
                file.write(Vec::new());
            }
            self.flush.written(file.writer.seq);
            file.writer.anchor_due(false)
        };
        if let Some((path, seq, line)) = due {
            let ok = write_anchor(&path, &line);
            unpoisoned(&self.direct.file).writer.anchored(seq, ok);
        }
    }
}

impl Drop for Synced {
    /// The last flush, here rather than on the flusher's thread (which ends now): the carried
    /// records are written, every file flushed; then [`Direct`]'s drop anchors the head.
    fn drop(&mut self) {
        unpoisoned(&self.flush.wanted).closed = true;
        self.flush.wake.notify_one();
        let mut file = unpoisoned(&self.direct.file);
        file.write(Vec::new());
        file.writer.flush_all();
    }
}

/// `write` mode's writer. Records are queued and written many to one write(2):
/// - The statement record that finds the queue without a flusher becomes it: its task yields
///   once, so that the other sessions ready on its thread queue their records too, then writes
///   everything queued. The others just wait for their acknowledgement.
/// - A record nobody waits for (a result, an event) rides with a flusher when there is one. When
///   there is not, a task of its own becomes the flusher, so the record is written once the
///   caller's task yields: a result record goes out after the reply it records, not in its way.
/// - Whoever finds the file busy (a writer on another thread) leaves the queue to its holder,
///   who looks at it again after letting go; no thread blocks on another's write(2).
struct Combined {
    queue: Mutex<Queue>,
    file: Mutex<Inline>,
}

#[derive(Default)]
struct Queue {
    records: Vec<Pending>,
    /// A task has taken on writing what is queued.
    flusher: bool,
}

/// The flusher's duty, done even if its task is dropped while it yields (or never runs).
struct Flush<C: std::ops::Deref<Target = Combined>>(C);

impl<C: std::ops::Deref<Target = Combined>> Drop for Flush<C> {
    fn drop(&mut self) {
        self.0.drain();
    }
}

/// The writer, and records nobody waits for that could not be written yet.
struct Inline {
    writer: Writer,
    carry: Vec<Pending>,
}

fn unpoisoned<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Combined {
    /// Queues a record someone waits for; true when the caller is now the flusher.
    fn enqueue(&self, record: Pending) -> bool {
        let mut queue = unpoisoned(&self.queue);
        queue.records.push(record);
        !std::mem::replace(&mut queue.flusher, true)
    }

    /// Queues a record nobody waits for: it rides with the flusher, if any; else a task spawned
    /// on the caller's runtime writes it when the caller yields (off a runtime: written now).
    fn submit_unwaited(self: &Arc<Self>, record: Pending) {
        let mut queue = unpoisoned(&self.queue);
        queue.records.push(record);
        if queue.flusher {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                queue.flusher = true;
                drop(queue);
                // Dropped unpolled (the runtime shutting down), it still writes the queue.
                let flush = Flush(self.clone());
                runtime.spawn(async move { drop(flush) });
            }
            Err(_) => {
                drop(queue);
                self.drain();
            }
        }
    }

    fn take_queued(&self) -> Vec<Pending> {
        let mut queue = unpoisoned(&self.queue);
        queue.flusher = false;
        std::mem::take(&mut queue.records)
    }

    /// Writes what is queued, unless someone else holds the file (they write it after).
    fn drain(&self) {
        loop {
            let mut file = match self.file.try_lock() {
                Ok(f) => f,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            let batch = self.take_queued();
            file.write(batch);
            drop(file);
            // Records queued while we held the file, by callers that found it busy.
            if unpoisoned(&self.queue).records.is_empty() {
                return;
            }
        }
    }

    /// The idle-time duties (retry carried records, anchor the head), then whatever was queued
    /// meanwhile.
    fn maintain(&self) {
        {
            let mut file = unpoisoned(&self.file);
            if !file.carry.is_empty() {
                let queued = self.take_queued();
                file.write(queued);
            }
            file.writer.anchor(false);
        }
        self.drain();
    }
}

impl Drop for Combined {
    fn drop(&mut self) {
        let queued = self.take_queued();
        let mut file = unpoisoned(&self.file);
        file.write(queued);
        // The last head is anchored when the log closes.
        file.writer.anchor(true);
    }
}

impl Inline {
    /// Writes what is carried plus one record; its sequence number, or the error (a record
    /// nobody waits for is then carried to the next attempt, as in [`Inline::write`]).
    fn write_one(&mut self, body: Body, waited: bool) -> Result<u64, AuditError> {
        let mut batch = std::mem::take(&mut self.carry);
        batch.push(Pending { body, ack: None });
        let started = Instant::now();
        let result = self.writer.write_batch(&batch);
        self.writer.health.record(&result);
        self.writer.meters().write_seconds.record(started.elapsed().as_secs_f64());
        match result {
            Ok(seqs) => {
                self.writer.rotate_if_needed();
                Ok(seqs.last().copied().expect("one record at least"))
            }
            Err(e) => {
                metrics::counter!("pglease_audit_failures_total").increment(1);
                tracing::error!(error = %e.0, path = %self.writer.options.path.display(), records = batch.len(), "audit write failed");
                let mine = batch.pop().expect("pushed above");
                self.carry = batch;
                if !waited {
                    self.carry.push(mine);
                }
                Err(e)
            }
        }
    }

    /// Writes what is carried plus `batch`, and acknowledges every record of `batch`.
    fn write(&mut self, batch: Vec<Pending>) {
        let mut batch = {
            let mut all = std::mem::take(&mut self.carry);
            all.extend(batch);
            all
        };
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = self.writer.write_batch(&batch);
        self.writer.health.record(&result);
        self.writer.meters().write_seconds.record(started.elapsed().as_secs_f64());
        match result {
            Ok(seqs) => {
                for (p, seq) in batch.drain(..).zip(seqs) {
                    if let Some(ack) = p.ack {
                        let _ = ack.send(Ok(seq));
                    }
                }
                self.writer.rotate_if_needed();
                self.writer.anchor(false);
            }
            Err(e) => {
                metrics::counter!("pglease_audit_failures_total").increment(1);
                tracing::error!(error = %e.0, path = %self.writer.options.path.display(), records = batch.len(), "audit write failed");
                // A statement whose record failed is refused, so it needs no record; the rest
                // is kept for the next attempt.
                for p in batch {
                    match p.ack {
                        Some(ack) => {
                            let _ = ack.send(Err(e.clone()));
                        }
                        None => self.carry.push(p),
                    }
                }
            }
        }
    }
}

/// Starts the `write` mode's maintenance thread: `maintain` every 250 ms (retry carried
/// records, anchor the head) until the log is dropped.
fn maintained<T: Send + Sync + 'static>(log: &Arc<T>, maintain: fn(&T)) -> Result<std::thread::JoinHandle<()>, String> {
    let weak = Arc::downgrade(log);
    std::thread::Builder::new()
        .name("pglease-audit".into())
        .spawn(move || {
            while let Some(log) = weak.upgrade() {
                maintain(&log);
                drop(log);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
        .map_err(|e| e.to_string())
}

/// How long a new writer waits for the previous one to let go of the log (the same process
/// restarting its app lets go within milliseconds; another live process never does).
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes `PATH.lock` (flock, exclusive), waiting up to [`LOCK_WAIT`] for another writer.
fn lock_log(path: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    let started = Instant::now();
    loop {
        // SAFETY: a plain syscall on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::WouldBlock {
            return Err(format!("cannot lock {}: {e}", lock_path.display()));
        }
        if started.elapsed() >= LOCK_WAIT {
            return Err(format!("{} is written by another pglease (it holds {}); each instance needs an audit log of its own", path.display(), lock_path.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Appends an anchor line and flushes it to disk; false (logged) if that failed.
fn write_anchor(path: &Path, line: &str) -> bool {
    let written = std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| {
        f.write_all(line.as_bytes())?;
        f.sync_data()
    });
    if let Err(e) = &written {
        tracing::error!(error = %e, path = %path.display(), "cannot write the audit anchor");
    }
    written.is_ok()
}

/// Rotated files: `LOG.000001`, `LOG.000002`, … then `LOG` itself, in chain order.
pub fn log_files(path: &Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
    if let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            if let Some(n) = file.strip_prefix(name).and_then(|r| r.strip_prefix('.')).and_then(|n| n.parse::<u64>().ok()) {
                rotated.push((n, entry.path()));
            }
        }
    }
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        files.push(path.to_owned());
    }
    files
}

/// The last complete record of the log: (seq, hash). A torn last line (a crash mid-write) is
/// cut off; it was never acknowledged.
fn chain_head(path: &Path) -> Result<(u64, String), String> {
    for file in log_files(path).iter().rev() {
        // Only regular files hold a chain (a device such as /dev/full reads forever).
        if !std::fs::metadata(file).map(|m| m.is_file()).unwrap_or(false) {
            tracing::warn!(path = %file.display(), "audit log path is not a regular file; starting a new chain");
            return Ok((0, GENESIS.to_owned()));
        }
        let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        if complete < bytes.len() && file == path {
            tracing::warn!(path = %file.display(), "audit log ends with a torn record; cutting it off");
            let f = std::fs::OpenOptions::new().write(true).open(file).map_err(|e| e.to_string())?;
            f.set_len(complete as u64).map_err(|e| e.to_string())?;
        }
        let Some(last) = bytes[..complete].split(|&b| b == b'\n').rfind(|l| !l.is_empty()) else { continue };
        let v: serde_json::Value = serde_json::from_slice(last).map_err(|e| format!("{}: last record is not JSON: {e}", file.display()))?;
        let seq = v.get("seq").and_then(|s| s.as_u64()).ok_or_else(|| format!("{}: last record has no seq", file.display()))?;
        let hash = v.get("hash").and_then(|s| s.as_str()).ok_or_else(|| format!("{}: last record has no hash", file.display()))?;
        return Ok((seq, hash.to_owned()));
    }
    Ok((0, GENESIS.to_owned()))
}

/// What a flush outside the writers' lock covers ([`Writer::flush_target`]).
struct FlushTarget {
    /// The last record written, and its hash.
    seq: u64,
    head: String,
    /// Files rotated since the last flush, then the live file (None: not open yet).
    rotated: Vec<std::fs::File>,
    current: Option<std::fs::File>,
}

/// Where the writer puts records: the live file mapped ([`Segment`]), or appended to with
/// `write(2)` where it cannot be mapped (not a regular file, a file system without `fallocate`).
enum Out {
    Mapped(super::segment::Segment),
    Appended(std::fs::File),
}

impl Out {
    fn sync(&mut self) -> std::io::Result<()> {
        match self {
            Out::Mapped(s) => s.sync(),
            Out::Appended(f) => f.sync_data(),
        }
    }

    /// Gives the file back, cut to its records.
    fn into_file(self) -> std::io::Result<std::fs::File> {
        match self {
            Out::Mapped(s) => s.close(),
            Out::Appended(f) => Ok(f),
        }
    }
}

struct Writer {
    options: AuditOptions,
    file: Option<Out>,
    /// Length of the file after the last successful write.
    good_len: u64,
    seq: u64,
    head: String,
    last_anchor: Instant,
    anchored_seq: u64,
    /// Looked up on the first write, when the process's recorder is in place.
    meters: std::sync::OnceLock<WriterMeters>,
    /// `fsync` mode: since when records have been written but not flushed to disk (only records
    /// nobody waits for are left so, for about [`UNSYNCED_FOR`]).
    unsynced: Option<Instant>,
    /// `fsync` mode: another thread flushes ([`Synced`]), not this writer after each batch.
    flushed_elsewhere: bool,
    /// With `flushed_elsewhere`: files rotated since the last flush, which it flushes first.
    rotated_unflushed: Vec<std::fs::File>,
    /// With `flushed_elsewhere`: a rotated file that could not be kept for its flush; the next
    /// flush fails with this, refusing the statements waiting for records in it.
    lost: Option<String>,
    /// With `flushed_elsewhere`: the last record (seq, hash) a flush put on disk, which the
    /// anchor names.
    durable: Option<(u64, String)>,
    health: Arc<Health>,
    /// `PATH.lock`, held while this writer lives: one writer per log. Last, so that it is let go
    /// after the file is closed (and cut to its records).
    _lock: std::fs::File,
}

struct WriterMeters {
    write_seconds: metrics::Histogram,
    records: metrics::Counter,
    bytes: metrics::Counter,
}

impl WriterMeters {
    fn new() -> Self {
        Self {
            write_seconds: metrics::histogram!("pglease_audit_write_seconds"),
            records: metrics::counter!("pglease_audit_records_total"),
            bytes: metrics::counter!("pglease_audit_bytes_total"),
        }
    }
}

/// In `fsync` mode, how long records nobody waits for (results, events) may stay in the page
/// cache before they are flushed; a statement record arriving meanwhile takes them along.
const UNSYNCED_FOR: Duration = Duration::from_millis(5);

impl Writer {
    fn open(&mut self) -> std::io::Result<&mut Out> {
        if self.file.is_none() {
            let path = &self.options.path;
            let regular = self.options.writer == WriterKind::Mapped && std::fs::metadata(path).map(|m| m.is_file()).unwrap_or(true);
            let mapped = regular
                .then(|| std::fs::OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path))
                .transpose()?
                .map(|f| super::segment::Segment::open(f, self.options.rotate_bytes.saturating_add(super::segment::CHUNK)));
            let out = match mapped {
                Some(Ok(segment)) => Out::Mapped(segment),
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(error = %e, path = %path.display(), "cannot map the audit log; appending with write(2)");
                    }
                    Out::Appended(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
                }
            };
            self.good_len = match &out {
                Out::Mapped(s) => s.len(),
                Out::Appended(f) => f.metadata()?.len(),
            };
            self.file = Some(out);
        }
        Ok(self.file.as_mut().expect("opened"))
    }

    /// Writes a batch; on failure, nothing of it stays in the file. In `fsync` mode the file is
    /// flushed to disk before this returns if anyone waits for a record of the batch; a batch
    /// of results and events only is flushed later ([`Self::sync`]), so that the statement
    /// records after it do not queue behind a flush nobody needed yet.
    fn write_batch(&mut self, batch: &[Pending]) -> Result<Vec<u64>, AuditError> {
        let at = crate::time::rfc3339(SystemTime::now());
        let mut buf = Vec::new();
        let mut seq = self.seq;
        let mut head = self.head.clone();
        let mut seqs = Vec::with_capacity(batch.len());
        for p in batch {
            seq += 1;
            let (line, hash) = seal(&p.body, seq, &head, &at);
            buf.extend_from_slice(&line);
            head = hash;
            seqs.push(seq);
        }
        let sync_now = self.options.durability == Durability::Fsync && !self.flushed_elsewhere && batch.iter().any(|p| p.ack.is_some());
        let good_len = self.good_len;
        let result = (|| -> std::io::Result<()> {
            match self.open()? {
                Out::Mapped(s) => {
                    // A failed reservation leaves nothing written; a failed flush is cut back.
                    s.append(&buf)?;
                    if sync_now && let Err(e) = s.sync() {
                        s.cut_back(good_len);
                        return Err(e);
                    }
                }
                Out::Appended(f) => {
                    let written = f.write_all(&buf).and_then(|()| if sync_now { f.sync_data() } else { Ok(()) });
                    if let Err(e) = written {
                        // Cut back whatever part of the batch reached the file, and reopen next time
                        // (kept open when another thread flushes it: records before the batch may
                        // still wait for that flush, which a closed file would skip).
                        let _ = f.set_len(good_len);
                        if !self.flushed_elsewhere {
                            self.file = None;
                        }
                        return Err(e);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            return Err(AuditError(e.to_string()));
        }
        self.good_len += buf.len() as u64;
        self.seq = seq;
        self.head = head;
        if sync_now {
            self.unsynced = None;
        } else if self.options.durability == Durability::Fsync {
            let since = *self.unsynced.get_or_insert_with(Instant::now);
            // A steady trickle of records nobody waits for must not postpone the flush forever.
            if since.elapsed() >= UNSYNCED_FOR && !self.flushed_elsewhere {
                self.sync();
            }
        }
        let meters = self.meters();
        meters.records.increment(batch.len() as u64);
        meters.bytes.increment(buf.len() as u64);
        Ok(seqs)
    }

    /// For a flush outside the lock ([`Synced`]): the last record written and the files that
    /// hold what is not flushed yet (their descriptors duplicated). On Linux `fdatasync` of the
    /// file flushes what was copied into its mapping too: `msync(MS_SYNC)` is the same call on
    /// a range.
    fn flush_target(&mut self) -> std::io::Result<FlushTarget> {
        if let Some(lost) = self.lost.take() {
            return Err(std::io::Error::other(lost));
        }
        let current = match &self.file {
            Some(Out::Mapped(s)) => Some(s.file().try_clone()?),
            Some(Out::Appended(f)) => Some(f.try_clone()?),
            None => None,
        };
        let rotated = self.rotated_unflushed.iter().map(|f| f.try_clone()).collect::<std::io::Result<_>>()?;
        Ok(FlushTarget { seq: self.seq, head: self.head.clone(), rotated, current })
    }

    /// `target` was flushed: its rotated files are done with, and its head may be anchored.
    fn flushed(&mut self, target: &FlushTarget) {
        self.rotated_unflushed.drain(..target.rotated.len().min(self.rotated_unflushed.len()));
        if self.durable.as_ref().is_none_or(|(seq, _)| *seq < target.seq) {
            self.durable = Some((target.seq, target.head.clone()));
        }
    }

    /// Flushes every file with unflushed records now (the log closing).
    fn flush_all(&mut self) {
        for file in std::mem::take(&mut self.rotated_unflushed) {
            if let Err(e) = file.sync_all() {
                tracing::error!(error = %e, "cannot flush a rotated audit log to disk");
            }
        }
        if self.unsynced.is_none() {
            self.unsynced = Some(Instant::now());
        }
        self.sync();
    }

    fn meters(&self) -> &WriterMeters {
        self.meters.get_or_init(WriterMeters::new)
    }

    /// Flushes records left in the page cache by [`Self::write_batch`]. A failure is logged;
    /// the next write reports it again if the disk is really gone.
    fn sync(&mut self) {
        if self.unsynced.is_none() {
            return;
        }
        if let Some(f) = &mut self.file
            && let Err(e) = f.sync()
        {
            metrics::counter!("pglease_audit_failures_total").increment(1);
            tracing::error!(error = %e, path = %self.options.path.display(), "cannot flush the audit log to disk");
        }
        self.unsynced = None;
    }

    fn rotate_if_needed(&mut self) {
        if self.good_len < self.options.rotate_bytes {
            return;
        }
        let next = log_files(&self.options.path)
            .iter()
            .filter_map(|p| p.extension().and_then(|e| e.to_str()).and_then(|e| e.parse::<u64>().ok()))
            .max()
            .unwrap_or(0)
            + 1;
        let rotated = PathBuf::from(format!("{}.{next:06}", self.options.path.display()));
        // Cut to its records before it is renamed, so that no reader sees its reserved zeros.
        if let Some(file) = self.file.take().map(Out::into_file) {
            if self.flushed_elsewhere {
                // Its last records may wait for a flush: the flusher takes it along with the new
                // file, so no waiter is told before both are on disk.
                match file {
                    Ok(file) => self.rotated_unflushed.push(file),
                    Err(e) => self.lost = Some(format!("the rotated audit log could not be kept for its flush: {e}")),
                }
            } else {
                // The finished file is flushed to disk off the hot path: a session appending its
                // record (under the writer's lock in `write` mode) must not wait while hundreds
                // of MiB of page cache are written back.
                let sync = move || {
                    if let Err(e) = file.and_then(|f| f.sync_all()) {
                        tracing::error!(error = %e, "cannot flush the rotated audit log to disk");
                    }
                };
                let spawned = std::thread::Builder::new().name("pglease-audit-sync".into()).spawn(sync);
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a thread to flush the rotated audit log; it is flushed by the OS in time");
                }
            }
        }
        if let Err(e) = std::fs::rename(&self.options.path, &rotated) {
            tracing::error!(error = %e, "cannot rotate the audit log; continuing in the same file");
        }
        self.good_len = 0;
    }

    fn anchor(&mut self, force: bool) {
        if let Some((path, seq, line)) = self.anchor_due(force) {
            let ok = write_anchor(&path, &line);
            self.anchored(seq, ok);
        }
    }

    /// The anchor line to write now, if one is due: (anchor file, seq, line). In `fsync` mode
    /// the records it names are flushed first: the anchor never names a record not on disk.
    fn anchor_due(&mut self, force: bool) -> Option<(PathBuf, u64, String)> {
        let anchor = self.options.anchor.clone()?;
        if !force && self.last_anchor.elapsed() < Duration::from_secs(1) {
            return None;
        }
        let (seq, head) = if self.flushed_elsewhere && !force {
            // What the flusher last put on disk: no flush here, under the writers' lock.
            self.durable.clone()?
        } else {
            if self.seq == self.anchored_seq {
                return None;
            }
            self.sync();
            (self.seq, self.head.clone())
        };
        if seq == self.anchored_seq {
            return None;
        }
        let line = format!("{{\"seq\":{seq},\"hash\":\"{head}\",\"at\":\"{}\"}}\n", crate::time::rfc3339(SystemTime::now()));
        Some((anchor, seq, line))
    }

    fn anchored(&mut self, seq: u64, ok: bool) {
        if ok {
            self.anchored_seq = seq;
            self.last_anchor = Instant::now();
        }
    }

    fn run(mut self, rx: std_mpsc::Receiver<Pending>) {
        const BATCH: usize = 512;
        // Records nobody waits for (results, events) that could not be written yet: they go
        // first into the next attempt, so nothing is dropped and order is kept.
        let mut carry: Vec<Pending> = Vec::new();
        loop {
            let wait = if !carry.is_empty() {
                Duration::from_millis(200)
            } else if let Some(since) = self.unsynced {
                UNSYNCED_FOR.saturating_sub(since.elapsed())
            } else {
                Duration::from_secs(1)
            };
            let mut batch = std::mem::take(&mut carry);
            match rx.recv_timeout(wait) {
                Ok(p) => batch.push(p),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    if batch.is_empty() {
                        break;
                    }
                }
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                self.sync();
                self.anchor(false);
                continue;
            }
            metrics::gauge!("pglease_audit_queue_depth").set(batch.len() as f64);
            let started = Instant::now();
            let result = self.write_batch(&batch);
            self.health.record(&result);
            self.meters().write_seconds.record(started.elapsed().as_secs_f64());
            match result {
                Ok(seqs) => {
                    for (p, seq) in batch.into_iter().zip(seqs) {
                        if let Some(ack) = p.ack {
                            let _ = ack.send(Ok(seq));
                        }
                    }
                    self.rotate_if_needed();
                    self.anchor(false);
                }
                Err(e) => {
                    metrics::counter!("pglease_audit_failures_total").increment(1);
                    tracing::error!(error = %e.0, path = %self.options.path.display(), records = batch.len(), "audit write failed");
                    // A statement whose record failed is refused, so it needs no record.
                    for p in batch {
                        match p.ack {
                            Some(ack) => {
                                let _ = ack.send(Err(e.clone()));
                            }
                            None => carry.push(p),
                        }
                    }
                }
            }
        }
        self.anchor(true);
        if let Some(out) = self.file.take() {
            let _ = out.into_file().and_then(|f| f.sync_all());
        }
    }
}

impl AuditLog {
    /// Whether writes fail now.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Opens (or continues) the log and starts its writer thread: the group-commit writer in
    /// `fsync` mode; in `write` mode a thread that anchors the head and retries carried records
    /// while the log is idle.
    pub fn open(options: AuditOptions) -> Result<(AuditLog, std::thread::JoinHandle<()>), String> {
        if let Some(dir) = options.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        // One writer per log, in this process or another: two would fork its chain, and a
        // mapped file cut by one would fault in the other.
        let lock = lock_log(&options.path)?;
        let (seq, head) = chain_head(&options.path)?;
        let health = Arc::new(Health::default());
        let writer = Writer {
            file: None,
            good_len: 0,
            seq,
            head,
            last_anchor: Instant::now(),
            anchored_seq: seq,
            meters: Default::default(),
            unsynced: None,
            flushed_elsewhere: options.durability == Durability::Fsync && options.writer == WriterKind::Mapped,
            rotated_unflushed: Vec::new(),
            lost: None,
            durable: None,
            options: options.clone(),
            health: health.clone(),
            _lock: lock,
        };
        let (sink, thread) = match options.durability {
            Durability::Fsync if options.writer == WriterKind::Mapped => {
                let synced = Arc::new(Synced {
                    direct: Direct { file: Mutex::new(Inline { writer, carry: Vec::new() }) },
                    flush: Arc::new(FlushState {
                        wanted: Mutex::new(Wanted::default()),
                        wake: std::sync::Condvar::new(),
                        written: AtomicU64::new(seq),
                        flushed: tokio::sync::watch::Sender::new(Flushed { through: seq, ..Flushed::default() }),
                        health: health.clone(),
                        #[cfg(test)]
                        fail_next: Default::default(),
                    }),
                });
                let thread = Synced::start(&synced)?;
                (Sink::Synced(synced), thread)
            }
            Durability::Fsync => {
                let (tx, rx) = std_mpsc::channel();
                let thread = std::thread::Builder::new().name("pglease-audit".into()).spawn(move || writer.run(rx)).map_err(|e| e.to_string())?;
                (Sink::Thread(tx), thread)
            }
            Durability::Write if options.writer == WriterKind::Mapped => {
                let direct = Arc::new(Direct { file: Mutex::new(Inline { writer, carry: Vec::new() }) });
                let thread = maintained(&direct, Direct::maintain)?;
                (Sink::Direct(direct), thread)
            }
            Durability::Write => {
                let combined = Arc::new(Combined { queue: Mutex::new(Queue::default()), file: Mutex::new(Inline { writer, carry: Vec::new() }) });
                let thread = maintained(&combined, Combined::maintain)?;
                (Sink::Combined(combined), thread)
            }
        };
        Ok((AuditLog { sink, params: options.params, path: options.path, health }, thread))
    }

    /// Appends a record and waits until it is written (as the durability mode promises).
    /// Cancel-safe: a dropped call still gets its record written.
    pub async fn append(&self, body: Body) -> Result<u64, AuditError> {
        match &self.sink {
            Sink::Thread(tx) => {
                let (ack, done) = oneshot::channel();
                tx.send(Pending { body, ack: Some(ack) }).map_err(|_| AuditError("the audit writer has stopped".into()))?;
                done.await.map_err(|_| AuditError("the audit writer has stopped".into()))?
            }
            Sink::Combined(combined) => {
                let (ack, done) = oneshot::channel();
                if combined.enqueue(Pending { body, ack: Some(ack) }) {
                    let flush = Flush(&**combined);
                    // The sessions ready on this thread now queue their records meanwhile.
                    tokio::task::yield_now().await;
                    drop(flush);
                }
                done.await.map_err(|_| AuditError("the audit writer has stopped".into()))?
            }
            Sink::Direct(direct) => direct.write(body, true),
            Sink::Synced(synced) => synced.append(body).await,
        }
    }

    /// Appends a record without waiting (results, events). Never dropped while the writer runs.
    pub fn append_nowait(&self, body: Body) {
        match &self.sink {
            Sink::Thread(tx) => {
                if tx.send(Pending { body, ack: None }).is_err() {
                    tracing::error!("audit writer stopped; a record could not be queued");
                }
            }
            Sink::Combined(combined) => combined.submit_unwaited(Pending { body, ack: None }),
            Sink::Direct(direct) => {
                // A failure is carried to the next write, and counted in `health`.
                let _ = direct.write(body, false);
            }
            Sink::Synced(synced) => synced.append_nowait(body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: u64) -> Body {
        Body::Event { event: serde_json::json!({"event": "test", "n": n}) }
    }

    async fn write_some(durability: Durability) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let anchor = dir.path().join("a.anchor");
        let options = AuditOptions { path: path.clone(), durability, rotate_bytes: 4096, anchor: Some(anchor.clone()), params: ParamLogging::Log, writer: WriterKind::Mapped };
        let (log, thread) = AuditLog::open(options.clone()).unwrap();
        let mut tasks = Vec::new();
        for n in 0..50u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append(event(n)).await.unwrap();
                log.append_nowait(event(1000 + n));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        drop(log);
        thread.join().unwrap();
        // Rotated at 4 KiB, the chain continuing across files, and anchored at the end.
        assert!(log_files(&path).len() > 1, "rotated");
        let report = crate::audit::reader::verify(&path, Some(&anchor)).unwrap();
        assert_eq!(report.records, 100);
        // Reopening continues the chain.
        let (log, thread) = AuditLog::open(options).unwrap();
        log.append(event(7)).await.unwrap();
        drop(log);
        thread.join().unwrap();
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 101);
    }

    /// In `fsync` mode records nobody waits for are written at once and flushed shortly after;
    /// a statement's record then goes out after them in chain order, and the anchor names the head.
    #[tokio::test]
    async fn fsync_mode_writes_unwaited_records_at_once_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let anchor = dir.path().join("a.anchor");
        let options = AuditOptions { path: path.clone(), durability: Durability::Fsync, rotate_bytes: 1 << 30, anchor: Some(anchor.clone()), params: ParamLogging::Log, writer: WriterKind::Mapped };
        let (log, thread) = AuditLog::open(options).unwrap();
        for n in 0..10 {
            log.append_nowait(event(n));
        }
        let lines = || std::fs::read_to_string(&path).unwrap_or_default().matches('\n').count();
        tokio::time::timeout(Duration::from_secs(10), async {
            while lines() < 10 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("records nobody waits for are written without waiting for a statement");
        assert_eq!(log.append(event(10)).await.unwrap(), 11);
        drop(log);
        thread.join().unwrap();
        let report = crate::audit::reader::verify(&path, Some(&anchor)).unwrap();
        assert_eq!(report.records, 11);
    }

    async fn pending_after_one_poll<F: std::future::Future + Unpin>(f: &mut F) -> bool {
        std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut *f).poll(cx).is_pending())).await
    }

    /// One writer per log: a second one waits until the first lets go (here: is dropped, and
    /// has cut its file to its records), then continues its chain.
    #[tokio::test]
    async fn a_second_writer_waits_for_the_first_to_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let options = AuditOptions { path: path.clone(), durability: Durability::Write, rotate_bytes: 1 << 30, anchor: None, params: ParamLogging::Log, writer: WriterKind::Mapped };
        let (first, first_thread) = AuditLog::open(options.clone()).unwrap();
        first.append(event(1)).await.unwrap();
        let started = Instant::now();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            first.append_nowait(event(2));
            drop(first);
            first_thread.join().unwrap();
        });
        let (second, second_thread) = tokio::task::spawn_blocking(move || AuditLog::open(options)).await.unwrap().unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300), "it waited for the first writer");
        release.join().unwrap();
        second.append(event(3)).await.unwrap();
        drop(second);
        second_thread.join().unwrap();
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 3, "one chain, nothing lost or forked");
    }

    /// The live file is mapped with space reserved after the records: killed without closing,
    /// it ends in zeros, which readers stop at and the next start cuts off.
    #[tokio::test]
    async fn a_crash_leaves_zeros_after_the_records_and_they_read_back_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let options = AuditOptions { path: path.clone(), durability: Durability::Write, rotate_bytes: 1 << 30, anchor: None, params: ParamLogging::Log, writer: WriterKind::Mapped };
        let (log, _thread) = AuditLog::open(options.clone()).unwrap();
        for n in 0..3 {
            log.append(event(n)).await.unwrap();
        }
        // As if the process were killed: nothing closes the file, and its lock goes with it (a
        // lock file of a new inode, since this process still holds the old one).
        std::mem::forget(log);
        std::fs::remove_file(dir.path().join("a.jsonl.lock")).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let records = bytes.iter().rposition(|&b| b == b'\n').unwrap() + 1;
        assert!(bytes.len() >= records + 4096 && bytes[records..].iter().all(|&b| b == 0), "reserved zeros follow the records");
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 3);
        let (log, thread) = AuditLog::open(options).unwrap();
        log.append(event(3)).await.unwrap();
        drop(log);
        thread.join().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.last(), Some(&b'\n'), "closed: cut to its records");
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 4, "the chain goes on over the cut tail");
    }

    /// In `write` mode the first waiting append becomes the flusher and yields; if its task is
    /// dropped meanwhile, what was queued (its record and the others') is still written.
    #[tokio::test]
    async fn a_flusher_dropped_while_it_yields_still_writes_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let options = AuditOptions { path: path.clone(), durability: Durability::Write, rotate_bytes: 1 << 30, anchor: None, params: ParamLogging::Log, writer: WriterKind::Append };
        let (log, thread) = AuditLog::open(options).unwrap();
        let mut flusher = Box::pin(log.append(event(1)));
        let mut rider = Box::pin(log.append(event(2)));
        assert!(pending_after_one_poll(&mut flusher).await, "the flusher yields before writing");
        assert!(pending_after_one_poll(&mut rider).await, "the second waits for the flusher");
        // Dropping the flusher writes the queue there and then (or the maintenance thread,
        // which may have taken the queue a moment before, is writing it: wait for it).
        drop(flusher);
        let lines = || std::fs::read_to_string(&path).map(|t| t.matches('\n').count()).unwrap_or(0);
        for _ in 0..500 {
            if lines() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(lines(), 2);
        assert_eq!(rider.await.unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap().matches('\n').count(), 2);
        drop(log);
        thread.join().unwrap();
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 2);
    }

    /// In `write` mode a record nobody waits for, with no flusher about, is written once its
    /// caller's task yields (not in the caller's way), and still written if the runtime ends first.
    #[test]
    fn an_unwaited_record_is_written_when_its_caller_yields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let options = AuditOptions { path: path.clone(), durability: Durability::Write, rotate_bytes: 1 << 30, anchor: None, params: ParamLogging::Log, writer: WriterKind::Append };
        let (log, thread) = AuditLog::open(options).unwrap();
        let lines = || std::fs::read_to_string(&path).unwrap_or_default().matches('\n').count();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            log.append_nowait(event(1));
            log.append_nowait(event(2));
            assert_eq!(lines(), 0, "written before the caller yielded");
            // The flusher task runs once the caller yields; if the writer thread holds the file
            // at that moment (its idle round), the thread writes the queue when it lets go.
            for _ in 0..200 {
                tokio::task::yield_now().await;
                if lines() == 2 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert_eq!(lines(), 2, "not written when the caller yielded");
            log.append_nowait(event(3));
        });
        drop(runtime);
        assert_eq!(lines(), 3, "lost with the runtime");
        drop(log);
        thread.join().unwrap();
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn write_mode_chains_rotates_and_anchors() {
        write_some(Durability::Write).await;
    }

    /// Many writers at once, from tasks on two workers and from plain threads, in each mode and
    /// with each writer: every waited-for append gets its own seq, nothing is lost, and the
    /// chain verifies in seq order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_combined_without_loss() {
        for durability in [Durability::Write, Durability::Fsync] {
            for writer in [WriterKind::Append, WriterKind::Mapped] {
                concurrent_appends(durability, writer).await;
            }
        }
    }

    async fn concurrent_appends(durability: Durability, writer: WriterKind) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let options = AuditOptions { path: path.clone(), durability, rotate_bytes: 1 << 30, anchor: None, params: ParamLogging::Log, writer };
        let (log, thread) = AuditLog::open(options).unwrap();
        let threads: Vec<_> = (0..3u64)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || (0..2000u64).for_each(|n| log.append_nowait(event(t * 10_000 + n))))
            })
            .collect();
        let tasks: Vec<_> = (0..8u64)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut seqs = Vec::new();
                    for n in 0..500u64 {
                        seqs.push(log.append(event(100_000 + t * 1000 + n)).await.unwrap());
                        log.append_nowait(event(200_000 + t * 1000 + n));
                    }
                    seqs
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            let mine = t.await.unwrap();
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "one task's records are written in its order");
            seqs.extend(mine);
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
        drop(log);
        thread.join().unwrap();
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs.len(), 8 * 500, "every waited-for append has a seq of its own");
        let report = crate::audit::reader::verify(&path, None).unwrap();
        assert_eq!(report.records, 3 * 2000 + 8 * 500 * 2);
        let text = std::fs::read_to_string(&path).unwrap();
        let mut ns: Vec<u64> = text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap()).collect();
        ns.sort();
        ns.dedup();
        assert_eq!(ns.len(), 3 * 2000 + 8 * 500 * 2, "each record once");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fsync_mode_chains_rotates_and_anchors() {
        write_some(Durability::Fsync).await;
    }

    /// `fsync` mode with the mapped writer: a waited-for append returns once the flusher has
    /// flushed through its record, never before; records nobody waits for are flushed shortly
    /// after without a statement to take them along.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fsync_mapped_append_returns_after_the_flush_that_covers_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let options = AuditOptions { path: path.clone(), durability: Durability::Fsync, rotate_bytes: 1 << 30, anchor: None, params: ParamLogging::Log, writer: WriterKind::Mapped };
        let (log, thread) = AuditLog::open(options).unwrap();
        let Sink::Synced(synced) = &log.sink else { panic!("fsync mode with the mapped writer flushes from its own thread") };
        let synced = synced.clone();
        let tasks: Vec<_> = (0..16u64)
            .map(|t| {
                let (log, synced) = (log.clone(), synced.clone());
                tokio::spawn(async move {
                    for n in 0..50 {
                        let seq = log.append(event(t * 100 + n)).await.unwrap();
                        assert!(synced.flush.flushed.borrow().through >= seq, "acknowledged before its flush");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        log.append_nowait(event(9999));
        let last = synced.flush.written.load(std::sync::atomic::Ordering::Acquire);
        assert_eq!(last, 16 * 50 + 1);
        tokio::time::timeout(Duration::from_secs(10), async {
            while synced.flush.flushed.borrow().through < last {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("a record nobody waits for is flushed without a statement after it");
        drop((log, synced));
        thread.join().unwrap();
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 16 * 50 + 1);
    }

    /// A failed flush refuses the statement waiting for it, and every record written by then
    /// stays refused (a later flush that succeeds says nothing about them); later records are
    /// acknowledged again, and the chain holds them all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_flush_refuses_what_it_covered_and_later_records_go_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let options = AuditOptions { path: path.clone(), durability: Durability::Fsync, rotate_bytes: 1 << 30, anchor: None, params: ParamLogging::Log, writer: WriterKind::Mapped };
        let (log, thread) = AuditLog::open(options).unwrap();
        let Sink::Synced(synced) = &log.sink else { panic!("fsync mode with the mapped writer flushes from its own thread") };
        assert_eq!(log.append(event(1)).await.unwrap(), 1);
        synced.flush.fail_next.store(true, std::sync::atomic::Ordering::Relaxed);
        let refused = log.append(event(2)).await.expect_err("its flush failed");
        assert!(refused.0.contains("injected"), "{}", refused.0);
        assert!(log.health().is_failing());
        assert_eq!(log.append(event(3)).await.unwrap(), 3, "the next flush covers the next record");
        assert!(!log.health().is_failing());
        drop(log);
        thread.join().unwrap();
        assert_eq!(crate::audit::reader::verify(&path, None).unwrap().records, 3);
    }
}
