//! The background task that listens for other processes' wake-ups and passes them to
//! this process's waiters. It keeps its subscription for as long as the notifier
//! lives: when Redis goes away it reconnects with back-off, forever.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt as _;
use redis::aio::PubSub;
use tokio::time::MissedTickBehavior;

use crate::error::Error;
use crate::hub::Hub;
use crate::link::Link;
use crate::options::Backoff;

/// Listens on `pubsub`, then on each new subscription after a loss, until aborted.
pub(crate) async fn run(hub: Arc<Hub>, link: Arc<Link>, pubsub: PubSub) {
    let mut backoff = Backoff::new(link.options.max_reconnect_delay);
    let mut pubsub = Some(pubsub);
    loop {
        if let Some(live) = pubsub.take() {
            hub.subscribed.store(true, Ordering::SeqCst);
            let lost = listen(&hub, &link, live).await;
            hub.subscribed.store(false, Ordering::SeqCst);
            tracing::warn!(
                reason = %lost,
                "lost the Redis subscription; reconnecting (until then, work is found by polling)"
            );
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
        match link.subscription(hub.channels()).await {
            Ok(live) => {
                tracing::info!(url = %link.url, "subscribed to Redis wake-ups again");
                // Wake-ups published while we were away are lost: let every waiter
                // look once rather than sleep until its poll.
                hub.raise_all();
                pubsub = Some(live);
            }
            Err(error) => tracing::debug!(%error, "reconnecting to Redis failed"),
        }
    }
}

/// Why a subscription ended.
#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("the connection closed")]
    Closed,
    #[error("no answer to PING: {0}")]
    Ping(#[source] Error),
}

/// Raises the signal of each wake-up another notifier published, until the connection
/// closes or stops answering `PING`.
async fn listen(hub: &Hub, link: &Link, pubsub: PubSub) -> Lost {
    let (mut sink, mut messages) = pubsub.split();
    let mut ping = tokio::time::interval(link.options.ping_interval);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick is immediate; the connection was just proven.
    ping.tick().await;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    return Lost::Closed;
                };
                let Some(topic) = hub.topic_of(message.get_channel_name()) else {
                    continue;
                };
                // Our own publications were raised here when they were made.
                if message.get_payload_bytes() != hub.origin.as_bytes() {
                    hub.signal(topic).raise();
                }
            }
            _ = ping.tick() => {
                if let Err(error) = link.within(sink.ping::<redis::Value>()).await {
                    return Lost::Ping(error);
                }
            }
        }
    }
}
