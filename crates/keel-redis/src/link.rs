//! The way to one Redis server: its client, its URL as shown in messages, and the
//! time limits every attempt to reach it runs under.

use std::future::Future;

use redis::AsyncConnectionConfig;
use redis::aio::{MultiplexedConnection, PubSub};

use crate::error::{Error, Result};
use crate::options::RedisOptions;

/// A Redis server and how patiently to talk to it.
#[derive(Debug)]
pub(crate) struct Link {
    client: redis::Client,
    /// The URL, password redacted.
    pub(crate) url: String,
    pub(crate) options: RedisOptions,
}

impl Link {
    pub(crate) fn new(client: redis::Client, url: String, options: RedisOptions) -> Self {
        Self {
            client,
            url,
            options,
        }
    }

    /// Runs one attempt under the connect timeout, naming the URL in its error.
    pub(crate) async fn within<T>(
        &self,
        attempt: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T> {
        let waited = self.options.connect_timeout;
        match tokio::time::timeout(waited, attempt).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(Error::Unreachable {
                url: self.url.clone(),
                source,
            }),
            Err(_elapsed) => Err(Error::Timeout {
                url: self.url.clone(),
                waited,
            }),
        }
    }

    /// A connection for commands (publishing), whose every command times out.
    pub(crate) async fn connection(&self) -> Result<MultiplexedConnection> {
        let timeout = Some(self.options.connect_timeout);
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout);
        self.within(
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
    }

    /// A connection subscribed to `channels`.
    pub(crate) async fn subscription(&self, channels: &[String]) -> Result<PubSub> {
        let mut pubsub = self.within(self.client.get_async_pubsub()).await?;
        self.within(pubsub.subscribe(channels)).await?;
        Ok(pubsub)
    }
}
