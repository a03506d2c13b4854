//! Work inside the network namespace of a running container: finding containers' init pids through containerd,
//! running `netprobe` clients and servers there with `nsenter`, reading what they printed.

use std::collections::BTreeMap;
use std::process::{Child, Command, Output, Stdio};

use crate::containerd::Containerd;
use crate::procs::binary;

/// A process in a container's network namespace, killed on drop.
#[derive(Debug)]
pub struct InNetns(Child);

impl Drop for InNetns {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `nsenter -t <pid> -n -- <args>`: a command in the network namespace of process `pid`.
pub fn nsenter(pid: u32, args: &[&str]) -> Command {
    let mut c = Command::new("nsenter");
    c.arg("-t").arg(pid.to_string()).arg("-n").arg("--").args(args);
    c
}

fn netprobe_command(pid: u32, args: &[&str]) -> Command {
    let netprobe = binary("netprobe");
    let netprobe = netprobe.to_str().expect("a UTF-8 binary path");
    let mut full = vec![netprobe];
    full.extend_from_slice(args);
    nsenter(pid, &full)
}

/// Runs `netprobe <args>` in the network namespace of `pid` and waits for it.
pub fn probe(pid: u32, args: &[&str]) -> Output {
    netprobe_command(pid, args).output().expect("run netprobe")
}

/// Starts `netprobe serve --name <name> --tcp <tcp> --udp <udp>` in the network namespace of `pid`: every TCP
/// connection and UDP datagram is answered with `name`.
pub fn serve(pid: u32, name: &str, tcp: u16, udp: u16) -> InNetns {
    let (tcp, udp) = (tcp.to_string(), udp.to_string());
    let child = netprobe_command(pid, &["serve", "--name", name, "--tcp", &tcp, "--udp", &udp])
        .stdout(Stdio::null())
        .spawn()
        .expect("start netprobe serve");
    InNetns(child)
}

/// The non-empty trimmed lines a successful probe printed; panics with its output if it failed.
pub fn lines(o: &Output) -> Vec<String> {
    assert!(
        o.status.success(),
        "probe failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Running tasks' init pids by task id (`<job>.instance.<n>`) in containerd namespace `ns`.
pub fn tasks(ctrd: &Containerd, ns: &str) -> BTreeMap<String, u32> {
    let out = ctrd.ctr(ns, &["task", "ls"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let id = f.next()?.to_owned();
            let pid = f.next()?.parse().ok()?;
            (f.next() == Some("RUNNING")).then_some((id, pid))
        })
        .collect()
}
