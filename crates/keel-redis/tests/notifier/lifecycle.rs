//! Connecting fails at once, naming the URL, when Redis cannot be used; closing or
//! dropping the notifier ends its connections.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_provider::{ErrorKind, Provider, ProviderError};
use keel_redis::{Error, RedisNotifier, RedisOptions};
use keel_sqlite::SqliteProvider;

use crate::RedisServer;

async fn memory() -> anyhow::Result<Arc<dyn Provider>> {
    Ok(Arc::new(SqliteProvider::in_memory().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_is_not_redis_fails_at_once_naming_it() -> anyhow::Result<()> {
    let url = "http://127.0.0.1:6379";
    let error = RedisNotifier::connect(memory().await?, url, RedisOptions::new())
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("connected to {url}"))?;
    anyhow::ensure!(matches!(error, Error::InvalidUrl { .. }), "{error:?}");
    anyhow::ensure!(!error.is_retryable(), "an invalid URL stays invalid");
    anyhow::ensure!(error.to_string().contains(url), "{error}");
    let provider_error = ProviderError::from(error);
    anyhow::ensure!(
        provider_error.kind() == ErrorKind::InvalidInput,
        "{provider_error:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_at_once_naming_it_without_its_password() -> anyhow::Result<()>
{
    // A port where a server ran a moment ago and none runs now.
    let mut server = RedisServer::start()?;
    server.stop();
    let url = format!("redis://:hunter2@127.0.0.1:{}/0", server.port());
    let started = Instant::now();
    let error = RedisNotifier::connect(memory().await?, &url, RedisOptions::new())
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("connected to a stopped server"))?;
    anyhow::ensure!(started.elapsed() < Duration::from_secs(5), "failed slowly");
    anyhow::ensure!(matches!(error, Error::Unreachable { .. }), "{error:?}");
    anyhow::ensure!(error.is_retryable(), "the server may come up");
    let message = error.to_string();
    let shown = format!("redis://:***@127.0.0.1:{}/0", server.port());
    anyhow::ensure!(message.contains(&shown), "{message}");
    anyhow::ensure!(
        !message.contains("hunter2"),
        "the password leaked: {message}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_or_closing_the_notifier_ends_its_connections() -> anyhow::Result<()> {
    let server = RedisServer::start()?;
    anyhow::ensure!(server.clients()? == 0, "a fresh server");
    let notifier =
        RedisNotifier::connect(memory().await?, &server.url(), RedisOptions::new()).await?;
    anyhow::ensure!(notifier.is_subscribed(), "subscribed once connected");
    anyhow::ensure!(server.clients()? == 2, "a publisher and a subscriber");
    drop(notifier);
    until_clients(&server, 0).await?;

    let notifier =
        RedisNotifier::connect(memory().await?, &server.url(), RedisOptions::new()).await?;
    until_clients(&server, 2).await?;
    notifier.close();
    anyhow::ensure!(!notifier.is_subscribed(), "closed");
    until_clients(&server, 0).await?;
    // A closed notifier still delegates.
    notifier.queue_depths().await?;
    Ok(())
}

async fn until_clients(server: &RedisServer, expected: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let clients = server.clients()?;
        if clients == expected {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(5),
            "{clients} clients connected, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
