//! Bad input is refused with the field and the reason and changes nothing; repeated input is
//! accepted once.

mod common;

use common::*;
use serde_json::json;

#[test]
fn a_malformed_event_names_its_field_and_stores_nothing() {
    let t = Tocsin::new();
    let cases = [
        (
            json!({"source": "siem", "external_id": "x", "kind": "leak", "severity": "high", "title": "t"}),
            "detected_at",
        ),
        (
            json!({"source": "SIEM!", "external_id": "x", "kind": "leak", "severity": "high", "title": "t", "detected_at": "2026-11-28T02:41:00Z"}),
            "source",
        ),
        (
            json!({"source": "siem", "external_id": "x", "kind": "sneeze", "severity": "high", "title": "t", "detected_at": "2026-11-28T02:41:00Z"}),
            "kind",
        ),
        (
            json!({"source": "siem", "external_id": "x", "kind": "leak", "severity": "high", "title": "t", "detected_at": "tuesday"}),
            "detected_at",
        ),
        (
            json!({"source": "siem", "external_id": "x", "kind": "leak", "severity": "high", "title": "t", "detected_at": "2026-11-28T02:41:00Z", "categories": ["shoe_size"]}),
            "categories[0]",
        ),
        (
            json!({"source": "siem", "external_id": "x", "kind": "leak", "severity": "high", "title": "t", "detected_at": "2026-11-28T02:41:00Z", "colour": "red"}),
            "colour",
        ),
    ];
    for (event, field) in cases {
        let run = t.run_with_stdin(&["events", "ingest", "-"], &event.to_string());
        assert_ne!(run.code, 0, "accepted {event}");
        assert!(
            run.stderr.contains(field),
            "error for {event} does not name {field}: {}",
            run.stderr
        );
    }
    // A batch with one bad record is refused whole.
    let batch = format!("{}\n{}\n", event("ok-1", "k"), json!({"source": "siem"}));
    let run = t.run_with_stdin(&["events", "ingest", "-"], &batch);
    assert!(run.code != 0 && run.stderr.contains("event 2"), "{}", run.stderr);
    let incidents = t.run(&["--json", "incidents", "list"]).ok().json();
    assert_eq!(incidents, json!([]), "nothing may be stored from rejected input");
}

#[test]
fn the_same_event_twice_is_accepted_once_and_correlated_events_share_an_incident() {
    let t = Tocsin::new();
    let first = t
        .run_with_stdin(&["--json", "events", "ingest", "-"], &event("e-1", "key-a"))
        .ok()
        .json();
    assert_eq!(first[0]["outcome"], "opened");
    let again = t
        .run_with_stdin(&["--json", "events", "ingest", "-"], &event("e-1", "key-a"))
        .ok()
        .json();
    assert_eq!(again[0]["outcome"], "duplicate");
    assert_eq!(again[0]["incident_id"], first[0]["incident_id"]);
    let related = t
        .run_with_stdin(&["--json", "events", "ingest", "-"], &event("e-2", "key-a"))
        .ok()
        .json();
    assert_eq!(related[0]["outcome"], "joined");
    assert_eq!(related[0]["incident_id"], first[0]["incident_id"]);
    let other = t
        .run_with_stdin(&["--json", "events", "ingest", "-"], &event("e-3", "key-b"))
        .ok()
        .json();
    assert_eq!(other[0]["outcome"], "opened");
    let incidents = t.run(&["--json", "incidents", "list"]).ok().json();
    assert_eq!(incidents.as_array().map(Vec::len), Some(2));
    assert_eq!(incidents[0]["state"], "triage");
}

#[test]
fn bad_merchant_rows_are_reported_by_line_and_field_and_good_rows_still_import() {
    let t = Tocsin::new();
    let text = [
        merchant("m-1", "en", Some("a@example.com"), None, None, &["email_address"]),
        merchant("m-2", "en", Some("not-an-address"), None, None, &[]),
        merchant("m-3", "fr", None, None, None, &[]),
        merchant("m-4", "en", None, Some("13800000000"), None, &[]),
        merchant("m-5", "en", None, None, None, &["favourite_colour"]),
    ]
    .join("\n");
    let run = t.run(&["merchants", "import", &t.file("m.jsonl", &text)]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    for expected in [
        "line 2: email",
        "line 3: locale",
        "line 4: phone",
        "line 5: holdings[0]",
    ] {
        assert!(
            run.stdout.contains(expected),
            "missing '{expected}' in:\n{}",
            run.stdout
        );
    }
    assert!(run.stdout.contains("1 new"), "{}", run.stdout);

    let csv = "id,name,kind,locale,region,email,phone,push_token,postal_address,holdings,created_at,marketing_opt_out\n\
               c-1,Shop,enterprise,zh-CN,CN-ZJ,,+8613800000000,,,phone_number;real_name,,false\n\
               c-2,Shop,enterprise,zh-CN,Zhejiang,,,,,,,\n";
    let run = t.run(&["merchants", "import", &t.file("m.csv", csv)]);
    assert_eq!(run.code, 2);
    assert!(run.stdout.contains("line 3: region"), "{}", run.stdout);
}

#[test]
fn reimporting_updates_and_never_duplicates() {
    let t = Tocsin::new();
    let demo = repo("config/demo/merchants.jsonl");
    let first = t
        .run(&["--json", "merchants", "import", demo.to_str().expect("path")])
        .ok()
        .json();
    assert_eq!(first["counts"]["inserted"], 50);
    let second = t
        .run(&["--json", "merchants", "import", demo.to_str().expect("path")])
        .ok()
        .json();
    assert_eq!(second["counts"], json!({"inserted": 0, "updated": 0, "unchanged": 50}));
    let changed = merchant("m-0001", "en", Some("new@example.com"), None, None, &["email_address"]);
    let third = t
        .run(&["--json", "merchants", "import", &t.file("one.jsonl", &changed)])
        .ok()
        .json();
    assert_eq!(third["counts"], json!({"inserted": 0, "updated": 1, "unchanged": 0}));
}

#[test]
fn configuration_errors_name_the_key_and_secrets_stay_out_of_output() {
    let mut t = Tocsin::new();
    t.set("TOCSIN_SMS__TRANSPORT", "carrier-pigeon");
    let run = t.run(&["incidents", "list"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("sms.transport"), "{}", run.stderr);

    let mut t = Tocsin::new();
    t.set("TOCSIN_EMAIL__SMTP__PASSWORD", "s3cret-value")
        .set("TOCSIN_LOG", "trace");
    let run = t.run(&["incidents", "list"]).ok();
    assert!(!run.stderr.contains("s3cret-value") && !run.stdout.contains("s3cret-value"));
}

#[test]
fn serve_refuses_to_listen_beyond_loopback() {
    let t = Tocsin::new();
    let run = t.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("loopback"), "{}", run.stderr);
}
