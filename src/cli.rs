//! The command line: argument definitions and their translation to engine calls. Output is
//! for people by default and JSON with `--json`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::config::Settings;
use crate::domain::{Actor, FieldError};
use crate::engine::Tocsin;
use crate::ledger::Verification;
use crate::model::ScopeRule;

#[derive(Debug, Parser)]
#[command(
    name = "tocsin",
    version,
    about = "Incident notification: from a security event to lawful, timely, provable notice"
)]
pub struct Cli {
    /// Directory holding the embedded database and every output.
    #[arg(long, global = true, env = "TOCSIN_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Configuration file layered over the built-in defaults.
    #[arg(long, global = true, env = "TOCSIN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Who is acting (recorded with every transition). Approval needs a different actor than drafting.
    #[arg(long, global = true, env = "TOCSIN_ACTOR")]
    pub actor: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole flow on the demo data and print a summary.
    Demo,
    /// Run the HTTP API, the public bulletins and the delivery worker.
    Serve {
        /// Address to listen on (loopback only).
        #[arg(long)]
        listen: Option<String>,
    },
    /// The merchant directory.
    #[command(subcommand)]
    Merchants(MerchantsCmd),
    /// Security events.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Incidents and their lifecycle.
    #[command(subcommand)]
    Incidents(IncidentsCmd),
    /// Drafted notices.
    #[command(subcommand)]
    Notices(NoticesCmd),
    /// Regulator reports: draft, complete, approve (a second person), submit, record the
    /// reference number and the acknowledgement.
    #[command(subcommand)]
    Filings(FilingsCmd),
    /// API tokens: each acts as one actor with one role; only its hash is stored.
    #[command(subcommand)]
    Tokens(TokensCmd),
    /// The audit ledger.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Evidence packages for regulators and courts.
    #[command(subcommand)]
    Evidence(EvidenceCmd),
    /// The outbox across incidents: dead letters, re-drives, histories, providers.
    #[command(subcommand)]
    Deliveries(DeliveriesCmd),
    /// Every regulator clock still running (or past) with the time left, soonest first: each
    /// profile in config/regulators that applies to an incident, counted in its time zone.
    Deadlines {
        /// Only this incident (id or reference).
        incident: Option<String>,
        /// Also clocks already met and clocks not started yet.
        #[arg(long)]
        all: bool,
    },
    /// The deadline watchdog (`tocsin serve` runs it on `watchdog.schedule`).
    #[command(subcommand)]
    Watchdog(WatchdogCmd),
    /// Benchmarks that print one JSON line per run.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Generate a directory of N merchants and time scope, classification, the completeness
    /// check of every notice variant and outbox insertion (confirm to ready-to-approve).
    Draft {
        #[arg(long, default_value_t = 10_000)]
        merchants: u64,
    },
    /// Deliver N pre-drafted notices to the server given here, recording every outcome.
    Deliver {
        /// email (needs --smtp), sms or push (need --url).
        #[arg(long, default_value = "email")]
        channel: String,
        /// SMTP server HOST:PORT (plain SMTP, e.g. Postfix's smtp-sink).
        #[arg(long)]
        smtp: Option<String>,
        /// HTTP endpoint for sms or push (the generic signed webhook).
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value_t = 20_000)]
        notices: u64,
        /// Sends in flight.
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
        /// Deliveries claimed at once.
        #[arg(long, default_value_t = 1024)]
        batch: u32,
    },
    /// The HTTP client alone: N POSTs shaped like the signed webhook's (same headers, a body of
    /// the same size) with nothing drafted, rendered or recorded: the floor under `bench
    /// deliver --channel sms|push`, against the same sink.
    HttpFloor {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 40_000)]
        requests: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: u32,
    },
    /// A minimal HTTP peer answering 200 to everything, for `bench deliver --url` and `wrk`.
    Sink {
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create a token acting as NAME; it is printed once and cannot be shown again.
    Create {
        /// Who the token acts as (recorded with every change made with it).
        name: String,
        /// responder, approver, auditor or admin.
        #[arg(long)]
        role: String,
        /// When it stops working (RFC 3339).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Every token: actor, role, created, expiry, revocation (never the token itself).
    List,
    /// Revoke a token at once.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum FilingsCmd {
    /// Draft the reports the incident owes: every applicable regulator profile and every
    /// stage whose clock runs (or the ones named). Drafts not yet approved are brought up to
    /// date with the facts and figures; incomplete ones are kept with their missing fields.
    Draft {
        incident: String,
        /// Only this regulator profile (cn-cac, eu-gdpr-33...).
        #[arg(long)]
        regulator: Option<String>,
        /// Only this stage (initial, update, final), even one without a running clock.
        #[arg(long)]
        stage: Option<String>,
    },
    /// The incident's reports: state, deadline, what is missing.
    List { incident: String },
    /// One report: its items and every submission attempt.
    Show { filing: String },
    /// Write a field of a draft report (lessons, remediation...) in the report's language;
    /// an empty text removes it. The writer cannot approve the report.
    Write {
        filing: String,
        field: String,
        /// The text (or --file).
        text: Option<String>,
        /// Read the text from this file.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Approve a complete report (not by anyone who drafted or wrote into it).
    Approve { filing: String },
    /// Submit an approved report by its regulator's method: email, HTTPS, or a document for the
    /// regulator's portal (then `filings reference`).
    Submit { filing: String },
    /// Record the reference number the regulator's portal gave a report a person filed.
    Reference {
        filing: String,
        reference: String,
        /// When it was filed (RFC 3339); default now.
        #[arg(long)]
        filed_at: Option<String>,
    },
    /// Record the regulator's acknowledgement of a submitted report.
    Ack {
        filing: String,
        #[arg(long)]
        reference: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WatchdogCmd {
    /// One round now: store and send the reminders and escalations the clocks call for.
    Tick {
        /// Run the round as if it were this instant (RFC 3339), e.g. to rehearse a deadline.
        #[arg(long)]
        now: Option<String>,
    },
    /// Every reminder of an incident: point, channel, status, when sent.
    Reminders { incident: String },
}

#[derive(Debug, Args)]
pub struct DeliveryFilterArgs {
    /// An incident id or reference.
    #[arg(long)]
    pub incident: Option<String>,
    /// email, sms or push.
    #[arg(long)]
    pub channel: Option<String>,
    /// A configured provider name.
    #[arg(long)]
    pub provider: Option<String>,
    /// transient, permanent, or a failure kind (network, timeout, throttled, provider_error, auth, ...).
    #[arg(long)]
    pub error_class: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCmd {
    /// List dead letters (deliveries whose attempts ran out).
    Dead {
        #[command(flatten)]
        filter: DeliveryFilterArgs,
        /// Only those after this delivery id (the last of the previous page).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Put matching dead letters back in the outbox with fresh attempts.
    Redrive {
        #[command(flatten)]
        filter: DeliveryFilterArgs,
    },
    /// A delivery's attempts and receipts.
    History { id: String },
    /// Configured providers per channel with their circuit breakers.
    Providers,
}

async fn filter_of(
    engine: &Tocsin,
    f: &DeliveryFilterArgs,
) -> Result<crate::store::DeliveryFilter, crate::EngineError> {
    engine
        .delivery_filter(
            f.incident.as_deref(),
            f.channel.as_deref(),
            f.provider.as_deref(),
            f.error_class.as_deref(),
        )
        .await
}

async fn deliveries(engine: &Tocsin, cli: &Cli, cmd: &DeliveriesCmd) -> anyhow::Result<()> {
    let json = cli.json;
    match cmd {
        DeliveriesCmd::Dead {
            filter: f,
            after,
            limit,
        } => {
            let after = after
                .as_deref()
                .map(|a| a.parse::<crate::domain::DeliveryId>())
                .transpose()
                .map_err(|e| anyhow::anyhow!("--after: {}", e.reason))?;
            let list = engine
                .dead_letters(&filter_of(engine, f).await?, after.as_ref(), *limit)
                .await?;
            print(json, &list, || {
                if list.is_empty() {
                    return "no dead letters match".into();
                }
                list.iter()
                    .map(|d| {
                        format!(
                            "{}  {}  {:<5}  {:<10}  attempts {}  {}  {}",
                            d.id,
                            d.merchant_id,
                            d.channel,
                            d.provider.as_deref().unwrap_or("-"),
                            d.attempts,
                            d.error_kind.map(|k| k.as_str()).unwrap_or("-"),
                            d.last_error.as_deref().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        DeliveriesCmd::Redrive { filter: f } => {
            let n = engine
                .redrive(&filter_of(engine, f).await?, &actor(&cli.actor, None)?)
                .await?;
            print(json, &serde_json::json!({ "redriven": n }), || {
                format!("{n} dead letters back in the outbox; `tocsin serve` (or the next dispatch) sends them")
            });
        }
        DeliveriesCmd::History { id } => {
            let h = engine.delivery_history(id).await?;
            print(json, &h, || {
                let d = &h.delivery;
                let mut out = format!(
                    "{}  {}  {}  status {}  attempts {}  provider {}",
                    d.id,
                    d.merchant_id,
                    d.channel,
                    d.status,
                    d.attempts,
                    d.provider.as_deref().unwrap_or("-")
                );
                for e in &h.events {
                    out.push_str(&format!(
                        "\n  {}  {:<15} #{} {:<10} {:<11} {} {}",
                        crate::time::fmt_ts(e.at),
                        e.event,
                        e.attempt,
                        e.provider.as_deref().unwrap_or("-"),
                        e.outcome,
                        e.error_kind.as_deref().unwrap_or(""),
                        e.detail.as_deref().unwrap_or("")
                    ));
                }
                out
            });
        }
        DeliveriesCmd::Providers => {
            let list = engine.providers().await?;
            print(json, &list, || {
                list.iter()
                    .map(|p| {
                        format!(
                            "{:<5} {}. {:<16} breaker {:<9} failures {}{}",
                            p.channel.as_str(),
                            p.position,
                            p.name,
                            p.breaker,
                            p.consecutive_failures,
                            p.open_until
                                .map(|u| format!("  open until {}", crate::time::fmt_ts(u)))
                                .unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    engine.store.checkpoint().await?;
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum MerchantsCmd {
    /// Import (insert or update) merchants from a .jsonl or .csv file.
    Import { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum EventsCmd {
    /// Ingest events from a file (one JSON object, an array, or JSON Lines); `-` reads stdin.
    Ingest { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct ScopeArgs {
    /// A scope rule as a JSON file (merchant_ids, any_categories, regions, created_after, created_before).
    #[arg(long)]
    pub rule: Option<PathBuf>,
    /// Merchant ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub merchants: Vec<String>,
    /// Merchant ids, one per line, from a file.
    #[arg(long)]
    pub merchants_file: Option<PathBuf>,
    /// Merchants holding any of these categories, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub categories: Vec<String>,
    /// Regions (CN, CN-ZJ, SG...), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Merchants created at or after this time (RFC 3339).
    #[arg(long)]
    pub created_after: Option<String>,
    /// Merchants created before this time (RFC 3339).
    #[arg(long)]
    pub created_before: Option<String>,
    /// Merchants active at or after this time (RFC 3339).
    #[arg(long)]
    pub active_after: Option<String>,
    /// Merchants last active before this time (RFC 3339).
    #[arg(long)]
    pub active_before: Option<String>,
    /// Show the counts without storing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Subcommand)]
pub enum IncidentsCmd {
    /// List incidents.
    List,
    /// Show an incident: state, timeline, scope, deliveries, bulletin, filings.
    Show { id: String },
    /// Confirm an incident in triage with the facts from a JSON file.
    Confirm {
        id: String,
        #[arg(long)]
        facts: PathBuf,
    },
    /// Dismiss an incident (false positive).
    Dismiss {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Close an incident whose notices are settled (state monitoring).
    Close {
        id: String,
        #[arg(long, default_value = "handling finished")]
        reason: String,
    },
    /// Work out the affected merchants.
    Scope {
        id: String,
        #[command(flatten)]
        args: ScopeArgs,
    },
    /// Draft the notices (a new version if anything changed; after approval, an update).
    Draft {
        id: String,
        /// For an update: what changed since the earlier version, in English.
        #[arg(long)]
        changes_en: Option<String>,
        /// For an update: what changed, in Chinese.
        #[arg(long)]
        changes_zh: Option<String>,
    },
    /// Replace the incident's facts (new findings; draft an update afterwards).
    Amend {
        id: String,
        #[arg(long)]
        facts: PathBuf,
        #[arg(long)]
        reason: String,
    },
    /// Set the incident's grade; a grade other than the suggested one needs a reason.
    Grade {
        id: String,
        grade: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Decide whether one affected merchant must be notified (overrides the rules).
    NoticeDecision {
        id: String,
        merchant: String,
        /// `true` to notify, `false` to skip (PIPL Art. 57 para 2).
        #[arg(long, action = clap::ArgAction::Set)]
        required: bool,
        #[arg(long)]
        reason: String,
    },
    /// Approve the latest draft (a different actor than its drafter).
    Approve { id: String },
    /// Queue the approved notices and deliver them.
    Dispatch {
        id: String,
        /// Only queue; let `tocsin serve` deliver.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Publish the public bulletin now.
    Bulletin { id: String },
    /// For every regulator that applies and each report stage: the required fields still
    /// missing from the incident's facts (nothing listed: ready to file).
    Readiness { id: String },
    /// The "am I affected?" lookups made on the incident's bulletin: when, outcome, and the
    /// client as a salted hash (no merchant id, no second factor).
    Lookups { id: String },
    /// List the incident's deliveries.
    Deliveries { id: String },
    /// List the affected merchants: exposure, risk with its reasons, notice decision and why.
    Affected {
        id: String,
        /// Only merchants that are (`true`) or are not (`false`) to be notified.
        #[arg(long)]
        notice_required: Option<bool>,
        /// Start after this merchant id (pages are in merchant id order).
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum NoticesCmd {
    /// List the notices of an incident's latest draft.
    List { incident: String },
    /// Show a notice's sections and rendered text.
    Show { id: String },
    /// A merchant's notice on every channel and in every language.
    Preview {
        incident: String,
        merchant: String,
        /// The version (default: the latest).
        #[arg(long)]
        version: Option<i64>,
    },
    /// What changed in a merchant's notice between two versions.
    Diff {
        incident: String,
        merchant: String,
        from: i64,
        to: i64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Walk the hash chain and report the first broken link.
    Verify {
        /// An entry recorded earlier as ENTRY:HASH (this command prints the head so): the
        /// ledger must still hold it unchanged, so cutting or rebuilding the chain shows.
        #[arg(long)]
        anchor: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum EvidenceCmd {
    /// Write an incident's evidence package to DIR (new or empty): every notice version with
    /// its content hash, the delivery ledger as CSV, bulletins and whom they covered, filings
    /// with submissions and acknowledgements, the ledger extract, and checksums of it all
    /// (`sha256sum -c SHA256SUMS` inside DIR checks them).
    Export {
        /// The incident's id or reference.
        incident: String,
        dir: std::path::PathBuf,
    },
}

fn actor(cli_actor: &Option<String>, fallback: Option<&str>) -> anyhow::Result<Actor> {
    match (cli_actor.as_deref(), fallback) {
        (Some(a), _) | (None, Some(a)) => a
            .parse()
            .map_err(|e: FieldError| anyhow::anyhow!("--actor: {}", e.reason)),
        (None, None) => bail!("--actor (or TOCSIN_ACTOR) is required: every change is recorded with who made it"),
    }
}

fn filing_line(f: &crate::engine::FilingView) -> String {
    let due = match (f.deadline_at, f.minutes_left) {
        (Some(d), Some(left)) => format!("due {} ({left} min left)", crate::time::human(d)),
        (Some(d), None) => format!("due {}", crate::time::human(d)),
        (None, _) => "no fixed deadline".to_owned(),
    };
    let state = serde_json::to_value(f.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut line = format!(
        "{}  {:<11} {:<8} {:<18} {:<7} {due}",
        f.id, f.regulator, f.stage, state, f.transport
    );
    if !f.missing.is_empty() {
        line.push_str(&format!("\n    missing: {}", f.missing.join("; ")));
    }
    if let Some(r) = &f.reference_number {
        line.push_str(&format!("\n    reference: {r}"));
    }
    if let Some(l) = &f.location {
        line.push_str(&format!("\n    at: {l}"));
    }
    if let Some(e) = &f.last_error {
        line.push_str(&format!("\n    last attempt failed: {e}"));
    }
    line
}

async fn filings_command(
    engine: &Tocsin,
    cmd: &FilingsCmd,
    cli_actor: &Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let one = |f: crate::engine::FilingView| {
        print(json, &f, || filing_line(&f));
    };
    match cmd {
        FilingsCmd::Draft {
            incident,
            regulator,
            stage,
        } => {
            let drafted = engine
                .draft_filings(
                    incident,
                    regulator.as_deref(),
                    stage.as_deref(),
                    &actor(cli_actor, None)?,
                )
                .await?;
            print(json, &drafted, || {
                if drafted.is_empty() {
                    return "no report is due: no regulator profile applies, or no clock runs yet (name a --stage to draft one anyway)".into();
                }
                drafted
                    .iter()
                    .map(|d| format!("{:<9} {}", d.change, filing_line(&d.filing)))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        FilingsCmd::List { incident } => {
            let list = engine.filings(incident).await?;
            print(json, &list, || {
                list.iter().map(filing_line).collect::<Vec<_>>().join("\n")
            });
        }
        FilingsCmd::Show { filing } => {
            let d = engine.filing(filing).await?;
            print(json, &d, || {
                let mut out = filing_line(&d.filing);
                for item in d.content["items"].as_array().into_iter().flatten() {
                    out.push_str(&format!(
                        "\n  {}. {}\n     {}",
                        item["number"],
                        item["title"].as_str().unwrap_or_default(),
                        item["value"].as_str().unwrap_or_default().replace('\n', "\n     ")
                    ));
                }
                for s in &d.submissions {
                    out.push_str(&format!(
                        "\n  {} {} {} {} by {}: {}",
                        crate::time::human(s.at),
                        s.method,
                        s.outcome,
                        s.target,
                        s.actor,
                        s.detail
                    ));
                }
                out
            });
        }
        FilingsCmd::Write {
            filing,
            field,
            text,
            file,
        } => {
            let text = match (text, file) {
                (Some(t), None) => t.clone(),
                (None, Some(path)) => {
                    std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--file {}: {e}", path.display()))?
                }
                _ => bail!("give the text, or --file with it (not both)"),
            };
            one(engine
                .write_filing_field(filing, field, &text, &actor(cli_actor, None)?)
                .await?);
        }
        FilingsCmd::Approve { filing } => one(engine.approve_filing(filing, &actor(cli_actor, None)?).await?),
        FilingsCmd::Submit { filing } => one(engine.submit_filing(filing, &actor(cli_actor, None)?).await?),
        FilingsCmd::Reference {
            filing,
            reference,
            filed_at,
        } => {
            let filed_at = filed_at
                .as_deref()
                .map(|t| {
                    crate::time::parse_ts(t)
                        .map_err(|e| anyhow::anyhow!("--filed-at: '{t}' is not an RFC 3339 instant ({e})"))
                })
                .transpose()?;
            one(engine
                .record_filing_reference(filing, reference, filed_at, &actor(cli_actor, None)?)
                .await?);
        }
        FilingsCmd::Ack {
            filing,
            reference,
            note,
        } => one(engine
            .acknowledge_filing(filing, reference.as_deref(), note, &actor(cli_actor, None)?)
            .await?),
    }
    Ok(())
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        println!("{}", serde_json::to_string_pretty(value).unwrap_or_default());
    } else {
        println!("{}", text());
    }
}

/// One line per clock: incident, regulator, report, deadline on the regulator's clock, time left.
fn deadlines_text(clocks: &[crate::clocks::ClockView]) -> String {
    if clocks.is_empty() {
        return "no regulator clock is running".into();
    }
    let left = |c: &crate::clocks::ClockView| match (c.status, c.minutes_left) {
        (_, Some(m)) if m < 0 => format!("OVERDUE by {}h{:02}m", -m / 60, -m % 60),
        (_, Some(m)) => format!("{}h{:02}m left", m / 60, m % 60),
        ("waiting", _) => format!("starts when {}", c.from.replace('_', " ")),
        (status, _) => status.replace('_', " "),
    };
    clocks
        .iter()
        .map(|c| {
            format!(
                "{}  {:<11} {:<22} due {:<33} {}{}",
                c.reference,
                c.regulator,
                c.label_en,
                c.due_local.as_deref().unwrap_or("-"),
                left(c),
                if c.calendar_assumed {
                    "  (holidays of a later year not yet in the calendar)"
                } else {
                    ""
                },
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn merchant_arg(raw: &str) -> anyhow::Result<crate::domain::MerchantId> {
    raw.parse()
        .map_err(|e: FieldError| anyhow::anyhow!("merchant: {}", e.reason))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn scope_rule(args: &ScopeArgs) -> anyhow::Result<ScopeRule> {
    let mut rule: ScopeRule = match &args.rule {
        Some(path) => serde_path_to_error::deserialize(read_json(path)?)
            .map_err(|e| anyhow::anyhow!("scope rule {}: {}: {}", path.display(), e.path(), e.inner()))?,
        None => ScopeRule::default(),
    };
    for (i, id) in args.merchants.iter().enumerate() {
        rule.merchant_ids.push(
            id.parse()
                .map_err(|e: FieldError| anyhow::anyhow!("--merchants[{i}]: {}", e.reason))?,
        );
    }
    if let Some(path) = &args.merchants_file {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let id = line.trim();
            if id.is_empty() || id.starts_with('#') {
                continue;
            }
            rule.merchant_ids.push(
                id.parse()
                    .map_err(|e: FieldError| anyhow::anyhow!("{} line {}: {}", path.display(), n + 1, e.reason))?,
            );
        }
    }
    for (i, c) in args.categories.iter().enumerate() {
        rule.any_categories.push(
            c.parse()
                .map_err(|e: FieldError| anyhow::anyhow!("categories[{i}]: {}", e.reason))?,
        );
    }
    rule.regions.extend(args.regions.iter().cloned());
    let time = |name: &str, raw: &Option<String>| -> anyhow::Result<Option<chrono::DateTime<chrono::Utc>>> {
        raw.as_deref()
            .map(|r| crate::time::parse_ts(r).map_err(|e| anyhow::anyhow!("--{name}: not an RFC 3339 time: {e}")))
            .transpose()
    };
    rule.created_after = time("created-after", &args.created_after)?.or(rule.created_after);
    rule.created_before = time("created-before", &args.created_before)?.or(rule.created_before);
    rule.active_after = time("active-after", &args.active_after)?.or(rule.active_after);
    rule.active_before = time("active-before", &args.active_before)?.or(rule.active_before);
    Ok(rule)
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOCSIN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    // Every line passes the redactor: a peer's error may repeat an address.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::redact::RedactingStderr);
    // One JSON object per line for log collectors; text for people.
    let _ = if std::env::var("TOCSIN_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().with_current_span(false).try_init()
    } else {
        builder.with_ansi(std::io::stderr().is_terminal()).try_init()
    };
}

/// Runs one command. Returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    init_tracing(if matches!(cli.command, Command::Serve { .. }) {
        "info"
    } else {
        "warn"
    });
    crate::install_crypto_provider();
    if let Command::Bench(BenchCmd::Sink { listen }) = &cli.command {
        // A peer for benchmarks: no store, no configuration.
        crate::bench::sink(listen).await?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Bench(BenchCmd::HttpFloor {
        url,
        requests,
        concurrency,
    }) = &cli.command
    {
        let report = crate::bench::http_floor(url, *requests, *concurrency).await?;
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let settings = Settings::load(cli.config.as_deref(), std::env::vars())?;
    let engine = Tocsin::open(settings, &cli.data_dir).await?;
    let json = cli.json;
    match &cli.command {
        Command::Demo => {
            let summary = crate::demo::run(&engine).await?;
            print(json, &summary, || summary.to_text());
        }
        Command::Serve { listen } => {
            let listen = listen.clone().unwrap_or_else(|| engine.settings.server.listen.clone());
            crate::http::serve(std::sync::Arc::new(engine), &listen, crate::http::shutdown_signal()).await?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Merchants(MerchantsCmd::Import { file }) => {
            let report = engine.import_merchants(file).await?;
            print(json, &report, || {
                let mut out = format!(
                    "imported: {} new, {} updated, {} unchanged, {} rejected",
                    report.counts.inserted,
                    report.counts.updated,
                    report.counts.unchanged,
                    report.rejected.len()
                );
                for r in &report.rejected {
                    out.push_str(&format!("\n  rejected {r}"));
                }
                out
            });
            if !report.rejected.is_empty() {
                return Ok(ExitCode::from(2));
            }
        }
        Command::Events(EventsCmd::Ingest { file }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading events from stdin")?
            } else {
                std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
            };
            let outcomes = engine.ingest_text(&text, &actor(&cli.actor, Some("cli"))?).await?;
            print(json, &outcomes, || {
                outcomes
                    .iter()
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Incidents(cmd) => {
            let code = incidents(&engine, &cli, cmd).await?;
            engine.store.checkpoint().await?;
            return Ok(code);
        }
        Command::Bench(BenchCmd::Draft { merchants }) => {
            let report = crate::bench::draft(&engine, *merchants).await?;
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        }
        Command::Bench(BenchCmd::Deliver {
            channel,
            smtp,
            url,
            notices,
            concurrency,
            batch,
        }) => {
            let target = match (channel.parse::<crate::domain::Channel>()?, smtp, url) {
                (crate::domain::Channel::Email, Some(smtp), _) => {
                    let (host, port) = smtp
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
                        .ok_or_else(|| FieldError::new("smtp", "expected HOST:PORT"))?;
                    crate::bench::DeliverTarget::Smtp { host, port }
                }
                (crate::domain::Channel::Email, None, _) => {
                    return Err(FieldError::new("smtp", "--channel email needs --smtp HOST:PORT").into());
                }
                (channel, _, Some(url)) => crate::bench::DeliverTarget::Http {
                    channel,
                    url: url.clone(),
                },
                (channel, _, None) => {
                    return Err(FieldError::new("url", format!("--channel {channel} needs --url URL")).into());
                }
            };
            let report = crate::bench::deliver(&engine, &target, *notices, *concurrency, *batch).await?;
            engine.store.checkpoint().await?;
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
        }
        Command::Bench(BenchCmd::Sink { .. } | BenchCmd::HttpFloor { .. }) => {} // run above
        Command::Deliveries(cmd) => deliveries(&engine, &cli, cmd).await?,
        Command::Notices(NoticesCmd::Preview {
            incident,
            merchant,
            version,
        }) => {
            let preview = engine.preview(incident, &merchant_arg(merchant)?, *version).await?;
            print(json, &preview, || {
                let mut out = format!(
                    "incident {}, version {} ({:?}), merchant {} (reads {})",
                    preview.incident_reference,
                    preview.version,
                    preview.draft_state,
                    preview.merchant_id,
                    preview.merchant_locale
                );
                for n in &preview.notices {
                    out.push_str(&format!(
                        "\n\n===== {} =====\n--- email: {}\n{}\n\n--- sms ({} characters)\n{}\n\n--- push: {}\n{}\n\n--- link\n{}\n\n--- HTML email and letter: {} and {} bytes of HTML (--json has them)",
                        n.locale,
                        n.email_subject,
                        n.email_text,
                        n.sms_text.chars().count(),
                        n.sms_text,
                        n.push_title,
                        n.push_body,
                        n.url,
                        n.email_html.len(),
                        n.letter_html.len()
                    ));
                }
                out
            });
        }
        Command::Notices(NoticesCmd::Diff {
            incident,
            merchant,
            from,
            to,
        }) => {
            let diff = engine.diff(incident, &merchant_arg(merchant)?, *from, *to).await?;
            print(json, &diff, || {
                if diff.changes.is_empty() {
                    return "no change".into();
                }
                diff.changes
                    .iter()
                    .map(|(name, d)| format!("=== {name}\n{d}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Notices(NoticesCmd::List { incident }) => {
            let notices = engine.notices(incident, None, u32::MAX).await?;
            let rows: Vec<_> = notices
                .iter()
                .map(|n| (n.id.to_string(), n.merchant_id.to_string(), n.locale.to_string()))
                .collect();
            print(json, &rows, || {
                rows.iter()
                    .map(|(id, m, l)| format!("{id}  {m}  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Notices(NoticesCmd::Show { id }) => {
            let view = engine.notice(id).await?;
            print(json, &view, || {
                let n = &view.notice;
                format!(
                    "notice {} (incident {}, version {}, merchant {}, {})\n\n--- email: {}\n{}\n\n--- sms\n{}\n\n--- push: {}\n{}",
                    n.id,
                    view.incident_reference,
                    view.draft_version,
                    n.merchant_id,
                    n.locale,
                    n.email_subject,
                    n.email_text,
                    n.sms_text,
                    n.push_title,
                    n.push_body
                )
            });
        }
        Command::Watchdog(WatchdogCmd::Tick { now }) => {
            let now = match now {
                Some(t) => crate::time::parse_ts(t)
                    .map_err(|e| anyhow::anyhow!("--now: '{t}' is not an RFC 3339 instant ({e})"))?,
                None => chrono::Utc::now(),
            };
            let report = engine.watchdog_tick(now).await?;
            print(json, &report, || {
                format!(
                    "{} reminder(s) and {} escalation(s) sent, {} failed (retried next round); {} stored",
                    report.reminders, report.escalations, report.failed, report.stored
                )
            });
        }
        Command::Watchdog(WatchdogCmd::Reminders { incident }) => {
            let list = engine.reminders(incident).await?;
            print(json, &list, || {
                list.iter()
                    .map(|r| {
                        format!(
                            "{} {:<8} {:<11} {:<10} {:<6} {:<8} {}",
                            crate::time::human(r.due_at),
                            r.stage,
                            r.regulator,
                            r.point,
                            r.channel,
                            r.status,
                            r.sent_at.map(crate::time::human).unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Filings(cmd) => filings_command(&engine, cmd, &cli.actor, json).await?,
        Command::Tokens(TokensCmd::Create { name, role, expires_at }) => {
            let actor_name: Actor = name
                .parse()
                .map_err(|e: FieldError| anyhow::anyhow!("NAME: {}", e.reason))?;
            let role: crate::auth::Role = role
                .parse()
                .map_err(|e: FieldError| anyhow::anyhow!("--role: {}", e.reason))?;
            let expires_at = expires_at
                .as_deref()
                .map(|t| {
                    crate::time::parse_ts(t)
                        .map_err(|e| anyhow::anyhow!("--expires-at: '{t}' is not an RFC 3339 instant ({e})"))
                })
                .transpose()?;
            let by = actor(&cli.actor, None)?;
            let (token, secret) = engine.create_token(&actor_name, role, expires_at, &by).await?;
            let out = serde_json::json!({ "token": secret, "details": token });
            print(json, &out, || {
                format!(
                    "{secret}\n(token {} for {} as {}; shown once: only its hash is kept)",
                    token.id, token.actor, token.role
                )
            });
        }
        Command::Tokens(TokensCmd::List) => {
            let list = engine.tokens().await?;
            print(json, &list, || {
                list.iter()
                    .map(|t| {
                        format!(
                            "{}  {:<20} {:<9} created {} by {}{}{}",
                            t.id,
                            t.actor,
                            t.role,
                            crate::time::human(t.created_at),
                            t.created_by,
                            t.expires_at
                                .map(|e| format!(", expires {}", crate::time::human(e)))
                                .unwrap_or_default(),
                            t.revoked_at
                                .map(|r| format!(", REVOKED {}", crate::time::human(r)))
                                .unwrap_or_default()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Tokens(TokensCmd::Revoke { id }) => {
            engine.revoke_token(id, &actor(&cli.actor, None)?).await?;
            print(json, &serde_json::json!({ "revoked": id }), || format!("revoked {id}"));
        }
        Command::Deadlines { incident, all } => {
            let clocks = engine.deadlines(incident.as_deref(), *all, chrono::Utc::now()).await?;
            print(json, &clocks, || deadlines_text(&clocks));
        }
        Command::Evidence(EvidenceCmd::Export { incident, dir }) => {
            let manifest = engine.export_evidence(incident, dir, &actor(&cli.actor, None)?).await?;
            print(json, &manifest, || {
                format!(
                    "evidence of {} written to {}: {} files, {} notices, {} deliveries; check with: cd {} && sha256sum -c SHA256SUMS",
                    manifest.reference,
                    dir.display(),
                    manifest.files.len() + 2,
                    manifest.counts["notices"],
                    manifest.counts["deliveries"],
                    dir.display()
                )
            });
        }
        Command::Audit(AuditCmd::Verify { anchor }) => {
            let anchor = anchor
                .as_deref()
                .map(|a| {
                    a.parse::<crate::ledger::Anchor>()
                        .map_err(|e| anyhow::anyhow!("--anchor: {e}"))
                })
                .transpose()?;
            let result = crate::ledger::verify_with_anchor(engine.store.as_ref(), anchor.as_ref()).await?;
            print(json, &result, || match &result {
                Verification::Intact { entries, head } => {
                    format!(
                        "ledger intact: {entries} entries, head {head}\nanchor for later checks: --anchor {entries}:{head}"
                    )
                }
                Verification::Broken { seq, reason } => {
                    format!("ledger BROKEN at entry {seq}: {reason}")
                }
            });
            if matches!(result, Verification::Broken { .. }) {
                return Ok(ExitCode::from(3));
            }
        }
    }
    // Large commits leave their write-ahead log to be copied back; do it before exiting.
    engine.store.checkpoint().await?;
    Ok(ExitCode::SUCCESS)
}

async fn incidents(engine: &Tocsin, cli: &Cli, cmd: &IncidentsCmd) -> anyhow::Result<ExitCode> {
    let json = cli.json;
    match cmd {
        IncidentsCmd::List => {
            let list = engine.incidents().await?;
            print(json, &list, || {
                list.iter()
                    .map(|i| format!("{}  {}  {:<10}  {}", i.reference, i.id, i.state, i.title))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        IncidentsCmd::Show { id } => {
            let view = engine.view(id).await?;
            print(json, &view, || crate::demo::describe(&view));
        }
        IncidentsCmd::Confirm { id, facts } => {
            let incident = engine
                .confirm(id, &read_json(facts)?, &actor(&cli.actor, None)?)
                .await?;
            print(json, &incident, || format!("{} confirmed", incident.reference));
        }
        IncidentsCmd::Dismiss { id, reason } => {
            engine.dismiss(id, reason, &actor(&cli.actor, None)?).await?;
            print(json, &serde_json::json!({ "dismissed": id }), || {
                format!("{id} dismissed")
            });
        }
        IncidentsCmd::Close { id, reason } => {
            engine.close(id, reason, &actor(&cli.actor, None)?).await?;
            print(json, &serde_json::json!({ "closed": id }), || format!("{id} closed"));
        }
        IncidentsCmd::Scope { id, args } => {
            let summary = engine
                .scope(id, &scope_rule(args)?, &actor(&cli.actor, None)?, args.dry_run)
                .await?;
            print(json, &summary, || {
                format!(
                    "{}{} merchants affected ({} to notify, {} may be skipped)\n  by risk: {:?}\n  by first channel: {:?}\n  by locale: {:?}\n  without any channel: {}\n  natural persons: {} (suggested grade {}; grade {})",
                    if args.dry_run { "dry run: " } else { "" },
                    summary.affected,
                    summary.notice_required,
                    summary.notice_not_required,
                    summary.by_risk,
                    summary.by_first_channel,
                    summary.by_locale,
                    summary.unreachable,
                    summary.natural_persons.unwrap_or_default(),
                    summary.suggested_grade.map(|g| g.to_string()).unwrap_or_default(),
                    summary.grade.map(|g| g.to_string()).unwrap_or_default()
                )
            });
        }
        IncidentsCmd::Draft {
            id,
            changes_en,
            changes_zh,
        } => {
            let changes = (changes_en.is_some() || changes_zh.is_some()).then(|| crate::domain::LocalizedText {
                en: changes_en.clone(),
                zh_cn: changes_zh.clone(),
            });
            let out = engine.draft(id, &actor(&cli.actor, None)?, changes.as_ref()).await?;
            print(json, &out, || {
                format!(
                    "notice version {} {} ({} notices, content hash {})",
                    out.draft.version,
                    if out.created { "drafted" } else { "unchanged" },
                    out.notices,
                    out.draft.content_hash
                )
            });
        }
        IncidentsCmd::Amend { id, facts, reason } => {
            let incident = engine
                .amend(id, &read_json(facts)?, &actor(&cli.actor, None)?, reason)
                .await?;
            print(json, &incident, || format!("{} facts amended", incident.reference));
        }
        IncidentsCmd::Grade { id, grade, reason } => {
            let grade: crate::domain::Grade = grade
                .parse()
                .map_err(|e: FieldError| anyhow::anyhow!("grade: {}", e.reason))?;
            let incident = engine.set_grade(id, grade, reason, &actor(&cli.actor, None)?).await?;
            print(json, &incident, || {
                format!(
                    "{} graded {grade}{}",
                    incident.reference,
                    incident
                        .grade_suggestion
                        .as_ref()
                        .map(|g| format!(" (suggested {}: {})", g.grade, g.basis))
                        .unwrap_or_default()
                )
            });
        }
        IncidentsCmd::NoticeDecision {
            id,
            merchant,
            required,
            reason,
        } => {
            let a = engine
                .override_notice(
                    id,
                    &merchant_arg(merchant)?,
                    *required,
                    reason,
                    &actor(&cli.actor, None)?,
                )
                .await?;
            print(json, &a, || {
                format!(
                    "{}: notice {} ({})",
                    a.merchant_id,
                    if a.notice_required { "required" } else { "not required" },
                    a.notice_reason
                )
            });
        }
        IncidentsCmd::Approve { id } => {
            let draft = engine.approve(id, &actor(&cli.actor, None)?).await?;
            print(json, &draft, || {
                format!(
                    "notice version {} approved (content hash {})",
                    draft.version, draft.content_hash
                )
            });
        }
        IncidentsCmd::Dispatch { id, no_wait, timeout } => {
            let who = actor(&cli.actor, None)?;
            let start = engine.dispatch(id, &who).await?;
            if *no_wait {
                print(json, &start, || format!("{} deliveries queued", start.queued));
            } else {
                let report = engine.deliver(id, Duration::from_secs(*timeout), &who).await?;
                let view = engine.view(id).await?;
                print(json, &view, || {
                    format!(
                        "{} queued; {:?}\n{}",
                        start.queued,
                        report,
                        crate::demo::describe(&view)
                    )
                });
            }
        }
        IncidentsCmd::Bulletin { id } => {
            let b = engine.publish_bulletin(id, &actor(&cli.actor, None)?, true).await?;
            print(json, &b, || match &b {
                Some(b) => format!(
                    "bulletin version {} published under {}",
                    b.version,
                    engine.paths.bulletins.display()
                ),
                None => "no bulletin published".into(),
            });
        }
        IncidentsCmd::Readiness { id } => {
            let list = engine.filing_readiness(id).await?;
            print(json, &list, || {
                list.iter()
                    .map(|r| {
                        let state = if r.missing.is_empty() {
                            "ready".to_owned()
                        } else {
                            format!("missing {}", r.missing.join("; "))
                        };
                        format!("{:<11} {:<8} ({:<6}) {state}", r.regulator, r.stage, r.submission)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        IncidentsCmd::Lookups { id } => {
            let list = engine.lookups(id).await?;
            print(json, &list, || {
                list.iter()
                    .map(|l| format!("{}  {:<12} client {}", crate::time::human(l.at), l.outcome, l.client))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        IncidentsCmd::Affected {
            id,
            notice_required,
            after,
            limit,
        } => {
            let after = after.as_deref().map(merchant_arg).transpose()?;
            let list = engine.affected(id, after.as_ref(), *limit, *notice_required).await?;
            print(json, &list, || {
                list.iter()
                    .map(|a| {
                        format!(
                            "{}  risk {:<6} {}  [{}]\n    risk: {}\n    notice: {}",
                            a.merchant_id,
                            a.risk,
                            if a.notice_required { "notify" } else { "skip  " },
                            a.exposed.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", "),
                            a.risk_reasons.join("; "),
                            a.notice_reason
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        IncidentsCmd::Deliveries { id } => {
            let list = engine.deliveries(id).await?;
            print(json, &list, || {
                list.iter()
                    .map(|d| {
                        format!(
                            "{}  {}  {:<5}  {:<7}  attempts {}  {}",
                            d.id,
                            d.merchant_id,
                            d.channel,
                            d.status,
                            d.attempts,
                            d.last_error.as_deref().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
