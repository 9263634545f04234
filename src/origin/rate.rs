//! The rate floor of a transfer (`origins[].min_rate`): an attempt whose average rate over any
//! window (30 s) falls below the floor counts as stalled, as a read that waits longer than
//! `idle_timeout` does, so a crawling origin is retried (with `Range`) and then left for the
//! next one instead of holding the fetch for ever.
//!
//! The window slides. It is kept as a few samples of the bytes received so far (one per 1/32
//! of the window at most), so its memory is bounded whatever the chunk rate; the sampling errs
//! on the lenient side (a window may count up to 1/32 more time than configured).

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// Samples per window.
const SAMPLES: u32 = 32;

/// The floor for one attempt, from its start.
#[derive(Debug)]
pub struct RateFloor {
    /// Bytes a window must hold.
    need: u64,
    window: Duration,
    /// Least time between two samples.
    step: Duration,
    /// `(when, bytes received by then)`, oldest first; never empty.
    samples: VecDeque<(Instant, u64)>,
    /// The latest arrival and the total then.
    last: (Instant, u64),
}

impl RateFloor {
    /// A floor of `min_rate` bytes/s over `window`, for an attempt starting `now`.
    pub fn new(min_rate: u64, window: Duration, now: Instant) -> RateFloor {
        let need = u128::from(min_rate) * window.as_millis() / 1000;
        RateFloor {
            need: u64::try_from(need).unwrap_or(u64::MAX).max(1),
            window,
            step: window / SAMPLES,
            samples: VecDeque::from([(now, 0)]),
            last: (now, 0),
        }
    }

    /// `bytes` more arrived at `now`.
    pub fn record(&mut self, bytes: u64, now: Instant) {
        let total = self.last.1 + bytes;
        self.last = (now, total);
        let newest = self.samples.back().map_or(now, |s| s.0);
        if now.saturating_duration_since(newest) >= self.step {
            self.samples.push_back((now, total));
        }
        // A sample matters while the window can still start before the next one.
        while self.samples.len() > 1 && self.samples[1].0 + self.window <= now {
            self.samples.pop_front();
        }
    }

    /// When the last window's bytes fall below the floor if nothing more arrives: a window
    /// ending at `t` holds `total - bytes(t - window)`, which drops under `need` once
    /// `t - window` passes the first sample whose count is above `total - need`.
    pub fn deadline(&self) -> Instant {
        let total = self.last.1;
        let first = self
            .samples
            .iter()
            .find(|(_, n)| total < self.need || *n > total - self.need)
            .map_or(self.last.0, |s| s.0);
        first + self.window
    }

    /// Bytes received since the start of the attempt.
    pub fn total(&self) -> u64 {
        self.last.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(30);

    fn secs(start: Instant, s: f64) -> Instant {
        start + Duration::from_secs_f64(s)
    }

    #[test]
    fn nothing_at_all_fails_one_window_after_the_start() {
        let t0 = Instant::now();
        let f = RateFloor::new(1000, W, t0);
        assert_eq!(f.deadline(), t0 + W);
    }

    #[test]
    fn a_steady_rate_above_the_floor_keeps_moving_the_deadline() {
        let t0 = Instant::now();
        let mut f = RateFloor::new(1000, W, t0);
        for s in 1..=300 {
            // 2000 B/s, twice the floor.
            f.record(2000, secs(t0, f64::from(s)));
            assert!(f.deadline() > secs(t0, f64::from(s)), "at {s}s");
        }
        assert!(
            f.samples.len() <= SAMPLES as usize + 2,
            "{}",
            f.samples.len()
        );
        // Nothing more: the last 30 s hold 60000 bytes, twice the 30000 needed, so the
        // window runs dry about 15 s after the last byte.
        let d = f.deadline();
        assert!(d > secs(t0, 314.0) && d <= secs(t0, 317.0), "{:?}", d - t0);
    }

    #[test]
    fn a_trickle_below_the_floor_fails_at_the_end_of_the_first_window() {
        let t0 = Instant::now();
        let mut f = RateFloor::new(1000, W, t0);
        for s in 1..=29 {
            f.record(500, secs(t0, f64::from(s)));
            assert_eq!(f.deadline(), t0 + W, "at {s}s: 14500 B of 30000 needed");
        }
    }

    #[test]
    fn a_fast_start_then_a_crawl_fails_once_the_window_holds_only_the_crawl() {
        let t0 = Instant::now();
        let mut f = RateFloor::new(1000, W, t0);
        f.record(10_000_000, secs(t0, 1.0));
        for s in 2..=100 {
            let now = secs(t0, f64::from(s));
            if f.deadline() <= now {
                // The burst at 1 s leaves the window at 31 s (+ one sample step).
                assert!((31..=33).contains(&s), "failed at {s}s");
                return;
            }
            f.record(10, now);
        }
        panic!("the crawl was never caught");
    }

    #[test]
    fn a_huge_floor_does_not_overflow() {
        let t0 = Instant::now();
        let f = RateFloor::new(u64::MAX, Duration::from_secs(3600), t0);
        assert_eq!(f.need, u64::MAX);
        assert_eq!(f.deadline(), t0 + Duration::from_secs(3600));
    }
}
