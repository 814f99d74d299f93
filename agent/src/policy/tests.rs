//! Policy parsing and validation: every error case names its field. Each kind's own section is
//! tested in its folder (`source/<kind>/policy.rs`), with the helpers here.

use super::*;

pub(crate) const RECIPIENT: &str = "age1p88eqe4cmm30daedtyvnjzpxnze8jxzuzxdc7wyejc0ff2hz7f8smsrqmr";

pub(crate) fn env(name: &str) -> Option<String> {
    match name {
        "PGPASSWORD" => Some("pw".into()),
        "BUCKET" => Some("backups-prod".into()),
        _ => None,
    }
}

pub(crate) fn good() -> String {
    format!(
        r#"
[repository]
url = "s3://${{BUCKET}}/lifeboat"
endpoint = "http://127.0.0.1:9000"

[encryption]
recipients = ["{RECIPIENT}"]

[defaults]
timeout = "2h"
schedule = "0 */6 * * *"
retention = {{ keep_last = 7, keep_daily = 7 }}
compression = {{ level = 3 }}

[[sources]]
name = "app-db"
kind = "postgres"
url = "postgres://backup:${{PGPASSWORD}}@127.0.0.1:5432/app"
[sources.verify]
schedule = "30 4 * * *"
checks = [{{ sql = "select count(*) from users", min = 1 }}]

[[sources]]
name = "other-db"
kind = "postgres"
url = "postgres://backup@127.0.0.1:5432/other"
password_file = "/secrets/pg"
schedule = "0 0 * * * *"
retention = {{ keep_within = "14d" }}
compression = {{ level = 9, workers = 0 }}
"#
    )
}

/// The good policy plus a Redis source named `cache` with `source`'s fields.
pub(crate) fn with_redis(source: &str) -> String {
    format!(
        "{}\n[[sources]]\nname = \"cache\"\nkind = \"redis\"\n{source}\n",
        good()
    )
}

pub(crate) fn problems(text: &str) -> Vec<String> {
    match parse(text, "p.toml", &env, LoadOptions::default()) {
        Ok(_) => panic!("expected problems"),
        Err(e) => e
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect(),
    }
}

#[test]
fn a_good_policy_validates_with_defaults_merged() {
    let p = parse(&good(), "p.toml", &env, LoadOptions::default()).unwrap();
    let Location::S3(s3) = &p.repository.location else {
        panic!("s3 expected")
    };
    assert_eq!(s3.bucket, "backups-prod");
    assert_eq!(s3.prefix, "lifeboat");
    assert!(s3.force_path_style, "auto + endpoint means path style");
    assert_eq!(s3.checksums, ChecksumMode::WhenRequired);
    let a = &p.sources[0];
    assert_eq!(a.schedule.as_ref().unwrap().expression, "0 */6 * * *");
    assert_eq!(a.timeout, std::time::Duration::from_secs(7200));
    assert_eq!(a.retention.keep_last, Some(7));
    assert_eq!(a.retention.keep_last_verified, 1);
    assert_eq!(a.compression.level, 3);
    assert_eq!(a.verify.checks.len(), 1);
    let b = &p.sources[1];
    assert_eq!(b.schedule.as_ref().unwrap().expression, "0 0 * * * *");
    assert_eq!(b.retention.keep_last, None);
    assert_eq!(
        b.compression,
        Compression {
            level: 9,
            workers: 0
        }
    );
    let SourceConfig::Postgres(pg) = &a.config else {
        panic!("the first source is postgres")
    };
    assert_eq!(pg.url.expose(), "postgres://backup:pw@127.0.0.1:5432/app");
    assert_eq!(pg.url_redacted, "postgres://backup:***@127.0.0.1:5432/app");
    assert!(
        !format!("{p:?}").contains(":pw@"),
        "Debug must not show the password"
    );
}

#[test]
fn a_typo_in_a_postgres_source_is_rejected_with_its_path() {
    let text = good().replace("schedule = \"0 0 * * * *\"", "schedul = \"0 0 * * * *\"");
    let got = problems(&text);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("sources[1].schedul: unknown field, expected one of `name`, `kind`"),
        "{got:?}"
    );
}

#[test]
fn nested_typos_name_the_nested_path() {
    let text = good().replace("[sources.verify]\nschedule", "[sources.verify]\nschedulx");
    let got = problems(&text);
    assert!(
        got[0].starts_with("sources[0].verify.schedulx: unknown field"),
        "{got:?}"
    );
    let text = good().replace("endpoint =", "endpiont =");
    assert!(problems(&text)[0].starts_with("repository.endpiont: unknown field"));
    let text = good().replace("[defaults]", "[defaults]\nretries = 2");
    assert!(problems(&text)[0].starts_with("defaults.retries: unknown field"));
    let text = good().replace("[defaults]", "[defualts]");
    assert!(problems(&text)
        .iter()
        .any(|p| p.starts_with("defualts: unknown section")));
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = good()
        .replace("0 */6 * * *", "0 */6 * *")
        .replace("schedule = \"0 0 * * * *\"", "schedul = \"x\"")
        .replace("timeout = \"2h\"", "timeout = \"two hours\"")
        .replace("level = 3", "level = 42");
    let got = problems(&text);
    assert!(
        got.iter()
            .any(|p| p.starts_with("defaults.schedule: `0 */6 * *` has 4 fields")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|p| p.starts_with("sources[1].schedul: unknown field")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|p| p.starts_with("defaults.timeout: `two hours` is not a duration")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|p| p.starts_with("defaults.compression.level: 42 is outside")),
        "{got:?}"
    );
}

#[test]
fn a_missing_variable_is_an_error_naming_field_and_variable() {
    let text = good().replace("${PGPASSWORD}", "${PG_PASS_TYPO}");
    let got = problems(&text);
    assert_eq!(
        got,
        vec!["sources.url: environment variable `PG_PASS_TYPO` is not set".to_string()]
            .into_iter()
            .map(|s| s.replace("sources.url", "sources[0].url"))
            .collect::<Vec<_>>()
    );
}

#[test]
fn allow_missing_env_validates_and_lists_the_missing() {
    let text = good()
        .replace("${PGPASSWORD}", "${PG_PASS_TYPO}")
        .replace(RECIPIENT, "${AGE_RECIPIENT}");
    let opts = LoadOptions {
        allow_missing_env: true,
    };
    let p = parse(&text, "p.toml", &env, opts).unwrap();
    assert_eq!(p.missing_env, vec!["AGE_RECIPIENT", "PG_PASS_TYPO"]);
}

#[test]
fn bad_values_are_named() {
    let cases = [
        (
            "s3://${BUCKET}/lifeboat",
            "ftp://x",
            "repository.url: `ftp://x` is neither",
        ),
        (
            "s3://${BUCKET}/lifeboat",
            "s3://A_B/x",
            "repository.url: `A_B` is not a valid S3 bucket name",
        ),
        (
            "url = \"s3://${BUCKET}/lifeboat\"",
            "url = \"s3://${BUCKET}/lifeboat\"\ndownload_streams = 0",
            "repository.download_streams: must be between 1 and 16",
        ),
        (
            RECIPIENT,
            "age1nope",
            "encryption.recipients[0]: `age1nope` is not an age X25519 recipient",
        ),
        (
            "name = \"app-db\"",
            "name = \"App DB\"",
            "sources[0].name: `App DB` must be",
        ),
        (
            "name = \"other-db\"",
            "name = \"app-db\"",
            "sources[1].name: `app-db` is used by another source",
        ),
        (
            "kind = \"postgres\"\nurl = \"postgres://backup@",
            "kind = \"mysql\"\nurl = \"postgres://backup@",
            "sources[1].kind: unknown kind `mysql`",
        ),
        (
            "keep_within = \"14d\"",
            "keep_last = 0",
            "sources[1].retention.keep_last: 0 is not allowed",
        ),
        (
            "min = 1 }",
            "}",
            "sources[0].verify.checks[0]: a check needs",
        ),
        (
            "min = 1 }",
            "min = 1, database = \"shop\" }",
            "sources[0].verify.checks[0].database: applies to postgres-physical sources",
        ),
        (
            "min = 1 }",
            "min = 1, database = \" \" }",
            "sources[0].verify.checks[0].database: is empty",
        ),
        (
            "password_file = \"/secrets/pg\"",
            "password_file = \"/secrets/pg\"\nfingerprint = \"everything\"",
            "sources[1].fingerprint: unknown variant `everything`",
        ),
        (
            "endpoint = \"http://127.0.0.1:9000\"",
            "endpoint = \"127.0.0.1:9000\"",
            "repository.endpoint: `127.0.0.1:9000` must start with http",
        ),
        (
            "endpoint = \"http://127.0.0.1:9000\"",
            "endpoint = \"http://127.0.0.1:9000\"\nkms_key_id = \"alias/x\"",
            "repository.kms_key_id: applies with server_side_encryption = \"aws:kms\" only",
        ),
        (
            "endpoint = \"http://127.0.0.1:9000\"",
            "endpoint = \"http://127.0.0.1:9000\"\nserver_side_encryption = \"aws:kms:dsse\"",
            "repository.server_side_encryption: unknown variant `aws:kms:dsse`",
        ),
        (
            "[defaults]",
            "[defaults]\ntimezone = \"Mars/Olympus\"",
            "defaults.timezone: `Mars/Olympus` is not an IANA time zone",
        ),
    ];
    for (from, to, want) in cases {
        let text = good().replacen(from, to, 1);
        let got = problems(&text);
        assert!(
            got.iter().any(|p| p.starts_with(want)),
            "want {want:?} in {got:?}"
        );
    }
}

#[test]
fn file_repository_refuses_s3_only_settings() {
    let text = good().replace("s3://${BUCKET}/lifeboat", "file://./repo");
    let got = problems(&text);
    assert_eq!(got, vec!["repository.endpoint: applies to s3:// repositories only; remove it or use an s3:// url"]);
}

#[test]
fn empty_retention_is_refused() {
    let text = good().replace(
        "retention = { keep_last = 7, keep_daily = 7 }",
        "retention = { keep_last_verified = 2 }",
    );
    assert!(problems(&text)
        .iter()
        .any(|p| p.starts_with("defaults.retention: an empty rule set")));
}

#[test]
fn toml_syntax_errors_say_where() {
    let got = problems("[repository\nurl = 1");
    assert!(
        got[0].contains("not valid TOML") && got[0].contains("line 1"),
        "{got:?}"
    );
}

#[test]
fn the_error_display_lists_every_problem() {
    let e = parse(
        "[repository]\nurl = \"x\"",
        "p.toml",
        &env,
        LoadOptions::default(),
    )
    .unwrap_err();
    insta::assert_snapshot!(e.to_string(), @r"
    p.toml: 3 problems
      encryption: missing: every policy needs [encryption] with recipients; `lifeboat keygen` makes one
      sources: no sources: add at least one [[sources]] table
      repository.url: `x` is neither file://PATH nor s3://BUCKET/PREFIX
    ");
}

#[test]
fn verification_limits_are_read_and_checked() {
    let p = parse(&good(), "p.toml", &env, LoadOptions::default()).unwrap();
    let v = &p.sources[0].verify;
    assert_eq!(v.timeout, std::time::Duration::from_secs(6 * 3600));
    assert_eq!(v.scratch_max_size, None);
    assert!(
        !v.restore_as_superuser,
        "restores run unprivileged unless asked"
    );

    let text = good().replace(
        "[sources.verify]\n",
        "[sources.verify]\ntimeout = \"30m\"\nscratch_max_size = \"20GiB\"\nscratch_keep_free = \"500MiB\"\nrestore_as_superuser = true\n",
    );
    let p = parse(&text, "p.toml", &env, LoadOptions::default()).unwrap();
    let v = &p.sources[0].verify;
    assert_eq!(v.timeout, std::time::Duration::from_secs(1800));
    assert_eq!(v.scratch_max_size, Some(20 << 30));
    assert_eq!(v.scratch_keep_free, Some(500 << 20));
    assert!(v.restore_as_superuser);

    let text = good().replace(
        "[sources.verify]\n",
        "[sources.verify]\ntimeout = \"soon\"\nscratch_max_size = \"1MiB\"\nscratch_keep_free = \"lots\"\n",
    );
    let got = problems(&text);
    assert!(
        got.iter()
            .any(|p| p.starts_with("sources[0].verify.timeout: `soon` is not a duration")),
        "{got:?}"
    );
    assert!(
        got.iter().any(|p| p.starts_with(
            "sources[0].verify.scratch_max_size: `1MiB` is not a size of at least 64MiB"
        )),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|p| p.starts_with("sources[0].verify.scratch_keep_free: `lots` is not a size")),
        "{got:?}"
    );
    let got = problems(&with_redis(
        "url = \"redis://h:6379\"\n[sources.verify]\nrestore_as_superuser = true",
    ));
    assert!(
        got.iter().any(|p| p.starts_with("sources[2].verify: scratch_max_size, scratch_keep_free and restore_as_superuser apply to postgres sources")),
        "{got:?}"
    );
}

fn with_copies(copies: &str) -> String {
    format!("{}\n{copies}", good())
}

#[test]
fn a_copy_is_a_repository_of_its_own_with_its_own_retention() {
    let text = with_copies(
        r#"
[[copies]]
name = "dr-west"
url = "s3://acme-backups-dr/production"
region = "us-west-2"
credentials_profile = "dr-writer"
retention = { keep_daily = 30, keep_monthly = 12 }
copy_interval = "2m"
"#,
    );
    let p = parse(&text, "p.toml", &env, LoadOptions::default()).expect("valid");
    let copy = p.copy("dr-west").expect("the copy");
    assert_eq!(copy.interval, std::time::Duration::from_secs(120));
    let Location::S3(s3) = &copy.repository.location else {
        panic!("an s3 copy: {:?}", copy.repository.location)
    };
    assert_eq!(
        (
            s3.bucket.as_str(),
            s3.region.as_str(),
            s3.credentials_profile.as_deref()
        ),
        ("acme-backups-dr", "us-west-2", Some("dr-writer"))
    );
    let there = p.for_repository("dr-west").expect("the copy's view");
    assert!(matches!(&there.repository.location, Location::S3(c) if c.bucket == "acme-backups-dr"));
    assert!(there.copies.is_empty());
    for s in &there.sources {
        assert_eq!(
            (
                s.retention.keep_daily,
                s.retention.keep_monthly,
                s.retention.keep_last
            ),
            (Some(30), Some(12), None),
            "{}: the copy's rules replace the source's",
            s.name
        );
    }
    let e = p.for_repository("dr-east").expect_err("no such copy");
    assert_eq!(e.kind, crate::ErrorKind::Invalid);
    assert!(
        e.message.contains("`dr-east`") && e.message.contains("dr-west"),
        "{}",
        e.message
    );
}

#[test]
fn copy_mistakes_are_named_with_their_path() {
    let got = problems(&with_copies(
        r#"
[[copies]]
name = "dr west"
url = "s3://${BUCKET}/lifeboat"
endpoint = "http://127.0.0.1:9000"
retention = { keep_daily = 0 }
copy_interval = "soon"
regoin = "us-west-2"

[[copies]]
name = "b"
url = "file://./b"
region = "us-west-2"
"#,
    ));
    for want in [
        "copies[0].regoin: unknown field",
        "copies[1].region: applies to s3:// repositories only",
    ] {
        assert!(
            got.iter().any(|g| g.starts_with(want)),
            "{want} in {got:#?}"
        );
    }
    let got = problems(&with_copies(
        r#"
[[copies]]
name = "dr-1"
url = "s3://${BUCKET}/lifeboat"
endpoint = "http://127.0.0.1:9000"
retention = { keep_daily = 0 }
copy_interval = "soon"

[[copies]]
name = "dr-1"
url = "file://./b"

[[copies]]
name = "dr west"
url = "file://./b"
"#,
    ));
    for want in [
        "copies[0].retention.keep_daily: 0 is not allowed",
        "copies[0].copy_interval:",
        "copies[0].url: is the same place as [repository]",
        "copies[1].name: `dr-1` is used by another copy",
        "copies[2].name: `dr west` is not a copy name",
        "copies[2].url: is the same place as [repository] or another copy",
    ] {
        assert!(
            got.iter().any(|g| g.starts_with(want)),
            "{want} in {got:#?}"
        );
    }
}

#[test]
fn signing_keys_are_parsed_and_mistakes_named() {
    let public = crate::repo::signing::generate().unwrap().1;
    let text = format!(
        "{}\n[signing]\ntrusted = [\"{public}\"]\nkey_file = \"/secrets/signing.key\"\nunsigned_before = \"2026-12-03T00:00:00Z\"\n",
        good()
    );
    let p = parse(&text, "p.toml", &env, LoadOptions::default()).unwrap();
    let s = p.signing.expect("[signing]");
    assert_eq!(s.trusted, vec![public]);
    assert_eq!(
        s.key_file.unwrap(),
        std::path::PathBuf::from("/secrets/signing.key")
    );
    assert_eq!(
        s.unsigned_before.unwrap().to_rfc3339(),
        "2026-12-03T00:00:00+00:00"
    );
    assert!(parse(&good(), "p.toml", &env, LoadOptions::default())
        .unwrap()
        .signing
        .is_none());

    let bad = format!(
        "{}\n[signing]\ntrusted = [\"age1notakey\"]\nunsigned_before = \"yesterday\"\nkey = \"x\"\n",
        good()
    );
    let got = problems(&bad);
    assert!(got.iter().any(|p| p.starts_with("signing.key:")), "{got:?}");
    let bad = format!(
        "{}\n[signing]\ntrusted = [\"age1notakey\"]\nunsigned_before = \"yesterday\"\n",
        good()
    );
    let got = problems(&bad);
    assert!(
        got.iter().any(|p| p.starts_with("signing.trusted[0]:")
            && p.contains("not a minisign public key")
            && p.contains("keygen --signing")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|p| p.starts_with("signing.unsigned_before:")),
        "{got:?}"
    );
    let got = problems(&format!("{}\n[signing]\ntrusted = []\n", good()));
    assert!(
        got.iter().any(|p| p.starts_with("signing.trusted:")),
        "{got:?}"
    );
}
