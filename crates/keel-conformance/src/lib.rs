#![doc = include_str!("../README.md")]

pub mod fixtures;
mod store;
pub mod suite;

pub use store::{TestStore, skip_unless};

#[doc(hidden)]
pub mod __private {
    pub use tokio;
}

/// Stamps out one `#[tokio::test]` per behaviour of the kit, named
/// `<area>::<behavior>`, each calling `$factory` (an expression of type
/// `impl Fn() -> impl Future<Output = TestStore>`) for a fresh store.
#[macro_export]
macro_rules! provider_tests {
    ($factory:expr) => {
        $crate::__all_areas!($factory);
    };
}

/// Stamps one area's tests; used by each area's own listing macro.
#[doc(hidden)]
#[macro_export]
macro_rules! __stamp {
    ($factory:expr, $area:ident, [$($test:ident),* $(,)?]) => {
        mod $area {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[$crate::__private::tokio::test(flavor = "multi_thread", worker_threads = 2, crate = "keel_conformance::__private::tokio")]
                async fn $test() {
                    let store: $crate::TestStore = ($factory)().await;
                    $crate::suite::$area::$test(store).await;
                }
            )*
        }
    };
}
