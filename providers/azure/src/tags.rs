//! The engine's tags as Azure tags, and back.
//!
//! Azure tags hold nearly anything: names up to 512 characters without `<`,
//! `>`, `%`, `&`, `\`, `?` or `/`, values up to 256 characters, 50 per
//! resource. So a tag is stored as it is, except that a forbidden character
//! in a name is written `~XX` (its hex code; `~` itself is `~7e`), which
//! reads back exactly. Names are case-insensitive in Azure, so two tags
//! that differ only in case are refused. A value longer than Azure allows, or more tags than
//! it allows, is refused with a message (the engine's own tags are short).
//!
//! This module is pure: no client, no I/O.

use motorpool_provider::{TagFilter, Tags};

/// The tag holding (a hash of) the client token of the launch that made the
/// VM: provider bookkeeping, not reported as a tag.
pub const LAUNCH_TAG: &str = "motorpool-launch";

/// Azure's limits.
pub const MAX_TAGS: usize = 50;
const MAX_NAME: usize = 512;
const MAX_VALUE: usize = 256;

const FORBIDDEN: &[char] = &['<', '>', '%', '&', '\\', '?', '/'];

/// The Azure tag name of an engine tag name.
pub fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if FORBIDDEN.contains(&c) || c == '~' {
            out.push_str(&format!("~{:02x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// The engine tag name of an Azure tag name (names motorpool did not write
/// read back as they are).
pub fn decode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('~') {
        out.push_str(&rest[..i]);
        let hex = rest.get(i + 1..i + 3);
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) if b.is_ascii() => {
                out.push(b as char);
                rest = &rest[i + 3..];
            }
            _ => {
                out.push('~');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// `tags` (and the provider's `extra` ones) as Azure tags, or why they cannot be.
pub fn encode(tags: &Tags, extra: &[(&str, &str)]) -> Result<Tags, String> {
    let mut out = Tags::new();
    let mut seen = std::collections::HashMap::new();
    for (name, value) in tags {
        let encoded = encode_name(name);
        if let Some(other) = seen.insert(encoded.to_lowercase(), name) {
            return Err(format!(
                "tags `{other}` and `{name}` differ only in case, and Azure tag names do not"
            ));
        }
        if encoded.len() > MAX_NAME {
            return Err(format!(
                "tag name `{name}` is longer than the {MAX_NAME} characters Azure allows"
            ));
        }
        if value.chars().count() > MAX_VALUE {
            return Err(format!(
                "the value of tag `{name}` is longer than the {MAX_VALUE} characters Azure allows"
            ));
        }
        out.insert(encoded, value.clone());
    }
    for (name, value) in extra {
        out.insert(name.to_string(), value.to_string());
    }
    if out.len() > MAX_TAGS {
        return Err(format!(
            "{} tags, more than the {MAX_TAGS} Azure allows on a resource",
            out.len()
        ));
    }
    Ok(out)
}

/// The engine's tags of a resource from its Azure tags (the launch tag left out).
pub fn decode<'a>(tags: impl IntoIterator<Item = (&'a String, &'a String)>) -> Tags {
    tags.into_iter()
        .filter(|(k, _)| k.as_str() != LAUNCH_TAG)
        .map(|(k, v)| (decode_name(k), v.clone()))
        .collect()
}

/// Whether `tags` carry every pair of `filter` exactly.
pub fn matches(tags: &Tags, filter: &TagFilter) -> bool {
    filter
        .iter()
        .all(|(k, v)| tags.get(k).is_some_and(|t| t == v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn engine_tags_are_stored_as_they_are() {
        let mut t = Tags::new();
        t.insert("motorpool-driver-address".into(), "10.0.0.4:7077".into());
        t.insert("motorpool-step".into(), "failed:runtime".into());
        let encoded = encode(&t, &[(LAUNCH_TAG, "abc")]).expect("encodes");
        assert_eq!(encoded["motorpool-driver-address"], "10.0.0.4:7077");
        assert_eq!(encoded[LAUNCH_TAG], "abc");
        assert_eq!(decode(&encoded), t);
    }

    #[test]
    fn forbidden_name_characters_are_escaped_and_read_back() {
        assert_eq!(encode_name("team/data?"), "team~2fdata~3f");
        assert_eq!(decode_name("team~2fdata~3f"), "team/data?");
        assert_eq!(decode_name(&encode_name("a~2fb")), "a~2fb");
        assert_eq!(
            decode_name("odd~zz~"),
            "odd~zz~",
            "foreign names read as they are"
        );
    }

    #[test]
    fn long_values_and_too_many_tags_are_refused() {
        let mut t = Tags::new();
        t.insert("k".into(), "v".repeat(300));
        assert!(encode(&t, &[]).unwrap_err().contains("256"));
        let mut twins = Tags::new();
        twins.insert("Team".into(), "a".into());
        twins.insert("team".into(), "b".into());
        assert!(encode(&twins, &[]).unwrap_err().contains("case"));
        let many: Tags = (0..51)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(encode(&many, &[]).unwrap_err().contains("50"));
    }

    proptest! {
        #[test]
        fn any_tags_survive_the_round_trip(
            t in proptest::collection::btree_map("[ -~]{1,40}", "[ -~]{0,100}", 0..20)
        ) {
            let Ok(encoded) = encode(&t, &[]) else {
                // Only names that differ in case alone are refused.
                let lower: std::collections::BTreeSet<String> =
                    t.keys().map(|k| encode_name(k).to_lowercase()).collect();
                prop_assert!(lower.len() < t.len());
                return Ok(());
            };
            for name in encoded.keys() {
                prop_assert!(!name.contains(FORBIDDEN), "{name:?}");
            }
            prop_assert_eq!(decode(&encoded), t);
        }
    }
}
