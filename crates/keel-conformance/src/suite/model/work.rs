//! The activity side of a case: leasing, completing, failing, renewing, retrying and
//! abandoning work items.

use std::collections::BTreeSet;

use keel_core::Failure;
use keel_provider::{ActivityCompletion, ActivityRetry, ErrorKind, FetchActivities};

use super::harness::{Check, Harness, LeaseHandle, choose, expect_kind, ok};
use super::state::ItemKey;
use super::{delay, span};
use crate::fixtures::payload;

impl Harness<'_> {
    pub(super) async fn fetch_activities(&mut self, max: usize, lease: u8) -> Check {
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
    pub(super) fn lease_handle(&self, pick: u8) -> Option<(usize, bool)> {
        let h = choose(pick, self.leases.len())?;
        Some((h, self.lease_held(h)))
    }

    pub(super) fn lease_held(&self, h: usize) -> bool {
        let handle = &self.leases[h];
        self.model
            .items
            .get(&handle.key)
            .is_some_and(|i| i.holds(handle.generation, self.model.now))
    }

    pub(super) async fn complete(&mut self, pick: u8, fail: bool) -> Check {
        match choose(pick, self.leases.len()) {
            Some(h) => self.complete_handle(h, fail).await,
            None => Ok(()),
        }
    }

    pub(super) async fn complete_handle(&mut self, h: usize, fail: bool) -> Check {
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

    pub(super) async fn renew_lease(&mut self, pick: u8, extend: u8) -> Check {
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

    pub(super) async fn retry(&mut self, pick: u8, after: u8) -> Check {
        match choose(pick, self.leases.len()) {
            Some(h) => self.retry_handle(h, after).await,
            None => Ok(()),
        }
    }

    pub(super) async fn retry_handle(&mut self, h: usize, after: u8) -> Check {
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

    pub(super) async fn abandon_lease(&mut self, pick: u8) -> Check {
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
}
