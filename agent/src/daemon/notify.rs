//! Webhook notifications: sent when a source starts failing, when it recovers, and when an
//! objective becomes breached or met again; never on every success. Sending is retried and runs
//! beside the work, so a webhook outage can never fail or delay a backup. Webhook URLs usually
//! carry a token: they are held as secrets and logged only by host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::Utc;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::policy::{Notify, NotifyFormat};

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A run failed after the source had been fine.
    Failure,
    /// A run succeeded after failures.
    Recovery,
    /// An objective is breached.
    Breach,
    /// A breached objective is met again.
    Met,
    /// WAL was lost before it was archived: point-in-time recovery cannot cross it.
    Gap,
}

impl Event {
    fn as_str(self) -> &'static str {
        match self {
            Event::Failure => "failure",
            Event::Recovery => "recovery",
            Event::Breach => "breach",
            Event::Met => "met",
            Event::Gap => "gap",
        }
    }
}

/// Sends webhooks on state changes.
pub struct Notifier {
    hooks: Vec<Notify>,
    client: Option<Client<Https, Full<Bytes>>>,
    /// Last known state per (source, op): true = failing.
    failing: Mutex<HashMap<(String, String), bool>>,
    pod: String,
}

fn host_of(url: &str) -> String {
    url.split("://")
        .nth(1)
        .and_then(|r| r.split(['/', '?']).next())
        .map(|h| h.rsplit('@').next().unwrap_or(h).to_string())
        .unwrap_or_else(|| "?".into())
}

impl Notifier {
    /// A notifier for `hooks`.
    pub fn new(hooks: Vec<Notify>, pod: String) -> Notifier {
        let client = if hooks.is_empty() {
            None
        } else {
            match hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
            {
                Ok(b) => Some(
                    Client::builder(TokioExecutor::new())
                        .build(b.https_or_http().enable_http1().build()),
                ),
                Err(e) => {
                    tracing::error!(error = %e, "Webhooks disabled: no usable TLS roots (install ca-certificates)");
                    None
                }
            }
        };
        Notifier {
            hooks,
            client,
            failing: Mutex::new(HashMap::new()),
            pod,
        }
    }

    /// Records a run's result; notifies only when the state changed (first failure, recovery).
    pub fn run_result(self: &Arc<Self>, source: &str, op: &str, error: Option<&str>) {
        let failing = error.is_some();
        let was = self
            .failing
            .lock()
            .ok()
            .and_then(|mut m| m.insert((source.to_string(), op.to_string()), failing));
        let event = match (was, failing) {
            (Some(true), false) => Event::Recovery,
            (Some(false) | None, true) => Event::Failure,
            _ => return,
        };
        let message = match error {
            Some(e) => format!("{op} of {source} failed: {e}"),
            None => format!("{op} of {source} succeeded again"),
        };
        self.send(event, source, op, message);
    }

    /// Notifies a change of an objective's state.
    pub fn objective(self: &Arc<Self>, source: &str, objective: &str, breached: bool, why: &str) {
        let (event, message) = if breached {
            (
                Event::Breach,
                format!("{objective} of {source} breached: {why}"),
            )
        } else {
            (Event::Met, format!("{objective} of {source} is met again"))
        };
        self.send(event, source, objective, message);
    }

    /// Notifies a gap in a physical source's WAL archive; every one, since each is news.
    pub fn wal_gap(self: &Arc<Self>, source: &str, message: String) {
        self.send(Event::Gap, source, "wal", message);
    }

    fn send(self: &Arc<Self>, event: Event, source: &str, op: &str, message: String) {
        let Some(client) = self.client.clone() else {
            return;
        };
        for hook in self.hooks.clone() {
            let body = match hook.format {
                NotifyFormat::Json => serde_json::json!({
                    "event": event.as_str(),
                    "source": source,
                    "op": op,
                    "message": message,
                    "at": Utc::now(),
                    "pod": self.pod,
                }),
                NotifyFormat::Slack => {
                    let icon = match event {
                        Event::Failure | Event::Breach | Event::Gap => ":rotating_light:",
                        Event::Recovery | Event::Met => ":white_check_mark:",
                    };
                    serde_json::json!({ "text": format!("{icon} lifeboat on {}: {message}", self.pod) })
                }
            }
            .to_string();
            let client = client.clone();
            tokio::spawn(async move {
                let host = host_of(hook.url.expose());
                for attempt in 0..3u32 {
                    let req = hyper::Request::post(hook.url.expose())
                        .header(hyper::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body.clone())));
                    let Ok(req) = req else {
                        tracing::warn!(host = %host, "Webhook URL is not usable");
                        return;
                    };
                    match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                        Ok(Ok(r)) if r.status().is_success() => return,
                        Ok(Ok(r)) => {
                            tracing::debug!(host = %host, status = %r.status(), attempt, "Webhook refused")
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(host = %host, error = %e, attempt, "Webhook failed")
                        }
                        Err(_) => tracing::debug!(host = %host, attempt, "Webhook timed out"),
                    }
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                }
                tracing::warn!(host = %host, "Webhook not delivered after 3 attempts");
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn only_the_host_of_a_webhook_is_ever_shown() {
        assert_eq!(
            host_of("https://hooks.slack.com/services/T0/B0/secret"),
            "hooks.slack.com"
        );
        assert_eq!(
            host_of("http://user:pw@127.0.0.1:8080/x?token=1"),
            "127.0.0.1:8080"
        );
    }
}
