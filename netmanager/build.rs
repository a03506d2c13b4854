//! Builds the eBPF fast path (`ebpf/programs`, object `oakestra-tc`) with the nightly toolchain and bpf-linker,
//! through aya-build, into `OUT_DIR`, where `src/fastpath.rs` embeds it. `cargo build -p oakestra-netmanager` stays
//! one command; `./scripts/test.sh`, `1doc.sh` and `install-worker.sh` install what it needs.
//!
//! `OAKESTRA_SKIP_EBPF=1` builds a NetManager without the object: it then runs the TUN dataplane only and says so
//! (`--dataplane auto` warns, `--dataplane ebpf` refuses to start).
#![allow(
    clippy::print_stdout,
    reason = "cargo reads a build script's instructions from stdout"
)]

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=OAKESTRA_SKIP_EBPF");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let programs = manifest.join("../ebpf/programs");
    let common = manifest.join("../ebpf/common/src");
    println!("cargo:rerun-if-changed={}", common.display());
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    if env::var("OAKESTRA_SKIP_EBPF").is_ok_and(|v| v == "1") {
        fs::write(out.join("oakestra-tc"), b"").expect("writing the empty object");
        println!(
            "cargo:warning=OAKESTRA_SKIP_EBPF=1: NetManager is built without the eBPF fast path (TUN only)"
        );
        return;
    }
    let root = programs.to_str().expect("the repository path is UTF-8");
    let package = aya_build::Package {
        name: "oakestra-ebpf",
        root_dir: root,
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!(
            "cannot build the eBPF fast path ({e:#}). It needs rustup's nightly toolchain with rust-src and \
             bpf-linker (./scripts/test.sh installs them); OAKESTRA_SKIP_EBPF=1 builds a TUN-only NetManager"
        );
    }
}
