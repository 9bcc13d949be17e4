//! Stand-ins for `qmp_api::BlockJobStatus` and `qmp_api::BlockJobVerb`, identical in shape to the
//! generated enums (variants, derives, `ALL`, `as_str`, `Display`). Used until the generated API
//! is committed; switching is the one `pub use` line in `lib.rs`.

use std::fmt;

/// A job's state (`JobStatus` in QEMU's schema).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum BlockJobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl BlockJobStatus {
    /// Every value, in schema order.
    pub const ALL: &'static [Self] = &[
        Self::Undefined,
        Self::Created,
        Self::Running,
        Self::Paused,
        Self::Ready,
        Self::Standby,
        Self::Waiting,
        Self::Pending,
        Self::Aborting,
        Self::Concluded,
        Self::Null,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Undefined => "undefined",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Ready => "ready",
            Self::Standby => "standby",
            Self::Waiting => "waiting",
            Self::Pending => "pending",
            Self::Aborting => "aborting",
            Self::Concluded => "concluded",
            Self::Null => "null",
        }
    }
}

impl fmt::Display for BlockJobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command verb applied to a job (`JobVerb` in QEMU's schema).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum BlockJobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Dismiss,
    Finalize,
    Change,
}

impl BlockJobVerb {
    /// Every value, in schema order.
    pub const ALL: &'static [Self] = &[
        Self::Cancel,
        Self::Pause,
        Self::Resume,
        Self::SetSpeed,
        Self::Complete,
        Self::Dismiss,
        Self::Finalize,
        Self::Change,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancel => "cancel",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::SetSpeed => "set-speed",
            Self::Complete => "complete",
            Self::Dismiss => "dismiss",
            Self::Finalize => "finalize",
            Self::Change => "change",
        }
    }
}

impl fmt::Display for BlockJobVerb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
