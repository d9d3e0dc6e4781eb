//! The outbox's SQL: claims within provider limits, batched outcomes, receipts, breakers and
//! dead letters. Outcomes are written in batches because a statement costs SQLite about as
//! much as a hundred rows inside one.

use super::*;
use crate::channels::{ReceiptKey, ReceiptStatus};
use crate::model::FailureKind;

/// A delivery row as `json_array({DELIVERY_COLUMNS})` writes it: an array in the order of the
/// fields below (serde reads a struct from an array by position), which SQLite writes and
/// serde reads faster than an object repeating every column's name on every row.
#[derive(serde::Deserialize)]
struct DeliveryJson {
    id: String,
    idempotency_key: String,
    incident_id: String,
    draft_id: String,
    notice_id: String,
    merchant_id: String,
    channel: String,
    address: String,
    plan_position: i64,
    status: String,
    attempts: i64,
    next_attempt_at: String,
    last_error: Option<String>,
    error_class: Option<String>,
    provider_message_id: Option<String>,
    content_hash: Option<String>,
    created_at: String,
    sent_at: Option<String>,
    provider: Option<String>,
    error_kind: Option<String>,
    delivered_at: Option<String>,
    receipt_due_at: Option<String>,
}

fn deliveries_from_json(text: &str) -> Result<Vec<Delivery>, StoreError> {
    let rows: Vec<DeliveryJson> = serde_json::from_str(text).map_err(|e| corrupt("deliveries", e))?;
    let field = |name: &'static str| move |e: FieldError| corrupt(name, e);
    let ts = |name: &'static str, v: &str| parse_ts(v).map_err(|e| corrupt(name, e));
    let opt_ts = |name: &'static str, v: Option<String>| v.map(|v| ts(name, &v)).transpose();
    rows.into_iter()
        .map(|r| {
            Ok(Delivery {
                id: r.id.parse().map_err(field("deliveries.id"))?,
                idempotency_key: r.idempotency_key,
                incident_id: r.incident_id.parse().map_err(field("deliveries.incident_id"))?,
                draft_id: r.draft_id.parse().map_err(field("deliveries.draft_id"))?,
                notice_id: r.notice_id.parse().map_err(field("deliveries.notice_id"))?,
                merchant_id: r.merchant_id.parse().map_err(field("deliveries.merchant_id"))?,
                channel: r.channel.parse().map_err(field("deliveries.channel"))?,
                address: r.address,
                plan_position: r.plan_position,
                status: r.status.parse().map_err(field("deliveries.status"))?,
                attempts: r.attempts,
                next_attempt_at: ts("deliveries.next_attempt_at", &r.next_attempt_at)?,
                last_error: r.last_error,
                error_class: match r.error_class.as_deref() {
                    None => None,
                    Some("transient") => Some(ErrorClass::Transient),
                    Some("permanent") => Some(ErrorClass::Permanent),
                    Some(other) => return Err(corrupt("deliveries.error_class", other)),
                },
                provider_message_id: r.provider_message_id,
                content_hash: r.content_hash,
                created_at: ts("deliveries.created_at", &r.created_at)?,
                sent_at: opt_ts("deliveries.sent_at", r.sent_at)?,
                provider: r.provider,
                error_kind: r
                    .error_kind
                    .map(|k| k.parse().map_err(|e: String| corrupt("deliveries.error_kind", e)))
                    .transpose()?,
                delivered_at: opt_ts("deliveries.delivered_at", r.delivered_at)?,
                receipt_due_at: opt_ts("deliveries.receipt_due_at", r.receipt_due_at)?,
            })
        })
        .collect()
}

pub(super) const DELIVERY_COLUMNS: &str = "id, idempotency_key, incident_id, draft_id, notice_id, merchant_id, channel, address, \
     plan_position, status, attempts, next_attempt_at, last_error, error_class, provider_message_id, content_hash, \
     created_at, sent_at, provider, error_kind, delivered_at, receipt_due_at";

/// How many token-bucket tokens and window slots a claim may take right now.
fn grant(
    conn_state: &LimitState,
    limits: &LimitSettings,
    want: u32,
    now: DateTime<Utc>,
) -> (u32, Option<DateTime<Utc>>) {
    let mut grant = want as f64;
    let mut wait: Option<DateTime<Utc>> = None;
    let mut later = |secs: f64| {
        let at = now + chrono::Duration::milliseconds((secs * 1000.0).ceil().max(1.0) as i64);
        wait = Some(wait.map_or(at, |w| w.min(at)));
    };
    // Each limit that holds some of the wanted sends back says when it lets the next one go.
    let want = want as f64;
    if limits.rate_per_second > 0.0 {
        let whole = conn_state.tokens.floor().max(0.0);
        grant = grant.min(whole);
        if whole < want {
            later((1.0 - (conn_state.tokens - whole)) / limits.rate_per_second);
        }
    }
    if limits.window_seconds > 0 && limits.window_max > 0 {
        let room = limits.window_max.saturating_sub(conn_state.window_used) as f64;
        grant = grant.min(room);
        if room < want {
            later(conn_state.window_frees_in_seconds.max(1.0));
        }
    }
    if limits.max_in_flight > 0 {
        let room = (limits.max_in_flight as i64 - conn_state.in_flight).max(0) as f64;
        grant = grant.min(room);
        if room < want {
            // Frees when a send in flight finishes: look again shortly.
            later(0.02);
        }
    }
    (grant.max(0.0) as u32, wait)
}

struct LimitState {
    tokens: f64,
    window_used: u64,
    window_frees_in_seconds: f64,
    in_flight: i64,
}

/// A sliding window is counted in 60 slots (at least a second each).
fn slot_seconds(limits: &LimitSettings) -> i64 {
    (limits.window_seconds as i64 / 60).max(1)
}

fn bucket_size(limits: &LimitSettings) -> f64 {
    if limits.burst > 0 {
        limits.burst as f64
    } else {
        limits.rate_per_second.max(1.0)
    }
}

pub(super) async fn claim_for_provider(store: &SqliteStore, c: &ProviderClaim<'_>) -> Result<Claimed, StoreError> {
    let limits = c.limits;
    let now = fmt_ts(c.now);
    // A read first: most channels have nothing due most of the time, and a read does not
    // wait for (or hold up) the writer.
    let due: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM deliveries WHERE status = 'pending' AND channel = $1 AND next_attempt_at <= $2)
             OR EXISTS (SELECT 1 FROM deliveries WHERE status = 'sending' AND +channel = $1 AND lease_until <= $2)",
    )
    .bind(c.channel.as_str())
    .bind(&now)
    .fetch_one(&store.pool)
    .await
    .doing("looking for due deliveries")?;
    if !due {
        return Ok(Claimed::default());
    }
    let mut tx = store
        .outbox_writer
        .begin_with("BEGIN IMMEDIATE")
        .await
        .doing("starting a claim")?;
    let limited = limits.rate_per_second > 0.0 || limits.window_max > 0 || limits.max_in_flight > 0;
    let mut state = LimitState {
        tokens: 0.0,
        window_used: 0,
        window_frees_in_seconds: 0.0,
        in_flight: 0,
    };
    if limits.rate_per_second > 0.0 {
        let row: Option<(f64, String)> =
            sqlx::query_as("SELECT tokens, refreshed_at FROM provider_limits WHERE provider = $1")
                .bind(c.provider)
                .fetch_optional(&mut *tx)
                .await
                .doing("reading a provider's token bucket")?;
        let size = bucket_size(limits);
        state.tokens = match row {
            None => size,
            Some((tokens, at)) => {
                let elapsed = parse_ts(&at)
                    .map(|t| (c.now - t).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6)
                    .unwrap_or(0.0);
                (tokens + elapsed * limits.rate_per_second).min(size)
            }
        };
    }
    let slot_len = slot_seconds(limits);
    let current_slot = c.now.timestamp() / slot_len;
    let slots = (limits.window_seconds as i64 / slot_len).max(1);
    if limits.window_seconds > 0 && limits.window_max > 0 {
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT slot, sent FROM provider_window WHERE provider = $1 AND slot > $2 ORDER BY slot")
                .bind(c.provider)
                .bind(current_slot - slots)
                .fetch_all(&mut *tx)
                .await
                .doing("reading a provider's sliding window")?;
        state.window_used = rows.iter().map(|(_, n)| *n as u64).sum();
        // The oldest counted slot leaves the window when its slot ends plus the window length.
        if let Some((oldest, _)) = rows.first() {
            let leaves_at = (oldest + slots) * slot_len;
            state.window_frees_in_seconds = (leaves_at - c.now.timestamp()).max(1) as f64;
        }
    }
    if limits.max_in_flight > 0 {
        state.in_flight = sqlx::query_scalar(
            "SELECT COUNT(*) FROM deliveries WHERE status = 'sending' AND provider = $1 AND lease_until > $2",
        )
        .bind(c.provider)
        .bind(&now)
        .fetch_one(&mut *tx)
        .await
        .doing("counting a provider's sends in flight")?;
    }
    let (granted, limited_until) = if limited {
        grant(&state, limits, c.want, c.now)
    } else {
        (c.want, None)
    };
    if granted == 0 {
        tx.rollback().await.doing("ending a claim")?;
        return Ok(Claimed {
            deliveries: vec![],
            limited_until,
        });
    }
    // Taken-over rows first (a worker died holding them), then due rows oldest first: their
    // ids are picked from the indexes, then those rows are leased and read by key, in that
    // order. Rows cross from SQLite's thread as one JSON document (a row costs as much as a
    // statement).
    let picked: String = sqlx::query_scalar(
        "SELECT json_group_array(id) FROM (
             SELECT id FROM (SELECT id FROM deliveries
                             WHERE status = 'sending' AND +channel = $1 AND lease_until <= $2 LIMIT $3)
             UNION ALL
             SELECT id FROM (SELECT id FROM deliveries
                             WHERE status = 'pending' AND channel = $1 AND next_attempt_at <= $2
                             ORDER BY next_attempt_at LIMIT $3)
             LIMIT $3)",
    )
    .bind(c.channel.as_str())
    .bind(&now)
    .bind(granted as i64)
    .fetch_one(&mut *tx)
    .await
    .doing("picking due deliveries")?;
    sqlx::query(
        "UPDATE deliveries SET status = 'sending', lease_until = $1, attempts = attempts + 1, updated_at = $2,
                provider = $3
         WHERE id IN (SELECT value FROM json_each($4))",
    )
    .bind(fmt_ts(c.lease_until))
    .bind(&now)
    .bind(c.provider)
    .bind(&picked)
    .execute(&mut *tx)
    .await
    .doing("claiming due deliveries")?;
    let claimed: String = sqlx::query_scalar(trusted(format!(
        "SELECT json_group_array(json_array({DELIVERY_COLUMNS}))
         FROM (SELECT d.* FROM json_each($1) AS j JOIN deliveries AS d ON d.id = j.value ORDER BY j.key)"
    )))
    .bind(&picked)
    .fetch_one(&mut *tx)
    .await
    .doing("reading claimed deliveries")?;
    let rows = deliveries_from_json(&claimed)?;
    let taken = rows.len() as f64;
    if limits.rate_per_second > 0.0 {
        sqlx::query(
            "INSERT INTO provider_limits (provider, tokens, refreshed_at) VALUES ($1, $2, $3)
             ON CONFLICT (provider) DO UPDATE SET tokens = excluded.tokens, refreshed_at = excluded.refreshed_at",
        )
        .bind(c.provider)
        .bind(state.tokens - taken)
        .bind(&now)
        .execute(&mut *tx)
        .await
        .doing("taking tokens from a provider's bucket")?;
    }
    if limits.window_seconds > 0 && limits.window_max > 0 && !rows.is_empty() {
        sqlx::query(
            "INSERT INTO provider_window (provider, slot, sent) VALUES ($1, $2, $3)
             ON CONFLICT (provider, slot) DO UPDATE SET sent = sent + excluded.sent",
        )
        .bind(c.provider)
        .bind(current_slot)
        .bind(rows.len() as i64)
        .execute(&mut *tx)
        .await
        .doing("counting sends in a provider's window")?;
        sqlx::query("DELETE FROM provider_window WHERE provider = $1 AND slot <= $2")
            .bind(c.provider)
            .bind(current_slot - slots)
            .execute(&mut *tx)
            .await
            .doing("forgetting a provider's old window slots")?;
    }
    tx.commit().await.doing("committing a claim")?;
    let taken = rows.len() as u32;
    Ok(Claimed {
        deliveries: rows,
        limited_until: if taken < c.want { limited_until } else { None },
    })
}

fn ledger_entry(incident: &IncidentId, action: &str, detail: serde_json::Value, at: DateTime<Utc>) -> NewLedgerEntry {
    NewLedgerEntry {
        at,
        actor: Actor::system(),
        action: action.to_owned(),
        incident_id: Some(incident.clone()),
        detail,
    }
}

/// The evidence of one accepted send in the ledger. Fields in alphabetical order: the entry is
/// written directly and must read as a `serde_json::Value` writes it (keys sorted), which is
/// what the chain's hash is checked against.
#[derive(serde::Serialize)]
struct AcceptedEvidence<'a> {
    attempts: i64,
    channel: &'a str,
    content_hash: &'a str,
    delivery_id: &'a str,
    draft_id: &'a str,
    merchant_id: &'a str,
    provider: &'a str,
    provider_message_id: Option<&'a str>,
}

#[derive(serde::Serialize)]
struct AcceptedBatch<'a> {
    deliveries: Vec<AcceptedEvidence<'a>>,
}

/// Inserts attempt and receipt history rows in one statement.
async fn insert_events(conn: &mut SqliteConnection, events: &[serde_json::Value]) -> Result<(), StoreError> {
    for chunk in events.chunks(2000) {
        sqlx::query(
            "INSERT INTO delivery_events (delivery_id, at, event, attempt, provider, outcome, error_kind, detail)
             SELECT value ->> '$.d', value ->> '$.at', value ->> '$.e', value ->> '$.n', value ->> '$.p',
                    value ->> '$.o', value ->> '$.k', value ->> '$.x'
             FROM json_each($1)",
        )
        .bind(to_json(&chunk))
        .execute(&mut *conn)
        .await
        .doing("recording delivery history")?;
    }
    Ok(())
}

fn event(
    d: &Delivery,
    at: &str,
    event: &str,
    provider: Option<&str>,
    outcome: &str,
    kind: Option<FailureKind>,
    detail: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "d": d.id.as_str(), "at": at, "e": event, "n": d.attempts, "p": provider,
        "o": outcome, "k": kind.map(FailureKind::as_str), "x": detail,
    })
}

async fn set_reachability(
    conn: &mut SqliteConnection,
    d: &Delivery,
    reachability: Reachability,
    channel: Option<Channel>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE affected_merchants SET reachability = $1, reached_channel = $2 WHERE incident_id = $3 AND merchant_id = $4",
    )
    .bind(reachability.as_str())
    .bind(channel.map(|c| c.as_str()))
    .bind(d.incident_id.as_str())
    .bind(d.merchant_id.as_str())
    .execute(&mut *conn)
    .await
    .doing("recording whether a merchant was reached")?;
    Ok(())
}

/// Applies what a final outcome means for the merchant (inside the caller's transaction).
async fn apply_followup(
    conn: &mut SqliteConnection,
    d: &Delivery,
    followup: &Followup,
    now: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    match followup {
        Followup::Nothing => {}
        Followup::Reached => set_reachability(conn, d, Reachability::Reached, Some(d.channel)).await?,
        Followup::Unreachable => {
            // A merchant already reached on another channel stays reached.
            sqlx::query(
                "UPDATE affected_merchants SET reachability = 'unreachable', reached_channel = NULL
                 WHERE incident_id = $1 AND merchant_id = $2 AND reachability <> 'reached'",
            )
            .bind(d.incident_id.as_str())
            .bind(d.merchant_id.as_str())
            .execute(&mut *conn)
            .await
            .doing("recording that a merchant is unreachable")?;
            let detail =
                serde_json::json!({ "merchant_id": d.merchant_id.as_str(), "last_delivery_id": d.id.as_str() });
            append_ledger_in(conn, &ledger_entry(&d.incident_id, "merchant.unreachable", detail, at)).await?;
        }
        Followup::Fallback(next) => {
            // The merchant is no longer reached through a channel that bounced.
            sqlx::query(
                "UPDATE affected_merchants SET reachability = 'pending', reached_channel = NULL
                 WHERE incident_id = $1 AND merchant_id = $2 AND reached_channel = $3",
            )
            .bind(d.incident_id.as_str())
            .bind(d.merchant_id.as_str())
            .bind(d.channel.as_str())
            .execute(&mut *conn)
            .await
            .doing("recording that a merchant is not reached yet")?;
            insert_delivery_in(conn, next, now).await?;
        }
    }
    Ok(())
}

pub(super) async fn record_attempts(
    store: &SqliteStore,
    records: &[AttemptRecord],
    health: &[HealthUpdate],
) -> Result<Vec<bool>, StoreError> {
    let at = Utc::now();
    let now = fmt_ts(at);
    let mut tx = store
        .outbox_writer
        .begin_with("BEGIN IMMEDIATE")
        .await
        .doing("starting to record attempts")?;
    let mut stored = vec![false; records.len()];
    let mut events = Vec::with_capacity(records.len());
    // Acceptances in one statement: each row only if its claim is still this attempt's.
    // By position: id, attempt, provider, message id, content hash, receipt due.
    type AcceptRow<'a> = (&'a str, i64, &'a str, Option<&'a str>, &'a str, Option<String>);
    let accepted: Vec<(usize, AcceptRow<'_>)> = records
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.outcome {
            AttemptOutcome::Accepted {
                provider_message_id,
                content_hash,
                receipt_due_at,
            } => Some((
                i,
                (
                    r.delivery.id.as_str(),
                    r.delivery.attempts,
                    r.provider.as_str(),
                    provider_message_id.as_deref(),
                    content_hash.as_str(),
                    receipt_due_at.map(fmt_ts),
                ),
            )),
            _ => None,
        })
        .collect();
    // Final outcomes are evidence: one hash-chained entry per incident per batch of
    // acceptances (ids and hashes, no addresses), one per failure.
    let mut accepted_by_incident: std::collections::BTreeMap<&str, Vec<AcceptedEvidence<'_>>> = Default::default();
    for chunk in accepted.chunks(1000) {
        let values: Vec<&AcceptRow<'_>> = chunk.iter().map(|(_, v)| v).collect();
        let affected = sqlx::query(
            "UPDATE deliveries SET status = 'accepted', sent_at = $1, updated_at = $1, lease_until = NULL,
                    provider = j.value ->> 2, provider_message_id = j.value ->> 3,
                    content_hash = j.value ->> 4, receipt_due_at = j.value ->> 5,
                    last_error = NULL, error_class = NULL, error_kind = NULL
             FROM json_each($2) AS j
             WHERE deliveries.id = j.value ->> 0 AND +deliveries.status = 'sending'
               AND deliveries.attempts = j.value ->> 1",
        )
        .bind(&now)
        .bind(to_json(&values))
        .execute(&mut *tx)
        .await
        .doing("recording accepted deliveries")?
        .rows_affected();
        // Usually every claim still held; only if not, ask which ones were stored.
        let done: std::collections::HashSet<String> = if affected as usize == chunk.len() {
            chunk.iter().map(|(i, _)| records[*i].delivery.id.to_string()).collect()
        } else {
            let ids: Vec<&str> = chunk.iter().map(|(i, _)| records[*i].delivery.id.as_str()).collect();
            let stored: String = sqlx::query_scalar(
                "SELECT json_group_array(id) FROM deliveries
                 WHERE id IN (SELECT value FROM json_each($1)) AND status = 'accepted' AND sent_at = $2",
            )
            .bind(to_json(&ids))
            .bind(&now)
            .fetch_one(&mut *tx)
            .await
            .doing("checking which acceptances were stored")?;
            // A receipt that overtook its acceptance (a bounce while the send was being
            // recorded) already ended the row; what was sent is still evidence.
            sqlx::query(
                "UPDATE deliveries SET sent_at = $1, provider = j.value ->> 2, content_hash = j.value ->> 4,
                        provider_message_id = COALESCE(provider_message_id, j.value ->> 3)
                 FROM json_each($2) AS j
                 WHERE deliveries.id = j.value ->> 0 AND deliveries.attempts = j.value ->> 1
                   AND deliveries.sent_at IS NULL AND deliveries.status IN ('failed', 'delivered')
                   AND deliveries.error_kind IS NOT 'no_receipt'",
            )
            .bind(&now)
            .bind(to_json(&values))
            .execute(&mut *tx)
            .await
            .doing("keeping what was sent for deliveries a receipt overtook")?;
            serde_json::from_str(&stored).map_err(|e| corrupt("deliveries", e))?
        };
        let mut reached = Vec::new();
        for (i, _) in chunk {
            let r = &records[*i];
            if !done.contains(r.delivery.id.as_str()) {
                continue;
            }
            stored[*i] = true;
            let AttemptOutcome::Accepted {
                provider_message_id,
                content_hash,
                ..
            } = &r.outcome
            else {
                continue;
            };
            // The accepting attempt is not written to the history: the delivery row holds it
            // (sent_at, attempts, provider) and the history is read with it.
            accepted_by_incident
                .entry(r.delivery.incident_id.as_str())
                .or_default()
                .push(AcceptedEvidence {
                    attempts: r.delivery.attempts,
                    channel: r.delivery.channel.as_str(),
                    content_hash,
                    delivery_id: r.delivery.id.as_str(),
                    draft_id: r.delivery.draft_id.as_str(),
                    merchant_id: r.delivery.merchant_id.as_str(),
                    provider: &r.provider,
                    provider_message_id: provider_message_id.as_deref(),
                });
            if matches!(r.followup, Followup::Reached) {
                reached.push(serde_json::json!({
                    "i": r.delivery.incident_id.as_str(), "m": r.delivery.merchant_id.as_str(), "c": r.delivery.channel.as_str(),
                }));
            }
        }
        if !reached.is_empty() {
            sqlx::query(
                "UPDATE affected_merchants SET reachability = 'reached', reached_channel = j.value ->> '$.c'
                 FROM json_each($1) AS j
                 WHERE affected_merchants.incident_id = j.value ->> '$.i' AND affected_merchants.merchant_id = j.value ->> '$.m'",
            )
            .bind(to_json(&reached))
            .execute(&mut *tx)
            .await
            .doing("recording merchants reached")?;
        }
    }
    let system = Actor::system();
    for (incident, items) in accepted_by_incident {
        let Ok(incident) = incident.parse::<IncidentId>() else {
            continue;
        };
        let detail = serde_json::value::RawValue::from_string(to_json(&AcceptedBatch { deliveries: items }))
            .map_err(|e| corrupt("ledger", e))?;
        let entry = LedgerAppend {
            at,
            actor: system.as_str(),
            action: "deliveries.accepted",
            incident: Some(&incident),
        };
        append_ledger_raw_in(&mut tx, &entry, &detail).await?;
    }
    for (i, r) in records.iter().enumerate() {
        let d = &r.delivery;
        let (status, error, kind, next_at) = match &r.outcome {
            AttemptOutcome::Accepted { .. } => continue,
            AttemptOutcome::Retry { error, kind, at } => ("pending", error, *kind, Some(fmt_ts(*at))),
            AttemptOutcome::Failed { error, kind } => ("failed", error, *kind, None),
            AttemptOutcome::Dead { error, kind } => ("dead", error, *kind, None),
        };
        let done = sqlx::query(
            "UPDATE deliveries SET status = $1, updated_at = $2, lease_until = NULL, last_error = $3,
                    error_class = $4, error_kind = $5, provider = $6, next_attempt_at = COALESCE($7, next_attempt_at)
             WHERE id = $8 AND status = 'sending' AND attempts = $9",
        )
        .bind(status)
        .bind(&now)
        .bind(error)
        .bind(kind.class().as_str())
        .bind(kind.as_str())
        .bind(&r.provider)
        .bind(next_at)
        .bind(d.id.as_str())
        .bind(d.attempts)
        .execute(&mut *tx)
        .await
        .doing("recording a failed attempt")?
        .rows_affected()
            > 0;
        if !done {
            continue;
        }
        stored[i] = true;
        let outcome = if status == "pending" { "retry" } else { status };
        events.push(event(
            d,
            &now,
            "attempt",
            Some(&r.provider),
            outcome,
            Some(kind),
            Some(error),
        ));
        if status != "pending" {
            let detail = serde_json::json!({
                "delivery_id": d.id.as_str(), "merchant_id": d.merchant_id.as_str(), "channel": d.channel.as_str(),
                "draft_id": d.draft_id.as_str(), "attempts": d.attempts, "provider": r.provider,
                "error_class": kind.class().as_str(), "error_kind": kind.as_str(),
            });
            let action = if status == "dead" {
                "delivery.dead_lettered"
            } else {
                "delivery.failed"
            };
            append_ledger_in(&mut tx, &ledger_entry(&d.incident_id, action, detail, at)).await?;
        }
        apply_followup(&mut tx, d, &r.followup, &now, at).await?;
    }
    insert_events(&mut tx, &events).await?;
    for h in health {
        update_health_in(&mut tx, h, at).await?;
    }
    tx.commit().await.doing("committing recorded attempts")?;
    Ok(stored)
}

pub(super) async fn release_claims(store: &SqliteStore, deliveries: &[Delivery]) -> Result<u64, StoreError> {
    let claims: Vec<serde_json::Value> = deliveries
        .iter()
        .map(|d| serde_json::json!({ "id": d.id.as_str(), "n": d.attempts }))
        .collect();
    let done = sqlx::query(
        "UPDATE deliveries SET status = 'pending', attempts = attempts - 1, lease_until = NULL, updated_at = $1
         FROM json_each($2) AS j
         WHERE deliveries.id = j.value ->> '$.id' AND +deliveries.status = 'sending'
           AND deliveries.attempts = j.value ->> '$.n'",
    )
    .bind(fmt_ts(Utc::now()))
    .bind(to_json(&claims))
    .execute(&store.outbox_writer)
    .await
    .doing("releasing unsent claims")?;
    Ok(done.rows_affected())
}

async fn update_health_in(conn: &mut SqliteConnection, h: &HealthUpdate, at: DateTime<Utc>) -> Result<(), StoreError> {
    let current: Option<i64> =
        sqlx::query_scalar("SELECT consecutive_failures FROM provider_health WHERE provider = $1")
            .bind(&h.provider)
            .fetch_optional(&mut *conn)
            .await
            .doing("reading a provider's health")?;
    if current.is_none() && h.failures == 0 {
        return Ok(());
    }
    // A provider that answered is healthy again; failures after that count from zero.
    let consecutive = if h.successes > 0 {
        0
    } else {
        current.unwrap_or(0) + h.failures as i64
    };
    let open_until =
        (h.failures > 0 && h.successes == 0 && consecutive >= h.threshold as i64).then(|| fmt_ts(at + h.cooldown));
    sqlx::query(
        "INSERT INTO provider_health (provider, consecutive_failures, open_until, last_failure_at, last_error_kind, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (provider) DO UPDATE SET consecutive_failures = excluded.consecutive_failures,
             open_until = excluded.open_until,
             last_failure_at = COALESCE(excluded.last_failure_at, provider_health.last_failure_at),
             last_error_kind = COALESCE(excluded.last_error_kind, provider_health.last_error_kind),
             updated_at = excluded.updated_at",
    )
    .bind(&h.provider)
    .bind(consecutive)
    .bind(open_until)
    .bind((h.failures > 0).then(|| fmt_ts(at)))
    .bind(h.last_failure.map(FailureKind::as_str))
    .bind(fmt_ts(at))
    .execute(&mut *conn)
    .await
    .doing("recording a provider's health")?;
    Ok(())
}

pub(super) async fn provider_health(pool: &SqlitePool) -> Result<Vec<ProviderHealth>, StoreError> {
    let rows = sqlx::query(
        "SELECT provider, consecutive_failures, open_until, last_failure_at, last_error_kind FROM provider_health ORDER BY provider",
    )
    .fetch_all(pool)
    .await
    .doing("reading providers' health")?;
    rows.iter()
        .map(|r| {
            Ok(ProviderHealth {
                provider: r.try_get("provider").doing("reading a provider's health")?,
                consecutive_failures: r.try_get("consecutive_failures").doing("reading a provider's health")?,
                open_until: opt_ts_col(r, "open_until")?,
                last_failure_at: opt_ts_col(r, "last_failure_at")?,
                last_error_kind: r.try_get("last_error_kind").doing("reading a provider's health")?,
            })
        })
        .collect()
}

pub(super) async fn delivery_for_receipt(
    pool: &SqlitePool,
    key: &ReceiptKey,
    providers: &[&str],
) -> Result<Option<Delivery>, StoreError> {
    let (sql, value) = match key {
        ReceiptKey::ProviderMessageId(id) => (
            format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries
                 WHERE provider_message_id = $1 AND substr(provider_message_id, 1, 4) <> 'dlv_'
                   AND provider IN (SELECT value FROM json_each($2)) LIMIT 1"
            ),
            id,
        ),
        ReceiptKey::DeliveryId(id) => (
            format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1 AND provider IN (SELECT value FROM json_each($2))"
            ),
            id,
        ),
    };
    sqlx::query(trusted(sql))
        .bind(value)
        .bind(to_json(&providers))
        .fetch_optional(pool)
        .await
        .doing("finding the delivery a receipt refers to")?
        .as_ref()
        .map(delivery_from)
        .transpose()
}

pub(super) async fn record_receipt(
    store: &SqliteStore,
    d: &Delivery,
    status: ReceiptStatus,
    detail: &str,
    followup: &Followup,
    at: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let now = fmt_ts(at);
    let mut tx = store
        .outbox_writer
        .begin_with("BEGIN IMMEDIATE")
        .await
        .doing("starting to record a receipt")?;
    let (event_name, outcome, kind) = match status {
        ReceiptStatus::Delivered => ("receipt", "delivered", None),
        ReceiptStatus::Failed(FailureKind::NoReceipt) => ("receipt_timeout", "failed", Some(FailureKind::NoReceipt)),
        ReceiptStatus::Failed(k) => ("receipt", "failed", Some(k)),
        ReceiptStatus::InProgress => ("receipt", "in_progress", None),
    };
    let changed = match status {
        // A late confirmation still counts, even after the window closed and the merchant moved on.
        ReceiptStatus::Delivered => sqlx::query(
            "UPDATE deliveries SET status = 'delivered', delivered_at = $1, updated_at = $1, receipt_due_at = NULL,
                    receipt_detail = $2
             WHERE id = $3 AND (status IN ('accepted', 'sending') OR (status = 'failed' AND error_kind = 'no_receipt'))",
        )
        .bind(&now)
        .bind(detail)
        .bind(d.id.as_str())
        .execute(&mut *tx)
        .await
        .doing("recording a delivery receipt")?
        .rows_affected(),
        ReceiptStatus::Failed(k) => sqlx::query(
            "UPDATE deliveries SET status = 'failed', updated_at = $1, receipt_due_at = NULL, receipt_detail = $2,
                    last_error = $2, error_class = 'permanent', error_kind = $3
             WHERE id = $4 AND status IN ('accepted', 'delivered', 'sending')
               AND NOT (status IN ('delivered', 'sending') AND $3 = 'no_receipt')",
        )
        .bind(&now)
        .bind(detail)
        .bind(k.as_str())
        .bind(d.id.as_str())
        .execute(&mut *tx)
        .await
        .doing("recording a failure receipt")?
        .rows_affected(),
        ReceiptStatus::InProgress => sqlx::query(
            "UPDATE deliveries SET receipt_detail = $1, updated_at = $2 WHERE id = $3 AND status = 'accepted'",
        )
        .bind(detail)
        .bind(&now)
        .bind(d.id.as_str())
        .execute(&mut *tx)
        .await
        .doing("recording a progress receipt")?
        .rows_affected(),
    } > 0;
    insert_events(
        &mut tx,
        &[event(
            d,
            &now,
            event_name,
            d.provider.as_deref(),
            outcome,
            kind,
            Some(detail),
        )],
    )
    .await?;
    if changed {
        let ledger_detail = serde_json::json!({
            "delivery_id": d.id.as_str(), "merchant_id": d.merchant_id.as_str(), "channel": d.channel.as_str(),
            "draft_id": d.draft_id.as_str(), "provider": d.provider, "receipt": detail,
        });
        match status {
            ReceiptStatus::Delivered => {
                append_ledger_in(
                    &mut tx,
                    &ledger_entry(&d.incident_id, "delivery.delivered", ledger_detail, at),
                )
                .await?;
                set_reachability(&mut tx, d, Reachability::Reached, Some(d.channel)).await?;
            }
            ReceiptStatus::Failed(k) => {
                let mut detail = ledger_detail;
                detail["error_kind"] = k.as_str().into();
                append_ledger_in(&mut tx, &ledger_entry(&d.incident_id, "delivery.failed", detail, at)).await?;
                apply_followup(&mut tx, d, followup, &now, at).await?;
            }
            ReceiptStatus::InProgress => {}
        }
    }
    tx.commit().await.doing("committing a receipt")?;
    Ok(changed && status != ReceiptStatus::InProgress)
}

pub(super) async fn receipts_overdue(
    pool: &SqlitePool,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<Delivery>, StoreError> {
    sqlx::query(trusted(format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries
         WHERE receipt_due_at IS NOT NULL AND receipt_due_at <= $1 AND +status = 'accepted'
         ORDER BY receipt_due_at LIMIT $2"
    )))
    .bind(fmt_ts(now))
    .bind(limit as i64)
    .fetch_all(pool)
    .await
    .doing("finding deliveries whose receipt is overdue")?
    .iter()
    .map(delivery_from)
    .collect()
}

pub(super) async fn version_channels(
    pool: &SqlitePool,
    draft: &DraftId,
    merchant: &MerchantId,
) -> Result<Vec<Channel>, StoreError> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT channel FROM deliveries WHERE draft_id = $1 AND merchant_id = $2")
            .bind(draft.as_str())
            .bind(merchant.as_str())
            .fetch_all(pool)
            .await
            .doing("listing a merchant's channels of a version")?;
    rows.iter()
        .map(|c| c.parse().map_err(|e: FieldError| corrupt("deliveries.channel", e)))
        .collect()
}

/// The WHERE clause of a dead-letter filter; binds $1..$4 (NULL = any).
const FILTER: &str = "status = 'dead' AND ($1 IS NULL OR incident_id = $1) AND ($2 IS NULL OR channel = $2)
     AND ($3 IS NULL OR provider = $3) AND ($4 IS NULL OR error_class = $4 OR error_kind = $4)";

pub(super) async fn dead_letters(
    pool: &SqlitePool,
    f: &DeliveryFilter,
    after: Option<&DeliveryId>,
    limit: u32,
) -> Result<Vec<Delivery>, StoreError> {
    sqlx::query(trusted(format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE {FILTER} AND ($5 IS NULL OR id > $5) ORDER BY id LIMIT $6"
    )))
    .bind(f.incident.as_ref().map(|i| i.as_str()))
    .bind(f.channel.map(|c| c.as_str()))
    .bind(f.provider.as_deref())
    .bind(f.error_class.as_deref())
    .bind(after.map(|a| a.as_str()))
    .bind(limit as i64)
    .fetch_all(pool)
    .await
    .doing("listing dead letters")?
    .iter()
    .map(delivery_from)
    .collect()
}

pub(super) async fn redrive(
    store: &SqliteStore,
    f: &DeliveryFilter,
    actor: &Actor,
    at: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let now = fmt_ts(at);
    let mut tx = store
        .outbox_writer
        .begin_with("BEGIN IMMEDIATE")
        .await
        .doing("starting a re-drive")?;
    let rows = sqlx::query(trusted(format!(
        "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $5, updated_at = $5, lease_until = NULL
         WHERE {FILTER}
         RETURNING {DELIVERY_COLUMNS}"
    )))
    .bind(f.incident.as_ref().map(|i| i.as_str()))
    .bind(f.channel.map(|c| c.as_str()))
    .bind(f.provider.as_deref())
    .bind(f.error_class.as_deref())
    .bind(&now)
    .fetch_all(&mut *tx)
    .await
    .doing("re-driving dead letters")?;
    let deliveries: Vec<Delivery> = rows.iter().map(delivery_from).collect::<Result<_, _>>()?;
    let events: Vec<serde_json::Value> = deliveries
        .iter()
        .map(|d| {
            event(
                d,
                &now,
                "redrive",
                d.provider.as_deref(),
                "pending",
                None,
                Some(actor.as_str()),
            )
        })
        .collect();
    insert_events(&mut tx, &events).await?;
    let mut by_incident: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for d in &deliveries {
        by_incident
            .entry(d.incident_id.as_str())
            .or_default()
            .push(d.id.as_str());
    }
    for (incident, ids) in by_incident {
        let Ok(incident) = incident.parse::<IncidentId>() else {
            continue;
        };
        append_ledger_in(
            &mut tx,
            &NewLedgerEntry {
                at,
                actor: actor.clone(),
                action: "deliveries.redriven".into(),
                incident_id: Some(incident),
                detail: serde_json::json!({ "filter": f, "deliveries": ids }),
            },
        )
        .await?;
    }
    tx.commit().await.doing("committing a re-drive")?;
    Ok(deliveries.len() as u64)
}

pub(super) async fn delivery_events(pool: &SqlitePool, id: &DeliveryId) -> Result<Vec<DeliveryEvent>, StoreError> {
    // The accepting attempt comes from the delivery row (see `record_attempts`), unless an
    // earlier version wrote it as a history row. It goes before any receipt for its attempt:
    // a bounce can be recorded before the acceptance it answers.
    let rows = sqlx::query(
        "SELECT delivery_id, at, event, attempt, provider, outcome, error_kind, detail, at AS sort_at, rowid AS n
         FROM delivery_events WHERE delivery_id = $1
         UNION ALL
         SELECT id, sent_at, 'attempt', attempts, provider, 'accepted', NULL, NULL,
                MIN(sent_at, COALESCE((SELECT MIN(e.at) FROM delivery_events AS e
                                       WHERE e.delivery_id = d.id AND e.attempt = d.attempts
                                         AND e.event <> 'attempt'), sent_at)),
                -1
         FROM deliveries AS d
         WHERE id = $1 AND sent_at IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM delivery_events AS e
                           WHERE e.delivery_id = d.id AND e.event = 'attempt' AND e.outcome = 'accepted')
         ORDER BY sort_at, n",
    )
    .bind(id.as_str())
    .fetch_all(pool)
    .await
    .doing("reading a delivery's history")?;
    rows.iter()
        .map(|r| {
            let get = |name: &'static str| {
                r.try_get::<Option<String>, _>(name)
                    .doing("reading a delivery's history")
            };
            Ok(DeliveryEvent {
                delivery_id: r.try_get("delivery_id").doing("reading a delivery's history")?,
                at: ts_col(r, "at")?,
                event: r.try_get("event").doing("reading a delivery's history")?,
                attempt: r.try_get("attempt").doing("reading a delivery's history")?,
                provider: get("provider")?,
                outcome: r.try_get("outcome").doing("reading a delivery's history")?,
                error_kind: get("error_kind")?,
                detail: get("detail")?,
            })
        })
        .collect()
}

pub(super) async fn delivery(pool: &SqlitePool, id: &DeliveryId) -> Result<Option<Delivery>, StoreError> {
    sqlx::query(trusted(format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE id = $1"
    )))
    .bind(id.as_str())
    .fetch_optional(pool)
    .await
    .doing("looking up a delivery")?
    .as_ref()
    .map(delivery_from)
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The acceptance evidence is written directly, not through a `Value`: it must come out
    /// byte for byte as a `Value` writes it, since `audit verify` re-hashes the stored detail
    /// read back as a `Value`.
    #[test]
    fn acceptance_evidence_is_written_as_a_value_writes_it() {
        let items = vec![
            AcceptedEvidence {
                attempts: 2,
                channel: "email",
                content_hash: "ab12",
                delivery_id: "dlv_1",
                draft_id: "drf_1",
                merchant_id: "m-\"quoted\"-商户",
                provider: "smtp",
                provider_message_id: Some("<dlv_1.x@example.com>"),
            },
            AcceptedEvidence {
                attempts: 1,
                channel: "sms",
                content_hash: "cd34",
                delivery_id: "dlv_2",
                draft_id: "drf_1",
                merchant_id: "m-2",
                provider: "twilio",
                provider_message_id: None,
            },
        ];
        let direct = to_json(&AcceptedBatch { deliveries: items });
        let value: serde_json::Value = serde_json::from_str(&direct).expect("valid JSON");
        assert_eq!(direct, value.to_string());
        let raw = serde_json::value::RawValue::from_string(direct.clone()).expect("raw");
        assert_eq!(
            crate::ledger::chain_hash(7, "t", "system", "deliveries.accepted", Some("inc_1"), &*raw, "p"),
            crate::ledger::chain_hash(7, "t", "system", "deliveries.accepted", Some("inc_1"), &value, "p"),
        );
    }
}
