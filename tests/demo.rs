//! `tocsin demo` on a fresh data directory, twice: the second run creates nothing new.

mod common;

use common::*;
use serde_json::Value;

fn count_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn the_demo_runs_the_whole_flow_and_a_second_run_duplicates_nothing() {
    let t = Tocsin::new();
    let first = t.run(&["--json", "demo"]).ok().json();
    let view = &first["incident"];
    assert_eq!(view["incident"]["state"], "monitoring");
    assert_eq!(view["scope"]["affected"], 45);
    assert_eq!(
        view["unreachable"].as_array().map(Vec::len),
        Some(4),
        "the four merchants with no contact at all"
    );
    assert_eq!(view["bulletins"][0]["covered"], 4);
    let tally: Vec<(String, i64, i64)> = view["deliveries"]
        .as_array()
        .expect("tally")
        .iter()
        .map(|c| {
            (
                c["channel"].as_str().unwrap_or("").to_owned(),
                c["sent"].as_i64().unwrap_or(-1),
                c["failed"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        tally,
        [
            ("email".to_owned(), 30, 3),
            ("push".to_owned(), 2, 0),
            ("sms".to_owned(), 9, 0)
        ]
    );
    // Every regulator report the incident owes is drafted by alice and approved by bob; on the
    // embedded default each is a document for the regulator's portal, awaiting its reference.
    let cac = &view["filings"][0];
    assert_eq!(cac["regulator"], "cn-cac");
    assert_eq!(cac["state"], "awaiting_reference");
    assert_eq!(cac["approved_by"], "bob@security");
    assert!(
        cac["location"]
            .as_str()
            .is_some_and(|l| l.ends_with("cn-cac-initial.html"))
    );
    assert_eq!(view["drafts"][0]["drafted_by"], "alice@security");
    assert_eq!(view["drafts"][0]["approved_by"], "bob@security");

    let outbox = t.data_dir().join("outbox");
    let counts = |_: ()| {
        (
            count_files(&outbox.join("email")),
            count_files(&outbox.join("sms")),
            count_files(&outbox.join("push")),
        )
    };
    assert_eq!(counts(()), (30, 9, 2));

    let second = t.run(&["--json", "demo"]).ok().json();
    assert_eq!(second["events_new"], 0);
    assert_eq!(second["events_duplicate"], 3);
    assert_eq!(second["notices_drafted_now"], 0);
    let v2 = &second["incident"];
    let len = |v: &Value, k: &str| v[k].as_array().map(Vec::len);
    for key in ["drafts", "bulletins", "filings", "deliveries", "transitions"] {
        assert_eq!(len(v2, key), len(view, key), "{key} changed on the second run");
    }
    assert_eq!(v2["deliveries"], view["deliveries"]);
    assert_eq!(counts(()), (30, 9, 2), "no message was sent twice");
    let deliveries = t
        .run(&[
            "--json",
            "incidents",
            "deliveries",
            view["incident"]["id"].as_str().expect("id"),
        ])
        .ok()
        .json();
    assert_eq!(deliveries.as_array().map(Vec::len), Some(44));
    t.run(&["audit", "verify"]).ok();
}

#[test]
fn the_demo_summary_names_every_output() {
    let t = Tocsin::new();
    let run = t.run(&["demo"]).ok();
    for needle in [
        "merchants affected: 45",
        "unreachable: 4",
        "email",
        "sms",
        "push",
        "bulletin v1",
        "filing cn-cac initial",
        "deadline",
        "index.html",
        "cn-cac-initial.json",
    ] {
        assert!(run.stdout.contains(needle), "summary lacks '{needle}':\n{}", run.stdout);
    }
}
