//! The behaviours, one module per area. Each area module holds plain `async fn(TestStore)`
//! tests and a `__conformance_<area>!` macro listing them; [`provider_tests!`](crate::provider_tests)
//! stamps every area.

pub mod ack_batches;
pub mod acks;
pub mod activities;
pub mod control;
pub mod corruption;
pub mod creation;
pub mod dead_letters;
pub mod eager;
pub mod executions;
pub mod leases;
pub mod limits;
pub mod listing;
pub mod locking;
pub mod management;
pub mod messages;
pub mod model;
pub mod purging;
pub mod visibility;
pub mod wakeups;

/// Stamps every area. Add a new area here.
#[doc(hidden)]
#[macro_export]
macro_rules! __all_areas {
    ($factory:expr) => {
        $crate::__conformance_creation!($factory);
        $crate::__conformance_executions!($factory);
        $crate::__conformance_visibility!($factory);
        $crate::__conformance_acks!($factory);
        $crate::__conformance_ack_batches!($factory);
        $crate::__conformance_locking!($factory);
        $crate::__conformance_messages!($factory);
        $crate::__conformance_activities!($factory);
        $crate::__conformance_leases!($factory);
        $crate::__conformance_eager!($factory);
        $crate::__conformance_limits!($factory);
        $crate::__conformance_dead_letters!($factory);
        $crate::__conformance_control!($factory);
        $crate::__conformance_management!($factory);
        $crate::__conformance_listing!($factory);
        $crate::__conformance_purging!($factory);
        $crate::__conformance_wakeups!($factory);
        $crate::__conformance_corruption!($factory);
        $crate::__conformance_model!($factory);
    };
}
