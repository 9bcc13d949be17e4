//! The image header and its extensions: parsing with validation, and serialisation.

use crate::meta::MAX_HOST_OFFSET;
use crate::{Error, Result, invalid};

pub(crate) const MAGIC: u32 = 0x5146_49fb;
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1 << 0;

/// Largest L1 table accepted (entries).
pub(crate) const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
/// Largest refcount table accepted (bytes).
const MAX_REFTABLE_BYTES: u64 = 8 * 1024 * 1024;
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
const MAX_BACKING_NAME: u32 = 1023;
const V2_HEADER_LEN: usize = 72;
const V3_HEADER_LEN: usize = 112;

/// The feature name table we write: (type, bit, name).
const FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The bitmaps header extension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BitmapsExt {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub bitmaps: Option<BitmapsExt>,
    /// Extensions we do not interpret, kept verbatim when the header is rewritten.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
    /// Header fields past the ones we know (bytes 112 to `header_length`), kept verbatim.
    pub unknown_fields: Vec<u8>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

pub(crate) fn get_be32(b: &[u8], at: usize) -> u32 {
    be32(b, at)
}
pub(crate) fn get_be64(b: &[u8], at: usize) -> u64 {
    be64(b, at)
}

fn feature_names(table: &[(u8, u8, String)], kind: u8, bits: u64) -> String {
    (0..64)
        .filter(|b| bits & (1u64 << b) != 0)
        .map(|b| {
            table
                .iter()
                .find(|(k, bit, _)| *k == kind && u32::from(*bit) == b)
                .map(|(_, _, n)| n.clone())
                .unwrap_or_else(|| format!("unknown feature bit {b}"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parse the first cluster of an image (`buf` may be shorter than a cluster if the file is).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN {
            return invalid("file too short for a qcow2 header");
        }
        if be32(buf, 0) != MAGIC {
            return invalid("bad magic (not a qcow2 image)");
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::Unsupported(format!("qcow2 version {version}")));
        }
        let backing_file_offset = be64(buf, 8);
        let backing_file_size = be32(buf, 16);
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return invalid(format!("cluster bits {cluster_bits} out of range 9..21"));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(buf, 24);
        let crypt_method = be32(buf, 32);
        if crypt_method != 0 {
            return Err(Error::Unsupported("encrypted images".into()));
        }
        let mut h = Header {
            version,
            cluster_bits,
            size,
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
            unknown_extensions: Vec::new(),
            unknown_fields: Vec::new(),
        };
        let mut header_length = V2_HEADER_LEN as u64;
        let mut compression_type = 0u8;
        if version == 3 {
            if buf.len() < 104 {
                return invalid("file too short for a version 3 header");
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            header_length = u64::from(be32(buf, 100));
            if header_length < 104
                || header_length > cluster_size
                || !header_length.is_multiple_of(8)
            {
                return invalid(format!("header length {header_length} invalid"));
            }
            if header_length > 104 && buf.len() > 104 {
                compression_type = buf[104];
            }
            if h.refcount_order > 6 {
                return invalid(format!("refcount order {} > 6", h.refcount_order));
            }
        }
        let end = buf.len().min(cluster_size as usize);
        if header_length as usize > end {
            return invalid("header extends past the end of the file");
        }
        if header_length as usize > V3_HEADER_LEN {
            h.unknown_fields = buf[V3_HEADER_LEN..header_length as usize].to_vec();
        }
        // Header extensions, up to the backing file name if it follows them.
        let mut ext_end = end;
        if backing_file_offset != 0 && (backing_file_offset as usize) < ext_end {
            ext_end = backing_file_offset as usize;
        }
        let mut feature_table = Vec::new();
        let mut pos = header_length as usize;
        let mut data_file = false;
        loop {
            if pos + 8 > ext_end {
                break;
            }
            let ty = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            pos += 8;
            if ty == EXT_END {
                break;
            }
            if len > ext_end - pos {
                return invalid(format!(
                    "header extension {ty:#x} runs past the header cluster"
                ));
            }
            let data = &buf[pos..pos + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(
                        String::from_utf8(data.to_vec())
                            .map_err(|_| Error::Invalid("backing format is not UTF-8".into()))?,
                    )
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_bytes = &e[2..48];
                        let n = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
                        feature_table.push((
                            e[0],
                            e[1],
                            String::from_utf8_lossy(&name_bytes[..n]).into_owned(),
                        ));
                    }
                }
                EXT_BITMAPS => {
                    if len < 24 {
                        return invalid("bitmaps extension too short");
                    }
                    h.bitmaps = Some(BitmapsExt {
                        nb_bitmaps: be32(data, 0),
                        directory_size: be64(data, 8),
                        directory_offset: be64(data, 16),
                    });
                }
                EXT_CRYPTO => return Err(Error::Unsupported("encrypted images".into())),
                EXT_DATA_FILE => data_file = true,
                _ => h.unknown_extensions.push((ty, data.to_vec())),
            }
            pos += len.div_ceil(8) * 8;
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::Unsupported(format!(
                "incompatible features: {}",
                feature_names(&feature_table, 0, unknown)
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 || data_file {
            return Err(Error::Unsupported("external data file".into()));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(Error::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 || compression_type != 0 {
            return Err(Error::Unsupported(match compression_type {
                1 => "compression type zstd (only zlib is supported)".to_string(),
                t => format!("compression type {t} (only zlib is supported)"),
            }));
        }
        if backing_file_offset != 0 {
            if backing_file_size > MAX_BACKING_NAME {
                return invalid("backing file name too long");
            }
            let start = backing_file_offset as usize;
            let stop = start.saturating_add(backing_file_size as usize);
            if backing_file_offset > cluster_size || stop > end {
                return invalid("backing file name outside the header cluster");
            }
            h.backing_file = Some(
                String::from_utf8(buf[start..stop].to_vec())
                    .map_err(|_| Error::Invalid("backing file name is not UTF-8".into()))?,
            );
        }
        // Tables.
        let l2_bits = u64::from(cluster_bits - 3);
        let needed_l1 = size.div_ceil(cluster_size).div_ceil(1 << l2_bits);
        if size > (1u64 << 62) {
            return invalid("virtual size too large");
        }
        if u64::from(h.l1_size) < needed_l1 {
            return invalid("L1 table too small for the virtual size");
        }
        if u64::from(h.l1_size) > MAX_L1_ENTRIES {
            return invalid("L1 table too large");
        }
        if !h.l1_table_offset.is_multiple_of(cluster_size)
            || (h.l1_size > 0 && h.l1_table_offset == 0)
        {
            return invalid("L1 table offset invalid");
        }
        // Tables must lie where host offsets can point (QEMU's `qcow2_validate_table`): an
        // offset near 2^64 would wrap around onto the header when indexed.
        let ends_in_range =
            |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= MAX_HOST_OFFSET);
        if !ends_in_range(h.l1_table_offset, u64::from(h.l1_size) * 8) {
            return invalid("Active L1 table offset invalid");
        }
        if !h.refcount_table_offset.is_multiple_of(cluster_size) || h.refcount_table_offset == 0 {
            return invalid("refcount table offset invalid");
        }
        if !ends_in_range(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cluster_size,
        ) {
            return invalid("Reference count table offset invalid");
        }
        if h.nb_snapshots > 0 && !ends_in_range(h.snapshots_offset, cluster_size) {
            return invalid("Snapshot table offset invalid");
        }
        if let Some(b) = &h.bitmaps
            && !ends_in_range(b.directory_offset, b.directory_size)
        {
            return invalid("bitmaps extension invalid");
        }
        if h.refcount_table_clusters == 0
            || u64::from(h.refcount_table_clusters) * cluster_size > MAX_REFTABLE_BYTES
        {
            return invalid("refcount table size invalid");
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return invalid("too many snapshots");
        }
        if h.nb_snapshots > 0
            && (!h.snapshots_offset.is_multiple_of(cluster_size) || h.snapshots_offset == 0)
        {
            return invalid("snapshot table offset invalid");
        }
        Ok(h)
    }

    /// Serialise as a version 3 header with its extensions and backing file name; the feature
    /// name table is left out when it does not fit the cluster (as QEMU does).
    pub fn serialize(&self) -> Result<Vec<u8>> {
        match self.serialize_with(true) {
            Ok(b) => Ok(b),
            Err(_) => self.serialize_with(false),
        }
    }

    fn serialize_with(&self, feature_table: bool) -> Result<Vec<u8>> {
        // Version 2 (written only when an image is created so): the short header, no
        // feature table.
        let v3 = self.version >= 3;
        let feature_table = feature_table && v3;
        let mut b = vec![0u8; if v3 { V3_HEADER_LEN } else { V2_HEADER_LEN }];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&(if v3 { 3u32 } else { 2 }).to_be_bytes());
        b[20..24].copy_from_slice(&self.cluster_bits.to_be_bytes());
        b[24..32].copy_from_slice(&self.size.to_be_bytes());
        b[36..40].copy_from_slice(&self.l1_size.to_be_bytes());
        b[40..48].copy_from_slice(&self.l1_table_offset.to_be_bytes());
        b[48..56].copy_from_slice(&self.refcount_table_offset.to_be_bytes());
        b[56..60].copy_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b[60..64].copy_from_slice(&self.nb_snapshots.to_be_bytes());
        b[64..72].copy_from_slice(&self.snapshots_offset.to_be_bytes());
        if v3 {
            b[72..80].copy_from_slice(&self.incompatible.to_be_bytes());
            b[80..88].copy_from_slice(&self.compatible.to_be_bytes());
            b[88..96].copy_from_slice(&self.autoclear.to_be_bytes());
            b[96..100].copy_from_slice(&self.refcount_order.to_be_bytes());
            b[100..104].copy_from_slice(
                &((V3_HEADER_LEN + self.unknown_fields.len()) as u32).to_be_bytes(),
            );
            b.extend_from_slice(&self.unknown_fields);
        }
        let ext = |b: &mut Vec<u8>, ty: u32, data: &[u8]| {
            b.extend_from_slice(&ty.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().div_ceil(8) * 8, 0);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        let mut table = Vec::new();
        let features: &[(u8, u8, &str)] = if feature_table { FEATURES } else { &[] };
        for &(kind, bit, name) in features {
            let mut e = [0u8; 48];
            e[0] = kind;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            table.extend_from_slice(&e);
        }
        if feature_table {
            ext(&mut b, EXT_FEATURE_TABLE, &table);
        }
        if let Some(bm) = &self.bitmaps {
            let mut d = [0u8; 24];
            d[0..4].copy_from_slice(&bm.nb_bitmaps.to_be_bytes());
            d[8..16].copy_from_slice(&bm.directory_size.to_be_bytes());
            d[16..24].copy_from_slice(&bm.directory_offset.to_be_bytes());
            ext(&mut b, EXT_BITMAPS, &d);
        }
        for (ty, data) in &self.unknown_extensions {
            ext(&mut b, *ty, data);
        }
        b.extend_from_slice(&[0u8; 8]);
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b[8..16].copy_from_slice(&off.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::InvalidArgument(
                "header and extensions do not fit in one cluster".into(),
            ));
        }
        Ok(b)
    }
}
