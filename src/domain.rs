//! Domain types shared by every stage: identifiers, contacts, categories, grades, states.
//!
//! Untrusted input is parsed once, at the edge, into these types; past that point a value
//! of one of them is known to be well formed. Nothing here touches I/O.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Why a value could not be parsed: which field, and the reason in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error, reported under an enclosing field name (`merchants[3].email`).
    pub fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            reason: self.reason,
        }
    }
}

/// Serde glue for newtypes: (de)serialise through the string form, parsing on the way in.
macro_rules! string_newtype {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                raw.parse()
                    .map_err(|e: FieldError| serde::de::Error::custom(e.reason))
            }
        }
    };
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// A merchant's id in the platform's directory: 1-64 of `[A-Za-z0-9._-]`, starting alphanumeric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MerchantId(String);

impl MerchantId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for MerchantId {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.chars().all(is_id_char);
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(FieldError::new(
                "id",
                "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            ))
        }
    }
}
string_newtype!(MerchantId);

/// Generates an opaque, time-ordered id type with a fixed prefix (`inc_...`).
macro_rules! prefixed_id {
    ($name:ident, $prefix:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub const PREFIX: &'static str = $prefix;
            /// A new id; UUID v7 keeps ids roughly ordered by creation, which keeps indexes compact.
            pub fn generate() -> Self {
                Self(format!("{}_{}", $prefix, uuid::Uuid::now_v7().simple()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = FieldError;
            fn from_str(s: &str) -> Result<Self, FieldError> {
                let rest = s
                    .strip_prefix(concat!($prefix, "_"))
                    .ok_or_else(|| FieldError::new("id", concat!("must start with '", $prefix, "_'")))?;
                if rest.len() == 32 && rest.chars().all(|c| c.is_ascii_hexdigit()) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(FieldError::new("id", "is not a well-formed id"))
                }
            }
        }
        string_newtype!($name);
    };
}

prefixed_id!(EventId, "evt");
prefixed_id!(IncidentId, "inc");
prefixed_id!(DraftId, "drf");
prefixed_id!(NoticeId, "ntc");
prefixed_id!(DeliveryId, "dlv");
prefixed_id!(BulletinId, "blt");
prefixed_id!(FilingId, "fil");
prefixed_id!(TokenId, "tok");

/// A person acting on an incident (responder, approver). Free-form but bounded and printable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Actor(String);

impl Actor {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The identity Tocsin itself uses for automatic transitions.
    pub fn system() -> Self {
        Self("tocsin".to_owned())
    }
}

impl FromStr for Actor {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let s = s.trim();
        if s.is_empty() || s.chars().count() > 100 || s.chars().any(char::is_control) {
            return Err(FieldError::new("actor", "must be 1-100 printable characters"));
        }
        Ok(Self(s.to_owned()))
    }
}
string_newtype!(Actor);

/// An email address: one `@`, a non-empty local part, a dotted domain, no spaces.
/// Deliverability is the mail system's business; this rejects what can never be an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
    }
}

impl FromStr for EmailAddress {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let bad = |why: &str| Err(FieldError::new("email", why));
        let s = s.trim();
        if s.len() > 254 {
            return bad("is longer than 254 characters");
        }
        let Some((local, domain)) = s.rsplit_once('@') else {
            return bad("must contain '@'");
        };
        if local.is_empty() || local.len() > 64 || local.contains('@') {
            return bad("has an empty, too long or malformed local part");
        }
        let labels_ok = domain.split('.').count() >= 2
            && domain.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.chars().all(|c| c.is_alphanumeric() || c == '-')
            });
        if !labels_ok {
            return bad("has a malformed domain");
        }
        if s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '<' | '>' | ',' | ';' | '"'))
        {
            return bad("contains spaces or characters not allowed in an address");
        }
        Ok(Self(s.to_owned()))
    }
}
string_newtype!(EmailAddress);

/// A phone number in E.164 form: `+`, country code, up to 15 digits in all.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PhoneNumber(String);

impl PhoneNumber {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The last four digits, the second factor the public lookup can ask for.
    pub fn last_four(&self) -> &str {
        &self.0[self.0.len().saturating_sub(4)..]
    }
}

impl FromStr for PhoneNumber {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let digits = s.strip_prefix('+').unwrap_or("");
        let ok =
            (7..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit()) && !digits.starts_with('0');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(FieldError::new(
                "phone",
                "must be in E.164 form: '+' then 7 to 15 digits, not starting with 0",
            ))
        }
    }
}
string_newtype!(PhoneNumber);

/// A device token for push notices (opaque to Tocsin, bounded in size).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PushToken(String);

impl PushToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for PushToken {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        if (8..=4096).contains(&s.len()) && s.chars().all(|c| c.is_ascii_graphic()) {
            Ok(Self(s.to_owned()))
        } else {
            Err(FieldError::new(
                "push_token",
                "must be 8-4096 printable ASCII characters without spaces",
            ))
        }
    }
}
string_newtype!(PushToken);

/// A data category id from the taxonomy in `config/categories.toml` (`account_credentials`).
/// The shape is checked here; membership in the taxonomy is checked by [`crate::taxonomy`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CategoryId(String);

impl CategoryId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CategoryId {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(FieldError::new(
                "category",
                "must be a lower-case category id such as 'account_credentials'",
            ))
        }
    }
}
string_newtype!(CategoryId);

/// Declares a closed set of snake_case names with parsing, display and serde.
macro_rules! name_enum {
    ($(#[$meta:meta])* $name:ident, $field:literal { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(&self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl FromStr for $name {
            type Err = FieldError;
            fn from_str(s: &str) -> Result<Self, FieldError> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(FieldError::new(
                        $field,
                        format!("must be one of: {}", [$($text),+].join(", ")),
                    )),
                }
            }
        }
        string_newtype!($name);
    };
}

name_enum!(
    /// Who the merchant is in law: PIPL protects natural persons.
    MerchantKind, "kind" {
        NaturalPerson => "natural_person",
        IndividualBusiness => "individual_business",
        Enterprise => "enterprise",
    }
);

name_enum!(
    /// The languages notices are written in.
    Locale, "locale" {
        ZhCn => "zh-CN",
        En => "en",
    }
);

name_enum!(
    /// The kind of security incident.
    IncidentKind, "kind" {
        Leak => "leak",
        Tampering => "tampering",
        Loss => "loss",
        UnauthorizedAccess => "unauthorized_access",
        Ransomware => "ransomware",
        Malware => "malware",
        DenialOfService => "denial_of_service",
        Other => "other",
    }
);

name_enum!(
    /// Severity as reported by the tool that raised an event.
    Severity, "severity" {
        Info => "info",
        Low => "low",
        Medium => "medium",
        High => "high",
        Critical => "critical",
    }
);

name_enum!(
    /// CAC incident grade (特别重大 critical, 重大 major, 较大 significant, 一般 general).
    Grade, "grade" {
        General => "general",
        Significant => "significant",
        Major => "major",
        Critical => "critical",
    }
);

name_enum!(
    /// A merchant's risk from the incident.
    RiskLevel, "risk" {
        Low => "low",
        Medium => "medium",
        High => "high",
    }
);

name_enum!(
    /// A way to reach a merchant.
    Channel, "channel" {
        Email => "email",
        Sms => "sms",
        Push => "push",
    }
);

name_enum!(
    /// The incident state machine; see [`crate::incident`] for the allowed transitions.
    IncidentState, "state" {
        Triage => "triage",
        Confirmed => "confirmed",
        Scoped => "scoped",
        Drafted => "drafted",
        Approved => "approved",
        Notifying => "notifying",
        Monitoring => "monitoring",
        Closed => "closed",
        Dismissed => "dismissed",
    }
);

name_enum!(
    /// Where one outbox row stands.
    DeliveryStatus, "status" {
        Held => "held",
        Pending => "pending",
        Sending => "sending",
        Accepted => "accepted",
        Delivered => "delivered",
        Failed => "failed",
        Dead => "dead",
        Superseded => "superseded",
    }
);

name_enum!(
    /// Whether a merchant has been reached yet.
    Reachability, "reachability" {
        Pending => "pending",
        NotRequired => "not_required",
        Reached => "reached",
        Unreachable => "unreachable",
    }
);

name_enum!(
    /// Kind of operator for the CAC clocks (critical information infrastructure has 1 hour).
    OperatorClass, "operator_class" {
        Ordinary => "ordinary",
        CriticalInfrastructure => "critical_infrastructure",
    }
);

impl Grade {
    /// Grades the CAC measures require reporting (significant or above).
    pub fn is_cac_reportable(self) -> bool {
        self >= Grade::Significant
    }
}

/// A text written in each notice language. Responder-provided facts carry one of these per field.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalizedText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub en: Option<String>,
    #[serde(default, rename = "zh-CN", skip_serializing_if = "Option::is_none")]
    pub zh_cn: Option<String>,
}

impl LocalizedText {
    /// The text in `locale`, if it was written and is not blank.
    pub fn get(&self, locale: Locale) -> Option<&str> {
        let text = match locale {
            Locale::En => self.en.as_deref(),
            Locale::ZhCn => self.zh_cn.as_deref(),
        };
        text.map(str::trim).filter(|t| !t.is_empty())
    }

    pub fn both(en: &str, zh: &str) -> Self {
        Self {
            en: Some(en.to_owned()),
            zh_cn: Some(zh.to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merchant_ids_accept_directory_ids_and_reject_garbage() {
        assert!("m-0001".parse::<MerchantId>().is_ok());
        assert!("shop.cn_42".parse::<MerchantId>().is_ok());
        for bad in ["", "-lead", "has space", "semi;colon", &"x".repeat(65)] {
            assert!(bad.parse::<MerchantId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn prefixed_ids_round_trip_and_check_their_prefix() {
        let id = IncidentId::generate();
        assert_eq!(id.as_str().parse::<IncidentId>(), Ok(id.clone()));
        assert!(id.as_str().parse::<NoticeId>().is_err());
        assert!("inc_nothex".parse::<IncidentId>().is_err());
    }

    #[test]
    fn email_addresses_need_a_local_part_and_a_dotted_domain() {
        assert_eq!(
            "a.b@example.com".parse::<EmailAddress>().map(|e| e.domain().to_owned()),
            Ok("example.com".to_owned())
        );
        for bad in [
            "",
            "no-at",
            "@example.com",
            "a@localhost",
            "a b@example.com",
            "a@-x.com",
            "a@x..com",
        ] {
            let err = bad.parse::<EmailAddress>().expect_err(bad);
            assert_eq!(err.field, "email");
        }
    }

    #[test]
    fn phone_numbers_must_be_e164() {
        assert!("+8613800138000".parse::<PhoneNumber>().is_ok());
        for bad in ["13800138000", "+0123456789", "+86 138", "+1234", "+1234567890123456"] {
            assert!(bad.parse::<PhoneNumber>().is_err(), "{bad:?} accepted");
        }
        let p: PhoneNumber = "+8613800138000".parse().expect("valid");
        assert_eq!(p.last_four(), "8000");
    }

    #[test]
    fn closed_sets_name_their_choices_when_rejecting() {
        let err = "huge".parse::<Grade>().expect_err("not a grade");
        assert_eq!(err.field, "grade");
        assert!(err.reason.contains("significant"));
        assert!(Grade::Major.is_cac_reportable() && !Grade::General.is_cac_reportable());
        assert_eq!("zh-CN".parse::<Locale>(), Ok(Locale::ZhCn));
    }

    #[test]
    fn localized_text_treats_blank_as_missing() {
        let t = LocalizedText {
            en: Some("  ".into()),
            zh_cn: Some("已处理".into()),
        };
        assert_eq!(t.get(Locale::En), None);
        assert_eq!(t.get(Locale::ZhCn), Some("已处理"));
    }
}
