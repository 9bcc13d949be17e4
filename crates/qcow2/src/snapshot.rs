//! Internal snapshots: the snapshot table, and creating, deleting and listing snapshots.

use crate::header::{Header, MAX_L1_ENTRIES, MAX_SNAPSHOTS, get_be32, get_be64};
use crate::meta::{COPIED, Cluster, L1_OFFSET_MASK, Meta};
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
        if u64::from(l1_size) > MAX_L1_ENTRIES || !l1_table_offset.is_multiple_of(cs) {
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
        self.write_back()?;
        let l1 = self.l1.clone();
        // References first: every table and cluster the snapshot will share gains one.
        self.adjust_tree(&l1, true)?;
        self.refresh_copied_flags()?;
        let snap_l1: Vec<u8> = self
            .l1
            .iter()
            .flat_map(|e| (e & !COPIED).to_be_bytes())
            .collect();
        let l1_off = if snap_l1.is_empty() {
            0
        } else {
            self.store_blob(&snap_l1)?
        };
        self.write_back()?;
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
        let mut snaps = self.snapshots.clone();
        snaps.push(Snapshot {
            info: info.clone(),
            l1_table_offset: l1_off,
            l1_size: self.l1.len() as u32,
            extra_rest: Vec::new(),
        });
        self.replace_snapshot_table(snaps)?;
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
