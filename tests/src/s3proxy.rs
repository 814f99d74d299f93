//! A fault-injecting HTTP proxy in front of the real S3 test server (moto).
//!
//! Each request is parsed just enough (request line, headers, body by Content-Length or chunked)
//! to match it against the test's rules; a matching rule injects its fault instead of, or around,
//! forwarding: an error status with an S3 error body, a connection reset half-way through the
//! request body, a delay, a response body cut short, or a 200 whose body is an S3 error (as
//! CompleteMultipartUpload may answer). Everything else goes to the real server unchanged.
//! Threads and blocking sockets on loopback; the proxy lives as long as the test process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a matching request.
#[derive(Debug, Clone)]
pub enum HttpFault {
    /// Answer with this status and S3 error code, without forwarding.
    Status(u16, &'static str),
    /// Read half of the request body, then reset the connection.
    ResetMidBody,
    /// Wait, then forward.
    Delay(Duration),
    /// Forward, then send only half of the response body and close.
    TruncateResponse,
    /// Answer 200 with an S3 `<Error>` body, without forwarding.
    OkWithErrorBody,
}

/// When a fault fires.
#[derive(Debug, Clone)]
pub struct Rule {
    /// HTTP method, e.g. `PUT`; `*` for any.
    pub method: &'static str,
    /// A substring of the request target (path and query), e.g. `manifest.json` or `uploadId=`.
    pub target: String,
    /// A substring the target must NOT contain (e.g. `partNumber` to tell PUT object from UploadPart).
    pub not_target: Option<&'static str>,
    /// Only requests without this header, or whose value lacks this text (as a bucket policy
    /// demands a header, or a server one access key).
    pub without_header: Option<(&'static str, &'static str)>,
    /// Matching requests let through before the fault starts.
    pub skip: usize,
    /// How many matching requests get the fault (`usize::MAX`: all).
    pub times: usize,
    /// The fault.
    pub fault: HttpFault,
}

impl Rule {
    /// A rule for every `method` request whose target contains `target`.
    pub fn new(method: &'static str, target: &str, fault: HttpFault) -> Rule {
        Rule {
            method,
            target: target.to_string(),
            not_target: None,
            without_header: None,
            skip: 0,
            times: usize::MAX,
            fault,
        }
    }

    /// Only the first `n` matches (after `skip`).
    pub fn times(mut self, n: usize) -> Rule {
        self.times = n;
        self
    }

    /// Let the first `n` matches through.
    pub fn skip(mut self, n: usize) -> Rule {
        self.skip = n;
        self
    }

    /// Only requests that lack header `name`, or whose value does not contain `value`.
    pub fn without_header(mut self, name: &'static str, value: &'static str) -> Rule {
        self.without_header = Some((name, value));
        self
    }

    /// Not when the target contains `s`.
    pub fn unless(mut self, s: &'static str) -> Rule {
        self.not_target = Some(s);
        self
    }
}

#[derive(Default)]
struct State {
    rules: Vec<(Rule, usize)>,
    log: Vec<String>,
    fired: Vec<String>,
}

/// The proxy.
#[derive(Clone)]
pub struct S3Proxy {
    /// `http://127.0.0.1:PORT`, to use as the policy's `endpoint`.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
}

impl S3Proxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> S3Proxy {
        let upstream_port: u16 = upstream
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("upstream is http://127.0.0.1:PORT");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(client, upstream_port, state));
            }
        });
        S3Proxy {
            endpoint: format!("http://127.0.0.1:{port}"),
            state,
        }
    }

    /// Adds a rule (rules are tried in the order added; the first match decides).
    pub fn add(&self, rule: Rule) {
        self.state
            .lock()
            .expect("proxy state")
            .rules
            .push((rule, 0));
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.state.lock().expect("proxy state").rules.clear();
    }

    /// Every request seen, as `METHOD target`, and ` range=bytes=A-B` when it asked for a range.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().expect("proxy state").log.clone()
    }

    /// The faults injected, as `FAULT METHOD target`.
    pub fn fired(&self) -> Vec<String> {
        self.state.lock().expect("proxy state").fired.clone()
    }
}

struct Request {
    method: String,
    head: Vec<u8>,
    body: Vec<u8>,
}

fn read_head(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line).ok()? == 0 {
            return None;
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" {
            return Some(head);
        }
    }
}

fn header(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Reads a body framed by Content-Length or chunked encoding, raw (framing kept).
fn read_body(r: &mut impl BufRead, head: &[u8], no_body: bool) -> Option<Vec<u8>> {
    if no_body {
        return Some(Vec::new());
    }
    if let Some(n) = header(head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        let mut body = vec![0u8; n];
        r.read_exact(&mut body).ok()?;
        return Some(body);
    }
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut body = Vec::new();
        loop {
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).ok()?;
            body.extend_from_slice(&line);
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&line).trim().split(';').next()?, 16)
                    .ok()?;
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk).ok()?;
            body.extend_from_slice(&chunk);
            if size == 0 {
                return Some(body);
            }
        }
    }
    Some(Vec::new())
}

fn error_response(status: u16, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>injected by the test proxy</Message><RequestId>proxy</RequestId></Error>"
    );
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        if status == 200 { "OK" } else { "Injected" },
        body.len()
    )
    .into_bytes()
}

fn serve(client: TcpStream, upstream_port: u16, state: Arc<Mutex<State>>) {
    let mut reader = BufReader::new(client.try_clone().expect("clone client"));
    let mut client = client;
    loop {
        // The head first: a reset must happen while the body is still arriving.
        let Some(head) = read_head(&mut reader) else {
            return;
        };
        let first = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or("")
            .to_string();
        let mut parts = first.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let fault = {
            let mut st = state.lock().expect("proxy state");
            match header(&head, "range") {
                Some(range) => st.log.push(format!("{method} {target} range={range}")),
                None => st.log.push(format!("{method} {target}")),
            }
            let mut chosen = None;
            for (rule, seen) in st.rules.iter_mut() {
                let matches = (rule.method == method || rule.method == "*")
                    && target.contains(&rule.target)
                    && !rule.not_target.is_some_and(|n| target.contains(n))
                    && rule
                        .without_header
                        .is_none_or(|(n, v)| !header(&head, n).is_some_and(|h| h.contains(v)));
                if !matches {
                    continue;
                }
                *seen += 1;
                if *seen > rule.skip && *seen - rule.skip <= rule.times {
                    chosen = Some(rule.fault.clone());
                }
                break;
            }
            if let Some(f) = &chosen {
                st.fired.push(format!("{f:?} {method} {target}"));
            }
            chosen
        };
        if let Some(HttpFault::ResetMidBody) = fault {
            let n = header(&head, "content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            let mut half = vec![0u8; n / 2];
            let _ = reader.read_exact(&mut half);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        let Some(body) = read_body(&mut reader, &head, false) else {
            return;
        };
        let req = Request { method, head, body };
        let response = match fault {
            Some(HttpFault::Status(status, code)) => Some(error_response(status, code)),
            Some(HttpFault::OkWithErrorBody) => Some(error_response(200, "InternalError")),
            _ => None,
        };
        if let Some(resp) = response {
            if client.write_all(&resp).is_err() {
                return;
            }
            continue;
        }
        if let Some(HttpFault::Delay(d)) = fault {
            std::thread::sleep(d);
        }
        let Some((resp_head, resp_body, close)) = forward(&req, upstream_port) else {
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        if let Some(HttpFault::TruncateResponse) = fault {
            let _ = client.write_all(&resp_head);
            let _ = client.write_all(&resp_body[..resp_body.len() / 2]);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        if client.write_all(&resp_head).is_err() || client.write_all(&resp_body).is_err() || close {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    }
}

/// Forwards one request on a fresh upstream connection; returns the response head and body, and
/// whether the body was framed by the connection's end (then the client connection closes too).
fn forward(req: &Request, upstream_port: u16) -> Option<(Vec<u8>, Vec<u8>, bool)> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream_port)).ok()?;
    up.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    up.write_all(&req.head).ok()?;
    up.write_all(&req.body).ok()?;
    let mut r = BufReader::new(up);
    let head = read_head(&mut r)?;
    let status = String::from_utf8_lossy(&head)
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse::<u16>()
        .ok()?;
    let no_body = req.method == "HEAD" || status == 204 || status == 304;
    let framed = no_body
        || header(&head, "content-length").is_some()
        || header(&head, "transfer-encoding").is_some();
    let body = if framed {
        read_body(&mut r, &head, no_body)?
    } else {
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).ok()?;
        rest
    };
    Some((head, body, !framed))
}
