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

use crate::channels::{Accepted, ChannelSet, Outbound, SendError};
use crate::config::DeliverySettings;
use crate::domain::*;
use crate::draft::{DraftError, NoticeRenderer, channel_hash};
use crate::model::*;
use crate::store::{AttemptOutcome, Followup, NewDelivery, Store, StoreError};

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
    pub sent: u64,
    pub retried: u64,
    pub failed: u64,
    pub fell_back: u64,
    pub unreachable: u64,
}

impl std::ops::AddAssign for StepReport {
    fn add_assign(&mut self, o: Self) {
        self.claimed += o.claimed;
        self.sent += o.sent;
        self.retried += o.retried;
        self.failed += o.failed;
        self.fell_back += o.fell_back;
        self.unreachable += o.unreachable;
    }
}

/// A delivery worker. `step` is one claim-send-record round that tests can drive directly.
#[derive(Clone)]
pub struct Dispatcher {
    store: Arc<dyn Store>,
    channels: ChannelSet,
    settings: DeliverySettings,
    renderer: Arc<NoticeRenderer>,
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
        }
    }

    /// Claims up to `concurrency` due deliveries under one lease, sends them concurrently and
    /// stores every outcome. Claiming no more than can be sent at once keeps every send well
    /// inside its lease, so a healthy worker never has its rows taken over.
    pub async fn step(&self, now: DateTime<Utc>) -> Result<StepReport, DispatchError> {
        let lease_until = now + chrono::Duration::seconds(self.settings.lease_seconds as i64);
        let claimed = self
            .store
            .claim_due(now, lease_until, self.settings.concurrency)
            .await?;
        let mut report = StepReport {
            claimed: claimed.len() as u64,
            ..Default::default()
        };
        // One lookup per incident in the batch, not one per delivery.
        let mut references: HashMap<IncidentId, Arc<str>> = HashMap::new();
        for d in &claimed {
            if !references.contains_key(&d.incident_id) {
                let reference = self
                    .store
                    .incident(d.incident_id.as_str())
                    .await?
                    .map(|i| i.reference)
                    .unwrap_or_default();
                references.insert(d.incident_id.clone(), reference.into());
            }
        }
        let mut tasks = JoinSet::new();
        for delivery in claimed {
            let this = self.clone();
            let reference = references
                .get(&delivery.incident_id)
                .cloned()
                .unwrap_or_else(|| Arc::from(""));
            tasks.spawn(async move { this.deliver(delivery, &reference).await });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(r)) => report += r,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "delivery could not be recorded; its lease will expire and it will be retried");
                    first_error.get_or_insert(e);
                }
                Err(e) => tracing::error!(error = %e, "delivery task panicked"),
            }
        }
        match first_error {
            Some(e) if report.sent + report.retried + report.failed == 0 => Err(e),
            _ => Ok(report),
        }
    }

    async fn deliver(&self, delivery: Delivery, reference: &str) -> Result<StepReport, DispatchError> {
        // Rendered now from the version's frozen inputs; the hash of what went out is stored.
        let notice = self
            .renderer
            .render_id(&delivery.notice_id)
            .await?
            .ok_or_else(|| DispatchError::MissingNotice(delivery.id.to_string()))?;
        let content_hash = channel_hash(&notice, delivery.channel);
        let outbound = Outbound {
            delivery: &delivery,
            notice: &notice,
            reference,
            notice_url: &notice.url,
        };
        let result = self.channels.get(delivery.channel).send(&outbound).await;
        let mut report = StepReport::default();
        let (outcome, followup) = match result {
            Ok(Accepted { provider_message_id }) => {
                report.sent = 1;
                tracing::info!(delivery = %delivery.id, channel = %delivery.channel, "notice sent");
                (
                    AttemptOutcome::Sent {
                        provider_message_id,
                        content_hash,
                    },
                    Followup::Reached,
                )
            }
            Err(SendError {
                kind,
                message,
                retry_after,
            }) if kind.class() == ErrorClass::Transient && delivery.attempts < self.settings.max_attempts as i64 => {
                report.retried = 1;
                let at = Utc::now()
                    + chrono::Duration::from_std(backoff(&self.settings, delivery.attempts, retry_after))
                        .unwrap_or_default();
                tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, attempt = delivery.attempts, error = %message, "send failed; will retry");
                (AttemptOutcome::Retry { error: message, at }, Followup::Nothing)
            }
            Err(SendError { kind, message, .. }) => {
                let class = kind.class();
                report.failed = 1;
                tracing::warn!(delivery = %delivery.id, channel = %delivery.channel, class = class.as_str(), error = %message, "send failed for good");
                let followup = self.fallback(&delivery).await?;
                match followup {
                    Followup::Fallback(_) => report.fell_back = 1,
                    Followup::Unreachable => report.unreachable = 1,
                    _ => {}
                }
                (AttemptOutcome::Failed { error: message, class }, followup)
            }
        };
        if !self.store.record_attempt(&delivery, &outcome, &followup).await? {
            // Our lease ran out and another worker took the row over: its outcome stands.
            tracing::warn!(delivery = %delivery.id, "lease lost before the outcome was stored; outcome discarded");
            return Ok(StepReport::default());
        }
        Ok(report)
    }

    async fn fallback(&self, delivery: &Delivery) -> Result<Followup, DispatchError> {
        let affected = self
            .store
            .affected_merchant(&delivery.incident_id, &delivery.merchant_id)
            .await?;
        let merchant = self.store.merchant(&delivery.merchant_id).await?;
        let next = match (affected, merchant) {
            (Some(a), Some(m)) => next_delivery(
                &delivery.incident_id,
                &delivery.draft_id,
                &delivery.notice_id,
                &a,
                &m,
                delivery.plan_position,
            ),
            _ => None,
        };
        Ok(match next {
            Some(n) => Followup::Fallback(n),
            None => Followup::Unreachable,
        })
    }

    /// Steps until no delivery of `incident` (or of any incident) is open, sleeping until the
    /// next one is due in between. For the CLI and the demo; `serve` runs steps on a schedule.
    pub async fn drain(&self, incident: Option<&IncidentId>, limit: Duration) -> Result<StepReport, DispatchError> {
        let started = tokio::time::Instant::now();
        let mut total = StepReport::default();
        loop {
            let r = self.step(Utc::now()).await?;
            total += r;
            if self.store.open_deliveries(incident).await? == 0 || started.elapsed() >= limit {
                return Ok(total);
            }
            if r.claimed == 0 {
                let wait = match self.store.next_due().await? {
                    Some(due) => (due - Utc::now()).to_std().unwrap_or_default(),
                    None => Duration::from_millis(50),
                };
                let remaining = limit.saturating_sub(started.elapsed());
                tokio::time::sleep(
                    wait.clamp(Duration::from_millis(5), Duration::from_secs(5))
                        .min(remaining),
                )
                .await;
            }
        }
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
