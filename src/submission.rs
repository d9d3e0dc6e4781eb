//! How an approved regulator filing reaches its regulator: by email (the report as JSON and as
//! a readable document, attached), by an HTTPS POST of the JSON to the regulator's endpoint, or
//! as a document a person files on the regulator's portal (the reference number is recorded
//! afterwards). Where each regulator's reports go is the profile's `[submission]`, overridden
//! per deployment by `[filing.regulators.<id>]`.

use serde_json::Value;

use crate::channels::{EmailTransport, Mail, MailAttachment};
use crate::config::{FilingSettings, Secret};
use crate::domain::{EmailAddress, FieldError};
use crate::filing::RegulatorProfile;
use crate::model::Filing;

#[derive(Debug, thiserror::Error)]
pub enum SubmissionError {
    #[error(transparent)]
    Setting(#[from] FieldError),
    /// The regulator's side failed in a way that may pass (network, 5xx, 429): try again.
    #[error("{0} (the submission can be retried)")]
    Transient(String),
    /// The regulator refused the report (4xx) or the mail can never go: retrying will not help.
    #[error("{0}")]
    Refused(String),
}

/// How and where one regulator's reports go in this deployment.
#[derive(Debug, Clone)]
pub enum Route {
    Email {
        address: EmailAddress,
    },
    Https {
        url: reqwest::Url,
        token: Secret,
        reference_pointer: String,
    },
    Portal {
        portal: Option<String>,
    },
}

impl Route {
    /// The profile's `[submission]` with this deployment's settings over it; a method that
    /// lacks its address or endpoint is an error naming the setting to give.
    pub fn of(profile: &RegulatorProfile, settings: &FilingSettings) -> Result<Self, FieldError> {
        let (key, endpoint) = match settings.endpoint(&profile.id) {
            Some((k, e)) => (k.to_owned(), Some(e)),
            None => (profile.id.clone(), None),
        };
        let setting = |name: &str| format!("filing.regulators.{key}.{name}");
        let pick = |ours: Option<&String>, profile: &Option<String>| -> String {
            ours.filter(|s| !s.is_empty())
                .cloned()
                .or_else(|| profile.clone())
                .unwrap_or_default()
        };
        let method = pick(endpoint.map(|e| &e.method), &Some(profile.submission.method.clone()));
        match method.as_str() {
            "email" => {
                let address = pick(endpoint.map(|e| &e.address), &profile.submission.address);
                if address.is_empty() {
                    return Err(FieldError::new(
                        setting("address"),
                        format!("the {} reports go by email: give the regulator's address", profile.id),
                    ));
                }
                let address = address
                    .parse()
                    .map_err(|e: FieldError| FieldError::new(setting("address"), e.reason))?;
                Ok(Route::Email { address })
            }
            "https" => {
                let url = pick(endpoint.map(|e| &e.url), &profile.submission.url);
                if url.is_empty() {
                    return Err(FieldError::new(
                        setting("url"),
                        format!("the {} reports go by HTTPS: give the endpoint's URL", profile.id),
                    ));
                }
                let url = reqwest::Url::parse(&url).map_err(|e| FieldError::new(setting("url"), e.to_string()))?;
                let pointer = endpoint
                    .map(|e| e.reference_pointer.clone())
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| "/reference".to_owned());
                Ok(Route::Https {
                    url,
                    token: endpoint.map(|e| e.token.clone()).unwrap_or_default(),
                    reference_pointer: pointer,
                })
            }
            "portal" => Ok(Route::Portal {
                portal: Some(pick(endpoint.map(|e| &e.portal), &profile.submission.portal)).filter(|p| !p.is_empty()),
            }),
            other => Err(FieldError::new(
                setting("method"),
                format!("'{other}' is not email, https or portal"),
            )),
        }
    }

    pub fn method(&self) -> &'static str {
        match self {
            Route::Email { .. } => "email",
            Route::Https { .. } => "https",
            Route::Portal { .. } => "portal",
        }
    }

    /// Where the report goes, as the submission record names it (no secret in it).
    pub fn target(&self) -> String {
        match self {
            Route::Email { address } => address.to_string(),
            Route::Https { url, .. } => url.to_string(),
            Route::Portal { portal } => portal.clone().unwrap_or_default(),
        }
    }
}

/// A report ready to go: its JSON and its readable HTML document.
pub struct Report<'a> {
    pub filing: &'a Filing,
    pub profile: &'a RegulatorProfile,
    pub json: &'a Value,
    pub html: &'a str,
    /// `<regulator>-<stage>`: the attachments' file names.
    pub stem: String,
    pub subject: String,
}

impl Report<'_> {
    /// What the regulator's system may use to recognise a second copy of the same report.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.filing.id, self.filing.content_hash)
    }
}

/// Emails the report: a short cover text and the document as the body, the JSON and the
/// document attached. The `Message-ID` comes from the filing and its content, so a resent
/// copy (after a crash) is recognisably the same message. Returns the `Message-ID`.
pub async fn by_email(
    mailer: &EmailTransport,
    to: &EmailAddress,
    report: &Report<'_>,
) -> Result<String, SubmissionError> {
    let json = serde_json::to_vec_pretty(report.json).unwrap_or_default();
    let zh = report.profile.locale == crate::domain::Locale::ZhCn;
    let cover = if zh {
        format!(
            "{}\n\n报告全文见附件：{}.html（可读文档）与 {}.json（结构化数据）。内容摘要（SHA-256）：{}",
            report.subject, report.stem, report.stem, report.filing.content_hash
        )
    } else {
        format!(
            "{}\n\nThe full report is attached: {}.html (readable document) and {}.json (structured data). Content hash (SHA-256): {}",
            report.subject, report.stem, report.stem, report.filing.content_hash
        )
    };
    let key = report.idempotency_key();
    let mail = Mail {
        to: to.as_str(),
        subject: &report.subject,
        text: &cover,
        html: report.html,
        language: report.profile.locale.as_str(),
        key: &key,
        delivery: None,
    };
    let json_name = format!("{}.json", report.stem);
    let html_name = format!("{}.html", report.stem);
    let attachments = [
        MailAttachment {
            filename: &json_name,
            content_type: "application/json",
            body: &json,
        },
        MailAttachment {
            filename: &html_name,
            content_type: "text/html; charset=utf-8",
            body: report.html.as_bytes(),
        },
    ];
    mailer.send_with_attachments(&mail, &attachments).await.map_err(|e| {
        match e.kind.class() == crate::model::ErrorClass::Transient {
            true => SubmissionError::Transient(format!("the mail was not accepted: {}", e.message)),
            false => SubmissionError::Refused(format!("the mail was refused: {}", e.message)),
        }
    })
}

/// What the regulator's endpoint answered to an accepted report.
#[derive(Debug, Clone)]
pub struct HttpsReceipt {
    pub status: u16,
    /// The reference number the reply carries, at the configured JSON pointer.
    pub reference: Option<String>,
    /// The reply's body (its first 2,000 characters), kept as the acknowledgement.
    pub body: String,
}

/// POSTs the report's JSON to the endpoint with an `Idempotency-Key` (a retry after a lost
/// answer is the same report) and the bearer token if one is set. 2xx: accepted, with the
/// reference the reply holds; 408, 429 and 5xx or no answer: transient; other 4xx: refused.
pub async fn by_https(
    client: &reqwest::Client,
    url: &reqwest::Url,
    token: &Secret,
    reference_pointer: &str,
    report: &Report<'_>,
) -> Result<HttpsReceipt, SubmissionError> {
    let mut request = client
        .post(url.clone())
        .header("Idempotency-Key", report.idempotency_key())
        .header(reqwest::header::ACCEPT, "application/json")
        .json(report.json);
    if !token.is_empty() {
        request = request.bearer_auth(token.expose());
    }
    let response = request.send().await.map_err(|e| {
        SubmissionError::Transient(format!(
            "the endpoint did not answer: {}",
            crate::channels::without_url(&e)
        ))
    })?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let body: String = text.chars().take(2000).collect();
    if status.is_success() {
        let reference = serde_json::from_str::<Value>(&text).ok().and_then(|v| {
            v.pointer(reference_pointer).and_then(|r| match r {
                Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
        });
        return Ok(HttpsReceipt {
            status: status.as_u16(),
            reference,
            body,
        });
    }
    let said = format!("the endpoint answered {status}: {body}");
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Err(SubmissionError::Transient(said))
    } else {
        Err(SubmissionError::Refused(said))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FilingEndpoint;

    fn settings(id: &str, e: FilingEndpoint) -> FilingSettings {
        FilingSettings {
            regulators: [(id.to_owned(), e)].into_iter().collect(),
        }
    }

    #[test]
    fn a_route_is_the_profile_with_the_deployment_over_it_and_names_what_is_missing() {
        let cac = RegulatorProfile::cac().expect("profile");
        assert!(matches!(
            Route::of(&cac, &FilingSettings::default()),
            Ok(Route::Portal { portal: None })
        ));
        let email = |address: &str| FilingEndpoint {
            method: "email".into(),
            address: address.into(),
            ..Default::default()
        };
        let e = Route::of(&cac, &settings("cn-cac", email(""))).expect_err("no address");
        assert_eq!(e.field, "filing.regulators.cn-cac.address");
        // Environment variables cannot hold a hyphen: cn_cac names cn-cac.
        let route = Route::of(&cac, &settings("cn_cac", email("reports@cac.example.cn"))).expect("route");
        assert_eq!(route.target(), "reports@cac.example.cn");
        let https = FilingEndpoint {
            method: "https".into(),
            url: "https://regulator.example/api/reports".into(),
            token: Secret::new("t0ken"),
            ..Default::default()
        };
        let route = Route::of(&cac, &settings("cn-cac", https)).expect("route");
        assert_eq!(route.method(), "https");
        assert!(!route.target().contains("t0ken"), "the token is no part of the target");
        let Route::Https { reference_pointer, .. } = route else {
            panic!("https")
        };
        assert_eq!(reference_pointer, "/reference");
        let e = Route::of(
            &cac,
            &settings(
                "cn-cac",
                FilingEndpoint {
                    method: "https".into(),
                    ..Default::default()
                },
            ),
        )
        .expect_err("no url");
        assert_eq!(e.field, "filing.regulators.cn-cac.url");
    }
}
