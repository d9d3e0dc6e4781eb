//! Channels: providers per channel, chosen from the configuration. Each send reports
//! success with the provider's message id, or a failure classified as transient (worth a
//! retry, with the provider's `Retry-After` if it gave one) or permanent (move on to the
//! merchant's next channel).

pub mod aliyun;
pub mod apns;
mod dkim;
pub mod dsn;
mod email;
pub mod fcm;
pub mod jwt;
pub mod smtp;
pub mod twilio;
mod webhook;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::{BreakerSettings, LimitSettings, ProviderSettings, Settings};
use crate::domain::Channel;
pub use crate::model::FailureKind;
use crate::model::{Delivery, ErrorClass, Notice};

pub use email::{EmailTransport, Mail, MailAttachment, delivery_named_by, names_delivery};
pub(crate) use webhook::client_builder as http_client_builder;
pub(crate) use webhook::without_url;
pub use webhook::{WebhookTransport, sign};

/// One message to send: the outbox row and the notice it carries.
pub struct Outbound<'a> {
    pub delivery: &'a Delivery,
    pub notice: &'a Notice,
    pub reference: &'a str,
    /// Where the full notice can be read (push and SMS link there).
    pub notice_url: &'a str,
}

/// A provider took the message. Whether it later reached the merchant is a receipt's business.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accepted {
    /// The provider's id for the message (Twilio's MessageSid, the email `Message-ID`, ...):
    /// receipts are matched to deliveries by it.
    pub provider_message_id: Option<String>,
}

impl Accepted {
    pub fn with_id(id: impl Into<String>) -> Self {
        Self {
            provider_message_id: Some(id.into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub kind: FailureKind,
    /// What went wrong, without the recipient's address or number.
    pub message: String,
    /// The provider's `Retry-After`, if it gave one.
    pub retry_after: Option<Duration>,
}

impl SendError {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
    /// A provider-side failure worth retrying.
    pub fn transient(message: impl Into<String>) -> Self {
        Self::new(FailureKind::ProviderError, message)
    }
    /// The recipient or message was refused.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self::new(FailureKind::Rejected, message)
    }
    pub fn retry_after(mut self, after: Option<Duration>) -> Self {
        self.retry_after = after;
        self
    }
    pub fn class(&self) -> ErrorClass {
        self.kind.class()
    }
}

/// What a provider's callback (or bounce) says about a message it accepted earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// How to find the delivery.
    pub key: ReceiptKey,
    pub status: ReceiptStatus,
    /// The provider's status words (e.g. Twilio's `undelivered` with error code 30003), no
    /// personal data.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptKey {
    /// The id the provider gave when it accepted (Twilio MessageSid, Aliyun BizId, Message-ID).
    ProviderMessageId(String),
    /// Our delivery id, echoed back by providers that carry one (Aliyun `out_id`).
    DeliveryId(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptStatus {
    /// The message reached the recipient's device or mailbox.
    Delivered,
    /// It did not and will not (a permanent failure of this channel for this merchant).
    Failed(FailureKind),
    /// Still on its way (queued, sent to carrier, delayed): recorded, nothing changes.
    InProgress,
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelSetupError {
    #[error("{channel} transport: {reason}")]
    Setup { channel: &'static str, reason: String },
}

/// One provider of one channel: SMTP relay, Twilio, FCM, ... Each is built from its settings
/// with a configurable base URL.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Sends one message; `Ok` means the provider accepted it.
    async fn send(&self, message: &Outbound<'_>) -> Result<Accepted, SendError>;
    /// Whether this provider reports delivery later (status callbacks, delivery reports), so
    /// an accepted message waits for its receipt before the merchant counts as reached.
    fn reports_delivery(&self) -> bool {
        false
    }
    /// Octets of message content the provider accepted so far, where the transport counts
    /// them (SMTP): a benchmark's reference must move messages of the same size.
    fn accepted_octets(&self) -> Option<u64> {
        None
    }
    /// Sends a free text outside any notice (a deadline reminder to a responder), under the
    /// idempotency key `key`. Providers that send only pre-approved templates (Aliyun SMS)
    /// and push providers refuse.
    async fn send_text(&self, to: &str, text: &str, key: &str) -> Result<Accepted, SendError> {
        let _ = (to, text, key);
        Err(SendError::permanent("this provider sends notices only, not free text"))
    }
}

/// One configured provider of one channel, with its limits and breaker settings.
pub struct ProviderHandle {
    /// The configured name (`[providers.NAME]`), or the channel's name for the channel's own
    /// `transport`.
    pub name: String,
    pub channel: Channel,
    pub provider: Arc<dyn Provider>,
    pub limits: LimitSettings,
    pub breaker: BreakerSettings,
}

/// The providers of every channel, in failover order.
#[derive(Clone)]
pub struct ChannelSet {
    by_channel: HashMap<Channel, Vec<Arc<ProviderHandle>>>,
    receipt_timeouts: HashMap<Channel, Duration>,
}

impl ChannelSet {
    /// Builds the providers the settings name; file providers write under `data_dir/outbox`.
    pub fn from_settings(settings: &Settings, data_dir: &Path) -> Result<Self, ChannelSetupError> {
        let outbox = data_dir.join("outbox");
        let mut by_channel = HashMap::new();
        for (channel, names) in [
            (Channel::Email, &settings.email.providers),
            (Channel::Sms, &settings.sms.providers),
            (Channel::Push, &settings.push.providers),
        ] {
            let dir = outbox.join(channel.as_str());
            let handles = if names.is_empty() {
                vec![Arc::new(ProviderHandle {
                    name: channel.as_str().to_owned(),
                    channel,
                    provider: default_provider(settings, channel, &dir)?,
                    limits: LimitSettings::default(),
                    breaker: BreakerSettings::default(),
                })]
            } else {
                let mut seen = HashSet::new();
                names
                    .iter()
                    .map(|name| {
                        if !seen.insert(name) {
                            return Err(setup_err(
                                channel.as_str(),
                                format!("provider {name:?} is listed twice"),
                            ));
                        }
                        let p = settings.providers.get(name).ok_or_else(|| {
                            setup_err(
                                channel.as_str(),
                                format!("{channel}.providers names {name:?}, which no [providers.{name}] defines"),
                            )
                        })?;
                        Ok(Arc::new(ProviderHandle {
                            name: name.clone(),
                            channel,
                            provider: named_provider(settings, name, p, channel, &dir)?,
                            limits: p.limits.clone(),
                            breaker: p.breaker.clone(),
                        }))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
            by_channel.insert(channel, handles);
        }
        let receipt_timeouts = HashMap::from([
            (
                Channel::Email,
                Duration::from_secs(settings.email.receipt_timeout_seconds),
            ),
            (Channel::Sms, Duration::from_secs(settings.sms.receipt_timeout_seconds)),
            (
                Channel::Push,
                Duration::from_secs(settings.push.receipt_timeout_seconds),
            ),
        ]);
        Ok(Self {
            by_channel,
            receipt_timeouts,
        })
    }

    /// The channel's providers in failover order.
    pub fn providers(&self, channel: Channel) -> &[Arc<ProviderHandle>] {
        self.by_channel.get(&channel).map(Vec::as_slice).unwrap_or_default()
    }

    /// A provider by its configured name.
    pub fn provider(&self, name: &str) -> Option<&Arc<ProviderHandle>> {
        self.by_channel.values().flatten().find(|h| h.name == name)
    }

    /// Every provider of every channel.
    pub fn all(&self) -> impl Iterator<Item = &Arc<ProviderHandle>> {
        self.by_channel.values().flatten()
    }

    /// How long an accepted message of `channel` may wait for its receipt (providers that send
    /// receipts only).
    pub fn receipt_timeout(&self, channel: Channel) -> Duration {
        self.receipt_timeouts.get(&channel).copied().unwrap_or_default()
    }
}

/// The channel's own `transport` (file, smtp or webhook), used when it lists no providers.
fn default_provider(settings: &Settings, channel: Channel, dir: &Path) -> Result<Arc<dyn Provider>, ChannelSetupError> {
    Ok(match channel {
        Channel::Email => Arc::new(EmailTransport::from_settings(&settings.email, dir)?),
        Channel::Sms => Arc::new(WebhookTransport::from_settings(channel, &settings.sms, dir)?),
        Channel::Push => Arc::new(WebhookTransport::from_settings(channel, &settings.push, dir)?),
    })
}

fn named_provider(
    settings: &Settings,
    name: &str,
    p: &ProviderSettings,
    channel: Channel,
    dir: &Path,
) -> Result<Arc<dyn Provider>, ChannelSetupError> {
    let which = channel.as_str();
    let missing = |table: &str| {
        setup_err(
            which,
            format!("providers.{name}: kind {table:?} needs a [providers.{name}.{table}] table"),
        )
    };
    let wrong = || {
        setup_err(
            which,
            format!("providers.{name}: a {} provider cannot carry {channel}", p.kind),
        )
    };
    Ok(match (p.kind.as_str(), channel) {
        ("file", Channel::Email) => {
            let mut email = settings.email.clone();
            email.transport = "file".into();
            Arc::new(EmailTransport::from_settings(&email, dir)?)
        }
        ("file", _) => {
            let mut s = settings.sms.clone();
            s.transport = "file".into();
            Arc::new(WebhookTransport::from_settings(channel, &s, dir)?)
        }
        ("smtp", Channel::Email) => {
            let mut email = settings.email.clone();
            email.transport = "smtp".into();
            email.smtp = p.smtp.clone().ok_or_else(|| missing("smtp"))?;
            Arc::new(EmailTransport::from_settings(&email, dir)?)
        }
        ("webhook", Channel::Sms | Channel::Push) => {
            let w = p.webhook.as_ref().ok_or_else(|| missing("webhook"))?;
            let mut s = settings.sms.clone();
            s.transport = "webhook".into();
            s.url = w.url.clone();
            s.signing_secret = w.signing_secret.clone();
            s.timeout_seconds = w.timeout_seconds;
            Arc::new(WebhookTransport::from_settings(channel, &s, dir)?)
        }
        ("twilio", Channel::Sms) => Arc::new(twilio::TwilioProvider::from_settings(
            p.twilio.as_ref().ok_or_else(|| missing("twilio"))?,
        )?),
        ("aliyun_sms", Channel::Sms) => Arc::new(aliyun::AliyunProvider::from_settings(
            p.aliyun_sms.as_ref().ok_or_else(|| missing("aliyun_sms"))?,
        )?),
        ("fcm", Channel::Push) => Arc::new(fcm::FcmProvider::from_settings(
            p.fcm.as_ref().ok_or_else(|| missing("fcm"))?,
        )?),
        ("apns", Channel::Push) => Arc::new(apns::ApnsProvider::from_settings(
            p.apns.as_ref().ok_or_else(|| missing("apns"))?,
        )?),
        ("smtp" | "webhook" | "twilio" | "aliyun_sms" | "fcm" | "apns", _) => return Err(wrong()),
        (other, _) => {
            return Err(setup_err(
                which,
                format!(
                    "providers.{name}.kind: unknown kind {other:?}; expected file, smtp, webhook, twilio, aliyun_sms, fcm, apns"
                ),
            ));
        }
    })
}

pub(crate) fn setup_err(channel: &'static str, reason: impl ToString) -> ChannelSetupError {
    ChannelSetupError::Setup {
        channel,
        reason: reason.to_string(),
    }
}
