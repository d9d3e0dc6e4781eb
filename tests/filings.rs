//! Regulator filings through the `tocsin` binary and `tocsin serve`: drafted from the incident,
//! checked for completeness, approved by a second person, and submitted by each method against
//! a real peer on loopback: by email to a real SMTP server (the report attached as JSON and as
//! a readable document), by HTTPS POST to an endpoint (wiremock), and as a document for a portal
//! followed by the reference number. Acknowledgements are recorded.

mod common;

use common::smtp_server::SmtpServer;
use common::*;
use mail_parser::MimeHeaders;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn draft(t: &Tocsin, incident: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--json", "--actor", "alice", "filings", "draft", incident];
    args.extend_from_slice(extra);
    t.run(&args).ok().json()
}

/// The drafted filing of `regulator` `stage` in a `filings draft --json` answer.
fn drafted<'a>(list: &'a Value, regulator: &str, stage: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| {
            l.iter()
                .find(|d| d["filing"]["regulator"] == regulator && d["filing"]["stage"] == stage)
        })
        .map(|d| &d["filing"])
        .unwrap_or_else(|| panic!("no {regulator} {stage} in {list}"))
}

fn id(filing: &Value) -> String {
    filing["id"].as_str().expect("filing id").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_is_approved_by_a_second_person_and_emailed_with_its_json_and_document_attached() {
    let smtp = SmtpServer::start().await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port())
        .set("TOCSIN_FILING__REGULATORS__CN_CAC__METHOD", "email")
        .set("TOCSIN_FILING__REGULATORS__CN_CAC__ADDRESS", "reports@cac.example.cn")
        .set("TOCSIN_OPERATOR__CLASS", "critical_infrastructure");
    let incident = confirmed_incident(&t, "email-filing");

    let list = draft(&t, &incident, &[]);
    let cac = drafted(&list, "cn-cac", "initial");
    assert_eq!(cac["state"], "ready", "the demo facts complete the initial report");
    assert_eq!(cac["transport"], "email", "the deployment's method over the profile's");
    assert_eq!(
        cac["deadline_at"], "2026-11-28T04:45:00Z",
        "critical infrastructure: one hour"
    );
    assert_eq!(cac["stage_label"], "初报");
    let filing = id(cac);

    // Nothing goes before a second person approved it, and the drafter cannot approve it.
    let early = t.run(&["--actor", "alice", "filings", "submit", &filing]);
    assert!(
        early.code != 0 && early.stderr.contains("not approved"),
        "{}",
        early.stderr
    );
    let own = t.run(&["--actor", "alice", "filings", "approve", &filing]);
    assert!(own.code != 0 && own.stderr.contains("four eyes"), "{}", own.stderr);
    assert!(smtp.messages_to("reports@cac.example.cn").is_empty());

    t.run(&["--actor", "bob", "filings", "approve", &filing]).ok();
    let submitted = t
        .run(&["--json", "--actor", "carol", "filings", "submit", &filing])
        .ok()
        .json();
    assert_eq!(submitted["state"], "submitted");
    assert_eq!(submitted["approved_by"], "bob");

    let mails = smtp.messages_to("reports@cac.example.cn");
    assert_eq!(mails.len(), 1);
    let message = mail_parser::MessageParser::default()
        .parse(mails[0].data.as_bytes())
        .expect("a MIME message");
    assert!(
        message.subject().is_some_and(|s| s.contains("初报")),
        "{:?}",
        message.subject()
    );
    let attachments: Vec<(String, Vec<u8>)> = message
        .attachments()
        .map(|a| {
            (
                a.attachment_name().unwrap_or_default().to_owned(),
                a.contents().to_vec(),
            )
        })
        .collect();
    let names: Vec<&str> = attachments.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["cn-cac-initial.json", "cn-cac-initial.html"]);
    let report: Value = serde_json::from_slice(&attachments[0].1).expect("the JSON attachment parses");
    assert_eq!(report["filing_id"], filing.as_str());
    assert_eq!(report["content_hash"], submitted["content_hash"]);
    assert_eq!(report["approved_by"], "bob");
    assert_eq!(report["items"].as_array().map(Vec::len), Some(8));
    let document = String::from_utf8(attachments[1].1.clone()).expect("UTF-8 document");
    assert!(document.contains("lang=\"zh-CN\"") && document.contains("报告单位") && document.contains("bob"));

    // Submitting again sends nothing more; the regulator's acknowledgement is recorded.
    t.run(&["--actor", "carol", "filings", "submit", &filing]).ok();
    assert_eq!(smtp.messages_to("reports@cac.example.cn").len(), 1);
    let acked = t
        .run(&[
            "--json",
            "--actor",
            "carol",
            "filings",
            "ack",
            &filing,
            "--reference",
            "浙网信〔2026〕17号",
            "--note",
            "receipt mailed back by the provincial office",
        ])
        .ok()
        .json();
    assert_eq!(acked["state"], "acknowledged");
    assert_eq!(acked["reference_number"], "浙网信〔2026〕17号");
    let shown = t.run(&["--json", "filings", "show", &filing]).ok().json();
    let record: Vec<(&str, &str)> = shown["submissions"]
        .as_array()
        .expect("submissions")
        .iter()
        .map(|s| (s["method"].as_str().unwrap_or(""), s["outcome"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(record, [("email", "sent"), ("acknowledgement", "recorded")]);

    let clocks = t.run(&["--json", "deadlines", &incident, "--all"]).ok().json();
    let initial = clocks
        .as_array()
        .and_then(|c| c.iter().find(|c| c["regulator"] == "cn-cac" && c["stage"] == "initial"))
        .expect("clock");
    assert_eq!(initial["status"], "filed_late");
    t.run(&["audit", "verify"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_endpoint_gets_the_report_and_its_reference_is_recorded_after_a_retry() {
    let endpoint = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/reports"))
        .respond_with(ResponseTemplate::new(503).set_body_string("maintenance"))
        .up_to_n_times(1)
        .mount(&endpoint)
        .await;
    Mock::given(method("POST"))
        .and(path("/api/reports"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({ "data": { "ref": "CAC-HZ-0042" } })))
        .mount(&endpoint)
        .await;
    let mut t = Tocsin::new();
    t.set("TOCSIN_FILING__REGULATORS__CN_CAC__METHOD", "https")
        .set(
            "TOCSIN_FILING__REGULATORS__CN_CAC__URL",
            format!("{}/api/reports", endpoint.uri()),
        )
        .set("TOCSIN_FILING__REGULATORS__CN_CAC__TOKEN", "regulator-t0ken")
        .set("TOCSIN_FILING__REGULATORS__CN_CAC__REFERENCE_POINTER", "/data/ref");
    let incident = confirmed_incident(&t, "https-filing");
    let filing = id(drafted(
        &draft(&t, &incident, &["--regulator", "cn-cac"]),
        "cn-cac",
        "initial",
    ));
    t.run(&["--actor", "bob", "filings", "approve", &filing]).ok();

    // The endpoint is down: the failure is recorded and the report stays approved.
    let failed = t.run(&["--actor", "alice", "filings", "submit", &filing]);
    assert!(
        failed.code != 0 && failed.stderr.contains("503") && failed.stderr.contains("retried"),
        "{}",
        failed.stderr
    );
    let after = t.run(&["--json", "filings", "show", &filing]).ok().json();
    assert_eq!(after["filing"]["state"], "approved");
    assert!(
        after["filing"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("maintenance"))
    );

    let done = t
        .run(&["--json", "--actor", "alice", "filings", "submit", &filing])
        .ok()
        .json();
    assert_eq!(done["state"], "acknowledged", "the reply carried a reference number");
    assert_eq!(done["reference_number"], "CAC-HZ-0042");
    assert_eq!(done["last_error"], Value::Null);

    let requests = endpoint.received_requests().await.expect("requests");
    assert_eq!(requests.len(), 2);
    let keys: Vec<&str> = requests.iter().map(|r| header_text(r, "idempotency-key")).collect();
    assert!(
        !keys[0].is_empty() && keys[0] == keys[1],
        "a retry is the same report: {keys:?}"
    );
    for r in &requests {
        assert_eq!(header_text(r, "authorization"), "Bearer regulator-t0ken");
        let body: Value = serde_json::from_slice(&r.body).expect("JSON body");
        assert_eq!(body["filing_id"], filing.as_str());
        assert_eq!(body["content_hash"], done["content_hash"]);
        assert_eq!(body["stage"], "initial");
    }
    let shown = t.run(&["--json", "filings", "show", &filing]).ok().json();
    let outcomes: Vec<&str> = shown["submissions"]
        .as_array()
        .expect("submissions")
        .iter()
        .map(|s| s["outcome"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(outcomes, ["failed", "sent"]);
    // The token is a secret: not in the record.
    assert!(!shown.to_string().contains("regulator-t0ken"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusing_endpoint_is_reported_and_a_missing_setting_is_named() {
    let endpoint = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_string("{\"error\":\"item 2 is empty\"}"))
        .mount(&endpoint)
        .await;
    let mut t = Tocsin::new();
    t.set("TOCSIN_FILING__REGULATORS__CN_CAC__METHOD", "https")
        .set("TOCSIN_FILING__REGULATORS__CN_CAC__URL", endpoint.uri());
    let incident = confirmed_incident(&t, "refused-filing");
    let filing = id(drafted(&draft(&t, &incident, &[]), "cn-cac", "initial"));
    t.run(&["--actor", "bob", "filings", "approve", &filing]).ok();
    let refused = t.run(&["--actor", "alice", "filings", "submit", &filing]);
    assert!(
        refused.code != 0 && refused.stderr.contains("422") && !refused.stderr.contains("retried"),
        "{}",
        refused.stderr
    );

    let mut t = Tocsin::new();
    t.set("TOCSIN_FILING__REGULATORS__CN_CAC__METHOD", "email");
    let incident = confirmed_incident(&t, "unconfigured");
    let filing = id(drafted(&draft(&t, &incident, &[]), "cn-cac", "initial"));
    t.run(&["--actor", "bob", "filings", "approve", &filing]).ok();
    let missing = t.run(&["--actor", "alice", "filings", "submit", &filing]);
    assert!(
        missing.code != 0 && missing.stderr.contains("filing.regulators.cn_cac.address"),
        "{}",
        missing.stderr
    );
    let shown = t.run(&["--json", "filings", "show", &filing]).ok().json();
    assert_eq!(shown["submissions"], json!([]), "nothing was attempted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_portal_report_is_a_document_until_a_person_records_its_reference_number() {
    let t = Tocsin::new();
    let incident = confirmed_incident(&t, "portal-filing");
    let filing = id(drafted(&draft(&t, &incident, &[]), "cn-cac", "initial"));
    t.run(&["--actor", "bob", "filings", "approve", &filing]).ok();
    let produced = t
        .run(&["--json", "--actor", "alice", "filings", "submit", &filing])
        .ok()
        .json();
    assert_eq!(produced["state"], "awaiting_reference");
    assert_eq!(produced["submitted_at"], Value::Null, "not with the regulator yet");
    let document = std::fs::read_to_string(produced["location"].as_str().expect("document path")).expect("document");
    assert!(document.contains("初报") && document.contains("bob"));
    let clocks = t.run(&["--json", "deadlines", &incident]).ok().json();
    assert!(
        clocks.as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["regulator"] == "cn-cac" && c["stage"] == "initial" && c["status"] == "overdue")),
        "the clock runs until the reference is recorded: {clocks}"
    );

    let approved_at = produced["approved_at"].as_str().expect("approved_at");
    let before = chrono::DateTime::parse_from_rfc3339(approved_at).expect("instant") - chrono::Duration::hours(1);
    let early = t.run(&[
        "--actor",
        "alice",
        "filings",
        "reference",
        &filing,
        "CAC-7",
        "--filed-at",
        &before.to_rfc3339(),
    ]);
    assert!(early.code != 0 && early.stderr.contains("filed_at"), "{}", early.stderr);
    let recorded = t
        .run(&["--json", "--actor", "alice", "filings", "reference", &filing, "CAC-7"])
        .ok()
        .json();
    assert_eq!(recorded["state"], "acknowledged");
    assert!(recorded["submitted_at"].is_string());
    // Recording it again changes nothing; another number for the same report is refused.
    t.run(&["--actor", "alice", "filings", "reference", &filing, "CAC-7"])
        .ok();
    let other = t.run(&["--actor", "alice", "filings", "reference", &filing, "CAC-8"]);
    assert!(
        other.code != 0 && other.stderr.contains("already submitted"),
        "{}",
        other.stderr
    );
    let clocks = t.run(&["--json", "deadlines", &incident]).ok().json();
    assert!(
        !clocks
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["regulator"] == "cn-cac" && c["stage"] == "initial")),
        "{clocks}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incomplete_report_lists_what_is_missing_and_whoever_completes_it_cannot_approve_it() {
    let t = Tocsin::new();
    // Facts without the cause: the CAC's initial report may go (items 1-2), its update not.
    let mut facts: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/demo/incident.json")).expect("facts"))
            .expect("json");
    facts.as_object_mut().expect("object").remove("cause");
    let ingested = t
        .run(&[
            "--json",
            "events",
            "ingest",
            &t.file("e.json", &event("ev-incomplete", "incomplete")),
        ])
        .ok()
        .json();
    let incident = ingested[0]["incident_id"].as_str().expect("id").to_owned();
    let facts = t.file("facts.json", &facts.to_string());
    t.run(&["--actor", "alice", "incidents", "confirm", &incident, "--facts", &facts])
        .ok();

    let list = draft(&t, &incident, &[]);
    assert_eq!(drafted(&list, "cn-cac", "initial")["state"], "ready");
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().all(|d| d["filing"]["stage"] != "update")),
        "an update has no clock: drafted only when asked for"
    );
    let update = draft(&t, &incident, &["--regulator", "cn-cac", "--stage", "update"]);
    let update = drafted(&update, "cn-cac", "update");
    assert_eq!(update["state"], "incomplete");
    assert_eq!(update["missing"], json!(["item 4: 'cause' (zh-CN)"]));
    assert_eq!(update["deadline_at"], Value::Null, "updates have no fixed clock");
    let filing = id(update);
    let refused = t.run(&["--actor", "bob", "filings", "approve", &filing]);
    assert!(
        refused.code != 0 && refused.stderr.contains("incomplete") && refused.stderr.contains("item 4: 'cause'"),
        "{}",
        refused.stderr
    );

    // A field the report does not have is refused naming it; bob writes the cause.
    let wrong = t.run(&["--actor", "bob", "filings", "write", &filing, "motive", "greed"]);
    assert!(wrong.code != 0 && wrong.stderr.contains("field"), "{}", wrong.stderr);
    let written = t
        .run(&[
            "--json",
            "--actor",
            "bob",
            "filings",
            "write",
            &filing,
            "cause",
            "员工账号仅用密码保护，攻击者撞库登录。",
        ])
        .ok()
        .json();
    assert_eq!(written["state"], "ready");
    assert_eq!(written["authors"], json!(["alice", "bob"]));
    // Redrafting keeps what was written.
    let again = draft(&t, &incident, &["--regulator", "cn-cac", "--stage", "update"]);
    assert_eq!(drafted(&again, "cn-cac", "update")["state"], "ready");
    assert_eq!(again[0]["change"], "unchanged");

    for author in ["alice", "bob"] {
        let own = t.run(&["--actor", author, "filings", "approve", &filing]);
        assert!(
            own.code != 0 && own.stderr.contains("four eyes"),
            "{author}: {}",
            own.stderr
        );
    }
    let approved = t
        .run(&["--json", "--actor", "carol", "filings", "approve", &filing])
        .ok()
        .json();
    assert_eq!(approved["state"], "approved");
    // Approved content is frozen: no more writing, and redrafting leaves it.
    let late = t.run(&["--actor", "bob", "filings", "write", &filing, "cause", "other"]);
    assert!(late.code != 0 && late.stderr.contains("approved"), "{}", late.stderr);
    let frozen = draft(&t, &incident, &["--regulator", "cn-cac", "--stage", "update"]);
    assert_eq!(frozen[0]["change"], "frozen");
    let shown = t.run(&["--json", "filings", "show", &filing]).ok().json();
    let item4 = shown["content"]["items"][3]["value"].as_str().unwrap_or_default();
    assert!(item4.contains("撞库"), "{item4}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_drafts_approves_and_submits_filings_and_reports_readiness() {
    let t = Tocsin::new();
    let incident = confirmed_incident(&t, "api-filing");
    tocsin::install_crypto_provider();
    let server = t.serve();
    let api = t.api(
        &server,
        &[("alice", "responder"), ("bob", "approver"), ("ann", "auditor")],
    );
    let (status, list, _) = api
        .post(
            "alice",
            &format!("/api/v1/incidents/{incident}/filings"),
            json!({ "regulator": "cn-cac" }),
        )
        .await;
    assert_eq!(status, 200, "{list}");
    let filing = id(drafted(&list, "cn-cac", "initial"));
    let (status, problem, _) = api
        .post("ann", &format!("/api/v1/filings/{filing}/approve"), json!({}))
        .await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (403, Some("role")),
        "an auditor changes nothing"
    );
    let (status, problem, _) = api
        .post(
            "alice",
            &format!("/api/v1/filings/{filing}/fields"),
            json!({ "field": "cause" }),
        )
        .await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("text")));
    let (status, approved, _) = api
        .post("bob", &format!("/api/v1/filings/{filing}/approve"), json!({}))
        .await;
    assert_eq!((status, approved["state"].as_str()), (200, Some("approved")));
    let (status, produced, _) = api
        .post("alice", &format!("/api/v1/filings/{filing}/submit"), json!({}))
        .await;
    assert_eq!((status, produced["state"].as_str()), (200, Some("awaiting_reference")));
    let (status, recorded, _) = api
        .post(
            "alice",
            &format!("/api/v1/filings/{filing}/reference"),
            json!({ "reference": "CAC-API-1" }),
        )
        .await;
    assert_eq!((status, recorded["state"].as_str()), (200, Some("acknowledged")));

    let (_, readiness) = api.get("ann", &format!("/api/v1/incidents/{incident}/readiness")).await;
    let cli = t.run(&["--json", "incidents", "readiness", &incident]).ok().json();
    assert_eq!(readiness, cli);
    let (_, listed) = api.get("ann", &format!("/api/v1/incidents/{incident}/filings")).await;
    assert_eq!(listed[0]["reference_number"], "CAC-API-1");
}
