//! `blkdebug`: a filter over its `image` child that injects errors.
//!
//! Each `inject-error` rule names an event. When that event happens on this node (the layer
//! fires `pwritev`/`pwritev_zero`/`pwritev_done`/`flush_to_os` around I/O; format drivers fire
//! `read_aio`/`write_aio`/... on their file child), the rules for it become the active set. The
//! next request of a matching I/O type (default: read, write, write-zeroes, discard, flush) that
//! overlaps the rule's sector (any, by default) fails with the rule's errno; a `once` rule is
//! then removed. Only the initial state (1) is supported: rules with another `state` never fire.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::driver::{BlkdebugEvent, BlockDriver, ChildKind, DriverInfo, DriverSpec, OpenContext};
use crate::error::{BlockError, BlockResult};
use crate::node::{BlockNode, lock};

/// The `blkdebug` driver.
pub const SPEC: DriverSpec = DriverSpec {
    name: "blkdebug",
    is_protocol: true,
    open,
};

/// I/O types a rule can match (QEMU's `BlkdebugIOType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Zero writes.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
    /// Block-status queries.
    BlockStatus,
}

impl IoType {
    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "read" => IoType::Read,
            "write" => IoType::Write,
            "write-zeroes" => IoType::WriteZeroes,
            "discard" => IoType::Discard,
            "flush" => IoType::Flush,
            "block-status" => IoType::BlockStatus,
            _ => return None,
        })
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

fn parse_rule(id: usize, v: &Value) -> BlockResult<Rule> {
    let obj = v.as_object().ok_or_else(|| {
        BlockError::new("Invalid parameter type for 'inject-error', expected: object")
    })?;
    let event_name = obj
        .get("event")
        .and_then(Value::as_str)
        .ok_or_else(|| BlockError::new("Parameter 'event' is missing"))?;
    let event = BlkdebugEvent::from_name(event_name).ok_or_else(|| {
        BlockError::new(format!(
            "Parameter 'event' does not accept value '{event_name}'"
        ))
    })?;
    let int = |key: &str, default: i64| -> BlockResult<i64> {
        match obj.get(key) {
            None => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| {
                BlockError::new(format!(
                    "Invalid parameter type for '{key}', expected: integer"
                ))
            }),
        }
    };
    let flag = |key: &str| -> BlockResult<bool> {
        match obj.get(key) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(BlockError::new(format!(
                "Invalid parameter type for '{key}', expected: boolean"
            ))),
        }
    };
    let iotypes = match obj.get("iotype") {
        None => {
            IoType::Read.bit()
                | IoType::Write.bit()
                | IoType::WriteZeroes.bit()
                | IoType::Discard.bit()
                | IoType::Flush.bit()
        }
        Some(Value::String(s)) => IoType::from_name(s)
            .ok_or_else(|| {
                BlockError::new(format!("Parameter 'iotype' does not accept value '{s}'"))
            })?
            .bit(),
        Some(_) => {
            return Err(BlockError::new(
                "Invalid parameter type for 'iotype', expected: string",
            ));
        }
    };
    let errno = i32::try_from(int("errno", i64::from(libc::EIO))?)
        .map_err(|_| BlockError::new("Invalid errno"))?;
    let sector = int("sector", -1)?;
    for key in obj.keys() {
        if !matches!(
            key.as_str(),
            "event" | "state" | "iotype" | "errno" | "sector" | "once" | "immediately"
        ) {
            return Err(BlockError::new(format!("Parameter '{key}' is unexpected")));
        }
    }
    flag("immediately")?;
    Ok(Rule {
        id,
        event,
        state: int("state", 0)?,
        iotypes,
        errno,
        offset: match u64::try_from(sector) {
            Err(_) => None,
            Ok(s) => Some(
                s.checked_mul(512)
                    .ok_or_else(|| BlockError::new("Invalid sector"))?,
            ),
        },
        once: flag("once")?,
    })
}

fn open(ctx: &mut OpenContext<'_>) -> BlockResult<Box<dyn BlockDriver>> {
    let mut rules = Rules::default();
    if let Some(list) = ctx.opt_value("inject-error") {
        let list = list.as_array().ok_or_else(|| {
            BlockError::new("Invalid parameter type for 'inject-error', expected: array")
        })?;
        for (id, v) in list.iter().enumerate() {
            rules.all.push(parse_rule(id, v)?);
        }
    }
    for unsupported in ["config", "set-state"] {
        if ctx.opt_value(unsupported).is_some() {
            return Err(BlockError::new(format!(
                "blkdebug option '{unsupported}' is not supported"
            )));
        }
    }
    for ignored in [
        "align",
        "max-transfer",
        "opt-write-zero",
        "max-write-zero",
        "opt-discard",
        "max-discard",
        "take-child-perms",
        "unshare-child-perms",
    ] {
        ctx.opt_value(ignored);
    }
    let image = ctx
        .open_child("image", ChildKind::Filtered, true)?
        .ok_or_else(|| BlockError::new("Parameter 'image' is missing"))?;
    Ok(Box::new(BlkdebugDriver {
        configured: !rules.all.is_empty(),
        image,
        rules: Mutex::new(rules),
    }))
}

impl BlkdebugDriver {
    fn check(&self, offset: u64, len: u64, iotype: IoType) -> BlockResult<()> {
        let mut rules = lock(&self.rules);
        let hit = rules.active.iter().copied().find(|id| {
            rules.all.iter().any(|r| {
                r.id == *id
                    && r.iotypes & iotype.bit() != 0
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
        self.check(offset, buf.len() as u64, IoType::Read)?;
        self.image.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.check(offset, buf.len() as u64, IoType::Write)?;
        self.image.write_at(offset, buf)
    }

    fn write_zeroes_at(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.check(offset, len, IoType::WriteZeroes)?;
        self.image.write_zeroes_at(offset, len)
    }

    fn flush(&self) -> BlockResult<()> {
        self.check(0, 0, IoType::Flush)
    }

    fn truncate(&self, size: u64) -> BlockResult<()> {
        self.image.truncate(size)
    }

    fn block_status(&self, offset: u64, len: u64) -> BlockResult<(bool, u64)> {
        self.check(offset, len, IoType::BlockStatus)?;
        self.image.block_status(offset, len)
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
