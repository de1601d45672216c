//! How a notifier names its channels and how patiently it talks to Redis.

use std::time::Duration;

/// Options of a [`RedisNotifier`](crate::RedisNotifier).
///
/// ```
/// use std::time::Duration;
/// use keel_redis::RedisOptions;
///
/// let options = RedisOptions::new()
///     .namespace("billing")
///     .max_reconnect_delay(Duration::from_secs(1));
/// assert_eq!(options.channel_namespace(), "billing");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisOptions {
    pub(crate) namespace: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_reconnect_delay: Duration,
    pub(crate) ping_interval: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            namespace: "keel".to_owned(),
            connect_timeout: Duration::from_secs(5),
            max_reconnect_delay: Duration::from_secs(2),
            ping_interval: Duration::from_secs(5),
        }
    }
}

impl RedisOptions {
    /// The defaults: namespace `keel`, a 5 s connect timeout, reconnects backing off
    /// from 50 ms to at most 2 s, and a health-check `PING` every 5 s.
    pub fn new() -> Self {
        Self::default()
    }

    /// The prefix of the channels (`<namespace>:orchestrations`, `:activities`,
    /// `:ended`). Deployments that share one Redis but not one database need different
    /// namespaces, or each wakes the other's dispatchers for nothing.
    #[must_use]
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// How long connecting (and each command) may take before it counts as failed:
    /// at [`connect`](crate::RedisNotifier::connect) an error, later a reconnect.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The longest pause between attempts to reach Redis again after it went away:
    /// how long, at worst, wake-ups stay off after Redis returns.
    #[must_use]
    pub fn max_reconnect_delay(mut self, delay: Duration) -> Self {
        self.max_reconnect_delay = delay;
        self
    }

    /// How often the subscriber sends `PING` on its connection, so a connection that
    /// died without closing (a network partition) is noticed and replaced.
    #[must_use]
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// The channel namespace.
    pub fn channel_namespace(&self) -> &str {
        &self.namespace
    }
}

/// Exponential back-off between reconnect attempts: 50 ms doubling up to a maximum.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(50);

    pub(crate) fn new(max: Duration) -> Self {
        Self {
            next: Self::FIRST.min(max),
            max,
        }
    }

    /// The pause before the next attempt; each call doubles the following one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// After a success: the next failure starts again from the shortest pause.
    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST.min(self.max);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::Backoff;

    #[test]
    fn back_off_doubles_to_the_maximum_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(300));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(50));
    }
}
