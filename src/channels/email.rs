//! Email through lettre: SMTP (pooled, plain / STARTTLS / implicit TLS, optional AUTH) or
//! lettre's file transport (the embedded default: one `.eml` per message). The `Message-ID`
//! is derived from the delivery's idempotency key, so a resend after a crash is recognisable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use lettre::message::{Mailbox, MultiPart, header};
use lettre::transport::smtp::PoolConfig;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use super::{Accepted, ChannelSetupError, FailureKind, Outbound, Provider, SendError, setup_err};
use crate::config::EmailSettings;
use crate::ledger::content_hash;

enum Inner {
    File(AsyncFileTransport<Tokio1Executor>, PathBuf),
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
}

pub struct EmailTransport {
    inner: Inner,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    id_domain: String,
}

impl EmailTransport {
    pub fn from_settings(s: &EmailSettings, file_dir: &Path) -> Result<Self, ChannelSetupError> {
        let from: Mailbox = s
            .from
            .parse()
            .map_err(|e| setup_err("email", format!("email.from: {e}")))?;
        let reply_to = s
            .reply_to
            .as_deref()
            .map(|r| {
                r.parse::<Mailbox>()
                    .map_err(|e| setup_err("email", format!("email.reply_to: {e}")))
            })
            .transpose()?;
        let inner = match s.transport.as_str() {
            "smtp" => {
                let smtp = &s.smtp;
                let mut builder = match smtp.tls.as_str() {
                    "tls" => {
                        AsyncSmtpTransport::<Tokio1Executor>::relay(&smtp.host).map_err(|e| setup_err("email", e))?
                    }
                    "starttls" => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&smtp.host)
                        .map_err(|e| setup_err("email", e))?,
                    _ => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host),
                };
                builder = builder
                    .port(smtp.port)
                    .timeout(Some(Duration::from_secs(smtp.timeout_seconds)))
                    .pool_config(PoolConfig::new().max_size(smtp.pool_size));
                if !smtp.username.is_empty() {
                    builder = builder.credentials(Credentials::new(
                        smtp.username.clone(),
                        smtp.password.expose().to_owned(),
                    ));
                }
                Inner::Smtp(builder.build())
            }
            _ => {
                std::fs::create_dir_all(file_dir)
                    .map_err(|e| setup_err("email", format!("{}: {e}", file_dir.display())))?;
                Inner::File(AsyncFileTransport::<Tokio1Executor>::new(file_dir), file_dir.to_owned())
            }
        };
        let id_domain = from.email.domain().to_owned();
        Ok(Self {
            inner,
            from,
            reply_to,
            id_domain,
        })
    }

    /// Where the file transport writes, if it is the file transport.
    pub fn file_dir(&self) -> Option<&Path> {
        match &self.inner {
            Inner::File(_, dir) => Some(dir),
            Inner::Smtp(_) => None,
        }
    }

    /// Builds a text + HTML message; the `Message-ID` is derived from the mail's key.
    fn build(&self, mail: &Mail<'_>) -> Result<Message, SendError> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|_| SendError::permanent("the recipient address is not a valid mailbox"))?;
        let message_id = format!("<{}@{}>", &content_hash(mail.key.as_bytes())[..32], self.id_domain);
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.to_owned())
            .message_id(Some(message_id))
            .raw_header(header::HeaderValue::new(
                header::HeaderName::new_from_ascii_str("Content-Language"),
                mail.language.to_owned(),
            ))
            .user_agent("Tocsin".to_owned());
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(reply_to.clone());
        }
        // A mandatory security notice: deliberately no List-Unsubscribe header.
        builder
            .multipart(MultiPart::alternative_plain_html(
                mail.text.to_owned(),
                mail.html.to_owned(),
            ))
            .map_err(|e| SendError::permanent(format!("building the message: {e}")))
    }

    /// Sends a mail (a notice, or a regulator filing) through the configured transport.
    pub async fn send_mail(&self, mail: &Mail<'_>) -> Result<Option<String>, SendError> {
        if undeliverable_domain(mail.to) {
            return Err(SendError::permanent(
                "the recipient's domain is reserved as invalid and can never receive mail",
            ));
        }
        let message = self.build(mail)?;
        match &self.inner {
            Inner::File(t, _) => t
                .send(message)
                .await
                .map(Some)
                .map_err(|e| SendError::transient(format!("writing the message file: {e}"))),
            Inner::Smtp(t) => t
                .send(message)
                .await
                .map(|r| r.message().next().map(str::to_owned))
                .map_err(|e| classify(&e)),
        }
    }
}

/// One email: recipient, content, language, and the key its `Message-ID` derives from.
pub struct Mail<'a> {
    pub to: &'a str,
    pub subject: &'a str,
    pub text: &'a str,
    pub html: &'a str,
    pub language: &'a str,
    pub key: &'a str,
}

/// Domains reserved by RFC 2606 / RFC 6761 as never resolvable can never receive mail.
fn undeliverable_domain(address: &str) -> bool {
    let domain = address
        .rsplit_once('@')
        .map(|(_, d)| d.to_ascii_lowercase())
        .unwrap_or_default();
    domain == "invalid" || domain.ends_with(".invalid")
}

#[async_trait]
impl Provider for EmailTransport {
    async fn send(&self, m: &Outbound<'_>) -> Result<Accepted, SendError> {
        let n = m.notice;
        self.send_mail(&Mail {
            to: &m.delivery.address,
            subject: &n.email_subject,
            text: &n.email_text,
            html: &n.email_html,
            language: n.locale.as_str(),
            key: &m.delivery.idempotency_key,
        })
        .await
        .map(|id| Accepted {
            provider_message_id: id,
        })
    }
}

/// Only a rejection of the recipient or the message is permanent for the merchant (550, 551,
/// 552, 553, 554). Other 5xx answers (530/535 authentication, 500-504 protocol) say the relay
/// or our configuration is wrong: retried, so fixing the configuration delivers them. Network
/// and TLS failures are transient.
fn classify(e: &lettre::transport::smtp::Error) -> SendError {
    let code = smtp_code(e);
    if e.is_permanent() && matches!(code.as_str(), "550" | "551" | "552" | "553" | "554") {
        SendError::permanent(format!("SMTP rejected the recipient or message: {code}"))
    } else if e.is_permanent() {
        SendError::new(
            FailureKind::Auth,
            format!("SMTP refused the relay (configuration or authentication?): {code}"),
        )
    } else if e.is_transient() {
        SendError::transient(format!("SMTP deferred the message: {code}"))
    } else {
        SendError::new(FailureKind::Network, format!("SMTP connection failed: {e}"))
    }
}

/// The SMTP status without the server's free text, which may echo the recipient's address.
fn smtp_code(e: &lettre::transport::smtp::Error) -> String {
    e.status().map(|c| c.to_string()).unwrap_or_else(|| "no status".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_invalid_domains_are_refused() {
        assert!(undeliverable_domain("a@example.invalid"));
        assert!(undeliverable_domain("a@EXAMPLE.INVALID"));
        assert!(!undeliverable_domain("a@invalid.example.com"));
    }
}
