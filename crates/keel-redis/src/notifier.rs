//! The notifier: a provider that delegates every call to the one it wraps and adds
//! wake-ups across processes through Redis pub/sub.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use keel_core::{Event, ExecutionId, InstanceId, Message, Timestamp};
use keel_provider::{
    Ack, AckedTurns, ActivityCompletion, ActivityLimits, ActivityRetry, Capabilities,
    CompletedActivities, Created, DeadLetter, DeadLetterId, FetchActivities, FetchOrchestrations,
    InstanceQuery, InstanceRecord, LeaseToken, LeasedWorkItem, LockToken, NewInstance, OnConflict,
    OrchestrationWork, Page, PageRequest, Provider, PurgeFilter, QueueDepths,
    Result as ProviderResult, TurnOutcome, WorkKind,
};
use tokio::task::JoinHandle;

use crate::error::{Error, Result, redact};
use crate::hub::{Hub, Topic, Topics};
use crate::link::Link;
use crate::options::RedisOptions;
use crate::{publisher, subscriber};

/// A [`Provider`] that wraps another and wakes waiting dispatchers and clients in
/// every process sharing its store, through Redis pub/sub.
///
/// Every method is the wrapped provider's. After a call that succeeded and made work
/// visible (or will at a delay: waiters then learn the new due time), the notifier
/// announces it: at once to waiters in this process, and through Redis to every other
/// notifier of the same namespace. [`wait_for_work`](Provider::wait_for_work) returns
/// on the wrapped provider's own wake-ups or on such an announcement;
/// [`wait_for_ended`](Provider::wait_for_ended) returns `true` on news that an
/// instance ended. A wake-up that arrives after a fetch began (for `wait_for_ended`:
/// after a status read began) but before the wait starts still ends the wait at once,
/// so none falls in the gap between looking and waiting.
///
/// Redis is an accelerator, never needed for correctness: publishing happens in a
/// background task, so callers neither wait for Redis nor see its errors, and when
/// Redis is away waits fall back to the wrapped provider's wake-ups and polling while
/// a background subscriber reconnects. Both tasks stop when the notifier is dropped
/// or [closed](Self::close).
pub struct RedisNotifier {
    inner: Arc<dyn Provider>,
    hub: Arc<Hub>,
    link: Arc<Link>,
    tasks: [JoinHandle<()>; 2],
}

impl fmt::Debug for RedisNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisNotifier")
            .field("inner", &self.inner)
            .field("url", &self.link.url)
            .field("namespace", &self.link.options.namespace)
            .field("subscribed", &self.is_subscribed())
            .finish_non_exhaustive()
    }
}

impl RedisNotifier {
    /// Wraps `inner`, publishing and hearing wake-ups through the Redis at `url`
    /// (`redis://[[user]:password@]host[:port][/db]`).
    ///
    /// Connects, `PING`s and subscribes before it returns, so a wrong URL or an
    /// unreachable server fails here, naming the URL; once this returns, wake-ups flow.
    /// Redis going away later is no error: see the type's documentation. Must be called
    /// within a Tokio runtime, which runs the two background tasks.
    pub async fn connect(
        inner: Arc<dyn Provider>,
        url: &str,
        options: RedisOptions,
    ) -> Result<Self> {
        let shown = redact(url);
        let client = redis::Client::open(url).map_err(|source| Error::InvalidUrl {
            url: shown.clone(),
            source,
        })?;
        let link = Arc::new(Link::new(client, shown, options));
        let mut connection = link.connection().await?;
        link.within(redis::cmd("PING").query_async::<redis::Value>(&mut connection))
            .await?;
        let hub = Arc::new(Hub::new(&link.options.namespace, origin()));
        let pubsub = link.subscription(hub.channels()).await?;
        hub.subscribed.store(true, Ordering::SeqCst);
        let tasks = [
            tokio::spawn(publisher::run(
                Arc::clone(&hub),
                Arc::clone(&link),
                connection,
            )),
            tokio::spawn(subscriber::run(Arc::clone(&hub), Arc::clone(&link), pubsub)),
        ];
        tracing::debug!(url = %link.url, namespace = %link.options.namespace, "Redis notifier connected");
        Ok(Self {
            inner,
            hub,
            link,
            tasks,
        })
    }

    /// The wrapped provider.
    pub fn inner(&self) -> &Arc<dyn Provider> {
        &self.inner
    }

    /// The channel namespace.
    pub fn namespace(&self) -> &str {
        &self.link.options.namespace
    }

    /// Whether the subscription is live right now, so wake-ups from other processes
    /// arrive (for health checks; false while Redis is away and after [`close`](Self::close)).
    pub fn is_subscribed(&self) -> bool {
        self.hub.subscribed.load(Ordering::SeqCst)
    }

    /// Stops the background tasks and closes the Redis connections; the notifier goes
    /// on delegating, with wake-ups only from the wrapped provider and within this
    /// process. Wake-ups not yet published are dropped (a lost wake-up delays work,
    /// never loses it). Dropping the notifier closes it too.
    pub fn close(&self) {
        for task in &self.tasks {
            task.abort();
        }
        self.hub.subscribed.store(false, Ordering::SeqCst);
    }

    fn announce(&self, topics: Topics) {
        self.hub.announce(topics);
    }

    fn announce_if<T>(&self, result: &ProviderResult<T>, topic: Topic) {
        if result.is_ok() {
            self.announce(Topics::default().with(topic));
        }
    }
}

impl Drop for RedisNotifier {
    fn drop(&mut self) {
        self.close();
    }
}

/// A tag unique to one notifier: its process, the time it started, and a counter.
fn origin() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}-{started:x}-{n}", std::process::id())
}

/// What one ack makes visible when it commits.
fn ack_topics(ack: &Ack) -> Topics {
    let mut topics = Topics::default();
    // Messages include timers (whose due time waiters must learn), reports to a parent
    // and cancels to children; children start with a message of their own.
    if !ack.messages.is_empty() || !ack.children.is_empty() {
        topics = topics.with(Topic::Orchestrations);
    }
    if !ack.activities.is_empty() {
        topics = topics.with(Topic::Activities);
    }
    match ack.outcome {
        TurnOutcome::Running => {}
        TurnOutcome::ContinuedAsNew { .. } => {
            // The next execution's start message is new orchestrator work.
            topics = topics.with(Topic::Orchestrations).with(Topic::Ended);
        }
        TurnOutcome::Completed(_) | TurnOutcome::Failed(_) | TurnOutcome::Cancelled(_) => {
            topics = topics.with(Topic::Ended);
        }
    }
    topics
}

/// The topics of the acks that committed.
fn committed_topics(topics: &[Topics], results: &[ProviderResult<()>]) -> Topics {
    topics
        .iter()
        .zip(results)
        .filter(|(_, result)| result.is_ok())
        .fold(Topics::default(), |all, (topics, _)| all.union(*topics))
}

#[async_trait]
impl Provider for RedisNotifier {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn now(&self) -> ProviderResult<Timestamp> {
        self.inner.now().await
    }

    async fn create_instance(
        &self,
        instance: NewInstance,
        on_conflict: OnConflict,
    ) -> ProviderResult<Created> {
        let created = self.inner.create_instance(instance, on_conflict).await;
        // A delayed start is announced too: waiters then learn its due time.
        if let Ok(Created::New) = created {
            self.announce(Topics::default().with(Topic::Orchestrations));
        }
        created
    }

    async fn send_message(
        &self,
        instance: &InstanceId,
        message: Message,
        visible_at: Option<Timestamp>,
    ) -> ProviderResult<()> {
        let sent = self.inner.send_message(instance, message, visible_at).await;
        self.announce_if(&sent, Topic::Orchestrations);
        sent
    }

    async fn fetch_orchestrations(
        &self,
        request: FetchOrchestrations,
    ) -> ProviderResult<Vec<OrchestrationWork>> {
        self.hub.signal(Topic::Orchestrations).look();
        self.inner.fetch_orchestrations(request).await
    }

    async fn renew_lock(&self, lock: &LockToken, extend: Duration) -> ProviderResult<()> {
        self.inner.renew_lock(lock, extend).await
    }

    async fn abandon_lock(&self, lock: &LockToken, delay: Duration) -> ProviderResult<()> {
        let abandoned = self.inner.abandon_lock(lock, delay).await;
        self.announce_if(&abandoned, Topic::Orchestrations);
        abandoned
    }

    async fn ack_turns(&self, acks: Vec<Ack>) -> ProviderResult<Vec<ProviderResult<()>>> {
        let topics: Vec<Topics> = acks.iter().map(ack_topics).collect();
        let results = self.inner.ack_turns(acks).await;
        if let Ok(results) = &results {
            self.announce(committed_topics(&topics, results));
        }
        results
    }

    async fn ack_turns_leasing(
        &self,
        acks: Vec<Ack>,
        lease: FetchActivities,
    ) -> ProviderResult<AckedTurns> {
        let topics: Vec<Topics> = acks.iter().map(ack_topics).collect();
        let scheduled: Vec<usize> = acks.iter().map(|ack| ack.activities.len()).collect();
        let acked = self.inner.ack_turns_leasing(acks, lease).await;
        if let Ok(acked) = &acked {
            let mut committed = committed_topics(&topics, &acked.results);
            let enqueued: usize = scheduled
                .iter()
                .zip(&acked.results)
                .filter(|(_, result)| result.is_ok())
                .map(|(count, _)| count)
                .sum();
            if enqueued == acked.leased.len() {
                // Every item went to the caller: no other worker has anything to claim.
                committed = committed.without(Topic::Activities);
            }
            self.announce(committed);
        }
        acked
    }

    async fn suspend(&self, lock: &LockToken, reason: &str) -> ProviderResult<()> {
        let suspended = self.inner.suspend(lock, reason).await;
        self.announce_if(&suspended, Topic::Ended);
        suspended
    }

    async fn fetch_activities(
        &self,
        request: FetchActivities,
    ) -> ProviderResult<Vec<LeasedWorkItem>> {
        self.hub.signal(Topic::Activities).look();
        self.inner.fetch_activities(request).await
    }

    async fn renew_lease(&self, lease: &LeaseToken, extend: Duration) -> ProviderResult<()> {
        self.inner.renew_lease(lease, extend).await
    }

    async fn complete_activities(
        &self,
        completions: Vec<ActivityCompletion>,
    ) -> ProviderResult<Vec<ProviderResult<()>>> {
        let results = self.inner.complete_activities(completions).await;
        if let Ok(results) = &results
            && results.iter().any(Result::is_ok)
        {
            self.announce(Topics::default().with(Topic::Orchestrations));
        }
        results
    }

    async fn complete_activities_locking(
        &self,
        completions: Vec<ActivityCompletion>,
        lock: FetchOrchestrations,
    ) -> ProviderResult<CompletedActivities> {
        let completed = self
            .inner
            .complete_activities_locking(completions, lock)
            .await;
        if let Ok(completed) = &completed {
            // Each completion tells one instance at most: when as many were locked for
            // the caller as completions committed, no other worker has a turn to run.
            let committed = completed.results.iter().filter(|r| r.is_ok()).count();
            if committed > completed.locked.len() {
                self.announce(Topics::default().with(Topic::Orchestrations));
            }
        }
        completed
    }

    async fn retry_activity(&self, retry: ActivityRetry) -> ProviderResult<()> {
        // Announced although delayed: waiters learn the retry's due time.
        let retried = self.inner.retry_activity(retry).await;
        self.announce_if(&retried, Topic::Activities);
        retried
    }

    async fn abandon_lease(&self, lease: &LeaseToken) -> ProviderResult<()> {
        let abandoned = self.inner.abandon_lease(lease).await;
        self.announce_if(&abandoned, Topic::Activities);
        abandoned
    }

    async fn set_activity_limits(&self, name: &str, limits: ActivityLimits) -> ProviderResult<()> {
        // Raised limits can make queued items claimable.
        let set = self.inner.set_activity_limits(name, limits).await;
        self.announce_if(&set, Topic::Activities);
        set
    }

    async fn list_dead_letters(&self, page: PageRequest) -> ProviderResult<Page<DeadLetter>> {
        self.inner.list_dead_letters(page).await
    }

    async fn get_dead_letter(&self, id: DeadLetterId) -> ProviderResult<DeadLetter> {
        self.inner.get_dead_letter(id).await
    }

    async fn replay_dead_letter(&self, id: DeadLetterId) -> ProviderResult<()> {
        let replayed = self.inner.replay_dead_letter(id).await;
        self.announce_if(&replayed, Topic::Activities);
        replayed
    }

    async fn discard_dead_letter(&self, id: DeadLetterId) -> ProviderResult<()> {
        self.inner.discard_dead_letter(id).await
    }

    async fn pause(&self, instance: &InstanceId) -> ProviderResult<()> {
        self.inner.pause(instance).await
    }

    async fn resume(&self, instance: &InstanceId) -> ProviderResult<()> {
        let resumed = self.inner.resume(instance).await;
        self.announce_if(&resumed, Topic::Orchestrations);
        resumed
    }

    async fn get_instance(&self, instance: &InstanceId) -> ProviderResult<InstanceRecord> {
        // A client reads the status before it waits for an end: news from now on is
        // news it has not seen.
        self.hub.signal(Topic::Ended).look();
        self.inner.get_instance(instance).await
    }

    async fn read_history(
        &self,
        instance: &InstanceId,
        execution: Option<ExecutionId>,
    ) -> ProviderResult<Vec<Event>> {
        self.inner.read_history(instance, execution).await
    }

    async fn list_instances(
        &self,
        query: InstanceQuery,
        page: PageRequest,
    ) -> ProviderResult<Page<InstanceRecord>> {
        self.inner.list_instances(query, page).await
    }

    async fn queue_depths(&self) -> ProviderResult<QueueDepths> {
        self.inner.queue_depths().await
    }

    async fn purge(&self, filter: PurgeFilter) -> ProviderResult<u64> {
        self.inner.purge(filter).await
    }

    async fn delete_instance(&self, instance: &InstanceId) -> ProviderResult<u64> {
        // A client waiting for a deleted instance learns at its next read that it is gone.
        let deleted = self.inner.delete_instance(instance).await;
        self.announce_if(&deleted, Topic::Ended);
        deleted
    }

    async fn wait_for_work(&self, kind: WorkKind, timeout: Duration) -> ProviderResult<()> {
        // The wrapped provider's wait ends at `timeout` at the latest, and on its own
        // wake-ups and due times; ours adds the announcements of other processes.
        tokio::select! {
            biased;
            () = self.hub.signal(kind.into()).raised() => Ok(()),
            waited = self.inner.wait_for_work(kind, timeout) => waited,
        }
    }

    async fn next_due(&self, kind: WorkKind) -> ProviderResult<Option<Timestamp>> {
        self.inner.next_due(kind).await
    }

    async fn wait_for_ended(&self, timeout: Duration) -> ProviderResult<bool> {
        // The wrapped provider may hear of ends itself; most return `false` at once,
        // which must not cut our own wait short.
        let inner = async {
            match self.inner.wait_for_ended(timeout).await {
                Ok(true) => Ok(()),
                Ok(false) => std::future::pending().await,
                Err(error) => Err(error),
            }
        };
        tokio::select! {
            biased;
            () = self.hub.signal(Topic::Ended).raised() => Ok(true),
            heard = inner => heard.map(|()| true),
            () = tokio::time::sleep(timeout) => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use keel_core::{Codec, ExecutionId, InstanceId, Message, OpId, Payload};
    use keel_provider::{Ack, LockToken, OutgoingMessage, TurnOutcome};

    use super::{Topic, ack_topics};

    fn payload() -> Payload {
        Codec::default()
            .encode(&1)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn ack() -> Ack {
        let id = InstanceId::new("i").unwrap_or_else(|e| panic!("{e}"));
        Ack::new(LockToken::new(id, 1), Vec::new())
    }

    #[test]
    fn an_ack_announces_what_it_makes_visible() {
        assert!(ack_topics(&ack()).is_empty(), "a turn that changes nothing");

        let mut completed = ack();
        completed.outcome = TurnOutcome::Completed(payload());
        assert_eq!(
            ack_topics(&completed).iter().collect::<Vec<_>>(),
            [Topic::Ended]
        );

        let mut continued = ack();
        continued.outcome = TurnOutcome::ContinuedAsNew {
            input: payload(),
            version: None,
            carried: Vec::new(),
        };
        assert_eq!(
            ack_topics(&continued).iter().collect::<Vec<_>>(),
            [Topic::Orchestrations, Topic::Ended]
        );

        let mut timer = ack();
        timer.messages.push(OutgoingMessage {
            to: timer.lock.instance().clone(),
            message: Message::TimerFired {
                execution: ExecutionId::FIRST,
                op: OpId::from_raw(1),
            },
            visible_at: None,
        });
        assert_eq!(
            ack_topics(&timer).iter().collect::<Vec<_>>(),
            [Topic::Orchestrations]
        );
    }
}
