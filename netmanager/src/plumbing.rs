//! The seam between the daemon's logic and the kernel: [`Plumbing`] is every host change the daemon makes (links,
//! addresses, routes, namespaces and a unikernel guest's tap and bridge over netlink; nftables; sysctls; the TUN
//! dataplane; the eBPF fast path and its tc attachments). [`Kernel`] does them for real; the tests' recording fake
//! (`daemon` tests) records them, so the daemon's attach/detach/fallback/cleanup logic is tested without root.

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::Arc,
};

use oakestra_ebpf_common::LocalDest;

use crate::{
    conntrack::FlowMirror,
    dataplane::{Dataplane, DataplaneConfig},
    fastpath::{self, FastPath, FastPathConfig, FastPathError, FastPathStats},
    netlink::{Attach, GuestWiring, Netlink, PlumbError},
    nft::{self, HostRules},
    proxy::Shared,
    sysctl,
};

/// The worker bridge [`Plumbing::recreate_bridge`] makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeSpec {
    /// Its name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its MAC address (set explicitly, so it does not follow its ports').
    pub mac: [u8; 6],
    /// Its IPv4 address and prefix length.
    pub v4: (Ipv4Addr, u8),
    /// Its IPv6 address and prefix length.
    pub v6: (Ipv6Addr, u8),
}

/// The loaded eBPF fast path, as the daemon drives it.
pub trait FastPathOps: Send + Sync + std::fmt::Debug + 'static {
    /// The flow map, as the connection table's mirror.
    fn mirror(self: Arc<Self>) -> Arc<dyn FlowMirror>;
    /// Attaches the container program to the host end `veth` of a container's pair.
    fn attach_container(&self, veth: &str) -> Result<(), FastPathError>;
    /// Detaches it again.
    fn detach_container(&self, veth: &str);
    /// Attaches the underlay program to `iface`.
    fn attach_underlay(&self, iface: &str) -> Result<(), FastPathError>;
    /// Records where the container with namespace address `ns` is.
    fn set_local(&self, ns: IpAddr, dest: LocalDest) -> Result<(), FastPathError>;
    /// Forgets it.
    fn remove_local(&self, ns: IpAddr);
    /// The source address of encapsulated packets (after the node's address changed).
    fn set_underlay_source(&self, v4: Ipv4Addr) -> Result<(), FastPathError>;
    /// Counters and sizes for `status`.
    fn stats(&self) -> FastPathStats;
    /// Detaches everything; returns the interface whose clsact qdisc it added, if any.
    fn shutdown(&self) -> Option<String>;
}

/// Every kernel change the daemon makes. Methods take what they change by name and report errors that say so.
pub trait Plumbing: Send + Sync + 'static {
    /// The running TUN dataplane.
    type Dataplane: Send + Sync + std::fmt::Debug + 'static;
    /// The loaded fast path.
    type FastPath: FastPathOps;

    /// The node's IPv4 address and interface from the routing table (see [`Netlink::default_route_v4`]).
    fn default_route_v4(
        &self,
        exclude: &[&str],
    ) -> impl Future<Output = Result<Option<(Ipv4Addr, String)>, PlumbError>> + Send;
    /// The interface that holds `addr`.
    fn link_with_address(
        &self,
        addr: IpAddr,
    ) -> impl Future<Output = Result<Option<String>, PlumbError>> + Send;
    /// Deletes any link called `b.name` and creates the bridge afresh.
    fn recreate_bridge(&self, b: &BridgeSpec) -> impl Future<Output = Result<(), PlumbError>> + Send;
    /// Deletes link `name`; `Ok(false)` if there was none.
    fn delete_link(&self, name: &str) -> impl Future<Output = Result<bool, PlumbError>> + Send;
    /// Creates the TUN and starts the dataplane threads.
    fn start_dataplane(&self, cfg: &DataplaneConfig, shared: Arc<Shared>) -> Result<Self::Dataplane, String>;
    /// Whether the dataplane's TUN runs with offloads.
    fn dataplane_offload(&self, d: &Self::Dataplane) -> bool;
    /// Stops the dataplane threads (the TUN goes with them).
    fn stop_dataplane(&self, d: &mut Self::Dataplane);
    /// Turns UDP GRO on the tunnel sockets on or off.
    fn set_udp_gro(&self, d: &Self::Dataplane, on: bool);
    /// MTU, queue length, up, and routes of the TUN.
    fn setup_tun(&self, name: &str, mtu: u32) -> impl Future<Output = Result<(), PlumbError>> + Send;
    /// IP forwarding on, reverse-path filtering off on `ifaces`.
    fn enable_forwarding(&self, ifaces: &[&str]) -> Result<(), PlumbError>;
    /// Replaces our nftables table with `rules`.
    fn apply_rules(&self, rules: &HostRules) -> impl Future<Output = Result<(), PlumbError>> + Send;
    /// Removes our nftables table.
    fn remove_rules(&self, table: &str) -> impl Future<Output = Result<(), PlumbError>> + Send;
    /// Creates the veth pair of a container and configures its end; returns the host end's index.
    fn attach(&self, a: &Attach) -> impl Future<Output = Result<u32, PlumbError>> + Send;
    /// Deletes a container's pair by its host end.
    fn detach(&self, host: &str) -> impl Future<Output = Result<(), PlumbError>> + Send;
    /// Creates `/run/netns/<name>`.
    fn create_netns(&self, name: &str) -> impl Future<Output = Result<PathBuf, PlumbError>> + Send;
    /// Deletes `/run/netns/<name>`.
    fn delete_netns(&self, name: &str) -> impl Future<Output = Result<(), PlumbError>> + Send;
    /// Creates a unikernel guest's tap and the bridge joining it to the instance's veth peer inside the guest's
    /// namespace (see [`Netlink::wire_guest`]).
    fn wire_guest(&self, g: &GuestWiring) -> impl Future<Output = Result<(), PlumbError>> + Send;
    /// Loads the eBPF fast path (maps, programs, configuration; nothing attached).
    fn load_fastpath(&self, cfg: &FastPathConfig) -> Result<Arc<Self::FastPath>, FastPathError>;
    /// Removes the clsact qdisc of `iface` unless something is attached to it.
    fn remove_clsact_if_empty(&self, iface: &str) -> impl Future<Output = ()> + Send;
    /// Removes the tc programs a killed NetManager left on any interface of this namespace.
    fn remove_leftover_programs(&self) -> impl Future<Output = usize> + Send;
}

/// The real thing: one rtnetlink connection, `nft`, `/proc/sys`, TUN and BPF syscalls.
#[derive(Debug)]
pub struct Kernel {
    netlink: Netlink,
}

impl Kernel {
    /// Opens the netlink connection (call inside the tokio runtime).
    pub fn connect() -> Result<Self, PlumbError> {
        Ok(Self {
            netlink: Netlink::connect()?,
        })
    }
}

impl FastPathOps for FastPath {
    fn mirror(self: Arc<Self>) -> Arc<dyn FlowMirror> {
        self
    }

    fn attach_container(&self, veth: &str) -> Result<(), FastPathError> {
        FastPath::attach_container(self, veth)
    }

    fn detach_container(&self, veth: &str) {
        FastPath::detach_container(self, veth);
    }

    fn attach_underlay(&self, iface: &str) -> Result<(), FastPathError> {
        FastPath::attach_underlay(self, iface)
    }

    fn set_local(&self, ns: IpAddr, dest: LocalDest) -> Result<(), FastPathError> {
        FastPath::set_local(self, ns, dest)
    }

    fn remove_local(&self, ns: IpAddr) {
        FastPath::remove_local(self, ns);
    }

    fn set_underlay_source(&self, v4: Ipv4Addr) -> Result<(), FastPathError> {
        FastPath::set_underlay_source(self, v4)
    }

    fn stats(&self) -> FastPathStats {
        FastPath::stats(self)
    }

    fn shutdown(&self) -> Option<String> {
        FastPath::shutdown(self)
    }
}

impl Plumbing for Kernel {
    type Dataplane = Dataplane;
    type FastPath = FastPath;

    async fn default_route_v4(&self, exclude: &[&str]) -> Result<Option<(Ipv4Addr, String)>, PlumbError> {
        self.netlink.default_route_v4(exclude).await
    }

    async fn link_with_address(&self, addr: IpAddr) -> Result<Option<String>, PlumbError> {
        self.netlink.link_with_address(addr).await
    }

    async fn recreate_bridge(&self, b: &BridgeSpec) -> Result<(), PlumbError> {
        self.netlink
            .recreate_bridge(&b.name, b.mtu, b.mac, b.v4.0, b.v4.1, b.v6.0, b.v6.1)
            .await
            .map(|_| ())
    }

    async fn delete_link(&self, name: &str) -> Result<bool, PlumbError> {
        self.netlink.delete_link(name).await
    }

    fn start_dataplane(&self, cfg: &DataplaneConfig, shared: Arc<Shared>) -> Result<Dataplane, String> {
        Dataplane::start(cfg, shared).map_err(|e| e.to_string())
    }

    fn dataplane_offload(&self, d: &Dataplane) -> bool {
        d.offload
    }

    fn stop_dataplane(&self, d: &mut Dataplane) {
        d.stop();
    }

    fn set_udp_gro(&self, d: &Dataplane, on: bool) {
        d.set_udp_gro(on);
    }

    async fn setup_tun(&self, name: &str, mtu: u32) -> Result<(), PlumbError> {
        use oakestra_protocol::addr::plan::{OVERLAY_V4, OVERLAY_V6};
        self.netlink
            .setup_tun(name, mtu, 1000, &[OVERLAY_V4], &[OVERLAY_V6])
            .await
    }

    fn enable_forwarding(&self, ifaces: &[&str]) -> Result<(), PlumbError> {
        sysctl::host_forwarding_and_rp_filter(ifaces)
    }

    async fn apply_rules(&self, rules: &HostRules) -> Result<(), PlumbError> {
        nft::apply(&nft::render(rules)).await
    }

    async fn remove_rules(&self, table: &str) -> Result<(), PlumbError> {
        nft::remove_table(table).await
    }

    async fn attach(&self, a: &Attach) -> Result<u32, PlumbError> {
        self.netlink.attach(a).await
    }

    async fn detach(&self, host: &str) -> Result<(), PlumbError> {
        self.netlink.detach(host).await
    }

    async fn create_netns(&self, name: &str) -> Result<PathBuf, PlumbError> {
        Netlink::create_named_netns(name).await
    }

    async fn delete_netns(&self, name: &str) -> Result<(), PlumbError> {
        Netlink::delete_named_netns(name).await
    }

    async fn wire_guest(&self, g: &GuestWiring) -> Result<(), PlumbError> {
        Netlink::wire_guest(g).await
    }

    fn load_fastpath(&self, cfg: &FastPathConfig) -> Result<Arc<FastPath>, FastPathError> {
        FastPath::load(cfg).map(Arc::new)
    }

    async fn remove_clsact_if_empty(&self, iface: &str) {
        match self.netlink.remove_clsact_if_empty(iface).await {
            Ok(true) => tracing::debug!(interface = %iface, "removed the clsact qdisc"),
            Ok(false) => {}
            Err(e) => tracing::warn!(interface = %iface, error = %e, "cannot remove the clsact qdisc"),
        }
    }

    async fn remove_leftover_programs(&self) -> usize {
        let links = match self.netlink.link_names().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list links to remove leftover eBPF programs");
                return 0;
            }
        };
        let touched = fastpath::remove_leftovers(&links);
        for iface in &touched {
            self.remove_clsact_if_empty(iface).await;
        }
        touched.len()
    }
}

/// The recording fake the daemon's unit tests drive: every call is logged as a line (`op args`), operations named
/// in `fail` return an error, and the fast path it "loads" records map writes and attachments.
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test support")]
pub mod fake {
    use std::{
        collections::{BTreeSet, HashMap},
        net::{IpAddr, Ipv4Addr},
        path::PathBuf,
        sync::{Arc, Mutex},
    };

    use oakestra_ebpf_common::{FlowAction, FlowKey, LocalDest};

    use super::{BridgeSpec, FastPathOps, Plumbing};
    use crate::{
        conntrack::FlowMirror,
        dataplane::DataplaneConfig,
        fastpath::{FastPathConfig, FastPathError, FastPathStats},
        netlink::{Attach, GuestWiring, PlumbError},
        nft::HostRules,
        proxy::Shared,
    };

    fn refused(op: &str) -> PlumbError {
        PlumbError::LinkMissing(format!("fake: {op} refused"))
    }

    /// The fake kernel.
    #[derive(Debug, Default)]
    pub struct Recording {
        /// What was called, in order.
        pub calls: Mutex<Vec<String>>,
        /// Operations (by their log name) that fail.
        pub fail: Mutex<BTreeSet<&'static str>>,
        /// What `load_fastpath` returns instead of a fast path.
        pub fast_error: Mutex<Option<FastPathError>>,
        /// The fast path loaded last.
        pub fast: Mutex<Option<Arc<FakeFastPath>>>,
        /// What `default_route_v4` answers.
        pub route: Mutex<Option<(Ipv4Addr, String)>>,
        next_index: Mutex<u32>,
    }

    impl Recording {
        fn log(&self, line: String) {
            self.calls.lock().unwrap().push(line);
        }

        fn check(&self, op: &'static str) -> Result<(), PlumbError> {
            if self.fail.lock().unwrap().contains(op) {
                Err(refused(op))
            } else {
                Ok(())
            }
        }

        /// The calls so far whose line starts with `prefix`.
        pub fn calls_of(&self, prefix: &str) -> Vec<String> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| c.starts_with(prefix))
                .cloned()
                .collect()
        }

        /// The op names of every call so far (the first word of each line).
        pub fn ops(&self) -> Vec<String> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|c| c.split_whitespace().next().unwrap_or_default().to_owned())
                .collect()
        }
    }

    /// The fake TUN dataplane.
    #[derive(Debug)]
    pub struct FakeDataplane {
        /// Whether `stop_dataplane` ran.
        pub stopped: bool,
    }

    impl Plumbing for Recording {
        type Dataplane = FakeDataplane;
        type FastPath = FakeFastPath;

        async fn default_route_v4(&self, exclude: &[&str]) -> Result<Option<(Ipv4Addr, String)>, PlumbError> {
            self.log(format!("default_route_v4 {exclude:?}"));
            Ok(self.route.lock().unwrap().clone())
        }

        async fn link_with_address(&self, addr: IpAddr) -> Result<Option<String>, PlumbError> {
            self.log(format!("link_with_address {addr}"));
            Ok(Some("eth0".to_owned()))
        }

        async fn recreate_bridge(&self, b: &BridgeSpec) -> Result<(), PlumbError> {
            self.log(format!(
                "recreate_bridge {} {:02x?} {}/{}",
                b.name, b.mac, b.v4.0, b.v4.1
            ));
            self.check("recreate_bridge")
        }

        async fn delete_link(&self, name: &str) -> Result<bool, PlumbError> {
            self.log(format!("delete_link {name}"));
            Ok(true)
        }

        fn start_dataplane(
            &self,
            cfg: &DataplaneConfig,
            _shared: Arc<Shared>,
        ) -> Result<FakeDataplane, String> {
            self.log(format!(
                "start_dataplane {} mtu {} workers {}",
                cfg.tun_name, cfg.mtu, cfg.workers
            ));
            self.check("start_dataplane").map_err(|e| e.to_string())?;
            Ok(FakeDataplane { stopped: false })
        }

        fn dataplane_offload(&self, _d: &FakeDataplane) -> bool {
            false
        }

        fn stop_dataplane(&self, d: &mut FakeDataplane) {
            self.log("stop_dataplane".to_owned());
            d.stopped = true;
        }

        fn set_udp_gro(&self, _d: &FakeDataplane, on: bool) {
            self.log(format!("set_udp_gro {on}"));
        }

        async fn setup_tun(&self, name: &str, mtu: u32) -> Result<(), PlumbError> {
            self.log(format!("setup_tun {name} {mtu}"));
            self.check("setup_tun")
        }

        fn enable_forwarding(&self, ifaces: &[&str]) -> Result<(), PlumbError> {
            self.log(format!("enable_forwarding {ifaces:?}"));
            self.check("enable_forwarding")
        }

        async fn apply_rules(&self, rules: &HostRules) -> Result<(), PlumbError> {
            self.log(format!(
                "apply_rules {} mappings {}",
                rules.table,
                rules.mappings.len()
            ));
            self.check("apply_rules")
        }

        async fn remove_rules(&self, table: &str) -> Result<(), PlumbError> {
            self.log(format!("remove_rules {table}"));
            Ok(())
        }

        async fn attach(&self, a: &Attach) -> Result<u32, PlumbError> {
            self.log(format!(
                "attach {} {} {:02x?} {} {}{}",
                a.host_name,
                a.target.path().display(),
                a.peer_mac,
                a.v4,
                a.v6,
                if a.guest_port { " guest-port" } else { "" }
            ));
            self.check("attach")?;
            let mut next = self.next_index.lock().unwrap();
            *next += 1;
            Ok(100 + *next)
        }

        async fn detach(&self, host: &str) -> Result<(), PlumbError> {
            self.log(format!("detach {host}"));
            Ok(())
        }

        async fn create_netns(&self, name: &str) -> Result<PathBuf, PlumbError> {
            self.log(format!("create_netns {name}"));
            self.check("create_netns")?;
            Ok(PathBuf::from("/run/netns").join(name))
        }

        async fn delete_netns(&self, name: &str) -> Result<(), PlumbError> {
            self.log(format!("delete_netns {name}"));
            Ok(())
        }

        async fn wire_guest(&self, g: &GuestWiring) -> Result<(), PlumbError> {
            self.log(format!(
                "wire_guest {} {} {} {} mtu {}",
                g.netns.display(),
                g.peer_name,
                g.tap,
                g.bridge,
                g.mtu
            ));
            self.check("wire_guest")
        }

        fn load_fastpath(&self, cfg: &FastPathConfig) -> Result<Arc<FakeFastPath>, FastPathError> {
            self.log(format!(
                "load_fastpath flows {} port {} underlay {:?}",
                cfg.max_flows, cfg.tunnel_port, cfg.underlay_v4
            ));
            if let Some(e) = self.fast_error.lock().unwrap().clone() {
                return Err(e);
            }
            let fast = Arc::new(FakeFastPath {
                fail_underlay: self.fail.lock().unwrap().contains("attach_underlay"),
                ..FakeFastPath::default()
            });
            *self.fast.lock().unwrap() = Some(fast.clone());
            Ok(fast)
        }

        async fn remove_clsact_if_empty(&self, iface: &str) {
            self.log(format!("remove_clsact_if_empty {iface}"));
        }

        async fn remove_leftover_programs(&self) -> usize {
            self.log("remove_leftover_programs".to_owned());
            0
        }
    }

    /// The fake fast path: records attachments, the local map and the flow map (as the table's mirror).
    #[derive(Debug, Default)]
    pub struct FakeFastPath {
        /// Attachments and shutdown, in order.
        pub calls: Mutex<Vec<String>>,
        /// The local map.
        pub locals: Mutex<HashMap<IpAddr, LocalDest>>,
        /// The flow map, with the "last seen" time tests set.
        pub flows: Mutex<HashMap<FlowKey, (FlowAction, Option<u32>)>>,
        /// Every flow ever written (installs, in order).
        pub installs: Mutex<Vec<FlowKey>>,
        fail_underlay: bool,
    }

    impl FlowMirror for FakeFastPath {
        fn install(&self, key: &FlowKey, action: &FlowAction) -> Result<(), String> {
            self.installs.lock().unwrap().push(*key);
            self.flows.lock().unwrap().insert(*key, (*action, None));
            Ok(())
        }

        fn remove(&self, key: &FlowKey) {
            self.flows.lock().unwrap().remove(key);
        }

        fn last_seen(&self, key: &FlowKey) -> Option<u32> {
            self.flows.lock().unwrap().get(key).and_then(|(_, seen)| *seen)
        }
    }

    impl FastPathOps for FakeFastPath {
        fn mirror(self: Arc<Self>) -> Arc<dyn FlowMirror> {
            self
        }

        fn attach_container(&self, veth: &str) -> Result<(), FastPathError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("attach_container {veth}"));
            Ok(())
        }

        fn detach_container(&self, veth: &str) {
            self.calls
                .lock()
                .unwrap()
                .push(format!("detach_container {veth}"));
        }

        fn attach_underlay(&self, iface: &str) -> Result<(), FastPathError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("attach_underlay {iface}"));
            if self.fail_underlay {
                return Err(FastPathError::Attach {
                    program: "oakestra_from_underlay",
                    interface: iface.to_owned(),
                    reason: "fake: refused".to_owned(),
                });
            }
            Ok(())
        }

        fn set_local(&self, ns: IpAddr, dest: LocalDest) -> Result<(), FastPathError> {
            self.locals.lock().unwrap().insert(ns, dest);
            Ok(())
        }

        fn remove_local(&self, ns: IpAddr) {
            self.locals.lock().unwrap().remove(&ns);
        }

        fn set_underlay_source(&self, v4: Ipv4Addr) -> Result<(), FastPathError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("set_underlay_source {v4}"));
            Ok(())
        }

        fn stats(&self) -> FastPathStats {
            FastPathStats {
                flows: self.flows.lock().unwrap().len() as u64,
                ..FastPathStats::default()
            }
        }

        fn shutdown(&self) -> Option<String> {
            self.calls.lock().unwrap().push("shutdown".to_owned());
            Some("eth0".to_owned())
        }
    }
}
