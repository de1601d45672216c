//! The services the tests use: PostgreSQL and Redis on their usual local ports.
//!
//! A test that needs one gets it from `cargo xtask test` instead of skipping, so
//! here we start whatever is down and fail loudly when that is impossible.

use std::{
    fmt, fs,
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::command::display;

/// Where Debian's PostgreSQL packages keep one directory per installed version.
const POSTGRES_CONFIG: &str = "/etc/postgresql";

/// How long a service may take to open its port after being started.
const STARTUP: Duration = Duration::from_secs(20);

/// How long one connection attempt may take: the services are local, so a
/// listening port answers at once.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// A service the tests need.
#[derive(Debug, Clone, Copy)]
enum Service {
    /// PostgreSQL at 127.0.0.1:5432.
    Postgres,
    /// Redis at 127.0.0.1:6379.
    Redis,
}

/// How a service came to be up.
#[derive(Debug, Clone, Copy)]
enum State {
    /// It was listening already.
    Running,
    /// We started it.
    Started,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "up (already running)",
            Self::Started => "up (started by xtask)",
        })
    }
}

/// Makes sure every service is listening, starting those that are not, and
/// prints each one's state.
pub(crate) fn ensure() -> Result<()> {
    for service in [Service::Postgres, Service::Redis] {
        let state = service.ensure()?;
        println!("{:<10} {:<15} {state}", service.name(), service.addr());
    }
    Ok(())
}

impl Service {
    /// The name used in messages.
    fn name(self) -> &'static str {
        match self {
            Self::Postgres => "PostgreSQL",
            Self::Redis => "Redis",
        }
    }

    /// The address the tests connect to.
    fn addr(self) -> SocketAddr {
        let port = match self {
            Self::Postgres => 5432,
            Self::Redis => 6379,
        };
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Whether something accepts connections on the service's address.
    fn is_listening(self) -> bool {
        TcpStream::connect_timeout(&self.addr(), CONNECT_TIMEOUT).is_ok()
    }

    /// Starts the service unless it is listening, then waits for its port.
    fn ensure(self) -> Result<State> {
        if self.is_listening() {
            return Ok(State::Running);
        }
        let mut cmd = self.start_command()?;
        let shown = display(&cmd);
        eprintln!("{} is down; starting it: {shown}", self.name());
        let status = cmd
            .status()
            .with_context(|| format!("could not start {} with `{shown}`", self.name()))?;
        if !status.success() {
            bail!("could not start {} with `{shown}` ({status})", self.name());
        }
        let deadline = Instant::now() + STARTUP;
        while Instant::now() < deadline {
            if self.is_listening() {
                return Ok(State::Started);
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "{} is not listening on {} {} s after `{shown}`",
            self.name(),
            self.addr(),
            STARTUP.as_secs()
        )
    }

    /// The command that starts the service, or an error saying it is not installed.
    fn start_command(self) -> Result<Command> {
        match self {
            Self::Postgres => {
                let version = postgres_version().with_context(|| {
                    format!(
                        "PostgreSQL is needed on {} but is not installed: \
                         `pg_ctlcluster --skip-systemctl-redirect <version> main start` \
                         needs a version directory in {POSTGRES_CONFIG}",
                        self.addr()
                    )
                })?;
                let mut cmd = Command::new("pg_ctlcluster");
                // Containers have no systemd to redirect to.
                cmd.args(["--skip-systemctl-redirect", &version, "main", "start"]);
                Ok(cmd)
            }
            Self::Redis => {
                let mut cmd = Command::new("redis-server");
                // `-::1` binds IPv6 loopback only where it exists. Nothing is
                // persisted: the tests' data is thrown away.
                cmd.args(["--daemonize", "yes", "--bind", "127.0.0.1", "-::1"])
                    .args(["--port", "6379", "--save", "", "--appendonly", "no"])
                    .args([
                        "--dir",
                        "/var/lib/redis",
                        "--logfile",
                        "/var/log/redis/ci.log",
                    ]);
                if !on_path("redis-server") {
                    bail!(
                        "Redis is needed on {} but is not installed: \
                         `redis-server` is not on PATH (would have run `{}`)",
                        self.addr(),
                        display(&cmd)
                    );
                }
                Ok(cmd)
            }
        }
    }
}

/// The single PostgreSQL version installed, read from `/etc/postgresql/<version>`.
fn postgres_version() -> Result<String> {
    let mut versions = Vec::new();
    for entry in fs::read_dir(POSTGRES_CONFIG)
        .with_context(|| format!("could not read {POSTGRES_CONFIG}"))?
    {
        let entry = entry.with_context(|| format!("could not read {POSTGRES_CONFIG}"))?;
        if entry.path().is_dir() {
            versions.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    match <[String; 1]>::try_from(versions) {
        Ok([version]) => Ok(version),
        Err(versions) => bail!("expected one version in {POSTGRES_CONFIG}, found {versions:?}"),
    }
}

/// Whether `program` is an executable file in one of `$PATH`'s directories.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}
