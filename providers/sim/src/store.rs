//! The simulated account's record set on disk: the SQLite database
//! `$home/sim/state.db`, in WAL mode.
//!
//! This module owns the schema, the connections and the transactions. It
//! knows nothing of the simulated API's rules (faults, capacity, idempotency):
//! `lib.rs` decides those in jobs that run inside a transaction here. It must
//! not hold the account in memory: every operation reads and writes only the
//! rows it touches, so its cost does not grow with the number of instances.
//!
//! Tables:
//! - `instances`: one row per live or stopped instance, keyed by its number
//!   (`sim-{n:08x}`), its tags as a JSON object (terminated ones are deleted);
//! - `tags`: one row per tag, keyed by (key, value, instance): the index the
//!   list filter walks, in instance order;
//! - `tokens`: client token -> the launch it made;
//! - `meta`: the format version, the next instance number, the live count.
//!
//! Safety across processes is SQLite's own locking: a write is one `BEGIN
//! IMMEDIATE` transaction (one writer at a time; the others wait up to
//! [`BUSY_TIMEOUT`]), readers never block the writer (WAL) and see only
//! committed transactions. A writer killed half way leaves an uncommitted
//! transaction that SQLite discards on the next open. Commits are not fsynced
//! (`synchronous=NORMAL`): a killed process loses nothing it committed; a
//! power cut may lose the last commits, which a simulated cloud can afford.
//!
//! Concurrent mutations from many tasks of one process are group-committed:
//! whoever holds the writer mutex drains every queued mutation and runs them
//! in one transaction, each in its own savepoint (a failed one changes nothing).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use motorpool_provider::{ProviderError, Result, TagFilter, Tags, private_files};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use tokio::sync::oneshot;

/// The schema version this code reads and writes (`meta.format`); version 1
/// was the single JSON file `state.json`.
pub(crate) const FORMAT_VERSION: i64 = 2;

/// How long a writer waits for another process's transaction to end.
pub(crate) const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// A filtered list walks the index of one of its tag pairs and checks the
/// others per row. Which pair: the one with the fewest matches, counted up to
/// this many rows each, so choosing costs a bounded number of index steps
/// however large the account is.
const PROBE_LIMIT: i64 = 128;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS instances (
    n           INTEGER PRIMARY KEY,
    node_type   TEXT NOT NULL,
    image       TEXT NOT NULL,
    stopped     INTEGER NOT NULL,
    launched_ms INTEGER NOT NULL,
    started_ms  INTEGER,
    tags        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    key   TEXT NOT NULL,
    value TEXT NOT NULL,
    n     INTEGER NOT NULL,
    PRIMARY KEY (key, value, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    token       TEXT PRIMARY KEY,
    first       INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    node_type   TEXT NOT NULL,
    image       TEXT NOT NULL,
    launched_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// One instance record.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rec {
    pub node_type: String,
    pub image: String,
    pub stopped: bool,
    pub tags: Tags,
    /// Unix milliseconds of the launch.
    pub launched_ms: u64,
    /// Unix milliseconds of the last start after a stop (boot time counts from here).
    pub started_ms: Option<u64>,
}

impl Rec {
    /// When the instance last began booting.
    pub fn boot_start_ms(&self) -> u64 {
        self.started_ms.unwrap_or(self.launched_ms)
    }
}

/// What one client token launched: `count` consecutive numbers from `first`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TokenRec {
    pub first: u64,
    pub count: u32,
    pub node_type: String,
    pub image: String,
    pub launched_ms: u64,
}

impl TokenRec {
    pub fn numbers(&self) -> impl Iterator<Item = u64> + use<> {
        self.first..self.first + u64::from(self.count)
    }
}

/// `sim-000001a3`.
pub(crate) fn format_id(n: u64) -> String {
    format!("sim-{n:08x}")
}

/// The number of an id this provider made (`None` for any other string).
pub(crate) fn parse_id(id: &str) -> Option<u64> {
    let hex = id.strip_prefix("sim-")?;
    if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let n = u64::from_str_radix(hex, 16).ok()?;
    (format_id(n) == id).then_some(n)
}

/// What a mutation returns to its caller.
#[derive(Debug)]
pub(crate) enum Outcome {
    Instances(Vec<motorpool_provider::Instance>),
    Done,
    Found(bool),
}

/// A mutation: runs inside a transaction with the batch's clock (Unix ms),
/// returns its outcome and whether it changed anything. On `Err` whatever it
/// wrote is rolled back.
pub(crate) type Job = Box<dyn FnOnce(&Tx<'_>, u64) -> Result<(Outcome, bool)> + Send>;

struct Pending {
    id: u64,
    job: Job,
    reply: oneshot::Sender<Result<Outcome>>,
}

/// Removes a job from the queue when its caller goes away before a leader took it.
struct Dequeue<'a> {
    queue: &'a Mutex<Vec<Pending>>,
    id: u64,
}

impl Drop for Dequeue<'_> {
    fn drop(&mut self) {
        lock(self.queue).retain(|p| p.id != self.id);
    }
}

pub(crate) struct Store {
    dir: PathBuf,
    db_path: PathBuf,
    /// The connection transactions run on (opened on first use).
    writer_conn: Mutex<Option<Connection>>,
    /// The connection lists read on, so that they do not wait for commits.
    reader_conn: Mutex<Option<Connection>>,
    queue: Mutex<Vec<Pending>>,
    writer: tokio::sync::Mutex<()>,
    next_job: AtomicU64,
    /// Transactions committed by this store.
    writes: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// A database error as the provider reports it, naming the file.
fn db_error(db: &Path, e: rusqlite::Error) -> ProviderError {
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => corrupt(db, &e),
        _ => ProviderError::Internal(format!("sim: the state database {}: {e}", db.display())),
    }
}

fn corrupt(db: &Path, e: &dyn std::fmt::Display) -> ProviderError {
    ProviderError::Internal(format!(
        "sim: the state database {} is corrupt ({e}); delete it (with its -wal and -shm \
         files) to reset the simulated account",
        db.display()
    ))
}

impl Store {
    /// A store for `dir` (`$home/sim`), creating the directory. Opens the
    /// database only on first use.
    pub fn open(dir: PathBuf) -> Result<Store> {
        private_files::create_dir(&dir).map_err(|e| {
            ProviderError::Internal(format!(
                "sim: cannot create directory {}: {e}",
                dir.display()
            ))
        })?;
        Ok(Store {
            db_path: dir.join("state.db"),
            dir,
            writer_conn: Mutex::new(None),
            reader_conn: Mutex::new(None),
            queue: Mutex::new(Vec::new()),
            writer: tokio::sync::Mutex::new(()),
            next_job: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        })
    }

    /// How many transactions this store committed.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// One page of the instances whose tags hold every pair of `filter`, in
    /// number order, after `after`: at most `limit + 1` of them (the extra one
    /// says there is a next page).
    pub async fn list(
        self: &Arc<Self>,
        filter: &TagFilter,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Rec)>> {
        let store = Arc::clone(self);
        let filter: Vec<(String, String)> =
            filter.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&store.reader_conn);
            let conn = store.connection(&mut guard)?;
            list_page(conn, &store.db_path, &filter, after, limit)
        })
        .await
        .map_err(|e| ProviderError::Internal(format!("sim: state reader failed: {e}")))?
    }

    /// The instances numbered `numbers` that exist, read by key (a node's
    /// look-up of its own record: never a scan).
    pub async fn get_many(self: &Arc<Self>, numbers: BTreeSet<u64>) -> Result<Vec<(u64, Rec)>> {
        let store = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&store.reader_conn);
            let conn = store.connection(&mut guard)?;
            if !conn.is_autocommit() {
                conn.execute_batch("ROLLBACK")
                    .map_err(|e| db_error(&store.db_path, e))?;
            }
            Tx {
                conn,
                db: &store.db_path,
            }
            .get_many(&numbers)
        })
        .await
        .map_err(|e| ProviderError::Internal(format!("sim: state reader failed: {e}")))?
    }

    /// Apply `job` in a transaction (group-committed with any other mutations
    /// queued at the same time).
    pub async fn mutate(self: &Arc<Self>, job: Job) -> Result<Outcome> {
        let (reply, mut rx) = oneshot::channel();
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        lock(&self.queue).push(Pending { id, job, reply });
        // Cancelled before a leader took the job: take it back, so that it does
        // not run later behind the caller's back.
        let _dequeue = Dequeue {
            queue: &self.queue,
            id,
        };
        {
            let _writer = self.writer.lock().await;
            match rx.try_recv() {
                // A previous leader already ran our job.
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => return Err(lost_writer()),
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch = std::mem::take(&mut *lock(&self.queue));
            if !batch.is_empty() {
                let store = Arc::clone(self);
                // Once spawned, the commit runs to the end even if we are
                // cancelled, and answers every job of the batch.
                tokio::task::spawn_blocking(move || store.commit(batch))
                    .await
                    .map_err(|e| {
                        ProviderError::Internal(format!("sim: state writer failed: {e}"))
                    })?;
            }
        }
        // Our job was in our batch, or in one that a leader before us was
        // cancelled while committing (its commit runs on and answers us).
        rx.await.map_err(|_| lost_writer())?
    }

    #[cfg(test)]
    pub async fn hold_writer(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.writer.lock().await
    }

    /// Run a batch of mutations and answer each.
    fn commit(&self, batch: Vec<Pending>) {
        let (jobs, replies): (Vec<Job>, Vec<_>) =
            batch.into_iter().map(|p| (p.job, p.reply)).unzip();
        match self.run(jobs) {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// In one transaction: every job in its own savepoint, then commit (or
    /// roll back when no job changed anything). `Err` when the transaction
    /// itself failed (no job took effect).
    fn run(&self, jobs: Vec<Job>) -> Result<Vec<Result<Outcome>>> {
        let mut guard = lock(&self.writer_conn);
        let conn = self.connection(&mut guard)?;
        let db = self.db_path.as_path();
        let sql = |text: &str| conn.execute_batch(text).map_err(|e| db_error(db, e));
        if !conn.is_autocommit() {
            // A batch that died half way (a panicking job): forget its work.
            sql("ROLLBACK")?;
        }
        sql("BEGIN IMMEDIATE")?;
        let tx = Tx { conn, db };
        let now = now_ms();
        let mut changed = false;
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            let attempt = sql("SAVEPOINT job").and_then(|()| match job(&tx, now) {
                Ok((outcome, c)) => sql("RELEASE job").map(|()| Ok((outcome, c))),
                Err(e) => sql("ROLLBACK TO job; RELEASE job").map(|()| Err(e)),
            });
            match attempt {
                Ok(Ok((outcome, c))) => {
                    changed |= c;
                    results.push(Ok(outcome));
                }
                Ok(Err(e)) => results.push(Err(e)),
                Err(e) => {
                    let _ = sql("ROLLBACK");
                    return Err(e);
                }
            }
        }
        if changed {
            if let Err(e) = sql("COMMIT") {
                let _ = sql("ROLLBACK");
                return Err(e);
            }
            self.writes.fetch_add(1, Ordering::Relaxed);
        } else {
            sql("ROLLBACK")?;
        }
        Ok(results)
    }

    /// The connection in `slot`, opened (and the schema made) on first use.
    fn connection<'a>(&self, slot: &'a mut Option<Connection>) -> Result<&'a Connection> {
        if slot.is_none() {
            *slot = Some(self.connect()?);
        }
        slot.as_ref()
            .ok_or_else(|| ProviderError::Internal("sim: no database connection".to_string()))
    }

    fn connect(&self) -> Result<Connection> {
        let db = self.db_path.as_path();
        private_files::create_dir(&self.dir).map_err(|e| {
            ProviderError::Internal(format!(
                "sim: cannot create directory {}: {e}",
                self.dir.display()
            ))
        })?;
        // The records hold launch user data (credentials): the database is
        // private, and SQLite gives its -wal and -shm files the same mode.
        private_files::open(db, fs::OpenOptions::new().create(true).append(true)).map_err(|e| {
            ProviderError::Internal(format!("sim: cannot open {}: {e}", db.display()))
        })?;
        let conn = Connection::open_with_flags(
            db,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| db_error(db, e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| db_error(db, e))?;
        conn.set_prepared_statement_cache_capacity(64);
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| db_error(db, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(ProviderError::Internal(format!(
                "sim: the state database {} cannot use write-ahead logging (journal mode {mode})",
                db.display()
            )));
        }
        conn.execute_batch("PRAGMA synchronous=NORMAL")
            .map_err(|e| db_error(db, e))?;
        // Make the schema once: a second process waits for the first's
        // transaction, then finds the tables there.
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {SCHEMA}
             INSERT OR IGNORE INTO meta (key, value) VALUES
                 ('format', {FORMAT_VERSION}), ('next', 1), ('live', 0);
             COMMIT;"
        ))
        .map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            db_error(db, e)
        })?;
        let format: i64 = conn
            .query_row("SELECT value FROM meta WHERE key = 'format'", [], |r| {
                r.get(0)
            })
            .map_err(|e| db_error(db, e))?;
        if format != FORMAT_VERSION {
            return Err(ProviderError::Internal(format!(
                "sim: the state database {} has format version {format}, this motorpool reads \
                 version {FORMAT_VERSION}",
                db.display()
            )));
        }
        Ok(conn)
    }
}

fn lost_writer() -> ProviderError {
    ProviderError::Internal("sim: the state writer went away before answering".to_string())
}

/// The columns a [`Rec`] is read from, in [`read_rec`]'s order (after `n`).
const REC_COLUMNS: &str = "i.node_type, i.image, i.stopped, i.launched_ms, i.started_ms, i.tags";

/// A [`Rec`] from a row whose columns from `at` on are [`REC_COLUMNS`]. The
/// tags are decoded from the row's own text (not copied out first).
fn read_rec(db: &Path, row: &rusqlite::Row<'_>, at: usize) -> Result<Rec> {
    let err = |e| db_error(db, e);
    let started: Option<i64> = row.get(at + 4).map_err(err)?;
    let tags = row
        .get_ref(at + 5)
        .map_err(err)?
        .as_str()
        .map_err(|e| corrupt(db, &e))?;
    Ok(Rec {
        node_type: row.get(at).map_err(err)?,
        image: row.get(at + 1).map_err(err)?,
        stopped: row.get::<_, i64>(at + 2).map_err(err)? != 0,
        tags: decode_tags(db, tags)?,
        launched_ms: to_u64(row.get(at + 3).map_err(err)?),
        started_ms: started.map(to_u64),
    })
}

/// The tags column as [`encode_tags`] wrote it: a JSON object of strings.
fn decode_tags(db: &Path, text: &str) -> Result<Tags> {
    match decode_plain_tags(text) {
        Some(tags) => Ok(tags),
        None => serde_json::from_str(text).map_err(|e| corrupt(db, &e)),
    }
}

/// What `serde_json` makes of `text`, for the text `encode_tags` writes for
/// tags without escapes: `{"k":"v","k2":"v2"}`, no white space, keys in
/// increasing order. `None` for anything else (an escape, a control
/// character, white space, keys out of order or repeated, not an object of
/// strings), which [`decode_tags`] leaves to `serde_json`. Listing a large
/// account decodes every record's tags: this reads them without a generic
/// parser, and builds the map from sorted pairs rather than key by key.
fn decode_plain_tags(text: &str) -> Option<Tags> {
    let mut rest = text.strip_prefix('{')?.strip_suffix('}')?;
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(12);
    while !rest.is_empty() {
        if !pairs.is_empty() {
            rest = rest.strip_prefix(',')?;
        }
        let (key, after) = plain_string(rest)?;
        let (value, after) = plain_string(after.strip_prefix(':')?)?;
        if pairs.last().is_some_and(|(last, _)| last.as_str() >= key) {
            return None;
        }
        pairs.push((key.to_string(), value.to_string()));
        rest = after;
    }
    // In order already: the map is built without comparing keys to place them.
    Some(pairs.into_iter().collect())
}

/// A JSON string without escapes at the start of `text`, and what follows it.
fn plain_string(text: &str) -> Option<(&str, &str)> {
    let text = text.strip_prefix('"')?;
    let mut end = 0;
    loop {
        match *text.as_bytes().get(end)? {
            b'"' => break,
            // An escape, or a control character (not JSON: serde_json says so).
            b'\\' | 0..0x20 => return None,
            _ => end += 1,
        }
    }
    // A quote is one byte, never inside a longer UTF-8 character.
    Some((text.get(..end)?, text.get(end + 1..)?))
}

fn encode_tags(tags: &Tags) -> Result<String> {
    serde_json::to_string(tags)
        .map_err(|e| ProviderError::Internal(format!("sim: cannot encode tags: {e}")))
}

fn list_page(
    conn: &Connection,
    db: &Path,
    filter: &[(String, String)],
    after: Option<u64>,
    limit: usize,
) -> Result<Vec<(u64, Rec)>> {
    let after = after.map(to_i64).unwrap_or(0);
    let take = i64::try_from(limit.saturating_add(1)).unwrap_or(i64::MAX);
    let err = |e| db_error(db, e);
    if !conn.is_autocommit() {
        conn.execute_batch("ROLLBACK").map_err(err)?;
    }
    // One read transaction: the probes and the page see the same commit.
    conn.execute_batch("BEGIN").map_err(err)?;
    let page = (|| {
        let mut pairs: Vec<&(String, String)> = filter.iter().collect();
        if pairs.len() > 1 {
            let mut probe = conn
                .prepare_cached(
                    "SELECT count(*) FROM (SELECT 1 FROM tags \
                     WHERE key = ?1 AND value = ?2 AND n > ?3 LIMIT ?4)",
                )
                .map_err(err)?;
            let mut counted = Vec::with_capacity(pairs.len());
            for (k, v) in &pairs {
                let c: i64 = probe
                    .query_row(params![k, v, after, PROBE_LIMIT], |r| r.get(0))
                    .map_err(err)?;
                counted.push(c);
            }
            let best = (0..pairs.len()).min_by_key(|&i| counted[i]).unwrap_or(0);
            pairs.swap(0, best);
        }
        let sql = match pairs.split_first() {
            None => format!(
                "SELECT i.n, {REC_COLUMNS} FROM instances i WHERE i.n > ?1 ORDER BY i.n LIMIT ?2"
            ),
            Some((_, rest)) => {
                let mut sql = format!(
                    "SELECT i.n, {REC_COLUMNS} FROM tags t CROSS JOIN instances i ON i.n = t.n \
                     WHERE t.key = ?3 AND t.value = ?4 AND t.n > ?1"
                );
                for j in 0..rest.len() {
                    let (k, v) = (5 + 2 * j, 6 + 2 * j);
                    sql.push_str(&format!(
                        " AND EXISTS (SELECT 1 FROM tags x WHERE x.key = ?{k} AND x.value = ?{v} \
                         AND x.n = t.n)"
                    ));
                }
                sql.push_str(" ORDER BY t.n LIMIT ?2");
                sql
            }
        };
        let mut values: Vec<&dyn rusqlite::ToSql> = vec![&after, &take];
        for (k, v) in &pairs {
            values.push(k);
            values.push(v);
        }
        let mut stmt = conn.prepare_cached(&sql).map_err(err)?;
        let mut rows = stmt.query(values.as_slice()).map_err(err)?;
        let mut page = Vec::with_capacity(limit.saturating_add(1).min(4096));
        while let Some(row) = rows.next().map_err(err)? {
            let n: i64 = row.get(0).map_err(err)?;
            page.push((to_u64(n), read_rec(db, row, 1)?));
        }
        Ok(page)
    })();
    let end = conn.execute_batch("COMMIT").map_err(err);
    page.and_then(|page| end.map(|()| page))
}

/// The account inside one write transaction: what jobs read and change.
pub(crate) struct Tx<'c> {
    conn: &'c Connection,
    db: &'c Path,
}

impl Tx<'_> {
    fn err(&self, e: rusqlite::Error) -> ProviderError {
        db_error(self.db, e)
    }

    fn exec(&self, sql: &str, values: &[&dyn rusqlite::ToSql]) -> Result<usize> {
        self.conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(values))
            .map_err(|e| self.err(e))
    }

    fn meta(&self, key: &str) -> Result<u64> {
        self.conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get::<_, i64>(0)))
            .map(to_u64)
            .map_err(|e| self.err(e))
    }

    fn add_live(&self, delta: i64) -> Result<()> {
        if delta != 0 {
            self.exec(
                "UPDATE meta SET value = value + ?1 WHERE key = 'live'",
                &[&delta],
            )?;
        }
        Ok(())
    }

    /// The instance numbered `n`, if it exists.
    pub fn get(&self, n: u64) -> Result<Option<Rec>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {REC_COLUMNS} FROM instances i WHERE i.n = ?1"
            ))
            .map_err(|e| self.err(e))?;
        let mut rows = stmt.query([to_i64(n)]).map_err(|e| self.err(e))?;
        match rows.next().map_err(|e| self.err(e))? {
            None => Ok(None),
            Some(row) => read_rec(self.db, row, 0).map(Some),
        }
    }

    /// The instances of `numbers` that exist (each once, in number order).
    pub fn get_many(&self, numbers: &BTreeSet<u64>) -> Result<Vec<(u64, Rec)>> {
        let mut found = Vec::with_capacity(numbers.len());
        for &n in numbers {
            if let Some(rec) = self.get(n)? {
                found.push((n, rec));
            }
        }
        Ok(found)
    }

    /// Add a new instance numbered `n`.
    pub fn insert(&self, n: u64, rec: &Rec) -> Result<()> {
        self.exec(
            "INSERT INTO instances (n, node_type, image, stopped, launched_ms, started_ms, tags) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            &[
                &to_i64(n),
                &rec.node_type,
                &rec.image,
                &i64::from(rec.stopped),
                &to_i64(rec.launched_ms),
                &rec.started_ms.map(to_i64),
                &encode_tags(&rec.tags)?,
            ],
        )?;
        for (k, v) in &rec.tags {
            self.insert_tag(n, k, v)?;
        }
        self.add_live(i64::from(!rec.stopped))
    }

    fn insert_tag(&self, n: u64, key: &str, value: &str) -> Result<()> {
        self.exec(
            "INSERT INTO tags (key, value, n) VALUES (?1, ?2, ?3)",
            &[&key, &value, &to_i64(n)],
        )
        .map(drop)
    }

    fn delete_tag(&self, n: u64, key: &str, value: &str) -> Result<()> {
        self.exec(
            "DELETE FROM tags WHERE key = ?1 AND value = ?2 AND n = ?3",
            &[&key, &value, &to_i64(n)],
        )
        .map(drop)
    }

    /// Delete the instance numbered `n`; `false` when there was none.
    pub fn remove(&self, n: u64) -> Result<bool> {
        let Some(rec) = self.get(n)? else {
            return Ok(false);
        };
        self.exec("DELETE FROM instances WHERE n = ?1", &[&to_i64(n)])?;
        for (k, v) in &rec.tags {
            self.delete_tag(n, k, v)?;
        }
        self.add_live(-i64::from(!rec.stopped))?;
        Ok(true)
    }

    /// Replace instance `n`'s record `before` (as read in this transaction) by `after`.
    pub fn update(&self, n: u64, before: &Rec, after: &Rec) -> Result<()> {
        if before == after {
            return Ok(());
        }
        self.exec(
            "UPDATE instances SET node_type = ?2, image = ?3, stopped = ?4, launched_ms = ?5, \
             started_ms = ?6, tags = ?7 WHERE n = ?1",
            &[
                &to_i64(n),
                &after.node_type,
                &after.image,
                &i64::from(after.stopped),
                &to_i64(after.launched_ms),
                &after.started_ms.map(to_i64),
                &encode_tags(&after.tags)?,
            ],
        )?;
        for (k, v) in &before.tags {
            if after.tags.get(k) != Some(v) {
                self.delete_tag(n, k, v)?;
            }
        }
        for (k, v) in &after.tags {
            if before.tags.get(k) != Some(v) {
                self.insert_tag(n, k, v)?;
            }
        }
        self.add_live(i64::from(!after.stopped) - i64::from(!before.stopped))
    }

    /// What the launch with client token `token` made, if there was one.
    pub fn token(&self, token: &str) -> Result<Option<TokenRec>> {
        self.conn
            .prepare_cached(
                "SELECT first, count, node_type, image, launched_ms FROM tokens WHERE token = ?1",
            )
            .and_then(|mut s| {
                s.query_row([token], |r| {
                    Ok(TokenRec {
                        first: to_u64(r.get(0)?),
                        count: u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                        node_type: r.get(2)?,
                        image: r.get(3)?,
                        launched_ms: to_u64(r.get(4)?),
                    })
                })
                .optional()
            })
            .map_err(|e| self.err(e))
    }

    pub fn insert_token(&self, token: &str, rec: &TokenRec) -> Result<()> {
        self.exec(
            "INSERT INTO tokens (token, first, count, node_type, image, launched_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[
                &token,
                &to_i64(rec.first),
                &i64::from(rec.count),
                &rec.node_type,
                &rec.image,
                &to_i64(rec.launched_ms),
            ],
        )
        .map(drop)
    }

    /// The number the next launched instance gets.
    pub fn next_number(&self) -> Result<u64> {
        self.meta("next")
    }

    pub fn set_next_number(&self, next: u64) -> Result<()> {
        self.exec(
            "UPDATE meta SET value = ?1 WHERE key = 'next'",
            &[&to_i64(next)],
        )
        .map(drop)
    }

    /// Instances neither stopped nor terminated.
    pub fn live_count(&self) -> Result<u64> {
        self.meta("live")
    }
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
impl Store {
    /// Check every invariant of the schema on a fresh connection: SQLite's
    /// own integrity check, each instance's tag rows equal to its tags, the
    /// live count, and the id counter above every id handed out.
    pub fn check_consistency(&self) -> Result<()> {
        let db = self.db_path.as_path();
        let broken = |what: String| ProviderError::Internal(format!("sim: inconsistent: {what}"));
        let conn = self.connect()?;
        let err = |e| db_error(db, e);
        let integrity: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(err)?;
        if integrity != "ok" {
            return Err(broken(integrity));
        }
        let mut from_rows: std::collections::BTreeMap<u64, Tags> = Default::default();
        let mut stmt = conn
            .prepare("SELECT n, key, value FROM tags")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((to_u64(r.get(0)?), r.get::<_, String>(1)?, r.get(2)?))
            })
            .map_err(err)?;
        for row in rows {
            let (n, k, v) = row.map_err(err)?;
            from_rows.entry(n).or_default().insert(k, v);
        }
        let mut stmt = conn
            .prepare(&format!("SELECT i.n, {REC_COLUMNS} FROM instances i"))
            .map_err(err)?;
        let mut rows = stmt.query([]).map_err(err)?;
        let (mut live, mut max_n) = (0u64, 0u64);
        while let Some(row) = rows.next().map_err(err)? {
            let n = to_u64(row.get(0).map_err(err)?);
            let rec = read_rec(db, row, 1)?;
            let tags = rec.tags;
            let indexed = from_rows.remove(&n).unwrap_or_default();
            if indexed != tags {
                return Err(broken(format!(
                    "{}: tags {tags:?}, tag rows {indexed:?}",
                    format_id(n)
                )));
            }
            live += u64::from(!rec.stopped);
            max_n = max_n.max(n);
        }
        if let Some(n) = from_rows.keys().next() {
            return Err(broken(format!("tag rows of a missing {}", format_id(*n))));
        }
        let meta = |key: &str| -> Result<u64> {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                r.get::<_, i64>(0)
            })
            .map(to_u64)
            .map_err(err)
        };
        if meta("live")? != live {
            return Err(broken(format!("live count {} for {live}", meta("live")?)));
        }
        let last_token: i64 = conn
            .query_row(
                "SELECT coalesce(max(first + count), 1) FROM tokens",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let next = meta("next")?;
        if next <= max_n || next < to_u64(last_token) {
            return Err(broken(format!("next number {next} after {max_n}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `decode_tags` as it was: `serde_json` alone.
    fn by_serde(text: &str) -> Option<Tags> {
        serde_json::from_str(text).ok()
    }

    fn decoded(text: &str) -> Option<Tags> {
        decode_tags(Path::new("state.db"), text).ok()
    }

    #[test]
    fn tags_decode_as_serde_json_reads_them() {
        let odd = [
            r#"{}"#,
            r#"{"a":"1"}"#,
            r#"{"a":"1","b":""}"#,
            r#"{"":"x"}"#,
            r#"{"a":"x,\"b\":\"y"}"#,
            r#"{"a":"b:c,d}","e":"{f}"}"#,
            r#"{"k":"back\\slash","n":"line\nbreak","u":"\u00e9"}"#,
            r#"{"é":"ü","😀":"✓"}"#,
            r#"{"b":"1","a":"2"}"#,
            r#"{"a":"1","a":"2"}"#,
            r#"{ "a" : "1" }"#,
            r#"{"a":"1",}"#,
            r#"{,}"#,
            r#"{"a":"1"}}"#,
            r#"{"a":1}"#,
            r#"{"a":null}"#,
            r#"{"a":"1""#,
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"\t\"}",
            r#"[]"#,
            r#""#,
            r#"{"#,
            r#"}"#,
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":"1" ,"b":"2"}"#,
        ];
        for text in odd {
            assert_eq!(decoded(text), by_serde(text), "{text}");
        }
        // What the engine writes takes the direct way.
        let written =
            r#"{"motorpool-kind":"cluster","motorpool-name":"c0001","motorpool-step":"ready"}"#;
        assert_eq!(decode_plain_tags(written), by_serde(written));
        assert!(decode_plain_tags(r#"{"a":"x\"y"}"#).is_none());
    }

    proptest! {
        #[test]
        fn encoded_tags_decode_to_themselves(tags in proptest::collection::btree_map(
            "\\PC{0,12}|[ -~]{0,12}|[a-z\"\\\\,:{}]{0,6}", "\\PC{0,12}|[ -~]{0,12}|[\\x00-\\x7f]{0,6}", 0..12
        )) {
            let text = encode_tags(&tags).expect("encodes");
            prop_assert_eq!(decoded(&text), Some(tags));
        }

        #[test]
        fn any_text_decodes_as_serde_json_reads_it(text in "\\{(\"[a-c\\\\,:{} \"]{0,3}\"[:,]?){0,4}\\}?") {
            prop_assert_eq!(decoded(&text), by_serde(&text));
        }
    }
}
