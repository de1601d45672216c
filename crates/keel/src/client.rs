//! Starting, signalling, controlling and watching workflow instances.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::hash::{BuildHasher, RandomState};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keel_core::{
    Codec, Event, Failure, InstanceId, InstanceStatus, Message, Payload, QueueName, Timestamp,
};
use keel_provider::{
    Created, InstanceQuery, InstanceRecord, NewInstance, OnConflict, Page, PageRequest, Provider,
};
use keel_worker::{Notifier, Registry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::time::Instant;

use crate::error::{Error, Result};

/// The first and the longest pause of a wait's fallback poll. A worker in this process
/// wakes waiters as soon as an instance finishes, a provider with a notifier when one
/// finishes elsewhere; the poll covers the rest.
const FIRST_POLL: Duration = Duration::from_millis(10);
const LONGEST_POLL: Duration = Duration::from_secs(1);

/// Talks to the store on behalf of an application: start workflows, signal, cancel,
/// pause and resume them, read their status and history, wait for their results.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    provider: Arc<dyn Provider>,
    /// Set when this process registered code: starts of unknown names fail at once.
    registry: Option<Arc<Registry>>,
    notifier: Arc<Notifier>,
    codec: Codec,
}

impl Client {
    pub(crate) fn new(
        provider: Arc<dyn Provider>,
        registry: Option<Arc<Registry>>,
        notifier: Arc<Notifier>,
        codec: Codec,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                provider,
                registry,
                notifier,
                codec,
            }),
        }
    }

    /// The store this client talks to.
    pub fn provider(&self) -> &Arc<dyn Provider> {
        &self.inner.provider
    }

    /// Starts orchestration `name` with `input`. Set options on the returned request,
    /// then await it for the instance id.
    ///
    /// With an explicit [`id`](Start::id), starting is idempotent: a second start with
    /// the same id returns the existing instance (or fails, with
    /// [`fail_if_exists`](Start::fail_if_exists)).
    pub fn start<I: Serialize + ?Sized>(&self, name: &str, input: &I) -> Start {
        Start {
            client: self.clone(),
            name: name.to_owned(),
            input: self.inner.codec.encode(input).map_err(Error::from),
            id: None,
            version: None,
            start_at: None,
            queue: None,
            priority: 0,
            tags: BTreeMap::new(),
            on_conflict: OnConflict::ReturnExisting,
        }
    }

    /// Sends signal `name` with `payload` to the instance; the workflow receives it with
    /// `ctx.signal(name)`, now or in a later wait.
    pub async fn signal<T: Serialize + ?Sized>(
        &self,
        instance: &InstanceId,
        name: &str,
        payload: &T,
    ) -> Result<()> {
        let payload = self.inner.codec.encode(payload)?;
        let message = Message::Signal {
            name: name.to_owned(),
            payload,
        };
        self.send(instance, message).await
    }

    /// Asks the instance to cancel: its workflow sees the request at its next turn,
    /// and cancels its children and running activities (whose tokens fire).
    pub async fn cancel(&self, instance: &InstanceId, reason: &str) -> Result<()> {
        let reason = reason.to_owned();
        self.send(instance, Message::Cancel { reason }).await
    }

    async fn send(&self, instance: &InstanceId, message: Message) -> Result<()> {
        self.inner
            .provider
            .send_message(instance, message, None)
            .await
            .map_err(Error::about(instance))
    }

    /// Pauses the instance: messages are kept but not processed until [`resume`](Self::resume).
    pub async fn pause(&self, instance: &InstanceId) -> Result<()> {
        let paused = self.inner.provider.pause(instance).await;
        paused.map_err(Error::about(instance))
    }

    /// Resumes a paused instance, or a suspended one once its code is fixed.
    pub async fn resume(&self, instance: &InstanceId) -> Result<()> {
        let resumed = self.inner.provider.resume(instance).await;
        resumed.map_err(Error::about(instance))
    }

    /// The instance's status, custom status, output or failure.
    pub async fn status(&self, instance: &InstanceId) -> Result<InstanceInfo> {
        let record = self.inner.provider.get_instance(instance).await;
        let record = record.map_err(Error::about(instance))?;
        Ok(InstanceInfo {
            record,
            codec: self.inner.codec,
        })
    }

    /// Waits up to `timeout` for the instance to finish and decodes its output as `O`.
    /// A failed or cancelled workflow is [`Error::Failed`] or [`Error::Cancelled`] with
    /// its failure; a wait that runs out is [`Error::Timeout`] (the workflow goes on).
    pub async fn wait<O: DeserializeOwned>(
        &self,
        instance: &InstanceId,
        timeout: Duration,
    ) -> Result<O> {
        let deadline = Instant::now() + timeout;
        let mut poll = FIRST_POLL;
        let watch = self.inner.notifier.watch(instance);
        loop {
            // Registered before the status is read, so an end in between is not missed.
            let mut finished = pin!(watch.next_end());
            finished.as_mut().enable();
            let info = self.status(instance).await?;
            match info.record.status {
                InstanceStatus::Completed => return info.output(),
                InstanceStatus::Failed | InstanceStatus::Cancelled => {
                    return Err(info.into_failure_error());
                }
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    instance: instance.clone(),
                    waited: timeout,
                    status: info.record.status,
                    reason: info.record.status_reason,
                });
            }
            let pause = poll.min(deadline - now);
            let provider = &self.inner.provider;
            tokio::select! {
                () = finished => {}
                () = ended_elsewhere(provider.as_ref(), pause) => {}
                () = tokio::time::sleep(pause) => poll = (poll * 2).min(LONGEST_POLL),
            }
        }
    }

    /// The history of the instance's current execution.
    pub async fn history(&self, instance: &InstanceId) -> Result<Vec<Event>> {
        let history = self.inner.provider.read_history(instance, None).await;
        history.map_err(Error::about(instance))
    }

    /// Instances matching `query`, oldest first, a page at a time.
    pub async fn list(
        &self,
        query: InstanceQuery,
        page: PageRequest,
    ) -> Result<Page<InstanceInfo>> {
        let page = self.inner.provider.list_instances(query, page).await?;
        let codec = self.inner.codec;
        Ok(Page {
            items: page
                .items
                .into_iter()
                .map(|record| InstanceInfo { record, codec })
                .collect(),
            next: page.next,
        })
    }
}

/// Resolves when the provider hears that an instance ended in another process; never,
/// if it cannot hear of that (the caller's poll covers it).
async fn ended_elsewhere(provider: &dyn Provider, timeout: Duration) {
    if let Ok(true) = provider.wait_for_ended(timeout).await {
        return;
    }
    std::future::pending::<()>().await;
}

/// A start request; set options, then `.await` it for the instance id.
#[must_use = "a workflow starts only when the request is awaited"]
#[derive(Debug)]
pub struct Start {
    client: Client,
    name: String,
    input: Result<Payload>,
    id: Option<String>,
    version: Option<u32>,
    start_at: Option<SystemTime>,
    queue: Option<String>,
    priority: i32,
    tags: BTreeMap<String, String>,
    on_conflict: OnConflict,
}

impl Start {
    /// The instance id; a second start with the same id returns this instance instead
    /// of starting another. A fresh unique id when not set.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// With an explicit id that exists already: fail with [`Error::AlreadyExists`]
    /// instead of returning the existing instance.
    pub fn fail_if_exists(mut self) -> Self {
        self.on_conflict = OnConflict::Fail;
        self
    }

    /// Runs this registered version (default: the newest).
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// Starts after `delay` rather than at once.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.start_at = Some(SystemTime::now() + delay);
        self
    }

    /// Starts at `time` rather than at once.
    pub fn start_at(mut self, time: SystemTime) -> Self {
        self.start_at = Some(time);
        self
    }

    /// Runs its turns on the workers of `queue`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    /// Runs it before lower-priority instances.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Adds a label, for listing.
    pub fn tag(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.tags.insert(key.into(), value.into());
        self
    }

    async fn run(self) -> Result<InstanceId> {
        let inner = &self.client.inner;
        if let Some(registry) = &inner.registry {
            registry.orchestration(&self.name, self.version)?;
        }
        let id = match self.id {
            Some(id) => InstanceId::new(id)?,
            None => InstanceId::new(format!("{}-{}", self.name, fresh_uuid()))?,
        };
        let mut new = NewInstance::new(id.clone(), self.name, self.input?);
        new.version = self.version;
        new.start_at = self.start_at.map(Timestamp::from_system_time);
        if let Some(queue) = self.queue {
            new.queue = QueueName::new(queue)?;
        }
        new.priority = self.priority;
        new.tags = self.tags;
        let created = inner.provider.create_instance(new, self.on_conflict).await;
        match created.map_err(Error::about(&id))? {
            Created::New | Created::Existing(_) => Ok(id),
        }
    }
}

impl IntoFuture for Start {
    type Output = Result<InstanceId>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<InstanceId>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

/// A random (version 4) UUID. Instance ids need uniqueness, not secrecy: the standard
/// library's randomly keyed hasher is enough, and saves a dependency.
fn fresh_uuid() -> uuid::Uuid {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let high = RandomState::new().hash_one(nanos);
    let low = RandomState::new().hash_one((nanos, high));
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&high.to_le_bytes());
    bytes[8..].copy_from_slice(&low.to_le_bytes());
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

/// An instance as the store reports it, with its payloads decodable.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    record: InstanceRecord,
    codec: Codec,
}

impl InstanceInfo {
    /// Its id.
    pub fn id(&self) -> &InstanceId {
        &self.record.id
    }

    /// Where it is in its life.
    pub fn status(&self) -> InstanceStatus {
        self.record.status
    }

    /// Why it is suspended, when it is (e.g. the nondeterminism it hit).
    pub fn reason(&self) -> Option<&str> {
        self.record.status_reason.as_deref()
    }

    /// What the workflow last set with `ctx.set_custom_status`, decoded as `T`.
    pub fn custom_status<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        let status = self.record.custom_status.as_ref();
        Ok(status.map(|s| self.codec.decode(s)).transpose()?)
    }

    /// The output, decoded as `T`, once it completed; its failure otherwise.
    pub fn output<T: DeserializeOwned>(&self) -> Result<T> {
        match &self.record.output {
            Some(output) if self.record.status == InstanceStatus::Completed => {
                Ok(self.codec.decode(output)?)
            }
            _ => Err(self.clone().into_failure_error()),
        }
    }

    /// Its failure, once it failed or was cancelled.
    pub fn failure(&self) -> Option<&Failure> {
        self.record.failure.as_ref()
    }

    /// Everything the store holds about it.
    pub fn record(&self) -> &InstanceRecord {
        &self.record
    }

    fn into_failure_error(self) -> Error {
        let instance = self.record.id;
        match (self.record.status, self.record.failure) {
            (InstanceStatus::Cancelled, failure) => Error::Cancelled {
                instance,
                failure: Box::new(
                    failure.unwrap_or_else(|| Failure::new(Failure::CANCELLED, "cancelled")),
                ),
            },
            (InstanceStatus::Failed, Some(failure)) => Error::Failed {
                instance,
                failure: Box::new(failure),
            },
            (status, _) => Error::NotFinished { instance, status },
        }
    }
}
