//! A private `redis-server` per test, on a free port, so a test can stop and restart it
//! without disturbing anyone else's Redis.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tempfile::TempDir;

/// A `redis-server` child process, killed on drop.
#[derive(Debug)]
pub(crate) struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub(crate) fn start() -> anyhow::Result<Self> {
        let mut last = None;
        // Another process may take the port between our probe and the server's bind.
        for _ in 0..5 {
            let mut server = Self {
                port: free_port()?,
                dir: tempfile::tempdir()?,
                child: None,
            };
            match server.restart() {
                Ok(()) => return Ok(server),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server at once (SIGKILL: a crash, not a shutdown).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (stopping it first if it runs).
    pub(crate) fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed?)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.answers() {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server on port {} exited: {status}", self.port);
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not answer PING", self.port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs one command over a raw connection and returns the reply's text.
    pub(crate) fn command(&self, line: &str) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        stream.write_all(format!("{line}\r\n").as_bytes())?;
        let mut reply = Vec::new();
        let mut buf = [0u8; 4096];
        // Enough for the short replies the tests read: wait for the first chunk, then
        // take whatever else arrives promptly.
        let n = stream.read(&mut buf)?;
        reply.extend_from_slice(&buf[..n]);
        stream.set_read_timeout(Some(Duration::from_millis(50)))?;
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&reply).into_owned())
    }

    /// How many clients are connected, not counting the one asking.
    pub(crate) fn clients(&self) -> anyhow::Result<usize> {
        let list = self.command("CLIENT LIST")?;
        let count = list.lines().filter(|l| l.contains("addr=")).count();
        Ok(count.saturating_sub(1))
    }

    fn answers(&self) -> bool {
        self.command("PING")
            .is_ok_and(|reply| reply.starts_with("+PONG"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
