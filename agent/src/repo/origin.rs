//! Source identity: what each backup was taken from, and whether a source's backups all come from
//! one place.
//!
//! A signature proves who published a backup, not what it was taken from: a staging policy
//! pointed at production's prefix, or a second policy reusing a source name, publishes
//! well-formed, signed backups of the wrong system. So each manifest records its [`Origin`] (the
//! PostgreSQL system identifier and database, the Redis replication id, the objects source's URL),
//! and a listing compares each backup with the one before it of the same source ([`Lineage`]).
//! `list` marks a change, a restore plan says it in words, and the verifier fails it unless the
//! source's `moved_at` says the source moved then.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What a backup was taken from (the manifest's `origin`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// What identifies the source, compared between its backups: e.g.
    /// `postgresql system 7312… database app`, `redis replication 9e51…`, `s3://bucket/prefix/`.
    pub identity: String,
    /// Other ids of the history it belongs to (a Redis server's replication ids, which a restart
    /// from its RDB or a promoted replica keeps as the second one). Two backups sharing any id,
    /// identity or history, carry on one history.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<String>,
    /// For people: the Redis run id, the PostgreSQL timeline, the server's address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

impl Origin {
    /// An origin with only its identity.
    pub fn new(identity: impl Into<String>) -> Origin {
        Origin {
            identity: identity.into(),
            history: Vec::new(),
            details: BTreeMap::new(),
        }
    }

    /// With a detail for people.
    pub fn detail(mut self, key: &str, value: impl Into<String>) -> Origin {
        self.details.insert(key.to_string(), value.into());
        self
    }

    /// True when a backup from `self` carries on from one taken from `earlier`: they share an id.
    pub fn carries_on(&self, earlier: &Origin) -> bool {
        let ids = |o: &'_ Origin| -> Vec<String> {
            std::iter::once(o.identity.clone())
                .chain(o.history.iter().cloned())
                .collect()
        };
        let theirs = ids(earlier);
        ids(self).iter().any(|id| theirs.contains(id))
    }
}

/// How a backup's origin compares with the backup before it of the same source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Lineage {
    /// The manifest records no origin (written before origins were recorded).
    Unrecorded,
    /// No earlier backup of the source records one.
    First,
    /// Taken from the same source as the backup before it.
    Same,
    /// Taken from another source than the backup before it.
    Changed {
        /// The backup before it (the newest earlier one recording an origin).
        previous: String,
        /// When that one started.
        previous_started_at: DateTime<Utc>,
        /// What it was taken from.
        from: String,
    },
}

impl Lineage {
    /// Each backup's lineage, for backups of one source given oldest first.
    pub fn of<'a>(
        origins: impl IntoIterator<Item = (&'a str, DateTime<Utc>, Option<&'a Origin>)>,
    ) -> Vec<Lineage> {
        let mut before: Option<(&str, DateTime<Utc>, &Origin)> = None;
        origins
            .into_iter()
            .map(|(id, started_at, origin)| {
                let Some(origin) = origin else {
                    return Lineage::Unrecorded;
                };
                let lineage = match before {
                    None => Lineage::First,
                    Some((_, _, earlier)) if origin.carries_on(earlier) => Lineage::Same,
                    Some((previous, previous_started_at, earlier)) => Lineage::Changed {
                        previous: previous.to_string(),
                        previous_started_at,
                        from: earlier.identity.clone(),
                    },
                };
                before = Some((id, started_at, origin));
                lineage
            })
            .collect()
    }

    /// The change, judged against the source's `moved_at`: `None` unless the origin changed.
    pub fn change(
        &self,
        origin: Option<&Origin>,
        started_at: DateTime<Utc>,
        moved_at: Option<DateTime<Utc>>,
    ) -> Option<Change> {
        let Lineage::Changed {
            previous,
            previous_started_at,
            from,
        } = self
        else {
            return None;
        };
        let to = origin.map(|o| o.identity.clone()).unwrap_or_default();
        // The move is expected when it happened between the two backups.
        let moved = moved_at.filter(|t| *previous_started_at < *t && *t <= started_at);
        Some(Change {
            previous: previous.clone(),
            from: from.clone(),
            to,
            moved,
        })
    }
}

/// A backup taken from another source than the backup before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// The backup before it.
    pub previous: String,
    /// What that one was taken from.
    pub from: String,
    /// What this one was taken from.
    pub to: String,
    /// The policy's `moved_at`, when it falls between the two: the change was expected.
    pub moved: Option<DateTime<Utc>>,
}

impl Change {
    /// The change in words, for a plan, a report or a warning.
    pub fn words(&self) -> String {
        match self.moved {
            Some(t) => format!(
                "taken from {}; the backup before it ({}) from {}: expected, the source moved at {} (moved_at)",
                self.to,
                self.previous,
                self.from,
                t.format("%Y-%m-%d %H:%M:%S UTC")
            ),
            None => format!(
                "taken from {}, but the backup before it ({}) from {}: another system, or the source moved",
                self.to, self.previous, self.from
            ),
        }
    }

    /// `moved` when the policy expects the change, else `changed`.
    pub fn word(&self) -> &'static str {
        if self.moved.is_some() {
            "moved"
        } else {
            "changed"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u32) -> DateTime<Utc> {
        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 12, 3, h, 0, 0).unwrap()
    }

    #[test]
    fn each_backup_is_compared_with_the_one_before_it() {
        let a = Origin::new("postgresql system 1 database app");
        let b = Origin::new("postgresql system 2 database app");
        let lineage = Lineage::of([
            ("old", at(1), None),
            ("b1", at(2), Some(&a)),
            ("b2", at(3), Some(&a)),
            ("b3", at(4), Some(&b)),
            ("b4", at(5), Some(&b)),
            ("b5", at(6), Some(&a)),
        ]);
        assert_eq!(lineage[0], Lineage::Unrecorded);
        assert_eq!(lineage[1], Lineage::First);
        assert_eq!(lineage[2], Lineage::Same);
        assert_eq!(
            lineage[3],
            Lineage::Changed {
                previous: "b2".into(),
                previous_started_at: at(3),
                from: a.identity.clone()
            }
        );
        assert_eq!(lineage[4], Lineage::Same, "the new origin carries on");
        assert!(matches!(&lineage[5], Lineage::Changed { previous, .. } if previous == "b4"));
    }

    #[test]
    fn a_history_that_shares_an_id_carries_on() {
        let redis = |run: &str, replids: &[&str]| {
            let mut o = Origin::new(format!("redis run {run}"));
            o.history = replids
                .iter()
                .map(|r| format!("redis replication {r}"))
                .collect();
            o
        };
        let lineage = Lineage::of([
            ("r1", at(1), Some(&redis("1", &["aaa"]))),
            // The same process: its replication id changed when its backlog was made again.
            ("r2", at(2), Some(&redis("1", &["bbb"]))),
            // Restarted from its RDB: a new run, the old replication id as the second.
            ("r3", at(3), Some(&redis("2", &["ccc", "bbb"]))),
            // Another server, or a restart that lost the history.
            ("r4", at(4), Some(&redis("3", &["ddd"]))),
        ]);
        assert_eq!(lineage[1], Lineage::Same);
        assert_eq!(lineage[2], Lineage::Same);
        assert!(matches!(lineage[3], Lineage::Changed { .. }));
    }

    #[test]
    fn moved_at_between_the_two_backups_makes_the_change_expected() {
        let lineage = Lineage::Changed {
            previous: "b2".into(),
            previous_started_at: at(3),
            from: "x".into(),
        };
        let to = Origin::new("y");
        let unexpected = lineage.change(Some(&to), at(5), None).unwrap();
        assert_eq!((unexpected.word(), unexpected.moved), ("changed", None));
        assert!(
            unexpected.words().contains("another system"),
            "{}",
            unexpected.words()
        );
        let expected = lineage.change(Some(&to), at(5), Some(at(4))).unwrap();
        assert_eq!((expected.word(), expected.moved), ("moved", Some(at(4))));
        for outside in [at(2), at(3), at(6)] {
            let c = lineage.change(Some(&to), at(5), Some(outside)).unwrap();
            assert_eq!(
                c.moved, None,
                "moved_at {outside} is not between the backups"
            );
        }
        assert_eq!(Lineage::Same.change(Some(&to), at(5), None), None);
    }
}
