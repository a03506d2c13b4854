//! The NetManager daemon's state and control logic: registration (MQTT session, subnet, host plumbing, dataplane),
//! container attach/detach with addresses and port mappings, the table cache fed by table queries, interests and
//! their expiry, the public-address watcher, and cleanup on shutdown. The HTTP API (`api`) calls into this.

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
        plan::{OVERLAY_V4, OVERLAY_V6, WORKER_SUBNET_V4_PREFIX, WORKER_SUBNET_V6_PREFIX},
    },
    api::netmanager::{ContainerDeployRequest, ContainerDeployResponse, RegisterRequest, UndeployRequest},
    mqtt::net::{
        AddressChanged, InterestRemove, ServiceDeployed, SubnetRequest, SubnetResult, TableQueryRequest,
        TableQueryResult,
    },
    naming::is_valid_name,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::{
    config::Settings,
    conntrack::now_secs,
    dataplane::{Dataplane, DataplaneConfig},
    netlink::{Attach, Netlink, NetnsTarget, veth_names},
    nft::{self, HostRules, PortMapping, parse_port_mappings},
    proxy::{Limits, QueryKey, Shared, Verdict},
    session::{Inbound, Session},
    sysctl,
    table::{Instance, Table},
};

/// How long a table query may take (the reference's 5 s).
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the cluster has to answer the subnet request (the reference's 10 s).
pub const SUBNET_TIMEOUT: Duration = Duration::from_secs(10);
/// A remote job's interest ends after this long without traffic (the reference's 10 s).
pub const INTEREST_TTL: u32 = 10;
/// How often the public address is re-checked when it was detected (the reference's 2 min).
pub const ADDRESS_WATCH: Duration = Duration::from_secs(120);

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
    #[serde(skip)]
    mappings: Vec<PortMapping>,
}

/// Everything that exists once the NodeEngine registered.
#[derive(Debug)]
struct Node {
    node_id: String,
    cluster: String,
    session: Session,
    subnet_v4: WorkerSubnetV4,
    subnet_v6: WorkerSubnetV6,
    pool_v4: NodeAddressV4Pool,
    pool_v6: NodeAddressV6Pool,
    shared: Arc<Shared>,
    dataplane: Dataplane,
    netlink: Netlink,
    locals: BTreeMap<String, Local>,
    veth_counter: u32,
    public: IpAddr,
    mqtt_pump: tokio::task::JoinHandle<()>,
    control: tokio::task::JoinHandle<()>,
}

/// The daemon.
#[derive(Debug)]
pub struct Daemon {
    settings: Settings,
    /// Registration and every deploy/undeploy run one at a time (the reference's serialised deploy queue).
    node: tokio::sync::Mutex<Option<Node>>,
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

impl Daemon {
    /// A daemon waiting for registration.
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            settings,
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

    /// Removes what a previous run that crashed left behind (its veths and bridge are recreated on registration;
    /// the nftables table is replaced then too).
    pub async fn cleanup_leftovers(&self) {
        let path = self.state_file();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let veths: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
        if veths.is_empty() {
            return;
        }
        match Netlink::connect() {
            Ok(nl) => {
                for v in &veths {
                    if let Err(e) = nl.detach(v).await {
                        tracing::warn!(veth = %v, error = %e, "cannot remove a leftover veth");
                    }
                }
                tracing::info!(count = veths.len(), "removed veths left by an earlier run");
            }
            Err(e) => tracing::warn!(error = %e, "cannot open netlink to remove leftovers"),
        }
        let _ = std::fs::remove_file(path);
    }

    fn state_file(&self) -> PathBuf {
        self.settings.state_dir.join("veths.json")
    }

    fn save_veths(&self, node: &Node) {
        let veths: Vec<&str> = node.locals.values().map(|l| l.veth.as_str()).collect();
        let path = self.state_file();
        let write = std::fs::create_dir_all(&self.settings.state_dir)
            .and_then(|()| std::fs::write(&path, serde_json::to_vec(&veths).unwrap_or_default()));
        if let Err(e) = write {
            tracing::warn!(path = %path.display(), error = %e, "cannot record the veths");
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
        let node = self.join(&id, &cluster, mqtt_port, password.as_deref()).await?;
        tracing::info!(
            node = %id, public = %node.public, port = self.settings.public_port, cluster = %cluster, mqtt_port,
            subnet = %node.subnet_v4.network(), subnet_v6 = %node.subnet_v6.network(),
            "STARTUP_CONFIG: Node={}:{} | Cluster={}:{}", node.public, self.settings.public_port, cluster, mqtt_port
        );
        *lock(&self.shared) = Some(node.shared.clone());
        *guard = Some(node);
        Ok(())
    }

    async fn join(
        self: &Arc<Self>,
        id: &str,
        cluster: &str,
        mqtt_port: u16,
        password: Option<&str>,
    ) -> Result<Node, ApiError> {
        let s = &self.settings;
        let netlink = Netlink::connect().map_err(|e| ApiError::Internal(e.to_string()))?;
        let public = match s.public_address {
            Some(a) => a,
            None => self.detect_public(&netlink, cluster).await?,
        };
        let (session, inbound, mqtt_pump) = Session::start(cluster, mqtt_port, id, password);
        let (subnet_tx, subnet_rx) = oneshot::channel();
        *lock(&self.subnet_waiter) = Some(subnet_tx);
        let (query_tx, query_rx) = mpsc::unbounded_channel();
        // The control task runs from here on: it answers the subnet wait below.
        let control = tokio::spawn(self.clone().control(session.clone(), inbound, query_rx));
        session.publish("net/subnet", &SubnetRequest::get());
        let subnet = match tokio::time::timeout(SUBNET_TIMEOUT, subnet_rx).await {
            Ok(Ok(r)) => r,
            _ => {
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
        let shared = Arc::new(Shared::new(
            subnet_v4.network(),
            subnet_v6.network(),
            Limits::default(),
            query_tx,
        ));
        let built = self
            .build_host(&netlink, subnet_v4, subnet_v6, shared.clone())
            .await;
        let dataplane = match built {
            Ok(d) => d,
            Err(e) => {
                self.teardown_host(&netlink).await;
                return Err(abandon(&session, &mqtt_pump, &control, e).await);
            }
        };
        Ok(Node {
            node_id: id.to_owned(),
            cluster: cluster.to_owned(),
            session,
            subnet_v4,
            subnet_v6,
            pool_v4: NodeAddressV4Pool::new(subnet_v4),
            pool_v6: NodeAddressV6Pool::new(subnet_v6),
            shared,
            dataplane,
            netlink,
            locals: BTreeMap::new(),
            veth_counter: 0,
            public,
            mqtt_pump,
            control,
        })
    }

    /// `NodePublicAddress` from the routing table: the default route's source address, else a global address. A
    /// machine with neither whose cluster is on the machine itself (a 1-DOC without any network) gets 127.0.0.1:
    /// no other worker could reach it anyway.
    async fn detect_public(&self, netlink: &Netlink, cluster: &str) -> Result<IpAddr, ApiError> {
        let s = &self.settings;
        let exclude = [s.bridge_name.as_str(), s.tun_name.as_str()];
        match netlink.default_route_v4(&exclude).await {
            Ok(Some((addr, iface))) => {
                tracing::info!(address = %addr, interface = %iface, "detected NodePublicAddress");
                Ok(IpAddr::V4(addr))
            }
            Ok(None) if is_local_host(cluster) => {
                tracing::warn!(cluster = %cluster, "no IPv4 default route and no global IPv4 address, and the cluster is on this machine: NodePublicAddress is 127.0.0.1 (a single-machine setup)");
                Ok(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST))
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

    async fn build_host(
        &self,
        netlink: &Netlink,
        v4: WorkerSubnetV4,
        v6: WorkerSubnetV6,
        shared: Arc<Shared>,
    ) -> Result<Dataplane, String> {
        let s = &self.settings;
        netlink
            .recreate_bridge(
                &s.bridge_name,
                s.mtu,
                v4.bridge(),
                WORKER_SUBNET_V4_PREFIX,
                v6.bridge(),
                WORKER_SUBNET_V6_PREFIX,
            )
            .await
            .map_err(|e| e.to_string())?;
        let mtu = u16::try_from(s.mtu).map_err(|_| format!("MTU {} does not fit a TUN", s.mtu))?;
        let dataplane = Dataplane::start(
            &DataplaneConfig {
                tun_name: s.tun_name.clone(),
                mtu,
                workers: s.workers,
                tunnel_port: s.tunnel_port,
            },
            shared,
        )
        .map_err(|e| e.to_string())?;
        netlink
            .setup_tun(&s.tun_name, s.mtu, 1000, &[OVERLAY_V4], &[OVERLAY_V6])
            .await
            .map_err(|e| e.to_string())?;
        sysctl::host_forwarding_and_rp_filter(&[&s.bridge_name, &s.tun_name]).map_err(|e| e.to_string())?;
        self.apply_rules(v4, v6, &BTreeMap::new()).await?;
        Ok(dataplane)
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
        nft::apply(&nft::render(&rules)).await.map_err(|e| e.to_string())
    }

    async fn teardown_host(&self, netlink: &Netlink) {
        let s = &self.settings;
        if let Err(e) = nft::remove_table(&s.nft_table).await {
            tracing::warn!(error = %e, "cannot remove the nftables table");
        }
        if let Err(e) = netlink.delete_link(&s.bridge_name).await {
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
        if let Err(e) = plumbed {
            let _ = node.pool_v4.free(ns_v4);
            let _ = node.pool_v6.free(ns_v6);
            return Err(e);
        }
        let local = Local {
            job: req.service_name.clone(),
            instance: req.instance_number,
            ns_v4,
            ns_v6,
            veth: host.clone(),
            pid: req.pid,
            ports: req.port_mappings.clone(),
            netns,
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

    #[allow(clippy::too_many_arguments, reason = "the addresses and names of one attach")]
    async fn plumb(
        &self,
        node: &Node,
        host: &str,
        peer: &str,
        pid: i64,
        netns: Option<&str>,
        ns_v4: Ipv4Addr,
        ns_v6: Ipv6Addr,
    ) -> Result<(), ApiError> {
        let target = match netns {
            Some(name) => NetnsTarget::Path(
                Netlink::create_named_netns(name)
                    .await
                    .map_err(|e| ApiError::Internal(format!("cannot create netns {name}: {e}")))?,
            ),
            None => NetnsTarget::Pid(i32::try_from(pid).unwrap_or(-1)),
        };
        let attach = Attach {
            host_name: host.to_owned(),
            peer_name: peer.to_owned(),
            bridge: self.settings.bridge_name.clone(),
            mtu: self.settings.mtu,
            target,
            v4: ns_v4,
            v4_prefix: WORKER_SUBNET_V4_PREFIX,
            gw4: node.subnet_v4.bridge(),
            v6: ns_v6,
            v6_prefix: WORKER_SUBNET_V6_PREFIX,
            gw6: node.subnet_v6.bridge(),
        };
        if let Err(e) = node.netlink.attach(&attach).await {
            if let Some(name) = netns {
                let _ = Netlink::delete_named_netns(name).await;
            }
            return Err(ApiError::Internal(format!("cannot attach pid {pid}: {e}")));
        }
        Ok(())
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

    async fn detach_locked(&self, node: &mut Node, key: &str) {
        let Some(local) = node.locals.remove(key) else {
            return;
        };
        {
            let mut jobs = lock(&self.local_jobs);
            jobs.remove(&IpAddr::V4(local.ns_v4));
            jobs.remove(&IpAddr::V6(local.ns_v6));
        }
        if let Err(e) = node.netlink.detach(&local.veth).await {
            tracing::warn!(veth = %local.veth, error = %e, "cannot remove the veth");
        }
        if let Some(name) = &local.netns {
            let _ = Netlink::delete_named_netns(name).await;
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
                    Some(Inbound::Connected) => {}
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
                shared.table.publish(snap);
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
            let last = lock(&self.table).last_used(&job).unwrap_or(0);
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
            shared.table.publish(snap);
        }
    }

    async fn watch_address(&self) {
        let mut guard = self.node.lock().await;
        let Some(node) = guard.as_mut() else {
            return;
        };
        let Ok(fresh) = self.detect_public(&node.netlink, &node.cluster).await else {
            return;
        };
        if fresh == node.public {
            return;
        }
        tracing::info!(old = %node.public, new = %fresh, "the node's address changed; telling the cluster");
        node.public = fresh;
        for l in node.locals.values() {
            // The full job name (the reference sends only its first part, which the cluster cannot find).
            node.session.publish(
                "net/service/address-changed",
                &AddressChanged::new(&l.job, l.instance, fresh.to_string(), self.settings.public_port),
            );
        }
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
            "workers": self.settings.workers,
            "offload": node.dataplane.offload,
            "instances": node.locals.values().collect::<Vec<_>>(),
            "table": {"jobs": table.job_names().collect::<Vec<_>>(), "instances": table.len()},
            "interests": node.session.interests(),
            "flows": node.shared.conn.len(),
            "parked": lock(&node.shared.pending).len(),
            "counters": {
                "tun_rx": get(&c.tun_rx), "tun_tx": get(&c.tun_tx), "udp_rx": get(&c.udp_rx),
                "udp_tx": get(&c.udp_tx), "dropped": get(&c.dropped), "parked": get(&c.parked),
                "flows": get(&c.flows),
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
        node.dataplane.stop();
        self.teardown_host(&node.netlink).await;
        node.session.disconnect().await;
        node.mqtt_pump.abort();
        node.control.abort();
        let _ = std::fs::remove_file(self.state_file());
        tracing::info!("network state removed");
    }
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
        ..ContainerDeployResponse::default()
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
