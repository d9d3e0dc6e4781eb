//! SMS through Twilio's Programmable Messaging API: `POST
//! {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json`, HTTP Basic auth (the account
//! SID and auth token, or an API key SID and secret), a form with `To`, `From` or
//! `MessagingServiceSid`, `Body` and `StatusCallback`. Twilio answers 201 with the message's
//! `sid`; its status callbacks (signed with `X-Twilio-Signature`) say whether it arrived.
//!
//! Idempotency: the Messages API documents no request idempotency key. The
//! `I-Twilio-Idempotency-Token` header is one Twilio *sends* on its own webhooks (so receivers
//! can drop its retries), not one its REST API honours on a create, and an `Idempotency-Key`
//! would be ignored. So neither is sent: a crash between Twilio's 201 and recording the sid can
//! repeat the SMS, which the status callback (matched by sid) cannot prevent.

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

use super::webhook::{client_builder, http_failure, request_failed, status_kind};
use super::{
    Accepted, ChannelSetupError, FailureKind, Outbound, Provider, Receipt, ReceiptKey, ReceiptStatus, SendError,
    setup_err,
};
use crate::config::Secret;

const CHANNEL: &str = "sms";
const PROVIDER: &str = "twilio";

fn default_base_url() -> String {
    "https://api.twilio.com".into()
}

fn default_timeout() -> u64 {
    15
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioSettings {
    /// `AC...`: whose Messages resource is posted to.
    pub account_sid: String,
    /// The account's auth token: Basic-auth password unless an API key is set, and always the
    /// key of the status callbacks' signatures.
    #[serde(default)]
    pub auth_token: Secret,
    /// An API key (`SK...`) and its secret, used for Basic auth instead of the auth token.
    #[serde(default)]
    pub api_key_sid: Option<String>,
    #[serde(default)]
    pub api_key_secret: Option<Secret>,
    /// The sending number (E.164) or alphanumeric sender id; or else a messaging service.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    /// Where Twilio posts status callbacks; without one no receipt arrives, so an accepted SMS
    /// counts as reached.
    #[serde(default)]
    pub status_callback_url: Option<String>,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

enum Sender {
    From(String),
    Service(String),
}

pub struct TwilioProvider {
    client: reqwest::Client,
    endpoint: String,
    user: String,
    password: Secret,
    sender: Sender,
    status_callback_url: Option<String>,
}

impl std::fmt::Debug for TwilioProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwilioProvider")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl TwilioProvider {
    pub fn from_settings(s: &TwilioSettings) -> Result<Self, ChannelSetupError> {
        let sid = s.account_sid.trim();
        if sid.is_empty() {
            return Err(setup_err(CHANNEL, "twilio: account_sid is required"));
        }
        let (user, password) = match (present(&s.api_key_sid), &s.api_key_secret) {
            (Some(key), Some(secret)) if !secret.is_empty() => (key.to_owned(), secret.clone()),
            (Some(_), _) | (None, Some(_)) => {
                return Err(setup_err(CHANNEL, "twilio: api_key_sid and api_key_secret go together"));
            }
            (None, None) if s.auth_token.is_empty() => {
                return Err(setup_err(CHANNEL, "twilio: auth_token (or an API key) is required"));
            }
            (None, None) => (sid.to_owned(), s.auth_token.clone()),
        };
        let sender = match (present(&s.from), present(&s.messaging_service_sid)) {
            (Some(from), None) => Sender::From(from.to_owned()),
            (None, Some(service)) => Sender::Service(service.to_owned()),
            _ => {
                return Err(setup_err(
                    CHANNEL,
                    "twilio: set exactly one of from and messaging_service_sid",
                ));
            }
        };
        let client = client_builder(s.timeout_seconds)
            .build()
            .map_err(|e| setup_err(CHANNEL, e))?;
        Ok(Self {
            client,
            endpoint: format!(
                "{}/2010-04-01/Accounts/{sid}/Messages.json",
                s.base_url.trim_end_matches('/')
            ),
            user,
            password,
            sender,
            status_callback_url: present(&s.status_callback_url).map(str::to_owned),
        })
    }
}

/// What a Twilio error code in a 4xx body means for this message, where it differs from the
/// HTTP status alone.
fn code_kind(code: i64) -> Option<FailureKind> {
    Some(match code {
        // Authentication failed, account suspended, account or resource not found.
        20003 | 20005 | 20404 => FailureKind::Auth,
        // Our sender: invalid From, not a Twilio number, not SMS-capable, messaging service
        // misconfigured. Configuration, not the recipient.
        21212 | 21606 | 21659 | 21701..=21712 => FailureKind::Auth,
        20429 => FailureKind::Throttled,
        // The recipient: invalid or unreachable number, landline, opted out (STOP), region not
        // enabled, unroutable.
        21211 | 21214 | 21217 | 21408 | 21610 | 21612 | 21614 => FailureKind::Rejected,
        _ => return None,
    })
}

impl TwilioProvider {
    /// Creates a message (Messages API): `Ok` with its `sid` once Twilio accepted it.
    async fn post_message(&self, to: &str, text: &str, with_callback: bool) -> Result<Accepted, SendError> {
        let mut form: Vec<(&str, &str)> = vec![("To", to)];
        match &self.sender {
            Sender::From(from) => form.push(("From", from)),
            Sender::Service(sid) => form.push(("MessagingServiceSid", sid)),
        }
        form.push(("Body", text));
        if let Some(url) = self.status_callback_url.as_deref().filter(|_| with_callback) {
            form.push(("StatusCallback", url));
        }
        let response = self
            .client
            .post(&self.endpoint)
            .basic_auth(&self.user, Some(self.password.expose()))
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form)
            .send()
            .await
            .map_err(|e| request_failed(PROVIDER, &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if (200..300).contains(&status) {
            return match body.get("sid").and_then(|v| v.as_str()) {
                Some(sid) => Ok(Accepted::with_id(sid)),
                // Accepted without an id: a callback could not be matched, but the message went.
                None => Ok(Accepted::default()),
            };
        }
        let code = body.get("code").and_then(|c| c.as_i64());
        let kind = code.and_then(code_kind).unwrap_or_else(|| status_kind(status));
        let code_text = code.map(|c| c.to_string());
        Err(http_failure(PROVIDER, kind, status, code_text.as_deref(), &headers))
    }
}

#[async_trait]
impl Provider for TwilioProvider {
    async fn send(&self, m: &Outbound<'_>) -> Result<Accepted, SendError> {
        self.post_message(&m.delivery.address, &m.notice.sms_text, true).await
    }

    /// A reminder goes without a status callback: no delivery waits for its receipt.
    async fn send_text(&self, to: &str, text: &str, _key: &str) -> Result<Accepted, SendError> {
        self.post_message(to, text, false).await
    }

    fn reports_delivery(&self) -> bool {
        self.status_callback_url.is_some()
    }
}

/// Whether `header` (`X-Twilio-Signature`) is Twilio's signature of a callback: base64 of
/// HMAC-SHA1, keyed by the auth token, over the full URL Twilio requested (scheme, host, port
/// if any, path and query exactly as configured) followed by each POST parameter's name and
/// value, sorted by name. Compared in constant time.
pub fn verify_signature(auth_token: &str, url: &str, params: &[(String, String)], header: &str) -> bool {
    let Ok(given) = STANDARD.decode(header.trim().as_bytes()) else {
        return false;
    };
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut data = String::from(url);
    for (name, value) in sorted {
        data.push_str(name);
        data.push_str(value);
    }
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, auth_token.as_bytes());
    hmac::verify(&key, data.as_bytes(), &given).is_ok()
}

/// The receipt a status callback carries: keyed by `MessageSid`; `delivered`/`read` reached
/// the phone, `undelivered`/`failed`/`canceled` will not, the rest are on the way. The detail
/// names the status and `ErrorCode`, never `To`, `From` or `Body`. `None` without a
/// `MessageSid` or with a status Twilio does not document.
pub fn receipt_from_status(params: &[(String, String)]) -> Option<Receipt> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let sid = get("MessageSid").or_else(|| get("SmsSid"))?;
    let word = get("MessageStatus").or_else(|| get("SmsStatus"))?;
    let status = match word {
        "delivered" | "read" => ReceiptStatus::Delivered,
        "undelivered" | "failed" | "canceled" => ReceiptStatus::Failed(FailureKind::Undelivered),
        "accepted" | "scheduled" | "queued" | "sending" | "sent" | "partially_delivered" => ReceiptStatus::InProgress,
        _ => return None,
    };
    // Only the status word and the numeric error code: both are Twilio's vocabulary, not data.
    let word: String = word
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    let detail = match get("ErrorCode").filter(|c| c.chars().all(|c| c.is_ascii_digit())) {
        Some(code) => format!("twilio {word}, error {code}"),
        None => format!("twilio {word}"),
    };
    Some(Receipt {
        key: ReceiptKey::ProviderMessageId(sid.to_owned()),
        status,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::super::webhook::fixture::{Sample, sample};
    use super::*;
    use crate::domain::{Channel, Locale};
    use std::time::Duration;
    use wiremock::matchers::{body_string_contains, header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const NUMBER: &str = "+8613800138000";
    const SID: &str = "AC00000000000000000000000000000001";

    fn settings(base: &str) -> TwilioSettings {
        TwilioSettings {
            account_sid: SID.into(),
            auth_token: Secret::new("token123"),
            api_key_sid: None,
            api_key_secret: None,
            from: Some("+15005550006".into()),
            messaging_service_sid: None,
            status_callback_url: Some("https://tocsin.example.com/receipts/twilio".into()),
            base_url: base.into(),
            timeout_seconds: 5,
        }
    }

    fn msg() -> Sample {
        sample(Channel::Sms, NUMBER, Locale::En)
    }

    fn form(body: &[u8]) -> Vec<(String, String)> {
        url_pairs(std::str::from_utf8(body).expect("utf8"))
    }

    fn url_pairs(s: &str) -> Vec<(String, String)> {
        s.split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let dec = |x: &str| {
                    let x = x.replace('+', " ");
                    let bytes = x.as_bytes();
                    let mut out = Vec::new();
                    let mut i = 0;
                    while i < bytes.len() {
                        if bytes[i] == b'%' {
                            out.push(u8::from_str_radix(&x[i + 1..i + 3], 16).expect("hex"));
                            i += 3;
                        } else {
                            out.push(bytes[i]);
                            i += 1;
                        }
                    }
                    String::from_utf8(out).expect("utf8")
                };
                (dec(k), dec(v))
            })
            .collect()
    }

    async fn provider(server: &MockServer) -> TwilioProvider {
        crate::install_crypto_provider();
        TwilioProvider::from_settings(&settings(&server.uri())).expect("provider")
    }

    async fn answer(template: ResponseTemplate) -> (Result<Accepted, SendError>, MockServer) {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(template).mount(&server).await;
        let p = provider(&server).await;
        let s = msg();
        let result = p.send(&s.outbound()).await;
        (result, server)
    }

    #[tokio::test]
    async fn wire_format_is_twilios_messages_create() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(format!("/2010-04-01/Accounts/{SID}/Messages.json")))
            // base64("AC...01:token123")
            .and(header(
                "authorization",
                format!("Basic {}", STANDARD.encode(format!("{SID}:token123"))).as_str(),
            ))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .and(body_string_contains("To=%2B8613800138000"))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({
                "sid": "SM0123456789abcdef0123456789abcdef", "status": "queued"
            })))
            .expect(1)
            .mount(&server)
            .await;
        let p = provider(&server).await;
        let s = msg();
        let accepted = p.send(&s.outbound()).await.expect("accepted");
        assert_eq!(accepted, Accepted::with_id("SM0123456789abcdef0123456789abcdef"));
        assert!(p.reports_delivery());

        let requests = server.received_requests().await.expect("recorded");
        let fields = form(&requests[0].body);
        let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("To"), Some(NUMBER));
        assert_eq!(get("From"), Some("+15005550006"));
        assert_eq!(get("Body"), Some(s.notice.sms_text.as_str()));
        assert_eq!(
            get("StatusCallback"),
            Some("https://tocsin.example.com/receipts/twilio")
        );
        assert_eq!(get("MessagingServiceSid"), None);
        // Decided: no idempotency header (Twilio documents none for creating messages).
        assert!(requests[0].headers.get("I-Twilio-Idempotency-Token").is_none());
        assert!(requests[0].headers.get("Idempotency-Key").is_none());
    }

    #[tokio::test]
    async fn api_key_and_messaging_service_are_used_when_configured() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(header(
                "authorization",
                format!("Basic {}", STANDARD.encode("SKkey:keysecret")).as_str(),
            ))
            .respond_with(ResponseTemplate::new(201).set_body_json(serde_json::json!({"sid": "SM1"})))
            .expect(1)
            .mount(&server)
            .await;
        crate::install_crypto_provider();
        let mut s = settings(&server.uri());
        s.api_key_sid = Some("SKkey".into());
        s.api_key_secret = Some(Secret::new("keysecret"));
        s.from = None;
        s.messaging_service_sid = Some("MG123".into());
        s.status_callback_url = None;
        let p = TwilioProvider::from_settings(&s).expect("provider");
        assert!(!p.reports_delivery());
        let m = msg();
        p.send(&m.outbound()).await.expect("accepted");
        let requests = server.received_requests().await.expect("recorded");
        let fields = form(&requests[0].body);
        assert!(fields.contains(&("MessagingServiceSid".into(), "MG123".into())));
        assert!(!fields.iter().any(|(k, _)| k == "From" || k == "StatusCallback"));
    }

    #[test]
    fn settings_are_checked() {
        crate::install_crypto_provider();
        let mut s = settings("http://localhost");
        s.messaging_service_sid = Some("MG1".into());
        assert!(TwilioProvider::from_settings(&s).is_err(), "both senders");
        let mut s = settings("http://localhost");
        s.auth_token = Secret::default();
        assert!(TwilioProvider::from_settings(&s).is_err(), "no credentials");
        let s: Result<TwilioSettings, _> = toml::from_str("account_sid = 'AC1'\nbogus = 1");
        assert!(s.is_err(), "unknown fields refused");
        let s: TwilioSettings = toml::from_str("account_sid = 'AC1'\nauth_token = 't'\nfrom = '+1'").expect("parse");
        assert_eq!(s.base_url, "https://api.twilio.com");
        assert_eq!(s.timeout_seconds, 15);
    }

    fn twilio_error(status: u16, code: i64) -> ResponseTemplate {
        ResponseTemplate::new(status).set_body_json(serde_json::json!({
            "code": code,
            "message": format!("The 'To' number {NUMBER} is not a valid phone number."),
            "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
            "status": status,
        }))
    }

    #[tokio::test]
    async fn error_codes_decide_the_failure_kind() {
        let cases = [
            (400, 21211, FailureKind::Rejected),
            (400, 21614, FailureKind::Rejected),
            (400, 21610, FailureKind::Rejected),
            (400, 21408, FailureKind::Rejected),
            (400, 21606, FailureKind::Auth),
            (401, 20003, FailureKind::Auth),
            (404, 20404, FailureKind::Auth),
            (429, 20429, FailureKind::Throttled),
            (400, 29999, FailureKind::Rejected),
            (500, 20500, FailureKind::ProviderError),
        ];
        for (status, code, kind) in cases {
            let (result, _server) = answer(twilio_error(status, code)).await;
            let err = result.expect_err("failure");
            assert_eq!(err.kind, kind, "HTTP {status} code {code}");
            assert!(err.message.contains(&code.to_string()), "{}", err.message);
            assert!(!err.message.contains(NUMBER), "no phone number: {}", err.message);
            assert!(!err.message.contains("8613800138000"));
        }
    }

    #[tokio::test]
    async fn statuses_without_codes_and_retry_after() {
        let (r, _s) = answer(ResponseTemplate::new(429).insert_header("Retry-After", "30")).await;
        let e = r.expect_err("throttled");
        assert_eq!(e.kind, FailureKind::Throttled);
        assert_eq!(e.retry_after, Some(Duration::from_secs(30)));
        let (r, _s) = answer(ResponseTemplate::new(503).insert_header("Retry-After", "5")).await;
        let e = r.expect_err("5xx");
        assert_eq!(
            (e.kind, e.retry_after),
            (FailureKind::ProviderError, Some(Duration::from_secs(5)))
        );
        let (r, _s) = answer(ResponseTemplate::new(408)).await;
        assert_eq!(r.expect_err("408").kind, FailureKind::ProviderError);
        let (r, _s) = answer(ResponseTemplate::new(403)).await;
        assert_eq!(r.expect_err("403").kind, FailureKind::Auth);
        let (r, _s) = answer(ResponseTemplate::new(302).insert_header("Location", "https://elsewhere.example/")).await;
        assert_eq!(r.expect_err("redirect not followed").kind, FailureKind::ProviderError);
    }

    #[tokio::test]
    async fn network_and_timeout_failures_hide_the_url() {
        crate::install_crypto_provider();
        // Nothing listens on port 9 of localhost (discard), so the connection is refused.
        let p = TwilioProvider::from_settings(&settings("http://127.0.0.1:9")).expect("provider");
        let m = msg();
        let e = p.send(&m.outbound()).await.expect_err("network");
        assert_eq!(e.kind, FailureKind::Network);
        assert!(
            !e.message.contains("127.0.0.1") && !e.message.contains(SID),
            "{}",
            e.message
        );

        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_secs(3)))
            .mount(&server)
            .await;
        let mut s = settings(&server.uri());
        s.timeout_seconds = 1;
        let p = TwilioProvider::from_settings(&s).expect("provider");
        let e = p.send(&m.outbound()).await.expect_err("timeout");
        assert_eq!(e.kind, FailureKind::Timeout);
    }

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    /// Twilio's documented example (the "Validating requests" page and its code samples,
    /// TwilioDevEd/api-snippets `signature_validation`): auth token 12345.
    #[test]
    fn signature_matches_twilios_documented_example() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let p = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]);
        assert!(verify_signature("12345", url, &p, "RSOYDt4T1cUTdK1PDd93/VVr8B8="));
        // Order of the parameters as received does not matter.
        let mut reversed = p.clone();
        reversed.reverse();
        assert!(verify_signature(
            "12345",
            url,
            &reversed,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
    }

    #[test]
    fn forged_signatures_are_refused() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let p = params(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]);
        let good = "RSOYDt4T1cUTdK1PDd93/VVr8B8=";
        assert!(!verify_signature("54321", url, &p, good), "other token");
        assert!(!verify_signature(
            "12345",
            "https://mycompany.com/myapp.php?foo=1&bar=3",
            &p,
            good
        ));
        let mut tampered = p.clone();
        tampered[2].1 = "9999".into();
        assert!(!verify_signature("12345", url, &tampered, good), "tampered parameter");
        assert!(!verify_signature("12345", url, &p, ""), "missing");
        assert!(!verify_signature("12345", url, &p, "not base64!"), "garbage");
        assert!(
            !verify_signature("12345", url, &p, "RSOYDt4T1cUTdK1PDd93/VVr8B8"),
            "truncated"
        );
    }

    #[test]
    fn status_callbacks_become_receipts() {
        let cb = |status: &str, code: Option<&str>| {
            let mut p = params(&[
                ("MessageSid", "SM123"),
                ("MessageStatus", status),
                ("To", NUMBER),
                ("From", "+15005550006"),
                ("Body", "secret text"),
                ("AccountSid", SID),
            ]);
            if let Some(code) = code {
                p.push(("ErrorCode".into(), code.into()));
            }
            receipt_from_status(&p).expect("receipt")
        };
        let r = cb("delivered", None);
        assert_eq!(r.key, ReceiptKey::ProviderMessageId("SM123".into()));
        assert_eq!(r.status, ReceiptStatus::Delivered);
        assert_eq!(cb("read", None).status, ReceiptStatus::Delivered);
        let r = cb("undelivered", Some("30003"));
        assert_eq!(r.status, ReceiptStatus::Failed(FailureKind::Undelivered));
        assert_eq!(r.detail, "twilio undelivered, error 30003");
        assert_eq!(
            cb("failed", Some("30008")).status,
            ReceiptStatus::Failed(FailureKind::Undelivered)
        );
        for s in ["queued", "accepted", "sending", "sent", "scheduled"] {
            let r = cb(s, None);
            assert_eq!(r.status, ReceiptStatus::InProgress, "{s}");
            assert!(
                !r.detail.contains("8613800138000") && !r.detail.contains("secret"),
                "{}",
                r.detail
            );
        }
        assert!(
            receipt_from_status(&params(&[("MessageStatus", "delivered")])).is_none(),
            "no sid"
        );
        assert!(receipt_from_status(&params(&[("MessageSid", "SM1"), ("MessageStatus", "weird")])).is_none());
    }
}
