//! Saved plans (`plan --out FILE`, `apply FILE`): the plan's JSON, read back
//! with checks that give a clear message for anything that is not a plan.

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

/// Writes the plan as a private file (0600): it holds what nodes start
/// from, env values included.
pub fn save(plan: &Plan, path: &Path) -> Result<(), PlanFileError> {
    check_replaceable(path)?;
    let text = super::render::json(plan);
    crate::home::write_atomic(path, format!("{text}\n").as_bytes()).map_err(|source| {
        PlanFileError::Write {
            path: path.display().to_string(),
            source,
        }
    })
}

pub fn load(path: &Path) -> Result<Plan, PlanFileError> {
    let shown = path.display().to_string();
    let text = fs::read_to_string(path).map_err(|source| PlanFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| PlanFileError::NotAPlan {
            path: shown.clone(),
            reason: format!("not JSON ({e})"),
        })?;
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
