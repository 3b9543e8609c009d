//! The engine's tags as GCP labels, and back.
//!
//! Labels are all GCP can filter a list by, but they are narrow: keys
//! `[a-z][a-z0-9_-]{0,62}`, values `[a-z0-9_-]{0,63}`, at most 64 of them.
//! The engine's tags are wider (a driver address `10.0.0.5:7077`, a step
//! `failed:runtime`, user tags like `Team: Data`). So every tag becomes a
//! label in a readable, lossy form (lowercased, other characters as `_`,
//! cut to length), and a tag whose label is not exactly the tag is also
//! kept exactly in the instance metadata item [`TAGS_ITEM`] (a JSON object).
//! Reading merges the two, the metadata winning; filtering asks GCP for the
//! lossy labels and then keeps only exact matches.
//!
//! This module is pure: no client, no I/O.

use std::collections::{BTreeMap, HashMap};

use motorpool_provider::{TagFilter, Tags};

/// The metadata item that holds the tags whose labels are not exact.
pub const TAGS_ITEM: &str = "motorpool-tags";

/// The label holding (a hash of) the client token of the launch that made
/// the instance: provider bookkeeping, not reported as a tag.
pub const LAUNCH_LABEL: &str = "motorpool-launch";

/// GCP's limit on labels per resource.
pub const MAX_LABELS: usize = 64;

const MAX_LEN: usize = 63;

/// A tag set as GCP stores it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub labels: BTreeMap<String, String>,
    /// The tags kept exactly in metadata ([`TAGS_ITEM`]); empty: no item.
    pub exact: Tags,
}

impl Encoded {
    /// The value of the [`TAGS_ITEM`] metadata item, `None` when there is nothing to keep.
    pub fn metadata_value(&self) -> Option<String> {
        if self.exact.is_empty() {
            None
        } else {
            serde_json::to_string(&self.exact).ok()
        }
    }
}

/// Whether `key` is a GCP label key as it is.
pub fn is_label_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some('a'..='z'))
        && key.len() <= MAX_LEN
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
}

/// Whether `value` is a GCP label value as it is.
pub fn is_label_value(value: &str) -> bool {
    value.len() <= MAX_LEN
        && value
            .chars()
            .all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_' | '-'))
}

fn lossy(text: &str) -> String {
    text.chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_' | '-') => c,
            _ => '_',
        })
        .take(MAX_LEN)
        .collect()
}

/// The label key a tag key is stored under.
pub fn label_key(key: &str) -> String {
    if is_label_key(key) {
        return key.to_string();
    }
    let lossy = lossy(key);
    if lossy.starts_with(|c: char| c.is_ascii_lowercase()) {
        lossy
    } else {
        let mut keyed = format!("k_{lossy}");
        keyed.truncate(MAX_LEN);
        keyed
    }
}

/// The label value a tag value is stored as.
pub fn label_value(value: &str) -> String {
    if is_label_value(value) {
        value.to_string()
    } else {
        lossy(value)
    }
}

/// Encode `tags` (plus the provider's own `extra` labels, which are exact by
/// construction). Fails when two tags would share a label or there are more
/// labels than GCP allows.
pub fn encode(tags: &Tags, extra: &[(&str, &str)]) -> Result<Encoded, String> {
    let mut encoded = Encoded::default();
    let mut owner: HashMap<String, &str> = HashMap::new();
    for (key, value) in tags {
        let (lk, lv) = (label_key(key), label_value(value));
        if let Some(other) = owner.insert(lk.clone(), key) {
            return Err(format!(
                "tags `{other}` and `{key}` would both be the GCP label `{lk}`"
            ));
        }
        if lk != *key || lv != *value {
            encoded.exact.insert(key.clone(), value.clone());
        }
        encoded.labels.insert(lk, lv);
    }
    for (key, value) in extra {
        encoded.labels.insert(key.to_string(), value.to_string());
    }
    if encoded.labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels, more than the {MAX_LABELS} GCP allows on an instance",
            encoded.labels.len()
        ));
    }
    Ok(encoded)
}

/// The tags of an instance from its labels and its [`TAGS_ITEM`] metadata
/// value. Labels that stand for an exact tag, and [`LAUNCH_LABEL`], are left out.
pub fn decode<'a>(
    labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    exact_item: Option<&str>,
) -> Tags {
    let exact: Tags = exact_item
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let shadowed: std::collections::BTreeSet<String> = exact.keys().map(|k| label_key(k)).collect();
    let mut tags: Tags = labels
        .into_iter()
        .filter(|(k, _)| k.as_str() != LAUNCH_LABEL && !shadowed.contains(k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    tags.extend(exact);
    tags
}

/// A Compute API `filter` expression selecting instances whose labels match
/// the lossy form of `filter` (exact matches are then kept by the caller).
pub fn filter_expression(filter: &TagFilter) -> String {
    filter
        .iter()
        .map(|(k, v)| format!("(labels.{} = \"{}\")", label_key(k), label_value(v)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether decoded `tags` carry every pair of `filter` exactly.
pub fn matches(tags: &Tags, filter: &TagFilter) -> bool {
    filter
        .iter()
        .all(|(k, v)| tags.get(k).is_some_and(|t| t == v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_safe_tags_are_labels_only() {
        let t = tags(&[("motorpool-project", "etl"), ("motorpool-step", "ready")]);
        let e = encode(&t, &[]).expect("encodes");
        assert_eq!(e.labels, t);
        assert!(e.exact.is_empty());
        assert_eq!(e.metadata_value(), None);
        assert_eq!(decode(&e.labels, None), t);
    }

    #[test]
    fn an_address_is_a_readable_label_and_exact_in_metadata() {
        let t = tags(&[
            ("motorpool-driver-address", "10.128.0.5:7077"),
            ("motorpool-step", "failed:runtime"),
            ("Team", "Data Eng"),
        ]);
        let e = encode(&t, &[(LAUNCH_LABEL, "abc")]).expect("encodes");
        assert_eq!(e.labels["motorpool-driver-address"], "10_128_0_5_7077");
        assert_eq!(e.labels["motorpool-step"], "failed_runtime");
        assert_eq!(e.labels["team"], "data_eng");
        assert_eq!(e.labels[LAUNCH_LABEL], "abc");
        let item = e.metadata_value().expect("some tags kept exactly");
        assert_eq!(
            decode(&e.labels, Some(&item)),
            t,
            "the launch label is not a tag"
        );
    }

    #[test]
    fn a_filter_asks_for_lossy_labels_and_matches_exactly() {
        let mut f = TagFilter::new();
        f.insert("motorpool-project".into(), "etl".into());
        f.insert("motorpool-step".into(), "failed:runtime".into());
        assert_eq!(
            filter_expression(&f),
            "(labels.motorpool-project = \"etl\") (labels.motorpool-step = \"failed_runtime\")"
        );
        let near = tags(&[
            ("motorpool-project", "etl"),
            ("motorpool-step", "failed_runtime"),
        ]);
        assert!(!matches(&near, &f), "a lossy twin is not a match");
    }

    #[test]
    fn colliding_tags_and_too_many_labels_are_refused() {
        let t = tags(&[("team", "a"), ("Team", "b")]);
        assert!(encode(&t, &[]).unwrap_err().contains("`team`"));
        let many: Tags = (0..65)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(encode(&many, &[]).unwrap_err().contains("64"));
    }

    proptest! {
        #[test]
        fn any_tags_survive_the_round_trip(
            t in proptest::collection::btree_map("[a-zA-Z0-9:._ -]{1,70}", "[ -~]{0,80}", 0..20)
        ) {
            let Ok(e) = encode(&t, &[]) else { return Ok(()); };
            for (k, v) in &e.labels {
                prop_assert!(is_label_key(k), "key {k:?}");
                prop_assert!(is_label_value(v), "value {v:?}");
            }
            prop_assert_eq!(decode(&e.labels, e.metadata_value().as_deref()), t.clone());
            for (k, v) in &t {
                let mut f = TagFilter::new();
                f.insert(k.clone(), v.clone());
                prop_assert!(matches(&t, &f));
            }
        }
    }
}
