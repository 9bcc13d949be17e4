//! Internal snapshots: the snapshot table, and creating, deleting and listing snapshots.

use crate::header::{Header, MAX_L1_ENTRIES, MAX_SNAPSHOTS, get_be32, get_be64};
use std::collections::BTreeMap;

use crate::meta::{
    COMPRESSED, COPIED, Cluster, L1_OFFSET_MASK, MAX_HOST_OFFSET, Meta, REFT_OFFSET_MASK,
};
use crate::storage::Storage;
use crate::{Error, Result, invalid};

/// Largest snapshot table accepted (bytes).
const MAX_TABLE_BYTES: u64 = 64 * 1024 * 1024;
const MAX_ID_NAME: usize = 1024;

/// A snapshot as listed by `qemu-img snapshot -l`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id (QEMU numbers them "1", "2", ...).
    pub id: String,
    /// The name given when it was created.
    pub name: String,
    /// Size of the saved VM state (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size at creation.
    pub disk_size: u64,
    /// Instruction count at creation, if recorded.
    pub icount: Option<u64>,
}

/// A snapshot table entry.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub info: SnapshotInfo,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Extra data beyond the fields we know, kept verbatim.
    pub extra_rest: Vec<u8>,
}

fn read_exact(st: &dyn Storage, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    st.read_at(&mut b, off)?;
    Ok(b)
}

/// Read the snapshot table the header points to; also returns its size in bytes.
pub(crate) fn read_table(st: &dyn Storage, h: &Header) -> Result<(Vec<Snapshot>, u64)> {
    let mut out = Vec::new();
    let mut pos = h.snapshots_offset;
    let end = h.snapshots_offset.saturating_add(MAX_TABLE_BYTES);
    let cs = h.cluster_size();
    for _ in 0..h.nb_snapshots {
        if pos + 40 > end {
            return invalid("snapshot table too large");
        }
        let f = read_exact(st, pos, 40)?;
        let id_len = usize::from(u16::from_be_bytes([f[12], f[13]]));
        let name_len = usize::from(u16::from_be_bytes([f[14], f[15]]));
        let extra_len = get_be32(&f, 36) as usize;
        if extra_len > 1024 || id_len > MAX_ID_NAME || name_len > MAX_ID_NAME {
            return invalid("snapshot table entry too large");
        }
        let var = read_exact(st, pos + 40, extra_len + id_len + name_len)?;
        let extra = &var[..extra_len];
        let l1_table_offset = get_be64(&f, 0);
        let l1_size = get_be32(&f, 8);
        if u64::from(l1_size) > MAX_L1_ENTRIES
            || !l1_table_offset.is_multiple_of(cs)
            || l1_table_offset
                .checked_add(u64::from(l1_size) * 8)
                .is_none_or(|e| e > MAX_HOST_OFFSET)
        {
            return invalid("snapshot L1 table invalid");
        }
        let mut vm_state_size = u64::from(get_be32(&f, 32));
        let mut disk_size = h.size;
        let mut icount = None;
        if extra_len >= 8 {
            vm_state_size = get_be64(extra, 0);
        }
        if extra_len >= 16 {
            disk_size = get_be64(extra, 8);
        }
        if extra_len >= 24 {
            let v = get_be64(extra, 16);
            if v != u64::MAX {
                icount = Some(v);
            }
        }
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        out.push(Snapshot {
            info: SnapshotInfo {
                id: text(&var[extra_len..extra_len + id_len]),
                name: text(&var[extra_len + id_len..]),
                vm_state_size,
                date_sec: get_be32(&f, 16),
                date_nsec: get_be32(&f, 20),
                vm_clock_nsec: get_be64(&f, 24),
                disk_size,
                icount,
            },
            l1_table_offset,
            l1_size,
            extra_rest: if extra_len > 24 {
                extra[24..].to_vec()
            } else {
                Vec::new()
            },
        });
        pos += (40 + extra_len + id_len + name_len).div_ceil(8) as u64 * 8;
    }
    Ok((out, pos - h.snapshots_offset))
}

fn serialize_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let i = &s.info;
        let extra_len = 24 + s.extra_rest.len();
        b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(i.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(i.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&i.date_sec.to_be_bytes());
        b.extend_from_slice(&i.date_nsec.to_be_bytes());
        b.extend_from_slice(&i.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(i.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&(extra_len as u32).to_be_bytes());
        b.extend_from_slice(&i.vm_state_size.to_be_bytes());
        b.extend_from_slice(&i.disk_size.to_be_bytes());
        b.extend_from_slice(&i.icount.unwrap_or(u64::MAX).to_be_bytes());
        b.extend_from_slice(&s.extra_rest);
        b.extend_from_slice(i.id.as_bytes());
        b.extend_from_slice(i.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b
}

/// Find a snapshot by id, then by name.
pub(crate) fn find(snaps: &[Snapshot], id_or_name: &str) -> Result<usize> {
    snaps
        .iter()
        .position(|s| s.info.id == id_or_name)
        .or_else(|| snaps.iter().position(|s| s.info.name == id_or_name))
        .ok_or_else(|| Error::NotFound(format!("snapshot '{id_or_name}'")))
}

impl Meta {
    /// Store `snaps` as the new snapshot table and switch the header to it; the old table's
    /// clusters are freed afterwards.
    fn replace_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<()> {
        if snaps.len() > MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidArgument("too many snapshots".into()));
        }
        let cs = self.cs();
        let bytes = serialize_table(&snaps);
        let old_off = self.h.snapshots_offset;
        let old_len = self.snapshot_table_len;
        let new_off = if snaps.is_empty() {
            0
        } else {
            self.store_blob(&bytes)?
        };
        self.write_back()?;
        self.storage.flush()?;
        self.h.nb_snapshots = snaps.len() as u32;
        self.h.snapshots_offset = new_off;
        self.write_header()?;
        self.storage.flush()?;
        self.snapshots = snaps;
        self.snapshot_table_len = bytes.len() as u64;
        if old_off != 0 && old_len > 0 {
            self.free_now(old_off, old_len.div_ceil(cs) * cs)?;
        }
        self.write_back()
    }

    /// The snapshot's L1 table.
    pub fn snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>> {
        let b = read_exact(&*self.storage, s.l1_table_offset, s.l1_size as usize * 8)?;
        Ok(b.chunks_exact(8).map(|c| get_be64(c, 0)).collect())
    }

    /// Add `addend` (+1/-1) to the refcount of every L2 table and cluster reachable from `l1`.
    fn adjust_tree(&mut self, l1: &[u64], increment: bool) -> Result<()> {
        let entries = self.cs() / 8;
        for &e in l1 {
            let l2 = e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            for i in 0..entries {
                let raw = self.l2_entry(l2, i)?;
                let c = self.decode(raw)?;
                if let Some((h, len)) = self.host_range(c) {
                    if increment {
                        self.take_ref(h, len)?
                    } else {
                        self.free_now(h, len)?
                    }
                }
            }
            if increment {
                self.take_ref(l2, self.cs())?
            } else {
                self.free_now(l2, self.cs())?
            }
        }
        Ok(())
    }

    /// Recompute the COPIED flags of the active L1 and L2 tables from the refcounts.
    fn refresh_copied_flags(&mut self) -> Result<()> {
        let entries = self.cs() / 8;
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let l2 = e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            for j in 0..entries {
                let raw = self.l2_entry(l2, j)?;
                let want = match self.decode(raw)? {
                    Cluster::Data { host, .. } | Cluster::Zero { host } if host != 0 => {
                        Some(self.refcount(host / self.cs())? == 1)
                    }
                    _ => None,
                };
                if let Some(w) = want {
                    let new = if w { raw | COPIED } else { raw & !COPIED };
                    if new != raw {
                        self.set_l2_entry(l2, j, new)?;
                    }
                }
            }
            let w = self.refcount(l2 / self.cs())? == 1;
            let new = if w { e | COPIED } else { e & !COPIED };
            if new != e {
                self.set_l1_entry(i, new);
            }
        }
        Ok(())
    }

    /// Take a snapshot by a copy-on-write switch through the header: the whole post-snapshot
    /// state (a new active L1 table and copies of the active L2 tables with COPIED cleared,
    /// the snapshot's L1 table, the new snapshot table, and a new refcount table and blocks
    /// describing exactly that state) is stored in unreferenced clusters past everything in
    /// use and flushed; then one write of the header's first sector switches to it. A crash
    /// before that write leaves the old image with unreferenced garbage past its end, after it
    /// the new image: refcounts and COPIED flags never disagree on storage.
    pub fn create_snapshot(&mut self, name: &str, date: (u32, u32)) -> Result<SnapshotInfo> {
        if name.is_empty() || name.len() > MAX_ID_NAME {
            return Err(Error::InvalidArgument(
                "snapshot name must be 1 to 1024 bytes".into(),
            ));
        }
        if self.snapshots.iter().any(|s| s.info.name == name) {
            return Err(Error::InvalidArgument(format!(
                "snapshot '{name}' already exists"
            )));
        }
        if self.snapshots.len() >= MAX_SNAPSHOTS as usize {
            return Err(Error::InvalidArgument("too many snapshots".into()));
        }
        self.write_back()?;
        self.storage.flush()?;
        let cs = self.cs();
        let entries = cs / 8;
        let id = self
            .snapshots
            .iter()
            .filter_map(|s| s.info.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let info = SnapshotInfo {
            id: id.to_string(),
            name: name.to_string(),
            vm_state_size: 0,
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            disk_size: self.h.size,
            icount: None,
        };

        // Refcount changes against the current state, per cluster index.
        let mut delta: BTreeMap<u64, i64> = BTreeMap::new();
        let mut change = |first: u64, bytes: u64, by: i64| -> Result<()> {
            let last = match first.checked_add(bytes) {
                Some(e) if e <= MAX_HOST_OFFSET => e.div_ceil(cs),
                _ => return invalid(format!("metadata points past the image at {first:#x}")),
            };
            for c in first / cs..last {
                *delta.entry(c).or_default() += by;
            }
            Ok(())
        };
        // Every cluster the active L2 tables reference gains the snapshot's reference; the
        // copies of the tables have COPIED clear on all of them. The old tables become the
        // snapshot's (their refcounts stay).
        let old_l1 = self.l1.clone();
        let mut l2_copies: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, &e) in old_l1.iter().enumerate() {
            let l2 = e & L1_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let mut table = vec![0u8; cs as usize];
            for j in 0..entries {
                let raw = self.l2_entry(l2, j)?;
                let c = self.decode(raw)?;
                if let Some((h, len)) = self.host_range(c) {
                    change(h, len, 1)?;
                }
                let new = if raw & COMPRESSED == 0 {
                    raw & !COPIED
                } else {
                    raw
                };
                let at = j as usize * 8;
                table[at..at + 8].copy_from_slice(&new.to_be_bytes());
            }
            l2_copies.push((i, table));
        }
        // The old active L1 table, refcount table and blocks and snapshot table are dropped.
        if !old_l1.is_empty() {
            change(self.h.l1_table_offset, old_l1.len() as u64 * 8, -1)?;
        }
        change(
            self.h.refcount_table_offset,
            u64::from(self.h.refcount_table_clusters) * cs,
            -1,
        )?;
        for &e in &self.reftable {
            let off = e & REFT_OFFSET_MASK;
            if off != 0 {
                change(off, cs, -1)?;
            }
        }
        if self.h.nb_snapshots > 0 && self.snapshot_table_len > 0 {
            change(self.h.snapshots_offset, self.snapshot_table_len, -1)?;
        }

        // Layout of the new structures, from the first cluster nothing claims.
        let base = self.referenced_end()?;
        if base.saturating_mul(cs) >= MAX_HOST_OFFSET / 2 {
            return Err(Error::Unsupported(
                "image would grow too large for a snapshot".into(),
            ));
        }
        let l1_clusters = (old_l1.len() as u64 * 8).div_ceil(cs).max(1);
        let new_l1_off = base * cs;
        let l2_first = base + l1_clusters;
        let mut new_l1 = vec![0u64; old_l1.len()];
        for (k, (i, _)) in l2_copies.iter().enumerate() {
            new_l1[*i] = ((l2_first + k as u64) * cs) | COPIED;
        }
        let snap_l1_cluster = l2_first + l2_copies.len() as u64;
        let snap_l1_clusters = (old_l1.len() as u64 * 8).div_ceil(cs);
        let snap_l1_off = if old_l1.is_empty() {
            0
        } else {
            snap_l1_cluster * cs
        };
        let table_cluster = snap_l1_cluster + snap_l1_clusters;
        let mut snaps = self.snapshots.clone();
        snaps.push(Snapshot {
            info: info.clone(),
            l1_table_offset: snap_l1_off,
            l1_size: old_l1.len() as u32,
            extra_rest: Vec::new(),
        });
        let table_bytes = serialize_table(&snaps);
        let table_clusters = (table_bytes.len() as u64).div_ceil(cs).max(1);
        let fixed_end = table_cluster + table_clusters;

        // New refcount blocks for the clusters below `base`: the old counts plus the changes.
        if delta.range(base..).next().is_some() {
            return invalid("a cluster in use has no refcount");
        }
        let rb_bits = self.rb_bits();
        let per = 1u64 << rb_bits;
        let order = self.h.refcount_order;
        let limit = self.refcount_limit();
        let mut old_blocks: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for bi in 0..base.div_ceil(per).min(self.reftable.len() as u64) {
            let off = self.reftable[bi as usize] & REFT_OFFSET_MASK;
            if off != 0 {
                old_blocks.insert(bi, self.refblock_bytes(off)?);
            }
        }
        for (&c, &d) in &delta {
            if d == 0 {
                continue;
            }
            let block = old_blocks
                .entry(c >> rb_bits)
                .or_insert_with(|| vec![0u8; cs as usize]);
            let i = (c & (per - 1)) as usize;
            let v = i128::from(self.refcount_get(block, i)) + i128::from(d);
            if v < 0 {
                return invalid(format!("cluster {:#x} has too low a refcount", c * cs));
            }
            if v as u128 > u128::from(limit) {
                return invalid(format!("refcount of cluster {:#x} overflows", c * cs));
            }
            crate::meta::rc_set(block, order, i, v as u64);
        }
        let mut nonempty: Vec<u64> = old_blocks
            .iter()
            .filter(|(bi, b)| {
                **bi < base >> rb_bits && (0..per as usize).any(|i| self.refcount_get(b, i) != 0)
            })
            .map(|(bi, _)| *bi)
            .collect();
        nonempty.sort_unstable();

        // The refcount table and blocks describe themselves: grow them until they fit.
        let mut rt_clusters = u64::from(self.h.refcount_table_clusters).max(1);
        let mut rb_count = 0u64;
        let (blocks, end) = loop {
            let end = fixed_end + rt_clusters + rb_count;
            let mut blocks = nonempty.clone();
            blocks.extend(base >> rb_bits..end.div_ceil(per));
            let rt_needed = (blocks.last().map_or(0, |b| b + 1) * 8).div_ceil(cs).max(1);
            if rt_needed <= rt_clusters && blocks.len() as u64 == rb_count {
                break (blocks, end);
            }
            rt_clusters = rt_clusters.max(rt_needed);
            rb_count = blocks.len() as u64;
        };
        if rt_clusters * cs > 8 * 1024 * 1024 || end * cs >= MAX_HOST_OFFSET {
            return Err(Error::Unsupported(
                "image would grow too large for a snapshot".into(),
            ));
        }
        let rt_off = fixed_end * cs;
        let rb_first = fixed_end + rt_clusters;
        let mut new_reftable = vec![0u64; (rt_clusters * cs / 8) as usize];
        let mut rb_writes: Vec<(u64, Vec<u8>)> = Vec::new();
        for (k, &bi) in blocks.iter().enumerate() {
            let off = (rb_first + k as u64) * cs;
            new_reftable[bi as usize] = off;
            let mut block = old_blocks
                .remove(&bi)
                .unwrap_or_else(|| vec![0u8; cs as usize]);
            let lo = (bi * per).max(base);
            let hi = ((bi + 1) * per).min(end);
            for c in lo..hi {
                crate::meta::rc_set(&mut block, order, (c & (per - 1)) as usize, 1);
            }
            rb_writes.push((off, block));
        }

        // Store everything, flush, then switch the header in one write.
        let l1_bytes = |t: &[u64], clusters: u64| {
            let mut b: Vec<u8> = t.iter().flat_map(|e| e.to_be_bytes()).collect();
            b.resize((clusters * cs) as usize, 0);
            b
        };
        self.checked_write(&[], &l1_bytes(&new_l1, l1_clusters), new_l1_off)?;
        for (k, (_, table)) in l2_copies.iter().enumerate() {
            self.checked_write(&[], table, (l2_first + k as u64) * cs)?;
        }
        if snap_l1_off != 0 {
            let snap_l1: Vec<u64> = old_l1.iter().map(|e| e & L1_OFFSET_MASK).collect();
            self.checked_write(&[], &l1_bytes(&snap_l1, snap_l1_clusters), snap_l1_off)?;
        }
        let mut tb = table_bytes.clone();
        tb.resize((table_clusters * cs) as usize, 0);
        self.checked_write(&[], &tb, table_cluster * cs)?;
        self.checked_write(&[], &l1_bytes(&new_reftable, rt_clusters), rt_off)?;
        for (off, block) in &rb_writes {
            self.checked_write(&[], block, *off)?;
        }
        self.storage.flush()?;
        let mut h = self.h.clone();
        h.l1_table_offset = new_l1_off;
        h.refcount_table_offset = rt_off;
        h.refcount_table_clusters = rt_clusters as u32;
        h.nb_snapshots = snaps.len() as u32;
        h.snapshots_offset = table_cluster * cs;
        let hb = h.serialize()?;
        self.storage.write_at(&hb[..hb.len().min(512)], 0)?;
        self.storage.flush()?;
        self.h = h;
        self.adopt_switched(new_l1, new_reftable, end);
        self.snapshots = snaps;
        self.snapshot_table_len = table_bytes.len() as u64;
        Ok(info)
    }

    pub fn delete_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        let idx = find(&self.snapshots, id_or_name)?;
        self.write_back()?;
        let s = self.snapshots[idx].clone();
        let l1 = self.snapshot_l1(&s)?;
        let mut snaps = self.snapshots.clone();
        snaps.remove(idx);
        // Unlink first (stored and flushed), then drop the references it held.
        self.replace_snapshot_table(snaps)?;
        self.adjust_tree(&l1, false)?;
        if s.l1_size > 0 {
            self.free_now(s.l1_table_offset, u64::from(s.l1_size) * 8)?;
        }
        self.write_back()?;
        self.storage.flush()?;
        self.refresh_copied_flags()?;
        self.write_back()
    }
}
