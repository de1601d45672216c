//! What the notifier, its publisher and its subscriber share: one signal per topic,
//! the topics waiting to be published, and whether the subscription is live.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use keel_provider::WorkKind;
use tokio::sync::Notify;

/// What a wake-up announces; one Redis channel each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Topic {
    /// Orchestrator messages were enqueued (or a lock released with a delay).
    Orchestrations,
    /// Activity work items were enqueued or released.
    Activities,
    /// An instance ended, continued as new or was suspended.
    Ended,
}

impl Topic {
    pub(crate) const ALL: [Topic; 3] = [Topic::Orchestrations, Topic::Activities, Topic::Ended];

    fn index(self) -> usize {
        match self {
            Topic::Orchestrations => 0,
            Topic::Activities => 1,
            Topic::Ended => 2,
        }
    }

    fn bit(self) -> u8 {
        1 << self.index()
    }

    fn suffix(self) -> &'static str {
        match self {
            Topic::Orchestrations => "orchestrations",
            Topic::Activities => "activities",
            Topic::Ended => "ended",
        }
    }

    /// The channel of this topic in `namespace`.
    pub(crate) fn channel(self, namespace: &str) -> String {
        format!("{namespace}:{}", self.suffix())
    }
}

impl From<WorkKind> for Topic {
    fn from(kind: WorkKind) -> Self {
        match kind {
            WorkKind::Orchestrations => Topic::Orchestrations,
            WorkKind::Activities => Topic::Activities,
        }
    }
}

/// A set of topics, as a bit mask.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Topics(u8);

impl Topics {
    pub(crate) fn with(self, topic: Topic) -> Self {
        Self(self.0 | topic.bit())
    }

    pub(crate) fn without(self, topic: Topic) -> Self {
        Self(self.0 & !topic.bit())
    }

    pub(crate) fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn iter(self) -> impl Iterator<Item = Topic> {
        Topic::ALL
            .into_iter()
            .filter(move |t| self.0 & t.bit() != 0)
    }
}

/// Wakes the waiters of one topic. `raised` counts wake-ups; `seen` is its value when
/// the queue was last looked at (a fetch, or for `Ended` a status read), so a wake-up
/// that came after that look but before the wait began still ends the wait.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    notify: Notify,
    raised: AtomicU64,
    seen: AtomicU64,
}

impl Signal {
    /// Wakes everyone waiting now and marks news for whoever waits next.
    pub(crate) fn raise(&self) {
        self.raised.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    /// Records that the caller is about to look at the queue: wake-ups so far are
    /// covered by what it will see.
    pub(crate) fn look(&self) {
        let raised = self.raised.load(Ordering::SeqCst);
        self.seen.fetch_max(raised, Ordering::SeqCst);
    }

    /// Whether a wake-up came since the last look.
    fn news(&self) -> bool {
        self.raised.load(Ordering::SeqCst) > self.seen.load(Ordering::SeqCst)
    }

    /// Resolves at the next wake-up, or at once if one came since the last look.
    pub(crate) async fn raised(&self) {
        let mut notified = std::pin::pin!(self.notify.notified());
        // Registered before the check, so a raise in between is not missed.
        notified.as_mut().enable();
        if self.news() {
            return;
        }
        notified.await;
    }
}

/// Shared by the notifier and its two background tasks.
#[derive(Debug)]
pub(crate) struct Hub {
    signals: [Signal; 3],
    /// Topics raised here and not yet published.
    pending: AtomicU8,
    /// Wakes the publisher.
    pub(crate) publish: Notify,
    /// Whether the subscriber holds a live subscription.
    pub(crate) subscribed: AtomicBool,
    /// Tags this notifier's publications, so its subscriber skips its own: they were
    /// raised here directly, without the round trip.
    pub(crate) origin: String,
    /// The channel of each topic.
    channels: [String; 3],
}

impl Hub {
    pub(crate) fn new(namespace: &str, origin: String) -> Self {
        Self {
            signals: Default::default(),
            pending: AtomicU8::new(0),
            publish: Notify::new(),
            subscribed: AtomicBool::new(false),
            origin,
            channels: Topic::ALL.map(|topic| topic.channel(namespace)),
        }
    }

    pub(crate) fn signal(&self, topic: Topic) -> &Signal {
        &self.signals[topic.index()]
    }

    pub(crate) fn channel(&self, topic: Topic) -> &str {
        &self.channels[topic.index()]
    }

    pub(crate) fn channels(&self) -> &[String; 3] {
        &self.channels
    }

    /// The topic whose channel is `channel`, if any.
    pub(crate) fn topic_of(&self, channel: &str) -> Option<Topic> {
        Topic::ALL
            .into_iter()
            .find(|topic| self.channel(*topic) == channel)
    }

    /// Work or news of `topics` came about here: wakes this process's waiters at once
    /// and hands the topics to the publisher for everyone else.
    pub(crate) fn announce(&self, topics: Topics) {
        if topics.is_empty() {
            return;
        }
        for topic in topics.iter() {
            self.signal(topic).raise();
        }
        self.pending.fetch_or(topics.0, Ordering::SeqCst);
        // `notify_one` keeps a permit if the publisher is busy, so nothing is left behind.
        self.publish.notify_one();
    }

    /// Takes the topics waiting to be published.
    pub(crate) fn take_pending(&self) -> Topics {
        Topics(self.pending.swap(0, Ordering::SeqCst))
    }

    /// Puts back topics whose publication failed, to try again.
    pub(crate) fn restore_pending(&self, topics: Topics) {
        self.pending.fetch_or(topics.0, Ordering::SeqCst);
    }

    /// Wakes every waiter of this process: after the subscription was down, news may
    /// have been missed, and a needless fetch is cheaper than waiting for the poll.
    pub(crate) fn raise_all(&self) {
        for signal in &self.signals {
            signal.raise();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Hub, Topic, Topics};

    #[tokio::test]
    async fn a_raise_between_the_look_and_the_wait_is_not_lost() {
        let hub = Hub::new("t", "me".to_owned());
        let signal = hub.signal(Topic::Activities);
        signal.look();
        signal.raise();
        tokio::time::timeout(Duration::from_secs(1), signal.raised())
            .await
            .map_err(|_| "the wait should end at once")
            .unwrap_or_else(|e| panic!("{e}"));
        // Once looked at again, the same wake-up no longer ends a wait.
        signal.look();
        let waited = tokio::time::timeout(Duration::from_millis(50), signal.raised()).await;
        assert!(waited.is_err(), "no news since the last look");
    }

    #[test]
    fn topics_collect_and_the_channels_carry_the_namespace() {
        let hub = Hub::new("ns", "me".to_owned());
        let topics = Topics::default()
            .with(Topic::Ended)
            .with(Topic::Orchestrations);
        hub.announce(topics);
        let pending: Vec<Topic> = hub.take_pending().iter().collect();
        assert_eq!(pending, [Topic::Orchestrations, Topic::Ended]);
        assert!(hub.take_pending().is_empty());
        assert_eq!(hub.channel(Topic::Activities), "ns:activities");
        assert_eq!(hub.topic_of("ns:ended"), Some(Topic::Ended));
        assert_eq!(hub.topic_of("other:ended"), None);
    }
}
