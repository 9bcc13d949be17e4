//! The per-job rate limiter behind `speed`: time is cut into slices of 100 ms, each allowing
//! `speed / 10` bytes; a job that overdraws sleeps until the slices it used up have passed.

use std::time::Duration;

const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Default)]
pub(crate) struct RateLimit {
    speed: u64,
    slice_start: Duration,
    slice_end: Duration,
    dispatched: u64,
}

impl RateLimit {
    pub(crate) fn speed(&self) -> u64 {
        self.speed
    }

    /// Sets bytes per second (0 = unlimited). What was dispatched in the current slice still
    /// counts (QEMU's `ratelimit_set_speed`): the delay is recomputed at the new speed, not
    /// forgotten.
    pub(crate) fn set_speed(&mut self, speed: u64) {
        self.speed = speed;
    }

    /// The deadline the bytes accounted so far impose at `now`, if any (QEMU's
    /// `ratelimit_calculate_delay(limit, 0)`): asked again after every wake-up, so that
    /// nothing but the clock ends a delay.
    pub(crate) fn delay(&mut self, now: Duration) -> Option<Duration> {
        self.account(0, now)
    }

    /// Accounts `bytes` done at `now`; returns the deadline to sleep until, if any.
    pub(crate) fn account(&mut self, bytes: u64, now: Duration) -> Option<Duration> {
        if self.speed == 0 {
            return None;
        }
        let quota = u128::from(self.speed) * SLICE.as_nanos() / 1_000_000_000;
        let quota = quota.max(1);
        if self.slice_end <= now {
            self.slice_start = now;
            self.slice_end = now + SLICE;
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(bytes);
        if u128::from(self.dispatched) < quota {
            return None;
        }
        let used_nanos = u128::from(self.dispatched) * 1_000_000_000 / u128::from(self.speed);
        let used = Duration::from_nanos(u64::try_from(used_nanos).unwrap_or(u64::MAX));
        self.slice_end = self.slice_start.saturating_add(used);
        (self.slice_end > now).then_some(self.slice_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_speed_never_delays() {
        let mut r = RateLimit::default();
        assert_eq!(r.account(u64::MAX / 2, Duration::ZERO), None);
    }

    #[test]
    fn a_second_worth_of_bytes_sleeps_until_one_second() {
        let mut r = RateLimit::default();
        r.set_speed(1 << 20);
        assert_eq!(
            r.account(1 << 20, Duration::ZERO),
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn the_delay_asked_again_before_its_deadline_is_the_same_deadline() {
        let mut r = RateLimit::default();
        r.set_speed(1);
        let deadline = r.account(1 << 20, Duration::ZERO);
        assert_eq!(deadline, Some(Duration::from_secs(1 << 20)));
        assert_eq!(r.delay(Duration::from_secs(5)), deadline);
        assert_eq!(r.delay(Duration::from_secs(1 << 20)), None);
    }

    #[test]
    fn setting_the_speed_again_keeps_the_delay_and_a_higher_speed_shortens_it() {
        let mut r = RateLimit::default();
        r.set_speed(1);
        r.account(1 << 20, Duration::ZERO);
        r.set_speed(1);
        assert_eq!(r.delay(Duration::ZERO), Some(Duration::from_secs(1 << 20)));
        r.set_speed(1 << 20);
        assert_eq!(r.delay(Duration::ZERO), Some(Duration::from_secs(1)));
        r.set_speed(0);
        assert_eq!(r.delay(Duration::ZERO), None);
    }

    #[test]
    fn bytes_within_the_slice_quota_do_not_delay() {
        let mut r = RateLimit::default();
        r.set_speed(1000);
        assert_eq!(r.account(50, Duration::ZERO), None);
        assert_eq!(r.account(49, Duration::from_millis(10)), None);
        assert_eq!(
            r.account(1, Duration::from_millis(20)),
            Some(Duration::from_millis(100))
        );
    }
}
