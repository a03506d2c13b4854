//! The NetManager daemon's state and control logic: registration (MQTT session, subnet, host plumbing, the TUN
//! dataplane and the eBPF fast path or the fallback from it), container attach/detach with addresses, port
//! mappings and fast-path attachments, unikernel attach (a named namespace where a tap and a bridge make the veth a
//! wire to the QEMU guest, which owns the instance's addresses), the table cache fed by table queries, interests and
//! their expiry, the public-address watcher, and cleanup on shutdown and after a killed run. The HTTP API (`api`)
//! calls into this; every kernel change goes through [`Plumbing`].

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use ipnetwork::{Ipv4Network, Ipv6Network};
use oakestra_protocol::{
    addr::{
        NodeAddressV4Pool, NodeAddressV6Pool, WorkerSubnetV4, WorkerSubnetV6,
        plan::{WORKER_SUBNET_V4_PREFIX, WORKER_SUBNET_V6_PREFIX},
    },
    api::netmanager::{
        ContainerDeployRequest, ContainerDeployResponse, GuestNic, RegisterRequest, UndeployRequest,
    },
    mqtt::net::{
        AddressChanged, InterestRemove, ServiceDeployed, SubnetRequest, SubnetResult, TableQueryRequest,
        TableQueryResult,
    },
    naming::is_valid_name,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::{DataplaneMode, Settings},
    conntrack::now_secs,
    dataplane::DataplaneConfig,
    fastpath::FastPathConfig,
    netlink::{Attach, GuestWiring, NetnsTarget, veth_names},
    nft::{HostRules, PortMapping, parse_port_mappings},
    plumbing::{BridgeSpec, FastPathOps, Kernel, Plumbing},
    proxy::{Limits, QueryKey, Shared, Verdict},
    session::{Inbound, Session},
    table::{Instance, Table},
};
use oakestra_ebpf_common::LocalDest;

/// How long a table query may take (the reference's 5 s).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the cluster has to answer the subnet request (the reference's 10 s).
pub const SUBNET_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a subnet request without an answer is repeated while registering.
const SUBNET_RETRY: Duration = Duration::from_secs(2);
/// A remote job's interest ends after this long without traffic (the reference's 10 s).
pub const INTEREST_TTL: u32 = 10;
/// How often the public address is re-checked when it was detected (the reference's 2 min).
pub const ADDRESS_WATCH: Duration = Duration::from_secs(120);
/// The tap a unikernel's QEMU opens inside the instance's namespace (`-netdev tap,ifname=tap0,script=no`).
pub const GUEST_TAP: &str = "tap0";
/// The bridge joining [`GUEST_TAP`] and the instance's veth peer inside the instance's namespace.
pub const GUEST_BRIDGE: &str = "br0";

/// An API call that failed, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The caller's mistake (400).
    #[error("{0}")]
    BadRequest(String),
    /// Not registered yet (400, as the reference).
    #[error("NetManager is not registered yet: POST /register first")]
    NotRegistered,
    /// Something on this host failed (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            Self::BadRequest(_) | Self::NotRegistered => 400,
            Self::Internal(_) => 500,
        }
    }
}

/// One instance plumbed on this worker.
#[derive(Debug, Clone, Serialize)]
pub struct Local {
    /// Job name.
    pub job: String,
    /// Instance number.
    pub instance: i64,
    /// Namespace IPv4.
    pub ns_v4: Ipv4Addr,
    /// Namespace IPv6.
    pub ns_v6: Ipv6Addr,
    /// Host end of the veth.
    pub veth: String,
    /// The task's pid (0 for unikernels).
    pub pid: i64,
    /// Port mappings (`host:container/proto`).
    pub ports: String,
    /// Named network namespace created for a unikernel.
    pub netns: Option<String>,
    /// How a unikernel guest's NIC is wired (what the deploy answered).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestNic>,
    /// Whether the fast path's container program is attached to the veth.
    pub fast_path: bool,
    #[serde(skip)]
    mappings: Vec<PortMapping>,
}

/// Which dataplane runs, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DataplaneState {
    /// What was asked for (`--dataplane`).
    pub requested: DataplaneMode,
    /// What runs: `ebpf` (the fast path with the TUN proxy as its slow path) or `tun`.
    pub mode: &'static str,
    /// Why the fast path is not running although it was asked for (auto's fallback).
    pub fallback: Option<String>,
    /// The interface tunnel datagrams are decapsulated on in the kernel (None: they all take the slow path).
    pub underlay: Option<String>,
    /// Threads of the TUN dataplane.
    pub workers: usize,
}

/// Everything that exists once the NodeEngine registered.
#[derive(Debug)]
struct Node<P: Plumbing> {
    node_id: String,
    cluster: String,
    session: Session,
    subnet_v4: WorkerSubnetV4,
    subnet_v6: WorkerSubnetV6,
    pool_v4: NodeAddressV4Pool,
    pool_v6: NodeAddressV6Pool,
    shared: Arc<Shared>,
    dataplane: P::Dataplane,
    fast: Option<Arc<P::FastPath>>,
    dataplane_state: DataplaneState,
    locals: BTreeMap<String, Local>,
    veth_counter: u32,
    public: IpAddr,
    mqtt_pump: tokio::task::JoinHandle<()>,
    control: tokio::task::JoinHandle<()>,
}

/// What registration learned before the host is built: who we are, where the cluster is, our subnets.
struct Joined {
    id: String,
    cluster: String,
    session: Session,
    mqtt_pump: tokio::task::JoinHandle<()>,
    control: tokio::task::JoinHandle<()>,
    subnet_v4: WorkerSubnetV4,
    subnet_v6: WorkerSubnetV6,
    queries: mpsc::UnboundedSender<QueryKey>,
    public: IpAddr,
    /// The interface holding `public`, if known.
    public_if: Option<String>,
}

/// The daemon, over the kernel plumbing `P` (the real [`Kernel`] outside tests).
#[derive(Debug)]
pub struct Daemon<P: Plumbing = Kernel> {
    settings: Settings,
    plumbing: P,
    /// Registration and every deploy/undeploy run one at a time (the reference's serialised deploy queue).
    node: tokio::sync::Mutex<Option<Node<P>>>,
    table: Mutex<Table>,
    queries: Mutex<HashMap<String, InFlight>>,
    subnet_waiter: Mutex<Option<oneshot::Sender<SubnetResult>>>,
    /// The dataplane state once registered (kept outside `node` so the control task never waits for a deploy or
    /// for the registration it is helping to finish).
    shared: Mutex<Option<Arc<Shared>>>,
    /// Namespace address → job of every local instance (same reason).
    local_jobs: Mutex<HashMap<IpAddr, String>>,
    started: Instant,
}

#[derive(Debug)]
struct InFlight {
    since: Instant,
    parked: Vec<QueryKey>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Splits and checks `app.appns.svc.svcns`.
pub fn check_job_name(field: &str, name: &str) -> Result<(), ApiError> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() == 4 && parts.iter().all(|p| is_valid_name(p)) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "{field} = {name:?}: must be app.appns.svc.svcns, each part 1-30 letters or digits"
        )))
    }
}

fn local_key(job: &str, instance: i64) -> String {
    format!("{job}.{instance}")
}

/// The MAC address of a container's end of its veth: locally administered (`02`), `4f` ("O"), then the
/// container's IPv4 address, unique on the worker's bridge and stable across restarts.
pub fn container_mac(ns_v4: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ns_v4.octets();
    [0x02, 0x4f, a, b, c, d]
}

/// The bridge's MAC address: as [`container_mac`] of its own address, with `4e` so it never equals a container's.
pub fn bridge_mac(bridge_v4: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = bridge_v4.octets();
    [0x02, 0x4e, a, b, c, d]
}

/// The MAC address of a unikernel's veth peer, a mere bridge port in the instance's namespace: as
/// [`container_mac`], with `4d`, because the guest itself uses [`container_mac`] (the address the fast path and
/// the worker's neighbours deliver to) and the two sit on the same layer-2 segment.
pub fn guest_port_mac(ns_v4: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ns_v4.octets();
    [0x02, 0x4d, a, b, c, d]
}

/// `02:4f:0a:12:00:42`: how QEMU (`-device ...,mac=`) and `ip` write a MAC address.
pub fn mac_text(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

impl Daemon<Kernel> {
    /// A daemon on the real kernel, waiting for registration.
    pub fn new(settings: Settings, plumbing: Kernel) -> Arc<Self> {
        Self::with_plumbing(settings, plumbing)
    }
}

impl<P: Plumbing> Daemon<P> {
    /// A daemon over `plumbing`, waiting for registration.
    pub fn with_plumbing(settings: Settings, plumbing: P) -> Arc<Self> {
        Arc::new(Self {
            settings,
            plumbing,
            node: tokio::sync::Mutex::new(None),
            table: Mutex::new(Table::default()),
            queries: Mutex::new(HashMap::new()),
            subnet_waiter: Mutex::new(None),
            shared: Mutex::new(None),
            local_jobs: Mutex::new(HashMap::new()),
            started: Instant::now(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Removes what a previous run that was killed left behind: its veths and unikernel namespaces (from the state
    /// file; a unikernel deployed again then gets its namespace afresh), and its tc programs on any interface (the
    /// underlay's, which would otherwise keep forwarding with stale maps). The bridge and the nftables table are
    /// replaced on registration anyway.
    pub async fn cleanup_leftovers(&self) {
        let programs = self.plumbing.remove_leftover_programs().await;
        if programs > 0 {
            tracing::info!(
                interfaces = programs,
                "removed eBPF programs left by an earlier run"
            );
        }
        let veths = read_names(&self.state_file());
        for v in &veths {
            if let Err(e) = self.plumbing.detach(v).await {
                tracing::warn!(veth = %v, error = %e, "cannot remove a leftover veth");
            }
        }
        let namespaces = read_names(&self.netns_file());
        for n in &namespaces {
            if let Err(e) = self.plumbing.delete_netns(n).await {
                tracing::warn!(netns = %n, error = %e, "cannot remove a leftover network namespace");
            }
        }
        if !veths.is_empty() || !namespaces.is_empty() {
            tracing::info!(
                veths = veths.len(),
                netns = namespaces.len(),
                "removed veths and unikernel namespaces left by an earlier run"
            );
        }
        let _ = std::fs::remove_file(self.state_file());
        let _ = std::fs::remove_file(self.netns_file());
    }

    /// The host ends of the veths (a JSON array of names, as before unikernels: scripts read it too).
    fn state_file(&self) -> PathBuf {
        self.settings.state_dir.join("veths.json")
    }

    /// The unikernels' named namespaces (a JSON array of names).
    fn netns_file(&self) -> PathBuf {
        self.settings.state_dir.join("netns.json")
    }

    /// Records the veths and unikernel namespaces, for `cleanup_leftovers` after a run that was killed.
    fn save_veths(&self, node: &Node<P>) {
        let veths: Vec<&str> = node.locals.values().map(|l| l.veth.as_str()).collect();
        let namespaces: Vec<&str> = node.locals.values().filter_map(|l| l.netns.as_deref()).collect();
        for (path, names) in [(self.state_file(), veths), (self.netns_file(), namespaces)] {
            let write = std::fs::create_dir_all(&self.settings.state_dir)
                .and_then(|()| std::fs::write(&path, serde_json::to_vec(&names).unwrap_or_default()));
            if let Err(e) = write {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the network state");
            }
        }
    }

    /// `POST /register`.
    pub async fn register(self: &Arc<Self>, req: RegisterRequest) -> Result<(), ApiError> {
        let id = req.client_id.trim().to_owned();
        if id.is_empty()
            || id.len() > 128
            || id.contains(['/', '+', '#'])
            || id.chars().any(char::is_whitespace)
        {
            return Err(ApiError::BadRequest(format!(
                "client_id = {:?}: must be the node id (1-128 characters, no '/', '+', '#' or spaces)",
                req.client_id
            )));
        }
        let mut guard = self.node.lock().await;
        if let Some(node) = guard.as_ref() {
            return if node.node_id == id {
                Ok(())
            } else {
                Err(ApiError::BadRequest(format!(
                    "client_id = {id:?}: already registered as {:?}; restart NetManager to change nodes",
                    node.node_id
                )))
            };
        }
        let cluster = match req.cluster_address.trim() {
            "" => self.settings.cluster_url.clone(),
            c => c.to_owned(),
        };
        if cluster.is_empty() || cluster == "0.0.0.0" {
            return Err(ApiError::BadRequest(format!(
                "cluster_address = {:?}: no cluster address given and none configured (ClusterUrl)",
                req.cluster_address
            )));
        }
        let mqtt_port = req
            .extra
            .get("mqtt_port")
            .and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .unwrap_or(self.settings.mqtt_port);
        let password = req
            .extra
            .get("mqtt_password")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let joined = self.join(&id, &cluster, mqtt_port, password.as_deref()).await?;
        let node = self.build_node(joined).await?;
        tracing::info!(
            node = %id, requested = ?self.settings.dataplane, dataplane = node.dataplane_state.mode,
            underlay = ?node.dataplane_state.underlay, "dataplane running"
        );
        tracing::info!(
            node = %id, public = %node.public, port = self.settings.public_port, cluster = %cluster, mqtt_port,
            subnet = %node.subnet_v4.network(), subnet_v6 = %node.subnet_v6.network(),
            "STARTUP_CONFIG: Node={}:{} | Cluster={}:{}", node.public, self.settings.public_port, cluster, mqtt_port
        );
        *lock(&self.shared) = Some(node.shared.clone());
        *guard = Some(node);
        Ok(())
    }

    /// Joins the cluster's broker and obtains this worker's subnets.
    async fn join(
        self: &Arc<Self>,
        id: &str,
        cluster: &str,
        mqtt_port: u16,
        password: Option<&str>,
    ) -> Result<Joined, ApiError> {
        let s = &self.settings;
        let (public, public_if) = match s.public_address {
            Some(a) => (a, self.plumbing.link_with_address(a).await.ok().flatten()),
            None => {
                let (a, iface) = self.detect_public(cluster).await?;
                (a, iface)
            }
        };
        let (session, inbound, mqtt_pump) = Session::start(cluster, mqtt_port, id, password);
        let (subnet_tx, subnet_rx) = oneshot::channel();
        *lock(&self.subnet_waiter) = Some(subnet_tx);
        let (query_tx, query_rx) = mpsc::unbounded_channel();
        // The control task runs from here on: it answers the subnet wait below.
        let control = tokio::spawn(self.clone().control(session.clone(), inbound, query_rx));
        // Asked again every SUBNET_RETRY (and on every connect, by the control task): the first request can reach
        // the cluster before the subscription to its answer does, and a GET is answered with the same subnet.
        session.publish("net/subnet", &SubnetRequest::get());
        let deadline = tokio::time::Instant::now() + SUBNET_TIMEOUT;
        let mut subnet_rx = subnet_rx;
        let answer = loop {
            match tokio::time::timeout(SUBNET_RETRY, &mut subnet_rx).await {
                Ok(answer) => break answer.ok(),
                Err(_) if tokio::time::Instant::now() >= deadline => break None,
                Err(_) => {
                    tracing::debug!(node = %id, "no subnet yet; asking again");
                    session.publish("net/subnet", &SubnetRequest::get());
                }
            }
        };
        let subnet = match answer {
            Some(r) => r,
            None => {
                let msg = format!(
                    "the cluster at {cluster}:{mqtt_port} did not assign a subnet within {} s",
                    SUBNET_TIMEOUT.as_secs()
                );
                return Err(abandon(&session, &mqtt_pump, &control, msg).await);
            }
        };
        let subnets = subnet
            .address_v4()
            .and_then(|a| Ipv4Network::new(a, WORKER_SUBNET_V4_PREFIX).ok())
            .and_then(|n| WorkerSubnetV4::new(n).ok())
            .zip(
                subnet
                    .address_v6()
                    .and_then(|a| Ipv6Network::new(a, WORKER_SUBNET_V6_PREFIX).ok())
                    .and_then(|n| WorkerSubnetV6::new(n).ok()),
            );
        let Some((subnet_v4, subnet_v6)) = subnets else {
            let msg = format!(
                "the cluster assigned an invalid subnet: address {:?}, addressv6 {:?}",
                subnet.address, subnet.addressv6
            );
            return Err(abandon(&session, &mqtt_pump, &control, msg).await);
        };
        Ok(Joined {
            id: id.to_owned(),
            cluster: cluster.to_owned(),
            session,
            mqtt_pump,
            control,
            subnet_v4,
            subnet_v6,
            queries: query_tx,
            public,
            public_if,
        })
    }

    /// Builds the host side (bridge, TUN dataplane, routes, sysctls, rules) and the fast path as asked; on any
    /// failure undoes it all and leaves the broker.
    async fn build_node(&self, j: Joined) -> Result<Node<P>, ApiError> {
        let shared = Arc::new(Shared::new(
            j.subnet_v4.network(),
            j.subnet_v6.network(),
            Limits::default(),
            j.queries,
        ));
        let built = self
            .build_host(
                j.subnet_v4,
                j.subnet_v6,
                shared.clone(),
                j.public,
                j.public_if.as_deref(),
            )
            .await;
        let (dataplane, fast, dataplane_state) = match built {
            Ok(b) => b,
            Err(e) => {
                self.teardown_host().await;
                return Err(abandon(&j.session, &j.mqtt_pump, &j.control, e).await);
            }
        };
        Ok(Node {
            node_id: j.id,
            cluster: j.cluster,
            session: j.session,
            subnet_v4: j.subnet_v4,
            subnet_v6: j.subnet_v6,
            pool_v4: NodeAddressV4Pool::new(j.subnet_v4),
            pool_v6: NodeAddressV6Pool::new(j.subnet_v6),
            shared,
            dataplane,
            fast,
            dataplane_state,
            locals: BTreeMap::new(),
            veth_counter: 0,
            public: j.public,
            mqtt_pump: j.mqtt_pump,
            control: j.control,
        })
    }

    /// Loads the eBPF fast path and attaches it to the underlay as `--dataplane` asks. `auto` falls back to the
    /// TUN dataplane with one warning naming the reason; `ebpf` fails instead.
    async fn start_fast_path(
        &self,
        public: IpAddr,
        public_if: Option<&str>,
        gateway_mac: [u8; 6],
    ) -> Result<(Option<Arc<P::FastPath>>, DataplaneState), String> {
        let requested = self.settings.dataplane;
        let mut state = DataplaneState {
            requested,
            mode: "tun",
            fallback: None,
            underlay: None,
            workers: self.settings.workers,
        };
        if requested == DataplaneMode::Tun {
            return Ok((None, state));
        }
        // Encapsulation needs this worker's IPv4 underlay address; a loopback one (a 1-DOC without network) has
        // no peers to reach, and its instances all run here.
        let underlay_v4 = match public {
            IpAddr::V4(a) if !a.is_loopback() && !a.is_unspecified() => Some(a),
            _ => None,
        };
        let underlay_if = public_if.filter(|_| underlay_v4.is_some());
        let cfg = FastPathConfig {
            max_flows: self.settings.ebpf_flows,
            tunnel_port: self.settings.tunnel_port,
            underlay_v4,
            gateway_mac,
        };
        let loaded = self.plumbing.load_fastpath(&cfg).and_then(|fast| {
            if let Some(iface) = underlay_if
                && let Err(e) = fast.attach_underlay(iface)
            {
                fast.shutdown();
                return Err(e);
            }
            Ok(fast)
        });
        match loaded {
            Ok(fast) => {
                state.mode = "ebpf";
                state.underlay = underlay_if.map(str::to_owned);
                if public.is_loopback() {
                    // A single machine without network: there are no other workers to reach.
                    tracing::info!(public = %public, "eBPF fast path for local flows only (no underlay)");
                } else if underlay_if.is_none() {
                    tracing::warn!(
                        public = %public,
                        "eBPF fast path: no IPv4 underlay interface for {public}; flows to and from other workers \
                         stay on the TUN path (flows between local containers use the fast path)"
                    );
                }
                Ok((Some(fast), state))
            }
            Err(e) if requested == DataplaneMode::Auto => {
                tracing::warn!(reason = %e, "eBPF fast path unavailable, running the TUN dataplane only: {e}");
                state.fallback = Some(e.to_string());
                Ok((None, state))
            }
            Err(e) => Err(format!("--dataplane ebpf: the eBPF fast path cannot run: {e}")),
        }
    }

    /// `NodePublicAddress` from the routing table: the default route's source address, else a global address. A
    /// machine with neither whose cluster is on the machine itself (a 1-DOC without any network) gets 127.0.0.1:
    /// no other worker could reach it anyway.
    async fn detect_public(&self, cluster: &str) -> Result<(IpAddr, Option<String>), ApiError> {
        let s = &self.settings;
        let exclude = [s.bridge_name.as_str(), s.tun_name.as_str()];
        match self.plumbing.default_route_v4(&exclude).await {
            Ok(Some((addr, iface))) => {
                tracing::info!(address = %addr, interface = %iface, "detected NodePublicAddress");
                Ok((IpAddr::V4(addr), Some(iface)))
            }
            Ok(None) if is_local_host(cluster) => {
                tracing::warn!(cluster = %cluster, "no IPv4 default route and no global IPv4 address, and the cluster is on this machine: NodePublicAddress is 127.0.0.1 (a single-machine setup)");
                Ok((IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), None))
            }
            Ok(None) => Err(ApiError::Internal(
                "cannot detect NodePublicAddress: no IPv4 default route and no global IPv4 address; set \
                 NodePublicAddress in netcfg.json"
                    .to_owned(),
            )),
            Err(e) => Err(ApiError::Internal(format!(
                "cannot detect NodePublicAddress: {e}"
            ))),
        }
    }

    /// The host side, in order: the bridge; the fast path as `--dataplane` asks (its fallback decided); the TUN
    /// dataplane (one thread when the fast path carries established flows and `--workers` is not given: it then
    /// only decides first packets); the TUN's routes, sysctls and rules. A failure undoes what was done except the
    /// bridge and rules (the caller's `teardown_host`).
    async fn build_host(
        &self,
        v4: WorkerSubnetV4,
        v6: WorkerSubnetV6,
        shared: Arc<Shared>,
        public: IpAddr,
        public_if: Option<&str>,
    ) -> Result<(P::Dataplane, Option<Arc<P::FastPath>>, DataplaneState), String> {
        let s = &self.settings;
        let bridge = BridgeSpec {
            name: s.bridge_name.clone(),
            mtu: s.mtu,
            mac: bridge_mac(v4.bridge()),
            v4: (v4.bridge(), WORKER_SUBNET_V4_PREFIX),
            v6: (v6.bridge(), WORKER_SUBNET_V6_PREFIX),
        };
        self.plumbing
            .recreate_bridge(&bridge)
            .await
            .map_err(|e| e.to_string())?;
        let mtu = u16::try_from(s.mtu).map_err(|_| format!("MTU {} does not fit a TUN", s.mtu))?;
        let (fast, state) = self.start_fast_path(public, public_if, bridge.mac).await?;
        let undo_fast = |fast: &Option<Arc<P::FastPath>>| {
            let added = fast.as_ref().and_then(|f| f.shutdown());
            async move {
                if let Some(iface) = added {
                    self.plumbing.remove_clsact_if_empty(&iface).await;
                }
            }
        };
        let workers = match (&fast, s.workers_set) {
            (Some(_), false) => 1,
            _ => s.workers,
        };
        let started = self.plumbing.start_dataplane(
            &DataplaneConfig {
                tun_name: s.tun_name.clone(),
                mtu,
                workers,
                tunnel_port: s.tunnel_port,
            },
            shared.clone(),
        );
        let mut dataplane = match started {
            Ok(d) => d,
            Err(e) => {
                undo_fast(&fast).await;
                return Err(e);
            }
        };
        if let Some(f) = &fast {
            shared.conn.set_mirror(f.clone().mirror(), now_secs());
            // GRO on the tunnel sockets would merge datagrams before tc sees them, so the kernel could not
            // decapsulate them one by one.
            self.plumbing.set_udp_gro(&dataplane, false);
        }
        let rest = async {
            self.plumbing
                .setup_tun(&s.tun_name, s.mtu)
                .await
                .map_err(|e| e.to_string())?;
            self.plumbing
                .enable_forwarding(&[&s.bridge_name, &s.tun_name])
                .map_err(|e| e.to_string())?;
            self.apply_rules(v4, v6, &BTreeMap::new()).await
        };
        if let Err(e) = rest.await {
            self.plumbing.stop_dataplane(&mut dataplane);
            undo_fast(&fast).await;
            return Err(e);
        }
        Ok((dataplane, fast, DataplaneState { workers, ..state }))
    }

    async fn apply_rules(
        &self,
        v4: WorkerSubnetV4,
        v6: WorkerSubnetV6,
        locals: &BTreeMap<String, Local>,
    ) -> Result<(), String> {
        let s = &self.settings;
        let rules = HostRules {
            table: s.nft_table.clone(),
            bridge: s.bridge_name.clone(),
            tun: s.tun_name.clone(),
            subnet_v4: v4.network(),
            subnet_v6: v6.network(),
            mappings: locals
                .values()
                .flat_map(|l| l.mappings.iter().map(|m| (*m, l.ns_v4, l.ns_v6)))
                .collect(),
        };
        self.plumbing.apply_rules(&rules).await.map_err(|e| e.to_string())
    }

    async fn teardown_host(&self) {
        let s = &self.settings;
        if let Err(e) = self.plumbing.remove_rules(&s.nft_table).await {
            tracing::warn!(error = %e, "cannot remove the nftables table");
        }
        if let Err(e) = self.plumbing.delete_link(&s.bridge_name).await {
            tracing::warn!(error = %e, "cannot remove the bridge");
        }
    }

    /// `POST /container/deploy` (`unikernel = false`) and `/unikernel/deploy` (`true`).
    pub async fn deploy(
        self: &Arc<Self>,
        req: ContainerDeployRequest,
        unikernel: bool,
    ) -> Result<ContainerDeployResponse, ApiError> {
        check_job_name("serviceName", &req.service_name)?;
        if req.instance_number < 0 {
            return Err(ApiError::BadRequest(format!(
                "instanceNumber = {}: must be 0 or more",
                req.instance_number
            )));
        }
        if !unikernel && (req.pid <= 0 || i32::try_from(req.pid).is_err()) {
            return Err(ApiError::BadRequest(format!(
                "pid = {}: must be the pid of a process in the container (a positive number)",
                req.pid
            )));
        }
        let mappings =
            parse_port_mappings(&req.port_mappings).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let mut guard = self.node.lock().await;
        let node = guard.as_mut().ok_or(ApiError::NotRegistered)?;
        let key = local_key(&req.service_name, req.instance_number);
        if let Some(existing) = node.locals.get(&key) {
            if existing.pid == req.pid && !unikernel {
                return Ok(response(existing));
            }
            // A new task for the same instance (the NodeEngine re-created it): plumb it afresh.
            self.detach_locked(node, &key).await;
        }
        let ns_v4 = node.pool_v4.allocate().map_err(|e| {
            ApiError::Internal(format!(
                "no IPv4 address left in {}: {e}",
                node.subnet_v4.network()
            ))
        })?;
        let ns_v6 = match node.pool_v6.allocate() {
            Ok(a) => a,
            Err(e) => {
                let _ = node.pool_v4.free(ns_v4);
                return Err(ApiError::Internal(format!(
                    "no IPv6 address left in {}: {e}",
                    node.subnet_v6.network()
                )));
            }
        };
        node.veth_counter = node.veth_counter.wrapping_add(1);
        let (host, peer) = veth_names(node.veth_counter, &key);
        let netns = unikernel.then(|| format!("{}.instance.{}", req.service_name, req.instance_number));
        let plumbed = self
            .plumb(node, &host, &peer, req.pid, netns.as_deref(), ns_v4, ns_v6)
            .await;
        let host_index = match plumbed {
            Ok(i) => i,
            Err(e) => {
                let _ = node.pool_v4.free(ns_v4);
                let _ = node.pool_v6.free(ns_v6);
                return Err(e);
            }
        };
        let fast_path = node
            .fast
            .as_ref()
            .is_some_and(|f| attach_fast_path(f.as_ref(), &host, host_index, ns_v4, ns_v6));
        let local = Local {
            job: req.service_name.clone(),
            instance: req.instance_number,
            ns_v4,
            ns_v6,
            veth: host.clone(),
            pid: req.pid,
            ports: req.port_mappings.clone(),
            guest: netns
                .as_deref()
                .map(|name| guest_nic(node, name, ns_v4, self.settings.mtu)),
            netns,
            fast_path,
            mappings,
        };
        node.locals.insert(key.clone(), local.clone());
        {
            let mut jobs = lock(&self.local_jobs);
            jobs.insert(IpAddr::V4(ns_v4), local.job.clone());
            jobs.insert(IpAddr::V6(ns_v6), local.job.clone());
        }
        if !local.mappings.is_empty()
            && let Err(e) = self
                .apply_rules(node.subnet_v4, node.subnet_v6, &node.locals)
                .await
        {
            self.detach_locked(node, &key).await;
            return Err(ApiError::Internal(format!(
                "port mappings {:?}: {e}",
                req.port_mappings
            )));
        }
        self.save_veths(node);
        node.session.publish(
            "net/service/deployed",
            &ServiceDeployed::new(
                &local.job,
                local.instance,
                ns_v4.to_string(),
                ns_v6.to_string(),
                node.public.to_string(),
                self.settings.public_port,
            ),
        );
        tracing::info!(job = %local.job, instance = local.instance, ns = %ns_v4, ns6 = %ns_v6, veth = %host, "instance attached");
        // Local jobs keep their interest while deployed; fetch our own entry (its instance IP) right away.
        node.session.add_interest(&local.job);
        lock(&self.table).mark_used(&local.job, now_secs());
        self.query(&node.session, &local.job, true, None);
        Ok(response(&local))
    }

    /// Wires one instance: a container's veth peer goes into the namespace of `pid` with the addresses; a
    /// unikernel's (`netns` named) into a new namespace of that name, bare, bridged there to the guest's tap.
    /// Returns the host end's index; on failure leaves nothing behind.
    #[allow(clippy::too_many_arguments, reason = "the addresses and names of one attach")]
    async fn plumb(
        &self,
        node: &Node<P>,
        host: &str,
        peer: &str,
        pid: i64,
        netns: Option<&str>,
        ns_v4: Ipv4Addr,
        ns_v6: Ipv6Addr,
    ) -> Result<u32, ApiError> {
        let target = match netns {
            Some(name) => {
                // This instance's own namespace went with its last detach, so one of this name is a leftover (of a
                // run whose state file was lost): the guest starts from scratch, as a re-deployed container does.
                if let Err(e) = self.plumbing.delete_netns(name).await {
                    tracing::warn!(netns = %name, error = %e, "cannot remove a stale network namespace");
                }
                NetnsTarget::Path(
                    self.plumbing
                        .create_netns(name)
                        .await
                        .map_err(|e| ApiError::Internal(format!("cannot create netns {name}: {e}")))?,
                )
            }
            None => NetnsTarget::Pid(i32::try_from(pid).unwrap_or(-1)),
        };
        let attach = Attach {
            host_name: host.to_owned(),
            peer_name: peer.to_owned(),
            // A guest answers for the instance's addresses with `container_mac`; its bridge port must differ.
            peer_mac: if netns.is_some() {
                guest_port_mac(ns_v4)
            } else {
                container_mac(ns_v4)
            },
            bridge: self.settings.bridge_name.clone(),
            mtu: self.settings.mtu,
            target,
            guest_port: netns.is_some(),
            v4: ns_v4,
            v4_prefix: WORKER_SUBNET_V4_PREFIX,
            gw4: node.subnet_v4.bridge(),
            v6: ns_v6,
            v6_prefix: WORKER_SUBNET_V6_PREFIX,
            gw6: node.subnet_v6.bridge(),
        };
        let index = match self.plumbing.attach(&attach).await {
            Ok(index) => index,
            Err(e) => {
                return Err(match netns {
                    Some(name) => {
                        let _ = self.plumbing.delete_netns(name).await;
                        ApiError::Internal(format!("cannot attach netns {name}: {e}"))
                    }
                    None => ApiError::Internal(format!("cannot attach pid {pid}: {e}")),
                });
            }
        };
        let Some(name) = netns else {
            return Ok(index);
        };
        let wiring = GuestWiring {
            netns: attach.target.path(),
            peer_name: peer.to_owned(),
            tap: GUEST_TAP.to_owned(),
            bridge: GUEST_BRIDGE.to_owned(),
            mtu: self.settings.mtu,
        };
        if let Err(e) = self.plumbing.wire_guest(&wiring).await {
            if let Err(d) = self.plumbing.detach(host).await {
                tracing::warn!(veth = %host, error = %d, "cannot remove the veth of a failed unikernel attach");
            }
            let _ = self.plumbing.delete_netns(name).await;
            return Err(ApiError::Internal(format!(
                "cannot wire the guest's tap {GUEST_TAP} in netns {name}: {e}"
            )));
        }
        Ok(index)
    }

    /// `POST /container/undeploy`, `/docker/undeploy`, `/unikernel/undeploy`: always succeeds once registered.
    pub async fn undeploy(self: &Arc<Self>, req: UndeployRequest) -> Result<(), ApiError> {
        let mut guard = self.node.lock().await;
        let node = guard.as_mut().ok_or(ApiError::NotRegistered)?;
        let key = local_key(&req.service_name, req.instance_number);
        if node.locals.contains_key(&key) {
            self.detach_locked(node, &key).await;
            self.save_veths(node);
            let _ = self
                .apply_rules(node.subnet_v4, node.subnet_v6, &node.locals)
                .await;
        } else {
            tracing::debug!(job = %req.service_name, instance = req.instance_number, "undeploy of an unknown instance");
        }
        Ok(())
    }

    async fn detach_locked(&self, node: &mut Node<P>, key: &str) {
        let Some(local) = node.locals.remove(key) else {
            return;
        };
        {
            let mut jobs = lock(&self.local_jobs);
            jobs.remove(&IpAddr::V4(local.ns_v4));
            jobs.remove(&IpAddr::V6(local.ns_v6));
        }
        if let Some(fast) = &node.fast {
            fast.remove_local(IpAddr::V4(local.ns_v4));
            fast.remove_local(IpAddr::V6(local.ns_v6));
            fast.detach_container(&local.veth);
        }
        if let Err(e) = self.plumbing.detach(&local.veth).await {
            tracing::warn!(veth = %local.veth, error = %e, "cannot remove the veth");
        }
        if let Some(name) = &local.netns {
            let _ = self.plumbing.delete_netns(name).await;
        }
        let _ = node.pool_v4.free(local.ns_v4);
        let _ = node.pool_v6.free(local.ns_v6);
        // Flows of the instance are gone with it.
        let (a4, a6) = (
            crate::packet::addr_bytes(IpAddr::V4(local.ns_v4)),
            crate::packet::addr_bytes(IpAddr::V6(local.ns_v6)),
        );
        let removed = node.shared.conn.retain(|k, a| {
            ![a4, a6]
                .iter()
                .any(|x| *x == k.src_addr || *x == k.dst_addr || *x == a.new_dst)
        });
        tracing::info!(job = %local.job, instance = local.instance, flows = removed, "instance detached");
    }

    /// Publishes a table query for `key` (a job name when `by_name`, else an address) unless one is running;
    /// `parked` names the packets waiting for it.
    fn query(&self, session: &Session, key: &str, by_name: bool, parked: Option<QueryKey>) {
        let mut q = lock(&self.queries);
        if let Some(f) = q.get_mut(key) {
            f.parked.extend(parked);
            return;
        }
        q.insert(
            key.to_owned(),
            InFlight {
                since: Instant::now(),
                parked: parked.into_iter().collect(),
            },
        );
        drop(q);
        let req = if by_name {
            TableQueryRequest::by_name(key)
        } else {
            TableQueryRequest::by_ip(key)
        };
        session.publish("net/tablequery/request", &req);
    }

    /// The control task: broker messages, dataplane misses, timers.
    async fn control(
        self: Arc<Self>,
        session: Session,
        mut inbound: mpsc::UnboundedReceiver<Inbound>,
        mut misses: mpsc::UnboundedReceiver<QueryKey>,
    ) {
        let reinject = match UdpSocket::bind("[::]:0").or_else(|_| UdpSocket::bind("0.0.0.0:0")) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no socket for re-injecting parked packets");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_watch = Instant::now();
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                msg = inbound.recv() => match msg {
                    None => return,
                    Some(Inbound::Subnet(r)) => {
                        if let Some(tx) = lock(&self.subnet_waiter).take() {
                            let _ = tx.send(r);
                        }
                    }
                    Some(Inbound::Table(r)) => self.on_table(&session, r, reinject.as_ref()).await,
                    Some(Inbound::Update(job)) => {
                        tracing::debug!(job = %job, "updates available");
                        self.query(&session, &job, true, None);
                    }
                    Some(Inbound::Connected) => {
                        // Connected while registering: ask now, after the subscriptions the session just made.
                        if lock(&self.subnet_waiter).is_some() {
                            session.publish("net/subnet", &SubnetRequest::get());
                        }
                    }
                    Some(Inbound::Rejected(code)) => {
                        tracing::error!(code = %code, "the cluster broker refused NetManager's credentials");
                    }
                },
                key = misses.recv() => match key {
                    None => return,
                    Some(key) => self.on_miss(&session, key).await,
                },
                _ = tick.tick() => {
                    ticks += 1;
                    self.expire_queries().await;
                    if ticks.is_multiple_of(5) {
                        self.housekeeping(&session).await;
                    }
                    if self.settings.public_address.is_none() && last_watch.elapsed() >= ADDRESS_WATCH {
                        last_watch = Instant::now();
                        self.watch_address().await;
                    }
                }
            }
        }
    }

    async fn on_miss(&self, session: &Session, key: QueryKey) {
        match &key {
            QueryKey::Ip(ip) => self.query(session, &ip.to_string(), false, Some(key.clone())),
            QueryKey::LocalSource(ip) => {
                let job = lock(&self.local_jobs).get(ip).cloned();
                match job {
                    Some(job) => self.query(session, &job, true, Some(key.clone())),
                    None => {
                        // Not one of ours (yet): nothing to resolve; let the packets go.
                        self.drop_parked(&key);
                    }
                }
            }
        }
    }

    fn shared(&self) -> Option<Arc<Shared>> {
        lock(&self.shared).clone()
    }

    fn drop_parked(&self, key: &QueryKey) {
        if let Some(shared) = self.shared() {
            let n = lock(&shared.pending).take(key).len();
            if n > 0 {
                shared
                    .counters
                    .dropped
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    async fn on_table(&self, session: &Session, r: TableQueryResult, reinject: Option<&UdpSocket>) {
        let answered: Vec<(String, InFlight)> = {
            let mut q = lock(&self.queries);
            let keys: Vec<String> = q.keys().filter(|k| r.answers(k)).cloned().collect();
            keys.into_iter()
                .filter_map(|k| q.remove(&k).map(|f| (k, f)))
                .collect()
        };
        let Some(shared) = self.shared() else {
            return;
        };
        let job = r.app_name.clone().filter(|j| !j.is_empty());
        if let Some(job) = &job {
            let port = self.settings.public_port;
            let mut instances = Vec::new();
            for e in &r.instance_list {
                match Instance::from_entry(job, e, port) {
                    Ok(i) => instances.push(i),
                    Err(err) => tracing::debug!(job = %job, error = %err, "table entry skipped"),
                }
            }
            let interested = session.interests().iter().any(|j| j == job) || !answered.is_empty();
            if interested {
                let count = instances.len();
                let snap = {
                    let mut t = lock(&self.table);
                    t.replace_job(job, instances);
                    if !answered.is_empty() {
                        t.mark_used(job, now_secs());
                    }
                    t.snapshot()
                };
                shared.table.publish(snap.clone());
                let pruned = shared.prune(&snap);
                if pruned > 0 {
                    tracing::debug!(job = %job, flows = pruned, "flows to instances that left the table dropped");
                }
                session.add_interest(job);
                tracing::debug!(job = %job, instances = count, "table updated");
            }
        }
        for (key, flight) in answered {
            for parked in flight.parked {
                let packets = lock(&shared.pending).take(&parked);
                if packets.is_empty() {
                    continue;
                }
                tracing::debug!(query = %key, packets = packets.len(), "re-injecting parked packets");
                self.reinject(&shared, packets, reinject);
            }
        }
    }

    /// Runs parked packets through translation again and sends them: to their peer, or to this node's own
    /// tunnel port when the destination is local (a dataplane thread then writes them to the TUN).
    fn reinject(&self, shared: &Shared, packets: Vec<Vec<u8>>, socket: Option<&UdpSocket>) {
        let Some(socket) = socket else {
            return;
        };
        let snap = shared.table.get();
        let now = now_secs();
        let own = SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.settings.tunnel_port);
        let own_v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.settings.tunnel_port);
        let mut queue = packets;
        let mut rounds = 0;
        while let Some(mut pkt) = queue.pop() {
            rounds += 1;
            if rounds > 4096 {
                break;
            }
            let mut released = Vec::new();
            let to = match shared.outgoing(&snap, now, &mut pkt, &mut released) {
                Verdict::Tunnel(to) => Some(to),
                Verdict::Local | Verdict::Loop => Some(own),
                _ => None,
            };
            queue.extend(released);
            if let Some(to) = to
                && socket.send_to(&pkt, to).is_err()
                && to == own
            {
                let _ = socket.send_to(&pkt, own_v4);
            }
        }
    }

    async fn expire_queries(&self) {
        let expired: Vec<(String, InFlight)> = {
            let mut q = lock(&self.queries);
            let keys: Vec<String> = q
                .iter()
                .filter(|(_, f)| f.since.elapsed() >= QUERY_TIMEOUT)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| q.remove(&k).map(|f| (k, f)))
                .collect()
        };
        for (key, flight) in expired {
            tracing::warn!(query = %key, "table query timed out; later packets will query again");
            for parked in flight.parked {
                self.drop_parked(&parked);
            }
        }
    }

    async fn housekeeping(&self, session: &Session) {
        let Some(shared) = self.shared() else {
            return;
        };
        let now = now_secs();
        shared.sweep(now);
        let locals: Vec<String> = lock(&self.local_jobs).values().cloned().collect();
        let mut changed = false;
        for job in session.interests() {
            if locals.contains(&job) {
                continue;
            }
            let mut last = lock(&self.table).last_used(&job).unwrap_or(0);
            if now.saturating_sub(last) >= INTEREST_TTL {
                // The fast path forwards without touching the table's usage clocks: ask it before letting go.
                let targets: Vec<IpAddr> = lock(&self.table).job(&job).map_or_else(Vec::new, |list| {
                    list.iter()
                        .flat_map(|i| [Some(IpAddr::V4(i.ns_v4)), i.ns_v6.map(IpAddr::V6)])
                        .flatten()
                        .collect()
                });
                if let Some(seen) = shared.fast_path_last_use(&targets)
                    && seen > last
                {
                    lock(&self.table).mark_used(&job, seen);
                    last = seen;
                }
            }
            if now.saturating_sub(last) >= INTEREST_TTL {
                session.remove_interest(&job);
                session.publish("net/interest/remove", &InterestRemove::new(&job));
                lock(&self.table).remove_job(&job);
                changed = true;
                tracing::debug!(job = %job, "interest expired");
            }
        }
        if changed {
            let snap = lock(&self.table).snapshot();
            shared.table.publish(snap.clone());
            shared.prune(&snap);
        }
    }

    async fn watch_address(&self) {
        let mut guard = self.node.lock().await;
        let Some(node) = guard.as_mut() else {
            return;
        };
        let Ok((fresh, _)) = self.detect_public(&node.cluster).await else {
            return;
        };
        if fresh == node.public {
            return;
        }
        tracing::info!(old = %node.public, new = %fresh, "the node's address changed; telling the cluster");
        node.public = fresh;
        // Encapsulated packets leave from the new address from now on.
        if let (Some(fast), IpAddr::V4(v4)) = (&node.fast, fresh)
            && let Err(e) = fast.set_underlay_source(v4)
        {
            tracing::warn!(error = %e, "cannot give the eBPF fast path the new underlay address");
        }
        for l in node.locals.values() {
            // The full job name (the reference sends only its first part, which the cluster cannot find).
            node.session.publish(
                "net/service/address-changed",
                &AddressChanged::new(&l.job, l.instance, fresh.to_string(), self.settings.public_port),
            );
        }
    }

    /// What the metrics endpoint exposes; `None` before registration. The fast path's counters (a walk of the BPF
    /// maps) are read off the runtime, after the node's lock is released.
    pub async fn traffic(&self) -> Option<crate::metrics::Traffic> {
        let (mut traffic, fast) = {
            let guard = self.node.lock().await;
            let node = guard.as_ref()?;
            let c = &node.shared.counters;
            let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            let mqtt = node.session.counters();
            let traffic = crate::metrics::Traffic {
                proxy: crate::metrics::ProxyTotals {
                    tun_rx: get(&c.tun_rx),
                    tun_rx_bytes: get(&c.tun_rx_bytes),
                    udp_rx: get(&c.udp_rx),
                    udp_rx_bytes: get(&c.udp_rx_bytes),
                    tun_tx: get(&c.tun_tx),
                    udp_tx: get(&c.udp_tx),
                    dropped: get(&c.dropped),
                    flows_created: get(&c.flows),
                    flows: node.shared.conn.len() as u64,
                },
                fast: None,
                instances: node.locals.len() as u64,
                mqtt_connected: node.session.is_connected(),
                mqtt,
            };
            (traffic, node.fast.clone())
        };
        if let Some(fast) = fast {
            traffic.fast = tokio::task::spawn_blocking(move || fast.stats()).await.ok();
        }
        Some(traffic)
    }

    /// `GET /status`.
    pub async fn status(&self) -> serde_json::Value {
        let guard = self.node.lock().await;
        let uptime = self.started.elapsed().as_secs();
        let Some(node) = guard.as_ref() else {
            return serde_json::json!({"registered": false, "uptime_s": uptime, "socket": self.settings.socket});
        };
        let c = &node.shared.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let table = lock(&self.table);
        serde_json::json!({
            "registered": true,
            "uptime_s": uptime,
            "node_id": node.node_id,
            "cluster": node.cluster,
            "mqtt_connected": node.session.is_connected(),
            "public_address": node.public,
            "public_port": self.settings.public_port,
            "tunnel_port": self.settings.tunnel_port,
            "subnet_v4": node.subnet_v4.network().to_string(),
            "subnet_v6": node.subnet_v6.network().to_string(),
            "workers": node.dataplane_state.workers,
            "offload": self.plumbing.dataplane_offload(&node.dataplane),
            "dataplane": {
                "requested": node.dataplane_state.requested,
                "mode": node.dataplane_state.mode,
                "fallback": node.dataplane_state.fallback,
                "underlay": node.dataplane_state.underlay,
                "ebpf": node.fast.as_ref().map(|f| f.stats()),
                "mirror_errors": node.shared.conn.mirror_errors(),
            },
            "instances": node.locals.values().collect::<Vec<_>>(),
            "table": {"jobs": table.job_names().collect::<Vec<_>>(), "instances": table.len()},
            "interests": node.session.interests(),
            "flows": node.shared.conn.len(),
            "parked": lock(&node.shared.pending).len(),
            "counters": {
                "tun_rx": get(&c.tun_rx), "tun_tx": get(&c.tun_tx), "udp_rx": get(&c.udp_rx),
                "udp_tx": get(&c.udp_tx), "dropped": get(&c.dropped), "parked": get(&c.parked),
                "flows": get(&c.flows), "checksums_completed": get(&c.checksums),
                "segmented": get(&c.segmented),
            },
        })
    }

    /// Undoes everything registration and deploys created: veths, unikernel namespaces, the dataplane (and with
    /// it the TUN), the nftables table, the bridge; leaves the broker.
    pub async fn shutdown(&self) {
        let mut guard = self.node.lock().await;
        let Some(mut node) = guard.take() else {
            return;
        };
        *lock(&self.shared) = None;
        let keys: Vec<String> = node.locals.keys().cloned().collect();
        for k in keys {
            self.detach_locked(&mut node, &k).await;
        }
        if let Some(fast) = node.fast.take()
            && let Some(iface) = fast.shutdown()
        {
            self.plumbing.remove_clsact_if_empty(&iface).await;
        }
        self.plumbing.stop_dataplane(&mut node.dataplane);
        self.teardown_host().await;
        node.session.disconnect().await;
        node.mqtt_pump.abort();
        node.control.abort();
        let _ = std::fs::remove_file(self.state_file());
        let _ = std::fs::remove_file(self.netns_file());
        tracing::info!("network state removed");
    }
}

/// Attaches the fast path's container program to the host end `veth` and records where the container's
/// addresses are; `false` (with a warning) if that failed: the container then works through the TUN path.
fn attach_fast_path<F: FastPathOps + ?Sized>(
    fast: &F,
    veth: &str,
    host_index: u32,
    ns_v4: Ipv4Addr,
    ns_v6: Ipv6Addr,
) -> bool {
    let dest = LocalDest {
        ifindex: host_index,
        mac: container_mac(ns_v4),
        _pad: [0; 2],
    };
    let done = fast
        .set_local(IpAddr::V4(ns_v4), dest)
        .and_then(|()| fast.set_local(IpAddr::V6(ns_v6), dest))
        .and_then(|()| fast.attach_container(veth));
    match done {
        Ok(()) => true,
        Err(e) => {
            fast.remove_local(IpAddr::V4(ns_v4));
            fast.remove_local(IpAddr::V6(ns_v6));
            tracing::warn!(veth = %veth, error = %e, "eBPF fast path not attached; this container's flows take the TUN path");
            false
        }
    }
}

/// The names in a state file written by `save_veths`; none if it is absent, and none (with a warning) if it is not
/// a JSON array of strings.
fn read_names(path: &std::path::Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    serde_json::from_str(&text).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable state file");
        Vec::new()
    })
}

/// Leaves the broker and stops the session and control tasks of a registration that failed half way.
async fn abandon(
    session: &Session,
    pump: &tokio::task::JoinHandle<()>,
    control: &tokio::task::JoinHandle<()>,
    msg: String,
) -> ApiError {
    session.disconnect().await;
    pump.abort();
    control.abort();
    ApiError::Internal(msg)
}

fn response(l: &Local) -> ContainerDeployResponse {
    ContainerDeployResponse {
        service_name: l.job.clone(),
        ns_address: l.ns_v4.to_string(),
        ns_address_v6: l.ns_v6.to_string(),
        guest: l.guest.clone(),
        ..ContainerDeployResponse::default()
    }
}

/// How the guest of the unikernel in namespace `netns` with address `ns_v4` is wired: `plumb` made the tap and the
/// bridge; the guest owns the instance's addresses with [`container_mac`] and routes through the worker bridge.
fn guest_nic<P: Plumbing>(node: &Node<P>, netns: &str, ns_v4: Ipv4Addr, mtu: u32) -> GuestNic {
    GuestNic {
        netns: netns.to_owned(),
        tap: GUEST_TAP.to_owned(),
        mac: mac_text(container_mac(ns_v4)),
        gateway: node.subnet_v4.bridge().to_string(),
        prefix: WORKER_SUBNET_V4_PREFIX,
        gateway_v6: node.subnet_v6.bridge().to_string(),
        prefix_v6: WORKER_SUBNET_V6_PREFIX,
        mtu,
    }
}

/// Whether `host` (a name or address, IPv6 possibly in brackets) is this machine's loopback.
fn is_local_host(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|a| a.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_local_host;

    #[test]
    fn local_hosts_are_loopback_names_and_addresses() {
        for local in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            " LocalHost ",
        ] {
            assert!(is_local_host(local), "{local}");
        }
        for remote in [
            "10.0.0.5",
            "192.0.2.1",
            "fe80::1",
            "cluster.example",
            "",
            "localhost.example",
        ] {
            assert!(!is_local_host(remote), "{remote}");
        }
    }
}

/// The daemon's logic over the recording fake: what registration builds and in which order, the fast path or the
/// fallback from it, attach/detach with the fast path's maps, flows leaving the mirror, leftovers, shutdown.
#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code")]
mod logic_tests {
    use std::{net::IpAddr, sync::Arc};

    use clap::Parser;
    use oakestra_ebpf_common::{FlowKey, proto};
    use oakestra_protocol::{
        addr::{WorkerSubnetV4, WorkerSubnetV6},
        api::netmanager::{ContainerDeployRequest, GuestNic, UndeployRequest},
    };
    use tokio::sync::mpsc;

    use super::*;
    use crate::{
        config::{Cli, NetCfg},
        fastpath::FastPathError,
        plumbing::fake::Recording,
        proxy,
    };

    fn settings(dataplane: &str, state: &std::path::Path) -> Settings {
        let cli = Cli::parse_from([
            "NetManager",
            "--dataplane",
            dataplane,
            "--state-dir",
            state.to_str().unwrap(),
            "--log-file",
            "none",
        ]);
        Settings::from_parts(&cli.run, &NetCfg::default()).unwrap()
    }

    fn joined(public: IpAddr) -> Joined {
        // A session to a port nobody listens on: publishes are queued, nothing is sent.
        let (session, _inbound, mqtt_pump) = Session::start("127.0.0.1", 1, "n1", None);
        let (queries, _rx) = mpsc::unbounded_channel();
        Joined {
            id: "n1".to_owned(),
            cluster: "127.0.0.1".to_owned(),
            session,
            mqtt_pump,
            control: tokio::spawn(async {}),
            subnet_v4: WorkerSubnetV4::new(Ipv4Network::new(Ipv4Addr::new(10, 18, 0, 64), 26).unwrap())
                .unwrap(),
            subnet_v6: WorkerSubnetV6::new(
                Ipv6Network::new(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0x100), 120).unwrap(),
            )
            .unwrap(),
            queries,
            public,
            public_if: Some("eth0".to_owned()),
        }
    }

    /// A daemon over the fake, registered (as `build_node` leaves it) with `dataplane`.
    async fn registered(
        dataplane: &str,
        fast_error: Option<FastPathError>,
    ) -> (Arc<Daemon<Recording>>, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let fake = Recording::default();
        *fake.fast_error.lock().unwrap() = fast_error;
        let d = Daemon::with_plumbing(settings(dataplane, dir.path()), fake);
        let node = d
            .build_node(joined(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))))
            .await
            .unwrap();
        *lock(&d.shared) = Some(node.shared.clone());
        *d.node.lock().await = Some(node);
        (d, dir)
    }

    mod tempdir {
        /// A directory under the system temp dir, removed on drop.
        #[derive(Debug)]
        pub struct Dir(std::path::PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = std::env::temp_dir().join(format!("nm-logic-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }

            pub fn path(&self) -> &std::path::Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn deploy_req(pid: i64) -> ContainerDeployRequest {
        serde_json::from_value(serde_json::json!({
            "pid": pid, "serviceName": "app.test.srv.test", "instanceNumber": 0, "portMappings": ""
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn ebpf_registration_builds_the_host_then_the_fast_path() {
        let (d, _dir) = registered("ebpf", None).await;
        assert_eq!(
            d.plumbing.ops(),
            [
                "recreate_bridge",
                "load_fastpath",
                "start_dataplane",
                "set_udp_gro",
                "setup_tun",
                "enable_forwarding",
                "apply_rules"
            ]
        );
        // With the fast path on, the TUN proxy only decides first packets: one thread.
        assert_eq!(
            d.plumbing.calls_of("start_dataplane"),
            ["start_dataplane goProxyTun mtu 1450 workers 1"]
        );
        // The bridge gets its fixed MAC; the fast path the worker's underlay address and port; GRO goes off.
        assert_eq!(
            d.plumbing.calls_of("recreate_bridge"),
            ["recreate_bridge goProxyBridge [02, 4e, 0a, 12, 00, 41] 10.18.0.65/26"]
        );
        assert_eq!(
            d.plumbing.calls_of("load_fastpath"),
            ["load_fastpath flows 65536 port 50103 underlay Some(192.0.2.7)"]
        );
        assert_eq!(d.plumbing.calls_of("set_udp_gro"), ["set_udp_gro false"]);
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert_eq!(*fast.calls.lock().unwrap(), ["attach_underlay eth0"]);
        let status = d.status().await;
        assert_eq!(status["dataplane"]["mode"], "ebpf");
        assert_eq!(status["dataplane"]["underlay"], "eth0");
        assert!(status["dataplane"]["fallback"].is_null());
    }

    #[tokio::test]
    async fn a_loopback_worker_gets_no_underlay_and_no_encapsulation() {
        let dir = tempdir::Dir::new();
        let d = Daemon::with_plumbing(settings("auto", dir.path()), Recording::default());
        let node = d
            .build_node(joined(IpAddr::V4(Ipv4Addr::LOCALHOST)))
            .await
            .unwrap();
        assert_eq!(node.dataplane_state.mode, "ebpf");
        assert_eq!(node.dataplane_state.underlay, None);
        assert_eq!(
            d.plumbing.calls_of("load_fastpath"),
            ["load_fastpath flows 65536 port 50103 underlay None"]
        );
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert!(fast.calls.lock().unwrap().is_empty(), "no underlay attach");
    }

    #[tokio::test]
    async fn auto_falls_back_to_tun_and_says_why() {
        let reason =
            FastPathError::Permission("loading the object: Operation not permitted (os error 1)".into());
        let (d, _dir) = registered("auto", Some(reason)).await;
        let status = d.status().await;
        assert_eq!(status["dataplane"]["mode"], "tun");
        assert_eq!(status["dataplane"]["requested"], "auto");
        let why = status["dataplane"]["fallback"].as_str().unwrap();
        assert!(why.contains("no permission") && why.contains("CAP_BPF"), "{why}");
        assert!(
            d.plumbing.calls_of("set_udp_gro").is_empty(),
            "GRO stays on for the TUN path"
        );
        // Containers are plumbed as ever, without fast-path attachments.
        let r = d.deploy(deploy_req(42), false).await.unwrap();
        assert_eq!(r.ns_address, "10.18.0.66");
        assert!(
            !d.node
                .lock()
                .await
                .as_ref()
                .unwrap()
                .locals
                .values()
                .next()
                .unwrap()
                .fast_path
        );
    }

    #[tokio::test]
    async fn ebpf_refuses_to_register_without_the_fast_path_and_undoes_the_host() {
        let dir = tempdir::Dir::new();
        let fake = Recording::default();
        *fake.fast_error.lock().unwrap() =
            Some(FastPathError::Kernel("BPF_MAP_TYPE_LRU_HASH: EINVAL".into()));
        let d = Daemon::with_plumbing(settings("ebpf", dir.path()), fake);
        let err = d
            .build_node(joined(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--dataplane ebpf") && err.contains("LRU_HASH"),
            "{err}"
        );
        let ops = d.plumbing.ops();
        let tail: Vec<&str> = ops.iter().rev().take(3).rev().map(String::as_str).collect();
        assert_eq!(
            tail,
            ["load_fastpath", "remove_rules", "delete_link"],
            "nothing started after the refusal: {ops:?}"
        );
    }

    #[tokio::test]
    async fn an_underlay_that_refuses_the_program_means_tun_under_auto() {
        let dir = tempdir::Dir::new();
        let fake = Recording::default();
        fake.fail.lock().unwrap().insert("attach_underlay");
        let d = Daemon::with_plumbing(settings("auto", dir.path()), fake);
        let node = d
            .build_node(joined(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))))
            .await
            .unwrap();
        assert_eq!(node.dataplane_state.mode, "tun");
        assert!(node.dataplane_state.fallback.as_deref().unwrap().contains("eth0"));
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert_eq!(*fast.calls.lock().unwrap(), ["attach_underlay eth0", "shutdown"]);
        assert!(!node.shared.conn.mirrored());
    }

    #[tokio::test]
    async fn the_tun_path_keeps_its_threads_without_the_fast_path_or_when_told() {
        // Fallback: the default thread count (one per core).
        let reason = FastPathError::Kernel("x".into());
        let (d, _dir) = registered("auto", Some(reason)).await;
        let cores = std::thread::available_parallelism().map_or(1, usize::from).min(8);
        assert_eq!(
            d.plumbing.calls_of("start_dataplane"),
            [format!("start_dataplane goProxyTun mtu 1450 workers {cores}")]
        );
        assert_eq!(d.status().await["workers"], cores);
        // `--workers` wins over the fast path's default of one.
        let dir = tempdir::Dir::new();
        let cli = Cli::parse_from([
            "NetManager",
            "--dataplane",
            "ebpf",
            "--workers",
            "3",
            "--state-dir",
            dir.path().to_str().unwrap(),
        ]);
        let settings = Settings::from_parts(&cli.run, &NetCfg::default()).unwrap();
        let d = Daemon::with_plumbing(settings, Recording::default());
        d.build_node(joined(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))))
            .await
            .unwrap();
        assert_eq!(
            d.plumbing.calls_of("start_dataplane"),
            ["start_dataplane goProxyTun mtu 1450 workers 3"]
        );
    }

    #[tokio::test]
    async fn a_failure_after_the_fast_path_loaded_detaches_it_again() {
        let dir = tempdir::Dir::new();
        let fake = Recording::default();
        fake.fail.lock().unwrap().insert("setup_tun");
        let d = Daemon::with_plumbing(settings("ebpf", dir.path()), fake);
        let err = d
            .build_node(joined(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("setup_tun"), "{err}");
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert_eq!(*fast.calls.lock().unwrap(), ["attach_underlay eth0", "shutdown"]);
        let ops = d.plumbing.ops();
        let tail: Vec<&str> = ops.iter().rev().take(4).rev().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "stop_dataplane",
                "remove_clsact_if_empty",
                "remove_rules",
                "delete_link"
            ],
            "{ops:?}"
        );
    }

    #[tokio::test]
    async fn tun_never_loads_the_fast_path() {
        let (d, _dir) = registered("tun", None).await;
        assert!(d.plumbing.calls_of("load_fastpath").is_empty());
        assert_eq!(d.status().await["dataplane"]["mode"], "tun");
    }

    #[tokio::test]
    async fn attach_and_detach_keep_the_fast_path_maps_in_step() {
        let (d, _dir) = registered("ebpf", None).await;
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        let r = d.deploy(deploy_req(42), false).await.unwrap();
        assert_eq!(
            (r.ns_address.as_str(), r.ns_address_v6.as_str()),
            ("10.18.0.66", "fc00::102")
        );
        let attach = d.plumbing.calls_of("attach ");
        assert_eq!(attach.len(), 1);
        assert!(
            attach[0].contains("/proc/42/ns/net") && attach[0].contains("[02, 4f, 0a, 12, 00, 42]"),
            "{attach:?}"
        );
        let veth = attach[0].split_whitespace().nth(1).unwrap().to_owned();
        // Both addresses point at the host end's index (the fake's first is 101) and the container's MAC.
        let v4: IpAddr = "10.18.0.66".parse().unwrap();
        let v6: IpAddr = "fc00::102".parse().unwrap();
        let locals = fast.locals.lock().unwrap().clone();
        assert_eq!(locals.len(), 2);
        assert_eq!(locals[&v4].ifindex, 101);
        assert_eq!(locals[&v4].mac, [0x02, 0x4f, 10, 18, 0, 66]);
        assert_eq!(locals[&v6], locals[&v4]);
        assert_eq!(
            *fast.calls.lock().unwrap(),
            [
                "attach_underlay eth0".to_owned(),
                format!("attach_container {veth}")
            ]
        );

        // A flow of the container, written through the connection table, reaches the mirror; undeploying the
        // container takes its flows out of the kernel too.
        let shared = d.shared().unwrap();
        let key = FlowKey::v4(
            [10, 18, 0, 66],
            [10, 30, 1, 1],
            4000u16.to_be(),
            80u16.to_be(),
            proto::TCP,
        );
        let action = proxy::action(
            "10.30.0.5".parse().unwrap(),
            "10.18.0.130".parse().unwrap(),
            Some("192.0.2.8:50103".parse().unwrap()),
        );
        shared.conn.insert(key, action, now_secs(), Some(0x02)).unwrap();
        assert!(fast.flows.lock().unwrap().contains_key(&key));
        let undeploy: UndeployRequest = serde_json::from_value(
            serde_json::json!({"serviceName": "app.test.srv.test", "instanceNumber": 0}),
        )
        .unwrap();
        d.undeploy(undeploy).await.unwrap();
        assert!(
            fast.flows.lock().unwrap().is_empty(),
            "the container's flows left the flow map"
        );
        assert!(fast.locals.lock().unwrap().is_empty());
        assert_eq!(
            fast.calls.lock().unwrap().last().unwrap(),
            &format!("detach_container {veth}")
        );
        assert_eq!(d.plumbing.calls_of("detach "), [format!("detach {veth}")]);
    }

    #[tokio::test]
    async fn a_failed_attach_leaves_no_map_entry_and_frees_the_addresses() {
        let (d, _dir) = registered("ebpf", None).await;
        d.plumbing.fail.lock().unwrap().insert("attach");
        let err = d.deploy(deploy_req(42), false).await.unwrap_err();
        assert_eq!(err.status(), 500);
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert!(fast.locals.lock().unwrap().is_empty());
        // Both addresses went back to the pools.
        let guard = d.node.lock().await;
        let node = guard.as_ref().unwrap();
        assert!(!node.pool_v4.is_used(Ipv4Addr::new(10, 18, 0, 66)));
        assert!(!node.pool_v6.is_used("fc00::102".parse().unwrap()));
        assert!(node.locals.is_empty());
    }

    const UNIKERNEL_NETNS: &str = "app.test.srv.test.instance.0";

    #[tokio::test]
    async fn a_unikernel_guest_owns_its_addresses_behind_a_tap_and_a_bridge() {
        let (d, dir) = registered("ebpf", None).await;
        let before = d.plumbing.calls.lock().unwrap().len();
        let r = d.deploy(deploy_req(0), true).await.unwrap();
        assert_eq!(
            (r.ns_address.as_str(), r.ns_address_v6.as_str()),
            ("10.18.0.66", "fc00::102")
        );
        assert_eq!(
            r.ns_ipv6(),
            "fc00::102".parse().ok(),
            "a real IPv6 address, not <nil>"
        );
        assert_eq!(
            r.guest,
            Some(GuestNic {
                netns: UNIKERNEL_NETNS.to_owned(),
                tap: "tap0".to_owned(),
                mac: "02:4f:0a:12:00:42".to_owned(),
                gateway: "10.18.0.65".to_owned(),
                prefix: 26,
                gateway_v6: "fc00::101".to_owned(),
                prefix_v6: 120,
                mtu: 1450,
            })
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["guest"]["mac"], "02:4f:0a:12:00:42");
        assert_eq!(json["guest"]["netns"], UNIKERNEL_NETNS);

        // A stale namespace of that name goes first, then: the namespace, the veth with a bare peer whose MAC is
        // not the guest's, and the guest's tap and bridge there.
        let (host, peer) = veth_names(1, "app.test.srv.test.0");
        let calls = d.plumbing.calls.lock().unwrap()[before..].to_vec();
        let path = format!("/run/netns/{UNIKERNEL_NETNS}");
        assert_eq!(
            calls,
            [
                format!("delete_netns {UNIKERNEL_NETNS}"),
                format!("create_netns {UNIKERNEL_NETNS}"),
                format!("attach {host} {path} [02, 4d, 0a, 12, 00, 42] 10.18.0.66 fc00::102 guest-port"),
                format!("wire_guest {path} {peer} tap0 br0 mtu 1450"),
            ]
        );
        // The fast path delivers to the guest's MAC, through the host end like a container's.
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        let v4: IpAddr = "10.18.0.66".parse().unwrap();
        let v6: IpAddr = "fc00::102".parse().unwrap();
        let locals = fast.locals.lock().unwrap().clone();
        assert_eq!(locals[&v4].mac, [0x02, 0x4f, 10, 18, 0, 66]);
        assert_eq!((locals[&v4].ifindex, locals[&v6]), (101, locals[&v4]));
        assert_eq!(
            fast.calls.lock().unwrap().last().unwrap(),
            &format!("attach_container {host}")
        );
        // `status` shows the wiring; the state file names the namespace for a later run to clean up.
        let status = d.status().await;
        assert_eq!(status["instances"][0]["netns"], UNIKERNEL_NETNS);
        assert_eq!(status["instances"][0]["guest"]["tap"], "tap0");
        let saved = |file: &str| -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(dir.path().join(file)).unwrap()).unwrap()
        };
        assert_eq!(saved("veths.json"), serde_json::json!([host]));
        assert_eq!(saved("netns.json"), serde_json::json!([UNIKERNEL_NETNS]));

        // Undeploy: the veth, then the namespace (with the tap and the bridge in it); the maps are empty again.
        let before = d.plumbing.calls.lock().unwrap().len();
        d.undeploy(UndeployRequest::new("app.test.srv.test", 0))
            .await
            .unwrap();
        let calls = d.plumbing.calls.lock().unwrap()[before..].to_vec();
        assert_eq!(
            calls[..2],
            [
                format!("detach {host}"),
                format!("delete_netns {UNIKERNEL_NETNS}")
            ]
        );
        assert!(fast.locals.lock().unwrap().is_empty());
        assert_eq!(saved("veths.json"), serde_json::json!([]));
        assert_eq!(saved("netns.json"), serde_json::json!([]));
    }

    #[tokio::test]
    async fn containers_get_no_guest_and_keep_their_addressed_peer() {
        let (d, _dir) = registered("ebpf", None).await;
        let r = d.deploy(deploy_req(42), false).await.unwrap();
        assert_eq!(r.guest, None);
        assert!(serde_json::to_value(&r).unwrap().get("guest").is_none());
        let attach = d.plumbing.calls_of("attach ");
        assert!(
            attach[0].contains("[02, 4f, 0a, 12, 00, 42]") && !attach[0].contains("guest-port"),
            "{attach:?}"
        );
        assert!(d.plumbing.calls_of("wire_guest").is_empty());
        assert!(d.plumbing.calls_of("create_netns").is_empty());
    }

    #[tokio::test]
    async fn a_unikernel_redeploy_rewires_from_scratch_and_a_failed_wiring_leaves_nothing() {
        let (d, _dir) = registered("ebpf", None).await;
        d.deploy(deploy_req(0), true).await.unwrap();
        let (old_host, _) = veth_names(1, "app.test.srv.test.0");
        let before = d.plumbing.calls.lock().unwrap().len();
        let again = d.deploy(deploy_req(0), true).await.unwrap();
        let ops = d.plumbing.ops()[before..].to_vec();
        assert_eq!(
            ops,
            [
                "detach",
                "delete_netns",
                "delete_netns",
                "create_netns",
                "attach",
                "wire_guest"
            ]
        );
        assert_eq!(d.plumbing.calls_of("detach "), [format!("detach {old_host}")]);
        // The pool hands out the next address: the guest's MAC follows whatever the answer says.
        let v4 = again.ns_ipv4().unwrap();
        assert_eq!(again.guest.unwrap().mac, mac_text(container_mac(v4)));

        // The guest's tap cannot be made: the veth and the namespace go again, the addresses are free.
        d.undeploy(UndeployRequest::new("app.test.srv.test", 0))
            .await
            .unwrap();
        d.plumbing.fail.lock().unwrap().insert("wire_guest");
        let before = d.plumbing.calls.lock().unwrap().len();
        let err = d.deploy(deploy_req(0), true).await.unwrap_err();
        assert_eq!(err.status(), 500);
        assert!(
            err.to_string().contains("tap0") && err.to_string().contains(UNIKERNEL_NETNS),
            "{err}"
        );
        let ops = d.plumbing.ops()[before..].to_vec();
        assert_eq!(
            ops,
            [
                "delete_netns",
                "create_netns",
                "attach",
                "wire_guest",
                "detach",
                "delete_netns"
            ]
        );
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert!(fast.locals.lock().unwrap().is_empty());
        let guard = d.node.lock().await;
        let node = guard.as_ref().unwrap();
        assert!(node.locals.is_empty());
        assert_eq!(
            (node.pool_v4.used_count(), node.pool_v6.used_count()),
            (0, 0),
            "every address went back"
        );
    }

    #[tokio::test]
    async fn unikernel_port_mappings_point_at_the_guest_addresses() {
        let (d, _dir) = registered("ebpf", None).await;
        let mut req = deploy_req(0);
        req.port_mappings = "8080:80/tcp".to_owned();
        d.deploy(req, true).await.unwrap();
        assert_eq!(
            d.plumbing.calls_of("apply_rules").last().unwrap(),
            "apply_rules oakestra mappings 1"
        );
        let guard = d.node.lock().await;
        let local = guard.as_ref().unwrap().locals.values().next().unwrap().clone();
        // The rules are built from the instance's addresses (which the guest owns), never from a link.
        assert_eq!(
            (local.ns_v4, local.ns_v6, local.mappings.len()),
            (Ipv4Addr::new(10, 18, 0, 66), "fc00::102".parse().unwrap(), 1)
        );
    }

    #[tokio::test]
    async fn shutdown_removes_a_unikernel_namespace() {
        let (d, dir) = registered("ebpf", None).await;
        d.deploy(deploy_req(0), true).await.unwrap();
        let before = d.plumbing.calls.lock().unwrap().len();
        d.shutdown().await;
        let calls = d.plumbing.calls.lock().unwrap()[before..].to_vec();
        let (host, _) = veth_names(1, "app.test.srv.test.0");
        assert_eq!(
            calls[..2],
            [
                format!("detach {host}"),
                format!("delete_netns {UNIKERNEL_NETNS}")
            ]
        );
        assert!(!dir.path().join("netns.json").exists());
        assert!(!dir.path().join("veths.json").exists());
    }

    #[tokio::test]
    async fn shutdown_detaches_the_fast_path_before_the_host_goes() {
        let (d, _dir) = registered("ebpf", None).await;
        d.deploy(deploy_req(42), false).await.unwrap();
        let before = d.plumbing.calls.lock().unwrap().len();
        d.shutdown().await;
        let after: Vec<String> = d.plumbing.ops()[before..].to_vec();
        assert_eq!(
            after,
            [
                "detach",
                "remove_clsact_if_empty",
                "stop_dataplane",
                "remove_rules",
                "delete_link"
            ]
        );
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert_eq!(fast.calls.lock().unwrap().last().unwrap(), "shutdown");
    }

    #[tokio::test]
    async fn leftovers_of_a_killed_run_are_removed_before_anything_else() {
        let dir = tempdir::Dir::new();
        std::fs::write(
            dir.path().join("veths.json"),
            r#"["veth0012abcd","veth0013efgh"]"#,
        )
        .unwrap();
        let d = Daemon::with_plumbing(settings("auto", dir.path()), Recording::default());
        d.cleanup_leftovers().await;
        assert_eq!(d.plumbing.ops(), ["remove_leftover_programs", "detach", "detach"]);
        assert!(!dir.path().join("veths.json").exists());
        // With a unikernel: its namespace goes too, so deploying it again makes a fresh one.
        std::fs::write(dir.path().join("veths.json"), r#"["veth001abcd","veth002efgh"]"#).unwrap();
        std::fs::write(dir.path().join("netns.json"), r#"["a.b.c.d.instance.0"]"#).unwrap();
        let d = Daemon::with_plumbing(settings("auto", dir.path()), Recording::default());
        d.cleanup_leftovers().await;
        assert_eq!(
            *d.plumbing.calls.lock().unwrap(),
            [
                "remove_leftover_programs",
                "detach veth001abcd",
                "detach veth002efgh",
                "delete_netns a.b.c.d.instance.0"
            ]
        );
        assert!(!dir.path().join("veths.json").exists());
        assert!(!dir.path().join("netns.json").exists());
        // State files that cannot be read are dropped without touching anything.
        std::fs::write(dir.path().join("veths.json"), r#"{"veths":7}"#).unwrap();
        std::fs::write(dir.path().join("netns.json"), "[1,").unwrap();
        let d = Daemon::with_plumbing(settings("auto", dir.path()), Recording::default());
        d.cleanup_leftovers().await;
        assert_eq!(d.plumbing.ops(), ["remove_leftover_programs"]);
        assert!(!dir.path().join("veths.json").exists());
        assert!(!dir.path().join("netns.json").exists());
        // Without a state file, only the programs are looked for.
        let d = Daemon::with_plumbing(settings("auto", dir.path()), Recording::default());
        d.cleanup_leftovers().await;
        assert_eq!(d.plumbing.ops(), ["remove_leftover_programs"]);
    }

    #[tokio::test]
    async fn a_new_node_address_reaches_the_fast_path() {
        let (d, _dir) = registered("ebpf", None).await;
        *d.plumbing.route.lock().unwrap() = Some((Ipv4Addr::new(192, 0, 2, 9), "eth0".to_owned()));
        d.watch_address().await;
        let fast = d.plumbing.fast.lock().unwrap().clone().unwrap();
        assert_eq!(
            fast.calls.lock().unwrap().last().unwrap(),
            "set_underlay_source 192.0.2.9"
        );
        assert_eq!(d.status().await["public_address"], "192.0.2.9");
    }

    #[test]
    fn macs_are_locally_administered_distinct_and_stable() {
        let c = container_mac(Ipv4Addr::new(10, 18, 0, 66));
        let b = bridge_mac(Ipv4Addr::new(10, 18, 0, 65));
        let g = guest_port_mac(Ipv4Addr::new(10, 18, 0, 66));
        assert_eq!(c, [0x02, 0x4f, 10, 18, 0, 66]);
        assert_eq!(g, [0x02, 0x4d, 10, 18, 0, 66]);
        for mac in [c, b, g] {
            assert_eq!(mac[0] & 0x03, 0x02, "locally administered unicast");
        }
        assert_ne!(bridge_mac(Ipv4Addr::new(10, 18, 0, 66)), c);
        assert_ne!(g, c, "the guest's bridge port never has the guest's MAC");
        assert_eq!(mac_text(c), "02:4f:0a:12:00:42");
        assert_eq!(mac_text([0xff, 0, 0x0a, 0xab, 1, 0x10]), "ff:00:0a:ab:01:10");
    }
}
