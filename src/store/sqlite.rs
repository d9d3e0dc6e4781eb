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

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

pub struct SqliteStore {
    pool: SqlitePool,
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
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .doing("opening the SQLite database")?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .doing("starting a write transaction")
    }
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
        marketing_opt_out: row.try_get::<i64, _>("marketing_opt_out").doing("reading a merchant")? != 0,
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
        detected_at: ts_col(row, "detected_at")?,
        opened_at: ts_col(row, "opened_at")?,
        updated_at: ts_col(row, "updated_at")?,
    })
}

fn affected_from(row: &SqliteRow) -> Result<AffectedMerchant, StoreError> {
    Ok(AffectedMerchant {
        incident_id: col(row, "incident_id")?,
        merchant_id: col(row, "merchant_id")?,
        exposed: json_col(row, "exposed")?,
        risk: col(row, "risk")?,
        risk_reasons: json_col(row, "risk_reasons")?,
        notice_required: row.try_get::<i64, _>("notice_required").doing("reading a scope row")? != 0,
        notice_reason: row.try_get("notice_reason").doing("reading a scope row")?,
        channel_plan: json_col(row, "channel_plan")?,
        locale: col(row, "locale")?,
        reachability: col(row, "reachability")?,
        reached_channel: opt_col(row, "reached_channel")?,
    })
}

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
    })
}

fn notice_from(row: &SqliteRow) -> Result<Notice, StoreError> {
    let text = |name: &'static str| -> Result<String, StoreError> { row.try_get(name).doing("reading a notice") };
    Ok(Notice {
        id: col(row, "id")?,
        draft_id: col(row, "draft_id")?,
        merchant_id: col(row, "merchant_id")?,
        locale: col(row, "locale")?,
        sections: json_col(row, "sections")?,
        email_subject: text("email_subject")?,
        email_text: text("email_text")?,
        email_html: text("email_html")?,
        sms_text: text("sms_text")?,
        push_title: text("push_title")?,
        push_body: text("push_body")?,
        content_hash: text("content_hash")?,
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
        created_at: ts_col(row, "created_at")?,
        sent_at: opt_ts_col(row, "sent_at")?,
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
    })
}

fn filing_from(row: &SqliteRow) -> Result<Filing, StoreError> {
    let text = |name: &'static str| -> Result<String, StoreError> { row.try_get(name).doing("reading a filing") };
    Ok(Filing {
        id: col(row, "id")?,
        incident_id: col(row, "incident_id")?,
        regulator: text("regulator")?,
        stage: text("stage")?,
        content: json_col(row, "content")?,
        content_hash: text("content_hash")?,
        deadline_at: ts_col(row, "deadline_at")?,
        created_at: ts_col(row, "created_at")?,
        submitted_at: opt_ts_col(row, "submitted_at")?,
        transport: text("transport")?,
        location: row.try_get("location").doing("reading a filing")?,
    })
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
async fn append_ledger_in(conn: &mut SqliteConnection, e: &NewLedgerEntry) -> Result<(), StoreError> {
    let last: Option<(i64, String)> = sqlx::query_as("SELECT seq, hash FROM ledger ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut *conn)
        .await
        .doing("reading the ledger head")?;
    let (seq, prev) = last.map(|(s, h)| (s + 1, h)).unwrap_or((1, GENESIS.to_owned()));
    let at = fmt_ts(e.at);
    let incident = e.incident_id.as_ref().map(|i| i.as_str());
    let hash = chain_hash(seq, &at, e.actor.as_str(), &e.action, incident, &e.detail, &prev);
    sqlx::query(
        "INSERT INTO ledger (seq, at, actor, action, incident_id, detail, prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(seq)
    .bind(at)
    .bind(e.actor.as_str())
    .bind(&e.action)
    .bind(incident)
    .bind(to_json(&e.detail))
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

const DELIVERY_COLUMNS: &str = "id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address, \
     plan_position, status, attempts, next_attempt_at, last_error, error_class, provider_message_id, created_at, sent_at";

#[async_trait]
impl Store for SqliteStore {
    async fn upsert_merchants(&self, merchants: &[Merchant]) -> Result<UpsertCounts, StoreError> {
        let mut tx = self.begin().await?;
        let mut counts = UpsertCounts::default();
        let now = fmt_ts(Utc::now());
        for m in merchants {
            let existing = sqlx::query("SELECT * FROM merchants WHERE id = $1")
                .bind(m.id.as_str())
                .fetch_optional(&mut *tx)
                .await
                .doing("looking up a merchant")?;
            match existing {
                Some(row) if merchant_from(&row)? == *m => {
                    counts.unchanged += 1;
                    continue;
                }
                Some(_) => counts.updated += 1,
                None => counts.inserted += 1,
            }
            sqlx::query(
                "INSERT INTO merchants (id, name, kind, locale, region, email, phone, push_token, postal_address,
                                        holdings, created_at, marketing_opt_out, imported_at, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13)
                 ON CONFLICT (id) DO UPDATE SET
                    name = excluded.name, kind = excluded.kind, locale = excluded.locale, region = excluded.region,
                    email = excluded.email, phone = excluded.phone, push_token = excluded.push_token,
                    postal_address = excluded.postal_address, holdings = excluded.holdings,
                    created_at = excluded.created_at, marketing_opt_out = excluded.marketing_opt_out,
                    updated_at = excluded.updated_at",
            )
            .bind(m.id.as_str())
            .bind(&m.name)
            .bind(m.kind.as_str())
            .bind(m.locale.as_str())
            .bind(&m.region)
            .bind(m.email.as_ref().map(|e| e.as_str()))
            .bind(m.phone.as_ref().map(|p| p.as_str()))
            .bind(m.push_token.as_ref().map(|t| t.as_str()))
            .bind(m.postal_address.as_deref())
            .bind(to_json(&m.holdings))
            .bind(m.created_at.map(fmt_ts))
            .bind(m.marketing_opt_out as i64)
            .bind(&now)
            .execute(&mut *tx)
            .await
            .doing("storing a merchant")?;
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
        if let Some(rule) = &changes.scope_rule {
            sqlx::query("UPDATE incidents SET scope_rule = $1 WHERE id = $2")
                .bind(to_json(rule))
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .doing("storing a scope rule")?;
        }
        if let Some(affected) = &changes.affected {
            sqlx::query("DELETE FROM affected_merchants WHERE incident_id = $1")
                .bind(id.as_str())
                .execute(&mut *tx)
                .await
                .doing("clearing a previous scope")?;
            for a in affected {
                sqlx::query(
                    "INSERT INTO affected_merchants (incident_id, merchant_id, exposed, risk, risk_reasons, notice_required,
                        notice_reason, channel_plan, locale, reachability, reached_channel)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                )
                .bind(id.as_str())
                .bind(a.merchant_id.as_str())
                .bind(to_json(&a.exposed))
                .bind(a.risk.as_str())
                .bind(to_json(&a.risk_reasons))
                .bind(a.notice_required as i64)
                .bind(&a.notice_reason)
                .bind(to_json(&a.channel_plan))
                .bind(a.locale.as_str())
                .bind(a.reachability.as_str())
                .bind(a.reached_channel.map(|c| c.as_str()))
                .execute(&mut *tx)
                .await
                .doing("storing an affected merchant")?;
            }
        }
        record_transition_in(&mut tx, id, Some(from), &step, now).await?;
        tx.commit().await.doing("committing an incident transition")
    }

    async fn affected(&self, id: &IncidentId) -> Result<Vec<AffectedMerchant>, StoreError> {
        sqlx::query("SELECT * FROM affected_merchants WHERE incident_id = $1 ORDER BY merchant_id")
            .bind(id.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing affected merchants")?
            .iter()
            .map(affected_from)
            .collect()
    }

    async fn affected_merchant(
        &self,
        id: &IncidentId,
        merchant: &MerchantId,
    ) -> Result<Option<AffectedMerchant>, StoreError> {
        sqlx::query("SELECT * FROM affected_merchants WHERE incident_id = $1 AND merchant_id = $2")
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

    async fn insert_draft(&self, draft: &Draft, notices: &[Notice], from: IncidentState) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        set_state_in(
            &mut tx,
            &draft.incident_id,
            from,
            IncidentState::Drafted,
            draft.drafted_at,
        )
        .await?;
        sqlx::query(
            "INSERT INTO drafts (id, incident_id, version, state, content_hash, drafted_by, drafted_at)
             VALUES ($1, $2, $3, 'drafted', $4, $5, $6)",
        )
        .bind(draft.id.as_str())
        .bind(draft.incident_id.as_str())
        .bind(draft.version)
        .bind(&draft.content_hash)
        .bind(draft.drafted_by.as_str())
        .bind(fmt_ts(draft.drafted_at))
        .execute(&mut *tx)
        .await
        .doing("storing a draft")?;
        for n in notices {
            sqlx::query(
                "INSERT INTO notices (id, draft_id, merchant_id, locale, sections, email_subject, email_text, email_html,
                                      sms_text, push_title, push_body, content_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(n.id.as_str())
            .bind(n.draft_id.as_str())
            .bind(n.merchant_id.as_str())
            .bind(n.locale.as_str())
            .bind(to_json(&n.sections))
            .bind(&n.email_subject)
            .bind(&n.email_text)
            .bind(&n.email_html)
            .bind(&n.sms_text)
            .bind(&n.push_title)
            .bind(&n.push_body)
            .bind(&n.content_hash)
            .execute(&mut *tx)
            .await
            .doing("storing a notice")?;
        }
        let reason = format!("notice version {} drafted", draft.version);
        let step = Step {
            to: IncidentState::Drafted,
            actor: &draft.drafted_by,
            reason: &reason,
            detail: serde_json::json!({ "draft_id": draft.id.as_str(), "version": draft.version,
                                        "notices": notices.len(), "content_hash": draft.content_hash }),
        };
        record_transition_in(&mut tx, &draft.incident_id, Some(from), &step, draft.drafted_at).await?;
        tx.commit().await.doing("committing a draft")
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

    async fn notices(&self, draft: &DraftId) -> Result<Vec<Notice>, StoreError> {
        sqlx::query("SELECT * FROM notices WHERE draft_id = $1 ORDER BY merchant_id")
            .bind(draft.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing notices")?
            .iter()
            .map(notice_from)
            .collect()
    }

    async fn notice(&self, id: &NoticeId) -> Result<Option<Notice>, StoreError> {
        sqlx::query("SELECT * FROM notices WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(&self.pool)
            .await
            .doing("looking up a notice")?
            .as_ref()
            .map(notice_from)
            .transpose()
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

    async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut tx = self.begin().await?;
        // A `sending` row whose lease ran out belongs to a worker that died mid-send: take it over.
        let sql = "UPDATE deliveries SET status = 'sending', lease_until = $1, attempts = attempts + 1, updated_at = $2
             WHERE id IN (SELECT id FROM deliveries
                          WHERE (status = 'pending' AND next_attempt_at <= $2)
                             OR (status = 'sending' AND lease_until <= $2)
                          ORDER BY next_attempt_at LIMIT $3)
             RETURNING id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address, \
             plan_position, status, attempts, next_attempt_at, last_error, error_class, provider_message_id, created_at, sent_at";
        debug_assert!(sql.ends_with(DELIVERY_COLUMNS));
        let rows = sqlx::query(sql)
            .bind(fmt_ts(lease_until))
            .bind(fmt_ts(now))
            .bind(limit as i64)
            .fetch_all(&mut *tx)
            .await
            .doing("claiming due deliveries")?;
        tx.commit().await.doing("committing a claim")?;
        rows.iter().map(delivery_from).collect()
    }

    async fn record_attempt(
        &self,
        delivery: &Delivery,
        outcome: &AttemptOutcome,
        followup: &Followup,
    ) -> Result<bool, StoreError> {
        let now = fmt_ts(Utc::now());
        let id = delivery.id.as_str();
        // Only the holder of the current claim (same attempt number, still sending) may record.
        let claim = delivery.attempts;
        let mut tx = self.begin().await?;
        let query = match outcome {
            AttemptOutcome::Sent { provider_message_id } => sqlx::query(
                "UPDATE deliveries SET status = 'sent', sent_at = $1, updated_at = $1, lease_until = NULL,
                        provider_message_id = $2, last_error = NULL, error_class = NULL
                 WHERE id = $3 AND status = 'sending' AND attempts = $4",
            )
            .bind(now.clone())
            .bind(provider_message_id.clone())
            .bind(id)
            .bind(claim),
            AttemptOutcome::Retry { error, at } => sqlx::query(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, updated_at = $2, lease_until = NULL,
                        last_error = $3, error_class = 'transient'
                 WHERE id = $4 AND status = 'sending' AND attempts = $5",
            )
            .bind(fmt_ts(*at))
            .bind(now.clone())
            .bind(error.clone())
            .bind(id)
            .bind(claim),
            AttemptOutcome::Failed { error, class } => sqlx::query(
                "UPDATE deliveries SET status = 'failed', updated_at = $1, lease_until = NULL,
                        last_error = $2, error_class = $3
                 WHERE id = $4 AND status = 'sending' AND attempts = $5",
            )
            .bind(now.clone())
            .bind(error.clone())
            .bind(class.as_str())
            .bind(id)
            .bind(claim),
        };
        if query
            .execute(&mut *tx)
            .await
            .doing("recording a delivery attempt")?
            .rows_affected()
            == 0
        {
            return Ok(false);
        }
        // Final outcomes are evidence: they go into the hash chain (ids and classes, no addresses).
        let system = Actor::system();
        let ledger = |action: &str, detail: serde_json::Value| NewLedgerEntry {
            at: Utc::now(),
            actor: system.clone(),
            action: action.to_owned(),
            incident_id: Some(delivery.incident_id.clone()),
            detail,
        };
        let base = serde_json::json!({
            "delivery_id": id, "merchant_id": delivery.merchant_id.as_str(), "channel": delivery.channel.as_str(),
            "draft_id": delivery.draft_id.as_str(), "attempts": delivery.attempts,
        });
        let with = |mut v: serde_json::Value, key: &str, value: serde_json::Value| {
            v[key] = value;
            v
        };
        match outcome {
            AttemptOutcome::Sent { provider_message_id } => {
                let detail = with(base.clone(), "provider_message_id", provider_message_id.clone().into());
                append_ledger_in(&mut tx, &ledger("delivery.sent", detail)).await?;
            }
            AttemptOutcome::Failed { class, .. } => {
                let detail = with(base.clone(), "error_class", class.as_str().into());
                append_ledger_in(&mut tx, &ledger("delivery.failed", detail)).await?;
            }
            AttemptOutcome::Retry { .. } => {}
        }
        let reach = |r: Reachability, ch: Option<Channel>| {
            sqlx::query(
                "UPDATE affected_merchants SET reachability = $1, reached_channel = $2
                 WHERE incident_id = $3 AND merchant_id = $4",
            )
            .bind(r.as_str())
            .bind(ch.map(|c| c.as_str()))
            .bind(delivery.incident_id.as_str())
            .bind(delivery.merchant_id.as_str())
        };
        match followup {
            Followup::Nothing => {}
            Followup::Reached => {
                reach(Reachability::Reached, Some(delivery.channel))
                    .execute(&mut *tx)
                    .await
                    .doing("recording that a merchant was reached")?;
            }
            Followup::Unreachable => {
                reach(Reachability::Unreachable, None)
                    .execute(&mut *tx)
                    .await
                    .doing("recording that a merchant is unreachable")?;
                let detail =
                    serde_json::json!({ "merchant_id": delivery.merchant_id.as_str(), "last_delivery_id": id });
                append_ledger_in(&mut tx, &ledger("merchant.unreachable", detail)).await?;
            }
            Followup::Fallback(next) => insert_delivery_in(&mut tx, next, &now).await.map(|_| ())?,
        }
        tx.commit().await.doing("committing a delivery attempt")?;
        Ok(true)
    }

    async fn deliveries(&self, incident: &IncidentId) -> Result<Vec<Delivery>, StoreError> {
        sqlx::query(
            "SELECT id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address, \
             plan_position, status, attempts, next_attempt_at, last_error, error_class, provider_message_id, created_at, sent_at
             FROM deliveries WHERE incident_id = $1 ORDER BY merchant_id, plan_position",
        )
        .bind(incident.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("listing deliveries")?
        .iter()
        .map(delivery_from)
        .collect()
    }

    async fn delivery_tally(&self, incident: &IncidentId) -> Result<Vec<ChannelTally>, StoreError> {
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT channel,
                    SUM(CASE WHEN status = 'sent' THEN 1 ELSE 0 END),
                    SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END),
                    SUM(CASE WHEN status IN ('pending', 'sending') THEN 1 ELSE 0 END)
             FROM deliveries WHERE incident_id = $1 GROUP BY channel ORDER BY channel",
        )
        .bind(incident.as_str())
        .fetch_all(&self.pool)
        .await
        .doing("counting deliveries")?;
        Ok(rows
            .into_iter()
            .map(|(channel, sent, failed, pending)| ChannelTally {
                channel,
                sent,
                failed,
                pending,
            })
            .collect())
    }

    async fn open_deliveries(&self, incident: Option<&IncidentId>) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE status IN ('pending', 'sending') AND ($1 IS NULL OR incident_id = $1)",
        )
        .bind(incident.map(|i| i.as_str()))
        .fetch_one(&self.pool)
        .await
        .doing("counting open deliveries")?;
        Ok(count as u64)
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let next: Option<String> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN status = 'pending' THEN next_attempt_at ELSE lease_until END)
             FROM deliveries WHERE status IN ('pending', 'sending')",
        )
        .fetch_one(&self.pool)
        .await
        .doing("finding the next due delivery")?;
        next.map(|n| parse_ts(&n).map_err(|e| corrupt("deliveries.next_attempt_at", e)))
            .transpose()
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

    async fn filings(&self, incident: &IncidentId) -> Result<Vec<Filing>, StoreError> {
        sqlx::query("SELECT * FROM filings WHERE incident_id = $1 ORDER BY created_at")
            .bind(incident.as_str())
            .fetch_all(&self.pool)
            .await
            .doing("listing filings")?
            .iter()
            .map(filing_from)
            .collect()
    }

    async fn claim_filing(&self, id: &FilingId, now: DateTime<Utc>, until: DateTime<Utc>) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE filings SET claimed_until = $1
             WHERE id = $2 AND submitted_at IS NULL AND (claimed_until IS NULL OR claimed_until <= $3)",
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
            "INSERT INTO filings (id, incident_id, regulator, stage, content, content_hash, deadline_at, created_at, transport)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(f.id.as_str())
        .bind(f.incident_id.as_str())
        .bind(&f.regulator)
        .bind(&f.stage)
        .bind(to_json(&f.content))
        .bind(&f.content_hash)
        .bind(fmt_ts(f.deadline_at))
        .bind(fmt_ts(f.created_at))
        .bind(&f.transport)
        .execute(&mut *tx)
        .await
        .doing("storing a filing")?;
        let entry = NewLedgerEntry {
            at: f.created_at,
            actor: actor.clone(),
            action: "filing.drafted".into(),
            incident_id: Some(f.incident_id.clone()),
            detail: serde_json::json!({ "filing_id": f.id.as_str(), "regulator": f.regulator, "stage": f.stage,
                                        "deadline_at": fmt_ts(f.deadline_at), "content_hash": f.content_hash }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing")
    }

    async fn mark_filing_submitted(
        &self,
        id: &FilingId,
        at: DateTime<Utc>,
        location: &str,
        actor: &Actor,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let incident: Option<String> = sqlx::query_scalar(
            "UPDATE filings SET submitted_at = $1, location = $2 WHERE id = $3 AND submitted_at IS NULL
             RETURNING incident_id",
        )
        .bind(fmt_ts(at))
        .bind(location)
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .doing("recording a filing submission")?;
        let incident = incident.ok_or_else(|| StoreError::Conflict {
            what: "filing",
            id: id.to_string(),
            reason: "it does not exist or was already submitted".into(),
        })?;
        let entry = NewLedgerEntry {
            at,
            actor: actor.clone(),
            action: "filing.submitted".into(),
            incident_id: Some(incident.parse().map_err(|e| corrupt("filings.incident_id", e))?),
            detail: serde_json::json!({ "filing_id": id.as_str(), "location": location }),
        };
        append_ledger_in(&mut tx, &entry).await?;
        tx.commit().await.doing("committing a filing submission")
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

    /// An incident with one approved draft and one notice, ready for deliveries.
    async fn ready(s: &SqliteStore) -> (IncidentId, DraftId, NoticeId) {
        let alice: Actor = "alice".parse().expect("actor");
        let IngestOutcome::Opened { incident_id, .. } = s
            .ingest_event(&event("e-1", None), "INC", &alice)
            .await
            .expect("ingest")
        else {
            panic!("expected a new incident")
        };
        let draft = Draft {
            id: DraftId::generate(),
            incident_id: incident_id.clone(),
            version: 1,
            state: DraftState::Drafted,
            content_hash: "h".into(),
            drafted_by: alice.clone(),
            drafted_at: Utc::now(),
            approved_by: None,
            approved_at: None,
        };
        let notice = Notice {
            id: NoticeId::generate(),
            draft_id: draft.id.clone(),
            merchant_id: "m-1".parse().expect("id"),
            locale: Locale::En,
            sections: NoticeSections::default(),
            email_subject: String::new(),
            email_text: String::new(),
            email_html: String::new(),
            sms_text: String::new(),
            push_title: String::new(),
            push_body: String::new(),
            content_hash: "n".into(),
        };
        // Walk the state machine the way the engine does.
        for to in [IncidentState::Confirmed, IncidentState::Scoped] {
            let from = s
                .incident(incident_id.as_str())
                .await
                .expect("get")
                .expect("exists")
                .state;
            let step = Step {
                to,
                actor: &alice,
                reason: "test",
                detail: serde_json::json!({}),
            };
            s.transition(&incident_id, from, step, IncidentChanges::default())
                .await
                .expect("transition");
        }
        s.insert_draft(&draft, std::slice::from_ref(&notice), IncidentState::Scoped)
            .await
            .expect("draft");
        s.approve_draft(&draft.id, &"bob".parse().expect("actor"), Utc::now())
            .await
            .expect("approve");
        (incident_id, draft.id, notice.id)
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
        let claimed = s
            .claim_due(now, now + ChronoDuration::seconds(60), 10)
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].attempts, 1);
        // Another worker finds nothing while the lease holds...
        assert!(
            s.claim_due(now, now + ChronoDuration::seconds(60), 10)
                .await
                .expect("claim")
                .is_empty()
        );
        // ...and takes the row over once it has run out (the first worker died mid-send).
        let later = now + ChronoDuration::seconds(61);
        let retaken = s
            .claim_due(later, later + ChronoDuration::seconds(60), 10)
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
        let claimed = s
            .claim_due(now, now + ChronoDuration::seconds(60), 10)
            .await
            .expect("claim");
        let next = delivery(&incident, &draft, &notice, Channel::Sms, 1);
        let failed = AttemptOutcome::Failed {
            error: "550".into(),
            class: ErrorClass::Permanent,
        };
        s.record_attempt(&claimed[0], &failed, &Followup::Fallback(next))
            .await
            .expect("record");
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
    async fn a_filing_is_claimed_by_one_submitter_at_a_time_and_submitted_once() {
        let (_dir, s) = store().await;
        let (incident, _, _) = ready(&s).await;
        let alice: Actor = "alice".parse().expect("actor");
        let now = Utc::now();
        let filing = Filing {
            id: FilingId::generate(),
            incident_id: incident.clone(),
            regulator: "cn-cac".into(),
            stage: "initial".into(),
            content: serde_json::json!({}),
            content_hash: "h".into(),
            deadline_at: now,
            created_at: now,
            submitted_at: None,
            transport: "file".into(),
            location: None,
        };
        s.insert_filing(&filing, &alice).await.expect("insert");
        let lease = now + ChronoDuration::minutes(5);
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
        s.mark_filing_submitted(&filing.id, later, "here", &alice)
            .await
            .expect("submit");
        assert!(
            s.mark_filing_submitted(&filing.id, later, "again", &alice)
                .await
                .is_err(),
            "submitted once"
        );
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
