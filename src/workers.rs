//! Session threads: each runs a single-threaded tokio runtime, and every connection is given to
//! one of them for its whole life, handshake to close.
//!
//! A session is two sockets and a little state, touched by one message at a time; it gains
//! nothing from moving between threads. What a thread's event loop costs is its wake-ups: one
//! loop that finds several sessions ready per wake-up spends less per message than two that
//! find one each. Measured on the 2-core benchmark machine (`-S -M prepared -c 8`, proxy CPU per
//! transaction): tokio's multi-threaded runtime with 2 workers 70.6 µs, two of these threads
//! 70.8 µs, one 60.4 µs. So the count is a setting (`listen.workers`): one per core to use a
//! dedicated host, fewer on a small machine shared with Postgres or its clients. This is how
//! pgbouncer scales too (one event loop per process, `so_reuseport`), with the accept loop
//! handing out connections instead of the kernel.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::Handle;

/// A fixed set of session threads. Dropping it stops them; sessions still running on them are
/// dropped with their runtime (the server drains them first).
pub struct Workers {
    workers: Vec<Worker>,
}

struct Worker {
    handle: Handle,
    /// Connections running on this thread now.
    load: Arc<AtomicUsize>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` threads (at least one) named `pglease-session-<i>`.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut workers = Vec::with_capacity(n.max(1));
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("pglease-session-{i}")).spawn(move || {
                // Returns when the pool is dropped (the sender with it).
                let _ = rt.block_on(stopped);
            })?;
            workers.push(Worker { handle, load: Arc::new(AtomicUsize::new(0)), stop: Some(stop) });
        }
        Ok(Self { workers })
    }

    /// The number of threads the machine offers: its cores, as far as this process may use them.
    pub fn default_count() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Runs `task` on the thread with the fewest connections. It is first polled there, so
    /// sockets it sets up (`TcpStream::from_std`, connects) belong to that thread's runtime.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let worker = self.workers.iter().min_by_key(|w| w.load.load(Ordering::Relaxed)).expect("at least one worker");
        let load = Load::take(&worker.load);
        // `map`, not `async move { task.await }`: an async block that moves a captured future
        // into an `.await` keeps room for it twice (a session's task is ~5 KiB; wrapped that way,
        // idle-session memory went from 16 to 21 KiB). The load is given back when the task ends
        // or is dropped.
        worker.handle.spawn(futures_util::FutureExt::map(task, move |()| drop(load)));
    }
}

/// A connection counted against its thread until its task ends, however it ends.
struct Load(Arc<AtomicUsize>);

impl Load {
    fn take(load: &Arc<AtomicUsize>) -> Self {
        load.fetch_add(1, Ordering::Relaxed);
        Self(load.clone())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(stop) = w.stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn each_connection_runs_on_the_least_busy_thread_until_it_ends() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.len(), 2);
        // Two long connections land on different threads and stay where they started.
        let (names_tx, mut names) = tokio::sync::mpsc::unbounded_channel();
        let mut ends = Vec::new();
        for i in 0..2 {
            let (end_tx, end) = tokio::sync::oneshot::channel::<()>();
            let names_tx = names_tx.clone();
            workers.spawn(async move {
                names_tx.send((i, thread_name())).unwrap();
                let _ = end.await;
                tokio::task::yield_now().await;
                names_tx.send((i, thread_name())).unwrap();
            });
            ends.push(end_tx);
        }
        let mut started = [names.recv().await.unwrap(), names.recv().await.unwrap()];
        started.sort();
        let [(_, a), (_, b)] = started;
        assert!(a.starts_with("pglease-session-") && b.starts_with("pglease-session-"), "{a} {b}");
        assert_ne!(a, b, "two connections on one thread while the other was idle");
        assert!(workers.workers.iter().all(|w| w.load.load(Ordering::Relaxed) == 1));

        // The first ends: its thread is the less busy one again and takes the next connection.
        ends.remove(0).send(()).unwrap();
        assert_eq!(names.recv().await.unwrap(), (0, a.clone()));
        let released = async {
            while workers.workers.iter().map(|w| w.load.load(Ordering::Relaxed)).sum::<usize>() != 1 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), released).await.expect("an ended connection gives its slot back");
        let (tx, rx) = tokio::sync::oneshot::channel();
        workers.spawn(async move {
            let _ = tx.send(thread_name());
        });
        assert_eq!(rx.await.unwrap(), a);
        drop(ends);
    }
}
