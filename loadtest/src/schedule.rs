//! The open-model clock, in exact integers.
//!
//! The rate is kept in thousandths of a request per second, so send `i` is due at
//! `floor(i × 10¹² / rate_milli)` ns after the start with no floating-point drift,
//! however long the run.

use std::fmt;

/// Nanoseconds per second, times the thousandths the rate is counted in.
const NS_MILLI: u128 = 1_000_000_000_000;
pub const MAX_RATE: f64 = 1_000_000.0;

/// An offered rate, at least 0.001 and at most a million requests per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    milli_per_s: u64,
}

impl Rate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let value: f64 = text
            .trim()
            .trim_end_matches("/s")
            .parse()
            .map_err(|_| format!("{text:?} is not a number of requests per second"))?;
        if !(0.001..=MAX_RATE).contains(&value) {
            return Err(format!("{text:?} must be between 0.001 and {MAX_RATE}"));
        }
        Ok(Self {
            milli_per_s: (value * 1000.0).round() as u64,
        })
    }

    pub fn per_second(self) -> f64 {
        self.milli_per_s as f64 / 1000.0
    }

    /// When send `i` (counting from 0) is due, in ns after the start.
    pub fn offset_ns(self, i: u64) -> u128 {
        u128::from(i) * NS_MILLI / u128::from(self.milli_per_s)
    }

    /// How many sends are due once `elapsed_ns` have passed: those whose offset is at
    /// most `elapsed_ns`. Send `i` is due iff `i × 10¹² < (elapsed + 1) × rate`.
    pub fn due_by(self, elapsed_ns: u128) -> u64 {
        let due = (elapsed_ns + 1)
            .saturating_mul(u128::from(self.milli_per_s))
            .div_ceil(NS_MILLI);
        u64::try_from(due).unwrap_or(u64::MAX)
    }

    /// Sends due strictly inside a run of `duration_ns`.
    pub fn planned(self, duration_ns: u128) -> u64 {
        if duration_ns == 0 {
            0
        } else {
            self.due_by(duration_ns - 1)
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} req/s", self.per_second())
    }
}

/// The sources a flat-out connection cycles through: each source belongs to one
/// connection while there are more sources than connections, so every client keeps
/// one connection; with more connections than sources, they share sources in turn.
pub fn worker_sources(worker: usize, workers: usize, sources: usize) -> Vec<usize> {
    if workers == 0 || sources == 0 {
        return Vec::new();
    }
    if workers <= sources {
        (worker..sources).step_by(workers).collect()
    } else {
        vec![worker % sources]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_per_second_sends_every_hundred_milliseconds() {
        let rate = Rate::parse("10").unwrap();
        for (send, offset) in [(0, 0), (1, 100_000_000), (25, 2_500_000_000)] {
            assert_eq!(rate.offset_ns(send), offset, "send {send}");
        }
    }

    #[test]
    fn a_send_is_due_exactly_from_its_offset() {
        for text in ["0.5", "3", "7", "333.333", "1000", "999999"] {
            let rate = Rate::parse(text).unwrap();
            for i in 1..2000 {
                let at = rate.offset_ns(i);
                assert_eq!(rate.due_by(at), i + 1, "rate {text}, send {i} at {at}");
                if at > rate.offset_ns(i - 1) {
                    assert_eq!(rate.due_by(at - 1), i, "rate {text}, send {i} early");
                }
            }
        }
    }

    #[test]
    fn a_run_plans_rate_times_duration_sends() {
        let rate = Rate::parse("10").unwrap();
        assert_eq!(rate.planned(1_000_000_000), 10);
        assert_eq!(rate.planned(1_000_000_001), 11);
        assert_eq!(rate.planned(0), 0);
        let fast = Rate::parse("1000000").unwrap();
        assert_eq!(fast.planned(600 * 1_000_000_000), 600_000_000);
    }

    #[test]
    fn the_schedule_does_not_drift_over_a_long_run() {
        let rate = Rate::parse("3").unwrap();
        assert_eq!(rate.offset_ns(1_800), 600_000_000_000);
        assert_eq!(rate.planned(600_000_000_000), 1_800);
    }

    #[test]
    fn rates_out_of_range_or_not_numbers_are_refused() {
        for refused in ["0", "2000000", "fast", "NaN"] {
            assert!(Rate::parse(refused).is_err(), "{refused}");
        }
        assert_eq!(Rate::parse("50/s").unwrap().per_second(), 50.0);
    }

    #[test]
    fn every_source_has_a_flat_out_connection_and_none_is_idle() {
        for (workers, sources) in [(4, 241), (241, 241), (300, 241), (1, 3)] {
            let mut covered = vec![0; sources];
            for w in 0..workers {
                let mine = worker_sources(w, workers, sources);
                assert!(!mine.is_empty(), "worker {w} of {workers} has no source");
                for s in mine {
                    covered[s] += 1;
                }
            }
            assert!(covered.iter().all(|&n| n >= 1), "{workers}×{sources}");
            if workers <= sources {
                assert!(covered.iter().all(|&n| n == 1), "{workers}×{sources}");
            }
        }
    }
}
