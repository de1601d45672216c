//! Activity code as the worker runs it, and the context each attempt gets.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use keel_core::{Codec, ExecutionId, Failure, InstanceId, IntoFailure, OpId, Payload, Timestamp};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The future of one activity attempt: its encoded output or failure.
pub type ActivityFuture = Pin<Box<dyn Future<Output = Result<Payload, Failure>> + Send>>;

/// Activity code: given a context and the encoded input, the future of one attempt.
/// Implemented by closures over payloads, and by [`activity_fn`] for typed code.
pub trait Activity: Send + Sync + 'static {
    /// Starts one attempt.
    fn run(&self, ctx: ActivityContext, input: Payload) -> ActivityFuture;
}

impl<F, Fut> Activity for F
where
    F: Fn(ActivityContext, Payload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Payload, Failure>> + Send + 'static,
{
    fn run(&self, ctx: ActivityContext, input: Payload) -> ActivityFuture {
        Box::pin(self(ctx, input))
    }
}

/// What one attempt of an activity knows about itself, and its line back to the worker:
/// a heartbeat that renews its lease, and a token that fires when the workflow cancels
/// it (or its attempt times out, or the worker shuts down past its deadline).
///
/// A cancellation by a turn of this process fires the token at once; one made by
/// another worker process is learnt at the next lease renewal (every third of the
/// lease) or at [`heartbeat`](Self::heartbeat).
#[derive(Debug, Clone)]
pub struct ActivityContext {
    attempt: Arc<Attempt>,
    cancel: CancellationToken,
    heartbeat: Arc<Notify>,
    codec: Codec,
}

/// Who an attempt is.
#[derive(Debug)]
pub(crate) struct Attempt {
    pub(crate) instance: InstanceId,
    pub(crate) execution: ExecutionId,
    pub(crate) op: OpId,
    pub(crate) name: String,
    pub(crate) number: u32,
    pub(crate) deliveries: u32,
    pub(crate) scheduled_at: Timestamp,
}

impl ActivityContext {
    pub(crate) fn new(
        attempt: Arc<Attempt>,
        cancel: CancellationToken,
        heartbeat: Arc<Notify>,
        codec: Codec,
    ) -> Self {
        Self {
            attempt,
            cancel,
            heartbeat,
            codec,
        }
    }

    /// The instance whose orchestration scheduled this activity.
    pub fn instance_id(&self) -> &InstanceId {
        &self.attempt.instance
    }

    /// The execution that scheduled it.
    pub fn execution_id(&self) -> ExecutionId {
        self.attempt.execution
    }

    /// The operation its result completes: with the instance and execution, a key that
    /// stays the same over every attempt (an idempotency key for outside systems).
    pub fn op_id(&self) -> OpId {
        self.attempt.op
    }

    /// The activity's registered name.
    pub fn name(&self) -> &str {
        &self.attempt.name
    }

    /// This attempt's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt.number
    }

    /// How many times this attempt has been handed to a worker, this time included:
    /// above 1 when a worker died (or lost its lease) running it. Retries after a
    /// failure count in [`attempt`](Self::attempt) instead.
    pub fn deliveries(&self) -> u32 {
        self.attempt.deliveries
    }

    /// When the orchestration scheduled the activity.
    pub fn scheduled_at(&self) -> Timestamp {
        self.attempt.scheduled_at
    }

    /// Fires when the attempt should stop: the workflow cancelled the activity, its
    /// per-attempt timeout passed, or the worker is shutting down past its deadline.
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether the attempt should stop (see [`cancellation_token`](Self::cancellation_token)).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Resolves when the attempt should stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// Renews the attempt's lease now, rather than at the next periodic renewal, which
    /// also learns sooner whether the workflow cancelled it. Never blocks.
    pub fn heartbeat(&self) {
        self.heartbeat.notify_one();
    }

    /// The codec the worker encodes payloads with.
    pub fn codec(&self) -> Codec {
        self.codec
    }
}

/// Adapts a typed `async fn(ActivityContext, In) -> Result<Out, E>` to an [`Activity`]:
/// the input is decoded and the output encoded with the worker's codec. An input that
/// does not decode fails the attempt, not retryably, with [`Failure::DECODE`] naming the
/// type and the field; `E` becomes a [`Failure`] through [`IntoFailure`].
pub fn activity_fn<In, Out, E, F, Fut>(f: F) -> TypedActivity<F, In, Out, E>
where
    F: Fn(ActivityContext, In) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, E>> + Send + 'static,
    In: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
    E: IntoFailure + Send + 'static,
{
    TypedActivity {
        f,
        _types: PhantomData,
    }
}

/// A typed activity function; see [`activity_fn`].
pub struct TypedActivity<F, In, Out, E> {
    f: F,
    _types: PhantomData<fn(In) -> (Out, E)>,
}

impl<F, In, Out, E> std::fmt::Debug for TypedActivity<F, In, Out, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedActivity")
            .field("input", &std::any::type_name::<In>())
            .finish_non_exhaustive()
    }
}

impl<F, In, Out, E, Fut> Activity for TypedActivity<F, In, Out, E>
where
    F: Fn(ActivityContext, In) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, E>> + Send + 'static,
    In: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
    E: IntoFailure + Send + 'static,
{
    fn run(&self, ctx: ActivityContext, input: Payload) -> ActivityFuture {
        let codec = ctx.codec;
        let input = match codec.decode::<In>(&input) {
            Ok(input) => input,
            Err(error) => {
                let failure = Failure::from(error)
                    .with_cause(format!("the input of activity {:?}", ctx.name()));
                return Box::pin(std::future::ready(Err(failure)));
            }
        };
        let run = (self.f)(ctx, input);
        Box::pin(async move {
            let output = run.await.map_err(IntoFailure::into_failure)?;
            codec.encode(&output).map_err(Failure::from)
        })
    }
}
