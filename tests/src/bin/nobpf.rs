//! `nobpf <program> [args...]`: runs a program that may not use eBPF. A seccomp filter makes every `bpf(2)` call
//! fail with EPERM, which is what the kernel answers a process without CAP_BPF; everything else (netlink, setns,
//! TUN) keeps working as root. The tests start a NetManager through it to see `--dataplane auto` fall back to the
//! TUN dataplane with its warning.
#![allow(unsafe_code)]

use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

/// `struct sock_filter` of classic BPF.
#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// `struct sock_fprog`.
#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

fn deny_bpf() -> std::io::Result<()> {
    let nr = u32::try_from(libc::SYS_bpf).map_err(|_| std::io::Error::other("syscall number"))?;
    // seccomp_data: nr at offset 0. bpf(2) → EPERM, anything else → allow.
    let program = [
        SockFilter {
            code: BPF_LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        SockFilter {
            code: BPF_JEQ_K,
            jt: 0,
            jf: 1,
            k: nr,
        },
        SockFilter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        SockFilter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k: SECCOMP_RET_ALLOW,
        },
    ];
    let prog = SockFprog {
        len: 4,
        filter: program.as_ptr(),
    };
    // SAFETY: plain prctl calls; `prog` and the program it points to outlive the call, which copies them.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &prog as *const SockFprog,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[allow(clippy::print_stderr, reason = "the one line a user sees when it cannot run")]
fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(program) = args.next() else {
        eprintln!("usage: nobpf <program> [args...]");
        return ExitCode::from(2);
    };
    if let Err(e) = deny_bpf() {
        eprintln!("nobpf: cannot install the seccomp filter: {e}");
        return ExitCode::from(1);
    }
    let e = Command::new(&program).args(args).exec();
    eprintln!("nobpf: cannot run {}: {e}", program.to_string_lossy());
    ExitCode::from(127)
}
