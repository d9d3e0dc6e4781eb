//! The deadline watchdog through the `tocsin` binary with a controllable clock (`watchdog tick
//! --now`): reminders by email (a real SMTP server on loopback) and SMS (the signed webhook on
//! wiremock) at the configured points before each deadline, once each across separate
//! processes (every tick is a restart), an escalation once a deadline passes unfiled, a failed
//! send retried next round without repeating the ones that went.

mod common;

use common::smtp_server::SmtpServer;
use common::*;
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "watchdog-test-secret";

fn tick(t: &Tocsin, now: &str) -> Value {
    t.run(&["--json", "watchdog", "tick", "--now", now]).ok().json()
}

fn sent(report: &Value) -> (u64, u64, u64) {
    let n = |k: &str| report[k].as_u64().unwrap_or(u64::MAX);
    (n("reminders"), n("escalations"), n("failed"))
}

#[tokio::test]
async fn reminders_go_once_at_each_point_and_an_overdue_report_is_escalated() {
    let smtp = SmtpServer::start().await;
    let sms = MockServer::start().await;
    // The first text fails (the gateway is down); every later one is accepted.
    Mock::given(method("POST"))
        .and(path("/sms"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&sms)
        .await;
    Mock::given(method("POST"))
        .and(path("/sms"))
        .respond_with(ResponseTemplate::new(200).set_body_string(r#"{"id":"ok"}"#))
        .with_priority(2)
        .mount(&sms)
        .await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .webhook("sms", &format!("{}/sms", sms.uri()), SECRET)
        .set("TOCSIN_WATCHDOG__REMIND_BEFORE", "2h,30m")
        .set("TOCSIN_WATCHDOG__RESPONDERS", "duty@example.com, +8613800000001")
        .set("TOCSIN_WATCHDOG__ESCALATION", "ciso@example.com")
        .set("TOCSIN_WATCHDOG__SCHEDULE", "* * * * * *");
    let t = t;
    let merchants = repo("config/demo/merchants.jsonl");
    let t = tokio::task::spawn_blocking(move || {
        t.run(&["merchants", "import", merchants.to_str().expect("path")]).ok();
        let incident = confirmed_incident(&t, "watchdog");
        // Mainland China only: the CAC (4 hours from awareness at 03:45 UTC, so 07:45) and
        // PIPL 57 (24 hours, so 03:45 the next day) apply.
        t.run(&["--actor", "alice", "incidents", "scope", &incident, "--regions", "CN"])
            .ok();
        (t, incident)
    })
    .await
    .expect("setup");
    let (t, incident) = t;
    let mails = |to: &str| smtp.messages_to(to).len();

    let t = tokio::task::spawn_blocking(move || {
        assert_eq!(
            sent(&tick(&t, "2026-11-28T05:00:00Z")),
            (0, 0, 0),
            "no point reached yet"
        );
        // Two hours before the CAC's deadline: the duty responder by email and SMS; the
        // gateway is down, so the SMS waits.
        assert_eq!(sent(&tick(&t, "2026-11-28T05:50:00Z")), (1, 0, 1));
        // The next round (a new process) sends the waiting SMS and nothing twice.
        assert_eq!(sent(&tick(&t, "2026-11-28T05:55:00Z")), (1, 0, 0));
        assert_eq!(sent(&tick(&t, "2026-11-28T06:30:00Z")), (0, 0, 0));
        // Thirty minutes before.
        assert_eq!(sent(&tick(&t, "2026-11-28T07:20:00Z")), (2, 0, 0));
        assert_eq!(sent(&tick(&t, "2026-11-28T07:21:00Z")), (0, 0, 0));
        // Past the deadline, unfiled: the responders and the second contact, once.
        assert_eq!(sent(&tick(&t, "2026-11-28T08:00:00Z")), (0, 3, 0));
        assert_eq!(sent(&tick(&t, "2026-11-28T09:00:00Z")), (0, 0, 0));
        // A watchdog that first looks at the PIPL clock 15 minutes before its deadline sends
        // the 30-minute reminder only; the two-hour one is not sent late.
        assert_eq!(sent(&tick(&t, "2026-11-29T03:30:00Z")), (2, 0, 0));
        assert_eq!(sent(&tick(&t, "2026-11-29T03:31:00Z")), (0, 0, 0));
        let overdue = t.run(&["--json", "deadlines", &incident]).ok().json();
        let cac = overdue
            .as_array()
            .expect("list")
            .iter()
            .find(|c| c["regulator"] == "cn-cac")
            .cloned()
            .expect("the CAC clock is still listed");
        assert_eq!(cac["status"], "overdue", "overdue until filed");
        let reminders = t.run(&["--json", "watchdog", "reminders", &incident]).ok().json();
        (t, reminders)
    })
    .await
    .expect("ticks");
    let (t, reminders) = t;

    assert_eq!(mails("duty@example.com"), 4, "2h, 30m, overdue (CAC) and 30m (PIPL)");
    assert_eq!(mails("ciso@example.com"), 1, "the escalation only");
    let escalation = &smtp.messages_to("ciso@example.com")[0];
    let subject = escalation.header("Subject").unwrap_or_default();
    assert!(
        subject.contains("OVERDUE") && subject.contains("INC-2026-0001"),
        "{subject}"
    );
    let texts = sms.received_requests().await.unwrap_or_default();
    // One failed and five accepted: 2h (retried), 30m, overdue (CAC); 30m (PIPL).
    assert_eq!(texts.len(), 5);
    let keys: Vec<&str> = texts.iter().map(|r| header_text(r, "idempotency-key")).collect();
    assert_eq!(keys[0], keys[1], "the retry carries the failed send's idempotency key");
    for r in &texts {
        let body: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(body["to"], "+8613800000001");
        assert_eq!(body["kind"], "reminder");
        assert_signed(r, SECRET);
    }
    let list = reminders.as_array().expect("list");
    let skipped: Vec<&Value> = list.iter().filter(|r| r["status"] == "skipped").collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(
        (&skipped[0]["regulator"], &skipped[0]["point"]),
        (&Value::from("cn-pipl-57"), &Value::from("before:2h"))
    );
    assert!(list.iter().all(|r| r["status"] != "pending"), "nothing left unsent");

    // `tocsin serve` runs the watchdog on its schedule (here every second) at the real time:
    // the PIPL deadline has long passed, so its escalation goes out, once.
    let _server = t.serve();
    let escalated = eventually(std::time::Duration::from_secs(15), async || {
        (smtp.messages_to("ciso@example.com").len() >= 2).then_some(())
    })
    .await;
    assert!(
        escalated.is_some(),
        "serve's watchdog escalated the overdue PIPL report"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(mails("ciso@example.com"), 2, "and only once");
}

#[test]
fn a_bad_watchdog_setting_is_refused_naming_it() {
    let mut t = Tocsin::new();
    t.set("TOCSIN_WATCHDOG__RESPONDERS", "duty@example.com, 12345");
    let run = t.run(&["deadlines"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("watchdog.responders"), "{}", run.stderr);
    let mut t = Tocsin::new();
    t.set("TOCSIN_WATCHDOG__SCHEDULE", "*/5 * * * *");
    let run = t.run(&["deadlines"]);
    assert!(
        run.code != 0 && run.stderr.contains("watchdog.schedule"),
        "{}",
        run.stderr
    );
}

/// SMS reminders go through the SMS channel's named providers in failover order: Aliyun sends
/// only approved templates, so a reminder passes it over to Twilio, which takes free text.
#[tokio::test]
async fn sms_reminders_go_through_the_named_providers_that_take_free_text() {
    const SID: &str = "AC00000000000000000000000000000001";
    let twilio = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/2010-04-01/Accounts/{SID}/Messages.json")))
        .respond_with(ResponseTemplate::new(201).set_body_string(r#"{"sid":"SM1","status":"queued"}"#))
        .mount(&twilio)
        .await;
    let aliyun = MockServer::start().await;
    let mut t = Tocsin::new();
    t.set("TOCSIN_PROVIDERS__ALI__KIND", "aliyun_sms")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__ACCESS_KEY_ID", "LTAI5tTestKeyId")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__ACCESS_KEY_SECRET", "secret")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__SIGN_NAME", "示例商城")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__TEMPLATE_CODE", "SMS_000001")
        .set("TOCSIN_PROVIDERS__ALI__ALIYUN_SMS__BASE_URL", aliyun.uri())
        .set("TOCSIN_PROVIDERS__TW__KIND", "twilio")
        .set("TOCSIN_PROVIDERS__TW__TWILIO__ACCOUNT_SID", SID)
        .set("TOCSIN_PROVIDERS__TW__TWILIO__AUTH_TOKEN", "token")
        .set("TOCSIN_PROVIDERS__TW__TWILIO__FROM", "+15005550006")
        .set(
            "TOCSIN_PROVIDERS__TW__TWILIO__STATUS_CALLBACK_URL",
            "https://tocsin.example/hooks/twilio/tw",
        )
        .set("TOCSIN_PROVIDERS__TW__TWILIO__BASE_URL", twilio.uri())
        .set("TOCSIN_SMS__PROVIDERS", "ali,tw")
        .set("TOCSIN_WATCHDOG__REMIND_BEFORE", "2h")
        .set("TOCSIN_WATCHDOG__RESPONDERS", "+8613800000001");
    let t = tokio::task::spawn_blocking(move || {
        let incident = confirmed_incident(&t, "watchdog-providers");
        assert_eq!(sent(&tick(&t, "2026-11-28T05:50:00Z")), (1, 0, 0));
        assert_eq!(sent(&tick(&t, "2026-11-28T05:51:00Z")), (0, 0, 0), "once");
        (t, incident)
    })
    .await
    .expect("ticks");
    drop(t);
    assert!(
        aliyun.received_requests().await.unwrap_or_default().is_empty(),
        "a template-only provider is not asked to send free text"
    );
    let texts = twilio.received_requests().await.unwrap_or_default();
    assert_eq!(texts.len(), 1);
    let form = form_of(&texts[0]);
    let field = |k: &str| form_value(&form, k);
    assert_eq!(field("To"), Some("+8613800000001"));
    assert!(field("Body").is_some_and(|b| b.contains("INC-2026-0001")), "{form:?}");
    assert_eq!(field("StatusCallback"), None, "no receipt is awaited for a reminder");
}
