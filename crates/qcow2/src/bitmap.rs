//! Persistent dirty bitmaps: the bitmaps extension, bitmap directory and bitmap tables.

use crate::header::{AUTOCLEAR_BITMAPS, BitmapsExt, Header, get_be32, get_be64};
use crate::meta::{L1_OFFSET_MASK, Meta};
use crate::overlap::Metadata;
use crate::storage::Storage;
use crate::{Error, Result, invalid};

const FLAG_IN_USE: u32 = 1 << 0;
const FLAG_AUTO: u32 = 1 << 1;
const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
const TYPE_DIRTY_TRACKING: u8 = 1;
const MAX_BITMAPS: usize = 65535;
const MAX_NAME: usize = 1023;
const MAX_DIRECTORY_BYTES: u64 = 64 * 1024 * 1024;
/// Largest bitmap held in memory (bytes of bits).
const MAX_BITMAP_BYTES: usize = 512 * 1024 * 1024;

/// A persistent dirty bitmap: one bit per `granularity` bytes of the virtual disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistentBitmap {
    /// Unique name.
    pub name: String,
    /// Bytes of disk per bit (a power of two, 512 to 2 GiB).
    pub granularity: u64,
    /// Tracks writes (the `auto` flag).
    pub enabled: bool,
    /// Stored as in use: the image was not closed cleanly and the bits are inconsistent.
    pub in_use: bool,
    /// The bits, bit `i` of the bitmap being bit `i % 8` of byte `i / 8`.
    pub bits: Vec<u8>,
}

impl PersistentBitmap {
    /// An empty bitmap for a disk of `disk_size` bytes.
    pub fn new(name: &str, granularity: u64, enabled: bool, disk_size: u64) -> PersistentBitmap {
        PersistentBitmap {
            name: name.to_string(),
            granularity,
            enabled,
            in_use: false,
            bits: vec![0; Self::byte_len(disk_size, granularity)],
        }
    }

    /// Bytes of bits needed for a disk of `disk_size` bytes.
    pub fn byte_len(disk_size: u64, granularity: u64) -> usize {
        disk_size.div_ceil(granularity.max(1)).div_ceil(8) as usize
    }

    /// Whether bit `i` (covering `[i * granularity, (i + 1) * granularity)`) is set.
    pub fn is_set(&self, i: u64) -> bool {
        self.bits
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// Set bit `i`.
    pub fn set(&mut self, i: u64) {
        if let Some(b) = self.bits.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

/// A bitmap as stored in the image.
#[derive(Clone, Debug)]
pub(crate) struct BitmapEntry {
    pub bitmap: PersistentBitmap,
    table_offset: u64,
    table_size: u32,
    /// Host offsets of the data clusters its table points to.
    data_clusters: Vec<u64>,
    flags: u32,
    granularity_bits: u8,
    extra: Vec<u8>,
    /// Marked in use by this open; cleared again at close if the bits are still right.
    pub marked_by_us: bool,
    /// Has extra data we do not know and may not ignore: kept as it is, never used.
    pub foreign: bool,
}

impl BitmapEntry {
    /// The clusters this bitmap holds (offset, bytes): its table and its data.
    pub fn host_ranges(&self, cs: u64) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.data_clusters.iter().map(|&o| (o, cs)).collect();
        if self.table_size > 0 {
            v.push((self.table_offset, u64::from(self.table_size) * 8));
        }
        v
    }
}

fn read_exact(st: &dyn Storage, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    st.read_at(&mut b, off)?;
    Ok(b)
}

/// Load the bitmap directory and every consistent bitmap's bits.
pub(crate) fn load(st: &dyn Storage, h: &Header, ext: &BitmapsExt) -> Result<Vec<BitmapEntry>> {
    let cs = h.cluster_size();
    if ext.nb_bitmaps as usize > MAX_BITMAPS
        || ext.directory_size > MAX_DIRECTORY_BYTES
        || !ext.directory_offset.is_multiple_of(cs)
        || (ext.nb_bitmaps > 0 && ext.directory_offset == 0)
    {
        return invalid("bitmaps extension invalid");
    }
    let dir = read_exact(st, ext.directory_offset, ext.directory_size as usize)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    for _ in 0..ext.nb_bitmaps {
        if pos + 24 > dir.len() {
            return invalid("bitmap directory truncated");
        }
        let e = &dir[pos..];
        let table_offset = get_be64(e, 0);
        let table_size = get_be32(e, 8);
        let flags = get_be32(e, 12);
        let ty = e[16];
        let granularity_bits = e[17];
        let name_size = usize::from(u16::from_be_bytes([e[18], e[19]]));
        let extra_size = get_be32(e, 20) as usize;
        let total = 24 + extra_size + name_size;
        if extra_size > 1024 * 1024 || pos + total > dir.len() {
            return invalid("bitmap directory entry truncated");
        }
        if ty != TYPE_DIRTY_TRACKING {
            return Err(Error::Unsupported(format!("bitmap type {ty}")));
        }
        if !(9..=31).contains(&granularity_bits) {
            return invalid(format!(
                "bitmap granularity bits {granularity_bits} out of range"
            ));
        }
        if name_size == 0 || name_size > MAX_NAME || !table_offset.is_multiple_of(cs) {
            return invalid("bitmap directory entry invalid");
        }
        let extra = e[24..24 + extra_size].to_vec();
        // Extra data we do not understand and may not ignore: keep the bitmap, never use it.
        let foreign = extra_size > 0 && flags & FLAG_EXTRA_DATA_COMPATIBLE == 0;
        let name = String::from_utf8(e[24 + extra_size..total].to_vec())
            .map_err(|_| Error::Invalid("bitmap name is not UTF-8".into()))?;
        let granularity = 1u64 << granularity_bits;
        let nbytes = PersistentBitmap::byte_len(h.size, granularity);
        if nbytes > MAX_BITMAP_BYTES {
            return Err(Error::Unsupported(format!(
                "bitmap '{name}' is larger than 512 MiB"
            )));
        }
        let clusters = (nbytes as u64).div_ceil(cs);
        if u64::from(table_size) != clusters {
            return invalid(format!(
                "bitmap '{name}' table size does not match the disk size"
            ));
        }
        let mut bits = vec![0u8; nbytes];
        let mut data_clusters = Vec::new();
        if table_size > 0 {
            let t = read_exact(st, table_offset, table_size as usize * 8)?;
            for (i, c) in t.chunks_exact(8).enumerate() {
                let entry = get_be64(c, 0);
                let off = entry & L1_OFFSET_MASK;
                let start = i * cs as usize;
                let stop = (start + cs as usize).min(nbytes);
                if off != 0 {
                    if !off.is_multiple_of(cs) {
                        return invalid(format!("bitmap '{name}' table entry unaligned"));
                    }
                    data_clusters.push(off);
                    if flags & FLAG_IN_USE == 0 && !foreign {
                        st.read_at(&mut bits[start..stop], off)?;
                    }
                } else if entry & 1 != 0 && flags & FLAG_IN_USE == 0 && !foreign {
                    bits[start..stop].fill(0xff);
                }
            }
        }
        out.push(BitmapEntry {
            bitmap: PersistentBitmap {
                name,
                granularity,
                enabled: flags & FLAG_AUTO != 0,
                in_use: flags & FLAG_IN_USE != 0,
                bits,
            },
            table_offset,
            table_size,
            data_clusters,
            flags,
            granularity_bits,
            extra,
            marked_by_us: false,
            foreign,
        });
        pos += total.div_ceil(8) * 8;
    }
    Ok(out)
}

fn serialize_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut d = Vec::new();
    for e in entries {
        d.extend_from_slice(&e.table_offset.to_be_bytes());
        d.extend_from_slice(&e.table_size.to_be_bytes());
        d.extend_from_slice(&e.flags.to_be_bytes());
        d.push(TYPE_DIRTY_TRACKING);
        d.push(e.granularity_bits);
        d.extend_from_slice(&(e.bitmap.name.len() as u16).to_be_bytes());
        d.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        d.extend_from_slice(&e.extra);
        d.extend_from_slice(e.bitmap.name.as_bytes());
        d.resize(d.len().div_ceil(8) * 8, 0);
    }
    d
}

impl Meta {
    /// Rewrite the directory where it is (flags changed only) and flush.
    pub fn rewrite_bitmap_directory(&mut self) -> Result<()> {
        let Some(ext) = self.h.bitmaps else {
            return Ok(());
        };
        let d = serialize_directory(&self.bitmaps);
        if d.len() as u64 != ext.directory_size {
            return invalid("bitmap directory changed size");
        }
        self.checked_write(&[Metadata::BitmapDirectory], &d, ext.directory_offset)?;
        self.storage.flush()?;
        Ok(())
    }

    /// Mark every bitmap in use while the image is open read-write.
    pub fn mark_bitmaps_in_use(&mut self) -> Result<()> {
        let mut changed = false;
        for e in self.bitmaps.iter_mut().filter(|e| !e.foreign) {
            if e.flags & FLAG_IN_USE == 0 {
                e.flags |= FLAG_IN_USE;
                e.marked_by_us = true;
                changed = true;
            }
        }
        if changed {
            self.rewrite_bitmap_directory()
        } else {
            Ok(())
        }
    }

    /// At close: clear the in-use flag we set, for bitmaps whose bits are still right
    /// (disabled ones, or all of them when nothing was written).
    pub fn release_bitmaps(&mut self, written: bool) -> Result<()> {
        let mut changed = false;
        for e in &mut self.bitmaps {
            if e.marked_by_us && (!written || e.flags & FLAG_AUTO == 0) {
                e.flags &= !FLAG_IN_USE;
                e.marked_by_us = false;
                changed = true;
            }
        }
        if changed {
            self.rewrite_bitmap_directory()
        } else {
            Ok(())
        }
    }

    /// Replace every stored bitmap with `bitmaps`.
    pub fn store_bitmaps(&mut self, bitmaps: &[PersistentBitmap]) -> Result<()> {
        let cs = self.cs();
        for (i, b) in bitmaps.iter().enumerate() {
            if b.name.is_empty() || b.name.len() > MAX_NAME {
                return Err(Error::InvalidArgument(
                    "bitmap name must be 1 to 1023 bytes".into(),
                ));
            }
            if bitmaps[..i].iter().any(|o| o.name == b.name)
                || self
                    .bitmaps
                    .iter()
                    .any(|e| e.foreign && e.bitmap.name == b.name)
            {
                return Err(Error::InvalidArgument(format!(
                    "duplicate bitmap '{}'",
                    b.name
                )));
            }
            if !b.granularity.is_power_of_two() || !(512..=1 << 31).contains(&b.granularity) {
                return Err(Error::InvalidArgument(format!(
                    "bitmap '{}': granularity must be a power of two from 512 to 2G",
                    b.name
                )));
            }
            if b.bits.len() != PersistentBitmap::byte_len(self.h.size, b.granularity) {
                return Err(Error::InvalidArgument(format!(
                    "bitmap '{}' has {} bytes of bits, the disk needs {}",
                    b.name,
                    b.bits.len(),
                    PersistentBitmap::byte_len(self.h.size, b.granularity)
                )));
            }
        }
        if bitmaps.len() > MAX_BITMAPS {
            return Err(Error::InvalidArgument("too many bitmaps".into()));
        }
        self.write_back()?;
        let mut entries = Vec::new();
        for b in bitmaps {
            let mut table = Vec::new();
            let mut data_clusters = Vec::new();
            // Bits past the end of the disk must be stored as zeros.
            let mut bits = b.bits.clone();
            let nb_bits = self.h.size.div_ceil(b.granularity);
            if nb_bits % 8 != 0
                && let Some(last) = bits.last_mut()
            {
                *last &= (1u8 << (nb_bits % 8)) - 1;
            }
            for chunk in bits.chunks(cs as usize) {
                if chunk.iter().all(|&x| x == 0) {
                    table.extend_from_slice(&0u64.to_be_bytes());
                } else {
                    let off = self.store_blob(chunk)?;
                    data_clusters.push(off);
                    table.extend_from_slice(&off.to_be_bytes());
                }
            }
            let table_offset = if table.is_empty() {
                0
            } else {
                self.store_blob(&table)?
            };
            let mut flags = 0;
            if b.in_use {
                flags |= FLAG_IN_USE;
            }
            if b.enabled {
                flags |= FLAG_AUTO;
            }
            entries.push(BitmapEntry {
                bitmap: PersistentBitmap { bits, ..b.clone() },
                table_offset,
                table_size: (table.len() / 8) as u32,
                data_clusters,
                flags,
                granularity_bits: b.granularity.trailing_zeros() as u8,
                extra: Vec::new(),
                marked_by_us: false,
                foreign: false,
            });
        }
        entries.extend(self.bitmaps.iter().filter(|e| e.foreign).cloned());
        let dir = serialize_directory(&entries);
        let dir_off = if dir.is_empty() {
            0
        } else {
            self.store_blob(&dir)?
        };
        self.write_back()?;
        self.storage.flush()?;
        let old_ext = self.h.bitmaps;
        if entries.is_empty() {
            self.h.bitmaps = None;
            self.h.autoclear &= !AUTOCLEAR_BITMAPS;
        } else {
            self.h.bitmaps = Some(BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: dir_off,
            });
            self.h.autoclear |= AUTOCLEAR_BITMAPS;
        }
        self.write_header()?;
        self.storage.flush()?;
        let old = std::mem::replace(&mut self.bitmaps, entries);
        for e in old.into_iter().filter(|e| !e.foreign) {
            for off in e.data_clusters {
                self.free_now(off, cs)?;
            }
            if e.table_size > 0 {
                self.free_now(e.table_offset, u64::from(e.table_size) * 8)?;
            }
        }
        if let Some(x) = old_ext.filter(|x| x.directory_size > 0) {
            self.free_now(x.directory_offset, x.directory_size)?;
        }
        self.write_back()
    }
}
