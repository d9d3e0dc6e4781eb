//! Push through Firebase Cloud Messaging's HTTP v1 API: `POST
//! {base_url}/v1/projects/{project_id}/messages:send` with an OAuth2 bearer token. The token
//! comes from Google's service-account grant (RFC 7523): a JWT signed RS256 with the service
//! account's private key, exchanged at its `token_uri` for an access token, which is cached
//! until shortly before it expires (one refresh at a time) and refreshed once when FCM answers
//! 401. FCM reports no delivery; an accepted push counts as reached.
//!
//! The message carries a notification (title and body) and data (`url`, `reference`,
//! `delivery_id`, so the app can open the notice and drop a repeat) at Android priority high.
//! No `apns` block: FCM's defaults for notification messages suit iOS. FCM has no idempotency
//! key; `delivery_id` in the data is how a repeat can be recognised on the device.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::json;

use super::jwt::JwtKey;
use super::webhook::{client_builder, http_failure, request_failed, status_kind};
use super::{Accepted, ChannelSetupError, FailureKind, Outbound, Provider, SendError, setup_err};
use crate::config::Secret;

const CHANNEL: &str = "push";
const PROVIDER: &str = "fcm";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Refresh this long before the token expires (or at half its life, if that is shorter).
const REFRESH_MARGIN: Duration = Duration::from_secs(300);

fn default_base_url() -> String {
    "https://fcm.googleapis.com".into()
}
fn default_timeout() -> u64 {
    15
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FcmSettings {
    /// The Firebase project; the service account's `project_id` when absent.
    #[serde(default)]
    pub project_id: Option<String>,
    /// Path to the service-account JSON key file; or the JSON itself, inline.
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    #[serde(default)]
    pub service_account_json: Option<Secret>,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Overrides the service account's `token_uri`.
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

/// The fields of a Google service-account key file that the grant needs.
#[derive(serde::Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
    #[serde(default)]
    project_id: Option<String>,
}

struct CachedToken {
    value: String,
    refresh_at: Instant,
}

pub struct FcmProvider {
    client: reqwest::Client,
    send_url: String,
    token_url: String,
    client_email: String,
    key_id: Option<String>,
    key: JwtKey,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for FcmProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FcmProvider")
            .field("send_url", &self.send_url)
            .finish_non_exhaustive()
    }
}

fn nonempty(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|s| !s.is_empty())
}

impl FcmProvider {
    pub fn from_settings(s: &FcmSettings) -> Result<Self, ChannelSetupError> {
        let raw = match (&s.service_account_file, &s.service_account_json) {
            (Some(path), None) => std::fs::read_to_string(path)
                .map_err(|e| setup_err(CHANNEL, format!("fcm: reading {}: {e}", path.display())))?,
            (None, Some(json)) => json.expose().to_owned(),
            _ => {
                return Err(setup_err(
                    CHANNEL,
                    "fcm: set exactly one of service_account_file and service_account_json",
                ));
            }
        };
        // serde's messages can quote the offending value; say where only.
        let account: ServiceAccount = serde_json::from_str(&raw).map_err(|e| {
            setup_err(
                CHANNEL,
                format!(
                    "fcm: the service account JSON is not valid or lacks client_email/private_key (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        let key = JwtKey::rs256_from_pem(&account.private_key)
            .map_err(|e| setup_err(CHANNEL, format!("fcm: service account private_key: {e}")))?;
        let project = nonempty(s.project_id.as_deref())
            .or(nonempty(account.project_id.as_deref()))
            .ok_or_else(|| setup_err(CHANNEL, "fcm: project_id is required"))?;
        let token_url = nonempty(s.token_url.as_deref())
            .or(nonempty(account.token_uri.as_deref()))
            .ok_or_else(|| setup_err(CHANNEL, "fcm: no token_url and no token_uri in the service account"))?
            .to_owned();
        let client = client_builder(s.timeout_seconds)
            .build()
            .map_err(|e| setup_err(CHANNEL, e))?;
        Ok(Self {
            client,
            send_url: format!(
                "{}/v1/projects/{project}/messages:send",
                s.base_url.trim_end_matches('/')
            ),
            token_url,
            client_email: account.client_email,
            key_id: account.private_key_id.filter(|k| !k.is_empty()),
            key,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The signed JWT assertion of the service-account grant, issued now.
    fn assertion(&self) -> Result<String, SendError> {
        let iat = chrono::Utc::now().timestamp();
        let claims = json!({
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_url,
            "iat": iat,
            "exp": iat + 3600,
        });
        let mut header = vec![("typ", "JWT")];
        if let Some(kid) = &self.key_id {
            header.push(("kid", kid));
        }
        self.key
            .sign(&header, &claims)
            .map_err(|e| SendError::new(FailureKind::Auth, format!("fcm: signing the token request: {e}")))
    }

    /// A valid access token: the cached one, unless it is near expiry or is `stale` (the one
    /// FCM just refused), in which case a new one is fetched. The lock is held across the
    /// fetch, so concurrent sends wait for one refresh rather than each making their own.
    async fn access_token(&self, stale: Option<&str>) -> Result<String, SendError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref()
            && Instant::now() < token.refresh_at
            && stale != Some(token.value.as_str())
        {
            return Ok(token.value.clone());
        }
        let fetched = self.fetch_token().await?;
        let value = fetched.value.clone();
        *cached = Some(fetched);
        Ok(value)
    }

    async fn fetch_token(&self) -> Result<CachedToken, SendError> {
        const WHO: &str = "fcm token endpoint";
        let assertion = self.assertion()?;
        let response = self
            .client
            .post(&self.token_url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&[("grant_type", GRANT_TYPE), ("assertion", assertion.as_str())])
            .send()
            .await
            .map_err(|e| request_failed(WHO, &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if !(200..300).contains(&status) {
            // OAuth errors (`invalid_grant`: a revoked key, a skewed clock) are ours to fix.
            let code = body.get("error").and_then(|e| e.as_str()).map(safe_word);
            let kind = match status {
                400 | 401 | 403 => FailureKind::Auth,
                other => status_kind(other),
            };
            return Err(http_failure(WHO, kind, status, code.as_deref(), &headers));
        }
        let value = body
            .get("access_token")
            .and_then(|t| t.as_str())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| SendError::transient(format!("{WHO} answered without an access_token")))?;
        let lifetime = Duration::from_secs(body.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(3600));
        let refresh_in = lifetime.saturating_sub(REFRESH_MARGIN).max(lifetime / 2);
        Ok(CachedToken {
            value: value.to_owned(),
            refresh_at: Instant::now() + refresh_in,
        })
    }

    fn payload(m: &Outbound<'_>) -> serde_json::Value {
        json!({
            "message": {
                "token": m.delivery.address,
                "notification": {"title": m.notice.push_title, "body": m.notice.push_body},
                "data": {
                    "url": m.notice_url,
                    "reference": m.reference,
                    "delivery_id": m.delivery.id.as_str(),
                },
                "android": {"priority": "high"},
            }
        })
    }
}

/// Only code vocabulary (letters, digits, `_`, `.`, `-`) from a provider's body into messages.
fn safe_word(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(64)
        .collect()
}

/// FCM's error (`{"error": {"status": ..., "details": [{"errorCode": ...}]}}`) as a failure
/// kind and the code to report.
fn classify(status: u16, body: &serde_json::Value) -> (FailureKind, Option<String>) {
    let error = body.get("error");
    let fcm_code = error
        .and_then(|e| e.get("details"))
        .and_then(|d| d.as_array())
        .and_then(|details| details.iter().find_map(|d| d.get("errorCode").and_then(|c| c.as_str())));
    let api_status = error.and_then(|e| e.get("status")).and_then(|s| s.as_str());
    let code = fcm_code.or(api_status);
    let kind = match code {
        // The token is no longer (or was never) this project's to send to.
        Some("UNREGISTERED") | Some("SENDER_ID_MISMATCH") => FailureKind::Unregistered,
        Some("INVALID_ARGUMENT") => FailureKind::Rejected,
        Some("QUOTA_EXCEEDED") | Some("RESOURCE_EXHAUSTED") => FailureKind::Throttled,
        Some("UNAVAILABLE") | Some("INTERNAL") => FailureKind::ProviderError,
        // Firebase could not authenticate to APNs (or web push) with the project's credentials.
        Some("THIRD_PARTY_AUTH_ERROR") | Some("UNAUTHENTICATED") | Some("PERMISSION_DENIED") => FailureKind::Auth,
        _ if status == 404 => FailureKind::Unregistered,
        _ => status_kind(status),
    };
    (kind, code.map(safe_word))
}

#[async_trait]
impl Provider for FcmProvider {
    async fn send(&self, m: &Outbound<'_>) -> Result<Accepted, SendError> {
        let payload = Self::payload(m);
        let mut token = self.access_token(None).await?;
        let mut refreshed = false;
        loop {
            let response = self
                .client
                .post(&self.send_url)
                .bearer_auth(&token)
                .json(&payload)
                .send()
                .await
                .map_err(|e| request_failed(PROVIDER, &e))?;
            let status = response.status().as_u16();
            if status == 401 && !refreshed {
                // The cached token was revoked or expired early: one fresh token, one retry.
                refreshed = true;
                token = self.access_token(Some(&token)).await?;
                continue;
            }
            let headers = response.headers().clone();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            if (200..300).contains(&status) {
                let name = body.get("name").and_then(|n| n.as_str());
                return Ok(name.map(Accepted::with_id).unwrap_or_default());
            }
            let (kind, code) = classify(status, &body);
            return Err(http_failure(PROVIDER, kind, status, code.as_deref(), &headers));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::jwt::decode_unverified;
    use super::super::webhook::fixture::{REFERENCE, sample};
    use super::*;
    use crate::domain::{Channel, Locale};
    use ring::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const ACCOUNT: &str = include_str!("../../tests/fixtures/fcm-service-account.json");
    const PUBLIC_KEY: &[u8] = include_bytes!("../../tests/fixtures/fcm-service-account.public.der");
    const TOKEN: &str = "dGhpcyBpcyBhIGRldmljZSB0b2tlbg:APA91bTESTTOKEN";
    const SEND_PATH: &str = "/v1/projects/tocsin-test/messages:send";

    fn settings(server: &MockServer) -> FcmSettings {
        FcmSettings {
            project_id: None,
            service_account_file: None,
            service_account_json: Some(Secret::new(ACCOUNT)),
            base_url: server.uri(),
            token_url: Some(format!("{}/token", server.uri())),
            timeout_seconds: 5,
        }
    }

    fn provider(server: &MockServer) -> FcmProvider {
        crate::install_crypto_provider();
        FcmProvider::from_settings(&settings(server)).expect("provider")
    }

    async fn mount_token(server: &MockServer, expires_in: u64, expect: impl Into<wiremock::Times>) {
        Mock::given(method("POST"))
            .and(path("/token"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "access_token": "ya29.test-access-token", "expires_in": expires_in, "token_type": "Bearer"
            })))
            .expect(expect)
            .mount(server)
            .await;
    }

    fn accepted() -> ResponseTemplate {
        ResponseTemplate::new(200)
            .set_body_json(json!({"name": "projects/tocsin-test/messages/0:1500415314455276%31bd1c9631bd1c96"}))
    }

    fn form_value(body: &[u8], name: &str) -> Option<String> {
        std::str::from_utf8(body).ok()?.split('&').find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k == name).then(|| v.replace("%3A", ":").replace("%2F", "/"))
        })
    }

    #[tokio::test]
    async fn wire_format_and_a_verified_service_account_grant() {
        let server = MockServer::start().await;
        mount_token(&server, 3600, 1).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .and(header("authorization", "Bearer ya29.test-access-token"))
            .and(header("content-type", "application/json"))
            .respond_with(accepted())
            .expect(1)
            .mount(&server)
            .await;
        let p = provider(&server);
        assert!(!p.reports_delivery());
        let s = sample(Channel::Push, TOKEN, Locale::En);
        let ok = p.send(&s.outbound()).await.expect("accepted");
        assert_eq!(
            ok,
            Accepted::with_id("projects/tocsin-test/messages/0:1500415314455276%31bd1c9631bd1c96")
        );

        let requests = server.received_requests().await.expect("recorded");
        let token_req = requests
            .iter()
            .find(|r| r.url.path() == "/token")
            .expect("token request");
        assert_eq!(
            form_value(&token_req.body, "grant_type").as_deref(),
            Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
        );
        let assertion = form_value(&token_req.body, "assertion").expect("assertion");
        let jwt = decode_unverified(&assertion).expect("jwt");
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, PUBLIC_KEY)
            .verify(jwt.signing_input.as_bytes(), &jwt.signature)
            .expect("RS256 signature verifies with the service account's public key");
        assert_eq!(jwt.header["alg"], "RS256");
        assert_eq!(jwt.header["typ"], "JWT");
        assert_eq!(jwt.header["kid"], "0123456789abcdef0123456789abcdef01234567");
        assert_eq!(jwt.claims["iss"], "tocsin-push@tocsin-test.iam.gserviceaccount.com");
        assert_eq!(jwt.claims["scope"], SCOPE);
        assert_eq!(jwt.claims["aud"], format!("{}/token", server.uri()));
        let iat = jwt.claims["iat"].as_i64().expect("iat");
        assert!((iat - chrono::Utc::now().timestamp()).abs() < 60);
        assert_eq!(jwt.claims["exp"].as_i64(), Some(iat + 3600));

        let send_req = requests
            .iter()
            .find(|r| r.url.path() == SEND_PATH)
            .expect("send request");
        let body: serde_json::Value = send_req.body_json().expect("json");
        assert_eq!(
            body,
            json!({"message": {
                "token": TOKEN,
                "notification": {"title": s.notice.push_title, "body": s.notice.push_body},
                "data": {"url": s.notice.url, "reference": REFERENCE, "delivery_id": s.delivery.id.as_str()},
                "android": {"priority": "high"},
            }})
        );
    }

    #[tokio::test]
    async fn token_is_fetched_once_for_many_sends_and_again_after_expiry() {
        let server = MockServer::start().await;
        // expires_in 2 s: refreshed at half-life, i.e. after 1 s.
        mount_token(&server, 2, 2).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(accepted())
            .mount(&server)
            .await;
        let p = provider(&server);
        let samples: Vec<_> = (0..5).map(|_| sample(Channel::Push, TOKEN, Locale::En)).collect();
        // Concurrent sends share one refresh.
        let p = &p;
        let results =
            futures_util::future::join_all(samples.iter().map(|s| async move { p.send(&s.outbound()).await })).await;
        assert!(results.iter().all(Result::is_ok));
        p.send(&samples[0].outbound())
            .await
            .expect("sequential send reuses the token");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        p.send(&samples[0].outbound()).await.expect("after expiry");
        let token_requests = server
            .received_requests()
            .await
            .expect("recorded")
            .iter()
            .filter(|r| r.url.path() == "/token")
            .count();
        assert_eq!(token_requests, 2);
    }

    #[tokio::test]
    async fn a_refused_token_is_refreshed_once() {
        let server = MockServer::start().await;
        mount_token(&server, 3600, 2).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(
                ResponseTemplate::new(401).set_body_json(json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}})),
            )
            .up_to_n_times(1)
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(accepted())
            .mount(&server)
            .await;
        let p = provider(&server);
        let s = sample(Channel::Push, TOKEN, Locale::En);
        p.send(&s.outbound()).await.expect("accepted after one refresh");

        // Refused twice: Auth, without a third attempt.
        let server = MockServer::start().await;
        mount_token(&server, 3600, 2).await;
        Mock::given(method("POST"))
            .and(path(SEND_PATH))
            .respond_with(ResponseTemplate::new(401))
            .expect(2)
            .mount(&server)
            .await;
        let p = provider(&server);
        let e = p.send(&s.outbound()).await.expect_err("auth");
        assert_eq!(e.kind, FailureKind::Auth);
    }

    #[tokio::test]
    async fn token_endpoint_failures() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/token"))
            .respond_with(
                ResponseTemplate::new(400)
                    .set_body_json(json!({"error": "invalid_grant", "error_description": "Invalid JWT Signature."})),
            )
            .mount(&server)
            .await;
        let p = provider(&server);
        let s = sample(Channel::Push, TOKEN, Locale::En);
        let e = p.send(&s.outbound()).await.expect_err("auth");
        assert_eq!(e.kind, FailureKind::Auth);
        assert!(e.message.contains("invalid_grant"), "{}", e.message);
        assert!(
            server
                .received_requests()
                .await
                .expect("recorded")
                .iter()
                .all(|r| r.url.path() == "/token")
        );
    }

    fn fcm_error(status: u16, api_status: &str, fcm_code: Option<&str>) -> ResponseTemplate {
        let mut details = vec![];
        if let Some(code) = fcm_code {
            details.push(json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}));
        }
        ResponseTemplate::new(status).set_body_json(json!({"error": {
            "code": status,
            "message": format!("The registration token {TOKEN} is not a valid FCM registration token"),
            "status": api_status,
            "details": details,
        }}))
    }

    #[tokio::test]
    async fn errors_map_to_failure_kinds() {
        let cases = [
            (
                fcm_error(404, "NOT_FOUND", Some("UNREGISTERED")),
                FailureKind::Unregistered,
            ),
            (fcm_error(404, "NOT_FOUND", None), FailureKind::Unregistered),
            (
                fcm_error(400, "INVALID_ARGUMENT", Some("INVALID_ARGUMENT")),
                FailureKind::Rejected,
            ),
            (
                fcm_error(403, "PERMISSION_DENIED", Some("SENDER_ID_MISMATCH")),
                FailureKind::Unregistered,
            ),
            (
                fcm_error(429, "RESOURCE_EXHAUSTED", Some("QUOTA_EXCEEDED")).insert_header("Retry-After", "60"),
                FailureKind::Throttled,
            ),
            (
                fcm_error(503, "UNAVAILABLE", Some("UNAVAILABLE")),
                FailureKind::ProviderError,
            ),
            (fcm_error(500, "INTERNAL", Some("INTERNAL")), FailureKind::ProviderError),
            (
                fcm_error(401, "UNAUTHENTICATED", Some("THIRD_PARTY_AUTH_ERROR")),
                FailureKind::Auth,
            ),
            (ResponseTemplate::new(502), FailureKind::ProviderError),
        ];
        for (template, kind) in cases {
            let server = MockServer::start().await;
            mount_token(&server, 3600, 1..=2).await;
            Mock::given(method("POST"))
                .and(path(SEND_PATH))
                .respond_with(template)
                .mount(&server)
                .await;
            let p = provider(&server);
            let s = sample(Channel::Push, TOKEN, Locale::En);
            let e = p.send(&s.outbound()).await.expect_err("failure");
            assert_eq!(e.kind, kind, "{}", e.message);
            assert!(
                !e.message.contains(TOKEN) && !e.message.contains("APA91b"),
                "no token: {}",
                e.message
            );
            if kind == FailureKind::Throttled {
                assert_eq!(e.retry_after, Some(Duration::from_secs(60)));
            }
        }
    }

    #[test]
    fn settings_are_checked() {
        crate::install_crypto_provider();
        let base = FcmSettings {
            project_id: None,
            service_account_file: None,
            service_account_json: None,
            base_url: default_base_url(),
            token_url: None,
            timeout_seconds: 15,
        };
        assert!(FcmProvider::from_settings(&base).is_err(), "no service account");
        let mut s = base.clone();
        s.service_account_json = Some(Secret::new("{\"client_email\": \"x\", \"private_key\": \"nope\"}"));
        let err = FcmProvider::from_settings(&s).expect_err("bad key").to_string();
        assert!(!err.contains("nope"), "{err}");
        let mut s = base.clone();
        s.service_account_json = Some(Secret::new("{not json"));
        assert!(FcmProvider::from_settings(&s).is_err());

        // From a file, with the project and token URL taken from the JSON.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("sa.json");
        std::fs::write(&file, ACCOUNT).expect("write");
        let mut s = base.clone();
        s.service_account_file = Some(file);
        let p = FcmProvider::from_settings(&s).expect("provider");
        assert_eq!(
            p.send_url,
            "https://fcm.googleapis.com/v1/projects/tocsin-test/messages:send"
        );
        assert_eq!(p.token_url, "https://oauth2.googleapis.com/token");

        let parsed: FcmSettings = toml::from_str("service_account_file = '/etc/tocsin/fcm.json'").expect("parse");
        assert_eq!(parsed.base_url, "https://fcm.googleapis.com");
        assert_eq!(parsed.timeout_seconds, 15);
        assert!(toml::from_str::<FcmSettings>("api_key = 'legacy'").is_err());
    }
}
