//! Shutdown: SIGINT or SIGTERM asks every task to stop taking new work, finish what it holds and
//! return. A task holds a [`Shutdown`] and checks it between units of work.

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side, kept by whoever decides when to stop.
pub struct Trigger {
    tx: watch::Sender<bool>,
}

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger { tx }, Shutdown { rx })
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.tx.send(true);
    }

    /// Fire on the first SIGINT or SIGTERM; if the process is still running `grace` later, it
    /// exits with code 1 (what it had not acknowledged stays pending for another consumer).
    pub fn on_signals(self, grace: std::time::Duration) {
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!(grace_ms = grace.as_millis() as u64, "shutting down");
            self.fire();
            // A thread, not a task: it must fire even if the executor is stuck.
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                tracing::error!("shutdown took longer than shutdown_timeout_ms, exiting now");
                std::process::exit(1);
            });
        });
    }
}

impl Shutdown {
    /// A shutdown that never comes, for tasks that live as long as the process.
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        // Its sender is kept for good: a dropped sender would read as a shutdown.
        std::mem::forget(tx);
        Shutdown { rx }
    }

    pub fn is_set(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown is asked (at once if it already was).
    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|s| *s).await;
    }

    /// Sleep, but wake up early on shutdown. Returns false if woken by shutdown.
    pub async fn sleep(&mut self, d: std::time::Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.wait() => false,
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
