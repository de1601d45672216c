//! The sticky cache: live executions kept between turns, so a hot instance applies only
//! its new messages instead of reading and replaying its whole history.

use std::collections::{BTreeMap, HashMap};

use keel_core::{ExecutionId, InstanceId, Timestamp};
use keel_replay::Execution;

/// A live execution between turns.
#[derive(Debug)]
pub(crate) struct Cached {
    pub(crate) execution: Execution,
    pub(crate) execution_id: ExecutionId,
    /// The orchestration's name, for metrics.
    pub(crate) name: String,
    /// When the execution started, for the end-to-end latency metric.
    pub(crate) started_at: Timestamp,
}

/// Least-recently-used, bounded by a count. An entry is taken out for a turn and put
/// back after its ack commits, so an instance in a turn is never in the cache and a
/// failed turn simply does not put it back.
#[derive(Debug)]
pub(crate) struct StickyCache {
    capacity: usize,
    entries: HashMap<InstanceId, (u64, Cached)>,
    /// Use order: the smallest tick is the least recently used.
    order: BTreeMap<u64, InstanceId>,
    tick: u64,
}

impl StickyCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Takes the entry of `instance` if it is exactly at (`execution`, `history_len`);
    /// a stale entry (another worker moved the instance on) is dropped.
    pub(crate) fn take(
        &mut self,
        instance: &InstanceId,
        execution: ExecutionId,
        history_len: u64,
    ) -> Option<Cached> {
        let (tick, cached) = self.entries.remove(instance)?;
        self.order.remove(&tick);
        (cached.execution_id == execution && cached.execution.history_len() == history_len)
            .then_some(cached)
    }

    /// Keeps `cached` as the most recently used entry, evicting the least recently used
    /// beyond the capacity.
    pub(crate) fn put(&mut self, instance: InstanceId, cached: Cached) {
        if self.capacity == 0 {
            return;
        }
        self.tick += 1;
        if let Some((old, _)) = self.entries.insert(instance.clone(), (self.tick, cached)) {
            self.order.remove(&old);
        }
        self.order.insert(self.tick, instance);
        while self.entries.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use keel_core::{Failure, Payload};
    use keel_replay::OrchestrationContext;

    use super::*;

    fn entry(instance: &InstanceId) -> Cached {
        let code = Arc::new(|_ctx: OrchestrationContext, input: Payload| async move {
            Ok::<_, Failure>(input)
        });
        Cached {
            execution: Execution::new(instance.clone(), ExecutionId::FIRST, 1, code),
            execution_id: ExecutionId::FIRST,
            name: "echo".to_owned(),
            started_at: Timestamp::EPOCH,
        }
    }

    fn id(n: u32) -> InstanceId {
        InstanceId::new(format!("i-{n}")).unwrap()
    }

    #[test]
    fn the_least_recently_used_entry_goes_first() {
        let mut cache = StickyCache::new(2);
        cache.put(id(1), entry(&id(1)));
        cache.put(id(2), entry(&id(2)));
        // Using 1 makes 2 the oldest.
        let one = cache.take(&id(1), ExecutionId::FIRST, 0).unwrap();
        cache.put(id(1), one);
        cache.put(id(3), entry(&id(3)));
        assert_eq!(cache.len(), 2);
        assert!(cache.take(&id(2), ExecutionId::FIRST, 0).is_none());
        assert!(cache.take(&id(1), ExecutionId::FIRST, 0).is_some());
        assert!(cache.take(&id(3), ExecutionId::FIRST, 0).is_some());
    }

    #[test]
    fn a_stale_entry_is_a_miss_and_is_dropped() {
        let mut cache = StickyCache::new(4);
        cache.put(id(1), entry(&id(1)));
        assert!(cache.take(&id(1), ExecutionId::FIRST, 5).is_none());
        assert_eq!(cache.len(), 0);
        cache.put(id(1), entry(&id(1)));
        assert!(cache.take(&id(1), ExecutionId::FIRST.next(), 0).is_none());
    }

    #[test]
    fn capacity_zero_keeps_nothing() {
        let mut cache = StickyCache::new(0);
        cache.put(id(1), entry(&id(1)));
        assert_eq!(cache.len(), 0);
    }
}
