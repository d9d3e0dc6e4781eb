//! Who may call the API: bearer tokens (kept only as hashes), each acting as one actor with one
//! role, and security tools posting events with an HMAC signature over timestamp and body.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::Digest;

use crate::domain::{Actor, FieldError, TokenId};

/// A token's role. What each may do is [`Access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Works incidents: ingests, confirms, scopes, drafts, dispatches, publishes, files.
    Responder,
    /// Approves what a responder drafted (never their own).
    Approver,
    /// Reads everything, verifies the ledger, exports evidence; changes nothing.
    Auditor,
    /// Everything.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Responder, Role::Approver, Role::Auditor, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Responder => "responder",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        }
    }

    pub fn may(self, access: Access) -> bool {
        match access {
            Access::Read => true,
            Access::Respond => matches!(self, Role::Responder | Role::Admin),
            Access::Approve => matches!(self, Role::Approver | Role::Admin),
            Access::Audit => matches!(self, Role::Auditor | Role::Admin),
            Access::Admin => self == Role::Admin,
        }
    }
}

impl FromStr for Role {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| FieldError::new("role", format!("'{s}' is not responder, approver, auditor or admin")))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Reading incidents, notices, deadlines: every role.
    Read,
    /// Changing an incident's course: responders (and admins).
    Respond,
    /// Approving notices and filings: approvers (and admins).
    Approve,
    /// The ledger and evidence: auditors (and admins).
    Audit,
    /// Tokens: admins.
    Admin,
}

impl Access {
    /// The roles that have it.
    pub fn roles(self) -> Vec<Role> {
        Role::ALL.into_iter().filter(|r| r.may(self)).collect()
    }
}

/// A stored API token (its secret is never stored, only its hash).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApiToken {
    pub id: TokenId,
    pub actor: Actor,
    pub role: Role,
    pub created_at: DateTime<Utc>,
    pub created_by: Actor,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<Actor>,
}

impl ApiToken {
    pub fn is_valid_at(&self, now: DateTime<Utc>) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }
}

/// What tokens start with: a scanner that finds one in a log or a repository knows it.
pub const TOKEN_PREFIX: &str = "tocsin_";

/// A new random token (256 bits) and its hash, the only thing stored.
pub fn new_token() -> (String, String) {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    let token = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = token_hash(&token);
    (token, hash)
}

/// The stored form of a token. A plain SHA-256 suffices: a token has 256 bits of entropy, so
/// nothing can be guessed from its hash, and it is looked up by it.
pub fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SignatureError {
    #[error("X-Tocsin-Timestamp: missing or not a Unix time in seconds")]
    BadTimestamp,
    #[error("X-Tocsin-Timestamp: outside the replay window of {0} seconds")]
    Stale(u64),
    #[error("X-Tocsin-Signature: missing or not of the form v1=<hex>")]
    BadSignature,
    #[error("X-Tocsin-Signature: does not match the body")]
    Mismatch,
}

/// Checks an event source's signature: `v1=<hex HMAC-SHA256(secret, "{timestamp}.{body}")>`
/// (the same scheme Tocsin signs its own webhooks with), the timestamp within `window_seconds`
/// of `now` either way, so a captured request cannot be replayed later.
pub fn verify_source_signature(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: DateTime<Utc>,
    window_seconds: u64,
) -> Result<(), SignatureError> {
    let ts: i64 = timestamp
        .and_then(|t| t.trim().parse().ok())
        .ok_or(SignatureError::BadTimestamp)?;
    if now.timestamp().abs_diff(ts) > window_seconds {
        return Err(SignatureError::Stale(window_seconds));
    }
    let given = signature
        .and_then(|s| s.trim().strip_prefix("v1="))
        .and_then(|h| hex::decode(h).ok())
        .ok_or(SignatureError::BadSignature)?;
    let expected = crate::channels::sign(secret, ts, body);
    let expected = expected
        .strip_prefix("v1=")
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_default();
    // Constant time: the comparison does not stop at the first differing byte.
    let same = given.len() == expected.len() && given.iter().zip(&expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same { Ok(()) } else { Err(SignatureError::Mismatch) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_have_exactly_their_access() {
        let table: Vec<(Access, Vec<&str>)> = [
            Access::Read,
            Access::Respond,
            Access::Approve,
            Access::Audit,
            Access::Admin,
        ]
        .into_iter()
        .map(|a| (a, a.roles().into_iter().map(Role::as_str).collect()))
        .collect();
        assert_eq!(
            table,
            [
                (Access::Read, vec!["responder", "approver", "auditor", "admin"]),
                (Access::Respond, vec!["responder", "admin"]),
                (Access::Approve, vec!["approver", "admin"]),
                (Access::Audit, vec!["auditor", "admin"]),
                (Access::Admin, vec!["admin"]),
            ]
        );
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn tokens_are_random_prefixed_and_stored_only_as_hashes() {
        let (a, hash_a) = new_token();
        let (b, _) = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 43);
        assert_eq!(hash_a, token_hash(&a));
        assert_eq!(hash_a.len(), 64);
        assert!(!hash_a.contains(&a[TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn a_source_signature_checks_body_timestamp_and_window() {
        let now = Utc::now();
        let ts = now.timestamp();
        let body = br#"{"external_id":"x"}"#;
        let sig = crate::channels::sign(b"s3cret", ts, body);
        let check = |secret: &[u8], t: Option<&str>, s: Option<&str>, b: &[u8]| {
            verify_source_signature(secret, t, s, b, now, 300)
        };
        let t = ts.to_string();
        assert_eq!(check(b"s3cret", Some(&t), Some(&sig), body), Ok(()));
        assert_eq!(
            check(b"other", Some(&t), Some(&sig), body),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(b"s3cret", Some(&t), Some(&sig), b"{}"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(b"s3cret", None, Some(&sig), body),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            check(b"s3cret", Some(&t), Some("sha1=00"), body),
            Err(SignatureError::BadSignature)
        );
        let old = (ts - 301).to_string();
        let old_sig = crate::channels::sign(b"s3cret", ts - 301, body);
        assert_eq!(
            check(b"s3cret", Some(&old), Some(&old_sig), body),
            Err(SignatureError::Stale(300))
        );
    }
}
