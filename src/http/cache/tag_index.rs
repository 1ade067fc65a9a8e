//! Which stored URIs carry which tag, so that purging a tag visits those URIs only.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;

use super::stored::Variants;

/// Tag → the URIs whose stored variants carry it, each with the identities (addresses)
/// of the variant lists that put it there.
///
/// A list goes into the index before it goes into the store, and out when the store lets
/// it go: the store's eviction listener sees every list leave, whether replaced, evicted,
/// expired or invalidated. So every list in the store is in the index, and the index
/// holds no more than the store plus the lists on their way in or out. A list's identity
/// stays unique while it is in the index: it is added after any earlier list at the same
/// address has been let go (the listener holds that one until it returns).
#[derive(Default)]
pub(super) struct TagIndex {
    tags: DashMap<String, HashMap<String, Vec<usize>>>,
}

impl TagIndex {
    /// Indexes `variants`, about to be stored under `key`.
    pub(super) fn add(&self, key: &str, variants: &Arc<Variants>) {
        let id = identity(variants);
        for tag in variants.tags() {
            self.tags
                .entry(tag.clone())
                .or_default()
                .entry(key.to_owned())
                .or_default()
                .push(id);
        }
    }

    /// Forgets `variants`, which the store no longer holds under `key`.
    pub(super) fn remove(&self, key: &str, variants: &Arc<Variants>) {
        let id = identity(variants);
        for tag in variants.tags() {
            let emptied = match self.tags.get_mut(tag) {
                Some(mut keys) => {
                    if let Some(ids) = keys.get_mut(key) {
                        ids.retain(|other| *other != id);
                        if ids.is_empty() {
                            keys.remove(key);
                        }
                    }
                    keys.is_empty()
                }
                None => false,
            };
            if emptied {
                self.tags.remove_if(tag, |_, keys| keys.is_empty());
            }
        }
    }

    /// The URIs with a list tagged `tag` in the index.
    pub(super) fn keys(&self, tag: &str) -> Vec<String> {
        self.tags
            .get(tag)
            .map(|keys| keys.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Index entries (tag, URI) held.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tags.iter().map(|keys| keys.len()).sum()
    }
}

/// What indexing `variants` under `key` costs in memory, in bytes, for the store's weigher:
/// per tag, a copy of the URI, its place in the tag's map, the list of identities, and the
/// tag itself (counted every time, though URIs with the same tag share it).
pub(super) fn weight(key: &str, variants: &Variants) -> u32 {
    let total: usize = variants
        .tags()
        .iter()
        .map(|tag| key.len() + tag.len() + PER_ENTRY)
        .sum();
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// One (tag, URI) entry beyond the two strings' bytes: the index's slot, the URI's copy,
/// the identities' `Vec`, a tag's own map when it is the tag's first URI, and the tag's
/// copy kept beside the stored list. Measured: 100,000 stored URIs of 1-byte bodies, each
/// tagged with a tag of its own, took 771 bytes more resident memory each than untagged
/// (483 with one tag shared by all); the store weighed them 319 bytes more each with 128
/// here (the stored `Cache-Tag` field included), and weighs them 767 more with 576.
const PER_ENTRY: usize = 576;

/// True when a variant of `variants` is tagged `tag`.
pub(super) fn carries(variants: &Variants, tag: &str) -> bool {
    variants.tags().iter().any(|t| t == tag)
}

fn identity(variants: &Arc<Variants>) -> usize {
    Arc::as_ptr(variants) as usize
}
