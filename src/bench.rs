//! Benchmarks that print one JSON line per run.
//!
//! `tocsin bench draft`: the cost of everything between "confirm" and "ready to approve" for a
//! synthetic cohort. The directory is generated and stored first (not timed); the clock then
//! covers scoping (rule, classification, natural-person count), drafting (the completeness
//! check of every notice variant) and queueing one held delivery per notice.
//!
//! `tocsin bench deliver`: N notices drafted, approved and released first (not timed); the
//! clock covers delivering them from the outbox to the server named on the command line,
//! rendering, signing and recording every outcome in the store as a real run does.
//! `tocsin bench sink` is a minimal HTTP peer that accepts anything, for the HTTP channels.

use std::collections::BTreeSet;
use std::time::Instant;

use serde::Serialize;

use crate::domain::*;
use crate::engine::{EngineError, Tocsin};
use crate::model::{Merchant, People, ScopeRule};

/// One run's figures, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct DraftBench {
    pub merchants: u64,
    pub seconds: f64,
    pub merchants_per_second: f64,
    pub scope_seconds: f64,
    pub draft_seconds: f64,
    pub setup_seconds: f64,
    pub affected: i64,
    pub notices: usize,
    pub variants: usize,
    pub natural_persons: Option<u64>,
    pub peak_rss_mb: Option<f64>,
}

/// Holdings the synthetic merchants draw from: each a plausible profile of what the platform
/// keeps about a shop.
const PROFILES: &[&[&str]] = &[
    &["account_credentials", "phone_number", "email_address"],
    &["account_credentials", "phone_number", "real_name", "id_number"],
    &[
        "account_credentials",
        "settlement_account",
        "real_name",
        "contact_persons",
    ],
    &[
        "phone_number",
        "postal_address",
        "contact_persons",
        "sub_account_phones",
    ],
    &["account_credentials", "business_license", "settlement_account"],
    &["real_name", "id_number", "id_photo", "face_image", "phone_number"],
    &["email_address", "transaction_records", "alipay_account"],
    &[
        "account_credentials",
        "phone_number",
        "sub_account_phones",
        "settlement_account",
        "real_name",
    ],
];

const REGIONS: &[&str] = &["CN-ZJ", "CN-GD", "CN-BJ", "CN-SH", "CN-JS", "SG", "DE", "US-CA"];

/// A cheap deterministic mix (splitmix64), so runs are repeatable.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn synthetic(i: u64) -> Result<Merchant, FieldError> {
    let r = mix(i);
    let kind = match r % 10 {
        0..=2 => MerchantKind::NaturalPerson,
        3..=6 => MerchantKind::IndividualBusiness,
        _ => MerchantKind::Enterprise,
    };
    let locale = if (r >> 8).is_multiple_of(5) {
        Locale::En
    } else {
        Locale::ZhCn
    };
    let region = REGIONS[((r >> 12) % REGIONS.len() as u64) as usize];
    let holdings: BTreeSet<CategoryId> = PROFILES[((r >> 16) % PROFILES.len() as u64) as usize]
        .iter()
        .map(|c| c.parse())
        .collect::<Result<_, _>>()?;
    let contacts = (0..(r >> 20) % 3)
        .map(|k| format!("p{:x}", mix(i * 4 + k) % 50_000_000))
        .collect();
    let sub_accounts = (0..(r >> 24) % 2)
        .map(|k| format!("p{:x}", mix(i * 8 + k + 1) % 50_000_000))
        .collect();
    Ok(Merchant {
        id: format!("bench-{i:09}").parse()?,
        name: format!("Shop {i}"),
        kind,
        locale,
        region: region.to_owned(),
        email: (!(r >> 28).is_multiple_of(10))
            .then(|| format!("shop{i}@example.com").parse())
            .transpose()?,
        phone: ((r >> 32) % 10 < 8)
            .then(|| format!("+86138{:08}", i % 100_000_000).parse())
            .transpose()?,
        push_token: ((r >> 36) % 10 < 4)
            .then(|| format!("tok-{i:012}").parse())
            .transpose()?,
        postal_address: None,
        holdings,
        created_at: None,
        last_active_at: None,
        marketing_opt_out: (r >> 40).is_multiple_of(7),
        people: People {
            representative: None,
            contacts,
            sub_accounts,
        },
    })
}

/// Opens and confirms a benchmark incident exposing `categories`; returns it and its responder.
async fn open_incident(engine: &Tocsin, categories: &BTreeSet<&str>) -> Result<(String, Actor), EngineError> {
    let stamp = chrono::Utc::now().timestamp_micros();
    let event = serde_json::json!({
        "source": "bench", "external_id": format!("bench-{stamp}"), "kind": "leak", "severity": "high",
        "title": "Benchmark incident", "detected_at": crate::time::fmt_ts(chrono::Utc::now()),
        "correlation_key": format!("bench-{stamp}"),
    });
    let system = Actor::system();
    let outcome = engine.ingest_text(&event.to_string(), &system).await?;
    let id = match outcome.first() {
        Some(crate::store::IngestOutcome::Opened { incident_id, .. }) => incident_id.to_string(),
        _ => return Err(FieldError::new("bench", "the benchmark event did not open an incident").into()),
    };
    let mut facts: serde_json::Value =
        serde_json::from_str(crate::demo::FACTS).map_err(|e| FieldError::new("facts", e.to_string()))?;
    facts["categories"] = serde_json::json!(categories);
    let now = chrono::Utc::now();
    facts["aware_at"] = serde_json::json!(crate::time::fmt_ts(now));
    facts["occurred_at"] = serde_json::json!(crate::time::fmt_ts(now - chrono::Duration::hours(2)));
    facts["contained_at"] = serde_json::Value::Null;
    let alice: Actor = "bench-responder".parse()?;
    engine.confirm(&id, &facts, &alice).await?;
    Ok((id, alice))
}

/// Where `bench deliver` sends: an SMTP server, or an HTTP endpoint for SMS or push.
#[derive(Debug, Clone)]
pub enum DeliverTarget {
    Smtp { host: String, port: u16 },
    Http { channel: Channel, url: String },
}

/// One `bench deliver` run's figures, printed as one JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct DeliverBench {
    pub channel: Channel,
    pub notices: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub accepted: u64,
    pub failed: u64,
    pub concurrency: u32,
    pub batch: u32,
    pub setup_seconds: f64,
    pub peak_rss_mb: Option<f64>,
    /// CPU time of the whole process (every thread, user and system) over the timed part,
    /// per notice: steadier than the rate on a machine whose speed varies from run to run.
    pub cpu_us_per_notice: Option<f64>,
    /// Mean size of a message as the server accepted it (SMTP only): the reference load
    /// generator must send messages this large (`smtp-source -l`), since the sink's cost
    /// grows with the octets it reads.
    pub octets_per_notice: Option<f64>,
}

/// Delivers `n` pre-drafted notices to `target` with `concurrency` sends in flight per
/// pipeline, recording every outcome.
pub async fn deliver(
    engine: &Tocsin,
    target: &DeliverTarget,
    n: u64,
    concurrency: u32,
    batch: u32,
) -> Result<DeliverBench, EngineError> {
    let setup = Instant::now();
    let channel = match target {
        DeliverTarget::Smtp { .. } => Channel::Email,
        DeliverTarget::Http { channel, .. } => *channel,
    };
    // Merchants with an address on the benchmarked channel only, so it is the first of the plan.
    let categories: BTreeSet<&str> = PROFILES[0].iter().copied().collect();
    let holdings: BTreeSet<CategoryId> = categories.iter().map(|c| c.parse()).collect::<Result<_, _>>()?;
    let id_of = |i: u64| format!("bench-{channel}-{i:08}");
    if engine
        .store
        .merchant(&id_of(n.saturating_sub(1)).parse()?)
        .await?
        .is_none()
    {
        let mut i = 0;
        while i < n {
            let end = (i + 20_000).min(n);
            let batch: Vec<Merchant> = (i..end)
                .map(|i| {
                    Ok(Merchant {
                        id: id_of(i).parse()?,
                        name: format!("Shop {i}"),
                        kind: MerchantKind::Enterprise,
                        locale: if i % 5 == 0 { Locale::En } else { Locale::ZhCn },
                        region: "CN-ZJ".into(),
                        email: (channel == Channel::Email)
                            .then(|| format!("shop{i}@bench.example.com").parse())
                            .transpose()?,
                        phone: (channel == Channel::Sms)
                            .then(|| format!("+86139{:08}", i % 100_000_000).parse())
                            .transpose()?,
                        push_token: (channel == Channel::Push)
                            .then(|| format!("push-{i:012}").parse())
                            .transpose()?,
                        postal_address: None,
                        holdings: holdings.clone(),
                        created_at: None,
                        last_active_at: None,
                        marketing_opt_out: false,
                        people: Default::default(),
                    })
                })
                .collect::<Result<_, FieldError>>()?;
            engine.store.upsert_merchants(&batch).await?;
            i = end;
        }
    }
    let (id, alice) = open_incident(engine, &categories).await?;
    let rule = ScopeRule {
        merchant_ids: (0..n).map(|i| id_of(i).parse()).collect::<Result<_, _>>()?,
        ..Default::default()
    };
    engine.scope(&id, &rule, &alice, false).await?;
    engine.draft(&id, &alice, None).await?;
    let bob: Actor = "bench-approver".parse()?;
    engine.approve(&id, &bob).await?;
    engine.dispatch(&id, &bob).await?;
    let incident = engine
        .store
        .incident(&id)
        .await?
        .ok_or_else(|| FieldError::new("bench", "the benchmark incident vanished"))?;

    let mut settings = engine.settings.clone();
    settings.delivery.concurrency = concurrency.max(1);
    settings.delivery.batch = batch.max(1);
    match target {
        DeliverTarget::Smtp { host, port } => {
            settings.email.transport = "smtp".into();
            settings.email.providers.clear();
            settings.email.smtp.host = host.clone();
            settings.email.smtp.port = *port;
            settings.email.smtp.tls = "none".into();
            settings.email.smtp.pool_size = concurrency.max(1);
        }
        DeliverTarget::Http { channel, url } => {
            let s = if *channel == Channel::Sms {
                &mut settings.sms
            } else {
                &mut settings.push
            };
            s.transport = "webhook".into();
            s.providers.clear();
            s.url = url.clone();
            s.signing_secret = crate::config::Secret::new("bench-signing-secret");
        }
    }
    let channels = crate::channels::ChannelSet::from_settings(&settings, &std::env::temp_dir())?;
    let providers: Vec<_> = channels.providers(channel).to_vec();
    let octets = || -> Option<u64> { providers.iter().map(|p| p.provider.accepted_octets()).sum() };
    let octets_before = octets();
    let dispatcher = crate::dispatch::Dispatcher::new(
        engine.store.clone(),
        engine.renderer.clone(),
        channels,
        settings.delivery.clone(),
    );
    let setup_seconds = setup.elapsed().as_secs_f64();

    let clock = Instant::now();
    let cpu_before = cpu_seconds();
    let report = dispatcher
        .drain(Some(&incident.id), std::time::Duration::from_secs(3600))
        .await?;
    let seconds = clock.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu_before).map(|(after, before)| after - before);
    let octets = octets().zip(octets_before).map(|(after, before)| after - before);
    Ok(DeliverBench {
        channel,
        notices: n,
        seconds,
        per_second: n as f64 / seconds.max(f64::EPSILON),
        accepted: report.sent,
        failed: report.failed + report.dead,
        concurrency: settings.delivery.concurrency,
        batch: settings.delivery.batch,
        setup_seconds,
        peak_rss_mb: peak_rss_mb(),
        cpu_us_per_notice: cpu.map(|c| c * 1e6 / n.max(1) as f64),
        octets_per_notice: octets.map(|o| o as f64 / report.sent.max(1) as f64),
    })
}

/// CPU time this process has used so far (all threads, user and system), in seconds (Linux:
/// `/proc/self/stat` fields 14 and 15, in clock ticks of 1/100 s).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
    // Fields 14 and 15 of the line are the 12th and 13th after the name.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// A minimal HTTP peer for the HTTP channels' benchmark: answers every request with 200 and a
/// message id, as cheaply as axum allows (the reference `wrk` runs against the same sink).
pub async fn sink(listen: &str) -> std::io::Result<()> {
    use axum::routing::any;
    let app = axum::Router::new().fallback(any(|| async {
        (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            r#"{"id":"sink"}"#,
        )
    }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("sink listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await
}

/// One `bench http-floor` run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct HttpFloorBench {
    pub requests: u64,
    pub seconds: f64,
    pub per_second: f64,
    pub failed: u64,
    pub concurrency: u32,
    pub cpu_us_per_request: Option<f64>,
}

/// Posts `n` requests shaped like the signed webhook's (its headers, a body of the same size)
/// through a client configured as the webhook's, `concurrency` at a time: what the HTTP client
/// costs before any notice is claimed, rendered, signed or recorded.
pub async fn http_floor(url: &str, n: u64, concurrency: u32) -> Result<HttpFloorBench, EngineError> {
    use futures_util::StreamExt;
    let url = reqwest::Url::parse(url).map_err(|e| FieldError::new("url", e.to_string()))?;
    let client = crate::channels::http_client_builder(30)
        .build()
        .map_err(|e| FieldError::new("url", e.to_string()))?;
    // The body of a webhook SMS notice: 400 octets of JSON.
    let text = "x".repeat(150);
    let clock = Instant::now();
    let cpu_before = cpu_seconds();
    let failed = futures_util::stream::iter(0..n)
        .map(|i| {
            let (client, url) = (&client, url.clone());
            let key = format!("drf_01a2308a3d8174b6a218654f4f847957:bench-sms-{i:08}:sms");
            let body = serde_json::json!({
                "channel": "sms", "delivery_id": format!("dlv_01a2308a3d8174b6a218{i:014x}"),
                "idempotency_key": key, "locale": "zh-CN", "reference": "INC-2026-0001",
                "text": text, "to": "+8613900000057", "url": "http://127.0.0.1:8080/n/0000003a462e0aa15c",
            })
            .to_string();
            async move {
                let timestamp = chrono::Utc::now().timestamp();
                let signature = crate::channels::sign(b"bench-signing-secret", timestamp, body.as_bytes());
                let sent = client
                    .post(url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header("X-Tocsin-Timestamp", timestamp.to_string())
                    .header("X-Tocsin-Signature", signature)
                    .header("Idempotency-Key", key)
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status().is_success() => response.bytes().await.is_err(),
                    _ => true,
                }
            }
        })
        .buffer_unordered(concurrency.max(1) as usize)
        .fold(0u64, |failed, f| async move { failed + u64::from(f) })
        .await;
    let seconds = clock.elapsed().as_secs_f64();
    let cpu = cpu_seconds().zip(cpu_before).map(|(after, before)| after - before);
    Ok(HttpFloorBench {
        requests: n,
        seconds,
        per_second: n as f64 / seconds.max(f64::EPSILON),
        failed,
        concurrency: concurrency.max(1),
        cpu_us_per_request: cpu.map(|c| c * 1e6 / n.max(1) as f64),
    })
}

/// Peak resident memory of this process so far (Linux), in MiB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub async fn draft(engine: &Tocsin, n: u64) -> Result<DraftBench, EngineError> {
    let setup = Instant::now();
    // The directory is generated once per data directory; a rerun reuses it.
    let last = engine
        .store
        .merchant(&format!("bench-{:09}", n.saturating_sub(1)).parse()?)
        .await?;
    if last.is_none() {
        let mut i = 0;
        while i < n {
            let end = (i + 20_000).min(n);
            let batch: Vec<Merchant> = (i..end).map(synthetic).collect::<Result<_, _>>()?;
            engine.store.upsert_merchants(&batch).await?;
            i = end;
        }
    }
    let categories: BTreeSet<&str> = PROFILES.iter().flat_map(|p| p.iter().copied()).collect();
    let (id, alice) = open_incident(engine, &categories).await?;
    let rule = ScopeRule {
        any_categories: categories.iter().map(|c| c.parse()).collect::<Result<_, _>>()?,
        ..Default::default()
    };
    let setup_seconds = setup.elapsed().as_secs_f64();

    let clock = Instant::now();
    let summary = engine.scope(&id, &rule, &alice, false).await?;
    let scope_seconds = clock.elapsed().as_secs_f64();
    let drafted = engine.draft(&id, &alice, None).await?;
    let seconds = clock.elapsed().as_secs_f64();
    let variants = engine.store.draft_variants(&drafted.draft.id).await?.len();
    Ok(DraftBench {
        merchants: n,
        seconds,
        merchants_per_second: n as f64 / seconds.max(f64::EPSILON),
        scope_seconds,
        draft_seconds: seconds - scope_seconds,
        setup_seconds,
        affected: summary.affected,
        notices: drafted.notices,
        variants,
        natural_persons: summary.natural_persons,
        peak_rss_mb: peak_rss_mb(),
    })
}
