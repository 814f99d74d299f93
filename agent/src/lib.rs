//! lifeboat: streamed, encrypted, verified backups of PostgreSQL, Redis and object storage.
//!
//! All logic lives in this library; the `lifeboat` and `lifeboat-verifier` binaries parse arguments,
//! call it, print, and map [`error::ErrorKind`] to exit codes. The data flow is
//! source → [`pipeline`] (SHA-256 → zstd → age → SHA-256) → [`store`], with the manifest written last
//! by [`job`]; see ARCHITECTURE.md.

pub mod blobs;
pub mod check;
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
pub mod source;
pub mod store;
pub mod tls;

pub use error::{Error, ErrorKind, Result};
