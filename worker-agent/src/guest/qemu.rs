//! The QEMU side of a guest, pure: which accelerator to use (and the KVM probe's tiny guest and verdict), and the
//! command line and kernel arguments of an instance.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use super::GuestError;

/// Longest kernel command line accepted (x86's `COMMAND_LINE_SIZE`).
pub const MAX_KERNEL_ARGS: usize = 2048;
/// Guest memory when the service asks for none (`memory: 0`).
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// TCG's translation cache: QEMU's default (1 GiB on 64-bit hosts) would let one small guest's QEMU grow far
/// beyond the guest.
pub const TCG_TB_MIB: u32 = 32;

/// How guests run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization (`-accel kvm -cpu host`).
    Kvm,
    /// Software emulation (`-accel tcg`).
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the KVM probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The probe guest printed its marker and exited.
    Booted,
    /// QEMU ran but the guest did not finish in time (e.g. `/dev/kvm` of a PVM host, which hangs stock guests).
    Hung,
    /// QEMU refused (`-accel kvm` not usable); the text is its complaint.
    Refused(String),
}

/// The accelerator and why: KVM only when `/dev/kvm` can be opened and a probe guest really ran on it.
pub fn decide_accel(kvm_device: Result<(), String>, probe: Option<&ProbeOutcome>) -> (Accel, String) {
    match (kvm_device, probe) {
        (Err(why), _) => (
            Accel::Tcg,
            format!("no usable /dev/kvm ({why}): guests run under TCG (software emulation)"),
        ),
        (Ok(()), Some(ProbeOutcome::Booted)) => (Accel::Kvm, "the KVM probe guest booted".to_owned()),
        (Ok(()), Some(ProbeOutcome::Hung)) => (
            Accel::Tcg,
            "/dev/kvm exists but a probe guest hung on it (e.g. a PVM-only host): guests run under TCG"
                .to_owned(),
        ),
        (Ok(()), Some(ProbeOutcome::Refused(why))) => (
            Accel::Tcg,
            format!("QEMU cannot use /dev/kvm ({}): guests run under TCG", why.trim()),
        ),
        (Ok(()), None) => (
            Accel::Tcg,
            "no KVM probe was possible on this architecture: guests run under TCG".to_owned(),
        ),
    }
}

/// The KVM probe guest (x86): a multiboot image (QEMU's `-kernel` loads it in 32-bit protected mode) that writes
/// `OK` to the first serial port and exits QEMU through `isa-debug-exit` with code `(0x10 << 1) | 1` = 33. It
/// exercises the switch out of real mode, where stock guests hang on hosts whose `/dev/kvm` cannot run them.
pub fn probe_image() -> Vec<u8> {
    const LOAD: u32 = 0x0010_0000;
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 1 << 16; // the load addresses below are valid (no ELF needed)
    let code: [u8; 24] = [
        0x66, 0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xB0, b'O', 0xEE, // mov al, 'O'; out dx, al
        0xB0, b'K', 0xEE, // mov al, 'K'; out dx, al
        0xB0, b'\n', 0xEE, // mov al, '\n'; out dx, al
        0x66, 0xBA, 0xF4, 0x00, // mov dx, 0xf4
        0xB0, 0x10, 0xEE, // mov al, 0x10; out dx, al (isa-debug-exit)
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
        0x90,
    ];
    let header = [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)),
        LOAD,      // header_addr
        LOAD,      // load_addr
        0,         // load_end_addr: the whole file
        0,         // bss_end_addr: none
        LOAD + 32, // entry_addr: right after this header
    ];
    let mut image: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    image.extend_from_slice(&code);
    image
}

/// The exit status QEMU has when the probe guest finished.
pub const PROBE_EXIT_CODE: i32 = 33;

/// The probe's QEMU arguments (after the binary) for `image` (`accel`: KVM for the probe itself, TCG to check
/// the probe image).
pub fn probe_args(image: &Path, accel: Accel) -> Vec<String> {
    let accel_args: &[&str] = match accel {
        Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        Accel::Tcg => &["-accel", "tcg"],
    };
    accel_args
        .iter()
        .chain(&[
            "-m",
            "16",
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
        ])
        .map(|s| (*s).to_owned())
        .chain([image.display().to_string()])
        .collect()
}

/// The probe's verdict from QEMU's exit code and output (`None`: it did not end in time).
pub fn probe_verdict(exit: Option<i32>, output: &str) -> ProbeOutcome {
    match exit {
        None => ProbeOutcome::Hung,
        Some(PROBE_EXIT_CODE) => ProbeOutcome::Booted,
        Some(_) if output.contains("OK") => ProbeOutcome::Booted,
        Some(code) => ProbeOutcome::Refused(
            output
                .lines()
                .find(|l| !l.trim().is_empty())
                .map_or_else(|| format!("exit code {code}"), |l| l.chars().take(200).collect()),
        ),
    }
}

/// The guest's addresses, from the NetManager's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAddresses {
    /// IPv4 address.
    pub v4: Ipv4Addr,
    /// IPv4 gateway.
    pub gw4: Ipv4Addr,
    /// IPv4 prefix length.
    pub prefix4: u8,
    /// IPv6 address, gateway and prefix length, when the overlay gave one.
    pub v6: Option<(Ipv6Addr, Ipv6Addr, u8)>,
}

/// The tap the guest's NIC uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    /// Tap name (inside the instance's network namespace).
    pub tap: String,
    /// The guest's MAC.
    pub mac: String,
    /// Use vhost-net (only when `/dev/vhost-net` exists).
    pub vhost: bool,
    /// The overlay's MTU, told to the guest through virtio-net's `host_mtu` (0: not told).
    pub mtu: u32,
}

/// Everything the command line of one instance depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The task id (`-name`).
    pub task: String,
    /// `x86_64` or `aarch64`.
    pub arch: String,
    /// Accelerator.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The kernel.
    pub kernel: PathBuf,
    /// `-initrd`.
    pub initramfs: Option<PathBuf>,
    /// The instance's copy of the image's files, shared over 9p as `fs0` and `fs1`.
    pub files: Option<PathBuf>,
    /// The serial console goes here (appended).
    pub log: PathBuf,
    /// The control QMP socket.
    pub qmp: PathBuf,
    /// The QMP socket the watcher reads events from.
    pub events: PathBuf,
    /// The NIC, with the overlay.
    pub nic: Option<Nic>,
    /// The addresses, with the overlay.
    pub addresses: Option<GuestAddresses>,
    /// The service's `cmd`, passed to the guest after `--`.
    pub cmd: Vec<String>,
}

/// A dotted IPv4 netmask for `prefix` (0–32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// `memory` (MiB, 0 = default) and `vcpus` (0 = 1) of a service, checked.
pub fn sizes(memory: i64, vcpus: i64) -> Result<(u64, u32), GuestError> {
    let memory_mib = match memory {
        0 => DEFAULT_MEMORY_MIB,
        m if (16..=1024 * 1024).contains(&m) => m.unsigned_abs(),
        m => {
            return Err(GuestError::Invalid(format!(
                "memory = {m}: a unikernel needs 16 MiB to 1 TiB (0 means {DEFAULT_MEMORY_MIB} MiB)"
            )));
        }
    };
    let vcpus = match vcpus {
        0 => 1,
        v if (1..=256).contains(&v) => u32::try_from(v).unwrap_or(1),
        v => {
            return Err(GuestError::Invalid(format!(
                "vcpus = {v}: a unikernel takes 1 to 256 vCPUs (0 means 1)"
            )));
        }
    };
    Ok((memory_mib, vcpus))
}

/// One kernel argument as the kernel's parser reads it: quoted when it has spaces; `"` and control characters
/// cannot be expressed.
fn kernel_word(word: &str) -> Result<String, GuestError> {
    if word.contains('"') || word.chars().any(char::is_control) {
        return Err(GuestError::Invalid(format!(
            "cmd argument {word:?}: the kernel command line cannot carry double quotes or control characters"
        )));
    }
    if word.is_empty() || word.contains(' ') {
        Ok(format!("\"{word}\""))
    } else {
        Ok(word.to_owned())
    }
}

impl Plan {
    /// The kernel arguments: the console, the reference's `netdev.*` addresses (plus our IPv6 ones), then `--`
    /// and `cmd` for the guest's init.
    pub fn kernel_args(&self) -> Result<String, GuestError> {
        let console = if self.arch == "aarch64" {
            "ttyAMA0"
        } else {
            "ttyS0"
        };
        let mut words = vec![format!("console={console}")];
        if let Some(a) = &self.addresses {
            words.push(format!("netdev.ipv4_addr={}", a.v4));
            words.push(format!("netdev.ipv4_gw_addr={}", a.gw4));
            words.push(format!("netdev.ipv4_subnet_mask={}", netmask(a.prefix4)));
            if let Some((v6, gw6, prefix6)) = a.v6 {
                words.push(format!("netdev.ipv6_addr={v6}"));
                words.push(format!("netdev.ipv6_gw_addr={gw6}"));
                words.push(format!("netdev.ipv6_prefix_len={prefix6}"));
            }
        }
        if !self.cmd.is_empty() {
            words.push("--".to_owned());
            for w in &self.cmd {
                words.push(kernel_word(w)?);
            }
        }
        let line = words.join(" ");
        if line.len() > MAX_KERNEL_ARGS {
            return Err(GuestError::Invalid(format!(
                "cmd: the kernel command line would be {} bytes, more than the {MAX_KERNEL_ARGS} allowed",
                line.len()
            )));
        }
        Ok(line)
    }

    /// QEMU's arguments (after the binary). The guest starts paused (`-S`): the runtime moves QEMU into its
    /// cgroup, then continues it over QMP.
    pub fn args(&self) -> Result<Vec<String>, GuestError> {
        let mut a: Vec<String> = Vec::with_capacity(48);
        let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
        push(&["-name", &format!("{},debug-threads=on", self.task)]);
        if self.arch == "aarch64" {
            push(&["-machine", "virt"]);
        }
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => {
                push(&["-accel", &format!("tcg,tb-size={TCG_TB_MIB}")]);
                if self.arch == "aarch64" {
                    push(&["-cpu", "max"]);
                }
            }
        }
        push(&[
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.vcpus.to_string(),
            "-display",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-S",
            "-chardev",
            &format!("file,id=console0,path={},append=on", self.log.display()),
            "-serial",
            "chardev:console0",
            "-kernel",
            &self.kernel.display().to_string(),
        ]);
        if let Some(initramfs) = &self.initramfs {
            push(&["-initrd", &initramfs.display().to_string()]);
        }
        push(&["-append", &self.kernel_args()?]);
        if let Some(nic) = &self.nic {
            let vhost = if nic.vhost { ",vhost=on" } else { "" };
            let mtu = if nic.mtu > 0 {
                format!(",host_mtu={}", nic.mtu)
            } else {
                String::new()
            };
            push(&[
                "-netdev",
                &format!("tap,id=tap0,ifname={},script=no,downscript=no{vhost}", nic.tap),
                "-device",
                &format!("virtio-net-pci,id=nic1,netdev=tap0,mac={}{mtu}", nic.mac),
            ]);
        }
        if let Some(files) = &self.files {
            for (n, tag) in ["fs0", "fs1"].iter().enumerate() {
                push(&[
                    "-fsdev",
                    &format!(
                        "local,security_model=passthrough,id=hvirtio{n},path={}",
                        files.display()
                    ),
                    "-device",
                    &format!("virtio-9p-pci,fsdev=hvirtio{n},mount_tag={tag}"),
                ]);
            }
        }
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp.display()),
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.events.display()),
        ]);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            task: "app.ns.svc.ns.instance.0".into(),
            arch: "x86_64".into(),
            accel: Accel::Tcg,
            memory_mib: 128,
            vcpus: 2,
            kernel: "/c/kernel".into(),
            initramfs: Some("/c/initramfs.cpio".into()),
            files: Some("/i/files".into()),
            log: "/logs/t".into(),
            qmp: "/i/qmp.sock".into(),
            events: "/i/events.sock".into(),
            nic: Some(Nic {
                tap: "tap0".into(),
                mac: "02:4f:0a:12:00:02".into(),
                vhost: false,
                mtu: 0,
            }),
            addresses: Some(GuestAddresses {
                v4: "10.18.0.2".parse().unwrap(),
                gw4: "10.18.0.1".parse().unwrap(),
                prefix4: 26,
                v6: Some(("fc00::2".parse().unwrap(), "fc00::1".parse().unwrap(), 120)),
            }),
            cmd: vec![],
        }
    }

    fn joined(p: &Plan) -> String {
        p.args().unwrap().join(" ")
    }

    #[test]
    fn tcg_and_kvm_lines() {
        let mut p = plan();
        let tcg = joined(&p);
        assert!(tcg.contains("-accel tcg,tb-size=32"), "{tcg}");
        assert!(!tcg.contains("kvm") && !tcg.contains("-cpu host"), "{tcg}");
        p.accel = Accel::Kvm;
        let kvm = joined(&p);
        assert!(kvm.contains("-accel kvm -cpu host"), "{kvm}");
        assert!(!kvm.contains("tcg"), "{kvm}");
        p.arch = "aarch64".into();
        assert!(joined(&p).contains("-machine virt"));
        p.accel = Accel::Tcg;
        assert!(joined(&p).contains("-cpu max"));
    }

    #[test]
    fn memory_smp_console_initramfs_and_qmp() {
        let a = plan().args().unwrap();
        let after = |flag: &str| {
            a.iter()
                .position(|x| x == flag)
                .map(|i| a[i + 1].clone())
                .unwrap_or_default()
        };
        assert_eq!(after("-m"), "128");
        assert_eq!(after("-smp"), "2");
        assert_eq!(after("-kernel"), "/c/kernel");
        assert_eq!(
            after("-initrd"),
            "/c/initramfs.cpio",
            "the initramfs is an -initrd, not a 9p share"
        );
        assert_eq!(after("-chardev"), "file,id=console0,path=/logs/t,append=on");
        assert_eq!(after("-serial"), "chardev:console0");
        assert_eq!(after("-name"), "app.ns.svc.ns.instance.0,debug-threads=on");
        assert!(a.contains(&"-S".to_owned()) && a.contains(&"-no-reboot".to_owned()));
        let qmps: Vec<_> = a
            .windows(2)
            .filter(|w| w[0] == "-qmp")
            .map(|w| w[1].clone())
            .collect();
        assert_eq!(
            qmps,
            [
                "unix:/i/qmp.sock,server=on,wait=off",
                "unix:/i/events.sock,server=on,wait=off"
            ]
        );
        let mut p = plan();
        p.initramfs = None;
        assert!(!p.args().unwrap().contains(&"-initrd".to_owned()));
    }

    #[test]
    fn ninep_shares_and_tap() {
        let line = joined(&plan());
        assert!(line.contains(
            "-fsdev local,security_model=passthrough,id=hvirtio0,path=/i/files -device virtio-9p-pci,fsdev=hvirtio0,mount_tag=fs0"
        ), "{line}");
        assert!(
            line.contains("id=hvirtio1,path=/i/files -device virtio-9p-pci,fsdev=hvirtio1,mount_tag=fs1"),
            "{line}"
        );
        assert!(line.contains(
            "-netdev tap,id=tap0,ifname=tap0,script=no,downscript=no -device virtio-net-pci,id=nic1,netdev=tap0,mac=02:4f:0a:12:00:02"
        ), "{line}");
        let mut p = plan();
        p.nic.as_mut().unwrap().vhost = true;
        assert!(joined(&p).contains("downscript=no,vhost=on"));
        p.nic.as_mut().unwrap().mtu = 1450;
        assert!(joined(&p).contains("mac=02:4f:0a:12:00:02,host_mtu=1450"));
        p.files = None;
        p.nic = None;
        let bare = joined(&p);
        assert!(!bare.contains("-fsdev") && !bare.contains("-netdev"), "{bare}");
    }

    #[test]
    fn kernel_args_v4_v6_and_cmd() {
        let mut p = plan();
        assert_eq!(
            p.kernel_args().unwrap(),
            "console=ttyS0 netdev.ipv4_addr=10.18.0.2 netdev.ipv4_gw_addr=10.18.0.1 netdev.ipv4_subnet_mask=255.255.255.192 \
             netdev.ipv6_addr=fc00::2 netdev.ipv6_gw_addr=fc00::1 netdev.ipv6_prefix_len=120"
        );
        p.addresses.as_mut().unwrap().v6 = None;
        p.cmd = vec!["fetch".into(), "http://10.30.0.1/".into(), "a b".into()];
        assert_eq!(
            p.kernel_args().unwrap(),
            "console=ttyS0 netdev.ipv4_addr=10.18.0.2 netdev.ipv4_gw_addr=10.18.0.1 netdev.ipv4_subnet_mask=255.255.255.192 \
             -- fetch http://10.30.0.1/ \"a b\""
        );
        p.addresses = None;
        p.cmd = vec!["x".into()];
        assert_eq!(p.kernel_args().unwrap(), "console=ttyS0 -- x");
        p.cmd = vec!["say \"hi\"".into()];
        let e = p.kernel_args().unwrap_err().to_string();
        assert!(e.contains("double quotes"), "{e}");
        p.cmd = vec!["x".repeat(3000)];
        let e = p.args().unwrap_err().to_string();
        assert!(e.contains("2048"), "{e}");
        p.arch = "aarch64".into();
        p.cmd = vec![];
        assert_eq!(p.kernel_args().unwrap(), "console=ttyAMA0");
    }

    #[test]
    fn masks_and_sizes() {
        assert_eq!(netmask(26), Ipv4Addr::new(255, 255, 255, 192));
        assert_eq!(netmask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32), Ipv4Addr::BROADCAST);
        assert_eq!(sizes(0, 0).unwrap(), (DEFAULT_MEMORY_MIB, 1));
        assert_eq!(sizes(256, 4).unwrap(), (256, 4));
        assert!(sizes(8, 1).unwrap_err().to_string().contains("memory = 8"));
        assert!(sizes(-1, 1).is_err());
        assert!(sizes(64, 1000).unwrap_err().to_string().contains("vcpus = 1000"));
    }

    #[test]
    fn the_kvm_decision() {
        let (a, why) = decide_accel(Err("No such file".into()), None);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("No such file"), "{why}");
        assert_eq!(decide_accel(Ok(()), Some(&ProbeOutcome::Booted)).0, Accel::Kvm);
        let (a, why) = decide_accel(Ok(()), Some(&ProbeOutcome::Hung));
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("hung"), "{why}");
        let (a, why) = decide_accel(
            Ok(()),
            Some(&ProbeOutcome::Refused("failed to initialize kvm".into())),
        );
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("failed to initialize kvm"), "{why}");
        assert_eq!(decide_accel(Ok(()), None).0, Accel::Tcg);
    }

    #[test]
    fn probe_image_and_verdict() {
        let img = probe_image();
        let word = |i: usize| u32::from_le_bytes(img[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(
            word(0).wrapping_add(word(1)).wrapping_add(word(2)),
            0,
            "multiboot checksum"
        );
        assert_eq!(word(7), 0x0010_0020, "entry right after the header");
        assert_eq!(probe_verdict(Some(PROBE_EXIT_CODE), ""), ProbeOutcome::Booted);
        assert_eq!(probe_verdict(None, "OK"), ProbeOutcome::Hung);
        assert_eq!(
            probe_verdict(Some(1), "\nqemu: failed to initialize kvm: Permission denied\n"),
            ProbeOutcome::Refused("qemu: failed to initialize kvm: Permission denied".into())
        );
    }
}
