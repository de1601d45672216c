//! Deterministic ways to wait on several durable futures at once.
//!
//! Each polls its futures in argument order, so replay picks the same winner as the
//! original run, and drops the losers as soon as there is a winner, which cancels their
//! activities, timers and children in the same turn.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pub use futures_util::future::{Either, join_all};

/// Waits for the first of `futures` to finish; resolves to its index and output.
///
/// The others are dropped at once (cancelling what they scheduled). With no futures it
/// never resolves, which the engine reports as awaiting nothing durable.
pub fn select<F: Future>(futures: impl IntoIterator<Item = F>) -> Select<F> {
    Select {
        futures: futures.into_iter().map(Box::pin).collect(),
    }
}

/// The future of [`select`].
#[must_use = "futures do nothing unless awaited"]
pub struct Select<F> {
    futures: Vec<Pin<Box<F>>>,
}

impl<F> std::fmt::Debug for Select<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Select")
            .field("futures", &self.futures.len())
            .finish()
    }
}

impl<F: Future> Future for Select<F> {
    type Output = (usize, F::Output);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let winner = self
            .futures
            .iter_mut()
            .enumerate()
            .find_map(|(index, future)| match future.as_mut().poll(cx) {
                Poll::Ready(output) => Some((index, output)),
                Poll::Pending => None,
            });
        if winner.is_some() {
            self.futures.clear();
        }
        winner.map_or(Poll::Pending, Poll::Ready)
    }
}

/// Waits for the first of two futures of different types to finish.
pub fn select2<A: Future, B: Future>(a: A, b: B) -> Select2<A, B> {
    Select2 {
        a: Some(Box::pin(a)),
        b: Some(Box::pin(b)),
    }
}

/// The future of [`select2`].
#[must_use = "futures do nothing unless awaited"]
pub struct Select2<A, B> {
    a: Option<Pin<Box<A>>>,
    b: Option<Pin<Box<B>>>,
}

impl<A, B> std::fmt::Debug for Select2<A, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Select2").finish_non_exhaustive()
    }
}

impl<A: Future, B: Future> Future for Select2<A, B> {
    type Output = Either<A::Output, B::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let winner = if let Some(Poll::Ready(output)) = this.a.as_mut().map(|a| a.as_mut().poll(cx))
        {
            Either::Left(output)
        } else if let Some(Poll::Ready(output)) = this.b.as_mut().map(|b| b.as_mut().poll(cx)) {
            Either::Right(output)
        } else {
            return Poll::Pending;
        };
        this.a = None;
        this.b = None;
        Poll::Ready(winner)
    }
}
