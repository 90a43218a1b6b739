//! Authorization: HS256 JSON Web Tokens with `sub`, `exp` and `groups` claims,
//! and the group permissions they grant.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The shortest token secret a server accepts: HS256 with a shorter key is
/// open to brute force.
pub const MIN_SECRET_BYTES: usize = 32;

/// A token secret shorter than [`MIN_SECRET_BYTES`], the empty one included.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the token secret is {len} bytes long; it must be at least {MIN_SECRET_BYTES} bytes")]
pub struct WeakSecret {
    /// The secret's length in bytes.
    pub len: usize,
}

/// Whether two secrets are equal, in time that does not depend on where they
/// differ: both are hashed first, so not even their lengths leak.
pub fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (Sha256::digest(given.as_bytes()), Sha256::digest(expected.as_bytes()));
    a.as_slice().ct_eq(b.as_slice()).into()
}

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No token was given.
    #[error("a token is required")]
    Missing,
    /// Not three base64url parts of JSON, or a claim is missing or mistyped.
    #[error("the token is malformed")]
    Malformed,
    /// Not HS256.
    #[error("the token's algorithm must be HS256")]
    Algorithm,
    /// The signature does not match the server's secret.
    #[error("the token's signature is invalid")]
    Signature,
    /// `exp` is in the past.
    #[error("the token has expired")]
    Expired,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    groups: Vec<String>,
}

/// A verified user: who it is and where it may go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    /// The `sub` claim.
    pub id: String,
    /// What the token's `groups` claim allows.
    pub permissions: Permissions,
}

/// Group patterns: exact names, or a prefix followed by `*`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Permissions {
    patterns: Vec<String>,
}

impl Permissions {
    /// Permissions from the `groups` claim.
    pub fn new(patterns: Vec<String>) -> Self {
        Permissions { patterns }
    }

    /// Whether `group` may be joined, published to and read.
    pub fn allows(&self, group: &str) -> bool {
        self.patterns.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => group.starts_with(prefix),
            None => p == group,
        })
    }
}

/// Verifies HS256 tokens with one secret.
#[derive(Clone)]
pub struct TokenVerifier {
    key: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenVerifier { .. }")
    }
}

impl TokenVerifier {
    /// A verifier for tokens signed with `secret`, which must be at least
    /// [`MIN_SECRET_BYTES`] long: what a server takes from its configuration.
    pub fn checked(secret: &[u8]) -> Result<Self, WeakSecret> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(WeakSecret { len: secret.len() });
        }
        Ok(Self::new(secret))
    }

    /// A verifier for tokens signed with `secret`, whatever its length (for
    /// tools and tests; servers use [`TokenVerifier::checked`]).
    pub fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of any length.
        let key = match Hmac::<Sha256>::new_from_slice(secret) {
            Ok(k) => k,
            Err(_) => unreachable!("HMAC takes keys of every length"),
        };
        TokenVerifier { key }
    }

    /// Checks a token's signature, algorithm, claims and expiry at `now_secs`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Result<User, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| TokenError::Malformed);
        let header: Header = serde_json::from_slice(&decode(h)?).map_err(|_| TokenError::Malformed)?;
        if header.alg != "HS256" {
            return Err(TokenError::Algorithm);
        }
        let signature = decode(s)?;
        let mut mac = self.key.clone();
        mac.update(h.as_bytes());
        mac.update(b".");
        mac.update(c.as_bytes());
        mac.verify_slice(&signature).map_err(|_| TokenError::Signature)?;
        let claims: Claims = serde_json::from_slice(&decode(c)?).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now_secs {
            return Err(TokenError::Expired);
        }
        Ok(User {
            id: claims.sub,
            permissions: Permissions::new(claims.groups),
        })
    }

    /// Signs claims into a token (for tests, tools and backends issuing tokens).
    pub fn sign(&self, sub: &str, exp: u64, groups: &[&str]) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = serde_json::json!({"sub": sub, "exp": exp, "groups": groups});
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let mut mac = self.key.clone();
        mac.update(header.as_bytes());
        mac.update(b".");
        mac.update(claims.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{header}.{claims}.{sig}")
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> u64 {
    channelbox_core::now_ms() / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_secrets_are_refused_and_secrets_compare_whole() {
        assert_eq!(TokenVerifier::checked(b"").unwrap_err().len, 0);
        assert_eq!(TokenVerifier::checked(&[7; 31]).unwrap_err().len, 31);
        assert!(TokenVerifier::checked(&[7; 32]).is_ok());
        assert!(same_secret("admin-token", "admin-token"));
        assert!(!same_secret("admin-tokeN", "admin-token"));
        assert!(!same_secret("admin", "admin-token"));
    }

    #[test]
    fn tokens_round_trip_and_are_checked() {
        let v = TokenVerifier::new(b"secret");
        let t = v.sign("alice", 2_000, &["chat_*", "lobby"]);
        let user = v.verify(&t, 1_000).unwrap();
        assert_eq!(user.id, "alice");
        assert!(user.permissions.allows("chat_"));
        assert!(user.permissions.allows("chat_42"));
        assert!(user.permissions.allows("lobby"));
        assert!(!user.permissions.allows("lobby2"));
        assert!(!user.permissions.allows("chat"));
        assert_eq!(v.verify(&t, 2_000), Err(TokenError::Expired));
        assert_eq!(
            TokenVerifier::new(b"other").verify(&t, 1_000),
            Err(TokenError::Signature)
        );
        assert_eq!(v.verify("a.b", 1_000), Err(TokenError::Malformed));
        assert_eq!(v.verify("", 1_000), Err(TokenError::Malformed));
    }
}
