//! SMS and push through a generic JSON webhook signed with HMAC-SHA256, or to files (the
//! embedded default). The signature covers `"{timestamp}.{body}"` and goes in
//! `X-Tocsin-Signature: v1=<hex>` with the timestamp in `X-Tocsin-Timestamp`; the idempotency
//! key goes in `Idempotency-Key`, so a provider can drop a repeat after a crash.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{Accepted, ChannelSetupError, FailureKind, Outbound, Provider, SendError, setup_err};
use crate::config::{Secret, WebhookChannelSettings};
use crate::domain::Channel;
use crate::ledger::content_hash;

enum Inner {
    File(PathBuf),
    Http {
        client: reqwest::Client,
        /// Parsed once: parsing it again for every message costs more than signing it.
        url: reqwest::Url,
        secret: Secret,
    },
}

pub struct WebhookTransport {
    channel: Channel,
    inner: Inner,
}

/// `v1=<hex HMAC-SHA256 of "{timestamp}.{body}">`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl WebhookTransport {
    pub fn from_settings(
        channel: Channel,
        s: &WebhookChannelSettings,
        file_dir: &Path,
    ) -> Result<Self, ChannelSetupError> {
        let name = match channel {
            Channel::Sms => "sms",
            Channel::Push => "push",
            Channel::Email => "email",
        };
        let inner = match s.transport.as_str() {
            "webhook" => Inner::Http {
                url: reqwest::Url::parse(&s.url).map_err(|e| setup_err(name, format!("{name}.url: {e}")))?,
                // No redirects: following one would turn the POST into a GET without the message
                // and report a success that never reached the gateway.
                client: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(Duration::from_secs(s.timeout_seconds))
                    .build()
                    .map_err(|e| setup_err(name, e))?,
                secret: s.signing_secret.clone(),
            },
            _ => {
                std::fs::create_dir_all(file_dir)
                    .map_err(|e| setup_err(name, format!("{}: {e}", file_dir.display())))?;
                Inner::File(file_dir.to_owned())
            }
        };
        Ok(Self { channel, inner })
    }

    fn payload<'a>(&self, m: &'a Outbound<'_>) -> Payload<'a> {
        let push = self.channel == Channel::Push;
        Payload {
            body: push.then_some(m.notice.push_body.as_str()),
            channel: self.channel.as_str(),
            delivery_id: m.delivery.id.as_str(),
            idempotency_key: &m.delivery.idempotency_key,
            locale: m.notice.locale.as_str(),
            reference: m.reference,
            text: (!push).then_some(m.notice.sms_text.as_str()),
            title: push.then_some(m.notice.push_title.as_str()),
            to: &m.delivery.address,
            url: m.notice_url,
        }
    }
}

/// The webhook's JSON body. Fields in alphabetical order, as the body has always been
/// written (receivers that verify the signature hash these exact bytes).
#[derive(serde::Serialize)]
struct Payload<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a str>,
    channel: &'a str,
    delivery_id: &'a str,
    idempotency_key: &'a str,
    locale: &'a str,
    reference: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<&'a str>,
    to: &'a str,
    url: &'a str,
}

/// The id a webhook may answer with, under either name.
#[derive(serde::Deserialize)]
struct Reply {
    id: Option<serde_json::Value>,
    message_id: Option<serde_json::Value>,
}

impl Reply {
    fn message_id(self) -> Option<String> {
        let text = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) => Some(s),
            _ => None,
        };
        // `id` wins when present, even if it is not text (as before: the first key found).
        match self.id {
            Some(id) => text(Some(id)),
            None => text(self.message_id),
        }
    }
}

#[async_trait]
impl Provider for WebhookTransport {
    async fn send(&self, m: &Outbound<'_>) -> Result<Accepted, SendError> {
        self.post(&self.payload(m), &m.delivery.idempotency_key).await
    }

    /// Sends `text` to `to` with the idempotency key `key` (a repeat is the same request).
    async fn send_text(&self, to: &str, text: &str, key: &str) -> Result<Accepted, SendError> {
        let payload = TextPayload {
            channel: self.channel.as_str(),
            idempotency_key: key,
            kind: "reminder",
            text,
            to,
        };
        self.post(&payload, key).await
    }
}

/// An operational text to a phone number (the watchdog's reminders to responders), through
/// the same signed webhook: `channel`, `idempotency_key`, `kind` (`reminder`), `text`, `to`.
#[derive(serde::Serialize)]
struct TextPayload<'a> {
    channel: &'a str,
    idempotency_key: &'a str,
    kind: &'a str,
    text: &'a str,
    to: &'a str,
}

impl WebhookTransport {
    async fn post<P: serde::Serialize + Sync>(&self, payload: &P, key: &str) -> Result<Accepted, SendError> {
        match &self.inner {
            Inner::File(dir) => {
                // Named by the idempotency key: a repeated send rewrites the same file.
                let name = format!("{}.json", &content_hash(key.as_bytes())[..32]);
                let text = serde_json::to_vec_pretty(&payload).unwrap_or_default();
                tokio::fs::write(dir.join(&name), text)
                    .await
                    .map_err(|e| SendError::transient(format!("writing {name}: {e}")))?;
                Ok(Accepted::with_id(name))
            }
            Inner::Http { client, url, secret } => {
                let body = serde_json::to_vec(&payload).unwrap_or_default();
                let timestamp = chrono::Utc::now().timestamp();
                let response = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header("X-Tocsin-Timestamp", timestamp.to_string())
                    .header("X-Tocsin-Signature", sign(secret.expose().as_bytes(), timestamp, &body))
                    .header("Idempotency-Key", key)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| {
                        let kind = if e.is_timeout() {
                            FailureKind::Timeout
                        } else {
                            FailureKind::Network
                        };
                        SendError::new(kind, format!("webhook request failed: {}", without_url(&e)))
                    })?;
                let status = response.status();
                if status.is_success() {
                    let id = response.json::<Reply>().await.ok().and_then(Reply::message_id);
                    return Ok(Accepted {
                        provider_message_id: id,
                    });
                }
                let retry_after = retry_after(response.headers());
                let message = format!("webhook answered HTTP {}", status.as_u16());
                if status.is_redirection() {
                    return Err(SendError::transient(format!(
                        "webhook answered a redirect (HTTP {}); configure its final URL",
                        status.as_u16()
                    )));
                }
                if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
                    let kind = if status.as_u16() == 429 {
                        FailureKind::Throttled
                    } else {
                        FailureKind::ProviderError
                    };
                    Err(SendError::new(kind, message).retry_after(retry_after))
                } else {
                    Err(SendError::permanent(message))
                }
            }
        }
    }
}

// Shared HTTP plumbing of the provider modules (Twilio, Aliyun, FCM, APNs): one reading of
// `Retry-After`, one client policy, one mapping of HTTP answers to failure kinds.

/// The provider's `Retry-After`: delay-seconds or an HTTP date (RFC 9110 §10.2.3); a date in
/// the past or an unreadable value gives none.
pub(super) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let raw = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    if let Ok(secs) = raw.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(raw.trim()).ok()?;
    (when.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
}

/// reqwest's errors print the URL (which may hold a phone number or push token); keep the kind
/// of failure only.
pub(crate) fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "transport error"
    };
    kind.to_owned()
}

/// A client that follows no redirects (a redirected POST arrives as a GET without the message,
/// and would read as a success) and gives up after `timeout_seconds`.
pub(crate) fn client_builder(timeout_seconds: u64) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(timeout_seconds))
}

/// A request that got no answer: timeout or network failure, without the URL.
pub(super) fn request_failed(provider: &str, e: &reqwest::Error) -> SendError {
    let kind = if e.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Network
    };
    SendError::new(kind, format!("{provider} request failed: {}", without_url(e)))
}

/// The failure an HTTP status means when the provider's body says nothing more specific:
/// 401/403 our credentials; 408, 5xx and (unfollowed) redirects the provider's trouble; 429 a
/// request to slow down; any other 4xx a refusal of this message.
pub(super) fn status_kind(status: u16) -> FailureKind {
    match status {
        401 | 403 => FailureKind::Auth,
        429 => FailureKind::Throttled,
        408 | 300..=399 | 500..=599 => FailureKind::ProviderError,
        _ => FailureKind::Rejected,
    }
}

/// A failed HTTP answer as a [`SendError`]: `kind` (see [`status_kind`]), a message naming the
/// provider, the status and the provider's error code (never its free text, which may repeat
/// the number), and the `Retry-After` it gave.
pub(super) fn http_failure(
    provider: &str,
    kind: FailureKind,
    status: u16,
    code: Option<&str>,
    headers: &reqwest::header::HeaderMap,
) -> SendError {
    let message = match code {
        Some(code) if !code.is_empty() => format!("{provider} answered HTTP {status} ({code})"),
        _ => format!("{provider} answered HTTP {status}"),
    };
    SendError::new(kind, message).retry_after(retry_after(headers))
}

/// Test material shared by the provider modules: one delivery of one rendered notice.
#[cfg(test)]
pub(super) mod fixture {
    use chrono::Utc;

    use crate::channels::Outbound;
    use crate::domain::{Channel, DeliveryId, DeliveryStatus, DraftId, IncidentId, Locale, NoticeId};
    use crate::model::{Delivery, Notice, NoticeSections};

    pub struct Sample {
        pub delivery: Delivery,
        pub notice: Notice,
    }

    pub const REFERENCE: &str = "INC-2026-0042";

    pub fn sample(channel: Channel, address: &str, locale: Locale) -> Sample {
        let draft_id = DraftId::generate();
        let merchant_id = "m-1".parse().expect("merchant id");
        let now = Utc::now();
        let notice = Notice {
            id: NoticeId::generate(),
            draft_id: draft_id.clone(),
            merchant_id: "m-1".parse().expect("merchant id"),
            locale,
            url: "https://notices.example.com/n/abc123".into(),
            sections: NoticeSections::default(),
            email_subject: "Security incident".into(),
            email_text: "text".into(),
            email_html: "<p>text</p>".into(),
            sms_text: "Security notice INC-2026-0042: https://notices.example.com/n/abc123".into(),
            push_title: "Security notice".into(),
            push_body: "Your shop data was involved in an incident. Tap to read.".into(),
            letter_html: String::new(),
            content_hash: "hash".into(),
        };
        let delivery = Delivery {
            id: DeliveryId::generate(),
            idempotency_key: format!("{draft_id}:m-1:{}", channel.as_str()),
            incident_id: IncidentId::generate(),
            draft_id,
            notice_id: notice.id.clone(),
            merchant_id,
            channel,
            address: address.into(),
            plan_position: 0,
            status: DeliveryStatus::Pending,
            attempts: 0,
            next_attempt_at: now,
            last_error: None,
            error_class: None,
            provider_message_id: None,
            content_hash: None,
            created_at: now,
            sent_at: None,
            provider: None,
            error_kind: None,
            delivered_at: None,
            receipt_due_at: None,
        };
        Sample { delivery, notice }
    }

    impl Sample {
        pub fn outbound(&self) -> Outbound<'_> {
            Outbound {
                delivery: &self.delivery,
                notice: &self.notice,
                reference: REFERENCE,
                notice_url: &self.notice.url,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_over_timestamp_and_body() {
        // Known answer computed independently: HMAC-SHA256(key="secret", "1700000000.{}").
        let sig = sign(b"secret", 1_700_000_000, b"{}");
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64);
        assert_ne!(sig, sign(b"secret", 1_700_000_001, b"{}"));
        assert_ne!(sig, sign(b"other", 1_700_000_000, b"{}"));
    }

    #[test]
    fn retry_after_reads_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().expect("header"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }

    #[test]
    fn retry_after_reads_http_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        let when = (chrono::Utc::now() + chrono::Duration::seconds(120)).format("%a, %d %b %Y %H:%M:%S GMT");
        h.insert(reqwest::header::RETRY_AFTER, when.to_string().parse().expect("header"));
        let after = retry_after(&h).expect("a date in the future");
        assert!(
            after > Duration::from_secs(100) && after <= Duration::from_secs(120),
            "{after:?}"
        );
        h.insert(
            reqwest::header::RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().expect("header"),
        );
        assert_eq!(retry_after(&h), None, "a date in the past");
    }

    #[test]
    fn statuses_map_to_failure_kinds() {
        assert_eq!(status_kind(401), FailureKind::Auth);
        assert_eq!(status_kind(403), FailureKind::Auth);
        assert_eq!(status_kind(429), FailureKind::Throttled);
        assert_eq!(status_kind(408), FailureKind::ProviderError);
        assert_eq!(status_kind(503), FailureKind::ProviderError);
        assert_eq!(status_kind(301), FailureKind::ProviderError);
        assert_eq!(status_kind(400), FailureKind::Rejected);
        assert_eq!(status_kind(404), FailureKind::Rejected);
    }
}
