//! The token signing keys in the data directory.
//!
//! Keys live in `<data dir>/keys/<kid>.ed25519` (PKCS#8, 0600), `kid` = `k` + the creation time
//! in seconds since the Unix epoch (zero-padded, so names sort by age). The newest key signs;
//! every key present verifies. Rotation: `hatch-relay admin keys rotate` adds a new key, a
//! restart (or the next start) signs with it; delete the old file after ten minutes and restart
//! again. The verifier also accepts only tokens of this process's run
//! ([`crate::token::TokenSigner::run`]): tokens issued before a restart are refused whatever
//! their key, since every session open at the restart was closed then.

use std::path::Path;

use anyhow::Context;

use crate::token::{TokenSigner, TokenVerifier};

const SUFFIX: &str = ".ed25519";

/// Creates a new signing key in `dir/keys`; returns its kid.
pub fn create_key(data_dir: &Path) -> anyhow::Result<String> {
    let keys = data_dir.join("keys");
    crate::certs::private_dir(&keys)?;
    let mut secs = super::unix_now();
    // Two keys in one second: bump the number so kids stay unique and ordered.
    let kid = loop {
        let kid = format!("k{secs:012}");
        if !keys.join(format!("{kid}{SUFFIX}")).exists() {
            break kid;
        }
        secs += 1;
    };
    let (_, pkcs8) = TokenSigner::generate(&kid)?;
    crate::certs::write_private(&keys.join(format!("{kid}{SUFFIX}")), &pkcs8)?;
    Ok(kid)
}

/// Loads the signing keys (creating the first one when there is none): the newest signs,
/// all verify.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<(TokenSigner, TokenVerifier)> {
    let keys = data_dir.join("keys");
    // Owner only, also when an older relay made them readable by every local user.
    crate::certs::private_dir(&keys)?;
    let mut kids = list(&keys)?;
    if kids.is_empty() {
        create_key(data_dir)?;
        kids = list(&keys)?;
    }
    let mut verifier = TokenVerifier::default();
    let mut signer = None;
    for kid in &kids {
        let path = keys.join(format!("{kid}{SUFFIX}"));
        crate::certs::owner_only(&path, 0o600)?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let s = TokenSigner::from_pkcs8(kid, &bytes)
            .with_context(|| format!("signing key {}", path.display()))?;
        verifier.add_key(kid, s.public_key());
        signer = Some(s);
    }
    // `kids` is non-empty here, so the loop set `signer` to the newest key.
    let signer = signer.context("no signing key")?;
    // Tokens of an earlier process on this data directory are refused: its sessions were
    // closed when this one started.
    verifier.only_run(signer.run());
    Ok((signer, verifier))
}

/// The signing keys of a fleet, kept in its shared store so that every node verifies the
/// tokens any node issues: the newest signs, all verify. The first node of a fleet puts its
/// own newest key (created if it has none) there; of several first nodes starting at once, one
/// key goes in. This node's verifier accepts only tokens of its own run, as for one relay.
pub fn load_shared(
    store: &dyn crate::control::store::Store,
    data_dir: &Path,
) -> anyhow::Result<(TokenSigner, TokenVerifier)> {
    let mut keys = store.signing_keys().context("reading the fleet's signing keys")?;
    if keys.is_empty() {
        let dir = data_dir.join("keys");
        crate::certs::private_dir(&dir)?;
        let kid = match list(&dir)?.pop() {
            Some(k) => k,
            None => create_key(data_dir)?,
        };
        let path = dir.join(format!("{kid}{SUFFIX}"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        store.add_signing_key(&kid, &bytes, super::unix_now(), true)?;
        keys = store.signing_keys()?;
    }
    let mut verifier = TokenVerifier::default();
    let mut signer = None;
    for (kid, pkcs8) in &keys {
        let s = TokenSigner::from_pkcs8(kid, pkcs8)
            .with_context(|| format!("signing key {kid} in the store"))?;
        verifier.add_key(kid, s.public_key());
        signer = Some(s);
    }
    let signer = signer.context("the store holds no signing key")?;
    verifier.only_run(signer.run());
    Ok((signer, verifier))
}

/// `admin keys rotate` for a fleet: a new key in the store (nodes sign with it once restarted).
pub fn rotate_shared(store: &dyn crate::control::store::Store) -> anyhow::Result<String> {
    let mut secs = super::unix_now();
    let existing: Vec<String> = store.signing_keys()?.into_iter().map(|(k, _)| k).collect();
    let kid = loop {
        let kid = format!("k{secs:012}");
        if !existing.contains(&kid) {
            break kid;
        }
        secs += 1;
    };
    let (_, pkcs8) = TokenSigner::generate(&kid)?;
    anyhow::ensure!(
        store.add_signing_key(&kid, &pkcs8, super::unix_now(), false)?,
        "signing key {kid} exists already; try again"
    );
    Ok(kid)
}

fn list(keys: &Path) -> anyhow::Result<Vec<String>> {
    let mut kids = Vec::new();
    let rd = match std::fs::read_dir(keys) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(kids),
        Err(e) => return Err(e).with_context(|| format!("reading {}", keys.display())),
    };
    for e in rd {
        let name = e?.file_name();
        if let Some(kid) = name.to_str().and_then(|n| n.strip_suffix(SUFFIX)) {
            kids.push(kid.to_owned());
        }
    }
    kids.sort();
    Ok(kids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hatch_proto::token::Role;

    #[test]
    fn first_start_creates_a_private_key_and_a_restart_refuses_earlier_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (s1, _) = load_or_create(dir.path()).unwrap();
        let f = dir.path().join("keys").join(format!("{}{SUFFIX}", s1.kid()));
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&f).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let (t1, _) = s1.issue("s-1", Role::Client, "i", "a", 1_800_000_000).unwrap();
        let kid2 = create_key(dir.path()).unwrap();
        let (s2, v) = load_or_create(dir.path()).unwrap();
        assert_eq!(s2.kid(), kid2);
        assert_ne!(s1.kid(), s2.kid());
        // A token of the previous run is refused even though its key is still trusted: its
        // session was closed when this run started.
        assert_eq!(
            v.verify(&t1, "s-1", Role::Client, 1_800_000_001),
            Err(crate::token::TokenError::PreviousRun)
        );
        let (t2, _) = s2.issue("s-2", Role::Agent, "i", "a", 1_800_000_000).unwrap();
        v.verify(&t2, "s-2", Role::Agent, 1_800_000_001).unwrap();
    }
}
