//! `keel-bench`: see the `keel_benches` library, or run with `--help`.

fn main() -> std::process::ExitCode {
    keel_benches::main()
}
