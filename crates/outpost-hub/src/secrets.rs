//! One-time enrollment tokens, API keys and ids: random, shown once, stored only as hashes.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A fresh secret with a readable prefix (`opt_` tokens, `opk_` API keys).
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// A fresh id with a readable prefix (`agt_` agents, `dn_` down messages).
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// How a secret is stored: SHA-256, hex. Secrets are 192 random bits, so a fast hash is
/// enough (there is nothing to brute-force that a slow hash would protect).
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.trim().as_bytes()))
}

/// A connection URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}://{user}:***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_distinct_and_hash_stably() {
        let a = new_secret("opt_");
        assert!(a.starts_with("opt_") && a.len() == 52);
        assert_ne!(a, new_secret("opt_"));
        assert_eq!(hash_secret(&a), hash_secret(&format!(" {a}\n")));
    }

    #[test]
    fn urls_lose_their_passwords() {
        assert_eq!(
            redact_url("postgres://hub:s3cret@127.0.0.1:5433/hub"),
            "postgres://hub:***@127.0.0.1:5433/hub"
        );
        assert_eq!(redact_url("sqlite"), "sqlite");
    }
}
