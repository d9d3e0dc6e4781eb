//! Email through lettre: SMTP through Tocsin's own connection pool ([`super::smtp`]: plain,
//! STARTTLS or implicit TLS, optional AUTH) or lettre's file transport (the embedded default:
//! one `.eml` per message). The `Message-ID` is derived from the delivery's idempotency key, so
//! a resend after a crash is recognisable, and it is the provider message id a bounce (DSN) is
//! matched by. Messages are DKIM-signed when configured.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use lettre::message::dkim::DkimConfig;
use lettre::message::header::{self, ContentTransferEncoding, ContentType};
use lettre::message::{Body, Mailbox, MultiPart};
use lettre::{AsyncFileTransport, AsyncTransport, Message, Tokio1Executor};

use super::smtp::SmtpPool;
use super::{Accepted, ChannelSetupError, Outbound, Provider, SendError, dkim, setup_err};
use crate::config::EmailSettings;
use crate::ledger::content_hash;

enum Inner {
    File(AsyncFileTransport<Tokio1Executor>, PathBuf),
    Smtp(SmtpPool),
}

pub struct EmailTransport {
    inner: Inner,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    id_domain: String,
    dkim: Option<DkimConfig>,
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
        let dkim = dkim::from_settings(s).map_err(|e| setup_err("email", e))?;
        let inner = match s.transport.as_str() {
            "smtp" => Inner::Smtp(SmtpPool::from_settings(&s.smtp).map_err(|e| setup_err("email", e))?),
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
            dkim,
        })
    }

    /// Where the file transport writes, if it is the file transport.
    pub fn file_dir(&self) -> Option<&Path> {
        match &self.inner {
            Inner::File(_, dir) => Some(dir),
            Inner::Smtp(_) => None,
        }
    }

    /// The SMTP pool, if the transport is SMTP.
    pub fn smtp_pool(&self) -> Option<&SmtpPool> {
        match &self.inner {
            Inner::Smtp(pool) => Some(pool),
            Inner::File(..) => None,
        }
    }

    /// The `Message-ID` of a mail with this key, without angle brackets: the same key always
    /// gives the same id.
    pub fn message_id(&self, key: &str) -> String {
        format!("{}@{}", &content_hash(key.as_bytes())[..32], self.id_domain)
    }

    /// Builds a text + HTML message; the `Message-ID` is derived from the mail's key. The
    /// multipart's `Content-Type` is a header of the message itself (not of its body), so
    /// DKIM can cover it.
    pub fn build(&self, mail: &Mail<'_>) -> Result<Message, SendError> {
        let to: Mailbox = mail
            .to
            .parse()
            .map_err(|_| SendError::permanent("the recipient address is not a valid mailbox"))?;
        let alternative = MultiPart::alternative_plain_html(mail.text.to_owned(), mail.html.to_owned());
        let content_type = alternative
            .headers()
            .get::<ContentType>()
            .ok_or_else(|| SendError::permanent("building the message: the multipart has no Content-Type"))?;
        let formatted = alternative.formatted();
        let body = formatted
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| formatted[i + 4..].to_vec())
            .ok_or_else(|| SendError::permanent("building the message: the multipart has no body"))?;
        let encoding = if body.is_ascii() {
            ContentTransferEncoding::SevenBit
        } else {
            ContentTransferEncoding::EightBit
        };
        let mut builder = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(mail.subject.to_owned())
            .message_id(Some(format!("<{}>", self.message_id(mail.key))))
            .raw_header(header::HeaderValue::new(
                header::HeaderName::new_from_ascii_str("Content-Language"),
                mail.language.to_owned(),
            ))
            .user_agent("Tocsin".to_owned())
            .header(header::MIME_VERSION_1_0)
            .header(content_type);
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(reply_to.clone());
        }
        // A mandatory security notice: deliberately no List-Unsubscribe header.
        let mut message = builder
            .body(Body::dangerous_pre_encoded(body, encoding))
            .map_err(|e| SendError::permanent(format!("building the message: {e}")))?;
        if let Some(dkim) = &self.dkim {
            message.sign(dkim);
        }
        Ok(message)
    }

    /// Sends a mail (a notice, or a regulator filing) through the configured transport; returns
    /// its `Message-ID` without angle brackets.
    pub async fn send_mail(&self, mail: &Mail<'_>) -> Result<String, SendError> {
        if undeliverable_domain(mail.to) {
            return Err(SendError::permanent(
                "the recipient's domain is reserved as invalid and can never receive mail",
            ));
        }
        let message = self.build(mail)?;
        match &self.inner {
            Inner::File(t, _) => {
                t.send(message)
                    .await
                    .map_err(|e| SendError::transient(format!("writing the message file: {e}")))?;
            }
            Inner::Smtp(pool) => pool.send(message.envelope(), &message.formatted()).await?,
        }
        Ok(self.message_id(mail.key))
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
    fn message_id(&self, delivery: &crate::model::Delivery) -> Option<String> {
        Some(EmailTransport::message_id(self, &delivery.idempotency_key))
    }

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
        .map(Accepted::with_id)
    }
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
