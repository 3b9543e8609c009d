//! TLS between motorpool's processes (CLI, node agents, drivers, executors).
//!
//! This module owns the project's certificate authority, the node
//! certificates it issues, the rule of when a connection must use TLS, and
//! turning those into tonic client endpoints and server configs.
//!
//! - **No state file.** The project CA's Ed25519 key is derived from the
//!   project secret (HKDF-SHA256 with a fixed label), so whoever holds the
//!   secret (the CLI, CI with `MOTORPOOL_PROJECT_SECRET`) computes the same CA
//!   and the same certificate, byte for byte ([`ProjectCa::derive`]).
//! - **Nodes get a certificate at launch.** IPs are unknown before launch, so
//!   every node certificate names the fixed server name [`SERVER_NAME`]; the
//!   CLI issues it ([`ProjectCa::node_tls`]) and hands it to the node in its
//!   agent config (private to the node, like the agent credential). Clients
//!   verify servers against the project CA with that name, whatever address
//!   they dialled. Knowing the CA certificate is not enough to serve: that
//!   takes the node key, which only the secret's holders and the nodes have.
//! - **When TLS is used** ([`required`]): always for a non-loopback address;
//!   on loopback only when forced, by `MOTORPOOL_TLS=always` in the
//!   environment or `always` in the node's TLS settings (tests use this to
//!   exercise TLS on 127.0.0.1). Servers refuse to listen beyond loopback
//!   without TLS; clients refuse to talk plaintext beyond loopback.
//! - The bearer credential ([`crate::auth`]) still authenticates every call;
//!   TLS adds confidentiality and server authenticity. Keys and secrets never
//!   print: [`NodeTls`], [`ProjectCa`] and [`Trust`] redact them in `Debug`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519,
};
use ring::hkdf;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::auth::Credential;

/// The name every node certificate carries and every client checks.
pub const SERVER_NAME: &str = "motorpool-node";

/// `MOTORPOOL_TLS=always` forces TLS on loopback too; `auto` (or unset) is the default.
pub const MODE_ENV: &str = "MOTORPOOL_TLS";

/// The HKDF salt: changing it rotates every derived key.
const KDF_SALT: &[u8] = b"motorpool-tls-v1";
const CA_LABEL: &[u8] = b"motorpool tls: project ca key";
const NODE_LABEL: &[u8] = b"motorpool tls: node key";

/// Errors of this module; none carries key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{MODE_ENV} must be `always` or `auto`, not {0:?}")]
    BadMode(String),
    #[error("cannot build the project's certificates: {0}")]
    Certificate(String),
    #[error(
        "the connection to {address} must use TLS (it is not loopback, or {MODE_ENV}=always), but no project CA is at hand to verify the server"
    )]
    NoTrust { address: String },
    #[error("{MODE_ENV}=always, but the server on {address} has no certificate to serve TLS with")]
    NoCertificate { address: SocketAddr },
    #[error(
        "refusing to listen on {address} without TLS: only loopback listeners may be plaintext (give the node its TLS settings)"
    )]
    PlaintextBeyondLoopback { address: SocketAddr },
    #[error("not an address: {0:?}")]
    BadAddress(String),
    #[error("invalid TLS configuration: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Whether this process forces TLS on loopback (`MOTORPOOL_TLS=always`).
pub fn forced_by_env() -> Result<bool, TlsError> {
    match std::env::var(MODE_ENV) {
        Ok(v) => match v.trim() {
            "always" => Ok(true),
            "" | "auto" => Ok(false),
            _ => Err(TlsError::BadMode(v)),
        },
        Err(_) => Ok(false),
    }
}

/// Whether a connection to (or a listener on) `ip` must use TLS.
pub fn required(ip: Option<IpAddr>, always: bool) -> Result<bool, TlsError> {
    let loopback = ip.is_some_and(|ip| ip.is_loopback());
    Ok(!loopback || always || forced_by_env()?)
}

/// The IP of `host:port` (`127.0.0.1:80`, `[::1]:80`, `localhost:80`); None for other names.
fn host_ip(address: &str) -> Option<IpAddr> {
    if let Ok(a) = address.parse::<SocketAddr>() {
        return Some(a.ip());
    }
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    match host {
        "localhost" => Some(IpAddr::from([127, 0, 0, 1])),
        h => h.trim_matches(['[', ']']).parse().ok(),
    }
}

/// HKDF-SHA256 of the project secret with `label`: 32 bytes.
fn derive_seed(secret: &Credential, label: &[u8]) -> Result<[u8; 32], TlsError> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, KDF_SALT).extract(secret.expose().as_bytes());
    let mut seed = [0u8; 32];
    prk.expand(&[label], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut seed))
        .map_err(|_| TlsError::Certificate("key derivation failed".into()))?;
    Ok(seed)
}

/// An Ed25519 key pair from a 32-byte seed (PKCS#8 v1, RFC 8410).
fn ed25519_key(seed: &[u8; 32]) -> Result<KeyPair, TlsError> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = Vec::with_capacity(48);
    der.extend_from_slice(&PREFIX);
    der.extend_from_slice(seed);
    let key = KeyPair::try_from(der.as_slice())
        .map_err(|e| TlsError::Certificate(format!("bad derived key: {e}")))?;
    if !key.is_compatible(&PKCS_ED25519) {
        return Err(TlsError::Certificate(
            "the derived key is not Ed25519".into(),
        ));
    }
    Ok(key)
}

/// Fixed validity, so that the same secret yields the same certificates.
fn fixed_validity(params: &mut CertificateParams) {
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(4096, 1, 1);
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "motorpool");
    name.push(DnType::CommonName, "motorpool project CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    fixed_validity(&mut params);
    params
}

/// The project's certificate authority, derived from the project secret.
pub struct ProjectCa {
    key: KeyPair,
    cert_pem: String,
    cert_der: Vec<u8>,
    node_seed: [u8; 32],
}

impl fmt::Debug for ProjectCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProjectCa(<key redacted>)")
    }
}

impl ProjectCa {
    /// The CA of the project whose secret is `secret`: the same secret gives the same CA.
    pub fn derive(secret: &Credential) -> Result<ProjectCa, TlsError> {
        let key = ed25519_key(&derive_seed(secret, CA_LABEL)?)?;
        let cert = ca_params()
            .self_signed(&key)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(ProjectCa {
            key,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            node_seed: derive_seed(secret, NODE_LABEL)?,
        })
    }

    /// The CA certificate (public), PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (public), DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// What a client of this project's servers trusts.
    pub fn trust(&self) -> Trust {
        Trust::from_pem(self.cert_pem.clone())
    }

    /// A node's TLS settings: its certificate for [`SERVER_NAME`], signed by this CA, and its key.
    pub fn node_tls(&self, always: bool) -> Result<NodeTls, TlsError> {
        let node_key = ed25519_key(&self.node_seed)?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, SERVER_NAME);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        fixed_validity(&mut params);
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params
            .signed_by(&node_key, &issuer)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(NodeTls {
            ca: self.cert_pem.clone(),
            cert: cert.pem(),
            key: SecretPem(node_key.serialize_pem()),
            always,
        })
    }
}

/// A private key in PEM; never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretPem(String);

impl fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl SecretPem {
    /// The raw PEM, to hand to the TLS library; never print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A node's TLS settings, as its agent config carries them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTls {
    /// The project CA certificate (PEM): what the node's own clients trust.
    pub ca: String,
    /// The node's certificate (PEM) for [`SERVER_NAME`].
    pub cert: String,
    /// The node's private key (PEM).
    pub key: SecretPem,
    /// Use TLS on loopback too (what `MOTORPOOL_TLS=always` was at launch).
    #[serde(default)]
    pub always: bool,
}

impl NodeTls {
    /// What this node's servers (agent, driver, executor) present.
    pub fn server(&self) -> ServerTls {
        ServerTls {
            identity: Identity::from_pem(&self.cert, self.key.expose()),
            always: self.always,
        }
    }

    /// What this node's clients (executor to driver, to peers, to other agents) trust.
    pub fn trust(&self) -> Trust {
        Trust::from_pem(self.ca.clone()).always(self.always)
    }
}

/// A server's side of TLS: its identity, and whether loopback is TLS too.
#[derive(Clone)]
pub struct ServerTls {
    identity: Identity,
    always: bool,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("identity", &"<redacted>")
            .field("always", &self.always)
            .finish()
    }
}

/// How a server listening on `listen` must serve: `Some` TLS config, or
/// `None` for plaintext (loopback only). Errs for plaintext beyond loopback.
pub fn server_config(
    listen: SocketAddr,
    tls: Option<&ServerTls>,
) -> Result<Option<ServerTlsConfig>, TlsError> {
    let always = tls.is_some_and(|t| t.always);
    if !required(Some(listen.ip()), always)? {
        return Ok(None);
    }
    match tls {
        Some(t) => Ok(Some(ServerTlsConfig::new().identity(t.identity.clone()))),
        None => {
            if listen.ip().is_loopback() {
                Err(TlsError::NoCertificate { address: listen })
            } else {
                Err(TlsError::PlaintextBeyondLoopback { address: listen })
            }
        }
    }
}

/// What a client trusts: the project CA certificate, and whether to use TLS on loopback.
#[derive(Clone)]
pub struct Trust {
    source: Arc<TrustSource>,
    always: bool,
}

enum TrustSource {
    /// The CA certificate.
    Pem(String),
    /// Derived from the project secret when first needed.
    Secret {
        secret: Credential,
        pem: OnceLock<Result<String, String>>,
    },
}

impl fmt::Debug for Trust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trust")
            .field("ca", &"project CA")
            .field("always", &self.always)
            .finish()
    }
}

impl Trust {
    /// Trust the CA certificate `pem`.
    pub fn from_pem(pem: String) -> Trust {
        Trust {
            source: Arc::new(TrustSource::Pem(pem)),
            always: false,
        }
    }

    /// Trust the CA derived from `project_secret` (computed on first use).
    pub fn from_secret(project_secret: &Credential) -> Trust {
        Trust {
            source: Arc::new(TrustSource::Secret {
                secret: Credential::new(project_secret.expose()),
                pem: OnceLock::new(),
            }),
            always: false,
        }
    }

    /// Also use TLS on loopback.
    pub fn always(mut self, always: bool) -> Trust {
        self.always = always;
        self
    }

    fn ca_pem(&self) -> Result<String, TlsError> {
        match &*self.source {
            TrustSource::Pem(p) => Ok(p.clone()),
            TrustSource::Secret { secret, pem } => pem
                .get_or_init(|| {
                    ProjectCa::derive(secret)
                        .map(|ca| ca.cert_pem)
                        .map_err(|e| e.to_string())
                })
                .clone()
                .map_err(TlsError::Certificate),
        }
    }

    /// The tonic client config: the project CA, server name [`SERVER_NAME`].
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca_pem()?))
            .domain_name(SERVER_NAME))
    }
}

/// An error and its sources, `: `-joined (tonic's transport errors say
/// little more than "transport error" at the top).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// An endpoint for `address` (`host:port`, with or without `http://`):
/// TLS with `trust` where [`required`], plaintext on loopback otherwise.
pub fn endpoint(address: &str, trust: Option<&Trust>) -> Result<Endpoint, TlsError> {
    let bare = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address);
    let always = trust.is_some_and(|t| t.always);
    if !required(host_ip(bare), always)? {
        return Endpoint::from_shared(format!("http://{bare}"))
            .map_err(|_| TlsError::BadAddress(address.to_string()));
    }
    let Some(trust) = trust else {
        return Err(TlsError::NoTrust {
            address: bare.to_string(),
        });
    };
    let endpoint = Endpoint::from_shared(format!("https://{bare}"))
        .map_err(|_| TlsError::BadAddress(address.to_string()))?;
    Ok(endpoint.tls_config(trust.client_config()?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_secret_derives_the_same_ca_and_another_secret_another() {
        let a = ProjectCa::derive(&Credential::new("secret-a")).expect("ca");
        let again = ProjectCa::derive(&Credential::new("secret-a")).expect("ca again");
        let b = ProjectCa::derive(&Credential::new("secret-b")).expect("other ca");
        assert_eq!(a.cert_der(), again.cert_der());
        assert_eq!(a.cert_pem(), again.cert_pem());
        assert_ne!(a.cert_der(), b.cert_der());
        // Node certificates too: user data is the same on every apply.
        assert_eq!(
            a.node_tls(false).expect("node"),
            again.node_tls(false).expect("node again")
        );
        assert_ne!(
            a.node_tls(false).expect("node").key,
            b.node_tls(false).expect("other node").key
        );
        // A secret-derived trust is the same CA.
        let lazy = Trust::from_secret(&Credential::new("secret-a"));
        assert_eq!(lazy.ca_pem().expect("pem"), a.cert_pem());
    }

    #[test]
    fn keys_and_secrets_never_print() {
        let ca = ProjectCa::derive(&Credential::new("s3cr3t")).expect("ca");
        let node = ca.node_tls(true).expect("node");
        let key_body: String = node
            .key
            .expose()
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        assert!(!key_body.is_empty());
        let printed = format!(
            "{ca:?} {node:?} {:?} {:?} {:?}",
            node.server(),
            node.trust(),
            Trust::from_secret(&Credential::new("s3cr3t"))
        );
        assert!(!printed.contains(&key_body), "{printed}");
        assert!(!printed.contains("s3cr3t"), "{printed}");
        assert!(!printed.contains("PRIVATE KEY"), "{printed}");
    }

    #[test]
    fn tls_is_required_beyond_loopback_and_optional_on_it() {
        let lo = Some(IpAddr::from([127, 0, 0, 1]));
        // The test environment does not set MOTORPOOL_TLS.
        if std::env::var(MODE_ENV).is_err() {
            assert!(!required(lo, false).expect("rule"));
        }
        assert!(required(lo, true).expect("rule"));
        assert!(required(Some(IpAddr::from([10, 0, 0, 1])), false).expect("rule"));
        assert!(required(None, false).expect("rule"), "a DNS name is remote");
        assert_eq!(
            host_ip("[::1]:80"),
            Some(IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]))
        );
        assert_eq!(host_ip("localhost:80"), lo);
        assert_eq!(host_ip("node-1.internal:80"), None);
        // No trust, not loopback: refused instead of plaintext.
        assert!(matches!(
            endpoint("10.0.0.1:7000", None),
            Err(TlsError::NoTrust { .. })
        ));
        // A plaintext server beyond loopback is refused.
        assert!(matches!(
            server_config("10.0.0.1:7000".parse().expect("addr"), None),
            Err(TlsError::PlaintextBeyondLoopback { .. })
        ));
    }
}
