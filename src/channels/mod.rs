//! Channels: one [`Transport`] per channel, chosen from the configuration. Each send reports
//! success with the provider's message id, or a failure classified as transient (worth a
//! retry, with the provider's `Retry-After` if it gave one) or permanent (move on to the
//! merchant's next channel).

mod email;
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendError {
    pub class: ErrorClass,
    /// What went wrong, without the recipient's address.
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl SendError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelSetupError {
    #[error("{channel} transport: {reason}")]
    Setup { channel: &'static str, reason: String },
}

#[async_trait]
pub trait Transport: Send + Sync {
    /// Sends one message; `Ok` carries the provider's message id if it gave one.
    async fn send(&self, message: &Outbound<'_>) -> Result<Option<String>, SendError>;
}

/// The transports of every channel.
#[derive(Clone)]
pub struct ChannelSet {
    pub email: Arc<dyn Transport>,
    pub sms: Arc<dyn Transport>,
    pub push: Arc<dyn Transport>,
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

    pub fn get(&self, channel: Channel) -> &Arc<dyn Transport> {
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
