//! Map output on an executor's disk: lines hash-partitioned by key, each
//! partition sorted by key, in one data file per map attempt with an index
//! of partition offsets (`<attempt>.data`, `<attempt>.index`); and the k-way
//! merge a reducer reads them back through.
//!
//! A line's key is its bytes up to the first TAB (the whole line without
//! one). Partitions: FNV-1a of the key, modulo the reduce partitions. Sorting
//! is by key bytes and stable, so equal keys keep their order. Output above
//! [`SPILL_BYTES`] is sorted and spilled to disk in runs, merged at the end.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Map output buffered in memory before a sorted run is spilled to disk.
pub const SPILL_BYTES: usize = 64 << 20;

/// The key of a line (`key<TAB>value`, with or without its newline).
pub fn key_of(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    match line.iter().position(|&b| b == b'\t') {
        Some(i) => &line[..i],
        None => line,
    }
}

/// The reduce partition of a key.
pub fn partition_of(key: &[u8], partitions: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % partitions.max(1) as u64) as usize
}

/// The data and index files of one map attempt's output.
pub fn output_files(dir: &Path, attempt_id: u64) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{attempt_id}.data")),
        dir.join(format!("{attempt_id}.index")),
    )
}

/// Reads an index: partitions + 1 offsets.
pub fn read_index(path: &Path) -> anyhow::Result<Vec<u64>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() % 8 != 0 || bytes.len() < 16 {
        anyhow::bail!("{} is not a shuffle index", path.display());
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_le_bytes(a)
        })
        .collect())
}

/// A reader over partition `p` of a map output.
pub fn open_segment(
    dir: &Path,
    attempt_id: u64,
    p: usize,
) -> anyhow::Result<std::io::Take<BufReader<File>>> {
    let (data, index) = output_files(dir, attempt_id);
    let offsets = read_index(&index)?;
    let (Some(&start), Some(&end)) = (offsets.get(p), offsets.get(p + 1)) else {
        anyhow::bail!("map output {attempt_id} has no partition {p}");
    };
    let mut f = File::open(&data).with_context(|| format!("cannot read {}", data.display()))?;
    f.seek(SeekFrom::Start(start))
        .with_context(|| format!("cannot seek in {}", data.display()))?;
    Ok(BufReader::with_capacity(256 << 10, f).take(end.saturating_sub(start)))
}

/// Sorts `buf`'s lines by key, stably. Each key is found once, not at
/// every comparison.
fn sorted_lines(buf: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<(&[u8], &[u8])> = buf
        .split_inclusive(|&b| b == b'\n')
        .map(|l| (key_of(l), l))
        .collect();
    lines.sort_by(|a, b| a.0.cmp(b.0));
    lines.into_iter().map(|(_, l)| l).collect()
}

/// One map attempt's output being written.
pub struct ShuffleWriter {
    dir: PathBuf,
    attempt_id: u64,
    parts: Vec<Vec<u8>>,
    buffered: usize,
    /// Spilled runs: the file and its partition offsets.
    spills: Vec<(PathBuf, Vec<u64>)>,
    pub records: u64,
}

impl ShuffleWriter {
    pub fn new(dir: &Path, attempt_id: u64, partitions: usize) -> ShuffleWriter {
        ShuffleWriter {
            dir: dir.to_path_buf(),
            attempt_id,
            parts: vec![Vec::new(); partitions.max(1)],
            buffered: 0,
            spills: Vec::new(),
            records: 0,
        }
    }

    /// Adds one line (with or without its newline).
    pub fn push_line(&mut self, line: &[u8]) -> anyhow::Result<()> {
        let n = self.parts.len();
        let part = &mut self.parts[partition_of(key_of(line), n)];
        part.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            part.push(b'\n');
        }
        self.buffered += line.len() + 1;
        self.records += 1;
        if self.buffered >= SPILL_BYTES {
            self.spill()?;
        }
        Ok(())
    }

    /// Adds every complete line of `chunk`; returns the bytes of an unfinished last line.
    pub fn push_lines<'a>(&mut self, chunk: &'a [u8]) -> anyhow::Result<&'a [u8]> {
        let mut rest = chunk;
        while let Some(i) = rest.iter().position(|&b| b == b'\n') {
            self.push_line(&rest[..=i])?;
            rest = &rest[i + 1..];
        }
        Ok(rest)
    }

    fn write_sorted(&mut self, path: &Path) -> anyhow::Result<Vec<u64>> {
        let f = File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let mut offsets = Vec::with_capacity(self.parts.len() + 1);
        let mut at = 0u64;
        offsets.push(0);
        for part in &mut self.parts {
            for line in sorted_lines(part) {
                w.write_all(line)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                at += line.len() as u64;
            }
            offsets.push(at);
            part.clear();
        }
        w.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        self.buffered = 0;
        Ok(offsets)
    }

    fn spill(&mut self) -> anyhow::Result<()> {
        let path = self
            .dir
            .join(format!("{}.spill{}", self.attempt_id, self.spills.len()));
        let offsets = self.write_sorted(&path)?;
        self.spills.push((path, offsets));
        Ok(())
    }

    /// Writes the data and index files; returns the bytes of each partition.
    pub fn finish(mut self) -> anyhow::Result<Vec<u64>> {
        let (data, index) = output_files(&self.dir, self.attempt_id);
        let offsets = if self.spills.is_empty() {
            self.write_sorted(&data)?
        } else {
            if self.buffered > 0 {
                self.spill()?;
            }
            let f =
                File::create(&data).with_context(|| format!("cannot write {}", data.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            let mut offsets = vec![0u64];
            let mut at = 0u64;
            for p in 0..self.parts.len() {
                let mut sources = Vec::new();
                for (path, offs) in &self.spills {
                    let mut f = File::open(path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    f.seek(SeekFrom::Start(offs[p]))?;
                    sources.push(BufReader::new(f).take(offs[p + 1] - offs[p]));
                }
                merge_sorted(sources, |line| {
                    at += line.len() as u64;
                    w.write_all(line)
                        .with_context(|| format!("cannot write {}", data.display()))
                })?;
                offsets.push(at);
            }
            w.flush()
                .with_context(|| format!("cannot write {}", data.display()))?;
            for (path, _) in &self.spills {
                let _ = std::fs::remove_file(path);
            }
            offsets
        };
        let bytes: Vec<u8> = offsets.iter().flat_map(|o| o.to_le_bytes()).collect();
        std::fs::write(&index, bytes)
            .with_context(|| format!("cannot write {}", index.display()))?;
        Ok(offsets.windows(2).map(|w| w[1] - w[0]).collect())
    }
}

struct Head {
    line: Vec<u8>,
    /// The key's length: found once per line, not at every comparison.
    key_len: usize,
    source: usize,
}

impl Head {
    fn new(line: Vec<u8>, source: usize) -> Head {
        let key_len = key_of(&line).len();
        Head {
            line,
            key_len,
            source,
        }
    }

    fn key(&self) -> &[u8] {
        &self.line[..self.key_len]
    }

    fn cmp_key(&self, other: &Head) -> Ordering {
        self.key()
            .cmp(other.key())
            .then(self.source.cmp(&other.source))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Head) -> bool {
        self.cmp_key(other) == Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Head) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Head {
    // Reversed: BinaryHeap is a max-heap, the merge wants the smallest key.
    fn cmp(&self, other: &Head) -> Ordering {
        other.cmp_key(self)
    }
}

/// Merges sources whose lines are each sorted by key into one key-sorted
/// stream of lines (each ending in a newline); equal keys come in source order.
pub fn merge_sorted<R: BufRead>(
    mut sources: Vec<R>,
    mut emit: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    fn next<R: BufRead>(r: &mut R, mut buf: Vec<u8>) -> anyhow::Result<Option<Vec<u8>>> {
        buf.clear();
        let n = r
            .read_until(b'\n', &mut buf)
            .context("cannot read map output")?;
        if n == 0 {
            return Ok(None);
        }
        if !buf.ends_with(b"\n") {
            buf.push(b'\n');
        }
        Ok(Some(buf))
    }
    if sources.len() == 1 {
        let mut buf = Vec::new();
        while let Some(line) = next(&mut sources[0], std::mem::take(&mut buf))? {
            emit(&line)?;
            buf = line;
        }
        return Ok(());
    }
    let mut heap = BinaryHeap::with_capacity(sources.len());
    for (i, s) in sources.iter_mut().enumerate() {
        if let Some(line) = next(s, Vec::new())? {
            heap.push(Head::new(line, i));
        }
    }
    // The smallest head is emitted and replaced in place by its source's next
    // line: one sift down, where a pop and a push take two.
    while let Some(mut top) = heap.peek_mut() {
        emit(&top.line)?;
        let source = top.source;
        match next(&mut sources[source], std::mem::take(&mut top.line))? {
            Some(line) => *top = Head::new(line, source),
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_partitions() {
        assert_eq!(key_of(b"word\t1\n"), b"word");
        assert_eq!(key_of(b"no tab\n"), b"no tab");
        assert_eq!(partition_of(b"x", 7), partition_of(b"x", 7));
        assert!(partition_of(b"anything", 3) < 3);
    }

    #[test]
    fn written_output_is_partitioned_sorted_and_merges() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = ShuffleWriter::new(dir.path(), 7, 3);
        let rest = w.push_lines(b"b\t1\na\t1\nc\t2\nb\t3\nlast").expect("push");
        assert_eq!(rest, b"last");
        w.push_line(b"a\t9").expect("push");
        let sizes = w.finish().expect("finish");
        assert_eq!(sizes.len(), 3);
        let mut all = Vec::new();
        for (p, size) in sizes.iter().enumerate() {
            let mut seg = String::new();
            open_segment(dir.path(), 7, p)
                .expect("open")
                .read_to_string(&mut seg)
                .expect("read");
            assert_eq!(seg.len() as u64, *size);
            let keys: Vec<&str> = seg
                .lines()
                .map(|l| l.split('\t').next().unwrap_or(""))
                .collect();
            let mut sorted = keys.clone();
            sorted.sort();
            assert_eq!(keys, sorted);
            for k in &keys {
                assert_eq!(partition_of(k.as_bytes(), 3), p);
            }
            all.extend(seg.lines().map(String::from));
        }
        all.sort();
        assert_eq!(all, ["a\t1", "a\t9", "b\t1", "b\t3", "c\t2"]);

        assert_eq!(
            merged(&[b"a\t1\nc\t1\n", b"b\t2\nc\t2", b""]),
            b"a\t1\nb\t2\nc\t1\nc\t2\n"
        );
        // Equal keys come in the order of their sources, not of their values.
        assert_eq!(
            merged(&[b"b\t9\nb\t8\n", b"a\t0\nb\t1\n", b"b\t5\nc"]),
            b"a\t0\nb\t9\nb\t8\nb\t1\nb\t5\nc\n"
        );
    }

    fn merged(runs: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        merge_sorted(runs.to_vec(), |l| {
            out.extend_from_slice(l);
            Ok(())
        })
        .expect("merge");
        out
    }

    #[test]
    fn spilled_runs_merge_into_one_sorted_output() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = ShuffleWriter::new(dir.path(), 1, 2);
        for i in (0..1000).rev() {
            w.push_line(format!("k{:04}\tv\n", i % 300).as_bytes())
                .expect("push");
            if i % 250 == 0 {
                w.spill().expect("spill");
            }
        }
        let sizes = w.finish().expect("finish");
        let mut count = 0;
        for (p, size) in sizes.iter().enumerate() {
            let mut seg = String::new();
            open_segment(dir.path(), 1, p)
                .expect("open")
                .read_to_string(&mut seg)
                .expect("read");
            assert_eq!(seg.len() as u64, *size);
            let lines: Vec<&str> = seg.lines().collect();
            let mut sorted = lines.clone();
            sorted.sort();
            assert_eq!(lines, sorted);
            count += lines.len();
        }
        assert_eq!(count, 1000);
        assert!(!dir.path().join("1.spill0").exists());
    }
}
