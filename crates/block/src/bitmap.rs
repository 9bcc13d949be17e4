//! `DirtyBitmap`: which byte ranges of a node were written, at a power-of-two granularity.
//!
//! Storage is two-level: one bit per granule in `words`, and one bit per non-zero word in
//! `summary`, so scanning for dirty ranges skips clean regions 4096 granules at a time.
//! A bitmap in use by a job is *frozen*: it gets an anonymous successor that records writes
//! meanwhile; [`DirtyBitmap::abdicate`] (job success) makes the successor the bitmap,
//! [`DirtyBitmap::reclaim`] (job failure) merges it back.

use crate::error::{BlockError, BlockResult};

/// Smallest granularity accepted (bytes).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity accepted (bytes): the `uint32` of the QMP argument, as a power of two.
pub const MAX_GRANULARITY: u64 = 1 << 31;
/// Longest bitmap name (bytes), as QEMU's `BDRV_BITMAP_MAX_NAME_SIZE`.
pub const MAX_NAME_LEN: usize = 1023;

/// A dirty bitmap over `size` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    name: Option<String>,
    shift: u32,
    size: u64,
    words: Vec<u64>,
    summary: Vec<u64>,
    dirty_granules: u64,
    enabled: bool,
    persistent: bool,
    readonly: bool,
    inconsistent: bool,
    busy: bool,
    skip_store: bool,
    successor: Option<Box<DirtyBitmap>>,
}

/// A zeroed vector, or ENOMEM instead of aborting on a huge request.
fn zeroed(n: usize) -> BlockResult<Vec<u64>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| BlockError::from_errno(libc::ENOMEM))?;
    v.resize(n, 0);
    Ok(v)
}

/// Whether `granularity` is acceptable (power of two, 512 B ..= 2 GiB).
pub fn granularity_is_valid(granularity: u64) -> bool {
    granularity.is_power_of_two() && (MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
}

impl DirtyBitmap {
    /// An empty, enabled, non-persistent bitmap covering `size` bytes.
    pub fn new(name: Option<String>, granularity: u64, size: u64) -> BlockResult<Self> {
        if !granularity_is_valid(granularity) {
            return Err(BlockError::new(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        let shift = granularity.trailing_zeros();
        let granules = size.div_ceil(granularity);
        let nwords = usize::try_from(granules.div_ceil(64))
            .map_err(|_| BlockError::from_errno(libc::ENOMEM))?;
        Ok(DirtyBitmap {
            name,
            shift,
            size,
            words: zeroed(nwords)?,
            summary: zeroed(nwords.div_ceil(64))?,
            dirty_granules: 0,
            enabled: true,
            persistent: false,
            readonly: false,
            inconsistent: false,
            busy: false,
            skip_store: false,
            successor: None,
        })
    }

    /// The name; `None` for anonymous bitmaps (successors).
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Renames (or anonymizes) the bitmap.
    pub fn set_name(&mut self, name: Option<String>) {
        self.name = name;
    }

    /// Granularity in bytes.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Bytes covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Dirty bytes as QEMU counts them: dirty granules × granularity.
    pub fn count(&self) -> u64 {
        self.dirty_granules << self.shift
    }

    /// Whether the bitmap itself records writes (false while frozen).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Enables or disables recording.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    /// Whether writes to the node are recorded (by this bitmap or its successor), as QMP's
    /// `recording`.
    pub fn is_recording(&self) -> bool {
        self.enabled || self.successor.as_ref().is_some_and(|s| s.enabled)
    }

    /// Whether the bitmap is stored in the image on close.
    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    /// Marks the bitmap persistent or not.
    pub fn set_persistent(&mut self, persistent: bool) {
        self.persistent = persistent;
    }

    /// Whether the bitmap was loaded read-only (cannot be modified).
    pub fn is_readonly(&self) -> bool {
        self.readonly
    }

    /// Marks the bitmap read-only.
    pub fn set_readonly(&mut self, readonly: bool) {
        self.readonly = readonly;
    }

    /// Whether the stored copy was found inconsistent (in use when the image was closed).
    pub fn is_inconsistent(&self) -> bool {
        self.inconsistent
    }

    /// Marks the bitmap inconsistent.
    pub fn set_inconsistent(&mut self, inconsistent: bool) {
        self.inconsistent = inconsistent;
    }

    /// Whether an operation (a job, a pending removal) owns the bitmap.
    pub fn is_busy(&self) -> bool {
        self.busy || self.successor.is_some()
    }

    /// Marks the bitmap busy or not (e.g. by a job, or a transaction removing it).
    pub fn set_busy(&mut self, busy: bool) {
        self.busy = busy;
    }

    /// Whether the bitmap must not be stored (a transaction is removing it).
    pub fn skips_store(&self) -> bool {
        self.skip_store
    }

    /// Marks the bitmap as not to be stored, or to be stored again.
    pub fn set_skip_store(&mut self, skip: bool) {
        self.skip_store = skip;
    }

    /// The anonymous successor recording writes while frozen.
    pub fn successor(&self) -> Option<&DirtyBitmap> {
        self.successor.as_deref()
    }

    fn granule_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    fn granules(&self) -> u64 {
        self.size.div_ceil(self.granularity())
    }

    /// The bits, one per granule, 64 to a word, granule 0 in bit 0 of word 0 (the layout of
    /// QEMU's `HBitmap` bottom level).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks `[offset, offset+len)` dirty (every granule it touches).
    pub fn set_dirty(&mut self, offset: u64, len: u64) {
        if let Some((first, last)) = self.granule_range(offset, len) {
            self.update_bits(first, last, true);
        }
    }

    /// Marks every granule *fully inside* `[offset, offset+len)` clean, as QEMU's reset
    /// requires aligned ranges; a range reaching the end of the bitmap resets the tail granule.
    pub fn reset_dirty(&mut self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let g = self.granularity();
        let end = offset.saturating_add(len).min(self.size);
        let first = offset.div_ceil(g);
        let last_excl = if end == self.size {
            self.granules()
        } else {
            end / g
        };
        if first < last_excl {
            self.update_bits(first, last_excl - 1, false);
        }
    }

    /// Marks everything clean.
    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
        self.summary.iter_mut().for_each(|w| *w = 0);
        self.dirty_granules = 0;
    }

    /// Marks everything dirty.
    pub fn set_all(&mut self) {
        let n = self.granules();
        if n > 0 {
            self.update_bits(0, n - 1, true);
        }
    }

    fn update_bits(&mut self, first: u64, last: u64, value: bool) {
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            let old = self.words[w];
            let new = if value { old | mask } else { old & !mask };
            if old != new {
                self.words[w] = new;
                let (before, after) = (u64::from(old.count_ones()), u64::from(new.count_ones()));
                self.dirty_granules = self.dirty_granules + after - before;
                let bit = 1u64 << (w % 64);
                if new == 0 {
                    self.summary[w / 64] &= !bit;
                } else {
                    self.summary[w / 64] |= bit;
                }
            }
        }
    }

    /// Whether the granule containing `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let bit = offset >> self.shift;
        self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    /// First granule index ≥ `from` whose bit equals `value`.
    fn next_bit(&self, from: u64, value: bool) -> Option<u64> {
        let n = self.granules();
        if from >= n {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w];
        if !value {
            word = !word;
        }
        word &= u64::MAX << (from % 64);
        loop {
            if word != 0 {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (bit < n).then_some(bit);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            if value {
                // Skip clean words through the summary level.
                let s = w / 64;
                let mut sword = self.summary[s] & (u64::MAX << (w % 64));
                let mut si = s;
                while sword == 0 {
                    si += 1;
                    if si >= self.summary.len() {
                        return None;
                    }
                    sword = self.summary[si];
                }
                w = si * 64 + sword.trailing_zeros() as usize;
                word = self.words[w];
            } else {
                word = !self.words[w];
            }
        }
    }

    /// Offset of the first dirty granule at or after `offset` (granule-aligned).
    pub fn next_dirty(&self, offset: u64) -> Option<u64> {
        self.next_bit(offset >> self.shift, true)
            .map(|b| (b << self.shift).max(offset))
    }

    /// Offset of the first clean granule at or after `offset`, or `None` if dirty to the end.
    pub fn next_clean(&self, offset: u64) -> Option<u64> {
        self.next_bit(offset >> self.shift, false)
            .map(|b| (b << self.shift).max(offset))
    }

    /// The maximal dirty byte ranges `(offset, len)` inside `[start, end)`, in order, clamped to
    /// the bitmap's size.
    pub fn dirty_ranges(&self, start: u64, end: u64) -> DirtyRanges<'_> {
        DirtyRanges {
            bitmap: self,
            pos: start,
            end: end.min(self.size),
        }
    }

    /// ORs `source`'s dirty bits into this bitmap. Granularities may differ (a source granule
    /// dirties every target granule it overlaps); sizes must match.
    pub fn merge_from(&mut self, source: &DirtyBitmap) -> BlockResult<()> {
        if source.size != self.size {
            return Err(BlockError::new(format!(
                "Bitmaps are of different sizes (destination size is {}, source size is {}) and \
                 can't be merged",
                self.size, source.size
            )));
        }
        if source.shift == self.shift {
            for (w, (dst, src)) in self.words.iter_mut().zip(&source.words).enumerate() {
                let new = *dst | *src;
                if new != *dst {
                    self.dirty_granules += u64::from(new.count_ones() - dst.count_ones());
                    *dst = new;
                    self.summary[w / 64] |= 1 << (w % 64);
                }
            }
        } else {
            let ranges: Vec<(u64, u64)> = source.dirty_ranges(0, source.size).collect();
            for (off, len) in ranges {
                self.set_dirty(off, len);
            }
        }
        Ok(())
    }

    /// Changes the covered size (node resize): bits beyond the new end are dropped, new space
    /// is clean.
    pub fn resize(&mut self, size: u64) {
        let mut grown = DirtyBitmap {
            successor: None,
            ..match DirtyBitmap::new(None, self.granularity(), size) {
                Ok(b) => b,
                Err(_) => return,
            }
        };
        let keep = size.min(self.size);
        for (off, len) in self.dirty_ranges(0, keep).collect::<Vec<_>>() {
            grown.set_dirty(off, len);
        }
        self.size = size;
        self.words = grown.words;
        self.summary = grown.summary;
        self.dirty_granules = grown.dirty_granules;
        if let Some(s) = self.successor.as_mut() {
            s.resize(size);
        }
    }

    /// Records a guest write: into the bitmap if enabled, and into its successor if any.
    pub fn record_write(&mut self, offset: u64, len: u64) {
        if self.enabled {
            self.set_dirty(offset, len);
        }
        if let Some(s) = self.successor.as_mut()
            && s.enabled
        {
            s.set_dirty(offset, len);
        }
    }

    /// Freezes the bitmap for a job: an anonymous successor (enabled iff this bitmap was)
    /// records writes from now on, and this bitmap stops recording and is busy.
    pub fn create_successor(&mut self) -> BlockResult<()> {
        if self.is_busy() {
            return Err(BlockError::new(
                "Cannot create a successor for a bitmap currently in-use",
            ));
        }
        let mut successor = DirtyBitmap::new(None, self.granularity(), self.size)?;
        successor.enabled = self.enabled;
        self.enabled = false;
        self.successor = Some(Box::new(successor));
        Ok(())
    }

    /// Job success: the successor (writes since the freeze) replaces this bitmap's contents,
    /// keeping name and persistence; recording resumes as the successor did.
    pub fn abdicate(&mut self) -> BlockResult<()> {
        let successor = self
            .successor
            .take()
            .ok_or_else(|| BlockError::new("Cannot abdicate a bitmap without a successor"))?;
        self.words = successor.words;
        self.summary = successor.summary;
        self.dirty_granules = successor.dirty_granules;
        self.enabled = successor.enabled;
        Ok(())
    }

    /// Job failure: the successor's bits are merged back; recording resumes as the successor
    /// did.
    pub fn reclaim(&mut self) -> BlockResult<()> {
        let successor = self
            .successor
            .take()
            .ok_or_else(|| BlockError::new("Cannot reclaim a bitmap without a successor"))?;
        self.merge_from(&successor)?;
        self.enabled = successor.enabled;
        Ok(())
    }

    /// The dirty bits only (same geometry, anonymous, no flags): a copy for a job to consume.
    pub fn copy_bits(&self) -> DirtyBitmap {
        DirtyBitmap {
            name: None,
            enabled: false,
            persistent: false,
            readonly: false,
            inconsistent: false,
            busy: false,
            skip_store: false,
            successor: None,
            ..self.clone()
        }
    }

    /// Replaces this bitmap's bits with `other`'s (same geometry), keeping flags and name.
    pub fn restore_bits(&mut self, other: &DirtyBitmap) {
        if other.shift == self.shift && other.size == self.size {
            self.words.clone_from(&other.words);
            self.summary.clone_from(&other.summary);
            self.dirty_granules = other.dirty_granules;
        }
    }
}

/// Iterator over maximal dirty byte ranges, see [`DirtyBitmap::dirty_ranges`].
pub struct DirtyRanges<'a> {
    bitmap: &'a DirtyBitmap,
    pos: u64,
    end: u64,
}

impl Iterator for DirtyRanges<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.bitmap.next_dirty(self.pos)?;
        if start >= self.end {
            self.pos = self.end;
            return None;
        }
        let stop = self
            .bitmap
            .next_clean(start)
            .unwrap_or(self.bitmap.size)
            .min(self.end);
        self.pos = stop;
        Some((start, stop - start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K64: u64 = 64 * 1024;

    fn bm(size: u64) -> DirtyBitmap {
        DirtyBitmap::new(Some("b".into()), K64, size).unwrap()
    }

    #[test]
    fn granularity_must_be_power_of_two_between_512_and_2g() {
        assert!(granularity_is_valid(512));
        assert!(granularity_is_valid(1 << 31));
        assert!(!granularity_is_valid(256));
        assert!(!granularity_is_valid(1000));
        assert!(!granularity_is_valid(1 << 32));
        let err = DirtyBitmap::new(None, 1000, 1 << 20).unwrap_err();
        assert_eq!(
            err.desc(),
            "Granularity must be power of 2 and at least 512"
        );
    }

    #[test]
    fn impossible_bitmap_size_fails_without_aborting() {
        let e = DirtyBitmap::new(None, 512, u64::MAX).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOMEM));
    }

    #[test]
    fn count_is_dirty_granules_times_granularity() {
        let mut b = bm(4 << 20);
        b.set_dirty(1 << 20, 1);
        b.set_dirty(3 << 20, 128 * 1024);
        assert_eq!(b.count(), 3 * K64);
    }

    #[test]
    fn set_dirty_touching_two_granules_marks_both() {
        let mut b = bm(1 << 20);
        b.set_dirty(K64 - 1, 2);
        assert_eq!(b.count(), 2 * K64);
        assert!(b.is_dirty(0) && b.is_dirty(K64));
    }

    #[test]
    fn reset_clears_only_whole_granules() {
        let mut b = bm(1 << 20);
        b.set_all();
        b.reset_dirty(K64 / 2, 2 * K64);
        assert!(b.is_dirty(0));
        assert!(!b.is_dirty(K64));
        assert!(b.is_dirty(2 * K64));
    }

    #[test]
    fn dirty_ranges_are_maximal_and_ordered() {
        let mut b = bm(8 << 20);
        b.set_dirty(0, K64);
        b.set_dirty(2 * K64, 3 * K64);
        b.set_dirty(7 << 20, 1 << 20);
        let r: Vec<_> = b.dirty_ranges(0, u64::MAX).collect();
        assert_eq!(r, vec![(0, K64), (2 * K64, 3 * K64), (7 << 20, 1 << 20)]);
    }

    #[test]
    fn dirty_ranges_clamp_to_window_and_size() {
        let mut b = DirtyBitmap::new(None, 512, 1000).unwrap();
        b.set_all();
        assert_eq!(
            b.dirty_ranges(100, 5000).collect::<Vec<_>>(),
            vec![(100, 900)]
        );
    }

    #[test]
    fn scanning_skips_large_clean_regions() {
        let size = 1u64 << 40;
        let mut b = DirtyBitmap::new(None, K64, size).unwrap();
        b.set_dirty(size - K64, K64);
        assert_eq!(b.next_dirty(0), Some(size - K64));
        assert_eq!(b.dirty_ranges(0, size).count(), 1);
    }

    #[test]
    fn merge_with_coarser_source_dirties_overlapped_granules() {
        let mut dst = DirtyBitmap::new(None, 512, 1 << 20).unwrap();
        let mut src = bm(1 << 20);
        src.set_dirty(K64, 1);
        dst.merge_from(&src).unwrap();
        assert_eq!(dst.count(), K64);
        assert_eq!(
            dst.dirty_ranges(0, 1 << 20).collect::<Vec<_>>(),
            vec![(K64, K64)]
        );
    }

    #[test]
    fn merge_of_different_sizes_is_refused() {
        let mut a = bm(1 << 20);
        let b = bm(2 << 20);
        assert_eq!(
            a.merge_from(&b).unwrap_err().desc(),
            "Bitmaps are of different sizes (destination size is 1048576, source size is \
             2097152) and can't be merged"
        );
    }

    #[test]
    fn frozen_bitmap_records_into_successor_only() {
        let mut b = bm(1 << 20);
        b.set_dirty(0, 1);
        b.create_successor().unwrap();
        assert!(b.is_busy() && b.is_recording() && !b.is_enabled());
        b.record_write(2 * K64, 1);
        assert_eq!(b.count(), K64);
        assert_eq!(b.successor().unwrap().count(), K64);
    }

    #[test]
    fn abdicate_keeps_only_writes_since_freeze() {
        let mut b = bm(1 << 20);
        b.set_dirty(0, 1);
        b.create_successor().unwrap();
        b.record_write(2 * K64, 1);
        b.abdicate().unwrap();
        assert!(!b.is_busy() && b.is_enabled());
        assert_eq!(
            b.dirty_ranges(0, 1 << 20).collect::<Vec<_>>(),
            vec![(2 * K64, K64)]
        );
    }

    #[test]
    fn reclaim_merges_successor_back() {
        let mut b = bm(1 << 20);
        b.set_dirty(0, 1);
        b.create_successor().unwrap();
        b.record_write(2 * K64, 1);
        b.reclaim().unwrap();
        assert!(!b.is_busy() && b.is_enabled());
        assert_eq!(b.count(), 2 * K64);
    }

    #[test]
    fn disabled_bitmap_freezes_with_disabled_successor() {
        let mut b = bm(1 << 20);
        b.set_enabled(false);
        b.create_successor().unwrap();
        b.record_write(0, 1);
        assert!(!b.is_recording());
        b.abdicate().unwrap();
        assert!(!b.is_enabled());
        assert_eq!(b.count(), 0);
    }

    #[test]
    fn busy_bitmap_cannot_be_frozen_twice() {
        let mut b = bm(1 << 20);
        b.create_successor().unwrap();
        assert!(b.create_successor().is_err());
    }

    #[test]
    fn resize_keeps_bits_inside_new_size() {
        let mut b = bm(1 << 20);
        b.set_dirty(0, 1 << 20);
        b.resize(2 * K64);
        assert_eq!(b.count(), 2 * K64);
        b.resize(1 << 20);
        assert_eq!(b.count(), 2 * K64);
    }
}
