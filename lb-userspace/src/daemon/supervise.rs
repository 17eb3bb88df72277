//! Background tasks the daemon's loop keeps alive: one that ends, by error
//! or panic, is logged and started again after [`RESTART_DELAY`].

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

/// How long a background task that died waits before it is started again,
/// so that one failing at once does not spin.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

type Start = Box<dyn Fn(Duration) -> JoinHandle<anyhow::Result<()>> + Send>;

/// A running background task and how to start it again.
pub struct Supervised {
    name: &'static str,
    /// What the daemon loses while the task is down, for the log.
    meanwhile: &'static str,
    start: Start,
    handle: JoinHandle<anyhow::Result<()>>,
    restarts: u64,
}

impl Supervised {
    /// Starts `task` now; [`Self::restart_when_ended`] starts a new one whenever it ends.
    pub fn start<F>(
        name: &'static str,
        meanwhile: &'static str,
        task: impl Fn() -> F + Send + 'static,
    ) -> Self
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let start: Start = Box::new(move |delay| spawn_after(delay, task()));
        let handle = start(Duration::ZERO);
        Self { name, meanwhile, start, handle, restarts: 0 }
    }

    /// Waits until the task ends, logs why, and starts it again after
    /// [`RESTART_DELAY`]. Cancel-safe: a `select!` may drop it at any time
    /// before the task has ended.
    pub async fn restart_when_ended(&mut self) {
        let ended = (&mut self.handle).await;
        let why = match ended {
            Ok(Ok(())) => "it ended".to_owned(),
            Ok(Err(error)) => format!("{error:#}"),
            Err(error) => error.to_string(),
        };
        self.restarts += 1;
        tracing::error!(
            task = self.name, %why, restarts = self.restarts,
            "a background task died ({}): restarting it in {RESTART_DELAY:?}", self.meanwhile
        );
        self.handle = (self.start)(RESTART_DELAY);
    }

    /// Times the task was started again.
    #[cfg(test)]
    fn restarts(&self) -> u64 {
        self.restarts
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Spawns `task` after `delay`.
fn spawn_after<F>(delay: Duration, task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        task.await
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A task that panics on its first run and fails on its second is
    /// started a third time, each after the delay, and then left running.
    #[tokio::test(start_paused = true)]
    async fn a_task_that_panics_or_fails_is_started_again() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&runs);
        let mut task = Supervised::start("test", "nothing", move || {
            let runs = Arc::clone(&counted);
            async move {
                match runs.fetch_add(1, Ordering::SeqCst) {
                    0 => panic!("first run"),
                    1 => anyhow::bail!("second run"),
                    _ => std::future::pending().await,
                }
            }
        });
        let started = tokio::time::Instant::now();
        task.restart_when_ended().await;
        task.restart_when_ended().await;
        assert_eq!(task.restarts(), 2);
        assert_eq!(started.elapsed(), RESTART_DELAY, "the second run waited the delay");
        // The third run never ends: nothing restarts it.
        let third = tokio::time::timeout(Duration::from_secs(60), task.restart_when_ended()).await;
        assert!(third.is_err(), "the third run ended");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(task.restarts(), 2);
    }
}
