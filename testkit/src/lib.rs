//! Test support for kube-fim, shared by the end-to-end tests (`e2e/`) and the
//! agent's integration tests (`node-agent/tests/`), so that each helper exists
//! once:
//! - [`policy`]: typed builders of `FileIntegrityPolicy` objects, serialised to
//!   YAML where a file or `kubectl` needs one;
//! - [`process`]: commands with a deadline, and processes killed when the test
//!   ends however it ends;
//! - [`http`] and [`prom`]: a plain HTTP GET and reading samples out of a
//!   Prometheus text exposition;
//! - [`wait`]: polling until a condition holds, blocking or async;
//! - [`lease`]: a write lease on a file, as a process that keeps others from
//!   reading it holds one.

// Test support: a failed precondition is a failed test, said as plainly as possible.
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

pub mod http;
pub mod lease;
pub mod policy;
pub mod process;
pub mod prom;
pub mod wait;

pub use http::{free_port, http_get};
pub use policy::{Entry, Policy};
pub use process::{Process, Run, drain, run_with_timeout};
pub use prom::{metric, metric_sum, metric_where};
pub use wait::{eventually, wait_for};

use std::path::{Path, PathBuf};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent")
        .to_path_buf()
}
