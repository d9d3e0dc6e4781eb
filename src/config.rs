//! Settings: built-in defaults (`config/default.toml`, embedded), an optional file given with
//! `--config`, then environment variables `TOCSIN_SECTION__KEY` (double underscore between
//! levels). Unknown keys are rejected so a typo cannot silently fall back to a default.
//! Secrets live in [`Secret`], whose `Debug` and `Display` print nothing.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::{Channel, EmailAddress, OperatorClass};

/// The embedded defaults, so the binary runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

/// A secret value (password, signing key). Never printed, not even in debug output.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "Secret(empty)"
        } else {
            "Secret(***)"
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub operator: OperatorSettings,
    pub contact: ContactSettings,
    pub server: ServerSettings,
    pub delivery: DeliverySettings,
    pub email: EmailSettings,
    pub sms: WebhookChannelSettings,
    pub push: WebhookChannelSettings,
    pub bulletin: BulletinSettings,
    pub filing: FilingSettings,
    /// Security tools that post events with a signature instead of a token, by name.
    #[serde(default)]
    pub sources: std::collections::BTreeMap<String, SourceSettings>,
    pub watchdog: WatchdogSettings,
    #[serde(default)]
    pub paths: PathSettings,
    /// Named providers that channels list in `providers` (failover order).
    #[serde(default)]
    pub providers: std::collections::BTreeMap<String, ProviderSettings>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorSettings {
    /// The platform's operating company, as named in notices and filings.
    pub name: String,
    /// The affected platform or system as named in notices.
    pub platform: String,
    /// `ordinary` (CAC 4 hours) or `critical_infrastructure` (1 hour).
    pub class: String,
    /// Public base URL under which bulletins are reachable; notices link there.
    pub public_base_url: String,
    /// Incident reference prefix (`INC` gives `INC-2026-0001`).
    pub reference_prefix: String,
    /// The name as an SMS signature, per language (Chinese carriers require a registered one).
    pub short_name_en: String,
    pub short_name_zh: String,
    /// Where each merchant's own notice page is served: `<notice_base_url>/n/<token>`. Keep it
    /// short: an SMS links there within its segment limit.
    pub notice_base_url: String,
}

impl OperatorSettings {
    pub fn operator_class(&self) -> Result<OperatorClass, ConfigError> {
        self.class
            .parse()
            .map_err(|e: crate::domain::FieldError| invalid("operator.class", e.reason))
    }
}

/// The personal-information protection contact every notice names (GB/T 35273 10.2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContactSettings {
    pub officer_en: String,
    pub officer_zh: String,
    pub email: String,
    pub phone: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address `tocsin serve` listens on: loopback only (it speaks plain HTTP).
    pub listen: String,
    /// Largest request body accepted, in bytes.
    pub body_limit_bytes: usize,
    /// How far a signed event's timestamp may be from now (either way), in seconds: a captured
    /// request cannot be replayed later than this.
    pub replay_window_seconds: u64,
}

/// A security tool that posts events signed with a shared secret (`[sources.NAME]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// The HMAC-SHA256 key of its `X-Tocsin-Signature`.
    pub secret: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Attempts per delivery before a transient failure is treated as final.
    pub max_attempts: u32,
    /// First retry delay; doubles each attempt, capped by `backoff_max_ms`, with full jitter.
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// How long a claim holds before another worker may take the row (crash recovery).
    pub lease_seconds: u64,
    /// Sends one process keeps in flight.
    pub concurrency: u32,
    /// Deliveries claimed at once (one lease covers them; at least `concurrency`): large
    /// claims keep the store's work per notice small.
    #[serde(default = "claim_batch")]
    pub batch: u32,
    /// Channel order of a merchant's plan; channels the merchant has no address for are left out.
    /// A list in files; a comma-separated string in the environment.
    #[serde(deserialize_with = "list_or_csv")]
    pub channel_order: Vec<String>,
    /// How often `tocsin serve` sweeps the outbox (cron expression, seconds first).
    pub sweep_schedule: String,
}

/// Accepts `["email", "sms"]` or `"email,sms"`.
fn list_or_csv<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        List(Vec<String>),
        Csv(String),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(list) => list,
        Either::Csv(csv) => csv
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect(),
    })
}

impl DeliverySettings {
    pub fn channel_order(&self) -> Result<Vec<Channel>, ConfigError> {
        self.channel_order
            .iter()
            .map(|c| {
                c.parse()
                    .map_err(|e: crate::domain::FieldError| invalid("delivery.channel_order", e.reason))
            })
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSettings {
    /// `file` (writes .eml files under the data directory) or `smtp`.
    pub transport: String,
    pub from: String,
    pub reply_to: Option<String>,
    pub smtp: SmtpSettings,
    /// Named providers in failover order; empty: the one `transport` above.
    #[serde(default, deserialize_with = "list_or_csv")]
    pub providers: Vec<String>,
    /// How long an accepted message may wait for its receipt, for providers that send receipts.
    #[serde(default = "receipt_timeout")]
    pub receipt_timeout_seconds: u64,
    /// Bearer token the mail system presents when it posts a bounce (RFC 3464 delivery status
    /// notification) to `/hooks/email/dsn`; empty disables the endpoint.
    #[serde(default)]
    pub dsn_token: Secret,
    /// DKIM: the selector (`<selector>._domainkey.<domain>` holds the public key). Signing
    /// is on when selector, domain and key file are all set.
    #[serde(default)]
    pub dkim_selector: Option<String>,
    /// DKIM: the signing domain (`d=`), usually the domain of `from`.
    #[serde(default)]
    pub dkim_domain: Option<String>,
    /// DKIM: the private key, RSA (PKCS#1 or PKCS#8 PEM) or Ed25519 (PKCS#8 PEM).
    #[serde(default)]
    pub dkim_private_key_file: Option<PathBuf>,
}

impl EmailSettings {
    pub fn from_address(&self) -> Result<EmailAddress, ConfigError> {
        let addr = self
            .from
            .rsplit_once('<')
            .map(|(_, a)| a.trim_end_matches('>'))
            .unwrap_or(&self.from);
        addr.parse()
            .map_err(|e: crate::domain::FieldError| invalid("email.from", e.reason))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    /// `none` (plain, for a local relay), `starttls` or `tls` (implicit TLS).
    pub tls: String,
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: Secret,
    pub pool_size: u32,
    pub timeout_seconds: u64,
    /// Pooled connections idle for longer than this are closed rather than reused.
    #[serde(default = "default_idle_timeout_seconds")]
    pub idle_timeout_seconds: u64,
    /// An extra root certificate (PEM) trusted for the server's certificate, besides the
    /// public roots: a private or staging CA.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// The name sent with EHLO; the machine's host name when unset.
    #[serde(default)]
    pub hello_name: Option<String>,
}

fn default_idle_timeout_seconds() -> u64 {
    60
}

/// SMS and push: a file transport (embedded default) or a generic HMAC-signed JSON webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookChannelSettings {
    /// `file` or `webhook`.
    pub transport: String,
    #[serde(default)]
    pub url: String,
    /// Key for the `X-Tocsin-Signature` HMAC-SHA256 header.
    #[serde(default)]
    pub signing_secret: Secret,
    pub timeout_seconds: u64,
    /// SMS only: the most segments one notice may take (1 = 70 UCS-2 or 160 GSM-7 characters).
    #[serde(default = "one")]
    pub max_segments: u32,
    /// Push only: what lock screens show without truncating.
    #[serde(default = "push_title_max")]
    pub title_max_chars: usize,
    #[serde(default = "push_body_max")]
    pub body_max_chars: usize,
    /// Named providers in failover order; empty: the one `transport` above.
    #[serde(default, deserialize_with = "list_or_csv")]
    pub providers: Vec<String>,
    /// How long an accepted message may wait for its receipt, for providers that send receipts.
    #[serde(default = "receipt_timeout")]
    pub receipt_timeout_seconds: u64,
}

fn receipt_timeout() -> u64 {
    3600
}

/// One provider of a channel: `kind` names it and the table of the same name holds its
/// settings (`[providers.NAME.smtp]`, `[providers.NAME.twilio]`, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// file | smtp | webhook | twilio | aliyun_sms | fcm | apns
    pub kind: String,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub breaker: BreakerSettings,
    pub smtp: Option<SmtpSettings>,
    pub webhook: Option<WebhookSettings>,
    pub twilio: Option<crate::channels::twilio::TwilioSettings>,
    pub aliyun_sms: Option<crate::channels::aliyun::AliyunSettings>,
    pub fcm: Option<crate::channels::fcm::FcmSettings>,
    pub apns: Option<crate::channels::apns::ApnsSettings>,
}

/// A provider's limits, kept in the store so every instance sharing it respects them together.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Sends per second on average (token bucket refill); 0 = no rate limit.
    #[serde(default)]
    pub rate_per_second: f64,
    /// The most sends in a burst (bucket size); 0 = one second's worth.
    #[serde(default)]
    pub burst: u32,
    /// The most sends in flight at once across all instances; 0 = no limit.
    #[serde(default)]
    pub max_in_flight: u32,
    /// A cap per sliding window, e.g. 10000 per 3600 seconds; 0 = none.
    #[serde(default)]
    pub window_seconds: u64,
    #[serde(default)]
    pub window_max: u64,
}

/// When a failing provider is skipped (circuit breaker).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive provider failures (network, timeouts, 5xx, throttling, auth) that open it.
    #[serde(default = "breaker_threshold")]
    pub failure_threshold: u32,
    /// How long it stays open before one trial send is let through.
    #[serde(default = "breaker_cooldown")]
    pub cooldown_seconds: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: breaker_threshold(),
            cooldown_seconds: breaker_cooldown(),
        }
    }
}

fn breaker_threshold() -> u32 {
    5
}

fn breaker_cooldown() -> u64 {
    60
}

/// The generic JSON webhook provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    /// Key for the `X-Tocsin-Signature` HMAC-SHA256 header.
    #[serde(default)]
    pub signing_secret: Secret,
    #[serde(default = "webhook_timeout")]
    pub timeout_seconds: u64,
}

fn webhook_timeout() -> u64 {
    15
}

fn claim_batch() -> u32 {
    512
}

fn one() -> u32 {
    1
}

fn push_title_max() -> usize {
    50
}

fn push_body_max() -> usize {
    110
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulletinSettings {
    /// Publish a bulletin when at least this many affected merchants are unreachable.
    pub unreachable_threshold: u64,
    /// Publish (covering every affected merchant) when the cohort is this large (0: off).
    pub cohort_merchants: u64,
    /// ... or when notifying everyone would cost at least `cost_limit` at `cost_per_notice`
    /// each (0: off).
    pub cost_per_notice: f64,
    pub cost_limit: f64,
    /// ... or when at least this share (0 to 1) of them has no contact data (0: off).
    pub no_contact_share: f64,
    /// "Am I affected?" lookups allowed per client per hour.
    pub lookups_per_hour: u32,
    /// An external status page that takes each bulletin version as a signed JSON POST (empty:
    /// none), and the secret of its `X-Tocsin-Signature`.
    pub status_page_url: String,
    pub status_page_secret: Secret,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogSettings {
    /// When `tocsin serve` checks the clocks (cron, seconds first).
    pub schedule: String,
    /// Reminder points before each deadline: `2h,30m`.
    pub remind_before: String,
    /// Email addresses and E.164 phone numbers, comma-separated.
    pub responders: String,
    pub escalation: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilingSettings {
    /// Where each regulator's reports go, by profile id (`[filing.regulators.cn-cac]`); a
    /// setting given here overrides the profile's `[submission]`.
    #[serde(default)]
    pub regulators: std::collections::BTreeMap<String, FilingEndpoint>,
}

/// How one regulator's reports are submitted in this deployment.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilingEndpoint {
    /// `email`, `https` or `portal`; empty: the profile's method.
    #[serde(default)]
    pub method: String,
    /// The regulator's address (email).
    #[serde(default)]
    pub address: String,
    /// The endpoint reports are POSTed to (https).
    #[serde(default)]
    pub url: String,
    /// Sent as `Authorization: Bearer` (https).
    #[serde(default)]
    pub token: Secret,
    /// Where in the endpoint's JSON reply its reference number is (a JSON pointer).
    #[serde(default)]
    pub reference_pointer: String,
    /// The portal a person files the document on.
    #[serde(default)]
    pub portal: String,
}

impl FilingSettings {
    /// The settings for profile `id` (`cn-cac` may be written `cn_cac`, as environment
    /// variables cannot hold a hyphen).
    pub fn endpoint(&self, id: &str) -> Option<(&str, &FilingEndpoint)> {
        self.regulators
            .iter()
            .find(|(k, _)| k.as_str() == id || k.replace('_', "-") == id)
            .map(|(k, v)| (k.as_str(), v))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathSettings {
    /// Templates directory overriding the embedded templates (for operators who edit wording).
    pub templates: Option<PathBuf>,
    /// A directory laid out like `config/` whose rule files replace the built-in ones:
    /// `categories.toml`, `classification.toml`, `notice_profiles.toml`,
    /// `regulators/cn-cac.toml` (each optional), so an operator corrects a rule without a rebuild.
    #[serde(default)]
    pub rules: Option<PathBuf>,
}

impl Settings {
    /// Defaults, then `file`, then `TOCSIN_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let vars: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOCSIN_") && k.contains("__"))
            .collect();
        // No `try_parsing`: it would turn a password like "0123" into the number 123. Values
        // stay strings and are converted to the field's type when deserialised.
        builder = builder.add_source(
            config::Environment::with_prefix("TOCSIN")
                .separator("__")
                .prefix_separator("_")
                .source(Some(vars)),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.check()?;
        Ok(settings)
    }

    /// Settings from the embedded defaults only (tests and embedding hosts start here).
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::load(None, std::iter::empty())
    }

    fn check(&self) -> Result<(), ConfigError> {
        self.operator.operator_class()?;
        for (name, source) in &self.sources {
            if source.secret.expose().len() < 16 {
                return Err(invalid(
                    &format!("sources.{name}.secret"),
                    "must be at least 16 characters (a shared HMAC key)",
                ));
            }
        }
        if !(1..=3600).contains(&self.server.replay_window_seconds) {
            return Err(invalid("server.replay_window_seconds", "must be between 1 and 3600"));
        }
        self.delivery.channel_order()?;
        self.email.from_address()?;
        if !matches!(self.email.transport.as_str(), "file" | "smtp") {
            return Err(invalid("email.transport", "must be 'file' or 'smtp'"));
        }
        if !matches!(self.email.smtp.tls.as_str(), "none" | "starttls" | "tls") {
            return Err(invalid("email.smtp.tls", "must be 'none', 'starttls' or 'tls'"));
        }
        for (name, ch) in [("sms", &self.sms), ("push", &self.push)] {
            match ch.transport.as_str() {
                "file" => {}
                "webhook" if ch.url.starts_with("http://") || ch.url.starts_with("https://") => {}
                "webhook" => {
                    return Err(invalid(
                        &format!("{name}.url"),
                        "must be an http(s) URL for the webhook transport",
                    ));
                }
                _ => {
                    return Err(invalid(&format!("{name}.transport"), "must be 'file' or 'webhook'"));
                }
            }
        }
        for (id, e) in &self.filing.regulators {
            let key = |k: &str| format!("filing.regulators.{id}.{k}");
            if !matches!(e.method.as_str(), "" | "email" | "https" | "portal") {
                return Err(invalid(&key("method"), "must be 'email', 'https' or 'portal'"));
            }
            if !e.address.is_empty() {
                e.address
                    .parse::<EmailAddress>()
                    .map_err(|err| invalid(&key("address"), err.reason))?;
            }
            if !(e.url.is_empty() || e.url.starts_with("https://") || e.url.starts_with("http://")) {
                return Err(invalid(&key("url"), "must be an http(s) URL"));
            }
            if !e.reference_pointer.is_empty() && !e.reference_pointer.starts_with('/') {
                return Err(invalid(
                    &key("reference_pointer"),
                    "must be a JSON pointer such as /reference",
                ));
            }
        }
        let d = &self.delivery;
        if d.max_attempts == 0 || d.concurrency == 0 {
            return Err(invalid("delivery", "max_attempts and concurrency must be at least 1"));
        }
        if !(1..=86_400).contains(&d.lease_seconds) {
            return Err(invalid("delivery.lease_seconds", "must be between 1 and 86400"));
        }
        if d.backoff_base_ms == 0 || d.backoff_max_ms < d.backoff_base_ms || d.backoff_max_ms > 86_400_000 {
            return Err(invalid(
                "delivery.backoff_max_ms",
                "backoff must satisfy 1 <= base <= max <= 86400000 ms",
            ));
        }
        for (name, ch) in [("sms", &self.sms), ("push", &self.push)] {
            if ch.transport == "webhook" && ch.signing_secret.is_empty() {
                return Err(invalid(
                    &format!("{name}.signing_secret"),
                    "is required for the webhook transport",
                ));
            }
        }
        let smtp = &self.email.smtp;
        let loopback = matches!(smtp.host.as_str(), "127.0.0.1" | "::1" | "localhost");
        if self.email.transport == "smtp" && !smtp.username.is_empty() && smtp.tls == "none" && !loopback {
            return Err(invalid(
                "email.smtp.tls",
                "credentials would cross the network in clear; use starttls or tls",
            ));
        }
        crate::scheduler::Schedule::parse(&self.delivery.sweep_schedule)
            .map_err(|e| invalid("delivery.sweep_schedule", e.to_string()))?;
        let b = &self.bulletin;
        if !b.status_page_url.is_empty() {
            if reqwest::Url::parse(&b.status_page_url).is_err() {
                return Err(invalid("bulletin.status_page_url", "is not a URL"));
            }
            if b.status_page_secret.is_empty() {
                return Err(invalid("bulletin.status_page_secret", "is required with a status page"));
            }
        }
        if !(0.0..=1.0).contains(&b.no_contact_share) {
            return Err(invalid("bulletin.no_contact_share", "must be a share between 0 and 1"));
        }
        if b.cost_per_notice < 0.0 || b.cost_limit < 0.0 {
            return Err(invalid("bulletin.cost_limit", "costs cannot be negative"));
        }
        crate::scheduler::Schedule::parse(&self.watchdog.schedule)
            .map_err(|e| invalid("watchdog.schedule", e.to_string()))?;
        crate::watchdog::Plan::from_settings(&self.watchdog).map_err(|e| invalid(e.field, e.reason))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load_and_use_embedded_transports() {
        let s = Settings::defaults().expect("defaults load");
        assert_eq!(s.email.transport, "file");
        assert_eq!(s.sms.transport, "file");
        assert!(s.server.listen.starts_with("127.0.0.1"));
    }

    #[test]
    fn environment_overrides_nested_keys() {
        let s = Settings::load(
            None,
            env(&[
                ("TOCSIN_EMAIL__TRANSPORT", "smtp"),
                ("TOCSIN_EMAIL__SMTP__PORT", "2525"),
                ("TOCSIN_EMAIL__SMTP__PASSWORD", "hunter2"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.email.transport, "smtp");
        assert_eq!(s.email.smtp.port, 2525);
        assert_eq!(s.email.smtp.password.expose(), "hunter2");
        assert!(!format!("{s:?}").contains("hunter2"), "secret leaked into Debug");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = Settings::load(None, env(&[("TOCSIN_SMS__TRANSPORT", "pigeon")])).expect_err("rejects");
        assert!(err.to_string().contains("sms.transport"), "{err}");
        let err = Settings::load(None, env(&[("TOCSIN_SMS__TRANSPORT", "webhook")])).expect_err("no url");
        assert!(err.to_string().contains("sms.url"), "{err}");
    }

    #[test]
    fn a_config_file_overrides_defaults_and_the_environment_overrides_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("tocsin.toml");
        std::fs::write(
            &file,
            "[email]\ntransport = \"smtp\"\n[email.smtp]\nport = 587\nhost = \"mail.example.com\"\n",
        )
        .expect("write");
        let s = Settings::load(Some(&file), env(&[("TOCSIN_EMAIL__SMTP__PORT", "2525")])).expect("loads");
        assert_eq!(
            (s.email.transport.as_str(), s.email.smtp.host.as_str()),
            ("smtp", "mail.example.com")
        );
        assert_eq!(s.email.smtp.port, 2525, "the environment wins over the file");
        assert_eq!(s.email.smtp.tls, "starttls", "unset keys keep their defaults");
        assert!(Settings::load(Some(&dir.path().join("missing.toml")), env(&[])).is_err());
    }

    #[test]
    fn environment_values_stay_strings_until_their_field_says_otherwise() {
        let s = Settings::load(
            None,
            env(&[
                ("TOCSIN_EMAIL__SMTP__PASSWORD", "0123456"),
                ("TOCSIN_CONTACT__PHONE", "+864000000000"),
                ("TOCSIN_DELIVERY__CHANNEL_ORDER", "sms, email"),
                ("TOCSIN_DELIVERY__MAX_ATTEMPTS", "7"),
            ]),
        )
        .expect("loads");
        assert_eq!(s.email.smtp.password.expose(), "0123456");
        assert_eq!(s.contact.phone, "+864000000000");
        assert_eq!(s.delivery.channel_order, ["sms", "email"]);
        assert_eq!(s.delivery.max_attempts, 7);
    }

    #[test]
    fn unsafe_transport_settings_are_refused() {
        let e = Settings::load(
            None,
            env(&[
                ("TOCSIN_SMS__TRANSPORT", "webhook"),
                ("TOCSIN_SMS__URL", "http://x.example/"),
            ]),
        );
        assert!(e.expect_err("no secret").to_string().contains("sms.signing_secret"));
        let e = Settings::load(
            None,
            env(&[
                ("TOCSIN_EMAIL__TRANSPORT", "smtp"),
                ("TOCSIN_EMAIL__SMTP__HOST", "mail.example.com"),
                ("TOCSIN_EMAIL__SMTP__TLS", "none"),
                ("TOCSIN_EMAIL__SMTP__USERNAME", "u"),
            ]),
        );
        assert!(e.expect_err("clear text").to_string().contains("email.smtp.tls"));
        let e = Settings::load(None, env(&[("TOCSIN_DELIVERY__LEASE_SECONDS", "99999999999")]));
        assert!(e.is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Settings::load(None, env(&[("TOCSIN_EMAIL__SMPT__HOST", "x")])).expect_err("typo");
        assert!(err.to_string().contains("smpt"), "{err}");
    }
}
