//! A write-back cache of metadata tables (L2 tables, refcount blocks), keyed by host offset.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes cluster-aligned offsets cheaply (the default SipHash dominates lookups).
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, x: u64) {
        let y = (x >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = y ^ (y >> 29);
    }
}

type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

struct Slot {
    data: Vec<u8>,
    dirty: bool,
    used: u64,
}

/// Cluster-sized tables held in memory; dirty ones are written back by the owner, in order.
pub(crate) struct TableCache {
    slots: OffsetMap<Slot>,
    clock: u64,
    capacity: usize,
}

impl TableCache {
    pub fn new(capacity: usize) -> TableCache {
        TableCache {
            slots: OffsetMap::default(),
            clock: 0,
            capacity: capacity.max(4),
        }
    }

    /// Changes how many tables the cache may hold (at least 4); a smaller cache sheds its
    /// clean tables as new ones come in.
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(4);
    }

    /// How many tables the cache may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How many tables it holds.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// QEMU's `qcow2_cache_clean_unused`: drops the clean tables not used since the clock
    /// value `since` (the previous clean's return value); returns the clock now.
    pub fn clean_unused(&mut self, since: u64) -> u64 {
        self.slots.retain(|_, s| s.dirty || s.used > since);
        self.clock
    }

    pub fn contains(&mut self, off: u64) -> bool {
        self.clock += 1;
        let clock = self.clock;
        match self.slots.get_mut(&off) {
            Some(s) => {
                s.used = clock;
                true
            }
            None => false,
        }
    }

    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// Drop the least recently used clean table; false if every table is dirty.
    pub fn evict_clean(&mut self) -> bool {
        let victim = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used);
        match victim.map(|(k, _)| *k) {
            Some(k) => {
                self.slots.remove(&k);
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) {
        self.clock += 1;
        self.slots.insert(
            off,
            Slot {
                data,
                dirty,
                used: self.clock,
            },
        );
    }

    pub fn remove(&mut self, off: u64) {
        self.slots.remove(&off);
    }

    pub fn get(&self, off: u64) -> Option<&[u8]> {
        self.slots.get(&off).map(|s| s.data.as_slice())
    }

    /// The table's bytes, marked dirty.
    pub fn get_mut(&mut self, off: u64) -> Option<&mut [u8]> {
        self.slots.get_mut(&off).map(|s| {
            s.dirty = true;
            s.data.as_mut_slice()
        })
    }

    pub fn clear(&mut self) {
        self.slots.clear();
    }

    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// Offsets of dirty tables, in ascending order.
    pub fn dirty_offsets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn mark_clean(&mut self, off: u64) {
        if let Some(s) = self.slots.get_mut(&off) {
            s.dirty = false;
        }
    }
}
