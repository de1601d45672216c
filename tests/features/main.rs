//! One scenario per feature, through the `keel` facade on real SQLite files.

mod basics;
mod children;
mod control;
mod management;
mod poison;
mod retries;
mod shutdown;
mod signals;
mod versions;
