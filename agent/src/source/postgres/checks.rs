//! Comparing a restored database with the fingerprint taken at backup time, and running the
//! policy's own SQL assertions. Every comparison becomes a [`Check`] with expected and found.

use tokio_postgres::{Client, SimpleQueryMessage};

use super::{Fingerprint, Observed};
use crate::policy::SqlCheck;
use crate::verify::Check;

fn rows_and_hash(rows: u64, hash: &Option<String>) -> String {
    match hash {
        Some(h) => format!("{rows} rows, content {h}"),
        None => format!("{rows} rows"),
    }
}

/// Fingerprint vs restored database: tables, rows, content, sequences, large objects, schema objects.
pub fn compare(expected: &Fingerprint, observed: &Observed) -> Vec<Check> {
    let mut out = Vec::new();
    if let Some(err) = &expected.dump.error {
        out.push(Check::failed(
            "fingerprint complete",
            "the dump stream parsed at backup time",
            format!("it did not: {err}"),
        ));
    }
    for t in &expected.dump.tables {
        let name = format!("{}.{}", t.schema, t.name);
        match observed
            .tables
            .iter()
            .find(|o| o.schema == t.schema && o.name == t.name)
        {
            Some(o) => out.push(Check::eq(
                format!("table {name}"),
                rows_and_hash(t.rows, &t.hash),
                rows_and_hash(o.rows, &o.hash),
            )),
            None => out.push(Check::failed(
                format!("table {name}"),
                rows_and_hash(t.rows, &t.hash),
                "missing",
            )),
        }
    }
    for u in &observed.unexpected_tables {
        out.push(Check::failed(
            format!("table {u}"),
            "not in the backup",
            "present",
        ));
    }
    for (name, found) in &observed.sequences {
        let want = expected.dump.sequences.iter().find(|s| &s.name == name);
        let show =
            |v: i64, called: bool| format!("{v}{}", if called { "" } else { " (not yet called)" });
        if let Some(w) = want {
            out.push(match found {
                Some(f) => Check::eq(
                    format!("sequence {name}"),
                    show(w.value, w.is_called),
                    show(f.value, f.is_called),
                ),
                None => Check::failed(
                    format!("sequence {name}"),
                    show(w.value, w.is_called),
                    "missing",
                ),
            });
        }
    }
    out.push(Check::eq(
        "large objects",
        rows_and_hash(
            expected.dump.large_objects,
            &expected.dump.large_objects_hash,
        )
        .replace("rows", "objects"),
        rows_and_hash(observed.large_objects, &observed.large_objects_hash)
            .replace("rows", "objects"),
    ));
    for (kind, want) in &expected.objects {
        let found = observed.objects.get(kind).copied().unwrap_or(0);
        out.push(Check::eq(
            format!("schema objects: {kind}"),
            want.to_string(),
            found.to_string(),
        ));
    }
    out
}

/// What `c` expects: ">= 1 and <= 9".
fn expected(c: &SqlCheck) -> String {
    let mut expected = Vec::new();
    if let Some(v) = c.min {
        expected.push(format!(">= {v}"));
    }
    if let Some(v) = c.max {
        expected.push(format!("<= {v}"));
    }
    if let Some(v) = c.equals {
        expected.push(format!("= {v}"));
    }
    expected.join(" and ")
}

/// A check that could not run, failed with `why`.
pub fn not_run(c: &SqlCheck, why: &str) -> Check {
    Check::failed(format!("sql: {}", c.sql), expected(c), why)
}

/// Runs the policy's assertions: each query returns one number, compared with min, max, equals.
pub async fn sql_checks(client: &Client, checks: &[SqlCheck]) -> Vec<Check> {
    let mut out = Vec::new();
    for c in checks {
        let value = match client.simple_query(&c.sql).await {
            Err(e) => Err(e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string())),
            Ok(msgs) => msgs
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => Some(r.get(0).map(str::to_string)),
                    _ => None,
                })
                .flatten()
                .ok_or_else(|| "returned no value".to_string())
                .and_then(|v| {
                    v.trim()
                        .parse::<i64>()
                        .map_err(|_| format!("returned `{v}`, not an integer"))
                }),
        };
        out.push(match value {
            Err(e) => not_run(c, &e),
            Ok(v) => Check {
                name: format!("sql: {}", c.sql),
                passed: c.min.is_none_or(|m| v >= m)
                    && c.max.is_none_or(|m| v <= m)
                    && c.equals.is_none_or(|m| v == m),
                expected: expected(c),
                found: v.to_string(),
            },
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::postgres::pgdump::{DumpSummary, SequenceValue, TableData};
    use std::collections::BTreeMap;

    fn table(name: &str, rows: u64, hash: &str) -> TableData {
        TableData {
            block: None,
            schema: "public".into(),
            name: name.into(),
            copy: None,
            rows,
            hash: Some(hash.into()),
        }
    }

    #[test]
    fn every_difference_is_a_failed_check_with_expected_and_found() {
        let expected = Fingerprint {
            format: 1,
            kind: crate::source::Kind::Postgres,
            mode: crate::source::postgres::FingerprintMode::Full,
            database: Some("app".into()),
            server_version: "15".into(),
            objects: BTreeMap::from([("views".to_string(), 2)]),
            dump: DumpSummary {
                tables: vec![
                    table("a", 10, "aa"),
                    table("b", 5, "bb"),
                    table("gone", 1, "gg"),
                ],
                sequences: vec![SequenceValue {
                    name: "public.s".into(),
                    value: 7,
                    is_called: true,
                }],
                large_objects: 1,
                large_objects_hash: Some("ll".into()),
                ..Default::default()
            },
        };
        let observed = Observed {
            tables: vec![table("a", 10, "aa"), table("b", 4, "bx")],
            missing_tables: vec!["public.gone".into()],
            unexpected_tables: vec!["public.extra".into()],
            sequences: vec![(
                "public.s".into(),
                Some(SequenceValue {
                    name: "public.s".into(),
                    value: 6,
                    is_called: true,
                }),
            )],
            large_objects: 1,
            large_objects_hash: Some("ll".into()),
            objects: BTreeMap::from([("views".to_string(), 1)]),
            spread: Default::default(),
        };
        let checks = compare(&expected, &observed);
        let failed: Vec<(&str, &str, &str)> = checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| (c.name.as_str(), c.expected.as_str(), c.found.as_str()))
            .collect();
        assert_eq!(
            failed,
            vec![
                ("table public.b", "5 rows, content bb", "4 rows, content bx"),
                ("table public.gone", "1 rows, content gg", "missing"),
                ("table public.extra", "not in the backup", "present"),
                ("sequence public.s", "7", "6"),
                ("schema objects: views", "2", "1"),
            ]
        );
        assert!(checks
            .iter()
            .any(|c| c.name == "table public.a" && c.passed));
        assert!(checks.iter().any(|c| c.name == "large objects" && c.passed));
    }
}
