//! Installing the Debian packages a suite needs when they are missing (scripts/test.sh installs them up front; a
//! suite run alone installs its own): under a policy-rc.d, so no package starts a daemon on the host, with one
//! `apt-get update` when the package lists are missing, and the services Debian enables for the next boot disabled.

use std::{path::Path, process::Command, sync::Mutex};

/// Installs `packages` unless `present` says they are there (one install at a time in this process; apt's own lock
/// orders it against other processes); then disables (and stops) `services`. Panics when that fails.
pub fn ensure(packages: &[&str], present: impl Fn() -> bool, services: &[&str]) {
    static APT: Mutex<()> = Mutex::new(());
    let _guard = APT.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if present() {
        return;
    }
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let own_policy = !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
    if own_policy {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755));
    }
    let install = || {
        Command::new("apt-get")
            .args([
                "-o",
                "DPkg::Lock::Timeout=900",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
            ])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let update = || {
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=900", "update", "-qq"])
            .status()
            .is_ok_and(|s| s.success())
    };
    let installed = install() || (update() && install());
    if own_policy {
        let _ = std::fs::remove_file(policy);
    }
    assert!(installed, "apt-get install {packages:?} failed");
    for service in services {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", service])
            .output();
    }
    assert!(present(), "{packages:?} installed, but still not usable");
}

/// Whether `program` is an executable file in a directory of the PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}
