//! Credentials between motorpool's processes: the CLI, node agents, the
//! driver and the executors.
//!
//! Every gRPC call carries `authorization: Bearer <credential>`; servers wrap
//! their services in [`require`], which refuses any call without the exact
//! credential. A cluster's credential is derived from the project secret and
//! the cluster's name ([`cluster_credential`]), so no state file holds it and
//! every party that knows the secret can compute it. This module owns the
//! derivation, the header and the check; it never logs or prints a credential
//! ([`Credential`]'s `Debug` and `Display` are redacted).
//!
//! A credential also carries what its holder trusts ([`crate::tls::Trust`]):
//! a credential derived from the project secret trusts the project CA, so
//! every connection made with it verifies the server where TLS is used.

use std::fmt;

use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::tls::Trust;

/// The metadata key that carries the credential.
pub const HEADER: &str = "authorization";

/// A shared secret, and the project CA its holder trusts (if known);
/// prints as `Credential(<redacted>)`. Equal when the secrets are equal.
#[derive(Clone)]
pub struct Credential(String, Option<Trust>);

impl PartialEq for Credential {
    fn eq(&self, other: &Credential) -> bool {
        constant_time_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for Credential {}

impl Credential {
    /// Wrap a credential received out of band (an environment variable, a file).
    pub fn new(secret: impl Into<String>) -> Credential {
        Credential(secret.into(), None)
    }

    /// The raw secret, to hand to a child process; never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The same credential, trusting `trust` to verify the servers it talks to over TLS.
    pub fn with_trust(mut self, trust: Trust) -> Credential {
        self.1 = Some(trust);
        self
    }

    /// What the holder trusts to verify servers over TLS, if known.
    pub fn trust(&self) -> Option<&Trust> {
        self.1.as_ref()
    }

    /// Add this credential to an outgoing request.
    pub fn attach<T>(&self, mut request: Request<T>) -> Result<Request<T>, Status> {
        let value: MetadataValue<_> = format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| Status::internal("the credential is not valid header text"))?;
        request.metadata_mut().insert(HEADER, value);
        Ok(request)
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl fmt::Display for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Derive a purpose-bound credential from the project secret:
/// `hex(sha256(secret | purpose))`. Different purposes never share a credential.
/// It trusts the project CA (derived from the same secret), or what the
/// project secret was given to trust.
pub fn derive(project_secret: &Credential, purpose: &str) -> Credential {
    let mut h = Sha256::new();
    h.update(project_secret.0.as_bytes());
    h.update([0]);
    h.update(purpose.as_bytes());
    let digest = h.finalize();
    let trust = project_secret
        .1
        .clone()
        .unwrap_or_else(|| Trust::from_secret(project_secret));
    Credential(
        digest.iter().map(|b| format!("{b:02x}")).collect(),
        Some(trust),
    )
}

/// A key that authenticates files motorpool writes and reads back (saved
/// plans, the apply journal): HMAC-SHA256 under a key derived from the
/// project secret for one purpose, so a file made for one purpose (or one
/// project) never passes as another. Prints as `MacKey(<redacted>)`.
#[derive(Clone)]
pub struct MacKey(ring::hmac::Key);

impl fmt::Debug for MacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MacKey(<redacted>)")
    }
}

/// The length of [`MacKey::sign`]'s text: HMAC-SHA256 in hex.
pub const MAC_HEX_LEN: usize = 64;

impl MacKey {
    /// The key for `purpose` (`plan-file/<project>`, `journal/<project>`).
    pub fn derive(project_secret: &Credential, purpose: &str) -> MacKey {
        let key = derive(project_secret, &format!("mac/{purpose}"));
        MacKey(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            key.0.as_bytes(),
        ))
    }

    /// The MAC of `parts` (each length-prefixed, so parts never run
    /// together), in lowercase hex.
    pub fn sign(&self, parts: &[&[u8]]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.0);
        for part in parts {
            ctx.update(&(part.len() as u64).to_le_bytes());
            ctx.update(part);
        }
        ctx.sign()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `mac` (hex, as [`MacKey::sign`] writes it) is the MAC of
    /// `parts`; compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], mac: &str) -> bool {
        constant_time_eq(self.sign(parts).as_bytes(), mac.as_bytes())
    }
}

/// The credential of one cluster's agents, driver and executors.
pub fn cluster_credential(project_secret: &Credential, project: &str, cluster: &str) -> Credential {
    derive(project_secret, &format!("cluster/{project}/{cluster}"))
}

/// Equal in time that does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An interceptor that lets through only calls carrying one of the accepted credentials.
#[derive(Clone)]
pub struct RequireCredential {
    accepted: Vec<Credential>,
}

/// Refuse every call that does not carry `credential` (or one of `also`).
pub fn require(credential: Credential) -> RequireCredential {
    RequireCredential {
        accepted: vec![credential],
    }
}

impl RequireCredential {
    /// Also accept another credential (e.g. a node agent accepts its pool's and its cluster's).
    pub fn or(mut self, other: Credential) -> RequireCredential {
        self.accepted.push(other);
        self
    }
}

impl Interceptor for RequireCredential {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let presented = request
            .metadata()
            .get(HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(p)
                if self
                    .accepted
                    .iter()
                    .any(|c| constant_time_eq(p.as_bytes(), c.0.as_bytes())) =>
            {
                Ok(request)
            }
            Some(_) => Err(Status::unauthenticated("wrong credential")),
            None => Err(Status::unauthenticated(
                "this call needs the cluster's credential",
            )),
        }
    }
}

/// An interceptor for clients: adds the credential to every call.
#[derive(Clone)]
pub struct AttachCredential(pub Credential);

impl Interceptor for AttachCredential {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.0.attach(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_print() {
        let c = Credential::new("s3cr3t");
        assert!(!format!("{c:?} {c}").contains("s3cr3t"));
    }

    #[test]
    fn derivation_is_stable_and_purpose_bound() {
        let secret = Credential::new("project-secret");
        let a = cluster_credential(&secret, "p", "etl");
        assert_eq!(a, cluster_credential(&secret, "p", "etl"));
        assert_ne!(a, cluster_credential(&secret, "p", "other"));
        assert_ne!(
            a,
            cluster_credential(&Credential::new("other-secret"), "p", "etl")
        );
        assert_eq!(a.expose().len(), 64);
    }

    #[test]
    fn macs_are_bound_to_the_secret_the_purpose_and_every_byte() {
        let secret = Credential::new("project-secret");
        let key = MacKey::derive(&secret, "plan-file/p");
        let mac = key.sign(&[b"body"]);
        assert_eq!(mac.len(), MAC_HEX_LEN);
        assert!(key.verify(&[b"body"], &mac));
        assert!(!key.verify(&[b"bodY"], &mac));
        assert!(!key.verify(&[b"bo", b"dy"], &mac));
        assert!(!MacKey::derive(&secret, "journal/p").verify(&[b"body"], &mac));
        assert!(!MacKey::derive(&Credential::new("other"), "plan-file/p").verify(&[b"body"], &mac));
        assert!(!format!("{key:?}").contains("secret"));
    }

    #[test]
    fn the_interceptor_refuses_missing_and_wrong_credentials() {
        let good = Credential::new("good");
        let mut check = require(good.clone()).or(Credential::new("also-good"));
        assert!(check.call(Request::new(())).is_err());
        let wrong = Credential::new("bad")
            .attach(Request::new(()))
            .expect("attach");
        assert_eq!(
            check.call(wrong).expect_err("refused").code(),
            tonic::Code::Unauthenticated
        );
        let right = good.attach(Request::new(())).expect("attach");
        assert!(check.call(right).is_ok());
        let other = Credential::new("also-good")
            .attach(Request::new(()))
            .expect("attach");
        assert!(check.call(other).is_ok());
    }
}
