//! The dataplane threads: one per TUN queue, each owning its queue and its own `SO_REUSEPORT` tunnel socket, so
//! a packet is read, translated and written by one thread with no channel in between. The kernel picks the TUN
//! queue by flow hash and the UDP socket by the outer 4-tuple, so the packets of one flow stay on one thread and
//! are never reordered. TUN offloads (`IFF_VNET_HDR`) let the kernel hand over 64 KiB TCP super-packets, split
//! here into MTU-sized inner packets (the wire format is one inner packet per datagram), and coalesce what is
//! written back; the tunnel sockets batch with `recvmmsg`/`sendmmsg` and UDP GSO/GRO.
//!
//! This is the slow path and the fallback of the future eBPF fast path: the connection table it fills uses the
//! same key and action types as the BPF maps will.
#![allow(unsafe_code)]

use std::{
    io,
    io::Write,
    net::{Ipv6Addr, SocketAddr},
    os::{
        fd::{AsRawFd, RawFd},
        unix::net::UnixStream,
    },
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use tun_rs::{DeviceBuilder, ExpandBuffer, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::{
    conntrack::now_secs,
    proxy::{Counters, Shared, Verdict},
    table::Reader,
    udp::{BatchSocket, RecvBatch, SendBatch},
};

/// Packets handled per read round before the other direction gets a turn.
const BATCH: usize = 64;

/// What the GRO coalescer may grow a TUN write slot to: the headroom for the virtio header plus the largest IP
/// packet (its 16-bit total length). tun-rs requires `2 * offset + merged length` of capacity, so merged packets
/// stay under 64 KiB.
const SLOT_ROOM: usize = VIRTIO_NET_HDR_LEN + 65_535;

/// One TUN write slot. It holds one packet, but tells the GRO coalescer it may grow into a whole super-packet:
/// the coalescer only merges segments into a buffer whose capacity already fits the result, and reserving 64 KiB
/// for each of the 64 slots of every thread up front would cost megabytes per thread while idle. Without this
/// room nothing coalesces and every 1.4 KB segment takes its own trip through the TUN and the container's stack.
/// A slot grows when segments are merged into it; an idle thread trims it back ([`Worker::trim`]).
#[derive(Debug, Default)]
struct TxSlot(Vec<u8>);

impl AsRef<[u8]> for TxSlot {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for TxSlot {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl ExpandBuffer for TxSlot {
    fn buf_capacity(&self) -> usize {
        self.0.capacity().max(SLOT_ROOM)
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.0.resize(new_len, value);
    }

    fn buf_extend_from_slice(&mut self, src: &[u8]) {
        self.0.extend_from_slice(src);
    }
}

/// Why the dataplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The TUN device could not be created.
    #[error("cannot create TUN device {name}: {reason}")]
    Tun {
        /// Device name.
        name: String,
        /// The kernel's answer.
        reason: String,
    },
    /// The tunnel socket could not be bound.
    #[error("cannot bind the overlay UDP socket on port {port}: {reason}")]
    Socket {
        /// The port.
        port: u16,
        /// The kernel's answer.
        reason: String,
    },
    /// A thread could not be started.
    #[error("cannot start dataplane thread: {0}")]
    Thread(String),
}

/// The running dataplane; dropping it stops the threads and removes the TUN device.
#[derive(Debug)]
pub struct Dataplane {
    stop: Arc<AtomicBool>,
    wake: Vec<UnixStream>,
    threads: Vec<JoinHandle<()>>,
    /// The tunnel sockets' descriptors (owned by the threads, valid until [`Dataplane::stop`] joins them).
    udp_fds: Vec<RawFd>,
    /// Whether the TUN runs with offloads.
    pub offload: bool,
}

/// What the dataplane threads are started with.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    /// TUN device name.
    pub tun_name: String,
    /// MTU of the TUN.
    pub mtu: u16,
    /// Threads (= TUN queues = tunnel sockets).
    pub workers: usize,
    /// UDP port of the overlay.
    pub tunnel_port: u16,
}

/// A wake-up channel for a thread blocked in poll(2): the thread polls one end, [`Dataplane::stop`] writes to
/// the other.
fn pipe() -> io::Result<(UnixStream, UnixStream)> {
    let (r, w) = UnixStream::pair()?;
    r.set_nonblocking(true)?;
    w.set_nonblocking(true)?;
    Ok((r, w))
}

fn create_tun(cfg: &DataplaneConfig, offload: bool) -> io::Result<SyncDevice> {
    DeviceBuilder::new()
        .name(cfg.tun_name.clone())
        .mtu(cfg.mtu)
        .multi_queue(cfg.workers > 1)
        .offload(offload)
        .build_sync()
}

impl Dataplane {
    /// Creates the TUN with one queue per worker, binds the tunnel sockets and starts the threads.
    pub fn start(cfg: &DataplaneConfig, shared: Arc<Shared>) -> Result<Self, DataplaneError> {
        let tun_err = |e: io::Error| DataplaneError::Tun {
            name: cfg.tun_name.clone(),
            reason: e.to_string(),
        };
        // Offloads need IFF_VNET_HDR (Linux ≥ 4.x everywhere we run); fall back to plain packets if refused.
        let (first, offload) = match create_tun(cfg, true) {
            Ok(d) => (d, true),
            Err(e) => {
                tracing::warn!(error = %e, "TUN offloads unavailable; running without them");
                (create_tun(cfg, false).map_err(tun_err)?, false)
            }
        };
        let mut queues = vec![first];
        for _ in 1..cfg.workers {
            let q = queues[0].try_clone().map_err(tun_err)?;
            queues.push(q);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut wake = Vec::new();
        let mut threads = Vec::new();
        let mut udp_fds = Vec::new();
        for (index, tun) in queues.into_iter().enumerate() {
            tun.set_nonblocking(true).map_err(tun_err)?;
            let addr = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), cfg.tunnel_port);
            let udp = BatchSocket::bind(addr, true).map_err(|e| DataplaneError::Socket {
                port: cfg.tunnel_port,
                reason: e.to_string(),
            })?;
            udp_fds.push(udp.as_raw_fd());
            let (wake_r, wake_w) = pipe().map_err(|e| DataplaneError::Thread(e.to_string()))?;
            wake.push(wake_w);
            let worker = Worker::new(
                index,
                tun,
                udp,
                wake_r,
                shared.clone(),
                stop.clone(),
                offload,
                cfg.mtu,
            );
            let handle = std::thread::Builder::new()
                .name(format!("dataplane-{index}"))
                .spawn(move || worker.run())
                .map_err(|e| DataplaneError::Thread(e.to_string()))?;
            threads.push(handle);
        }
        tracing::info!(workers = cfg.workers, offload, tun = %cfg.tun_name, port = cfg.tunnel_port, "dataplane running");
        Ok(Self {
            stop,
            wake,
            threads,
            udp_fds,
            offload,
        })
    }

    /// Turns UDP GRO on the tunnel sockets on or off. With the eBPF fast path it is off: GRO would merge a
    /// flow's datagrams before tc sees them, and the kernel could then not decapsulate them one by one.
    pub fn set_udp_gro(&self, on: bool) {
        if self.threads.is_empty() {
            return;
        }
        for fd in &self.udp_fds {
            let value: libc::c_int = i32::from(on);
            // SAFETY: `fd` is an open socket owned by a running dataplane thread (they only stop in `stop`, which
            // takes `&mut self`); `value` is a valid c_int for the call.
            let rc = unsafe {
                libc::setsockopt(
                    *fd,
                    libc::SOL_UDP,
                    crate::udp::UDP_GRO,
                    std::ptr::from_ref(&value).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
                )
            };
            if rc != 0 {
                tracing::debug!(error = %io::Error::last_os_error(), "cannot change UDP GRO on a tunnel socket");
            }
        }
    }

    /// Stops the threads (they drop their TUN queues, which removes the device).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in &mut self.wake {
            let _ = w.write(&[1]);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.udp_fds.clear();
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    index: usize,
    tun: SyncDevice,
    udp: BatchSocket,
    wake: UnixStream,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    offset: usize,
    /// Bytes of one packet buffer: headroom + MTU + slack.
    slot_len: usize,
    /// The TUN's MTU: longer inner packets from peers are cut into segments first.
    mtu: usize,
    reader: Reader,
    /// The raw read buffer (virtio header + up to 64 KiB super-packet).
    original: Vec<u8>,
    /// Split packets read from the TUN.
    rx: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Packets to write to the TUN (with `offset` bytes of headroom).
    tx: Vec<TxSlot>,
    tx_len: usize,
    gro: GROTable,
    recv: RecvBatch,
    send: SendBatch,
    released: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("index", &self.index).finish()
    }
}

/// Counts of one round, added to the shared counters once per round.
#[derive(Default)]
struct Tally {
    tun_rx: u64,
    tun_rx_bytes: u64,
    tun_tx: u64,
    udp_rx: u64,
    udp_rx_bytes: u64,
    udp_tx: u64,
    dropped: u64,
    parked: u64,
}

impl Tally {
    fn flush(&mut self, c: &Counters) {
        let add = |a: &std::sync::atomic::AtomicU64, n: u64| {
            if n != 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&c.tun_rx, self.tun_rx);
        add(&c.tun_rx_bytes, self.tun_rx_bytes);
        add(&c.tun_tx, self.tun_tx);
        add(&c.udp_rx, self.udp_rx);
        add(&c.udp_rx_bytes, self.udp_rx_bytes);
        add(&c.udp_tx, self.udp_tx);
        add(&c.dropped, self.dropped);
        add(&c.parked, self.parked);
        *self = Self::default();
    }
}

impl Worker {
    #[allow(
        clippy::too_many_arguments,
        reason = "the thread's whole state, assembled once"
    )]
    fn new(
        index: usize,
        tun: SyncDevice,
        udp: BatchSocket,
        wake: UnixStream,
        shared: Arc<Shared>,
        stop: Arc<AtomicBool>,
        offload: bool,
        mtu: u16,
    ) -> Self {
        let offset = if offload { VIRTIO_NET_HDR_LEN } else { 0 };
        let slot = offset + usize::from(mtu) + 64;
        let reader = shared.table.reader();
        Self {
            index,
            tun,
            udp,
            wake,
            shared,
            stop,
            offset,
            slot_len: slot,
            mtu: usize::from(mtu),
            reader,
            original: vec![0; VIRTIO_NET_HDR_LEN + 65_536],
            rx: (0..BATCH).map(|_| vec![0; slot]).collect(),
            sizes: vec![0; BATCH],
            tx: (0..BATCH).map(|_| TxSlot(Vec::with_capacity(slot))).collect(),
            tx_len: 0,
            gro: GROTable::new(),
            recv: RecvBatch::new(BATCH / 2),
            send: SendBatch::new(BATCH, BATCH * (usize::from(mtu) + 64)),
            released: Vec::new(),
        }
    }

    fn run(mut self) {
        let fds = [self.tun.as_raw_fd(), self.udp.as_raw_fd(), self.wake.as_raw_fd()];
        let mut tally = Tally::default();
        while !self.stop.load(Ordering::Relaxed) {
            let ready = match poll_in(&fds, 1000) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(worker = self.index, error = %e, "poll failed; dataplane thread stops");
                    return;
                }
            };
            if ready[1] {
                self.peer_round(&mut tally);
            }
            if ready[0] {
                self.tun_round(&mut tally);
            }
            if !ready.contains(&true) {
                self.trim();
            }
            tally.flush(&self.shared.counters);
        }
        tracing::debug!(worker = self.index, "dataplane thread stopped");
    }

    /// A second without traffic: gives back the memory that coalesced super-packets made the write slots grow to.
    fn trim(&mut self) {
        for slot in &mut self.tx {
            if slot.0.capacity() > self.slot_len {
                slot.0 = Vec::with_capacity(self.slot_len);
            }
        }
    }

    /// Reads up to a few batches from the TUN, translates, and sends.
    fn tun_round(&mut self, tally: &mut Tally) {
        for _ in 0..4 {
            let n =
                match self
                    .tun
                    .recv_multiple(&mut self.original, &mut self.rx, &mut self.sizes, self.offset)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(worker = self.index, error = %e, "TUN read error");
                        tally.dropped += 1;
                        continue;
                    }
                };
            let now = now_secs();
            let shared = self.shared.clone();
            let snap = self.reader.refresh(&shared.table);
            for i in 0..n {
                tally.tun_rx += 1;
                let size = self.sizes[i];
                tally.tun_rx_bytes += size as u64;
                let Some(pkt) = self.rx[i].get_mut(self.offset..self.offset + size) else {
                    continue;
                };
                let verdict = shared.outgoing(snap, now, pkt, &mut self.released);
                let pkt = &self.rx[i][self.offset..self.offset + size];
                route_outgoing(
                    &shared,
                    verdict,
                    pkt,
                    now,
                    &mut self.send,
                    &mut self.tx,
                    &mut self.tx_len,
                    self.offset,
                    &mut self.released,
                    tally,
                );
            }
            self.drain_released(now, tally);
            self.flush(tally);
            if n < BATCH / 2 {
                break;
            }
        }
    }

    /// Reads up to a few batches of datagrams from peers and writes them to the TUN.
    fn peer_round(&mut self, tally: &mut Tally) {
        for _ in 0..4 {
            let n = match self.udp.recv_batch(&mut self.recv) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(worker = self.index, error = %e, "tunnel read error");
                    break;
                }
            };
            let now = now_secs();
            let shared = self.shared.clone();
            let offset = self.offset;
            let mtu = self.mtu;
            let (tun, gro, tx, tx_len, released) = (
                &self.tun,
                &mut self.gro,
                &mut self.tx,
                &mut self.tx_len,
                &mut self.released,
            );
            // One inner packet into a TUN write slot and through the inbound translation.
            let mut deliver = |pkt: &[u8], tally: &mut Tally| {
                if *tx_len == tx.len() {
                    write_tun(tun, gro, tx, tx_len, offset, tally);
                }
                let Some(buf) = take_tx(tx, tx_len, offset, pkt) else {
                    tally.dropped += 1;
                    return;
                };
                match shared.ingoing(now, &mut buf[offset..], released) {
                    Verdict::Local | Verdict::Loop => tally.tun_tx += 1,
                    Verdict::Held => *tx_len -= 1,
                    _ => {
                        *tx_len -= 1;
                        tally.dropped += 1;
                    }
                }
            };
            for (_from, datagram) in self.recv.datagrams() {
                tally.udp_rx += 1;
                tally.udp_rx_bytes += datagram.len() as u64;
                if datagram.len() <= mtu {
                    deliver(datagram, tally);
                    continue;
                }
                // A TCP super-packet that a peer's eBPF fast path sent whole (GSO) over links that keep offloads
                // (veth, virtio): cut here into MTU-sized segments, as the peer's NIC would have.
                let cut = crate::packet::parse(datagram)
                    .and_then(|h| crate::packet::segment_tcp(datagram, &h, mtu, |seg| deliver(seg, tally)));
                match cut {
                    Ok(_) => {
                        shared.counters.segmented.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => tally.dropped += 1,
                }
            }
            self.drain_released(now, tally);
            self.flush(tally);
            if n < 2 {
                break;
            }
        }
    }

    /// Fragments that waited for their first fragment run through translation again.
    fn drain_released(&mut self, now: u32, tally: &mut Tally) {
        let mut guard = 0;
        while let Some(mut pkt) = self.released.pop() {
            guard += 1;
            if guard > 4096 {
                self.released.clear();
                break;
            }
            let shared = self.shared.clone();
            let snap = self.reader.refresh(&shared.table);
            let mut more = Vec::new();
            let verdict = if shared.is_local(packet_dst(&pkt)) {
                shared.ingoing(now, &mut pkt, &mut more)
            } else {
                shared.outgoing(snap, now, &mut pkt, &mut more)
            };
            route_outgoing(
                &shared,
                verdict,
                &pkt,
                now,
                &mut self.send,
                &mut self.tx,
                &mut self.tx_len,
                self.offset,
                &mut more,
                tally,
            );
            self.released.extend(more);
        }
    }

    fn flush(&mut self, tally: &mut Tally) {
        if !self.send.is_empty() {
            let queued = self.send.len();
            match self.udp.send_batch(&mut self.send) {
                Ok(sent) => {
                    tally.udp_tx += sent as u64;
                    if !self.send.is_empty() {
                        // The socket buffer is full: wait briefly once, then give up on the rest (UDP is lossy;
                        // TCP inside will retransmit).
                        let _ = poll_out(self.udp.as_raw_fd(), 5);
                        if let Ok(more) = self.udp.send_batch(&mut self.send) {
                            tally.udp_tx += more as u64;
                        }
                        tally.dropped += self.send.len() as u64;
                        self.send.clear();
                    }
                }
                Err(e) => {
                    tracing::debug!(worker = self.index, error = %e, queued, "tunnel send error");
                    tally.dropped += queued as u64;
                    self.send.clear();
                }
            }
        }
        if self.tx_len > 0 {
            self.write_tun(tally);
        }
    }

    fn write_tun(&mut self, tally: &mut Tally) {
        write_tun(
            &self.tun,
            &mut self.gro,
            &mut self.tx,
            &mut self.tx_len,
            self.offset,
            tally,
        );
    }
}

/// Writes the queued packets to the TUN (coalescing TCP segments of one flow when offloads are on).
fn write_tun(
    tun: &SyncDevice,
    gro: &mut GROTable,
    tx: &mut [TxSlot],
    tx_len: &mut usize,
    offset: usize,
    tally: &mut Tally,
) {
    let n = *tx_len;
    if n == 0 {
        return;
    }
    if let Err(e) = tun.send_multiple(gro, &mut tx[..n], offset) {
        tracing::debug!(error = %e, "TUN write error");
        tally.dropped += n as u64;
    }
    for b in &mut tx[..n] {
        b.0.clear();
    }
    *tx_len = 0;
}

fn packet_dst(pkt: &[u8]) -> std::net::IpAddr {
    match crate::packet::parse(pkt) {
        Ok(h) => h.dst,
        Err(_) => std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    }
}

/// Copies `pkt` into the next free TUN-write slot (after `offset` bytes of headroom for the virtio header).
fn take_tx<'a>(
    tx: &'a mut [TxSlot],
    tx_len: &mut usize,
    offset: usize,
    pkt: &[u8],
) -> Option<&'a mut Vec<u8>> {
    let slot = &mut tx.get_mut(*tx_len)?.0;
    slot.clear();
    slot.resize(offset, 0);
    slot.extend_from_slice(pkt);
    *tx_len += 1;
    Some(slot)
}

#[allow(
    clippy::too_many_arguments,
    reason = "the worker's buffers, borrowed separately"
)]
fn route_outgoing(
    shared: &Shared,
    verdict: Verdict,
    pkt: &[u8],
    now: u32,
    send: &mut SendBatch,
    tx: &mut [TxSlot],
    tx_len: &mut usize,
    offset: usize,
    released: &mut Vec<Vec<u8>>,
    tally: &mut Tally,
) {
    match verdict {
        Verdict::Tunnel(to) => {
            if !send.push(to, pkt) {
                tally.dropped += 1;
            }
        }
        Verdict::Local => {
            if take_tx(tx, tx_len, offset, pkt).is_some() {
                tally.tun_tx += 1;
            } else {
                tally.dropped += 1;
            }
        }
        Verdict::Loop => {
            // The destination instance runs here: its inbound path, then the TUN.
            let Some(buf) = take_tx(tx, tx_len, offset, pkt) else {
                tally.dropped += 1;
                return;
            };
            match shared.ingoing(now, &mut buf[offset..], released) {
                Verdict::Local | Verdict::Loop => tally.tun_tx += 1,
                Verdict::Held => *tx_len -= 1,
                _ => {
                    *tx_len -= 1;
                    tally.dropped += 1;
                }
            }
        }
        Verdict::Miss(key) => {
            let held = shared
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .hold(key.clone(), pkt);
            match held {
                Ok(first) => {
                    tally.parked += 1;
                    if first {
                        let _ = shared.queries.send(key);
                    }
                }
                Err(_) => tally.dropped += 1,
            }
        }
        Verdict::Held => {}
        Verdict::Drop(_) => tally.dropped += 1,
    }
}

/// poll(2) for readability on `fds`; returns which are readable.
fn poll_in<const N: usize>(fds: &[RawFd; N], timeout_ms: i32) -> io::Result<[bool; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: `pfds` is a valid array of N pollfd structs for the duration of the call.
    let rc = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(pfds.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

fn poll_out(fd: RawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & libc::POLLOUT != 0)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// Three consecutive MSS-sized segments of one flow (ACK only), each in a buffer of one packet's size after
    /// `VIRTIO_NET_HDR_LEN` bytes of headroom, as `take_tx` fills the write slots.
    fn segments() -> Vec<Vec<u8>> {
        let payload = [7u8; 1400];
        (0..3u32)
            .map(|i| {
                let builder = etherparse::PacketBuilder::ipv4(
                    Ipv4Addr::new(10, 30, 0, 1).octets(),
                    Ipv4Addr::new(10, 18, 0, 2).octets(),
                    64,
                )
                .tcp(8080, 40000, 1000 + i * 1400, 65_535)
                .ack(1);
                let mut buf = Vec::with_capacity(VIRTIO_NET_HDR_LEN + 1500);
                buf.resize(VIRTIO_NET_HDR_LEN, 0);
                builder.write(&mut buf, &payload).unwrap();
                buf
            })
            .collect()
    }

    #[test]
    fn write_slots_let_the_coalescer_merge_a_flow() {
        let mut slots: Vec<TxSlot> = segments().into_iter().map(TxSlot).collect();
        GROTable::new()
            .apply_gro(&mut slots, VIRTIO_NET_HDR_LEN, false)
            .unwrap();
        // The first slot now holds one super-packet: one IP and TCP header, three payloads.
        assert_eq!(slots[0].0.len(), VIRTIO_NET_HDR_LEN + 20 + 20 + 3 * 1400);

        // Plain buffers of one packet's capacity are what the dataplane had before: nothing merges.
        let mut plain = segments();
        GROTable::new()
            .apply_gro(&mut plain, VIRTIO_NET_HDR_LEN, false)
            .unwrap();
        assert_eq!(plain[0].len(), VIRTIO_NET_HDR_LEN + 20 + 20 + 1400);
    }
}
