//! Installing the Debian packages a suite needs when they are missing (scripts/test.sh installs them up front; a
//! suite run alone installs its own): under a policy-rc.d, so no package starts a daemon on the host, with one
//! `apt-get update` when the package lists are missing, and the services Debian enables for the next boot disabled.

use std::{path::Path, process::Command};

/// Installs `packages` unless `present` says they are there; then disables (and stops) `services`.
pub fn ensure(packages: &[&str], present: impl Fn() -> bool, services: &[&str]) {
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

/// Whether `program` is on the PATH.
pub fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
