//! Job data on object storage: what a data URL is (`s3://`, `gs://`,
//! `az://`), and listing, ranged reading and writing of the objects behind
//! one, through Apache Arrow's `object_store`.
//!
//! Owns: [`is_data_url`] (the one rule for "this input/output is not a
//! local path"), [`DataUrl`] (parsing and the checks `validate`, the
//! planner, the client and the executor share), the stores per bucket with
//! credentials from each cloud's standard chain ([`Stores`]), and the
//! object operations the runtime needs. It must not know jobs, partitions
//! or the runtime's protocol: it lists, reads byte ranges and writes
//! objects, and every error names the URL it concerns.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::io::AsyncWriteExt;

/// Characters that make a key a glob (the `glob` crate's: `*`, `?`, `[`).
const GLOB_CHARS: [char; 3] = ['*', '?', '['];

/// Bytes read per ranged GET when a range is streamed.
pub const READ_CHUNK: u64 = 8 << 20;
/// Ranged GETs in flight per stream.
pub const READ_AHEAD: usize = 4;

/// True when `s` is a URL (it has `://`), not a local path: the one rule
/// every layer uses to tell the two apart. Whether the URL is one motorpool
/// can read is [`DataUrl::parse`]'s answer.
pub fn is_data_url(s: &str) -> bool {
    s.contains("://")
}

/// The object stores motorpool reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// `s3://BUCKET/KEY` (also `s3a://`).
    S3,
    /// `gs://BUCKET/KEY`.
    Gcs,
    /// `az://CONTAINER/KEY` (also `azure://`), in the account the
    /// environment names (`AZURE_STORAGE_ACCOUNT_NAME`).
    Azure,
}

impl Scheme {
    fn of(scheme: &str) -> Option<Scheme> {
        match scheme {
            "s3" | "s3a" => Some(Scheme::S3),
            "gs" => Some(Scheme::Gcs),
            "az" | "azure" => Some(Scheme::Azure),
            _ => None,
        }
    }

    fn bucket_word(self) -> &'static str {
        match self {
            Scheme::Azure => "container",
            _ => "bucket",
        }
    }
}

/// Why a string is not a data URL motorpool can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("`{url}`: unknown scheme `{scheme}://` (object storage is s3://, gs:// or az://)")]
    UnknownScheme { url: String, scheme: String },
    #[error("`{url}` is not a valid object URL: {reason}")]
    Malformed { url: String, reason: String },
    #[error("`{url}` names no {word} (write {scheme}://{word}/path)")]
    NoBucket {
        url: String,
        scheme: String,
        word: &'static str,
    },
    #[error("`{url}`: an output is one prefix, not a glob (`{glob}` in it)")]
    GlobInOutput { url: String, glob: char },
}

/// A parsed `s3://`, `gs://` or `az://` URL: a bucket (container) and a
/// key, or a glob of keys. The key is kept as written (no percent-decoding).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataUrl {
    pub scheme: Scheme,
    /// What the user wrote before `://` (`s3`, `s3a`, ...).
    pub scheme_text: String,
    pub bucket: String,
    /// The path in the bucket, without a leading `/`; may be empty.
    pub key: String,
}

impl fmt::Display for DataUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}/{}", self.scheme_text, self.bucket, self.key)
    }
}

impl DataUrl {
    /// Parses `url`: a known scheme, a bucket, and a key of non-empty
    /// `/`-separated segments other than `.` and `..` (a trailing `/` is
    /// allowed). Globs are allowed in the key; [`DataUrl::parse_output`]
    /// refuses them.
    pub fn parse(url: &str) -> Result<DataUrl, UrlError> {
        let malformed = |reason: &str| UrlError::Malformed {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let Some((scheme_text, rest)) = url.split_once("://") else {
            return Err(malformed("it has no `scheme://`"));
        };
        if scheme_text.is_empty()
            || !scheme_text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err(malformed("the part before `://` is not a scheme"));
        }
        let Some(scheme) = Scheme::of(&scheme_text.to_ascii_lowercase()) else {
            return Err(UrlError::UnknownScheme {
                url: url.to_string(),
                scheme: scheme_text.to_string(),
            });
        };
        if let Some(c) = url.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(malformed(&format!("it contains {c:?}")));
        }
        if url.contains('#') {
            return Err(malformed("`#` (a fragment) is not part of an object URL"));
        }
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(UrlError::NoBucket {
                url: url.to_string(),
                scheme: scheme_text.to_string(),
                word: scheme.bucket_word(),
            });
        }
        if let Some(c) = bucket
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(malformed(&format!(
                "{c:?} cannot be in a {} name",
                scheme.bucket_word()
            )));
        }
        let trimmed = key.strip_suffix('/').unwrap_or(key);
        if !trimmed.is_empty() {
            for seg in trimmed.split('/') {
                if seg.is_empty() {
                    return Err(malformed("it has an empty path segment (`//`)"));
                }
                if seg == "." || seg == ".." {
                    return Err(malformed(&format!("`{seg}` is not a path segment here")));
                }
            }
        }
        Ok(DataUrl {
            scheme,
            scheme_text: scheme_text.to_string(),
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// [`DataUrl::parse`] for a task's `output`: a prefix the `part-NNNNN`
    /// objects go under, so no glob.
    pub fn parse_output(url: &str) -> Result<DataUrl, UrlError> {
        let u = DataUrl::parse(url)?;
        if let Some(glob) = u.key.chars().find(|c| GLOB_CHARS.contains(c)) {
            return Err(UrlError::GlobInOutput {
                url: url.to_string(),
                glob,
            });
        }
        Ok(u)
    }

    /// Whether the key is a glob.
    pub fn is_glob(&self) -> bool {
        self.key.contains(GLOB_CHARS)
    }

    /// The directory to list for this key: everything up to the last `/`
    /// before its first glob character (before its last segment when it has
    /// none: a key names an object or a directory, and a listing of a prefix
    /// holds only what is under it).
    pub fn list_prefix(&self) -> &str {
        let key = self.key.trim_end_matches('/');
        let end = key.find(GLOB_CHARS).unwrap_or(key.len());
        match key[..end].rfind('/') {
            Some(j) => &key[..j],
            None => "",
        }
    }

    /// The URL of the object `key` in this URL's bucket.
    pub fn object(&self, key: &str) -> DataUrl {
        DataUrl {
            key: key.to_string(),
            ..self.clone()
        }
    }

    /// The object `name` under this URL taken as a prefix (`out/` + `part-00000`).
    pub fn child(&self, name: &str) -> DataUrl {
        let dir = self.key.trim_end_matches('/');
        self.object(&if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        })
    }

    fn path(&self) -> Result<ObjectPath, StorageError> {
        ObjectPath::parse(self.key.trim_end_matches('/')).map_err(|e| StorageError::Url {
            url: self.to_string(),
            message: e.to_string(),
        })
    }
}

/// What went wrong with an object store: always names the URL.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{url}: {message}")]
    Url { url: String, message: String },
    /// The store's own text already carries its causes: it is not a
    /// `source`, or an error chain would print each of them again.
    #[error("{url}: {error}")]
    Store {
        url: String,
        error: object_store::Error,
    },
    #[error("{url}: cannot reach the object store: {message}")]
    Setup { url: String, message: String },
}

fn store_error(url: &DataUrl) -> impl FnOnce(object_store::Error) -> StorageError + '_ {
    move |error| StorageError::Store {
        url: url.to_string(),
        error,
    }
}

/// An object a glob matched.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Object {
    /// `scheme://bucket/key`.
    pub url: String,
    pub size: u64,
}

/// One store per (scheme, bucket), made on first use from the environment:
/// each cloud's standard credential chain (environment variables, the
/// instance's role or service account or managed identity, the files its CLI
/// writes) and its standard endpoint overrides (`AWS_ENDPOINT_URL`,
/// `AWS_ALLOW_HTTP`, `GOOGLE_BASE_URL`, `AZURE_STORAGE_USE_EMULATOR` with
/// `AZURITE_BLOB_STORAGE_URL`, ...), as `object_store`'s `from_env` builders
/// read them.
#[derive(Default)]
pub struct Stores {
    stores: Mutex<HashMap<(Scheme, String), Arc<dyn ObjectStore>>>,
}

/// The process's stores.
pub fn stores() -> &'static Stores {
    static STORES: OnceLock<Stores> = OnceLock::new();
    STORES.get_or_init(Stores::default)
}

impl Stores {
    /// The store of `url`'s bucket.
    pub fn store(&self, url: &DataUrl) -> Result<Arc<dyn ObjectStore>, StorageError> {
        let k = (url.scheme, url.bucket.clone());
        let mut stores = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stores.get(&k) {
            return Ok(s.clone());
        }
        // TLS on rustls + ring (object_store is built without aws-lc);
        // installing twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let setup = |e: object_store::Error| StorageError::Setup {
            url: url.to_string(),
            message: e.to_string(),
        };
        let store: Arc<dyn ObjectStore> = match url.scheme {
            Scheme::S3 => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(&url.bucket)
                    .build()
                    .map_err(setup)?,
            ),
            Scheme::Gcs => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&url.bucket)
                    .build()
                    .map_err(setup)?,
            ),
            Scheme::Azure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&url.bucket)
                    .build()
                    .map_err(setup)?,
            ),
        };
        stores.insert(k, store.clone());
        Ok(store)
    }

    /// The objects `url` names (a key, or a glob of keys), sorted by URL,
    /// with their sizes. As with local files, a `*` does not cross `/`, and
    /// keys with a segment starting with `.` are left out.
    pub async fn list(&self, url: &DataUrl) -> Result<Vec<Object>, StorageError> {
        let store = self.store(url)?;
        let pattern =
            glob::Pattern::new(url.key.trim_end_matches('/')).map_err(|e| StorageError::Url {
                url: url.to_string(),
                message: format!("not a valid glob: {e}"),
            })?;
        let opts = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        let prefix = url.list_prefix();
        let prefix_path = if prefix.is_empty() {
            None
        } else {
            Some(ObjectPath::parse(prefix).map_err(|e| StorageError::Url {
                url: url.to_string(),
                message: e.to_string(),
            })?)
        };
        let mut listing = store.list(prefix_path.as_ref());
        let mut out = Vec::new();
        let exact = !url.is_glob();
        while let Some(meta) = listing.try_next().await.map_err(store_error(url))? {
            let key = meta.location.as_ref();
            let matched = if exact {
                // A key names that object, or everything under it as a directory.
                key == url.key.trim_end_matches('/')
                    || key.starts_with(&format!("{}/", url.key.trim_end_matches('/')))
            } else {
                pattern.matches_with(key, opts)
            };
            if !matched || key.split('/').any(|s| s.starts_with('.')) {
                continue;
            }
            out.push(Object {
                url: url.object(key).to_string(),
                size: meta.size,
            });
        }
        out.sort();
        Ok(out)
    }

    /// The bytes `[start, end)` of the object at `url`.
    pub async fn read(&self, url: &DataUrl, start: u64, end: u64) -> Result<Vec<u8>, StorageError> {
        if end <= start {
            return Ok(Vec::new());
        }
        let store = self.store(url)?;
        let path = url.path()?;
        let bytes = store
            .get_range(&path, start..end)
            .await
            .map_err(store_error(url))?;
        if bytes.len() as u64 != end - start {
            return Err(StorageError::Url {
                url: url.to_string(),
                message: format!(
                    "asked for bytes {start}..{end}, got {} (did the object change?)",
                    bytes.len()
                ),
            });
        }
        Ok(bytes.to_vec())
    }

    /// The byte range `[start, end)` of `url` as a stream of chunks of at
    /// most [`READ_CHUNK`], read by ranged GETs, [`READ_AHEAD`] at a time, in order.
    pub fn read_stream(
        &'static self,
        url: DataUrl,
        start: u64,
        end: u64,
    ) -> impl futures_util::Stream<Item = Result<Vec<u8>, StorageError>> + Send + 'static {
        let chunks: Vec<(u64, u64)> = (start..end)
            .step_by(READ_CHUNK as usize)
            .map(|a| (a, (a + READ_CHUNK).min(end)))
            .collect();
        futures_util::stream::iter(chunks)
            .map(move |(a, b)| {
                let url = url.clone();
                async move { self.read(&url, a, b).await }
            })
            .buffered(READ_AHEAD)
    }

    /// The offset just after the first newline at or after `from` in the
    /// object at `url` of `size` bytes (`size` when there is none).
    pub async fn next_line_start(
        &self,
        url: &DataUrl,
        from: u64,
        size: u64,
    ) -> Result<u64, StorageError> {
        let mut at = from;
        let mut chunk = 64u64 << 10;
        while at < size {
            let end = (at + chunk).min(size);
            let data = self.read(url, at, end).await?;
            if let Some(i) = data.iter().position(|&b| b == b'\n') {
                return Ok(at + i as u64 + 1);
            }
            at = end;
            chunk = (chunk * 2).min(READ_CHUNK);
        }
        Ok(size)
    }

    /// Deletes the `part-*` objects directly under the prefix `url` (an
    /// earlier run's output); returns how many went.
    pub async fn delete_parts(&self, url: &DataUrl) -> Result<usize, StorageError> {
        let store = self.store(url)?;
        let dir = url.key.trim_end_matches('/');
        let prefix = if dir.is_empty() {
            None
        } else {
            Some(url.path()?)
        };
        let old: Vec<ObjectPath> = store
            .list(prefix.as_ref())
            .map_ok(|m| m.location)
            .try_filter(|p| {
                let name = p.filename().unwrap_or_default();
                let parent_ok = match p.as_ref().rsplit_once('/') {
                    Some((parent, _)) => parent == dir,
                    None => dir.is_empty(),
                };
                futures_util::future::ready(parent_ok && name.starts_with("part-"))
            })
            .try_collect()
            .await
            .map_err(store_error(url))?;
        for p in &old {
            store.delete(p).await.map_err(store_error(url))?;
        }
        Ok(old.len())
    }

    /// A writer of the object `url`: buffered, uploaded in parts when large.
    /// The object appears only when [`ObjectWriter::finish`] succeeds; a
    /// writer dropped before that aborts its upload.
    pub fn writer(&self, url: &DataUrl) -> Result<ObjectWriter, StorageError> {
        let store = self.store(url)?;
        let path = url.path()?;
        Ok(ObjectWriter {
            url: url.to_string(),
            inner: Some(object_store::buffered::BufWriter::new(store, path)),
            bytes: 0,
        })
    }
}

/// An object being written (see [`Stores::writer`]).
pub struct ObjectWriter {
    url: String,
    inner: Option<object_store::buffered::BufWriter>,
    bytes: u64,
}

impl ObjectWriter {
    /// Appends `data`.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), StorageError> {
        let Some(w) = self.inner.as_mut() else {
            return Err(StorageError::Url {
                url: self.url.clone(),
                message: "written after it was finished".into(),
            });
        };
        w.write_all(data).await.map_err(|e| StorageError::Url {
            url: self.url.clone(),
            message: format!("cannot write: {e}"),
        })?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Completes the upload: the object exists from here on. Returns its size.
    pub async fn finish(mut self) -> Result<u64, StorageError> {
        if let Some(mut w) = self.inner.take() {
            w.shutdown().await.map_err(|e| StorageError::Url {
                url: self.url.clone(),
                message: format!("cannot complete the upload: {e}"),
            })?;
        }
        Ok(self.bytes)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(mut w) = self.inner.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = w.abort().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_and_bad_ones_say_what_is_wrong() {
        let u = DataUrl::parse("s3://data/logs/2024/*.txt").expect("s3");
        assert_eq!((u.scheme, u.bucket.as_str()), (Scheme::S3, "data"));
        assert_eq!(u.key, "logs/2024/*.txt");
        assert!(u.is_glob());
        assert_eq!(u.list_prefix(), "logs/2024");
        assert_eq!(u.to_string(), "s3://data/logs/2024/*.txt");
        assert_eq!(
            DataUrl::parse("gs://b/part-*.txt")
                .expect("gs")
                .list_prefix(),
            ""
        );
        assert_eq!(
            DataUrl::parse("az://c/a/b[0-9]/x")
                .expect("az")
                .list_prefix(),
            "a"
        );
        assert_eq!(
            DataUrl::parse("s3://b/logs/day1.txt")
                .expect("one")
                .list_prefix(),
            "logs"
        );
        assert_eq!(
            DataUrl::parse("s3://b/logs/").expect("dir").list_prefix(),
            ""
        );
        assert_eq!(DataUrl::parse("s3a://b/k").expect("s3a").scheme, Scheme::S3);
        assert_eq!(
            DataUrl::parse("azure://c/k").expect("azure").scheme,
            Scheme::Azure
        );
        let out = DataUrl::parse_output("s3://b/out/").expect("out");
        assert_eq!(out.child("part-00000").to_string(), "s3://b/out/part-00000");
        assert_eq!(
            DataUrl::parse_output("s3://b")
                .expect("bucket root")
                .child("part-00001")
                .key,
            "part-00001"
        );

        let err = |s: &str| DataUrl::parse(s).expect_err(s).to_string();
        assert_eq!(
            err("ftp://host/x"),
            "`ftp://host/x`: unknown scheme `ftp://` (object storage is s3://, gs:// or az://)"
        );
        assert_eq!(
            err("s3:///x.txt"),
            "`s3:///x.txt` names no bucket (write s3://bucket/path)"
        );
        assert_eq!(
            err("az://"),
            "`az://` names no container (write az://container/path)"
        );
        assert!(
            err("s3://b//x").contains("empty path segment"),
            "{}",
            err("s3://b//x")
        );
        assert!(err("s3://b/../x").contains("`..`"));
        assert!(err("s3://b/a b").contains("' '"));
        assert!(err("s3://bu@cket/x").contains("bucket name"));
        assert!(err("://x").contains("not a scheme"));
        assert_eq!(
            DataUrl::parse_output("gs://b/out/*")
                .expect_err("glob")
                .to_string(),
            "`gs://b/out/*`: an output is one prefix, not a glob (`*` in it)"
        );
        assert!(is_data_url("s3://b/x") && !is_data_url("data/*.txt"));
    }
}
