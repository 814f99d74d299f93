//! Listing an objects source in path order, a directory or a page at a time.
//!
//! What must hold:
//! - Paths come out in byte order, the order of the snapshot and of the change index, so that a
//!   run merges the listing with the previous index as two sorted streams and holds neither.
//! - A directory walk holds the directories on the way down to where it is (their entries
//!   waiting to be sent); an S3 listing holds one page of 1,000 keys.
//! - What the walk cannot store (sockets, FIFOs, devices, names that are not UTF-8, paths
//!   removed during the walk) is reported by name in the same order, never fatal.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{EntryKind, Listed};
use crate::error::{Error, Result};
use crate::store::ObjectStore;

/// One thing the listing found.
#[derive(Debug)]
pub(super) enum Found {
    /// A file, directory or symlink to record.
    Entry(Listed),
    /// Something not stored: its path and why, `path (why)`.
    Skipped(String),
}

/// Listed items waiting for the run: enough to keep it busy, a few hundred KiB at most.
const LISTING_AHEAD: usize = 1024;

/// Walks `root` in path order on a blocking thread.
pub(super) fn walk(root: &Path) -> mpsc::Receiver<Result<Found>> {
    let (tx, rx) = mpsc::channel(LISTING_AHEAD);
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = walk_sorted(&root, &tx) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    rx
}

/// Lists an S3 source page by page (S3 lists in key order, which is byte order).
pub(super) fn pages(s3: Arc<dyn ObjectStore>, shown: String) -> mpsc::Receiver<Result<Found>> {
    let (tx, rx) = mpsc::channel(LISTING_AHEAD);
    tokio::spawn(async move {
        let mut after: Option<String> = None;
        loop {
            let (page, more) = match s3.list_page("", after.as_deref()).await {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx
                        .send(Err(Error::from(e).context(format!("listing {shown}"))))
                        .await;
                    return;
                }
            };
            let Some(last) = page.last().map(|o| o.key.clone()) else {
                return;
            };
            for o in page.into_iter().filter(|o| !o.key.ends_with('/')) {
                let found = Found::Entry(Listed {
                    path: o.key,
                    kind: EntryKind::File,
                    size: o.size,
                    mtime_ms: None,
                    mode: None,
                    etag: o.etag,
                    target: None,
                });
                if tx.send(Ok(found)).await.is_err() {
                    return;
                }
            }
            if !more {
                return;
            }
            after = Some(last);
        }
    });
    rx
}

/// What a directory holds, keyed so that sorting the keys sorts the paths: an entry by its
/// name, what lies below a directory by its name and `/` (every path below starts so).
enum Item {
    Found(Found),
    Below(String),
}

fn walk_sorted(root: &Path, tx: &mpsc::Sender<Result<Found>>) -> Result<()> {
    let meta = std::fs::metadata(root).map_err(|e| {
        Error::failed(format!("{}: {e}", root.display()))
            .hint("is the volume mounted here? check `from`")
    })?;
    if !meta.is_dir() {
        return Err(Error::failed(format!(
            "{} is not a directory",
            root.display()
        )));
    }
    let mut levels = match read_level(root, "") {
        Ok(items) => vec![items.into_iter()],
        Err(Unread::Failed(e)) => return Err(e),
        Err(Unread::Gone) => return Err(Error::failed(format!("{} vanished", root.display()))),
    };
    while let Some(level) = levels.last_mut() {
        let Some(item) = level.next() else {
            levels.pop();
            continue;
        };
        match item {
            Item::Found(found) => {
                if tx.blocking_send(Ok(found)).is_err() {
                    return Ok(()); // the run stopped listening
                }
            }
            Item::Below(rel) => match read_level(root, &rel) {
                Ok(items) => levels.push(items.into_iter()),
                Err(Unread::Failed(e)) => return Err(e),
                Err(Unread::Gone) => {
                    let skipped = Found::Skipped(format!("{rel} (removed during the walk)"));
                    if tx.blocking_send(Ok(skipped)).is_err() {
                        return Ok(());
                    }
                }
            },
        }
    }
    Ok(())
}

/// Why a directory's entries could not be read.
enum Unread {
    /// It was removed since its parent was listed.
    Gone,
    /// Anything else: the walk stops.
    Failed(Error),
}

/// The entries of directory `rel` (`""` for the root), sorted.
fn read_level(root: &Path, rel: &str) -> std::result::Result<Vec<Item>, Unread> {
    let failed = |m: String| Unread::Failed(Error::failed(m));
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !rel.is_empty() => {
            return Err(Unread::Gone)
        }
        Err(e) => return Err(failed(format!("listing {}: {e}", dir.display()))),
    };
    let join = |name: &str| {
        if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        }
    };
    let mut items: Vec<(String, Item)> = Vec::new();
    let skip = |items: &mut Vec<(String, Item)>, key: String, why: &str| {
        let shown = format!("{} ({why})", join(&key));
        items.push((key, Item::Found(Found::Skipped(shown))));
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return Err(failed(format!("listing {}: {e}", dir.display()))),
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            // Paths are text in a snapshot (and in S3): such a name cannot be stored exactly.
            skip(
                &mut items,
                name.to_string_lossy().into_owned(),
                "a name that is not UTF-8",
            );
            continue;
        };
        let path = join(name);
        let m = match entry.metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                skip(&mut items, name.to_string(), "removed during the walk");
                continue;
            }
            Err(e) => return Err(failed(format!("{}: {e}", dir.join(name).display()))),
        };
        let listed = |kind, size, target| Listed {
            path: path.clone(),
            kind,
            size,
            mtime_ms: m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as i64),
            mode: (kind != EntryKind::Symlink).then_some(m.permissions().mode() & 0o7777),
            etag: None,
            target,
        };
        let t = m.file_type();
        let found = if t.is_dir() {
            items.push((format!("{name}/"), Item::Below(path.clone())));
            listed(EntryKind::Dir, 0, None)
        } else if t.is_file() {
            listed(EntryKind::File, m.len(), None)
        } else if t.is_symlink() {
            let link = dir.join(name);
            let target = match std::fs::read_link(&link) {
                Ok(t) => t,
                Err(e) => return Err(failed(format!("{}: {e}", link.display()))),
            };
            match target.to_str() {
                Some(to) => listed(EntryKind::Symlink, 0, Some(to.to_string())),
                None => {
                    skip(
                        &mut items,
                        name.to_string(),
                        "a symlink whose target is not UTF-8",
                    );
                    continue;
                }
            }
        } else {
            let what = if t.is_socket() {
                "a socket"
            } else if t.is_fifo() {
                "a FIFO"
            } else if t.is_block_device() || t.is_char_device() {
                "a device"
            } else {
                "not a file, directory or symlink"
            };
            skip(&mut items, name.to_string(), what);
            continue;
        };
        items.push((name.to_string(), Item::Found(Found::Entry(found))));
    }
    items.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(items.into_iter().map(|(_, item)| item).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_walk_comes_in_byte_order_of_whole_paths() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // `a.txt` sorts between the directory `a` and what is under it; `a0` after it all.
        for d in ["a", "a/b", "c"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        for f in ["a.txt", "a/x", "a/b/y", "a/b.z", "a0", "b", "c/-"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("a/x", root.join("a-link")).unwrap();
        let mut rx = walk(root);
        let mut got = Vec::new();
        while let Some(found) = rx.recv().await {
            match found.unwrap() {
                Found::Entry(l) => got.push(l.path),
                Found::Skipped(s) => panic!("skipped {s}"),
            }
        }
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted);
        assert_eq!(got.len(), 11, "{got:?}");
        assert_eq!(&got[..4], ["a", "a-link", "a.txt", "a/b"]);
    }
}
