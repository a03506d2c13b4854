//! Locating and running the workspace's binaries.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The directory cargo writes binaries to for this build profile (`$CARGO_TARGET_DIR` or `<workspace>/target`).
pub fn target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        workspace_root().join(target)
    };
    target.join(if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    })
}

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The path of a built binary. Panics with the command that builds it when it is missing: a test that cannot find
/// its binary must fail loudly, never pass by skipping.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir().join(name);
    assert!(
        path.is_file(),
        "binary {} not found: build the workspace binaries first (`cargo build --bins`, as ./scripts/test.sh does)",
        path.display()
    );
    path
}

/// Runs a binary with arguments and collects its output.
pub fn run(name: &str, args: &[&str]) -> Output {
    let path = binary(name);
    Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

/// Pids of the running QEMUs (`qemu-system-*`) whose command line contains `needle` (a task id, a directory).
pub fn qemus_with(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd =
                String::from_utf8_lossy(&std::fs::read(e.path().join("cmdline")).ok()?).replace('\0', " ");
            (cmd.contains("qemu-system") && cmd.contains(needle)).then_some(pid)
        })
        .collect()
}
