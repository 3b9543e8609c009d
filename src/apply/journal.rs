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

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use motorpool_provider::LaunchRequest;
use serde::{Deserialize, Serialize};

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
pub fn interrupted(project_dir: &Path) -> Option<Interrupted> {
    let file = File::open(path(project_dir)).ok()?;
    let mut state = Interrupted::default();
    // Launches in the order they started; a finished op's slots become None.
    let mut launches: Vec<Option<LaunchRequest>> = Vec::new();
    // (address, op) -> its slots in `launches`, while the op is open.
    let mut open: HashMap<(String, usize), Vec<usize>> = HashMap::new();
    let mut ended = false;
    let mut any = false;
    for line in BufReader::new(file).lines() {
        let Ok(line) = line else { break };
        // A line cut short by a kill is where the journal ends.
        let Ok(event) = serde_json::from_str::<Event>(&line) else {
            break;
        };
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
        return None;
    }
    state.launches = launches.into_iter().flatten().collect();
    Some(state)
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
        let mut j = Journal { path, file };
        j.write(&Event::Begin {
            fingerprint: fingerprint.to_string(),
            ops,
            at,
        })?;
        Ok(j)
    }

    /// Append one event and flush it to the OS, so a SIGKILL right after keeps it.
    pub fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_string(event).map_err(std::io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
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
            user_data: String::new(),
            client_token: token.into(),
        }
    }

    #[test]
    fn an_unfinished_journal_gives_back_its_unfinished_launches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::begin(dir.path(), "fp", 3, 0).expect("begin");
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
        let state = interrupted(dir.path()).expect("interrupted");
        assert_eq!(state.launches.len(), 1);
        assert_eq!(state.launches[0].client_token, "b");
        assert_eq!((state.finished_ops, state.total_ops), (1, 3));
        j.write(&Event::End { failed: 0 }).expect("end");
        assert!(interrupted(dir.path()).is_none());
    }
}
