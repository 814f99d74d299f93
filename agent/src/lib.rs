//! lifeboat: streamed, encrypted, verified backups of PostgreSQL, Redis and object storage.
//!
//! All logic lives in this library; the `lifeboat` and `lifeboat-verifier` binaries parse arguments,
//! call it, print, and map [`error::ErrorKind`] to exit codes. The data flow is
//! source → [`pipeline`] (SHA-256 → zstd → age → SHA-256) → [`store`], with the manifest written last
//! by [`job`]; see ARCHITECTURE.md.

pub mod check;
pub mod collect;
pub mod copy;
pub mod daemon;
pub mod error;
#[cfg(test)]
mod fuzz;
pub mod job;
pub mod pipeline;
pub mod policy;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod sorted;
pub mod source;
pub mod store;
pub mod tls;
pub mod verify;

pub use error::{Cause, Error, ErrorKind, Result};

/// A spinner line on stderr for a long run of `what` (a source): `  ⠋ what: MESSAGE [00:01:02]`.
pub fn spinner(what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("  {spinner} {prefix}: {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// `n` bytes for people: `512 B`, `1.5 MiB`, `20.0 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
