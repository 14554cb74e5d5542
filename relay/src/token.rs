//! Stream tokens: JWT signed with Ed25519 (EdDSA), algorithm pinned, key chosen by `kid`.
//!
//! The control plane holds the private key ([`TokenSigner`]); the data plane holds only public
//! keys ([`TokenVerifier`]). Expiry is checked here against a `now` the caller passes, so tests
//! can move time without sleeping; single use (the `jti`) is enforced by the data plane.

use std::collections::HashMap;

use base64::Engine;
use hatch_proto::api::RecordingMode;
use hatch_proto::token::{Claims, Role, TOKEN_LIFETIME_SECS};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use thiserror::Error;

/// Why a token was refused. Each maps to one API code and one close code.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not a JWT, or a header or claims that do not parse.
    #[error("malformed token")]
    Malformed,
    /// A `kid` this relay does not know.
    #[error("unknown signing key")]
    UnknownKey,
    /// An algorithm other than EdDSA in the header.
    #[error("algorithm not allowed")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Valid, but for another session or role than the one asked for.
    #[error("token is for another session or role")]
    WrongSubject,
    /// Valid, but issued before this relay process started: its session was closed at the
    /// restart (a token is single-use across restarts).
    #[error("token issued before the relay restarted")]
    PreviousRun,
}

impl TokenError {
    /// A short stable label, for metrics (`reason="..."`) and logs.
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Malformed => "malformed",
            TokenError::UnknownKey => "unknown_key",
            TokenError::WrongAlgorithm => "wrong_algorithm",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::WrongSubject => "wrong_subject",
            TokenError::PreviousRun => "previous_run",
        }
    }
}

/// The control plane's signing key.
pub struct TokenSigner {
    kid: String,
    /// Parsed once: `jsonwebtoken::encode` takes the PKCS#8 bytes and re-derives the key pair
    /// from them for every token, which was 40 % of issuing one.
    pair: Ed25519KeyPair,
    public: Vec<u8>,
    /// This process's run id, put in every token (`run`).
    run: String,
}

/// A new random run id: 16 hex digits.
fn new_run() -> anyhow::Result<String> {
    let mut run = [0u8; 8];
    ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut run)
        .map_err(|_| anyhow::anyhow!("rng failed"))?;
    Ok(hex::encode(run))
}

/// What a token says about its session beyond who may use it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegTerms {
    /// A new leg of a session that was paired before (the `res` claim).
    pub resume: bool,
    /// A port session: its idle timeout counts both directions.
    pub two_way: bool,
    /// The account's idle timeout, seconds (`idle`).
    pub idle_timeout_s: Option<u64>,
    /// The account's longest session, seconds (`maxd`).
    pub max_duration_s: Option<u64>,
    /// How the session is recorded (`rec`), and who started it (`prn`, for the recording's
    /// header); `None`: not recorded.
    pub recording: Option<(RecordingMode, String)>,
}

impl LegTerms {
    /// The terms of a session of `mode` in an account with `prefs`.
    pub fn of(mode_is_port: bool, prefs: crate::control::store::SessionPrefs) -> LegTerms {
        LegTerms {
            resume: false,
            two_way: mode_is_port,
            idle_timeout_s: prefs.idle_timeout_s,
            max_duration_s: prefs.max_duration_s,
            recording: None,
        }
    }

    /// The same, for a session recorded as `mode` (nothing when it is `off`) that `principal`
    /// started.
    pub fn recorded(self, mode: RecordingMode, principal: &str) -> LegTerms {
        LegTerms { recording: mode.is_on().then(|| (mode, principal.to_owned())), ..self }
    }

    /// The same, for a resume token.
    pub fn resumed(self) -> LegTerms {
        LegTerms { resume: true, ..self }
    }
}

impl TokenSigner {
    /// Generates a new Ed25519 key and returns it with its PKCS#8 document (to store, 0600).
    pub fn generate(kid: &str) -> anyhow::Result<(Self, Vec<u8>)> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("generating an ed25519 key failed"))?;
        let signer = Self::from_pkcs8(kid, pkcs8.as_ref())?;
        Ok((signer, pkcs8.as_ref().to_vec()))
    }

    /// Loads a key from its PKCS#8 document.
    pub fn from_pkcs8(kid: &str, pkcs8: &[u8]) -> anyhow::Result<Self> {
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8)
            .map_err(|e| anyhow::anyhow!("invalid ed25519 key: {e}"))?;
        Ok(TokenSigner {
            kid: kid.to_owned(),
            public: pair.public_key().as_ref().to_vec(),
            pair,
            run: new_run()?,
        })
    }

    /// The key id put in each token's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The run id put in every token this signer issues (random per signer, so per process).
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The raw 32-byte public key, for [`TokenVerifier::add_key`].
    pub fn public_key(&self) -> &[u8] {
        &self.public
    }

    /// Issues a token for one role of one session, valid for ten minutes from `now`.
    pub fn issue(
        &self,
        session_id: &str,
        role: Role,
        instance: &str,
        account: &str,
        now: u64,
    ) -> anyhow::Result<(String, Claims)> {
        self.issue_with(session_id, role, instance, account, now, LegTerms::default())
    }

    /// [`TokenSigner::issue`] with the session's [`LegTerms`].
    pub fn issue_with(
        &self,
        session_id: &str,
        role: Role,
        instance: &str,
        account: &str,
        now: u64,
        terms: LegTerms,
    ) -> anyhow::Result<(String, Claims)> {
        self.issue_in_run(&self.run, session_id, role, instance, account, now, &terms)
    }

    /// [`TokenSigner::issue_with`] for the data plane of another node of a fleet, whose
    /// current run is `run` (its verifier accepts only that run's tokens).
    #[allow(clippy::too_many_arguments)]
    pub fn issue_in_run(
        &self,
        run: &str,
        session_id: &str,
        role: Role,
        instance: &str,
        account: &str,
        now: u64,
        terms: &LegTerms,
    ) -> anyhow::Result<(String, Claims)> {
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut jti)
            .map_err(|_| anyhow::anyhow!("rng failed"))?;
        let claims = Claims {
            sub: session_id.to_owned(),
            role,
            instance: instance.to_owned(),
            account: account.to_owned(),
            iat: now,
            exp: now + TOKEN_LIFETIME_SECS,
            jti: hex::encode(jti),
            run: run.to_owned(),
            res: terms.resume,
            two_way: terms.two_way,
            idle: terms.idle_timeout_s,
            maxd: terms.max_duration_s,
            rec: terms.recording.as_ref().map(|(m, _)| *m),
            prn: terms.recording.as_ref().map(|(_, p)| p.clone()),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        // What `jsonwebtoken::encode` builds (base64url of the JSON header and claims, the
        // Ed25519 signature of both joined by a dot), signed with the key pair parsed once.
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut token = format!(
            "{}.{}",
            b64.encode(serde_json::to_vec(&header)?),
            b64.encode(serde_json::to_vec(&claims)?)
        );
        let sig = self.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&b64.encode(sig.as_ref()));
        Ok((token, claims))
    }
}

/// Public keys by key id; verifies tokens with the algorithm pinned to EdDSA.
#[derive(Clone, Default)]
pub struct TokenVerifier {
    keys: HashMap<String, DecodingKey>,
    /// When set, tokens of another run are refused ([`TokenError::PreviousRun`]).
    run: Option<String>,
}

impl TokenVerifier {
    /// A verifier that trusts one signer's key.
    pub fn for_signer(signer: &TokenSigner) -> Self {
        let mut v = TokenVerifier::default();
        v.add_key(signer.kid(), signer.public_key());
        v.only_run(signer.run());
        v
    }

    /// Accepts only tokens issued in `run` (the signer's of this process).
    pub fn only_run(&mut self, run: &str) {
        self.run = Some(run.to_owned());
    }

    /// Accepts tokens of any run: for tools and tests that check what a token says, never for
    /// admission.
    pub fn any_run(mut self) -> Self {
        self.run = None;
        self
    }

    /// Trusts a raw Ed25519 public key under `kid` (rotation: old and new side by side).
    pub fn add_key(&mut self, kid: &str, public_key: &[u8]) {
        self.keys.insert(kid.to_owned(), DecodingKey::from_ed_der(public_key));
    }

    /// Verifies signature and expiry at `now` (seconds since the Unix epoch), and that the
    /// token is for `session_id` and `role`.
    pub fn verify(
        &self,
        token: &str,
        session_id: &str,
        role: Role,
        now: u64,
    ) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::WrongAlgorithm);
        }
        let key =
            header.kid.as_deref().and_then(|k| self.keys.get(k)).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        // Expiry is checked below against the caller's clock, with no leeway.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
            jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
            _ => TokenError::Malformed,
        })?;
        let claims = data.claims;
        if claims.is_expired(now) {
            return Err(TokenError::Expired);
        }
        if claims.sub != session_id || claims.role != role {
            return Err(TokenError::WrongSubject);
        }
        if self.run.as_ref().is_some_and(|r| *r != claims.run) {
            return Err(TokenError::PreviousRun);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn issued_token_is_what_jsonwebtoken_encodes() {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let signer = TokenSigner::from_pkcs8("k1", pkcs8.as_ref()).unwrap();
        let (token, claims) = signer.issue("s-1", Role::Client, "i-1", "a-1", 1000).unwrap();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        // Ed25519 signatures are deterministic: the same key and message give the same bytes.
        let key = jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref());
        assert_eq!(token, jsonwebtoken::encode(&header, &claims, &key).unwrap());
    }

    #[test]
    fn issued_token_verifies_for_its_session_and_role_only() {
        let (signer, _) = TokenSigner::generate("k1").unwrap();
        let v = TokenVerifier::for_signer(&signer);
        let (t, c) = signer.issue("s-1", Role::Client, "i-1", "a-1", NOW).unwrap();
        assert_eq!(v.verify(&t, "s-1", Role::Client, NOW + 599).unwrap(), c);
        assert_eq!(v.verify(&t, "s-1", Role::Client, NOW + 600), Err(TokenError::Expired));
        assert_eq!(v.verify(&t, "s-1", Role::Agent, NOW), Err(TokenError::WrongSubject));
        assert_eq!(v.verify(&t, "s-2", Role::Client, NOW), Err(TokenError::WrongSubject));
    }

    #[test]
    fn tokens_of_another_run_are_refused() {
        // The same key loaded again (a restart) is another run: the old tokens still verify
        // their signature but are refused as issued before the restart.
        let (first, pkcs8) = TokenSigner::generate("k1").unwrap();
        let second = TokenSigner::from_pkcs8("k1", &pkcs8).unwrap();
        assert_ne!(first.run(), second.run());
        assert_eq!(second.run().len(), 16);
        let v = TokenVerifier::for_signer(&second);
        let (old, _) = first.issue("s-1", Role::Client, "i", "a", NOW).unwrap();
        assert_eq!(v.verify(&old, "s-1", Role::Client, NOW), Err(TokenError::PreviousRun));
        let (new, c) = second.issue("s-1", Role::Client, "i", "a", NOW).unwrap();
        assert_eq!(v.verify(&new, "s-1", Role::Client, NOW).unwrap(), c);
        assert_eq!(c.run, second.run());
        // Expiry and subject are still checked first.
        assert_eq!(v.verify(&old, "s-1", Role::Client, NOW + 600), Err(TokenError::Expired));
    }

    #[test]
    fn other_key_tampering_and_garbage_are_refused() {
        let (a, _) = TokenSigner::generate("k1").unwrap();
        let (b, _) = TokenSigner::generate("k1").unwrap();
        let v = TokenVerifier::for_signer(&a);
        let (t, _) = b.issue("s-1", Role::Client, "i", "a", NOW).unwrap();
        assert_eq!(v.verify(&t, "s-1", Role::Client, NOW), Err(TokenError::BadSignature));
        let (t, _) = a.issue("s-1", Role::Client, "i", "a", NOW).unwrap();
        let mut parts: Vec<&str> = t.split('.').collect();
        let (ot, _) = a.issue("s-9", Role::Client, "i", "a", NOW).unwrap();
        let other_claims = ot.split('.').nth(1).unwrap().to_owned();
        parts[1] = &other_claims;
        assert_eq!(
            v.verify(&parts.join("."), "s-9", Role::Client, NOW),
            Err(TokenError::BadSignature)
        );
        assert_eq!(v.verify("garbage", "s-1", Role::Client, NOW), Err(TokenError::Malformed));
        assert_eq!(v.verify("", "s-1", Role::Client, NOW), Err(TokenError::Malformed));
    }

    #[test]
    fn alg_none_and_hs256_are_refused() {
        use base64::Engine;
        let (a, _) = TokenSigner::generate("k1").unwrap();
        let v = TokenVerifier::for_signer(&a);
        let (t, _) = a.issue("s-1", Role::Client, "i", "a", NOW).unwrap();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for alg in ["none", "HS256", "RS256"] {
            let header = b64.encode(format!(r#"{{"alg":"{alg}","kid":"k1","typ":"JWT"}}"#));
            let mut parts: Vec<&str> = t.split('.').collect();
            parts[0] = &header;
            let forged = parts.join(".");
            let got = v.verify(&forged, "s-1", Role::Client, NOW).unwrap_err();
            assert!(
                matches!(got, TokenError::WrongAlgorithm | TokenError::Malformed),
                "{alg}: {got:?}"
            );
        }
    }
}
