//! OCSF 1.x findings posted to a running `tocsin serve` by a security tool, next to Tocsin's
//! own events: a DLP product's Detection Finding opens an incident with the mapped severity,
//! source, time and categories; a repost is a duplicate; the SIEM's Incident Finding with the
//! same correlation uid joins it; an OCSF event that is not a finding is refused with a
//! problem document naming `class_uid`, and nothing is stored.

mod common;

use common::*;
use serde_json::{Value, json};

fn fixture(name: &str) -> Value {
    let path = repo(&format!("tests/fixtures/ocsf/{name}"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

/// The incident's event with `external_id` as the API shows it to a responder: source,
/// severity and the whole event.
async fn stored_event(api: &Api, incident: &str, external_id: &str) -> (String, String, Value) {
    let (status, events) = api.get("alice", &format!("/api/v1/incidents/{incident}/events")).await;
    assert_eq!(status, 200, "{events}");
    let event = events
        .as_array()
        .and_then(|list| list.iter().find(|e| e["external_id"] == external_id))
        .unwrap_or_else(|| panic!("no event {external_id} in {events}"))
        .clone();
    let text = |k: &str| event[k].as_str().unwrap_or_default().to_owned();
    (text("source"), text("severity"), event)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_detection_finding_opens_an_incident_and_the_siems_incident_finding_joins_it() {
    tocsin::install_crypto_provider();
    let t = Tocsin::new();
    let server = t.serve();
    let api = t.api(
        &server,
        &[("dlp", "responder"), ("siem", "responder"), ("alice", "responder")],
    );
    let detection = fixture("detection_finding.json");

    let (status, outcome, _) = api.post("dlp", "/api/v1/events", detection.clone()).await;
    assert_eq!(status, 202, "{outcome}");
    assert_eq!(outcome[0]["outcome"], "opened", "{outcome}");
    let id = outcome[0]["incident_id"].as_str().expect("incident id").to_owned();

    // What the responder sees on the incident.
    let (status, view) = api.get("alice", &format!("/api/v1/incidents/{id}")).await;
    assert_eq!(status, 200);
    let incident = &view["incident"];
    assert_eq!(incident["state"], "triage");
    assert_eq!(incident["severity"], "critical", "severity_id 5");
    assert_eq!(incident["kind"], "leak", "ATT&CK TA0010 Exfiltration");
    assert_eq!(
        incident["title"],
        "Bulk export of merchant identity and settlement tables sent to an external host"
    );
    assert_eq!(incident["detected_at"], "2026-11-28T02:41:00Z", "time 1795833660000");
    assert_eq!(incident["correlation_key"], "merchant-backoffice-exfil-2026-11");
    assert_eq!(view["transitions"][0]["actor"], "dlp");

    // The event as stored: source from the product, the categories and merchants Tocsin scopes
    // by, when it happened, and the finding itself for whoever needs more.
    let (source, severity, event) = stored_event(&api, &id, "dlp-evt-88213").await;
    assert_eq!((source.as_str(), severity.as_str()), ("lanyard-dlp", "critical"));
    assert_eq!(
        event["categories"],
        json!(["real_name", "id_number", "phone_number", "settlement_account"])
    );
    assert_eq!(event["merchant_ids"], json!(["m-0004", "m-0016"]));
    assert_eq!(event["occurred_at"], "2026-11-28T00:12:00Z", "start_time");
    assert_eq!(event["attributes"]["ocsf"], detection, "the finding is kept as posted");

    // The tool posts the same finding again (a retry, or an Update of it): nothing new.
    let (status, again, _) = api.post("dlp", "/api/v1/events", detection.clone()).await;
    assert_eq!(status, 202);
    assert_eq!(again[0]["outcome"], "duplicate");
    assert_eq!(again[0]["incident_id"], id.as_str());
    let mut update = detection.clone();
    update["activity_id"] = json!(2);
    update["metadata"]["uid"] = json!("0b7d51f4-2f2e-4b57-a5c0-8a6e3c1f9d22");
    let (_, updated, _) = api.post("dlp", "/api/v1/events", update).await;
    assert_eq!(updated[0]["outcome"], "duplicate", "{updated}");

    // The SIEM's Incident Finding carries the same correlation uid: it joins the incident,
    // which now counts as detected when the earliest of its events was.
    let (status, joined, _) = api
        .post("siem", "/api/v1/events", fixture("incident_finding.json"))
        .await;
    assert_eq!(status, 202, "{joined}");
    assert_eq!(joined[0]["outcome"], "joined", "{joined}");
    assert_eq!(joined[0]["incident_id"], id.as_str());
    let (source, severity, event) = stored_event(&api, &id, "INC-2026-1128-0009").await;
    assert_eq!((source.as_str(), severity.as_str()), ("watchtower-siem", "high"));
    assert_eq!(event["kind"], "leak");
    assert_eq!(
        event["categories"],
        json!(["account_credentials", "contact_persons", "phone_number", "real_name"])
    );
    assert_eq!(event["merchant_ids"], json!(["m-0004", "m-0016", "m-0023"]));
    assert_eq!(event["detected_at"], "2026-11-28T03:22:00Z");
    assert_eq!(event["occurred_at"], "2026-11-27T22:40:00Z");
    let (_, listed) = api.get("alice", "/api/v1/incidents").await;
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incident_finding_opens_an_incident_and_other_ocsf_classes_are_refused() {
    tocsin::install_crypto_provider();
    let t = Tocsin::new();
    let server = t.serve();
    let api = t.api(&server, &[("siem", "responder"), ("alice", "responder")]);

    // Not a finding: refused naming class_uid, as is a batch holding one.
    let (status, problem, ctype) = api.post("siem", "/api/v1/events", fixture("file_activity.json")).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(ctype, "application/problem+json");
    assert_eq!(problem["field"], "class_uid");
    let detail = problem["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("1001") && detail.contains("Detection Finding (2004)"),
        "{detail}"
    );
    let batch = json!([fixture("incident_finding.json"), fixture("file_activity.json")]);
    let (status, problem, _) = api.post("siem", "/api/v1/events", batch).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("class_uid")),
        "{problem}"
    );
    assert!(
        problem["detail"].as_str().is_some_and(|d| d.starts_with("event 2:")),
        "{problem}"
    );

    // A closed finding opens nothing; the refusal names the OCSF field.
    let mut closed = fixture("incident_finding.json");
    closed["activity_id"] = json!(3);
    let (status, problem, _) = api.post("siem", "/api/v1/events", closed).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("activity_id")),
        "{problem}"
    );
    let (_, listed) = api.get("alice", "/api/v1/incidents").await;
    assert_eq!(listed, json!([]), "nothing refused is stored");

    // On its own, the SIEM's Incident Finding opens the incident with its own mapping.
    let (status, outcome, _) = api
        .post("siem", "/api/v1/events", fixture("incident_finding.json"))
        .await;
    assert_eq!(status, 202, "{outcome}");
    assert_eq!(outcome[0]["outcome"], "opened");
    let id = outcome[0]["incident_id"].as_str().expect("incident id");
    let (_, view) = api.get("alice", &format!("/api/v1/incidents/{id}")).await;
    let incident = &view["incident"];
    assert_eq!(incident["severity"], "high", "severity_id 4");
    assert_eq!(incident["kind"], "leak");
    assert_eq!(
        incident["title"],
        "Compromised staff session exported merchant contact-person data after credential stuffing"
    );
    assert_eq!(incident["detected_at"], "2026-11-28T03:22:00Z");
    assert_eq!(incident["correlation_key"], "merchant-backoffice-exfil-2026-11");
    let (_, again, _) = api
        .post("siem", "/api/v1/events", fixture("incident_finding.json"))
        .await;
    assert_eq!(again[0]["outcome"], "duplicate", "same metadata.uid");
}
