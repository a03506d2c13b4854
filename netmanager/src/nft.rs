//! The worker's nftables rules: forwarding accepts, masquerade of the bridge subnet, and DNAT of host port mappings
//! to containers, all in one `inet` table of our own that every apply replaces atomically; plus the parser for
//! Oakestra's port-mapping syntax.
//!
//! `nft` is run as a child process; it inherits the network namespace of the thread that calls [`apply`].

use std::collections::HashSet;
use std::fmt;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};

use ipnetwork::{Ipv4Network, Ipv6Network};

use crate::netlink::PlumbError;

/// Transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4Proto {
    /// TCP (the default when a mapping names none).
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for L4Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One published port: packets to `host_port` on this host go to `container_port` in the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// Port on the host's own addresses.
    pub host_port: u16,
    /// Port inside the container.
    pub container_port: u16,
    /// TCP or UDP.
    pub protocol: L4Proto,
}

/// Which port of a mapping an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortField {
    /// The part before ':'.
    Host,
    /// The part after ':'.
    Container,
}

impl fmt::Display for PortField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Host => "host port",
            Self::Container => "container port",
        })
    }
}

/// What is wrong with one port-mapping item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortMappingProblem {
    /// Not made of decimal digits.
    #[error("{field} {value:?} is not a number")]
    NotANumber {
        /// Which port.
        field: PortField,
        /// The text found.
        value: String,
    },
    /// 0 or above 65535.
    #[error("{field} {value} is not in 1..=65535")]
    OutOfRange {
        /// Which port.
        field: PortField,
        /// The number as written.
        value: String,
    },
    /// Neither tcp nor udp.
    #[error("protocol {0:?} is not tcp or udp")]
    Protocol(String),
    /// More than one ':' or '/'.
    #[error("expected hostPort[:containerPort][/tcp|/udp]")]
    Shape,
    /// The same host port and protocol appear twice.
    #[error("host port {port}/{protocol} is mapped twice")]
    Duplicate {
        /// The host port.
        port: u16,
        /// Its protocol.
        protocol: L4Proto,
    },
}

/// A port-mapping string item that does not follow Oakestra's syntax.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("port mapping {item:?}: {problem}")]
pub struct PortMappingError {
    /// The offending item, as written (trimmed).
    pub item: String,
    /// What is wrong with it.
    pub problem: PortMappingProblem,
}

/// Parses Oakestra's port list: `hostPort[:containerPort][/tcp|/udp]` items separated by ';', e.g.
/// `"80:8080/tcp;5000/udp"`. Empty input gives no mappings, empty items (a trailing ';') are skipped, the protocol
/// defaults to tcp and the container port to the host port. The same host port twice for one protocol is an error.
pub fn parse_port_mappings(s: &str) -> Result<Vec<PortMapping>, PortMappingError> {
    let mut mappings = Vec::new();
    let mut seen = HashSet::new();
    for item in s.split(';').map(str::trim).filter(|item| !item.is_empty()) {
        let err = |problem| PortMappingError {
            item: item.to_owned(),
            problem,
        };
        let mapping = parse_item(item).map_err(err)?;
        if !seen.insert((mapping.host_port, mapping.protocol)) {
            return Err(err(PortMappingProblem::Duplicate {
                port: mapping.host_port,
                protocol: mapping.protocol,
            }));
        }
        mappings.push(mapping);
    }
    Ok(mappings)
}

fn parse_item(item: &str) -> Result<PortMapping, PortMappingProblem> {
    let (ports, protocol) = match item.split_once('/') {
        Some((ports, proto)) => (ports, Some(proto.trim())),
        None => (item, None),
    };
    let protocol = match protocol {
        None => L4Proto::Tcp,
        Some(p) if p.eq_ignore_ascii_case("tcp") => L4Proto::Tcp,
        Some(p) if p.eq_ignore_ascii_case("udp") => L4Proto::Udp,
        Some(p) if p.contains('/') => return Err(PortMappingProblem::Shape),
        Some(p) => return Err(PortMappingProblem::Protocol(p.to_owned())),
    };
    let (host, container) = match ports.split_once(':') {
        Some((_, container)) if container.contains(':') => return Err(PortMappingProblem::Shape),
        Some((host, container)) => (host, Some(container)),
        None => (ports, None),
    };
    let host_port = parse_port(host, PortField::Host)?;
    let container_port = match container {
        Some(c) => parse_port(c, PortField::Container)?,
        None => host_port,
    };
    Ok(PortMapping {
        host_port,
        container_port,
        protocol,
    })
}

fn parse_port(text: &str, field: PortField) -> Result<u16, PortMappingProblem> {
    let text = text.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PortMappingProblem::NotANumber {
            field,
            value: text.to_owned(),
        });
    }
    // Digits only, so the only way parsing fails is a number too large even for u16.
    match text.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(PortMappingProblem::OutOfRange {
            field,
            value: text.to_owned(),
        }),
    }
}

/// What [`render`] turns into an nftables script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRules {
    /// Our `inet` table, e.g. "oakestra"; nothing outside it is ever touched.
    pub table: String,
    /// The container bridge, e.g. "goProxyBridge".
    pub bridge: String,
    /// The overlay TUN.
    pub tun: String,
    /// The bridge's IPv4 subnet (masqueraded when leaving through another interface).
    pub subnet_v4: Ipv4Network,
    /// The bridge's IPv6 subnet.
    pub subnet_v6: Ipv6Network,
    /// Published ports with the container's IPv4 and IPv6 addresses.
    pub mappings: Vec<(PortMapping, Ipv4Addr, Ipv6Addr)>,
}

/// The complete `nft -f` script for `r`. It first declares the table (so the delete cannot fail when it is absent),
/// deletes it and declares it again with every chain: nft runs a file as one transaction, so the host goes from the
/// old rules to the new ones atomically, and applying the same script twice leaves one copy.
pub fn render(r: &HostRules) -> String {
    let table = &r.table;
    let ours = if r.bridge == r.tun {
        format!("\"{}\"", r.bridge)
    } else {
        format!("\"{}\", \"{}\"", r.bridge, r.tun)
    };
    let v4_net = format!("{}/{}", r.subnet_v4.network(), r.subnet_v4.prefix());
    let v6_net = format!("{}/{}", r.subnet_v6.network(), r.subnet_v6.prefix());

    // Port DNAT only for packets addressed to one of this host's own addresses: a packet merely passing through
    // (e.g. container to container, or routed traffic) with the same destination port is left alone.
    let mut dnat = Vec::new();
    for (m, v4, v6) in &r.mappings {
        let (proto, host, port) = (m.protocol, m.host_port, m.container_port);
        dnat.push(format!(
            "\t\tmeta nfproto ipv4 fib daddr type local {proto} dport {host} dnat ip to {v4}:{port}"
        ));
        dnat.push(format!(
            "\t\tmeta nfproto ipv6 fib daddr type local {proto} dport {host} dnat ip6 to [{v6}]:{port}"
        ));
    }
    let dnat = dnat.join("\n");

    let mut lines = vec![
        "#!/usr/sbin/nft -f".to_owned(),
        "# Generated by the oakestra-rs NetManager; replaced as a whole on every apply.".to_owned(),
        format!("table inet {table} {{}}"),
        format!("delete table inet {table}"),
        format!("table inet {table} {{"),
        "\tchain forward {".to_owned(),
        "\t\ttype filter hook forward priority 0; policy accept;".to_owned(),
    ];
    for name in [&r.bridge, &r.tun] {
        lines.push(format!("\t\tiifname \"{name}\" accept"));
        lines.push(format!("\t\toifname \"{name}\" accept"));
    }
    lines.extend([
        "\t}".to_owned(),
        "\tchain postrouting {".to_owned(),
        "\t\ttype nat hook postrouting priority srcnat; policy accept;".to_owned(),
        format!("\t\tip saddr {v4_net} oifname != {{ {ours} }} masquerade"),
        format!("\t\tip6 saddr {v6_net} oifname != {{ {ours} }} masquerade"),
        "\t}".to_owned(),
        "\tchain prerouting {".to_owned(),
        "\t\ttype nat hook prerouting priority dstnat; policy accept;".to_owned(),
    ]);
    if !dnat.is_empty() {
        lines.push(dnat.clone());
    }
    lines.extend([
        "\t}".to_owned(),
        // Connections from the host itself to its own address and a published port take the output hook.
        "\tchain output {".to_owned(),
        "\t\ttype nat hook output priority -100; policy accept;".to_owned(),
    ]);
    if !dnat.is_empty() {
        lines.push(dnat);
    }
    lines.extend(["\t}".to_owned(), "}".to_owned()]);
    let mut script = lines.join("\n");
    script.push('\n');
    script
}

/// Runs `nft -f -` with `script`. The child is started from the calling thread (so it runs in that thread's network
/// namespace); waiting for it happens off the async runtime.
pub async fn apply(script: &str) -> Result<(), PlumbError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(PlumbError::NftSpawn)?;
    let input = script.to_owned();
    let output = tokio::task::spawn_blocking(move || {
        if let Some(mut stdin) = child.stdin.take() {
            // nft reads all of its input before printing anything, so writing first cannot deadlock on the pipes.
            // A failed write shows up as nft's own error below.
            if let Err(e) = stdin.write_all(input.as_bytes()) {
                tracing::debug!(error = %e, "writing the script to nft failed");
            }
        }
        child.wait_with_output()
    })
    .await
    .map_err(|e| PlumbError::NftSpawn(std::io::Error::other(e)))?
    .map_err(PlumbError::NftSpawn)?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let line = failing_line(&stderr).and_then(|number| {
        script
            .lines()
            .nth(number.checked_sub(1)?)
            .map(|text| (number, text.to_owned()))
    });
    Err(PlumbError::Nft {
        status: output.status.to_string(),
        stderr,
        line,
    })
}

/// The 1-based script line of nft's first complaint, from messages like `/dev/stdin:4:12-22: Error: ...`.
fn failing_line(stderr: &str) -> Option<usize> {
    stderr.lines().find_map(|l| {
        let (location, _) = l.split_once(": Error:")?;
        let mut parts = location.rsplitn(3, ':');
        let _columns = parts.next()?;
        parts.next()?.parse().ok()
    })
}

/// Removes our table; a table that is not there is fine (the declare-then-delete pair always succeeds).
pub async fn remove_table(table: &str) -> Result<(), PlumbError> {
    apply(&format!("table inet {table} {{}}\ndelete table inet {table}\n")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(host_port: u16, container_port: u16, protocol: L4Proto) -> PortMapping {
        PortMapping {
            host_port,
            container_port,
            protocol,
        }
    }

    #[test]
    fn parses_oakestra_port_lists() {
        assert_eq!(
            parse_port_mappings("80:8080/tcp;5000/udp").ok(),
            Some(vec![pm(80, 8080, L4Proto::Tcp), pm(5000, 5000, L4Proto::Udp)])
        );
        assert_eq!(parse_port_mappings("").ok(), Some(vec![]));
        assert_eq!(parse_port_mappings("  \t").ok(), Some(vec![]));
        assert_eq!(
            parse_port_mappings("443;").ok(),
            Some(vec![pm(443, 443, L4Proto::Tcp)])
        );
        assert_eq!(
            parse_port_mappings(" 53:5353/UDP ; 53/tcp ").ok(),
            Some(vec![pm(53, 5353, L4Proto::Udp), pm(53, 53, L4Proto::Tcp)])
        );
        assert_eq!(
            parse_port_mappings("1:65535").ok(),
            Some(vec![pm(1, 65535, L4Proto::Tcp)])
        );
    }

    #[test]
    fn errors_name_item_field_and_rule() {
        let msg = |s: &str| {
            parse_port_mappings(s)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert_eq!(
            msg("70000:80"),
            r#"port mapping "70000:80": host port 70000 is not in 1..=65535"#
        );
        assert_eq!(
            msg("80:0"),
            r#"port mapping "80:0": container port 0 is not in 1..=65535"#
        );
        assert_eq!(
            msg("80;x:80"),
            r#"port mapping "x:80": host port "x" is not a number"#
        );
        assert_eq!(
            msg("80:"),
            r#"port mapping "80:": container port "" is not a number"#
        );
        assert_eq!(
            msg("80/sctp"),
            r#"port mapping "80/sctp": protocol "sctp" is not tcp or udp"#
        );
        assert_eq!(
            msg("1:2:3"),
            r#"port mapping "1:2:3": expected hostPort[:containerPort][/tcp|/udp]"#
        );
        assert_eq!(
            msg("1/tcp/udp"),
            r#"port mapping "1/tcp/udp": expected hostPort[:containerPort][/tcp|/udp]"#
        );
        assert_eq!(msg("-1"), r#"port mapping "-1": host port "-1" is not a number"#);
        assert_eq!(
            msg("99999999999999999999999"),
            format!(
                "port mapping {0:?}: host port {0} is not in 1..=65535",
                "99999999999999999999999"
            )
        );
        assert_eq!(
            msg("80:1/tcp;80:2"),
            r#"port mapping "80:2": host port 80/tcp is mapped twice"#
        );
        assert!(
            parse_port_mappings("80/tcp;80/udp").is_ok(),
            "same port, different protocols"
        );
    }

    fn rules(mappings: Vec<(PortMapping, Ipv4Addr, Ipv6Addr)>) -> HostRules {
        HostRules {
            table: "oakestra".into(),
            bridge: "goProxyBridge".into(),
            tun: "goProxyTun".into(),
            // Not normalised on purpose: the script must carry the network address.
            subnet_v4: "10.18.0.1/26".parse().unwrap(),
            subnet_v6: "fc00::1/120".parse().unwrap(),
            mappings,
        }
    }

    #[test]
    fn render_replaces_our_table_atomically() {
        let script = render(&rules(vec![]));
        let head: Vec<&str> = script.lines().filter(|l| !l.starts_with('#')).take(3).collect();
        assert_eq!(
            head,
            [
                "table inet oakestra {}",
                "delete table inet oakestra",
                "table inet oakestra {"
            ]
        );
        assert!(script.ends_with("}\n"));
        assert_eq!(script.matches('{').count(), script.matches('}').count());
        assert!(!script.contains("dnat"));
    }

    #[test]
    fn render_forward_and_masquerade() {
        let script = render(&rules(vec![]));
        for line in [
            "\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n",
            "\t\tiifname \"goProxyBridge\" accept\n",
            "\t\toifname \"goProxyBridge\" accept\n",
            "\t\tiifname \"goProxyTun\" accept\n",
            "\t\toifname \"goProxyTun\" accept\n",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;\n",
            "\t\tip saddr 10.18.0.0/26 oifname != { \"goProxyBridge\", \"goProxyTun\" } masquerade\n",
            "\t\tip6 saddr fc00::/120 oifname != { \"goProxyBridge\", \"goProxyTun\" } masquerade\n",
            "\t\ttype nat hook prerouting priority dstnat; policy accept;\n",
            "\t\ttype nat hook output priority -100; policy accept;\n",
        ] {
            assert!(script.contains(line), "missing {line:?} in\n{script}");
        }
    }

    #[test]
    fn render_dnat_only_to_local_addresses_in_both_nat_chains() {
        let c4: Ipv4Addr = Ipv4Addr::new(10, 18, 0, 2);
        let c6: Ipv6Addr = "fc00::2".parse().unwrap();
        let script = render(&rules(vec![
            (pm(80, 8080, L4Proto::Tcp), c4, c6),
            (pm(5000, 5000, L4Proto::Udp), c4, c6),
        ]));
        let expected = [
            "meta nfproto ipv4 fib daddr type local tcp dport 80 dnat ip to 10.18.0.2:8080",
            "meta nfproto ipv6 fib daddr type local tcp dport 80 dnat ip6 to [fc00::2]:8080",
            "meta nfproto ipv4 fib daddr type local udp dport 5000 dnat ip to 10.18.0.2:5000",
            "meta nfproto ipv6 fib daddr type local udp dport 5000 dnat ip6 to [fc00::2]:5000",
        ];
        for rule in expected {
            assert_eq!(
                script.matches(rule).count(),
                2,
                "{rule:?} once in prerouting and once in output:\n{script}"
            );
        }
        // Every DNAT rule is scoped to this host's own addresses.
        for line in script.lines().filter(|l| l.contains("dnat")) {
            assert!(line.contains("fib daddr type local"), "{line}");
        }
        let prerouting = script.find("chain prerouting").unwrap_or(0);
        let output = script.find("chain output").unwrap_or(0);
        assert!(prerouting < output);
        assert_eq!(script[prerouting..output].matches("dnat").count(), 4);
        assert_eq!(script[output..].matches("dnat").count(), 4);
    }

    #[test]
    fn failing_line_is_read_from_nft_messages() {
        let stderr =
            "/dev/stdin:4:12-22: Error: Prefix length 33 is invalid\n  ip saddr 10.0.0.0/33 accept\n";
        assert_eq!(failing_line(stderr), Some(4));
        assert_eq!(
            failing_line("Error: Could not process rule: Operation not permitted"),
            None
        );
        assert_eq!(failing_line(""), None);
    }
}
