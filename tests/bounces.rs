//! Bounces: delivery status notifications (RFC 3464) posted by the mail system to
//! `/hooks/email/dsn` of `tocsin serve`, built here for the Message-ID of a notice the test SMTP
//! server really received. A hard bounce ends the email channel and moves the merchant on to
//! SMS; a DSN without the bearer token is refused and changes nothing; a delay notice (and a
//! 4.x.x "failed") is recorded and changes nothing; a DSN for a message that is not ours is
//! counted unmatched.

mod common;

use std::time::Duration;

use common::smtp_server::SmtpServer;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "bounce-test-signing-secret";
const DSN_TOKEN: &str = "dsn-token-7f3a";
const HOLDINGS: &[&str] = &["account_credentials"];
const EMAIL: &str = "merchant@shop.example.net";
const PHONE: &str = "+8613800000101";

/// One merchant with email and phone; email over SMTP to `smtp`, SMS over the signed webhook
/// to `sms`; the notice approved and dispatched (the email accepted). Returns the Tocsin and
/// the incident id.
fn emailed(smtp: &SmtpServer, sms: &MockServer, key: &str) -> (Tocsin, String) {
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .webhook("sms", &format!("{}/sms", sms.uri()), SECRET)
        .set("TOCSIN_EMAIL__DSN_TOKEN", DSN_TOKEN);
    t.run(&[
        "merchants",
        "import",
        &t.file(
            "m.jsonl",
            &merchant("bm-1", "en", Some(EMAIL), Some(PHONE), None, HOLDINGS),
        ),
    ])
    .ok();
    let incident = confirmed_incident(&t, key);
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        "bm-1",
    ])
    .ok();
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    t.run(&["--actor", "bob", "incidents", "approve", &incident]).ok();
    let view = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "dispatch",
            &incident,
            "--timeout",
            "30",
        ])
        .ok()
        .json();
    assert_eq!(view["reached"], 1, "reached by email: {view:#}");
    (t, incident)
}

fn deliveries(t: &Tocsin, incident: &str) -> Vec<Value> {
    t.run(&["--json", "incidents", "deliveries", incident])
        .ok()
        .json()
        .as_array()
        .expect("a list of deliveries")
        .clone()
}

fn on(list: &[Value], channel: &str) -> Vec<Value> {
    list.iter().filter(|d| d["channel"] == channel).cloned().collect()
}

fn affected(t: &Tocsin, incident: &str) -> Value {
    t.run(&["--json", "incidents", "affected", incident]).ok().json()[0].clone()
}

fn history(t: &Tocsin, delivery: &Value) -> Vec<Value> {
    let id = delivery["id"].as_str().expect("delivery id");
    t.run(&["--json", "deliveries", "history", id]).ok().json()["events"]
        .as_array()
        .expect("events")
        .clone()
}

/// The Message-ID (without brackets) of the one notice the SMTP server received for `EMAIL`;
/// checks it is the one the email delivery recorded.
fn received_message_id(smtp: &SmtpServer, email: &Value) -> String {
    let got = smtp.messages_to(EMAIL);
    assert_eq!(got.len(), 1, "one notice by email");
    let mid = got[0].header("Message-ID").expect("the notice has a Message-ID");
    let mid = mid.trim_matches(['<', '>']).to_owned();
    assert_eq!(email["provider_message_id"], mid.as_str(), "{email:#}");
    mid
}

/// A Postfix-style RFC 3464 report about the message `message_id` sent to `rcpt`: a
/// `multipart/report` with the human-readable part, the `message/delivery-status` part
/// (per-message fields, then the recipient's `Action` and `Status`) and the returned headers.
fn dsn(message_id: &str, rcpt: &str, action: &str, status: &str, diagnostic: &str) -> String {
    let boundary = "4F2A21C0B2.1764556867/mx.shop.example.net";
    let human = if action == "delayed" {
        "####################################################################\r\n\
         # THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n\
         ####################################################################"
    } else {
        "I'm sorry to have to inform you that your message could not\r\n\
         be delivered to one or more recipients. It's attached below."
    };
    let subject = if action == "delayed" {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    [
        "Return-Path: <>",
        "Received: by mx.shop.example.net (Postfix)",
        "\tid 4F2A21C0B2; Tue,  1 Dec 2026 02:41:07 +0000 (UTC)",
        "Date: Tue,  1 Dec 2026 02:41:07 +0000 (UTC)",
        "From: MAILER-DAEMON@mx.shop.example.net (Mail Delivery System)",
        &format!("Subject: {subject}"),
        "To: security@example.com",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        &format!("\tboundary=\"{boundary}\""),
        "Content-Transfer-Encoding: 8bit",
        "Message-Id: <20261201024107.5E1F41C0B3@mx.shop.example.net>",
        "",
        "This is a MIME-encapsulated message.",
        "",
        &format!("--{boundary}"),
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        "This is the mail system at host mx.shop.example.net.",
        "",
        human,
        "",
        &format!("<{rcpt}>: {diagnostic}"),
        "",
        &format!("--{boundary}"),
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        "Reporting-MTA: dns; mx.shop.example.net",
        "X-Postfix-Queue-ID: 4F2A21C0B2",
        "X-Postfix-Sender: rfc822; security@example.com",
        "Arrival-Date: Tue,  1 Dec 2026 02:41:06 +0000 (UTC)",
        "",
        &format!("Final-Recipient: rfc822; {rcpt}"),
        &format!("Original-Recipient: rfc822;{rcpt}"),
        &format!("Action: {action}"),
        &format!("Status: {status}"),
        "Remote-MTA: dns; mail.shop.example.net",
        &format!("Diagnostic-Code: smtp; {diagnostic}"),
        "",
        &format!("--{boundary}"),
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        "Content-Transfer-Encoding: 8bit",
        "",
        "Return-Path: <security@example.com>",
        "From: Example Marketplace Security <security@example.com>",
        &format!("To: {rcpt}"),
        "Subject: Security incident notice",
        "Message-ID:",
        &format!(" <{message_id}>"),
        "MIME-Version: 1.0",
        "",
        &format!("--{boundary}--"),
        "",
    ]
    .join("\r\n")
}

fn hard_bounce(message_id: &str) -> String {
    dsn(
        message_id,
        EMAIL,
        "failed",
        "5.1.1",
        "550 5.1.1 <merchant@shop.example.net>: Recipient address rejected: User unknown in virtual mailbox table",
    )
}

/// Posts `body` to `/hooks/email/dsn` with `authorization` (the whole header value) if given;
/// returns the status and the body as JSON.
async fn post_dsn(server: &Server, authorization: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/hooks/email/dsn", server.base))
        .header("Content-Type", "message/rfc822")
        .body(body.to_owned());
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    let response = request.send().await.expect("post the DSN");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json)
}

fn bearer() -> String {
    format!("Bearer {DSN_TOKEN}")
}

async fn sms_gateway() -> MockServer {
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "sms-ok"})))
        .mount(&sms)
        .await;
    sms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_bounce_moves_the_merchant_to_the_next_channel() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::start().await;
    let sms = sms_gateway().await;
    let (t, incident) = emailed(&smtp, &sms, "hard-bounce");
    let list = deliveries(&t, &incident);
    assert_eq!(list.len(), 1, "email only, so far: {list:#?}");
    let email = on(&list, "email").remove(0);
    assert_eq!(email["status"], "accepted");
    let mid = received_message_id(&smtp, &email);
    assert_eq!(affected(&t, &incident)["reached_channel"], "email");
    assert!(sms.received_requests().await.expect("recorded").is_empty());

    let server = t.serve();
    let (status, tally) = post_dsn(&server, Some(&bearer()), &hard_bounce(&mid)).await;
    assert_eq!(status, 200, "{tally}");
    assert_eq!(tally, json!({"matched": 1, "changed": 1, "unmatched": 0}));

    // The worker of `serve` sends the SMS fallback.
    let list = eventually(Duration::from_secs(20), async || {
        let list = deliveries(&t, &incident);
        on(&list, "sms")
            .first()
            .is_some_and(|d| d["status"] == "accepted")
            .then_some(list)
    })
    .await
    .unwrap_or_else(|| panic!("no SMS fallback accepted: {:#?}", deliveries(&t, &incident)));
    let email = on(&list, "email").remove(0);
    assert_eq!(email["status"], "failed", "{email:#}");
    assert_eq!(email["error_kind"], "bounced");
    assert_eq!(email["error_class"], "permanent");
    assert_eq!(email["attempts"], 1, "a bounce is not a reason to send the email again");
    let sms_delivery = on(&list, "sms");
    assert_eq!(sms_delivery.len(), 1, "{list:#?}");
    assert_eq!(sms_delivery[0]["address"], PHONE);
    assert_eq!(sms_delivery[0]["plan_position"], 1);
    let requests = sms.received_requests().await.expect("recorded");
    assert_eq!(requests.len(), 1, "one SMS");
    let body: Value = serde_json::from_slice(&requests[0].body).expect("JSON");
    assert_eq!(body["to"], PHONE);
    assert_eq!(smtp.messages_to(EMAIL).len(), 1, "the email was not sent again");
    let reached = eventually(Duration::from_secs(10), async || {
        let a = affected(&t, &incident);
        (a["reached_channel"] == "sms").then_some(a)
    })
    .await;
    assert!(
        reached.is_some(),
        "the merchant counts as reached by SMS: {:#}",
        affected(&t, &incident)
    );
    let events = history(&t, &email);
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "receipt" && e["outcome"] == "failed" && e["error_kind"] == "bounced"),
        "the bounce is in the email's history: {events:#?}"
    );
    let detail = events
        .iter()
        .find(|e| e["event"] == "receipt")
        .and_then(|e| e["detail"].as_str())
        .unwrap_or_default()
        .to_owned();
    assert!(detail.contains("5.1.1"), "{detail}");
    assert!(
        !detail.contains(EMAIL),
        "the recorded detail holds no address: {detail}"
    );

    // The same bounce again (mail systems resend): matched, nothing more happens.
    let (status, tally) = post_dsn(&server, Some(&bearer()), &hard_bounce(&mid)).await;
    assert_eq!(status, 200);
    assert_eq!(tally, json!({"matched": 1, "changed": 0, "unmatched": 0}));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(deliveries(&t, &incident).len(), 2, "no further fallback");
    assert_eq!(sms.received_requests().await.expect("recorded").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dsn_without_the_token_is_refused() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::start().await;
    let sms = sms_gateway().await;
    let (t, incident) = emailed(&smtp, &sms, "no-token");
    let email = on(&deliveries(&t, &incident), "email").remove(0);
    let mid = received_message_id(&smtp, &email);
    let bounce = hard_bounce(&mid);

    let server = t.serve();
    let refusals = [
        ("no Authorization", None),
        ("another token", Some("Bearer not-the-dsn-token".to_owned())),
        ("the token with a suffix", Some(format!("Bearer {DSN_TOKEN}x"))),
        ("a prefix of the token", Some(format!("Bearer {}", &DSN_TOKEN[..4]))),
        ("an empty bearer token", Some("Bearer ".to_owned())),
        ("the token without a scheme", Some(DSN_TOKEN.to_owned())),
        ("the token as Basic credentials", Some(format!("Basic {DSN_TOKEN}"))),
    ];
    for (what, authorization) in &refusals {
        let (status, problem) = post_dsn(&server, authorization.as_deref(), &bounce).await;
        assert_eq!(status, 403, "{what}: {problem}");
        assert_eq!(problem["status"], 403, "{what}: a problem document: {problem}");
        assert!(
            problem["detail"].as_str().is_some_and(|d| d.contains("dsn_token")),
            "{what}: {problem}"
        );
    }
    // Nothing changed: the email stands, no fallback, nothing in its history.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let list = deliveries(&t, &incident);
    assert_eq!(list.len(), 1, "{list:#?}");
    assert_eq!(list[0]["status"], "accepted");
    assert_eq!(affected(&t, &incident)["reached_channel"], "email");
    assert!(
        !history(&t, &email).iter().any(|e| e["event"] == "receipt"),
        "a refused DSN leaves no trace on the delivery"
    );
    assert!(sms.received_requests().await.expect("recorded").is_empty());

    // With the token the same body is taken (the refusals were about the token alone).
    let (status, tally) = post_dsn(&server, Some(&bearer()), &bounce).await;
    assert_eq!((status, tally["changed"].clone()), (200, json!(1)), "{tally}");
    drop(server);

    // A server without a configured token refuses every DSN, even one with an empty token.
    let mut off = Tocsin::new();
    off.smtp(smtp.port());
    let server = off.serve();
    for authorization in [None, Some("Bearer "), Some("Bearer x")] {
        let (status, problem) = post_dsn(&server, authorization, &bounce).await;
        assert_eq!(status, 403, "{authorization:?}: {problem}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_notice_changes_nothing() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::start().await;
    let sms = sms_gateway().await;
    let (t, incident) = emailed(&smtp, &sms, "delayed");
    let email = on(&deliveries(&t, &incident), "email").remove(0);
    let mid = received_message_id(&smtp, &email);
    let server = t.serve();

    // Postfix's "still being retried" warning.
    let delayed = dsn(
        &mid,
        EMAIL,
        "delayed",
        "4.4.1",
        "connect to mail.shop.example.net[203.0.113.7]:25: Connection timed out",
    );
    let (status, tally) = post_dsn(&server, Some(&bearer()), &delayed).await;
    assert_eq!(status, 200, "{tally}");
    assert_eq!(tally, json!({"matched": 1, "changed": 0, "unmatched": 0}));
    // A "failed" with a transient (4.x.x) status is no bounce either.
    let soft = dsn(
        &mid,
        EMAIL,
        "failed",
        "4.2.2",
        "452 4.2.2 <merchant@shop.example.net>: Mailbox full",
    );
    let (status, tally) = post_dsn(&server, Some(&bearer()), &soft).await;
    assert_eq!(status, 200, "{tally}");
    assert_eq!(tally, json!({"matched": 1, "changed": 0, "unmatched": 0}));
    // A hard bounce of a message that is not ours (an unknown Message-ID) matches nothing.
    let (status, tally) = post_dsn(
        &server,
        Some(&bearer()),
        &hard_bounce("0f3c1b2a9d8e7f6a5b4c3d2e1f0a9b8c@example.com"),
    )
    .await;
    assert_eq!(status, 200, "{tally}");
    assert_eq!(tally, json!({"matched": 0, "changed": 0, "unmatched": 1}));

    tokio::time::sleep(Duration::from_millis(500)).await;
    let list = deliveries(&t, &incident);
    assert_eq!(list.len(), 1, "no fallback: {list:#?}");
    assert_eq!(list[0]["status"], "accepted", "{:#}", list[0]);
    assert!(list[0]["error_kind"].is_null());
    assert_eq!(affected(&t, &incident)["reached_channel"], "email");
    assert!(sms.received_requests().await.expect("recorded").is_empty());
    assert_eq!(smtp.messages_to(EMAIL).len(), 1);
    // Both notices were matched and recorded as progress on the delivery.
    let progress: Vec<Value> = history(&t, &email)
        .into_iter()
        .filter(|e| e["event"] == "receipt")
        .collect();
    assert_eq!(progress.len(), 2, "{progress:#?}");
    assert!(progress.iter().all(|e| e["outcome"] == "in_progress"), "{progress:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_that_overtakes_the_recorded_acceptance_is_not_lost() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::start().await;
    let sms = sms_gateway().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .webhook("sms", &format!("{}/sms", sms.uri()), SECRET)
        .set("TOCSIN_EMAIL__DSN_TOKEN", DSN_TOKEN);
    t.run(&[
        "merchants",
        "import",
        &t.file(
            "m.jsonl",
            &merchant("bm-1", "en", Some(EMAIL), Some(PHONE), None, HOLDINGS),
        ),
    ])
    .ok();
    let incident = confirmed_incident(&t, "race");
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        "bm-1",
    ])
    .ok();
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    t.run(&["--actor", "bob", "incidents", "approve", &incident]).ok();
    t.run(&["--actor", "alice", "incidents", "dispatch", &incident, "--no-wait"])
        .ok();

    // The relay has the message but holds its 250 (a slow relay, or the other sends of the
    // batch still going): the delivery is `sending` while the mail system already bounces it.
    smtp.set_data_delay(Duration::from_secs(3));
    let server = t.serve();
    let start = std::time::Instant::now();
    while smtp.count() == 0 {
        assert!(start.elapsed() < Duration::from_secs(20), "the notice never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mid = smtp.messages()[0]
        .header("Message-ID")
        .expect("Message-ID")
        .trim_matches(['<', '>'])
        .to_owned();
    let email = on(&deliveries(&t, &incident), "email").remove(0);
    assert_eq!(
        email["status"], "sending",
        "the acceptance is not recorded yet: {email:#}"
    );
    let (status, tally) = post_dsn(&server, Some(&bearer()), &hard_bounce(&mid)).await;
    assert_eq!(status, 200, "{tally}");

    // Whatever the tally says, the bounce must not be lost: once the send is recorded, the
    // email is failed as bounced and the merchant moves on to SMS.
    let list = eventually(Duration::from_secs(20), async || {
        let list = deliveries(&t, &incident);
        on(&list, "sms")
            .first()
            .is_some_and(|d| d["status"] == "accepted")
            .then_some(list)
    })
    .await
    .unwrap_or_else(|| panic!("the bounce (tally {tally}) was lost: {:#?}", deliveries(&t, &incident)));
    let email = on(&list, "email").remove(0);
    assert_eq!(email["status"], "failed", "{email:#}");
    assert_eq!(email["error_kind"], "bounced");
    // Its history tells it in the order it happened: sent, then bounced (though the bounce was
    // recorded first).
    let steps: Vec<String> = history(&t, &email)
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["event"].as_str().unwrap_or("-"),
                e["outcome"].as_str().unwrap_or("-")
            )
        })
        .collect();
    assert_eq!(steps, ["attempt/accepted", "receipt/failed"], "{steps:?}");
}
