//! Saved plans (`plan --out FILE`, `apply FILE`): the plan's JSON, read back
//! with checks that give a clear message for anything that is not a plan.
//!
//! A saved plan is an instruction to create machines and run commands, so it
//! is authenticated: its last member is `"mac": "hmac-sha256:<hex>"`, the
//! HMAC-SHA256 of every byte before it (the plan's JSON as `plan` wrote it)
//! under a key derived from the project secret ([`crate::auth::MacKey`],
//! purpose `plan-file/<project>`). [`load`] refuses a file whose MAC does not
//! match, byte for byte, before it reads anything else from it: a plan
//! edited by hand, or written for another project (another secret), is
//! never carried out. The project a plan names is only used to find the
//! secret to check it with, and nothing is created for it.

use std::fs;
use std::path::Path;

use thiserror::Error;

use super::{FORMAT_VERSION, Plan};

#[derive(Debug, Error)]
pub enum PlanFileError {
    #[error("cannot read plan file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write plan file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "refusing to write the plan over {path}: it exists and is not a motorpool plan file \
         (a spec, perhaps); choose another --out FILE"
    )]
    WouldReplace { path: String },
    #[error("{path} is not a motorpool plan file: {reason}")]
    NotAPlan { path: String, reason: String },
    #[error(
        "{path} is a plan of format version {found}; this motorpool reads version {FORMAT_VERSION}: make the plan again"
    )]
    Version { path: String, found: String },
    #[error(
        "refusing the plan file {path}: it was altered after `motorpool plan` wrote it, or was \
         not written by `motorpool plan` for project `{project}` on this machine ({why}). \
         Nothing was changed; run `motorpool plan --out FILE` again and apply that"
    )]
    Altered {
        path: String,
        project: String,
        why: &'static str,
    },
    #[error("cannot find the secret of project `{project}` to check the plan file: {source}")]
    Secret {
        project: String,
        source: crate::home::HomeError,
    },
}

/// What precedes the MAC in a saved plan, after the plan's JSON (without its closing brace).
const MAC_OPEN: &str = ",\n  \"mac\": \"hmac-sha256:";
/// What follows the MAC: the end of the object and of the file.
const MAC_CLOSE: &str = "\"\n}\n";
/// Bound into every plan MAC, so no other authenticated text passes as a plan.
const MAC_DOMAIN: &[u8] = b"motorpool saved plan";

fn key(secret: &crate::auth::Credential, project: &str) -> crate::auth::MacKey {
    crate::auth::MacKey::derive(secret, &format!("plan-file/{project}"))
}

/// The plan's text as `plan --out` writes it: the plan's JSON with its MAC
/// as the last member.
pub fn signed_text(plan: &Plan, secret: &crate::auth::Credential) -> String {
    let body = super::render::json(plan);
    let mac = key(secret, &plan.project).sign(&[MAC_DOMAIN, body.as_bytes()]);
    // The pretty JSON ends with the object's closing brace on a line of its own.
    let open = body.strip_suffix("\n}").unwrap_or(&body);
    format!("{open}{MAC_OPEN}{mac}{MAC_CLOSE}")
}

/// Split a saved plan's text into the plan's JSON (as it was signed) and its MAC.
fn split_mac(text: &str) -> Option<(String, &str)> {
    let rest = text.strip_suffix(MAC_CLOSE)?;
    let at = rest.rfind(MAC_OPEN)?;
    let mac = &rest[at + MAC_OPEN.len()..];
    if mac.len() != crate::auth::MAC_HEX_LEN
        || !mac
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    Some((format!("{}\n}}", &rest[..at]), mac))
}

/// Does this file look like a saved plan (rather than a spec)?
pub fn looks_like_plan(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    let head = bytes.iter().find(|b| !b.is_ascii_whitespace());
    head == Some(&b'{') && bytes.windows(16).any(|w| w == b"\"format_version\"")
}

/// `plan --out FILE` only ever replaces a saved plan: never a spec it read,
/// nor any other file that happens to be there.
pub fn check_replaceable(path: &Path) -> Result<(), PlanFileError> {
    match fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(meta) if meta.is_file() && looks_like_plan(path) => Ok(()),
        Ok(_) => Err(PlanFileError::WouldReplace {
            path: path.display().to_string(),
        }),
    }
}

/// Writes the plan as a private file (0600), signed with the project's key.
/// It holds what nodes start from; secret env values are not in it (their
/// keyed digests are: see `crate::secrets`).
pub fn save(
    plan: &Plan,
    path: &Path,
    secret: &crate::auth::Credential,
) -> Result<(), PlanFileError> {
    check_replaceable(path)?;
    let text = signed_text(plan, secret);
    crate::home::write_atomic(path, text.as_bytes()).map_err(|source| PlanFileError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Read a saved plan back, refusing it unless it is exactly what `plan`
/// wrote for its project (the MAC, checked with the secret `home` holds
/// for the project the file names).
pub fn load(path: &Path, home: &crate::home::Home) -> Result<Plan, PlanFileError> {
    let shown = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|source| PlanFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let Some((body, mac)) = split_mac(&text) else {
        // Say what it is when it is not a signed plan at all.
        let reason = match serde_json::from_str::<serde_json::Value>(&text) {
            Err(e) => format!("not JSON ({e})"),
            Ok(v) => match v.get("format_version").and_then(|v| v.as_str()) {
                Some(FORMAT_VERSION) | None => "it carries no signature of `motorpool plan` as \
                     its last member (a plan edited by hand, or saved by an older motorpool, is \
                     refused: run `motorpool plan --out FILE` again)"
                    .to_string(),
                Some(other) => {
                    return Err(PlanFileError::Version {
                        path: shown,
                        found: other.chars().take(32).collect(),
                    });
                }
            },
        };
        return Err(PlanFileError::NotAPlan {
            path: shown,
            reason,
        });
    };
    let text = body;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PlanFileError::NotAPlan {
            path: shown.clone(),
            reason: format!("not JSON ({e})"),
        })?;
    let project = value
        .get("project")
        .and_then(|p| p.as_str())
        .unwrap_or_default()
        .to_string();
    let valid = crate::spec::is_valid_name(&project);
    let altered = |why| PlanFileError::Altered {
        path: shown.clone(),
        // Never print what is not a name (control characters, say).
        project: if valid {
            project.clone()
        } else {
            "(not a valid project name)".into()
        },
        why,
    };
    if !valid {
        return Err(altered("the project it names is not a valid project name"));
    }
    let secret = home
        .existing_project_secret(&project)
        .map_err(|source| PlanFileError::Secret {
            project: project.clone(),
            source,
        })?
        .ok_or_else(|| altered("the project has no secret on this machine"))?;
    if !key(&secret, &project).verify(&[MAC_DOMAIN, text.as_bytes()], mac) {
        return Err(altered("its signature does not match its content"));
    }
    match value.get("format_version").and_then(|v| v.as_str()) {
        Some(FORMAT_VERSION) => {}
        Some(other) => {
            return Err(PlanFileError::Version {
                path: shown,
                found: other.to_string(),
            });
        }
        None => {
            return Err(PlanFileError::NotAPlan {
                path: shown,
                reason: "no format_version".into(),
            });
        }
    }
    serde_json::from_value(value).map_err(|e| PlanFileError::NotAPlan {
        path: shown,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::auth::Credential;
    use crate::home::Home;
    use crate::observe::Observed;
    use crate::plan::{PlanInput, PlanMode, build};
    use crate::spec::{Cluster, Spec};

    /// A plan that launches a cluster of project `demo` (init script, env and all).
    fn a_plan() -> Plan {
        let mut spec = Spec {
            project: "demo".into(),
            provider: Default::default(),
            include: vec![],
            variables: BTreeMap::new(),
            targets: BTreeMap::new(),
            pools: BTreeMap::new(),
            policies: BTreeMap::new(),
            clusters: BTreeMap::new(),
            jobs: BTreeMap::new(),
        };
        spec.clusters.insert(
            "etl".into(),
            Cluster {
                node_type: Some("small".into()),
                workers: Some(2),
                env: [("LOG_LEVEL".to_string(), "info".into())].into(),
                ..Cluster::default()
            },
        );
        let observed = Observed::from_instances("demo", vec![]);
        let catalog = vec![motorpool_provider::NodeType::new("small", 2, 4.0, 0.05)];
        build(&PlanInput {
            spec: &spec,
            observed: &observed,
            catalog: &catalog,
            default_image: "img-1",
            mode: PlanMode::Normal,
            now: 1_000_000,
            minute: std::time::Duration::from_secs(60),
            base_dir: Path::new("."),
            start: &Default::default(),
            nonce: "n",
            secrets: &crate::secrets::SecretKey::derive(&crate::auth::Credential::new("test"), "p"),
            choices: &Default::default(),
        })
        .expect("plan builds")
    }

    /// A home holding project `demo`'s secret, and a plan saved with it.
    fn saved() -> (tempfile::TempDir, Home, std::path::PathBuf, Plan) {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = Home::at(dir.path().join("home")).expect("home");
        let secret = home.project_secret("demo").expect("secret");
        let plan = a_plan();
        let file = dir.path().join("saved.plan.json");
        save(&plan, &file, &secret).expect("save");
        (dir, home, file, plan)
    }

    #[test]
    fn a_saved_plan_reads_back_exactly() {
        let (_dir, home, file, plan) = saved();
        assert!(looks_like_plan(&file));
        assert_eq!(load(&file, &home).expect("load"), plan);
    }

    #[test]
    fn a_plan_edited_by_hand_is_refused() {
        let (_dir, home, file, _) = saved();
        let text = fs::read_to_string(&file).expect("read");
        for (from, to) in [
            ("\"count\": 2", "\"count\": 50"),
            ("\"project\": \"demo\"", "\"project\": \"other\""),
            ("\"LOG_LEVEL\": \"info\"", "\"LOG_LEVEL\": \"debug\""),
        ] {
            assert!(text.contains(from), "{from} in {text}");
            fs::write(&file, text.replacen(from, to, 1)).expect("write");
            let err = load(&file, &home).expect_err("refused").to_string();
            assert!(
                err.contains("was altered after `motorpool plan` wrote it"),
                "{from}: {err}"
            );
        }
        // The signature taken off: refused too.
        let at = text.rfind(",\n  \"mac\"").expect("mac");
        fs::write(&file, format!("{}\n}}\n", &text[..at])).expect("write");
        let err = load(&file, &home).expect_err("refused").to_string();
        assert!(err.contains("carries no signature"), "{err}");
    }

    #[test]
    fn a_plan_of_another_project_secret_is_refused() {
        let (dir, _home, file, _) = saved();
        // The same project name, another machine's secret.
        let other = Home::at(dir.path().join("other-home")).expect("home");
        other.project_secret("demo").expect("its own secret");
        let err = load(&file, &other).expect_err("refused").to_string();
        assert!(err.contains("signature does not match"), "{err}");
        // A machine that never saw the project: refused, and nothing made for it.
        let empty = Home::at(dir.path().join("empty-home")).expect("home");
        let err = load(&file, &empty).expect_err("refused").to_string();
        assert!(err.contains("no secret on this machine"), "{err}");
        assert!(!dir.path().join("empty-home/projects").exists());
        // Signed with another secret for the same project name.
        let foreign = dir.path().join("foreign.plan.json");
        save(&a_plan(), &foreign, &Credential::new("someone else's")).expect("save");
        let (_d, home, _, _) = saved();
        assert!(load(&foreign, &home).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// `apply` never carries out something other than what `plan`
        /// wrote: any one byte of a saved plan changed, it is refused or
        /// reads back as the very plan that was saved.
        #[test]
        fn a_saved_plan_with_any_byte_changed_is_refused_or_unchanged_in_meaning(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let (_dir, home, file, plan) = saved();
            let mut bytes = fs::read(&file).expect("read");
            let i = at.index(bytes.len());
            proptest::prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            fs::write(&file, &bytes).expect("write");
            if let Ok(read) = load(&file, &home) {
                proptest::prop_assert_eq!(read, plan);
            }
        }
    }
}
