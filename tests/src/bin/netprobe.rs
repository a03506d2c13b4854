//! `netprobe`: the probe program network tests run inside containers. A server answering with its name on any
//! number of TCP and UDP ports, clients printing who answered, and a TCP ping-pong latency meter.
//!
//! ```text
//! netprobe serve --name NAME [--tcp PORT]... [--udp PORT]...   TCP: "NAME\n" per line; UDP: "NAME <len>" per datagram
//! netprobe tcp ADDR PORT [--count N] [--interval-ms M]           one connection, N rounds; prints each reply
//! netprobe tcp-each ADDR PORT --count N                          N connections, one round each
//! netprobe udp ADDR PORT [--size S] [--count N]                  N datagrams of S bytes; prints each reply
//! netprobe pingpong-serve --port P                               echoes whatever arrives (TCP_NODELAY)
//! netprobe pingpong ADDR PORT [--size 64] [--seconds 5]          prints avg_us= p50_us= p99_us= samples=
//! ```
//! Servers listen on `[::]` with IPV6_V6ONLY off (IPv4 clients arrive as mapped addresses), or on `0.0.0.0` when
//! the netns has no IPv6. Clients exit 1 with a message on stderr on any failure or timeout.

#![allow(
    clippy::print_stdout,
    reason = "a CLI tool: the replies it got are its output"
)]
#![allow(
    clippy::print_stderr,
    reason = "a CLI tool: errors go to stderr with exit code 1"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rustix::net::{AddressFamily, SocketType, sockopt};

/// Connect, read and write timeout of the TCP clients.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the UDP client waits for each reply.
const UDP_TIMEOUT: Duration = Duration::from_secs(3);
/// Ping-pong rounds run before measuring: the first rounds pay for cold caches and ARP/neighbour resolution.
const WARMUP_ROUNDS: usize = 100;

#[derive(Debug, Parser)]
#[command(
    name = "netprobe",
    about = "TCP/UDP name responder, clients and a ping-pong latency meter"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Answer on every given port: each TCP line with `NAME`, each UDP datagram with `NAME <bytes received>`.
    Serve {
        /// What to answer.
        #[arg(long)]
        name: String,
        /// A TCP port to listen on (repeatable).
        #[arg(long = "tcp")]
        tcp: Vec<u16>,
        /// A UDP port to answer on (repeatable).
        #[arg(long = "udp")]
        udp: Vec<u16>,
    },
    /// One TCP connection, `count` request/reply rounds; prints each reply.
    Tcp {
        addr: IpAddr,
        port: u16,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Pause between rounds.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// `count` TCP connections, one round each; prints each reply.
    TcpEach {
        addr: IpAddr,
        port: u16,
        #[arg(long)]
        count: u32,
    },
    /// `count` UDP datagrams of `size` bytes; prints each reply.
    Udp {
        addr: IpAddr,
        port: u16,
        #[arg(long, default_value_t = 16)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Echo server for `pingpong`.
    PingpongServe {
        #[arg(long)]
        port: u16,
    },
    /// Fixed-size TCP request/response for `seconds`; prints half round-trip latencies (sockperf's convention).
    Pingpong {
        addr: IpAddr,
        port: u16,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
}

type Result<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve { name, tcp, udp } => serve(&name, &tcp, &udp),
        Cmd::Tcp {
            addr,
            port,
            count,
            interval_ms,
        } => tcp_rounds(
            SocketAddr::new(addr, port),
            count,
            Duration::from_millis(interval_ms),
        ),
        Cmd::TcpEach { addr, port, count } => tcp_each(SocketAddr::new(addr, port), count),
        Cmd::Udp {
            addr,
            port,
            size,
            count,
        } => udp_rounds(SocketAddr::new(addr, port), size, count),
        Cmd::PingpongServe { port } => pingpong_serve(port),
        Cmd::Pingpong {
            addr,
            port,
            size,
            seconds,
        } => pingpong(SocketAddr::new(addr, port), size, seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netprobe: {e}");
            ExitCode::FAILURE
        }
    }
}

// --- servers -----------------------------------------------------------------------------------------------------

/// A socket bound to `[::]:port` accepting IPv4 too, listening when `stream`.
fn bind_dual_stack(kind: SocketType, port: u16) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket(AddressFamily::INET6, kind, None)?;
    // Off explicitly: the system default (net.ipv6.bindv6only) may say otherwise.
    sockopt::set_ipv6_v6only(&fd, false)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))?;
    if kind == SocketType::STREAM {
        rustix::net::listen(&fd, 128)?;
    }
    Ok(fd)
}

/// A TCP listener on `[::]:port`, else on `0.0.0.0:port` (a netns or kernel without IPv6).
fn tcp_listener(port: u16) -> Result<TcpListener> {
    match bind_dual_stack(SocketType::STREAM, port) {
        Ok(fd) => Ok(TcpListener::from(fd)),
        Err(v6) => TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
            .map_err(|v4| format!("listen on tcp port {port}: [::]: {v6}; 0.0.0.0: {v4}")),
    }
}

/// A UDP socket on `[::]:port`, else on `0.0.0.0:port`.
fn udp_socket(port: u16) -> Result<UdpSocket> {
    match bind_dual_stack(SocketType::DGRAM, port) {
        Ok(fd) => Ok(UdpSocket::from(fd)),
        Err(v6) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
            .map_err(|v4| format!("bind udp port {port}: [::]: {v6}; 0.0.0.0: {v4}")),
    }
}

/// Binds every port first (a busy port fails the command at once), then answers on all of them until killed.
fn serve(name: &str, tcp: &[u16], udp: &[u16]) -> Result<()> {
    if tcp.is_empty() && udp.is_empty() {
        return Err("serve needs at least one --tcp or --udp port".into());
    }
    let name: Arc<str> = Arc::from(name);
    let listeners = tcp.iter().map(|p| tcp_listener(*p)).collect::<Result<Vec<_>>>()?;
    let sockets = udp.iter().map(|p| udp_socket(*p)).collect::<Result<Vec<_>>>()?;
    let mut threads = Vec::new();
    for listener in listeners {
        let name = Arc::clone(&name);
        threads.push(std::thread::spawn(move || {
            accept_loop(&listener, move |s| name_replies(s, &name))
        }));
    }
    for socket in sockets {
        let name = Arc::clone(&name);
        threads.push(std::thread::spawn(move || udp_replies(&socket, &name)));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Accepts forever, one thread per connection running `handle`.
fn accept_loop(listener: &TcpListener, handle: impl Fn(TcpStream) + Clone + Send + 'static) {
    for stream in listener.incoming().flatten() {
        let handle = handle.clone();
        std::thread::spawn(move || handle(stream));
    }
}

/// Answers each line (request) with `name\n` until the peer closes.
fn name_replies(stream: TcpStream, name: &str) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let reply = format!("{name}\n");
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if writer.write_all(reply.as_bytes()).is_err() {
                    return;
                }
            }
        }
    }
}

/// Answers each datagram with `name <bytes received>`.
fn udp_replies(socket: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(format!("{name} {n}").as_bytes(), from);
        }
    }
}

/// Echoes every byte back on each connection (TCP_NODELAY: a reply leaves at once).
fn pingpong_serve(port: u16) -> Result<()> {
    let listener = tcp_listener(port)?;
    accept_loop(&listener, |mut stream: TcpStream| {
        let _ = stream.set_nodelay(true);
        let mut buf = vec![0u8; 65536];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(())
}

// --- clients -----------------------------------------------------------------------------------------------------

/// A TCP connection with [`TCP_TIMEOUT`] for connect, reads and writes.
fn connect(to: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&to, TCP_TIMEOUT).map_err(|e| format!("connect {to}: {e}"))?;
    stream
        .set_read_timeout(Some(TCP_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(TCP_TIMEOUT)))
        .and_then(|()| stream.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(stream)
}

/// One request line out, one reply line back; returns the reply without its newline.
fn tcp_round(reader: &mut BufReader<TcpStream>, to: SocketAddr) -> Result<String> {
    reader
        .get_mut()
        .write_all(b"ping\n")
        .map_err(|e| format!("send to {to}: {e}"))?;
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => Err(format!("{to} closed the connection without a reply")),
        Ok(_) if !line.ends_with('\n') => Err(format!("{to} closed the connection mid-reply: {line:?}")),
        Ok(_) => Ok(line.trim_end().to_owned()),
        Err(e) => Err(format!("reply from {to}: {e}")),
    }
}

fn tcp_rounds(to: SocketAddr, count: u32, interval: Duration) -> Result<()> {
    let mut reader = BufReader::new(connect(to)?);
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        println!("{}", tcp_round(&mut reader, to)?);
    }
    Ok(())
}

fn tcp_each(to: SocketAddr, count: u32) -> Result<()> {
    for _ in 0..count {
        let mut reader = BufReader::new(connect(to)?);
        println!("{}", tcp_round(&mut reader, to)?);
    }
    Ok(())
}

fn udp_rounds(to: SocketAddr, size: usize, count: u32) -> Result<()> {
    let local: SocketAddr = match to {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
    socket.connect(to).map_err(|e| format!("connect {to}: {e}"))?;
    socket
        .set_read_timeout(Some(UDP_TIMEOUT))
        .map_err(|e| format!("socket options: {e}"))?;
    let payload = vec![b'x'; size];
    let mut buf = vec![0u8; 65536];
    for _ in 0..count {
        socket
            .send(&payload)
            .map_err(|e| format!("send {size} bytes to {to}: {e}"))?;
        let n = socket
            .recv(&mut buf)
            .map_err(|e| format!("no reply from {to} within {UDP_TIMEOUT:?}: {e}"))?;
        println!("{}", String::from_utf8_lossy(&buf[..n]).trim_end());
    }
    Ok(())
}

fn pingpong(to: SocketAddr, size: usize, seconds: f64) -> Result<()> {
    if size == 0 {
        return Err("--size must be at least 1".into());
    }
    let duration = Duration::try_from_secs_f64(seconds).map_err(|e| format!("--seconds {seconds}: {e}"))?;
    let mut stream = connect(to)?;
    let out = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut round = |stream: &mut TcpStream| -> Result<Duration> {
        let t0 = Instant::now();
        stream.write_all(&out).map_err(|e| format!("send to {to}: {e}"))?;
        stream
            .read_exact(&mut back)
            .map_err(|e| format!("reply from {to}: {e}"))?;
        Ok(t0.elapsed())
    };
    for _ in 0..WARMUP_ROUNDS {
        round(&mut stream)?;
    }
    let mut half_rtt_ns = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let rtt = round(&mut stream)?;
        half_rtt_ns.push(u64::try_from(rtt.as_nanos() / 2).unwrap_or(u64::MAX));
    }
    let s = Summary::of(&mut half_rtt_ns).ok_or("no round completed")?;
    println!(
        "avg_us={:.3} p50_us={:.3} p99_us={:.3} samples={}",
        s.avg_us, s.p50_us, s.p99_us, s.samples
    );
    Ok(())
}

// --- statistics --------------------------------------------------------------------------------------------------

/// Latency statistics in microseconds.
#[derive(Debug, PartialEq)]
struct Summary {
    avg_us: f64,
    p50_us: f64,
    p99_us: f64,
    samples: usize,
}

impl Summary {
    /// Of latencies in nanoseconds (sorted in place); None when there are none.
    fn of(ns: &mut [u64]) -> Option<Self> {
        ns.sort_unstable();
        let total: u128 = ns.iter().map(|v| u128::from(*v)).sum();
        let avg = total.checked_div(ns.len() as u128)?;
        let us = |v: u128| v as f64 / 1000.0;
        Some(Self {
            avg_us: us(avg),
            p50_us: us(u128::from(percentile(ns, 5000)?)),
            p99_us: us(u128::from(percentile(ns, 9900)?)),
            samples: ns.len(),
        })
    }
}

/// Nearest-rank percentile of sorted `v`, `p` in hundredths of a percent (5000 = median, 9900 = p99): the smallest
/// value with at least p% of the samples at or below it. Integer math, so p99 of 100 samples is exactly the 99th.
fn percentile(sorted: &[u64], p: u16) -> Option<u64> {
    let rank = (usize::from(p) * sorted.len())
        .div_ceil(10_000)
        .clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 5000), Some(50));
        assert_eq!(percentile(&v, 9900), Some(99));
        assert_eq!(percentile(&v, 10_000), Some(100));
        assert_eq!(percentile(&v, 0), Some(1));
        assert_eq!(percentile(&[7], 9900), Some(7));
        assert_eq!(percentile(&[1, 2, 3], 5000), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4], 5000), Some(2));
        assert_eq!(percentile(&[], 5000), None);
    }

    #[test]
    fn summary_in_microseconds() {
        let mut ns = vec![3000, 1000, 2000, 2000];
        let s = Summary::of(&mut ns).unwrap();
        assert_eq!(
            s,
            Summary {
                avg_us: 2.0,
                p50_us: 2.0,
                p99_us: 3.0,
                samples: 4
            }
        );
        assert_eq!(Summary::of(&mut []), None);
    }

    #[test]
    fn command_lines() {
        let cli = Cli::try_parse_from([
            "netprobe", "serve", "--name", "a", "--tcp", "1", "--tcp", "2", "--udp", "3",
        ]);
        match cli.unwrap().cmd {
            Cmd::Serve { name, tcp, udp } => {
                assert_eq!((name.as_str(), tcp, udp), ("a", vec![1, 2], vec![3]))
            }
            other => panic!("{other:?}"),
        }
        match Cli::try_parse_from(["netprobe", "tcp", "::1", "80"]).unwrap().cmd {
            Cmd::Tcp {
                addr,
                count,
                interval_ms,
                ..
            } => assert_eq!(
                (addr, count, interval_ms),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 1, 0)
            ),
            other => panic!("{other:?}"),
        }
        match Cli::try_parse_from(["netprobe", "udp", "10.0.0.1", "53", "--size", "1000"])
            .unwrap()
            .cmd
        {
            Cmd::Udp { size, count, .. } => assert_eq!((size, count), (1000, 1)),
            other => panic!("{other:?}"),
        }
        // tcp-each has no default count; an address must be an IP.
        assert!(Cli::try_parse_from(["netprobe", "tcp-each", "10.0.0.1", "80"]).is_err());
        assert!(Cli::try_parse_from(["netprobe", "tcp", "example.org", "80"]).is_err());
        match Cli::try_parse_from(["netprobe", "pingpong", "10.0.0.1", "9", "--seconds", "0.5"])
            .unwrap()
            .cmd
        {
            Cmd::Pingpong { size, seconds, .. } => assert_eq!((size, seconds), (64, 0.5)),
            other => panic!("{other:?}"),
        }
    }
}
