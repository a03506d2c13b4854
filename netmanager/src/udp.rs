//! The tunnel's UDP socket: batched receive and send (`recvmmsg`/`sendmmsg`) with UDP GRO and GSO.
//!
//! Every packet the proxy sends to another worker is the payload of one UDP datagram. One system call per batch
//! instead of per datagram, and with GSO one kernel pass per run of equal-size datagrams to the same peer, is most of
//! the difference between a userspace tunnel that keeps up with a link and one that does not. The socket is
//! dual-stack when bound to `[::]`: IPv4 peers are addressed as IPv4-mapped IPv6 addresses on the wire to the kernel
//! and reported back as plain IPv4.
//!
//! `unsafe` is limited to the system calls rustix does not wrap (`recvmmsg`, `sendmmsg`, the `SOL_UDP` options);
//! control messages and socket addresses are read and written as bytes and plain struct fields, bounds-checked.

use std::fmt;
use std::io;
use std::mem::{offset_of, size_of};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::{AddressFamily, SocketFlags, SocketType, ipproto, sockopt};

/// `SOL_UDP`: the socket option and control message level for UDP.
pub const SOL_UDP: libc::c_int = 17;
/// `UDP_SEGMENT`: GSO segment size (socket option and per-message control message, a `u16`).
pub const UDP_SEGMENT: libc::c_int = 103;
/// `UDP_GRO`: receive coalescing (socket option; the control message carries the segment size as an `int`).
pub const UDP_GRO: libc::c_int = 104;

/// Messages per system call, and the most slots a [`RecvBatch`] has. The header arrays live on the stack.
pub const MAX_BATCH: usize = 64;
/// Size of one receive slot: a whole UDP datagram, or a GRO-coalesced train of them, always fits.
pub const SLOT_SIZE: usize = 65536;
/// Most datagrams in one GSO message (the kernel's `UDP_MAX_SEGMENTS` is 64 on older kernels, 128 on newer).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most payload bytes in one GSO message (the IP length field caps the whole super-datagram at 64 KiB).
pub const GSO_MAX_BYTES: usize = 65000;
/// Largest UDP payload we accept for sending (over IPv6; IPv4 allows 20 bytes less, which the kernel enforces).
pub const MAX_PAYLOAD: usize = 65527;
/// Socket buffer size asked for in both directions.
const SOCKET_BUFFER: usize = 4 << 20;

// Control messages are handled as bytes. These layout facts hold for Linux: a `cmsghdr` starts with its length as a
// `size_t` (or, on 64-bit musl, a 32-bit length followed by zero padding, which reads the same on little endian),
// then level and type; data starts at the header size rounded up to `size_t` alignment.
const CMSG_ALIGN_TO: usize = size_of::<usize>();
const CMSG_HDR: usize = size_of::<libc::cmsghdr>();
const CMSG_LEVEL_AT: usize = offset_of!(libc::cmsghdr, cmsg_level);
const CMSG_TYPE_AT: usize = offset_of!(libc::cmsghdr, cmsg_type);
const _: () = assert!(offset_of!(libc::cmsghdr, cmsg_len) == 0 && CMSG_LEVEL_AT == CMSG_ALIGN_TO);
const _: () = assert!(CMSG_TYPE_AT == CMSG_LEVEL_AT + 4 && CMSG_HDR == CMSG_TYPE_AT + 4);

const fn cmsg_align(len: usize) -> usize {
    (len + CMSG_ALIGN_TO - 1) & !(CMSG_ALIGN_TO - 1)
}
const CMSG_DATA_AT: usize = cmsg_align(CMSG_HDR);
/// `CMSG_LEN(sizeof(u16))`: the kernel wants exactly this for `UDP_SEGMENT`.
const GSO_CMSG_LEN: usize = CMSG_DATA_AT + size_of::<u16>();
/// `CMSG_SPACE(sizeof(u16))`.
const GSO_CMSG_SPACE: usize = CMSG_DATA_AT + cmsg_align(size_of::<u16>());

// An IPv4 `sockaddr_in` is written into and read from a `sockaddr_in6` (the larger of the two) by field: `sin_port`
// overlaps `sin6_port` and `sin_addr` overlaps `sin6_flowinfo`, the rest of `sockaddr_in` is zero padding.
const _: () = assert!(offset_of!(libc::sockaddr_in, sin_port) == offset_of!(libc::sockaddr_in6, sin6_port));
const _: () =
    assert!(offset_of!(libc::sockaddr_in, sin_addr) == offset_of!(libc::sockaddr_in6, sin6_flowinfo));
const _: () = assert!(size_of::<libc::sockaddr_in>() <= size_of::<libc::sockaddr_in6>());

#[allow(clippy::cast_possible_truncation, reason = "sizes of small C structs")]
const SOCKADDR_IN_LEN: libc::socklen_t = size_of::<libc::sockaddr_in>() as libc::socklen_t;
#[allow(clippy::cast_possible_truncation, reason = "sizes of small C structs")]
const SOCKADDR_IN6_LEN: libc::socklen_t = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
#[allow(clippy::cast_possible_truncation, reason = "sizes of small C structs")]
const C_INT_LEN: libc::socklen_t = size_of::<libc::c_int>() as libc::socklen_t;

/// A control-message buffer with the alignment `cmsghdr` needs.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; 64]);

impl CmsgBuf {
    const ZERO: CmsgBuf = CmsgBuf([0; 64]);
}

/// A UDP socket for the tunnel. Owns its file descriptor; non-blocking, so it goes into an epoll set or a tokio
/// `AsyncFd` as is.
#[derive(Debug)]
pub struct BatchSocket {
    fd: OwnedFd,
    v6: bool,
    /// GSO in use; cleared for good the first time the kernel refuses a GSO send.
    gso: AtomicBool,
    gro: bool,
}

impl BatchSocket {
    /// Binds a non-blocking UDP socket. `[::]` is dual-stack (`IPV6_V6ONLY` off); `reuse_port` sets `SO_REUSEPORT`
    /// so one socket per dataplane thread can share the port. Buffers are raised to 4 MiB (the `*FORCE` options
    /// first, which only root may use past `rmem_max`); UDP GRO is enabled if the kernel knows it.
    pub fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<Self> {
        let v6 = addr.is_ipv6();
        let family = if v6 {
            AddressFamily::INET6
        } else {
            AddressFamily::INET
        };
        let fd = rustix::net::socket_with(
            family,
            SocketType::DGRAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            Some(ipproto::UDP),
        )?;
        if v6 && addr.ip().is_unspecified() {
            sockopt::set_ipv6_v6only(&fd, false)?;
        }
        if reuse_port {
            sockopt::set_socket_reuseport(&fd, true)?;
        }
        // Best effort: a smaller buffer drops more under bursts but still works.
        if sockopt::set_socket_recv_buffer_size_force(&fd, SOCKET_BUFFER).is_err() {
            let _ = sockopt::set_socket_recv_buffer_size(&fd, SOCKET_BUFFER);
        }
        if sockopt::set_socket_send_buffer_size_force(&fd, SOCKET_BUFFER).is_err() {
            let _ = sockopt::set_socket_send_buffer_size(&fd, SOCKET_BUFFER);
        }
        rustix::net::bind(&fd, &addr)?;
        // Setting the socket's default segment size to 0 (none) succeeds exactly when the kernel knows UDP_SEGMENT
        // (Linux 4.18+); the size itself is given per message.
        let gso = set_udp_option(fd.as_fd(), UDP_SEGMENT, 0).is_ok();
        let gro = set_udp_option(fd.as_fd(), UDP_GRO, 1).is_ok();
        Ok(BatchSocket {
            fd,
            v6,
            gso: AtomicBool::new(gso),
            gro,
        })
    }

    /// The bound address (with the port the kernel picked for port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        let any = rustix::net::getsockname(&self.fd)?;
        SocketAddr::try_from(any)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not an IP socket address"))
    }

    /// Whether sends use UDP GSO (false from the start on old kernels, and after the kernel refused it once).
    pub fn gso_supported(&self) -> bool {
        self.gso.load(Ordering::Relaxed)
    }

    /// Whether the kernel accepted UDP GRO, so received slots may hold several datagrams.
    pub fn gro_enabled(&self) -> bool {
        self.gro
    }

    /// Receives up to `batch`'s slot count of messages with one `recvmmsg`. Returns the number of datagrams (a GRO
    /// slot counts each datagram in it), `Ok(0)` when nothing is waiting. The datagrams stay in `batch` until the
    /// next receive: iterate them with [`RecvBatch::datagrams`].
    #[allow(unsafe_code)]
    pub fn recv_batch(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.filled = 0;
        let n = batch.slots();
        let mut iovs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_BATCH];
        // SAFETY: `mmsghdr` is a C struct of integers and raw pointers, for which all-zero bytes are a valid value
        // (null pointers, zero lengths).
        let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let slots = batch
            .bufs
            .chunks_exact_mut(SLOT_SIZE)
            .zip(batch.addrs.iter_mut())
            .zip(batch.ctrl.iter_mut());
        for ((hdr, iov), ((buf, addr), ctrl)) in hdrs.iter_mut().zip(iovs.iter_mut()).zip(slots).take(n) {
            iov.iov_base = buf.as_mut_ptr().cast();
            iov.iov_len = buf.len();
            hdr.msg_hdr.msg_name = std::ptr::from_mut(addr).cast();
            hdr.msg_hdr.msg_namelen = SOCKADDR_IN6_LEN;
            hdr.msg_hdr.msg_iov = std::ptr::from_mut(iov);
            hdr.msg_hdr.msg_iovlen = 1;
            hdr.msg_hdr.msg_control = ctrl.0.as_mut_ptr().cast();
            hdr.msg_hdr.msg_controllen = ctrl.0.len();
        }
        let vlen = libc::c_uint::try_from(n).unwrap_or(0);
        let got = loop {
            // SAFETY: the first `n` headers point at live, exclusively borrowed buffers of the stated sizes (slot
            // buffers, address and control buffers in `batch`, iovecs on this stack frame) that outlive the call;
            // `n <= MAX_BATCH` so the kernel stays inside `hdrs`; a null timeout is allowed.
            let rc = unsafe {
                libc::recvmmsg(
                    self.fd.as_raw_fd(),
                    hdrs.as_mut_ptr(),
                    vlen,
                    0,
                    std::ptr::null_mut(),
                )
            };
            if let Ok(got) = usize::try_from(rc) {
                break got;
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(err),
            }
        };
        let mut datagrams = 0;
        for (i, hdr) in hdrs.iter().enumerate().take(got.min(n)) {
            let len = usize::try_from(hdr.msg_len).unwrap_or(0).min(SLOT_SIZE);
            let ctrl_len = hdr.msg_hdr.msg_controllen;
            let seg = batch
                .ctrl
                .get(i)
                .and_then(|c| c.0.get(..ctrl_len.min(c.0.len())))
                .and_then(gro_segment_size)
                .unwrap_or(0);
            if let Some(l) = batch.lens.get_mut(i) {
                *l = len;
            }
            if let Some(s) = batch.segs.get_mut(i) {
                *s = seg;
            }
            datagrams += if seg > 0 && len > seg {
                len.div_ceil(seg)
            } else {
                1
            };
        }
        batch.filled = got.min(n);
        Ok(datagrams)
    }

    /// Sends everything queued in `batch` with `sendmmsg` calls of up to [`MAX_BATCH`] messages and returns how
    /// many datagrams went out. With GSO, a run of consecutive datagrams to the same peer with the same length (the
    /// last may be shorter) goes as one message with a `UDP_SEGMENT` control message.
    ///
    /// * `EINTR`: retried. `EAGAIN`: returns what was sent; the rest stays queued for the next call.
    /// * `EIO`/`EINVAL` on a GSO message: GSO is switched off for this socket for good and the datagrams are
    ///   resent one per message.
    /// * An error that belongs to the socket (`EBADF`, `ENOTSOCK`, `EFAULT`) is returned; the rest stays queued.
    /// * Any other error belongs to the first message's destination (unreachable, too big, refused by a
    ///   firewall): its datagrams are dropped, counted in [`SendBatch::dropped`], and sending goes on.
    #[allow(unsafe_code)]
    pub fn send_batch(&self, batch: &mut SendBatch) -> io::Result<usize> {
        let mut sent = 0;
        while batch.head < batch.entries.len() {
            let gso = self.gso.load(Ordering::Relaxed);
            let plan = batch.plan(gso);
            let mut iovs = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_BATCH];
            let mut names = [zero_sockaddr_in6(); MAX_BATCH];
            let mut ctrls = [CmsgBuf::ZERO; MAX_BATCH];
            // SAFETY: all-zero bytes are a valid `mmsghdr` (integers and null pointers).
            let mut hdrs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
            let mut msgs = 0;
            for (((msg, hdr), (iov, name)), ctrl) in plan
                .iter()
                .zip(hdrs.iter_mut())
                .zip(iovs.iter_mut().zip(names.iter_mut()))
                .zip(ctrls.iter_mut())
            {
                let Some(bytes) = batch.arena.get_mut(msg.start..msg.start + msg.len) else {
                    break;
                };
                iov.iov_base = bytes.as_mut_ptr().cast();
                iov.iov_len = bytes.len();
                let name_len = write_sockaddr(name, msg.to, self.v6);
                hdr.msg_hdr.msg_name = std::ptr::from_mut(name).cast();
                hdr.msg_hdr.msg_namelen = name_len;
                hdr.msg_hdr.msg_iov = std::ptr::from_mut(iov);
                hdr.msg_hdr.msg_iovlen = 1;
                if msg.segment > 0 {
                    write_gso_cmsg(&mut ctrl.0, msg.segment);
                    hdr.msg_hdr.msg_control = ctrl.0.as_mut_ptr().cast();
                    hdr.msg_hdr.msg_controllen = GSO_CMSG_SPACE;
                }
                msgs += 1;
            }
            if msgs == 0 {
                break;
            }
            let vlen = libc::c_uint::try_from(msgs).unwrap_or(0);
            // SAFETY: the first `msgs` headers point at live buffers of the stated lengths (arena bytes of `batch`,
            // addresses, control buffers and iovecs on this stack frame) that outlive the call; the kernel only
            // reads them, apart from writing `msg_len`, which is inside `hdrs`.
            let rc = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), hdrs.as_mut_ptr(), vlen, 0) };
            if let Ok(done) = usize::try_from(rc) {
                if done == 0 {
                    // Not expected for a non-empty vector; treat like EAGAIN rather than spin.
                    return Ok(sent);
                }
                for msg in plan.iter().take(done) {
                    batch.head += msg.count;
                    sent += msg.count;
                }
                continue;
            }
            let err = io::Error::last_os_error();
            let first = plan.first();
            match err.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => return Ok(sent),
                Some(libc::EIO | libc::EINVAL) if first.is_some_and(|m| m.segment > 0) => {
                    self.gso.store(false, Ordering::Relaxed);
                }
                Some(libc::EBADF | libc::ENOTSOCK | libc::EFAULT) | None => return Err(err),
                Some(_) => {
                    let count = first.map_or(1, |m| m.count);
                    batch.head += count;
                    batch.dropped += count as u64;
                    batch.last_error = err.raw_os_error();
                }
            }
        }
        batch.reset_if_done();
        Ok(sent)
    }
}

impl AsFd for BatchSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for BatchSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Sets an `int` option at level `SOL_UDP`.
fn set_udp_option(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    set_int_option(fd, SOL_UDP, name, value)
}

/// Sets an `int` socket option.
#[allow(unsafe_code)]
fn set_int_option(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live `c_int` and the length passed is its size; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            C_INT_LEN,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn zero_sockaddr_in6() -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: 0,
        sin6_port: 0,
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: [0; 16] },
        sin6_scope_id: 0,
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "AF_INET and AF_INET6 are small constants"
)]
const AF_INET: libc::sa_family_t = libc::AF_INET as libc::sa_family_t;
#[allow(
    clippy::cast_possible_truncation,
    reason = "AF_INET and AF_INET6 are small constants"
)]
const AF_INET6: libc::sa_family_t = libc::AF_INET6 as libc::sa_family_t;

/// Writes `to` as the socket address for a socket of the given family and returns its length. An IPv4 peer on an
/// IPv6 socket becomes `::ffff:a.b.c.d`; a v4-mapped peer on an IPv4 socket becomes plain IPv4.
fn write_sockaddr(out: &mut libc::sockaddr_in6, to: SocketAddr, v6_socket: bool) -> libc::socklen_t {
    *out = zero_sockaddr_in6();
    let as_v4 = match to {
        SocketAddr::V4(a) if !v6_socket => Some(a),
        SocketAddr::V6(a) if !v6_socket => a.ip().to_ipv4_mapped().map(|ip| SocketAddrV4::new(ip, a.port())),
        _ => None,
    };
    if let Some(a) = as_v4 {
        out.sin6_family = AF_INET;
        out.sin6_port = a.port().to_be();
        // Memory bytes of `sin_addr` are the address in network order: the octets as they are.
        out.sin6_flowinfo = u32::from_ne_bytes(a.ip().octets());
        return SOCKADDR_IN_LEN;
    }
    let (ip, port, flowinfo, scope) = match to {
        SocketAddr::V4(a) => (a.ip().to_ipv6_mapped(), a.port(), 0, 0),
        SocketAddr::V6(a) => (*a.ip(), a.port(), a.flowinfo(), a.scope_id()),
    };
    out.sin6_family = AF_INET6;
    out.sin6_port = port.to_be();
    out.sin6_flowinfo = flowinfo.to_be();
    out.sin6_addr = libc::in6_addr { s6_addr: ip.octets() };
    out.sin6_scope_id = scope;
    SOCKADDR_IN6_LEN
}

/// Reads a socket address the kernel wrote; v4-mapped IPv6 sources become `SocketAddr::V4`.
fn read_sockaddr(a: &libc::sockaddr_in6) -> Option<SocketAddr> {
    let port = u16::from_be(a.sin6_port);
    match a.sin6_family {
        AF_INET => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(a.sin6_flowinfo.to_ne_bytes()),
            port,
        ))),
        AF_INET6 => {
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
                None => SocketAddr::V6(SocketAddrV6::new(
                    ip,
                    port,
                    u32::from_be(a.sin6_flowinfo),
                    a.sin6_scope_id,
                )),
            })
        }
        _ => None,
    }
}

/// Writes a `UDP_SEGMENT` control message with segment size `segment` at the start of `buf`.
fn write_gso_cmsg(buf: &mut [u8], segment: u16) {
    let Some(msg) = buf.get_mut(..GSO_CMSG_SPACE) else {
        return;
    };
    msg.fill(0);
    let fields = [
        (0, &GSO_CMSG_LEN.to_ne_bytes()[..]),
        (CMSG_LEVEL_AT, &SOL_UDP.to_ne_bytes()[..]),
        (CMSG_TYPE_AT, &UDP_SEGMENT.to_ne_bytes()[..]),
        (CMSG_DATA_AT, &segment.to_ne_bytes()[..]),
    ];
    for (at, bytes) in fields {
        if let Some(dst) = msg.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    }
}

/// The segment size of a `UDP_GRO` control message in `ctrl` (the control bytes the kernel filled in).
fn gro_segment_size(ctrl: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    // Lengths come from the kernel, but are still only trusted as far as the buffer goes: checked arithmetic, no
    // overflow on a garbage length.
    while let Some(hdr) = ctrl.get(at..at.checked_add(CMSG_HDR)?) {
        let len = usize::from_ne_bytes(hdr.get(..CMSG_ALIGN_TO)?.try_into().ok()?);
        let level = i32::from_ne_bytes(hdr.get(CMSG_LEVEL_AT..CMSG_LEVEL_AT + 4)?.try_into().ok()?);
        let kind = i32::from_ne_bytes(hdr.get(CMSG_TYPE_AT..CMSG_TYPE_AT + 4)?.try_into().ok()?);
        if len < CMSG_HDR {
            return None;
        }
        if level == SOL_UDP && kind == UDP_GRO {
            let data_at = at.checked_add(CMSG_DATA_AT)?;
            let data = ctrl.get(data_at..data_at.checked_add(4)?)?;
            let size = i32::from_ne_bytes(data.try_into().ok()?);
            return usize::try_from(size).ok().filter(|s| *s > 0);
        }
        at = at.checked_add(len.checked_next_multiple_of(CMSG_ALIGN_TO)?)?;
    }
    None
}

/// Preallocated receive buffers for [`BatchSocket::recv_batch`]: `slots` buffers of [`SLOT_SIZE`] bytes plus
/// their source addresses and control-message space.
pub struct RecvBatch {
    bufs: Vec<u8>,
    lens: Vec<usize>,
    /// GRO segment size per slot; 0 when the slot holds one datagram.
    segs: Vec<usize>,
    addrs: Vec<libc::sockaddr_in6>,
    ctrl: Vec<CmsgBuf>,
    filled: usize,
}

impl fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecvBatch")
            .field("slots", &self.slots())
            .field("filled", &self.filled)
            .field("lens", &self.lens.get(..self.filled))
            .field("segs", &self.segs.get(..self.filled))
            .finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// `slots` receive slots (clamped to 1..=[`MAX_BATCH`]); allocates `slots` × 64 KiB once.
    pub fn new(slots: usize) -> Self {
        let n = slots.clamp(1, MAX_BATCH);
        RecvBatch {
            bufs: vec![0; n * SLOT_SIZE],
            lens: vec![0; n],
            segs: vec![0; n],
            addrs: vec![zero_sockaddr_in6(); n],
            ctrl: vec![CmsgBuf::ZERO; n],
            filled: 0,
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> usize {
        self.lens.len()
    }

    /// Number of slots the last receive filled (a GRO slot may hold several datagrams).
    pub fn messages(&self) -> usize {
        self.filled
    }

    /// The datagrams of the last receive with their senders, in arrival order, GRO slots split into their
    /// datagrams.
    pub fn datagrams(&self) -> Datagrams<'_> {
        Datagrams {
            batch: self,
            slot: 0,
            offset: 0,
        }
    }
}

/// Iterator over received datagrams; see [`RecvBatch::datagrams`].
#[derive(Debug)]
pub struct Datagrams<'a> {
    batch: &'a RecvBatch,
    slot: usize,
    offset: usize,
}

impl<'a> Iterator for Datagrams<'a> {
    type Item = (SocketAddr, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        while self.slot < self.batch.filled {
            let slot = self.slot;
            let len = self.batch.lens.get(slot).copied().unwrap_or(0);
            let seg = self.batch.segs.get(slot).copied().unwrap_or(0);
            let from = self.batch.addrs.get(slot).and_then(read_sockaddr);
            let start = slot * SLOT_SIZE + self.offset;
            // One datagram per slot without GRO; with it, `seg`-sized pieces, the last one possibly shorter.
            let piece = if seg == 0 { len } else { seg.min(len - self.offset) };
            if self.offset + piece >= len {
                self.slot += 1;
                self.offset = 0;
            } else {
                self.offset += piece;
            }
            let (Some(from), Some(data)) = (from, self.batch.bufs.get(start..start + piece)) else {
                continue;
            };
            // An empty datagram is a datagram too, but an empty GRO remainder is not.
            if piece == 0 && seg != 0 {
                continue;
            }
            return Some((from, data));
        }
        None
    }
}

/// One queued datagram: destination and where its payload sits in the arena.
#[derive(Debug, Clone, Copy)]
struct Queued {
    to: SocketAddr,
    start: usize,
    len: usize,
}

/// One message of a send plan: `count` consecutive queued datagrams, contiguous in the arena.
#[derive(Debug, Clone, Copy)]
struct Planned {
    to: SocketAddr,
    start: usize,
    len: usize,
    count: usize,
    /// GSO segment size, 0 for a plain message.
    segment: u16,
}

/// Datagrams queued for [`BatchSocket::send_batch`], copied into a preallocated arena.
#[derive(Debug)]
pub struct SendBatch {
    arena: Vec<u8>,
    arena_cap: usize,
    entries: Vec<Queued>,
    max_datagrams: usize,
    /// First entry not sent yet.
    head: usize,
    dropped: u64,
    last_error: Option<i32>,
}

impl SendBatch {
    /// Room for `max_datagrams` datagrams of `arena_bytes` bytes in total (allocated once).
    pub fn new(max_datagrams: usize, arena_bytes: usize) -> Self {
        SendBatch {
            arena: Vec::with_capacity(arena_bytes),
            arena_cap: arena_bytes,
            entries: Vec::with_capacity(max_datagrams),
            max_datagrams,
            head: 0,
            dropped: 0,
            last_error: None,
        }
    }

    /// Queues a copy of `payload` for `to`; false when the batch is full (send it first) or the payload is
    /// larger than [`MAX_PAYLOAD`].
    pub fn push(&mut self, to: SocketAddr, payload: &[u8]) -> bool {
        if payload.len() > MAX_PAYLOAD {
            return false;
        }
        if self.entries.len() >= self.max_datagrams || self.arena.len() + payload.len() > self.arena_cap {
            self.compact();
            if self.entries.len() >= self.max_datagrams || self.arena.len() + payload.len() > self.arena_cap {
                return false;
            }
        }
        let start = self.arena.len();
        self.arena.extend_from_slice(payload);
        self.entries.push(Queued {
            to,
            start,
            len: payload.len(),
        });
        true
    }

    /// Datagrams queued and not sent yet.
    pub fn len(&self) -> usize {
        self.entries.len() - self.head
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything queued.
    pub fn clear(&mut self) {
        self.arena.clear();
        self.entries.clear();
        self.head = 0;
    }

    /// Datagrams dropped because the kernel refused them (see [`BatchSocket::send_batch`]), since creation.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// The OS error of the last dropped datagram.
    pub fn last_error(&self) -> Option<io::Error> {
        self.last_error.map(io::Error::from_raw_os_error)
    }

    fn reset_if_done(&mut self) {
        if self.head >= self.entries.len() {
            self.clear();
        }
    }

    /// Moves the unsent datagrams to the front, reclaiming the space of those already sent.
    fn compact(&mut self) {
        if self.head == 0 {
            return;
        }
        let from = self.entries.get(self.head).map_or(self.arena.len(), |q| q.start);
        self.arena.copy_within(from.., 0);
        self.arena.truncate(self.arena.len() - from);
        self.entries.drain(..self.head);
        for q in &mut self.entries {
            q.start -= from;
        }
        self.head = 0;
    }

    /// Groups the next queued datagrams into at most [`MAX_BATCH`] messages (GSO runs if `gso`).
    fn plan(&self, gso: bool) -> Plan {
        let mut plan = Plan {
            msgs: [Planned {
                to: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)),
                start: 0,
                len: 0,
                count: 0,
                segment: 0,
            }; MAX_BATCH],
            n: 0,
        };
        let pending = self.entries.get(self.head..).unwrap_or_default();
        let mut i = 0;
        while plan.n < MAX_BATCH {
            let Some(first) = pending.get(i) else { break };
            let mut msg = Planned {
                to: first.to,
                start: first.start,
                len: first.len,
                count: 1,
                segment: 0,
            };
            let segment = u16::try_from(first.len).ok().filter(|s| *s > 0);
            if let (true, Some(segment)) = (gso, segment) {
                while msg.count < GSO_MAX_SEGMENTS {
                    let Some(next) = pending.get(i + msg.count) else {
                        break;
                    };
                    let fits = next.to == first.to
                        && next.len > 0
                        && next.len <= first.len
                        && next.start == msg.start + msg.len
                        && msg.len + next.len <= GSO_MAX_BYTES;
                    if !fits {
                        break;
                    }
                    msg.count += 1;
                    msg.len += next.len;
                    if next.len < first.len {
                        // A shorter datagram can only end a run.
                        break;
                    }
                }
                if msg.count > 1 {
                    msg.segment = segment;
                }
            }
            if let Some(slot) = plan.msgs.get_mut(plan.n) {
                *slot = msg;
            }
            plan.n += 1;
            i += msg.count;
        }
        plan
    }
}

/// A send plan on the stack.
struct Plan {
    msgs: [Planned; MAX_BATCH],
    n: usize,
}

impl Plan {
    fn iter(&self) -> impl Iterator<Item = &Planned> {
        self.msgs.iter().take(self.n)
    }

    fn first(&self) -> Option<&Planned> {
        self.iter().next()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Runs `f` on a thread that lives in a fresh network namespace with `lo` up, so the test's sockets cannot
    /// reach anything outside. Returns false (and the test is skipped) without the privilege to create one.
    fn in_netns(f: impl FnOnce() + Send + 'static) -> bool {
        std::thread::spawn(move || {
            // SAFETY: unshare with CLONE_NEWNET only moves this thread into a new network namespace; no memory is
            // involved.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            if rc != 0 {
                eprintln!(
                    "skipping: cannot create a network namespace: {}",
                    io::Error::last_os_error()
                );
                return false;
            }
            // A child spawned from this thread inherits its namespace.
            let st = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(st.success(), "ip link set lo up: {st}");
            f();
            true
        })
        .join()
        .unwrap()
    }

    /// Receives until `want` datagrams arrived (or 5 s passed), returning them with their senders.
    fn recv_n(sock: &BatchSocket, batch: &mut RecvBatch, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.len() < want && Instant::now() < deadline {
            let n = sock.recv_batch(batch).unwrap();
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let before = out.len();
            out.extend(batch.datagrams().map(|(a, d)| (a, d.to_vec())));
            assert_eq!(
                out.len() - before,
                n,
                "recv_batch counts the datagrams it delivers"
            );
        }
        out
    }

    fn send_all(sock: &BatchSocket, batch: &mut SendBatch) -> usize {
        let mut sent = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !batch.is_empty() && Instant::now() < deadline {
            sent += sock.send_batch(batch).unwrap();
        }
        assert!(batch.is_empty());
        sent
    }

    fn datagram(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j).to_le_bytes()[0]).collect()
    }

    fn mixed_sizes_in_order(a: SocketAddr, b: SocketAddr) {
        let tx = BatchSocket::bind(a, false).unwrap();
        let rx = BatchSocket::bind(b, false).unwrap();
        let (tx_addr, rx_addr) = (tx.local_addr().unwrap(), rx.local_addr().unwrap());
        let mut batch = RecvBatch::new(32);
        assert_eq!(rx.recv_batch(&mut batch).unwrap(), 0, "EAGAIN is Ok(0)");
        assert_eq!(batch.datagrams().count(), 0);
        let sizes: Vec<usize> = (0..100)
            .map(|i| [0, 1, 60, 1400, 1400, 1400, 9000, 1200, 1400][i % 9])
            .collect();
        let mut out = SendBatch::new(128, 1 << 20);
        for (i, len) in sizes.iter().enumerate() {
            assert!(out.push(rx_addr, &datagram(i, *len)));
        }
        assert_eq!(send_all(&tx, &mut out), 100);
        let got = recv_n(&rx, &mut batch, 100);
        assert_eq!(got.len(), 100);
        for (i, (from, data)) in got.iter().enumerate() {
            assert_eq!(*from, tx_addr, "datagram {i}");
            assert_eq!(*data, datagram(i, sizes[i]), "datagram {i}");
        }
        assert_eq!(rx.recv_batch(&mut batch).unwrap(), 0);
    }

    #[test]
    fn hundred_mixed_datagrams_arrive_in_order_v4_and_v6() {
        in_netns(|| {
            mixed_sizes_in_order("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap());
            mixed_sizes_in_order("[::1]:0".parse().unwrap(), "[::1]:0".parse().unwrap());
        });
    }

    #[test]
    fn gso_run_arrives_as_individual_datagrams() {
        in_netns(|| {
            for (a, b) in [("[::1]:0", "[::1]:0"), ("127.0.0.1:0", "127.0.0.1:0")] {
                let tx = BatchSocket::bind(a.parse().unwrap(), false).unwrap();
                let rx = BatchSocket::bind(b.parse().unwrap(), false).unwrap();
                let rx_addr = rx.local_addr().unwrap();
                let mut out = SendBatch::new(64, 1 << 20);
                for i in 0..40 {
                    assert!(out.push(rx_addr, &datagram(i, 1400)));
                }
                assert!(out.push(rx_addr, &datagram(40, 300)));
                // The plan is one GSO message of 41 segments when GSO is available.
                let plan = out.plan(true);
                assert_eq!((plan.n, plan.msgs[0].count, plan.msgs[0].segment), (1, 41, 1400));
                assert_eq!(send_all(&tx, &mut out), 41);
                let mut batch = RecvBatch::new(32);
                let got = recv_n(&rx, &mut batch, 41);
                assert_eq!(
                    got.len(),
                    41,
                    "gso {} gro {}",
                    tx.gso_supported(),
                    rx.gro_enabled()
                );
                for (i, (_, data)) in got.iter().enumerate() {
                    let len = if i < 40 { 1400 } else { 300 };
                    assert_eq!(*data, datagram(i, len), "datagram {i}");
                }
                eprintln!(
                    "{a}: gso {} gro {}, {} datagrams in {} receive slots",
                    tx.gso_supported(),
                    rx.gro_enabled(),
                    got.len(),
                    batch.messages()
                );
            }
        });
    }

    #[test]
    fn dual_stack_socket_talks_to_v4_and_v6_peers() {
        in_netns(|| {
            let server = BatchSocket::bind("[::]:0".parse().unwrap(), true).unwrap();
            let port = server.local_addr().unwrap().port();
            let v4 = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            let v6 = BatchSocket::bind("[::1]:0".parse().unwrap(), false).unwrap();
            let (v4_addr, v6_addr) = (v4.local_addr().unwrap(), v6.local_addr().unwrap());
            let mut out = SendBatch::new(8, 4096);
            assert!(out.push(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), b"from v4"));
            send_all(&v4, &mut out);
            assert!(out.push(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), b"from v6"));
            send_all(&v6, &mut out);
            let mut batch = RecvBatch::new(4);
            let got = recv_n(&server, &mut batch, 2);
            // The v4 peer is reported as plain IPv4, not ::ffff:127.0.0.1.
            assert_eq!(
                got,
                vec![(v4_addr, b"from v4".to_vec()), (v6_addr, b"from v6".to_vec())]
            );
            // Replies: IPv4 destinations go out v4-mapped on the dual-stack socket.
            assert!(out.push(v4_addr, b"to v4"));
            assert!(out.push(v6_addr, b"to v6"));
            assert_eq!(send_all(&server, &mut out), 2);
            let server_v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            assert_eq!(recv_n(&v4, &mut batch, 1), vec![(server_v4, b"to v4".to_vec())]);
            let server_v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            assert_eq!(recv_n(&v6, &mut batch, 1), vec![(server_v6, b"to v6".to_vec())]);
            // A second socket on the same port with SO_REUSEPORT.
            let again = BatchSocket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), true).unwrap();
            assert_eq!(again.local_addr().unwrap().port(), port);
        });
    }

    #[test]
    fn rejected_gso_falls_back_to_plain_messages_for_good() {
        in_netns(|| {
            let tx = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            let rx = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            let rx_addr = rx.local_addr().unwrap();
            if !tx.gso_supported() {
                eprintln!("skipping: kernel without UDP GSO");
                return;
            }
            // A socket that sends without UDP checksums (SO_NO_CHECK) cannot use GSO: the kernel answers EINVAL,
            // while plain sends work.
            set_int_option(tx.as_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
            let mut out = SendBatch::new(8, 1 << 16);
            for i in 0..3 {
                assert!(out.push(rx_addr, &datagram(i, 1400)));
            }
            assert_eq!(
                send_all(&tx, &mut out),
                3,
                "dropped {}, {:?}",
                out.dropped(),
                out.last_error()
            );
            assert!(!tx.gso_supported(), "GSO is off after the kernel refused it");
            assert_eq!(out.dropped(), 0);
            let mut batch = RecvBatch::new(8);
            let got = recv_n(&rx, &mut batch, 3);
            let want: Vec<Vec<u8>> = (0..3).map(|i| datagram(i, 1400)).collect();
            assert_eq!(got.into_iter().map(|(_, d)| d).collect::<Vec<_>>(), want);
        });
    }

    #[test]
    fn unreachable_destination_is_dropped_and_counted() {
        in_netns(|| {
            let tx = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            let rx = BatchSocket::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            let rx_addr = rx.local_addr().unwrap();
            let mut out = SendBatch::new(8, 4096);
            // 192.0.2.1 (TEST-NET-1) has no route in the fresh namespace: ENETUNREACH, nothing leaves it.
            assert!(out.push("192.0.2.1:50103".parse().unwrap(), b"lost"));
            assert!(out.push(rx_addr, b"kept"));
            assert_eq!(tx.send_batch(&mut out).unwrap(), 1);
            assert_eq!(out.dropped(), 1);
            assert_eq!(out.last_error().unwrap().raw_os_error(), Some(libc::ENETUNREACH));
            let mut batch = RecvBatch::new(4);
            assert_eq!(recv_n(&rx, &mut batch, 1)[0].1, b"kept");
        });
    }

    #[test]
    fn send_batch_push_limits_and_compaction() {
        let to: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut b = SendBatch::new(2, 10);
        assert!(b.push(to, &[1; 4]));
        assert!(!b.push(to, &[2; 7]), "arena full");
        assert!(b.push(to, &[2; 6]));
        assert!(!b.push(to, &[]), "entries full");
        assert_eq!(b.len(), 2);
        // Pretend the first was sent: compaction frees its slot and bytes.
        b.head = 1;
        assert!(b.push(to, &[3; 4]));
        assert_eq!(b.len(), 2);
        assert_eq!(b.entries[0].start, 0);
        assert_eq!(&b.arena[..], &[2, 2, 2, 2, 2, 2, 3, 3, 3, 3]);
        assert!(!b.push(to, &vec![0; MAX_PAYLOAD + 1]));
        b.clear();
        assert!(b.is_empty());
    }

    #[test]
    fn gso_plan_groups_runs() {
        let a: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let c: SocketAddr = "127.0.0.2:9".parse().unwrap();
        let mut b = SendBatch::new(1000, 1 << 20);
        // 3 × 100 to a, 50 to a (ends the run), 100 to a, 100 to c, 0 to c, 70 × 1000 to c.
        for len in [100, 100, 100, 50, 100] {
            b.push(a, &vec![0; len]);
        }
        b.push(c, &[0; 100]);
        b.push(c, &[]);
        for _ in 0..70 {
            b.push(c, &[0; 1000]);
        }
        let plan = b.plan(true);
        let got: Vec<(usize, u16, usize)> = plan.iter().map(|m| (m.count, m.segment, m.len)).collect();
        assert_eq!(
            got,
            vec![
                (4, 100, 350),
                (1, 0, 100),
                (1, 0, 100),
                (1, 0, 0),
                (64, 1000, 64_000),
                (6, 1000, 6000)
            ]
        );
        let plain = b.plan(false);
        assert_eq!(plain.n, MAX_BATCH);
        assert!(plain.iter().all(|m| m.count == 1 && m.segment == 0));
    }

    #[test]
    fn control_messages_roundtrip() {
        let mut buf = [0u8; 64];
        write_gso_cmsg(&mut buf, 1400);
        // A GRO message has the same layout with an int payload.
        let mut gro = [0u8; 64];
        gro[..CMSG_ALIGN_TO].copy_from_slice(&(CMSG_DATA_AT + 4).to_ne_bytes());
        gro[CMSG_LEVEL_AT..CMSG_LEVEL_AT + 4].copy_from_slice(&SOL_UDP.to_ne_bytes());
        gro[CMSG_TYPE_AT..CMSG_TYPE_AT + 4].copy_from_slice(&UDP_GRO.to_ne_bytes());
        gro[CMSG_DATA_AT..CMSG_DATA_AT + 4].copy_from_slice(&1400i32.to_ne_bytes());
        assert_eq!(gro_segment_size(&gro), Some(1400));
        assert_eq!(gro_segment_size(&buf), None, "a UDP_SEGMENT message is not GRO");
        assert_eq!(gro_segment_size(&[]), None);
        assert_eq!(gro_segment_size(&[0xff; 64]), None);
        assert_eq!(gro_segment_size(&gro[..CMSG_DATA_AT + 2]), None, "cut data");
    }

    #[test]
    fn socket_addresses_roundtrip() {
        let mut s = zero_sockaddr_in6();
        for (addr, v6_socket, len) in [
            ("10.1.2.3:50103", false, SOCKADDR_IN_LEN),
            ("10.1.2.3:50103", true, SOCKADDR_IN6_LEN),
            ("[fd00::1]:50103", true, SOCKADDR_IN6_LEN),
            ("[::ffff:10.1.2.3]:50103", false, SOCKADDR_IN_LEN),
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(write_sockaddr(&mut s, addr, v6_socket), len, "{addr}");
            let back = read_sockaddr(&s).unwrap();
            let want = match addr {
                SocketAddr::V6(a) => a
                    .ip()
                    .to_ipv4_mapped()
                    .map_or(addr, |v4| SocketAddr::from((v4, a.port()))),
                v4 => v4,
            };
            assert_eq!(back, want);
        }
        s.sin6_family = 99;
        assert_eq!(read_sockaddr(&s), None);
    }
}
