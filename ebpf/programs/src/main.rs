//! tc classifiers attached to the host side of every container veth. For now: per-direction packet and byte
//! counters (the reference's `packetCounter` module), the first piece of the fast path.
//!
//! Built only for `bpfel-unknown-none` with nightly and bpf-linker (see `ebpf/README.md`). On the host the crate
//! still type-checks, so `cargo clippy --workspace` covers it.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::TC_ACT_PIPE,
        macros::{classifier, map},
        maps::PerCpuArray,
        programs::TcContext,
    };

    /// Slot 0: packets leaving the container (veth ingress); slot 1: packets to the container (veth egress).
    /// Each slot holds `[packets, bytes]`.
    #[map]
    static COUNTERS: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(2, 0);

    fn count(ctx: &TcContext, slot: u32) -> i32 {
        if let Some(c) = COUNTERS.get_ptr_mut(slot) {
            // SAFETY: the pointer comes from the verifier-checked per-CPU map lookup and is only used on this CPU.
            unsafe {
                (*c)[0] += 1;
                (*c)[1] += u64::from(ctx.len());
            }
        }
        // Pass the packet on to the next program or the stack.
        TC_ACT_PIPE
    }

    /// Packets the container sends.
    #[classifier]
    pub fn oakestra_from_container(ctx: TcContext) -> i32 {
        count(&ctx, 0)
    }

    /// Packets sent to the container.
    #[classifier]
    pub fn oakestra_to_container(ctx: TcContext) -> i32 {
        count(&ctx, 1)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
        loop {}
    }
}

/// On the host there is nothing to run; the binary only exists for the BPF target.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
