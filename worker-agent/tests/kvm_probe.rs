//! The KVM probe against the real QEMU: its probe guest really runs (under TCG, which any machine has), and the
//! probe's verdict on this machine matches what `/dev/kvm` is here.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use oakestra_worker_agent::guest::qemu::{Accel, ProbeOutcome};
use oakestra_worker_agent::runtime::unikernel::{find_qemu, probe_accel, run_probe};

fn qemu() -> std::path::PathBuf {
    find_qemu().expect("qemu-system-x86_64 is missing: scripts/qemu-install.sh installs it")
}

#[tokio::test]
async fn the_probe_guest_boots_under_tcg() {
    let scratch = std::env::temp_dir().join(format!("oak-probe-tcg-{}", std::process::id()));
    let started = std::time::Instant::now();
    assert_eq!(
        run_probe(&qemu(), &scratch, Accel::Tcg).await,
        ProbeOutcome::Booted
    );
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&scratch);
}

#[tokio::test]
async fn the_verdict_matches_this_machine() {
    let scratch = std::env::temp_dir().join(format!("oak-probe-auto-{}", std::process::id()));
    let (accel, why) = probe_accel(&qemu(), &scratch).await;
    let device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    // Only a host whose KVM runs stock guests (kvm_intel or kvm_amd loaded) may choose KVM.
    let real_kvm = device.is_ok()
        && (std::path::Path::new("/sys/module/kvm_intel").exists()
            || std::path::Path::new("/sys/module/kvm_amd").exists());
    if real_kvm {
        assert_eq!(accel, Accel::Kvm, "{why}");
    } else {
        assert_eq!(accel, Accel::Tcg, "{why}");
        assert!(why.contains("TCG"), "{why}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
