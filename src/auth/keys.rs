//! API key material: generation from the OS random source and hashing.

use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A freshly generated key: the plaintext (shown once) and what is stored.
#[derive(Debug, Clone)]
pub struct NewKey {
    /// `cg_` + 40 random characters of `[A-Za-z0-9]`.
    pub key: String,
    /// Public id, e.g. `key_…`.
    pub key_id: String,
    /// Hex SHA-256 of `key`.
    pub hash: String,
    /// First 8 characters of `key`, safe to list.
    pub prefix: String,
}

/// `n` characters of `[A-Za-z0-9]` from the OS random source (uniform: rejection sampling).
pub fn random_alnum(n: usize) -> String {
    let mut out = String::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        getrandom::fill(&mut buf).expect("OS random source");
        // 248 = 4 · 62: bytes at or above it would bias the first characters.
        for b in buf.iter().filter(|b| **b < 248) {
            if out.len() == n {
                break;
            }
            out.push(ALPHABET[(*b % 62) as usize] as char);
        }
    }
    out
}

/// Generates a new API key.
pub fn generate_key() -> NewKey {
    let key = format!("cg_{}", random_alnum(40));
    NewKey { hash: hash_key(&key), prefix: key[..8].to_owned(), key_id: format!("key_{}", random_alnum(16)), key }
}

/// Hex SHA-256 of a plaintext key.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_look_like_the_spec_says() {
        let k = generate_key();
        assert!(k.key.starts_with("cg_"));
        assert_eq!(k.key.len(), 43);
        assert!(k.key[3..].bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(k.hash, hash_key(&k.key));
        assert_eq!(k.hash.len(), 64);
        assert_ne!(generate_key().key, k.key);
    }

    #[test]
    fn alphabet_is_covered() {
        let s = random_alnum(20_000);
        for c in ALPHABET {
            assert!(s.as_bytes().contains(c), "{} never drawn", *c as char);
        }
    }
}
