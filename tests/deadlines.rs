//! Regulator clocks through the `tocsin` binary and `tocsin serve`: every shipped profile whose
//! trigger the demo incident meets has its clocks listed, counted from the right moment in the
//! regulator's own time zone; a filed report leaves the list of running clocks; closing the
//! incident starts the summary report's clock.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::*;
use serde_json::Value;

fn at(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|| panic!("not an instant: {v}"))
}

fn clock<'a>(list: &'a Value, regulator: &str, stage: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|c| c["regulator"] == regulator && c["stage"] == stage)
}

#[tokio::test]
async fn every_applicable_regulators_clock_is_listed_and_follows_the_incident() {
    let t = Tocsin::new();
    let merchants = repo("config/demo/merchants.jsonl");
    t.run(&["merchants", "import", merchants.to_str().expect("path")]).ok();
    let incident = confirmed_incident(&t, "deadlines");
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "scope",
        &incident,
        "--regions",
        "CN,DE,SG,US",
    ])
    .ok();
    let aware = at(&Value::from("2026-11-28T03:45:00Z")); // config/demo/incident.json
    let before = Utc::now();

    let running = t.run(&["--json", "deadlines"]).ok().json();
    // The demo incident is significant, touches mainland China, Germany and Singapore (with
    // identity numbers): CAC, PIPL 57, GDPR 33, NIS2 and the PDPC all apply.
    let cac = clock(&running, "cn-cac", "initial").expect("CAC initial report");
    assert_eq!(at(&cac["due_at"]), aware + Duration::hours(4));
    assert_eq!(cac["due_local"], "2026-11-28 15:45 Asia/Shanghai");
    assert_eq!(cac["status"], "overdue");
    assert!(cac["minutes_left"].as_i64().is_some_and(|m| m < 0));
    let pipl = clock(&running, "cn-pipl-57", "initial").expect("PIPL report");
    assert_eq!(at(&pipl["due_at"]), aware + Duration::hours(24));
    let gdpr = clock(&running, "eu-gdpr-33", "initial").expect("GDPR notification");
    assert_eq!(at(&gdpr["due_at"]), aware + Duration::hours(72));
    assert_eq!(gdpr["time_zone"], "Europe/Dublin");
    let early = clock(&running, "eu-nis2", "initial").expect("NIS2 early warning");
    assert_eq!(early["label_en"], "early warning");
    assert_eq!(at(&early["due_at"]), aware + Duration::hours(24));
    assert_eq!(
        at(&clock(&running, "eu-nis2", "update").expect("NIS2 notification")["due_at"]),
        aware + Duration::hours(72)
    );
    // The PDPC's three calendar days run from the assessment (the confirmation, just now) to
    // the end of the third day after it in Singapore.
    let pdpc = clock(&running, "sg-pdpc", "initial").expect("PDPC notification");
    assert_eq!(pdpc["status"], "open");
    let due = at(&pdpc["due_at"]);
    assert!(
        due > before + Duration::days(3) && due <= before + Duration::days(4),
        "{due}"
    );
    assert!(
        pdpc["due_local"]
            .as_str()
            .is_some_and(|d| d.ends_with("23:59 Asia/Singapore"))
    );
    // Soonest first; the NIS2 final report waits for the notification to be filed.
    let dues: Vec<DateTime<Utc>> = running
        .as_array()
        .expect("list")
        .iter()
        .map(|c| at(&c["due_at"]))
        .collect();
    assert!(dues.windows(2).all(|w| w[0] <= w[1]), "{dues:?}");
    assert!(clock(&running, "eu-nis2", "final").is_none());
    let all = t.run(&["--json", "deadlines", &incident, "--all"]).ok().json();
    assert_eq!(
        clock(&all, "eu-nis2", "final").expect("listed with --all")["status"],
        "waiting"
    );
    let text = t.run(&["deadlines"]).ok().stdout;
    assert!(
        text.contains("cn-cac") && text.contains("OVERDUE") && text.contains("Asia/Shanghai"),
        "{text}"
    );

    // What each applicable regulator's reports still lack: with the demo facts every report is
    // complete but the CAC summary report, which needs the responder's conclusions.
    let readiness = t.run(&["--json", "incidents", "readiness", &incident]).ok().json();
    let stage = |regulator: &str, stage: &str| -> Vec<String> {
        readiness
            .as_array()
            .expect("list")
            .iter()
            .find(|r| r["regulator"] == regulator && r["stage"] == stage)
            .unwrap_or_else(|| panic!("{regulator} {stage} in {readiness}"))["missing"]
            .as_array()
            .expect("missing")
            .iter()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect()
    };
    for (regulator, s) in [
        ("cn-cac", "initial"),
        ("cn-pipl-57", "initial"),
        ("eu-gdpr-33", "initial"),
        ("eu-nis2", "update"),
        ("sg-pdpc", "initial"),
    ] {
        assert_eq!(stage(regulator, s), Vec::<String>::new(), "{regulator} {s}");
    }
    assert_eq!(
        stage("cn-cac", "final"),
        [
            "item 3: 'responsibility' (zh-CN)",
            "item 3: 'remediation' (zh-CN)",
            "item 3: 'lessons' (zh-CN)"
        ]
    );
    let text = t.run(&["incidents", "readiness", &incident]).ok().stdout;
    assert!(text.contains("cn-cac      initial  (portal) ready"), "{text}");

    // The CAC's initial report, drafted, approved and produced for the portal: its clock
    // runs on until the reference number is recorded, then it is filed (late).
    let filing = file_report(&t, &incident, "cn-cac", "initial");
    assert_eq!(filing["state"], "awaiting_reference");
    assert!(clock(&t.run(&["--json", "deadlines"]).ok().json(), "cn-cac", "initial").is_some());
    let id = filing["id"].as_str().expect("filing id");
    t.run(&["--actor", "alice", "filings", "reference", id, "CAC-2026-0042"])
        .ok();
    let running = t.run(&["--json", "deadlines"]).ok().json();
    assert!(clock(&running, "cn-cac", "initial").is_none());
    let all = t.run(&["--json", "deadlines", &incident, "--all"]).ok().json();
    assert_eq!(clock(&all, "cn-cac", "initial").expect("filed")["status"], "filed_late");

    // Closing the incident (handling ended) starts the 30-day summary report clock: the end
    // of the 30th day in Beijing time.
    t.run(&["--actor", "alice", "incidents", "draft", &incident]).ok();
    t.run(&["--actor", "bob", "incidents", "approve", &incident]).ok();
    t.run(&["--actor", "alice", "incidents", "dispatch", &incident]).ok();
    let closing = Utc::now();
    t.run(&["--actor", "alice", "incidents", "close", &incident]).ok();
    let running = t.run(&["--json", "deadlines"]).ok().json();
    let summary = clock(&running, "cn-cac", "final").expect("summary report");
    assert_eq!(summary["label_en"], "summary report");
    let due = at(&summary["due_at"]);
    assert!(
        due > closing + Duration::days(30) && due <= closing + Duration::days(31),
        "{due}"
    );
    assert!(
        summary["due_local"]
            .as_str()
            .is_some_and(|d| d.ends_with("23:59 Asia/Shanghai"))
    );

    // The summary report was drafted when handling ended, with the final figures; the
    // responder's conclusions are missing until written, by someone who then cannot approve it.
    let filings = t.run(&["--json", "filings", "list", &incident]).ok().json();
    let summary = filings
        .as_array()
        .and_then(|l| l.iter().find(|f| f["regulator"] == "cn-cac" && f["stage"] == "final"))
        .expect("the CAC summary report is drafted")
        .clone();
    assert_eq!(summary["state"], "incomplete");
    assert!(summary["deadline_at"].is_string(), "30 days from the close");
    assert_eq!(summary["missing"].as_array().map(Vec::len), Some(3));
    let id = summary["id"].as_str().expect("id");
    let shown = t.run(&["--json", "filings", "show", id]).ok().json();
    let figures = shown["content"]["items"][1]["value"].as_str().unwrap_or_default();
    assert!(figures.contains("告知") && figures.contains("个商家"), "{figures}");
    for (field, text) in [
        ("responsibility", "安全运维负责人未落实员工账号两步验证要求，已追责。"),
        ("remediation", "全部员工账号强制两步验证；后台导出限量并告警。"),
        ("lessons", "高权限账号必须多因素认证；数据导出须有上限和审计。"),
    ] {
        t.run(&["--actor", "bob", "filings", "write", id, field, text]).ok();
    }
    let own = t.run(&["--actor", "bob", "filings", "approve", id]);
    assert!(own.code != 0 && own.stderr.contains("four eyes"), "{}", own.stderr);
    t.run(&["--actor", "carol", "filings", "approve", id]).ok();
    let filed = t
        .run(&["--json", "--actor", "bob", "filings", "submit", id])
        .ok()
        .json();
    assert_eq!(filed["state"], "awaiting_reference");
    let document = std::fs::read_to_string(filed["location"].as_str().expect("document")).expect("read");
    assert!(
        document.contains("总结报告") && document.contains("经验教训"),
        "the summary document"
    );

    // The API lists the same clocks.
    tocsin::install_crypto_provider();
    let server = t.serve();
    let (_, api) = t
        .api(&server, &[("ann", "auditor")])
        .get("ann", &format!("/api/v1/deadlines?incident={incident}&all=true"))
        .await;
    let cli = t.run(&["--json", "deadlines", &incident, "--all"]).ok().json();
    let key = |v: &Value| -> Vec<(String, String, String)> {
        v.as_array()
            .expect("list")
            .iter()
            .map(|c| {
                (
                    c["regulator"].to_string(),
                    c["stage"].to_string(),
                    c["due_at"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(key(&api), key(&cli));
}

#[test]
fn an_unknown_incident_is_refused() {
    let t = Tocsin::new();
    let run = t.run(&["deadlines", "INC-2026-9999"]);
    assert_ne!(run.code, 0);
    assert!(run.stderr.contains("INC-2026-9999"), "{}", run.stderr);
}
