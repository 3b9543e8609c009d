//! Diagnostics: every problem found in a spec, as `file:line:col: error: message`.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Path, PathBuf};

/// What `Diagnostic::file` holds for problems with command-line flags
/// (`--target`, `--var`).
pub const COMMAND_LINE: &str = "<command line>";

/// One problem in a spec.
///
/// `line` and `col` are 1-based. A `line` of 0 means the problem has no
/// position (a file that cannot be read, or a command-line flag); it then
/// displays as `{file}: error: {message}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Diagnostic {
    /// The spec file, or [`COMMAND_LINE`] for flag problems.
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl Diagnostic {
    /// A problem with a command-line flag.
    pub fn command_line(message: impl Into<String>) -> Self {
        Diagnostic {
            file: PathBuf::from(COMMAND_LINE),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }

    /// A problem with a whole file (it cannot be read, ...).
    pub fn file(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            line: 0,
            col: 0,
            message: message.into(),
        }
    }

    /// Whether this is a command-line problem.
    pub fn is_command_line(&self) -> bool {
        self.file.as_os_str() == COMMAND_LINE
    }

    fn sort_key(&self, other: &Self) -> Ordering {
        // Command-line problems first, then by file, line, col.
        (!self.is_command_line())
            .cmp(&!other.is_command_line())
            .then_with(|| self.file.cmp(&other.file))
            .then(self.line.cmp(&other.line))
            .then(self.col.cmp(&other.col))
            .then_with(|| self.message.cmp(&other.message))
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: error: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )
        }
    }
}

impl std::error::Error for Diagnostic {}

/// Every problem found in one pass. Displays one per line, sorted by file,
/// line and column (command-line problems first).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    /// Sorts by file, line, column and removes exact duplicates.
    pub fn sort(&mut self) {
        self.0.sort_by(|a, b| a.sort_key(b));
        self.0.dedup();
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Diagnostic> {
        self.0.iter()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sorted: Vec<&Diagnostic> = self.0.iter().collect();
        sorted.sort_by(|a, b| a.sort_key(b));
        for (i, d) in sorted.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Index of a file in [`Sink::files`]; [`CMDLINE`] for the command line.
pub(crate) type FileId = u32;
pub(crate) const CMDLINE: FileId = u32::MAX;

/// A position in a spec file (1-based line and column; line 0: no position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Span {
    pub file: FileId,
    pub line: u32,
    pub col: u32,
}

impl Span {
    pub fn new(file: FileId, line: usize, col: usize) -> Self {
        Span {
            file,
            line: u32::try_from(line).unwrap_or(u32::MAX),
            col: u32::try_from(col).unwrap_or(u32::MAX),
        }
    }

    /// The whole of a file, or the command line.
    pub fn whole(file: FileId) -> Self {
        Span {
            file,
            line: 0,
            col: 0,
        }
    }

    pub fn cmdline() -> Self {
        Span::whole(CMDLINE)
    }

    /// Display as `file:line` (used in "first defined at" notes).
    pub fn at(&self, sink: &Sink) -> String {
        let file = sink.path(self.file).display().to_string();
        if self.line == 0 {
            file
        } else {
            format!("{}:{}:{}", file, self.line, self.col)
        }
    }
}

/// Collects the files read and every problem found in them.
#[derive(Debug, Default)]
pub(crate) struct Sink {
    pub files: Vec<PathBuf>,
    pub diags: Vec<(Span, String)>,
}

impl Sink {
    pub fn add_file(&mut self, path: PathBuf) -> FileId {
        self.files.push(path);
        FileId::try_from(self.files.len() - 1).unwrap_or(CMDLINE - 1)
    }

    pub fn path(&self, file: FileId) -> &Path {
        if file == CMDLINE {
            return Path::new(COMMAND_LINE);
        }
        self.files
            .get(file as usize)
            .map(PathBuf::as_path)
            .unwrap_or(Path::new("<unknown>"))
    }

    pub fn error(&mut self, span: Span, message: impl Into<String>) {
        self.diags.push((span, message.into()));
    }

    pub fn count(&self) -> usize {
        self.diags.len()
    }

    pub fn into_diagnostics(self) -> Diagnostics {
        let mut out = Diagnostics(
            self.diags
                .iter()
                .map(|(span, message)| Diagnostic {
                    file: self.path(span.file).to_path_buf(),
                    line: span.line as usize,
                    col: span.col as usize,
                    message: message.clone(),
                })
                .collect(),
        );
        out.sort();
        out
    }
}
