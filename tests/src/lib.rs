//! The test harness: real servers on random ports, each in its own temp dir, torn down with the
//! test process.
//!
//! PostgreSQL (initdb + postgres, as the `postgres` OS user when run as root) and moto's S3 server
//! start once per test binary. Each runs under a small `sh` guard whose stdin is a pipe from this
//! process: when the test process exits, for any reason, the pipe closes and the guard stops the
//! server and removes its directory. A missing component fails loudly with what to install.

pub mod s3proxy;

use std::io::{Read, Write};

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
pub use tokio_util::sync::CancellationToken;

/// A current-thread runtime for a test's own async calls (S3 inspection and the like).
pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Every file below `dir` (not directories), recursively; empty if `dir` does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A free TCP port on loopback, below the kernel's ephemeral range.
///
/// A port from `bind(0)` is one the kernel hands out again: to the next `bind(0)` of any test
/// in the suite and to every outgoing connection's local end. A server started on it moments later
/// could find it taken and exit, while whatever took it answered the harness's readiness probe. A
/// random port below the ephemeral range is only ever taken by another such pick, and a pick is
/// never handed out twice in one test binary (tests run in parallel, and a picked port stays
/// unbound until its server starts).
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10000u16, ephemeral_low.max(10001));
    let mut rng = rand::rng();
    for _ in 0..200 {
        let port = rng.random_range(low..high);
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && HANDED_OUT
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(port)
        {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {low}..{high}")
}

/// A random lowercase suffix.
pub fn suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs `cmd` under a guard that stops it and removes `dir` when this process exits.
fn guarded(dir: &Path, cmd: &[String], log: &Path) -> Child {
    let script = r#"dir=$1; log=$2; shift 2; "$@" >"$log" 2>&1 & pid=$!; read _; kill -INT $pid 2>/dev/null; wait $pid; rm -rf "$dir""#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("guard")
        .arg(dir)
        .arg(log)
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        .spawn()
        .expect("cannot start the server guard (sh)")
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    panic!("{what} did not start listening on port {port} within 60s; its log:\n{log}");
}

/// A throwaway PostgreSQL cluster.
pub struct Postgres {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// The superuser's password (TCP connections need it: scram-sha-256).
    pub password: String,
    /// Server binaries.
    pub bin: PathBuf,
    /// The cluster's directory (socket, data, log).
    pub dir: PathBuf,
    /// PEM of the CA that signed the server's TLS certificate (for 127.0.0.1).
    pub ca_file: PathBuf,
    _guard: Child,
}

/// A throwaway CA (`ca.crt`) and a server certificate for 127.0.0.1 and localhost signed by it
/// (`server.crt`, `server.key`), in `dir`.
pub fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=lifeboat test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("ext.cnf");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    run(&["rsa", "-in", "server.key", "-out", "server.key"]);
    Command::new("chmod")
        .args(["600"])
        .arg(dir.join("server.key"))
        .status()
        .expect("chmod");
}

static POSTGRES: OnceLock<Postgres> = OnceLock::new();

/// The PostgreSQL binaries directory: `LIFEBOAT_PG_BIN`, else `pg_config --bindir`.
pub fn pg_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LIFEBOAT_PG_BIN") {
        return PathBuf::from(p);
    }
    let out = Command::new("pg_config").arg("--bindir").output().expect(
        "pg_config not found: install postgresql (scripts/test.sh does) or set LIFEBOAT_PG_BIN",
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The cluster shared by this test binary, started on first use.
pub fn postgres() -> &'static Postgres {
    POSTGRES.get_or_init(start_postgres)
}

fn start_postgres() -> Postgres {
    start_cluster(Vec::new())
}

/// A throwaway cluster of its own (not the shared one), with `extra` server settings
/// (`wal_level=minimal`, …), torn down when this process exits.
pub fn start_cluster(extra: Vec<String>) -> Postgres {
    let bin = pg_bin();
    assert!(
        bin.join("initdb").exists(),
        "no initdb in {}: install the PostgreSQL server (scripts/test.sh does)",
        bin.display()
    );
    let dir = PathBuf::from(format!("/tmp/lbpg-{}", suffix()));
    std::fs::create_dir(&dir).expect("cannot create the cluster dir");
    let password = format!("pw-{}", suffix());
    std::fs::write(dir.join("pwfile"), format!("{password}\n")).expect("pwfile");
    let root = is_root();
    give_to_postgres(root, &dir);
    let data = dir.join("data");
    let initdb = as_pg(
        root,
        vec![
            bin.join("initdb").display().to_string(),
            "-D".into(),
            data.display().to_string(),
            "-U".into(),
            "postgres".into(),
            "--auth-local=trust".into(),
            "--auth-host=scram-sha-256".into(),
            format!("--pwfile={}", dir.join("pwfile").display()),
            "-E".into(),
            "UTF8".into(),
            "--locale=C.UTF-8".into(),
            "--no-sync".into(),
        ],
    );
    run_checked(&initdb, &[]);
    // TLS: a throwaway CA, and a role that may only connect over TLS.
    let tls = dir.join("tls");
    std::fs::create_dir(&tls).expect("tls dir");
    make_certs(&tls);
    let hba = data.join("pg_hba.conf");
    let original = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    std::fs::write(
        &hba,
        format!("hostnossl all tlsuser 127.0.0.1/32 reject\nhostssl all tlsuser 127.0.0.1/32 scram-sha-256\n{original}"),
    )
    .expect("write pg_hba.conf");
    let ca_file = tls.join("ca.crt");
    let pg = serve(
        dir,
        &data,
        bin,
        password,
        ca_file,
        [
            "ssl=on".into(),
            format!("ssl_cert_file={}", tls.join("server.crt").display()),
            format!("ssl_key_file={}", tls.join("server.key").display()),
        ]
        .into_iter()
        .chain(extra)
        .collect(),
    );
    pg.psql(
        "postgres",
        &format!(
            "create role tlsuser login superuser password '{}'",
            pg.password
        ),
    );
    pg
}

/// Starts a server on `data` (a cluster's directory inside `dir`, which goes when this process
/// exits), listening on 127.0.0.1 at a random port, with `extra` settings; waits until it
/// accepts queries as `postgres` with `password`.
fn serve(
    dir: PathBuf,
    data: &Path,
    bin: PathBuf,
    password: String,
    ca_file: PathBuf,
    extra: Vec<String>,
) -> Postgres {
    try_serve(dir, data, bin, password, ca_file, extra).unwrap_or_else(|e| panic!("{e}"))
}

/// Starts a server and waits until it accepts queries; `Err` with its log when it never does
/// or shuts down first (a failed recovery).
fn try_serve(
    dir: PathBuf,
    data: &Path,
    bin: PathBuf,
    password: String,
    ca_file: PathBuf,
    extra: Vec<String>,
) -> Result<Postgres, String> {
    let root = is_root();
    give_to_postgres(root, &dir);
    let port = free_port();
    let mut args = vec![
        bin.join("postgres").display().to_string(),
        "-D".into(),
        data.display().to_string(),
        "-p".into(),
        port.to_string(),
        "-k".into(),
        dir.display().to_string(),
        "-c".into(),
        "listen_addresses=127.0.0.1".into(),
        "-c".into(),
        "fsync=off".into(),
        "-c".into(),
        "max_connections=50".into(),
    ];
    for e in extra {
        args.push("-c".into());
        args.push(e);
    }
    let server = as_pg(root, args);
    let log = dir.join("log");
    let guard = guarded(&dir, &server, &log);
    wait_for_port(port, "postgres", &log);
    let pg = Postgres {
        port,
        password,
        bin,
        ca_file,
        dir,
        _guard: guard,
    };
    // Accepting TCP is not yet accepting queries.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = pg.psql_raw("postgres", "select 1");
        if out.status.success() {
            return Ok(pg);
        }
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if Instant::now() > deadline || logged.contains("database system is shut down") {
            return Err(format!(
                "postgres never accepted queries: {}\nits log:\n{logged}",
                String::from_utf8_lossy(&out.stderr),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `args` (a command and its arguments, as [`as_pg`] makes them) in `/` with `env`, and
/// fails the test with its stderr unless it succeeds.
fn run_checked(args: &[String], env: &[(&str, &str)]) {
    let out = Command::new(&args[0])
        .args(&args[1..])
        .envs(env.iter().copied())
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `dir` the OS user `postgres`'s when this process is root (the server runs as it).
fn give_to_postgres(root: bool, dir: &Path) {
    if !root {
        return;
    }
    let ok = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "chown of {} to postgres failed", dir.display());
}

/// `args`, run as the OS user `postgres` when this process is root (the server refuses root).
fn as_pg(root: bool, args: Vec<String>) -> Vec<String> {
    if !root {
        return args;
    }
    let mut v: Vec<String> = [
        "setpriv",
        "--reuid=postgres",
        "--regid=postgres",
        "--init-groups",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(args);
    v
}

impl Postgres {
    /// Starts a server on a restored copy of this cluster (`dir/data`, as `lifeboat restore` of a
    /// base backup wrote it); the copy keeps this cluster's roles and password. `dir` goes when
    /// this process exits.
    pub fn start_restored(&self, dir: &Path) -> Postgres {
        self.try_start_restored(dir)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Postgres::start_restored`], or the server's log when it never accepts queries (its
    /// recovery failed).
    pub fn try_start_restored(&self, dir: &Path) -> Result<Postgres, String> {
        try_serve(
            dir.to_path_buf(),
            &dir.join("data"),
            self.bin.clone(),
            self.password.clone(),
            self.ca_file.clone(),
            Vec::new(),
        )
    }

    /// `psql` on a server this cluster's binaries run on `port` of 127.0.0.1 (one `lifeboat
    /// restore --start` started), as this cluster's superuser.
    pub fn psql_on(&self, port: u16, db: &str, sql: &str) -> std::process::Output {
        Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(port.to_string())
            .arg("-d")
            .arg(db)
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &self.password)
            .output()
            .expect("cannot run psql")
    }

    /// Stops a server running on `data` that this harness did not start (`pg_ctl stop`, as the
    /// OS user `postgres` when this process is root).
    pub fn pg_ctl_stop(&self, data: &Path) {
        let args = as_pg(
            is_root(),
            vec![
                self.bin.join("pg_ctl").display().to_string(),
                "-D".into(),
                data.display().to_string(),
                "-m".into(),
                "fast".into(),
                "-w".into(),
                "stop".into(),
            ],
        );
        run_checked(&args, &[]);
    }

    /// A hot standby of this cluster, streaming from it (`pg_basebackup -R`), on a port and in a
    /// directory of its own that go when this process exits. It keeps this cluster's roles and
    /// password; `select pg_promote()` on it starts a new timeline.
    pub fn start_standby(&self) -> Postgres {
        let dir = PathBuf::from(format!("/tmp/lbpg-{}", suffix()));
        std::fs::create_dir(&dir).expect("cannot create the standby dir");
        let root = is_root();
        give_to_postgres(root, &dir);
        let args = as_pg(
            root,
            vec![
                self.bin.join("pg_basebackup").display().to_string(),
                "-D".into(),
                dir.join("data").display().to_string(),
                "-R".into(),
                "-X".into(),
                "stream".into(),
                "--checkpoint=fast".into(),
                "-h".into(),
                "127.0.0.1".into(),
                "-p".into(),
                self.port.to_string(),
                "-U".into(),
                "postgres".into(),
            ],
        );
        run_checked(&args, &[("PGPASSWORD", &self.password)]);
        serve(
            dir.clone(),
            &dir.join("data"),
            self.bin.clone(),
            self.password.clone(),
            self.ca_file.clone(),
            vec!["hot_standby=on".into()],
        )
    }

    /// A URL without the password (give it through `password_file` or PGPASSWORD).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// `psql` as the superuser, its output whatever it is (the caller judges it).
    pub fn psql_raw(&self, db: &str, sql: &str) -> std::process::Output {
        self.psql_on(self.port, db, sql)
    }

    /// Runs SQL and returns psql's unaligned output; panics on error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = self.psql_raw(db, sql);
        assert!(
            out.status.success(),
            "psql failed on {db}: {}\nSQL: {sql}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Creates a database with a unique name and returns the name.
    pub fn create_db(&self, prefix: &str) -> String {
        let name = format!("{prefix}_{}", suffix());
        self.psql("postgres", &format!("create database {name}"));
        name
    }

    /// Everything a restore must reproduce: per table row count + content digest, sequences, large
    /// objects and schema object counts.
    pub fn digest(&self, db: &str) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        let tables = self.psql(
            db,
            "select format('%I.%I', n.nspname, c.relname) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind in ('r', 'm') and n.nspname not in ('pg_catalog', 'information_schema') \
             and n.nspname not like 'pg_toast%' order by 1",
        );
        for t in tables.lines() {
            let v = self.psql(
                db,
                &format!(
                    "select count(*) || ' ' || coalesce(md5(string_agg(md5(x::text), '' order by md5(x::text))), '-') from {t} x"
                ),
            );
            out.insert(format!("table {t}"), v);
        }
        out.insert(
            "sequences".into(),
            self.psql(db, "select string_agg(schemaname || '.' || sequencename || '=' || coalesce(last_value::text, 'null'), ',' order by schemaname, sequencename) from pg_sequences"),
        );
        out.insert(
            "large objects".into(),
            self.psql(db, "select string_agg(oid::text || ':' || md5(lo_get(oid)), ',' order by oid) from pg_largeobject_metadata"),
        );
        out.insert(
            "objects".into(),
            self.psql(
                db,
                "select (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname not in ('pg_catalog','information_schema') and n.nspname not like 'pg_toast%') || ' ' || \
                 (select count(*) from pg_trigger where not tgisinternal) || ' ' || (select count(*) from pg_policy) || ' ' || \
                 (select string_agg(extname, ',' order by extname) from pg_extension) || ' ' || \
                 (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace where n.nspname not in ('pg_catalog','information_schema'))",
            ),
        );
        out
    }

    /// Writes the password to a file (for `password_file`) and returns its path.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let p = dir.join("pgpassword");
        std::fs::write(&p, format!("{}\n", self.password)).expect("write password file");
        p
    }
}

/// moto's S3 server.
pub struct S3 {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    _guard: Child,
}

static S3_SERVER: OnceLock<S3> = OnceLock::new();

/// The moto server shared by this test binary, started on first use.
pub fn s3() -> &'static S3 {
    S3_SERVER.get_or_init(start_s3)
}

impl S3 {
    /// A moto server of the test's own, which it may stop (a region going away).
    pub fn start() -> S3 {
        start_s3()
    }

    /// Stops the server; what it stored is gone with it.
    pub fn stop(mut self) {
        drop(self._guard.stdin.take());
        let _ = self._guard.wait();
    }
}

fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn start_s3() -> S3 {
    let bin = std::env::var("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_dir().join("target/moto-venv/bin/moto_server"));
    assert!(
        bin.exists(),
        "moto_server not found at {}: run scripts/test.sh, which installs it, or set MOTO_SERVER",
        bin.display()
    );
    let dir = PathBuf::from(format!("/tmp/lbs3-{}", suffix()));
    std::fs::create_dir(&dir).expect("cannot create the S3 dir");
    let port = free_port();
    let log = dir.join("log");
    let cmd = vec![
        bin.display().to_string(),
        "-H".into(),
        "127.0.0.1".into(),
        "-p".into(),
        port.to_string(),
    ];
    let guard = guarded(&dir, &cmd, &log);
    wait_for_port(port, "moto_server", &log);
    // Wait until it answers HTTP.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answered = TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
                let mut buf = [0u8; 12];
                s.read_exact(&mut buf)?;
                Ok(buf.starts_with(b"HTTP/"))
            })
            .unwrap_or(false);
        if answered {
            break;
        }
        assert!(Instant::now() < deadline, "moto_server never answered HTTP");
        std::thread::sleep(Duration::from_millis(100));
    }
    let s3 = S3 {
        endpoint: format!("http://127.0.0.1:{port}"),
        _guard: guard,
    };
    // For this process's own inspecting client (the default credential chain reads them). Set once,
    // inside the one-time initialisation, before any client exists.
    for (k, v) in s3.env() {
        std::env::set_var(k, v);
    }
    s3
}

impl S3 {
    /// Environment for a lifeboat process talking to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// An S3 client for inspecting what lifeboat wrote.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        lifeboat::store::s3::client(&lifeboat::policy::S3Config {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: Some(self.endpoint.clone()),
            credentials_profile: None,
            region: "us-east-1".into(),
            force_path_style: true,
            checksums: lifeboat::policy::ChecksumMode::WhenRequired,
            storage_class: None,
            object_lock: None,
            server_side_encryption: None,
        })
        .await
    }

    /// Creates a bucket with a unique name and Object Lock enabled.
    pub async fn create_locked_bucket(&self) -> String {
        let name = format!("lblock-{}", suffix());
        self.client()
            .await
            .create_bucket()
            .bucket(&name)
            .object_lock_enabled_for_bucket(true)
            .send()
            .await
            .expect("bucket with object lock");
        name
    }

    /// Creates a bucket with a unique name.
    pub async fn create_bucket(&self) -> String {
        let name = format!("lb-{}", suffix());
        self.client()
            .await
            .create_bucket()
            .bucket(&name)
            .send()
            .await
            .expect("create bucket");
        name
    }

    /// Keys under `prefix` in `bucket`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let out = self
            .client()
            .await
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .expect("list objects");
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    }

    /// The body of `bucket`/`key`.
    pub async fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.client()
            .await
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .expect("get object")
            .body
            .collect()
            .await
            .expect("read object body")
            .to_vec()
    }

    /// Writes `body` as `bucket`/`key`.
    pub async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.client()
            .await
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .expect("put object");
    }

    /// Removes `bucket`/`key`.
    pub async fn delete(&self, bucket: &str, key: &str) {
        self.client()
            .await
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .expect("delete object");
    }

    /// Unfinished multipart uploads in `bucket`.
    pub async fn pending_uploads(&self, bucket: &str) -> Vec<String> {
        let out = self
            .client()
            .await
            .list_multipart_uploads()
            .bucket(bucket)
            .send()
            .await
            .expect("list multipart uploads");
        out.uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_string))
            .collect()
    }
}

/// The `lifeboat` binary beside this test executable (built by `cargo build --workspace --bins`).
pub fn lifeboat_bin() -> PathBuf {
    if let Ok(p) = std::env::var("LIFEBOAT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> → target/debug/lifeboat
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("lifeboat"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        bin.display()
    );
    static THROUGH: OnceLock<()> = OnceLock::new();
    THROUGH.get_or_init(|| let_others_through(&bin));
    bin
}

/// Servers run as the OS user `postgres` when the tests run as root, and a restored cluster's
/// `restore_command` runs this binary: every directory above it must let others through, as
/// /usr/local/bin does, even in a checkout under a private directory (`mktemp -d` makes 0700).
fn let_others_through(bin: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        return;
    }
    for dir in bin.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(dir) else {
            continue;
        };
        let mode = m.permissions().mode();
        if mode & 0o001 == 0 {
            let through = std::fs::Permissions::from_mode(mode | 0o001);
            let _ = std::fs::set_permissions(dir, through);
        }
    }
}

/// The `lifeboat-verifier` binary beside `lifeboat`.
pub fn verifier_bin() -> PathBuf {
    lifeboat_bin().with_file_name("lifeboat-verifier")
}

/// Runs lifeboat-verifier with `args` and extra environment, in `cwd`.
pub fn verifier(cwd: &Path, args: &[&str], env: &[(String, String)]) -> Run {
    run_bin(&verifier_bin(), cwd, args, env)
}

/// What a lifeboat run printed and how it exited.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Peak resident memory of the process, in KiB (its `VmHWM`, read every few milliseconds
    /// while it ran).
    pub peak_rss_kib: u64,
}

/// Runs lifeboat with `args` and extra environment, in `cwd`.
pub fn lifeboat(cwd: &Path, args: &[&str], env: &[(String, String)]) -> Run {
    run_bin(&lifeboat_bin(), cwd, args, env)
}

fn run_bin(bin: &Path, cwd: &Path, args: &[&str], env: &[(String, String)]) -> Run {
    let child = Command::new(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NO_COLOR", "1")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run lifeboat");
    let peak = watch_peak_rss(child.id());
    let out = child.wait_with_output().expect("cannot run lifeboat");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        peak_rss_kib: peak.join().unwrap_or(0),
    }
}

/// Reads process `pid`'s high-water mark of resident memory (KiB) every 5 ms until it exits;
/// the thread returns the last value read.
fn watch_peak_rss(pid: u32) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut peak = 0;
        loop {
            let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                });
            match hwm {
                Some(kib) => peak = kib,
                None => return peak, // exited (a zombie has no memory left to report)
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// An age key made with `lifeboat keygen`.
pub struct Key {
    /// The identity file.
    pub identity: PathBuf,
    /// Its recipient (`age1…`).
    pub recipient: String,
}

/// Makes a key in `dir` with `lifeboat keygen`, checking what it prints where.
pub fn keygen(dir: &Path) -> Key {
    let r = lifeboat(dir, &["keygen"], &[]);
    assert_eq!(r.code, 0, "keygen failed: {}", r.stderr);
    let recipient = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .expect("keygen prints the recipient on stderr")
        .trim()
        .to_string();
    assert!(r.stdout.contains("AGE-SECRET-KEY-1"), "identity on stdout");
    assert!(
        !r.stderr.contains("AGE-SECRET-KEY"),
        "the identity never goes to stderr"
    );
    let identity = dir.join("key.txt");
    std::fs::write(&identity, &r.stdout).expect("write key");
    Key {
        identity,
        recipient,
    }
}

/// A copy of `policy` whose agent listens on `port` (`[agent] listen`), written beside it.
pub fn listening(policy: &Path, port: u16) -> PathBuf {
    let text = std::fs::read_to_string(policy).expect("read the policy");
    let out = policy.with_file_name(format!("listening-{}.toml", suffix()));
    std::fs::write(
        &out,
        format!("[agent]\nlisten = \"127.0.0.1:{port}\"\n\n{text}"),
    )
    .expect("write the policy");
    out
}

/// A signing key made with `lifeboat keygen --signing`.
pub struct SigningKey {
    /// The secret key file.
    pub file: PathBuf,
    /// Its public key (`RW…`).
    pub public: String,
    /// The secret key's own line, to look for where it must never appear.
    pub secret_line: String,
}

impl SigningKey {
    /// `[signing]` lines: this key signs, and `trusted` (public keys) are trusted.
    pub fn signs(&self, trusted: &[&str]) -> String {
        let list: Vec<String> = trusted.iter().map(|k| format!("\"{k}\"")).collect();
        format!(
            "key_file = \"{}\"\ntrusted = [{}]",
            self.file.display(),
            list.join(", ")
        )
    }
}

/// Makes a signing key in `dir` (file `name`) with `lifeboat keygen --signing`.
pub fn signing_keygen(dir: &Path, name: &str) -> SigningKey {
    let r = lifeboat(dir, &["keygen", "--signing"], &[]);
    assert_eq!(r.code, 0, "keygen --signing failed: {}", r.stderr);
    let public = r
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("Public key: "))
        .expect("keygen --signing prints the public key on stderr")
        .trim()
        .to_string();
    let secret_line = r
        .stdout
        .lines()
        .nth(1)
        .expect("a minisign secret key")
        .to_string();
    assert!(r.stdout.starts_with("untrusted comment: ") && r.stdout.contains(&public));
    assert!(
        !r.stderr.contains(&secret_line),
        "the secret never goes to stderr"
    );
    let file = dir.join(name);
    std::fs::write(&file, &r.stdout).expect("write the signing key");
    SigningKey {
        file,
        public,
        secret_line,
    }
}

/// Writes a policy file with one Postgres source and returns its path.
pub fn write_policy(dir: &Path, repository: &str, recipient: &str, sources: &str) -> PathBuf {
    let text = format!(
        "[repository]\n{repository}\n\n[encryption]\nrecipients = [\"{recipient}\"]\n\n[defaults]\nretention = {{ keep_last = 3 }}\ncompression = {{ level = 3, workers = 0 }}\n\n{sources}\n"
    );
    let p = dir.join(format!("policy-{}.toml", suffix()));
    std::fs::write(&p, text).expect("write policy");
    p
}

/// A throwaway redis-server, one per test (it starts in ~15 ms), stopped and removed on drop.
pub struct Redis {
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Its data directory (`dir`; `dump.rdb` is written here).
    pub dir: PathBuf,
    guard: Child,
}

/// The redis-server binary, or a loud failure saying what to install.
pub fn redis_bin(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "{tool} not found: install redis-server and redis-tools (scripts/install-deps.sh does)"
        )
    })
}

impl Redis {
    /// Starts a server with test-friendly settings (no sync delay, DEBUG enabled) plus `extra`
    /// configuration arguments (e.g. `["--requirepass", "pw"]`).
    pub fn start(extra: &[&str]) -> Redis {
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("lb-redis-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let log = dir.join("log");
        let mut cmd: Vec<String> = [
            redis_bin("redis-server").display().to_string(),
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--repl-diskless-sync-delay".into(),
            "0".into(),
            "--enable-debug-command".into(),
            "yes".into(),
        ]
        .into();
        cmd.extend(extra.iter().map(|s| s.to_string()));
        let guard = guarded(&dir, &cmd, &log);
        wait_for_port(port, "redis-server", &log);
        Redis { port, dir, guard }
    }

    /// Starts a Sentinel (`redis-server --sentinel`) monitoring the primary on `primary_port` as
    /// `name`, with quorum 1 and short timeouts, so that `SENTINEL FAILOVER` completes in seconds.
    pub fn sentinel(primary_port: u16, name: &str) -> Redis {
        let port = free_port();
        let dir = tempfile::Builder::new()
            .prefix("lb-sentinel-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {primary_port} 1\nsentinel down-after-milliseconds {name} 2000\nsentinel failover-timeout {name} 10000\n",
                dir.display()
            ),
        )
        .expect("write sentinel.conf");
        let cmd: Vec<String> = vec![
            redis_bin("redis-server").display().to_string(),
            conf.display().to_string(),
            "--sentinel".into(),
        ];
        let log = dir.join("log");
        let guard = guarded(&dir, &cmd, &log);
        wait_for_port(port, "redis-server --sentinel", &log);
        Redis { port, dir, guard }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection to database `db`, logged in with `auth` (user, password) if given.
    pub fn conn(&self, db: i64, auth: Option<(&str, &str)>) -> redis::Connection {
        let mut url = match auth {
            Some((user, pw)) => format!("redis://{user}:{pw}@127.0.0.1:{}", self.port),
            None => self.url(),
        };
        url.push_str(&format!("/{db}"));
        redis::Client::open(url)
            .and_then(|c| c.get_connection())
            .expect("connect to the test redis-server")
    }

    /// One field of `INFO section` (e.g. `server`, `run_id`); empty when absent.
    pub fn info(&self, section: &str, field: &str) -> String {
        let text: String = redis::cmd("INFO")
            .arg(section)
            .query(&mut self.conn(0, None))
            .expect("INFO");
        info_field(&text, field)
    }

    /// `DEBUG DIGEST`: one hash of the whole dataset (keys, values, types, which keys expire).
    pub fn digest(&self, auth: Option<(&str, &str)>) -> String {
        redis::cmd("DEBUG")
            .arg("DIGEST")
            .query(&mut self.conn(0, auth))
            .expect("DEBUG DIGEST")
    }

    /// Keys per database (`INFO keyspace`).
    pub fn keyspace(
        &self,
        auth: Option<(&str, &str)>,
    ) -> std::collections::BTreeMap<u32, (u64, u64)> {
        let info: String = redis::cmd("INFO")
            .arg("keyspace")
            .query(&mut self.conn(0, auth))
            .expect("INFO keyspace");
        lifeboat::source::redis::load::parse_keyspace(&info)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // Closing the guard's stdin stops the server and removes its directory.
        drop(self.guard.stdin.take());
        let _ = self.guard.wait();
    }
}

/// A Redis Cluster of real redis-server processes: `primaries` shards splitting the 16384 slots
/// evenly, each with `replicas` replicas, formed with `CLUSTER ADDSLOTSRANGE`, `MEET` and
/// `REPLICATE` (any number of shards, where `redis-cli --cluster create` wants three or more).
pub struct RedisCluster {
    /// Every node, primaries first (`nodes[i]` owns the i-th slot range).
    pub nodes: Vec<Redis>,
    /// Shards.
    pub primaries: usize,
    /// Each node's TLS port, when the cluster speaks TLS (clients, bus and replication).
    pub tls_ports: Vec<u16>,
}

impl RedisCluster {
    /// Starts the nodes, forms the cluster, and waits until every node sees it whole and every
    /// replica is in sync.
    pub fn start(primaries: usize, replicas: usize, extra: &[&str]) -> RedisCluster {
        Self::form(primaries, replicas, extra, None)
    }

    /// The same, every node also on a TLS port with `certs` (see [`make_certs`]), the cluster bus
    /// and replication over TLS too.
    pub fn start_tls(primaries: usize, replicas: usize, certs: &Path) -> RedisCluster {
        Self::form(primaries, replicas, &[], Some(certs))
    }

    fn form(
        primaries: usize,
        replicas: usize,
        extra: &[&str],
        certs: Option<&Path>,
    ) -> RedisCluster {
        let mut nodes = Vec::new();
        let mut tls_ports = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            // The bus port too is picked, not left at port + 10000, which another test may hold.
            let bus = free_port().to_string();
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
            ]
            .iter()
            .map(|a| a.to_string())
            .collect();
            if let Some(certs) = certs {
                let tls = free_port();
                tls_ports.push(tls);
                let file = |f: &str| certs.join(f).display().to_string();
                args.extend([
                    "--tls-port".into(),
                    tls.to_string(),
                    "--tls-cert-file".into(),
                    file("server.crt"),
                    "--tls-key-file".into(),
                    file("server.key"),
                    "--tls-ca-cert-file".into(),
                    file("ca.crt"),
                    "--tls-auth-clients".into(),
                    "no".into(),
                    "--tls-cluster".into(),
                    "yes".into(),
                    "--tls-replication".into(),
                    "yes".into(),
                ]);
            }
            args.extend(extra.iter().map(|a| a.to_string()));
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            nodes.push(Redis::start(&refs));
        }
        let c = RedisCluster {
            nodes,
            primaries,
            tls_ports,
        };
        let per = 16384 / primaries;
        for (i, node) in c.nodes[..primaries].iter().enumerate() {
            let first = i * per;
            let last = if i + 1 == primaries {
                16383
            } else {
                first + per - 1
            };
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query(&mut node.conn(0, None))
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        for (i, node) in c.nodes.iter().enumerate().skip(1) {
            let bus: String = redis::cmd("CONFIG")
                .arg("GET")
                .arg("cluster-port")
                .query::<Vec<String>>(&mut node.conn(0, None))
                .expect("CONFIG GET cluster-port")
                .pop()
                .unwrap_or_default();
            let port = c.tls_ports.get(i).copied().unwrap_or(node.port);
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(port)
                .arg(bus)
                .query(&mut c.nodes[0].conn(0, None))
                .expect("CLUSTER MEET");
        }
        c.wait_until(|n| n.cluster_info("cluster_known_nodes") == c.nodes.len().to_string());
        for (i, node) in c.nodes[primaries..].iter().enumerate() {
            let id = c.nodes[i % primaries].node_id();
            let _: () = redis::cmd("CLUSTER")
                .arg("REPLICATE")
                .arg(id)
                .query(&mut node.conn(0, None))
                .expect("CLUSTER REPLICATE");
        }
        c.wait_whole();
        c
    }

    /// Waits until every node reports cluster_state:ok and knows every replica as one, and
    /// every replica's link is up.
    pub fn wait_whole(&self) {
        let replicas = self.nodes.len() - self.primaries;
        self.wait_until(|n| {
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut n.conn(0, None))
                .expect("CLUSTER NODES");
            nodes.matches("slave").count() == replicas
                && n.cluster_info("cluster_state") == "ok"
                && (n.info("replication", "role") == "master"
                    || n.info("replication", "master_link_status") == "up")
        });
    }

    fn wait_until(&self, ok: impl Fn(&Redis) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !self.nodes.iter().all(&ok) {
            assert!(
                std::time::Instant::now() < deadline,
                "the test cluster did not form in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis+cluster://` naming two of its nodes (`rediss+cluster://` and their TLS ports for a
    /// TLS cluster).
    pub fn url(&self) -> String {
        match self.tls_ports.as_slice() {
            [a, b, ..] => format!("rediss+cluster://127.0.0.1:{a},127.0.0.1:{b}"),
            _ => format!(
                "redis+cluster://127.0.0.1:{},127.0.0.1:{}",
                self.nodes[0].port, self.nodes[1].port
            ),
        }
    }

    /// A connection that routes each command to the node owning its key.
    pub fn client(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(vec![self.nodes[0].url()])
            .and_then(|c| c.get_connection())
            .expect("connect to the test cluster")
    }

    /// The nodes that are primaries now.
    pub fn current_primaries(&self) -> Vec<&Redis> {
        self.nodes
            .iter()
            .filter(|n| n.info("replication", "role") == "master")
            .collect()
    }

    /// Writes `n` keys of every type (a tenth with a TTL, some sharing a `{hash tag}`) and a
    /// Redis Functions library on every primary. Returns the number of keys.
    pub fn fill(&self, n: usize) -> u64 {
        let mut c = self.client();
        for i in 0..n {
            let key = match i % 7 {
                0 => format!("{{user:{}}}:profile:{i}", i % 13),
                _ => format!("key:{i}"),
            };
            let _: () = match i % 5 {
                0 => redis::cmd("HSET").arg(&key).arg("f").arg(i).query(&mut c),
                1 => redis::cmd("RPUSH").arg(&key).arg(&["a", "b"]).query(&mut c),
                2 => redis::cmd("SADD").arg(&key).arg(i).query(&mut c),
                3 => redis::cmd("ZADD").arg(&key).arg(1.5).arg("m").query(&mut c),
                _ => redis::cmd("SET")
                    .arg(&key)
                    .arg(format!("value {i}"))
                    .query(&mut c),
            }
            .expect("write a key");
            if i % 10 == 3 {
                let _: () = redis::cmd("EXPIRE")
                    .arg(&key)
                    .arg(3600)
                    .query(&mut c)
                    .expect("EXPIRE");
            }
        }
        for p in self.current_primaries() {
            let _: () = redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg("#!lua name=clusterlib\nredis.register_function('hello', function() return 'hi' end)")
                .query(&mut p.conn(0, None))
                .expect("FUNCTION LOAD");
        }
        n as u64
    }
}

impl Redis {
    /// One field of `CLUSTER INFO`.
    pub fn cluster_info(&self, field: &str) -> String {
        let text: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut self.conn(0, None))
            .expect("CLUSTER INFO");
        info_field(&text, field)
    }

    /// `CLUSTER MYID`.
    pub fn node_id(&self) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.conn(0, None))
            .expect("CLUSTER MYID")
    }
}

/// The value of `field:` in an `INFO`-style reply; empty when absent.
fn info_field(text: &str, field: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Every key of database 0 on `servers`, with `DEBUG DIGEST-VALUE` of its value and whether it
/// has a TTL: equal maps mean equal data, whatever the shape of the servers holding it.
pub fn key_digests(servers: &[&Redis]) -> std::collections::BTreeMap<Vec<u8>, (String, bool)> {
    let mut all = std::collections::BTreeMap::new();
    for r in servers {
        let mut c = r.conn(0, None);
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query(&mut c).expect("KEYS");
        for k in keys {
            let digest: Vec<String> = redis::cmd("DEBUG")
                .arg("DIGEST-VALUE")
                .arg(&k)
                .query(&mut c)
                .expect("DEBUG DIGEST-VALUE");
            let ttl: i64 = redis::cmd("PTTL").arg(&k).query(&mut c).expect("PTTL");
            let had = all.insert(k.clone(), (digest.concat(), ttl > 0));
            assert!(had.is_none(), "key {k:?} is on two servers");
        }
    }
    all
}

/// Fills `r` with every type: strings (binary key, integer, a 2 MiB value), lists, sets, sorted
/// sets and hashes in both their small and large encodings, a stream with a consumer group and
/// pending entries, a HyperLogLog, keys with TTLs, and keys in databases 0, 1 and 5.
/// Returns the number of keys.
pub fn fill_redis(r: &Redis, auth: Option<(&str, &str)>) -> u64 {
    fill_redis_dbs(r, auth);
    r.keyspace(auth).values().map(|v| v.0).sum()
}

fn fill_redis_dbs(r: &Redis, auth: Option<(&str, &str)>) {
    let mut c = r.conn(0, auth);
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg("greeting").arg("hello");
    pipe.cmd("SET").arg("counter").arg(12345);
    pipe.cmd("SET")
        .arg(&b"bin\x00\xff\x01key"[..])
        .arg(&b"\x00\x01\x02\xff"[..]);
    // Pseudo-random, so that neither LZF nor zstd shrinks it: the snapshot stays over 2 MiB.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let big: Vec<u8> = (0..(2usize << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    pipe.cmd("SET").arg("big").arg(big);
    pipe.cmd("RPUSH").arg("small-list").arg(&["a", "b", "c"]);
    for chunk in 0..10 {
        let items: Vec<String> = (0..1000).map(|i| format!("item-{chunk}-{i}")).collect();
        pipe.cmd("RPUSH").arg("big-list").arg(items);
    }
    pipe.cmd("SADD").arg("int-set").arg(&[1, 2, 3, 4]);
    pipe.cmd("SADD").arg("small-set").arg(&["x", "y"]);
    let members: Vec<String> = (0..2000).map(|i| format!("member-{i}")).collect();
    pipe.cmd("SADD").arg("big-set").arg(&members);
    pipe.cmd("ZADD")
        .arg("small-zset")
        .arg(&[(1.5, "a"), (2.5, "b")]);
    let scored: Vec<(f64, String)> = (0..1000)
        .map(|i| (i as f64 / 3.0, format!("z{i}")))
        .collect();
    pipe.cmd("ZADD").arg("big-zset").arg(scored);
    pipe.cmd("HSET")
        .arg("small-hash")
        .arg(&[("f1", "v1"), ("f2", "v2")]);
    let fields: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("f{i}"), "x".repeat(i % 90)))
        .collect();
    pipe.cmd("HSET").arg("big-hash").arg(fields);
    for i in 0..50 {
        pipe.cmd("XADD").arg("events").arg("*").arg("n").arg(i);
    }
    pipe.cmd("XGROUP")
        .arg("CREATE")
        .arg("events")
        .arg("workers")
        .arg("0");
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg("workers")
        .arg("alice")
        .arg("COUNT")
        .arg(5)
        .arg("STREAMS")
        .arg("events")
        .arg(">");
    pipe.cmd("PFADD")
        .arg("visitors")
        .arg(&["u1", "u2", "u3", "u4"]);
    pipe.cmd("SET")
        .arg("session:1")
        .arg("s")
        .arg("EX")
        .arg(3600);
    pipe.cmd("HSET").arg("session:2").arg("k").arg("v");
    pipe.cmd("EXPIRE").arg("session:2").arg(7200);
    let _: () = pipe.query(&mut c).expect("fill db 0");
    for (db, n) in [(1i64, 30), (5, 3)] {
        let mut c = r.conn(db, auth);
        for i in 0..n {
            let _: () = redis::cmd("SET")
                .arg(format!("k{i}"))
                .arg(i)
                .query(&mut c)
                .expect("fill");
        }
    }
}

/// What a [`Proxy`] does to the bytes coming back from the server.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Closes both connections after this many bytes.
    CutAfter(u64),
    /// Flips the lowest bit of the byte at this offset.
    FlipAt(u64),
}

/// A TCP proxy in front of a real server that injects one fault into every connection.
pub struct Proxy {
    /// Port on 127.0.0.1.
    pub port: u16,
}

impl Proxy {
    /// Starts proxying 127.0.0.1:`port` → 127.0.0.1:`upstream` (for the life of the test process).
    pub fn start(upstream: u16, fault: Fault) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_in, mut s_out) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut s_out);
                });
                std::thread::spawn(move || {
                    let (mut from, mut to) = (server, client);
                    let mut seen = 0u64;
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &mut buf[..n];
                        match fault {
                            Fault::CutAfter(limit) if seen + n as u64 >= limit => {
                                let keep = (limit - seen) as usize;
                                let _ = to.write_all(&chunk[..keep]);
                                break;
                            }
                            Fault::FlipAt(at) if (seen..seen + n as u64).contains(&at) => {
                                chunk[(at - seen) as usize] ^= 1;
                            }
                            _ => {}
                        }
                        if to.write_all(chunk).is_err() {
                            break;
                        }
                        seen += n as u64;
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                    let _ = from.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Proxy { port }
    }
}

/// Builds a policy file: a repository, a recipient, defaults, and sources, instead of TOML
/// pasted into each test.
pub struct PolicyBuilder {
    repository: String,
    recipient: String,
    index_key: bool,
    defaults: String,
    sources: Vec<String>,
    copies: Vec<String>,
    signing: Option<String>,
}

impl PolicyBuilder {
    /// A policy with the local repository `./repo` (relative to where lifeboat runs).
    pub fn new(recipient: &str) -> PolicyBuilder {
        PolicyBuilder {
            repository: "url = \"file://./repo\"".into(),
            recipient: recipient.into(),
            index_key: false,
            defaults: "retention = { keep_last = 3 }\ncompression = { level = 3, workers = 0 }"
                .into(),
            sources: Vec::new(),
            copies: Vec::new(),
            signing: None,
        }
    }

    /// Sets `[signing]`'s lines.
    pub fn signing(mut self, lines: &str) -> Self {
        self.signing = Some(lines.into());
        self
    }

    /// Sets `[repository]`'s lines.
    pub fn repository(mut self, lines: &str) -> Self {
        self.repository = lines.into();
        self
    }

    /// Adds `encryption.index_key = "${LIFEBOAT_INDEX_KEY}"` (objects sources need it); see
    /// [`index_key_env`].
    pub fn index_key(mut self) -> Self {
        self.index_key = true;
        self
    }

    /// Adds a `[[sources]]` table named `name` of `kind`, with `fields` (TOML lines).
    pub fn source(mut self, name: &str, kind: &str, fields: &str) -> Self {
        self.sources.push(format!(
            "[[sources]]\nname = \"{name}\"\nkind = \"{kind}\"\n{fields}\n"
        ));
        self
    }

    /// The policy's text.
    pub fn text(&self) -> String {
        let index_key = if self.index_key {
            "index_key = \"${LIFEBOAT_INDEX_KEY}\"\n"
        } else {
            ""
        };
        let signing = self
            .signing
            .as_ref()
            .map(|s| format!("[signing]\n{s}\n\n"))
            .unwrap_or_default();
        format!(
            "[repository]\n{}\n\n[encryption]\nrecipients = [\"{}\"]\n{index_key}\n{signing}[defaults]\n{}\n\n{}\n{}",
            self.repository,
            self.recipient,
            self.defaults,
            self.sources.join("\n"),
            self.copies.join("\n")
        )
    }

    /// Adds a `[[copies]]` table named `name` with `fields` (TOML lines).
    pub fn copy(mut self, name: &str, fields: &str) -> Self {
        self.copies
            .push(format!("[[copies]]\nname = \"{name}\"\n{fields}\n"));
        self
    }

    /// Writes it into `dir` and returns its path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let p = dir.join(format!("policy-{}.toml", suffix()));
        std::fs::write(&p, self.text()).expect("write policy");
        p
    }
}

/// The environment a policy with [`PolicyBuilder::index_key`] needs.
pub fn index_key_env() -> Vec<(String, String)> {
    vec![(
        "LIFEBOAT_INDEX_KEY".into(),
        "0123456789abcdef0123456789abcdef-conformance".into(),
    )]
}

/// `GET path` on 127.0.0.1:`port`: the status and the body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    std::io::Write::write_fmt(
        &mut s,
        format_args!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"),
    )
    .ok()?;
    let mut buf = String::new();
    std::io::Read::read_to_string(&mut s, &mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of the Prometheus sample `name` whose labels include `labels`.
pub fn metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A local webhook receiver: every POST body, as JSON.
pub fn webhook() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            use std::io::{Read, Write};
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let body = loop {
                let Ok(n) = stream.read(&mut chunk) else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        break Some(body[..len].to_string());
                    }
                }
            };
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            if let Some(b) = body.and_then(|b| serde_json::from_str(&b).ok()) {
                sink.lock().unwrap().push(b);
            }
        }
    });
    (port, got)
}

/// Runs lifeboat under a file size limit of `kib` KiB (SIGXFSZ ignored, so writes fail with EFBIG).
pub fn limited(bin: &Path, dir: &Path, kib: u64, args: &[&str], env: &[(String, String)]) -> Run {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("trap '' XFSZ; ulimit -f {kib}; exec \"$0\" \"$@\""))
        .arg(bin)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        peak_rss_kib: 0, // not watched
    }
}

/// A stored object's plaintext, read with the stock tools (`age -d | zstd -d`).
pub fn stock_plaintext(identity: &Path, object: &Path) -> Vec<u8> {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg("set -o pipefail; age -d -i \"$0\" \"$1\" | zstd -dc")
        .arg(identity)
        .arg(object)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
