//! Signing Blob service requests with a storage account key: the
//! `SharedKey` `Authorization` header of a request, and the signature of a
//! read-only service SAS for one blob. Nothing else: which requests are sent
//! is `blob.rs`'s business.
//!
//! Both follow Azure Storage's REST documentation ("Authorize with Shared
//! Key" and "Create a service SAS"):
//!
//! - **SharedKey** (version 2015-02-21 and later): HMAC-SHA256 with the
//!   base64-decoded account key over `VERB`, the twelve standard headers in
//!   their fixed order (`Content-Length` empty when zero; `Date` empty since
//!   `x-ms-date` is sent), the canonicalized `x-ms-*` headers (lower-case,
//!   sorted, `name:value\n`) and the canonicalized resource
//!   (`/ACCOUNT` + the URL's path, then each query parameter, lower-case and
//!   sorted, as `\nname:value`).
//! - **Service SAS** (version 2020-12-06 and later): HMAC-SHA256 over
//!   sixteen lines (permissions, start, expiry, `/blob/ACCOUNT/CONTAINER/BLOB`,
//!   identifier, IP, protocol, version, resource, snapshot time, encryption
//!   scope and the five response-header overrides), sent as `sig`.
//!
//! The key never leaves this module except as a signature.

use base64::Engine;

/// The Blob service API version every request and SAS names.
pub const STORAGE_VERSION: &str = "2021-08-06";

/// An account name and its decoded key.
#[derive(Clone)]
pub struct AccountKey {
    pub account: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for AccountKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountKey")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

/// What a SharedKey signature covers of a request.
pub struct ToSign<'a> {
    pub method: &'a str,
    /// The request URL (its path and query are canonicalized).
    pub url: &'a url::Url,
    /// Every header sent (names in any case); the standard ones and the
    /// `x-ms-*` ones are signed.
    pub headers: &'a [(String, String)],
    pub content_length: usize,
}

impl AccountKey {
    /// From the account name and the key as Azure shows it (base64).
    pub fn new(account: &str, key_base64: &str) -> Result<AccountKey, String> {
        let key = base64::engine::general_purpose::STANDARD
            .decode(key_base64.trim())
            .map_err(|e| format!("the storage account key is not base64: {e}"))?;
        Ok(AccountKey {
            account: account.to_string(),
            key,
        })
    }

    fn hmac(&self, text: &str) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.key);
        base64::engine::general_purpose::STANDARD
            .encode(ring::hmac::sign(&key, text.as_bytes()).as_ref())
    }

    /// The string a SharedKey signature is computed over.
    pub fn string_to_sign(&self, request: &ToSign<'_>) -> String {
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let length = if request.content_length == 0 {
            String::new()
        } else {
            request.content_length.to_string()
        };
        let mut ms: Vec<(String, String)> = request
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .filter(|(k, _)| k.starts_with("x-ms-"))
            .collect();
        ms.sort();
        let mut text = format!(
            "{}\n{}\n{}\n{length}\n{}\n{}\n\n{}\n{}\n{}\n{}\n{}\n",
            request.method,
            header("content-encoding"),
            header("content-language"),
            header("content-md5"),
            header("content-type"),
            header("if-modified-since"),
            header("if-match"),
            header("if-none-match"),
            header("if-unmodified-since"),
            header("range"),
        );
        for (k, v) in &ms {
            text.push_str(&format!("{k}:{v}\n"));
        }
        text.push_str(&format!("/{}{}", self.account, request.url.path()));
        let mut query: Vec<(String, String)> = request
            .url
            .query_pairs()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.into_owned()))
            .collect();
        query.sort();
        // Repeated parameters are one line, their values comma-separated.
        let mut i = 0;
        while i < query.len() {
            let name = &query[i].0;
            let values: Vec<&str> = query[i..]
                .iter()
                .take_while(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect();
            text.push_str(&format!("\n{name}:{}", values.join(",")));
            i += values.len();
        }
        text
    }

    /// The `Authorization` header's value for `request`.
    pub fn authorization(&self, request: &ToSign<'_>) -> String {
        format!(
            "SharedKey {}:{}",
            self.account,
            self.hmac(&self.string_to_sign(request))
        )
    }

    /// The query string (without `?`) of a read-only service SAS for
    /// `container`/`blob`, valid from `start` until `expiry` (both
    /// `YYYY-MM-DDThh:mm:ssZ`), over HTTPS only when `https_only`.
    pub fn blob_read_sas(
        &self,
        container: &str,
        blob: &str,
        start: &str,
        expiry: &str,
        https_only: bool,
    ) -> String {
        let protocol = if https_only { "https" } else { "https,http" };
        let resource = format!("/blob/{}/{container}/{blob}", self.account);
        // permissions, start, expiry, resource, identifier, IP, protocol,
        // version, `b` (a blob), snapshot time, encryption scope, rscc, rscd,
        // rsce, rscl, rsct.
        let to_sign = format!(
            "r\n{start}\n{expiry}\n{resource}\n\n\n{protocol}\n{STORAGE_VERSION}\nb\n\n\n\n\n\n\n"
        );
        let signature = self.hmac(&to_sign);
        let pairs = [
            ("sv", STORAGE_VERSION),
            ("spr", protocol),
            ("st", start),
            ("se", expiry),
            ("sr", "b"),
            ("sp", "r"),
            ("sig", signature.as_str()),
        ];
        url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    }
}

/// Unix seconds as `YYYY-MM-DDThh:mm:ssZ` (UTC) and as an HTTP date
/// (`Sun, 06 Nov 1994 08:49:37 GMT`).
pub fn iso8601(unix: u64) -> String {
    let (y, mo, d, h, mi, s, _) = civil(unix);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// See [`iso8601`].
pub fn http_date(unix: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, mo, d, h, mi, s, weekday) = civil(unix);
    format!(
        "{}, {d:02} {} {y:04} {h:02}:{mi:02}:{s:02} GMT",
        DAYS[weekday],
        MONTHS[(mo - 1) as usize]
    )
}

/// (year, month, day, hour, minute, second, weekday with 0 = Thursday).
fn civil(unix: u64) -> (i64, u32, u32, u64, u64, u64, usize) {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Days since 0000-03-01 in the proleptic Gregorian calendar, split into
    // 400-year eras of 146097 days; years start in March so the leap day is last.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * march_month + 2) / 5 + 1) as u32;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60,
        (days % 7) as usize,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc_in_both_forms() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        // 2024-02-29 (a leap day) 13:45:07 UTC was a Thursday.
        assert_eq!(iso8601(1_709_214_307), "2024-02-29T13:45:07Z");
        assert_eq!(http_date(1_709_214_307), "Thu, 29 Feb 2024 13:45:07 GMT");
        assert_eq!(iso8601(4_102_444_800), "2100-01-01T00:00:00Z");
    }

    #[test]
    fn the_string_to_sign_has_the_documented_lines_in_order() {
        let key = AccountKey::new("acct", "a2V5").expect("base64");
        let url = url::Url::parse(
            "https://acct.blob.core.windows.net/c/motorpool/locks/p?timeout=5&comp=metadata",
        )
        .expect("url");
        let headers = vec![
            ("X-MS-Version".to_string(), STORAGE_VERSION.to_string()),
            (
                "x-ms-date".to_string(),
                "Thu, 01 Jan 1970 00:00:00 GMT".into(),
            ),
            ("If-Match".to_string(), "\"0x8D\"".into()),
            ("Content-Type".to_string(), "application/json".into()),
            ("Accept".to_string(), "*/*".into()),
        ];
        let text = key.string_to_sign(&ToSign {
            method: "PUT",
            url: &url,
            headers: &headers,
            content_length: 12,
        });
        assert_eq!(
            text,
            "PUT\n\n\n12\n\napplication/json\n\n\n\"0x8D\"\n\n\n\n\
             x-ms-date:Thu, 01 Jan 1970 00:00:00 GMT\nx-ms-version:2021-08-06\n\
             /acct/c/motorpool/locks/p\ncomp:metadata\ntimeout:5"
        );
        assert!(
            key.authorization(&ToSign {
                method: "PUT",
                url: &url,
                headers: &headers,
                content_length: 12,
            })
            .starts_with("SharedKey acct:")
        );
    }

    #[test]
    fn a_sas_is_read_only_for_one_blob_and_says_until_when() {
        let key = AccountKey::new("acct", "a2V5").expect("base64");
        let sas = key.blob_read_sas(
            "c",
            "motorpool/runtime/x",
            "2026-01-01T00:00:00Z",
            "2026-01-02T00:00:00Z",
            true,
        );
        let pairs: std::collections::BTreeMap<String, String> =
            url::form_urlencoded::parse(sas.as_bytes())
                .into_owned()
                .collect();
        assert_eq!(pairs["sp"], "r");
        assert_eq!(pairs["sr"], "b");
        assert_eq!(pairs["spr"], "https");
        assert_eq!(pairs["se"], "2026-01-02T00:00:00Z");
        assert!(!pairs["sig"].is_empty());
    }
}
