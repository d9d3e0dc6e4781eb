//! The embedded store: one SQLite file in the data directory, WAL mode, migrations from
//! `migrations/sqlite` applied at open. Writers take the lock up front (`BEGIN IMMEDIATE`) so a
//! read-then-write transaction never fails half way on a lock upgrade.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::*;
use crate::ledger::{GENESIS, chain_hash};
use crate::time::{fmt_ts, parse_ts};

mod outbox;
use outbox::DELIVERY_COLUMNS;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
    /// One connection for the outbox's hot path (claims, outcomes, receipts): its writes take
    /// turns in this pool rather than in SQLite's busy handler (which sleeps in steps of up to
    /// 100 ms), and its page cache stays warm, where a pooled connection would first re-read
    /// every page another connection changed since it last ran.
    outbox_writer: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) `<data_dir>/tocsin.db` and applies pending migrations.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.display().to_string(),
            source,
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("tocsin.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // Set when the file is created: bulk scopes and outboxes write a quarter of the pages.
            .page_size(16384)
            .foreign_keys(true)
            // 8 MiB of page cache per connection (SQLite's default is 2 MiB): large scopes insert
            // in index order, so a bigger cache buys little and costs memory on every connection.
            .pragma("cache_size", "-8192")
            // A commit of a million rows would otherwise copy them back into the database file
            // before returning; `checkpoint` does it in the background (and closing does it too).
            .pragma("wal_autocheckpoint", "0")
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .doing("opening the SQLite database")?;
        MIGRATOR.run(&pool).await?;
        let outbox_writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // The outbox's working set (the rows being claimed and their indexes) stays cached.
            .connect_with(options.pragma("cache_size", "-65536"))
            .await
            .doing("opening the SQLite database")?;
        Ok(Self { pool, outbox_writer })
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .doing("starting a write transaction")
    }
}

const REMINDER_SELECT: &str = "SELECT incident_id, regulator, stage, due_at, point, recipient, channel, text, status, \
     attempts, last_error, sent_at FROM clock_reminders";

fn reminder_from(row: &SqliteRow) -> Result<ClockReminder, StoreError> {
    let ts = |name: &'static str, v: String| parse_ts(&v).map_err(|e| corrupt(name, e));
    Ok(ClockReminder {
        incident_id: row.get("incident_id"),
        regulator: row.get("regulator"),
        stage: row.get("stage"),
        due_at: ts("clock_reminders.due_at", row.get("due_at"))?,
        point: row.get("point"),
        recipient: row.get("recipient"),
        channel: row.get("channel"),
        text: row.get("text"),
        status: row.get("status"),
        attempts: row.get("attempts"),
        last_error: row.get("last_error"),
        sent_at: row
            .get::<Option<String>, _>("sent_at")
            .map(|v| ts("clock_reminders.sent_at", v))
            .transpose()?,
    })
}

fn corrupt(what: &'static str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        what,
        reason: reason.to_string(),
    }
}

fn col<T: FromStr>(row: &SqliteRow, name: &'static str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    let raw: String = row.try_get(name).doing("reading a column")?;
    raw.parse().map_err(|e: T::Err| corrupt(name, e))
}

fn opt_col<T: FromStr>(row: &SqliteRow, name: &'static str) -> Result<Option<T>, StoreError>
where
    T::Err: std::fmt::Display,
{
    let raw: Option<String> = row.try_get(name).doing("reading a column")?;
    raw.map(|r| r.parse().map_err(|e: T::Err| corrupt(name, e))).transpose()
}

fn ts_col(row: &SqliteRow, name: &'static str) -> Result<DateTime<Utc>, StoreError> {
    let raw: String = row.try_get(name).doing("reading a time column")?;
    parse_ts(&raw).map_err(|e| corrupt(name, e))
}

fn opt_ts_col(row: &SqliteRow, name: &'static str) -> Result<Option<DateTime<Utc>>, StoreError> {
    let raw: Option<String> = row.try_get(name).doing("reading a time column")?;
    raw.map(|r| parse_ts(&r).map_err(|e| corrupt(name, e))).transpose()
}

fn json_col<T: serde::de::DeserializeOwned>(row: &SqliteRow, name: &'static str) -> Result<T, StoreError> {
    let raw: String = row.try_get(name).doing("reading a JSON column")?;
    serde_json::from_str(&raw).map_err(|e| corrupt(name, e))
}

fn opt_json_col<T: serde::de::DeserializeOwned>(row: &SqliteRow, name: &'static str) -> Result<Option<T>, StoreError> {
    let raw: Option<String> = row.try_get(name).doing("reading a JSON column")?;
    raw.map(|r| serde_json::from_str(&r).map_err(|e| corrupt(name, e)))
        .transpose()
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising our own model types to JSON cannot fail (no maps with non-string keys).
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn merchant_from(row: &SqliteRow) -> Result<Merchant, StoreError> {
    let holdings: BTreeSet<CategoryId> = json_col(row, "holdings")?;
    Ok(Merchant {
        id: col(row, "id")?,
        name: row.try_get("name").doing("reading a merchant")?,
        kind: col(row, "kind")?,
        locale: col(row, "locale")?,
        region: row.try_get("region").doing("reading a merchant")?,
        email: opt_col(row, "email")?,
        phone: opt_col(row, "phone")?,
        push_token: opt_col(row, "push_token")?,
        postal_address: row.try_get("postal_address").doing("reading a merchant")?,
        holdings,
        created_at: opt_ts_col(row, "created_at")?,
        last_active_at: opt_ts_col(row, "last_active_at")?,
        marketing_opt_out: row.try_get::<i64, _>("marketing_opt_out").doing("reading a merchant")? != 0,
        people: json_col(row, "people")?,
    })
}

fn incident_from(row: &SqliteRow) -> Result<Incident, StoreError> {
    Ok(Incident {
        id: col(row, "id")?,
        reference: row.try_get("reference").doing("reading an incident")?,
        state: col(row, "state")?,
        title: row.try_get("title").doing("reading an incident")?,
        kind: col(row, "kind")?,
        severity: col(row, "severity")?,
        correlation_key: row.try_get("correlation_key").doing("reading an incident")?,
        facts: opt_json_col(row, "facts")?,
        scope_rule: opt_json_col(row, "scope_rule")?,
        grade_suggestion: opt_json_col(row, "grade_suggestion")?,
        scope_basis: opt_json_col(row, "scope_basis")?,
        detected_at: ts_col(row, "detected_at")?,
        opened_at: ts_col(row, "opened_at")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

/// Parses a stored channel plan (`email,sms`).
fn plan_from(raw: &str) -> Result<Vec<Channel>, StoreError> {
    raw.split(',')
        .filter(|c| !c.is_empty())
        .map(|c| c.parse().map_err(|e: FieldError| corrupt("channel_plan", e)))
        .collect()
}

/// Columns of an affected merchant with its class and override applied (aliases a, c, o).
const AFFECTED_SELECT: &str = "SELECT a.*, c.exposed, c.risk, c.risk_reasons,
        COALESCE(o.required, c.notice_required) AS notice_required, COALESCE(o.reason, c.notice_reason) AS notice_reason
     FROM affected_merchants a
     JOIN scope_classes c ON c.incident_id = a.incident_id AND c.class_no = a.class_no
     LEFT JOIN notice_overrides o ON o.incident_id = a.incident_id AND o.merchant_id = a.merchant_id";

/// Whether the merchant must be notified, overrides applied (aliases a, c, o as above).
const REQUIRED: &str = "COALESCE(o.required, c.notice_required) = 1";

fn affected_from(row: &SqliteRow) -> Result<AffectedMerchant, StoreError> {
    let plan: String = row.try_get("channel_plan").doing("reading a scope row")?;
    Ok(AffectedMerchant {
        incident_id: col(row, "incident_id")?,
        merchant_id: col(row, "merchant_id")?,
        class_no: row.try_get("class_no").doing("reading a scope row")?,
        region: row.try_get("region").doing("reading a scope row")?,
        exposed: json_col(row, "exposed")?,
        risk: col(row, "risk")?,
        risk_reasons: json_col(row, "risk_reasons")?,
        notice_required: row.try_get::<i64, _>("notice_required").doing("reading a scope row")? != 0,
        notice_reason: row.try_get("notice_reason").doing("reading a scope row")?,
        channel_plan: plan_from(&plan)?,
        locale: col(row, "locale")?,
        reachability: col(row, "reachability")?,
        reached_channel: opt_col(row, "reached_channel")?,
    })
}

fn class_from(row: &SqliteRow) -> Result<ScopeClass, StoreError> {
    Ok(ScopeClass {
        class_no: row.try_get("class_no").doing("reading a scope class")?,
        exposed: json_col(row, "exposed")?,
        risk: col(row, "risk")?,
        risk_reasons: json_col(row, "risk_reasons")?,
        notice_required: row
            .try_get::<i64, _>("notice_required")
            .doing("reading a scope class")?
            != 0,
        notice_reason: row.try_get("notice_reason").doing("reading a scope class")?,
        merchants: row.try_get("merchants").doing("reading a scope class")?,
    })
}

/// The 20 hex digits of a draft id that prefix the ids derived from it.
fn draft_prefix(draft: &DraftId) -> &str {
    let hex = draft.as_str().strip_prefix("drf_").unwrap_or(draft.as_str());
    hex.get(..20).unwrap_or(hex)
}

/// A notice's id: its draft's prefix and the merchant's scope row.
pub(crate) fn notice_id(draft: &DraftId, seq: i64) -> Result<NoticeId, StoreError> {
    format!("ntc_{}{seq:012x}", draft_prefix(draft))
        .parse()
        .map_err(|e: FieldError| corrupt("notice id", e))
}

fn record_from(row: &SqliteRow) -> Result<NoticeRecord, StoreError> {
    let draft_id: DraftId = col(row, "draft_id")?;
    let seq: i64 = row.try_get("seq").doing("reading a notice")?;
    let secret: String = row.try_get("link_secret").doing("reading a notice")?;
    Ok(NoticeRecord {
        id: notice_id(&draft_id, seq)?,
        draft_id,
        merchant_id: col(row, "merchant_id")?,
        class_no: row.try_get("class_no").doing("reading a notice")?,
        locale: col(row, "locale")?,
        region: row.try_get("region").doing("reading a notice")?,
        merchant_name: row.try_get("merchant_name").doing("reading a notice")?,
        merchant_kind: col(row, "merchant_kind")?,
        link_token: format!("{seq:08x}{secret}"),
        legacy: None,
    })
}

/// A notice of the first schema, stored rendered in full in `notices`.
fn legacy_record_from(row: &SqliteRow) -> Result<NoticeRecord, StoreError> {
    let text = |name: &'static str| -> Result<String, StoreError> { row.try_get(name).doing("reading a notice") };
    let sections: serde_json::Value = json_col(row, "sections")?;
    let legacy = serde_json::json!({
        "sections": sections,
        "email_subject": text("email_subject")?,
        "email_text": text("email_text")?,
        "email_html": text("email_html")?,
        "sms_text": text("sms_text")?,
        "push_title": text("push_title")?,
        "push_body": text("push_body")?,
        "content_hash": text("content_hash")?,
    });
    Ok(NoticeRecord {
        id: col(row, "id")?,
        draft_id: col(row, "draft_id")?,
        merchant_id: col(row, "merchant_id")?,
        class_no: -1,
        locale: col(row, "locale")?,
        region: String::new(),
        merchant_name: String::new(),
        merchant_kind: MerchantKind::Enterprise,
        link_token: String::new(),
        legacy: Some(legacy),
    })
}

/// Selects a draft's notices: the affected merchants that must be notified (aliases d, a, c, o).
const NOTICE_SELECT: &str = "SELECT d.id AS draft_id, a.seq, a.merchant_id, a.class_no, a.locale, a.region,
        a.merchant_name, a.merchant_kind, a.link_secret
     FROM drafts d
     JOIN affected_merchants a ON a.incident_id = d.incident_id
     JOIN scope_classes c ON c.incident_id = a.incident_id AND c.class_no = a.class_no
     LEFT JOIN notice_overrides o ON o.incident_id = a.incident_id AND o.merchant_id = a.merchant_id";

fn draft_from(row: &SqliteRow) -> Result<Draft, StoreError> {
    let state: String = row.try_get("state").doing("reading a draft")?;
    Ok(Draft {
        id: col(row, "id")?,
        incident_id: col(row, "incident_id")?,
        version: row.try_get("version").doing("reading a draft")?,
        state: match state.as_str() {
            "approved" => DraftState::Approved,
            "drafted" => DraftState::Drafted,
            other => return Err(corrupt("drafts.state", other)),
        },
        content_hash: row.try_get("content_hash").doing("reading a draft")?,
        drafted_by: col(row, "drafted_by")?,
        drafted_at: ts_col(row, "drafted_at")?,
        approved_by: opt_col(row, "approved_by")?,
        approved_at: opt_ts_col(row, "approved_at")?,
        notice_count: row.try_get("notice_count").doing("reading a draft")?,
    })
}

fn delivery_from(row: &SqliteRow) -> Result<Delivery, StoreError> {
    let class: Option<String> = row.try_get("error_class").doing("reading a delivery")?;
    Ok(Delivery {
        id: col(row, "id")?,
        idempotency_key: row.try_get("idempotency_key").doing("reading a delivery")?,
        incident_id: col(row, "incident_id")?,
        draft_id: col(row, "draft_id")?,
        notice_id: col(row, "notice_id")?,
        merchant_id: col(row, "merchant_id")?,
        channel: col(row, "channel")?,
        address: row.try_get("address").doing("reading a delivery")?,
        plan_position: row.try_get("plan_position").doing("reading a delivery")?,
        status: col(row, "status")?,
        attempts: row.try_get("attempts").doing("reading a delivery")?,
        next_attempt_at: ts_col(row, "next_attempt_at")?,
        last_error: row.try_get("last_error").doing("reading a delivery")?,
        error_class: match class.as_deref() {
            None => None,
            Some("transient") => Some(ErrorClass::Transient),
            Some("permanent") => Some(ErrorClass::Permanent),
            Some(other) => return Err(corrupt("deliveries.error_class", other)),
        },
        provider_message_id: row.try_get("provider_message_id").doing("reading a delivery")?,
        content_hash: row.try_get("content_hash").doing("reading a delivery")?,
        created_at: ts_col(row, "created_at")?,
        sent_at: opt_ts_col(row, "sent_at")?,
        provider: row.try_get("provider").doing("reading a delivery")?,
        error_kind: {
            let kind: Option<String> = row.try_get("error_kind").doing("reading a delivery")?;
            kind.map(|k| k.parse().map_err(|e: String| corrupt("deliveries.error_kind", e)))
                .transpose()?
        },
        delivered_at: opt_ts_col(row, "delivered_at")?,
        receipt_due_at: opt_ts_col(row, "receipt_due_at")?,
    })
}

fn bulletin_from(row: &SqliteRow) -> Result<Bulletin, StoreError> {
    Ok(Bulletin {
        id: col(row, "id")?,
        incident_id: col(row, "incident_id")?,
        version: row.try_get("version").doing("reading a bulletin")?,
        reason: row.try_get("reason").doing("reading a bulletin")?,
        summary: row.try_get("summary").doing("reading a bulletin")?,
        content_hash: row.try_get("content_hash").doing("reading a bulletin")?,
        published_at: ts_col(row, "published_at")?,
        covered: row.try_get("covered").doing("reading a bulletin")?,
        status_pushed_at: opt_ts_col(row, "status_pushed_at")?,
    })
}

fn filing_from(row: &SqliteRow) -> Result<Filing, StoreError> {
    let text = |name: &'static str| -> Result<String, StoreError> { row.try_get(name).doing("reading a filing") };
    let opt_text =
        |name: &'static str| -> Result<Option<String>, StoreError> { row.try_get(name).doing("reading a filing") };
    Ok(Filing {
        id: col(row, "id")?,
        incident_id: col(row, "incident_id")?,
        regulator: text("regulator")?,
        stage: text("stage")?,
        content: json_col(row, "content")?,
        content_hash: text("content_hash")?,
        deadline_at: opt_ts_col(row, "deadline_at")?,
        created_at: ts_col(row, "created_at")?,
        submitted_at: opt_ts_col(row, "submitted_at")?,
        transport: text("transport")?,
        location: opt_text("location")?,
        authors: json_col(row, "authors")?,
        written: json_col(row, "written")?,
        approved_by: opt_col(row, "approved_by")?,
        approved_at: opt_ts_col(row, "approved_at")?,
        document_at: opt_ts_col(row, "document_at")?,
        reference_number: opt_text("reference_number")?,
        acknowledged_at: opt_ts_col(row, "acknowledged_at")?,
        acknowledgement: opt_text("acknowledgement")?,
        last_error: opt_text("last_error")?,
    })
}

fn token_from(row: &SqliteRow) -> Result<crate::auth::ApiToken, StoreError> {
    Ok(crate::auth::ApiToken {
        id: col(row, "id")?,
        actor: col(row, "actor")?,
        role: col(row, "role")?,
        created_at: ts_col(row, "created_at")?,
        created_by: col(row, "created_by")?,
        expires_at: opt_ts_col(row, "expires_at")?,
        revoked_at: opt_ts_col(row, "revoked_at")?,
        revoked_by: opt_col(row, "revoked_by")?,
    })
}

fn filing_submission_from(row: &SqliteRow) -> Result<FilingSubmission, StoreError> {
    let text = |name: &'static str| -> Result<String, StoreError> { row.try_get(name).doing("reading a submission") };
    Ok(FilingSubmission {
        filing_id: col(row, "filing_id")?,
        at: ts_col(row, "at")?,
        actor: col(row, "actor")?,
        method: text("method")?,
        target: text("target")?,
        outcome: text("outcome")?,
        detail: text("detail")?,
    })
}

/// Stores one row of a filing's submission record.
async fn insert_filing_submission(conn: &mut SqliteConnection, s: &FilingSubmission) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO filing_submissions (filing_id, at, actor, method, target, outcome, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(s.filing_id.as_str())
    .bind(fmt_ts(s.at))
    .bind(s.actor.as_str())
    .bind(&s.method)
    .bind(&s.target)
    .bind(&s.outcome)
    .bind(&s.detail)
    .execute(conn)
    .await
    .doing("recording a filing submission")?;
    Ok(())
}

/// The incident of a filing an UPDATE matched, or the conflict that it matched none.
fn filing_changed(incident: Option<String>, id: &FilingId, reason: &str) -> Result<IncidentId, StoreError> {
    incident
        .ok_or_else(|| StoreError::Conflict {
            what: "filing",
            id: id.to_string(),
            reason: reason.to_owned(),
        })?
        .parse()
        .map_err(|e| corrupt("filings.incident_id", e))
}

fn ledger_from(row: &SqliteRow) -> Result<LedgerEntry, StoreError> {
    let text = |name: &'static str| -> Result<String, StoreError> { row.try_get(name).doing("reading the ledger") };
    Ok(LedgerEntry {
        seq: row.try_get("seq").doing("reading the ledger")?,
        at: ts_col(row, "at")?,
        actor: text("actor")?,
        action: text("action")?,
        incident_id: row.try_get("incident_id").doing("reading the ledger")?,
        detail: json_col(row, "detail")?,
        prev_hash: text("prev_hash")?,
        hash: text("hash")?,
    })
}

/// Appends one chained entry inside the caller's transaction.
/// SQL assembled from this module's own constant fragments (never from input, which is bound).
fn trusted(sql: String) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(sql)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The rule as a condition on merchants (alias `m`). Times are fixed-width text, so they compare
/// as text; a window excludes merchants without the date.
fn push_rule(qb: &mut sqlx::QueryBuilder<sqlx::Sqlite>, rule: &ScopeRule) {
    qb.push("(1 = 1");
    if !rule.merchant_ids.is_empty() {
        let ids: Vec<&str> = rule.merchant_ids.iter().map(|i| i.as_str()).collect();
        qb.push(" AND m.id IN (SELECT value FROM json_each(")
            .push_bind(to_json(&ids))
            .push("))");
    }
    if !rule.any_categories.is_empty() {
        qb.push(" AND ");
        push_holds_any(qb, &rule.any_categories);
    }
    if !rule.regions.is_empty() {
        qb.push(" AND (");
        for (i, r) in rule.regions.iter().enumerate() {
            if i > 0 {
                qb.push(" OR ");
            }
            qb.push("m.region = ")
                .push_bind(r.clone())
                .push(" OR substr(m.region, 1, ")
                .push_bind(r.len() as i64 + 1)
                .push(") = ")
                .push_bind(format!("{r}-"));
        }
        qb.push(")");
    }
    let mut window = |column: &str, op: &str, at: Option<DateTime<Utc>>| {
        if let Some(at) = at {
            qb.push(format!(" AND m.{column} {op} ")).push_bind(fmt_ts(at));
        }
    };
    window("created_at", ">=", rule.created_after);
    window("created_at", "<", rule.created_before);
    window("last_active_at", ">=", rule.active_after);
    window("last_active_at", "<", rule.active_before);
    if !rule.any_of.is_empty() {
        qb.push(" AND (");
        for (i, sub) in rule.any_of.iter().enumerate() {
            if i > 0 {
                qb.push(" OR ");
            }
            push_rule(qb, sub);
        }
        qb.push(")");
    }
    for sub in &rule.except {
        qb.push(" AND NOT ");
        push_rule(qb, sub);
    }
    qb.push(")");
}

/// Whether the merchant holds any of `categories`. Holdings are stored as a JSON array of
/// quoted ids, and no id contains a quote, so a quoted id matches only that category; this is
/// much cheaper per row than unpacking the JSON.
fn push_holds_any(qb: &mut sqlx::QueryBuilder<sqlx::Sqlite>, categories: &[CategoryId]) {
    qb.push("(0");
    for c in categories {
        qb.push(" OR instr(m.holdings, ")
            .push_bind(format!("\"{c}\""))
            .push(") > 0");
    }
    qb.push(")");
}

/// The merchants' column holding the address for a channel.
fn address_column(channel: Channel) -> &'static str {
    match channel {
        Channel::Email => "m.email",
        Channel::Sms => "m.phone",
        Channel::Push => "m.push_token",
    }
}

/// The plan's first channel, from the stored comma-separated plan (alias `a`).
const FIRST_CHANNEL: &str = "CASE WHEN instr(a.channel_plan, ',') > 0
     THEN substr(a.channel_plan, 1, instr(a.channel_plan, ',') - 1) ELSE a.channel_plan END";

/// One group of an incident's affected merchants that share everything counted.
struct Group {
    class: ScopeClass,
    locale: Locale,
    region: String,
    first_channel: Option<Channel>,
    reachability: Reachability,
    required: bool,
    merchants: i64,
}

/// Affected merchants grouped by class, language, region, first channel and reachability, with
/// overrides applied. One pass over the rows without joins: the classes and the (few) overrides
/// are read separately and combined here.
type GroupKey = (i64, String, String, String, String);

/// The overridden merchants' group keys and decisions (few rows).
async fn override_rows_in(conn: &mut SqliteConnection, id: &IncidentId) -> Result<Vec<(GroupKey, bool)>, StoreError> {
    let rows: Vec<(i64, String, String, String, String, i64)> = sqlx::query_as(trusted(format!(
        "SELECT a.class_no, a.locale, a.region, {FIRST_CHANNEL}, a.reachability, o.required
         FROM notice_overrides o JOIN affected_merchants a ON a.incident_id = o.incident_id AND a.merchant_id = o.merchant_id
         WHERE o.incident_id = $1"
    )))
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await
    .doing("reading notice overrides")?;
    Ok(rows
        .into_iter()
        .map(|(c, l, r, f, reach, required)| ((c, l, r, f, reach), required != 0))
        .collect())
}

async fn classes_in(conn: &mut SqliteConnection, id: &IncidentId) -> Result<Vec<ScopeClass>, StoreError> {
    sqlx::query("SELECT * FROM scope_classes WHERE incident_id = $1 ORDER BY class_no")
        .bind(id.as_str())
        .fetch_all(&mut *conn)
        .await
        .doing("reading scope classes")?
        .iter()
        .map(class_from)
        .collect()
}

/// Combines counted groups with the classes' notice decisions and the overrides. When the rows
/// were counted without reachability ('' in the key), the overrides' reachability is ignored.
fn combine_groups(
    classes: &[ScopeClass],
    rows: impl IntoIterator<Item = (GroupKey, i64)>,
    overrides: Vec<(GroupKey, bool)>,
) -> Result<Vec<Group>, StoreError> {
    let classes: std::collections::HashMap<i64, &ScopeClass> = classes.iter().map(|c| (c.class_no, c)).collect();
    let mut counts: std::collections::BTreeMap<(GroupKey, bool), i64> = std::collections::BTreeMap::new();
    let mut counted_reach = true;
    for (key, n) in rows {
        counted_reach &= !key.4.is_empty();
        let required = classes.get(&key.0).is_some_and(|c| c.notice_required);
        *counts.entry((key, required)).or_default() += n;
    }
    for (mut key, required) in overrides {
        if !counted_reach {
            key.4 = String::new();
        }
        let by_class = classes.get(&key.0).is_some_and(|c| c.notice_required);
        if required != by_class {
            *counts.entry((key.clone(), by_class)).or_default() -= 1;
            *counts.entry((key, required)).or_default() += 1;
        }
    }
    let parse = |what: &'static str, e: FieldError| corrupt(what, e);
    counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(((class, locale, region, first, reach), required), merchants)| {
            Ok(Group {
                class: classes
                    .get(&class)
                    .map(|c| (*c).clone())
                    .ok_or_else(|| corrupt("affected_merchants.class_no", class))?,
                locale: locale.parse().map_err(|e| parse("locale", e))?,
                region,
                first_channel: if first.is_empty() {
                    None
                } else {
                    Some(first.parse().map_err(|e| parse("channel", e))?)
                },
                reachability: if reach.is_empty() {
                    if first.is_empty() {
                        Reachability::Unreachable
                    } else {
                        Reachability::Pending
                    }
                } else {
                    reach.parse().map_err(|e| parse("reachability", e))?
                },
                required,
                merchants,
            })
        })
        .collect()
}

/// Affected merchants grouped by class, language, region, first channel and reachability, with
/// overrides applied: one pass over the rows without joins.
async fn groups_in(conn: &mut SqliteConnection, id: &IncidentId) -> Result<Vec<Group>, StoreError> {
    let classes = classes_in(conn, id).await?;
    let rows: Vec<(i64, String, String, String, String, i64)> = sqlx::query_as(trusted(format!(
        "SELECT a.class_no, a.locale, a.region, {FIRST_CHANNEL}, a.reachability, COUNT(*)
         FROM affected_merchants a WHERE a.incident_id = $1 GROUP BY 1, 2, 3, 4, 5"
    )))
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await
    .doing("counting a scope")?;
    let overrides = override_rows_in(conn, id).await?;
    combine_groups(
        &classes,
        rows.into_iter().map(|(c, l, r, f, reach, n)| ((c, l, r, f, reach), n)),
        overrides,
    )
}

/// The notice groups as counted when scoping, with today's overrides (no pass over the rows).
async fn stored_groups_in(conn: &mut SqliteConnection, id: &IncidentId) -> Result<Vec<Group>, StoreError> {
    let classes = classes_in(conn, id).await?;
    let rows: Vec<(i64, String, String, String, i64)> = sqlx::query_as(
        "SELECT class_no, locale, region, first_channel, merchants FROM scope_groups WHERE incident_id = $1",
    )
    .bind(id.as_str())
    .fetch_all(&mut *conn)
    .await
    .doing("reading scope groups")?;
    let overrides = override_rows_in(conn, id).await?;
    combine_groups(
        &classes,
        rows.into_iter().map(|(c, l, r, f, n)| ((c, l, r, f, String::new()), n)),
        overrides,
    )
}

async fn scope_counts_in(conn: &mut SqliteConnection, id: &IncidentId) -> Result<Vec<ScopeCount>, StoreError> {
    Ok(groups_in(conn, id)
        .await?
        .into_iter()
        .map(|g| ScopeCount {
            risk: g.class.risk,
            locale: g.locale,
            first_channel: g.first_channel,
            notice_required: g.required,
            reachability: g.reachability,
            merchants: g.merchants,
        })
        .collect())
}

struct SqliteScopeWriter {
    tx: sqlx::Transaction<'static, sqlx::Sqlite>,
    pool: SqlitePool,
    incident: IncidentId,
    groups: Vec<(ScopeGroupKey, i64)>,
    seq_range: (i64, i64),
}

/// class, locale, region, first channel ('' for none)
type ScopeGroupKey = (i64, String, String, String);

async fn insert_classes_in(
    conn: &mut SqliteConnection,
    id: &IncidentId,
    classes: &[ScopeClass],
) -> Result<(), StoreError> {
    for c in classes {
        sqlx::query(
            "INSERT INTO scope_classes (incident_id, class_no, exposed, risk, risk_reasons, notice_required,
                                        notice_reason, merchants)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(id.as_str())
        .bind(c.class_no)
        .bind(to_json(&c.exposed))
        .bind(c.risk.as_str())
        .bind(to_json(&c.risk_reasons))
        .bind(c.notice_required as i64)
        .bind(&c.notice_reason)
        .bind(c.merchants)
        .execute(&mut *conn)
        .await
        .doing("storing a scope class")?;
    }
    Ok(())
}

/// Fills a connection's temporary holdings-to-class map (temporary tables are per connection).
async fn load_scope_map(conn: &mut SqliteConnection, map: &[(String, i64)]) -> Result<(), StoreError> {
    for sql in [
        "CREATE TEMP TABLE IF NOT EXISTS scope_map (holdings TEXT PRIMARY KEY, class_no INTEGER NOT NULL)",
        "DELETE FROM scope_map",
    ] {
        sqlx::query(sql).execute(&mut *conn).await.doing("preparing a scope")?;
    }
    for chunk in map.chunks(400) {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("INSERT INTO scope_map (holdings, class_no) ");
        qb.push_values(chunk, |mut b, (holdings, class)| {
            b.push_bind(holdings.clone()).push_bind(*class);
        });
        qb.build().execute(&mut *conn).await.doing("preparing a scope")?;
    }
    Ok(())
}

/// The channel plan and its first channel as SQL over merchants (alias `m`).
fn plan_sql(order: &[Channel]) -> (String, String) {
    let parts: Vec<String> = order
        .iter()
        .map(|c| {
            format!(
                "CASE WHEN {} IS NOT NULL THEN '{},' ELSE '' END",
                address_column(*c),
                c.as_str()
            )
        })
        .collect();
    let plan = if parts.is_empty() {
        "''".to_owned()
    } else {
        format!("rtrim({}, ',')", parts.join(" || "))
    };
    let first: Vec<String> = order
        .iter()
        .map(|c| format!("CASE WHEN {} IS NOT NULL THEN '{}' END", address_column(*c), c.as_str()))
        .chain(["''".to_owned()])
        .collect();
    (plan, format!("COALESCE({})", first.join(", ")))
}

/// Reads the merchants a scope selects, in pages packed into one string each (a row per merchant
/// costs the driver far more than the bytes), and counts them: groups for the summary and the
/// notice variants, and the distinct natural persons. Runs on its own connection, beside the
/// insert, so that the two use both cores.
async fn aggregate_scope(
    pool: &SqlitePool,
    scope: &ScopeInsert<'_>,
) -> Result<(u64, Vec<(ScopeGroupKey, i64)>), StoreError> {
    use std::collections::{HashMap, HashSet};
    use std::hash::{Hash, Hasher};
    let mut conn = pool.acquire().await.doing("counting a scope")?;
    load_scope_map(&mut conn, scope.holdings_class).await?;
    let (_, first) = plan_sql(scope.channel_order);
    let in_list = |v: &[i64]| v.iter().copied().collect::<HashSet<i64>>();
    let representative_classes = in_list(&scope.person_classes.representative);
    let (self_classes, contact_classes, sub_classes) = (
        in_list(&scope.person_classes.merchant),
        in_list(&scope.person_classes.contacts),
        in_list(&scope.person_classes.sub_accounts),
    );
    // 64-bit hashes of the person keys: exact enough (a collision among 10^8 people has odds of
    // about 1 in 3,700) and a tenth of the memory of the keys themselves.
    let mut persons: HashSet<u64> = HashSet::new();
    let mut person = |key: &str| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        persons.insert(h.finish());
    };
    let mut groups: HashMap<ScopeGroupKey, i64> = HashMap::new();
    let mut after: i64 = 0;
    loop {
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!(
            "SELECT MAX(r), group_concat(line, char(30)) FROM (
                SELECT m.rowid AS r, s.class_no || char(31) || m.locale || char(31) || m.region || char(31) || {first}
                       || char(31) || m.kind || char(31) || m.id || char(31) || m.people AS line
                FROM merchants m JOIN scope_map s ON s.holdings = m.holdings WHERE m.rowid > "
        ));
        qb.push_bind(after).push(" AND ");
        push_rule(&mut qb, scope.rule);
        qb.push(" ORDER BY m.rowid LIMIT 20000)");
        let (last, page): (Option<i64>, Option<String>) = qb
            .build_query_as()
            .fetch_one(&mut *conn)
            .await
            .doing("counting a scope")?;
        let (Some(last), Some(page)) = (last, page) else { break };
        after = last;
        for line in page.split('\u{1e}') {
            let mut f = line.split('\u{1f}');
            let mut next = || f.next().unwrap_or("");
            let class: i64 = next().parse().map_err(|e| corrupt("scope class", e))?;
            let (locale, region, first, kind, id, people) = (next(), next(), next(), next(), next(), next());
            *groups
                .entry((class, locale.to_owned(), region.to_owned(), first.to_owned()))
                .or_default() += 1;
            let people: People = if people.len() > 2 {
                serde_json::from_str(people).map_err(|e| corrupt("merchants.people", e))?
            } else {
                People::default()
            };
            let own = if kind == "enterprise" {
                &representative_classes
            } else {
                &self_classes
            };
            if own.contains(&class) {
                match &people.representative {
                    Some(r) => person(r),
                    None => person(&format!("merchant:{id}")),
                }
            }
            if contact_classes.contains(&class) {
                people.contacts.iter().for_each(|p| person(p));
            }
            if sub_classes.contains(&class) {
                people.sub_accounts.iter().for_each(|p| person(p));
            }
        }
    }
    Ok((persons.len() as u64, groups.into_iter().collect()))
}

#[async_trait]
impl ScopeWriter for SqliteScopeWriter {
    async fn holdings(&mut self, categories: &[CategoryId]) -> Result<Vec<(String, i64)>, StoreError> {
        // Answered from the holdings index alone; the scope's rule is applied when inserting.
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new("SELECT m.holdings, COUNT(*) FROM merchants m WHERE ");
        push_holds_any(&mut qb, categories);
        qb.push(" GROUP BY m.holdings");
        let rows: Vec<(String, i64)> = qb
            .build_query_as()
            .fetch_all(&mut *self.tx)
            .await
            .doing("grouping the directory by holdings")?;
        Ok(rows)
    }

    async fn insert(&mut self, scope: &ScopeInsert<'_>) -> Result<ScopeTotals, StoreError> {
        let id = self.incident.clone();
        // Counts are filled in below, once the rule has selected the merchants.
        insert_classes_in(&mut self.tx, &id, scope.classes).await?;
        load_scope_map(&mut self.tx, scope.holdings_class).await?;
        let before: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(seq), 0) FROM affected_merchants")
            .fetch_one(&mut *self.tx)
            .await
            .doing("storing the affected merchants")?;
        let (plan, first) = plan_sql(scope.channel_order);
        let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "INSERT OR IGNORE INTO affected_merchants (incident_id, merchant_id, class_no, locale, region, channel_plan,
                first_address, merchant_name, merchant_kind, link_secret, reachability)
             SELECT ",
        );
        let first_address = format!(
            "COALESCE({}, NULL)",
            scope
                .channel_order
                .iter()
                .map(|c| address_column(*c))
                .collect::<Vec<_>>()
                .join(", ")
        );
        qb.push_bind(id.as_str()).push(format!(
            ", m.id, s.class_no, m.locale, m.region, {plan}, {first_address}, m.name, m.kind, lower(hex(randomblob(5))),
               CASE WHEN {first} = '' THEN 'unreachable' ELSE 'pending' END
             FROM merchants m JOIN scope_map s ON s.holdings = m.holdings WHERE "
        ));
        push_rule(&mut qb, scope.rule);
        let pool = self.pool.clone();
        let (inserted, aggregated) = tokio::join!(qb.build().execute(&mut *self.tx), aggregate_scope(&pool, scope));
        let inserted = inserted.doing("storing the affected merchants")?.rows_affected() as i64;
        let (natural_persons, groups) = aggregated?;
        self.seq_range = (before + 1, before + inserted);
        // Classes were planned from the whole directory's holdings; keep those the rule selected.
        let mut per_class: std::collections::HashMap<i64, i64> = std::collections::HashMap::new();
        for ((class, ..), n) in &groups {
            *per_class.entry(*class).or_default() += n;
        }
        for c in scope.classes {
            let n = per_class.get(&c.class_no).copied().unwrap_or(0);
            let sql = if n == 0 {
                "DELETE FROM scope_classes WHERE incident_id = $2 AND class_no = $3 AND $1 = 0"
            } else {
                "UPDATE scope_classes SET merchants = $1 WHERE incident_id = $2 AND class_no = $3"
            };
            sqlx::query(sql)
                .bind(n)
                .bind(id.as_str())
                .bind(c.class_no)
                .execute(&mut *self.tx)
                .await
                .doing("counting merchants per class")?;
        }
        let classes: Vec<ScopeClass> = scope
            .classes
            .iter()
            .filter(|c| per_class.contains_key(&c.class_no))
            .cloned()
            .collect();
        let overrides = override_rows_in(&mut self.tx, &id).await?;
        let counts = combine_groups(
            &classes,
            groups
                .iter()
                .map(|((c, l, r, f), n)| ((*c, l.clone(), r.clone(), f.clone(), String::new()), *n)),
            overrides,
        )?
        .into_iter()
        .map(|g| ScopeCount {
            risk: g.class.risk,
            locale: g.locale,
            first_channel: g.first_channel,
            notice_required: g.required,
            reachability: if g.first_channel.is_some() {
                Reachability::Pending
            } else {
                Reachability::Unreachable
            },
            merchants: g.merchants,
        })
        .collect();
        self.groups = groups;
        Ok(ScopeTotals {
            natural_persons,
            counts,
        })
    }

    async fn finish(
        mut self: Box<Self>,
        from: IncidentState,
        step: Step<'_>,
        result: ScopeResult<'_>,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        set_state_in(&mut self.tx, &self.incident, from, IncidentState::Scoped, now).await?;
        sqlx::query(
            "UPDATE incidents SET scope_rule = $1, grade_suggestion = $2, scope_seq_from = $4, scope_seq_to = $5,
                    scope_basis = $6
             WHERE id = $3",
        )
        .bind(to_json(result.rule))
        .bind(to_json(result.suggestion))
        .bind(self.incident.as_str())
        .bind(self.seq_range.0)
        .bind(self.seq_range.1)
        .bind(to_json(&result.basis))
        .execute(&mut *self.tx)
        .await
        .doing("storing a scope rule")?;
        if let Some(facts) = result.facts {
            sqlx::query("UPDATE incidents SET facts = $1 WHERE id = $2")
                .bind(to_json(facts))
                .bind(self.incident.as_str())
                .execute(&mut *self.tx)
                .await
                .doing("storing incident facts")?;
        }
        sqlx::query("DELETE FROM scope_groups WHERE incident_id = $1")
            .bind(self.incident.as_str())
            .execute(&mut *self.tx)
            .await
            .doing("storing scope groups")?;
        let incident = self.incident.to_string();
        for chunk in self.groups.chunks(300) {
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO scope_groups (incident_id, class_no, locale, region, first_channel, merchants) ",
            );
            qb.push_values(chunk, |mut b, ((class, locale, region, first), n)| {
                b.push_bind(incident.clone())
                    .push_bind(*class)
                    .push_bind(locale.clone())
                    .push_bind(region.clone())
                    .push_bind(first.clone())
                    .push_bind(*n);
            });
            qb.build().execute(&mut *self.tx).await.doing("storing scope groups")?;
        }
        record_transition_in(&mut self.tx, &self.incident, Some(from), &step, now).await?;
        self.tx.commit().await.doing("committing a scope")
    }
}

async fn append_ledger_in(conn: &mut SqliteConnection, e: &NewLedgerEntry) -> Result<(), StoreError> {
    let entry = LedgerAppend {
        at: e.at,
        actor: e.actor.as_str(),
        action: &e.action,
        incident: e.incident_id.as_ref(),
    };
    append_ledger_with(conn, &entry, &e.detail, &to_json(&e.detail)).await
}

/// Appends an entry whose detail is already written as JSON, as a `serde_json::Value` writes
/// it (compact, keys sorted): large details are then written once, not built as a tree first.
async fn append_ledger_raw_in(
    conn: &mut SqliteConnection,
    entry: &LedgerAppend<'_>,
    detail: &serde_json::value::RawValue,
) -> Result<(), StoreError> {
    append_ledger_with(conn, entry, detail, detail.get()).await
}

/// A ledger entry's fields but its detail.
struct LedgerAppend<'a> {
    at: DateTime<Utc>,
    actor: &'a str,
    action: &'a str,
    incident: Option<&'a IncidentId>,
}

/// `detail_json` is `detail` as stored: the hash covers `detail`'s own serialisation.
async fn append_ledger_with<D: serde::Serialize + ?Sized>(
    conn: &mut SqliteConnection,
    entry: &LedgerAppend<'_>,
    detail: &D,
    detail_json: &str,
) -> Result<(), StoreError> {
    let last: Option<(i64, String)> = sqlx::query_as("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await
        .doing("reading the ledger head")?;
    let (seq, prev) = last.map(|(s, h)| (s + 1, h)).unwrap_or((1, GENESIS.to_owned()));
    let at = fmt_ts(entry.at);
    let incident = entry.incident.map(|i| i.as_str());
    let hash = chain_hash(seq, &at, entry.actor, entry.action, incident, detail, &prev);
    sqlx::query(
        "INSERT INTO ledger (seq, at, actor, action, incident_id, detail, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(seq)
    .bind(at)
    .bind(entry.actor)
    .bind(entry.action)
    .bind(incident)
    .bind(detail_json)
    .bind(prev)
    .bind(hash)
    .execute(&mut *conn)
    .await
    .doing("appending to the ledger")?;
    Ok(())
}

async fn record_transition_in(
    conn: &mut SqliteConnection,
    id: &IncidentId,
    from: Option<IncidentState>,
    step: &Step<'_>,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let (to, actor, reason) = (step.to, step.actor, step.reason);
    let mut detail = step.detail.clone();
    sqlx::query(
        "INSERT INTO incident_transitions (incident_id, from_state, to_state, actor, reason, at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id.as_str())
    .bind(from.map(|s| s.as_str()))
    .bind(to.as_str())
    .bind(actor.as_str())
    .bind(reason)
    .bind(fmt_ts(at))
    .execute(&mut *conn)
    .await
    .doing("recording an incident transition")?;
    if let serde_json::Value::Object(map) = &mut detail {
        map.insert("from".into(), from.map(|s| s.as_str()).into());
        map.insert("to".into(), to.as_str().into());
        map.insert("reason".into(), reason.into());
    }
    let entry = NewLedgerEntry {
        at,
        actor: actor.clone(),
        action: format!("incident.{}", to.as_str()),
        incident_id: Some(id.clone()),
        detail,
    };
    append_ledger_in(conn, &entry).await
}

/// Compare-and-set on the incident state; a lost race is a conflict, not a silent overwrite.
async fn set_state_in(
    conn: &mut SqliteConnection,
    id: &IncidentId,
    from: IncidentState,
    to: IncidentState,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let done = sqlx::query("UPDATE incidents SET state = $1, updated_at = $2 WHERE id = $3 AND state = $4")
        .bind(to.as_str())
        .bind(fmt_ts(at))
        .bind(id.as_str())
        .bind(from.as_str())
        .execute(&mut *conn)
        .await
        .doing("changing an incident's state")?;
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            what: "incident",
            id: id.to_string(),
            reason: format!("it is no longer in state '{from}'"),
        })
    }
}

/// Queues one delivery unless its idempotency key exists; returns 1 if it was new.
async fn insert_delivery_in(conn: &mut SqliteConnection, d: &NewDelivery, now: &str) -> Result<u64, StoreError> {
    let done = sqlx::query(
        "INSERT INTO deliveries (id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address,
                                 plan_position, status, attempts, next_attempt_at, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', 0, $10, $10, $10)
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(DeliveryId::generate().as_str())
    .bind(Delivery::key_for(&d.draft_id, &d.merchant_id, d.channel))
    .bind(d.incident_id.as_str())
    .bind(d.draft_id.as_str())
    .bind(d.notice_id.as_str())
    .bind(d.merchant_id.as_str())
    .bind(d.channel.as_str())
    .bind(&d.address)
    .bind(d.plan_position)
    .bind(now)
    .execute(&mut *conn)
    .await
    .doing("queueing a delivery")?;
    Ok(done.rows_affected())
}

#[async_trait]
impl Store for SqliteStore {
    async fn upsert_merchants(&self, merchants: &[Merchant]) -> Result<UpsertCounts, StoreError> {
        let mut tx = self.begin().await?;
        let mut counts = UpsertCounts::default();
        let now = fmt_ts(Utc::now());
        // In chunks: one lookup and one multi-row upsert per chunk instead of two statements per
        // merchant (a statement costs about as much as a hundred rows in a batch).
        for chunk in merchants.chunks(400) {
            let ids: Vec<&str> = chunk.iter().map(|m| m.id.as_str()).collect();
            let existing: std::collections::HashMap<MerchantId, Merchant> =
                sqlx::query("SELECT * FROM merchants WHERE id IN (SELECT value FROM json_each($1))")
                    .bind(to_json(&ids))
                    .fetch_all(&mut *tx)
                    .await
                    .doing("looking up merchants")?
                    .iter()
                    .map(|row| merchant_from(row).map(|m| (m.id.clone(), m)))
                    .collect::<Result<_, _>>()?;
            let changed: Vec<&Merchant> = chunk
                .iter()
                .filter(|m| match existing.get(&m.id) {
                    Some(old) if old == *m => {
                        counts.unchanged += 1;
                        false
                    }
                    Some(_) => {
                        counts.updated += 1;
                        true
                    }
                    None => {
                        counts.inserted += 1;
                        true
                    }
                })
                .collect();
            if changed.is_empty() {
                continue;
            }
            let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO merchants (id, name, kind, locale, region, email, phone, push_token, postal_address,
                                        holdings, created_at, last_active_at, marketing_opt_out, people,
                                        imported_at, updated_at) ",
            );
            qb.push_values(changed.iter().copied(), |mut b, m| {
                b.push_bind(m.id.as_str())
                    .push_bind(&m.name)
                    .push_bind(m.kind.as_str())
                    .push_bind(m.locale.as_str())
                    .push_bind(&m.region)
                    .push_bind(m.email.as_ref().map(|e| e.as_str()))
                    .push_bind(m.phone.as_ref().map(|p| p.as_str()))
                    .push_bind(m.push_token.as_ref().map(|t| t.as_str()))
                    .push_bind(m.postal_address.as_deref())
                    .push_bind(to_json(&m.holdings))
                    .push_bind(m.created_at.map(fmt_ts))
                    .push_bind(m.last_active_at.map(fmt_ts))
                    .push_bind(m.marketing_opt_out as i64)
                    .push_bind(to_json(&m.people))
                    .push_bind(&now)
                    .push_bind(&now);
            });
            qb.push(
                " ON CONFLICT (id) DO UPDATE SET
                    name = excluded.name, kind = excluded.kind, locale = excluded.locale, region = excluded.region,
                    email = excluded.email, phone = excluded.phone, push_token = excluded.push_token,
                    postal_address = excluded.postal_address, holdings = excluded.holdings,
                    created_at = excluded.created_at, last_active_at = excluded.last_active_at,
                    marketing_opt_out = excluded.marketing_opt_out, people = excluded.people,
                    updated_at = excluded.updated_at",
            );
            qb.build().execute(&mut *tx).await.doing("storing merchants")?;
        }
        if counts.inserted + counts.updated > 0 {
            let entry = NewLedgerEntry::new(
                &Actor::system(),
                "directory.import",
                None,
                serde_json::json!({ "inserted": counts.inserted, "updated": counts.updated, "unchanged": counts.unchanged }),
            );
            append_ledger_in(&mut tx, &entry).await?;
        }
        tx.commit().await.doing("committing a directory import")?;
        Ok(counts)
    }

    async fn merchants(&self) -> Result<Vec<Merchant>, StoreError> {
        sqlx::query("SELECT * FROM merchants ORDER BY id")
            .fetch_all(&self.pool)
            .await
            .doing("listing merchants")?
            .iter()
            .map(merchant_from)
            .collect()
    }

    async fn merchants_page(&self, after: Option<&MerchantId>, limit: u32) -> Result<Vec<Merchant>, StoreError> {
        sqlx::query("SELECT * FROM merchants WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after.map(|a| a.as_str()).unwrap_or(""))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .doing("listing merchants")?
            .iter()
            .map(merchant_from)
            .collect()
    }

    async fn merchant(&self, id: &MerchantId) -> Result<Option<Merchant>, StoreError> {
        sqlx::query("SELECT * FROM merchants WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .doing("looking up a merchant")?
            .as_ref()
            .map(merchant_from)
            .transpose()
    }

    async fn ingest_event(
        &self,
        event: &SecurityEvent,
        reference_prefix: &str,
        actor: &Actor,
    ) -> Result<IngestOutcome, StoreError> {
        let mut tx = self.begin().await?;
        let seen: Option<(String, String)> =
            sqlx::query_as("SELECT id, incident_id FROM events WHERE source = $1 AND external_id = $2")
                .bind(&event.source)
                .bind(&event.external_id)
                .fetch_optional(&mut *tx)
                .await
                .doing("checking for a duplicate event")?;
        if let Some((event_id, incident_id)) = seen {
            return Ok(IngestOutcome::Duplicate {
                event_id: event_id.parse().map_err(|e| corrupt("events.id", e))?,
                incident_id: incident_id.parse().map_err(|e| corrupt("events.incident_id", e))?,
            });
        }
        let now = Utc::now();
        let event_id = EventId::generate();
        let open: Option<String> = match &event.correlation_key {
            Some(key) => sqlx::query_scalar(
                "SELECT id FROM incidents WHERE correlation_key = $1 AND state NOT IN ('closed', 'dismissed')",
            )
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .doing("finding the open incident for a correlation key")?,
            None => None,
        };
        let outcome = match open {
            Some(id) => {
                // The incident was detected when its earliest event was.
                sqlx::query("UPDATE incidents SET detected_at = MIN(detected_at, $1) WHERE id = $2")
                    .bind(fmt_ts(event.detected_at))
                    .bind(&id)
                    .execute(&mut *tx)
                    .await
                    .doing("updating an incident's detection time")?;
                IngestOutcome::Joined {
                    event_id: event_id.clone(),
                    incident_id: id.parse().map_err(|e| corrupt("incidents.id", e))?,
                }
            }
            None => {
                let incident_id = IncidentId::generate();
                let year = now.format("%Y").to_string();
                let stem = format!("{reference_prefix}-{year}-");
                let count: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM incidents WHERE substr(reference, 1, length($1)) = $1")
                        .bind(&stem)
                        .fetch_one(&mut *tx)
                        .await
                        .doing("numbering an incident")?;
                let reference = format!("{stem}{:04}", count + 1);
                sqlx::query(
                    "INSERT INTO incidents (id, reference, state, title, kind, severity, correlation_key, detected_at,
                                            opened_at, updated_at)
                     VALUES ($1, $2, 'triage', $3, $4, $5, $6, $8, $7, $7)",
                )
                .bind(incident_id.as_str())
                .bind(&reference)
                .bind(&event.title)
                .bind(event.kind.as_str())
                .bind(event.severity.as_str())
                .bind(event.correlation_key.as_deref())
                .bind(fmt_ts(now))
                .bind(fmt_ts(event.detected_at))
                .execute(&mut *tx)
                .await
                .doing("opening an incident")?;
                let step = Step {
                    to: IncidentState::Triage,
                    actor,
                    reason: "opened by a security event",
                    detail: serde_json::json!({ "event_id": event_id.as_str(), "source": event.source }),
                };
                record_transition_in(&mut tx, &incident_id, None, &step, now).await?;
                IngestOutcome::Opened {
                    event_id: event_id.clone(),
                    incident_id,
                    reference,
                }
            }
        };
        let incident_id = match &outcome {
            IngestOutcome::Joined { incident_id, .. } | IngestOutcome::Opened { incident_id, .. } => {
                incident_id.clone()
            }
            IngestOutcome::Duplicate { incident_id, .. } => incident_id.clone(),
        };
        sqlx::query(
            "INSERT INTO events (id, source, external_id, incident_id, kind, severity, title, body, detected_at, received_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(event_id.as_str())
        .bind(&event.source)
        .bind(&event.external_id)
        .bind(incident_id.as_str())
        .bind(event.kind.as_str())
        .bind(event.severity.as_str())
        .bind(&event.title)
        .bind(to_json(event))
        .bind(fmt_ts(event.detected_at))
        .bind(fmt_ts(now))
        .execute(&mut *tx)
        .await
        .doing("storing an event")?;
        let entry = NewLedgerEntry {
            at: now,
            actor: actor.clone(),
            action: "event.ingested".into(),
            incident_id: Some(incident_id),
            detail: serde_json::json!({
                "event_id": event_id.as_str(), "source": event.source, "external_id": event.external_id,
                "kind": event.kind.as_str(), "severity": event.severity.as_str(),
            }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing an event")?;
        Ok(outcome)
    }

    async fn incident(&self, id_or_reference: &str) -> Result<Option<Incident>, StoreError> {
        sqlx::query("SELECT * FROM incidents WHERE id = $1 OR reference = $1")
            .bind(id_or_reference)
            .fetch_optional(&self.pool)
            .await
            .doing("looking up an incident")?
            .as_ref()
            .map(incident_from)
            .transpose()
    }

    async fn incidents(&self) -> Result<Vec<Incident>, StoreError> {
        sqlx::query("SELECT * FROM incidents ORDER BY opened_at DESC")
            .fetch_all(&self.pool)
            .await
            .doing("listing incidents")?
            .iter()
            .map(incident_from)
            .collect()
    }

    async fn incident_events(&self, id: &IncidentId) -> Result<Vec<SecurityEvent>, StoreError> {
        let rows = sqlx::query("SELECT body FROM events WHERE incident_id = $1 ORDER BY detected_at")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing an incident's events")?;
        rows.iter().map(|row| json_col(row, "body")).collect()
    }

    async fn transitions(&self, id: &IncidentId) -> Result<Vec<Transition>, StoreError> {
        let rows = sqlx::query("SELECT * FROM incident_transitions WHERE incident_id = $1 ORDER BY seq")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing an incident's transitions")?;
        rows.iter()
            .map(|row| {
                Ok(Transition {
                    from_state: opt_col(row, "from_state")?,
                    to_state: col(row, "to_state")?,
                    actor: col(row, "actor")?,
                    reason: row.try_get("reason").doing("reading a transition")?,
                    at: ts_col(row, "at")?,
                })
            })
            .collect()
    }

    async fn transition(
        &self,
        id: &IncidentId,
        from: IncidentState,
        step: Step<'_>,
        changes: IncidentChanges,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        set_state_in(&mut tx, id, from, step.to, now).await?;
        if let Some(facts) = &changes.facts {
            sqlx::query("UPDATE incidents SET facts = $1, kind = $2 WHERE id = $3")
                .bind(to_json(facts))
                .bind(facts.kind.as_str())
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .doing("storing incident facts")?;
        }
        record_transition_in(&mut tx, id, Some(from), &step, now).await?;
        tx.commit().await.doing("committing an incident transition")
    }

    async fn cohort_holdings(&self, id: &IncidentId) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT m.holdings, COUNT(*) FROM affected_merchants a JOIN merchants m ON m.id = a.merchant_id
             WHERE a.incident_id = $1 GROUP BY m.holdings",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("grouping the cohort by holdings")?;
        Ok(rows)
    }

    async fn reclassify(
        &self,
        id: &IncidentId,
        holdings_class: &[(String, i64)],
        classes: &[ScopeClass],
        basis: &ScopeBasis,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM scope_classes WHERE incident_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .doing("replacing scope classes")?;
        insert_classes_in(&mut tx, id, classes).await?;
        load_scope_map(&mut tx, holdings_class).await?;
        // The same merchants, each in the class its holdings now fall in.
        sqlx::query(
            "UPDATE affected_merchants SET class_no = COALESCE(
                (SELECT s.class_no FROM merchants m JOIN scope_map s ON s.holdings = m.holdings
                 WHERE m.id = affected_merchants.merchant_id), class_no)
             WHERE incident_id = $1",
        )
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .doing("reclassifying the cohort")?;
        sqlx::query("DELETE FROM scope_groups WHERE incident_id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .doing("recounting scope groups")?;
        sqlx::query(trusted(format!(
            "INSERT INTO scope_groups (incident_id, class_no, locale, region, first_channel, merchants)
             SELECT a.incident_id, a.class_no, a.locale, a.region, {FIRST_CHANNEL}, COUNT(*)
             FROM affected_merchants a WHERE a.incident_id = $1 GROUP BY 1, 2, 3, 4, 5"
        )))
        .bind(id.as_str())
        .execute(&mut *tx)
        .await
        .doing("recounting scope groups")?;
        sqlx::query("UPDATE incidents SET scope_basis = $1 WHERE id = $2")
            .bind(to_json(basis))
            .bind(id.as_str())
            .execute(&mut *tx)
            .await
            .doing("recording the classification basis")?;
        let entry = NewLedgerEntry::new(
            actor,
            "scope.reclassified",
            Some(id),
            serde_json::json!({ "basis": basis, "classes": classes.len() }),
        );
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a reclassification")
    }

    async fn unknown_merchants(&self, ids: &[MerchantId]) -> Result<Vec<MerchantId>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT value FROM json_each($1) WHERE value NOT IN (SELECT id FROM merchants) ORDER BY value",
        )
        .bind(to_json(&ids))
        .fetch_all(&self.pool)
        .await
        .doing("checking merchant ids")?;
        rows.iter()
            .map(|r| r.parse().map_err(|e: FieldError| corrupt("merchant id", e)))
            .collect()
    }

    async fn begin_scope(&self, id: &IncidentId) -> Result<Box<dyn ScopeWriter>, StoreError> {
        let mut tx = self.begin().await?;
        for sql in [
            "DELETE FROM affected_merchants WHERE incident_id = $1",
            "DELETE FROM scope_classes WHERE incident_id = $1",
        ] {
            sqlx::query(sql)
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .doing("clearing a previous scope")?;
        }
        Ok(Box::new(SqliteScopeWriter {
            tx,
            pool: self.pool.clone(),
            incident: id.clone(),
            groups: Vec::new(),
            seq_range: (0, -1),
        }))
    }

    async fn scope_classes(&self, id: &IncidentId) -> Result<Vec<ScopeClass>, StoreError> {
        sqlx::query("SELECT * FROM scope_classes WHERE incident_id = $1 ORDER BY class_no")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing scope classes")?
            .iter()
            .map(class_from)
            .collect()
    }

    async fn scope_counts(&self, id: &IncidentId) -> Result<Vec<ScopeCount>, StoreError> {
        let mut conn = self.pool.acquire().await.doing("counting a scope")?;
        scope_counts_in(&mut conn, id).await
    }

    async fn set_notice_override(&self, id: &IncidentId, o: &NoticeOverride) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO notice_overrides (incident_id, merchant_id, required, reason, actor, at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (incident_id, merchant_id) DO UPDATE SET
                required = excluded.required, reason = excluded.reason, actor = excluded.actor, at = excluded.at",
        )
        .bind(id.as_str())
        .bind(o.merchant_id.as_str())
        .bind(o.required as i64)
        .bind(&o.reason)
        .bind(o.actor.as_str())
        .bind(fmt_ts(o.at))
        .execute(&mut *tx)
        .await
        .doing("storing a notice override")?;
        let entry = NewLedgerEntry::new(
            &o.actor,
            "scope.notice_override",
            Some(id),
            serde_json::json!({ "merchant_id": o.merchant_id.as_str(), "required": o.required, "reason": o.reason }),
        );
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a notice override")
    }

    async fn notice_overrides(&self, id: &IncidentId) -> Result<Vec<NoticeOverride>, StoreError> {
        let rows = sqlx::query("SELECT * FROM notice_overrides WHERE incident_id = $1 ORDER BY merchant_id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing notice overrides")?;
        rows.iter()
            .map(|row| {
                Ok(NoticeOverride {
                    merchant_id: col(row, "merchant_id")?,
                    required: row.try_get::<i64, _>("required").doing("reading an override")? != 0,
                    reason: row.try_get("reason").doing("reading an override")?,
                    actor: col(row, "actor")?,
                    at: ts_col(row, "at")?,
                })
            })
            .collect()
    }

    async fn affected(&self, id: &IncidentId) -> Result<Vec<AffectedMerchant>, StoreError> {
        sqlx::query(trusted(format!(
            "{AFFECTED_SELECT} WHERE a.incident_id = $1 ORDER BY a.merchant_id"
        )))
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("listing affected merchants")?
        .iter()
        .map(affected_from)
        .collect()
    }

    async fn affected_page(
        &self,
        id: &IncidentId,
        after: Option<&MerchantId>,
        limit: u32,
        notice_required: Option<bool>,
    ) -> Result<Vec<AffectedMerchant>, StoreError> {
        sqlx::query(trusted(format!(
            "{AFFECTED_SELECT} WHERE a.incident_id = $1 AND a.merchant_id > $2
               AND ($3 IS NULL OR COALESCE(o.required, c.notice_required) = $3)
             ORDER BY a.merchant_id LIMIT $4"
        )))
        .bind(id.as_str())
        .bind(after.map(|a| a.as_str()).unwrap_or(""))
        .bind(notice_required.map(|r| r as i64))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .doing("listing affected merchants")?
        .iter()
        .map(affected_from)
        .collect()
    }

    async fn affected_ids(&self, id: &IncidentId, reachability: Reachability) -> Result<Vec<MerchantId>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT merchant_id FROM affected_merchants WHERE incident_id = $1 AND reachability = $2 ORDER BY merchant_id",
        )
        .bind(id.as_str())
        .bind(reachability.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("listing affected merchants")?;
        rows.iter()
            .map(|r| r.parse().map_err(|e: FieldError| corrupt("merchant id", e)))
            .collect()
    }

    async fn lookup_salt(&self) -> Result<String, StoreError> {
        sqlx::query_scalar("SELECT value FROM local_secrets WHERE name = 'lookup_salt'")
            .fetch_one(&self.pool)
            .await
            .doing("reading the lookup salt")
    }

    async fn lookups_since(&self, client: &str, since: DateTime<Utc>) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM lookups WHERE client = $1 AND at >= $2")
            .bind(client)
            .bind(fmt_ts(since))
            .fetch_one(&self.pool)
            .await
            .doing("counting a client's lookups")?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn record_lookup(&self, l: &Lookup) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO lookups (at, reference, client, outcome) VALUES ($1, $2, $3, $4)")
            .bind(fmt_ts(l.at))
            .bind(&l.reference)
            .bind(&l.client)
            .bind(&l.outcome)
            .execute(&self.pool)
            .await
            .doing("logging a lookup")?;
        Ok(())
    }

    async fn lookups(&self, reference: &str) -> Result<Vec<Lookup>, StoreError> {
        let rows: Vec<(String, String, String, String)> =
            sqlx::query_as("SELECT at, reference, client, outcome FROM lookups WHERE reference = $1 ORDER BY at DESC")
                .bind(reference)
                .fetch_all(&self.pool)
                .await
                .doing("reading lookups")?;
        rows.into_iter()
            .map(|(at, reference, client, outcome)| {
                Ok(Lookup {
                    at: parse_ts(&at).map_err(|e| corrupt("lookups.at", e))?,
                    reference,
                    client,
                    outcome,
                })
            })
            .collect()
    }

    async fn add_reminders(&self, reminders: &[ClockReminder], at: DateTime<Utc>) -> Result<u64, StoreError> {
        let rows: Vec<serde_json::Value> = reminders
            .iter()
            .map(|r| {
                serde_json::json!([
                    r.incident_id,
                    r.regulator,
                    r.stage,
                    fmt_ts(r.due_at),
                    r.point,
                    r.recipient,
                    r.channel,
                    r.text,
                    r.status
                ])
            })
            .collect();
        let mut added = 0;
        for chunk in rows.chunks(500) {
            added += sqlx::query(
                "INSERT OR IGNORE INTO clock_reminders
                     (incident_id, regulator, stage, due_at, point, recipient, channel, text, status, created_at)
                 SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
                        value ->> 7, value ->> 8, $2
                 FROM json_each($1)
                 -- A point marked skipped only if nothing was stored for it (it may have gone).
                 WHERE value ->> 8 <> 'skipped'
                    OR NOT EXISTS (SELECT 1 FROM clock_reminders AS c
                                   WHERE c.incident_id = value ->> 0 AND c.regulator = value ->> 1
                                     AND c.stage = value ->> 2 AND c.due_at = value ->> 3 AND c.point = value ->> 4)",
            )
            .bind(to_json(&chunk))
            .bind(fmt_ts(at))
            .execute(&self.pool)
            .await
            .doing("storing reminders")?
            .rows_affected();
        }
        Ok(added)
    }

    async fn pending_reminders(&self) -> Result<Vec<ClockReminder>, StoreError> {
        sqlx::query(trusted(format!(
            "{REMINDER_SELECT} WHERE status = 'pending' ORDER BY created_at, point, recipient"
        )))
        .fetch_all(&self.pool)
        .await
        .doing("reading pending reminders")?
        .iter()
        .map(reminder_from)
        .collect()
    }

    async fn finish_reminder(
        &self,
        r: &ClockReminder,
        outcome: Result<DateTime<Utc>, String>,
    ) -> Result<(), StoreError> {
        let (status, sent_at, error) = match outcome {
            Ok(at) => ("sent", Some(fmt_ts(at)), None),
            Err(e) => ("pending", None, Some(e)),
        };
        sqlx::query(
            "UPDATE clock_reminders SET status = $1, sent_at = $2, last_error = $3, attempts = attempts + 1
             WHERE incident_id = $4 AND regulator = $5 AND stage = $6 AND due_at = $7 AND point = $8 AND recipient = $9
               AND status = 'pending'",
        )
        .bind(status)
        .bind(sent_at)
        .bind(error)
        .bind(&r.incident_id)
        .bind(&r.regulator)
        .bind(&r.stage)
        .bind(fmt_ts(r.due_at))
        .bind(&r.point)
        .bind(&r.recipient)
        .execute(&self.pool)
        .await
        .doing("recording a reminder's send")?;
        Ok(())
    }

    async fn reminders(&self, id: &IncidentId) -> Result<Vec<ClockReminder>, StoreError> {
        sqlx::query(trusted(format!(
            "{REMINDER_SELECT} WHERE incident_id = $1 ORDER BY created_at, due_at, point, recipient"
        )))
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("reading reminders")?
        .iter()
        .map(reminder_from)
        .collect()
    }

    async fn affected_ids_requiring_notice(&self, id: &IncidentId) -> Result<Vec<MerchantId>, StoreError> {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT merchant_id FROM affected_merchants WHERE incident_id = $1 AND reachability <> 'not_required'
             ORDER BY merchant_id",
        )
        .bind(id.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("listing the merchants a bulletin covers")?;
        rows.iter()
            .map(|r| r.parse().map_err(|e: FieldError| corrupt("merchant id", e)))
            .collect()
    }

    async fn affected_regions(&self, id: &IncidentId) -> Result<Vec<String>, StoreError> {
        // From the scope's groups: a handful of rows where the affected merchants may be millions.
        sqlx::query_scalar("SELECT DISTINCT region FROM scope_groups WHERE incident_id = $1 ORDER BY region")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing the affected merchants' regions")
    }

    async fn affected_merchant(
        &self,
        id: &IncidentId,
        merchant: &MerchantId,
    ) -> Result<Option<AffectedMerchant>, StoreError> {
        sqlx::query(trusted(format!(
            "{AFFECTED_SELECT} WHERE a.incident_id = $1 AND a.merchant_id = $2"
        )))
        .bind(id.as_str())
        .bind(merchant.as_str())
        .fetch_optional(&self.pool)
        .await
        .doing("looking up an affected merchant")?
        .as_ref()
        .map(affected_from)
        .transpose()
    }

    async fn set_reachability(
        &self,
        id: &IncidentId,
        merchant: &MerchantId,
        reachability: Reachability,
        channel: Option<Channel>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE affected_merchants SET reachability = $1, reached_channel = $2
             WHERE incident_id = $3 AND merchant_id = $4",
        )
        .bind(reachability.as_str())
        .bind(channel.map(|c| c.as_str()))
        .bind(id.as_str())
        .bind(merchant.as_str())
        .execute(&self.pool)
        .await
        .doing("recording whether a merchant was reached")?;
        Ok(())
    }

    async fn variant_groups(&self, id: &IncidentId) -> Result<Vec<VariantGroup>, StoreError> {
        let mut conn = self.pool.acquire().await.doing("grouping notices into variants")?;
        let mut by_key: std::collections::BTreeMap<(i64, Locale, String), i64> = std::collections::BTreeMap::new();
        for g in stored_groups_in(&mut conn, id)
            .await?
            .into_iter()
            .filter(|g| g.required)
        {
            *by_key.entry((g.class.class_no, g.locale, g.region)).or_default() += g.merchants;
        }
        Ok(by_key
            .into_iter()
            .map(|((class_no, locale, region), merchants)| VariantGroup {
                class_no,
                locale,
                region,
                merchants,
            })
            .collect())
    }

    async fn create_draft(&self, new: NewDraft<'_>) -> Result<i64, StoreError> {
        let draft = new.draft;
        let mut tx = self.begin().await?;
        set_state_in(
            &mut tx,
            &draft.incident_id,
            new.from,
            IncidentState::Drafted,
            draft.drafted_at,
        )
        .await?;
        sqlx::query("INSERT INTO template_sets (hash, sources) VALUES ($1, $2) ON CONFLICT (hash) DO NOTHING")
            .bind(&new.inputs.template_set)
            .bind(new.template_sources)
            .execute(&mut *tx)
            .await
            .doing("storing a template set")?;
        sqlx::query(
            "INSERT INTO drafts (id, incident_id, version, state, content_hash, drafted_by, drafted_at, inputs, notice_count)
             VALUES ($1, $2, $3, 'drafted', $4, $5, $6, $7, $8)",
        )
        .bind(draft.id.as_str())
        .bind(draft.incident_id.as_str())
        .bind(draft.version)
        .bind(&draft.content_hash)
        .bind(draft.drafted_by.as_str())
        .bind(fmt_ts(draft.drafted_at))
        .bind(to_json(new.inputs))
        .bind(draft.notice_count)
        .execute(&mut *tx)
        .await
        .doing("storing a draft")?;
        for v in new.variants {
            sqlx::query(
                "INSERT INTO draft_variants (draft_id, variant_no, class_no, locale, profiles, merchants, sample_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(draft.id.as_str())
            .bind(v.variant_no)
            .bind(v.class_no)
            .bind(v.locale.as_str())
            .bind(&v.profiles)
            .bind(v.merchants)
            .bind(&v.sample_hash)
            .execute(&mut *tx)
            .await
            .doing("storing a notice variant")?;
        }
        let now = fmt_ts(draft.drafted_at);
        // Earlier versions never approved will not be sent.
        sqlx::query(
            "UPDATE deliveries SET status = 'superseded', updated_at = $2 WHERE incident_id = $1 AND status = 'held'",
        )
        .bind(draft.incident_id.as_str())
        .bind(&now)
        .execute(&mut *tx)
        .await
        .doing("superseding unapproved deliveries")?;
        // One statement queues every first delivery: ids follow the scope rows, so they insert in
        // order; the address is the one scoping found on the plan's first channel.
        let prefix = draft_prefix(&draft.id);
        let first = FIRST_CHANNEL;
        // The scope's rows are a contiguous run of `seq`: read them as a range, in order.
        let range: (Option<i64>, Option<i64>) =
            sqlx::query_as("SELECT scope_seq_from, scope_seq_to FROM incidents WHERE id = $1")
                .bind(draft.incident_id.as_str())
                .fetch_one(&mut *tx)
                .await
                .doing("finding the scope's rows")?;
        // OR IGNORE: an id or key that exists was queued already (and it spares SQLite a statement
        // journal the size of the insert, kept to undo a constraint failure half way).
        let queued = sqlx::query(trusted(format!(
            "INSERT OR IGNORE INTO deliveries (id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address,
                                     plan_position, status, attempts, next_attempt_at, created_at, updated_at)
             SELECT 'dlv_' || $1 || printf('%012x', a.seq), $2 || ':' || a.merchant_id || ':' || {first},
                    a.incident_id, $2, 'ntc_' || $1 || printf('%012x', a.seq), a.merchant_id, {first}, a.first_address,
                    0, 'held', 0, $3, $3, $3
             FROM affected_merchants a
             JOIN scope_classes c ON c.incident_id = a.incident_id AND c.class_no = a.class_no
             LEFT JOIN notice_overrides o ON o.incident_id = a.incident_id AND o.merchant_id = a.merchant_id
             WHERE a.incident_id = $4 AND {REQUIRED} AND a.first_address IS NOT NULL AND a.channel_plan <> ''
             ORDER BY a.seq"
        )))
        .bind(prefix)
        .bind(draft.id.as_str())
        .bind(&now)
        .bind(draft.incident_id.as_str())
        .bind(range.0.unwrap_or(0))
        .bind(range.1.unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .doing("queueing first deliveries")?
        .rows_affected();
        let reason = format!("notice version {} drafted", draft.version);
        let step = Step {
            to: IncidentState::Drafted,
            actor: &draft.drafted_by,
            reason: &reason,
            detail: serde_json::json!({ "draft_id": draft.id.as_str(), "version": draft.version,
                                        "notices": draft.notice_count, "variants": new.variants.len(),
                                        "held_deliveries": queued, "content_hash": draft.content_hash }),
        };
        record_transition_in(&mut tx, &draft.incident_id, Some(new.from), &step, draft.drafted_at).await?;
        tx.commit().await.doing("committing a draft")?;
        Ok(draft.notice_count)
    }

    async fn drafts(&self, incident: &IncidentId) -> Result<Vec<Draft>, StoreError> {
        sqlx::query("SELECT * FROM drafts WHERE incident_id = $1 ORDER BY version")
            .bind(incident.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing drafts")?
            .iter()
            .map(draft_from)
            .collect()
    }

    async fn draft(&self, id: &DraftId) -> Result<Option<Draft>, StoreError> {
        sqlx::query("SELECT * FROM drafts WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .doing("looking up a draft")?
            .as_ref()
            .map(draft_from)
            .transpose()
    }

    async fn draft_inputs(&self, id: &DraftId) -> Result<Option<DraftInputs>, StoreError> {
        let raw: Option<Option<String>> = sqlx::query_scalar("SELECT inputs FROM drafts WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .doing("reading a draft's inputs")?;
        raw.flatten()
            .map(|r| serde_json::from_str(&r).map_err(|e| corrupt("drafts.inputs", e)))
            .transpose()
    }

    async fn draft_variants(&self, id: &DraftId) -> Result<Vec<DraftVariant>, StoreError> {
        let rows = sqlx::query("SELECT * FROM draft_variants WHERE draft_id = $1 ORDER BY variant_no")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing notice variants")?;
        rows.iter()
            .map(|row| {
                Ok(DraftVariant {
                    variant_no: row.try_get("variant_no").doing("reading a variant")?,
                    class_no: row.try_get("class_no").doing("reading a variant")?,
                    locale: col(row, "locale")?,
                    profiles: row.try_get("profiles").doing("reading a variant")?,
                    merchants: row.try_get("merchants").doing("reading a variant")?,
                    sample_hash: row.try_get("sample_hash").doing("reading a variant")?,
                })
            })
            .collect()
    }

    async fn template_set(&self, hash: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT sources FROM template_sets WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .doing("reading a template set")
    }

    async fn notice_records(
        &self,
        draft: &DraftId,
        after: Option<&MerchantId>,
        limit: u32,
    ) -> Result<Vec<NoticeRecord>, StoreError> {
        let legacy =
            sqlx::query("SELECT * FROM notices WHERE draft_id = $1 AND merchant_id > $2 ORDER BY merchant_id LIMIT $3")
                .bind(draft.as_str())
                .bind(after.map(|a| a.as_str()).unwrap_or(""))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await
                .doing("listing notices")?;
        if !legacy.is_empty() {
            return legacy.iter().map(legacy_record_from).collect();
        }
        sqlx::query(trusted(format!(
            "{NOTICE_SELECT} WHERE d.id = $1 AND {REQUIRED} AND a.merchant_id > $2 ORDER BY a.merchant_id LIMIT $3"
        )))
        .bind(draft.as_str())
        .bind(after.map(|a| a.as_str()).unwrap_or(""))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .doing("listing notices")?
        .iter()
        .map(record_from)
        .collect()
    }

    async fn notice_records_by_id(&self, ids: &[NoticeId]) -> Result<Vec<NoticeRecord>, StoreError> {
        let all: Vec<&str> = ids.iter().map(|i| i.as_str()).collect();
        let mut records: Vec<NoticeRecord> =
            sqlx::query("SELECT * FROM notices WHERE id IN (SELECT value FROM json_each($1))")
                .bind(to_json(&all))
                .fetch_all(&self.pool)
                .await
                .doing("looking up notices")?
                .iter()
                .map(legacy_record_from)
                .collect::<Result<_, _>>()?;
        // Derived ids: 20 hex digits of their draft, then the scope row; one query per draft.
        let mut by_draft: std::collections::BTreeMap<&str, Vec<i64>> = Default::default();
        for id in ids {
            let hex = id.as_str().strip_prefix("ntc_").unwrap_or("");
            if let (Some(prefix), Some(seq)) = (
                hex.get(..20),
                hex.get(20..).and_then(|s| i64::from_str_radix(s, 16).ok()),
            ) {
                by_draft.entry(prefix).or_default().push(seq);
            }
        }
        for (prefix, seqs) in by_draft {
            // One JSON document rather than a row at a time: rows crossing from SQLite's
            // thread cost as much as statements.
            let json: String = sqlx::query_scalar(trusted(format!(
                "SELECT json_group_array(json_object('draft_id', draft_id, 'seq', seq, 'merchant_id', merchant_id,
                        'class_no', class_no, 'locale', locale, 'region', region, 'merchant_name', merchant_name,
                        'merchant_kind', merchant_kind, 'link_secret', link_secret))
                 FROM ({NOTICE_SELECT} WHERE substr(d.id, 5, 20) = $1 AND a.seq IN (SELECT value FROM json_each($2)))"
            )))
            .bind(prefix)
            .bind(to_json(&seqs))
            .fetch_one(&self.pool)
            .await
            .doing("looking up notices")?;
            #[derive(serde::Deserialize)]
            struct Row {
                draft_id: String,
                seq: i64,
                merchant_id: String,
                class_no: i64,
                locale: String,
                region: String,
                merchant_name: String,
                merchant_kind: String,
                link_secret: String,
            }
            let rows: Vec<Row> = serde_json::from_str(&json).map_err(|e| corrupt("notices", e))?;
            for r in rows {
                let draft_id: DraftId = r.draft_id.parse().map_err(|e: FieldError| corrupt("drafts.id", e))?;
                records.push(NoticeRecord {
                    id: notice_id(&draft_id, r.seq)?,
                    draft_id,
                    merchant_id: r
                        .merchant_id
                        .parse()
                        .map_err(|e: FieldError| corrupt("affected_merchants.merchant_id", e))?,
                    class_no: r.class_no,
                    locale: r
                        .locale
                        .parse()
                        .map_err(|e: FieldError| corrupt("affected_merchants.locale", e))?,
                    region: r.region,
                    merchant_name: r.merchant_name,
                    merchant_kind: r
                        .merchant_kind
                        .parse()
                        .map_err(|e: FieldError| corrupt("affected_merchants.merchant_kind", e))?,
                    link_token: format!("{:08x}{}", r.seq, r.link_secret),
                    legacy: None,
                });
            }
        }
        Ok(records)
    }

    async fn notice_record(&self, id: &NoticeId) -> Result<Option<NoticeRecord>, StoreError> {
        if let Some(row) = sqlx::query("SELECT * FROM notices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .doing("looking up a notice")?
        {
            return legacy_record_from(&row).map(Some);
        }
        // A derived id: 20 hex digits of its draft, then the scope row.
        let hex = id.as_str().strip_prefix("ntc_").unwrap_or("");
        let (Some(prefix), Some(seq)) = (
            hex.get(..20),
            hex.get(20..).and_then(|s| i64::from_str_radix(s, 16).ok()),
        ) else {
            return Ok(None);
        };
        sqlx::query(trusted(format!(
            "{NOTICE_SELECT} WHERE substr(d.id, 5, 20) = $1 AND a.seq = $2"
        )))
        .bind(prefix)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await
        .doing("looking up a notice")?
        .as_ref()
        .map(record_from)
        .transpose()
    }

    async fn notice_for(&self, draft: &DraftId, merchant: &MerchantId) -> Result<Option<NoticeRecord>, StoreError> {
        if let Some(row) = sqlx::query("SELECT * FROM notices WHERE draft_id = $1 AND merchant_id = $2")
            .bind(draft.as_str())
            .bind(merchant.as_str())
            .fetch_optional(&self.pool)
            .await
            .doing("looking up a notice")?
        {
            return legacy_record_from(&row).map(Some);
        }
        sqlx::query(trusted(format!(
            "{NOTICE_SELECT} WHERE d.id = $1 AND a.merchant_id = $2"
        )))
        .bind(draft.as_str())
        .bind(merchant.as_str())
        .fetch_optional(&self.pool)
        .await
        .doing("looking up a notice")?
        .as_ref()
        .map(record_from)
        .transpose()
    }

    async fn notice_by_token(&self, token: &str) -> Result<Option<NoticeRecord>, StoreError> {
        let (Some(seq), Some(secret)) = (
            token.get(..8).and_then(|s| i64::from_str_radix(s, 16).ok()),
            token.get(8..),
        ) else {
            return Ok(None);
        };
        // The latest approved version the merchant was sent.
        let row = sqlx::query(trusted(format!(
            "{NOTICE_SELECT} WHERE a.seq = $1 AND d.state = 'approved' ORDER BY d.version DESC LIMIT 1"
        )))
        .bind(seq)
        .fetch_optional(&self.pool)
        .await
        .doing("looking up a notice link")?;
        let Some(row) = row else { return Ok(None) };
        let stored: String = row.try_get("link_secret").doing("reading a notice link")?;
        if !constant_time_eq(stored.as_bytes(), secret.as_bytes()) {
            return Ok(None);
        }
        record_from(&row).map(Some)
    }

    async fn first_sent(&self, draft: &DraftId) -> Result<Option<DateTime<Utc>>, StoreError> {
        let raw: Option<String> = sqlx::query_scalar("SELECT MIN(sent_at) FROM deliveries WHERE draft_id = $1")
            .bind(draft.as_str())
            .fetch_one(&self.pool)
            .await
            .doing("finding when a version was sent")?;
        raw.map(|r| parse_ts(&r).map_err(|e| corrupt("sent_at", e))).transpose()
    }

    async fn approve_draft(&self, draft_id: &DraftId, approver: &Actor, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let row = sqlx::query("SELECT * FROM drafts WHERE id = $1")
            .bind(draft_id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .doing("looking up a draft")?
            .ok_or_else(|| StoreError::NotFound {
                what: "draft",
                id: draft_id.to_string(),
            })?;
        let draft = draft_from(&row)?;
        let done = sqlx::query(
            "UPDATE drafts SET state = 'approved', approved_by = $1, approved_at = $2 WHERE id = $3 AND state = 'drafted'",
        )
        .bind(approver.as_str())
        .bind(fmt_ts(at))
        .bind(draft_id.as_str())
        .execute(&mut *tx)
        .await
        .doing("approving a draft")?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict {
                what: "draft",
                id: draft_id.to_string(),
                reason: "it is not awaiting approval".into(),
            });
        }
        set_state_in(
            &mut tx,
            &draft.incident_id,
            IncidentState::Drafted,
            IncidentState::Approved,
            at,
        )
        .await?;
        let reason = format!("notice version {} approved", draft.version);
        let step = Step {
            to: IncidentState::Approved,
            actor: approver,
            reason: &reason,
            detail: serde_json::json!({ "draft_id": draft_id.as_str(), "version": draft.version,
                                        "content_hash": draft.content_hash, "drafted_by": draft.drafted_by.as_str() }),
        };
        record_transition_in(&mut tx, &draft.incident_id, Some(IncidentState::Drafted), &step, at).await?;
        tx.commit().await.doing("committing an approval")
    }

    async fn release_draft(
        &self,
        incident: &IncidentId,
        draft: &DraftId,
        from: IncidentState,
        actor: &Actor,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        let at = fmt_ts(now);
        let superseded = sqlx::query(
            "UPDATE deliveries SET status = 'superseded', updated_at = $3
             WHERE incident_id = $1 AND draft_id <> $2 AND status IN ('pending', 'held')",
        )
        .bind(incident.as_str())
        .bind(draft.as_str())
        .bind(&at)
        .execute(&mut *tx)
        .await
        .doing("superseding an earlier version's deliveries")?
        .rows_affected();
        let released = sqlx::query(
            "UPDATE deliveries SET status = 'pending', next_attempt_at = $3, updated_at = $3
             WHERE incident_id = $1 AND draft_id = $2 AND status = 'held'",
        )
        .bind(incident.as_str())
        .bind(draft.as_str())
        .bind(&at)
        .execute(&mut *tx)
        .await
        .doing("releasing held deliveries")?
        .rows_affected();
        sqlx::query(
            "UPDATE affected_merchants SET reached_channel = NULL, reachability = CASE
                WHEN COALESCE((SELECT o.required FROM notice_overrides o
                               WHERE o.incident_id = affected_merchants.incident_id
                                 AND o.merchant_id = affected_merchants.merchant_id),
                              (SELECT c.notice_required FROM scope_classes c
                               WHERE c.incident_id = affected_merchants.incident_id
                                 AND c.class_no = affected_merchants.class_no)) = 0 THEN 'not_required'
                WHEN EXISTS (SELECT 1 FROM deliveries d
                             WHERE d.incident_id = affected_merchants.incident_id
                               AND d.merchant_id = affected_merchants.merchant_id AND d.draft_id = $2) THEN 'pending'
                ELSE 'unreachable' END
             WHERE incident_id = $1",
        )
        .bind(incident.as_str())
        .bind(draft.as_str())
        .execute(&mut *tx)
        .await
        .doing("recording whom the version can reach")?;
        if from != IncidentState::Notifying {
            set_state_in(&mut tx, incident, from, IncidentState::Notifying, now).await?;
        }
        let reason = format!("{released} deliveries released");
        let step = Step {
            to: IncidentState::Notifying,
            actor,
            reason: &reason,
            detail: serde_json::json!({ "draft_id": draft.as_str(), "released": released, "superseded": superseded }),
        };
        record_transition_in(&mut tx, incident, Some(from), &step, now).await?;
        tx.commit().await.doing("committing a release")?;
        Ok(released)
    }

    async fn enqueue(&self, deliveries: &[NewDelivery]) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let now = fmt_ts(Utc::now());
        let mut inserted = 0;
        for d in deliveries {
            inserted += insert_delivery_in(&mut tx, d, &now).await?;
        }
        tx.commit().await.doing("committing queued deliveries")?;
        Ok(inserted)
    }

    async fn claim_for_provider(&self, claim: &ProviderClaim<'_>) -> Result<Claimed, StoreError> {
        outbox::claim_for_provider(self, claim).await
    }

    async fn record_attempts(
        &self,
        records: &[AttemptRecord],
        health: &[HealthUpdate],
    ) -> Result<Vec<bool>, StoreError> {
        outbox::record_attempts(self, records, health).await
    }

    async fn release_claims(&self, deliveries: &[Delivery]) -> Result<u64, StoreError> {
        outbox::release_claims(self, deliveries).await
    }

    async fn provider_health(&self) -> Result<Vec<ProviderHealth>, StoreError> {
        outbox::provider_health(&self.pool).await
    }

    async fn delivery_for_receipt(&self, key: &ReceiptKey, providers: &[&str]) -> Result<Option<Delivery>, StoreError> {
        outbox::delivery_for_receipt(&self.pool, key, providers).await
    }

    async fn record_receipt(
        &self,
        delivery: &Delivery,
        status: ReceiptStatus,
        detail: &str,
        followup: &Followup,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        outbox::record_receipt(self, delivery, status, detail, followup, at).await
    }

    async fn receipts_overdue(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        outbox::receipts_overdue(&self.pool, now, limit).await
    }

    async fn version_channels(&self, draft: &DraftId, merchant: &MerchantId) -> Result<Vec<Channel>, StoreError> {
        outbox::version_channels(&self.pool, draft, merchant).await
    }

    async fn dead_letters(
        &self,
        filter: &DeliveryFilter,
        after: Option<&DeliveryId>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        outbox::dead_letters(&self.pool, filter, after, limit).await
    }

    async fn redrive(&self, filter: &DeliveryFilter, actor: &Actor, now: DateTime<Utc>) -> Result<u64, StoreError> {
        outbox::redrive(self, filter, actor, now).await
    }

    async fn delivery_events(&self, delivery: &DeliveryId) -> Result<Vec<DeliveryEvent>, StoreError> {
        outbox::delivery_events(&self.pool, delivery).await
    }

    async fn delivery(&self, id: &DeliveryId) -> Result<Option<Delivery>, StoreError> {
        outbox::delivery(&self.pool, id).await
    }

    async fn deliveries_page(
        &self,
        incident: &IncidentId,
        after: Option<&DeliveryId>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        sqlx::query(trusted(format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE incident_id = $1 AND ($2 IS NULL OR id > $2)
             ORDER BY id LIMIT $3"
        )))
        .bind(incident.as_str())
        .bind(after.map(|a| a.as_str()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .doing("listing a page of deliveries")?
        .iter()
        .map(delivery_from)
        .collect()
    }

    async fn deliveries(&self, incident: &IncidentId) -> Result<Vec<Delivery>, StoreError> {
        sqlx::query(trusted(format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE incident_id = $1 ORDER BY merchant_id, created_at"
        )))
        .bind(incident.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("listing deliveries")?
        .iter()
        .map(delivery_from)
        .collect()
    }

    async fn delivery_tally(&self, incident: &IncidentId) -> Result<Vec<ChannelTally>, StoreError> {
        let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT channel,
                    SUM(CASE WHEN status IN ('accepted', 'delivered') THEN 1 ELSE 0 END),
                    SUM(CASE WHEN status = 'delivered' THEN 1 ELSE 0 END),
                    SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END),
                    SUM(CASE WHEN status = 'dead' THEN 1 ELSE 0 END),
                    SUM(CASE WHEN status IN ('pending', 'sending') THEN 1 ELSE 0 END)
             FROM deliveries WHERE incident_id = $1 GROUP BY channel ORDER BY channel",
        )
        .bind(incident.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("counting deliveries")?;
        Ok(rows
            .into_iter()
            .map(|(channel, sent, delivered, failed, dead, pending)| ChannelTally {
                channel,
                sent,
                delivered,
                failed,
                dead,
                pending,
            })
            .collect())
    }

    async fn delivery_counts(&self) -> Result<Vec<DeliveryCount>, StoreError> {
        let rows: Vec<(String, Option<String>, String, i64)> = sqlx::query_as(
            "SELECT channel, provider, status, COUNT(*) FROM deliveries
             GROUP BY channel, provider, status ORDER BY channel, provider, status",
        )
        .fetch_all(&self.pool)
        .await
        .doing("counting deliveries by channel, provider and status")?;
        Ok(rows
            .into_iter()
            .map(|(channel, provider, status, count)| DeliveryCount {
                channel,
                provider,
                status,
                count,
            })
            .collect())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .doing("reaching the database")?;
        Ok(())
    }

    async fn open_deliveries(&self, incident: Option<&IncidentId>) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT (SELECT COUNT(*) FROM deliveries WHERE status = 'pending' AND ($1 IS NULL OR +incident_id = $1))
                  + (SELECT COUNT(*) FROM deliveries WHERE status = 'sending' AND ($1 IS NULL OR +incident_id = $1))",
        )
        .bind(incident.map(|i| i.as_str()))
        .fetch_one(&self.pool)
        .await
        .doing("counting open deliveries")?;
        Ok(count as u64)
    }

    async fn awaiting_receipts(&self, incident: &IncidentId) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE incident_id = $1 AND status = 'accepted' AND receipt_due_at IS NOT NULL",
        )
        .bind(incident.as_str())
        .fetch_one(&self.pool)
        .await
        .doing("counting deliveries waiting for receipts")?;
        Ok(count as u64)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let next: Option<String> = sqlx::query_scalar(
            "SELECT MIN(at) FROM (
                 SELECT MIN(next_attempt_at) AS at FROM deliveries WHERE status = 'pending' AND channel = 'email'
                 UNION ALL SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending' AND channel = 'sms'
                 UNION ALL SELECT MIN(next_attempt_at) FROM deliveries WHERE status = 'pending' AND channel = 'push'
                 UNION ALL SELECT MIN(lease_until) FROM deliveries WHERE status = 'sending')",
        )
        .fetch_one(&self.pool)
        .await
        .doing("finding the next due delivery")?;
        next.map(|n| parse_ts(&n).map_err(|e| corrupt("deliveries.next_attempt_at", e)))
            .transpose()
    }

    async fn mark_bulletin_pushed(&self, id: &BulletinId, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE bulletins SET status_pushed_at = $1 WHERE id = $2 AND status_pushed_at IS NULL")
            .bind(fmt_ts(at))
            .bind(id.as_str())
            .execute(&self.pool)
            .await
            .doing("recording a bulletin's push to the status page")?;
        Ok(())
    }

    async fn bulletins(&self, incident: &IncidentId) -> Result<Vec<Bulletin>, StoreError> {
        sqlx::query(
            "SELECT b.*, (SELECT COUNT(*) FROM bulletin_coverage c WHERE c.bulletin_id = b.id) AS covered
             FROM bulletins b WHERE incident_id = $1 ORDER BY version",
        )
        .bind(incident.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("listing bulletins")?
        .iter()
        .map(bulletin_from)
        .collect()
    }

    async fn insert_bulletin(&self, b: &Bulletin, covered: &[MerchantId], actor: &Actor) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO bulletins (id, incident_id, version, reason, summary, content_hash, published_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(b.id.as_str())
        .bind(b.incident_id.as_str())
        .bind(b.version)
        .bind(&b.reason)
        .bind(&b.summary)
        .bind(&b.content_hash)
        .bind(fmt_ts(b.published_at))
        .execute(&mut *tx)
        .await
        .doing("storing a bulletin")?;
        for m in covered {
            sqlx::query("INSERT INTO bulletin_coverage (bulletin_id, merchant_id) VALUES ($1, $2)")
                .bind(b.id.as_str())
                .bind(m.as_str())
                .execute(&mut *tx)
                .await
                .doing("recording bulletin coverage")?;
        }
        let entry = NewLedgerEntry {
            at: b.published_at,
            actor: actor.clone(),
            action: "bulletin.published".into(),
            incident_id: Some(b.incident_id.clone()),
            detail: serde_json::json!({ "bulletin_id": b.id.as_str(), "version": b.version, "reason": b.reason,
                                        "covered": covered.len(), "content_hash": b.content_hash }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a bulletin")
    }

    async fn bulletin_coverage(&self, bulletin: &BulletinId) -> Result<Vec<MerchantId>, StoreError> {
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT merchant_id FROM bulletin_coverage WHERE bulletin_id = $1 ORDER BY merchant_id")
                .bind(bulletin.as_str())
                .fetch_all(&self.pool)
                .await
                .doing("listing bulletin coverage")?;
        ids.iter()
            .map(|i| i.parse().map_err(|e| corrupt("bulletin_coverage.merchant_id", e)))
            .collect()
    }

    async fn insert_token(&self, t: &crate::auth::ApiToken, hash: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, hash, actor, role, created_at, created_by, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(t.id.as_str())
        .bind(hash)
        .bind(t.actor.as_str())
        .bind(t.role.as_str())
        .bind(fmt_ts(t.created_at))
        .bind(t.created_by.as_str())
        .bind(t.expires_at.map(fmt_ts))
        .execute(&mut *tx)
        .await
        .doing("storing a token")?;
        let entry = NewLedgerEntry {
            at: t.created_at,
            actor: t.created_by.clone(),
            action: "token.created".into(),
            incident_id: None,
            detail: serde_json::json!({ "token_id": t.id.as_str(), "actor": t.actor.as_str(), "role": t.role.as_str(),
                                        "expires_at": t.expires_at.map(fmt_ts) }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a token")
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<crate::auth::ApiToken>, StoreError> {
        sqlx::query("SELECT * FROM api_tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await
            .doing("looking up a token")?
            .as_ref()
            .map(token_from)
            .transpose()
    }

    async fn tokens(&self) -> Result<Vec<crate::auth::ApiToken>, StoreError> {
        sqlx::query("SELECT * FROM api_tokens ORDER BY created_at, id")
            .fetch_all(&self.pool)
            .await
            .doing("listing tokens")?
            .iter()
            .map(token_from)
            .collect()
    }

    async fn revoke_token(&self, id: &TokenId, by: &Actor, at: DateTime<Utc>) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let done =
            sqlx::query("UPDATE api_tokens SET revoked_at = $1, revoked_by = $2 WHERE id = $3 AND revoked_at IS NULL")
                .bind(fmt_ts(at))
                .bind(by.as_str())
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .doing("revoking a token")?;
        if done.rows_affected() == 0 {
            let exists: Option<String> = sqlx::query_scalar("SELECT id FROM api_tokens WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .doing("revoking a token")?;
            return match exists {
                Some(_) => Ok(()),
                None => Err(StoreError::NotFound {
                    what: "token",
                    id: id.to_string(),
                }),
            };
        }
        let entry = NewLedgerEntry {
            at,
            actor: by.clone(),
            action: "token.revoked".into(),
            incident_id: None,
            detail: serde_json::json!({ "token_id": id.as_str() }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a token revocation")
    }

    async fn filings(&self, incident: &IncidentId) -> Result<Vec<Filing>, StoreError> {
        sqlx::query("SELECT * FROM filings WHERE incident_id = $1 ORDER BY created_at, regulator, stage")
            .bind(incident.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing filings")?
            .iter()
            .map(filing_from)
            .collect()
    }

    async fn filing(&self, id: &FilingId) -> Result<Option<Filing>, StoreError> {
        sqlx::query("SELECT * FROM filings WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .doing("reading a filing")?
            .as_ref()
            .map(filing_from)
            .transpose()
    }

    async fn claim_filing(&self, id: &FilingId, now: DateTime<Utc>, until: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE filings SET claimed_until = $1
             WHERE id = $2 AND submitted_at IS NULL AND approved_at IS NOT NULL
               AND (claimed_until IS NULL OR claimed_until <= $3)",
        )
        .bind(fmt_ts(until))
        .bind(id.as_str())
        .bind(fmt_ts(now))
        .execute(&self.pool)
        .await
        .doing("claiming a filing for submission")?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_filing(&self, f: &Filing, actor: &Actor) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO filings (id, incident_id, regulator, stage, content, content_hash, deadline_at, created_at,
                                  transport, authors, written)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(f.id.as_str())
        .bind(f.incident_id.as_str())
        .bind(&f.regulator)
        .bind(&f.stage)
        .bind(to_json(&f.content))
        .bind(&f.content_hash)
        .bind(f.deadline_at.map(fmt_ts))
        .bind(fmt_ts(f.created_at))
        .bind(&f.transport)
        .bind(to_json(&f.authors))
        .bind(to_json(&f.written))
        .execute(&mut *tx)
        .await
        .doing("storing a filing")?;
        let entry = NewLedgerEntry {
            at: f.created_at,
            actor: actor.clone(),
            action: "filing.drafted".into(),
            incident_id: Some(f.incident_id.clone()),
            detail: serde_json::json!({ "filing_id": f.id.as_str(), "regulator": f.regulator, "stage": f.stage,
                                        "deadline_at": f.deadline_at.map(fmt_ts), "content_hash": f.content_hash,
                                        "missing": f.missing().len() }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing")
    }

    async fn revise_filing(&self, f: &Filing, expected_hash: &str, actor: &Actor, why: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let incident: Option<String> = sqlx::query_scalar(
            "UPDATE filings SET content = $1, content_hash = $2, deadline_at = $3, authors = $4, written = $5
             WHERE id = $6 AND content_hash = $7 AND approved_at IS NULL AND submitted_at IS NULL
             RETURNING incident_id",
        )
        .bind(to_json(&f.content))
        .bind(&f.content_hash)
        .bind(f.deadline_at.map(fmt_ts))
        .bind(to_json(&f.authors))
        .bind(to_json(&f.written))
        .bind(f.id.as_str())
        .bind(expected_hash)
        .fetch_optional(&mut *tx)
        .await
        .doing("revising a filing")?;
        let incident = filing_changed(incident, &f.id, "it was approved, submitted or changed meanwhile")?;
        let entry = NewLedgerEntry {
            at: Utc::now(),
            actor: actor.clone(),
            action: "filing.revised".into(),
            incident_id: Some(incident),
            detail: serde_json::json!({ "filing_id": f.id.as_str(), "why": why, "content_hash": f.content_hash,
                                        "previous_hash": expected_hash, "missing": f.missing().len() }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing revision")
    }

    async fn approve_filing(
        &self,
        id: &FilingId,
        content_hash: &str,
        approver: &Actor,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let incident: Option<String> = sqlx::query_scalar(
            "UPDATE filings SET approved_by = $1, approved_at = $2
             WHERE id = $3 AND content_hash = $4 AND approved_at IS NULL AND submitted_at IS NULL
             RETURNING incident_id",
        )
        .bind(approver.as_str())
        .bind(fmt_ts(at))
        .bind(id.as_str())
        .bind(content_hash)
        .fetch_optional(&mut *tx)
        .await
        .doing("approving a filing")?;
        let incident = filing_changed(incident, id, "it was approved, submitted or changed meanwhile")?;
        let entry = NewLedgerEntry {
            at,
            actor: approver.clone(),
            action: "filing.approved".into(),
            incident_id: Some(incident),
            detail: serde_json::json!({ "filing_id": id.as_str(), "content_hash": content_hash }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing approval")
    }

    async fn record_filing_attempt(&self, a: &FilingSubmission, outcome: &FilingOutcome) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let (kind, action, location, reference, ack, error) = match outcome {
            FilingOutcome::Sent {
                location,
                reference,
                acknowledgement,
            } => (
                "sent",
                "filing.submitted",
                Some(location.as_str()),
                reference.as_deref(),
                acknowledgement.as_deref(),
                None,
            ),
            FilingOutcome::Document { location } => (
                "document",
                "filing.document_produced",
                Some(location.as_str()),
                None,
                None,
                None,
            ),
            FilingOutcome::Failed { error } => (
                "failed",
                "filing.submission_failed",
                None,
                None,
                None,
                Some(error.as_str()),
            ),
        };
        let incident: Option<String> = sqlx::query_scalar(
            "UPDATE filings SET
                 submitted_at = CASE WHEN $7 = 'sent' THEN $1 ELSE submitted_at END,
                 document_at = CASE WHEN $7 = 'document' THEN $1 ELSE document_at END,
                 location = COALESCE($2, location),
                 reference_number = COALESCE($3, reference_number),
                 acknowledged_at = CASE WHEN $7 = 'sent' AND ($3 IS NOT NULL OR $4 IS NOT NULL) THEN $1
                                        ELSE acknowledged_at END,
                 acknowledgement = COALESCE($4, acknowledgement),
                 last_error = $5,
                 claimed_until = NULL
             WHERE id = $6 AND submitted_at IS NULL RETURNING incident_id",
        )
        .bind(fmt_ts(a.at))
        .bind(location)
        .bind(reference)
        .bind(ack)
        .bind(error)
        .bind(a.filing_id.as_str())
        .bind(kind)
        .fetch_optional(&mut *tx)
        .await
        .doing("recording a filing submission")?;
        let incident = filing_changed(incident, &a.filing_id, "it was already submitted")?;
        insert_filing_submission(&mut tx, a).await?;
        let entry = NewLedgerEntry {
            at: a.at,
            actor: a.actor.clone(),
            action: action.into(),
            incident_id: Some(incident),
            detail: serde_json::json!({ "filing_id": a.filing_id.as_str(), "method": a.method, "target": a.target,
                                        "outcome": a.outcome, "detail": a.detail }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing submission")
    }

    async fn record_filing_reference(
        &self,
        id: &FilingId,
        reference: &str,
        filed_at: DateTime<Utc>,
        actor: &Actor,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let incident: Option<String> = sqlx::query_scalar(
            "UPDATE filings SET submitted_at = $1, reference_number = $2, acknowledged_at = $3, claimed_until = NULL,
                    last_error = NULL
             WHERE id = $4 AND approved_at IS NOT NULL AND submitted_at IS NULL RETURNING incident_id",
        )
        .bind(fmt_ts(filed_at))
        .bind(reference)
        .bind(fmt_ts(at))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .doing("recording a filing's reference number")?;
        let incident = filing_changed(incident, id, "it is not approved, or was already submitted")?;
        let row = FilingSubmission {
            filing_id: id.clone(),
            at,
            actor: actor.clone(),
            method: "reference".into(),
            target: String::new(),
            outcome: "recorded".into(),
            detail: format!("filed at {}; reference {reference}", fmt_ts(filed_at)),
        };
        insert_filing_submission(&mut tx, &row).await?;
        let entry = NewLedgerEntry {
            at,
            actor: actor.clone(),
            action: "filing.reference_recorded".into(),
            incident_id: Some(incident),
            detail: serde_json::json!({ "filing_id": id.as_str(), "reference": reference, "filed_at": fmt_ts(filed_at) }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing's reference number")
    }

    async fn acknowledge_filing(
        &self,
        id: &FilingId,
        reference: Option<&str>,
        text: &str,
        actor: &Actor,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let incident: Option<String> = sqlx::query_scalar(
            "UPDATE filings SET acknowledged_at = $1, acknowledgement = $2,
                    reference_number = COALESCE($3, reference_number)
             WHERE id = $4 AND submitted_at IS NOT NULL RETURNING incident_id",
        )
        .bind(fmt_ts(at))
        .bind(text)
        .bind(reference)
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .doing("recording a filing's acknowledgement")?;
        let incident = filing_changed(incident, id, "it has not been submitted")?;
        let row = FilingSubmission {
            filing_id: id.clone(),
            at,
            actor: actor.clone(),
            method: "acknowledgement".into(),
            target: String::new(),
            outcome: "recorded".into(),
            detail: match reference {
                Some(r) => format!("reference {r}: {text}"),
                None => text.to_owned(),
            },
        };
        insert_filing_submission(&mut tx, &row).await?;
        let entry = NewLedgerEntry {
            at,
            actor: actor.clone(),
            action: "filing.acknowledged".into(),
            incident_id: Some(incident),
            detail: serde_json::json!({ "filing_id": id.as_str(), "reference": reference, "text": text }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing's acknowledgement")
    }

    async fn filing_submissions(&self, id: &FilingId) -> Result<Vec<FilingSubmission>, StoreError> {
        sqlx::query("SELECT * FROM filing_submissions WHERE filing_id = $1 ORDER BY seq")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing a filing's submissions")?
            .iter()
            .map(filing_submission_from)
            .collect()
    }

    async fn checkpoint(&self) -> Result<(), StoreError> {
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&self.pool)
            .await
            .doing("checkpointing the write-ahead log")?;
        Ok(())
    }

    async fn append_ledger(&self, entry: &NewLedgerEntry) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        append_ledger_in(&mut tx, entry).await?;
        tx.commit().await.doing("committing a ledger entry")
    }

    async fn ledger_entries(&self, incident: Option<&IncidentId>) -> Result<Vec<LedgerEntry>, StoreError> {
        sqlx::query("SELECT * FROM ledger WHERE ($1 IS NULL OR incident_id = $1) ORDER BY seq")
            .bind(incident.map(|i| i.as_str()))
            .fetch_all(&self.pool)
            .await
            .doing("reading the ledger")?
            .iter()
            .map(ledger_from)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration as ChronoDuration;

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteStore::open(dir.path()).await.expect("open");
        (dir, store)
    }

    fn event(external_id: &str, key: Option<&str>) -> SecurityEvent {
        SecurityEvent {
            source: "siem".into(),
            external_id: external_id.into(),
            kind: IncidentKind::Leak,
            severity: Severity::High,
            title: "t".into(),
            description: None,
            detected_at: Utc::now(),
            occurred_at: None,
            correlation_key: key.map(str::to_owned),
            categories: vec![],
            merchant_ids: vec![],
            attributes: serde_json::json!({}),
        }
    }

    fn merchant(id: &str, region: &str, kind: MerchantKind, holdings: &[&str], people: People) -> Merchant {
        Merchant {
            id: id.parse().expect("id"),
            name: format!("Shop {id}"),
            kind,
            locale: Locale::ZhCn,
            region: region.into(),
            email: Some(format!("{id}@example.com").parse().expect("email")),
            phone: None,
            push_token: None,
            postal_address: None,
            holdings: holdings.iter().map(|h| h.parse().expect("category")).collect(),
            created_at: Some(crate::time::parse_ts("2025-06-01T00:00:00Z").expect("time")),
            last_active_at: None,
            marketing_opt_out: false,
            people,
        }
    }

    fn facts() -> IncidentFacts {
        serde_json::from_str(include_str!("../../config/demo/incident.json")).expect("facts")
    }

    async fn to_state(s: &SqliteStore, incident: &IncidentId, to: IncidentState) {
        let from = s.incident(incident.as_str()).await.expect("get").expect("exists").state;
        let alice: Actor = "alice".parse().expect("actor");
        let step = Step {
            to,
            actor: &alice,
            reason: "test",
            detail: serde_json::json!({}),
        };
        let changes = IncidentChanges {
            facts: (to == IncidentState::Confirmed).then(facts),
        };
        s.transition(incident, from, step, changes).await.expect("transition");
    }

    /// Scopes `rule` with one class per distinct holdings; returns the natural persons counted.
    async fn scope_with(s: &SqliteStore, incident: &IncidentId, rule: &ScopeRule) -> u64 {
        let mut w = s.begin_scope(incident).await.expect("begin");
        let holdings = w.holdings(&facts().categories).await.expect("holdings");
        let classes: Vec<ScopeClass> = holdings
            .iter()
            .enumerate()
            .map(|(i, (h, n))| ScopeClass {
                class_no: i as i64 + 1,
                exposed: serde_json::from_str(h).expect("holdings"),
                risk: RiskLevel::High,
                risk_reasons: vec![],
                notice_required: true,
                notice_reason: "required".into(),
                merchants: *n,
            })
            .collect();
        let map: Vec<(String, i64)> = holdings
            .iter()
            .zip(&classes)
            .map(|((h, _), c)| (h.clone(), c.class_no))
            .collect();
        let all: Vec<i64> = classes.iter().map(|c| c.class_no).collect();
        let totals = w
            .insert(&ScopeInsert {
                rule,
                holdings_class: &map,
                classes: &classes,
                channel_order: &[Channel::Email, Channel::Sms],
                person_classes: PersonClasses {
                    representative: vec![],
                    merchant: all.clone(),
                    contacts: all.clone(),
                    sub_accounts: all,
                },
            })
            .await
            .expect("insert");
        let alice: Actor = "alice".parse().expect("actor");
        let persons = totals.natural_persons;
        let suggestion = crate::scope::suggest_grade(persons, &[]);
        let from = s.incident(incident.as_str()).await.expect("get").expect("exists").state;
        w.finish(
            from,
            Step {
                to: IncidentState::Scoped,
                actor: &alice,
                reason: "test",
                detail: serde_json::json!({}),
            },
            ScopeResult {
                rule,
                basis: ScopeBasis::of(&facts()),
                suggestion: &suggestion,
                facts: None,
            },
        )
        .await
        .expect("finish");
        persons
    }

    fn inputs(version: i64) -> DraftInputs {
        DraftInputs {
            version,
            facts: facts(),
            settings: crate::draft::NoticeSettings {
                operator_name: "Op".into(),
                platform: "P".into(),
                short_name_en: "Op".into(),
                short_name_zh: "Op".into(),
                officer_en: "o".into(),
                officer_zh: "o".into(),
                contact_email: "p@example.com".into(),
                contact_phone: "1".into(),
                public_base_url: "http://x".into(),
                notice_base_url: "http://x".into(),
            },
            template_set: "t".into(),
            classes: vec![],
            update: None,
            reference: "INC-1".into(),
            detected_at: Utc::now(),
            drafted_at: Utc::now(),
            labels: Default::default(),
        }
    }

    async fn draft_version(s: &SqliteStore, incident: &IncidentId, version: i64) -> Draft {
        let from = s.incident(incident.as_str()).await.expect("get").expect("exists").state;
        let mut draft = crate::draft::new_draft(
            incident,
            version,
            format!("h{version}"),
            1,
            &"alice".parse().expect("a"),
        );
        draft.notice_count = 1;
        s.create_draft(NewDraft {
            draft: &draft,
            inputs: &inputs(version),
            template_sources: "{}",
            variants: &[],
            from,
        })
        .await
        .expect("draft");
        draft
    }

    /// An incident with one approved draft for merchant m-1 (without an address, so nothing is
    /// queued: the tests queue their own deliveries), ready for deliveries.
    async fn ready(s: &SqliteStore) -> (IncidentId, DraftId, NoticeId) {
        ready_with(s, false).await
    }

    async fn ready_with(s: &SqliteStore, with_email: bool) -> (IncidentId, DraftId, NoticeId) {
        let alice: Actor = "alice".parse().expect("actor");
        let mut m = merchant(
            "m-1",
            "CN-ZJ",
            MerchantKind::Enterprise,
            &["account_credentials"],
            People::default(),
        );
        if !with_email {
            m.email = None;
        }
        s.upsert_merchants(&[m]).await.expect("merchant");
        let IngestOutcome::Opened { incident_id, .. } = s
            .ingest_event(&event("e-1", None), "INC", &alice)
            .await
            .expect("ingest")
        else {
            panic!("expected a new incident")
        };
        to_state(s, &incident_id, IncidentState::Confirmed).await;
        let rule = ScopeRule {
            regions: vec!["CN".into()],
            ..Default::default()
        };
        scope_with(s, &incident_id, &rule).await;
        let draft = draft_version(s, &incident_id, 1).await;
        s.approve_draft(&draft.id, &"bob".parse().expect("actor"), Utc::now())
            .await
            .expect("approve");
        let notice = s
            .notice_for(&draft.id, &"m-1".parse().expect("id"))
            .await
            .expect("lookup")
            .expect("notice");
        (incident_id, draft.id, notice.id)
    }

    /// Claims due rows of every channel without limits, as a worker with one provider would.
    async fn claim_due(
        s: &SqliteStore,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        want: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut all = Vec::new();
        for channel in Channel::ALL.iter().copied() {
            let limits = LimitSettings::default();
            let claim = ProviderClaim {
                channel,
                provider: channel.as_str(),
                want,
                limits: &limits,
                now,
                lease_until,
            };
            all.extend(s.claim_for_provider(&claim).await?.deliveries);
        }
        Ok(all)
    }

    #[tokio::test]
    async fn scope_rules_select_in_the_database_and_people_are_counted_once() {
        let (_dir, s) = store().await;
        let people = |contacts: &[&str]| People {
            representative: None,
            contacts: contacts.iter().map(|c| c.to_string()).collect(),
            sub_accounts: vec![],
        };
        let mut late = merchant(
            "m-4",
            "CN-GD",
            MerchantKind::NaturalPerson,
            &["phone_number"],
            people(&[]),
        );
        late.created_at = Some(crate::time::parse_ts("2026-06-01T00:00:00Z").expect("time"));
        late.last_active_at = late.created_at;
        s.upsert_merchants(&[
            merchant(
                "m-1",
                "CN-ZJ",
                MerchantKind::Enterprise,
                &["contact_persons"],
                people(&["p1", "p2"]),
            ),
            merchant(
                "m-2",
                "CN-ZJ",
                MerchantKind::IndividualBusiness,
                &["account_credentials", "contact_persons"],
                people(&["p2"]),
            ),
            merchant(
                "m-3",
                "CNX",
                MerchantKind::NaturalPerson,
                &["phone_number"],
                people(&[]),
            ),
            late,
            merchant("m-5", "SG", MerchantKind::NaturalPerson, &["media"], people(&[])),
        ])
        .await
        .expect("merchants");
        let alice: Actor = "alice".parse().expect("actor");
        let IngestOutcome::Opened { incident_id, .. } = s
            .ingest_event(&event("e-1", None), "INC", &alice)
            .await
            .expect("ingest")
        else {
            panic!("expected a new incident")
        };
        to_state(&s, &incident_id, IncidentState::Confirmed).await;
        async fn ids(s: &SqliteStore, incident_id: &IncidentId, rule: ScopeRule) -> Vec<String> {
            scope_with(s, incident_id, &rule).await;
            let mut ids: Vec<String> = s
                .affected(incident_id)
                .await
                .expect("affected")
                .iter()
                .map(|a| a.merchant_id.to_string())
                .collect();
            ids.sort();
            ids
        }
        // "CN" means China and its provinces, not any code that starts with the letters.
        let cn = ScopeRule {
            regions: vec!["CN".into()],
            ..Default::default()
        };
        assert_eq!(ids(&s, &incident_id, cn.clone()).await, ["m-1", "m-2", "m-4"]);
        let t = |x: &str| Some(crate::time::parse_ts(x).expect("time"));
        let window = ScopeRule {
            created_after: t("2026-01-01T00:00:00Z"),
            ..cn.clone()
        };
        assert_eq!(ids(&s, &incident_id, window).await, ["m-4"]);
        let active = ScopeRule {
            active_before: t("2027-01-01T00:00:00Z"),
            regions: vec!["CN".into()],
            ..Default::default()
        };
        assert_eq!(
            ids(&s, &incident_id, active).await,
            ["m-4"],
            "merchants without an activity date are outside an activity window"
        );
        let either = ScopeRule {
            any_of: vec![
                ScopeRule {
                    merchant_ids: vec!["m-3".parse().expect("id")],
                    ..Default::default()
                },
                ScopeRule {
                    any_categories: vec!["account_credentials".parse().expect("c")],
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert_eq!(ids(&s, &incident_id, either).await, ["m-2", "m-3"]);
        let except = ScopeRule {
            except: vec![ScopeRule {
                regions: vec!["CN-ZJ".into()],
                ..Default::default()
            }],
            ..cn.clone()
        };
        assert_eq!(ids(&s, &incident_id, except).await, ["m-4"]);
        // m-1 enterprise: its contacts p1, p2; m-2: itself and p2 again; m-4: itself. p2 counts once.
        assert_eq!(scope_with(&s, &incident_id, &cn).await, 4);
        let unknown = s
            .unknown_merchants(&["m-1".parse().expect("id"), "zz".parse().expect("id")])
            .await
            .expect("ids");
        assert_eq!(unknown, vec!["zz".parse::<MerchantId>().expect("id")]);
    }

    #[tokio::test]
    async fn a_draft_holds_its_deliveries_until_released_and_an_update_supersedes_what_was_not_sent() {
        let (_dir, s) = store().await;
        let (incident, v1, _) = ready_with(&s, true).await;
        let held = s.deliveries(&incident).await.expect("deliveries");
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].status, DeliveryStatus::Held);
        assert!(
            claim_due(&s, Utc::now(), Utc::now(), 10)
                .await
                .expect("claim")
                .is_empty(),
            "held rows are not due"
        );
        let bob: Actor = "bob".parse().expect("actor");
        assert_eq!(
            s.release_draft(&incident, &v1, IncidentState::Approved, &bob)
                .await
                .expect("release"),
            1
        );
        // An update drafted and released before v1 went out supersedes v1's pending delivery.
        let v2 = draft_version(&s, &incident, 2).await;
        s.approve_draft(&v2.id, &bob, Utc::now()).await.expect("approve");
        assert_eq!(
            s.release_draft(&incident, &v2.id, IncidentState::Approved, &bob)
                .await
                .expect("release"),
            1
        );
        let rows = s.deliveries(&incident).await.expect("deliveries");
        let status = |d: &DraftId| rows.iter().find(|r| &r.draft_id == d).map(|r| r.status);
        assert_eq!(status(&v1), Some(DeliveryStatus::Superseded));
        assert_eq!(status(&v2.id), Some(DeliveryStatus::Pending));
        // A notice is found by its id, by merchant and by its link token, whose secret part is checked.
        let n = s
            .notice_for(&v2.id, &"m-1".parse().expect("id"))
            .await
            .expect("get")
            .expect("notice");
        assert_eq!(
            s.notice_record(&n.id).await.expect("get").map(|r| r.merchant_id),
            Some(n.merchant_id.clone())
        );
        assert_eq!(
            s.notice_by_token(&n.link_token)
                .await
                .expect("token")
                .map(|r| r.draft_id),
            Some(v2.id.clone())
        );
        let forged = format!("{}0000000000", &n.link_token[..8]);
        assert!(s.notice_by_token(&forged).await.expect("token").is_none());
    }

    fn delivery(
        incident: &IncidentId,
        draft: &DraftId,
        notice: &NoticeId,
        channel: Channel,
        position: i64,
    ) -> NewDelivery {
        NewDelivery {
            incident_id: incident.clone(),
            draft_id: draft.clone(),
            notice_id: notice.clone(),
            merchant_id: "m-1".parse().expect("id"),
            channel,
            address: "a@example.com".into(),
            plan_position: position,
        }
    }

    #[tokio::test]
    async fn provider_limits_are_shared_by_every_claimer_of_the_store() {
        let (_dir, s) = store().await;
        let (incident, draft, notice) = ready(&s).await;
        let many: Vec<NewDelivery> = (0..10)
            .map(|i| NewDelivery {
                merchant_id: format!("m-{i}").parse().expect("id"),
                ..delivery(&incident, &draft, &notice, Channel::Sms, 0)
            })
            .collect();
        assert_eq!(s.enqueue(&many).await.expect("enqueue"), 10);
        let now = Utc::now();
        let claim = |provider: &'static str, want: u32, limits: &LimitSettings, at: DateTime<Utc>| {
            let limits = limits.clone();
            let s = &s;
            async move {
                s.claim_for_provider(&ProviderClaim {
                    channel: Channel::Sms,
                    provider,
                    want,
                    limits: &limits,
                    now: at,
                    lease_until: at + ChronoDuration::seconds(60),
                })
                .await
                .expect("claim")
            }
        };
        // A sliding window of 4: two workers asking for 3 each get 4 between them.
        let window = LimitSettings {
            window_seconds: 3600,
            window_max: 4,
            ..Default::default()
        };
        let first = claim("gw", 3, &window, now).await;
        let second = claim("gw", 3, &window, now).await;
        assert_eq!((first.deliveries.len(), second.deliveries.len()), (3, 1));
        assert!(
            second.limited_until.is_some_and(|t| t > now),
            "says when the window frees"
        );
        assert!(claim("gw", 3, &window, now).await.deliveries.is_empty());
        // A token bucket of 2 per second: 2 now, none until it refills, 2 a second later.
        let bucket = LimitSettings {
            rate_per_second: 2.0,
            burst: 2,
            ..Default::default()
        };
        assert_eq!(claim("bucket", 5, &bucket, now).await.deliveries.len(), 2);
        let empty = claim("bucket", 5, &bucket, now).await;
        assert!(empty.deliveries.is_empty());
        assert!(
            empty
                .limited_until
                .is_some_and(|t| t > now && t <= now + ChronoDuration::seconds(1))
        );
        let later = now + ChronoDuration::seconds(1);
        assert_eq!(claim("bucket", 5, &bucket, later).await.deliveries.len(), 2);
        // One send in flight at a time across every worker, until its outcome is stored.
        let one = LimitSettings {
            max_in_flight: 1,
            ..Default::default()
        };
        let at = now + ChronoDuration::seconds(2);
        assert_eq!(claim("single", 5, &one, at).await.deliveries.len(), 1);
        assert!(claim("single", 5, &one, at).await.deliveries.is_empty());
    }

    #[tokio::test]
    async fn events_are_idempotent_and_correlate_into_one_open_incident() {
        let (_dir, s) = store().await;
        let actor: Actor = "siem".parse().expect("actor");
        let first = s
            .ingest_event(&event("a", Some("k")), "INC", &actor)
            .await
            .expect("ingest");
        let IngestOutcome::Opened { reference, .. } = &first else {
            panic!("{first:?}")
        };
        assert!(reference.starts_with("INC-") && reference.ends_with("-0001"));
        assert!(matches!(
            s.ingest_event(&event("a", Some("k")), "INC", &actor).await,
            Ok(IngestOutcome::Duplicate { .. })
        ));
        assert!(matches!(
            s.ingest_event(&event("b", Some("k")), "INC", &actor).await,
            Ok(IngestOutcome::Joined { .. })
        ));
        let IngestOutcome::Opened { reference, .. } =
            s.ingest_event(&event("c", None), "INC", &actor).await.expect("ingest")
        else {
            panic!("a new key opens a new incident")
        };
        assert!(reference.ends_with("-0002"));
    }

    #[tokio::test]
    async fn a_stale_state_loses_the_compare_and_set() {
        let (_dir, s) = store().await;
        let alice: Actor = "alice".parse().expect("actor");
        let IngestOutcome::Opened { incident_id, .. } =
            s.ingest_event(&event("a", None), "INC", &alice).await.expect("ingest")
        else {
            panic!()
        };
        let step = || Step {
            to: IncidentState::Confirmed,
            actor: &alice,
            reason: "r",
            detail: serde_json::json!({}),
        };
        s.transition(&incident_id, IncidentState::Triage, step(), IncidentChanges::default())
            .await
            .expect("first wins");
        let err = s
            .transition(&incident_id, IncidentState::Triage, step(), IncidentChanges::default())
            .await;
        assert!(matches!(err, Err(StoreError::Conflict { .. })), "{err:?}");
        assert_eq!(
            s.transitions(&incident_id).await.expect("timeline").len(),
            2,
            "the loser recorded nothing"
        );
    }

    #[tokio::test]
    async fn queueing_is_idempotent_and_a_dead_workers_claim_is_taken_over_after_its_lease() {
        let (_dir, s) = store().await;
        let (incident, draft, notice) = ready(&s).await;
        let d = delivery(&incident, &draft, &notice, Channel::Email, 0);
        assert_eq!(s.enqueue(&[d.clone(), d.clone()]).await.expect("enqueue"), 1);
        assert_eq!(s.enqueue(std::slice::from_ref(&d)).await.expect("enqueue"), 0);

        let now = Utc::now();
        let claimed = claim_due(&s, now, now + ChronoDuration::seconds(60), 10)
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].attempts, 1);
        // Another worker finds nothing while the lease holds...
        assert!(
            claim_due(&s, now, now + ChronoDuration::seconds(60), 10)
                .await
                .expect("claim")
                .is_empty()
        );
        // ...and takes the row over once it has run out (the first worker died mid-send).
        let later = now + ChronoDuration::seconds(61);
        let retaken = claim_due(&s, later, later + ChronoDuration::seconds(60), 10)
            .await
            .expect("claim");
        assert_eq!((retaken.len(), retaken[0].attempts), (1, 2));
    }

    #[tokio::test]
    async fn a_final_failure_and_its_fallback_are_stored_together() {
        let (_dir, s) = store().await;
        let (incident, draft, notice) = ready(&s).await;
        s.enqueue(&[delivery(&incident, &draft, &notice, Channel::Email, 0)])
            .await
            .expect("enqueue");
        let now = Utc::now();
        let claimed = claim_due(&s, now, now + ChronoDuration::seconds(60), 10)
            .await
            .expect("claim");
        let next = delivery(&incident, &draft, &notice, Channel::Sms, 1);
        let failed = AttemptOutcome::Failed {
            error: "550".into(),
            kind: FailureKind::Rejected,
        };
        let record = AttemptRecord {
            delivery: claimed[0].clone(),
            provider: "email".into(),
            outcome: failed,
            followup: Followup::Fallback(next),
        };
        assert_eq!(s.record_attempts(&[record], &[]).await.expect("record"), [true]);
        let all = s.deliveries(&incident).await.expect("list");
        let states: Vec<(Channel, DeliveryStatus)> = all.iter().map(|d| (d.channel, d.status)).collect();
        assert_eq!(
            states,
            [
                (Channel::Email, DeliveryStatus::Failed),
                (Channel::Sms, DeliveryStatus::Pending)
            ]
        );
        assert_eq!(s.open_deliveries(Some(&incident)).await.expect("count"), 1);
    }

    #[tokio::test]
    async fn a_filing_is_approved_once_claimed_by_one_submitter_at_a_time_and_submitted_once() {
        let (_dir, s) = store().await;
        let (incident, _, _) = ready(&s).await;
        let alice: Actor = "alice".parse().expect("actor");
        let bob: Actor = "bob".parse().expect("actor");
        let now = Utc::now();
        let filing = Filing {
            id: FilingId::generate(),
            incident_id: incident.clone(),
            regulator: "cn-cac".into(),
            stage: "initial".into(),
            content: serde_json::json!({ "missing": [] }),
            content_hash: "h".into(),
            deadline_at: Some(now),
            created_at: now,
            submitted_at: None,
            transport: "email".into(),
            location: None,
            authors: vec![alice.clone()],
            written: Default::default(),
            approved_by: None,
            approved_at: None,
            document_at: None,
            reference_number: None,
            acknowledged_at: None,
            acknowledgement: None,
            last_error: None,
        };
        s.insert_filing(&filing, &alice).await.expect("insert");
        let lease = now + ChronoDuration::minutes(5);
        assert!(
            !s.claim_filing(&filing.id, now, lease).await.expect("claim"),
            "not approved yet"
        );
        assert!(
            s.approve_filing(&filing.id, "other", &bob, now).await.is_err(),
            "approval names the content it approves"
        );
        s.approve_filing(&filing.id, "h", &bob, now).await.expect("approve");
        let revised = Filing {
            content_hash: "h2".into(),
            ..filing.clone()
        };
        assert!(
            s.revise_filing(&revised, "h", &alice, "redraft").await.is_err(),
            "an approved filing is frozen"
        );
        assert!(s.claim_filing(&filing.id, now, lease).await.expect("claim"));
        assert!(
            !s.claim_filing(&filing.id, now, lease).await.expect("claim"),
            "claimed already"
        );
        let later = lease + ChronoDuration::seconds(1);
        assert!(
            s.claim_filing(&filing.id, later, later + ChronoDuration::minutes(5))
                .await
                .expect("claim"),
            "expired"
        );
        let attempt = |outcome: &str| FilingSubmission {
            filing_id: filing.id.clone(),
            at: later,
            actor: alice.clone(),
            method: "https".into(),
            target: "https://regulator.example/".into(),
            outcome: outcome.into(),
            detail: String::new(),
        };
        s.record_filing_attempt(&attempt("failed"), &FilingOutcome::Failed { error: "503".into() })
            .await
            .expect("failure recorded");
        let sent = FilingOutcome::Sent {
            location: "https://regulator.example/".into(),
            reference: Some("R-1".into()),
            acknowledgement: None,
        };
        s.record_filing_attempt(&attempt("sent"), &sent).await.expect("submit");
        assert!(
            s.record_filing_attempt(&attempt("sent"), &sent).await.is_err(),
            "submitted once"
        );
        let stored = s.filing(&filing.id).await.expect("read").expect("stored");
        assert_eq!(
            stored.state(),
            FilingState::Acknowledged,
            "the reply carried a reference"
        );
        assert_eq!(stored.reference_number.as_deref(), Some("R-1"));
        assert_eq!(stored.last_error, None);
        let rows = s.filing_submissions(&filing.id).await.expect("submissions");
        let outcomes: Vec<&str> = rows.iter().map(|r| r.outcome.as_str()).collect();
        assert_eq!(outcomes, ["failed", "sent"]);
        let far = later + ChronoDuration::hours(1);
        assert!(
            !s.claim_filing(&filing.id, far, far).await.expect("claim"),
            "a submitted filing is never claimed"
        );
    }

    #[tokio::test]
    async fn the_ledger_chains_and_refuses_updates_and_deletes() {
        let (_dir, s) = store().await;
        let _ = ready(&s).await;
        let entries = s.ledger_entries(None).await.expect("ledger");
        assert!(entries.len() >= 5);
        assert!(matches!(
            crate::ledger::verify_entries(&entries),
            crate::ledger::Verification::Intact { .. }
        ));
        let update = sqlx::query("UPDATE ledger SET actor = 'mallory' WHERE seq = 1")
            .execute(&s.pool)
            .await;
        assert!(update.is_err(), "the ledger must refuse updates");
        let delete = sqlx::query("DELETE FROM ledger WHERE seq = 1").execute(&s.pool).await;
        assert!(delete.is_err(), "the ledger must refuse deletes");
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;

    /// A database written by the first schema (notices rendered in full, one row per affected
    /// merchant with its own reasons) keeps everything when migrated, and can draft again.
    #[tokio::test]
    async fn a_database_of_the_first_schema_migrates_without_losing_anything() {
        let dir = tempfile::tempdir().expect("temp dir");
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("tocsin.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new().connect_with(options).await.expect("pool");
        MIGRATOR.run_to(20261130000001, &pool).await.expect("first schema");
        for sql in [
            "INSERT INTO merchants (id, name, kind, locale, region, email, phone, holdings, imported_at, updated_at)
             VALUES ('m-1', 'Shop', 'natural_person', 'en', 'SG', 'a@example.com', '+6590000000',
                     '[\"account_credentials\"]', '2026-11-30T08:00:00.000000Z', '2026-11-30T08:00:00.000000Z')",
            "INSERT INTO incidents (id, reference, state, title, kind, severity, detected_at, opened_at, updated_at)
             VALUES ('inc_00000000000000000000000000000001', 'INC-2026-0001', 'monitoring', 't', 'leak', 'high',
                     '2026-11-30T08:00:00.000000Z', '2026-11-30T08:00:00.000000Z', '2026-11-30T08:00:00.000000Z')",
            "INSERT INTO affected_merchants VALUES ('inc_00000000000000000000000000000001', 'm-1',
                     '[\"account_credentials\"]', 'high', '[\"credentials exposed\"]', 1, 'required', '[\"sms\",\"email\"]',
                     'en', 'reached', 'sms')",
            "INSERT INTO drafts (id, incident_id, version, state, content_hash, drafted_by, drafted_at)
             VALUES ('drf_00000000000000000000000000000001', 'inc_00000000000000000000000000000001', 1, 'approved', 'h',
                     'alice', '2026-11-30T08:00:00.000000Z')",
            "INSERT INTO notices VALUES ('ntc_00000000000000000000000000000001', 'drf_00000000000000000000000000000001',
                     'm-1', 'en', '{\"impact\":\"i\",\"measures\":\"m\",\"advice\":\"a\",\"remedies\":\"r\",\"contact\":\"c\"}',
                     'subject', 'text', '<p>html</p>', 'sms', 'title', 'body', 'nh')",
            "INSERT INTO deliveries (id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address,
                     plan_position, status, attempts, next_attempt_at, created_at, updated_at, sent_at)
             VALUES ('dlv_00000000000000000000000000000001', 'k', 'inc_00000000000000000000000000000001',
                     'drf_00000000000000000000000000000001', 'ntc_00000000000000000000000000000001', 'm-1', 'sms',
                     '+6590000000', 0, 'sent', 1, '2026-11-30T08:00:00.000000Z', '2026-11-30T08:00:00.000000Z',
                     '2026-11-30T08:00:00.000000Z', '2026-11-30T08:00:00.000000Z')",
            "INSERT INTO filings (id, incident_id, regulator, stage, content, content_hash, deadline_at, created_at,
                     submitted_at, transport, location)
             VALUES ('fil_00000000000000000000000000000001', 'inc_00000000000000000000000000000001', 'cn-cac',
                     'initial', '{\"items\":[]}', 'fh', '2026-11-30T12:00:00.000000Z', '2026-11-30T08:00:00.000000Z',
                     '2026-11-30T09:00:00.000000Z', 'file', '/data/filings/cn-cac-initial.json')",
            "INSERT INTO ledger (seq, at, actor, action, incident_id, detail, prev_hash, hash)
             VALUES (1, '2026-11-30T08:00:00.000000Z', 'alice', 'filing.drafted', 'inc_00000000000000000000000000000001',
                     '{\"filing_id\":\"fil_00000000000000000000000000000001\"}', '0', 'lh1')",
        ] {
            sqlx::query(sql).execute(&pool).await.expect(sql);
        }
        pool.close().await;
        let s = SqliteStore::open(dir.path()).await.expect("migrated");
        let incident: IncidentId = "inc_00000000000000000000000000000001".parse().expect("id");
        let affected = s.affected(&incident).await.expect("affected");
        assert_eq!(affected.len(), 1);
        assert_eq!(affected[0].risk_reasons, ["credentials exposed"]);
        assert_eq!(affected[0].channel_plan, [Channel::Sms, Channel::Email]);
        assert_eq!(affected[0].reachability, Reachability::Reached);
        let draft: DraftId = "drf_00000000000000000000000000000001".parse().expect("id");
        let notice = s
            .notice_record(&"ntc_00000000000000000000000000000001".parse().expect("id"))
            .await
            .expect("lookup")
            .expect("the first schema's notice is still there");
        assert_eq!(
            notice.legacy.as_ref().map(|l| l["sms_text"].clone()),
            Some("sms".into())
        );
        assert_eq!(s.notice_records(&draft, None, 10).await.expect("list").len(), 1);
        let deliveries = s.deliveries(&incident).await.expect("deliveries");
        assert_eq!(
            deliveries[0].content_hash.as_deref(),
            Some("nh"),
            "what was sent stays hashed"
        );
        // A new version finds the migrated scope: its groups, and the first channel's address.
        let groups = s.variant_groups(&incident).await.expect("groups");
        assert_eq!(groups.iter().map(|g| g.merchants).sum::<i64>(), 1);
        let first: Option<String> =
            sqlx::query_scalar("SELECT first_address FROM affected_merchants WHERE merchant_id = 'm-1'")
                .fetch_one(&s.pool)
                .await
                .expect("address");
        assert_eq!(first.as_deref(), Some("+6590000000"));
        // A filing of the first schema keeps its deadline and submission, and learns who
        // drafted it from the ledger (so that person cannot approve a revision of it).
        let filings = s.filings(&incident).await.expect("filings");
        assert_eq!(filings.len(), 1);
        assert_eq!(filings[0].authors, ["alice".parse::<Actor>().expect("actor")]);
        assert_eq!(filings[0].state(), FilingState::Submitted);
        assert!(filings[0].deadline_at.is_some());
    }
}
