//! Is an agent's process still there, and is it really the agent?

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What a recorded pid is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Running, and its command line names the instance directory.
    Alive,
    /// No such process, or a zombie.
    Dead,
    /// A process with that pid runs, but it is another program (pid reuse)
    /// or another user's.
    Foreign,
}

/// Whether `pid` runs, is not a zombie, and was started with `dir` as an argument.
pub(crate) fn liveness(pid: u32, dir: &Path) -> Liveness {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return Liveness::Dead;
    };
    if raw <= 0 {
        return Liveness::Dead;
    }
    // SAFETY: kill with signal 0 only checks that the process exists and may be signalled.
    let rc = unsafe { libc::kill(raw, 0) };
    if rc != 0 {
        return match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EPERM) => Liveness::Foreign,
            _ => Liveness::Dead,
        };
    }
    if !Path::new("/proc/self").exists() {
        // No procfs (not Linux): existence is all we can tell.
        return Liveness::Alive;
    }
    let proc_dir = Path::new("/proc").join(pid.to_string());
    match std::fs::read(proc_dir.join("stat")) {
        Ok(stat) => {
            if matches!(stat_state(&stat), Some(b'Z' | b'X' | b'x')) {
                return Liveness::Dead;
            }
        }
        Err(_) => return Liveness::Dead,
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return Liveness::Dead;
    };
    let dir = dir.as_os_str().as_bytes();
    if cmdline.split(|b| *b == 0).any(|arg| arg == dir) {
        Liveness::Alive
    } else {
        Liveness::Foreign
    }
}

/// Whether any process (not a zombie) has this pid.
pub(crate) fn exists(pid: u32) -> bool {
    let Ok(raw) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if raw <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(raw, 0) };
    if rc != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => !matches!(stat_state(&stat), Some(b'Z' | b'X' | b'x')),
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

/// Sends `signal` to the process group `pgid`; a group that is gone is fine.
pub(crate) fn kill_group(pgid: u32, signal: libc::c_int) {
    let Ok(raw) = libc::pid_t::try_from(pgid) else {
        return;
    };
    // Never 0 or 1: that would signal our own group or everything.
    if raw <= 1 {
        return;
    }
    // SAFETY: killpg has no memory effects; the group id is a positive number.
    unsafe {
        libc::killpg(raw, signal);
    }
}

/// In a freshly forked child, before it execs: write its own pid, in
/// decimal and newline-terminated, to the already open `fd`. Only
/// async-signal-safe calls (getpid, write) and no allocation, as a child of a
/// multi-threaded parent may use between fork and exec.
pub(crate) fn write_own_pid(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut digits = [0u8; 24];
    let mut n = digits.len() - 1;
    digits[n] = b'\n';
    let mut rest = u64::try_from(pid).unwrap_or(0);
    loop {
        n -= 1;
        digits[n] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 || n == 0 {
            break;
        }
    }
    let bytes = &digits[n..];
    let mut written = 0;
    while written < bytes.len() {
        // SAFETY: writes from a live stack buffer to a descriptor the parent opened for us.
        let rc =
            unsafe { libc::write(fd, bytes[written..].as_ptr().cast(), bytes.len() - written) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        written += rc as usize;
    }
    Ok(())
}

/// The pid a spawned child wrote with [`write_own_pid`], if the file holds one.
pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let pid: u32 = text.trim().parse().ok()?;
    (pid > 1).then_some(pid)
}

/// The state letter of `/proc/<pid>/stat`: the first field after the command
/// name, which is in parentheses and may itself contain `)` and spaces.
fn stat_state(stat: &[u8]) -> Option<u8> {
    let close = stat.iter().rposition(|b| *b == b')')?;
    stat[close + 1..].iter().copied().find(|b| *b != b' ')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_state_after_a_tricky_command_name() {
        assert_eq!(stat_state(b"123 (a) b) Z 1 2 3"), Some(b'Z'));
        assert_eq!(stat_state(b"123 (sleep) S 1 2 3"), Some(b'S'));
        assert_eq!(stat_state(b"garbage"), None);
    }

    #[test]
    fn our_own_process_is_foreign_to_an_instance_dir() {
        let me = std::process::id();
        assert_eq!(
            liveness(me, Path::new("/nonexistent/instance/dir")),
            Liveness::Foreign
        );
        assert!(exists(me));
        assert!(!exists(0));
        assert_eq!(liveness(0, Path::new("/x")), Liveness::Dead);
    }

    #[test]
    fn a_child_writes_its_own_pid_before_it_runs_its_program() {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.pid");
        let file = std::fs::File::create(&path).expect("pid file");
        let fd = file.as_raw_fd();
        let mut command = std::process::Command::new("true");
        // SAFETY: the hook only calls write_own_pid, which is async-signal-safe.
        unsafe {
            command.pre_exec(move || write_own_pid(fd));
        }
        let mut child = command.spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert_eq!(read_pid_file(&path), Some(pid));
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(read_pid_file(&path), None);
    }
}
