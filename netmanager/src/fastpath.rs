//! The eBPF fast path's user-space side: loads the object `build.rs` embeds (programs in `ebpf/programs`), owns
//! its maps, attaches its tc classifiers (clsact, direct action, over netlink) to container veths and to the
//! underlay, mirrors the connection table into the flow map, and reads the programs' counters.
//!
//! Everything that touches the kernel's BPF interfaces is in this module; the daemon sees it through
//! [`crate::plumbing::FastPathOps`], so its logic is tested with a recording fake.
#![allow(unsafe_code)]

use std::{
    collections::HashMap as StdHashMap,
    io,
    net::{IpAddr, Ipv4Addr},
    sync::{Mutex, PoisonError},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        ProgramError, SchedClassifier,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions, TcAttachType},
    },
};
use oakestra_ebpf_common::{
    Config, FlowAction, FlowEntry, FlowKey, LocalDest, LocalKey, config_flags, names, stat,
};
use serde::Serialize;

use crate::conntrack::{FlowMirror, monotonic_coarse_ns, secs_of_monotonic_ns};

/// The object built by `build.rs` (empty when NetManager was built with `OAKESTRA_SKIP_EBPF=1`).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/oakestra-tc"));

/// tc priority of our filters: fixed, so a restarted NetManager finds (and replaces) its own.
const TC_PRIORITY: u16 = 0x4f4b;

/// Whether this binary carries the eBPF object.
pub fn built_in() -> bool {
    !OBJECT.is_empty()
}

/// What the fast path is loaded with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastPathConfig {
    /// Capacity of the flow map (LRU: the least recently used flow goes when it is full; each direction of a
    /// connection is one entry).
    pub max_flows: u32,
    /// The overlay's UDP port on this worker.
    pub tunnel_port: u16,
    /// This worker's IPv4 underlay address; `None`: no in-kernel encapsulation (flows to other workers stay on
    /// the slow path).
    pub underlay_v4: Option<Ipv4Addr>,
    /// MAC address of the container bridge (the gateway containers send to).
    pub gateway_mac: [u8; 6],
}

/// Why the fast path could not be loaded or attached. Every variant says what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FastPathError {
    /// The binary was built with `OAKESTRA_SKIP_EBPF=1`.
    #[error(
        "this NetManager was built without the eBPF object (OAKESTRA_SKIP_EBPF=1); rebuild with nightly + bpf-linker"
    )]
    NotBuilt,
    /// The kernel refused for lack of privilege.
    #[error(
        "no permission to load eBPF programs ({0}): NetManager needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (or root)"
    )]
    Permission(String),
    /// The kernel lacks a map type, program type or helper the fast path uses.
    #[error("the kernel does not support the fast path ({0}); it needs Linux 5.12 or newer with BPF enabled")]
    Kernel(String),
    /// Loading failed for another reason (memory for the maps, a broken object).
    #[error("cannot load the eBPF fast path: {0}")]
    Load(String),
    /// The verifier rejected a program.
    #[error("the kernel's verifier rejected {program}: {log}")]
    Verifier {
        /// The program.
        program: String,
        /// The last lines of the verifier's log.
        log: String,
    },
    /// Attaching a program to an interface failed.
    #[error("cannot attach {program} to {interface}: {reason}")]
    Attach {
        /// The program.
        program: &'static str,
        /// The interface.
        interface: String,
        /// The kernel's answer.
        reason: String,
    },
    /// A map operation failed.
    #[error("eBPF map {map}: {reason}")]
    Map {
        /// The map.
        map: &'static str,
        /// What failed.
        reason: String,
    },
}

/// `ENOTSUPP` (524): the kernel's own "not supported" for BPF, which libc does not export.
const ENOTSUPP: i32 = 524;

/// Classifies an error from loading the object or a program by its errno.
fn load_error(stage: &str, e: &(dyn std::error::Error + 'static)) -> FastPathError {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    let mut errno = None;
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            errno = io.raw_os_error();
        }
        source = s.source();
    }
    let what = format!("{stage}: {e}");
    match errno {
        Some(libc::EPERM) | Some(libc::EACCES) => FastPathError::Permission(what),
        Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP | libc::ENOSYS) => FastPathError::Kernel(what),
        _ => FastPathError::Load(what),
    }
}

/// The last few lines of a verifier log: the part that says why.
fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counters of the programs, summed over CPUs: `[packets, bytes]` per slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Count {
    /// Packets.
    pub packets: u64,
    /// Bytes (GSO super-packets count whole).
    pub bytes: u64,
}

/// What `NetManager status` shows of the fast path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FastPathStats {
    /// Entries in the flow map (each direction of a connection is one).
    pub flows: u64,
    /// Capacity of the flow map.
    pub max_flows: u32,
    /// Containers attached.
    pub containers: usize,
    /// The interface tunnel datagrams are decapsulated on, if attached.
    pub underlay: Option<String>,
    /// Container → network: redirected into a container on this worker.
    pub egress_local: Count,
    /// Container → network: encapsulated to another worker.
    pub egress_encap: Count,
    /// Network → container: decapsulated and delivered.
    pub ingress_decap: Count,
    /// Left to the slow path: container packets not in the flow map.
    pub slow_egress_miss: Count,
    /// Left to the slow path: tunnel datagrams not in the flow map.
    pub slow_ingress_miss: Count,
    /// Left to the slow path: known flows, packets not handled here (TCP SYN/FIN/RST, fragments, no route…).
    pub slow_egress_pass: Count,
    /// Left to the slow path: known tunnel flows not handled here.
    pub slow_ingress_pass: Count,
    /// Dropped because a kernel helper failed half way.
    pub errors: Count,
}

/// The loaded fast path.
pub struct FastPath {
    /// The programs (the maps are taken out of it, below).
    ebpf: Mutex<Ebpf>,
    flows: Mutex<HashMap<MapData, FlowKey, FlowEntry>>,
    locals: Mutex<HashMap<MapData, LocalKey, LocalDest>>,
    stats: PerCpuArray<MapData, [u64; 2]>,
    max_flows: u32,
    /// The configuration map and the value in it.
    config: Mutex<(Array<MapData, Config>, Config)>,
    /// Attached container veths and their links.
    veths: Mutex<StdHashMap<String, SchedClassifierLinkId>>,
    /// The underlay interface, its link, and whether we added its clsact qdisc.
    underlay: Mutex<Option<(String, SchedClassifierLinkId, bool)>>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("max_flows", &self.max_flows)
            .field("veths", &lock(&self.veths).len())
            .field(
                "underlay",
                &lock(&self.underlay).as_ref().map(|(i, _, _)| i.clone()),
            )
            .finish_non_exhaustive()
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, FastPathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(FastPathError::Map {
        map: name,
        reason: "not in the object".to_owned(),
    })?;
    T::try_from(map).map_err(|e| FastPathError::Map {
        map: name,
        reason: e.to_string(),
    })
}

impl FastPath {
    /// Loads the embedded object: creates the maps (the flow map sized `cfg.max_flows`), loads both programs
    /// (the verifier runs here) and writes the configuration. Nothing is attached yet.
    pub fn load(cfg: &FastPathConfig) -> Result<Self, FastPathError> {
        if !built_in() {
            return Err(FastPathError::NotBuilt);
        }
        // Loading allocates megabytes that are garbage right after (the loader parses the kernel's BTF, ~5 MB,
        // when it is created; the object is parsed and relocated): handed back to the system afterwards, with the
        // object's pages in the binary, which are not read again.
        let loaded = Self::load_here(cfg);
        release_startup_memory();
        loaded
    }

    fn load_here(cfg: &FastPathConfig) -> Result<Self, FastPathError> {
        // No kernel BTF: the programs use no CO-RE relocations (only `__sk_buff`, whose offsets the verifier
        // rewrites).
        let mut ebpf = EbpfLoader::new()
            .btf(None)
            .set_max_entries(names::FLOWS, cfg.max_flows.max(16))
            .load(OBJECT)
            .map_err(|e| load_error("loading the object", &e))?;
        for name in [names::FROM_CONTAINER, names::FROM_UNDERLAY] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(FastPathError::Map {
                    map: "programs",
                    reason: format!("{name} is not in the object"),
                })?
                .try_into()
                .map_err(|e: ProgramError| load_error(name, &e))?;
            program.load().map_err(|e| match &e {
                ProgramError::LoadError { verifier_log, .. } => FastPathError::Verifier {
                    program: name.to_owned(),
                    log: tail(&verifier_log.to_string(), 4),
                },
                other => load_error(name, other),
            })?;
        }
        let flows = take(&mut ebpf, names::FLOWS)?;
        let locals = take(&mut ebpf, names::LOCALS)?;
        let stats = take(&mut ebpf, names::STATS)?;
        let mut config: Array<MapData, Config> = take(&mut ebpf, names::CONFIG)?;
        // Encapsulation is switched on when the underlay is attached (its index is known then).
        let value = Config {
            underlay_ifindex: 0,
            tunnel_port: cfg.tunnel_port.to_be(),
            flags: config_flags::ENABLED,
            underlay_v4: cfg.underlay_v4.map_or([0; 4], |a| a.octets()),
            gateway_mac: cfg.gateway_mac,
            _pad: [0; 2],
        };
        config.set(0, value, 0).map_err(|e| FastPathError::Map {
            map: names::CONFIG,
            reason: e.to_string(),
        })?;
        Ok(Self {
            config: Mutex::new((config, value)),
            ebpf: Mutex::new(ebpf),
            flows: Mutex::new(flows),
            locals: Mutex::new(locals),
            stats,
            max_flows: cfg.max_flows.max(16),
            veths: Mutex::new(StdHashMap::new()),
            underlay: Mutex::new(None),
        })
    }

    fn attach(&self, program: &'static str, interface: &str) -> Result<SchedClassifierLinkId, FastPathError> {
        let err = |reason: String| FastPathError::Attach {
            program,
            interface: interface.to_owned(),
            reason,
        };
        let mut ebpf = lock(&self.ebpf);
        let prog: &mut SchedClassifier = ebpf
            .program_mut(program)
            .ok_or_else(|| err("not in the object".to_owned()))?
            .try_into()
            .map_err(|e: ProgramError| err(e.to_string()))?;
        prog.attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: 1,
            }),
        )
        .map_err(|e| err(e.to_string()))
    }

    fn detach(&self, program: &'static str, link: SchedClassifierLinkId) {
        let mut ebpf = lock(&self.ebpf);
        if let Some(prog) = ebpf
            .program_mut(program)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        {
            // The interface may be gone already (a deleted veth takes its filters along).
            let _ = prog.detach(link);
        }
    }

    /// Attaches the container program to the ingress of `veth` (the host end of a container's pair).
    pub fn attach_container(&self, veth: &str) -> Result<(), FastPathError> {
        add_clsact(veth).map_err(|e| FastPathError::Attach {
            program: names::FROM_CONTAINER,
            interface: veth.to_owned(),
            reason: format!("adding the clsact qdisc: {e}"),
        })?;
        let link = self.attach(names::FROM_CONTAINER, veth)?;
        if let Some(old) = lock(&self.veths).insert(veth.to_owned(), link) {
            self.detach(names::FROM_CONTAINER, old);
        }
        Ok(())
    }

    /// Detaches the container program from `veth` (before the veth is deleted, which would drop it anyway).
    pub fn detach_container(&self, veth: &str) {
        if let Some(link) = lock(&self.veths).remove(veth) {
            self.detach(names::FROM_CONTAINER, link);
        }
    }

    /// Attaches the underlay program to the ingress of `iface`, adding a clsact qdisc if there is none (and
    /// remembering that, so [`Self::shutdown`] removes only what it added).
    pub fn attach_underlay(&self, iface: &str) -> Result<(), FastPathError> {
        let created = add_clsact(iface).map_err(|e| FastPathError::Attach {
            program: names::FROM_UNDERLAY,
            interface: iface.to_owned(),
            reason: format!("adding the clsact qdisc: {e}"),
        })?;
        // A NetManager that was killed left its filter: replace it instead of adding a second one.
        let _ = tc::qdisc_detach_program(iface, TcAttachType::Ingress, names::FROM_UNDERLAY);
        let link = self.attach(names::FROM_UNDERLAY, iface)?;
        *lock(&self.underlay) = Some((iface.to_owned(), link, created));
        let index = if_index(iface).map_err(|e| FastPathError::Attach {
            program: names::FROM_UNDERLAY,
            interface: iface.to_owned(),
            reason: format!("no interface index: {e}"),
        })?;
        let mut guard = lock(&self.config);
        let (map, value) = &mut *guard;
        value.underlay_ifindex = index;
        if value.underlay_v4 != [0; 4] {
            value.flags |= config_flags::ENCAP_V4;
        }
        map.set(0, *value, 0).map_err(|e| FastPathError::Map {
            map: names::CONFIG,
            reason: e.to_string(),
        })
    }

    /// Sets the source address of encapsulated packets (the node's address changed).
    pub fn set_underlay_source(&self, v4: Ipv4Addr) -> Result<(), FastPathError> {
        let mut guard = lock(&self.config);
        let (map, value) = &mut *guard;
        value.underlay_v4 = v4.octets();
        map.set(0, *value, 0).map_err(|e| FastPathError::Map {
            map: names::CONFIG,
            reason: e.to_string(),
        })
    }

    /// Writes where the container with namespace address `ns` is.
    pub fn set_local(&self, ns: IpAddr, dest: LocalDest) -> Result<(), FastPathError> {
        lock(&self.locals)
            .insert(local_key(ns), dest, 0)
            .map_err(|e| FastPathError::Map {
                map: names::LOCALS,
                reason: e.to_string(),
            })
    }

    /// Forgets the container with namespace address `ns`.
    pub fn remove_local(&self, ns: IpAddr) {
        let _ = lock(&self.locals).remove(&local_key(ns));
    }

    /// Detaches the underlay program and every container program; returns the underlay interface if its clsact
    /// qdisc was added by us (the caller removes it unless something else is attached to it now). The maps and
    /// programs go when `self` is dropped.
    pub fn shutdown(&self) -> Option<String> {
        let veths: Vec<(String, SchedClassifierLinkId)> = lock(&self.veths).drain().collect();
        for (_, link) in veths {
            self.detach(names::FROM_CONTAINER, link);
        }
        let (iface, link, created) = lock(&self.underlay).take()?;
        self.detach(names::FROM_UNDERLAY, link);
        created.then_some(iface)
    }

    /// The programs' counters and the flow map's size.
    pub fn stats(&self) -> FastPathStats {
        let read = |slot: u32| -> Count {
            self.stats
                .get(&slot, 0)
                .map(|per_cpu| {
                    per_cpu.iter().fold(Count::default(), |c, v| Count {
                        packets: c.packets + v[0],
                        bytes: c.bytes + v[1],
                    })
                })
                .unwrap_or_default()
        };
        let flows = lock(&self.flows).keys().filter(Result::is_ok).count() as u64;
        FastPathStats {
            flows,
            max_flows: self.max_flows,
            containers: lock(&self.veths).len(),
            underlay: lock(&self.underlay).as_ref().map(|(i, _, _)| i.clone()),
            egress_local: read(stat::LOCAL),
            egress_encap: read(stat::ENCAP),
            ingress_decap: read(stat::DECAP),
            slow_egress_miss: read(stat::MISS_OUT),
            slow_ingress_miss: read(stat::MISS_IN),
            slow_egress_pass: read(stat::PASS_OUT),
            slow_ingress_pass: read(stat::PASS_IN),
            errors: read(stat::ERROR),
        }
    }
}

impl FlowMirror for FastPath {
    fn install(&self, key: &FlowKey, action: &FlowAction) -> Result<(), String> {
        lock(&self.flows)
            .insert(key, FlowEntry::new(*action, monotonic_coarse_ns()), 0)
            .map_err(|e| e.to_string())
    }

    fn remove(&self, key: &FlowKey) {
        let _ = lock(&self.flows).remove(key);
    }

    fn last_seen(&self, key: &FlowKey) -> Option<u32> {
        let entry = lock(&self.flows).get(key, 0).ok()?;
        Some(secs_of_monotonic_ns(entry.last_seen_ns))
    }
}

/// Hands what loading left behind back to the system: the free heap of every malloc arena (glibc), and the
/// embedded object's pages of the binary (read once; a private read-only mapping, so dropping them only means a
/// later read would fault them in again from the file).
fn release_startup_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    let page = 4096usize;
    let start = OBJECT.as_ptr() as usize;
    let first = start.div_ceil(page) * page;
    let end = (start + OBJECT.len()) / page * page;
    if end > first {
        // SAFETY: [first, end) lies inside `OBJECT`, a read-only static of the binary's file mapping; MADV_DONTNEED
        // on it discards the resident copies, and any later read faults the same bytes back in from the file.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
        }
    }
}

/// The local-map key of a namespace address.
pub fn local_key(ns: IpAddr) -> LocalKey {
    match ns {
        IpAddr::V4(a) => LocalKey::v4(a.octets()),
        IpAddr::V6(a) => LocalKey::v6(a.octets()),
    }
}

/// The index of interface `name` (`if_nametoindex`).
fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        i => Ok(i),
    }
}

/// Adds a clsact qdisc to `iface`; `Ok(true)` if it was added, `Ok(false)` if one was there.
fn add_clsact(iface: &str) -> io::Result<bool> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes our programs from every interface in `interfaces` (what a NetManager that was killed left behind);
/// returns the interfaces it removed something from. Best effort.
pub fn remove_leftovers(interfaces: &[String]) -> Vec<String> {
    let mut touched = Vec::new();
    for iface in interfaces {
        let mut any = false;
        for program in [names::FROM_UNDERLAY, names::FROM_CONTAINER] {
            any |= tc::qdisc_detach_program(iface, TcAttachType::Ingress, program).is_ok();
        }
        if any {
            touched.push(iface.clone());
        }
    }
    touched
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("loading map FLOWS")]
    struct Wrapper(#[source] io::Error);

    #[test]
    fn load_errors_say_what_to_do_by_their_errno() {
        let e = load_error(
            "loading the object",
            &Wrapper(io::Error::from_raw_os_error(libc::EPERM)),
        );
        assert!(matches!(e, FastPathError::Permission(_)), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains("CAP_BPF") && text.contains("loading the object"),
            "{text}"
        );
        let e = load_error("x", &Wrapper(io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(matches!(e, FastPathError::Kernel(_)), "{e:?}");
        assert!(e.to_string().contains("5.12"));
        let e = load_error("x", &Wrapper(io::Error::from_raw_os_error(ENOTSUPP)));
        assert!(matches!(e, FastPathError::Kernel(_)), "{e:?}");
        let e = load_error("x", &Wrapper(io::Error::from_raw_os_error(libc::ENOMEM)));
        assert!(matches!(e, FastPathError::Load(_)), "{e:?}");
    }

    #[test]
    fn a_verifier_log_is_cut_to_its_last_lines() {
        let log = "0: (b7) r0 = 0\n\n1: (95) exit\nR4 invalid zero-sized read\nprocessed 2 insns\n";
        assert_eq!(tail(log, 2), "R4 invalid zero-sized read | processed 2 insns");
        assert_eq!(tail("", 3), "");
    }

    #[test]
    fn local_keys_carry_the_family() {
        let k4 = local_key("10.18.0.2".parse().unwrap());
        assert_eq!(k4, LocalKey::v4([10, 18, 0, 2]));
        assert_eq!(k4.family, oakestra_ebpf_common::family::V4);
        let k6 = local_key("fc00::2".parse().unwrap());
        assert_eq!(k6.family, oakestra_ebpf_common::family::V6);
        assert_ne!(k4.addr, k6.addr);
    }

    #[test]
    fn this_binary_carries_the_object_unless_built_without_it() {
        // The test suite runs with the eBPF toolchain (scripts/test.sh installs it): an empty object here means
        // the build script skipped it.
        if std::env::var("OAKESTRA_SKIP_EBPF").is_ok_and(|v| v == "1") {
            assert!(!built_in());
            assert!(matches!(
                FastPath::load(&FastPathConfig {
                    max_flows: 1024,
                    tunnel_port: 50103,
                    underlay_v4: None,
                    gateway_mac: [0; 6],
                }),
                Err(FastPathError::NotBuilt)
            ));
        } else {
            assert!(built_in());
            assert_eq!(&OBJECT[..4], b"\x7fELF");
        }
    }
}
