//! `lifeboat policy check|schema` and `lifeboat keygen`: the first set-up.

use std::io::Write;

use lifeboat::policy::{self, LoadOptions};
use lifeboat::{Error, ErrorKind, Result};

use super::print_error;

/// `lifeboat policy schema`: the JSON Schema on stdout.
pub fn schema() -> Result<()> {
    let text = serde_json::to_string_pretty(&policy::schema::schema())
        .map_err(|e| Error::failed(format!("cannot encode the schema: {e}")))?;
    writeln!(std::io::stdout().lock(), "{text}").map_err(print_error)
}

pub fn policy_check(files: &[std::path::PathBuf], allow_missing_env: bool) -> Result<()> {
    let mut bad = 0;
    for f in files {
        match policy::load(f, LoadOptions { allow_missing_env }) {
            Ok(p) => {
                let missing = if p.missing_env.is_empty() {
                    String::new()
                } else {
                    format!(" (unset here: {})", p.missing_env.join(", "))
                };
                let copies = match p.copies.len() {
                    0 => String::new(),
                    _ => {
                        let names: Vec<&str> = p.copies.iter().map(|c| c.name.as_str()).collect();
                        format!(", copied to {}", names.join(", "))
                    }
                };
                let signing = match &p.signing {
                    None => ", unsigned (no [signing])".to_string(),
                    Some(s) => format!(", signed ({} trusted key(s))", s.trusted.len()),
                };
                eprintln!(
                    "{}: ok, {} source(s){copies}{signing}{missing}",
                    f.display(),
                    p.sources.len()
                );
            }
            Err(e) => {
                bad += 1;
                eprintln!("{e}");
            }
        }
    }
    if bad > 0 {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("{bad} of {} policy file(s) invalid", files.len()),
        ));
    }
    Ok(())
}

pub fn keygen(signing: bool) -> Result<()> {
    use age::secrecy::ExposeSecret;
    if signing {
        let (secret, public) = lifeboat::repo::signing::generate()?;
        write!(std::io::stdout().lock(), "{secret}").map_err(print_error)?;
        eprintln!("Public key: {public}");
        return Ok(());
    }
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# created: {}\n# public key: {recipient}\n{}",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        identity.to_string().expose_secret()
    )
    .map_err(print_error)?;
    eprintln!("Public key: {recipient}");
    Ok(())
}
