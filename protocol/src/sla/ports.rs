//! The port-mapping grammar of the SLA `port` field and the NetManager `portMappings` field:
//! `host[:container][/tcp|/udp]` items joined by `;` (container defaults to host, protocol to tcp).

use std::{fmt, str::FromStr};

/// The overlay's UDP tunnel port on every worker; no service may claim it on the host.
pub const OVERLAY_TUNNEL_PORT: u16 = 50103;

/// A transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (the default when no `/proto` is given).
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// `tcp` or `udp`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// One host-port → container-port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// The port on the worker's address.
    pub host: u16,
    /// The port inside the instance.
    pub container: u16,
    /// The transport protocol.
    pub protocol: Protocol,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.container, self.protocol.as_str())
    }
}

/// Why one item of a port list is wrong. Carries the item as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// An empty item, e.g. `80;;81`.
    #[error("empty port mapping between ';' separators")]
    Empty,
    /// Not `host[:container][/proto]`.
    #[error("port mapping {item:?} must look like host[:container][/tcp|/udp]")]
    Syntax {
        /// The offending item.
        item: String,
    },
    /// A port that is not a number from 1 to 65535.
    #[error("port mapping {item:?}: {port:?} must be a number from 1 to 65535")]
    Range {
        /// The offending item.
        item: String,
        /// The offending port text.
        port: String,
    },
    /// A protocol other than tcp/udp.
    #[error("port mapping {item:?}: protocol {protocol:?} must be tcp or udp")]
    Protocol {
        /// The offending item.
        item: String,
        /// The offending protocol text.
        protocol: String,
    },
    /// The same host port and protocol mapped twice.
    #[error("port mapping {item:?}: host port {host}/{} is already mapped", protocol.as_str())]
    Duplicate {
        /// The offending item.
        item: String,
        /// The doubly mapped host port.
        host: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// The overlay tunnel port.
    #[error("port mapping {item:?}: host port {OVERLAY_TUNNEL_PORT} is reserved for the overlay tunnel")]
    Reserved {
        /// The offending item.
        item: String,
    },
}

impl PortError {
    /// The item the error is about (empty for [`PortError::Empty`]).
    pub fn item(&self) -> &str {
        match self {
            PortError::Empty => "",
            PortError::Syntax { item }
            | PortError::Range { item, .. }
            | PortError::Protocol { item, .. }
            | PortError::Duplicate { item, .. }
            | PortError::Reserved { item } => item,
        }
    }
}

fn parse_port(item: &str, text: &str) -> Result<u16, PortError> {
    let range = || PortError::Range {
        item: item.to_owned(),
        port: text.to_owned(),
    };
    // `u16::from_str` would accept `+80`; the grammar is plain digits.
    if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(range());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(range()),
        Ok(p) => Ok(p),
    }
}

impl FromStr for PortMapping {
    type Err = PortError;

    /// Parses one item (no `;`). Surrounding whitespace is ignored.
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let item = raw.trim();
        if item.is_empty() {
            return Err(PortError::Empty);
        }
        let (ports, protocol) = match item.split_once('/') {
            None => (item, Protocol::Tcp),
            Some((ports, proto)) => {
                let protocol = match proto.to_ascii_lowercase().as_str() {
                    "tcp" => Protocol::Tcp,
                    "udp" => Protocol::Udp,
                    _ => {
                        return Err(PortError::Protocol {
                            item: item.to_owned(),
                            protocol: proto.to_owned(),
                        });
                    }
                };
                (ports, protocol)
            }
        };
        let (host, container) = match ports.split_once(':') {
            None => (ports, ports),
            Some((h, c)) => (h, c),
        };
        if container.contains(':') {
            return Err(PortError::Syntax {
                item: item.to_owned(),
            });
        }
        let host = parse_port(item, host)?;
        let container = parse_port(item, container)?;
        Ok(PortMapping {
            host,
            container,
            protocol,
        })
    }
}

/// Parses a whole `;`-separated list, reporting every bad item (an empty string is an empty list; one trailing
/// `;` is tolerated, as dashboards produce it). Duplicate host ports and the overlay port are errors.
pub fn parse_port_list(list: &str) -> Result<Vec<PortMapping>, Vec<PortError>> {
    let trimmed = list.trim();
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let body = trimmed.strip_suffix(';').unwrap_or(trimmed);
    let mut out: Vec<PortMapping> = Vec::new();
    let mut errors = Vec::new();
    for raw in body.split(';') {
        match raw.parse::<PortMapping>() {
            Ok(m) if m.host == OVERLAY_TUNNEL_PORT => {
                errors.push(PortError::Reserved {
                    item: raw.trim().to_owned(),
                });
            }
            Ok(m) if out.iter().any(|o| o.host == m.host && o.protocol == m.protocol) => {
                errors.push(PortError::Duplicate {
                    item: raw.trim().to_owned(),
                    host: m.host,
                    protocol: m.protocol,
                });
            }
            Ok(m) => out.push(m),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(errors) }
}

/// Renders mappings back into the canonical `host:container/proto;…` form.
pub fn format_port_list(mappings: &[PortMapping]) -> String {
    mappings
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn pm(host: u16, container: u16, protocol: Protocol) -> PortMapping {
        PortMapping {
            host,
            container,
            protocol,
        }
    }

    #[test]
    fn grammar() {
        assert_eq!(parse_port_list("").unwrap(), vec![]);
        assert_eq!(parse_port_list("80").unwrap(), vec![pm(80, 80, Protocol::Tcp)]);
        assert_eq!(
            parse_port_list("80:8080").unwrap(),
            vec![pm(80, 8080, Protocol::Tcp)]
        );
        assert_eq!(
            parse_port_list("80:80/tcp").unwrap(),
            vec![pm(80, 80, Protocol::Tcp)]
        );
        assert_eq!(
            parse_port_list("80:8080/tcp;5000/udp").unwrap(),
            vec![pm(80, 8080, Protocol::Tcp), pm(5000, 5000, Protocol::Udp)]
        );
        assert_eq!(parse_port_list(" 53:53/UDP ; 53:53/tcp; ").unwrap().len(), 2);
    }

    #[test]
    fn every_bad_item_is_reported() {
        let errs = parse_port_list("80:80/sctp;0;70000:1;a:b;80:80:80;;90;90/tcp;50103/udp").unwrap_err();
        let kinds: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert_eq!(errs.len(), 8, "{kinds:#?}");
        assert!(matches!(&errs[0], PortError::Protocol { protocol, .. } if protocol == "sctp"));
        assert!(matches!(&errs[1], PortError::Range { port, .. } if port == "0"));
        assert!(matches!(&errs[2], PortError::Range { port, .. } if port == "70000"));
        assert!(matches!(&errs[3], PortError::Range { port, .. } if port == "a"));
        assert!(matches!(&errs[4], PortError::Syntax { .. }));
        assert_eq!(errs[5], PortError::Empty);
        assert!(matches!(
            &errs[6],
            PortError::Duplicate {
                host: 90,
                protocol: Protocol::Tcp,
                ..
            }
        ));
        assert!(matches!(&errs[7], PortError::Reserved { .. }));
    }

    #[test]
    fn messages_name_item_and_rule() {
        let e = "80:+1".parse::<PortMapping>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "port mapping \"80:+1\": \"+1\" must be a number from 1 to 65535"
        );
    }

    proptest! {
        #[test]
        fn canonical_form_round_trips(
            items in proptest::collection::vec((1u16..=65535, 1u16..=65535, any::<bool>()), 0..8)
        ) {
            let mut seen = std::collections::HashSet::new();
            let mappings: Vec<PortMapping> = items
                .into_iter()
                .map(|(h, c, udp)| pm(h, c, if udp { Protocol::Udp } else { Protocol::Tcp }))
                .filter(|m| m.host != OVERLAY_TUNNEL_PORT && seen.insert((m.host, m.protocol)))
                .collect();
            let text = format_port_list(&mappings);
            prop_assert_eq!(parse_port_list(&text).unwrap(), mappings);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,64}") {
            let _ = parse_port_list(&s);
        }
    }
}
