//! Signal handling for the long-running commands: SIGINT/SIGTERM stop, SIGHUP reloads.

use tokio::signal::unix::{Signal as UnixSignal, SignalKind, signal};

/// Resolves on the first SIGINT or SIGTERM. SIGHUP keeps its default action (the demo ends
/// with its terminal); only `serve`, through [`Signals`], takes it as "reload".
pub async fn wait_for_shutdown() {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        // Without signal handlers there is nothing to wait for; fall back to Ctrl-C only.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT or SIGTERM.
    Shutdown,
    /// SIGHUP.
    Reload,
}

/// The signals `pglease serve` acts on.
pub struct Signals {
    term: UnixSignal,
    int: UnixSignal,
    hup: UnixSignal,
}

impl Signals {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())?, hup: signal(SignalKind::hangup())? })
    }

    /// The next signal received. Cancel-safe.
    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Shutdown,
            _ = self.int.recv() => Signal::Shutdown,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// SIGINT and SIGTERM for a command that otherwise blocks (`pglease connect` while it waits for
/// an approval): a signal that arrives at any time after [`Interrupts::new`] is seen by the
/// next [`Interrupts::wait`], instead of ending the process.
pub struct Interrupts {
    runtime: tokio::runtime::Runtime,
    int: UnixSignal,
    term: UnixSignal,
}

impl Interrupts {
    pub fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (int, term) = runtime.block_on(async { Ok::<_, std::io::Error>((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)) })?;
        Ok(Self { runtime, int, term })
    }

    /// Waits for `d`; true if a signal came (meanwhile, or since the last wait).
    pub fn wait(&mut self, d: std::time::Duration) -> bool {
        let Self { runtime, int, term } = self;
        runtime.block_on(async {
            tokio::select! {
                _ = int.recv() => true,
                _ = term.recv() => true,
                _ = tokio::time::sleep(d) => false,
            }
        })
    }
}
