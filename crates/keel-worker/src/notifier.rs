//! Telling waiting clients in this process that an instance has finished.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use keel_core::InstanceId;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// Announces executions that end, so a client waiting for a result in the same process
/// wakes at once instead of at its next poll. Only the waiters of that instance wake: a
/// process waiting on thousands of instances does not re-read them all on every end.
/// A missed announcement only delays a waiter until its fallback poll.
#[derive(Debug, Default)]
pub struct Notifier {
    watched: Mutex<HashMap<InstanceId, Arc<Notify>>>,
}

impl Notifier {
    /// A notifier nobody waits on yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Announces that `instance` finished (completed, failed, was cancelled, continued
    /// as new or was suspended).
    pub fn finished(&self, instance: &InstanceId) {
        if let Some(notify) = self.watched().get(instance) {
            notify.notify_waiters();
        }
    }

    /// Starts watching `instance`; the watch ends when the returned value is dropped.
    pub fn watch(&self, instance: &InstanceId) -> Watch<'_> {
        let notify = Arc::clone(self.watched().entry(instance.clone()).or_default());
        Watch {
            notifier: self,
            instance: instance.clone(),
            notify,
        }
    }

    fn watched(&self) -> MutexGuard<'_, HashMap<InstanceId, Arc<Notify>>> {
        // Each change is one insert or remove: a panic cannot leave the map half-done.
        self.watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A watch on one instance's end; see [`Notifier::watch`].
#[derive(Debug)]
pub struct Watch<'a> {
    notifier: &'a Notifier,
    instance: InstanceId,
    notify: Arc<Notify>,
}

impl Watch<'_> {
    /// A future that resolves at the instance's next announced end. Create it (and
    /// [`enable`](Notified::enable) it) before checking the status, so an end between
    /// the check and the wait is not missed.
    pub fn next_end(&self) -> Notified<'_> {
        self.notify.notified()
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut watched = self.notifier.watched();
        // The map holds one reference and this watch another: no other watch is left.
        if Arc::strong_count(&self.notify) == 2 {
            watched.remove(&self.instance);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::pin::pin;
    use std::time::Duration;

    use super::*;

    fn id(name: &str) -> InstanceId {
        InstanceId::new(name).unwrap()
    }

    #[tokio::test]
    async fn only_the_waiters_of_the_finished_instance_wake() {
        let notifier = Notifier::new();
        let a = notifier.watch(&id("a"));
        let b = notifier.watch(&id("b"));
        let mut a_end = pin!(a.next_end());
        let mut b_end = pin!(b.next_end());
        a_end.as_mut().enable();
        b_end.as_mut().enable();
        notifier.finished(&id("a"));
        tokio::time::timeout(Duration::from_secs(5), a_end)
            .await
            .expect("a's waiter wakes");
        let b_woke = tokio::time::timeout(Duration::from_millis(50), b_end).await;
        assert!(b_woke.is_err(), "b's waiter stays asleep");
    }

    #[test]
    fn the_last_watch_of_an_instance_removes_it() {
        let notifier = Notifier::new();
        let first = notifier.watch(&id("a"));
        let second = notifier.watch(&id("a"));
        drop(first);
        assert_eq!(notifier.watched().len(), 1);
        drop(second);
        assert!(notifier.watched().is_empty());
    }
}
