//! Child processes: building cargo commands and running them with useful errors.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// A command for the cargo that is running xtask, started in `root`.
///
/// `$CARGO` is that cargo, so `cargo +toolchain xtask` keeps its toolchain.
pub(crate) fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

/// Runs `cmd` with the terminal's stdio and fails, naming it, unless it succeeds.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// `cmd` as one would type it, with the variables we set, for messages.
pub(crate) fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    // `$CARGO` is a long toolchain path; its file name says all that matters.
    let program = program.file_name().unwrap_or(program.as_os_str());
    let mut words: Vec<String> = cmd
        .get_envs()
        .filter_map(|(key, value)| {
            Some(format!("{}={:?}", key.display(), value?.to_string_lossy()))
        })
        .collect();
    words.push(program.display().to_string());
    words.extend(cmd.get_args().map(|arg| {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(' ') {
            format!("{arg:?}")
        } else {
            arg.into_owned()
        }
    }));
    words.join(" ")
}
