//! Applies one case's operations to the provider and the model side by side, and
//! compares what can be observed after every step.

use std::fmt::Debug;
use std::time::Duration;

use keel_core::{Codec, Event, EventKind, InstanceId, Message, OpId, SideEffect, Timestamp};
use keel_provider::{
    ErrorKind, InstanceQuery, LeaseToken, LockToken, MessageId, PageRequest, Provider,
    ProviderError, QueueDepths, WorkKind,
};

use super::state::{ItemKey, Model};
use super::{INSTANCES, Op, WorkAction};
use crate::TestStore;
use crate::fixtures::payload;

pub(super) type Check = Result<(), String>;

/// A lock some fetch returned: which instance, which claim, and what it fetched.
pub(super) struct LockHandle {
    pub(super) instance: usize,
    pub(super) generation: u64,
    pub(super) token: LockToken,
    /// The fetched messages: the model's sequence numbers and the provider's ids.
    pub(super) fetched: Vec<(u64, MessageId)>,
}

/// A lease some activity fetch returned.
pub(super) struct LeaseHandle {
    pub(super) key: ItemKey,
    pub(super) generation: u64,
    pub(super) token: LeaseToken,
}

pub(super) struct Harness<'a> {
    pub(super) store: &'a TestStore,
    pub(super) p: &'a dyn Provider,
    pub(super) manual_clock: bool,
    pub(super) prefix: String,
    pub(super) model: Model,
    pub(super) locks: Vec<LockHandle>,
    pub(super) leases: Vec<LeaseHandle>,
}

/// Runs one case on fresh instance ids after deleting what earlier runs left.
pub(super) async fn run_case(
    store: &TestStore,
    run: u32,
    ops: &[Op],
) -> Result<(), (usize, String)> {
    let p = &*store.provider;
    let before = |e: String| (0, format!("before the case: {e}"));
    clear(p).await.map_err(before)?;
    let now = p.now().await.map_err(|e| before(format!("now: {e}")))?;
    let mut harness = Harness {
        store,
        p,
        manual_clock: store.has_manual_clock(),
        prefix: format!("model-{run}"),
        model: Model::new(now.as_millis(), usize::from(INSTANCES)),
        locks: Vec::new(),
        leases: Vec::new(),
    };
    // Two instances to start with, so that short cases reach turns and activities.
    for instance in 0..2 {
        harness
            .create(instance, None, true)
            .await
            .map_err(|e| before(format!("creating instance {instance}: {e}")))?;
    }
    for (step, op) in ops.iter().enumerate() {
        harness
            .apply(op)
            .await
            .map_err(|e| (step, format!("at step {step} ({op:?}): {e}")))?;
        harness
            .compare()
            .await
            .map_err(|e| (step, format!("after step {step} ({op:?}): {e}")))?;
    }
    Ok(())
}

/// Deletes every instance, so that a case starts from an empty store.
async fn clear(p: &dyn Provider) -> Check {
    loop {
        let page = p
            .list_instances(InstanceQuery::default(), PageRequest::first(100))
            .await
            .map_err(|e| format!("list_instances: {e}"))?;
        if page.items.is_empty() {
            break;
        }
        for record in page.items {
            match p.delete_instance(&record.id).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(format!("delete_instance: {e}")),
            }
        }
    }
    let mut depths = p
        .queue_depths()
        .await
        .map_err(|e| format!("queue_depths: {e}"))?;
    depths.activities_ready.retain(|_, n| *n > 0);
    ensure!(
        depths == QueueDepths::default(),
        "deleting every instance left queued work: {depths:?}"
    );
    Ok(())
}

/// Checks that a call failed with `kind`.
pub(super) fn expect_kind<T: Debug>(
    result: Result<T, ProviderError>,
    kind: ErrorKind,
    what: &str,
) -> Check {
    match result {
        Ok(value) => Err(format!("{what}: expected {kind:?}, got Ok({value:?})")),
        Err(err) if err.kind() == kind => Ok(()),
        Err(err) => Err(format!(
            "{what}: expected {kind:?}, got {:?}: {err}",
            err.kind()
        )),
    }
}

pub(super) fn ok<T>(result: Result<T, ProviderError>, what: &str) -> Result<T, String> {
    result.map_err(|e| format!("{what} failed: {e}"))
}

/// The label of a real message, as the model names it.
pub(super) fn label(message: &Message) -> String {
    match message {
        Message::Start { execution, .. } => format!("start:{execution}"),
        Message::Signal { payload, .. } => {
            let n: i64 = Codec::default().decode(payload).unwrap_or(-1);
            format!("sig:{n}")
        }
        Message::ActivityDone {
            execution,
            op,
            outcome,
        } => format!(
            "done:{execution}:{}:{}",
            op.get(),
            if outcome.is_ok() { "ok" } else { "err" }
        ),
        Message::TimerFired { execution, op } => format!("timer:{execution}:{}", op.get()),
        other => format!("other:{}", other.name()),
    }
}

pub(super) fn signal(n: u64) -> Message {
    Message::Signal {
        name: "model".to_owned(),
        payload: payload(&serde_json::json!(n)),
    }
}

pub(super) fn event(at: Timestamp, kind: EventKind) -> Event {
    Event { at, kind }
}

impl Harness<'_> {
    pub(super) fn id(&self, instance: usize) -> InstanceId {
        InstanceId::new(format!("{}-{instance}", self.prefix)).expect("model ids are valid")
    }

    pub(super) fn index_of(&self, id: &InstanceId) -> Result<usize, String> {
        id.as_str()
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|n| n.parse().ok())
            .filter(|&n: &usize| n < usize::from(INSTANCES))
            .ok_or_else(|| format!("an instance this case never made: {id}"))
    }

    pub(super) fn at(&self, after: Duration) -> Timestamp {
        Timestamp::from_millis(self.model.now).saturating_add(after)
    }

    pub(super) fn millis(duration: Duration) -> u64 {
        u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
    }

    async fn apply(&mut self, op: &Op) -> Check {
        match *op {
            Op::Create {
                instance,
                delay,
                fail_on_conflict,
            } => {
                self.create(usize::from(instance), delay, fail_on_conflict)
                    .await
            }
            Op::Send { instance, delay } => self.send(usize::from(instance), delay).await,
            Op::Fetch {
                max,
                lock,
                with_history,
            } => self.fetch(usize::from(max), lock, with_history).await,
            Op::Ack { lock, ref turn } => self.ack(lock, turn).await,
            Op::RenewLock { lock, extend } => self.renew_lock(lock, extend).await,
            Op::AbandonLock { lock } => self.abandon_lock(lock).await,
            Op::Suspend { lock } => self.suspend(lock).await,
            Op::Pause { instance } => self.pause(usize::from(instance)).await,
            Op::Resume { instance } => self.resume(usize::from(instance)).await,
            Op::FetchActivities { max, lease } => {
                self.fetch_activities(usize::from(max), lease).await
            }
            Op::Complete { lease, fail } => self.complete(lease, fail).await,
            Op::RenewLease { lease, extend } => self.renew_lease(lease, extend).await,
            Op::Retry { lease, delay } => self.retry(lease, delay).await,
            Op::AbandonLease { lease } => self.abandon_lease(lease).await,
            Op::Step { max, ref turn } => {
                let before = self.locks.len();
                self.fetch(usize::from(max), 9, true).await?;
                for h in before..self.locks.len() {
                    self.ack_handle(h, turn).await?;
                }
                Ok(())
            }
            Op::Work { max, action } => {
                let before = self.leases.len();
                self.fetch_activities(usize::from(max), 9).await?;
                for h in before..self.leases.len() {
                    match action {
                        WorkAction::Retry(after) if h == before => {
                            self.retry_handle(h, after).await?;
                        }
                        WorkAction::Fail if h == before => self.complete_handle(h, true).await?,
                        _ => self.complete_handle(h, false).await?,
                    }
                }
                Ok(())
            }
            Op::Advance { seconds } => {
                let by = Duration::from_secs(u64::from(seconds));
                self.store.advance(by).await;
                self.model.now += Self::millis(by);
                Ok(())
            }
        }
    }

    /// Checks a provider's next due time against the model's: exactly on a manual clock;
    /// on a real one, retries are due from the provider's own later "now", so a little
    /// after the model's.
    fn same_due(&self, got: Option<Timestamp>, expected: Option<u64>, what: &str) -> Check {
        let fits = match (got, expected) {
            (None, None) => true,
            (Some(got), Some(expected)) if self.manual_clock => got.as_millis() == expected,
            (Some(got), Some(expected)) => {
                (expected..expected + 600_000).contains(&got.as_millis())
            }
            _ => false,
        };
        ensure!(
            fits,
            "next {what} due {got:?}, expected {:?}",
            expected.map(Timestamp::from_millis)
        );
        Ok(())
    }

    /// Compares every instance, the queue depths and the next due times.
    async fn compare(&self) -> Check {
        for index in 0..usize::from(INSTANCES) {
            let id = self.id(index);
            let result = self.p.get_instance(&id).await;
            let Some(state) = self.model.instance(index) else {
                expect_kind(result, ErrorKind::NotFound, "an instance never created")?;
                continue;
            };
            let record = ok(result, "get_instance")?;
            ensure!(
                record.status == state.status()
                    && record.execution.get() == state.execution
                    && record.history_len == state.history_len,
                "instance {index} is {:?} at execution {} with {} events, expected {:?} at \
                 {} with {}",
                record.status,
                record.execution,
                record.history_len,
                state.status(),
                state.execution,
                state.history_len
            );
        }
        let depths = ok(self.p.queue_depths().await, "queue_depths")?;
        let model = &self.model;
        ensure!(
            depths.messages_ready == model.messages_ready()
                && depths.messages_delayed == model.messages_delayed(),
            "messages ready/delayed {}/{}, expected {}/{}",
            depths.messages_ready,
            depths.messages_delayed,
            model.messages_ready(),
            model.messages_delayed()
        );
        let ready: u64 = depths.activities_ready.values().sum();
        let total = ready + depths.activities_delayed + depths.activities_running;
        let (held, leased) = model.items_leased();
        ensure!(
            total == model.items.len() as u64
                && depths.activities_delayed == model.items_delayed()
                && (held..=leased).contains(&depths.activities_running),
            "activities ready/delayed/running {ready}/{}/{}, expected {} items, {} delayed, \
             {held} to {leased} running",
            depths.activities_delayed,
            depths.activities_running,
            model.items.len(),
            model.items_delayed()
        );
        ensure!(
            depths.dead_letters == model.dead_letters,
            "{} dead letters, expected {}",
            depths.dead_letters,
            model.dead_letters
        );
        let orchestrations = ok(self.p.next_due(WorkKind::Orchestrations).await, "next_due")?;
        self.same_due(
            orchestrations,
            model.next_message_due(),
            "orchestrator message",
        )?;
        let activities = ok(self.p.next_due(WorkKind::Activities).await, "next_due")?;
        self.same_due(activities, model.next_item_due(), "activity")?;
        Ok(())
    }
}

/// The handle `pick` chooses of `len`: three times in four one of the latest two (where
/// live handles are), otherwise any, stale ones included.
pub(super) fn choose(pick: u8, len: usize) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let pick = usize::from(pick);
    Some(if pick % 4 == 0 {
        pick / 4 % len
    } else {
        len - 1 - pick / 4 % len.min(2)
    })
}

pub(super) fn marker(n: u64) -> EventKind {
    EventKind::SideEffectRecorded {
        op: OpId::from_raw(n),
        value: SideEffect::Random(n),
    }
}
