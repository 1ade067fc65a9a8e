//! The in-flight map's table: a [`DashMap`] (measured fastest for this access pattern in
//! `benches/flight_map.rs`), or, under loom, one loom `Mutex` around a `HashMap`, so the
//! models see every lock the flight protocol takes. Both give the same few operations,
//! each run under the key's lock.

use std::hash::Hash;

#[cfg(not(towerguard_loom))]
use dashmap::{mapref::entry::Entry, DashMap};
#[cfg(towerguard_loom)]
use std::collections::HashMap;

#[cfg(towerguard_loom)]
use crate::sync::{lock, Mutex};

pub(crate) struct Table<K, F> {
    #[cfg(not(towerguard_loom))]
    map: DashMap<K, F>,
    #[cfg(towerguard_loom)]
    map: Mutex<HashMap<K, F>>,
}

impl<K: Hash + Eq + Clone, F> Table<K, F> {
    pub(crate) fn new() -> Self {
        Table {
            #[cfg(not(towerguard_loom))]
            map: DashMap::new(),
            #[cfg(towerguard_loom)]
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` with the key's current value under the key's lock; the value `f` returns
    /// (if any) replaces it.
    pub(crate) fn upsert<R>(&self, key: K, f: impl FnOnce(&K, Option<&F>) -> (Option<F>, R)) -> R {
        #[cfg(not(towerguard_loom))]
        {
            match self.map.entry(key) {
                Entry::Occupied(mut occupied) => {
                    let (new, out) = f(occupied.key(), Some(occupied.get()));
                    if let Some(new) = new {
                        occupied.insert(new);
                    }
                    out
                }
                Entry::Vacant(vacant) => {
                    let (new, out) = f(vacant.key(), None);
                    if let Some(new) = new {
                        vacant.insert(new);
                    }
                    out
                }
            }
        }
        #[cfg(towerguard_loom)]
        {
            let mut map = lock(&self.map);
            let (new, out) = f(&key, map.get(&key));
            if let Some(new) = new {
                map.insert(key, new);
            }
            out
        }
    }

    /// Removes the key's value if `pred` holds for it.
    pub(crate) fn remove_if(&self, key: &K, pred: impl FnOnce(&F) -> bool) -> bool {
        #[cfg(not(towerguard_loom))]
        {
            self.map.remove_if(key, |_, value| pred(value)).is_some()
        }
        #[cfg(towerguard_loom)]
        {
            let mut map = lock(&self.map);
            if map.get(key).is_some_and(pred) {
                map.remove(key);
                return true;
            }
            false
        }
    }

    /// Removes the key's value.
    pub(crate) fn remove(&self, key: &K) -> Option<F> {
        #[cfg(not(towerguard_loom))]
        {
            self.map.remove(key).map(|(_, value)| value)
        }
        #[cfg(towerguard_loom)]
        {
            lock(&self.map).remove(key)
        }
    }

    /// Keeps the entries for which `keep` holds.
    pub(crate) fn retain(&self, mut keep: impl FnMut(&K, &F) -> bool) {
        #[cfg(not(towerguard_loom))]
        {
            self.map.retain(|key, value| keep(key, value));
        }
        #[cfg(towerguard_loom)]
        {
            lock(&self.map).retain(|key, value| keep(key, value));
        }
    }
}
