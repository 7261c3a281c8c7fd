//! A token bucket per user for NEW sessions (a fresh name).
//!
//! Every new name is remembered for one ticket lifetime after it ends (so no ticket can
//! bring it back, also across restarts: see [`crate::state`]), so a user opening and
//! closing sessions in a loop would grow the relay's memory and state file without
//! bound. The bucket caps that: `burst` sessions at once, then `per_minute`. Resumes of
//! a live or parked name are not counted: they mint no name, and after a relay restart
//! every agent resumes at once, which must never be throttled.
//!
//! Only users whose bucket is not full have an entry: full buckets are swept out
//! whenever the map has doubled since the last sweep, so the map is bounded by twice the
//! users active within the last `burst / per_minute` minutes (plus a small floor).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Entries below which the map is never swept (a sweep would not pay for itself).
const MIN_SWEEP_LEN: usize = 64;

/// Per-user buckets of new sessions.
pub struct NewSessionLimiter {
    /// Tokens added per second; 0 means no limit.
    per_sec: f64,
    /// Bucket size.
    burst: f64,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_user: HashMap<String, Bucket>,
    /// Sweep full buckets once the map reaches this size.
    sweep_at: usize,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl NewSessionLimiter {
    /// `per_minute` new sessions a minute after a burst of `burst`; `per_minute == 0`
    /// turns the limit off.
    pub fn new(per_minute: u32, burst: u32) -> Self {
        Self {
            per_sec: f64::from(per_minute) / 60.0,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(Buckets {
                by_user: HashMap::new(),
                sweep_at: MIN_SWEEP_LEN,
            }),
        }
    }

    /// Takes one new session for `user` at `now`, or says how long until one is free.
    pub fn try_take(&self, user: &str, now: Instant) -> Result<(), Duration> {
        if self.per_sec <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.by_user.len() >= buckets.sweep_at {
            buckets
                .by_user
                .retain(|_, b| self.level(b, now) < self.burst);
            buckets.sweep_at = (buckets.by_user.len() * 2).max(MIN_SWEEP_LEN);
        }
        let bucket = match buckets.by_user.get_mut(user) {
            Some(bucket) => bucket,
            None => buckets.by_user.entry(user.to_owned()).or_insert(Bucket {
                tokens: self.burst,
                updated: now,
            }),
        };
        bucket.tokens = self.level(bucket, now);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_sec,
            ))
        }
    }

    /// The bucket's content at `now`.
    fn level(&self, bucket: &Bucket, now: Instant) -> f64 {
        let refill = now.saturating_duration_since(bucket.updated).as_secs_f64() * self.per_sec;
        (bucket.tokens + refill).min(self.burst)
    }

    /// Users with an entry (for tests and metrics).
    pub fn tracked_users(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_user
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_then_refusals_with_the_wait() {
        let limiter = NewSessionLimiter::new(60, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.try_take("alice", t0), Ok(()));
        }
        let wait = limiter.try_take("alice", t0).expect_err("bucket empty");
        assert!(wait <= Duration::from_secs(1) && wait > Duration::from_millis(900));
        // Other users have their own bucket.
        assert_eq!(limiter.try_take("bob", t0), Ok(()));
        // One a second comes back.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limiter.try_take("alice", t1), Ok(()));
        assert!(limiter.try_take("alice", t1).is_err());
        // Never more than the burst, however long the pause.
        let later = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert_eq!(limiter.try_take("alice", later), Ok(()));
        }
        assert!(limiter.try_take("alice", later).is_err());
    }

    #[test]
    fn zero_per_minute_means_no_limit() {
        let limiter = NewSessionLimiter::new(0, 1);
        let now = Instant::now();
        for _ in 0..1000 {
            assert_eq!(limiter.try_take("alice", now), Ok(()));
        }
        assert_eq!(limiter.tracked_users(), 0);
    }

    #[test]
    fn users_whose_bucket_refilled_are_forgotten() {
        let limiter = NewSessionLimiter::new(60, 2);
        let t0 = Instant::now();
        for i in 0..10_000 {
            let _ = limiter.try_take(&format!("user{i}"), t0);
        }
        // Two seconds later all those buckets are full again.
        let t1 = t0 + Duration::from_secs(2);
        for i in 0..10_000 {
            let _ = limiter.try_take(&format!("other{i}"), t1);
        }
        // The first 10,000 were swept out on the way; only the newcomers, whose buckets
        // are not full, remain.
        assert_eq!(limiter.tracked_users(), 10_000);
    }
}
