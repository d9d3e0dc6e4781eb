//! SMS through Alibaba Cloud SMS (Dysmsapi `SendSms`, RPC style, API version 2017-05-25):
//! a form POST to `{base_url}/` carrying the common parameters and the message's, signed per
//! Aliyun's RPC signature v1 (HMAC-SHA1 over `POST&%2F&` + the percent-encoded canonical query,
//! keyed by `AccessKeySecret&`). Aliyun sends only registered templates: the configured
//! `template_code` (zh-CN; `template_code_en` for English) is filled with the incident
//! reference and the notice link. Delivery reports (SmsReport) come back by HTTP push.
//!
//! Phone numbers: the E.164 address loses its leading `+` (`+8613800138000` →
//! `8613800138000`). Aliyun documents that mainland numbers may come bare, or with `+86`,
//! `0086` or `86`, and international ones as country code + number without `+` or `00`.
//!
//! Idempotency: SendSms has no idempotency token. `OutId` carries our delivery id, so a report
//! (and Aliyun's console) ties a message to its delivery; `SignatureNonce` is a fresh random
//! UUID per request, because Aliyun refuses a reused nonce (`SignatureNonceUsed`).

use std::collections::BTreeMap;

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
use crate::domain::Locale;

const CHANNEL: &str = "sms";
const PROVIDER: &str = "aliyun";
const API_VERSION: &str = "2017-05-25";

fn default_base_url() -> String {
    "https://dysmsapi.aliyuncs.com".into()
}
fn default_region() -> String {
    "cn-hangzhou".into()
}
fn default_reference_param() -> String {
    "reference".into()
}
fn default_url_param() -> String {
    "url".into()
}
fn default_timeout() -> u64 {
    15
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliyunSettings {
    pub access_key_id: String,
    pub access_key_secret: Secret,
    /// The approved signature (签名) shown in 【】 before the text.
    pub sign_name: String,
    /// The approved template for zh-CN notices (`SMS_...`).
    pub template_code: String,
    /// The approved template for English notices; zh-CN's when absent.
    #[serde(default)]
    pub template_code_en: Option<String>,
    /// The template's variable names for the incident reference and the notice link.
    #[serde(default = "default_reference_param")]
    pub template_param_reference: String,
    #[serde(default = "default_url_param")]
    pub template_param_url: String,
    #[serde(default = "default_region")]
    pub region_id: String,
    /// Aliyun's delivery-report push carries no signature: the report URL configured in the
    /// console must end in `?token=<this>`, and reports without it are refused.
    #[serde(default)]
    pub report_token: Secret,
    #[serde(default = "default_base_url")]
    pub base_url: String,
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
}

pub struct AliyunProvider {
    client: reqwest::Client,
    endpoint: String,
    settings: AliyunSettings,
}

impl std::fmt::Debug for AliyunProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AliyunProvider")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl AliyunProvider {
    pub fn from_settings(s: &AliyunSettings) -> Result<Self, ChannelSetupError> {
        let required = [
            ("access_key_id", s.access_key_id.as_str()),
            ("access_key_secret", s.access_key_secret.expose()),
            ("sign_name", s.sign_name.as_str()),
            ("template_code", s.template_code.as_str()),
            ("template_param_reference", s.template_param_reference.as_str()),
            ("template_param_url", s.template_param_url.as_str()),
            ("region_id", s.region_id.as_str()),
        ];
        if let Some((name, _)) = required.iter().find(|(_, v)| v.trim().is_empty()) {
            return Err(setup_err(CHANNEL, format!("aliyun: {name} is required")));
        }
        let client = client_builder(s.timeout_seconds)
            .build()
            .map_err(|e| setup_err(CHANNEL, e))?;
        Ok(Self {
            client,
            endpoint: format!("{}/", s.base_url.trim_end_matches('/')),
            settings: s.clone(),
        })
    }

    fn template_for(&self, locale: Locale) -> &str {
        match locale {
            Locale::En => self
                .settings
                .template_code_en
                .as_deref()
                .filter(|t| !t.trim().is_empty())
                .unwrap_or(&self.settings.template_code),
            Locale::ZhCn => &self.settings.template_code,
        }
    }

    /// Every parameter of the request, `Signature` included, at time `timestamp` with `nonce`.
    fn signed_params(
        &self,
        m: &Outbound<'_>,
        timestamp: chrono::DateTime<chrono::Utc>,
        nonce: &str,
    ) -> BTreeMap<String, String> {
        let s = &self.settings;
        let mut template_param = serde_json::Map::new();
        template_param.insert(s.template_param_reference.clone(), m.reference.into());
        template_param.insert(s.template_param_url.clone(), m.notice_url.into());
        let mut p = BTreeMap::new();
        let mut put = |k: &str, v: &str| {
            p.insert(k.to_owned(), v.to_owned());
        };
        put("AccessKeyId", &s.access_key_id);
        put("Action", "SendSms");
        put("Format", "JSON");
        put("RegionId", &s.region_id);
        put("SignatureMethod", "HMAC-SHA1");
        put("SignatureNonce", nonce);
        put("SignatureVersion", "1.0");
        put("Timestamp", &timestamp.format("%Y-%m-%dT%H:%M:%SZ").to_string());
        put("Version", API_VERSION);
        put("PhoneNumbers", m.delivery.address.trim().trim_start_matches('+'));
        put("SignName", &s.sign_name);
        put("TemplateCode", self.template_for(m.notice.locale));
        put("TemplateParam", &serde_json::Value::Object(template_param).to_string());
        put("OutId", m.delivery.id.as_str());
        let signature = sign("POST", &p, s.access_key_secret.expose());
        p.insert("Signature".into(), signature);
        p
    }
}

/// Aliyun's percent-encoding: RFC 3986 unreserved characters (`A-Z a-z 0-9 - _ . ~`) stay,
/// every other byte of the UTF-8 becomes `%XX` in upper-case hex (so space is `%20`, `*` is
/// `%2A`, `~` is kept).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `METHOD&%2F&` + the percent-encoded canonical query (parameters sorted by name, each name
/// and value percent-encoded, joined by `=` and `&`), without `Signature`.
pub fn string_to_sign(http_method: &str, params: &BTreeMap<String, String>) -> String {
    let canonical = params
        .iter()
        .filter(|(k, _)| k.as_str() != "Signature")
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    format!("{http_method}&{}&{}", percent_encode("/"), percent_encode(&canonical))
}

/// base64(HMAC-SHA1(key = AccessKeySecret + "&", StringToSign)).
pub fn sign(http_method: &str, params: &BTreeMap<String, String>, access_key_secret: &str) -> String {
    let key = hmac::Key::new(
        hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        format!("{access_key_secret}&").as_bytes(),
    );
    STANDARD.encode(hmac::sign(&key, string_to_sign(http_method, params).as_bytes()).as_ref())
}

/// What an Aliyun `Code` means for this message. Configuration faults that would fail every
/// message (signature name, template, balance, credentials, clock) count as `Auth`: retried,
/// and against the provider so the next one is used. Codes about this number or text are
/// `Rejected`; flow control is `Throttled`; Aliyun's own faults are `ProviderError`.
fn code_kind(code: &str) -> Option<FailureKind> {
    use FailureKind::*;
    let kind = match code {
        "isv.MOBILE_NUMBER_ILLEGAL"
        | "isv.MOBILE_COUNT_OVER_LIMIT"
        | "isv.BLACK_KEY_CONTROL_LIMIT"
        | "isv.INVALID_PARAMETERS"
        | "isv.DENY_IP_RANGE" => Rejected,
        "isv.BUSINESS_LIMIT_CONTROL" | "isv.DAY_LIMIT_CONTROL" | "isv.MONTH_LIMIT_CONTROL" => Throttled,
        c if c.starts_with("Throttling") => Throttled,
        "isv.SMS_SIGNATURE_ILLEGAL"
        | "isv.SMS_SIGN_ILLEGAL"
        | "isv.SMS_TEMPLATE_ILLEGAL"
        | "isv.TEMPLATE_MISSING_PARAMETERS"
        | "isv.PARAM_LENGTH_LIMIT"
        | "isv.PARAM_NOT_SUPPORT_URL"
        | "isv.AMOUNT_NOT_ENOUGH"
        | "isv.OUT_OF_SERVICE"
        | "isv.ACCOUNT_NOT_EXISTS"
        | "isv.ACCOUNT_ABNORMAL"
        | "isp.RAM_PERMISSION_DENY"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAccessKeyId"
        | "InvalidTimeStamp.Expired"
        | "InvalidTimeStamp.Format" => Auth,
        c if c.starts_with("InvalidAccessKeyId") || c.starts_with("Forbidden") => Auth,
        // A reused nonce is our bug, and a retry signs with a fresh one.
        "SignatureNonceUsed" | "ServiceUnavailable" | "InternalError" => ProviderError,
        c if c.starts_with("isp.") => ProviderError,
        // Other isv.* ("independent software vendor", i.e. the caller's) faults are about
        // the request.
        c if c.starts_with("isv.") => Rejected,
        _ => return None,
    };
    Some(kind)
}

/// Only Aliyun's code vocabulary (letters, digits, `.`, `_`, `:`, `-`) goes into messages.
fn safe_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'))
        .take(64)
        .collect()
}

#[async_trait]
impl Provider for AliyunProvider {
    async fn send(&self, m: &Outbound<'_>) -> Result<Accepted, SendError> {
        let nonce = uuid::Uuid::new_v4().to_string();
        let params = self.signed_params(m, chrono::Utc::now(), &nonce);
        let response = self
            .client
            .post(&self.endpoint)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&params)
            .send()
            .await
            .map_err(|e| request_failed(PROVIDER, &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        let code = body.get("Code").and_then(|c| c.as_str()).map(safe_code);
        if (200..300).contains(&status) && code.as_deref() == Some("OK") {
            let biz_id = body.get("BizId").and_then(|b| b.as_str()).filter(|b| !b.is_empty());
            return Ok(biz_id.map(Accepted::with_id).unwrap_or_default());
        }
        let kind = match code.as_deref().and_then(code_kind) {
            Some(kind) => kind,
            // A 200 without `OK` and an unknown code: something new on Aliyun's side.
            None if (200..300).contains(&status) => FailureKind::ProviderError,
            None => status_kind(status),
        };
        Err(http_failure(PROVIDER, kind, status, code.as_deref(), &headers))
    }

    /// Aliyun pushes a delivery report (SmsReport) for every message.
    fn reports_delivery(&self) -> bool {
        true
    }
}

#[derive(serde::Deserialize)]
struct ReportItem {
    #[serde(default)]
    success: Option<serde_json::Value>,
    #[serde(default)]
    err_code: Option<String>,
    #[serde(default)]
    biz_id: Option<String>,
    #[serde(default)]
    out_id: Option<String>,
}

/// The receipts in one SmsReport push: a JSON array of reports (`phone_number`, `send_time`,
/// `report_time`, `success`, `err_code`, `err_msg`, `sms_size`, `biz_id`, `out_id`). Each is
/// keyed by our delivery id (`out_id`) when present, else Aliyun's `biz_id`; `success` true is
/// delivered, false undelivered with `err_code` in the detail. Reports with neither id are
/// skipped (nothing to match). The phone number and `err_msg` are never read into a receipt.
/// Aliyun expects the receiver to answer `{"code": 0, "msg": "成功"}`.
pub fn receipts_from_report(body: &[u8]) -> Result<Vec<Receipt>, String> {
    let items: Vec<ReportItem> =
        serde_json::from_slice(body).map_err(|e| format!("not an Aliyun SmsReport array: {e}"))?;
    let present = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
    Ok(items
        .iter()
        .filter_map(|item| {
            let key = match (present(&item.out_id), present(&item.biz_id)) {
                (Some(out_id), _) => ReceiptKey::DeliveryId(out_id),
                (None, Some(biz_id)) => ReceiptKey::ProviderMessageId(biz_id),
                (None, None) => return None,
            };
            let success = match &item.success {
                Some(serde_json::Value::Bool(b)) => *b,
                Some(serde_json::Value::String(s)) => s.eq_ignore_ascii_case("true"),
                _ => false,
            };
            let code = present(&item.err_code).map(|c| safe_code(&c)).unwrap_or_default();
            let (status, detail) = if success {
                (
                    ReceiptStatus::Delivered,
                    format!("aliyun delivered {code}").trim_end().to_owned(),
                )
            } else {
                (
                    ReceiptStatus::Failed(FailureKind::Undelivered),
                    format!(
                        "aliyun undelivered, error {}",
                        if code.is_empty() { "unknown" } else { &code }
                    ),
                )
            };
            Some(Receipt { key, status, detail })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::super::webhook::fixture::{REFERENCE, Sample, sample};
    use super::*;
    use crate::domain::Channel;
    use std::time::Duration;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    const NUMBER: &str = "+8613800138000";

    fn settings(base: &str) -> AliyunSettings {
        AliyunSettings {
            access_key_id: "testid".into(),
            access_key_secret: Secret::new("testsecret"),
            sign_name: "Tocsin".into(),
            template_code: "SMS_100000001".into(),
            template_code_en: Some("SMS_100000002".into()),
            template_param_reference: "reference".into(),
            template_param_url: "url".into(),
            region_id: "cn-hangzhou".into(),
            report_token: Secret::default(),
            base_url: base.into(),
            timeout_seconds: 5,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn doc_example() -> BTreeMap<String, String> {
        map(&[
            ("Timestamp", "2016-02-23T12:46:24Z"),
            ("Format", "XML"),
            ("AccessKeyId", "testid"),
            ("Action", "DescribeRegions"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureNonce", "3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf"),
            ("Version", "2014-05-26"),
            ("SignatureVersion", "1.0"),
        ])
    }

    /// Aliyun's worked example in "Request signatures" (RPC): AccessKeySecret `testsecret`.
    #[test]
    fn signature_matches_aliyuns_documented_example() {
        let p = doc_example();
        assert_eq!(
            string_to_sign("GET", &p),
            "GET&%2F&AccessKeyId%3Dtestid%26Action%3DDescribeRegions%26Format%3DXML\
             %26SignatureMethod%3DHMAC-SHA1%26SignatureNonce%3D3ee8c1b8-83d3-44af-a94f-4e0ad82fd6cf\
             %26SignatureVersion%3D1.0%26Timestamp%3D2016-02-23T12%253A46%253A24Z%26Version%3D2014-05-26"
        );
        assert_eq!(sign("GET", &p, "testsecret"), "OLeaidS1JvxuMvnyHOwuJ+uX5qY=");
        // The same request POSTed (as SendSms is): recomputed independently from the spec
        // (Python hmac/hashlib/urllib.parse.quote).
        assert_eq!(sign("POST", &p, "testsecret"), "MxbnVAM4w6sft9xjVpe/GCKueuk=");
        // Signature itself is not signed.
        let mut with_sig = p.clone();
        with_sig.insert("Signature".into(), "x".into());
        assert_eq!(sign("POST", &with_sig, "testsecret"), "MxbnVAM4w6sft9xjVpe/GCKueuk=");
    }

    #[test]
    fn percent_encoding_follows_aliyuns_rules() {
        assert_eq!(percent_encode("a b*c~d"), "a%20b%2Ac~d");
        assert_eq!(percent_encode("2016-02-23T12:46:24Z"), "2016-02-23T12%3A46%3A24Z");
        assert_eq!(percent_encode("+86/签"), "%2B86%2F%E7%AD%BE");
    }

    async fn provider(server: &MockServer) -> AliyunProvider {
        crate::install_crypto_provider();
        AliyunProvider::from_settings(&settings(&server.uri())).expect("provider")
    }

    fn form(body: &[u8]) -> BTreeMap<String, String> {
        let s = std::str::from_utf8(body).expect("utf8");
        s.split('&')
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let dec = |x: &str| {
                    let x = x.replace('+', " ");
                    let mut out = Vec::new();
                    let b = x.as_bytes();
                    let mut i = 0;
                    while i < b.len() {
                        if b[i] == b'%' {
                            out.push(u8::from_str_radix(&x[i + 1..i + 3], 16).expect("hex"));
                            i += 3;
                        } else {
                            out.push(b[i]);
                            i += 1;
                        }
                    }
                    String::from_utf8(out).expect("utf8")
                };
                (dec(k), dec(v))
            })
            .collect()
    }

    fn ok() -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "Code": "OK", "Message": "OK", "BizId": "900619746936498440^0", "RequestId": "F655A8D5-B967-440B-8683-DAD6FF8DE990"
        }))
    }

    #[tokio::test]
    async fn wire_format_is_a_signed_sendsms_post() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/"))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .respond_with(ok())
            .expect(2)
            .mount(&server)
            .await;
        let p = provider(&server).await;
        assert!(p.reports_delivery());
        let zh = sample(Channel::Sms, NUMBER, Locale::ZhCn);
        let accepted = p.send(&zh.outbound()).await.expect("accepted");
        assert_eq!(accepted, Accepted::with_id("900619746936498440^0"));
        let en = sample(Channel::Sms, NUMBER, Locale::En);
        p.send(&en.outbound()).await.expect("accepted");

        let requests = server.received_requests().await.expect("recorded");
        let f = form(&requests[0].body);
        let expect = [
            ("AccessKeyId", "testid"),
            ("Action", "SendSms"),
            ("Format", "JSON"),
            ("RegionId", "cn-hangzhou"),
            ("SignatureMethod", "HMAC-SHA1"),
            ("SignatureVersion", "1.0"),
            ("Version", "2017-05-25"),
            ("PhoneNumbers", "8613800138000"),
            ("SignName", "Tocsin"),
            ("TemplateCode", "SMS_100000001"),
        ];
        for (k, v) in expect {
            assert_eq!(f.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(f.get("OutId").map(String::as_str), Some(zh.delivery.id.as_str()));
        let tp: serde_json::Value = serde_json::from_str(&f["TemplateParam"]).expect("json");
        assert_eq!(tp, serde_json::json!({"reference": REFERENCE, "url": zh.notice.url}));
        let ts = &f["Timestamp"];
        assert!(
            chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%dT%H:%M:%SZ").is_ok(),
            "{ts}"
        );
        // The server side of the signature: recompute over what arrived.
        assert_eq!(f["Signature"], sign("POST", &f, "testsecret"));

        let f2 = form(&requests[1].body);
        assert_eq!(f2["TemplateCode"], "SMS_100000002", "English template");
        assert_ne!(f["SignatureNonce"], f2["SignatureNonce"], "a nonce per request");
    }

    #[tokio::test]
    async fn template_param_names_are_configurable() {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(ok()).mount(&server).await;
        crate::install_crypto_provider();
        let mut s = settings(&server.uri());
        s.template_param_reference = "code".into();
        s.template_param_url = "link".into();
        s.template_code_en = None;
        let p = AliyunProvider::from_settings(&s).expect("provider");
        let en = sample(Channel::Sms, NUMBER, Locale::En);
        p.send(&en.outbound()).await.expect("accepted");
        let f = form(&server.received_requests().await.expect("recorded")[0].body);
        let tp: serde_json::Value = serde_json::from_str(&f["TemplateParam"]).expect("json");
        assert_eq!(tp, serde_json::json!({"code": REFERENCE, "link": en.notice.url}));
        assert_eq!(f["TemplateCode"], "SMS_100000001", "zh-CN template when no English one");
    }

    #[test]
    fn settings_are_checked() {
        crate::install_crypto_provider();
        let mut s = settings("http://localhost");
        s.sign_name = " ".into();
        assert!(AliyunProvider::from_settings(&s).is_err());
        let parsed: AliyunSettings =
            toml::from_str("access_key_id = 'a'\naccess_key_secret = 'b'\nsign_name = 'c'\ntemplate_code = 'SMS_1'")
                .expect("parse");
        assert_eq!(parsed.base_url, "https://dysmsapi.aliyuncs.com");
        assert_eq!(parsed.region_id, "cn-hangzhou");
        assert_eq!(
            (
                parsed.template_param_reference.as_str(),
                parsed.template_param_url.as_str()
            ),
            ("reference", "url")
        );
        assert_eq!(parsed.timeout_seconds, 15);
        assert!(toml::from_str::<AliyunSettings>("access_key_id = 'a'\nother = 1").is_err());
    }

    async fn answer(template: ResponseTemplate) -> Result<Accepted, SendError> {
        let server = MockServer::start().await;
        Mock::given(method("POST")).respond_with(template).mount(&server).await;
        let p = provider(&server).await;
        let m: Sample = sample(Channel::Sms, NUMBER, Locale::ZhCn);
        p.send(&m.outbound()).await
    }

    fn aliyun_error(status: u16, code: &str) -> ResponseTemplate {
        ResponseTemplate::new(status).set_body_json(serde_json::json!({
            "Code": code,
            "Message": format!("mobile {NUMBER} is illegal"),
            "RequestId": "req-1",
        }))
    }

    #[tokio::test]
    async fn codes_decide_the_failure_kind() {
        let cases = [
            (200, "isv.MOBILE_NUMBER_ILLEGAL", FailureKind::Rejected),
            (200, "isv.BLACK_KEY_CONTROL_LIMIT", FailureKind::Rejected),
            (200, "isv.BUSINESS_LIMIT_CONTROL", FailureKind::Throttled),
            (400, "Throttling.User", FailureKind::Throttled),
            (200, "isv.SMS_SIGNATURE_ILLEGAL", FailureKind::Auth),
            (200, "isv.AMOUNT_NOT_ENOUGH", FailureKind::Auth),
            (404, "InvalidAccessKeyId.NotFound", FailureKind::Auth),
            (400, "SignatureDoesNotMatch", FailureKind::Auth),
            (200, "isp.SYSTEM_ERROR", FailureKind::ProviderError),
            (200, "isv.SOMETHING_NEW", FailureKind::Rejected),
            (200, "Brand.New", FailureKind::ProviderError),
            (503, "Unknown", FailureKind::ProviderError),
            (400, "Unknown", FailureKind::Rejected),
        ];
        for (status, code, kind) in cases {
            let e = answer(aliyun_error(status, code)).await.expect_err("failure");
            assert_eq!(e.kind, kind, "{status} {code}");
            assert!(e.message.contains(code), "{}", e.message);
            assert!(!e.message.contains("13800138000"), "no phone number: {}", e.message);
        }
    }

    #[tokio::test]
    async fn http_statuses_and_retry_after() {
        let e = answer(ResponseTemplate::new(429).insert_header("Retry-After", "12"))
            .await
            .expect_err("429");
        assert_eq!(
            (e.kind, e.retry_after),
            (FailureKind::Throttled, Some(Duration::from_secs(12)))
        );
        let e = answer(ResponseTemplate::new(500)).await.expect_err("500");
        assert_eq!(e.kind, FailureKind::ProviderError);
        let e = answer(ResponseTemplate::new(403)).await.expect_err("403");
        assert_eq!(e.kind, FailureKind::Auth);
        let e = answer(ResponseTemplate::new(200).set_body_string("not json"))
            .await
            .expect_err("garbage");
        assert_eq!(e.kind, FailureKind::ProviderError);
    }

    #[test]
    fn delivery_reports_become_receipts() {
        let body = serde_json::json!([
            {"phone_number": "13800138000", "send_time": "2026-11-30 12:00:00", "report_time": "2026-11-30 12:00:05",
             "success": true, "err_code": "DELIVERED", "err_msg": "用户接收成功", "sms_size": "1",
             "biz_id": "932702304080415357^0", "out_id": "dlv_0123456789abcdef0123456789abcdef"},
            {"phone_number": "13800138001", "send_time": "2026-11-30 12:00:00", "report_time": "2026-11-30 12:00:05",
             "success": false, "err_code": "MK:0001", "err_msg": "13800138001 停机", "sms_size": "1",
             "biz_id": "932702304080415358^0", "out_id": ""},
            {"phone_number": "13800138002", "success": false}
        ]);
        let receipts = receipts_from_report(body.to_string().as_bytes()).expect("parsed");
        assert_eq!(receipts.len(), 2, "the report without ids is skipped");
        assert_eq!(
            receipts[0].key,
            ReceiptKey::DeliveryId("dlv_0123456789abcdef0123456789abcdef".into())
        );
        assert_eq!(receipts[0].status, ReceiptStatus::Delivered);
        assert_eq!(
            receipts[1].key,
            ReceiptKey::ProviderMessageId("932702304080415358^0".into())
        );
        assert_eq!(receipts[1].status, ReceiptStatus::Failed(FailureKind::Undelivered));
        assert_eq!(receipts[1].detail, "aliyun undelivered, error MK:0001");
        for r in &receipts {
            assert!(!r.detail.contains("1380013800"), "{}", r.detail);
        }
        assert!(receipts_from_report(b"{\"not\": \"an array\"}").is_err());
        assert_eq!(receipts_from_report(b"[]").expect("empty"), vec![]);
    }
}
