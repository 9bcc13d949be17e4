//! Rebuilding the refcounts of a dirty image (one whose refcounts were updated lazily and may
//! be behind its references): count every reference, then store fresh refcount structures.

use crate::header::INCOMPAT_DIRTY;
use crate::meta::{L1_OFFSET_MASK, Meta};
use crate::overlap::Metadata;
use crate::{Result, invalid};

impl Meta {
    /// Count the references to every cluster: header, L1/L2 tables and data of the active
    /// image and of every snapshot, the snapshot table, and the bitmaps' directory, tables
    /// and data. The refcount structures themselves are not counted.
    fn count_references(&mut self) -> Result<Vec<u64>> {
        let cs = self.cs();
        let file_clusters = self.storage.len()?.div_ceil(cs);
        if file_clusters > 1 << 28 {
            return Err(crate::Error::Unsupported(
                "rebuilding the refcounts of an image this large".into(),
            ));
        }
        let mut counts = vec![0u64; file_clusters as usize];
        let add = |counts: &mut Vec<u64>, off: u64, len: u64| -> Result<()> {
            let first = off / cs;
            let end = (off + len).div_ceil(cs);
            if end > file_clusters {
                return invalid(format!("reference to {off:#x} beyond the end of the file"));
            }
            for c in first..end {
                counts[c as usize] += 1;
            }
            Ok(())
        };
        add(&mut counts, 0, cs)?;
        let mut l1_tables = vec![(self.h.l1_table_offset, self.l1.clone())];
        for s in self.snapshots.clone() {
            l1_tables.push((s.l1_table_offset, self.snapshot_l1(&s)?));
        }
        if self.h.nb_snapshots > 0 {
            add(
                &mut counts,
                self.h.snapshots_offset,
                self.snapshot_table_len,
            )?;
        }
        for (off, l1) in l1_tables {
            if !l1.is_empty() {
                add(&mut counts, off, l1.len() as u64 * 8)?;
            }
            for e in l1 {
                let l2 = e & L1_OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                add(&mut counts, l2, cs)?;
                for i in 0..cs / 8 {
                    let raw = self.l2_entry(l2, i)?;
                    let c = self.decode(raw)?;
                    if let Some((h, len)) = self.host_range(c) {
                        add(&mut counts, h, len)?;
                    }
                }
            }
        }
        if let Some(ext) = self.h.bitmaps.filter(|x| x.directory_size > 0) {
            add(&mut counts, ext.directory_offset, ext.directory_size)?;
        }
        for b in self.bitmaps.clone() {
            for (off, len) in b.host_ranges(cs) {
                add(&mut counts, off, len)?;
            }
        }
        Ok(counts)
    }

    /// Replace the refcount structures with ones computed from the references, stored after
    /// the end of the file, then clear the dirty bit.
    pub fn rebuild_refcounts(&mut self) -> Result<()> {
        let cs = self.cs();
        let mut counts = self.count_references()?;
        let per_block = 1u64 << self.rb_bits();
        let start = counts.len() as u64;
        // New blocks and table go at the end; they must cover themselves too.
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = start + blocks + table_clusters;
            let b = total.div_ceil(per_block);
            let t = (b * 8).div_ceil(cs);
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        if table_clusters * cs > 8 * 1024 * 1024 {
            return invalid("refcount table would be too large");
        }
        counts.resize((start + blocks + table_clusters) as usize, 0);
        for c in start..start + blocks + table_clusters {
            counts[c as usize] = 1;
        }
        let order = self.h.refcount_order;
        let max = if order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << order)) - 1
        };
        let mut table = vec![0u8; (table_clusters * cs) as usize];
        for b in 0..blocks {
            let mut block = vec![0u8; cs as usize];
            let first = b * per_block;
            for i in 0..per_block.min(counts.len() as u64 - first) {
                let v = counts[(first + i) as usize];
                if v > max {
                    return invalid(format!(
                        "cluster {} has more references than refcounts allow",
                        first + i
                    ));
                }
                crate::meta::rc_set(&mut block, order, i as usize, v);
            }
            let off = (start + b) * cs;
            self.checked_write(
                &[Metadata::RefcountBlock, Metadata::RefcountTable],
                &block,
                off,
            )?;
            table[(b * 8) as usize..(b * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        let table_off = (start + blocks) * cs;
        self.checked_write(
            &[Metadata::RefcountBlock, Metadata::RefcountTable],
            &table,
            table_off,
        )?;
        self.storage.flush()?;
        self.h.refcount_table_offset = table_off;
        self.h.refcount_table_clusters = table_clusters as u32;
        self.h.incompatible &= !INCOMPAT_DIRTY;
        self.write_header()?;
        self.storage.flush()?;
        self.reftable = table
            .chunks_exact(8)
            .map(|c| crate::header::get_be64(c, 0))
            .collect();
        self.rb_cache.clear();
        self.pending_frees.clear();
        self.free_hint = 0;
        self.run_hint = 0;
        Ok(())
    }
}
