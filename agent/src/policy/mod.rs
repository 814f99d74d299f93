//! Policy files: TOML → RawPolicy (serde) → Policy (typed and validated).
//!
//! Loading goes in three steps (see STYLE.md §7): the TOML is parsed into a table and every string
//! is `${VAR}`-interpolated; each section and each source is deserialized on its own, so a typo in
//! one does not hide problems in another; then `validate` checks every rule. All problems come back
//! together, each with its field path, in a [`PolicyError`].

pub mod env;
pub mod raw;
pub mod validate;

use std::fmt;
use std::path::Path;

use serde::de::DeserializeOwned;

pub mod schema;
pub use env::Secret;
pub use raw::{ChecksumMode, LockMode, LogFormat, NotifyFormat, ServerSideEncryption};
pub use validate::*;

use crate::error::{Error, ErrorKind};

/// Options for loading a policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Treat missing `${VAR}`s as empty (for validating shipped policies whose secrets are absent).
    pub allow_missing_env: bool,
}

/// Every problem found in one policy file.
#[derive(Debug, Clone)]
pub struct PolicyError {
    /// The file, as given.
    pub file: String,
    /// The problems, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.file,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            if p.path.is_empty() {
                write!(f, "\n  {}", p.message)?;
            } else {
                write!(f, "\n  {}: {}", p.path, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

impl From<PolicyError> for Error {
    fn from(e: PolicyError) -> Self {
        Error::new(ErrorKind::Invalid, e.to_string())
            .hint("fix the fields named above; `lifeboat policy check FILE` re-checks (RUNBOOK.md#policy-errors)")
    }
}

/// Reads and validates a policy file, reading `${VAR}`s from the process environment.
pub fn load(path: &Path, opts: LoadOptions) -> Result<Policy, PolicyError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
        file: file.clone(),
        problems: vec![Problem {
            path: String::new(),
            message: format!("cannot read the policy file: {e}"),
        }],
    })?;
    parse(&text, &file, &|name| std::env::var(name).ok(), opts)
}

/// Reads and validates a policy file as seen from `repository`: the copy of that name alone
/// (`--repository NAME`), or the primary when `None`.
pub fn load_at(path: &Path, repository: Option<&str>) -> Result<Policy, Error> {
    let policy = load(path, LoadOptions::default())?;
    match repository {
        Some(name) => policy.for_repository(name),
        None => Ok(policy),
    }
}

/// Validates policy text. `lookup` resolves `${VAR}`.
pub fn parse(
    text: &str,
    file: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    opts: LoadOptions,
) -> Result<Policy, PolicyError> {
    let fail = |problems: Vec<Problem>| PolicyError {
        file: file.to_string(),
        problems,
    };
    let mut table: toml::Table = toml::from_str(text).map_err(|e| {
        fail(vec![Problem {
            path: String::new(),
            message: format!("not valid TOML: {}", e.to_string().trim_end()),
        }])
    })?;

    let mut problems = Problems::default();
    let mut missing_env = Vec::new();
    for (key, value) in table.iter_mut() {
        interpolate_value(
            key,
            value,
            lookup,
            opts.allow_missing_env,
            &mut missing_env,
            &mut problems,
        );
    }

    for key in table.keys() {
        if !raw::TOP_LEVEL_KEYS.contains(&key.as_str()) {
            problems.add(
                key.clone(),
                format!(
                    "unknown section, expected one of {}",
                    quoted_list(raw::TOP_LEVEL_KEYS)
                ),
            );
        }
    }

    let repository = match table.remove("repository") {
        None => {
            problems.add(
                "repository",
                "missing: every policy needs [repository] with a url",
            );
            None
        }
        Some(v) => section::<raw::RawRepository>("repository", v, &mut problems),
    };
    let encryption = match table.remove("encryption") {
        None => {
            problems.add(
                "encryption",
                "missing: every policy needs [encryption] with recipients; `lifeboat keygen` makes one",
            );
            None
        }
        Some(v) => section::<raw::RawEncryption>("encryption", v, &mut problems),
    };
    let signing = table
        .remove("signing")
        .and_then(|v| section::<raw::RawSigning>("signing", v, &mut problems));
    let agent = table
        .remove("agent")
        .and_then(|v| section::<raw::RawAgent>("agent", v, &mut problems))
        .unwrap_or_default();
    let defaults = table
        .remove("defaults")
        .and_then(|v| section::<raw::RawDefaults>("defaults", v, &mut problems))
        .unwrap_or_default();

    let notify = parse_notify(table.remove("notify"), &mut problems);
    let copies = parse_copies(table.remove("copies"), &mut problems);
    let sources = raw_sources(table.remove("sources"), &mut problems);

    let raw = validate::RawSections {
        repository,
        encryption,
        signing,
        agent,
        defaults,
        sources,
        copies,
    };
    let policy = validate::validate(raw, opts.allow_missing_env, &mut problems);
    match policy {
        Some(mut p) if problems.0.is_empty() => {
            p.notify = notify;
            missing_env.sort();
            missing_env.dedup();
            p.missing_env = missing_env;
            Ok(p)
        }
        _ => Err(fail(problems.0)),
    }
}

/// `[[notify]]`: each webhook checked on its own.
fn parse_notify(value: Option<toml::Value>, problems: &mut Problems) -> Vec<Notify> {
    let mut notify = Vec::new();
    match value {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let path = format!("notify[{i}]");
                if let Some(n) = section::<raw::RawNotify>(&path, item, problems) {
                    if !(n.url.starts_with("https://")
                        || n.url.starts_with("http://")
                        || n.url.is_empty())
                    {
                        problems.add(format!("{path}.url"), "must start with https:// or http://");
                    }
                    notify.push(Notify {
                        url: Secret::new(n.url),
                        format: n.format.unwrap_or_default(),
                    });
                }
            }
        }
        Some(_) => problems.add("notify", "must be an array of tables: write [[notify]]"),
    }
    notify
}

/// `[[copies]]`: each table split into the copy's own keys and its `[repository]` keys, each
/// deserialized on its own so that an unknown key is named with its path.
fn parse_copies(
    value: Option<toml::Value>,
    problems: &mut Problems,
) -> Vec<(usize, raw::RawCopy, raw::RawRepository)> {
    let mut copies = Vec::new();
    match value {
        None => {}
        Some(toml::Value::Array(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let path = format!("copies[{i}]");
                let toml::Value::Table(mut table) = item else {
                    problems.add(path, "must be a table: write [[copies]]");
                    continue;
                };
                let mut own = toml::Table::new();
                for key in raw::COPY_KEYS {
                    if let Some(v) = table.remove(*key) {
                        own.insert(key.to_string(), v);
                    }
                }
                let copy = section::<raw::RawCopy>(&path, toml::Value::Table(own), problems);
                let repo =
                    section::<raw::RawRepository>(&path, toml::Value::Table(table), problems);
                if let (Some(c), Some(r)) = (copy, repo) {
                    copies.push((i, c, r));
                }
            }
        }
        Some(_) => problems.add("copies", "must be an array of tables: write [[copies]]"),
    }
    copies
}

/// `[[sources]]`: each table deserialized as its kind's own struct (from the table of kinds), so
/// that its own fields are the ones an "unknown field" error lists.
fn raw_sources(
    value: Option<toml::Value>,
    problems: &mut Problems,
) -> Vec<(usize, crate::source::RawSource)> {
    let mut sources = Vec::new();
    match value {
        None => problems.add("sources", "no sources: add at least one [[sources]] table"),
        Some(toml::Value::Array(items)) => {
            if items.is_empty() {
                problems.add("sources", "no sources: add at least one [[sources]] table");
            }
            for (i, item) in items.into_iter().enumerate() {
                let path = format!("sources[{i}]");
                let kind = item
                    .get("kind")
                    .and_then(|k| k.as_str())
                    .map(str::to_string);
                match kind
                    .as_deref()
                    .map(|k| (k, crate::source::Kind::from_name(k)))
                {
                    Some((_, Some(kind))) => {
                        if let Some(s) =
                            crate::source::RawSource::deserialize(kind, &path, item, problems)
                        {
                            sources.push((i, s));
                        }
                    }
                    Some((other, None)) => problems.add(
                        format!("{path}.kind"),
                        format!(
                            "unknown kind `{other}`, expected one of {}",
                            crate::source::Kind::names()
                        ),
                    ),
                    None => problems.add(
                        format!("{path}.kind"),
                        format!(
                            "missing: every source needs a kind, one of {}",
                            crate::source::Kind::names()
                        ),
                    ),
                }
            }
        }
        Some(_) => problems.add("sources", "must be an array of tables: write [[sources]]"),
    }
    sources
}

/// Deserializes one section, recording a problem with the full field path on failure.
pub(crate) fn section<T: DeserializeOwned>(
    path: &str,
    value: toml::Value,
    problems: &mut Problems,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = e.path().to_string();
            let mut full = path.to_string();
            if inner != "." && !inner.is_empty() {
                full.push('.');
                full.push_str(&inner);
            }
            // toml appends "in `section`" lines; the path already says where.
            let message = e.into_inner().to_string();
            let message = message.lines().next().unwrap_or("").trim().to_string();
            // serde names the unknown field in the message, not in the path: lift it into the path.
            if let Some(field) = message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
            {
                let expected = message.split_once(", ").map(|x| x.1).unwrap_or("");
                if !full.ends_with(&format!(".{field}")) {
                    full = format!("{full}.{field}");
                }
                problems.add(full, format!("unknown field, {expected}"));
            } else {
                problems.add(full, message);
            }
            None
        }
    }
}

fn interpolate_value(
    path: &str,
    value: &mut toml::Value,
    lookup: &dyn Fn(&str) -> Option<String>,
    allow_missing: bool,
    missing_env: &mut Vec<String>,
    problems: &mut Problems,
) {
    match value {
        toml::Value::String(s) if is_url_field(path) && validate::literal_secret(s).is_some() => {
            let what = validate::literal_secret(s).unwrap_or_default();
            problems.add(
                path,
                format!(
                    "holds a credential written out ({what}): secrets are never written in a policy; give the password in password_file, or write ${{VAR}} in its place (postgres://backup:${{PGPASSWORD}}@db/app) and set VAR in the environment"
                ),
            );
            problems.unresolved(path);
        }
        toml::Value::String(s) => match env::interpolate(s, lookup, allow_missing) {
            Ok((out, missing)) => {
                *s = out;
                if !missing.is_empty() {
                    problems.unresolved(path);
                }
                missing_env.extend(missing);
            }
            Err(e) => {
                problems.add(path, e.to_string());
                problems.unresolved(path);
            }
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                interpolate_value(
                    &format!("{path}[{i}]"),
                    item,
                    lookup,
                    allow_missing,
                    missing_env,
                    problems,
                );
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                interpolate_value(
                    &format!("{path}.{k}"),
                    v,
                    lookup,
                    allow_missing,
                    missing_env,
                    problems,
                );
            }
        }
        _ => {}
    }
}

/// The policy fields that hold a URL a credential could be written into: a source's `url` and
/// `verify.scratch_url`, and a `[[notify]]` url.
fn is_url_field(path: &str) -> bool {
    let in_list = |list: &str| {
        path.strip_prefix(list)
            .and_then(|rest| rest.strip_prefix('['))
            .and_then(|rest| rest.split_once("]."))
            .map(|(_, field)| field)
    };
    matches!(in_list("sources"), Some("url" | "verify.scratch_url"))
        || in_list("notify") == Some("url")
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("`{s}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
pub(crate) mod tests;
