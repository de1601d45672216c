//! How failed activity attempts are retried.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::InvalidInput;
use crate::failure::Failure;
use crate::rng::SplitMix64;

/// When and how often a failed activity attempt is tried again.
///
/// The delay before attempt `n + 1` is `initial_interval * multiplier^(n - 1)`, capped at
/// `max_interval`, then spread by `jitter` so that many items failing together do not
/// retry together. The spread is derived from a seed, so the same item and attempt get
/// the same delay on every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included: 1 means never retry.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_interval: Duration,
    /// Growth of the delay per attempt; at least 1.
    pub multiplier: f64,
    /// The longest delay.
    pub max_interval: Duration,
    /// Fraction of the delay randomised in both directions, from 0 to 1.
    pub jitter: f64,
    /// Failure kinds never retried, whatever their `retryable` flag says.
    pub non_retryable: Vec<String>,
    /// How long one attempt may run before it counts as failed with
    /// [`Failure::TIMEOUT`]; none by default.
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 5 attempts, 1 s doubling to at most 60 s, 10 % jitter, no attempt timeout.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(60),
            jitter: 0.1,
            non_retryable: Vec::new(),
            attempt_timeout: None,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Run the next attempt after this delay.
    RetryAfter(Duration),
    /// Record the failure as final.
    GiveUp,
}

impl RetryPolicy {
    /// A policy that runs an activity once and never retries it.
    pub fn never() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Checks that the numbers make sense.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        let reason = if self.max_attempts == 0 {
            "max_attempts must be at least 1".to_owned()
        } else if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            format!(
                "multiplier must be a finite number >= 1, not {}",
                self.multiplier
            )
        } else if !(0.0..=1.0).contains(&self.jitter) {
            format!("jitter must be between 0 and 1, not {}", self.jitter)
        } else if self.max_interval < self.initial_interval {
            format!(
                "max_interval ({:?}) is shorter than initial_interval ({:?})",
                self.max_interval, self.initial_interval
            )
        } else if self.attempt_timeout == Some(Duration::ZERO) {
            "attempt_timeout must be longer than zero".to_owned()
        } else {
            return Ok(());
        };
        Err(InvalidInput::new("retry policy", reason))
    }

    /// The delay after failed attempt `attempt` (1-based), jittered from `seed`.
    ///
    /// A pure function: the same policy, attempt and seed give the same delay.
    pub fn next_delay(&self, attempt: u32, seed: u64) -> Duration {
        let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let max = self.max_interval.as_secs_f64();
        let initial = self.initial_interval.as_secs_f64();
        // 0 x inf is NaN: a zero interval stays zero however far the power overflows.
        let base = if initial == 0.0 {
            0.0
        } else {
            (initial * self.multiplier.powi(exponent)).min(max)
        };
        let mut rng =
            SplitMix64::new(seed ^ u64::from(attempt).wrapping_mul(0xA24B_AED4_963E_E407));
        let spread = self.jitter.clamp(0.0, 1.0) * 2.0f64.mul_add(rng.next_f64(), -1.0);
        let delay = (base * (1.0 + spread)).clamp(0.0, max);
        // The f64 round trip can land a hair past the cap on long intervals.
        Duration::try_from_secs_f64(delay).map_or(self.max_interval, |d| d.min(self.max_interval))
    }

    /// Whether to retry after attempt `attempt` (1-based) failed with `failure`.
    pub fn decide(&self, attempt: u32, failure: &Failure, seed: u64) -> RetryDecision {
        let refused = self.non_retryable.iter().any(|kind| failure.is(kind));
        if !failure.retryable || refused || attempt >= self.max_attempts {
            RetryDecision::GiveUp
        } else {
            RetryDecision::RetryAfter(self.next_delay(attempt, seed))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = no_jitter();
        let secs: Vec<u64> = (1..=8).map(|a| p.next_delay(a, 0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(p.next_delay(u32::MAX, 0), Duration::from_secs(60));
    }

    #[test]
    fn jitter_is_deterministic_and_bounded() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..RetryPolicy::default()
        };
        for seed in 0..200 {
            let d = p.next_delay(3, seed);
            assert_eq!(d, p.next_delay(3, seed));
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(6),
                "{d:?}"
            );
        }
        assert_ne!(p.next_delay(3, 1), p.next_delay(3, 2));
    }

    #[test]
    fn decisions_respect_attempts_flags_and_kinds() {
        let p = RetryPolicy {
            max_attempts: 3,
            non_retryable: vec!["Declined".into()],
            ..no_jitter()
        };
        let flaky = Failure::new("Network", "reset");
        assert_eq!(
            p.decide(1, &flaky, 0),
            RetryDecision::RetryAfter(Duration::from_secs(1))
        );
        assert_eq!(p.decide(3, &flaky, 0), RetryDecision::GiveUp);
        assert_eq!(
            p.decide(1, &Failure::new("Declined", "no"), 0),
            RetryDecision::GiveUp
        );
        assert_eq!(
            p.decide(1, &flaky.clone().retryable(false), 0),
            RetryDecision::GiveUp
        );
        assert_eq!(
            RetryPolicy::never().decide(1, &flaky, 0),
            RetryDecision::GiveUp
        );
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert!(RetryPolicy::default().validate().is_ok());
        let bad = RetryPolicy {
            multiplier: 0.5,
            ..RetryPolicy::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("multiplier")
        );
        let bad = RetryPolicy {
            jitter: f64::NAN,
            ..RetryPolicy::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("jitter"));
        let bad = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("max_attempts")
        );
    }
}
