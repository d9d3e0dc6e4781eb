//! What operators watch: `/metrics` in the Prometheus text format, the `/healthz` and
//! `/readyz` probes, and logs that never carry a merchant's email address or phone number.

mod common;

use std::time::Duration;

use common::smtp_server::{Reply, SmtpServer};
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Runs an incident over the API from the event to the deliveries settling: `alice` (a
/// responder) confirms, scopes every merchant holding credentials and drafts; `bob` approves;
/// returns the incident's id and its view once it reaches monitoring.
async fn deliver_incident(api: &Api, key: &str) -> (String, Value) {
    let ev: Value = serde_json::from_str(&event(&format!("{key}-e1"), key)).expect("event");
    let (status, outcome, _) = api.post("alice", "/api/v1/events", ev).await;
    assert_eq!(status, 202, "{outcome}");
    let id = outcome[0]["incident_id"].as_str().expect("incident id").to_owned();
    let facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("facts are JSON");
    let steps = [
        ("alice", "confirm", json!({ "facts": facts })),
        (
            "alice",
            "scope",
            json!({ "rule": { "any_categories": ["account_credentials"] } }),
        ),
        ("alice", "draft", json!({})),
        ("bob", "approve", json!({})),
        ("alice", "dispatch", json!({})),
    ];
    for (who, action, body) in steps {
        let (status, answer, _) = api.post(who, &format!("/api/v1/incidents/{id}/{action}"), body).await;
        assert!(status < 300, "{action}: {status} {answer}");
    }
    let view = eventually(Duration::from_secs(30), async || {
        let (_, v) = api.get("alice", &format!("/api/v1/incidents/{id}")).await;
        (v["incident"]["state"] == "monitoring").then_some(v)
    })
    .await
    .expect("the deliveries settle and the incident reaches monitoring");
    (id, view)
}

/// `GET path` without a token: status, JSON body, content type.
async fn public_get(server: &Server, path: &str) -> (u16, Value, String) {
    let url = format!("{}{path}", server.base);
    answer(reqwest::get(&url).await.unwrap_or_else(|e| panic!("GET {url}: {e}"))).await
}

/// The value of the sample whose name and labels are exactly `series` (`name{a="b",...}`).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_report_deliveries_queue_and_clocks_and_the_probes_answer() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::start().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__SWEEP_SCHEDULE", "* * * * * *");
    let merchants = [
        merchant(
            "obs-1",
            "en",
            Some("one@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant(
            "obs-2",
            "zh-CN",
            Some("two@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
    ]
    .join("\n");
    t.run(&["merchants", "import", &t.file("m.jsonl", &merchants)]).ok();
    let server = t.serve();
    let api = t.api(
        &server,
        &[("alice", "responder"), ("bob", "approver"), ("olga", "auditor")],
    );
    let client = reqwest::Client::new();

    // The probes need no token and hold no data.
    let (status, _, _) = public_get(&server, "/healthz").await;
    assert_eq!(status, 200);
    let (status, ready, _) = public_get(&server, "/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(
        ready,
        json!({ "ready": true, "checks": { "database": "ok", "publish_dir": "ok" } })
    );

    // The metrics do need one.
    let (status, _, _) = public_get(&server, "/metrics").await;
    assert_eq!(status, 401);

    let (id, view) = deliver_incident(&api, "obs").await;
    let reference = view["incident"]["reference"].as_str().expect("reference").to_owned();

    let r = client
        .get(format!("{}/metrics", server.base))
        .bearer_auth(api.token_of("olga"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status().as_u16(), 200);
    let ctype = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = r.text().await.expect("text");

    // Every line is a comment or a `series value` sample.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
        assert!(series.starts_with("tocsin_"), "{line}");
        assert!(value.parse::<f64>().is_ok(), "{line}");
    }
    // Both emails went out through the SMTP provider, and nothing waits.
    let (_, deliveries) = api.get("alice", &format!("/api/v1/incidents/{id}/deliveries")).await;
    let provider = deliveries[0]["provider"].as_str().expect("provider").to_owned();
    let sent: f64 = ["accepted", "delivered"]
        .iter()
        .filter_map(|status| {
            sample(
                &text,
                &format!("tocsin_deliveries{{channel=\"email\",provider=\"{provider}\",status=\"{status}\"}}"),
            )
        })
        .sum();
    assert_eq!(sent, 2.0, "{text}");
    assert_eq!(
        sample(&text, "tocsin_queue_depth{channel=\"email\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "tocsin_incidents{state=\"monitoring\"}"),
        Some(1.0),
        "{text}"
    );

    // Each running regulator clock has its slack; the overdue count agrees with them.
    let (_, clocks) = api.get("alice", &format!("/api/v1/deadlines?incident={id}")).await;
    let clocks = clocks.as_array().expect("clocks");
    assert!(!clocks.is_empty(), "the demo facts start the CAC clock");
    let mut overdue = 0;
    for clock in clocks {
        let series = format!(
            "tocsin_clock_slack_seconds{{incident=\"{reference}\",regulator=\"{}\",stage=\"{}\"}}",
            clock["regulator"].as_str().expect("regulator"),
            clock["stage"].as_str().expect("stage"),
        );
        let slack = sample(&text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
        let minutes = clock["minutes_left"].as_f64().expect("minutes left");
        assert!(
            (slack / 60.0 - minutes).abs() <= 2.0,
            "{series} {slack} vs {minutes} min"
        );
        overdue += usize::from(slack < 0.0);
    }
    assert_eq!(sample(&text, "tocsin_clocks_overdue"), Some(overdue as f64));
    // Requests counted by route template, never by a path that could carry an id or a token.
    assert!(
        sample(
            &text,
            "tocsin_http_requests_total{method=\"GET\",route=\"/api/v1/incidents/{id}\",status=\"200\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(!text.contains(&id), "no incident id in a route label");
    assert!(!text.contains("@example.com"), "no address in the metrics");

    // The readiness probe fails, naming the check, when the bulletins cannot be published.
    let bulletins = t.data_dir().join("publish").join("bulletins");
    std::fs::remove_dir_all(&bulletins).expect("remove the publish directory");
    std::fs::write(&bulletins, "not a directory").expect("put a file in its place");
    let (status, ready, _) = public_get(&server, "/readyz").await;
    assert_eq!(status, 503, "{ready}");
    assert_eq!(ready["checks"]["publish_dir"], "failed");
    assert_eq!(ready["checks"]["database"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_email_address_or_phone_number_of_a_merchant_reaches_the_logs() {
    tocsin::install_crypto_provider();
    // Peers that repeat the address in their refusals, as real ones do.
    let smtp = SmtpServer::refusing("gone.merchant@example.cn", Reply::PermanentNamingAddress).await;
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("13900000302"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "code": 21211, "status": 400,
            "message": "The 'To' number +8613900000302 is not a valid phone number.",
        })))
        .mount(&twilio)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "sid": "SM00000000000000000000000000000301", "status": "queued",
        })))
        .mount(&twilio)
        .await;

    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_DELIVERY__SWEEP_SCHEDULE", "* * * * * *")
        .set("TOCSIN_PROVIDERS__TW__KIND", "twilio")
        .set(
            "TOCSIN_PROVIDERS__TW__TWILIO__ACCOUNT_SID",
            "AC00000000000000000000000000000042",
        )
        .set("TOCSIN_PROVIDERS__TW__TWILIO__AUTH_TOKEN", "twilio-auth-token-42")
        .set("TOCSIN_PROVIDERS__TW__TWILIO__FROM", "+15005550006")
        .set("TOCSIN_PROVIDERS__TW__TWILIO__BASE_URL", twilio.uri())
        .set("TOCSIN_SMS__PROVIDERS", "tw")
        // Everything Tocsin and its libraries say, down to debug.
        .set("TOCSIN_LOG", "debug")
        .set("TOCSIN_LOG_FORMAT", "json");
    let people = [
        ("log-1", "en", "li.wei@example.cn", "+8613900000301"),
        ("log-2", "zh-CN", "gone.merchant@example.cn", "+8613900000302"),
        ("log-3", "zh-CN", "zhang.min@example.com", "+8613900000303"),
        ("log-4", "en", "ops+notices@shop.example.org", "+14155550104"),
    ];
    let merchants: Vec<String> = people
        .iter()
        .map(|(id, locale, email, phone)| {
            merchant(
                id,
                locale,
                Some(email),
                Some(phone),
                None,
                &["account_credentials", "phone_number", "settlement_account"],
            )
        })
        .collect();
    let import = t
        .run(&["merchants", "import", &t.file("m.jsonl", &merchants.join("\n"))])
        .ok();
    let server = t.serve_logged("server.log");
    let api = t.api(&server, &[("alice", "responder"), ("bob", "approver")]);

    let (id, view) = deliver_incident(&api, "logs").await;
    assert!(
        smtp.messages_to("li.wei@example.cn").len() == 1,
        "the email went out: {view}"
    );
    // The rest of the incident: the bulletin, the regulator reports, the close.
    for (action, body) in [
        ("bulletin", json!({})),
        ("filings", json!({})),
        ("close", json!({ "reason": "handled" })),
    ] {
        let (status, answer, _) = api
            .post("alice", &format!("/api/v1/incidents/{id}/{action}"), body)
            .await;
        assert!(status < 300, "{action}: {status} {answer}");
    }
    let (_, deliveries) = api.get("alice", &format!("/api/v1/incidents/{id}/deliveries")).await;
    let refused = deliveries
        .as_array()
        .expect("deliveries")
        .iter()
        .filter(|d| d["status"] == "failed" || d["status"] == "dead")
        .count();
    assert!(refused >= 2, "both refusals were recorded: {deliveries:#}");
    server.terminate();

    let server_log = t.log("server.log");
    // Structured: one JSON object per line, with its level and fields.
    for line in server_log.lines() {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(entry["level"].is_string() && entry["fields"].is_object(), "{line}");
    }
    let log = format!("{}\n{server_log}", import.stderr);
    assert!(log.lines().count() > 50, "the server logged at debug:\n{log}");
    assert!(
        log.contains("send failed for good"),
        "the refusals that repeated the address and the number were logged:\n{log}"
    );
    for (id, _, email, phone) in people {
        let national = phone.trim_start_matches("+86").trim_start_matches("+1");
        for secret in [email, phone, &phone[1..], national] {
            assert!(!log.contains(secret), "{id}'s {secret} is in the log:\n{log}");
        }
    }
}
