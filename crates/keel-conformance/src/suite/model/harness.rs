//! Applies one case's operations to the provider and the model side by side, and
//! compares what can be observed after every step.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::time::Duration;

use keel_core::{
    Codec, Event, EventKind, ExecutionId, Failure, InstanceId, Message, OpId, SideEffect,
    Timestamp, WorkItem,
};
use keel_provider::{
    Ack, ActivityCompletion, ActivityRetry, Created, ErrorKind, FetchActivities,
    FetchOrchestrations, InstanceQuery, LeaseToken, LockToken, MessageId, NewInstance, OnConflict,
    OutgoingMessage, PageRequest, Provider, ProviderError, QueueDepths, TurnOutcome, WorkKind,
};

use super::state::{Base, ItemKey, MInstance, MItem, Model};
use super::{INSTANCES, Op, Turn, WorkAction, delay, span};
use crate::TestStore;
use crate::fixtures::payload;

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

/// A lock some fetch returned: which instance, which claim, and what it fetched.
struct LockHandle {
    instance: usize,
    generation: u64,
    token: LockToken,
    /// The fetched messages: the model's sequence numbers and the provider's ids.
    fetched: Vec<(u64, MessageId)>,
}

/// A lease some activity fetch returned.
struct LeaseHandle {
    key: ItemKey,
    generation: u64,
    token: LeaseToken,
}

struct Harness<'a> {
    store: &'a TestStore,
    p: &'a dyn Provider,
    manual_clock: bool,
    prefix: String,
    model: Model,
    locks: Vec<LockHandle>,
    leases: Vec<LeaseHandle>,
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
fn expect_kind<T: Debug>(result: Result<T, ProviderError>, kind: ErrorKind, what: &str) -> Check {
    match result {
        Ok(value) => Err(format!("{what}: expected {kind:?}, got Ok({value:?})")),
        Err(err) if err.kind() == kind => Ok(()),
        Err(err) => Err(format!(
            "{what}: expected {kind:?}, got {:?}: {err}",
            err.kind()
        )),
    }
}

fn ok<T>(result: Result<T, ProviderError>, what: &str) -> Result<T, String> {
    result.map_err(|e| format!("{what} failed: {e}"))
}

/// The label of a real message, as the model names it.
fn label(message: &Message) -> String {
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

fn signal(n: u64) -> Message {
    Message::Signal {
        name: "model".to_owned(),
        payload: payload(&serde_json::json!(n)),
    }
}

fn event(at: Timestamp, kind: EventKind) -> Event {
    Event { at, kind }
}

impl Harness<'_> {
    fn id(&self, instance: usize) -> InstanceId {
        InstanceId::new(format!("{}-{instance}", self.prefix)).expect("model ids are valid")
    }

    fn index_of(&self, id: &InstanceId) -> Result<usize, String> {
        id.as_str()
            .strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|n| n.parse().ok())
            .filter(|&n: &usize| n < usize::from(INSTANCES))
            .ok_or_else(|| format!("an instance this case never made: {id}"))
    }

    fn at(&self, after: Duration) -> Timestamp {
        Timestamp::from_millis(self.model.now).saturating_add(after)
    }

    fn millis(duration: Duration) -> u64 {
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

    async fn create(&mut self, instance: usize, after: Option<u8>, fail: bool) -> Check {
        let id = self.id(instance);
        let mut new = NewInstance::new(id, "model", payload(&serde_json::json!(instance)));
        let visible_in = after.map_or(Duration::ZERO, |d| delay(self.manual_clock, d));
        new.start_at = after.map(|_| self.at(visible_in));
        let on_conflict = if fail {
            OnConflict::Fail
        } else {
            OnConflict::ReturnExisting
        };
        let result = self.p.create_instance(new, on_conflict).await;
        if self.model.instance(instance).is_some() {
            if fail {
                return expect_kind(result, ErrorKind::AlreadyExists, "creating an existing id");
            }
            let created = ok(result, "create_instance")?;
            ensure!(
                matches!(created, Created::Existing(_)),
                "an existing id was created again"
            );
            return Ok(());
        }
        let created = ok(result, "create_instance")?;
        ensure!(created == Created::New, "a new id reported {created:?}");
        let visible_at = self.model.now + Self::millis(visible_in);
        let start = self.model.message("start:1".to_owned(), visible_at);
        self.model.instances[instance] = Some(MInstance::new(start));
        Ok(())
    }

    async fn send(&mut self, instance: usize, after: Option<u8>) -> Check {
        let id = self.id(instance);
        let Some(state) = self.model.instance(instance) else {
            let result = self.p.send_message(&id, signal(0), None).await;
            return expect_kind(
                result,
                ErrorKind::NotFound,
                "sending to an unknown instance",
            );
        };
        // What a send to an ended instance does is the provider's choice.
        if state.is_terminal() {
            return Ok(());
        }
        let visible_in = after.map_or(Duration::ZERO, |d| delay(self.manual_clock, d));
        let n = self.model.seq();
        let visible_at = after.map(|_| self.at(visible_in));
        ok(
            self.p.send_message(&id, signal(n), visible_at).await,
            "send_message",
        )?;
        let message = self.model.message(
            format!("sig:{n}"),
            self.model.now + Self::millis(visible_in),
        );
        if let Some(state) = self.model.instance_mut(instance) {
            state.messages.push(message);
        }
        Ok(())
    }

    async fn fetch(&mut self, max: usize, lock: u8, with_history: bool) -> Check {
        let lock_for = span(self.manual_clock, lock);
        let eligible: BTreeSet<usize> = self.model.fetchable_instances().into_iter().collect();
        let work = ok(
            self.p
                .fetch_orchestrations(FetchOrchestrations {
                    max_instances: max,
                    lock_for,
                    with_history,
                })
                .await,
            "fetch_orchestrations",
        )?;
        let mut fetched = BTreeSet::new();
        for w in &work {
            let index = self.index_of(w.lock.instance())?;
            ensure!(
                fetched.insert(index),
                "one fetch returned instance {index} twice"
            );
            ensure!(
                eligible.contains(&index),
                "fetched instance {index}, which is not fetchable (eligible: {eligible:?})"
            );
        }
        if eligible.len() <= max {
            ensure!(
                fetched == eligible,
                "fetched {fetched:?}, expected every fetchable instance {eligible:?}"
            );
        } else {
            ensure!(
                fetched.len() == max,
                "fetched {fetched:?} with max {max}, of {eligible:?}"
            );
        }
        let now = self.model.now;
        for w in work {
            let index = self.index_of(w.lock.instance())?;
            let state = self.model.instance_mut(index).expect("eligible");
            let expected: Vec<(u64, String)> = state
                .visible(now)
                .map(|m| (m.seq, m.label.clone()))
                .collect();
            let got: Vec<String> = w.messages.iter().map(|m| label(&m.message)).collect();
            let labels: Vec<&String> = expected.iter().map(|(_, l)| l).collect();
            ensure!(
                got.iter().collect::<Vec<_>>() == labels,
                "instance {index}'s messages are {got:?}, expected {labels:?}"
            );
            ensure!(
                w.execution.get() == state.execution && w.history_len == state.history_len,
                "instance {index} fetched at execution {} with {} events, expected {} and {}",
                w.execution,
                w.history_len,
                state.execution,
                state.history_len
            );
            ensure!(
                w.status == state.status(),
                "instance {index} fetched as {:?}, expected {:?}",
                w.status,
                state.status()
            );
            if with_history {
                let len = w.history.as_ref().map(Vec::len);
                ensure!(
                    len == usize::try_from(state.history_len).ok(),
                    "instance {index}'s fetched history has {len:?} events, expected {}",
                    state.history_len
                );
            }
            state.lock_generation += 1;
            state.lock = Some((state.lock_generation, now + Self::millis(lock_for)));
            self.locks.push(LockHandle {
                instance: index,
                generation: state.lock_generation,
                token: w.lock.clone(),
                fetched: expected
                    .iter()
                    .zip(&w.messages)
                    .map(|((seq, _), m)| (*seq, m.id))
                    .collect(),
            });
        }
        Ok(())
    }

    /// The lock handle `pick` names, and whether the model says it is held.
    fn lock_handle(&self, pick: u8) -> Option<(usize, bool)> {
        let h = choose(pick, self.locks.len())?;
        Some((h, self.lock_held(h)))
    }

    fn lock_held(&self, h: usize) -> bool {
        let handle = &self.locks[h];
        self.model
            .instance(handle.instance)
            .is_some_and(|s| s.holds(handle.generation, self.model.now))
    }

    async fn ack(&mut self, pick: u8, turn: &Turn) -> Check {
        match choose(pick, self.locks.len()) {
            Some(h) => self.ack_handle(h, turn).await,
            None => Ok(()),
        }
    }

    async fn ack_handle(&mut self, h: usize, turn: &Turn) -> Check {
        let held = self.lock_held(h);
        let handle = &self.locks[h];
        let index = handle.instance;
        let at = Timestamp::from_millis(self.model.now);
        let consume_all = match turn {
            Turn::Continue { consume_all, .. } => *consume_all,
            _ => true,
        };
        let mut consumed = handle.fetched.clone();
        if !consume_all && consumed.len() > 1 {
            consumed.pop();
        }
        let mut ack = Ack::new(
            handle.token.clone(),
            consumed.iter().map(|(_, id)| *id).collect(),
        );
        if !held {
            ack.events = vec![event(at, marker(0))];
            let results = ok(self.p.ack_turns(vec![ack]).await, "ack_turns")?;
            ensure!(results.len() == 1, "one result per ack");
            return expect_kind(
                results.into_iter().next().expect("one"),
                ErrorKind::Stale,
                "a stale ack",
            );
        }
        let state = self
            .model
            .instance(index)
            .expect("a held lock's instance exists");
        let execution = state.execution;
        let consumed_seqs: BTreeSet<u64> = consumed.iter().map(|(seq, _)| *seq).collect();
        let left = state
            .messages
            .iter()
            .filter(|m| !consumed_seqs.contains(&m.seq))
            .count();
        // Ending with work still queued, or a paused instance continuing as new, is
        // outside what the contract pins down: such turns continue instead.
        let turn = match turn {
            Turn::End { .. } if state.paused || left > 0 || self.model.has_items(index) => {
                &Turn::Continue {
                    markers: 1,
                    schedule: 0,
                    timer: None,
                    cancel: None,
                    consume_all: true,
                }
            }
            Turn::ContinueAsNew { .. } if state.paused => &Turn::Continue {
                markers: 1,
                schedule: 0,
                timer: None,
                cancel: None,
                consume_all: true,
            },
            other => other,
        };
        if state.history_len == 0 {
            ack.version = Some(1);
            ack.events.push(event(
                at,
                EventKind::ExecutionStarted {
                    name: "model".to_owned(),
                    version: 1,
                    input: payload(&serde_json::json!(index)),
                    parent: None,
                },
            ));
        }
        let mut next_op = state.next_op;
        let mut new_items = Vec::new();
        let mut new_messages = Vec::new();
        let mut cancelled = None;
        let mut ends = None;
        let mut continues = None;
        match *turn {
            Turn::Continue {
                markers,
                schedule,
                timer,
                cancel,
                ..
            } => {
                for m in 0..markers {
                    ack.events.push(event(at, marker(u64::from(m) + 1)));
                }
                for _ in 0..schedule {
                    let op = next_op;
                    next_op += 1;
                    let item = WorkItem {
                        instance: self.id(index),
                        execution: ExecutionId::from_raw(execution),
                        op: OpId::from_raw(op),
                        name: "model".to_owned(),
                        input: payload(&serde_json::json!(op)),
                        options: Default::default(),
                        attempt: 1,
                        scheduled_at: at,
                    };
                    ack.events.push(event(
                        at,
                        EventKind::ActivityScheduled {
                            op: item.op,
                            name: item.name.clone(),
                            input: item.input.clone(),
                            options: item.options.clone(),
                        },
                    ));
                    ack.activities.push(item);
                    new_items.push(op);
                }
                if let Some(after) = timer {
                    let op = next_op;
                    next_op += 1;
                    let due = delay(self.manual_clock, after);
                    ack.events.push(event(
                        at,
                        EventKind::TimerCreated {
                            op: OpId::from_raw(op),
                            fire_at: self.at(due),
                        },
                    ));
                    ack.messages.push(OutgoingMessage {
                        to: self.id(index),
                        message: Message::TimerFired {
                            execution: ExecutionId::from_raw(execution),
                            op: OpId::from_raw(op),
                        },
                        visible_at: Some(self.at(due)),
                    });
                    new_messages.push((format!("timer:{execution}:{op}"), Self::millis(due)));
                }
                if let Some(pick) = cancel {
                    // Only released (or never leased) items: what cancelling an item
                    // whose lease expired does is the provider's choice.
                    let queued: Vec<u64> = self
                        .model
                        .items
                        .iter()
                        .filter(|((i, e, _), item)| {
                            *i == index && *e == execution && item.lease.is_none()
                        })
                        .map(|((_, _, op), _)| *op)
                        .collect();
                    if !queued.is_empty() {
                        let op = queued[usize::from(pick) % queued.len()];
                        ack.cancel_activities.push(OpId::from_raw(op));
                        cancelled = Some(op);
                    }
                }
            }
            Turn::End { fail } => {
                let (kind, outcome, base) = if fail {
                    let failure = Failure::new("Model", "failed");
                    (
                        EventKind::ExecutionFailed {
                            failure: failure.clone(),
                        },
                        TurnOutcome::Failed(failure),
                        Base::Failed,
                    )
                } else {
                    let output = payload(&serde_json::json!("done"));
                    (
                        EventKind::ExecutionCompleted {
                            output: output.clone(),
                        },
                        TurnOutcome::Completed(output),
                        Base::Completed,
                    )
                };
                ack.events.push(event(at, kind));
                ack.outcome = outcome;
                ends = Some(base);
            }
            Turn::ContinueAsNew { carry } => {
                let input = payload(&serde_json::json!({"next": execution + 1}));
                ack.events.push(event(
                    at,
                    EventKind::ContinuedAsNew {
                        input: input.clone(),
                    },
                ));
                let carried = carry.then(|| self.model.seq());
                ack.outcome = TurnOutcome::ContinuedAsNew {
                    input,
                    version: Some(1),
                    carried: carried.map(signal).into_iter().collect(),
                };
                continues = Some(carried);
            }
        }
        let events = ack.events.len() as u64;
        let results = ok(self.p.ack_turns(vec![ack]).await, "ack_turns")?;
        ensure!(results.len() == 1, "one result per ack");
        ok(
            results.into_iter().next().expect("one"),
            "a held lock's ack",
        )?;

        // The model's side of the same turn.
        let now = self.model.now;
        let mut queued = Vec::new();
        for (label, after) in new_messages {
            queued.push(self.model.message(label, now + after));
        }
        if let Some(carried) = continues {
            queued.push(self.model.message(format!("start:{}", execution + 1), now));
            if let Some(n) = carried {
                queued.push(self.model.message(format!("sig:{n}"), now));
            }
        }
        for op in new_items {
            self.model
                .items
                .insert((index, execution, op), MItem::new(now));
        }
        if let Some(op) = cancelled {
            self.model.items.remove(&(index, execution, op));
        }
        let state = self.model.instance_mut(index).expect("exists");
        state.messages.retain(|m| !consumed_seqs.contains(&m.seq));
        state.messages.extend(queued);
        state.lock = None;
        state.next_op = next_op;
        state.history_len += events;
        if state.base == Base::Pending {
            state.base = Base::Running;
        }
        if let Some(base) = ends {
            state.base = base;
        }
        if continues.is_some() {
            state.execution += 1;
            state.history_len = 0;
            state.next_op = 1;
        }
        Ok(())
    }

    async fn renew_lock(&mut self, pick: u8, extend: u8) -> Check {
        let Some((h, held)) = self.lock_handle(pick) else {
            return Ok(());
        };
        let extend = span(self.manual_clock, extend);
        let result = self.p.renew_lock(&self.locks[h].token, extend).await;
        if !held {
            return expect_kind(result, ErrorKind::Stale, "renewing a stale lock");
        }
        ok(result, "renew_lock")?;
        let until = self.model.now + Self::millis(extend);
        let handle = &self.locks[h];
        let state = self.model.instance_mut(handle.instance).expect("exists");
        state.lock = Some((handle.generation, until));
        Ok(())
    }

    async fn abandon_lock(&mut self, pick: u8) -> Check {
        let Some((h, held)) = self.lock_handle(pick) else {
            return Ok(());
        };
        let result = self
            .p
            .abandon_lock(&self.locks[h].token, Duration::ZERO)
            .await;
        if !held {
            return expect_kind(result, ErrorKind::Stale, "abandoning a stale lock");
        }
        ok(result, "abandon_lock")?;
        let index = self.locks[h].instance;
        self.model.instance_mut(index).expect("exists").lock = None;
        Ok(())
    }

    async fn suspend(&mut self, pick: u8) -> Check {
        let Some((h, held)) = self.lock_handle(pick) else {
            return Ok(());
        };
        let index = self.locks[h].instance;
        // Suspending a paused instance is the provider's choice.
        if self.model.instance(index).is_some_and(|s| s.paused) {
            return Ok(());
        }
        let result = self.p.suspend(&self.locks[h].token, "model").await;
        if !held {
            return expect_kind(result, ErrorKind::Stale, "suspending with a stale lock");
        }
        ok(result, "suspend")?;
        let state = self.model.instance_mut(index).expect("exists");
        state.suspended = true;
        state.lock = None;
        Ok(())
    }

    async fn pause(&mut self, instance: usize) -> Check {
        let id = self.id(instance);
        let Some(state) = self.model.instance(instance) else {
            return expect_kind(self.p.pause(&id).await, ErrorKind::NotFound, "pausing");
        };
        if state.is_terminal() {
            return expect_kind(self.p.pause(&id).await, ErrorKind::InvalidInput, "pausing");
        }
        // Pausing twice, or pausing a suspended instance, is the provider's choice.
        if state.paused || state.suspended {
            return Ok(());
        }
        ok(self.p.pause(&id).await, "pause")?;
        self.model.instance_mut(instance).expect("exists").paused = true;
        Ok(())
    }

    async fn resume(&mut self, instance: usize) -> Check {
        let id = self.id(instance);
        let result = self.p.resume(&id).await;
        let Some(state) = self.model.instance_mut(instance) else {
            return expect_kind(result, ErrorKind::NotFound, "resuming");
        };
        if !state.paused && !state.suspended {
            return expect_kind(result, ErrorKind::InvalidInput, "resuming");
        }
        ok(result, "resume")?;
        state.paused = false;
        state.suspended = false;
        Ok(())
    }

    async fn fetch_activities(&mut self, max: usize, lease: u8) -> Check {
        let lease_for = span(self.manual_clock, lease);
        let eligible: BTreeSet<ItemKey> = self.model.leasable_items().into_iter().collect();
        let leased = ok(
            self.p
                .fetch_activities(FetchActivities {
                    queues: vec![Default::default()],
                    max_items: max,
                    lease_for,
                })
                .await,
            "fetch_activities",
        )?;
        let mut got = BTreeSet::new();
        for l in &leased {
            let key = (
                self.index_of(&l.item.instance)?,
                l.item.execution.get(),
                l.item.op.get(),
            );
            ensure!(got.insert(key), "one fetch leased {key:?} twice");
            let Some(item) = self
                .model
                .items
                .get(&key)
                .filter(|_| eligible.contains(&key))
            else {
                return Err(format!(
                    "leased {key:?}, which is not leasable (leasable: {eligible:?})"
                ));
            };
            ensure!(
                l.item.attempt == item.attempt && l.deliveries == item.deliveries + 1,
                "{key:?} leased as attempt {} delivery {}, expected attempt {} delivery {}",
                l.item.attempt,
                l.deliveries,
                item.attempt,
                item.deliveries + 1
            );
        }
        if eligible.len() <= max {
            ensure!(
                got == eligible,
                "leased {got:?}, expected every leasable item {eligible:?}"
            );
        } else {
            ensure!(
                got.len() == max,
                "leased {got:?} with max {max}, of {eligible:?}"
            );
        }
        let until = self.model.now + Self::millis(lease_for);
        for l in leased {
            let key = (
                self.index_of(&l.item.instance)?,
                l.item.execution.get(),
                l.item.op.get(),
            );
            let item = self.model.items.get_mut(&key).expect("checked above");
            item.lease_generation += 1;
            item.lease = Some((item.lease_generation, until));
            item.deliveries += 1;
            self.leases.push(LeaseHandle {
                key,
                generation: item.lease_generation,
                token: l.lease,
            });
        }
        Ok(())
    }

    /// The lease handle `pick` names, and whether the model says it is held.
    fn lease_handle(&self, pick: u8) -> Option<(usize, bool)> {
        let h = choose(pick, self.leases.len())?;
        Some((h, self.lease_held(h)))
    }

    fn lease_held(&self, h: usize) -> bool {
        let handle = &self.leases[h];
        self.model
            .items
            .get(&handle.key)
            .is_some_and(|i| i.holds(handle.generation, self.model.now))
    }

    async fn complete(&mut self, pick: u8, fail: bool) -> Check {
        match choose(pick, self.leases.len()) {
            Some(h) => self.complete_handle(h, fail).await,
            None => Ok(()),
        }
    }

    async fn complete_handle(&mut self, h: usize, fail: bool) -> Check {
        let held = self.lease_held(h);
        let key = self.leases[h].key;
        let outcome = if fail {
            Err(Failure::new("Model", "failed for good"))
        } else {
            Ok(payload(&serde_json::json!(key.2)))
        };
        let results = ok(
            self.p
                .complete_activities(vec![ActivityCompletion {
                    lease: self.leases[h].token.clone(),
                    outcome,
                }])
                .await,
            "complete_activities",
        )?;
        ensure!(results.len() == 1, "one result per completion");
        let result = results.into_iter().next().expect("one");
        if !held {
            return expect_kind(result, ErrorKind::Stale, "a stale completion");
        }
        ok(result, "a held lease's completion")?;
        self.model.items.remove(&key);
        let (index, execution, op) = key;
        let verdict = if fail { "err" } else { "ok" };
        let now = self.model.now;
        let message = self
            .model
            .message(format!("done:{execution}:{op}:{verdict}"), now);
        if let Some(state) = self.model.instance_mut(index) {
            state.messages.push(message);
        }
        if fail {
            self.model.dead_letters += 1;
        }
        Ok(())
    }

    async fn renew_lease(&mut self, pick: u8, extend: u8) -> Check {
        let Some((h, held)) = self.lease_handle(pick) else {
            return Ok(());
        };
        let extend = span(self.manual_clock, extend);
        let result = self.p.renew_lease(&self.leases[h].token, extend).await;
        if !held {
            return expect_kind(result, ErrorKind::Stale, "renewing a stale lease");
        }
        ok(result, "renew_lease")?;
        let until = self.model.now + Self::millis(extend);
        let handle = &self.leases[h];
        let item = self.model.items.get_mut(&handle.key).expect("held");
        item.lease = Some((handle.generation, until));
        Ok(())
    }

    async fn retry(&mut self, pick: u8, after: u8) -> Check {
        match choose(pick, self.leases.len()) {
            Some(h) => self.retry_handle(h, after).await,
            None => Ok(()),
        }
    }

    async fn retry_handle(&mut self, h: usize, after: u8) -> Check {
        let held = self.lease_held(h);
        let key = self.leases[h].key;
        let next_attempt = self.model.items.get(&key).map_or(2, |i| i.attempt + 1);
        let after = delay(self.manual_clock, after);
        let result = self
            .p
            .retry_activity(ActivityRetry {
                lease: self.leases[h].token.clone(),
                next_attempt,
                delay: after,
                failure: Failure::new("Model", "try again"),
            })
            .await;
        if !held {
            return expect_kind(result, ErrorKind::Stale, "a stale retry");
        }
        ok(result, "retry_activity")?;
        let now = self.model.now;
        let item = self.model.items.get_mut(&key).expect("held");
        item.lease = None;
        item.attempt = next_attempt;
        item.visible_at = now + Self::millis(after);
        Ok(())
    }

    async fn abandon_lease(&mut self, pick: u8) -> Check {
        let Some((h, held)) = self.lease_handle(pick) else {
            return Ok(());
        };
        let result = self.p.abandon_lease(&self.leases[h].token).await;
        if !held {
            return expect_kind(result, ErrorKind::Stale, "abandoning a stale lease");
        }
        ok(result, "abandon_lease")?;
        let now = self.model.now;
        let item = self.model.items.get_mut(&self.leases[h].key).expect("held");
        item.lease = None;
        item.visible_at = item.visible_at.min(now);
        Ok(())
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
fn choose(pick: u8, len: usize) -> Option<usize> {
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

fn marker(n: u64) -> EventKind {
    EventKind::SideEffectRecorded {
        op: OpId::from_raw(n),
        value: SideEffect::Random(n),
    }
}
