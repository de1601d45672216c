//! How to write a provider, step by step.
//!
//! A provider is a store for Keel's instances, histories and queues. Keel holds it as
//! `Arc<dyn Provider>`; everything else (replay, retries, the sticky cache) is the
//! worker's job, so a provider is mostly careful transactions.
//!
//! 1. **Model the three queues** (DESIGN §3): orchestrator messages per instance, with a
//!    `visible_at` each; activity work items, each leasable on its own; and the
//!    instances themselves, carrying the lock (token and expiry) that covers all of an
//!    instance's messages. Keep payloads apart from the hot queue rows.
//! 2. **Pick a clock.** If the database has one, compute every lease and visibility
//!    with it, so workers' clock skew cannot cause double execution; if not, take a
//!    [`Clock`](crate::Clock) from the embedder and default to
//!    [`SystemClock`](crate::SystemClock).
//! 3. **Make every claim exclusive.** `fetch_orchestrations` and `fetch_activities` must
//!    never hand one instance or item to two holders: a conditional update of the lock
//!    columns (SQLite), or `FOR UPDATE SKIP LOCKED` (PostgreSQL). Tokens must change on
//!    every claim, so a late ack or completion from a worker that lost its lock is
//!    rejected as `Stale` and changes nothing.
//! 4. **Make every ack atomic.** One ack appends events, enqueues work and messages,
//!    cancels items, sets the status and deletes the consumed messages in one
//!    transaction. Commit many acks per transaction (group commit), but reject a bad
//!    one without taking the others down: a savepoint per ack works well.
//! 5. **Encode records with `keel_core::encode_record`** and decode them with
//!    `decode_record`. Never panic on stored bytes: set a corrupt instance aside
//!    (suspend it with the reason) or turn a corrupt work item into a dead letter.
//! 6. **Parameterise every query**; never format user input into SQL.
//! 7. **Wake waiters.** `wait_for_work` returns early when this process enqueues work
//!    (an in-process notify) or the database says so (`LISTEN/NOTIFY`); polling remains
//!    the fallback.
//! 8. **Optionally, dispatch eagerly.** `ack_turns_leasing` and
//!    `complete_activities_locking` have defaults that only commit; overriding them
//!    lets a worker that runs the next step itself skip a claim per step: the ack
//!    inserts its activity items already leased to the caller, the completion locks
//!    the instance it tells. Reuse your claim code for both (the lease or lock must be
//!    exactly what a fetch would have taken), and claim `leases_on_ack` /
//!    `locks_on_completion` so the kit holds you to it.
//! 9. **Run the conformance kit.** In your crate's tests, one line stamps out a test per
//!    behaviour, each with a fresh store from your factory:
//!
//! ```text
//! keel_conformance::provider_tests!(|| async { keel_conformance::TestStore::new(my_provider().await) });
//! ```
//!
//! Claim only the [`Capabilities`](crate::Capabilities) you implement: the kit skips
//! the others and says so.
