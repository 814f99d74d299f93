//! `lifeboat restore` against real servers: new, empty and non-empty targets, damaged backups,
//! parallel jobs, roles, and choosing a backup by time.

use std::path::PathBuf;

use lifeboat_tests::*;

struct Fx {
    pg: &'static Postgres,
    db: String,
    dir: tempfile::TempDir,
    key: Key,
    policy: PathBuf,
}

fn setup(prefix: &str, sql: &str) -> Fx {
    let pg = postgres();
    let db = pg.create_db(prefix);
    pg.psql(&db, sql);
    let dir = tempfile::tempdir().unwrap();
    let key = keygen(dir.path());
    let pwfile = pg.password_file(dir.path());
    let src = format!(
        "[[sources]]\nname = \"app-db\"\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\n",
        pg.url(&db),
        pwfile.display()
    );
    let policy = write_policy(dir.path(), "url = \"file://./repo\"", &key.recipient, &src);
    Fx {
        pg,
        db,
        dir,
        key,
        policy,
    }
}

impl Fx {
    fn backup(&self) -> String {
        let p = self.policy.to_str().unwrap();
        let r = lifeboat(self.dir.path(), &["backup", "--policy", p], &[]);
        assert_eq!(r.code, 0, "backup failed: {}", r.stderr);
        let r = lifeboat(self.dir.path(), &["list", "--policy", p, "--json"], &[]);
        let list: Vec<serde_json::Value> = serde_json::from_str(&r.stdout).unwrap();
        list[0]["id"].as_str().unwrap().to_string()
    }

    fn restore(&self, to_db: &str, extra: &[&str]) -> Run {
        let to = self.pg.url(to_db);
        let mut args = vec![
            "restore",
            "--policy",
            self.policy.to_str().unwrap(),
            "--source",
            "app-db",
            "--to",
            &to,
            "--identity",
        ];
        let id = self.key.identity.to_str().unwrap().to_string();
        args.push(&id);
        args.extend_from_slice(extra);
        lifeboat(
            self.dir.path(),
            &args,
            &[("PGPASSWORD".into(), self.pg.password.clone())],
        )
    }

    fn exists(&self, db: &str) -> bool {
        self.pg.psql(
            "postgres",
            &format!("select count(*) from pg_database where datname = '{db}'"),
        ) == "1"
    }
}

const DATA: &str = "create table orders (id serial primary key, total numeric(10,2), note text);
insert into orders (total, note) select g * 1.5, md5(g::text) from generate_series(1, 3000) g;
select lo_from_bytea(0, 'attachment');";

#[test]
fn restore_into_a_new_database_creates_it_and_matches_the_source() {
    let fx = setup("rnew", DATA);
    fx.backup();
    for jobs in ["1", "2"] {
        let target = format!("{}_restored_j{jobs}", fx.db);
        let r = fx.restore(&target, &["--jobs", jobs]);
        assert_eq!(r.code, 0, "jobs {jobs}: {}", r.stderr);
        assert!(
            r.stderr
                .contains(&format!("create database {target}, then restore into it")),
            "{}",
            r.stderr
        );
        assert!(
            r.stderr.contains("never verified"),
            "the plan shows the verification status: {}",
            r.stderr
        );
        assert!(!r.stderr.contains(&fx.pg.password), "{}", r.stderr);
        assert_eq!(fx.pg.digest(&fx.db), fx.pg.digest(&target), "jobs {jobs}");
    }
    // --json says how long each step took, as the verifier does: the index build is what
    // pg_restore did after reading its input, so only a streamed restore has one.
    for jobs in ["1", "2"] {
        let target = format!("{}_timed_j{jobs}", fx.db);
        let r = fx.restore(&target, &["--jobs", jobs, "--json"]);
        assert_eq!(r.code, 0, "jobs {jobs}: {}", r.stderr);
        let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let result = &out["result"];
        let t = |k: &str| {
            result[k]
                .as_f64()
                .unwrap_or_else(|| panic!("no {k}: {out:#}"))
        };
        assert!(
            t("download_seconds") > 0.0 && t("restore_seconds") > 0.0,
            "{result}"
        );
        assert_eq!(t("index_build_seconds") > 0.0, jobs == "1", "{result}");
        let steps = t("download_seconds") + t("restore_seconds") + t("index_build_seconds");
        assert!(steps <= t("seconds"), "{result}");
        assert_eq!(fx.pg.digest(&fx.db), fx.pg.digest(&target), "jobs {jobs}");
    }
}

/// Tables of every shape pg_dump writes data for, two of them large enough (over 4 MiB) to start
/// frames of their own, and no large objects.
const MANY_TABLES: &str = r#"
create table big_a (g int primary key, t text);
insert into big_a select g, md5(g::text) || md5((g * 7)::text) from generate_series(1, 100000) g;
create index on big_a (t);
create table big_b (id int primary key, a int references big_a (g), t text);
insert into big_b select g, g, md5((g * 3)::text) || md5(g::text) from generate_series(1, 100000) g;
create schema "Ünï";
create table "Ünï"."Tâble ✓" ("wéird col" text);
insert into "Ünï"."Tâble ✓" values (E'tab\there'), (E'new\nline'), (E'back\\slash'), (null), ('');
create table gen (a int, b int generated always as (a * 2) stored);
insert into gen (a) select generate_series(1, 10);
create table no_columns ();
insert into no_columns default values;
insert into no_columns default values;
create table empty_table (x int);
create table measurements (at date not null, v int) partition by range (at);
create table measurements_2025 partition of measurements for values from ('2025-01-01') to ('2026-01-01');
create table measurements_2026 partition of measurements for values from ('2026-01-01') to ('2027-01-01');
insert into measurements values ('2025-06-01', 1), ('2026-06-01', 2);
create table secured (owner text, v int);
alter table secured enable row level security;
create policy mine on secured using (owner = current_user);
insert into secured values ('someone', 1);
create sequence standalone_seq;
select setval('standalone_seq', 101);
create materialized view big_a_count as select count(*) from big_a;
create function touch() returns trigger language plpgsql as $$ begin return new; end $$;
create trigger touched before insert on big_b for each row execute function touch();
"#;

#[test]
fn restore_with_jobs_loads_tables_at_once_from_the_stored_object() {
    let fx = setup("rpar", MANY_TABLES);
    fx.backup();
    let target = format!("{}_par", fx.db);
    let r = fx.restore(&target, &["--jobs", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Nine tables with data (partitions by leaf), on two connections, with no plaintext spool.
    assert!(
        r.stderr
            .contains("loading 9 table(s) on 2 connection(s) at once"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("decrypting to a spool file"),
        "{}",
        r.stderr
    );
    assert_eq!(fx.pg.digest(&fx.db), fx.pg.digest(&target));
    let constraints = |db: &str| {
        fx.pg.psql(
            db,
            "select string_agg(conname || ':' || contype::text, ',' order by conname) from pg_constraint \
             where connamespace not in (select oid from pg_namespace where nspname in ('pg_catalog', 'information_schema'))",
        )
    };
    assert_eq!(constraints(&fx.db), constraints(&target));
    assert!(constraints(&target).contains("big_b_a_fkey:f"));
    // Each table went in frozen (TRUNCATE and COPY … FREEZE in one transaction), odd names too:
    // every row on a page is marked frozen (HEAP_XMIN_FROZEN), where a plain COPY leaves none.
    fx.pg.psql(&target, "create extension pageinspect");
    for table in [
        "big_a",
        r#""Ünï"."Tâble ✓""#,
        "measurements_2026",
        "no_columns",
    ] {
        let counts = fx.pg.psql(
            &target,
            &format!(
                "select count(*) filter (where t_infomask & 768 = 768) || '/' || count(*) \
                 from heap_page_items(get_raw_page('{}', 0))",
                table.replace('\'', "''")
            ),
        );
        let (frozen, rows) = counts.trim().split_once('/').unwrap();
        assert!(rows != "0" && frozen == rows, "{table}: {counts}");
    }
    fx.pg.psql(&target, "drop extension pageinspect");
    // The schema, the data and the indexes are timed apart, as a streamed restore's are.
    let timed = format!("{}_par_json", fx.db);
    let r = fx.restore(&timed, &["--jobs", "2", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(fx.pg.digest(&fx.db), fx.pg.digest(&timed));
    let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let result = &out["result"];
    let t = |k: &str| result[k].as_f64().unwrap();
    assert!(
        t("restore_seconds") > 0.0 && t("index_build_seconds") > 0.0,
        "{result}"
    );
    // The same into a database that already has the schema's tables fails in pg_restore's
    // pre-data section, before any data: nothing half-loaded.
    let r = fx.restore(&target, &["--jobs", "2", "--yes"]);
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("pg_restore"), "{}", r.stderr);
    assert_eq!(fx.pg.digest(&fx.db), fx.pg.digest(&target));
}

#[test]
fn dry_run_prints_the_plan_and_changes_nothing() {
    let fx = setup("rdry", DATA);
    let id = fx.backup();
    let target = format!("{}_dry", fx.db);
    let r = fx.restore(&target, &["--dry-run", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plan: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(plan["backup"]["id"], id.as_str());
    assert_eq!(plan["target"]["exists"], false);
    assert!(plan["target"]["url"]
        .as_str()
        .unwrap()
        .ends_with(&format!("/{target}")));
    assert!(!fx.exists(&target), "dry run created nothing");

    // A point in time is a physical source's: a logical one says so (exit 2), whichever backup.
    for args in [vec!["--latest"], vec!["--time", "2026-12-02 03:00:00"]] {
        let r = fx.restore(&target, &args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.contains("recover a physical PostgreSQL source"),
            "{args:?}: {}",
            r.stderr
        );
    }
    assert!(!fx.exists(&target));

    // The help speaks of every kind, not of PostgreSQL databases only.
    let r = lifeboat(fx.dir.path(), &["restore", "--help"], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for kind in ["PostgreSQL server", "point in time", "Redis", "objects"] {
        assert!(r.stdout.contains(kind), "{kind}: {}", r.stdout);
    }
}

#[test]
fn an_empty_target_is_restored_into_and_one_with_data_is_refused() {
    let fx = setup("rtargets", DATA);
    fx.backup();
    let empty = fx.pg.create_db("rempty");
    let r = fx.restore(&empty, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!(
            "restore into the existing, empty database {empty}"
        )),
        "{}",
        r.stderr
    );
    assert_eq!(fx.pg.digest(&fx.db), fx.pg.digest(&empty));

    let busy = fx.pg.create_db("rbusy");
    fx.pg.psql(
        &busy,
        "create table precious (id int); insert into precious values (42)",
    );
    let r = fx.restore(&busy, &[]);
    assert_eq!(r.code, 14, "{}", r.stderr);
    assert!(
        r.stderr.contains("already holds data; refusing"),
        "{}",
        r.stderr
    );
    assert_eq!(
        fx.pg.psql(
            &busy,
            "select count(*) from pg_tables where schemaname = 'public'"
        ),
        "1",
        "untouched"
    );

    let r = fx.restore(&busy, &["--yes"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        fx.pg.psql(&busy, "select id from precious"),
        "42",
        "nothing is dropped"
    );
    assert_eq!(fx.pg.psql(&busy, "select count(*) from orders"), "3000");
}

#[test]
fn a_damaged_backup_exits_13_and_leaves_the_target_untouched() {
    let fx = setup("rdamage", DATA);
    let id = fx.backup();
    let object = fx
        .dir
        .path()
        .join("repo/backups/app-db")
        .join(&id)
        .join("database.dump.zst.age");
    let mut bytes = std::fs::read(&object).unwrap();
    let i = bytes.len() - 10;
    bytes[i] ^= 0xff;
    std::fs::write(&object, &bytes).unwrap();
    let target = format!("{}_never", fx.db);
    let r = fx.restore(&target, &[]);
    assert_eq!(r.code, 13, "{}", r.stderr);
    assert!(r.stderr.contains("nothing was applied"), "{}", r.stderr);
    assert!(!fx.exists(&target), "the target was not even created");
}

#[test]
fn roles_only_with_globals_and_backups_chosen_by_time() {
    let role = format!("lbrole_{}", suffix());
    let fx = setup(
        "rglobals",
        &format!(
            "create role {role} nologin; {DATA}; grant select on orders to {role}; \
             grant set on parameter work_mem to {role}"
        ),
    );
    let first = fx.backup();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let cut = chrono_like_now();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    fx.pg.psql(
        &fx.db,
        "insert into orders (total, note) values (1, 'later')",
    );
    let _second = fx.backup();
    // The role is lost on the server: only the backup's globals still know it.
    fx.pg.psql(&fx.db, &format!("drop owned by {role} cascade"));
    fx.pg.psql("postgres", &format!("drop role {role}"));

    // Without --with-globals the grant to the missing role fails the restore, and says so.
    let t1 = format!("{}_noroles", fx.db);
    let r = fx.restore(&t1, &["--before", &cut]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("role \"{role}\" does not exist")),
        "{}",
        r.stderr
    );

    let t2 = format!("{}_roles", fx.db);
    let r = fx.restore(&t2, &["--before", &cut, "--with-globals"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(&first),
        "the backup before the cut was chosen: {}",
        r.stderr
    );
    assert_eq!(fx.pg.psql(&t2, "select count(*) from orders"), "3000");
    assert_eq!(
        fx.pg.psql(
            "postgres",
            &format!("select count(*) from pg_roles where rolname = '{role}'")
        ),
        "1"
    );
    // Privileges on server parameters are globals too.
    assert_eq!(
        fx.pg.psql(
            "postgres",
            &format!("select has_parameter_privilege('{role}', 'work_mem', 'SET')")
        ),
        "t"
    );
}

fn chrono_like_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
