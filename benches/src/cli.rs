//! The command line, parsed by hand like xtask's: a handful of flags.

use anyhow::{Context as _, Result, bail};

use crate::backend::Backend;
use crate::workloads::Workload;

/// What `--help` prints.
pub(crate) const USAGE: &str = "\
usage: keel-bench [--quick] [--backend LIST] [--workload LIST] [--runs N]
       (normally through `cargo xtask bench`, which builds it in release mode)

  --quick           small sizes, one run: finishes in under two minutes (CI's smoke test)
  --backend LIST    comma-separated: sqlite-full,sqlite-normal,postgres,postgres-redis
                    (default: every backend whose services answer)
  --workload LIST   comma-separated: linear-1,linear-3,linear-9,fanout-5,latency,
                    fanout-100,fanout-1000,fanout-10000,long-history,sleepers,signals,
                    or the groups linear, throughput, fanout (default: all; --quick
                    leaves out fanout-10000)
  --runs N          runs of each workload, reported as medians (default 3; 1 with --quick)

Writes target/keel-bench/<timestamp>.json, latest.json and latest.svg; a full run of
every workload also rewrites docs/benchmarks.md. PostgreSQL is found at
$KEEL_BENCH_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres) and
Redis at $KEEL_BENCH_REDIS_URL (default redis://127.0.0.1:6379); each run gets a fresh
schema.
";

/// The parsed command line.
#[derive(Debug, Clone)]
pub(crate) struct Args {
    /// Small sizes.
    pub(crate) quick: bool,
    /// The backends, in order.
    pub(crate) backends: Vec<Backend>,
    /// Whether the backends were the default choice.
    pub(crate) default_backends: bool,
    /// The workloads, in order.
    pub(crate) workloads: Vec<Workload>,
    /// Whether the workloads were the default choice.
    pub(crate) default_workloads: bool,
    /// Runs of each workload.
    pub(crate) runs: usize,
    /// The arguments as given, for the report.
    raw: Vec<String>,
}

impl Args {
    /// Parses the arguments after the program name; `None` for `--help`.
    pub(crate) fn parse(raw: Vec<String>) -> Result<Option<Self>> {
        let mut quick = false;
        let mut backends = None;
        let mut workloads = None;
        let mut runs = None;
        let mut words = raw.iter();
        while let Some(word) = words.next() {
            let (flag, inline) = match word.split_once('=') {
                Some((flag, value)) => (flag, Some(value.to_owned())),
                None => (word.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| words.next().cloned())
                    .with_context(|| format!("{flag} needs a value"))
            };
            match flag {
                "--quick" => quick = true,
                "--backend" | "--backends" => backends = Some(parse_backends(&value()?)?),
                "--workload" | "--workloads" => workloads = Some(parse_workloads(&value()?)?),
                "--runs" => {
                    let value = value()?;
                    let n: usize = value.parse().with_context(|| format!("--runs {value}"))?;
                    if n == 0 {
                        bail!("--runs must be at least 1");
                    }
                    runs = Some(n);
                }
                "-h" | "--help" => return Ok(None),
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        let default_backends = backends.is_none();
        let default_workloads = workloads.is_none();
        Ok(Some(Self {
            quick,
            backends: backends.unwrap_or_else(|| {
                let available = Backend::ALL
                    .into_iter()
                    .filter(|b| b.unavailable().is_none());
                available.collect()
            }),
            default_backends,
            workloads: workloads.unwrap_or_else(|| Workload::defaults(quick)),
            default_workloads,
            runs: runs.unwrap_or(if quick { 1 } else { 3 }),
            raw,
        }))
    }

    /// The command as the user would type it.
    pub(crate) fn command(&self) -> String {
        let mut command = String::from("cargo xtask bench");
        for word in &self.raw {
            command.push(' ');
            command.push_str(word);
        }
        command
    }

    /// Whether this run should rewrite docs/benchmarks.md: full sizes, every workload.
    pub(crate) fn writes_docs(&self) -> bool {
        !self.quick && self.default_workloads && self.runs >= 3
    }
}

fn parse_backends(list: &str) -> Result<Vec<Backend>> {
    let mut backends = Vec::new();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        let backend = Backend::parse(name).with_context(|| {
            let known: Vec<_> = Backend::ALL.iter().map(|b| b.name()).collect();
            format!("unknown backend `{name}` (known: {})", known.join(", "))
        })?;
        if !backends.contains(&backend) {
            backends.push(backend);
        }
    }
    if backends.is_empty() {
        bail!("--backend lists no backend");
    }
    Ok(backends)
}

fn parse_workloads(list: &str) -> Result<Vec<Workload>> {
    let mut workloads = Vec::new();
    for name in list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
    {
        let group = Workload::parse(name).with_context(|| {
            let known: Vec<_> = Workload::ALL.iter().map(ToString::to_string).collect();
            format!("unknown workload `{name}` (known: {})", known.join(", "))
        })?;
        for workload in group {
            if !workloads.contains(&workload) {
                workloads.push(workload);
            }
        }
    }
    if workloads.is_empty() {
        bail!("--workload lists no workload");
    }
    // Report order, whatever order they were asked in.
    workloads.sort_by_key(|w| Workload::ALL.iter().position(|known| known == w));
    Ok(workloads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Args {
        let raw = words.iter().map(|w| (*w).to_owned()).collect();
        Args::parse(raw).expect("parses").expect("not help")
    }

    #[test]
    fn defaults_and_lists() {
        let full = args(&[]);
        assert_eq!((full.runs, full.quick), (3, false));
        assert_eq!(full.workloads, Workload::ALL.to_vec());
        assert!(full.writes_docs());

        let quick = args(&[
            "--quick",
            "--workload",
            "latency,linear",
            "--backend=sqlite-normal",
        ]);
        assert_eq!(quick.runs, 1);
        assert_eq!(quick.backends, vec![Backend::SqliteNormal]);
        assert_eq!(
            quick.workloads,
            vec![
                Workload::Linear(1),
                Workload::Linear(3),
                Workload::Linear(9),
                Workload::Latency
            ]
        );
        assert!(!quick.writes_docs());
        assert_eq!(
            quick.command(),
            "cargo xtask bench --quick --workload latency,linear --backend=sqlite-normal"
        );
    }

    #[test]
    fn rejects_unknown_names() {
        assert!(Args::parse(vec!["--backend".into(), "mysql".into()]).is_err());
        assert!(Args::parse(vec!["--workload".into(), "linear-2".into()]).is_err());
        assert!(Args::parse(vec!["--runs".into(), "0".into()]).is_err());
    }
}
