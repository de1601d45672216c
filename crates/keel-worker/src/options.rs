//! How a worker runs: what it serves, how much at once, and its timings.

use std::time::Duration;

use keel_core::{Codec, QueueName};

use crate::error::{Error, Result};

/// A worker's settings. Start from [`WorkerOptions::default`] and change what you need.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub(crate) orchestrations: bool,
    pub(crate) activities: bool,
    pub(crate) queues: Vec<QueueName>,
    pub(crate) max_concurrent_activities: usize,
    pub(crate) orchestration_lanes: usize,
    pub(crate) orchestration_batch: usize,
    pub(crate) activity_batch: usize,
    pub(crate) lock_duration: Duration,
    pub(crate) lease_duration: Duration,
    pub(crate) cache_capacity: usize,
    pub(crate) eager_dispatch: bool,
    pub(crate) max_poll_interval: Duration,
    pub(crate) max_turn_attempts: u32,
    pub(crate) turn_retry_delay: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) queue_depth_interval: Option<Duration>,
    pub(crate) codec: Codec,
}

impl Default for WorkerOptions {
    /// Runs turns and activities of the default queue: up to 100 activities at once,
    /// 2 turn lanes fetching 50 instances each, 30 s locks and leases, 10,000 cached
    /// instances, at most 1 s between polls when no wake-up comes, 5 failed turns before
    /// an instance is suspended, 30 s to drain on shutdown, JSON payloads.
    fn default() -> Self {
        Self {
            orchestrations: true,
            activities: true,
            queues: vec![QueueName::default()],
            max_concurrent_activities: 100,
            orchestration_lanes: 2,
            orchestration_batch: 50,
            activity_batch: 100,
            lock_duration: Duration::from_secs(30),
            lease_duration: Duration::from_secs(30),
            cache_capacity: 10_000,
            eager_dispatch: true,
            max_poll_interval: Duration::from_secs(1),
            max_turn_attempts: 5,
            turn_retry_delay: Duration::from_millis(500),
            shutdown_timeout: Duration::from_secs(30),
            queue_depth_interval: Some(Duration::from_secs(10)),
            codec: Codec::default(),
        }
    }
}

impl WorkerOptions {
    /// Whether this worker runs orchestration turns (default true).
    #[must_use]
    pub fn run_orchestrations(mut self, run: bool) -> Self {
        self.orchestrations = run;
        self
    }

    /// Whether this worker runs activities (default true).
    #[must_use]
    pub fn run_activities(mut self, run: bool) -> Self {
        self.activities = run;
        self
    }

    /// The activity queues this worker serves (default: the default queue).
    #[must_use]
    pub fn queues(mut self, queues: impl IntoIterator<Item = QueueName>) -> Self {
        self.queues = queues.into_iter().collect();
        self
    }

    /// At most this many activities run at once; the worker never claims more than it
    /// can start (default 100).
    #[must_use]
    pub fn max_concurrent_activities(mut self, max: usize) -> Self {
        self.max_concurrent_activities = max;
        self
    }

    /// How many loops fetch and run orchestration turns concurrently (default 2); each
    /// fetches a batch, runs its turns and commits their acks together.
    #[must_use]
    pub fn orchestration_lanes(mut self, lanes: usize) -> Self {
        self.orchestration_lanes = lanes;
        self
    }

    /// At most this many instances per orchestration fetch (default 50; the provider's
    /// own maximum caps it).
    #[must_use]
    pub fn orchestration_batch(mut self, max: usize) -> Self {
        self.orchestration_batch = max;
        self
    }

    /// At most this many work items per activity fetch (default 100).
    #[must_use]
    pub fn activity_batch(mut self, max: usize) -> Self {
        self.activity_batch = max;
        self
    }

    /// How long an instance's lock lasts: a worker that dies holding it delays the
    /// instance this long (default 30 s).
    #[must_use]
    pub fn lock_duration(mut self, duration: Duration) -> Self {
        self.lock_duration = duration;
        self
    }

    /// How long an activity's lease lasts unless renewed; it is renewed every third of
    /// it while the activity runs (default 30 s).
    #[must_use]
    pub fn lease_duration(mut self, duration: Duration) -> Self {
        self.lease_duration = duration;
        self
    }

    /// How many instances the sticky cache keeps between turns (default 10,000; 0
    /// turns it off, so every turn replays the full history).
    #[must_use]
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.cache_capacity = capacity;
        self
    }

    /// Whether the worker takes a workflow's next step in the commit of its last one,
    /// where the store supports it (default true): a turn's ack leases the activities
    /// it schedules to this worker's free slots, and an activity's outcome locks its
    /// instance for this worker's next turn, two commits per step instead of four.
    /// Off, every step goes through the queues, in their priority order, to whichever
    /// worker fetches it first.
    #[must_use]
    pub fn eager_dispatch(mut self, eager: bool) -> Self {
        self.eager_dispatch = eager;
        self
    }

    /// The longest an idle dispatcher waits before looking again when no wake-up comes
    /// (default 1 s). Wake-ups normally come much sooner.
    #[must_use]
    pub fn max_poll_interval(mut self, interval: Duration) -> Self {
        self.max_poll_interval = interval;
        self
    }

    /// How many times a turn may fail (a panic, an unreadable history) before the
    /// instance is suspended (default 5). Nondeterminism suspends at once.
    #[must_use]
    pub fn max_turn_attempts(mut self, attempts: u32) -> Self {
        self.max_turn_attempts = attempts;
        self
    }

    /// The delay before a failed turn is tried again, doubling with each failure
    /// (default 500 ms).
    #[must_use]
    pub fn turn_retry_delay(mut self, delay: Duration) -> Self {
        self.turn_retry_delay = delay;
        self
    }

    /// How long shutdown lets running work finish before it abandons the rest to other
    /// workers (default 30 s).
    #[must_use]
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How often the queue-depth gauges are sampled; none turns sampling off
    /// (default 10 s).
    #[must_use]
    pub fn queue_depth_interval(mut self, interval: Option<Duration>) -> Self {
        self.queue_depth_interval = interval;
        self
    }

    /// The codec for payloads the worker writes (default JSON).
    #[must_use]
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// The codec payloads are written with.
    pub fn payload_codec(&self) -> Codec {
        self.codec
    }

    /// The longest an idle dispatcher waits between looks.
    pub fn poll_interval(&self) -> Duration {
        self.max_poll_interval
    }

    /// Checks that the numbers make sense.
    pub fn validate(&self) -> Result<()> {
        let invalid = |option, reason: &str| {
            Err(Error::InvalidOption {
                option,
                reason: reason.to_owned(),
            })
        };
        if self.activities && self.queues.is_empty() {
            return invalid(
                "queues",
                "a worker running activities serves at least one queue",
            );
        }
        if self.max_concurrent_activities == 0 {
            return invalid("max_concurrent_activities", "must be at least 1");
        }
        if self.orchestration_lanes == 0 {
            return invalid("orchestration_lanes", "must be at least 1");
        }
        if self.orchestration_batch == 0 || self.activity_batch == 0 {
            return invalid("orchestration_batch / activity_batch", "must be at least 1");
        }
        if self.lock_duration < Duration::from_millis(100) {
            return invalid("lock_duration", "must be at least 100 ms");
        }
        if self.lease_duration < Duration::from_millis(100) {
            return invalid("lease_duration", "must be at least 100 ms");
        }
        if self.max_turn_attempts == 0 {
            return invalid("max_turn_attempts", "must be at least 1");
        }
        if self.max_poll_interval.is_zero() {
            return invalid("max_poll_interval", "must be longer than zero");
        }
        Ok(())
    }
}
