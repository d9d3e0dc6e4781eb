//! DKIM signing settings: the key file (RSA or Ed25519, as OpenSSL writes them) and the
//! headers a verifier expects to be covered.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use lettre::message::dkim::{
    DkimCanonicalization, DkimCanonicalizationType, DkimConfig, DkimSigningAlgorithm, DkimSigningKey,
};
use lettre::message::header::HeaderName;

use crate::config::EmailSettings;

/// The headers signed (relaxed/relaxed): those a reader sees and a forger would change.
pub const SIGNED_HEADERS: [&str; 8] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "Content-Type",
    "MIME-Version",
    "Content-Language",
];

/// The DKIM configuration, when selector, domain and key file are all set; an error names
/// the setting that is wrong (a half-configured signer would silently send unsigned mail).
pub fn from_settings(s: &EmailSettings) -> Result<Option<DkimConfig>, String> {
    let set = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    let selector = set(&s.dkim_selector);
    let domain = set(&s.dkim_domain);
    let key_file = s.dkim_private_key_file.as_deref().filter(|p| !p.as_os_str().is_empty());
    match (selector, domain, key_file) {
        (None, None, None) => Ok(None),
        (Some(selector), Some(domain), Some(key_file)) => {
            let key = load_key(key_file)?;
            let headers = SIGNED_HEADERS
                .iter()
                .map(|h| HeaderName::new_from_ascii_str(h))
                .collect();
            Ok(Some(DkimConfig::new(
                selector,
                domain,
                key,
                headers,
                DkimCanonicalization {
                    header: DkimCanonicalizationType::Relaxed,
                    body: DkimCanonicalizationType::Relaxed,
                },
            )))
        }
        _ => Err("email.dkim_selector, email.dkim_domain and email.dkim_private_key_file must be set together".into()),
    }
}

/// Reads a signing key: RSA as PKCS#1 (`BEGIN RSA PRIVATE KEY`) or PKCS#8 (`BEGIN PRIVATE
/// KEY`, what `openssl genrsa` writes), Ed25519 as PKCS#8 (`openssl genpkey -algorithm
/// ed25519`) or as lettre's bare base64 seed.
pub fn load_key(path: &Path) -> Result<DkimSigningKey, String> {
    let what = |e: &dyn std::fmt::Display| format!("email.dkim_private_key_file {}: {e}", path.display());
    let text = std::fs::read_to_string(path).map_err(|e| what(&e))?;
    if text.contains("-----BEGIN RSA PRIVATE KEY-----") {
        return DkimSigningKey::new(&text, DkimSigningAlgorithm::Rsa).map_err(|e| what(&e));
    }
    if text.contains("-----BEGIN PRIVATE KEY-----") {
        let der = pem_body(&text, "PRIVATE KEY").ok_or_else(|| what(&"not a PEM private key"))?;
        return match pkcs8(&der).ok_or_else(|| what(&"not a PKCS#8 private key"))? {
            Pkcs8::Rsa(pkcs1) => {
                let pem = to_pem("RSA PRIVATE KEY", pkcs1);
                DkimSigningKey::new(&pem, DkimSigningAlgorithm::Rsa).map_err(|e| what(&e))
            }
            Pkcs8::Ed25519(seed) => {
                DkimSigningKey::new(&B64.encode(seed), DkimSigningAlgorithm::Ed25519).map_err(|e| what(&e))
            }
        };
    }
    if text.contains("-----BEGIN") {
        return Err(what(&"unsupported key format; use an RSA or Ed25519 private key"));
    }
    DkimSigningKey::new(text.trim(), DkimSigningAlgorithm::Ed25519).map_err(|e| what(&e))
}

fn pem_body(text: &str, label: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)? + begin.len();
    let stop = start + text[start..].find(&end)?;
    let b64: String = text[start..stop].split_ascii_whitespace().collect();
    B64.decode(b64).ok()
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let b64 = B64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

enum Pkcs8<'a> {
    /// The PKCS#1 `RSAPrivateKey` inside.
    Rsa(&'a [u8]),
    /// The 32-byte seed.
    Ed25519(&'a [u8]),
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_ED25519: &[u8] = &[0x2b, 0x65, 0x70];

/// `PrivateKeyInfo ::= SEQUENCE { version INTEGER, algorithm SEQUENCE { OID, params }, privateKey
/// OCTET STRING, ... }` (RFC 5208 / RFC 8410).
fn pkcs8(der: &[u8]) -> Option<Pkcs8<'_>> {
    let (seq, _) = tlv(der, 0x30)?;
    let (_version, rest) = tlv(seq, 0x02)?;
    let (algorithm, rest) = tlv(rest, 0x30)?;
    let (oid, _) = tlv(algorithm, 0x06)?;
    let (key, _) = tlv(rest, 0x04)?;
    if oid == OID_RSA {
        Some(Pkcs8::Rsa(key))
    } else if oid == OID_ED25519 {
        let (seed, _) = tlv(key, 0x04)?;
        (seed.len() == 32).then_some(Pkcs8::Ed25519(seed))
    } else {
        None
    }
}

/// One DER element with the expected tag: its content and what follows it.
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes.iter().fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
    }

    #[test]
    fn keys_load_in_the_formats_openssl_writes() {
        for name in ["dkim-test-rsa.pem", "dkim-test-rsa-pkcs8.pem", "dkim-test-ed25519.pem"] {
            load_key(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(load_key(&fixture("test-ca.pem")).is_err(), "a certificate is not a key");
        assert!(load_key(&fixture("missing.pem")).is_err());
    }
}
