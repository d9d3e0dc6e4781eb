//! Compact JSON Web Tokens (RFC 7519) signed with RS256 (Google's OAuth2 service-account
//! grant, for FCM) or ES256 (APNs provider tokens): base64url without padding of the header,
//! the claims and the signature, joined by dots. Only what those two providers need: no
//! parsing of foreign tokens except [`decode_unverified`] for tests and diagnostics.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, RsaKeyPair};
use serde_json::{Map, Value};

/// A private key that signs JWTs.
pub enum JwtKey {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (`RS256`).
    Rs256(RsaKeyPair),
    /// ECDSA P-256 with SHA-256, fixed-length r||s signature (`ES256`, RFC 7518 §3.4).
    Es256(EcdsaKeyPair),
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKey({})", self.alg())
    }
}

/// base64url without padding, the JWT encoding.
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The DER inside a PEM block (`-----BEGIN PRIVATE KEY-----` ...); tolerant of `\r\n` and of
/// the literal `\n` escapes a key pasted from JSON may carry.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    let text = pem.replace("\\n", "\n");
    let mut inside = false;
    let mut b64 = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            inside = true;
        } else if line.starts_with("-----END ") {
            break;
        } else if inside {
            b64.push_str(line);
        }
    }
    if b64.is_empty() {
        return Err("no PEM block found".into());
    }
    STANDARD
        .decode(b64.as_bytes())
        .map_err(|e| format!("PEM body is not base64: {e}"))
}

impl JwtKey {
    /// An RSA key from PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), as in a Google
    /// service-account JSON's `private_key`.
    pub fn rs256_from_pem(pem: &str) -> Result<Self, String> {
        let der = pem_to_der(pem)?;
        RsaKeyPair::from_pkcs8(&der)
            .map(Self::Rs256)
            .map_err(|e| format!("not a PKCS#8 RSA private key: {e}"))
    }

    /// A P-256 key from PKCS#8 PEM, as in an APNs `.p8` file (which carries the public key,
    /// as ring requires).
    pub fn es256_from_pem(pem: &str) -> Result<Self, String> {
        Self::es256_from_pkcs8(&pem_to_der(pem)?)
    }

    pub fn es256_from_pkcs8(der: &[u8]) -> Result<Self, String> {
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
            .map(Self::Es256)
            .map_err(|e| format!("not a PKCS#8 P-256 private key: {e}"))
    }

    pub fn alg(&self) -> &'static str {
        match self {
            Self::Rs256(_) => "RS256",
            Self::Es256(_) => "ES256",
        }
    }

    /// Signs `claims` under a header of `alg` plus `header_fields` (e.g. `typ`, `kid`).
    pub fn sign(&self, header_fields: &[(&str, &str)], claims: &Value) -> Result<String, String> {
        let mut header = Map::new();
        header.insert("alg".into(), self.alg().into());
        for (name, value) in header_fields {
            header.insert((*name).into(), (*value).into());
        }
        let header = serde_json::to_vec(&Value::Object(header)).map_err(|e| e.to_string())?;
        let claims = serde_json::to_vec(claims).map_err(|e| e.to_string())?;
        let signing_input = format!("{}.{}", b64url(&header), b64url(&claims));
        let rng = SystemRandom::new();
        let sig = match self {
            Self::Rs256(key) => {
                let mut sig = vec![0; key.public().modulus_len()];
                key.sign(&signature::RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
                    .map_err(|_| "RSA signing failed".to_owned())?;
                sig
            }
            Self::Es256(key) => key
                .sign(&rng, signing_input.as_bytes())
                .map_err(|_| "ECDSA signing failed".to_owned())?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{signing_input}.{}", b64url(&sig)))
    }
}

/// A token split into its header, claims, signing input and signature, without checking the
/// signature (the caller verifies `signature` over `signing_input` with the public key).
#[derive(Debug, Clone)]
pub struct Decoded {
    pub header: Value,
    pub claims: Value,
    pub signing_input: String,
    pub signature: Vec<u8>,
}

pub fn decode_unverified(token: &str) -> Result<Decoded, String> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("a JWT has three dot-separated parts".into());
    };
    let part = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|e| format!("not base64url: {e}"));
    let json =
        |p: &str| -> Result<Value, String> { serde_json::from_slice(&part(p)?).map_err(|e| format!("not JSON: {e}")) };
    Ok(Decoded {
        header: json(h)?,
        claims: json(c)?,
        signing_input: format!("{h}.{c}"),
        signature: part(s)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{KeyPair, UnparsedPublicKey};
    use serde_json::json;

    #[test]
    fn es256_token_verifies_with_the_public_key() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
        let key = JwtKey::es256_from_pkcs8(pkcs8.as_ref()).expect("key");
        let JwtKey::Es256(pair) = &key else { panic!("es256") };
        let public = pair.public_key().as_ref().to_vec();
        let token = key
            .sign(&[("kid", "ABC123DEFG")], &json!({"iss": "TEAM", "iat": 1}))
            .expect("sign");
        assert!(!token.contains('='), "no padding");
        let d = decode_unverified(&token).expect("decode");
        assert_eq!(d.header, json!({"alg": "ES256", "kid": "ABC123DEFG"}));
        assert_eq!(d.claims, json!({"iss": "TEAM", "iat": 1}));
        assert_eq!(d.signature.len(), 64, "fixed r||s");
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
            .verify(d.signing_input.as_bytes(), &d.signature)
            .expect("signature verifies");
        let mut forged = d.signing_input.clone();
        forged.push('x');
        assert!(
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &public)
                .verify(forged.as_bytes(), &d.signature)
                .is_err()
        );
    }

    #[test]
    fn pem_blocks_decode_with_escaped_newlines() {
        let pem = "-----BEGIN PRIVATE KEY-----\\nAAEC\\nAw==\\n-----END PRIVATE KEY-----\\n";
        assert_eq!(pem_to_der(pem).expect("der"), vec![0, 1, 2, 3]);
        assert!(pem_to_der("garbage").is_err());
        assert!(JwtKey::rs256_from_pem(pem).is_err());
    }

    #[test]
    fn malformed_tokens_are_refused() {
        assert!(decode_unverified("a.b").is_err());
        assert!(decode_unverified("a.b.c.d").is_err());
    }
}
