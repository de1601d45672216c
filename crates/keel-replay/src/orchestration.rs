//! Orchestration code as the engine runs it.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;

use keel_core::{Failure, Payload};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::context::OrchestrationContext;

/// The future of one execution of an orchestration: its encoded output or failure.
pub type OrchestrationFuture = Pin<Box<dyn Future<Output = Result<Payload, Failure>> + Send>>;

/// Orchestration code: given a context and the encoded input, the future of one
/// execution. Implemented by closures over payloads, and by [`from_fn`] for typed code.
pub trait Orchestration: Send + Sync + 'static {
    /// Starts one execution.
    fn run(&self, ctx: OrchestrationContext, input: Payload) -> OrchestrationFuture;
}

impl<F, Fut> Orchestration for F
where
    F: Fn(OrchestrationContext, Payload) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Payload, Failure>> + Send + 'static,
{
    fn run(&self, ctx: OrchestrationContext, input: Payload) -> OrchestrationFuture {
        Box::pin(self(ctx, input))
    }
}

/// Adapts a typed `async fn(OrchestrationContext, In) -> Result<Out, E>` to an
/// [`Orchestration`]: the input is decoded and the output encoded with the execution's
/// codec; an input that does not decode fails the execution with [`Failure::DECODE`].
pub fn from_fn<In, Out, E, F, Fut>(f: F) -> TypedOrchestration<F, In, Out, E>
where
    F: Fn(OrchestrationContext, In) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, E>> + Send + 'static,
    In: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
    E: Into<Failure> + Send + 'static,
{
    TypedOrchestration {
        f,
        _types: PhantomData,
    }
}

/// A typed orchestration function; see [`from_fn`].
pub struct TypedOrchestration<F, In, Out, E> {
    f: F,
    _types: PhantomData<fn(In) -> (Out, E)>,
}

impl<F, In, Out, E> std::fmt::Debug for TypedOrchestration<F, In, Out, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TypedOrchestration")
            .field("input", &std::any::type_name::<In>())
            .finish_non_exhaustive()
    }
}

impl<F, In, Out, E, Fut> Orchestration for TypedOrchestration<F, In, Out, E>
where
    F: Fn(OrchestrationContext, In) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Out, E>> + Send + 'static,
    In: DeserializeOwned + Send + 'static,
    Out: Serialize + Send + 'static,
    E: Into<Failure> + Send + 'static,
{
    fn run(&self, ctx: OrchestrationContext, input: Payload) -> OrchestrationFuture {
        let codec = ctx.codec();
        let input = match codec.decode::<In>(&input) {
            Ok(input) => input,
            Err(error) => return Box::pin(std::future::ready(Err(Failure::from(error)))),
        };
        let run = (self.f)(ctx, input);
        Box::pin(async move {
            let output = run.await.map_err(Into::into)?;
            codec.encode(&output).map_err(Failure::from)
        })
    }
}
