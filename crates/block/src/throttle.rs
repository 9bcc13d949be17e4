//! Throttle groups (QEMU's `throttle-group` objects and its `util/throttle.c` leaky buckets):
//! I/O limits shared by every `throttle` node of a group.
//!
//! A group has six buckets (bytes and operations; total, read, write). Each bucket's level is
//! what was done and not yet leaked at its average rate; a request may start when no bucket it
//! counts against is over its size (a tenth of a second of the average rate, or the burst
//! rate times the burst length), then it is counted whole. A request that may not start waits
//! on the clock: the wait is computed from the levels, as QEMU's timers are. Requests in one
//! direction start in arrival order (QEMU queues them per direction).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use qmp_api::ThrottleLimits;

/// QEMU's `THROTTLE_VALUE_MAX`: the largest rate a limit may have.
pub const THROTTLE_VALUE_MAX: i64 = 1_000_000_000_000_000;

/// The buckets, in QEMU's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    BpsTotal = 0,
    BpsRead = 1,
    BpsWrite = 2,
    OpsTotal = 3,
    OpsRead = 4,
    OpsWrite = 5,
}

const BUCKETS: usize = 6;

/// What a bucket is set to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketConfig {
    /// Average rate per second; 0: no limit.
    pub avg: f64,
    /// Burst rate per second; 0: no bursts.
    pub max: f64,
    /// Seconds a burst may last.
    pub burst_length: u64,
}

impl Default for BucketConfig {
    fn default() -> Self {
        BucketConfig {
            avg: 0.0,
            max: 0.0,
            burst_length: 1,
        }
    }
}

/// A group's limits (QEMU's `ThrottleConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ThrottleConfig {
    pub buckets: [BucketConfig; BUCKETS],
    /// `iops-size`: a larger request counts as several operations.
    pub op_size: u64,
}

impl ThrottleConfig {
    /// Applies the members `limits` gives (QEMU's `throttle_limits_to_config`), then checks the
    /// result (QEMU's `throttle_is_valid`), with QEMU's texts.
    pub fn apply_limits(&mut self, limits: &ThrottleLimits) -> Result<(), String> {
        let rates = [
            (Bucket::BpsTotal, limits.bps_total, limits.bps_total_max),
            (Bucket::BpsRead, limits.bps_read, limits.bps_read_max),
            (Bucket::BpsWrite, limits.bps_write, limits.bps_write_max),
            (Bucket::OpsTotal, limits.iops_total, limits.iops_total_max),
            (Bucket::OpsRead, limits.iops_read, limits.iops_read_max),
            (Bucket::OpsWrite, limits.iops_write, limits.iops_write_max),
        ];
        for (bucket, avg, max) in rates {
            if let Some(avg) = avg {
                self.buckets[bucket as usize].avg = avg as f64;
            }
            if let Some(max) = max {
                self.buckets[bucket as usize].max = max as f64;
            }
        }
        let lengths = [
            (Bucket::BpsTotal, limits.bps_total_max_length, "bps-total"),
            (Bucket::BpsRead, limits.bps_read_max_length, "bps-read"),
            (Bucket::BpsWrite, limits.bps_write_max_length, "bps-write"),
            (Bucket::OpsTotal, limits.iops_total_max_length, "iops-total"),
            (Bucket::OpsRead, limits.iops_read_max_length, "iops-read"),
            (Bucket::OpsWrite, limits.iops_write_max_length, "iops-write"),
        ];
        for (bucket, length, name) in lengths {
            if let Some(length) = length {
                // QEMU reads the member as unsigned: a negative length is a huge one.
                let length = length as u64;
                if length > u64::from(u32::MAX) {
                    return Err(format!(
                        "{name}-max-length value must be in the range [0, {}]",
                        u32::MAX
                    ));
                }
                self.buckets[bucket as usize].burst_length = length;
            }
        }
        if let Some(size) = limits.iops_size {
            self.op_size = size as u64;
        }
        self.check()
    }

    /// The limits as `qom-get` shows them.
    pub fn limits(&self) -> ThrottleLimits {
        let b = |bucket: Bucket| self.buckets[bucket as usize];
        let avg = |bucket: Bucket| Some(b(bucket).avg as i64);
        let max = |bucket: Bucket| Some(b(bucket).max as i64);
        let len = |bucket: Bucket| Some(b(bucket).burst_length as i64);
        ThrottleLimits {
            iops_total: avg(Bucket::OpsTotal),
            iops_total_max: max(Bucket::OpsTotal),
            iops_total_max_length: len(Bucket::OpsTotal),
            iops_read: avg(Bucket::OpsRead),
            iops_read_max: max(Bucket::OpsRead),
            iops_read_max_length: len(Bucket::OpsRead),
            iops_write: avg(Bucket::OpsWrite),
            iops_write_max: max(Bucket::OpsWrite),
            iops_write_max_length: len(Bucket::OpsWrite),
            bps_total: avg(Bucket::BpsTotal),
            bps_total_max: max(Bucket::BpsTotal),
            bps_total_max_length: len(Bucket::BpsTotal),
            bps_read: avg(Bucket::BpsRead),
            bps_read_max: max(Bucket::BpsRead),
            bps_read_max_length: len(Bucket::BpsRead),
            bps_write: avg(Bucket::BpsWrite),
            bps_write_max: max(Bucket::BpsWrite),
            bps_write_max_length: len(Bucket::BpsWrite),
            iops_size: Some(self.op_size as i64),
        }
    }

    /// QEMU's `throttle_is_valid`, its checks in its order.
    pub fn check(&self) -> Result<(), String> {
        let b = |bucket: Bucket| self.buckets[bucket as usize];
        let both = |total: Bucket, read: Bucket, write: Bucket, f: fn(BucketConfig) -> f64| {
            f(b(total)) != 0.0 && (f(b(read)) != 0.0 || f(b(write)) != 0.0)
        };
        let avg = |c: BucketConfig| c.avg;
        let max = |c: BucketConfig| c.max;
        use Bucket::*;
        if both(BpsTotal, BpsRead, BpsWrite, avg)
            || both(OpsTotal, OpsRead, OpsWrite, avg)
            || both(BpsTotal, BpsRead, BpsWrite, max)
            || both(OpsTotal, OpsRead, OpsWrite, max)
        {
            return Err(
                "bps/iops/max total values and read/write values cannot be used at the \
                        same time"
                    .into(),
            );
        }
        if self.op_size != 0
            && b(OpsTotal).avg == 0.0
            && b(OpsRead).avg == 0.0
            && b(OpsWrite).avg == 0.0
        {
            return Err("iops size requires an iops value to be set".into());
        }
        let value_max = THROTTLE_VALUE_MAX as f64;
        for c in self.buckets {
            if c.avg < 0.0 || c.max < 0.0 || c.avg > value_max || c.max > value_max {
                return Err(format!(
                    "bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]"
                ));
            }
            if c.burst_length == 0 {
                return Err("the burst length cannot be 0".into());
            }
            if c.burst_length > 1 && c.max == 0.0 {
                return Err("burst length set without burst rate".into());
            }
            if c.max != 0.0 && c.burst_length as f64 > value_max / c.max {
                return Err("burst length too high for this burst rate".into());
            }
            if c.max != 0.0 && c.avg == 0.0 {
                return Err("bps_max/iops_max require corresponding bps/iops values".into());
            }
            if c.max != 0.0 && c.max < c.avg {
                return Err("bps_max/iops_max cannot be lower than bps/iops".into());
            }
        }
        Ok(())
    }

    /// Whether any limit is set.
    pub fn enabled(&self) -> bool {
        self.buckets.iter().any(|b| b.avg != 0.0)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Level {
    level: f64,
    burst_level: f64,
}

#[derive(Debug)]
struct GroupState {
    config: ThrottleConfig,
    levels: [Level; BUCKETS],
    last_leak: Instant,
    /// Per direction (read, write): the next ticket to hand out and the ticket whose turn it is.
    next_ticket: [u64; 2],
    serving: [u64; 2],
}

impl GroupState {
    fn leak(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.last_leak).as_secs_f64();
        self.last_leak = now;
        for (c, l) in self.config.buckets.iter().zip(self.levels.iter_mut()) {
            l.level = (l.level - c.avg * delta).max(0.0);
            if c.max != 0.0 {
                l.burst_level = (l.burst_level - c.max * delta).max(0.0);
            }
        }
    }

    /// How long a request in direction `write` must wait before it may start (QEMU's
    /// `throttle_compute_wait_for`).
    fn wait(&self, write: bool) -> Duration {
        let buckets = if write {
            [
                Bucket::BpsTotal,
                Bucket::BpsWrite,
                Bucket::OpsTotal,
                Bucket::OpsWrite,
            ]
        } else {
            [
                Bucket::BpsTotal,
                Bucket::BpsRead,
                Bucket::OpsTotal,
                Bucket::OpsRead,
            ]
        };
        let mut longest = 0.0f64;
        for bucket in buckets {
            let c = self.config.buckets[bucket as usize];
            let l = self.levels[bucket as usize];
            if c.avg == 0.0 {
                continue;
            }
            let (size, burst_size) = if c.max == 0.0 {
                (c.avg / 10.0, 0.0)
            } else {
                (c.max * c.burst_length as f64, c.max / 10.0)
            };
            let extra = l.level - size;
            let wait = if extra > 0.0 {
                extra / c.avg
            } else if burst_size > 0.0 && l.burst_level - burst_size > 0.0 {
                (l.burst_level - burst_size) / c.max
            } else {
                0.0
            };
            longest = longest.max(wait);
        }
        Duration::from_secs_f64(longest)
    }

    /// Counts a request that starts (QEMU's `throttle_account`).
    fn account(&mut self, write: bool, bytes: u64) {
        let units = if self.config.op_size != 0 && bytes > self.config.op_size {
            bytes as f64 / self.config.op_size as f64
        } else {
            1.0
        };
        let (bps, ops) = if write {
            (Bucket::BpsWrite, Bucket::OpsWrite)
        } else {
            (Bucket::BpsRead, Bucket::OpsRead)
        };
        for (bucket, amount) in [
            (Bucket::BpsTotal, bytes as f64),
            (bps, bytes as f64),
            (Bucket::OpsTotal, units),
            (ops, units),
        ] {
            let c = self.config.buckets[bucket as usize];
            let l = &mut self.levels[bucket as usize];
            l.level += amount;
            if c.max != 0.0 {
                l.burst_level += amount;
            }
        }
    }
}

/// A throttle group: its limits and the state every member node shares.
#[derive(Debug)]
pub struct ThrottleGroup {
    name: String,
    state: Mutex<GroupState>,
    changed: Condvar,
    /// Nodes using the group (a group in use cannot be deleted).
    members: Mutex<usize>,
}

impl ThrottleGroup {
    pub fn new(name: &str, config: ThrottleConfig) -> Self {
        ThrottleGroup {
            name: name.to_string(),
            state: Mutex::new(GroupState {
                config,
                levels: [Level::default(); BUCKETS],
                last_leak: Instant::now(),
                next_ticket: [0; 2],
                serving: [0; 2],
            }),
            changed: Condvar::new(),
            members: Mutex::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> ThrottleConfig {
        self.lock().config
    }

    /// New limits (`qom-set limits`): levels start again from empty, as QEMU's
    /// `throttle_config` does, and waiting requests recompute their wait.
    pub fn set_config(&self, config: ThrottleConfig) {
        let mut st = self.lock();
        st.config = config;
        st.levels = [Level::default(); BUCKETS];
        st.last_leak = Instant::now();
        drop(st);
        self.changed.notify_all();
    }

    /// Blocks until a request of `bytes` in direction `write` may start, then counts it.
    pub fn admit(&self, write: bool, bytes: u64) {
        let dir = usize::from(write);
        let mut st = self.lock();
        if !st.config.enabled() {
            return;
        }
        let ticket = st.next_ticket[dir];
        st.next_ticket[dir] += 1;
        loop {
            st.leak(Instant::now());
            let wait = st.wait(write);
            if st.serving[dir] == ticket && (wait.is_zero() || !st.config.enabled()) {
                st.account(write, bytes);
                st.serving[dir] += 1;
                drop(st);
                self.changed.notify_all();
                return;
            }
            st = if st.serving[dir] == ticket {
                // Only the clock ends this wait (or new limits).
                self.changed
                    .wait_timeout(st, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            } else {
                self.changed
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner)
            };
        }
    }

    /// A node starts using the group.
    pub fn join(&self) {
        *self.members.lock().unwrap_or_else(PoisonError::into_inner) += 1;
    }

    /// A node stops using the group.
    pub fn leave(&self) {
        let mut m = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        *m = m.saturating_sub(1);
    }

    /// Whether a node uses the group.
    pub fn in_use(&self) -> bool {
        *self.members.lock().unwrap_or_else(PoisonError::into_inner) > 0
    }
}

/// The throttle groups by id: the `throttle-group` objects, shared by the object commands and
/// the graph's `throttle` driver.
#[derive(Debug, Clone, Default)]
pub struct ThrottleGroups(Arc<Mutex<HashMap<String, Arc<ThrottleGroup>>>>);

impl ThrottleGroups {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<ThrottleGroup>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.lock().get(name).cloned()
    }

    pub fn insert(&self, group: Arc<ThrottleGroup>) {
        self.lock().insert(group.name().to_string(), group);
    }

    pub fn remove(&self, name: &str) -> Option<Arc<ThrottleGroup>> {
        self.lock().remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(f: impl FnOnce(&mut ThrottleLimits)) -> Result<ThrottleConfig, String> {
        let mut l: ThrottleLimits =
            qmp_api::input::from_value(&serde_json::json!({})).expect("empty limits");
        f(&mut l);
        let mut c = ThrottleConfig::default();
        c.apply_limits(&l).map(|()| c)
    }

    #[test]
    fn qemu_checks_in_qemu_order() {
        let e = limits(|l| {
            l.bps_total = Some(1);
            l.bps_read = Some(1);
        });
        assert_eq!(
            e.unwrap_err(),
            "bps/iops/max total values and read/write values cannot be used at the same time"
        );
        let e = limits(|l| l.iops_size = Some(4096));
        assert_eq!(e.unwrap_err(), "iops size requires an iops value to be set");
        let e = limits(|l| l.bps_total = Some(-1));
        assert_eq!(
            e.unwrap_err(),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        let e = limits(|l| {
            l.bps_total = Some(5);
            l.bps_total_max_length = Some(3);
        });
        assert_eq!(e.unwrap_err(), "burst length set without burst rate");
        let e = limits(|l| l.bps_total_max = Some(5));
        assert_eq!(
            e.unwrap_err(),
            "bps_max/iops_max require corresponding bps/iops values"
        );
        let e = limits(|l| {
            l.bps_total = Some(10);
            l.bps_total_max = Some(5);
        });
        assert_eq!(
            e.unwrap_err(),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
        assert!(limits(|l| l.bps_total = Some(1 << 20)).is_ok());
    }

    #[test]
    fn a_full_bucket_delays_the_next_request_by_its_excess() {
        let config = limits(|l| l.bps_total = Some(1000)).unwrap();
        let group = ThrottleGroup::new("g", config);
        let start = Instant::now();
        // The first request starts at once and fills the bucket far past its size (100).
        group.admit(true, 300);
        assert!(start.elapsed() < Duration::from_millis(100));
        // The next waits until the level is back to 100: 200 bytes at 1000/s.
        group.admit(false, 1);
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(190), "{waited:?}");
        assert!(waited < Duration::from_millis(600), "{waited:?}");
    }
}
