//! The background task that publishes wake-ups. Callers never wait for Redis: they
//! mark topics pending and go on; this task publishes whatever is pending in one
//! round trip, so a burst of enqueues costs one publication per topic.

use std::sync::Arc;

use redis::aio::MultiplexedConnection;

use crate::error::Result;
use crate::hub::{Hub, Topics};
use crate::link::Link;
use crate::options::Backoff;

/// Publishes pending topics until aborted. A failed publication is retried after a
/// back-off on a new connection, for as long as it takes; topics raised meanwhile
/// join it, so a Redis outage leaves one pending publication, not a growing queue.
pub(crate) async fn run(hub: Arc<Hub>, link: Arc<Link>, connection: MultiplexedConnection) {
    let mut connection = Some(connection);
    let mut backoff = Backoff::new(link.options.max_reconnect_delay);
    let mut failing = false;
    loop {
        hub.publish.notified().await;
        loop {
            let topics = hub.take_pending();
            if topics.is_empty() {
                break;
            }
            match publish(&hub, &link, &mut connection, topics).await {
                Ok(()) => {
                    if failing {
                        tracing::info!(url = %link.url, "publishing wake-ups to Redis again");
                    }
                    failing = false;
                    backoff.reset();
                }
                Err(error) => {
                    // Retried below, so only the first failure of a run is worth a warning.
                    if failing {
                        tracing::debug!(%error, "publishing a wake-up failed again");
                    } else {
                        tracing::warn!(
                            %error,
                            "publishing a wake-up failed; retrying (work is still found by polling)"
                        );
                    }
                    failing = true;
                    connection = None;
                    hub.restore_pending(topics);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// Publishes `topics`, each on its channel with this notifier's origin as payload,
/// in one pipeline; connects first if the last connection failed.
async fn publish(
    hub: &Hub,
    link: &Link,
    connection: &mut Option<MultiplexedConnection>,
    topics: Topics,
) -> Result<()> {
    let connection = match connection {
        Some(connection) => connection,
        None => connection.insert(link.connection().await?),
    };
    let mut pipe = redis::pipe();
    for topic in topics.iter() {
        pipe.cmd("PUBLISH")
            .arg(hub.channel(topic))
            .arg(&hub.origin)
            .ignore();
    }
    link.within(pipe.query_async::<()>(connection)).await
}
