//! `blkdebug`: a filter over its `image` child that injects errors.
//!
//! Each `inject-error` rule names an event. When that event happens on this node (the layer
//! fires `pwritev`/`pwritev_zero`/`pwritev_done`/`flush_to_os` around I/O; format drivers fire
//! `read_aio`/`write_aio`/... on their file child), the rules for it become the active set. The
//! next request of a matching I/O type (default: read, write, write-zeroes, discard, flush) that
//! overlaps the rule's sector (any, by default) fails with the rule's errno; a `once` rule is
//! then removed. Only the initial state (1) is supported: rules with another `state` never fire.
//! As in QEMU, the event `none` fires once when the node opens: its rules are active from the
//! start. `immediately` only decides, in QEMU, whether the failing request yields once before
//! it completes; requests here complete synchronously, so both values act alike: the request
//! that meets the rule fails.

use std::sync::{Arc, Mutex};

use qmp_api::{BlkdebugIOType, BlkdebugInjectErrorOptions, BlockdevOptionsBlkdebug};

use crate::driver::{BlkdebugEvent, BlockDriver, ChildKind, DriverInfo, OpenContext};
use crate::error::{BlockError, BlockResult};
use crate::node::{BlockNode, lock};
use crate::perm::Perm;

/// The bit of an I/O type in a rule's mask.
fn bit(iotype: BlkdebugIOType) -> u8 {
    1 << match iotype {
        BlkdebugIOType::Read => 0,
        BlkdebugIOType::Write => 1,
        BlkdebugIOType::WriteZeroes => 2,
        BlkdebugIOType::Discard => 3,
        BlkdebugIOType::Flush => 4,
        BlkdebugIOType::BlockStatus => 5,
    }
}

#[derive(Debug, Clone)]
struct Rule {
    id: usize,
    event: BlkdebugEvent,
    state: i64,
    iotypes: u8,
    errno: i32,
    /// Byte offset the request must cover, or `None` for any.
    offset: Option<u64>,
    once: bool,
}

#[derive(Default)]
struct Rules {
    all: Vec<Rule>,
    /// Ids of the active rules, newest first.
    active: Vec<usize>,
}

/// An error-injecting filter.
pub struct BlkdebugDriver {
    image: Arc<BlockNode>,
    /// Whether rules were configured (the file name is then a `json:` one).
    configured: bool,
    rules: Mutex<Rules>,
}

const INITIAL_STATE: i64 = 1;

fn rule(id: usize, r: &BlkdebugInjectErrorOptions) -> BlockResult<Rule> {
    let iotypes = match r.iotype {
        None => [
            BlkdebugIOType::Read,
            BlkdebugIOType::Write,
            BlkdebugIOType::WriteZeroes,
            BlkdebugIOType::Discard,
            BlkdebugIOType::Flush,
        ]
        .into_iter()
        .map(bit)
        .fold(0, |a, b| a | b),
        Some(t) => bit(t),
    };
    let errno = i32::try_from(r.errno.unwrap_or(i64::from(libc::EIO)))
        .map_err(|_| BlockError::new("Invalid errno"))?;
    let offset = match r.sector.map(u64::try_from) {
        None | Some(Err(_)) => None,
        Some(Ok(s)) => Some(
            s.checked_mul(512)
                .ok_or_else(|| BlockError::new("Invalid sector"))?,
        ),
    };
    Ok(Rule {
        id,
        event: r.event,
        state: r.state.unwrap_or(0),
        iotypes,
        errno,
        offset,
        once: r.once.unwrap_or(false),
    })
}

/// Opens the filter over its `image`. `config` and `set-state` are refused. The request
/// limits (`align`, `max-transfer`, `opt-write-zero`, `max-write-zero`, `opt-discard`,
/// `max-discard`) are checked with QEMU's words, then refused unless 0 (QEMU's "no
/// constraint"): the block layer here neither aligns nor splits requests. `take-child-perms`
/// and `unshare-child-perms` adjust the permissions taken on `image`, as in QEMU.
pub(crate) fn open(
    ctx: &mut OpenContext<'_>,
    options: &BlockdevOptionsBlkdebug,
) -> BlockResult<Box<dyn BlockDriver>> {
    let mut rules = Rules::default();
    for (id, r) in options.inject_error.iter().flatten().enumerate() {
        rules.all.push(rule(id, r)?);
    }
    if options.config.is_some() {
        return Err(BlockError::new("blkdebug option 'config' is not supported"));
    }
    if options.set_state.is_some() {
        return Err(BlockError::new(
            "blkdebug option 'set-state' is not supported",
        ));
    }
    check_limits(options)?;
    let perms = |list: &Option<Vec<qmp_api::BlockPermission>>| {
        list.iter()
            .flatten()
            .fold(Perm::NONE, |acc, p| acc | Perm::from_qapi(*p))
    };
    let kind = ChildKind::FilteredAdjusted {
        take: perms(&options.take_child_perms),
        unshare: perms(&options.unshare_child_perms),
    };
    let image = ctx.open_child("image", &options.image, kind)?;
    let driver = BlkdebugDriver {
        configured: !rules.all.is_empty(),
        image,
        rules: Mutex::new(rules),
    };
    // QEMU's `bdrv_debug_event(bs, BLKDBG_NONE)` at the end of its open.
    driver.debug_event(BlkdebugEvent::None);
    Ok(Box::new(driver))
}

/// QEMU's checks of the request limits (`Cannot meet constraints with ...`), then the refusal
/// of any limit but 0.
fn check_limits(o: &BlockdevOptionsBlkdebug) -> BlockResult<()> {
    const INT_MAX: u64 = i32::MAX as u64;
    // QEMU reads them as sizes: a negative number is not one.
    let size = |name: &str, v: Option<i64>| -> BlockResult<u64> {
        match v {
            None => Ok(0),
            Some(v) => u64::try_from(v).map_err(|_| {
                BlockError::new(format!(
                    "Value '{v}' is out of range for parameter '{name}'"
                ))
            }),
        }
    };
    let align = size("align", o.align)?;
    if align != 0 && (align >= INT_MAX || !align.is_power_of_two()) {
        return Err(BlockError::new(format!(
            "Cannot meet constraints with align {align}"
        )));
    }
    // The file below has a request alignment of 1.
    let base = align.max(1);
    let limits = [
        ("max-transfer", o.max_transfer, None),
        ("opt-write-zero", o.opt_write_zero, None),
        ("max-write-zero", o.max_write_zero, Some(1)),
        ("opt-discard", o.opt_discard, None),
        ("max-discard", o.max_discard, Some(3)),
    ];
    let mut values = [0u64; 5];
    for (i, (name, value, _)) in limits.iter().enumerate() {
        values[i] = size(name, value.map(i64::from))?;
    }
    for (i, (name, _, opt)) in limits.iter().enumerate() {
        let v = values[i];
        let unit = opt.map_or(base, |o| values[o].max(base));
        if v != 0 && (v >= INT_MAX || v % unit != 0) {
            return Err(BlockError::new(format!(
                "Cannot meet constraints with {name} {v}"
            )));
        }
    }
    let given = std::iter::once(("align", align))
        .chain(limits.iter().zip(values).map(|((name, ..), v)| (*name, v)));
    for (name, v) in given {
        if v != 0 {
            return Err(BlockError::new(format!(
                "Parameter '{name}' is not supported with a value other than 0 by this block layer"
            )));
        }
    }
    Ok(())
}

impl BlkdebugDriver {
    fn check(&self, offset: u64, len: u64, iotype: BlkdebugIOType) -> BlockResult<()> {
        let mut rules = lock(&self.rules);
        let hit = rules.active.iter().copied().find(|id| {
            rules.all.iter().any(|r| {
                r.id == *id
                    && r.iotypes & bit(iotype) != 0
                    && r.offset
                        .is_none_or(|o| len > 0 && o >= offset && o < offset + len)
            })
        });
        let Some(id) = hit else {
            return Ok(());
        };
        let Some(rule) = rules.all.iter().find(|r| r.id == id).cloned() else {
            return Ok(());
        };
        if rule.once {
            rules.active.retain(|a| *a != id);
            rules.all.retain(|r| r.id != id);
        }
        Err(BlockError::from_errno(rule.errno))
    }
}

impl BlockDriver for BlkdebugDriver {
    fn size(&self) -> BlockResult<u64> {
        self.image.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.check(offset, buf.len() as u64, BlkdebugIOType::Read)?;
        self.image.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.check(offset, buf.len() as u64, BlkdebugIOType::Write)?;
        self.image.write_at(offset, buf)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check(offset, len, BlkdebugIOType::WriteZeroes)?;
        self.image.write_zeroes_at(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.check(0, 0, BlkdebugIOType::Flush)
    }

    fn flushes_to_disk(&self) -> bool {
        true
    }

    fn truncate(&self, size: u64) -> BlockResult<()> {
        self.image.truncate(size)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        self.check(offset, len, BlkdebugIOType::BlockStatus)?;
        self.image.block_status(offset, len)
    }

    fn unallocated_reads_zero(&self) -> bool {
        self.image.driver().unallocated_reads_zero()
    }

    fn debug_event(&self, event: BlkdebugEvent) {
        let mut rules = lock(&self.rules);
        let fired: Vec<usize> = rules
            .all
            .iter()
            .filter(|r| r.event == event && (r.state == 0 || r.state == INITIAL_STATE))
            .map(|r| r.id)
            .collect();
        if !fired.is_empty() {
            rules.active = fired.into_iter().rev().collect();
        }
    }

    /// QEMU's blkdebug is a filter: its image counts as a layer below it.
    fn filtered_child(&self) -> Option<&'static str> {
        Some("image")
    }

    fn info(&self) -> DriverInfo {
        let image = crate::graph::node_filename(&self.image);
        DriverInfo {
            filename: (!self.configured && !image.starts_with("json:"))
                .then(|| format!("blkdebug::{image}")),
            dirty_flag: Some(false),
            ..DriverInfo::default()
        }
    }

    fn close(&self) -> BlockResult<()> {
        Ok(())
    }
}
