//! Link plumbing over rtnetlink: the worker bridge, container veth pairs, TUN routes, named network namespaces, a
//! unikernel guest's tap and bridge inside its namespace, the default-route address lookup, and `PlumbError`, the
//! error type shared by `netlink`, `nft` and `sysctl`.
//!
//! Nothing here shells out to `ip`: every change is a netlink request (and a guest's tap, which netlink cannot make,
//! is created with the TUNSETIFF/TUNSETPERSIST ioctls through `tun-rs`). Work inside another network namespace goes
//! through a short-lived thread that first entered that namespace and there opens a second netlink socket or creates
//! the tap (both stay bound to the namespace they were created in), so the daemon's own threads never change
//! namespace.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use futures_util::TryStreamExt;
use ipnetwork::{Ipv4Network, Ipv6Network};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, BridgeStpState, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute,
    LinkFlags, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::packet_route::tc::TcHandle;
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, NetworkNamespace, RouteMessageBuilder,
};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Where named network namespaces are bind-mounted (the iproute2 convention, so `ip netns` sees ours).
pub const NETNS_DIR: &str = "/run/netns";

/// Why a plumbing step (netlink, nftables or sysctl) failed; each variant names what it was working on.
#[derive(Debug, thiserror::Error)]
pub enum PlumbError {
    /// `Netlink::connect` and friends spawn the connection task on the current tokio runtime.
    #[error("no tokio runtime to drive the netlink connection (call from inside a runtime)")]
    NoRuntime,
    /// The netlink socket itself could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused a netlink request.
    #[error("netlink: cannot {op} {target}: {source}")]
    Netlink {
        /// What we tried, e.g. "create bridge".
        op: &'static str,
        /// The link, address or route concerned.
        target: String,
        /// The kernel's answer.
        #[source]
        source: rtnetlink::Error,
    },
    /// A link we need (bridge, TUN, freshly created veth end) is not there.
    #[error("link {0:?} does not exist")]
    LinkMissing(String),
    /// The namespace file of a target could not be opened (typically: the task's pid is gone).
    #[error("cannot open network namespace {path}: {source}")]
    NetnsOpen {
        /// `/proc/<pid>/ns/net` or `/run/netns/<name>`.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `setns` into the target namespace failed.
    #[error("cannot enter network namespace {path}: {source}")]
    NetnsEnter {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The netlink socket inside the target namespace could not be opened.
    #[error("cannot open a netlink socket inside network namespace {path}: {source}")]
    NetnsSocket {
        /// The namespace file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The helper thread that opens sockets inside a namespace could not run.
    #[error("helper thread for network namespace {path}: {reason}")]
    NetnsThread {
        /// The namespace file.
        path: PathBuf,
        /// What went wrong with the thread.
        reason: String,
    },
    /// A named namespace must be a plain file name.
    #[error("invalid network namespace name {0:?} (must be a non-empty file name without '/')")]
    NetnsName(String),
    /// `create_named_netns` does not silently reuse a namespace that may hold stale links.
    #[error("network namespace {0} already exists")]
    NetnsExists(PathBuf),
    /// The guest's tap could not be created inside its namespace.
    #[error("cannot create the persistent tap {name:?} in network namespace {netns}: {source}")]
    Tap {
        /// The tap's name.
        name: String,
        /// The namespace file.
        netns: PathBuf,
        /// Why (the TUNSETIFF/TUNSETPERSIST ioctls' error).
        #[source]
        source: io::Error,
    },
    /// Creating or deleting a named namespace failed.
    #[error("cannot {op} network namespace {name:?}: {source}")]
    Netns {
        /// "create" or "delete".
        op: &'static str,
        /// The namespace name.
        name: String,
        /// Why.
        #[source]
        source: rtnetlink::Error,
    },
    /// Sysctl keys are dotted names below `/proc/sys`; anything that could escape it is refused.
    #[error("invalid sysctl key {0:?}")]
    SysctlKey(String),
    /// Writing a sysctl failed.
    #[error("cannot set sysctl {key} to {value:?}: {source}")]
    SysctlWrite {
        /// The dotted key.
        key: String,
        /// The value we tried to write.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading a sysctl failed.
    #[error("cannot read sysctl {key}: {source}")]
    SysctlRead {
        /// The dotted key.
        key: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `nft` binary could not be run at all.
    #[error("cannot run nft: {0}")]
    NftSpawn(#[source] io::Error),
    /// `nft` ran and rejected the script.
    #[error("nft failed ({status}){}: {stderr}", fmt_nft_line(.line.as_ref()))]
    Nft {
        /// nft's exit status.
        status: String,
        /// What nft printed on stderr (trimmed).
        stderr: String,
        /// The first line nft blamed (1-based number and its text), if it named one.
        line: Option<(usize, String)>,
    },
}

fn fmt_nft_line(line: Option<&(usize, String)>) -> String {
    match line {
        Some((number, text)) => format!(" at script line {number} `{}`", text.trim()),
        None => String::new(),
    }
}

/// Wraps a netlink error with what we were doing and to what.
fn nl_err(op: &'static str, target: impl fmt::Display) -> impl FnOnce(rtnetlink::Error) -> PlumbError {
    let target = target.to_string();
    move |source| PlumbError::Netlink { op, target, source }
}

/// The namespace a container's veth peer goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsTarget {
    /// A task's pid: its namespace is `/proc/<pid>/ns/net`.
    Pid(i32),
    /// A namespace file, e.g. `/run/netns/<name>` from [`Netlink::create_named_netns`].
    Path(PathBuf),
}

impl NetnsTarget {
    /// The namespace file to open.
    pub fn path(&self) -> PathBuf {
        match self {
            Self::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
            Self::Path(path) => path.clone(),
        }
    }
}

/// Everything [`Netlink::attach`] needs to wire one container to the bridge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    /// The host end, enslaved to the bridge (see [`veth_names`]).
    pub host_name: String,
    /// The container end, moved into `target` and configured there under this name.
    pub peer_name: String,
    /// The container end's MAC address (set, not random: the fast path addresses frames to it).
    pub peer_mac: [u8; 6],
    /// The bridge the host end joins.
    pub bridge: String,
    /// MTU of both ends.
    pub mtu: u32,
    /// The container's network namespace.
    pub target: NetnsTarget,
    /// `true` for a unikernel: the peer is only a bridge port for the guest's tap ([`Netlink::wire_guest`] brings it
    /// up), so it stays down, without addresses or routes, and the addressing fields below are not applied (the guest
    /// owns those addresses). `false` for a container: the peer is the container's interface.
    pub guest_port: bool,
    /// The container's IPv4 address and prefix length.
    pub v4: Ipv4Addr,
    /// Prefix length of `v4`.
    pub v4_prefix: u8,
    /// The IPv4 default gateway (the bridge's address).
    pub gw4: Ipv4Addr,
    /// The container's IPv6 address.
    pub v6: Ipv6Addr,
    /// Prefix length of `v6`.
    pub v6_prefix: u8,
    /// The IPv6 default gateway (the bridge's address).
    pub gw6: Ipv6Addr,
}

/// Everything [`Netlink::wire_guest`] needs to join a unikernel guest's tap to its instance's veth peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestWiring {
    /// The instance's namespace file (`/run/netns/<name>`), which already holds the peer.
    pub netns: PathBuf,
    /// The veth peer inside it, attached with [`Attach::guest_port`].
    pub peer_name: String,
    /// The persistent tap to create there, which QEMU opens.
    pub tap: String,
    /// The bridge to create there, joining the peer and the tap.
    pub bridge: String,
    /// MTU of the tap and the bridge (the overlay's, as the veth's).
    pub mtu: u32,
}

/// Linux refuses interface names longer than this (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Room left for the counter in a veth name: `veth0x` (6) + counter + 4 hash characters <= 15.
const COUNTER_MODULUS: u32 = 100_000;

/// Oakestra's veth naming: host end `veth00<counter><h>`, peer `veth01<counter><h>`, where `h` is 4 characters of
/// `[a-z0-9]` derived from `key` (the task or instance id) and `counter` wraps at 100000 so a name never exceeds 15
/// bytes. The hash part is fixed-width, so equal names imply equal counters (mod 100000) and equal hashes.
pub fn veth_names(counter: u32, key: &str) -> (String, String) {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    // FNV-1a: tiny, stable across releases and platforms (names must not change when the daemon restarts).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut h = String::with_capacity(4);
    for _ in 0..4 {
        let digit = usize::try_from(hash % 36).unwrap_or(0);
        h.push(char::from(ALPHABET[digit]));
        hash /= 36;
    }
    let counter = counter % COUNTER_MODULUS;
    (format!("veth00{counter}{h}"), format!("veth01{counter}{h}"))
}

/// One rtnetlink connection, bound to the network namespace of the thread that opened it. The connection task runs
/// on the tokio runtime current at `connect` and is stopped when this value is dropped.
#[derive(Debug)]
pub struct Netlink {
    handle: Handle,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        // The task would end on its own once every handle clone is gone, but only after its next wake-up; aborting
        // closes the socket now, which matters for the per-attach connections inside container namespaces.
        self.connection.abort();
    }
}

impl Netlink {
    /// Opens a netlink connection in the calling thread's network namespace; call from inside a tokio runtime.
    pub fn connect() -> Result<Self, PlumbError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| PlumbError::NoRuntime)?;
        // Creating the socket registers it with the current runtime's reactor (so the runtime must have IO enabled).
        let (connection, handle, _unsolicited) = rtnetlink::new_connection().map_err(PlumbError::Socket)?;
        Ok(Self {
            handle,
            connection: runtime.spawn(connection),
        })
    }

    /// Opens a netlink connection inside the namespace of `ns` (an open namespace file) without moving the caller:
    /// a helper thread enters the namespace, creates the socket and exits; the socket stays in that namespace.
    async fn connect_in(ns: &File, path: &Path) -> Result<Self, PlumbError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| PlumbError::NoRuntime)?;
        let thread_runtime = runtime.clone();
        let thread_path = path.to_owned();
        let (connection, handle, _unsolicited) = in_netns(ns, path, move || {
            // The socket registers with the reactor on creation, so the runtime must be entered here.
            let _entered = thread_runtime.enter();
            rtnetlink::new_connection().map_err(|source| PlumbError::NetnsSocket {
                path: thread_path,
                source,
            })
        })
        .await?;
        Ok(Self {
            handle,
            connection: runtime.spawn(connection),
        })
    }

    /// The index of link `name`, or `None` if there is no such link.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, PlumbError> {
        index_of(&self.handle, name).await
    }

    /// (Re)creates bridge `name`: deletes any existing link of that name, creates the bridge, sets its MTU, adds both
    /// addresses (IPv6 without duplicate address detection) and brings it up. Returns its index.
    #[allow(
        clippy::too_many_arguments,
        reason = "the bridge's settings, each with its own type"
    )]
    pub async fn recreate_bridge(
        &self,
        name: &str,
        mtu: u32,
        mac: [u8; 6],
        v4: Ipv4Addr,
        v4_prefix: u8,
        v6: Ipv6Addr,
        v6_prefix: u8,
    ) -> Result<u32, PlumbError> {
        let h = &self.handle;
        self.delete_link(name).await?;
        // Created down; it comes up once addressed, so nothing ever sees a half-configured bridge.
        h.link()
            .add(LinkMessageBuilder::<LinkBridge>::new(name).build())
            .execute()
            .await
            .map_err(nl_err("create bridge", name))?;
        let index = require_index(h, name).await?;
        // Set after creation (not as a creation attribute) so the kernel records it as chosen by the user and the
        // bridge keeps it instead of following its ports' MTUs.
        // The MAC too: a bridge whose address was never set takes its lowest port's, which changes with every
        // container.
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(mtu)
                    .address(mac.to_vec())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err("set the MTU and MAC of", format!("{name} to {mtu}")))?;
        add_v4(h, index, name, v4, v4_prefix).await?;
        add_v6_nodad(h, index, name, v6, v6_prefix).await?;
        set_up(h, index, name).await?;
        Ok(index)
    }

    /// Deletes link `name` (for a veth end: the pair). `Ok(false)` if it did not exist.
    pub async fn delete_link(&self, name: &str) -> Result<bool, PlumbError> {
        let Some(index) = index_of(&self.handle, name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            // Gone between lookup and delete (e.g. its namespace died): the outcome the caller wanted.
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_err("delete link", name)(e)),
        }
    }

    /// Configures the existing TUN `name`: MTU, transmit queue length, up, and a `dev name` route for each range
    /// (replacing any route to the same prefix, so calling it again is harmless). No addresses go on the TUN.
    pub async fn setup_tun(
        &self,
        name: &str,
        mtu: u32,
        tx_queue_len: u32,
        routes_v4: &[Ipv4Network],
        routes_v6: &[Ipv6Network],
    ) -> Result<(), PlumbError> {
        let h = &self.handle;
        let index = require_index(h, name).await?;
        h.link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(mtu)
                    .txqueuelen(tx_queue_len)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err(
                "set MTU/txqueuelen/up on",
                format!("{name} (mtu {mtu}, txqueuelen {tx_queue_len})"),
            ))?;
        for net in routes_v4 {
            let route = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix())
                .output_interface(index)
                // A gateway-less route to a device is on-link, as `ip route add ... dev` makes it.
                .scope(RouteScope::Link)
                .build();
            let target = format!("{}/{} dev {name}", net.network(), net.prefix());
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl_err("add route", target))?;
        }
        for net in routes_v6 {
            let route = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix())
                .output_interface(index)
                .build();
            let target = format!("{}/{} dev {name}", net.network(), net.prefix());
            h.route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl_err("add route", target))?;
        }
        Ok(())
    }

    /// Wires a container: a veth pair whose host end joins `a.bridge` and whose peer is created directly inside the
    /// target namespace, where it gets both addresses and the default routes (and `lo` comes up); with
    /// [`Attach::guest_port`] the peer is left down and bare for [`Self::wire_guest`]. Returns the host end's
    /// interface index. If anything fails after the pair exists, the host end (and so the pair) is deleted
    /// before the error is returned.
    pub async fn attach(&self, a: &Attach) -> Result<u32, PlumbError> {
        let h = &self.handle;
        // Everything that can be checked before creating links is checked first: then a failure leaves nothing.
        let bridge = index_of(h, &a.bridge)
            .await?
            .ok_or_else(|| PlumbError::LinkMissing(a.bridge.clone()))?;
        let ns_path = a.target.path();
        let ns = File::open(&ns_path).map_err(|source| PlumbError::NetnsOpen {
            path: ns_path.clone(),
            source,
        })?;

        // The peer is born in the container's namespace (IFLA_NET_NS_FD inside the peer's attributes), so it never
        // exists under its name in ours. Only a failure of this request may leave the link alone: the name may
        // belong to another container's pair that we must not delete.
        let peer = LinkUnspec::new_with_name(&a.peer_name)
            .mtu(a.mtu)
            .address(a.peer_mac.to_vec())
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(a.host_name.clone())
            .mtu(a.mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        h.link().add(pair).execute().await.map_err(nl_err(
            "create veth pair",
            format!(
                "{} / {} (peer in {})",
                a.host_name,
                a.peer_name,
                ns_path.display()
            ),
        ))?;

        match self.configure_attached(a, bridge, &ns, &ns_path).await {
            Ok(index) => Ok(index),
            Err(e) => {
                if let Err(cleanup) = self.delete_link(&a.host_name).await {
                    tracing::warn!(link = %a.host_name, error = %cleanup, "could not remove the veth pair of a failed attach");
                }
                Err(e)
            }
        }
    }

    /// The steps of `attach` after the pair exists; returns the host end's index.
    async fn configure_attached(
        &self,
        a: &Attach,
        bridge: u32,
        ns: &File,
        ns_path: &Path,
    ) -> Result<u32, PlumbError> {
        let h = &self.handle;
        let host = require_index(h, &a.host_name).await?;
        h.link()
            .set(LinkUnspec::new_with_index(host).controller(bridge).up().build())
            .execute()
            .await
            .map_err(nl_err(
                "enslave and bring up",
                format!("{} (bridge {})", a.host_name, a.bridge),
            ))?;

        let inside = Self::connect_in(ns, ns_path).await?;
        let c = &inside.handle;
        let lo = require_index(c, "lo").await?;
        set_up(c, lo, "lo").await?;
        let peer = require_index(c, &a.peer_name).await?;
        if a.guest_port {
            // Down until `wire_guest` turned off its IPv6 address generation: coming up now would give it a
            // link-local address, and the namespace itself must send nothing the guest did not.
            return Ok(host);
        }
        set_up(c, peer, &a.peer_name).await?;
        add_v4(c, peer, &a.peer_name, a.v4, a.v4_prefix).await?;
        add_v6_nodad(c, peer, &a.peer_name, a.v6, a.v6_prefix).await?;
        let default_v4 = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(a.gw4)
            .output_interface(peer)
            .build();
        c.route()
            .add(default_v4)
            .replace()
            .execute()
            .await
            .map_err(nl_err(
                "add route",
                format!("0.0.0.0/0 via {} dev {}", a.gw4, a.peer_name),
            ))?;
        let default_v6 = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(a.gw6)
            .output_interface(peer)
            .build();
        c.route()
            .add(default_v6)
            .replace()
            .execute()
            .await
            .map_err(nl_err(
                "add route",
                format!("::/0 via {} dev {}", a.gw6, a.peer_name),
            ))?;
        Ok(host)
    }

    /// Removes the clsact qdisc of link `name` when no filter is attached to either of its hooks; `Ok(false)`
    /// when it stayed (a filter of someone else, or no such link).
    pub async fn remove_clsact_if_empty(&self, name: &str) -> Result<bool, PlumbError> {
        let h = &self.handle;
        let Some(index) = index_of(h, name).await? else {
            return Ok(false);
        };
        let index = i32::try_from(index).unwrap_or(i32::MAX);
        let ingress: Vec<_> = h
            .traffic_filter(index)
            .get()
            .ingress()
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        let egress: Vec<_> = h
            .traffic_filter(index)
            .get()
            .egress()
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        if !ingress.is_empty() || !egress.is_empty() {
            return Ok(false);
        }
        let mut req = h.qdisc().del(index);
        // TC_H_CLSACT (ffff:fff1), handle ffff:0: what `tc qdisc del dev X clsact` sends.
        req.message_mut().header.parent = TcHandle {
            major: 0xffff,
            minor: 0xfff1,
        };
        req.message_mut().header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::EINVAL)) => Ok(false),
            Err(e) => Err(nl_err("delete the clsact qdisc of", name)(e)),
        }
    }

    /// The names of every link in this network namespace.
    pub async fn link_names(&self) -> Result<Vec<String>, PlumbError> {
        Ok(list_links(&self.handle)
            .await?
            .into_iter()
            .map(|l| l.name)
            .collect())
    }

    /// The MAC address of link `name`.
    pub async fn mac_of(&self, name: &str) -> Result<[u8; 6], PlumbError> {
        let mut reply = self.handle.link().get().match_name(name.to_owned()).execute();
        let msg = reply
            .try_next()
            .await
            .map_err(nl_err("look up link", name))?
            .ok_or_else(|| PlumbError::LinkMissing(name.to_owned()))?;
        msg.attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| PlumbError::LinkMissing(format!("{name} (no MAC address)")))
    }

    /// The name of the link that holds address `addr`, if any.
    pub async fn link_with_address(&self, addr: IpAddr) -> Result<Option<String>, PlumbError> {
        let h = &self.handle;
        let messages = address_messages(h).await?;
        let index = messages.iter().find_map(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == addr))
                .then_some(m.header.index)
        });
        let Some(index) = index else {
            return Ok(None);
        };
        Ok(list_links(h)
            .await?
            .into_iter()
            .find(|l| l.index == index)
            .map(|l| l.name))
    }

    /// Removes a container's veth pair by its host end; an absent pair is fine.
    pub async fn detach(&self, host_name: &str) -> Result<(), PlumbError> {
        self.delete_link(host_name).await.map(|_| ())
    }

    /// The node's IPv4 address and its interface, found without sending anything: the preferred source of the IPv4
    /// default route with the lowest metric, else the first IPv4 address of that route's interface; with no default
    /// route (or no address there), the first global IPv4 address of an up, non-loopback interface not in `exclude`.
    pub async fn default_route_v4(&self, exclude: &[&str]) -> Result<Option<(Ipv4Addr, String)>, PlumbError> {
        let h = &self.handle;
        let routes: Vec<RouteMessage> = h
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("list", "IPv4 routes"))?;
        let best = routes
            .iter()
            .filter_map(DefaultRoute::from_message)
            .min_by_key(|r| r.metric);
        let links = list_links(h).await?;
        let addresses = list_v4_addresses(h).await?;
        if let Some(route) = best {
            let name = route
                .oif
                .and_then(|oif| links.iter().find(|l| l.index == oif))
                .map(|l| l.name.clone());
            if let (Some(src), Some(name)) = (route.pref_src, name.clone()) {
                return Ok(Some((src, name)));
            }
            if let (Some(oif), Some(name)) = (route.oif, name)
                && let Some(addr) = addresses.iter().find(|a| a.index == oif)
            {
                return Ok(Some((addr.addr, name)));
            }
        }
        let mut candidates: Vec<&LinkInfo> = links
            .iter()
            .filter(|l| l.up && !l.loopback && !exclude.contains(&l.name.as_str()))
            .collect();
        candidates.sort_by_key(|l| l.index);
        for link in candidates {
            if let Some(addr) = addresses.iter().find(|a| a.index == link.index && a.global) {
                return Ok(Some((addr.addr, link.name.clone())));
            }
        }
        Ok(None)
    }

    /// Creates the named network namespace `/run/netns/<name>` (the iproute2 layout) and returns its path.
    pub async fn create_named_netns(name: &str) -> Result<PathBuf, PlumbError> {
        let path = named_netns_path(name)?;
        if path.exists() {
            return Err(PlumbError::NetnsExists(path));
        }
        NetworkNamespace::add(name)
            .await
            .map_err(|source| PlumbError::Netns {
                op: "create",
                name: name.to_owned(),
                source,
            })?;
        Ok(path)
    }

    /// Deletes the named network namespace `/run/netns/<name>`; an absent one is fine.
    pub async fn delete_named_netns(name: &str) -> Result<(), PlumbError> {
        let path = named_netns_path(name)?;
        if !path.exists() {
            return Ok(());
        }
        NetworkNamespace::del(name)
            .await
            .map_err(|source| PlumbError::Netns {
                op: "delete",
                name: name.to_owned(),
                source,
            })
    }

    /// Makes the namespace `g.netns` a layer-2 wire between the veth peer `g.peer_name` (attached with
    /// [`Attach::guest_port`]) and a unikernel guest: a persistent tap `g.tap` (for QEMU's `-netdev tap`) and a
    /// bridge `g.bridge` joining the two; all three get the overlay MTU, come up, and have no address. IPv6 address
    /// generation is off on all three, so the namespace itself never speaks (no link-local addresses, router or
    /// neighbour solicitations, MLD); the bridge runs without STP, forward delay or multicast snooping, so it floods
    /// and learns like a plain wire from the moment a port comes up. A bridge or tap of those names already there is
    /// replaced: calling it again rewires from scratch. On failure, what was made stays in the namespace (the daemon
    /// then deletes the namespace).
    pub async fn wire_guest(g: &GuestWiring) -> Result<(), PlumbError> {
        let ns = File::open(&g.netns).map_err(|source| PlumbError::NetnsOpen {
            path: g.netns.clone(),
            source,
        })?;
        let inside = Self::connect_in(&ns, &g.netns).await?;
        let c = &inside.handle;
        let peer = require_index(c, &g.peer_name).await?;
        inside.delete_link(&g.bridge).await?;
        inside.delete_link(&g.tap).await?;

        // A tap is born in the namespace of the thread that opens /dev/net/tun, so a helper thread inside does it.
        let (tap_name, netns) = (g.tap.clone(), g.netns.clone());
        in_netns(&ns, &g.netns, move || {
            create_persistent_tap(&tap_name).map_err(|source| PlumbError::Tap {
                name: tap_name,
                netns,
                source,
            })
        })
        .await?;
        let tap = require_index(c, &g.tap).await?;

        c.link()
            .add(
                LinkMessageBuilder::<LinkBridge>::new(&g.bridge)
                    .stp_state(BridgeStpState::Disabled)
                    .forward_delay(0)
                    .mcast_snooping(false)
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err("create bridge", &g.bridge))?;
        let bridge = require_index(c, &g.bridge).await?;

        // Everything down first (a peer that was up keeps a link-local address only until it goes down), then the
        // MTU (set on the bridge after creation so it stays, as in `recreate_bridge`) and no IPv6 addresses.
        for (index, name) in [(bridge, &g.bridge), (tap, &g.tap), (peer, &g.peer_name)] {
            c.link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .down()
                        .mtu(g.mtu)
                        .append_extra_attribute(no_ipv6_addresses())
                        .build(),
                )
                .execute()
                .await
                .map_err(nl_err(
                    "set the MTU and IPv6 address generation of",
                    format!("{name} (mtu {}, addrgenmode none)", g.mtu),
                ))?;
        }
        for (index, name) in [(tap, &g.tap), (peer, &g.peer_name)] {
            c.link()
                .set(LinkUnspec::new_with_index(index).controller(bridge).build())
                .execute()
                .await
                .map_err(nl_err("enslave", format!("{name} (bridge {})", g.bridge)))?;
        }
        for (index, name) in [(bridge, &g.bridge), (tap, &g.tap), (peer, &g.peer_name)] {
            set_up(c, index, name).await?;
        }
        Ok(())
    }
}

/// `IFLA_AF_SPEC` turning IPv6 address generation off (`addrgenmode none`): the link gets no link-local address
/// when it comes up, and so sends no IPv6 of its own.
fn no_ipv6_addresses() -> LinkAttribute {
    LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
        In6AddrGenMode::None,
    )])])
}

/// Creates the persistent tap `name` (TUNSETIFF as a single-queue `IFF_TAP | IFF_NO_PI` device, then TUNSETPERSIST)
/// in the calling thread's network namespace, left down; our descriptor closes on return and the device stays for
/// QEMU to open by name.
fn create_persistent_tap(name: &str) -> io::Result<()> {
    let tap = tun_rs::DeviceBuilder::new()
        .name(name)
        .layer(tun_rs::Layer::L2)
        // Not up yet: `wire_guest` first turns its IPv6 address generation off.
        .inherit_enable_state()
        .build_sync()?;
    tap.persist()
}

/// Runs `f` on a short-lived thread that entered the network namespace of `ns` (named `path` in errors), so what
/// `f` creates (netlink sockets, taps) belongs to that namespace while the caller's threads stay where they are.
async fn in_netns<T: Send + 'static>(
    ns: &File,
    path: &Path,
    f: impl FnOnce() -> Result<T, PlumbError> + Send + 'static,
) -> Result<T, PlumbError> {
    let thread_err = |reason: String| PlumbError::NetnsThread {
        path: path.to_owned(),
        reason,
    };
    let ns = ns
        .try_clone()
        .map_err(|e| thread_err(format!("cannot duplicate the namespace file: {e}")))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread_path = path.to_owned();
    std::thread::Builder::new()
        .name("netns-helper".to_owned())
        .spawn(move || {
            let result = move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| PlumbError::NetnsEnter {
                    path: thread_path,
                    source: e.into(),
                })
                .and_then(|()| f());
            // A closed receiver means the caller was cancelled; what `f` made is then simply dropped.
            let _ = tx.send(result);
        })
        .map_err(|e| thread_err(format!("cannot spawn: {e}")))?;
    rx.await
        .map_err(|_| thread_err("ended without an answer".to_owned()))?
}

fn named_netns_path(name: &str) -> Result<PathBuf, PlumbError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(PlumbError::NetnsName(name.to_owned()));
    }
    Ok(Path::new(NETNS_DIR).join(name))
}

/// The errno of a kernel refusal, if that is what `e` is.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(msg.raw_code().abs()),
        _ => None,
    }
}

async fn index_of(h: &Handle, name: &str) -> Result<Option<u32>, PlumbError> {
    let mut reply = h.link().get().match_name(name.to_owned()).execute();
    match reply.try_next().await {
        Ok(found) => Ok(found.map(|msg| msg.header.index)),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err("look up link", name)(e)),
    }
}

async fn require_index(h: &Handle, name: &str) -> Result<u32, PlumbError> {
    index_of(h, name)
        .await?
        .ok_or_else(|| PlumbError::LinkMissing(name.to_owned()))
}

async fn set_up(h: &Handle, index: u32, name: &str) -> Result<(), PlumbError> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl_err("bring up", name))
}

async fn add_v4(h: &Handle, index: u32, link: &str, addr: Ipv4Addr, prefix: u8) -> Result<(), PlumbError> {
    h.address()
        .add(index, IpAddr::V4(addr), prefix)
        .execute()
        .await
        .map_err(nl_err("add address", format!("{addr}/{prefix} on {link}")))
}

/// Adds an IPv6 address with IFA_F_NODAD, so it is usable at once (never "tentative") without touching any sysctl.
async fn add_v6_nodad(
    h: &Handle,
    index: u32,
    link: &str,
    addr: Ipv6Addr,
    prefix: u8,
) -> Result<(), PlumbError> {
    let mut request = h.address().add(index, IpAddr::V6(addr), prefix);
    let message = request.message_mut();
    // The flag goes both in the header byte (older kernels) and in IFA_FLAGS (which the kernel prefers when present).
    message.header.flags |= AddressHeaderFlags::Nodad;
    message
        .attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    request
        .execute()
        .await
        .map_err(nl_err("add address", format!("{addr}/{prefix} on {link}")))
}

/// The parts of an IPv4 default route in the main table that `default_route_v4` weighs.
#[derive(Debug)]
struct DefaultRoute {
    metric: u32,
    oif: Option<u32>,
    pref_src: Option<Ipv4Addr>,
}

impl DefaultRoute {
    fn from_message(msg: &RouteMessage) -> Option<Self> {
        let mut table = u32::from(msg.header.table);
        let mut metric = 0;
        let mut oif = None;
        let mut pref_src = None;
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Priority(p) => metric = *p,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::PrefSource(RouteAddress::Inet(a)) => pref_src = Some(*a),
                // A multipath default route names its interfaces per next hop; the first stands for the route.
                RouteAttribute::MultiPath(hops) if oif.is_none() => {
                    oif = hops.first().map(|hop| hop.interface_index)
                }
                _ => {}
            }
        }
        let is_default = msg.header.address_family == AddressFamily::Inet
            && msg.header.destination_prefix_length == 0
            && msg.header.kind == RouteType::Unicast
            && table == u32::from(RouteHeader::RT_TABLE_MAIN);
        is_default.then_some(Self {
            metric,
            oif,
            pref_src,
        })
    }
}

#[derive(Debug)]
struct LinkInfo {
    index: u32,
    name: String,
    up: bool,
    loopback: bool,
}

async fn list_links(h: &Handle) -> Result<Vec<LinkInfo>, PlumbError> {
    let messages: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("list", "links"))?;
    Ok(messages
        .iter()
        .map(|m| LinkInfo {
            index: m.header.index,
            name: m
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::IfName(n) => Some(n.clone()),
                    _ => None,
                })
                .unwrap_or_default(),
            up: m.header.flags.contains(LinkFlags::Up),
            loopback: m.header.flags.contains(LinkFlags::Loopback),
        })
        .collect())
}

#[derive(Debug)]
struct V4Address {
    index: u32,
    addr: Ipv4Addr,
    global: bool,
}

/// Every address of every link in this namespace, as the kernel lists them.
async fn address_messages(h: &Handle) -> Result<Vec<AddressMessage>, PlumbError> {
    h.address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("list", "addresses"))
}

async fn list_v4_addresses(h: &Handle) -> Result<Vec<V4Address>, PlumbError> {
    let messages = address_messages(h).await?;
    Ok(messages
        .iter()
        .filter(|m| m.header.family == AddressFamily::Inet)
        .filter_map(|m| {
            // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer's on point-to-point links.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            });
            let address = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(IpAddr::V4(v4)) => Some(*v4),
                _ => None,
            });
            local.or(address).map(|addr| V4Address {
                index: m.header.index,
                addr,
                global: m.header.scope == AddressScope::Universe,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_follow_oakestra_and_fit_ifnamsiz() {
        let (host, peer) = veth_names(7, "task-abc");
        assert!(host.starts_with("veth007"), "{host}");
        assert!(peer.starts_with("veth017"), "{peer}");
        assert_eq!(host.len(), 11);
        assert_eq!(host[7..], peer[7..], "both ends share the hash part");
        for counter in [0, 9, 99_999, 100_000, 123_456_789, u32::MAX] {
            for key in [
                "",
                "a",
                "a-very-long-task-identifier-with-many-characters.instance.0",
            ] {
                let (host, peer) = veth_names(counter, key);
                assert!(
                    host.len() <= IFNAME_MAX && peer.len() <= IFNAME_MAX,
                    "{host} {peer}"
                );
                let hash = &host[host.len() - 4..];
                assert!(
                    hash.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
                    "{hash}"
                );
            }
        }
    }

    #[test]
    fn veth_names_are_stable_wrap_and_depend_on_the_key() {
        assert_eq!(veth_names(3, "x"), veth_names(3, "x"));
        assert_eq!(veth_names(100_003, "x"), veth_names(3, "x"));
        assert_ne!(veth_names(3, "x"), veth_names(4, "x"));
        let distinct: std::collections::HashSet<String> =
            (0..200).map(|i| veth_names(1, &format!("task-{i}")).0).collect();
        // 4 base-36 characters give 1.6M values: 200 keys colliding more than once would mean a broken hash.
        assert!(distinct.len() >= 199, "{}", distinct.len());
    }

    #[test]
    fn netns_target_paths() {
        assert_eq!(NetnsTarget::Pid(42).path(), PathBuf::from("/proc/42/ns/net"));
        assert_eq!(
            NetnsTarget::Path("/run/netns/x".into()).path(),
            PathBuf::from("/run/netns/x")
        );
    }

    #[test]
    fn named_netns_names_are_plain_file_names() {
        assert_eq!(
            named_netns_path("uk-1").ok(),
            Some(PathBuf::from("/run/netns/uk-1"))
        );
        for bad in ["", ".", "..", "a/b", "../etc"] {
            assert!(
                matches!(named_netns_path(bad), Err(PlumbError::NetnsName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn nft_error_names_the_line() {
        let e = PlumbError::Nft {
            status: "exit status: 1".into(),
            stderr: "Error: boom".into(),
            line: Some((4, "  ip saddr 1.2.3.4/33 accept\n".into())),
        };
        assert_eq!(
            e.to_string(),
            "nft failed (exit status: 1) at script line 4 `ip saddr 1.2.3.4/33 accept`: Error: boom"
        );
    }
}
