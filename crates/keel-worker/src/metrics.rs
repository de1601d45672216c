//! The metrics a worker records, through the [`metrics`] crate: install any recorder
//! (Prometheus, StatsD, …) and they appear; with none installed they cost next to
//! nothing.
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `keel_activities_started_total` | counter | `activity` | attempts started |
//! | `keel_activities_completed_total` | counter | `activity` | activities that returned an output |
//! | `keel_activities_failed_total` | counter | `activity` | activities that failed for good (retries spent or not retryable) |
//! | `keel_activities_retried_total` | counter | `activity` | failed attempts re-queued for another try |
//! | `keel_activity_duration_seconds` | histogram | `activity` | how long one attempt ran |
//! | `keel_activity_schedule_to_start_seconds` | histogram | `activity` | from the orchestration scheduling it to an attempt starting |
//! | `keel_turns_total` | counter | `outcome` (`acked`, `rejected`, `failed`, `suspended`) | orchestration turns |
//! | `keel_turn_duration_seconds` | histogram | | from fetch to committed ack, per batch of turns |
//! | `keel_turn_cache_total` | counter | `result` (`hit`, `miss`) | sticky-cache lookups per turn |
//! | `keel_workflows_finished_total` | counter | `orchestration`, `status` | executions that completed, failed, were cancelled or continued as new |
//! | `keel_workflow_duration_seconds` | histogram | `orchestration` | from an execution's start to its end |
//! | `keel_queue_depth` | gauge | `queue` (`orchestrations`, `orchestrations_delayed`, `activities:<name>`, `activities_delayed`, `activities_running`, `dead_letters`) | queued work, sampled every `queue_depth_interval` |

use std::time::Duration;

/// Attempts started.
pub const ACTIVITIES_STARTED: &str = "keel_activities_started_total";
/// Activities that returned an output.
pub const ACTIVITIES_COMPLETED: &str = "keel_activities_completed_total";
/// Activities that failed for good.
pub const ACTIVITIES_FAILED: &str = "keel_activities_failed_total";
/// Failed attempts re-queued.
pub const ACTIVITIES_RETRIED: &str = "keel_activities_retried_total";
/// Attempt run time.
pub const ACTIVITY_DURATION: &str = "keel_activity_duration_seconds";
/// Schedule-to-start latency.
pub const ACTIVITY_SCHEDULE_TO_START: &str = "keel_activity_schedule_to_start_seconds";
/// Orchestration turns, by outcome.
pub const TURNS: &str = "keel_turns_total";
/// Fetch-to-ack time of a batch of turns.
pub const TURN_DURATION: &str = "keel_turn_duration_seconds";
/// Sticky-cache hits and misses.
pub const TURN_CACHE: &str = "keel_turn_cache_total";
/// Finished executions, by status.
pub const WORKFLOWS_FINISHED: &str = "keel_workflows_finished_total";
/// Start-to-end time of an execution.
pub const WORKFLOW_DURATION: &str = "keel_workflow_duration_seconds";
/// Queued work, by queue.
pub const QUEUE_DEPTH: &str = "keel_queue_depth";

/// Counts one `name` with `label` = `value`.
pub(crate) fn count(name: &'static str, label: &'static str, value: impl Into<String>) {
    ::metrics::counter!(name, label => value.into()).increment(1);
}

/// Records `duration` in the histogram `name`.
pub(crate) fn seconds(name: &'static str, duration: Duration) {
    ::metrics::histogram!(name).record(duration.as_secs_f64());
}

/// Records `duration` in the histogram `name` with `label` = `value`.
pub(crate) fn labelled_seconds(
    name: &'static str,
    label: &'static str,
    value: impl Into<String>,
    duration: Duration,
) {
    ::metrics::histogram!(name, label => value.into()).record(duration.as_secs_f64());
}

/// An execution ended with `status` after `took`.
pub(crate) fn workflow_finished(orchestration: String, status: &'static str, took: Duration) {
    ::metrics::counter!(WORKFLOWS_FINISHED, "orchestration" => orchestration.clone(), "status" => status)
        .increment(1);
    ::metrics::histogram!(WORKFLOW_DURATION, "orchestration" => orchestration)
        .record(took.as_secs_f64());
}
