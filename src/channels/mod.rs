//! Channels: providers per channel, chosen from the configuration. Each send reports
//! success with the provider's message id, or a failure classified as transient (worth a
//! retry, with the provider's `Retry-After` if it gave one) or permanent (move on to the
//! merchant's next channel).

mod dkim;
pub mod dsn;
mod email;
pub mod smtp;
mod webhook;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::config::Settings;
use crate::domain::Channel;
use crate::model::{Delivery, ErrorClass, Notice};


pub use email::{EmailTransport, Mail};
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

/// Why a send or a delivery failed. The kind decides whether to retry (transient) or move on
/// (permanent), and whether it counts against the provider's health (circuit breaker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Could not connect, connection reset, TLS failure.
    Network,
    /// No answer in time.
    Timeout,
    /// The provider asked us to slow down (HTTP 429, SMTP 421/450-452 rate answers).
    Throttled,
    /// The provider failed (HTTP 5xx, SMTP 4xx).
    ProviderError,
    /// Our credentials or configuration were refused (HTTP 401/403, SMTP 530/535): retried,
    /// so fixing the configuration delivers; counts against the provider so the next is used.
    Auth,
    /// The recipient or the message was refused (invalid address or number, SMTP 550-554,
    /// other HTTP 4xx).
    Rejected,
    /// The push token is no longer registered (FCM UNREGISTERED, APNs 410).
    Unregistered,
    /// The message bounced after acceptance (a delivery status notification said failed).
    Bounced,
    /// The provider reported the message undelivered (Twilio `undelivered`/`failed`, Aliyun
    /// report with success=false).
    Undelivered,
    /// No delivery receipt arrived within the channel's receipt window.
    NoReceipt,
}

impl FailureKind {
    pub fn class(self) -> ErrorClass {
        match self {
            Self::Network | Self::Timeout | Self::Throttled | Self::ProviderError | Self::Auth => ErrorClass::Transient,
            Self::Rejected | Self::Unregistered | Self::Bounced | Self::Undelivered | Self::NoReceipt => {
                ErrorClass::Permanent
            }
        }
    }

    /// Failures that say the provider is unwell (not the recipient): they trip its breaker.
    pub fn counts_against_provider(self) -> bool {
        matches!(
            self,
            Self::Network | Self::Timeout | Self::Throttled | Self::ProviderError | Self::Auth
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Network => "network",
            Self::Timeout => "timeout",
            Self::Throttled => "throttled",
            Self::ProviderError => "provider_error",
            Self::Auth => "auth",
            Self::Rejected => "rejected",
            Self::Unregistered => "unregistered",
            Self::Bounced => "bounced",
            Self::Undelivered => "undelivered",
            Self::NoReceipt => "no_receipt",
        }
    }

    pub const ALL: [FailureKind; 10] = [
        Self::Network,
        Self::Timeout,
        Self::Throttled,
        Self::ProviderError,
        Self::Auth,
        Self::Rejected,
        Self::Unregistered,
        Self::Bounced,
        Self::Undelivered,
        Self::NoReceipt,
    ];
}

impl std::str::FromStr for FailureKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown failure kind {s:?}; expected one of {}", names.join(", "))
            })
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
}

/// The transports of every channel.
#[derive(Clone)]
pub struct ChannelSet {
    pub email: Arc<dyn Provider>,
    pub sms: Arc<dyn Provider>,
    pub push: Arc<dyn Provider>,
}

impl ChannelSet {
    /// Builds the transports the settings name; file transports write under `data_dir/outbox`.
    pub fn from_settings(settings: &Settings, data_dir: &Path) -> Result<Self, ChannelSetupError> {
        let outbox = data_dir.join("outbox");
        Ok(Self {
            email: Arc::new(EmailTransport::from_settings(&settings.email, &outbox.join("email"))?),
            sms: Arc::new(WebhookTransport::from_settings(
                Channel::Sms,
                &settings.sms,
                &outbox.join("sms"),
            )?),
            push: Arc::new(WebhookTransport::from_settings(
                Channel::Push,
                &settings.push,
                &outbox.join("push"),
            )?),
        })
    }

    pub fn get(&self, channel: Channel) -> &Arc<dyn Provider> {
        match channel {
            Channel::Email => &self.email,
            Channel::Sms => &self.sms,
            Channel::Push => &self.push,
        }
    }
}

fn setup_err(channel: &'static str, reason: impl ToString) -> ChannelSetupError {
    ChannelSetupError::Setup {
        channel,
        reason: reason.to_string(),
    }
}
