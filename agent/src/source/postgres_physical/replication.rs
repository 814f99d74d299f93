//! A client of PostgreSQL's physical replication protocol: what streaming WAL needs and nothing
//! more. tokio-postgres cannot open a replication connection (the `replication` startup
//! parameter), so this speaks the wire protocol itself, with postgres-protocol's message
//! encoders and SCRAM.
//!
//! `IDENTIFY_SYSTEM`, `TIMELINE_HISTORY` and `START_REPLICATION SLOT … PHYSICAL` in the simple
//! query protocol; then the copy-both stream of `XLogData` and keepalives, answered with standby
//! status updates that report what is safely stored (never what was merely received). Every
//! message the server sends is length-checked before it is parsed; a malformed one is an error,
//! never a panic. TLS is as for a logical source's connections: `sslmode=require` or a
//! `tls_ca_file`, the server's certificate always verified.

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

use super::Lsn;
use crate::error::{Error, ErrorKind, Result};
use crate::policy::Secret;

/// Largest message accepted from the server (XLogData is at most a few hundred KiB).
const MAX_MESSAGE: usize = 64 << 20;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open replication connection.
pub struct Replication {
    stream: Box<dyn Stream>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    shown: String,
}

/// What `IDENTIFY_SYSTEM` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct System {
    /// The cluster's system identifier.
    pub system_identifier: String,
    /// The server's current timeline.
    pub timeline: u32,
    /// Its current WAL flush location.
    pub xlogpos: Lsn,
}

/// One event of the WAL stream.
#[derive(Debug)]
pub enum Event {
    /// WAL bytes from `start` on.
    Data {
        /// Where `data` begins.
        start: Lsn,
        /// The server's WAL end when it sent this.
        server_end: Lsn,
        /// The WAL bytes.
        data: Bytes,
    },
    /// The server is alive; it wants a status update at once when `reply`.
    Keepalive {
        /// The server's WAL end.
        server_end: Lsn,
        /// Reply requested.
        reply: bool,
    },
    /// The timeline ended (a promotion): continue on `next_timeline` from `next_start`.
    EndOfTimeline {
        /// The timeline after this one.
        next_timeline: u32,
        /// Where it begins.
        next_start: Lsn,
    },
}

/// Microseconds since 2000-01-01, PostgreSQL's epoch.
fn pg_now() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    unix - 946_684_800_000_000
}

fn io_error(shown: &str, e: std::io::Error) -> Error {
    Error::failed(format!("replication connection to {shown}: {e}"))
}

/// The text of an ErrorResponse/NoticeResponse body: severity, message, detail and hint.
fn error_text(body: &[u8]) -> (String, String) {
    let mut code = String::new();
    let mut parts = Vec::new();
    for field in body.split(|b| *b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            continue;
        };
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'C' => code = value,
            b'M' => parts.insert(0, value),
            b'D' | b'H' => parts.push(value),
            _ => {}
        }
    }
    (code, parts.join(": "))
}

impl Replication {
    /// Opens a physical replication connection to the first host of `config` with `password`,
    /// over TLS with `tls` (always verified) when given.
    pub async fn connect(
        config: &tokio_postgres::Config,
        password: Option<&Secret>,
        tls: Option<rustls::ClientConfig>,
        shown: &str,
    ) -> Result<Replication> {
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let stream: Box<dyn Stream> = match config.get_hosts().first() {
            Some(Host::Tcp(host)) => {
                let s = tokio::time::timeout(
                    Duration::from_secs(10),
                    tokio::net::TcpStream::connect((host.as_str(), port)),
                )
                .await
                .map_err(|_| {
                    Error::failed(format!(
                        "replication connection to {shown}: timed out after 10 s"
                    ))
                })?
                .map_err(|e| io_error(shown, e))?;
                s.set_nodelay(true).map_err(|e| io_error(shown, e))?;
                match tls {
                    Some(tls) => {
                        let required =
                            config.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
                        Self::tls(s, host, tls, required, shown).await?
                    }
                    None => Box::new(s),
                }
            }
            Some(Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                Box::new(
                    tokio::net::UnixStream::connect(&path)
                        .await
                        .map_err(|e| io_error(shown, e))?,
                )
            }
            None => {
                return Err(Error::new(
                    ErrorKind::Invalid,
                    format!("{shown}: the url names no host"),
                ))
            }
        };
        let mut r = Replication {
            stream,
            rbuf: BytesMut::with_capacity(256 << 10),
            wbuf: BytesMut::with_capacity(4096),
            shown: shown.to_string(),
        };
        let user = config.get_user().unwrap_or("postgres").to_string();
        let app = config
            .get_application_name()
            .unwrap_or("lifeboat")
            .to_string();
        frontend::startup_message(
            [
                ("user", user.as_str()),
                ("replication", "true"),
                ("application_name", app.as_str()),
            ],
            &mut r.wbuf,
        )
        .map_err(|e| io_error(shown, e))?;
        r.flush().await?;
        r.authenticate(&user, password).await?;
        Ok(r)
    }

    /// PostgreSQL's TLS start: an SSLRequest, the server's one-byte answer, then the
    /// handshake, the server's certificate verified against `tls`'s roots and `host`. A server
    /// without TLS is refused when it is `required` (`sslmode=require`), else used as it is.
    async fn tls(
        mut tcp: tokio::net::TcpStream,
        host: &str,
        tls: rustls::ClientConfig,
        required: bool,
        shown: &str,
    ) -> Result<Box<dyn Stream>> {
        let mut request = BytesMut::new();
        frontend::ssl_request(&mut request);
        tcp.write_all(&request)
            .await
            .map_err(|e| io_error(shown, e))?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer)
            .await
            .map_err(|e| io_error(shown, e))?;
        if answer[0] != b'S' && !required {
            return Ok(Box::new(tcp));
        }
        if answer[0] != b'S' {
            return Err(Error::new(
                ErrorKind::Credential,
                format!("{shown}: the server does not accept TLS connections (ssl = off)"),
            )
            .hint("turn ssl on in the server's settings, or use sslmode=disable on a trusted network (RUNBOOK.md#source-unreachable)"));
        }
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| Error::new(ErrorKind::Invalid, format!("{shown}: host name: {e}")))?;
        let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
            .connect(name, tcp)
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Credential, format!("{shown}: TLS handshake failed: {e}"))
                    .hint("lifeboat verifies the server's certificate: set tls_ca_file to the CA that signed it (RUNBOOK.md#source-unreachable)")
            })?;
        Ok(Box::new(stream))
    }

    async fn flush(&mut self) -> Result<()> {
        let buf = self.wbuf.split();
        self.stream
            .write_all(&buf)
            .await
            .map_err(|e| io_error(&self.shown, e))?;
        self.stream
            .flush()
            .await
            .map_err(|e| io_error(&self.shown, e))
    }

    /// The next message: its tag and body.
    async fn message(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if !(4..=MAX_MESSAGE).contains(&len) {
                    return Err(Error::failed(format!(
                        "replication connection to {}: a message of {len} bytes: not PostgreSQL's protocol",
                        self.shown
                    )));
                }
                if self.rbuf.len() > len {
                    let tag = self.rbuf[0];
                    let mut msg = self.rbuf.split_to(len + 1);
                    msg.advance(5);
                    return Ok((tag, msg.freeze()));
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len());
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| io_error(&self.shown, e))?;
            if n == 0 {
                return Err(Error::failed(format!(
                    "replication connection to {}: the server closed the connection",
                    self.shown
                )));
            }
        }
    }

    fn server_error(&self, body: &[u8]) -> Error {
        let (code, text) = error_text(body);
        let e = Error::failed(format!("{}: {text}", self.shown));
        match code.as_str() {
            "28P01" | "28000" | "42501" => e.kind(ErrorKind::Credential),
            // object_in_use: another walsender streams from the slot.
            "55006" => e.kind(ErrorKind::LockHeld),
            _ => e,
        }
    }

    /// Answers the server's authentication requests until it is ready for queries.
    async fn authenticate(&mut self, user: &str, password: Option<&Secret>) -> Result<()> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'R' => {
                    if body.len() < 4 {
                        return Err(Error::failed(format!(
                            "{}: a short authentication message",
                            self.shown
                        )));
                    }
                    let kind = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
                    self.challenge(kind, &body[4..], user, password, &mut scram)
                        .await?;
                }
                b'E' => return Err(self.server_error(&body)),
                b'Z' => return Ok(()),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    /// Answers one authentication request of `kind` (0 ok, 3 password, 5 MD5, 10–12 SASL).
    async fn challenge(
        &mut self,
        kind: u32,
        rest: &[u8],
        user: &str,
        password: Option<&Secret>,
        scram: &mut Option<ScramSha256>,
    ) -> Result<()> {
        let shown = self.shown.clone();
        let io = |e: std::io::Error| io_error(&shown, e);
        let need = || {
            Error::new(
                ErrorKind::Credential,
                format!("{shown}: the server asks for a password and none is configured"),
            )
            .hint("set password_file on the source (RUNBOOK.md#source-unreachable)")
        };
        let out_of_order = || Error::failed(format!("{shown}: SASL out of order"));
        match kind {
            0 => return Ok(()),
            3 => {
                let pw = password.ok_or_else(need)?;
                frontend::password_message(pw.expose().as_bytes(), &mut self.wbuf).map_err(io)?;
            }
            5 => {
                let pw = password.ok_or_else(need)?;
                let salt: [u8; 4] = rest
                    .get(..4)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| Error::failed(format!("{shown}: a short MD5 challenge")))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    user.as_bytes(),
                    pw.expose().as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), &mut self.wbuf).map_err(io)?;
            }
            10 => {
                let pw = password.ok_or_else(need)?;
                if !rest.split(|b| *b == 0).any(|m| m == b"SCRAM-SHA-256") {
                    return Err(Error::new(
                        ErrorKind::Credential,
                        format!("{shown}: the server offers no SASL mechanism lifeboat speaks (SCRAM-SHA-256)"),
                    ));
                }
                let s = ScramSha256::new(pw.expose().as_bytes(), ChannelBinding::unsupported());
                frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut self.wbuf)
                    .map_err(io)?;
                *scram = Some(s);
            }
            11 => {
                let s = scram.as_mut().ok_or_else(out_of_order)?;
                s.update(rest).map_err(|e| {
                    Error::new(ErrorKind::Credential, format!("{shown}: SCRAM: {e}"))
                })?;
                frontend::sasl_response(s.message(), &mut self.wbuf).map_err(io)?;
            }
            12 => {
                let s = scram.as_mut().ok_or_else(out_of_order)?;
                return s.finish(rest).map_err(|e| {
                    Error::new(
                        ErrorKind::Credential,
                        format!("{shown}: the server's SCRAM signature does not verify: {e}"),
                    )
                });
            }
            other => {
                return Err(Error::new(
                    ErrorKind::Credential,
                    format!("{shown}: authentication method {other} is not supported (use scram-sha-256, md5 or password in pg_hba.conf)"),
                ))
            }
        }
        self.flush().await
    }

    /// Runs a replication command in the simple query protocol; returns its rows as text.
    async fn simple_query(&mut self, q: &str) -> Result<Vec<Vec<Option<String>>>> {
        frontend::query(q, &mut self.wbuf).map_err(|e| io_error(&self.shown, e))?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'D' => rows.push(data_row(&body).ok_or_else(|| {
                    Error::failed(format!("{}: a malformed row in reply to {q}", self.shown))
                })?),
                b'E' => failed = Some(self.server_error(&body)),
                b'Z' => break,
                _ => {}
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<System> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows.first().ok_or_else(|| {
            Error::failed(format!("{}: IDENTIFY_SYSTEM returned no row", self.shown))
        })?;
        let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(System {
            system_identifier: text(0),
            timeline: text(1).parse().map_err(|_| {
                Error::failed(format!("{}: IDENTIFY_SYSTEM: no timeline", self.shown))
            })?,
            xlogpos: Lsn::from_str(&text(2))
                .map_err(|e| Error::failed(format!("{}: IDENTIFY_SYSTEM: {e}", self.shown)))?,
        })
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and content.
    pub async fn timeline_history(&mut self, timeline: u32) -> Result<(String, Vec<u8>)> {
        let rows = self
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await?;
        let row = rows.first().ok_or_else(|| {
            Error::failed(format!("{}: TIMELINE_HISTORY returned no row", self.shown))
        })?;
        let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok((text(0), text(1).into_bytes()))
    }

    /// `START_REPLICATION SLOT slot PHYSICAL start TIMELINE tli`: from here on, [`Replication::next`].
    pub async fn start(&mut self, slot: &str, start: Lsn, timeline: u32) -> Result<()> {
        let q = format!("START_REPLICATION SLOT {slot} PHYSICAL {start} TIMELINE {timeline}");
        frontend::query(&q, &mut self.wbuf).map_err(|e| io_error(&self.shown, e))?;
        self.flush().await?;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => {
                    let e = self.server_error(&body);
                    // Drain to ReadyForQuery so the error is the server's, not a protocol one.
                    while self.message().await?.0 != b'Z' {}
                    return Err(e);
                }
                _ => {}
            }
        }
    }

    /// The next event of the stream started by [`Replication::start`].
    pub async fn next(&mut self) -> Result<Event> {
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'd' => return self.copy_data(body),
                b'c' => return self.end_of_timeline().await,
                b'E' => return Err(self.server_error(&body)),
                _ => {}
            }
        }
    }

    fn copy_data(&self, mut body: Bytes) -> Result<Event> {
        let short = || Error::failed(format!("{}: a short message in the WAL stream", self.shown));
        match body.first() {
            Some(b'w') if body.len() >= 25 => {
                body.advance(1);
                let start = Lsn(body.get_u64());
                let server_end = Lsn(body.get_u64());
                let _sent = body.get_i64();
                Ok(Event::Data {
                    start,
                    server_end,
                    data: body,
                })
            }
            Some(b'k') if body.len() >= 18 => {
                body.advance(1);
                let server_end = Lsn(body.get_u64());
                let _sent = body.get_i64();
                Ok(Event::Keepalive {
                    server_end,
                    reply: body.get_u8() == 1,
                })
            }
            _ => Err(short()),
        }
    }

    /// After the server's CopyDone: answer it, then read the next timeline's row.
    async fn end_of_timeline(&mut self) -> Result<Event> {
        frontend::copy_done(&mut self.wbuf);
        self.flush().await?;
        let mut next = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'D' => {
                    let row = data_row(&body).unwrap_or_default();
                    let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
                    if let (Ok(t), Ok(l)) = (text(0).parse::<u32>(), Lsn::from_str(&text(1))) {
                        next = Some((t, l));
                    }
                }
                b'E' => return Err(self.server_error(&body)),
                b'C' if next.is_some() => break,
                b'Z' => break,
                _ => {}
            }
        }
        // The CommandComplete of START_REPLICATION and ReadyForQuery follow; read up to it.
        if let Some((next_timeline, next_start)) = next {
            while self.message().await?.0 != b'Z' {}
            return Ok(Event::EndOfTimeline {
                next_timeline,
                next_start,
            });
        }
        Err(Error::failed(format!(
            "{}: the server ended the WAL stream without naming the next timeline",
            self.shown
        )))
    }

    /// A standby status update: `written` received, `flushed` safely stored (the slot may free
    /// WAL before it), `reply` asks the server to answer at once.
    pub async fn status(&mut self, written: Lsn, flushed: Lsn, reply: bool) -> Result<()> {
        let mut m = BytesMut::with_capacity(34);
        m.put_u8(b'r');
        m.put_u64(written.0);
        m.put_u64(flushed.0);
        m.put_u64(flushed.0);
        m.put_i64(pg_now());
        m.put_u8(u8::from(reply));
        self.wbuf.put_u8(b'd');
        self.wbuf.put_u32(4 + m.len() as u32);
        self.wbuf.put_slice(&m);
        self.flush().await
    }
}

/// A DataRow's columns as text (`None`: NULL).
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut b = body;
    if b.len() < 2 {
        return None;
    }
    let n = u16::from_be_bytes([b[0], b[1]]);
    b = &b[2..];
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return None;
        }
        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        b = &b[4..];
        if len < 0 {
            out.push(None);
            continue;
        }
        let len = len as usize;
        if b.len() < len {
            return None;
        }
        out.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
        b = &b[len..];
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_parse_and_short_ones_are_refused() {
        let mut b = vec![0, 2];
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(data_row(&b), Some(vec![Some("abc".to_string()), None]));
        assert_eq!(data_row(&b[..6]), None);
        assert_eq!(data_row(&[0]), None);
    }

    #[test]
    fn server_errors_read_as_message_detail_and_hint() {
        let body = b"SFATAL\0C28000\0Mno pg_hba.conf entry\0Hadd one\0\0";
        let (code, text) = error_text(body);
        assert_eq!(code, "28000");
        assert_eq!(text, "no pg_hba.conf entry: add one");
    }
}
