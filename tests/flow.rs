//! The whole flow through the `tocsin` binary, delivering to a real SMTP server and to HTTP
//! providers (wiremock) on loopback, then checking what each merchant received where.

mod common;

use common::smtp_server::{Reply, SmtpServer};
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{body_partial_json, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "test-signing-secret";

fn directory() -> String {
    let all = ["account_credentials", "phone_number", "settlement_account"];
    [
        merchant("a-ok", "en", Some("ok@example.com"), Some("+8613800000001"), None, &all),
        merchant(
            "b-bounce",
            "zh-CN",
            Some("bounce@example.com"),
            Some("+8613800000002"),
            None,
            &all,
        ),
        merchant("c-flaky", "en", Some("flaky@example.com"), None, None, &all),
        merchant("d-sms", "zh-CN", None, Some("+8613800000004"), None, &all),
        merchant(
            "e-smsbad",
            "en",
            None,
            Some("+8613800000005"),
            Some("push-token-e-0000"),
            &all,
        ),
        merchant("f-none", "zh-CN", None, None, None, &all),
        merchant("g-pushbad", "en", None, None, Some("push-token-g-0000"), &all),
        merchant("h-unaffected", "en", Some("h@example.com"), None, None, &["media"]),
    ]
    .join("\n")
}

fn requests_to(requests: &[wiremock::Request], to: &str) -> Vec<Value> {
    requests
        .iter()
        .map(|r| serde_json::from_slice::<Value>(&r.body).expect("webhook body is JSON"))
        .filter(|b| b["to"] == to)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notices_reach_each_merchant_on_the_right_channel_with_retries_and_fallback() {
    let smtp = SmtpServer::start().await;
    smtp.set_rcpt_policy(|rcpt, tries| match rcpt {
        "bounce@example.com" => Reply::Permanent,
        "flaky@example.com" if tries == 0 => Reply::Transient,
        _ => Reply::Accept,
    });
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"to": "+8613800000005"})))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({"error": "invalid number"})))
        .with_priority(1)
        .mount(&sms)
        .await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"to": "+8613800000004"})))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "0"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&sms)
        .await;
    Mock::given(method("POST"))
        .and(path("/sms"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": "sms-accepted"})))
        .with_priority(5)
        .mount(&sms)
        .await;
    let push = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_partial_json(json!({"to": "push-token-g-0000"})))
        .respond_with(ResponseTemplate::new(410).set_body_json(json!({"error": "unregistered"})))
        .with_priority(1)
        .mount(&push)
        .await;
    Mock::given(method("POST"))
        .and(path("/push"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"message_id": "push-accepted"})))
        .with_priority(5)
        .mount(&push)
        .await;

    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .webhook("sms", &format!("{}/sms", sms.uri()), SECRET)
        .webhook("push", &format!("{}/push", push.uri()), SECRET);

    let merchants = t.file("merchants.jsonl", &directory());
    t.run(&["merchants", "import", &merchants]).ok();
    let events = t.file("events.jsonl", &event("e-1", "k-1"));
    let ingested = t.run(&["--json", "events", "ingest", &events]).ok().json();
    let incident = ingested[0]["incident_id"].as_str().expect("incident id").to_owned();
    // The incident names its own contact desk; notices and the bulletin must carry it.
    let mut facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("json");
    facts["contact"] = json!({ "email": "incident-desk@example.com" });
    let facts = t.file("facts.json", &facts.to_string());
    t.run(&["--actor", "alice", "incidents", "confirm", &incident, "--facts", &facts])
        .ok();
    let filed = file_report(&t, &incident, "cn-cac", "initial");
    assert_eq!(filed["deadline_at"], "2026-11-28T07:45:00Z", "{filed}");
    let scope = t
        .run(&[
            "--json",
            "--actor",
            "alice",
            "incidents",
            "scope",
            &incident,
            "--categories",
            "account_credentials,phone_number",
        ])
        .ok()
        .json();
    assert_eq!(scope["affected"], 7, "h-unaffected holds none of the exposed data");
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    let same = t.run(&["--actor", "alice", "incidents", "approve", &incident]);
    assert_ne!(same.code, 0);
    assert!(same.stderr.contains("four eyes"), "{}", same.stderr);
    let view = draft_approve_dispatch(&t, &incident);

    // Email: real SMTP, one message per reachable mailbox.
    let ok = smtp.messages_to("ok@example.com");
    assert_eq!(ok.len(), 1);
    let mail = &ok[0].data;
    assert!(mail.contains("Subject: Notice of Data Breach"), "{mail}");
    assert!(mail.contains("Message-ID: <"), "{mail}");
    assert!(
        !mail.contains("List-Unsubscribe"),
        "a mandatory notice offers no unsubscribe"
    );
    assert!(mail.contains("Content-Type: text/html") && mail.contains("Content-Type: text/plain"));
    assert!(smtp.messages_to("bounce@example.com").is_empty());
    assert_eq!(
        smtp.messages_to("flaky@example.com").len(),
        1,
        "retried after the 451 and delivered once"
    );
    assert!(smtp.messages_to("h@example.com").is_empty());

    // SMS: signed webhook; b fell back from email; d retried after a 503; e was refused.
    let sms_requests = sms.received_requests().await.expect("recorded");
    for r in &sms_requests {
        let ts = r
            .headers
            .get("x-tocsin-timestamp")
            .expect("timestamp header")
            .to_str()
            .expect("ascii");
        let sig = r
            .headers
            .get("x-tocsin-signature")
            .expect("signature header")
            .to_str()
            .expect("ascii");
        assert_eq!(sig, expected_signature(SECRET, ts, &r.body));
        assert!(r.headers.get("idempotency-key").is_some());
    }
    let b = requests_to(&sms_requests, "+8613800000002");
    assert_eq!(b.len(), 1);
    assert_eq!(b[0]["locale"], "zh-CN");
    let link = b[0]["url"].as_str().expect("the SMS carries its notice link");
    assert!(link.contains("/n/"), "{link}");
    assert!(
        b[0]["text"]
            .as_str()
            .is_some_and(|s| s.contains(link) && s.chars().count() <= 70),
        "a Chinese SMS links to the merchant's own notice within one segment: {}",
        b[0]["text"]
    );
    assert_eq!(
        requests_to(&sms_requests, "+8613800000004").len(),
        2,
        "503 then delivered"
    );
    assert_eq!(
        requests_to(&sms_requests, "+8613800000005").len(),
        1,
        "a 400 is not retried"
    );
    assert!(
        requests_to(&sms_requests, "+8613800000001").is_empty(),
        "a reached on email gets no SMS"
    );

    // Push: e fell back from SMS; g's token was refused.
    let push_requests = push.received_requests().await.expect("recorded");
    let e = requests_to(&push_requests, "push-token-e-0000");
    assert_eq!(e.len(), 1);
    assert!(e[0]["title"].is_string() && e[0]["body"].is_string());
    assert_eq!(requests_to(&push_requests, "push-token-g-0000").len(), 1);

    // The incident's record.
    assert_eq!(view["incident"]["state"], "monitoring");
    assert_eq!(view["reached"], 5);
    let mut unreachable: Vec<&str> = view["unreachable"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    unreachable.sort();
    assert_eq!(unreachable, ["f-none", "g-pushbad"]);
    assert_eq!(view["bulletins"][0]["covered"], 2);

    let deliveries = t.run(&["--json", "incidents", "deliveries", &incident]).ok().json();
    let find = |m: &str, ch: &str| {
        deliveries
            .as_array()
            .expect("list")
            .iter()
            .find(|d| d["merchant_id"] == m && d["channel"] == ch)
            .cloned()
            .expect("delivery")
    };
    assert_eq!(find("c-flaky", "email")["attempts"], 2);
    assert_eq!(find("b-bounce", "email")["status"], "failed");
    assert_eq!(find("b-bounce", "email")["error_class"], "permanent");
    assert_eq!(find("b-bounce", "sms")["status"], "accepted");
    assert_eq!(find("e-smsbad", "push")["provider_message_id"], "push-accepted");

    // The bulletin is public: the five elements, and nobody's personal data.
    let reference = view["incident"]["reference"].as_str().expect("reference");
    let folder = t.data_dir().join("publish/bulletins").join(reference);
    let page = std::fs::read_to_string(folder.join("index.en.html")).expect("bulletin page");
    for needle in ["What happened", "incident-desk@example.com"] {
        assert!(page.contains(needle), "bulletin lacks {needle}");
    }
    for personal in ["f-none", "g-pushbad", "Merchant ", "+86138", "ok@example.com"] {
        assert!(!page.contains(personal), "bulletin leaks {personal}");
    }
    assert!(
        std::fs::read_to_string(folder.join("feed.atom"))
            .expect("feed")
            .contains("<entry>")
    );

    // The regulator filing: CAC initial report due 4 hours after awareness.
    let filing: Value = serde_json::from_str(
        &std::fs::read_to_string(t.data_dir().join("filings").join(reference).join("cn-cac-initial.json"))
            .expect("filing"),
    )
    .expect("filing JSON");
    assert_eq!(filing["deadline_at"], "2026-11-28T07:45:00.000000Z");
    assert_eq!(filing["items"].as_array().map(Vec::len), Some(8));

    // A notice reads back as JSON with its sections.
    let notices = t.run(&["--json", "notices", "list", &incident]).ok().json();
    let first = notices[0][0].as_str().expect("notice id");
    let notice = t.run(&["--json", "notices", "show", first]).ok().json();
    for section in ["impact", "measures", "advice", "remedies", "contact"] {
        assert!(
            notice["notice"]["sections"][section]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{section} empty"
        );
    }
    assert!(
        notice["notice"]["email_text"]
            .as_str()
            .is_some_and(|s| s.contains("incident-desk@example.com"))
    );

    t.run(&["audit", "verify"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incomplete_notice_is_refused_with_the_list_of_what_is_missing() {
    let t = Tocsin::new();
    let merchants = t.file(
        "m.jsonl",
        &merchant(
            "z-1",
            "zh-CN",
            Some("z@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
    );
    t.run(&["merchants", "import", &merchants]).ok();
    let ingested = t
        .run(&["--json", "events", "ingest", &t.file("e.json", &event("e-9", "k-9"))])
        .ok()
        .json();
    let incident = ingested[0]["incident_id"].as_str().expect("id").to_owned();
    let mut facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("json");
    facts["remedies"] = json!({ "en": "Free monitoring." });
    facts.as_object_mut().map(|f| f.remove("measures_planned"));
    let facts = t.file("facts.json", &facts.to_string());
    t.run(&["--actor", "alice", "incidents", "confirm", &incident, "--facts", &facts])
        .ok();
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        "z-1",
    ])
    .ok();
    let draft = t.run(&["--actor", "alice", "incidents", "draft", &incident]);
    assert_ne!(draft.code, 0);
    assert!(draft.stderr.contains("remedies (zh-CN)"), "{}", draft.stderr);
    assert!(draft.stderr.contains("measures_planned"), "{}", draft.stderr);
    let view = t.run(&["--json", "incidents", "show", &incident]).ok().json();
    assert_eq!(view["incident"]["state"], "scoped", "nothing was drafted");
    assert_eq!(view["drafts"].as_array().map(Vec::len), Some(0));
}

/// Drafts as alice, approves as bob, dispatches and waits; returns the incident view.
fn draft_approve_dispatch(t: &Tocsin, incident: &str) -> Value {
    t.run(&["--actor", "alice", "incidents", "draft", incident]).ok();
    t.run(&["--actor", "bob", "incidents", "approve", incident]).ok();
    t.run(&[
        "--json",
        "--actor",
        "alice",
        "incidents",
        "dispatch",
        incident,
        "--timeout",
        "60",
    ])
    .ok()
    .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guard_rails_refuse_bad_scopes_early_bulletins_and_reuse_of_closed_keys() {
    let t = Tocsin::new();
    let m = merchant("s-1", "en", None, Some("+6590000001"), None, &["account_credentials"]);
    t.run(&["merchants", "import", &t.file("m.jsonl", &m)]).ok();
    let incident = confirmed_incident(&t, "guard");

    let unknown = t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        "s-1,nobody-9",
    ]);
    assert!(unknown.code != 0 && unknown.stderr.contains("merchant_ids") && unknown.stderr.contains("nobody-9"));
    let region = t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--regions",
        "Zhejiang",
    ]);
    assert!(
        region.code != 0 && region.stderr.contains("regions[0]"),
        "{}",
        region.stderr
    );
    let empty = t.run(&["--actor", "alice", "incidents", "scope", &incident, "--regions", "DE"]);
    assert!(
        empty.code != 0 && empty.stderr.contains("selects no merchant"),
        "{}",
        empty.stderr
    );
    let early = t.run(&["--actor", "alice", "incidents", "bulletin", &incident]);
    assert!(early.code != 0 && early.stderr.contains("approved"), "{}", early.stderr);
    let view = t.run(&["--json", "incidents", "show", &incident]).ok().json();
    assert_eq!(
        view["incident"]["state"], "confirmed",
        "refused commands change nothing"
    );

    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        "s-1",
    ])
    .ok();
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    // Re-scoping before approval is allowed; approval then waits for a new draft.
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--categories",
        "account_credentials",
    ])
    .ok();
    assert_ne!(t.run(&["--actor", "bob", "incidents", "approve", &incident]).code, 0);
    let v2 = t
        .run(&["--json", "--actor", "alice", "incidents", "draft", &incident])
        .ok()
        .json();
    assert_eq!(v2["draft"]["version"], 2);
    t.run(&["--actor", "bob", "incidents", "approve", &incident]).ok();
    t.run(&["--actor", "alice", "incidents", "dispatch", &incident]).ok();
    t.run(&["--actor", "alice", "incidents", "close", &incident]).ok();

    // A closed incident's correlation key opens a new incident.
    let again = t
        .run(&[
            "--json",
            "events",
            "ingest",
            &t.file("e2.json", &event("ev-guard-2", "guard")),
        ])
        .ok()
        .json();
    assert_eq!(again[0]["outcome"], "opened");
    t.run(&["audit", "verify"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirecting_gateway_is_not_mistaken_for_a_delivery() {
    let sms = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(302).insert_header("Location", format!("{}/elsewhere", sms.uri())))
        .mount(&sms)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&sms)
        .await;
    let mut t = Tocsin::new();
    t.webhook("sms", &format!("{}/sms", sms.uri()), SECRET)
        .set("TOCSIN_DELIVERY__MAX_ATTEMPTS", "2");
    let m = merchant("r-1", "en", None, Some("+6590000002"), None, &["account_credentials"]);
    t.run(&["merchants", "import", &t.file("m.jsonl", &m)]).ok();
    let incident = confirmed_incident(&t, "redirect");
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--merchants",
        "r-1",
    ])
    .ok();
    let view = draft_approve_dispatch(&t, &incident);
    assert_eq!(view["reached"], 0);
    assert_eq!(view["unreachable"], json!(["r-1"]));
    let requests = sms.received_requests().await.expect("recorded");
    assert!(
        requests.iter().all(|r| r.method.as_str() == "POST"),
        "the redirect must not be followed"
    );
    assert_eq!(requests.len(), 2, "retried up to max_attempts, then given up");
}
