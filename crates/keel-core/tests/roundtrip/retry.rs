//! `RetryPolicy::next_delay` for every valid policy: bounded by `max_interval`,
//! deterministic, non-decreasing without jitter, and spread by at most `jitter`.

use std::time::Duration;

use keel_core::{Failure, RetryDecision, RetryPolicy, decode_record, encode_record};
use proptest::prelude::*;

use crate::strategies::{failure_kind, valid_retry_policy};

/// Attempts: the common first few, hundreds (where `multiplier^n` overflows), any, and
/// the edges 0 and `u32::MAX`.
fn attempt() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 1..=12_u32,
        2 => 1..=2_000_u32,
        2 => any::<u32>(),
        1 => Just(0),
        1 => Just(u32::MAX),
    ]
}

fn without_jitter(policy: &RetryPolicy) -> RetryPolicy {
    RetryPolicy {
        jitter: 0.0,
        ..policy.clone()
    }
}

proptest! {
    #![proptest_config(crate::config())]

    #[test]
    fn delays_never_exceed_max_interval(
        policy in valid_retry_policy(),
        attempt in attempt(),
        seed in any::<u64>(),
    ) {
        prop_assert!(policy.validate().is_ok(), "{:?}", policy.validate());
        let delay = policy.next_delay(attempt, seed);
        prop_assert!(
            delay <= policy.max_interval,
            "{:?} > max_interval {:?}", delay, policy.max_interval
        );
    }

    /// The same policy, attempt and seed give the same delay, on every worker: also
    /// after the policy went through storage.
    #[test]
    fn delays_are_deterministic(
        policy in valid_retry_policy(),
        attempt in attempt(),
        seed in any::<u64>(),
    ) {
        let delay = policy.next_delay(attempt, seed);
        prop_assert_eq!(policy.next_delay(attempt, seed), delay);
        prop_assert_eq!(policy.clone().next_delay(attempt, seed), delay);
        let stored: RetryPolicy = decode_record(&encode_record(&policy).unwrap()).unwrap();
        prop_assert_eq!(stored.next_delay(attempt, seed), delay);
    }

    #[test]
    fn delays_without_jitter_never_decrease(
        policy in valid_retry_policy(),
        start in attempt(),
        seed in any::<u64>(),
    ) {
        let policy = without_jitter(&policy);
        for window in [1..=48, start..=start.saturating_add(16)] {
            let mut previous: Option<(u32, Duration)> = None;
            for attempt in window {
                let delay = policy.next_delay(attempt, seed);
                if let Some((before, waited)) = previous {
                    prop_assert!(
                        delay >= waited,
                        "attempt {} waits {:?}, attempt {} waited {:?}", attempt, delay, before, waited
                    );
                }
                previous = Some((attempt, delay));
            }
        }
    }

    /// Jitter moves the delay by at most `jitter` of the un-jittered delay, either way.
    #[test]
    fn jitter_stays_within_its_fraction(
        policy in valid_retry_policy(),
        attempt in attempt(),
        seed in any::<u64>(),
    ) {
        let base = without_jitter(&policy).next_delay(attempt, seed).as_secs_f64();
        let delay = policy.next_delay(attempt, seed).as_secs_f64();
        // Slack for f64 rounding and the nanosecond resolution of `Duration`.
        let slack = base.mul_add(1e-12, 2e-9);
        let low = base.mul_add(1.0 - policy.jitter, -slack);
        let high = base.mul_add(1.0 + policy.jitter, slack);
        prop_assert!(low <= delay && delay <= high, "{} not in [{}, {}]", delay, low, high);
    }

    /// "The delay before attempt n + 1 is initial_interval * multiplier^(n - 1)": with
    /// no initial interval, every retry is immediate, however many attempts there are.
    #[test]
    fn a_zero_initial_interval_never_waits(
        policy in valid_retry_policy(),
        attempt in attempt(),
        seed in any::<u64>(),
    ) {
        let policy = RetryPolicy { initial_interval: Duration::ZERO, ..policy };
        prop_assert!(policy.validate().is_ok());
        prop_assert_eq!(policy.next_delay(attempt, seed), Duration::ZERO);
    }

    #[test]
    fn decisions_follow_attempts_flags_and_kinds(
        policy in valid_retry_policy(),
        attempt in attempt(),
        seed in any::<u64>(),
        kind in failure_kind(),
        retryable in any::<bool>(),
        refuse in any::<bool>(),
    ) {
        let mut policy = policy;
        if refuse {
            policy.non_retryable.push(kind.clone());
        }
        let refused = policy.non_retryable.contains(&kind);
        let failure = Failure::new(kind, "it broke").retryable(retryable);
        let decision = policy.decide(attempt, &failure, seed);
        if retryable && !refused && attempt < policy.max_attempts {
            prop_assert_eq!(decision, RetryDecision::RetryAfter(policy.next_delay(attempt, seed)));
        } else {
            prop_assert_eq!(decision, RetryDecision::GiveUp);
        }
    }
}
