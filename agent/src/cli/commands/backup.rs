//! `lifeboat backup`: one backup now of every source, or of those named.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use lifeboat::human_bytes;
use lifeboat::pipeline::Meter;
use lifeboat::repo::Repository;
use lifeboat::{job, store, Error, ErrorKind, Result};
use tokio_util::sync::CancellationToken;

use super::{load, select_source};

pub async fn backup(
    path: &Path,
    only: &[String],
    json: bool,
    cancel: CancellationToken,
) -> Result<()> {
    let policy = load(path)?;
    for name in only {
        select_source(&policy, name)?;
    }
    let repo = Repository::open_or_init(&policy).await?;
    store::probe(repo.store.as_ref()).await?;
    let selected: Vec<_> = policy
        .sources
        .iter()
        .filter(|s| only.is_empty() || only.contains(&s.name))
        .collect();
    let mut failures: Vec<Error> = Vec::new();
    let mut results = Vec::new();
    for source in &selected {
        if cancel.is_cancelled() {
            failures.push(Error::new(
                ErrorKind::Interrupted,
                format!("source {}: not started", source.name),
            ));
            continue;
        }
        let shown = Shown::start(&source.name, json);
        let run = job::backup(
            &repo,
            &policy,
            source,
            chrono::Utc::now(),
            cancel.clone(),
            shown.meter.clone(),
        )
        .await;
        shown.finish();
        match run {
            Ok(m) => {
                if !json {
                    eprintln!(
                        "{}: backup {} stored ({} plain, {} stored)",
                        m.source,
                        m.id,
                        human_bytes(m.size_plain),
                        human_bytes(m.size_stored)
                    );
                }
                results.push(serde_json::json!({
                    "source": m.source,
                    "backup_id": m.id,
                    "size_plain": m.size_plain,
                    "size_stored": m.size_stored,
                    "seconds": (m.finished_at - m.started_at).num_milliseconds() as f64 / 1000.0,
                    "requests": m.requests,
                }));
            }
            Err(e) => {
                if selected.len() > 1 && !json {
                    eprintln!("error: {e}");
                }
                results.push(serde_json::json!({
                    "source": source.name,
                    "error": e.message,
                    "exit_code": e.kind.exit_code(),
                }));
                failures.push(e);
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).unwrap_or_default()
        );
    }
    match failures.len() {
        0 => Ok(()),
        1 if selected.len() == 1 => Err(failures.remove(0)),
        n if n == selected.len() => {
            let kind = if failures.iter().any(|e| e.kind == ErrorKind::Interrupted) {
                ErrorKind::Interrupted
            } else {
                ErrorKind::Failed
            };
            Err(Error::new(kind, format!("all {n} backups failed")))
        }
        n => Err(Error::new(
            ErrorKind::Partial,
            format!("{n} of {} backups failed", selected.len()),
        )),
    }
}

/// One source's backup as it runs, on a terminal: bytes read and stored, the rate, the time.
struct Shown {
    meter: Option<Arc<Meter>>,
    ticker: Option<(indicatif::ProgressBar, tokio::task::JoinHandle<()>)>,
}

impl Shown {
    /// A live line on stderr when it is a terminal (and not `--json`); else nothing.
    fn start(source: &str, json: bool) -> Shown {
        use std::io::IsTerminal;
        if json || !std::io::stderr().is_terminal() {
            return Shown {
                meter: None,
                ticker: None,
            };
        }
        let meter = Arc::new(Meter::default());
        let bar = lifeboat::spinner(source);
        let (m, b) = (meter.clone(), bar.clone());
        let started = std::time::Instant::now();
        let task = tokio::spawn(async move {
            loop {
                let read = m.read.load(Relaxed);
                let stored = m.stored.load(Relaxed);
                let rate = read as f64 / started.elapsed().as_secs_f64().max(0.001);
                b.set_message(format!(
                    "read {}, stored {} ({}/s)",
                    human_bytes(read),
                    human_bytes(stored),
                    human_bytes(rate as u64)
                ));
                b.tick();
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        });
        Shown {
            meter: Some(meter),
            ticker: Some((bar, task)),
        }
    }

    fn finish(self) {
        if let Some((bar, task)) = self.ticker {
            task.abort();
            bar.finish_and_clear();
        }
    }
}
