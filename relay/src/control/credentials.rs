//! Secrets handed out by the control plane, and how they are stored.
//!
//! Every secret (owner and user access keys, instance secrets, activation codes) is 32 bytes
//! from the operating system's CSPRNG, shown once, and stored only as its SHA-256. A slow
//! password hash (argon2, scrypt, bcrypt) exists to make guessing a *low-entropy* human password
//! from a leaked hash expensive; a 256-bit random secret cannot be guessed at any speed (2^256
//! candidates), so a plain SHA-256 is just as safe here and costs microseconds on every request
//! instead of tens of milliseconds. Lookups go by the hash, so no secret is compared in clear.

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};

/// Prefix of an access key: `hatch_ak_<16 hex key id>_<43 base64url>`.
pub const ACCESS_KEY_PREFIX: &str = "hatch_ak_";
/// Prefix of an instance secret.
pub const INSTANCE_SECRET_PREFIX: &str = "hatch_is_";
/// Prefix of an activation code.
pub const ACTIVATION_CODE_PREFIX: &str = "hatch_ac_";

/// `n` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS RNG failing is not recoverable and not something a peer can cause.
    SystemRandom::new().fill(&mut b).expect("operating system RNG failed");
    b
}

/// A random id: `prefix` + 16 lowercase hex digits (64 bits).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", hex::encode(random_bytes::<8>()))
}

/// Whether `id` has the shape [`new_id`] gives (`prefix` + 16 lowercase hex digits): a
/// request naming anything else is refused before any store call.
pub fn valid_id(id: &str, prefix: &str) -> bool {
    id.len() == prefix.len() + 16
        && id.starts_with(prefix)
        && id[prefix.len()..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A 256-bit random secret with a recognisable prefix (so secret scanners can find leaks).
pub fn new_secret(prefix: &str) -> String {
    let b = random_bytes::<32>();
    format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

/// A new access key: `(key id, secret)`. The key id is also inside the secret, so a person
/// holding a key can tell which one to revoke.
pub fn new_access_key() -> (String, String) {
    let id_hex = hex::encode(random_bytes::<8>());
    let b = random_bytes::<32>();
    let secret = format!(
        "{ACCESS_KEY_PREFIX}{id_hex}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    );
    (format!("ak-{id_hex}"), secret)
}

/// SHA-256 of a secret, as stored.
pub fn hash(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Compares two stored hashes without an early exit.
pub fn hashes_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let (id, key) = new_access_key();
        assert!(id.starts_with("ak-") && id.len() == 19, "{id}");
        assert!(key.starts_with(&format!("{ACCESS_KEY_PREFIX}{}_", &id[3..])), "{key}");
        assert_eq!(key.len(), ACCESS_KEY_PREFIX.len() + 16 + 1 + 43);
        let i = new_id("i-");
        assert_eq!(i.len(), 18);
        assert!(i[2..].chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(new_secret("x"), new_secret("x"));
        // SHA-256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            hex::encode(hash("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(hashes_equal(&hash("a"), &hash("a")));
        assert!(!hashes_equal(&hash("a"), &hash("b")));
    }
}
