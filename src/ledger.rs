//! The audit ledger: every transition and every side effect that matters is an entry, and each
//! entry's hash covers the previous entry's hash, so changing, deleting or reordering any row
//! breaks the chain from that point on. Storage appends; this module defines the hash and
//! checks the chain.

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::model::LedgerEntry;
use crate::store::{Store, StoreError};
use crate::time::fmt_ts;

/// The hash of the entry before the first one.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Serialize)]
struct Canonical<'a, D: Serialize + ?Sized> {
    seq: i64,
    at: &'a str,
    actor: &'a str,
    action: &'a str,
    incident_id: Option<&'a str>,
    detail: &'a D,
    prev_hash: &'a str,
}

/// SHA-256 over a fixed-order JSON rendering of the entry's fields and the previous hash.
/// The detail is hashed as a `serde_json::Value` writes it (compact, keys sorted); a detail
/// given already written (a `RawValue`) must be written that way, or the chain fails to verify.
pub fn chain_hash<D: Serialize + ?Sized>(
    seq: i64,
    at: &str,
    actor: &str,
    action: &str,
    incident_id: Option<&str>,
    detail: &D,
    prev_hash: &str,
) -> String {
    let canonical = Canonical {
        seq,
        at,
        actor,
        action,
        incident_id,
        detail,
        prev_hash,
    };
    // Serialising plain strings and a Value (or JSON already written) cannot fail.
    let bytes = serde_json::to_vec(&canonical).unwrap_or_default();
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of some content, hex-encoded: the content hashes of notices, drafts and filings.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Result of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Verification {
    Intact { entries: u64, head: String },
    Broken { seq: i64, reason: String },
}

/// Checks every link: sequence numbers consecutive from 1, each `prev_hash` the previous hash,
/// each hash recomputed from the entry's content.
pub fn verify_entries(entries: &[LedgerEntry]) -> Verification {
    let mut prev = GENESIS.to_owned();
    for (i, e) in entries.iter().enumerate() {
        let expected_seq = i as i64 + 1;
        if e.seq != expected_seq {
            return Verification::Broken {
                seq: e.seq,
                reason: format!("expected entry {expected_seq} here: an entry was removed or moved"),
            };
        }
        if e.prev_hash != prev {
            return Verification::Broken {
                seq: e.seq,
                reason: "does not link to the previous entry's hash".into(),
            };
        }
        let recomputed = chain_hash(
            e.seq,
            &fmt_ts(e.at),
            &e.actor,
            &e.action,
            e.incident_id.as_deref(),
            &e.detail,
            &e.prev_hash,
        );
        if recomputed != e.hash {
            return Verification::Broken {
                seq: e.seq,
                reason: "its content does not match its hash: the entry was changed".into(),
            };
        }
        prev = e.hash.clone();
    }
    Verification::Intact {
        entries: entries.len() as u64,
        head: prev,
    }
}

/// Walks the whole ledger in the store.
pub async fn verify(store: &dyn Store) -> Result<Verification, StoreError> {
    verify_with_anchor(store, None).await
}

/// A chain alone cannot show that its newest entries were cut off, or that the whole chain
/// was rebuilt: an anchor can. It is an entry's number and hash recorded elsewhere earlier
/// (printed by `audit verify`, kept in an evidence manifest or a ticket); the ledger still
/// holds that entry with that hash, or it was cut or rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: i64,
    pub hash: String,
}

impl std::str::FromStr for Anchor {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (seq, hash) = s
            .split_once(':')
            .ok_or("must be ENTRY:HASH, as audit verify prints it")?;
        let seq: i64 = seq
            .trim()
            .parse()
            .map_err(|_| format!("'{seq}' is not an entry number"))?;
        let hash = hash.trim();
        if seq < 1 || hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err("must be ENTRY:HASH with a 64-digit hex hash".into());
        }
        Ok(Anchor {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// [`verify`], and that the ledger still holds the `anchor` entry unchanged.
pub async fn verify_with_anchor(store: &dyn Store, anchor: Option<&Anchor>) -> Result<Verification, StoreError> {
    let entries = store.ledger_entries(None).await?;
    let verdict = verify_entries(&entries);
    let Some(anchor) = anchor else {
        return Ok(verdict);
    };
    if matches!(verdict, Verification::Broken { .. }) {
        return Ok(verdict);
    }
    Ok(match entries.iter().find(|e| e.seq == anchor.seq) {
        None => Verification::Broken {
            seq: anchor.seq,
            reason: "the anchored entry is gone: the ledger was cut back".into(),
        },
        Some(e) if e.hash != anchor.hash => Verification::Broken {
            seq: anchor.seq,
            reason: "the anchored entry has another hash now: the chain was rebuilt".into(),
        },
        Some(_) => verdict,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn chain(n: i64) -> Vec<LedgerEntry> {
        let mut prev = GENESIS.to_owned();
        let at = crate::time::parse_ts(&fmt_ts(Utc::now())).expect("round trip");
        (1..=n)
            .map(|seq| {
                let detail = serde_json::json!({ "n": seq });
                let hash = chain_hash(seq, &fmt_ts(at), "alice", "test", None, &detail, &prev);
                let e = LedgerEntry {
                    seq,
                    at,
                    actor: "alice".into(),
                    action: "test".into(),
                    incident_id: None,
                    detail,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn an_untouched_chain_verifies() {
        assert!(matches!(
            verify_entries(&chain(5)),
            Verification::Intact { entries: 5, .. }
        ));
    }

    #[test]
    fn edits_deletions_and_reorders_are_found() {
        let mut edited = chain(5);
        edited[2].actor = "mallory".into();
        assert_eq!(
            verify_entries(&edited),
            Verification::Broken {
                seq: 3,
                reason: "its content does not match its hash: the entry was changed".into()
            }
        );

        let mut deleted = chain(5);
        deleted.remove(1);
        assert!(matches!(verify_entries(&deleted), Verification::Broken { seq: 3, .. }));

        let mut reordered = chain(5);
        reordered.swap(1, 2);
        assert!(matches!(
            verify_entries(&reordered),
            Verification::Broken { seq: 3, .. }
        ));
    }
}
