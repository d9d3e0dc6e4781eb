//! Push to iOS devices through Apple Push Notification service, token-based: `POST
//! {base_url}/3/device/{device token}` over HTTP/2 with an ES256 provider token (JWT with the
//! team id and key id, signed by the `.p8` key), reused for 50 minutes (Apple refuses tokens
//! older than an hour and throttles ones renewed more often than every 20 minutes) and renewed
//! early when Apple calls it expired or invalid.
//!
//! `apns-id` is a UUID derived from the delivery's idempotency key (SHA-256, as a version 8
//! UUID), so every attempt of one delivery carries the same id and a resend is recognisable in
//! Apple's and the device's logs. APNs reports no delivery.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::jwt::JwtKey;
use super::webhook::{client_builder, http_failure, request_failed, status_kind};
use super::{Accepted, ChannelSetupError, FailureKind, Outbound, Provider, SendError, setup_err};
use crate::config::Secret;

const CHANNEL: &str = "push";
const PROVIDER: &str = "apns";
/// How long one provider token is used.
const TOKEN_REUSE: Duration = Duration::from_secs(50 * 60);

fn default_base_url() -> String {
    "https://api.push.apple.com".into()
}
fn default_timeout() -> u64 {
    15
}
fn default_expiration() -> u64 {
    86_400
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApnsSettings {
    /// The 10-character Team ID of the developer account (the JWT's `iss`).
    pub team_id: String,
    /// The 10-character id of the signing key (the JWT's `kid`).
    pub key_id: String,
    /// The `AuthKey_<key id>.p8` file; or its PEM text, inline.
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    #[serde(default)]
    pub private_key: Option<Secret>,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// `https://api.push.apple.com`, or `https://api.sandbox.push.apple.com` for development
    /// builds. An `http://` URL is spoken to in HTTP/2 without TLS (h2c), for tests.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// How long Apple keeps trying an offline device (`apns-expiration`).
    #[serde(default = "default_expiration")]
    pub expiration_seconds: u64,
}

struct ProviderToken {
    value: String,
    issued: Instant,
}

pub struct ApnsProvider {
    client: reqwest::Client,
    base_url: String,
    team_id: String,
    key_id: String,
    key: JwtKey,
    topic: String,
    expiration: Duration,
    token: Mutex<Option<ProviderToken>>,
}

impl std::fmt::Debug for ApnsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsProvider")
            .field("base_url", &self.base_url)
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

/// The `apns-id` of a delivery: the first 16 bytes of SHA-256 of its idempotency key, as a
/// version 8 (custom) UUID in canonical lower-case form.
pub fn apns_id(idempotency_key: &str) -> String {
    let digest = Sha256::digest(idempotency_key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

impl ApnsProvider {
    pub fn from_settings(s: &ApnsSettings) -> Result<Self, ChannelSetupError> {
        for (name, value) in [("team_id", &s.team_id), ("key_id", &s.key_id), ("topic", &s.topic)] {
            if value.trim().is_empty() {
                return Err(setup_err(CHANNEL, format!("apns: {name} is required")));
            }
        }
        let pem = match (&s.private_key_file, &s.private_key) {
            (Some(path), None) => std::fs::read_to_string(path)
                .map_err(|e| setup_err(CHANNEL, format!("apns: reading {}: {e}", path.display())))?,
            (None, Some(pem)) => pem.expose().to_owned(),
            _ => {
                return Err(setup_err(
                    CHANNEL,
                    "apns: set exactly one of private_key_file and private_key",
                ));
            }
        };
        let key = JwtKey::es256_from_pem(&pem).map_err(|e| setup_err(CHANNEL, format!("apns: private key: {e}")))?;
        let base_url = s.base_url.trim_end_matches('/').to_owned();
        let mut builder = client_builder(s.timeout_seconds);
        if base_url.starts_with("http://") {
            // No TLS, so no ALPN to agree on HTTP/2: speak it from the first byte (h2c).
            builder = builder.http2_prior_knowledge();
        }
        let client = builder.build().map_err(|e| setup_err(CHANNEL, e))?;
        Ok(Self {
            client,
            base_url,
            team_id: s.team_id.trim().to_owned(),
            key_id: s.key_id.trim().to_owned(),
            key,
            topic: s.topic.trim().to_owned(),
            expiration: Duration::from_secs(s.expiration_seconds),
            token: Mutex::new(None),
        })
    }

    /// The provider token to use at `now`: the current one while younger than 50 minutes,
    /// else a fresh one.
    fn provider_token(&self, now: Instant) -> Result<String, SendError> {
        let mut cached = self.token.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(token) = cached.as_ref()
            && now.saturating_duration_since(token.issued) < TOKEN_REUSE
        {
            return Ok(token.value.clone());
        }
        let claims = json!({"iss": self.team_id, "iat": chrono::Utc::now().timestamp()});
        let value = self
            .key
            .sign(&[("kid", &self.key_id)], &claims)
            .map_err(|e| SendError::new(FailureKind::Auth, format!("apns: signing the provider token: {e}")))?;
        *cached = Some(ProviderToken {
            value: value.clone(),
            issued: now,
        });
        Ok(value)
    }

    /// Apple refused the token: the next send signs a new one.
    fn drop_token(&self) {
        *self.token.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    }

    fn payload(m: &Outbound<'_>) -> serde_json::Value {
        json!({
            "aps": {
                "alert": {"title": m.notice.push_title, "body": m.notice.push_body},
                "sound": "default",
            },
            "url": m.notice_url,
            "reference": m.reference,
        })
    }
}

/// What Apple's `reason` means for this push.
fn reason_kind(status: u16, reason: Option<&str>) -> FailureKind {
    match reason {
        Some("Unregistered") => FailureKind::Unregistered,
        Some("BadDeviceToken") | Some("DeviceTokenNotForTopic") => FailureKind::Rejected,
        Some("ExpiredProviderToken") | Some("InvalidProviderToken") | Some("MissingProviderToken") => FailureKind::Auth,
        // Our configuration: the topic, the key's team, a certificate environment.
        Some("BadTopic")
        | Some("TopicDisallowed")
        | Some("MissingTopic")
        | Some("BadCertificate")
        | Some("BadCertificateEnvironment")
        | Some("Forbidden") => FailureKind::Auth,
        Some("TooManyRequests") | Some("TooManyProviderTokenUpdates") => FailureKind::Throttled,
        Some("InternalServerError") | Some("ServiceUnavailable") | Some("Shutdown") => FailureKind::ProviderError,
        _ if status == 410 => FailureKind::Unregistered,
        _ => status_kind(status),
    }
}

#[async_trait]
impl Provider for ApnsProvider {
    async fn send(&self, m: &Outbound<'_>) -> Result<Accepted, SendError> {
        let device = m.delivery.address.trim();
        // Device tokens are hexadecimal; anything else would also change the request's path.
        if device.is_empty() || !device.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SendError::permanent("apns: the device token is not hexadecimal"));
        }
        let id = apns_id(&m.delivery.idempotency_key);
        let token = self.provider_token(Instant::now())?;
        let expiration = (chrono::Utc::now().timestamp() as u64).saturating_add(self.expiration.as_secs());
        let response = self
            .client
            .post(format!("{}/3/device/{device}", self.base_url))
            .header(reqwest::header::AUTHORIZATION, format!("bearer {token}"))
            .header("apns-topic", &self.topic)
            .header("apns-push-type", "alert")
            .header("apns-priority", "10")
            .header("apns-expiration", expiration.to_string())
            .header("apns-id", &id)
            .json(&Self::payload(m))
            .send()
            .await
            .map_err(|e| request_failed(PROVIDER, &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        if (200..300).contains(&status) {
            let echoed = headers
                .get("apns-id")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty());
            return Ok(Accepted::with_id(echoed.unwrap_or(&id)));
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let reason: Option<String> = body
            .get("reason")
            .and_then(|r| r.as_str())
            .map(|r| r.chars().filter(char::is_ascii_alphanumeric).take(64).collect());
        if matches!(
            reason.as_deref(),
            Some("ExpiredProviderToken") | Some("InvalidProviderToken")
        ) {
            self.drop_token();
        }
        let kind = reason_kind(status, reason.as_deref());
        Err(http_failure(PROVIDER, kind, status, reason.as_deref(), &headers))
    }
}

#[cfg(test)]
mod tests {
    use super::super::jwt::decode_unverified;
    use super::super::webhook::fixture::{REFERENCE, sample};
    use super::*;
    use crate::domain::{Channel, Locale};
    use base64::Engine;
    use http_body_util::{BodyExt, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, Version};
    use ring::rand::SystemRandom;
    use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
    use std::collections::VecDeque;
    use std::sync::Arc;

    const DEVICE: &str = "80f1f8e5a0d1f2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b";

    /// What the test server saw of one request.
    #[derive(Debug, Clone)]
    struct Seen {
        version: Version,
        method: String,
        path: String,
        headers: hyper::HeaderMap,
        body: Vec<u8>,
    }

    #[derive(Clone)]
    struct Canned {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    }

    fn canned(status: u16, headers: &[(&'static str, &str)], body: &str) -> Canned {
        Canned {
            status,
            headers: headers.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
            body: body.to_owned(),
        }
    }

    struct H2cServer {
        base_url: String,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl H2cServer {
        fn seen(&self) -> Vec<Seen> {
            self.seen.lock().expect("lock").clone()
        }
    }

    /// An HTTP/2-only server without TLS (h2c, prior knowledge) answering with `answers` in
    /// turn, the last one repeated. An HTTP/1.1 client cannot talk to it at all.
    async fn h2c_server(answers: Vec<Canned>) -> H2cServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(VecDeque::from(answers)));
        let (seen_c, answers_c) = (seen.clone(), answers.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (seen, answers) = (seen_c.clone(), answers_c.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, answers) = (seen.clone(), answers.clone());
                        async move {
                            let version = req.version();
                            let method = req.method().to_string();
                            let path = req.uri().path().to_owned();
                            let headers = req.headers().clone();
                            let body = req.into_body().collect().await?.to_bytes().to_vec();
                            seen.lock().expect("lock").push(Seen {
                                version,
                                method,
                                path,
                                headers,
                                body,
                            });
                            let answer = {
                                let mut queue = answers.lock().expect("lock");
                                if queue.len() > 1 {
                                    queue.pop_front()
                                } else {
                                    queue.front().cloned()
                                }
                            }
                            .expect("an answer");
                            let mut response = Response::builder().status(answer.status);
                            for (name, value) in &answer.headers {
                                response = response.header(*name, value);
                            }
                            Ok::<_, hyper::Error>(response.body(Full::new(Bytes::from(answer.body))).expect("response"))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        H2cServer {
            base_url: format!("http://{addr}"),
            seen,
        }
    }

    /// A fresh P-256 key: its PEM for the settings and its public key for verifying.
    fn key() -> (String, Vec<u8>) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
        let pair =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("pair");
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            lines.join("\n")
        );
        (pem, pair.public_key().as_ref().to_vec())
    }

    fn settings(base_url: &str, pem: &str) -> ApnsSettings {
        ApnsSettings {
            team_id: "TEAM123456".into(),
            key_id: "KEY1234567".into(),
            private_key_file: None,
            private_key: Some(Secret::new(pem)),
            topic: "com.example.merchant".into(),
            base_url: base_url.into(),
            timeout_seconds: 5,
            expiration_seconds: default_expiration(),
        }
    }

    fn provider(base_url: &str, pem: &str) -> ApnsProvider {
        crate::install_crypto_provider();
        ApnsProvider::from_settings(&settings(base_url, pem)).expect("provider")
    }

    fn header<'a>(seen: &'a Seen, name: &str) -> &'a str {
        seen.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    #[tokio::test]
    async fn wire_format_is_http2_with_a_verified_provider_token() {
        let (pem, public) = key();
        let server = h2c_server(vec![canned(200, &[("apns-id", "placeholder")], "")]).await;
        let p = provider(&server.base_url, &pem);
        assert!(!p.reports_delivery());
        let s = sample(Channel::Push, DEVICE, Locale::En);
        let expected_id = apns_id(&s.delivery.idempotency_key);
        let accepted = p.send(&s.outbound()).await.expect("accepted");
        assert_eq!(accepted, Accepted::with_id("placeholder"), "Apple's echoed apns-id");

        let seen = server.seen();
        assert_eq!(seen.len(), 1);
        let r = &seen[0];
        assert_eq!(r.version, Version::HTTP_2);
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, format!("/3/device/{DEVICE}"));
        assert_eq!(header(r, "apns-topic"), "com.example.merchant");
        assert_eq!(header(r, "apns-push-type"), "alert");
        assert_eq!(header(r, "apns-priority"), "10");
        assert_eq!(header(r, "apns-id"), expected_id);
        assert_eq!(header(r, "content-type"), "application/json");
        let expiration: i64 = header(r, "apns-expiration").parse().expect("epoch seconds");
        assert!((expiration - chrono::Utc::now().timestamp() - 86_400).abs() < 60);
        let body: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(
            body,
            json!({
                "aps": {"alert": {"title": s.notice.push_title, "body": s.notice.push_body}, "sound": "default"},
                "url": s.notice.url,
                "reference": REFERENCE,
            })
        );

        let auth = header(r, "authorization");
        let jwt = auth.strip_prefix("bearer ").expect("bearer token");
        let d = decode_unverified(jwt).expect("jwt");
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
            .verify(d.signing_input.as_bytes(), &d.signature)
            .expect("ES256 signature verifies");
        assert_eq!(d.header, json!({"alg": "ES256", "kid": "KEY1234567"}));
        assert_eq!(d.claims["iss"], "TEAM123456");
        let iat = d.claims["iat"].as_i64().expect("iat");
        assert!((iat - chrono::Utc::now().timestamp()).abs() < 60);
    }

    #[tokio::test]
    async fn without_an_echoed_id_the_derived_one_is_kept() {
        let (pem, _) = key();
        let server = h2c_server(vec![canned(200, &[], "")]).await;
        let p = provider(&server.base_url, &pem);
        let s = sample(Channel::Push, DEVICE, Locale::En);
        let accepted = p.send(&s.outbound()).await.expect("accepted");
        assert_eq!(accepted, Accepted::with_id(apns_id(&s.delivery.idempotency_key)));
    }

    #[test]
    fn apns_id_is_a_stable_uuid_of_the_idempotency_key() {
        let a = apns_id("drf_1:m-1:push");
        assert_eq!(a, apns_id("drf_1:m-1:push"), "a resend carries the same id");
        assert_ne!(a, apns_id("drf_2:m-1:push"));
        let parsed = uuid::Uuid::parse_str(&a).expect("uuid");
        assert_eq!(parsed.get_version_num(), 8);
        assert_eq!(a, a.to_lowercase());
    }

    #[tokio::test]
    async fn provider_token_is_reused_then_renewed() {
        let (pem, _) = key();
        let server = h2c_server(vec![
            canned(200, &[], ""),
            canned(200, &[], ""),
            canned(403, &[], r#"{"reason": "ExpiredProviderToken"}"#),
            canned(200, &[], ""),
        ])
        .await;
        let p = provider(&server.base_url, &pem);
        let s = sample(Channel::Push, DEVICE, Locale::En);
        p.send(&s.outbound()).await.expect("1");
        p.send(&s.outbound()).await.expect("2");
        let e = p.send(&s.outbound()).await.expect_err("expired");
        assert_eq!(e.kind, FailureKind::Auth);
        p.send(&s.outbound()).await.expect("4");
        let auth: Vec<String> = server
            .seen()
            .iter()
            .map(|r| header(r, "authorization").to_owned())
            .collect();
        assert_eq!(auth[0], auth[1], "reused");
        assert_eq!(auth[1], auth[2]);
        assert_ne!(auth[2], auth[3], "renewed after Apple called it expired");
        let ids: Vec<String> = server.seen().iter().map(|r| header(r, "apns-id").to_owned()).collect();
        assert!(
            ids.iter().all(|i| *i == ids[0]),
            "every attempt of one delivery has one apns-id"
        );

        // Renewed once 50 minutes old, kept before.
        let first = p.provider_token(Instant::now()).expect("token");
        assert_eq!(
            p.provider_token(Instant::now() + Duration::from_secs(49 * 60))
                .expect("token"),
            first
        );
        assert_ne!(
            p.provider_token(Instant::now() + Duration::from_secs(51 * 60))
                .expect("token"),
            first
        );
    }

    #[tokio::test]
    async fn errors_map_to_failure_kinds() {
        let (pem, _) = key();
        let cases = [
            (
                canned(410, &[], r#"{"reason":"Unregistered","timestamp":1700000000000}"#),
                FailureKind::Unregistered,
            ),
            (
                canned(400, &[], r#"{"reason":"BadDeviceToken"}"#),
                FailureKind::Rejected,
            ),
            (
                canned(400, &[], r#"{"reason":"DeviceTokenNotForTopic"}"#),
                FailureKind::Rejected,
            ),
            (
                canned(400, &[], r#"{"reason":"PayloadTooLarge"}"#),
                FailureKind::Rejected,
            ),
            (
                canned(403, &[], r#"{"reason":"InvalidProviderToken"}"#),
                FailureKind::Auth,
            ),
            (canned(400, &[], r#"{"reason":"BadTopic"}"#), FailureKind::Auth),
            (
                canned(429, &[("retry-after", "20")], r#"{"reason":"TooManyRequests"}"#),
                FailureKind::Throttled,
            ),
            (
                canned(500, &[], r#"{"reason":"InternalServerError"}"#),
                FailureKind::ProviderError,
            ),
            (
                canned(503, &[], r#"{"reason":"ServiceUnavailable"}"#),
                FailureKind::ProviderError,
            ),
            (canned(502, &[], ""), FailureKind::ProviderError),
        ];
        for (answer, kind) in cases {
            let server = h2c_server(vec![answer.clone()]).await;
            let p = provider(&server.base_url, &pem);
            let s = sample(Channel::Push, DEVICE, Locale::En);
            let e = p.send(&s.outbound()).await.expect_err("failure");
            assert_eq!(e.kind, kind, "{} {}", answer.status, answer.body);
            assert!(
                !e.message.contains(DEVICE) && !e.message.contains("80f1f8e5"),
                "{}",
                e.message
            );
            if kind == FailureKind::Throttled {
                assert_eq!(e.retry_after, Some(Duration::from_secs(20)));
            }
        }
    }

    #[tokio::test]
    async fn malformed_tokens_and_dead_servers() {
        let (pem, _) = key();
        let server = h2c_server(vec![canned(200, &[], "")]).await;
        let p = provider(&server.base_url, &pem);
        let s = sample(Channel::Push, "../../evil", Locale::En);
        let e = p.send(&s.outbound()).await.expect_err("refused");
        assert_eq!(e.kind, FailureKind::Rejected);
        assert!(!e.message.contains("evil"));
        assert!(server.seen().is_empty(), "nothing sent");

        let p = provider("http://127.0.0.1:9", &pem);
        let s = sample(Channel::Push, DEVICE, Locale::En);
        let e = p.send(&s.outbound()).await.expect_err("network");
        assert_eq!(e.kind, FailureKind::Network);
        assert!(!e.message.contains(DEVICE), "{}", e.message);
    }

    #[test]
    fn settings_are_checked() {
        crate::install_crypto_provider();
        let (pem, _) = key();
        let mut s = settings("https://api.push.apple.com", &pem);
        s.private_key_file = Some("/nonexistent/AuthKey.p8".into());
        assert!(ApnsProvider::from_settings(&s).is_err(), "two key sources");
        let s = settings(
            "https://api.push.apple.com",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
        );
        let err = ApnsProvider::from_settings(&s).expect_err("bad key").to_string();
        assert!(err.contains("private key"), "{err}");
        let mut s = settings("https://api.push.apple.com", &pem);
        s.topic = String::new();
        assert!(ApnsProvider::from_settings(&s).is_err());

        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("AuthKey_KEY1234567.p8");
        std::fs::write(&file, &pem).expect("write");
        let parsed: ApnsSettings = toml::from_str(&format!(
            "team_id = 'TEAM123456'\nkey_id = 'KEY1234567'\ntopic = 'com.example.merchant'\nprivate_key_file = '{}'",
            file.display()
        ))
        .expect("parse");
        assert_eq!(parsed.base_url, "https://api.push.apple.com");
        assert_eq!((parsed.timeout_seconds, parsed.expiration_seconds), (15, 86_400));
        ApnsProvider::from_settings(&parsed).expect("from a .p8 file");
        assert!(toml::from_str::<ApnsSettings>("team_id = 'T'\ncertificate = 'x'").is_err());
    }
}
