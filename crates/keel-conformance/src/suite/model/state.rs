//! The model: what a correct provider's observable state is after each operation.
//!
//! It holds only what the trait's contract pins down. Where the contract leaves a choice
//! open (which of several equally eligible items a short fetch takes, what happens to a
//! cancelled item whose lease expired), the operations avoid the question or the
//! harness accepts any allowed answer and the model adopts it.

use std::collections::BTreeMap;

use keel_core::InstanceStatus;

/// A model instance's lifecycle, before pause and suspension are laid over it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Base {
    Pending,
    Running,
    Completed,
    Failed,
}

/// A queued orchestrator message, named by a label both sides can produce.
#[derive(Debug, Clone)]
pub(super) struct MMessage {
    pub(super) seq: u64,
    pub(super) label: String,
    pub(super) visible_at: u64,
}

/// A held or past lock: its generation (which claim of the instance) and expiry.
pub(super) type Claim = (u64, u64);

#[derive(Debug, Clone)]
pub(super) struct MInstance {
    pub(super) base: Base,
    pub(super) paused: bool,
    pub(super) suspended: bool,
    pub(super) execution: u32,
    pub(super) history_len: u64,
    pub(super) messages: Vec<MMessage>,
    pub(super) lock: Option<Claim>,
    pub(super) lock_generation: u64,
    pub(super) next_op: u64,
}

impl MInstance {
    pub(super) fn new(first: MMessage) -> Self {
        Self {
            base: Base::Pending,
            paused: false,
            suspended: false,
            execution: 1,
            history_len: 0,
            messages: vec![first],
            lock: None,
            lock_generation: 0,
            next_op: 1,
        }
    }

    pub(super) fn status(&self) -> InstanceStatus {
        if self.suspended {
            InstanceStatus::Suspended
        } else if self.paused {
            InstanceStatus::Paused
        } else {
            match self.base {
                Base::Pending => InstanceStatus::Pending,
                Base::Running => InstanceStatus::Running,
                Base::Completed => InstanceStatus::Completed,
                Base::Failed => InstanceStatus::Failed,
            }
        }
    }

    pub(super) fn is_terminal(&self) -> bool {
        matches!(self.base, Base::Completed | Base::Failed)
    }

    /// Whether a lock claim `generation` is the instance's current, unexpired one.
    pub(super) fn holds(&self, generation: u64, now: u64) -> bool {
        self.lock
            .is_some_and(|(current, until)| current == generation && until > now)
    }

    pub(super) fn visible(&self, now: u64) -> impl Iterator<Item = &MMessage> {
        self.messages.iter().filter(move |m| m.visible_at <= now)
    }

    /// Whether a fetch may claim it now.
    pub(super) fn fetchable(&self, now: u64) -> bool {
        !self.paused
            && !self.suspended
            && self.lock.is_none_or(|(_, until)| until <= now)
            && self.visible(now).next().is_some()
    }
}

/// An activity work item, keyed by (instance index, execution, op).
pub(super) type ItemKey = (usize, u32, u64);

#[derive(Debug, Clone)]
pub(super) struct MItem {
    pub(super) attempt: u32,
    pub(super) visible_at: u64,
    /// The current or last lease: (generation, until); `None` once released.
    pub(super) lease: Option<Claim>,
    pub(super) lease_generation: u64,
    pub(super) deliveries: u32,
}

impl MItem {
    pub(super) fn new(now: u64) -> Self {
        Self {
            attempt: 1,
            visible_at: now,
            lease: None,
            lease_generation: 0,
            deliveries: 0,
        }
    }

    pub(super) fn holds(&self, generation: u64, now: u64) -> bool {
        self.lease
            .is_some_and(|(current, until)| current == generation && until > now)
    }

    pub(super) fn leasable(&self, now: u64) -> bool {
        self.lease.is_none_or(|(_, until)| until <= now) && self.visible_at <= now
    }
}

/// The whole observable state of one case's instances.
#[derive(Debug, Clone, Default)]
pub(super) struct Model {
    /// The provider's time, in milliseconds (exact on a manual clock).
    pub(super) now: u64,
    /// By instance index; `None` until created.
    pub(super) instances: Vec<Option<MInstance>>,
    pub(super) items: BTreeMap<ItemKey, MItem>,
    pub(super) dead_letters: u64,
    next_seq: u64,
}

impl Model {
    pub(super) fn new(now: u64, instances: usize) -> Self {
        Self {
            now,
            instances: vec![None; instances],
            ..Self::default()
        }
    }

    /// A fresh number, for message order and signal payloads.
    pub(super) fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    pub(super) fn message(&mut self, label: String, visible_at: u64) -> MMessage {
        MMessage {
            seq: self.seq(),
            label,
            visible_at,
        }
    }

    pub(super) fn instance(&self, index: usize) -> Option<&MInstance> {
        self.instances.get(index).and_then(Option::as_ref)
    }

    pub(super) fn instance_mut(&mut self, index: usize) -> Option<&mut MInstance> {
        self.instances.get_mut(index).and_then(Option::as_mut)
    }

    pub(super) fn fetchable_instances(&self) -> Vec<usize> {
        (0..self.instances.len())
            .filter(|&i| self.instance(i).is_some_and(|m| m.fetchable(self.now)))
            .collect()
    }

    pub(super) fn leasable_items(&self) -> Vec<ItemKey> {
        self.items
            .iter()
            .filter(|(_, item)| item.leasable(self.now))
            .map(|(key, _)| *key)
            .collect()
    }

    fn messages(&self) -> impl Iterator<Item = &MMessage> {
        self.instances.iter().flatten().flat_map(|m| &m.messages)
    }

    pub(super) fn messages_ready(&self) -> u64 {
        self.messages().filter(|m| m.visible_at <= self.now).count() as u64
    }

    pub(super) fn messages_delayed(&self) -> u64 {
        self.messages().filter(|m| m.visible_at > self.now).count() as u64
    }

    pub(super) fn next_message_due(&self) -> Option<u64> {
        self.messages()
            .map(|m| m.visible_at)
            .filter(|&t| t > self.now)
            .min()
    }

    /// Items released (or never leased) and waiting for their time.
    pub(super) fn items_delayed(&self) -> u64 {
        self.items
            .values()
            .filter(|i| i.lease.is_none() && i.visible_at > self.now)
            .count() as u64
    }

    pub(super) fn next_item_due(&self) -> Option<u64> {
        self.items
            .values()
            .filter(|i| i.lease.is_none())
            .map(|i| i.visible_at)
            .filter(|&t| t > self.now)
            .min()
    }

    /// (leases certainly held, leases held or expired but not yet taken over).
    pub(super) fn items_leased(&self) -> (u64, u64) {
        let held = self
            .items
            .values()
            .filter(|i| i.lease.is_some_and(|(_, until)| until > self.now))
            .count() as u64;
        let any = self.items.values().filter(|i| i.lease.is_some()).count() as u64;
        (held, any)
    }

    /// Whether `instance` has any work item, of any execution.
    pub(super) fn has_items(&self, instance: usize) -> bool {
        self.items.keys().any(|&(i, _, _)| i == instance)
    }
}
