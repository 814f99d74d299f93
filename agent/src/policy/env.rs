//! `${VAR}` interpolation and the redacting [`Secret`] type.
//!
//! The environment is read only through an explicit `${VAR}` in a policy value; a missing variable
//! is an error naming the field (unless the caller validates a shipped policy with
//! `--allow-missing-env`). `$${` stands for a literal `${`. Secrets are held in [`Secret`], whose
//! `Debug` and `Display` print `***`, so they cannot leak through logs or error messages.

use std::fmt;

/// A value that must never be printed: passwords, URLs that embed one, key material.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must hand it on (a passfile, a connection).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Why a string could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// `${NAME}` names a variable that is not set.
    #[error("environment variable `{0}` is not set")]
    Missing(String),
    /// `${` without a closing `}` or with a name that is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error(
        "malformed `${{…}}` reference near `{0}`: write `${{NAME}}`, or `$${{` for a literal `${{`"
    )]
    Malformed(String),
}

/// Replaces every `${NAME}` in `input` with `lookup(NAME)`.
///
/// With `allow_missing`, a missing variable is replaced by an empty string and reported in the
/// returned list instead of failing.
pub fn interpolate(
    input: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
    allow_missing: bool,
) -> Result<(String, Vec<String>), EnvError> {
    let mut out = String::with_capacity(input.len());
    let mut missing = Vec::new();
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        if let Some(stripped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = stripped;
        } else if let Some(body) = after.strip_prefix("${") {
            let end = body
                .find('}')
                .ok_or_else(|| EnvError::Malformed(after.chars().take(20).collect()))?;
            let name = &body[..end];
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(EnvError::Malformed(after.chars().take(20).collect()));
            }
            match lookup(name) {
                Some(value) => out.push_str(&value),
                None if allow_missing => missing.push(name.to_string()),
                None => return Err(EnvError::Missing(name.to_string())),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok((out, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "USER_NAME" => Some("backup".into()),
            "PW" => Some("s3cr3t".into()),
            _ => None,
        }
    }

    #[test]
    fn replaces_variables_and_keeps_other_dollars() {
        let (s, missing) =
            interpolate("postgres://${USER_NAME}:${PW}@h/db?x=$1", &env, false).unwrap();
        assert_eq!(s, "postgres://backup:s3cr3t@h/db?x=$1");
        assert!(missing.is_empty());
    }

    #[test]
    fn escaped_dollar_brace_is_literal() {
        assert_eq!(interpolate("a$${B}", &env, false).unwrap().0, "a${B}");
    }

    #[test]
    fn missing_variable_is_an_error_unless_allowed() {
        assert_eq!(
            interpolate("${NOPE}", &env, false),
            Err(EnvError::Missing("NOPE".into()))
        );
        let (s, missing) = interpolate("x${NOPE}y", &env, true).unwrap();
        assert_eq!((s.as_str(), missing), ("xy", vec!["NOPE".to_string()]));
    }

    #[test]
    fn malformed_references_are_errors() {
        assert!(matches!(
            interpolate("${UNCLOSED", &env, false),
            Err(EnvError::Malformed(_))
        ));
        assert!(matches!(
            interpolate("${1BAD}", &env, false),
            Err(EnvError::Malformed(_))
        ));
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "*** ***");
        assert_eq!(s.expose(), "hunter2");
    }
}
