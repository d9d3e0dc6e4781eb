//! Evidence export: one incident as a self-contained package a regulator or a court can check
//! without Tocsin. Every notice version with its content hash, the per-merchant delivery
//! ledger as CSV, the bulletin versions and whom they covered, the regulator filings with
//! every submission and acknowledgement, and the audit ledger's extract with its hashes; a
//! manifest and a `SHA256SUMS` file (checked with `sha256sum -c SHA256SUMS`) list every file's
//! checksum.
//!
//! The package is written into a hidden sibling directory and renamed into place when it is
//! whole, so a crash never leaves a partial package under the name asked for; an existing,
//! non-empty directory is never written into.

use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::domain::{Actor, MerchantId};
use crate::engine::{EngineError, Tocsin};
use crate::ledger::Verification;
use crate::model::{Delivery, NewLedgerEntry};

/// The package format, named in the manifest.
pub const FORMAT: &str = "tocsin-evidence/1";

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("evidence export: {0} exists and is not empty; evidence is never written over: name a new directory")]
    NotEmpty(String),
    #[error("evidence export: writing {path}: {reason}")]
    Write { path: String, reason: String },
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> EvidenceError {
    EvidenceError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// One file of the package.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PackagedFile {
    /// Relative to the package, `/`-separated.
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The package's table of contents, `manifest.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    pub format: &'static str,
    pub incident_id: String,
    pub reference: String,
    pub exported_at: DateTime<Utc>,
    pub exported_by: String,
    pub tocsin_version: &'static str,
    /// The whole ledger's verification at export time, and its head: a later check of the
    /// same database can be anchored to it (`tocsin audit verify --anchor`).
    pub ledger: Value,
    pub counts: Value,
    /// Every file but `manifest.json` itself and `SHA256SUMS`.
    pub files: Vec<PackagedFile>,
}

/// A file being written: counted and hashed as it goes.
struct HashingFile {
    out: BufWriter<std::fs::File>,
    hasher: Sha256,
    bytes: u64,
    path: PathBuf,
}

impl Write for HashingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The package under construction in its staging directory.
struct Package {
    staging: PathBuf,
    files: Vec<PackagedFile>,
}

impl Package {
    fn open(&self, rel: &str) -> Result<HashingFile, EvidenceError> {
        let path = self.staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| write_error(parent, e))?;
        }
        let file = std::fs::File::create(&path).map_err(|e| write_error(&path, e))?;
        Ok(HashingFile {
            out: BufWriter::new(file),
            hasher: Sha256::new(),
            bytes: 0,
            path,
        })
    }

    fn close(&mut self, rel: &str, mut file: HashingFile) -> Result<(), EvidenceError> {
        file.flush().map_err(|e| write_error(&file.path, e))?;
        let out = file.out.into_inner().map_err(|e| write_error(&file.path, e.error()))?;
        out.sync_all().map_err(|e| write_error(&file.path, e))?;
        self.files.push(PackagedFile {
            path: rel.to_owned(),
            bytes: file.bytes,
            sha256: hex::encode(file.hasher.finalize()),
        });
        Ok(())
    }

    fn put(&mut self, rel: &str, bytes: &[u8]) -> Result<(), EvidenceError> {
        let mut file = self.open(rel)?;
        file.write_all(bytes).map_err(|e| write_error(&file.path, e))?;
        self.close(rel, file)
    }

    fn put_json(&mut self, rel: &str, value: &impl Serialize) -> Result<(), EvidenceError> {
        let text = serde_json::to_vec_pretty(value).map_err(|e| write_error(Path::new(rel), e))?;
        self.put(rel, &text)
    }

    /// Copies the files under `from` (if it exists) to `rel/...`, in name order.
    fn copy_tree(&mut self, from: &Path, rel: &str) -> Result<(), EvidenceError> {
        let Ok(entries) = std::fs::read_dir(from) else {
            return Ok(());
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // files being written
            }
            let path = entry.path();
            let target = format!("{rel}/{name}");
            if path.is_dir() {
                self.copy_tree(&path, &target)?;
            } else {
                let bytes = std::fs::read(&path).map_err(|e| write_error(&path, e))?;
                self.put(&target, &bytes)?;
            }
        }
        Ok(())
    }
}

/// A CSV writer over a package file.
fn csv_writer(file: HashingFile) -> csv::Writer<HashingFile> {
    csv::Writer::from_writer(file)
}

fn finish_csv(package: &mut Package, rel: &str, writer: csv::Writer<HashingFile>) -> Result<(), EvidenceError> {
    let file = writer
        .into_inner()
        .map_err(|e| write_error(Path::new(rel), e.error()))?;
    package.close(rel, file)
}

fn time(t: Option<DateTime<Utc>>) -> String {
    t.map(|t| t.to_rfc3339()).unwrap_or_default()
}

const DELIVERY_COLUMNS: &[&str] = &[
    "delivery_id",
    "merchant_id",
    "draft_version",
    "notice_id",
    "channel",
    "plan_position",
    "address",
    "provider",
    "attempts",
    "status",
    "error_kind",
    "last_error",
    "provider_message_id",
    "sent_content_sha256",
    "created_at",
    "sent_at",
    "delivered_at",
    "receipt_due_at",
];

fn delivery_row(d: &Delivery, version: i64) -> Vec<String> {
    vec![
        d.id.to_string(),
        d.merchant_id.to_string(),
        version.to_string(),
        d.notice_id.to_string(),
        d.channel.as_str().to_owned(),
        d.plan_position.to_string(),
        d.address.clone(),
        d.provider.clone().unwrap_or_default(),
        d.attempts.to_string(),
        d.status.as_str().to_owned(),
        d.error_kind.map(|k| k.as_str().to_owned()).unwrap_or_default(),
        d.last_error.clone().unwrap_or_default(),
        d.provider_message_id.clone().unwrap_or_default(),
        d.content_hash.clone().unwrap_or_default(),
        d.created_at.to_rfc3339(),
        time(d.sent_at),
        time(d.delivered_at),
        time(d.receipt_due_at),
    ]
}

const README: &str = "\
Tocsin evidence package (format tocsin-evidence/1)

manifest.json        the incident, who exported it and when, the audit ledger's verification
                     and head at that moment, and every file with its size and SHA-256
SHA256SUMS           the same checksums for `sha256sum -c SHA256SUMS` (manifest.json included)
incident.json        the incident: facts, grade, every state change (who, when, why), scope
                     counts, delivery tallies, and the security events that raised it
drafts.json          every notice version: its content hash (SHA-256 over its notices' content
                     hashes in merchant order: what the approver approved), drafter, approver
notices/vN.jsonl     version N's notice to each merchant, one JSON object per line, with every
                     rendering (email, SMS, push, letter) and `content_hash`: the SHA-256 of the
                     compact JSON array [merchant_id, locale, url, sections, email_subject,
                     email_text, email_html, sms_text, push_title, push_body, letter_html]
deliveries.csv       every delivery: merchant, version, channel, address, provider, attempts,
                     outcome, provider reference, the SHA-256 of the exact text sent, times
delivery_events.csv  every attempt, receipt and re-drive of every delivery
bulletins.json       the public bulletin's versions: reason, content hash, time, how many covered
bulletins/vN-covered.csv  the merchants version N covered
bulletins/published/ the bulletin's files as published (HTML, Atom feed, JSON)
lookups.csv          the bulletin's \"am I affected?\" lookups (no merchant id, no factor)
filings.json         every regulator report: items, state, approval, reference, acknowledgement,
                     and every submission attempt with its answer
filings/documents/   the reports as written for submission
ledger.jsonl         the audit ledger's entries about this incident, each with prev_hash and
                     hash: SHA-256 over the compact JSON {seq, at, actor, action, incident_id,
                     detail, prev_hash}; manifest.json holds the chain's verification and head
";

impl Tocsin {
    /// Writes the evidence package of incident `id` (or reference) to `dir`, which must not
    /// exist or be empty; records the export in the ledger with the manifest's hash.
    pub async fn export_evidence(&self, id: &str, dir: &Path, actor: &Actor) -> Result<Manifest, EngineError> {
        let incident = self.incident(id).await?;
        if std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some()) {
            return Err(EvidenceError::NotEmpty(dir.display().to_string()).into());
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "evidence".into());
        let staging = dir.with_file_name(format!(".{name}.partial-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&staging).map_err(|e| write_error(&staging, e))?;
        let mut package = Package {
            staging: staging.clone(),
            files: Vec::new(),
        };
        let result = self.fill_package(&mut package, &incident, actor).await;
        let manifest = match result {
            Ok(manifest) => manifest,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
        };
        // manifest.json and SHA256SUMS, then the rename that makes the package appear whole.
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| write_error(dir, e))?;
        package.put("manifest.json", &manifest_bytes)?;
        let mut sums = String::new();
        for f in &package.files {
            sums.push_str(&format!("{}  {}\n", f.sha256, f.path));
        }
        std::fs::write(staging.join("SHA256SUMS"), sums).map_err(|e| write_error(dir, e))?;
        if dir.exists() {
            std::fs::remove_dir(dir).map_err(|e| write_error(dir, e))?;
        }
        std::fs::rename(&staging, dir).map_err(|e| write_error(dir, e))?;
        let manifest_sha256 = hex::encode(Sha256::digest(&manifest_bytes));
        self.store
            .append_ledger(&NewLedgerEntry::new(
                actor,
                "evidence.exported",
                Some(&incident.id),
                json!({ "manifest_sha256": manifest_sha256, "files": manifest.files.len() }),
            ))
            .await?;
        Ok(manifest)
    }

    async fn fill_package(
        &self,
        package: &mut Package,
        incident: &crate::model::Incident,
        actor: &Actor,
    ) -> Result<Manifest, EngineError> {
        let exported_at = Utc::now();
        package.put("README.txt", README.as_bytes())?;

        let view = self.view(incident.id.as_str()).await?;
        let events = self.store.incident_events(&incident.id).await?;
        package.put_json("incident.json", &json!({ "view": view, "events": events }))?;

        // Notices: every version, every merchant, rendered as sent.
        let drafts = self.store.drafts(&incident.id).await?;
        package.put_json("drafts.json", &drafts)?;
        let mut notices = 0u64;
        for draft in &drafts {
            let rel = format!("notices/v{}.jsonl", draft.version);
            let mut file = package.open(&rel)?;
            let mut after: Option<MerchantId> = None;
            loop {
                let page = self.store.notice_records(&draft.id, after.as_ref(), 500).await?;
                let Some(last) = page.last() else { break };
                after = Some(last.merchant_id.clone());
                for record in &page {
                    let postal = self
                        .store
                        .merchant(&record.merchant_id)
                        .await?
                        .and_then(|m| m.postal_address);
                    let notice = self.renderer.render(record, postal.as_deref(), None).await?;
                    let mut line = serde_json::to_vec(&json!({
                        "version": draft.version,
                        "notice": notice,
                    }))
                    .map_err(|e| write_error(&file.path, e))?;
                    line.push(b'\n');
                    file.write_all(&line).map_err(|e| write_error(&file.path, e))?;
                    notices += 1;
                }
            }
            package.close(&rel, file)?;
        }

        // The delivery ledger and every attempt behind it.
        let versions: std::collections::HashMap<_, _> = drafts.iter().map(|d| (d.id.clone(), d.version)).collect();
        let deliveries = self.store.deliveries(&incident.id).await?;
        let mut csv = csv_writer(package.open("deliveries.csv")?);
        let mut history = csv_writer(package.open("delivery_events.csv")?);
        let csv_error = |e: csv::Error| EvidenceError::Write {
            path: "deliveries.csv".into(),
            reason: e.to_string(),
        };
        csv.write_record(DELIVERY_COLUMNS).map_err(csv_error)?;
        history
            .write_record([
                "delivery_id",
                "at",
                "event",
                "attempt",
                "provider",
                "outcome",
                "error_kind",
                "detail",
            ])
            .map_err(csv_error)?;
        for d in &deliveries {
            let version = versions.get(&d.draft_id).copied().unwrap_or_default();
            csv.write_record(delivery_row(d, version)).map_err(csv_error)?;
            for e in self.store.delivery_events(&d.id).await? {
                history
                    .write_record([
                        e.delivery_id,
                        e.at.to_rfc3339(),
                        e.event,
                        e.attempt.to_string(),
                        e.provider.unwrap_or_default(),
                        e.outcome,
                        e.error_kind.unwrap_or_default(),
                        e.detail.unwrap_or_default(),
                    ])
                    .map_err(csv_error)?;
            }
        }
        finish_csv(package, "deliveries.csv", csv)?;
        finish_csv(package, "delivery_events.csv", history)?;

        // The public bulletin: versions, whom each covered, the files as published.
        let bulletins = self.store.bulletins(&incident.id).await?;
        package.put_json("bulletins.json", &bulletins)?;
        for b in &bulletins {
            let rel = format!("bulletins/v{}-covered.csv", b.version);
            let mut csv = csv_writer(package.open(&rel)?);
            csv.write_record(["merchant_id"]).map_err(csv_error)?;
            for m in self.store.bulletin_coverage(&b.id).await? {
                csv.write_record([m.as_str()]).map_err(csv_error)?;
            }
            finish_csv(package, &rel, csv)?;
        }
        package.copy_tree(&self.paths.bulletins.join(&incident.reference), "bulletins/published")?;
        let lookups = self.store.lookups(&incident.reference).await?;
        let mut csv = csv_writer(package.open("lookups.csv")?);
        csv.write_record(["at", "outcome", "client_hash"]).map_err(csv_error)?;
        for l in &lookups {
            csv.write_record([l.at.to_rfc3339().as_str(), &l.outcome, &l.client])
                .map_err(csv_error)?;
        }
        finish_csv(package, "lookups.csv", csv)?;

        // Regulator filings with every submission attempt and acknowledgement.
        let mut filings = Vec::new();
        for f in self.store.filings(&incident.id).await? {
            let submissions = self.store.filing_submissions(&f.id).await?;
            filings.push(json!({ "filing": f, "submissions": submissions }));
        }
        package.put_json("filings.json", &filings)?;
        package.copy_tree(&self.paths.filings.join(&incident.reference), "filings/documents")?;

        // The ledger's extract, and the whole chain's verification now.
        let entries = self.store.ledger_entries(Some(&incident.id)).await?;
        let mut file = package.open("ledger.jsonl")?;
        for e in &entries {
            let mut line = serde_json::to_vec(e).map_err(|err| write_error(&file.path, err))?;
            line.push(b'\n');
            file.write_all(&line).map_err(|err| write_error(&file.path, err))?;
        }
        package.close("ledger.jsonl", file)?;
        let verification = crate::ledger::verify(self.store.as_ref()).await?;
        let ledger = match &verification {
            Verification::Intact { entries: total, head } => json!({
                "intact": true, "entries": total, "head": head, "anchor": format!("{total}:{head}"),
                "extract_entries": entries.len(),
            }),
            Verification::Broken { seq, reason } => json!({
                "intact": false, "first_broken_entry": seq, "reason": reason,
                "extract_entries": entries.len(),
            }),
        };

        Ok(Manifest {
            format: FORMAT,
            incident_id: incident.id.to_string(),
            reference: incident.reference.clone(),
            exported_at,
            exported_by: actor.to_string(),
            tocsin_version: env!("CARGO_PKG_VERSION"),
            ledger,
            counts: json!({
                "notice_versions": drafts.len(),
                "notices": notices,
                "deliveries": deliveries.len(),
                "bulletin_versions": bulletins.len(),
                "filings": filings.len(),
                "ledger_entries": entries.len(),
                "lookups": lookups.len(),
            }),
            files: package.files.clone(),
        })
    }
}

/// `dir` (a package) as a tar archive at `archive`, its files under `name/`.
pub fn archive(dir: &Path, name: &str, archive: &Path) -> Result<(), EvidenceError> {
    let file = std::fs::File::create(archive).map_err(|e| write_error(archive, e))?;
    let mut builder = tar::Builder::new(BufWriter::new(file));
    builder.mode(tar::HeaderMode::Deterministic);
    builder.append_dir_all(name, dir).map_err(|e| write_error(archive, e))?;
    let out = builder.into_inner().map_err(|e| write_error(archive, e))?;
    out.into_inner()
        .map_err(|e| write_error(archive, e.error()))?
        .sync_all()
        .map_err(|e| write_error(archive, e))
}

impl Tocsin {
    /// Exports incident `id`'s package into the data directory's `evidence/` (kept there) and
    /// archives it as tar for a download; returns the archive's path and the package's name.
    pub async fn export_evidence_archive(&self, id: &str, actor: &Actor) -> Result<(PathBuf, String), EngineError> {
        let incident = self.incident(id).await?;
        let name = format!(
            "{}-evidence-{}",
            incident.reference,
            Utc::now().format("%Y%m%dT%H%M%S%.3fZ")
        );
        std::fs::create_dir_all(&self.paths.evidence).map_err(|e| write_error(&self.paths.evidence, e))?;
        let dir = self.paths.evidence.join(&name);
        self.export_evidence(incident.id.as_str(), &dir, actor).await?;
        let tar = self.paths.evidence.join(format!("{name}.tar"));
        let (from, to, package) = (dir.clone(), tar.clone(), name.clone());
        tokio::task::spawn_blocking(move || archive(&from, &package, &to))
            .await
            .map_err(|e| write_error(&tar, e))??;
        Ok((tar, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_hashed_and_counted_as_written() {
        let dir = tempfile::tempdir().expect("dir");
        let mut package = Package {
            staging: dir.path().to_owned(),
            files: Vec::new(),
        };
        package.put("a/b.txt", b"hello").expect("put");
        assert_eq!(
            package.files,
            vec![PackagedFile {
                path: "a/b.txt".into(),
                bytes: 5,
                sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824".into(),
            }]
        );
        assert_eq!(std::fs::read(dir.path().join("a/b.txt")).expect("read"), b"hello");
    }
}
