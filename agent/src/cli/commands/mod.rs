//! The commands: each file loads what it needs, calls the library and prints.

mod backup;
mod check;
mod copy;
mod list;
mod pin;
mod policy;
mod prune;
mod restore;
mod wal;

use std::path::Path;

use lifeboat::policy::{LoadOptions, Policy};
use lifeboat::{Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::{Command, Place, PolicyCommand, WalCommand};

/// Runs one command.
pub async fn run(command: Command, cancel: CancellationToken) -> Result<()> {
    match command {
        Command::Backup {
            policy,
            source,
            json,
        } => backup::backup(&policy, &source, json, cancel).await,
        Command::List {
            policy,
            at,
            source,
            json,
        } => list::list(&policy, &at, source.as_deref(), json).await,
        Command::Check {
            policy,
            at,
            source,
            read_data,
            identity,
            json,
        } => {
            let policy = load_at(&policy, &at)?;
            check::check_cmd(policy, source.as_deref(), read_data, identity, json).await
        }
        Command::Policy {
            command:
                PolicyCommand::Check {
                    files,
                    allow_missing_env,
                },
        } => policy::policy_check(&files, allow_missing_env),
        Command::Policy {
            command: PolicyCommand::Schema,
        } => policy::schema(),
        Command::Keygen { signing } => policy::keygen(signing),
        Command::Wal {
            command: WalCommand::Stream { policy, source },
        } => wal::stream(&policy, &source, cancel).await,
        Command::Wal {
            command:
                WalCommand::Fetch {
                    archive,
                    segment_size,
                    system_id,
                    prefetch,
                    file,
                    dest,
                },
        } => {
            let at = wal::Fetch {
                file: &file,
                dest: &dest,
                segment_size,
                system_id,
                prefetch,
            };
            wal::fetch(&archive, at).await
        }
        Command::Wal {
            command:
                WalCommand::Prefetch {
                    archive,
                    segment_size,
                    system_id,
                    after,
                    count,
                },
        } => {
            let ahead = wal::Ahead {
                after: &after,
                count,
                cluster: lifeboat::source::postgres_physical::fetch::Cluster {
                    segment_size,
                    system_id,
                },
            };
            wal::prefetch(&archive, ahead).await
        }
        Command::Restore(args) => restore::restore(args, cancel).await,
        Command::Agent { policy, listen } => {
            let mut policy = load(&policy)?;
            if let Some(addr) = listen {
                policy.agent.listen = addr;
            }
            lifeboat::daemon::run(policy, cancel).await
        }
        Command::Prune {
            policy,
            at,
            source,
            dry_run,
            json,
        } => prune::prune(load_at(&policy, &at)?, source.as_deref(), dry_run, json).await,
        Command::Pin {
            policy,
            at,
            source,
            backup,
        } => pin::pin(load_at(&policy, &at)?, &source, &backup, true).await,
        Command::Unpin {
            policy,
            at,
            source,
            backup,
        } => pin::pin(load_at(&policy, &at)?, &source, &backup, false).await,
        Command::Copy {
            policy,
            repository,
            source,
            json,
        } => {
            copy::copy(
                &load(&policy)?,
                repository.as_deref(),
                &source,
                json,
                cancel,
            )
            .await
        }
    }
}

fn load(path: &Path) -> Result<Policy> {
    Ok(lifeboat::policy::load(path, LoadOptions::default())?)
}

/// The policy as seen from the repository `--repository` names: the copy alone, or else the
/// primary.
fn load_at(path: &Path, at: &Place) -> Result<Policy> {
    lifeboat::policy::load_at(path, at.copy.as_deref())
}

/// Sources no longer in the policy may still have backups: say so, but let the operator see them.
fn note_unknown_source(policy: &Policy, name: &str) {
    if policy.source(name).is_none() {
        eprintln!("note: `{name}` is not a source in this policy; showing what the repository holds for it");
    }
}

fn select_source(policy: &Policy, name: &str) -> Result<()> {
    if policy.source(name).is_none() {
        let names: Vec<&str> = policy.sources.iter().map(|s| s.name.as_str()).collect();
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "no source named `{name}` in the policy; it has: {}",
                names.join(", ")
            ),
        ));
    }
    Ok(())
}

fn print_error(e: std::io::Error) -> Error {
    Error::failed(format!("cannot write to stdout: {e}"))
}

/// How long ago `t` was, for people: seconds under a minute, whole minutes after.
fn ago(t: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - t).num_seconds().max(0) as u64;
    // Whole minutes once it is a minute or more: seconds would be noise.
    let secs = if secs >= 60 { secs - secs % 60 } else { secs };
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

/// The age identity to decrypt with: `given` (`--identity` or LIFEBOAT_IDENTITY_FILE), else the
/// policy's `encryption.identity_file`.
pub(crate) fn identity_file(
    given: Option<&std::path::Path>,
    policy: &lifeboat::policy::Policy,
) -> Result<std::path::PathBuf> {
    given
        .map(std::path::Path::to_path_buf)
        .or_else(|| policy.encryption.identity_file.clone())
        .ok_or_else(|| {
            Error::new(ErrorKind::Credential, "no age identity to decrypt with").hint(
                "pass --identity FILE, set LIFEBOAT_IDENTITY_FILE or encryption.identity_file",
            )
        })
}
