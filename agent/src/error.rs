//! The library's one error type, where every module's own error meets.
//!
//! Each module sorts its failures with its own `thiserror` enum; at the library's edge they become an
//! [`Error`] with a [`ErrorKind`] (which decides the process exit code), a message that names what
//! failed and on what, and a hint that says what to do next. Messages never contain secrets: values
//! that could hold one are redacted before they reach an error.

use std::fmt;

/// What kind of failure this is; decides the exit code (see RUNBOOK.md "Exit codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The operation failed (source down, storage failing, producer error). Exit 1.
    Failed,
    /// The policy file or the command line is invalid. Exit 2.
    Invalid,
    /// Some sources succeeded and some failed. Exit 3.
    Partial,
    /// A restore did not hold what the source held. Exit 4.
    VerificationMismatch,
    /// No repository at the configured location. Exit 10.
    RepositoryMissing,
    /// Another process holds the lease. Exit 11.
    LockHeld,
    /// A key or a credential is missing, wrong or refused. Exit 12.
    Credential,
    /// Stored bytes do not match the manifest (checksum, truncation, tamper). Exit 13.
    Integrity,
    /// Refused for safety. Exit 14.
    Refused,
    /// Interrupted by a signal. Exit 130.
    Interrupted,
}

impl ErrorKind {
    /// The documented process exit code for this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Failed => 1,
            ErrorKind::Invalid => 2,
            ErrorKind::Partial => 3,
            ErrorKind::VerificationMismatch => 4,
            ErrorKind::RepositoryMissing => 10,
            ErrorKind::LockHeld => 11,
            ErrorKind::Credential => 12,
            ErrorKind::Integrity => 13,
            ErrorKind::Refused => 14,
            ErrorKind::Interrupted => 130,
        }
    }
}

/// What a caller may branch on beyond the exit code, instead of matching message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A disk or storage quota is full.
    NoSpace,
    /// The operation needs a database superuser (permission denied, must be owner…).
    NeedsSuperuser,
    /// The WAL file asked for is not in the archive: recovery's end of the archive.
    NotArchived,
}

/// An error as an operator sees it: what failed, on what, and what to do next.
#[derive(Debug, Clone)]
pub struct Error {
    /// Decides the exit code.
    pub kind: ErrorKind,
    /// What failed and on what (source, backup id, object key, policy field).
    pub message: String,
    /// What to do next, often pointing at a RUNBOOK.md section.
    pub hint: Option<String>,
    /// Set where a caller may want to branch on the cause.
    pub cause: Option<Cause>,
}

impl Error {
    /// An error of `kind` with a message and no hint.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            hint: None,
            cause: None,
        }
    }

    /// A plain operational failure (exit 1).
    pub fn failed(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Failed, message)
    }

    /// The same error, as another kind (a tool's failure that turns out to be a credential's).
    pub fn kind(mut self, kind: ErrorKind) -> Self {
        self.kind = kind;
        self
    }

    /// Records what caused it, for callers that branch on it.
    pub fn cause(mut self, cause: Cause) -> Self {
        self.cause = Some(cause);
        self
    }

    /// Adds or replaces the hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Sets the hint only if there is none yet.
    pub fn with_default_hint(mut self, hint: impl Into<String>) -> Self {
        if self.hint.is_none() {
            self.hint = Some(hint.into());
        }
        self
    }

    /// Puts context (such as `source app-db`) in front of the message.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_match_the_documented_table() {
        let table = [
            (ErrorKind::Failed, 1),
            (ErrorKind::Invalid, 2),
            (ErrorKind::Partial, 3),
            (ErrorKind::VerificationMismatch, 4),
            (ErrorKind::RepositoryMissing, 10),
            (ErrorKind::LockHeld, 11),
            (ErrorKind::Credential, 12),
            (ErrorKind::Integrity, 13),
            (ErrorKind::Refused, 14),
            (ErrorKind::Interrupted, 130),
        ];
        for (kind, code) in table {
            assert_eq!(kind.exit_code(), code, "{kind:?}");
        }
    }

    #[test]
    fn display_puts_the_hint_on_its_own_line() {
        let e = Error::failed("pg_dump exited 1")
            .context("source app-db")
            .hint("see RUNBOOK.md#backup-failing");
        assert_eq!(
            e.to_string(),
            "source app-db: pg_dump exited 1\n  hint: see RUNBOOK.md#backup-failing"
        );
    }
}
