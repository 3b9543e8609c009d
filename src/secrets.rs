//! Secret env values: a cluster's `env` entries marked secret in the spec
//! (`{ secret: true, from_env: NAME }`, `{ from_file: PATH }`, `{ secret:
//! true, value: TEXT }`) or named like a secret (`*_PASSWORD`, `*_TOKEN`,
//! ...: [`looks_secret`]).
//!
//! This module owns the rule that no output holds a secret value: a plan
//! (its text, JSON, markdown and saved file) carries for each secret only
//! where apply reads it and a digest of the value keyed with the project
//! secret ([`SecretKey`]), so a changed value still changes the cluster's
//! boot hash and shows as a change. A value written in the spec travels in
//! the plan sealed (ChaCha20-Poly1305 under a key derived from the project
//! secret). Apply reads every value again ([`reveal`]) and refuses one whose
//! digest moved since the plan; only what goes to the nodes (private agent
//! configs, user data, boot documents) holds the values. Errors name the
//! variable and where its value comes from, never the value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ring::aead;
use thiserror::Error;

use crate::auth::{Credential, MacKey};
use crate::spec::{EnvValue, SecretValue};
use crate::words::{BootSpec, SECRET_SHOWN, SecretEnv};

/// Name endings that mark an inline env value secret (`DB_PASSWORD`, `API_KEY`).
const SECRET_ENDINGS: &[&str] = &[
    "PASSWORD",
    "PASSWD",
    "PASS",
    "PWD",
    "SECRET",
    "TOKEN",
    "KEY",
    "APIKEY",
    "CREDENTIAL",
    "CREDENTIALS",
    "AUTH",
];

/// Whether an env variable's name says its value is a secret
/// (`DB_PASSWORD`, `GITHUB_TOKEN`, `AWS_SECRET_ACCESS_KEY`, `secret`...):
/// its value is then shown as `(secret)` even when written inline.
pub fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    let word = upper.split(['_', '-', '.']).any(|w| {
        matches!(
            w,
            "PASSWORD" | "PASSWD" | "SECRET" | "TOKEN" | "APIKEY" | "CREDENTIAL" | "CREDENTIALS"
        )
    });
    word || SECRET_ENDINGS
        .iter()
        .any(|w| upper.ends_with(&format!("_{w}")))
}

#[derive(Debug, Error)]
pub enum SecretError {
    #[error("env `{name}` takes its value from the environment variable `{var}`, which is not set")]
    MissingEnv { name: String, var: String },
    #[error("env `{name}` takes its value from the file {path}: {reason}")]
    File {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("env `{name}`: its value holds a NUL byte, which no process environment can carry")]
    Nul { name: String },
    #[error(
        "env `{name}`: the secret value ({source_text}) changed since the plan was made; \
         nothing was changed: make the plan again"
    )]
    Changed { name: String, source_text: String },
    #[error(
        "env `{name}`: the sealed value in the plan cannot be opened with this project's secret; \
         make the plan again"
    )]
    Sealed { name: String },
    #[error("env `{name}`: a secret needs exactly one of `from_env`, `from_file` or `value`")]
    Shape { name: String },
}

/// The keys a project's secret values are digested and sealed with.
pub struct SecretKey {
    digest: MacKey,
    seal: aead::LessSafeKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    pub fn derive(project_secret: &Credential, project: &str) -> SecretKey {
        let digest = MacKey::derive(project_secret, &format!("secret-digest/{project}"));
        let seal = crate::auth::derive(project_secret, &format!("secret-seal/{project}"));
        let bytes = ring::digest::digest(&ring::digest::SHA256, seal.expose().as_bytes());
        // A 32-byte key is what ChaCha20-Poly1305 takes: this cannot fail.
        let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, bytes.as_ref())
            .unwrap_or_else(|_| unreachable!("a SHA-256 digest is a ChaCha20 key"));
        SecretKey {
            digest,
            seal: aead::LessSafeKey::new(unbound),
        }
    }

    /// `hmac-sha256:<hex>` of `name`'s value.
    pub fn digest(&self, name: &str, value: &str) -> String {
        let mac = self
            .digest
            .sign(&[b"secret env", name.as_bytes(), value.as_bytes()]);
        format!("hmac-sha256:{mac}")
    }

    fn seal(&self, name: &str, value: &str) -> String {
        use ring::rand::SecureRandom as _;
        let mut nonce = [0u8; aead::NONCE_LEN];
        // The system's random source; should it fail, a clock-and-counter
        // nonce is still unique to this key, which is all a nonce must be.
        if ring::rand::SystemRandom::new().fill(&mut nonce).is_err() {
            static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nonce[..8].copy_from_slice(&now.to_le_bytes());
            let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            nonce[8..].copy_from_slice(&n.to_le_bytes());
        }
        let mut data = value.as_bytes().to_vec();
        // Sealing only fails for inputs over 256 GiB.
        let _ = self.seal.seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(name.as_bytes()),
            &mut data,
        );
        nonce
            .iter()
            .chain(&data)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn unseal(&self, name: &str, sealed: &str) -> Result<String, SecretError> {
        let bad = || SecretError::Sealed {
            name: name.to_string(),
        };
        if !sealed.len().is_multiple_of(2) || !sealed.is_ascii() {
            return Err(bad());
        }
        let bytes: Vec<u8> = (0..sealed.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&sealed[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        if bytes.len() < aead::NONCE_LEN {
            return Err(bad());
        }
        let (nonce, rest) = bytes.split_at(aead::NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
        let mut data = rest.to_vec();
        let plain = self
            .seal
            .open_in_place(nonce, aead::Aad::from(name.as_bytes()), &mut data)
            .map_err(|_| bad())?;
        String::from_utf8(plain.to_vec()).map_err(|_| bad())
    }
}

/// Where a secret's value comes from, for messages (never the value).
fn source_text(secret: &SecretEnv) -> String {
    match (&secret.from_env, &secret.from_file) {
        (Some(var), _) => format!("from the environment variable `{var}`"),
        (_, Some(path)) => format!("from the file {path}"),
        _ => "written in the spec".into(),
    }
}

fn from_env(name: &str, var: &str) -> Result<String, SecretError> {
    let value = std::env::var(var).map_err(|_| SecretError::MissingEnv {
        name: name.to_string(),
        var: var.to_string(),
    })?;
    no_nul(name, value)
}

fn from_file(name: &str, path: &Path) -> Result<String, SecretError> {
    let error = |reason: String| SecretError::File {
        name: name.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let mut text = String::from_utf8(bytes).map_err(|_| error("it is not UTF-8 text".into()))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    no_nul(name, text)
}

fn no_nul(name: &str, value: String) -> Result<String, SecretError> {
    if value.contains('\0') {
        return Err(SecretError::Nul {
            name: name.to_string(),
        });
    }
    Ok(value)
}

/// A `from_file` path of the spec, resolved below the project: absolute,
/// normalised, and (through symlinks) still inside it.
pub fn secret_file(name: &str, base_dir: &Path, path: &str) -> Result<PathBuf, SecretError> {
    let error = |reason: String| SecretError::File {
        name: name.to_string(),
        path: PathBuf::from(path),
        reason,
    };
    let relative = crate::confine::project_path(path).map_err(|e| error(e.to_string()))?;
    crate::confine::resolved_inside(base_dir, &relative).map_err(|e| error(e.to_string()))?;
    Ok(crate::confine::resolve_below(base_dir, &relative))
}

/// A cluster's env as a [`BootSpec`] holds it: the plain values, and the secrets.
pub type BootEnv = (BTreeMap<String, String>, BTreeMap<String, SecretEnv>);

/// Plan side: a cluster's env split into its plain values and its secrets
/// (each read now for its digest; one written in the spec sealed).
pub fn boot_env(
    env: &BTreeMap<String, EnvValue>,
    base_dir: &Path,
    key: &SecretKey,
) -> Result<BootEnv, SecretError> {
    let mut plain = BTreeMap::new();
    let mut secrets = BTreeMap::new();
    for (name, value) in env {
        let shape = || SecretError::Shape { name: name.clone() };
        let (secret, value) = match value {
            EnvValue::Text(text) if !looks_secret(name) => {
                plain.insert(name.clone(), text.clone());
                continue;
            }
            EnvValue::Secret(SecretValue {
                secret: false,
                value: Some(text),
                from_env: None,
                from_file: None,
            }) if !looks_secret(name) => {
                plain.insert(name.clone(), text.clone());
                continue;
            }
            EnvValue::Text(text) => (
                SecretEnv {
                    sealed: Some(key.seal(name, text)),
                    ..SecretEnv::default()
                },
                text.clone(),
            ),
            EnvValue::Secret(s) => match (&s.from_env, &s.from_file, &s.value) {
                (Some(var), None, None) => (
                    SecretEnv {
                        from_env: Some(var.clone()),
                        ..SecretEnv::default()
                    },
                    from_env(name, var)?,
                ),
                (None, Some(path), None) => {
                    let file = secret_file(name, base_dir, path)?;
                    let value = from_file(name, &file)?;
                    (
                        SecretEnv {
                            from_file: Some(file.display().to_string()),
                            ..SecretEnv::default()
                        },
                        value,
                    )
                }
                (None, None, Some(text)) => (
                    SecretEnv {
                        sealed: Some(key.seal(name, text)),
                        ..SecretEnv::default()
                    },
                    text.clone(),
                ),
                _ => return Err(shape()),
            },
        };
        secrets.insert(
            name.clone(),
            SecretEnv {
                value: SECRET_SHOWN.to_string(),
                digest: key.digest(name, &value),
                ..secret
            },
        );
    }
    Ok((plain, secrets))
}

/// Apply side: `spec` with every secret value read again (or unsealed) and
/// checked against the digest the plan holds, for the nodes.
pub fn reveal(spec: &BootSpec, key: &SecretKey) -> Result<BootSpec, SecretError> {
    let mut out = spec.clone();
    for (name, secret) in out.secret_env.iter_mut() {
        let value = match (&secret.from_env, &secret.from_file, &secret.sealed) {
            (Some(var), None, None) => from_env(name, var)?,
            (None, Some(path), None) => from_file(name, Path::new(path))?,
            (None, None, Some(sealed)) => key.unseal(name, sealed)?,
            _ => return Err(SecretError::Shape { name: name.clone() }),
        };
        if key.digest(name, &value) != secret.digest {
            return Err(SecretError::Changed {
                name: name.clone(),
                source_text: source_text(secret),
            });
        }
        secret.revealed = Some(value);
    }
    Ok(out)
}

/// Every secret of `spec` can be read and is what the plan was made with
/// (apply checks this before it changes anything).
pub fn check(spec: &BootSpec, key: &SecretKey) -> Result<(), SecretError> {
    reveal(spec, key).map(|_| ())
}

/// `run` side: a cluster's env as its job's tasks get it, secrets read now.
pub fn values(
    env: &BTreeMap<String, EnvValue>,
    base_dir: &Path,
) -> Result<BTreeMap<String, String>, SecretError> {
    let mut out = BTreeMap::new();
    for (name, value) in env {
        let text = match value {
            EnvValue::Text(text) => text.clone(),
            EnvValue::Secret(s) => match (&s.from_env, &s.from_file, &s.value) {
                (Some(var), None, None) => from_env(name, var)?,
                (None, Some(path), None) => from_file(name, &secret_file(name, base_dir, path)?)?,
                (None, None, Some(text)) => text.clone(),
                _ => return Err(SecretError::Shape { name: name.clone() }),
            },
        };
        out.insert(name.clone(), text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SecretKey {
        SecretKey::derive(&Credential::new("project secret"), "demo")
    }

    #[test]
    fn names_like_secrets_are_recognised() {
        for name in [
            "DB_PASSWORD",
            "GITHUB_TOKEN",
            "AWS_SECRET_ACCESS_KEY",
            "API_KEY",
            "SECRET",
            "client_secret",
            "SMTP_PASS",
        ] {
            assert!(looks_secret(name), "{name}");
        }
        for name in [
            "LOG_LEVEL",
            "PATH",
            "PWD",
            "TOKENIZER_MODEL",
            "KEYSPACE",
            "MONKEY",
        ] {
            assert!(!looks_secret(name), "{name}");
        }
    }

    #[test]
    fn plans_hold_digests_and_sealed_values_never_the_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), "from-a-file\n").expect("write");
        // SAFETY: tests of this module alone read this variable.
        unsafe { std::env::set_var("MOTORPOOL_TEST_SECRET_A", "from-the-env") };
        let env: BTreeMap<String, EnvValue> = [
            ("LOG_LEVEL".to_string(), EnvValue::from("info")),
            ("DB_PASSWORD".to_string(), EnvValue::from("written-inline")),
            (
                "A".to_string(),
                EnvValue::Secret(SecretValue {
                    secret: true,
                    from_env: Some("MOTORPOOL_TEST_SECRET_A".into()),
                    from_file: None,
                    value: None,
                }),
            ),
            (
                "B".to_string(),
                EnvValue::Secret(SecretValue {
                    secret: true,
                    from_env: None,
                    from_file: Some("./db".into()),
                    value: None,
                }),
            ),
        ]
        .into();
        let (plain, secrets) = boot_env(&env, dir.path(), &key()).expect("boot env");
        assert_eq!(plain.keys().collect::<Vec<_>>(), ["LOG_LEVEL"]);
        let spec = BootSpec {
            env: plain,
            secret_env: secrets,
            ..BootSpec::default()
        };
        let text = serde_json::to_string(&spec).expect("json");
        for value in ["written-inline", "from-the-env", "from-a-file"] {
            assert!(!text.contains(value), "{value} in {text}");
        }
        assert_eq!(text.matches(SECRET_SHOWN).count(), 3, "{text}");
        let revealed = reveal(&spec, &key()).expect("reveal");
        let env = revealed.node_env();
        assert_eq!(env["DB_PASSWORD"], "written-inline");
        assert_eq!(env["A"], "from-the-env");
        assert_eq!(env["B"], "from-a-file");
        assert_eq!(revealed.hash(), spec.hash(), "revealing changes no hash");
        // A changed value is refused at apply, and changes the plan's hash.
        std::fs::write(dir.path().join("db"), "rotated\n").expect("write");
        let err = reveal(&spec, &key()).expect_err("changed");
        assert!(err.to_string().contains("changed since the plan"), "{err}");
        assert!(!err.to_string().contains("rotated"));
        let (_, rotated) = boot_env(&env_of(&env), dir.path(), &key()).expect("boot env");
        assert_ne!(rotated["B"].digest, spec.secret_env["B"].digest);
        // Another project's key opens nothing.
        let other = SecretKey::derive(&Credential::new("other"), "demo");
        assert!(reveal(&spec, &other).is_err());
    }

    fn env_of(values: &BTreeMap<String, String>) -> BTreeMap<String, EnvValue> {
        values
            .iter()
            .map(|(k, v)| {
                let value = if k == "B" {
                    EnvValue::Secret(SecretValue {
                        secret: true,
                        from_env: None,
                        from_file: Some("db".into()),
                        value: None,
                    })
                } else {
                    EnvValue::Text(v.clone())
                };
                (k.clone(), value)
            })
            .collect()
    }

    #[test]
    fn a_missing_variable_or_file_names_the_variable_not_a_value() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env: BTreeMap<String, EnvValue> = [(
            "X".to_string(),
            EnvValue::Secret(SecretValue {
                secret: true,
                from_env: Some("MOTORPOOL_TEST_UNSET_VARIABLE".into()),
                from_file: None,
                value: None,
            }),
        )]
        .into();
        let err = boot_env(&env, dir.path(), &key()).expect_err("unset");
        assert!(
            err.to_string().contains("MOTORPOOL_TEST_UNSET_VARIABLE"),
            "{err}"
        );
        let env: BTreeMap<String, EnvValue> = [(
            "X".to_string(),
            EnvValue::Secret(SecretValue {
                secret: true,
                from_env: None,
                from_file: Some("../outside".into()),
                value: None,
            }),
        )]
        .into();
        let err = boot_env(&env, dir.path(), &key()).expect_err("outside");
        assert!(err.to_string().contains("leads out of"), "{err}");
    }
}
