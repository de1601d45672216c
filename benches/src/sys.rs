//! What the machine is and how much memory this process holds, read from `/proc`.
//!
//! The worker runs inside the bench process, so the process's resident set is the
//! worker's (plus the harness's small share). The workloads that read it run in a
//! fresh child process each time (see [`crate::isolate`]), so it holds nothing of
//! earlier workloads, whose freed memory the allocator would otherwise keep.

use std::fs;

use serde::Serialize;

/// The process's resident memory, in bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Memory {
    /// Resident now (`VmRSS`).
    pub(crate) rss: u64,
    /// The most resident since start or the last [`reset_peak`] (`VmHWM`).
    pub(crate) peak: u64,
}

/// Reads `VmRSS` and `VmHWM` from `/proc/self/status`; none off Linux.
pub(crate) fn memory() -> Option<Memory> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kib * 1024)
        })
    };
    Some(Memory {
        rss: field("VmRSS")?,
        peak: field("VmHWM")?,
    })
}

/// Resets `VmHWM` to the current resident size (writing 5 to `clear_refs`), so the
/// next peak is the workload's, not the process's start-up's. Returns whether the
/// kernel allowed it.
pub(crate) fn reset_peak() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes as mebibytes, for reports.
#[allow(clippy::cast_precision_loss, reason = "a size for display")]
pub(crate) fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The machine the figures were measured on.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    /// Logical CPUs this process may use (what `nproc` prints).
    pub(crate) cpus: usize,
    /// The CPU's model name from `/proc/cpuinfo`.
    pub(crate) cpu_model: String,
    /// Total memory from `/proc/meminfo`, in GiB.
    pub(crate) memory_gib: f64,
    /// The kernel release.
    pub(crate) kernel: String,
}

impl Machine {
    /// Reads the machine's description; unknown parts say so.
    pub(crate) fn detect() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let cpu_model = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|line| line.strip_prefix("model name"))
                    .and_then(|rest| rest.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_kib = fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        });
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(
            |_| "unknown".to_owned(),
            |release| release.trim().to_owned(),
        );
        Self {
            cpus,
            cpu_model,
            memory_gib: memory_kib.map_or(0.0, |kib| megabytes(kib * 1024) / 1024.0),
            kernel,
        }
    }

    /// One line: "2 CPUs (Intel …), 23.4 GiB, Linux 6.1".
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} CPUs ({}), {:.1} GiB memory, Linux {}",
            self.cpus, self.cpu_model, self.memory_gib, self.kernel
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_memory() {
        let memory = memory().expect("Linux has /proc/self/status");
        assert!(memory.rss > 0);
        assert!(memory.peak >= memory.rss);
    }
}
