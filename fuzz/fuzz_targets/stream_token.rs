//! Stream tokens (`hatch_relay::token::TokenVerifier::verify`): any string is refused with a
//! typed error and never verifies (it cannot carry this run's Ed25519 signature); never a
//! panic. The input's first byte picks the role and the rest is the token.

#![no_main]

use std::sync::OnceLock;

use hatch_proto::token::Role;
use hatch_relay::token::{TokenSigner, TokenVerifier};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static TokenVerifier {
    static V: OnceLock<TokenVerifier> = OnceLock::new();
    V.get_or_init(|| {
        // "k1" is the key id the seeds carry, so they reach the signature check.
        let (signer, _) = TokenSigner::generate("k1").expect("key");
        TokenVerifier::for_signer(&signer)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let role = if first & 1 == 0 { Role::Client } else { Role::Agent };
    let token = String::from_utf8_lossy(rest);
    let r = verifier().verify(&token, "s-fuzz", role, 1_800_000_000);
    assert!(r.is_err(), "a token without this run's signature verified: {token:?}");
});
