//! Permissions on a node, as QEMU's `BLK_PERM_*`: what a user does with a node (`perm`) and
//! what it lets others do meanwhile (`shared`).

use std::fmt;
use std::ops::{BitAnd, BitOr, Not};

/// A set of block permissions (QEMU's `BLK_PERM_*` bit values, which also fix the image-lock
/// byte offsets: 100 + bit and 200 + bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perm(u8);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reads return consistent data.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// Writes that may change the visible data.
    pub const WRITE: Perm = Perm(0x02);
    /// Writes that do not change the visible data.
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// Changing the size.
    pub const RESIZE: Perm = Perm(0x08);
    /// Every permission.
    pub const ALL: Perm = Perm(0x0f);

    /// The single permissions in bit order, with QEMU's names.
    pub const NAMED: [(Perm, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    /// The permission a QAPI `BlockPermission` names.
    pub fn from_qapi(p: qmp_api::BlockPermission) -> Perm {
        use qmp_api::BlockPermission as P;
        match p {
            P::ConsistentRead => Perm::CONSISTENT_READ,
            P::Write => Perm::WRITE,
            P::WriteUnchanged => Perm::WRITE_UNCHANGED,
            P::Resize => Perm::RESIZE,
            // A permission a newer peer named: none this layer knows.
            P::UnknownValue => Perm::NONE,
        }
    }

    /// `self | other`, usable in constants.
    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }

    /// The raw bits.
    pub fn bits(self) -> u8 {
        self.0
    }

    /// Whether every permission of `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether no permission is set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        Perm(self.0 & rhs.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Display for Perm {
    /// QEMU's `bdrv_perm_names`: names joined by `, `.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = Perm::NAMED
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect();
        f.write_str(&names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_join_like_qemu() {
        assert_eq!((Perm::WRITE | Perm::RESIZE).to_string(), "write, resize");
        assert_eq!(Perm::NONE.to_string(), "");
    }

    #[test]
    fn complement_stays_within_known_bits() {
        assert_eq!(
            !Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE
        );
        assert_eq!(!Perm::ALL, Perm::NONE);
    }
}
