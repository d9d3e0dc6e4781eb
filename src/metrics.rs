//! The figures `/metrics` serves in the Prometheus text format (version 0.0.4). Everything
//! about deliveries and clocks is read from the database at scrape time, so every instance
//! sharing a database reports the same figures and a restart loses none; only the request
//! counters are the answering process's own.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::clocks::ClockView;
use crate::store::{DeliveryCount, ProviderHealth};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What one scrape reports.
pub struct Snapshot {
    pub deliveries: Vec<DeliveryCount>,
    pub clocks: Vec<ClockView>,
    pub providers: Vec<ProviderHealth>,
    /// Incidents by state.
    pub incidents: BTreeMap<String, u64>,
    pub now: DateTime<Utc>,
}

/// Requests answered by this process, by method, route template and status.
#[derive(Default)]
pub struct RequestCounter {
    counts: Mutex<BTreeMap<(String, String, u16), u64>>,
}

impl RequestCounter {
    pub fn record(&self, method: &str, route: &str, status: u16) {
        // A panic elsewhere while holding the lock leaves counts that are still counts.
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry((method.to_owned(), route.to_owned(), status)).or_default() += 1;
    }

    fn counts(&self) -> BTreeMap<(String, String, u16), u64> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A label value as the format wants it: backslash, double quote and newline escaped.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", label(v))).collect();
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{}}} {value}", labels.join(","));
    }
}

/// The exposition text of `snapshot` and this process's request counts.
pub fn render(snapshot: &Snapshot, requests: &RequestCounter) -> String {
    let mut out = String::new();

    family(
        &mut out,
        "tocsin_deliveries",
        "gauge",
        "Deliveries by channel, provider of the latest attempt (none before the first) and status: pending, sending, accepted, delivered, failed, dead, superseded.",
    );
    for d in &snapshot.deliveries {
        let provider = d.provider.as_deref().unwrap_or("none");
        sample(
            &mut out,
            "tocsin_deliveries",
            &[("channel", &d.channel), ("provider", provider), ("status", &d.status)],
            d.count,
        );
    }

    family(
        &mut out,
        "tocsin_queue_depth",
        "gauge",
        "Deliveries waiting in the outbox or in flight, by channel.",
    );
    let mut queue: BTreeMap<&str, i64> = BTreeMap::new();
    for d in &snapshot.deliveries {
        let depth = queue.entry(d.channel.as_str()).or_default();
        if matches!(d.status.as_str(), "pending" | "sending") {
            *depth += d.count;
        }
    }
    for (channel, depth) in &queue {
        sample(&mut out, "tocsin_queue_depth", &[("channel", channel)], depth);
    }

    family(
        &mut out,
        "tocsin_clock_slack_seconds",
        "gauge",
        "Seconds left before each running regulator deadline; negative once overdue.",
    );
    let mut overdue = 0u64;
    let mut least: Option<i64> = None;
    for c in &snapshot.clocks {
        let Some(due) = c.due_at else { continue };
        if !matches!(c.status, "open" | "overdue") {
            continue;
        }
        let slack = (due - snapshot.now).num_seconds();
        if slack < 0 {
            overdue += 1;
        }
        least = Some(least.map_or(slack, |l| l.min(slack)));
        sample(
            &mut out,
            "tocsin_clock_slack_seconds",
            &[
                ("incident", &c.reference),
                ("regulator", &c.regulator),
                ("stage", c.stage),
            ],
            slack,
        );
    }
    family(
        &mut out,
        "tocsin_clock_least_slack_seconds",
        "gauge",
        "The smallest slack of any running regulator deadline (absent when none runs).",
    );
    if let Some(least) = least {
        sample(&mut out, "tocsin_clock_least_slack_seconds", &[], least);
    }
    family(
        &mut out,
        "tocsin_clocks_overdue",
        "gauge",
        "Regulator deadlines passed without the report filed.",
    );
    sample(&mut out, "tocsin_clocks_overdue", &[], overdue);

    family(
        &mut out,
        "tocsin_provider_circuit_open",
        "gauge",
        "1 while a provider's circuit breaker holds its sends back.",
    );
    for p in &snapshot.providers {
        let open = p.open_until.is_some_and(|until| until > snapshot.now);
        sample(
            &mut out,
            "tocsin_provider_circuit_open",
            &[("provider", &p.provider)],
            u8::from(open),
        );
    }
    family(
        &mut out,
        "tocsin_provider_consecutive_failures",
        "gauge",
        "Failures in a row of each provider.",
    );
    for p in &snapshot.providers {
        sample(
            &mut out,
            "tocsin_provider_consecutive_failures",
            &[("provider", &p.provider)],
            p.consecutive_failures,
        );
    }

    family(&mut out, "tocsin_incidents", "gauge", "Incidents by state.");
    for (state, count) in &snapshot.incidents {
        sample(&mut out, "tocsin_incidents", &[("state", state)], count);
    }

    family(
        &mut out,
        "tocsin_http_requests_total",
        "counter",
        "Requests this process answered, by method, route and status.",
    );
    for ((method, route, status), count) in requests.counts() {
        sample(
            &mut out,
            "tocsin_http_requests_total",
            &[("method", &method), ("route", &route), ("status", &status.to_string())],
            count,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(channel: &str, provider: Option<&str>, status: &str, count: i64) -> DeliveryCount {
        DeliveryCount {
            channel: channel.into(),
            provider: provider.map(Into::into),
            status: status.into(),
            count,
        }
    }

    #[test]
    fn deliveries_queue_depth_and_requests_are_exposed() {
        let snapshot = Snapshot {
            deliveries: vec![
                count("email", Some("smtp"), "delivered", 7),
                count("email", None, "pending", 3),
                count("sms", Some("tw"), "sending", 2),
                count("sms", Some("tw"), "dead", 1),
            ],
            clocks: Vec::new(),
            providers: Vec::new(),
            incidents: BTreeMap::from([("confirmed".to_owned(), 1)]),
            now: Utc::now(),
        };
        let requests = RequestCounter::default();
        requests.record("GET", "/api/v1/incidents", 200);
        requests.record("GET", "/api/v1/incidents", 200);
        let text = render(&snapshot, &requests);
        for line in [
            "tocsin_deliveries{channel=\"email\",provider=\"smtp\",status=\"delivered\"} 7",
            "tocsin_deliveries{channel=\"email\",provider=\"none\",status=\"pending\"} 3",
            "tocsin_queue_depth{channel=\"email\"} 3",
            "tocsin_queue_depth{channel=\"sms\"} 2",
            "tocsin_incidents{state=\"confirmed\"} 1",
            "tocsin_clocks_overdue 0",
            "tocsin_http_requests_total{method=\"GET\",route=\"/api/v1/incidents\",status=\"200\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert!(
            !text.lines().any(|l| l.starts_with("tocsin_clock_least_slack_seconds")),
            "no clock runs"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
