//! The member order QEMU writes JSON objects in.
//!
//! QEMU keeps QMP objects in a hash table (`QDict`, 512 buckets) and serialises them by walking
//! the buckets in order; inside a bucket the most recently inserted member comes first. Replies,
//! events and echoed `id` values therefore come out in an order that depends only on the member
//! names (`{"return": ..., "id": ...}` but `{"id": ..., "error": ...}`). Writing our objects in
//! the same order makes our output byte-for-byte comparable with qemu-storage-daemon's.

const BUCKETS: u32 = 512;

/// The bucket QEMU's `QDict` puts `key` in (the TDB hash of the name, modulo 512).
pub fn bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = ((i as u32).wrapping_mul(5)) % 24;
        value = value.wrapping_add(u32::from(b) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % BUCKETS
}

/// Indices of `keys` (given in insertion order) in the order QEMU iterates them.
pub fn order<'a>(keys: impl Iterator<Item = &'a str>) -> Vec<usize> {
    let mut ranked: Vec<(u32, usize)> = keys.enumerate().map(|(i, k)| (bucket(k), i)).collect();
    // Bucket ascending; inside one bucket the later insertion first.
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    ranked.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sorted(keys: &[&str]) -> Vec<String> {
        order(keys.iter().copied())
            .into_iter()
            .map(|i| keys[i].to_string())
            .collect()
    }

    /// Every order below was read off qemu-storage-daemon 10.0.2's output.
    #[test]
    fn matches_the_member_orders_qemu_storage_daemon_writes() {
        assert_eq!(sorted(&["id", "return"]), ["return", "id"]);
        assert_eq!(sorted(&["error", "id"]), ["id", "error"]);
        assert_eq!(sorted(&["desc", "class"]), ["class", "desc"]);
        assert_eq!(
            sorted(&["major", "minor", "micro"]),
            ["micro", "minor", "major"]
        );
        assert_eq!(sorted(&["package", "qemu"]), ["qemu", "package"]);
        assert_eq!(
            sorted(&["capabilities", "version"]),
            ["version", "capabilities"]
        );
        assert_eq!(
            sorted(&["data", "event", "timestamp"]),
            ["timestamp", "event", "data"]
        );
        assert_eq!(
            sorted(&["microseconds", "seconds"]),
            ["seconds", "microseconds"]
        );
        assert_eq!(sorted(&["id", "status"]), ["status", "id"]);
        assert_eq!(
            sorted(&["type", "speed", "offset", "len", "device"]),
            ["device", "len", "offset", "speed", "type"]
        );
    }

    /// QSD reports `'execute' clashes with 'exec-oob'` whichever comes first in the input.
    #[test]
    fn exec_oob_is_iterated_before_execute() {
        assert_eq!(sorted(&["execute", "exec-oob"]), ["exec-oob", "execute"]);
    }
}
