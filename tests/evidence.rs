//! The evidence package: what a regulator or a court receives to check, without Tocsin, what
//! each merchant was sent, when, through whom and with what outcome.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use common::smtp_server::{Reply, SmtpServer};
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every file under `dir`, relative and `/`-separated, with its bytes.
fn files_under(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under root");
                let rel = rel.to_string_lossy().replace('\\', "/");
                out.insert(rel, std::fs::read(&path).expect("read file"));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `sha256sum -c SHA256SUMS` in `dir`: whether every checksum holds.
fn sha256sum_check(dir: &Path) -> bool {
    Command::new("sha256sum")
        .args(["-c", "--status", "SHA256SUMS"])
        .current_dir(dir)
        .status()
        .expect("run sha256sum")
        .success()
}

/// The package in `dir` checks against its manifest: every file listed with its size and
/// hash, none missing, none unlisted; `SHA256SUMS` agrees with coreutils.
fn assert_matches_manifest(dir: &Path) -> Value {
    let files = files_under(dir);
    let manifest: Value = serde_json::from_slice(&files["manifest.json"]).expect("manifest is JSON");
    let listed: BTreeMap<String, (u64, String)> = manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| {
            (
                f["path"].as_str().expect("path").to_owned(),
                (
                    f["bytes"].as_u64().expect("bytes"),
                    f["sha256"].as_str().expect("sha256").to_owned(),
                ),
            )
        })
        .collect();
    for (path, bytes) in &files {
        if path == "manifest.json" || path == "SHA256SUMS" {
            continue;
        }
        let (size, hash) = listed
            .get(path)
            .unwrap_or_else(|| panic!("{path} is not in the manifest"));
        assert_eq!(*size, bytes.len() as u64, "{path}'s size");
        assert_eq!(*hash, sha256_hex(bytes), "{path}'s hash");
    }
    for path in listed.keys() {
        assert!(files.contains_key(path), "{path} is listed but missing");
    }
    assert!(sha256sum_check(dir), "sha256sum -c SHA256SUMS");
    manifest
}

fn csv_rows(bytes: &[u8]) -> Vec<BTreeMap<String, String>> {
    let mut reader = csv::Reader::from_reader(bytes);
    let headers = reader.headers().expect("headers").clone();
    reader
        .records()
        .map(|r| {
            let r = r.expect("row");
            headers
                .iter()
                .zip(r.iter())
                .map(|(h, v)| (h.to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_evidence_package_holds_the_whole_incident_and_checks_against_its_manifest() {
    tocsin::install_crypto_provider();
    let smtp = SmtpServer::refusing("gone@example.cn", Reply::Permanent).await;
    let mut t = Tocsin::new();
    t.smtp(smtp.port());
    let merchants = [
        merchant(
            "ev-1",
            "en",
            Some("one@example.com"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant(
            "ev-2",
            "zh-CN",
            Some("gone@example.cn"),
            None,
            None,
            &["account_credentials"],
        ),
        merchant("ev-3", "zh-CN", None, None, None, &["account_credentials"]),
    ]
    .join("\n");
    let incident = approved_incident(&t, "ev", &merchants, "ev-1,ev-2,ev-3");
    t.run(&[
        "--actor",
        "alice",
        "incidents",
        "dispatch",
        &incident,
        "--timeout",
        "30",
    ])
    .ok();
    t.run(&["--actor", "alice", "incidents", "bulletin", &incident]).ok();
    let filing = file_report(&t, &incident, "cn-cac", "initial");
    let filing_id = filing["id"].as_str().unwrap_or_else(|| panic!("{filing}"));
    t.run(&["--actor", "alice", "filings", "reference", filing_id, "CAC-2026-0042"])
        .ok();
    let deliveries = t.run(&["--json", "incidents", "deliveries", &incident]).ok().json();

    let out = tempfile::tempdir().expect("dir");
    let dir = out.path().join("package");
    // Who exports is recorded: the actor is required.
    let anonymous = t.run(&["evidence", "export", &incident, dir.to_str().expect("utf-8")]);
    assert_ne!(anonymous.code, 0);
    assert!(anonymous.stderr.contains("--actor"), "{}", anonymous.stderr);
    let export = || {
        t.run(&[
            "--actor",
            "olga",
            "evidence",
            "export",
            &incident,
            dir.to_str().expect("utf-8"),
        ])
    };
    let run = export().ok();
    assert!(run.stdout.contains("sha256sum -c SHA256SUMS"), "{}", run.stdout);

    let manifest = assert_matches_manifest(&dir);
    assert_eq!(manifest["format"], "tocsin-evidence/1");
    assert_eq!(manifest["incident_id"], incident.as_str());
    assert_eq!(manifest["exported_by"], "olga");
    let files = files_under(&dir);

    // The delivery ledger: one row per delivery, as the database has it.
    let rows = csv_rows(&files["deliveries.csv"]);
    let deliveries = deliveries.as_array().expect("deliveries");
    assert_eq!(rows.len(), deliveries.len());
    assert_eq!(rows.len(), 2, "ev-3 has no contact: {rows:#?}");
    for d in deliveries {
        let row = rows
            .iter()
            .find(|r| r["delivery_id"] == d["id"].as_str().expect("id"))
            .unwrap_or_else(|| panic!("no row for {d}"));
        for field in ["merchant_id", "channel", "address", "status", "provider"] {
            assert_eq!(row[field], d[field].as_str().unwrap_or_default(), "{field} of {d}");
        }
        assert_eq!(row["attempts"], d["attempts"].to_string());
        assert_eq!(row["draft_version"], "1");
    }
    let sent = rows.iter().find(|r| r["merchant_id"] == "ev-1").expect("ev-1's row");
    assert_eq!(sent["status"], "accepted");
    assert!(!sent["sent_at"].is_empty());
    let refused = rows.iter().find(|r| r["merchant_id"] == "ev-2").expect("ev-2's row");
    assert_eq!(refused["status"], "failed");
    let history = csv_rows(&files["delivery_events.csv"]);
    assert!(
        history
            .iter()
            .any(|e| e["delivery_id"] == refused["delivery_id"] && e["event"] == "attempt"),
        "the refused attempt is in the history: {history:#?}"
    );

    // Every notice with a content hash anyone can recompute, and the text ev-1 was sent is
    // the text of its notice.
    let notices: Vec<Value> = String::from_utf8_lossy(&files["notices/v1.jsonl"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(notices.len(), 3);
    for line in &notices {
        let n = &line["notice"];
        let recomputed = sha256_hex(
            json!([
                n["merchant_id"],
                n["locale"],
                n["url"],
                n["sections"],
                n["email_subject"],
                n["email_text"],
                n["email_html"],
                n["sms_text"],
                n["push_title"],
                n["push_body"],
                n["letter_html"]
            ])
            .to_string()
            .as_bytes(),
        );
        assert_eq!(n["content_hash"], recomputed.as_str(), "{}", n["merchant_id"]);
    }
    let ev1 = &notices
        .iter()
        .find(|l| l["notice"]["merchant_id"] == "ev-1")
        .expect("ev-1's notice")["notice"];
    let email_hash = sha256_hex(
        json!([ev1["email_subject"], ev1["email_text"], ev1["email_html"]])
            .to_string()
            .as_bytes(),
    );
    assert_eq!(sent["sent_content_sha256"], email_hash, "the sent text is the notice's");
    let drafts: Value = serde_json::from_slice(&files["drafts.json"]).expect("drafts");
    assert_eq!(drafts[0]["drafted_by"], "alice");
    assert_eq!(drafts[0]["approved_by"], "bob");

    // The bulletin and whom it covered; its published files.
    let bulletins: Value = serde_json::from_slice(&files["bulletins.json"]).expect("bulletins");
    assert!(bulletins[0]["content_hash"].is_string(), "{bulletins}");
    let covered: Vec<String> = csv_rows(&files["bulletins/v1-covered.csv"])
        .into_iter()
        .map(|r| r["merchant_id"].clone())
        .collect();
    assert_eq!(covered, ["ev-2", "ev-3"], "the unreachable merchants");
    assert!(
        files
            .keys()
            .any(|p| p.starts_with("bulletins/published/") && p.ends_with(".html"))
    );

    // The filing with its submission and the reference the regulator gave.
    let filings: Value = serde_json::from_slice(&files["filings.json"]).expect("filings");
    let cac = filings
        .as_array()
        .expect("filings")
        .iter()
        .find(|f| f["filing"]["id"] == filing_id)
        .expect("the CAC report");
    assert_eq!(cac["filing"]["reference_number"], "CAC-2026-0042");
    assert!(!cac["submissions"].as_array().expect("submissions").is_empty());
    assert!(files.keys().any(|p| p.starts_with("filings/documents/")));

    // The ledger extract, and an anchor that checks against the live ledger.
    let ledger: Vec<Value> = String::from_utf8_lossy(&files["ledger.jsonl"])
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(
        ledger
            .iter()
            .all(|e| e["incident_id"] == incident.as_str() && e["hash"].is_string())
    );
    for action in [
        "incident.approved",
        "filing.approved",
        "filing.reference_recorded",
        "bulletin.published",
    ] {
        assert!(ledger.iter().any(|e| e["action"] == action), "{action} in {ledger:#?}");
    }
    assert_eq!(manifest["ledger"]["intact"], true);
    let anchor = manifest["ledger"]["anchor"].as_str().expect("anchor");
    t.run(&["audit", "verify", "--anchor", anchor]).ok();

    // Evidence is never written over; a changed file shows.
    let again = export();
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("never written over"), "{}", again.stderr);
    assert_eq!(files_under(&dir), files, "the package is unchanged");
    std::fs::write(dir.join("deliveries.csv"), b"delivery_id\n").expect("tamper");
    assert!(!sha256sum_check(&dir), "a changed file fails the check");

    // Over the API, for an auditor: the same package as a tar archive.
    let server = t.serve();
    let api = t.api(&server, &[("olga", "auditor"), ("alice", "responder")]);
    let url = format!("{}/api/v1/incidents/{incident}/evidence", server.base);
    let client = reqwest::Client::new();
    let refused = client
        .post(&url)
        .bearer_auth(api.token_of("alice"))
        .send()
        .await
        .expect("post");
    assert_eq!(refused.status().as_u16(), 403, "a responder may not export");
    let r = client
        .post(&url)
        .bearer_auth(api.token_of("olga"))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/x-tar")
    );
    let tar = r.bytes().await.expect("body");
    let unpacked = tempfile::tempdir().expect("dir");
    std::fs::write(unpacked.path().join("p.tar"), &tar).expect("write tar");
    let status = Command::new("tar")
        .args(["-xf", "p.tar"])
        .current_dir(unpacked.path())
        .status()
        .expect("run tar");
    assert!(status.success());
    let package = std::fs::read_dir(unpacked.path())
        .expect("read")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .expect("the package's directory");
    let over_api = assert_matches_manifest(&package);
    assert_eq!(over_api["exported_by"], "olga");
    // The same incident, plus the first export, which the ledger recorded.
    let (mut then, mut now) = (manifest["counts"].clone(), over_api["counts"].clone());
    assert_eq!(
        now["ledger_entries"].as_u64(),
        then["ledger_entries"].as_u64().map(|n| n + 1)
    );
    now["ledger_entries"] = Value::Null;
    then["ledger_entries"] = Value::Null;
    assert_eq!(now, then);
    let extract = std::fs::read_to_string(package.join("ledger.jsonl")).expect("ledger");
    let last: Value = serde_json::from_str(extract.lines().last().expect("an entry")).expect("JSON");
    assert_eq!(
        (last["action"].as_str(), last["actor"].as_str()),
        (Some("evidence.exported"), Some("olga"))
    );
}
