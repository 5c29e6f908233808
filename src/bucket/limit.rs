//! A validated rate limit and the integer units the bucket arithmetic works in.
//!
//! A token is worth `window_us / g` *units*, and the bucket gains `rate_limit / g` units
//! per microsecond, where `g = gcd(rate_limit, window_us)`. That makes every quantity an
//! exact integer: the refill rate `rate_limit / window` tokens per second is exactly
//! `(rate_limit / g) / (window_us / g)` tokens per µs, with no rounding and so no drift
//! however long a bucket lives. Dividing by `g` keeps the units small enough for Lua's
//! doubles: 10^6 per day is 86,400 units a token and 1 unit per µs, not 8.64 × 10^10 and
//! 10^6.

use thiserror::Error;

/// The largest number of units a bucket may hold. The Lua mirror of the arithmetic runs
/// on IEEE doubles, which are exact integers only up to 2^53.
pub const MAX_CAPACITY_UNITS: u64 = 1 << 53;

const MICROS_PER_SECOND: u64 = 1_000_000;

/// Why a limit cannot be built. The caller knows which setting or file line it came from
/// and names it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("the rate must be at least 1")]
    ZeroRate,
    #[error("the burst must be at least 1")]
    ZeroCapacity,
    #[error("the window must be at least 1 second")]
    ZeroWindow,
    #[error(
        "burst × window is too large: {capacity} tokens over {window_s} s exceeds the 2^53 µs·tokens an exact bucket can hold"
    )]
    TooLarge { capacity: u64, window_s: u64 },
}

/// A limit as people state it: `rate` tokens per `window_s` seconds, bursts of `burst`.
/// Named fields, because three bare integers in a row are easy to swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSpec {
    pub rate: u64,
    pub window_s: u64,
    pub burst: u64,
}

/// How many requests a client may make: a burst of `capacity`, refilled continuously at
/// `rate_limit` tokens per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    capacity: u64,
    rate_limit: u64,
    window_us: u64,
    /// Units one token is worth: `window_us / gcd(rate_limit, window_us)`.
    token_units: u64,
    /// Units gained per µs: `rate_limit / gcd(rate_limit, window_us)`.
    refill_units_per_us: u64,
}

impl Limit {
    /// `rate` tokens per `window_s` seconds, holding at most `burst`: [`Limit::parse`] of
    /// the numbers as a policy file states them.
    pub fn per(rate: u64, window_s: u64, burst: u64) -> Result<Self, LimitError> {
        Self::parse(LimitSpec {
            rate,
            window_s,
            burst,
        })
    }

    pub fn parse(spec: LimitSpec) -> Result<Self, LimitError> {
        let LimitSpec {
            rate,
            window_s,
            burst,
        } = spec;
        if rate == 0 {
            return Err(LimitError::ZeroRate);
        }
        if burst == 0 {
            return Err(LimitError::ZeroCapacity);
        }
        if window_s == 0 {
            return Err(LimitError::ZeroWindow);
        }
        let too_large = LimitError::TooLarge {
            capacity: burst,
            window_s,
        };
        let window_us = window_s.checked_mul(MICROS_PER_SECOND).ok_or(too_large)?;
        Self::from_window_us(rate, window_us, burst)
    }

    fn from_window_us(rate_limit: u64, window_us: u64, capacity: u64) -> Result<Self, LimitError> {
        let too_large = LimitError::TooLarge {
            capacity,
            window_s: window_us / MICROS_PER_SECOND,
        };
        let divisor = gcd(rate_limit, window_us);
        let token_units = window_us / divisor;
        match capacity.checked_mul(token_units) {
            Some(units) if units <= MAX_CAPACITY_UNITS => Ok(Self {
                capacity,
                rate_limit,
                window_us,
                token_units,
                refill_units_per_us: rate_limit / divisor,
            }),
            _ => Err(too_large),
        }
    }

    /// The limit one of `instances` instances enforces alone, so that together they admit
    /// about what the shared limit would. The window is stretched instead of dividing the
    /// rate, which keeps the refill exact. Where the stretched window cannot be exact, the
    /// rate is divided instead (rounded down), and failing that one token per window is
    /// left: a share is never larger than the whole limit divided, whatever the numbers.
    pub fn share_of(&self, instances: u64) -> Self {
        let instances = instances.max(1);
        if instances == 1 {
            return *self;
        }
        let capacity = (self.capacity / instances).max(1);
        self.window_us
            .checked_mul(instances)
            .and_then(|window_us| Self::from_window_us(self.rate_limit, window_us, capacity).ok())
            .or_else(|| {
                let rate = (self.rate_limit / instances).max(1);
                Self::from_window_us(rate, self.window_us, capacity).ok()
            })
            .or_else(|| Self::from_window_us(1, self.window_us, 1).ok())
            .unwrap_or(*self)
    }

    /// Burst size in tokens.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Tokens added per window.
    pub fn rate_limit(&self) -> u64 {
        self.rate_limit
    }

    /// The window in whole seconds, as the `RateLimit-Policy` header states it.
    pub fn window_secs(&self) -> u64 {
        self.window_us.div_ceil(MICROS_PER_SECOND)
    }

    /// Units one token is worth.
    pub fn token_units(&self) -> u64 {
        self.token_units
    }

    /// Units `tokens` tokens are worth. A cost beyond the burst is one unit more than a
    /// full bucket holds: no bucket ever has it, so it is refused by the one admission rule
    /// like any other lack, and the number stays as small as the bucket's (below 2^53 for
    /// the Lua mirror).
    pub fn units_of(&self, tokens: u64) -> u64 {
        tokens
            .saturating_mul(self.token_units)
            .min(self.capacity_units() + 1)
    }

    /// Units a full bucket holds.
    pub fn capacity_units(&self) -> u64 {
        self.capacity * self.token_units
    }

    /// Units gained per microsecond.
    pub fn refill_units_per_us(&self) -> u64 {
        self.refill_units_per_us
    }

    /// Microseconds it takes to gain `units`, rounded up so that a client told to come
    /// back then really finds them there.
    pub fn micros_to_gain(&self, units: u64) -> u64 {
        units.div_ceil(self.refill_units_per_us)
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_rate_window_or_burst_is_rejected() {
        assert_eq!(
            Limit::parse(LimitSpec {
                rate: 0,
                window_s: 60,
                burst: 10
            }),
            Err(LimitError::ZeroRate)
        );
        assert_eq!(
            Limit::parse(LimitSpec {
                rate: 10,
                window_s: 0,
                burst: 10
            }),
            Err(LimitError::ZeroWindow)
        );
        assert_eq!(
            Limit::parse(LimitSpec {
                rate: 10,
                window_s: 60,
                burst: 0
            }),
            Err(LimitError::ZeroCapacity)
        );
    }

    #[test]
    fn a_limit_beyond_exact_double_arithmetic_is_rejected() {
        let one_year = 365 * 24 * 3600;
        assert!(matches!(
            Limit::parse(LimitSpec {
                rate: 7,
                window_s: one_year,
                burst: 1_000_000
            }),
            Err(LimitError::TooLarge { .. })
        ));
        assert!(
            Limit::parse(LimitSpec {
                rate: u64::MAX,
                window_s: u64::MAX,
                burst: 1
            })
            .is_err()
        );
    }

    #[test]
    fn the_default_limit_refills_one_token_every_six_seconds() {
        let limit = Limit::parse(LimitSpec {
            rate: 10,
            window_s: 60,
            burst: 10,
        })
        .unwrap();
        assert_eq!(limit.micros_to_gain(limit.token_units()), 6_000_000);
    }

    #[test]
    fn a_share_of_two_instances_halves_burst_and_rate() {
        let limit = Limit::parse(LimitSpec {
            rate: 10,
            window_s: 60,
            burst: 10,
        })
        .unwrap();
        let share = limit.share_of(2);
        assert_eq!(share.capacity(), 5);
        assert_eq!(share.micros_to_gain(share.token_units()), 12_000_000);
        assert_eq!(limit.share_of(0), limit);
    }

    #[test]
    fn a_share_never_drops_below_one_token() {
        let limit = Limit::parse(LimitSpec {
            rate: 2,
            window_s: 60,
            burst: 2,
        })
        .unwrap();
        assert_eq!(limit.share_of(5).capacity(), 1);
    }

    #[test]
    fn a_share_that_cannot_stretch_its_window_exactly_is_still_a_share() {
        // One a year with a burst of 100: a window 1,000 times longer has no exact units.
        let limit = Limit::parse(LimitSpec {
            rate: 1,
            window_s: 365 * 86_400,
            burst: 100,
        })
        .unwrap();
        let share = limit.share_of(1_000);
        assert_ne!(share, limit, "the whole limit is no share");
        assert_eq!(share.capacity(), 1);
        // Its refill is no faster than the whole limit's.
        assert!(
            u128::from(share.rate_limit()) * u128::from(limit.window_us)
                <= u128::from(limit.rate_limit()) * u128::from(share.window_us)
        );
    }

    #[test]
    fn long_windows_and_high_rates_fit_the_exact_units() {
        let day = 86_400;
        for (rate, window_s) in [(1_000_000, day), (1, 30 * day), (1_000_000_000, 1)] {
            let limit = Limit::parse(LimitSpec {
                rate,
                window_s,
                burst: rate,
            })
            .unwrap_or_else(|err| panic!("{rate} per {window_s} s: {err}"));
            // One token is gained in exactly window / rate.
            let per_token_us = (u128::from(window_s) * 1_000_000).div_ceil(u128::from(rate));
            assert_eq!(
                u128::from(limit.micros_to_gain(limit.token_units())),
                per_token_us
            );
        }
    }
}
