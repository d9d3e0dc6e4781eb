//! Dispatch: the outbox and its workers. Approval puts one row per (notice version, merchant,
//! first channel of the plan) in the outbox; workers claim due rows under a lease, send them,
//! and store the outcome. Transient failures retry with exponential backoff and full jitter,
//! honouring `Retry-After`; permanent failures (and transient ones that used up their
//! attempts) queue the merchant's next channel; an exhausted plan marks the merchant
//! unreachable, which the bulletin then covers. Outcome and follow-up are stored together.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::channels::{
    Accepted, ChannelSet, FailureKind, Outbound, ProviderHandle, Receipt, ReceiptKey, ReceiptStatus, SendError,
};
use crate::config::{DeliverySettings, LimitSettings};
use crate::domain::*;
use crate::draft::{DraftError, NoticeRenderer};
use crate::model::*;
use crate::store::{AttemptOutcome, Followup, NewDelivery, Store, StoreError};
use crate::store::{AttemptRecord, HealthUpdate, ProviderClaim, ProviderHealth};

#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("delivery {0} refers to a notice that does not exist")]
    MissingNotice(String),
    #[error(transparent)]
    Render(#[from] DraftError),
}

/// The delivery for the first channel after `after_position` in the plan that has an address.
pub fn next_delivery(
    incident: &IncidentId,
    draft: &DraftId,
    notice: &NoticeId,
    affected: &AffectedMerchant,
    merchant: &Merchant,
    after_position: i64,
) -> Option<NewDelivery> {
    affected
        .channel_plan
        .iter()
        .enumerate()
        .skip((after_position + 1).max(0) as usize)
        .find_map(|(i, channel)| {
            merchant.address(*channel).map(|address| NewDelivery {
                incident_id: incident.clone(),
                draft_id: draft.clone(),
                notice_id: notice.clone(),
                merchant_id: merchant.id.clone(),
                channel: *channel,
                address,
                plan_position: i as i64,
            })
        })
}

/// [`next_delivery`], skipping channels in `used` (this version already went out on them).
pub fn next_delivery_skipping(
    incident: &IncidentId,
    draft: &DraftId,
    notice: &NoticeId,
    affected: &AffectedMerchant,
    merchant: &Merchant,
    after_position: i64,
    used: &[Channel],
) -> Option<NewDelivery> {
    let mut position = after_position;
    loop {
        let next = next_delivery(incident, draft, notice, affected, merchant, position)?;
        if !used.contains(&next.channel) {
            return Some(next);
        }
        position = next.plan_position;
    }
}

/// The longest `Retry-After` honoured; a provider asking for more gets this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Full-jitter exponential backoff: uniform in [0, min(max, base * 2^(attempt-1))], but never
/// sooner than the provider asked for (up to [`MAX_RETRY_AFTER`]).
pub fn backoff(settings: &DeliverySettings, attempt: i64, retry_after: Option<Duration>) -> Duration {
    let exp = (attempt.max(1) - 1).min(30) as u32;
    let ceiling = settings
        .backoff_base_ms
        .saturating_mul(1u64 << exp)
        .min(settings.backoff_max_ms);
    let jittered = Duration::from_millis(rand::rng().random_range(0..=ceiling));
    jittered.max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER))
}

/// What one worker step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StepReport {
    pub claimed: u64,
    /// Accepted by a provider.
    pub sent: u64,
    pub retried: u64,
    pub failed: u64,
    pub dead: u64,
    pub fell_back: u64,
    pub unreachable: u64,
    /// Accepted deliveries whose receipt window closed without a receipt.
    pub receipts_overdue: u64,
}

impl std::ops::AddAssign for StepReport {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.sent += o.sent;
        self.retried += o.retried;
        self.failed += o.failed;
        self.dead += o.dead;
        self.fell_back += o.fell_back;
        self.unreachable += o.unreachable;
        self.receipts_overdue += o.receipts_overdue;
    }
}

/// A delivery worker. `step` is one claim-send-record round that tests can drive directly.
#[derive(Clone)]
pub struct Dispatcher {
    store: Arc<dyn Store>,
    channels: ChannelSet,
    settings: DeliverySettings,
    renderer: Arc<NoticeRenderer>,
    /// Breaker states, re-read at most every [`HEALTH_TTL`] or after a failure was recorded.
    health: Arc<std::sync::Mutex<Option<HealthSnapshot>>>,
    /// What this process saw of each provider since the store was last read: consecutive
    /// failures and until when its breaker is open, so a breaker opens at once here, before
    /// the outcomes that opened it are recorded.
    local_health: Arc<std::sync::Mutex<HashMap<String, ProviderHealth>>>,
    /// When overdue receipts were last looked for (at most once a second).
    receipt_sweep: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Incidents' references (`INC-2026-0001`), fixed once an incident is opened: read once,
    /// not with every claim (an incident row carries its whole scope rule).
    references: Arc<std::sync::Mutex<HashMap<IncidentId, Arc<str>>>>,
}

/// Breaker states by provider, as read at a time.
type HealthSnapshot = (std::time::Instant, Arc<HashMap<String, ProviderHealth>>);

const HEALTH_TTL: Duration = Duration::from_millis(250);
const RECEIPT_SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How a provider may be used now, from its breaker state.
enum Breaker {
    Closed,
    /// Cooled off after opening: one trial send decides.
    HalfOpen,
    Open(DateTime<Utc>),
}

fn breaker(handle: &ProviderHandle, health: Option<&ProviderHealth>, now: DateTime<Utc>) -> Breaker {
    match health {
        Some(h) if h.consecutive_failures >= handle.breaker.failure_threshold as i64 => match h.open_until {
            Some(until) if until > now => Breaker::Open(until),
            _ => Breaker::HalfOpen,
        },
        _ => Breaker::Closed,
    }
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn Store>,
        renderer: Arc<NoticeRenderer>,
        channels: ChannelSet,
        settings: DeliverySettings,
    ) -> Self {
        Self {
            store,
            channels,
            settings,
            renderer,
            health: Default::default(),
            local_health: Default::default(),
            receipt_sweep: Default::default(),
            references: Default::default(),
        }
    }

    /// Breaker states: the store's, with what this process saw since (the worse of the two).
    async fn health(&self) -> Result<Arc<HashMap<String, ProviderHealth>>, DispatchError> {
        let stored = self.stored_health().await?;
        let local = match self.local_health.lock() {
            Ok(l) if !l.is_empty() => l.clone(),
            _ => return Ok(stored),
        };
        let mut merged = (*stored).clone();
        for (name, l) in local {
            let m = merged.entry(name).or_insert_with(|| l.clone());
            m.consecutive_failures = m.consecutive_failures.max(l.consecutive_failures);
            m.open_until = m.open_until.max(l.open_until);
        }
        Ok(Arc::new(merged))
    }

    /// Notes a send's effect on its provider's breaker in this process.
    fn note_health(&self, handle: &ProviderHandle, result: &Result<(Accepted, String), SendError>) {
        let Ok(mut local) = self.local_health.lock() else {
            return;
        };
        let h = local.entry(handle.name.clone()).or_insert_with(|| ProviderHealth {
            provider: handle.name.clone(),
            consecutive_failures: 0,
            open_until: None,
            last_failure_at: None,
            last_error_kind: None,
        });
        match result {
            Ok(_) => {
                h.consecutive_failures = 0;
                h.open_until = None;
            }
            Err(e) if e.kind.counts_against_provider() => {
                h.consecutive_failures += 1;
                if h.consecutive_failures >= handle.breaker.failure_threshold as i64 {
                    h.open_until = Some(Utc::now() + chrono::Duration::seconds(handle.breaker.cooldown_seconds as i64));
                }
            }
            Err(_) => {}
        }
    }

    /// The provider to send claimed work through now: its own, unless that one's breaker
    /// opened since the claim and another provider of the channel is usable.
    async fn reroute(&self, mut w: Work) -> Work {
        let Ok(health) = self.health().await else {
            return w;
        };
        let now = Utc::now();
        if matches!(breaker(&w.handle, health.get(&w.handle.name), now), Breaker::Open(_))
            && let Some(next) = self
                .channels
                .providers(w.delivery.channel)
                .iter()
                .find(|h| !matches!(breaker(h, health.get(&h.name), now), Breaker::Open(_)))
        {
            w.handle = next.clone();
        }
        w
    }

    async fn stored_health(&self) -> Result<Arc<HashMap<String, ProviderHealth>>, DispatchError> {
        if let Some((at, h)) = self.health.lock().ok().and_then(|g| g.clone())
            && at.elapsed() < HEALTH_TTL
        {
            return Ok(h);
        }
        let fresh: Arc<HashMap<String, ProviderHealth>> = Arc::new(
            self.store
                .provider_health()
                .await?
                .into_iter()
                .map(|h| (h.provider.clone(), h))
                .collect(),
        );
        if let Ok(mut g) = self.health.lock() {
            *g = Some((std::time::Instant::now(), fresh.clone()));
        }
        Ok(fresh)
    }

    /// Whether it is time to look for overdue receipts (and notes that it is being done).
    fn receipt_sweep_due(&self) -> bool {
        let Ok(mut last) = self.receipt_sweep.lock() else {
            return true;
        };
        if last.is_some_and(|at| at.elapsed() < RECEIPT_SWEEP_EVERY) {
            return false;
        }
        *last = Some(std::time::Instant::now());
        true
    }

    /// The provider to use for `channel` now (the first whose breaker lets it through) and how
    /// many sends to claim for it; or when the first breaker closes again.
    fn choose(
        &self,
        channel: Channel,
        health: &HashMap<String, ProviderHealth>,
        now: DateTime<Utc>,
        room: u32,
    ) -> Result<(Arc<ProviderHandle>, u32, bool), Option<DateTime<Utc>>> {
        let mut reopens: Option<DateTime<Utc>> = None;
        for handle in self.channels.providers(channel) {
            match breaker(handle, health.get(&handle.name), now) {
                Breaker::Closed => return Ok((handle.clone(), room.max(1), false)),
                Breaker::HalfOpen => return Ok((handle.clone(), 1, true)),
                Breaker::Open(until) => reopens = Some(reopens.map_or(until, |r| r.min(until))),
            }
        }
        Err(reopens)
    }

    /// Moves accepted deliveries whose receipt window closed on to the merchant's next channel.
    async fn expire_receipts(&self, now: DateTime<Utc>) -> Result<StepReport, DispatchError> {
        let mut report = StepReport::default();
        for delivery in self.store.receipts_overdue(now, 500).await? {
            let followup = self.fallback(&delivery).await?;
            let status = ReceiptStatus::Failed(FailureKind::NoReceipt);
            if self
                .store
                .record_receipt(
                    &delivery,
                    status,
                    "no delivery receipt within the receipt window",
                    &followup,
                    now,
                )
                .await?
            {
                report.receipts_overdue += 1;
                count_followup(&mut report, &followup);
            }
        }
        Ok(report)
    }

    /// Claims due deliveries of every channel from the provider its breaker and limits allow
    /// (up to `room` in all), with what sending them needs; and when held-back work may go.
    async fn claim(&self, now: DateTime<Utc>, room: u32) -> Result<(Vec<Work>, Option<DateTime<Utc>>), DispatchError> {
        let mut held_until: Option<DateTime<Utc>> = None;
        let mut hold = |at: Option<DateTime<Utc>>| {
            if let Some(at) = at {
                held_until = Some(held_until.map_or(at, |h: DateTime<Utc>| h.min(at)));
            }
        };
        let health = self.health().await?;
        let lease_until = now + chrono::Duration::seconds(self.settings.lease_seconds as i64);
        let mut claimed: Vec<(Arc<ProviderHandle>, Delivery)> = Vec::new();
        for channel in Channel::ALL.iter().copied() {
            let left = room.saturating_sub(claimed.len() as u32);
            if left == 0 {
                break;
            }
            let (handle, want, trial_only) = match self.choose(channel, &health, now, left) {
                Ok(choice) => choice,
                Err(reopens) => {
                    hold(reopens);
                    continue;
                }
            };
            // A half-open breaker lets one trial through across every instance.
            let trial;
            let limits = if trial_only {
                trial = LimitSettings {
                    max_in_flight: 1,
                    ..handle.limits.clone()
                };
                &trial
            } else {
                &handle.limits
            };
            let got = self
                .store
                .claim_for_provider(&ProviderClaim {
                    channel,
                    provider: &handle.name,
                    want,
                    limits,
                    now,
                    lease_until,
                })
                .await?;
            hold(got.limited_until);
            claimed.extend(got.deliveries.into_iter().map(|d| (handle.clone(), d)));
        }
        if claimed.is_empty() {
            return Ok((Vec::new(), held_until));
        }
        let references = self.references(claimed.iter().map(|(_, d)| &d.incident_id)).await?;
        let ids: Vec<NoticeId> = claimed.iter().map(|(_, d)| d.notice_id.clone()).collect();
        let mut records: HashMap<NoticeId, NoticeRecord> = self
            .store
            .notice_records_by_id(&ids)
            .await?
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let work = claimed
            .into_iter()
            .map(|(handle, delivery)| Work {
                reference: references
                    .get(&delivery.incident_id)
                    .cloned()
                    .unwrap_or_else(|| Arc::from("")),
                record: records.remove(&delivery.notice_id),
                handle,
                delivery,
            })
            .collect();
        Ok((work, held_until))
    }

    /// One claim-send-record round: claims up to `concurrency` due deliveries, sends them
    /// concurrently and stores every outcome in one batch. For tests and single rounds;
    /// `serve`, the CLI and the benchmark stream work through [`Dispatcher::run`] and
    /// [`Dispatcher::drain`].
    pub async fn step(&self, now: DateTime<Utc>) -> Result<StepReport, DispatchError> {
        let mut report = if self.receipt_sweep_due() {
            self.expire_receipts(now).await?
        } else {
            StepReport::default()
        };
        let (work, _) = self.claim(now, self.settings.concurrency.max(1)).await?;
        let done = futures_util::future::join_all(work.into_iter().map(|w| self.send_work(w))).await;
        report += self.record(done).await?;
        Ok(report)
    }

    async fn send_work(&self, w: Work) -> Done {
        let result = self
            .send_one(&w.handle, &w.delivery, w.record.as_ref(), &w.reference)
            .await;
        self.note_health(&w.handle, &result);
        (w.handle, w.delivery, result)
    }

    /// Stores a batch of finished sends: outcomes, follow-ups and the providers' health.
    async fn record(&self, done: Vec<Done>) -> Result<StepReport, DispatchError> {
        let mut report = StepReport {
            claimed: done.len() as u64,
            ..Default::default()
        };
        if done.is_empty() {
            return Ok(report);
        }
        let mut records_out = Vec::with_capacity(done.len());
        let mut health_updates: HashMap<String, HealthUpdate> = HashMap::new();
        for (handle, delivery, result) in done {
            let h = health_updates
                .entry(handle.name.clone())
                .or_insert_with(|| HealthUpdate {
                    provider: handle.name.clone(),
                    successes: 0,
                    failures: 0,
                    last_failure: None,
                    threshold: handle.breaker.failure_threshold,
                    cooldown: chrono::Duration::seconds(handle.breaker.cooldown_seconds as i64),
                });
            let (outcome, followup) = match result {
                Ok((accepted, content_hash)) => {
                    h.successes += 1;
                    report.sent += 1;
                    let window = self.channels.receipt_timeout(delivery.channel);
                    let receipt_due_at = (handle.provider.reports_delivery() && !window.is_zero())
                        .then(|| Utc::now() + chrono::Duration::from_std(window).unwrap_or_default());
                    let followup = if receipt_due_at.is_some() {
                        Followup::Nothing
                    } else {
                        Followup::Reached
                    };
                    (
                        AttemptOutcome::Accepted {
                            provider_message_id: accepted.provider_message_id,
                            content_hash,
                            receipt_due_at,
                        },
                        followup,
                    )
                }
                Err(e) => {
                    if e.kind.counts_against_provider() {
                        h.failures += 1;
                        h.last_failure = Some(e.kind);
                    }
                    self.failure(&delivery, &handle, e, &mut report).await?
                }
            };
            records_out.push(AttemptRecord {
                delivery,
                provider: handle.name.clone(),
                outcome,
                followup,
            });
        }
        let health_updates: Vec<HealthUpdate> = health_updates.into_values().collect();
        if health_updates.iter().any(|h| h.failures > 0)
            && let Ok(mut g) = self.health.lock()
        {
            // The breaker may have opened: read it again before the next claim.
            *g = None;
        }
        let stored = self.store.record_attempts(&records_out, &health_updates).await?;
        let lost = stored.iter().filter(|s| !**s).count();
        if lost > 0 {
            // Our lease ran out and another worker took the rows over: its outcomes stand.
            tracing::warn!(
                lost,
                "leases lost before outcomes were stored; those outcomes were discarded"
            );
        }
        Ok(report)
    }

    /// What a failed send means: a retry, a dead letter, or the end of this channel.
    async fn failure(
        &self,
        delivery: &Delivery,
        handle: &ProviderHandle,
        e: SendError,
        report: &mut StepReport,
    ) -> Result<(AttemptOutcome, Followup), DispatchError> {
        let SendError {
            kind,
            message,
            retry_after,
        } = e;
        if kind.class() == ErrorClass::Transient && delivery.attempts < self.settings.max_attempts as i64 {
            report.retried += 1;
            let at = Utc::now()
                + chrono::Duration::from_std(backoff(&self.settings, delivery.attempts, retry_after))
                    .unwrap_or_default();
            tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, provider = %handle.name, attempt = delivery.attempts, kind = kind.as_str(), error = %message, "send failed; will retry");
            return Ok((
                AttemptOutcome::Retry {
                    error: message,
                    kind,
                    at,
                },
                Followup::Nothing,
            ));
        }
        let followup = self.fallback(delivery).await?;
        count_followup(report, &followup);
        let outcome = if kind.class() == ErrorClass::Transient {
            report.dead += 1;
            tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, provider = %handle.name, kind = kind.as_str(), error = %message, "attempts used up; dead-lettered");
            AttemptOutcome::Dead { error: message, kind }
        } else {
            report.failed += 1;
            tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, provider = %handle.name, kind = kind.as_str(), error = %message, "send failed for good");
            AttemptOutcome::Failed { error: message, kind }
        };
        Ok((outcome, followup))
    }

    /// Renders the delivery's channel and sends it; `Ok` carries the hash of what was sent.
    async fn send_one(
        &self,
        handle: &ProviderHandle,
        delivery: &Delivery,
        record: Option<&NoticeRecord>,
        reference: &str,
    ) -> Result<(Accepted, String), SendError> {
        // Rendered now from the version's frozen inputs; the hash of what went out is stored.
        let record =
            record.ok_or_else(|| SendError::permanent("the delivery refers to a notice that does not exist"))?;
        let (notice, content_hash) = self
            .renderer
            .render_for_channel(record, delivery.channel)
            .await
            .map_err(|e| {
                tracing::error!(delivery = %delivery.id, error = %e, "rendering a notice failed");
                SendError::new(FailureKind::ProviderError, "the notice could not be rendered")
            })?;
        let outbound = Outbound {
            delivery,
            notice: &notice,
            reference,
            notice_url: &notice.url,
        };
        handle.provider.send(&outbound).await.map(|a| (a, content_hash))
    }

    /// Each incident's reference, looked up once per batch.
    async fn references<'a>(
        &self,
        incidents: impl Iterator<Item = &'a IncidentId>,
    ) -> Result<HashMap<IncidentId, Arc<str>>, DispatchError> {
        let known = |id: &IncidentId| -> Option<Arc<str>> {
            let cache = self
                .references
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            cache.get(id).cloned()
        };
        let mut references: HashMap<IncidentId, Arc<str>> = HashMap::new();
        for id in incidents {
            if references.contains_key(id) {
                continue;
            }
            let reference = match known(id) {
                Some(r) => r,
                None => {
                    let Some(incident) = self.store.incident(id.as_str()).await? else {
                        references.insert(id.clone(), Arc::from(""));
                        continue;
                    };
                    let r: Arc<str> = incident.reference.into();
                    self.references
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(id.clone(), r.clone());
                    r
                }
            };
            references.insert(id.clone(), reference);
        }
        Ok(references)
    }

    /// The merchant's next channel of the plan, skipping channels this version already used
    /// (a version is never sent twice on a channel), or unreachable.
    async fn fallback(&self, delivery: &Delivery) -> Result<Followup, DispatchError> {
        let affected = self
            .store
            .affected_merchant(&delivery.incident_id, &delivery.merchant_id)
            .await?;
        let merchant = self.store.merchant(&delivery.merchant_id).await?;
        let used = self
            .store
            .version_channels(&delivery.draft_id, &delivery.merchant_id)
            .await?;
        let next = match (affected, merchant) {
            (Some(a), Some(m)) => next_delivery_skipping(
                &delivery.incident_id,
                &delivery.draft_id,
                &delivery.notice_id,
                &a,
                &m,
                delivery.plan_position,
                &used,
            ),
            _ => None,
        };
        Ok(match next {
            Some(n) => Followup::Fallback(n),
            None => Followup::Unreachable,
        })
    }

    /// Applies a receipt from one of `providers`: confirms delivery, or ends the channel and
    /// moves the merchant on. Returns `None` if no delivery of theirs matches, else whether
    /// anything changed.
    pub async fn apply_receipt(&self, receipt: &Receipt, providers: &[&str]) -> Result<Option<bool>, DispatchError> {
        // A notice's Message-ID names its delivery (checked against the delivery's key).
        let named = match &receipt.key {
            ReceiptKey::ProviderMessageId(mid) => crate::channels::delivery_named_by(mid).map(|id| (mid, id)),
            ReceiptKey::DeliveryId(_) => None,
        };
        let found = match named {
            Some((mid, id)) => self
                .store
                .delivery_for_receipt(&ReceiptKey::DeliveryId(id.to_string()), providers)
                .await?
                .filter(|d| crate::channels::names_delivery(mid, d)),
            None => self.store.delivery_for_receipt(&receipt.key, providers).await?,
        };
        let Some(delivery) = found else {
            return Ok(None);
        };
        let followup = match receipt.status {
            ReceiptStatus::Failed(_)
                if matches!(
                    delivery.status,
                    DeliveryStatus::Accepted | DeliveryStatus::Delivered | DeliveryStatus::Sending
                ) =>
            {
                self.fallback(&delivery).await?
            }
            _ => Followup::Nothing,
        };
        let changed = self
            .store
            .record_receipt(&delivery, receipt.status, &receipt.detail, &followup, Utc::now())
            .await?;
        tracing::info!(delivery = %delivery.id, channel = %delivery.channel, status = ?receipt.status, changed, "receipt recorded");
        Ok(Some(changed))
    }

    /// Streams deliveries until no delivery of `incident` (or of any incident) is open or
    /// `limit` passed. For the CLI, the demo and the benchmark; `serve` runs
    /// [`Dispatcher::run`].
    pub async fn drain(&self, incident: Option<&IncidentId>, limit: Duration) -> Result<StepReport, DispatchError> {
        let (_keep, stop) = tokio::sync::watch::channel(false);
        let until = Until {
            incident: incident.cloned(),
            deadline: tokio::time::Instant::now() + limit,
        };
        self.stream(stop, None, Some(until)).await
    }

    /// The worker of `serve`: streams deliveries until `stop` turns true. On stop nothing new
    /// is claimed, claimed rows not yet sent go back to the outbox, and sends in flight finish
    /// and are recorded before this returns (SIGTERM drains cleanly). `wake` starts a round at
    /// once (a dispatch was requested).
    pub async fn run(&self, stop: tokio::sync::watch::Receiver<bool>, wake: Arc<tokio::sync::Notify>) {
        if let Err(e) = self.stream(stop, Some(wake), None).await {
            tracing::error!(error = %e, "the delivery worker stopped");
        }
    }

    /// The delivery engine: claims in batches of `delivery.batch`, keeps `delivery.concurrency`
    /// sends in flight (spread over the runtime's threads), and records what finished in
    /// batches on a task of its own, so the store's work overlaps the sends.
    async fn stream(
        &self,
        mut stop: tokio::sync::watch::Receiver<bool>,
        wake: Option<Arc<tokio::sync::Notify>>,
        until: Option<Until>,
    ) -> Result<StepReport, DispatchError> {
        let concurrency = self.settings.concurrency.max(1) as usize;
        let batch = (self.settings.batch as usize).max(concurrency);
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
        let recorder = tokio::spawn(self.clone().recorder(done_rx));
        // The claimer fills a queue of at most `batch` claimed deliveries on a task of its own,
        // so finished sends are replaced at once while the store works on the next claim.
        let (work_tx, mut work_rx) = tokio::sync::mpsc::channel::<Work>(batch);
        let claimer = tokio::spawn(self.clone().claimer(work_tx, stop.clone(), wake, until));
        let mut inflight: JoinSet<Done> = JoinSet::new();
        let mut queue_open = true;
        let mut stopping = false;
        while queue_open || !inflight.is_empty() {
            tokio::select! {
                work = work_rx.recv(), if queue_open && !stopping && inflight.len() < concurrency => match work {
                    Some(w) => {
                        let this = self.clone();
                        inflight.spawn(async move {
                            let w = this.reroute(w).await;
                            this.send_work(w).await
                        });
                    }
                    None => queue_open = false,
                },
                joined = inflight.join_next(), if !inflight.is_empty() => {
                    if let Some(joined) = joined {
                        forward(joined, &done_tx);
                    }
                }
                changed = stop.changed(), if !stopping => {
                    let _ = changed;
                    stopping = true;
                    queue_open = false;
                }
            }
        }
        // Stopping: what was claimed but not sent goes back; what was in flight finished above.
        work_rx.close();
        let mut unsent = Vec::new();
        while let Some(w) = work_rx.recv().await {
            unsent.push(w.delivery);
        }
        if !unsent.is_empty() {
            match self.store.release_claims(&unsent).await {
                Ok(n) => tracing::info!(released = n, "claimed deliveries not yet sent went back to the outbox"),
                Err(e) => tracing::error!(error = %e, "releasing claims failed; their leases will run out"),
            }
        }
        drop(done_tx);
        let (mut report, claim_error) = match claimer.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the claimer panicked");
                (StepReport::default(), None)
            }
        };
        match recorder.await {
            Ok((total, error)) => {
                report += total;
                if let Some(e) = error.or(claim_error)
                    && !stopping
                {
                    return Err(e);
                }
            }
            Err(e) => tracing::error!(error = %e, "the recorder panicked"),
        }
        Ok(report)
    }

    /// Records finished sends in batches of whatever has arrived, until the senders are done.
    async fn recorder(
        self,
        mut done_rx: tokio::sync::mpsc::UnboundedReceiver<Done>,
    ) -> (StepReport, Option<DispatchError>) {
        let mut total = StepReport::default();
        let mut first_error = None;
        while let Some(first) = done_rx.recv().await {
            let mut done = vec![first];
            let linger_until = tokio::time::Instant::now() + RECORD_LINGER;
            while done.len() < RECORD_BATCH {
                match tokio::time::timeout_at(linger_until, done_rx.recv()).await {
                    Ok(Some(d)) => done.push(d),
                    Ok(None) | Err(_) => break,
                }
            }
            match self.record(done).await {
                Ok(r) => total += r,
                Err(e) => {
                    // The rows stay `sending`; their leases run out and they are sent again.
                    tracing::error!(error = %e, "outcomes could not be recorded; their deliveries will be retried");
                    first_error.get_or_insert(e);
                }
            }
        }
        (total, first_error)
    }

    /// Claims work into `queue` whenever half of it has room; sweeps overdue receipts; sleeps
    /// while nothing is due. Ends on `stop`, or (draining) once nothing is open.
    async fn claimer(
        self,
        queue: tokio::sync::mpsc::Sender<Work>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        wake: Option<Arc<tokio::sync::Notify>>,
        until: Option<Until>,
    ) -> (StepReport, Option<DispatchError>) {
        let mut report = StepReport::default();
        let half = (queue.max_capacity() / 2).max(1);
        loop {
            if *stop.borrow() {
                break;
            }
            if self.receipt_sweep_due() {
                match self.expire_receipts(Utc::now()).await {
                    Ok(r) => report += r,
                    Err(e) => tracing::error!(error = %e, "looking for overdue receipts failed"),
                }
            }
            // Wait for room for half a queue, then claim as much as there is room for.
            let permits = tokio::select! {
                permits = queue.reserve_many(half) => match permits {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = stop.changed() => break,
            };
            drop(permits);
            let room = queue.capacity() as u32;
            let (work, held_until) = match self.claim(Utc::now(), room).await {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::error!(error = %e, "claiming deliveries failed");
                    if until.is_some() {
                        return (report, Some(e));
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if !work.is_empty() {
                let mut work = work.into_iter();
                while let Some(w) = work.next() {
                    if let Err(refused) = queue.send(w).await {
                        // Stopping while this claim was under way: give it back.
                        let unsent: Vec<Delivery> = std::iter::once(refused.0.delivery)
                            .chain(work.map(|w| w.delivery))
                            .collect();
                        if let Err(e) = self.store.release_claims(&unsent).await {
                            tracing::error!(error = %e, "releasing claims failed; their leases will run out");
                        }
                        return (report, None);
                    }
                }
                continue;
            }
            if let Some(u) = &until {
                // Done once nothing is open (sends in flight and unrecorded outcomes count).
                match self.store.open_deliveries(u.incident.as_ref()).await {
                    Ok(0) => break,
                    Ok(_) if tokio::time::Instant::now() >= u.deadline => break,
                    Ok(_) => {}
                    Err(e) => return (report, Some(e.into())),
                }
            }
            let mut wait = match self.idle_wait(held_until).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::error!(error = %e, "finding the next due delivery failed");
                    Duration::from_secs(1)
                }
            };
            if until.is_some() {
                // Draining: the last sends' outcomes are about to be recorded; look again soon.
                wait = wait.min(DRAIN_POLL);
            }
            let woken = async {
                match &wake {
                    Some(w) => w.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = woken => {}
                _ = stop.changed() => break,
            }
        }
        (report, None)
    }

    /// How long to wait for the next delivery to fall due or held-back work to go (bounded).
    async fn idle_wait(&self, held_until: Option<DateTime<Utc>>) -> Result<Duration, DispatchError> {
        let now = Utc::now();
        let due = self.store.next_due().await?;
        // Work already due but not claimed is held back by a limit or a breaker: wait for that.
        let next = match (due, held_until) {
            (Some(d), Some(h)) if d <= now => Some(h),
            (Some(d), Some(h)) => Some(d.min(h)),
            (d, h) => d.or(h),
        };
        Ok(next
            .map(|at| (at - now).to_std().unwrap_or_default())
            .unwrap_or(Duration::from_secs(5))
            .clamp(Duration::from_millis(5), Duration::from_secs(5)))
    }
}

/// Passes a finished send on to the recorder (a panicked send is left to its lease).
fn forward(joined: Result<Done, tokio::task::JoinError>, to: &tokio::sync::mpsc::UnboundedSender<Done>) {
    match joined {
        Ok(done) => {
            let _ = to.send(done);
        }
        Err(e) => tracing::error!(error = %e, "a send panicked; its lease will run out and it is sent again"),
    }
}

/// A claimed delivery with what sending it needs.
struct Work {
    handle: Arc<ProviderHandle>,
    delivery: Delivery,
    record: Option<NoticeRecord>,
    reference: Arc<str>,
}

/// A finished send: provider, delivery, and the hash of what was sent or why it failed.
type Done = (Arc<ProviderHandle>, Delivery, Result<(Accepted, String), SendError>);

/// When [`Dispatcher::drain`] stops.
struct Until {
    incident: Option<IncidentId>,
    deadline: tokio::time::Instant,
}

/// How long the recorder waits for more outcomes to store in one transaction (a commit costs
/// about as much as a few hundred rows). The price on a crash: sends accepted in the last
/// moments and not yet recorded are sent again once their lease runs out (with the same
/// Message-ID or idempotency key), as any send in flight is.
const RECORD_LINGER: Duration = Duration::from_millis(25);
/// How often a drain looks whether the last outcomes were recorded.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Outcomes recorded in one transaction at most.
const RECORD_BATCH: usize = 2000;

fn count_followup(report: &mut StepReport, followup: &Followup) {
    match followup {
        Followup::Fallback(_) => report.fell_back += 1,
        Followup::Unreachable => report.unreachable += 1,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DeliverySettings {
        crate::config::Settings::defaults().expect("defaults").delivery
    }

    #[test]
    fn backoff_is_bounded_and_honours_retry_after() {
        let s = settings();
        for attempt in 1..40 {
            let d = backoff(&s, attempt, None);
            assert!(d <= Duration::from_millis(s.backoff_max_ms), "attempt {attempt}: {d:?}");
        }
        assert!(backoff(&s, 1, Some(Duration::from_secs(90))) >= Duration::from_secs(90));
        assert_eq!(backoff(&s, 1, Some(Duration::from_secs(u64::MAX / 2))), MAX_RETRY_AFTER);
    }

    #[test]
    fn the_next_delivery_skips_to_the_following_channel() {
        let merchant = Merchant {
            id: "m-1".parse().expect("id"),
            name: "x".into(),
            kind: MerchantKind::Enterprise,
            locale: Locale::En,
            region: "SG".into(),
            email: Some("a@example.com".parse().expect("email")),
            phone: Some("+6590000000".parse().expect("phone")),
            push_token: None,
            postal_address: None,
            holdings: Default::default(),
            created_at: None,
            last_active_at: None,
            marketing_opt_out: false,
            people: Default::default(),
        };
        let incident = IncidentId::generate();
        let affected = AffectedMerchant {
            incident_id: incident.clone(),
            merchant_id: merchant.id.clone(),
            class_no: 1,
            region: "SG".into(),
            exposed: vec![],
            risk: RiskLevel::High,
            risk_reasons: vec![],
            notice_required: true,
            notice_reason: String::new(),
            channel_plan: vec![Channel::Email, Channel::Sms],
            locale: Locale::En,
            reachability: Reachability::Pending,
            reached_channel: None,
        };
        let (draft, notice) = (DraftId::generate(), NoticeId::generate());
        let first = next_delivery(&incident, &draft, &notice, &affected, &merchant, -1).expect("email");
        assert_eq!((first.channel, first.plan_position), (Channel::Email, 0));
        let second = next_delivery(&incident, &draft, &notice, &affected, &merchant, 0).expect("sms");
        assert_eq!((second.channel, second.address.as_str()), (Channel::Sms, "+6590000000"));
        assert!(next_delivery(&incident, &draft, &notice, &affected, &merchant, 1).is_none());
    }
}
