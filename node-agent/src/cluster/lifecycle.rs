//! The agent's tasks under one lifecycle: each is spawned as critical (if it
//! ends before shutdown, the process exits to be restarted), and at shutdown
//! the ones that hold state are given time to finish, in order, and the
//! others are stopped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use futures::future::Shared;
use tokio::task::JoinHandle;
use tracing::info;

/// The shutdown signal, as every task awaits it.
pub type Shutdown = Shared<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// What shutdown does with a task.
#[derive(Clone, Copy, Debug)]
pub enum Stop {
    /// Waits up to this long for the task to finish its work (in spawn order).
    Drain(Duration),
    /// Aborts it once the draining tasks are done.
    Abort,
}

/// The running tasks.
pub struct Lifecycle {
    stopping: Arc<AtomicBool>,
    shutdown: Shutdown,
    tasks: Vec<(Stop, JoinHandle<()>)>,
}

impl Lifecycle {
    /// Tasks run until `shutdown` resolves.
    pub fn new(shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        // Set as soon as shutdown begins, before any task can see it: a task
        // that ends after that is stopping, not failing.
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let shutdown: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
            shutdown.await;
            flag.store(true, Ordering::SeqCst);
        });
        Lifecycle {
            stopping,
            shutdown: shutdown.shared(),
            tasks: Vec::new(),
        }
    }

    /// The shutdown signal, for a task to stop on.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Spawns one of the agent's long-running tasks. If it ends before
    /// shutdown (it returned, or panicked), the process exits non-zero so the
    /// kubelet restarts the agent: a half-alive agent that answers /healthz
    /// but watches nothing is the worst outcome.
    pub fn spawn<T: Send + 'static>(
        &mut self,
        name: &'static str,
        stop: Stop,
        task: impl Future<Output = T> + Send + 'static,
    ) {
        let stopping = self.stopping.clone();
        let handle = tokio::spawn(async move {
            let result = std::panic::AssertUnwindSafe(task).catch_unwind().await;
            match result {
                Ok(_) if stopping.load(Ordering::SeqCst) => {}
                Ok(_) => {
                    tracing::error!(
                        task = name,
                        "a task of the agent ended; exiting to be restarted"
                    );
                    std::process::exit(70);
                }
                Err(_) => {
                    tracing::error!(
                        task = name,
                        "a task of the agent panicked; exiting to be restarted"
                    );
                    std::process::exit(70);
                }
            }
        });
        self.tasks.push((stop, handle));
    }

    /// Spawns a helper whose end is no failure (it retries on its own).
    pub fn spawn_helper(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.push((Stop::Abort, tokio::spawn(task)));
    }

    /// Waits for shutdown, then lets the draining tasks finish and stops the others.
    pub async fn run(self) {
        self.shutdown.clone().await;
        info!("stopping");
        let mut aborted = Vec::new();
        for (stop, handle) in self.tasks {
            match stop {
                Stop::Drain(limit) => {
                    let _ = tokio::time::timeout(limit, handle).await;
                }
                Stop::Abort => aborted.push(handle),
            }
        }
        for handle in aborted {
            handle.abort();
        }
    }
}
