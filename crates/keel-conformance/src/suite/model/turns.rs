//! The orchestration side of a case: creating, sending, fetching, acking, lock
//! handling, suspending, pausing and resuming.

use std::collections::BTreeSet;
use std::time::Duration;

use keel_core::{EventKind, ExecutionId, Failure, Message, OpId, Timestamp, WorkItem};
use keel_provider::{
    Ack, Created, ErrorKind, FetchOrchestrations, NewInstance, OnConflict, OutgoingMessage,
    TurnOutcome,
};

use super::harness::{
    Check, Harness, LockHandle, choose, event, expect_kind, label, marker, ok, signal,
};
use super::state::{Base, MInstance, MItem};
use super::{Turn, delay, span};
use crate::fixtures::payload;

impl Harness<'_> {
    pub(super) async fn create(&mut self, instance: usize, after: Option<u8>, fail: bool) -> Check {
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

    pub(super) async fn send(&mut self, instance: usize, after: Option<u8>) -> Check {
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

    pub(super) async fn fetch(&mut self, max: usize, lock: u8, with_history: bool) -> Check {
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
    pub(super) fn lock_handle(&self, pick: u8) -> Option<(usize, bool)> {
        let h = choose(pick, self.locks.len())?;
        Some((h, self.lock_held(h)))
    }

    pub(super) fn lock_held(&self, h: usize) -> bool {
        let handle = &self.locks[h];
        self.model
            .instance(handle.instance)
            .is_some_and(|s| s.holds(handle.generation, self.model.now))
    }

    pub(super) async fn ack(&mut self, pick: u8, turn: &Turn) -> Check {
        match choose(pick, self.locks.len()) {
            Some(h) => self.ack_handle(h, turn).await,
            None => Ok(()),
        }
    }

    pub(super) async fn ack_handle(&mut self, h: usize, turn: &Turn) -> Check {
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

    pub(super) async fn renew_lock(&mut self, pick: u8, extend: u8) -> Check {
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

    pub(super) async fn abandon_lock(&mut self, pick: u8) -> Check {
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

    pub(super) async fn suspend(&mut self, pick: u8) -> Check {
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

    pub(super) async fn pause(&mut self, instance: usize) -> Check {
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

    pub(super) async fn resume(&mut self, instance: usize) -> Check {
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
}
