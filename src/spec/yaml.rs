//! YAML text to a spanned tree: every value keeps the file, line and column
//! it came from, so that later checks can point at it.
//!
//! Built on yaml-rust2's event parser. Scalars are typed with the YAML 1.2
//! core schema (quoted scalars are always strings). Duplicate keys are
//! errors. Anchors and aliases are supported (an alias is a copy of the
//! anchored value), and so are `<<` merge keys.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::diag::{FileId, Sink, Span};

/// Deepest nesting accepted; deeper documents are refused (so that nothing
/// downstream can overflow the stack).
const MAX_DEPTH: usize = 64;
/// Most values in one document, counting the copies aliases make.
const MAX_NODES: usize = 2_000_000;

/// One value of the tree.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub kind: Kind,
    pub span: Span,
    /// The variable this value was substituted from, for messages.
    pub var: Option<Box<str>>,
}

/// A value. Non-string plain scalars keep their source text, so that they
/// can stand where a string is expected (`runtime: 1` is the string "1").
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    Null,
    Bool(bool, Box<str>),
    Int(i128, Box<str>),
    Float(f64, Box<str>),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
    /// A value already reported as wrong (an unknown variable, ...): later
    /// checks accept it silently, and the resource holding it is not used.
    Invalid,
}

/// One `key: value` of a mapping.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: String,
    pub key_span: Span,
    pub value: Node,
}

impl Node {
    pub fn new(kind: Kind, span: Span) -> Self {
        Node {
            kind,
            span,
            var: None,
        }
    }

    pub fn entries(&self) -> Option<&[Entry]> {
        match &self.kind {
            Kind::Map(e) => Some(e),
            _ => None,
        }
    }

    pub fn entries_mut(&mut self) -> Option<&mut Vec<Entry>> {
        match &mut self.kind {
            Kind::Map(e) => Some(e),
            _ => None,
        }
    }

    /// The entry `key` of a mapping.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries()?.iter().find(|e| e.key == key)
    }

    /// The value at `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.entry(key).map(|e| &e.value)
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.kind {
            Kind::Str(s) => Some(s),
            _ => None,
        }
    }

    /// "a string", "an integer", ...: what this value is, for messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Null => "nothing (an empty value)".to_string(),
            Kind::Bool(b, _) => format!("a boolean ({b})"),
            Kind::Int(i, _) => format!("an integer ({i})"),
            Kind::Float(_, raw) => format!("a number ({raw})"),
            Kind::Str(s) => format!("a string ({})", preview(s)),
            Kind::Seq(_) => "a list".to_string(),
            Kind::Map(_) => "a mapping".to_string(),
            Kind::Invalid => "an invalid value".to_string(),
        }
    }

    /// "a string", "an integer", ...: only what kind of value this is, for
    /// a value that may be a secret (one given with `--var`).
    pub fn describe_kind(&self) -> &'static str {
        match &self.kind {
            Kind::Null => "nothing (an empty value)",
            Kind::Bool(..) => "a boolean",
            Kind::Int(..) => "an integer",
            Kind::Float(..) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
            Kind::Invalid => "an invalid value",
        }
    }

    /// The text of a scalar, as it would appear in a string.
    pub fn scalar_text(&self) -> Option<String> {
        match &self.kind {
            Kind::Null => Some(String::new()),
            Kind::Bool(_, raw) | Kind::Int(_, raw) | Kind::Float(_, raw) => Some(raw.to_string()),
            Kind::Str(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// Moves this value (not its children) to `span`.
    pub fn relocated(mut self, span: Span) -> Self {
        self.span = span;
        self
    }

    fn count(&self) -> usize {
        match &self.kind {
            Kind::Seq(items) => 1 + items.iter().map(Node::count).sum::<usize>(),
            Kind::Map(entries) => 1 + entries.iter().map(|e| e.value.count()).sum::<usize>(),
            _ => 1,
        }
    }
}

/// The 1-based line and column (in characters) of the first character YAML
/// does not allow in a stream: C0 controls but tab, newline and carriage
/// return; DEL; C1 controls but NEL; surrogates cannot occur in a `str`,
/// and U+FFFE / U+FFFF are not characters.
fn first_unprintable(text: &str) -> Option<(usize, usize, char)> {
    let allowed = |c: char| match c {
        '\t' | '\n' | '\r' | '\u{85}' => true,
        '\u{fffe}' | '\u{ffff}' => false,
        c => !c.is_control(),
    };
    let mut line = 1;
    let mut col = 1;
    for c in text.chars() {
        if !allowed(c) {
            return Some((line, col, c));
        }
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    None
}

/// A short, quoted preview of a string for messages.
pub(crate) fn preview(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        format!("{s:?}")
    } else {
        let cut: String = s.chars().take(MAX).collect();
        format!("{:?}...", cut)
    }
}

/// Types a plain (unquoted) scalar by the YAML 1.2 core schema.
pub(crate) fn resolve_plain(s: &str) -> Kind {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Kind::Null,
        "true" | "True" | "TRUE" => return Kind::Bool(true, s.into()),
        "false" | "False" | "FALSE" => return Kind::Bool(false, s.into()),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Kind::Float(f64::INFINITY, s.into());
        }
        "-.inf" | "-.Inf" | "-.INF" => return Kind::Float(f64::NEG_INFINITY, s.into()),
        ".nan" | ".NaN" | ".NAN" => return Kind::Float(f64::NAN, s.into()),
        _ => {}
    }
    let bytes = s.as_bytes();
    // Integers: [-+]?[0-9]+ | 0o[0-7]+ | 0x[0-9a-fA-F]+
    if let Some(rest) = s.strip_prefix("0o")
        && !rest.is_empty()
        && rest.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        if let Ok(v) = i128::from_str_radix(rest, 8) {
            return Kind::Int(v, s.into());
        }
        return Kind::Str(s.to_string());
    }
    if let Some(rest) = s.strip_prefix("0x")
        && !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_hexdigit())
    {
        if let Ok(v) = i128::from_str_radix(rest, 16) {
            return Kind::Int(v, s.into());
        }
        return Kind::Str(s.to_string());
    }
    let unsigned = match bytes.first() {
        Some(b'-') | Some(b'+') => &s[1..],
        _ => s,
    };
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<i128>() {
            Ok(v) => Kind::Int(v, s.into()),
            // Too large for any field: keep it a number so that range checks report it.
            Err(_) => Kind::Float(s.parse::<f64>().unwrap_or(f64::INFINITY), s.into()),
        };
    }
    if is_core_float(unsigned)
        && let Ok(v) = s.parse::<f64>()
    {
        return Kind::Float(v, s.into());
    }
    Kind::Str(s.to_string())
}

/// `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?` (without the sign).
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let int_digits = digits(&mut i);
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let frac = digits(&mut i);
        if int_digits == 0 && frac == 0 {
            return false;
        }
    } else if int_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

enum Frame {
    Seq {
        items: Vec<Node>,
        span: Span,
        anchor: usize,
    },
    Map {
        entries: Vec<Entry>,
        /// The key waiting for its value: (key, span, is a `<<` merge key).
        /// `None` inside: the key was not a scalar (already reported).
        pending: Option<Option<(String, Span, bool)>>,
        merges: Vec<Node>,
        index: Option<HashMap<String, usize>>,
        span: Span,
        anchor: usize,
    },
}

struct Builder<'s> {
    file: FileId,
    sink: &'s mut Sink,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    nodes: usize,
}

impl Builder<'_> {
    fn span(&self, m: &Marker) -> Span {
        Span::new(self.file, m.line(), m.col() + 1)
    }

    fn fail(&mut self, span: Span, msg: impl Into<String>) {
        self.sink.error(span, msg);
    }

    fn count(&mut self, n: usize, span: Span) -> bool {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            self.fail(
                span,
                format!("the document is too large (more than {MAX_NODES} values, counting what aliases copy)"),
            );
            return false;
        }
        true
    }

    /// A finished value: goes into the enclosing collection, or is the root.
    fn push(&mut self, node: Node, anchor: usize, merge_key: bool) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(top) = self.stack.last_mut() else {
            self.root = Some(node);
            return;
        };
        match top {
            Frame::Seq { items, .. } => items.push(node),
            Frame::Map {
                entries,
                pending,
                merges,
                index,
                ..
            } => match pending.take() {
                None => {
                    // This value is a key.
                    let key = match &node.kind {
                        Kind::Str(s) => Some((s.clone(), node.span, false)),
                        Kind::Null => Some((String::new(), node.span, false)),
                        Kind::Bool(_, raw) | Kind::Int(_, raw) | Kind::Float(_, raw) => {
                            Some((raw.to_string(), node.span, false))
                        }
                        _ => None,
                    };
                    let key = key.map(|(k, s, _)| (k, s, merge_key));
                    if key.is_none() {
                        self.sink.error(
                            node.span,
                            "a mapping key must be a plain value (a name), not a list or mapping",
                        );
                    }
                    *pending = Some(key);
                }
                Some(None) => {} // value of an invalid key: dropped
                Some(Some((key, key_span, merge))) => {
                    if merge {
                        merges.push(node);
                        return;
                    }
                    let mut value = node;
                    // An empty value points at its key, not at the next line.
                    if matches!(value.kind, Kind::Null) && value.span.line > key_span.line {
                        value.span = key_span;
                    }
                    let first = if entries.len() < 16 {
                        entries.iter().find(|e| e.key == key).map(|e| e.key_span)
                    } else {
                        let idx = index.get_or_insert_with(|| {
                            entries
                                .iter()
                                .enumerate()
                                .map(|(i, e)| (e.key.clone(), i))
                                .collect()
                        });
                        idx.get(&key).map(|&i| entries[i].key_span)
                    };
                    if let Some(first) = first {
                        let msg = format!(
                            "duplicate key `{}` (first defined at line {})",
                            key, first.line
                        );
                        self.sink.error(key_span, msg);
                        return;
                    }
                    if let Some(idx) = index {
                        idx.insert(key.clone(), entries.len());
                    }
                    entries.push(Entry {
                        key,
                        key_span,
                        value,
                    });
                }
            },
        }
    }

    fn scalar(&mut self, value: String, style: TScalarStyle, tag_str: bool, span: Span) -> Node {
        let kind = if style == TScalarStyle::Plain && !tag_str {
            resolve_plain(&value)
        } else {
            Kind::Str(value)
        };
        Node::new(kind, span)
    }

    fn finish_map(&mut self, frame: Frame) -> Option<(Node, usize)> {
        let Frame::Map {
            mut entries,
            merges,
            span,
            anchor,
            ..
        } = frame
        else {
            return None;
        };
        if !merges.is_empty() {
            let mut extra: Vec<Entry> = Vec::new();
            let add = |src: Vec<Entry>, entries: &Vec<Entry>, extra: &mut Vec<Entry>| {
                for e in src {
                    if !entries.iter().any(|x| x.key == e.key)
                        && !extra.iter().any(|x| x.key == e.key)
                    {
                        extra.push(e);
                    }
                }
            };
            for m in merges {
                match m.kind {
                    Kind::Map(src) => add(src, &entries, &mut extra),
                    Kind::Seq(items) => {
                        for item in items {
                            match item.kind {
                                Kind::Map(src) => add(src, &entries, &mut extra),
                                _ => {
                                    self.fail(
                                        item.span,
                                        "`<<` merges a mapping or a list of mappings",
                                    );
                                }
                            }
                        }
                    }
                    _ => self.fail(m.span, "`<<` merges a mapping or a list of mappings"),
                }
            }
            entries.extend(extra);
        }
        // A block mapping's start marker is after its first key; point at the key.
        let span = match entries.first() {
            Some(e) if (e.key_span.line, e.key_span.col) < (span.line, span.col) => e.key_span,
            _ => span,
        };
        Some((Node::new(Kind::Map(entries), span), anchor))
    }

    fn event(&mut self, ev: Event, mark: Marker) -> bool {
        let span = self.span(&mark);
        match ev {
            Event::Scalar(value, style, anchor, tag) => {
                if !self.count(1, span) {
                    return false;
                }
                let tag_str = tag
                    .as_ref()
                    .is_some_and(|t| t.handle == "tag:yaml.org,2002:" && t.suffix == "str");
                // A plain `<<` key is a merge key.
                let merge_key = style == TScalarStyle::Plain && !tag_str && value == "<<";
                let node = self.scalar(value, style, tag_str, span);
                self.push(node, anchor, merge_key);
            }
            Event::Alias(id) => {
                let Some(node) = self.anchors.get(&id).cloned() else {
                    self.fail(span, "unknown alias");
                    return false;
                };
                if !self.count(node.count(), span) {
                    return false;
                }
                self.push(node.relocated(span), 0, false);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if !self.count(1, span) {
                    return false;
                }
                if self.stack.len() >= MAX_DEPTH {
                    self.fail(
                        span,
                        format!("values are nested too deeply (more than {MAX_DEPTH} levels)"),
                    );
                    return false;
                }
                let frame = if matches!(ev, Event::SequenceStart(..)) {
                    Frame::Seq {
                        items: Vec::new(),
                        span,
                        anchor,
                    }
                } else {
                    Frame::Map {
                        entries: Vec::new(),
                        pending: None,
                        merges: Vec::new(),
                        index: None,
                        span,
                        anchor,
                    }
                };
                self.stack.push(frame);
            }
            Event::SequenceEnd => match self.stack.pop() {
                Some(Frame::Seq {
                    items,
                    span,
                    anchor,
                }) => {
                    let span = match items.first() {
                        Some(n) if (n.span.line, n.span.col) < (span.line, span.col) => n.span,
                        _ => span,
                    };
                    self.push(Node::new(Kind::Seq(items), span), anchor, false);
                }
                _ => {
                    self.fail(span, "unexpected end of a list");
                    return false;
                }
            },
            Event::MappingEnd => match self.stack.pop() {
                Some(frame @ Frame::Map { .. }) => {
                    if let Some((node, anchor)) = self.finish_map(frame) {
                        self.push(node, anchor, false);
                    }
                }
                _ => {
                    self.fail(span, "unexpected end of a mapping");
                    return false;
                }
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
        true
    }
}

/// Parses one YAML document into a spanned tree. Problems go to `sink`;
/// `None` when the text is not valid YAML. An empty document is `Null`.
pub(crate) fn parse(text: &str, file: FileId, sink: &mut Sink) -> Option<Node> {
    // A byte-order mark is an encoding signature, not part of the first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // The scanner reads NUL as the end of the text: a NUL in a comment
    // would make the rest of the file silently vanish (and `plan` then
    // proposes to remove everything it held). YAML allows no such
    // character anywhere, so refuse it, and every other non-printable one.
    if let Some((line, col, c)) = first_unprintable(text) {
        sink.error(
            Span::new(file, line, col),
            format!(
                "the file holds the non-printable character {c:?} (U+{:04X}), which YAML does \
                 not allow anywhere, comments included; is this a text file?",
                u32::from(c)
            ),
        );
        return None;
    }
    let mut parser = Parser::new_from_str(text);
    let mut b = Builder {
        file,
        sink,
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        nodes: 0,
    };
    let mut documents = 0usize;
    loop {
        let (ev, mark) = match parser.next_token() {
            Ok(x) => x,
            Err(e) => {
                let m = e.marker();
                let span = Span::new(file, m.line().max(1), m.col() + 1);
                b.fail(span, format!("YAML syntax error: {}", e.info()));
                return None;
            }
        };
        match ev {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                documents += 1;
                if documents > 1 {
                    let span = b.span(&mark);
                    b.fail(
                        span,
                        "a spec file holds one YAML document; a second one starts here",
                    );
                    return None;
                }
            }
            _ => {
                if !b.event(ev, mark) {
                    return None;
                }
            }
        }
    }
    // After duplicate keys and the like (already reported) the tree is still
    // useful for finding more problems.
    Some(
        b.root
            .unwrap_or_else(|| Node::new(Kind::Null, Span::new(file, 1, 1))),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> (Option<Node>, Vec<(Span, String)>) {
        let mut sink = Sink::default();
        let f = sink.add_file("t.yaml".into());
        let n = parse(text, f, &mut sink);
        (n, sink.diags)
    }

    #[test]
    fn core_schema_types() {
        assert!(matches!(resolve_plain("8"), Kind::Int(8, _)));
        assert!(matches!(resolve_plain("-8"), Kind::Int(-8, _)));
        assert!(matches!(resolve_plain("0x1f"), Kind::Int(31, _)));
        assert!(matches!(resolve_plain("0o17"), Kind::Int(15, _)));
        assert!(matches!(resolve_plain("1.5"), Kind::Float(v, _) if v == 1.5));
        assert!(matches!(resolve_plain("1e3"), Kind::Float(v, _) if v == 1000.0));
        assert!(matches!(resolve_plain(".5"), Kind::Float(v, _) if v == 0.5));
        assert!(matches!(resolve_plain(".inf"), Kind::Float(v, _) if v.is_infinite()));
        assert!(matches!(resolve_plain("true"), Kind::Bool(true, _)));
        assert!(matches!(resolve_plain("~"), Kind::Null));
        assert!(matches!(resolve_plain(""), Kind::Null));
        assert!(matches!(resolve_plain("yes"), Kind::Str(_)));
        assert!(matches!(resolve_plain("1_000"), Kind::Str(_)));
        assert!(matches!(resolve_plain("."), Kind::Str(_)));
        assert!(matches!(resolve_plain("1.2.3"), Kind::Str(_)));
        assert!(matches!(resolve_plain("e5"), Kind::Str(_)));
        assert!(matches!(resolve_plain("-"), Kind::Str(_)));
    }

    #[test]
    fn quoted_scalars_are_strings() {
        let (n, d) = p("a: \"8\"\nb: '1.5'\nc: !!str true\n");
        assert!(d.is_empty());
        let n = n.unwrap();
        assert_eq!(n.get("a").unwrap().as_str(), Some("8"));
        assert_eq!(n.get("b").unwrap().as_str(), Some("1.5"));
        assert_eq!(n.get("c").unwrap().as_str(), Some("true"));
    }

    #[test]
    fn spans_are_one_based() {
        let (n, _) = p("project: x\npools:\n  general:\n    min_idle: 2\n");
        let n = n.unwrap();
        assert_eq!((n.span.line, n.span.col), (1, 1));
        let pools = n.entry("pools").unwrap();
        assert_eq!((pools.key_span.line, pools.key_span.col), (2, 1));
        let general = pools.value.entry("general").unwrap();
        assert_eq!((general.key_span.line, general.key_span.col), (3, 3));
        let v = general.value.get("min_idle").unwrap();
        assert_eq!((v.span.line, v.span.col), (4, 15));
        assert_eq!((general.value.span.line, general.value.span.col), (4, 5));
    }

    #[test]
    fn duplicate_keys_point_at_the_second() {
        let (_, d) = p("a: 1\nb: 2\na: 3\n");
        assert_eq!(d.len(), 1);
        assert_eq!((d[0].0.line, d[0].0.col), (3, 1));
        assert!(
            d[0].1
                .contains("duplicate key `a` (first defined at line 1)")
        );
    }

    #[test]
    fn duplicate_keys_in_large_maps() {
        let mut text: String = (0..40).map(|i| format!("k{i}: {i}\n")).collect();
        text.push_str("k7: 1\n");
        let (_, d) = p(&text);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0.line, 41);
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let (n, d) = p("a: [1\nb: 2\n");
        assert!(n.is_none());
        assert_eq!(d.len(), 1);
        assert!(d[0].1.starts_with("YAML syntax error"));
        assert!(d[0].0.line >= 1);
    }

    #[test]
    fn aliases_and_merge_keys() {
        let (n, d) = p("base: &b { x: 1, y: 2 }\nc:\n  <<: *b\n  y: 3\nd: *b\n");
        assert!(d.is_empty(), "{d:?}");
        let n = n.unwrap();
        let c = n.get("c").unwrap();
        assert!(matches!(c.get("x").unwrap().kind, Kind::Int(1, _)));
        assert!(matches!(c.get("y").unwrap().kind, Kind::Int(3, _)));
        assert!(matches!(
            n.get("d").unwrap().get("y").unwrap().kind,
            Kind::Int(2, _)
        ));
        assert_eq!(n.get("d").unwrap().span.line, 5);
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = i - 1;
            text.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let (n, d) = p(&text);
        assert!(n.is_none());
        assert!(d[0].1.contains("too large"));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let (n, d) = p(&text);
        assert!(n.is_none());
        assert!(d[0].1.contains("nested too deeply"), "{d:?}");
    }

    #[test]
    fn one_document_per_file() {
        let (n, d) = p("a: 1\n---\nb: 2\n");
        assert!(n.is_none());
        assert_eq!(d[0].0.line, 2);
    }

    #[test]
    fn empty_values_point_at_their_key() {
        let (n, _) = p("a:\nb: 1\n");
        let n = n.unwrap();
        let a = n.get("a").unwrap();
        assert!(matches!(a.kind, Kind::Null));
        assert_eq!((a.span.line, a.span.col), (1, 1));
    }
}
