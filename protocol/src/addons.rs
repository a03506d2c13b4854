//! The addons contract: the marketplace descriptor of an addon (services, volumes, networks, as the reference's
//! marketplace stores it), its validation (every problem at once, with field paths and bounded sizes), the
//! marketplace and installation statuses, the container naming and labels of the addons monitor, and the plugin
//! slots (core components an addon service can replace by being named like them).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::sla::Issue;

/// The label every addon container carries: the installed addon's id.
pub const LABEL_ADDON_ID: &str = "oak.addon.id";
/// The label naming the addon service a container runs.
pub const LABEL_SERVICE_NAME: &str = "oak.service.name";
/// The label prefix reserved for the engine (a descriptor may not set labels under it).
pub const RESERVED_LABEL_PREFIX: &str = "oak.";
/// The network a service joins when it declares none (the reference's compose network).
pub const DEFAULT_NETWORK: &str = "oakestra";

/// Most services in one addon.
pub const MAX_SERVICES: usize = 16;
/// Most volumes or networks declared by one addon.
pub const MAX_VOLUMES: usize = 32;
/// Most entries in one map (environment, labels, ports, driver options).
pub const MAX_MAP_ENTRIES: usize = 256;
/// Longest string field (command lines, environment values).
pub const MAX_TEXT: usize = 4096;
/// Longest name (addon, service, volume, network) or image reference.
pub const MAX_NAME: usize = 128;
/// Longest description.
pub const MAX_DESCRIPTION: usize = 2048;

/// A core component an addon can replace: the tier delegates that job to the addon service named like the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// Root's cluster placement (`root_scheduler`, the reference's container name).
    RootScheduler,
    /// A cluster's worker placement (`cluster_scheduler`).
    ClusterScheduler,
}

impl Slot {
    /// Every slot.
    pub const ALL: [Slot; 2] = [Slot::RootScheduler, Slot::ClusterScheduler];

    /// The slot's name, which is also the container name of the reference's core component.
    pub fn name(self) -> &'static str {
        match self {
            Slot::RootScheduler => "root_scheduler",
            Slot::ClusterScheduler => "cluster_scheduler",
        }
    }

    /// The plane that owns the slot.
    pub fn plane(self) -> Plane {
        match self {
            Slot::RootScheduler => Plane::Root,
            Slot::ClusterScheduler => Plane::Cluster,
        }
    }

    /// The slot a service of an addon installed on `plane` fills: its container name `<plane>_<service_name>`
    /// (prefix not doubled) is the slot's name.
    pub fn for_service(plane: Plane, service_name: &str) -> Option<Slot> {
        let container = container_name(plane, service_name);
        Slot::ALL
            .into_iter()
            .find(|s| s.plane() == plane && s.name() == container)
    }
}

/// Which tier runs an addon engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plane {
    /// root-service.
    Root,
    /// cluster-service.
    Cluster,
}

impl Plane {
    /// `root` or `cluster` (the reference's `ORCHESTRATION_PLANE`).
    pub fn as_str(self) -> &'static str {
        match self {
            Plane::Root => "root",
            Plane::Cluster => "cluster",
        }
    }
}

/// The container name of service `service_name` of an addon on `plane`: `<plane>_<service_name>`, without doubling
/// a prefix the service name already has (`root_scheduler` stays `root_scheduler`).
pub fn container_name(plane: Plane, service_name: &str) -> String {
    let prefix = format!("{}_", plane.as_str());
    if service_name.starts_with(&prefix) {
        service_name.to_owned()
    } else {
        format!("{prefix}{service_name}")
    }
}

/// Where a marketplace entry stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MarketplaceStatus {
    /// Published; its images are being checked.
    UnderReview,
    /// Every image was pulled and runs on this platform.
    Approved,
    /// An image is missing, could not be pulled or is for another platform (`status_details` says which).
    VerificationFailed,
}

impl MarketplaceStatus {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnderReview => "under_review",
            Self::Approved => "approved",
            Self::VerificationFailed => "verification_failed",
        }
    }

    /// Parses the wire spelling (also the docs' `failed_verification`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "under_review" => Some(Self::UnderReview),
            "approved" => Some(Self::Approved),
            "verification_failed" | "failed_verification" => Some(Self::VerificationFailed),
            _ => None,
        }
    }
}

/// Where an installed addon stands (the reference's states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AddonStatus {
    /// Requested; the monitor creates its networks, volumes and containers.
    Installing,
    /// Every service runs.
    Active,
    /// Some services run, some failed (`status_details.failed_services`).
    PartiallyActive,
    /// No service runs.
    Failed,
    /// Uninstall requested; the monitor removes its containers.
    Disabling,
    /// Its containers are gone; deleting it now removes the record.
    Disabled,
}

impl AddonStatus {
    /// Every status.
    pub const ALL: [AddonStatus; 6] = [
        Self::Installing,
        Self::Active,
        Self::PartiallyActive,
        Self::Failed,
        Self::Disabling,
        Self::Disabled,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Installing => "installing",
            Self::Active => "active",
            Self::PartiallyActive => "partially_active",
            Self::Failed => "failed",
            Self::Disabling => "disabling",
            Self::Disabled => "disabled",
        }
    }

    /// Parses the wire spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether the addon's containers should run.
    pub fn wants_containers(self) -> bool {
        matches!(self, Self::Installing | Self::Active | Self::PartiallyActive)
    }
}

/// One container of an addon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonService {
    /// Unique within the addon; the container is `<plane>_<service_name>`.
    pub service_name: String,
    /// The image reference (pulled by the verifier and the monitor).
    pub image: String,
    /// The command line, split like a shell does (quotes, no expansion); empty: the image's own.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub command: String,
    /// Networks to join (declared by the addon or existing); empty: [`DEFAULT_NETWORK`].
    #[serde(default)]
    pub networks: Vec<String>,
    /// `"<host path or volume name>:<container path>[:ro|:rw]"`.
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Published ports: `"<container port>[/tcp|/udp]"` → `"<host port>"` or `"<host ip>:<host port>"`.
    #[serde(default)]
    pub ports: BTreeMap<String, String>,
    /// Environment variables.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Container labels (not under `oak.`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A named volume an addon declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonVolume {
    /// The volume name.
    pub name: String,
    /// The volume driver (`local`).
    #[serde(default = "local")]
    pub driver: String,
    /// Driver options.
    #[serde(default)]
    pub driver_opts: BTreeMap<String, String>,
    /// Volume labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A network an addon declares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonNetwork {
    /// The network name.
    pub name: String,
    /// The network driver (`bridge`).
    #[serde(default = "bridge")]
    pub driver: String,
    /// Whether the network has IPv6.
    #[serde(default)]
    pub enable_ipv6: bool,
}

fn local() -> String {
    "local".into()
}

fn bridge() -> String {
    "bridge".into()
}

/// What a developer publishes to the marketplace (the reference's addon model without `_id` and `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddonSpec {
    /// Unique in the marketplace.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// At least one.
    pub services: Vec<AddonService>,
    /// Named volumes to create.
    #[serde(default)]
    pub volumes: Vec<AddonVolume>,
    /// Networks to create.
    #[serde(default)]
    pub networks: Vec<AddonNetwork>,
}

impl AddonSpec {
    /// The networks service `s` joins: its own, or [`DEFAULT_NETWORK`].
    pub fn networks_of(s: &AddonService) -> Vec<String> {
        if s.networks.is_empty() {
            vec![DEFAULT_NETWORK.to_owned()]
        } else {
            s.networks.clone()
        }
    }
}

/// Collects problems while walking a descriptor.
struct Check {
    problems: Vec<Issue>,
}

impl Check {
    fn bad(&mut self, path: &str, value: &Value, rule: impl Into<String>) {
        self.problems.push(Issue::new(path, value, rule));
    }

    /// A string field within `max` characters; `required` also refuses an empty one.
    fn text<'a>(
        &mut self,
        path: &str,
        value: Option<&'a Value>,
        required: bool,
        max: usize,
    ) -> Option<&'a str> {
        match value {
            None | Some(Value::Null) if required => {
                self.bad(path, &Value::Null, "is required");
                None
            }
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if required && s.trim().is_empty() => {
                self.bad(path, &Value::String(s.clone()), "must not be empty");
                None
            }
            Some(Value::String(s)) if s.chars().count() > max => {
                self.bad(
                    path,
                    &Value::String(s.clone()),
                    format!("must be at most {max} characters"),
                );
                None
            }
            Some(Value::String(s)) if s.chars().any(char::is_control) => {
                self.bad(
                    path,
                    &Value::String(s.clone()),
                    "must not contain control characters",
                );
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(other) => {
                self.bad(path, other, "must be a string");
                None
            }
        }
    }

    /// A name Docker accepts for containers, networks and volumes: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
    fn name(&mut self, path: &str, value: Option<&Value>) -> Option<String> {
        let s = self.text(path, value, true, MAX_NAME)?;
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
        if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            self.bad(
                path,
                &Value::String(s.to_owned()),
                "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'",
            );
            return None;
        }
        Some(s.to_owned())
    }

    /// An array of at most `max` items.
    fn array<'a>(&mut self, path: &str, value: Option<&'a Value>, max: usize) -> &'a [Value] {
        match value {
            None | Some(Value::Null) => &[],
            Some(Value::Array(items)) if items.len() > max => {
                self.bad(
                    path,
                    &Value::from(items.len()),
                    format!("must hold at most {max} items"),
                );
                &[]
            }
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.bad(path, other, "must be an array");
                &[]
            }
        }
    }

    /// An object of strings with at most [`MAX_MAP_ENTRIES`] entries (numbers and booleans are taken as their
    /// text, as compose files write them).
    fn string_map(&mut self, path: &str, value: Option<&Value>) -> Vec<(String, String)> {
        let entries = match value {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Object(m)) if m.len() > MAX_MAP_ENTRIES => {
                self.bad(
                    path,
                    &Value::from(m.len()),
                    format!("must hold at most {MAX_MAP_ENTRIES} entries"),
                );
                return Vec::new();
            }
            Some(Value::Object(m)) => m,
            Some(other) => {
                self.bad(path, other, "must be an object of strings");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for (k, v) in entries {
            let at = format!("{path}.{k}");
            if k.is_empty() || k.chars().count() > MAX_NAME || k.chars().any(char::is_control) {
                self.bad(
                    &at,
                    &Value::String(k.clone()),
                    format!("keys must be 1 to {MAX_NAME} printable characters"),
                );
                continue;
            }
            let text = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    self.bad(&at, other, "must be a string");
                    continue;
                }
            };
            if text.chars().count() > MAX_TEXT || text.contains('\0') {
                self.bad(
                    &at,
                    v,
                    format!("must be at most {MAX_TEXT} characters, without NUL"),
                );
                continue;
            }
            out.push((k.clone(), text));
        }
        out
    }

    fn unknown(&mut self, path: &str, object: &Map<String, Value>, known: &[&str]) {
        for (k, v) in object {
            if !known.contains(&k.as_str()) {
                let at = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                let rule = if path.is_empty() && (k == "_id" || k == "status" || k == "status_details") {
                    "is read-only: the marketplace sets it".to_owned()
                } else {
                    format!("is not a known field (known: {})", known.join(", "))
                };
                self.bad(&at, v, rule);
            }
        }
    }
}

/// A port number 1–65535.
fn port_number(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|&p| p > 0)
}

/// Whether `s` is `"<port>"` or `"<port>/tcp|udp"`.
fn container_port_ok(s: &str) -> bool {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    port_number(port).is_some() && matches!(proto, "tcp" | "udp")
}

/// Whether `s` is `"<port>"` or `"<ipv4>:<port>"`.
fn host_port_ok(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((ip, port)) => ip.parse::<std::net::Ipv4Addr>().is_ok() && port_number(port).is_some(),
        None => port_number(s).is_some(),
    }
}

/// Splits a command line like a POSIX shell splits words: whitespace separates, single quotes keep everything,
/// double quotes keep everything but `\"` and `\\`, a backslash outside quotes escapes the next character. No
/// expansion of any kind. An unclosed quote is an error.
pub fn split_command(line: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("has an unclosed single quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => word.push(c),
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("has an unclosed double quote"),
                        },
                        Some(c) => word.push(c),
                        None => return Err("has an unclosed double quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(c) => word.push(c),
                    None => return Err("ends with a lone backslash"),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// Checks a marketplace descriptor and reads it: every problem at once (field path, value, rule), sizes bounded.
pub fn parse_spec(value: &Value) -> Result<AddonSpec, Vec<Issue>> {
    let mut c = Check { problems: Vec::new() };
    let Value::Object(top) = value else {
        return Err(vec![Issue::new("", value, "must be a JSON object")]);
    };
    c.unknown(
        "",
        top,
        &["name", "description", "services", "volumes", "networks"],
    );
    let name = c.name("name", top.get("name"));
    let description = c
        .text("description", top.get("description"), false, MAX_DESCRIPTION)
        .unwrap_or_default()
        .to_owned();

    let mut volumes = Vec::new();
    for (i, v) in c
        .array("volumes", top.get("volumes"), MAX_VOLUMES)
        .iter()
        .enumerate()
    {
        let at = format!("volumes[{i}]");
        let Value::Object(o) = v else {
            c.bad(&at, v, "must be an object with a name");
            continue;
        };
        c.unknown(&at, o, &["name", "driver", "driver_opts", "labels"]);
        let name = c.name(&format!("{at}.name"), o.get("name"));
        let driver = c
            .text(&format!("{at}.driver"), o.get("driver"), false, MAX_NAME)
            .unwrap_or("local")
            .to_owned();
        let driver_opts = c.string_map(&format!("{at}.driver_opts"), o.get("driver_opts"));
        let labels = c.string_map(&format!("{at}.labels"), o.get("labels"));
        if let Some(name) = name {
            if volumes.iter().any(|x: &AddonVolume| x.name == name) {
                c.bad(
                    &format!("{at}.name"),
                    &Value::String(name.clone()),
                    "is declared twice",
                );
            }
            volumes.push(AddonVolume {
                name,
                driver,
                driver_opts: driver_opts.into_iter().collect(),
                labels: labels.into_iter().collect(),
            });
        }
    }

    let mut networks = Vec::new();
    for (i, v) in c
        .array("networks", top.get("networks"), MAX_VOLUMES)
        .iter()
        .enumerate()
    {
        let at = format!("networks[{i}]");
        let Value::Object(o) = v else {
            c.bad(&at, v, "must be an object with a name");
            continue;
        };
        c.unknown(&at, o, &["name", "driver", "enable_ipv6"]);
        let name = c.name(&format!("{at}.name"), o.get("name"));
        let driver = c
            .text(&format!("{at}.driver"), o.get("driver"), false, MAX_NAME)
            .unwrap_or("bridge")
            .to_owned();
        let enable_ipv6 = match o.get("enable_ipv6") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                c.bad(&format!("{at}.enable_ipv6"), other, "must be true or false");
                false
            }
        };
        if let Some(name) = name {
            if networks.iter().any(|x: &AddonNetwork| x.name == name) {
                c.bad(
                    &format!("{at}.name"),
                    &Value::String(name.clone()),
                    "is declared twice",
                );
            }
            networks.push(AddonNetwork {
                name,
                driver,
                enable_ipv6,
            });
        }
    }

    let mut services = Vec::new();
    let listed = c.array("services", top.get("services"), MAX_SERVICES);
    if listed.is_empty() && !c.problems.iter().any(|p| p.path == "services") {
        c.bad(
            "services",
            top.get("services").unwrap_or(&Value::Null),
            "must list at least one service",
        );
    }
    for (i, v) in listed.iter().enumerate() {
        let at = format!("services[{i}]");
        let Value::Object(o) = v else {
            c.bad(&at, v, "must be an object with service_name and image");
            continue;
        };
        c.unknown(
            &at,
            o,
            &[
                "service_name",
                "image",
                "command",
                "networks",
                "volumes",
                "ports",
                "environment",
                "labels",
            ],
        );
        let service_name = c.name(&format!("{at}.service_name"), o.get("service_name"));
        let image = c
            .text(&format!("{at}.image"), o.get("image"), true, MAX_NAME)
            .map(str::to_owned);
        if let Some(img) = &image
            && img.chars().any(char::is_whitespace)
        {
            c.bad(
                &format!("{at}.image"),
                &Value::String(img.clone()),
                "must not contain spaces",
            );
        }
        let command = c
            .text(&format!("{at}.command"), o.get("command"), false, MAX_TEXT)
            .unwrap_or_default()
            .to_owned();
        if let Err(rule) = split_command(&command) {
            c.bad(&format!("{at}.command"), &Value::String(command.clone()), rule);
        }
        let mut service_networks = Vec::new();
        for (j, n) in c
            .array(&format!("{at}.networks"), o.get("networks"), MAX_VOLUMES)
            .iter()
            .enumerate()
        {
            if let Some(n) = c.name(&format!("{at}.networks[{j}]"), Some(n)) {
                service_networks.push(n);
            }
        }
        let mut service_volumes = Vec::new();
        for (j, m) in c
            .array(&format!("{at}.volumes"), o.get("volumes"), MAX_VOLUMES)
            .iter()
            .enumerate()
        {
            let path = format!("{at}.volumes[{j}]");
            let Some(m) = c.text(&path, Some(m), true, MAX_TEXT) else {
                continue;
            };
            let parts: Vec<&str> = m.split(':').collect();
            let ok = match parts.as_slice() {
                [src, dst] | [src, dst, "ro" | "rw"] => !src.is_empty() && dst.starts_with('/'),
                _ => false,
            };
            if ok {
                service_volumes.push(m.to_owned());
            } else {
                c.bad(
                    &path,
                    &Value::String(m.to_owned()),
                    "must be \"<host path or volume name>:<absolute container path>[:ro|:rw]\"",
                );
            }
        }
        let mut ports = BTreeMap::new();
        for (k, v) in c.string_map(&format!("{at}.ports"), o.get("ports")) {
            let path = format!("{at}.ports.{k}");
            if !container_port_ok(&k) {
                c.bad(
                    &path,
                    &Value::String(k.clone()),
                    "the key must be a container port 1-65535, optionally /tcp or /udp",
                );
            } else if !host_port_ok(&v) {
                c.bad(
                    &path,
                    &Value::String(v.clone()),
                    "must be a host port 1-65535 or \"<IPv4>:<port>\"",
                );
            } else {
                ports.insert(k, v);
            }
        }
        let mut environment = BTreeMap::new();
        for (k, v) in c.string_map(&format!("{at}.environment"), o.get("environment")) {
            if k.contains('=') {
                c.bad(
                    &format!("{at}.environment.{k}"),
                    &Value::String(k.clone()),
                    "a variable name must not contain '='",
                );
            } else {
                environment.insert(k, v);
            }
        }
        let mut labels = BTreeMap::new();
        for (k, v) in c.string_map(&format!("{at}.labels"), o.get("labels")) {
            if k.starts_with(RESERVED_LABEL_PREFIX) {
                c.bad(
                    &format!("{at}.labels.{k}"),
                    &Value::String(k.clone()),
                    format!("labels under '{RESERVED_LABEL_PREFIX}' are set by the addons engine"),
                );
            } else {
                labels.insert(k, v);
            }
        }
        if let (Some(service_name), Some(image)) = (service_name, image) {
            if services
                .iter()
                .any(|s: &AddonService| s.service_name == service_name)
            {
                c.bad(
                    &format!("{at}.service_name"),
                    &Value::String(service_name.clone()),
                    "is used by another service of this addon",
                );
            }
            services.push(AddonService {
                service_name,
                image,
                command,
                networks: service_networks,
                volumes: service_volumes,
                ports,
                environment,
                labels,
            });
        }
    }
    match name {
        Some(name) if c.problems.is_empty() => Ok(AddonSpec {
            name,
            description,
            services,
            volumes,
            networks,
        }),
        _ => Err(c.problems),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn paths(v: Value) -> Vec<String> {
        parse_spec(&v).unwrap_err().into_iter().map(|i| i.path).collect()
    }

    #[test]
    fn a_reference_descriptor_parses_with_defaults() {
        let spec = parse_spec(&json!({
            "name": "hello",
            "description": "says hello",
            "services": [{
                "service_name": "hello",
                "image": "127.0.0.1:5000/oakestra/addon-hello:latest",
                "command": "httpd -f -p 8080 -h '/www root'",
                "ports": {"8080": "18080"},
                "environment": {"GREETING": "hi", "N": 3},
                "labels": {"team": "edge"},
                "volumes": ["hello-data:/data:ro"],
                "networks": ["hello-net"]
            }],
            "volumes": [{"name": "hello-data"}],
            "networks": [{"name": "hello-net"}]
        }))
        .unwrap();
        assert_eq!(spec.volumes[0].driver, "local");
        assert_eq!(spec.networks[0].driver, "bridge");
        assert_eq!(spec.services[0].environment["N"], "3");
        assert_eq!(
            split_command(&spec.services[0].command).unwrap(),
            ["httpd", "-f", "-p", "8080", "-h", "/www root"]
        );
    }

    #[test]
    fn every_problem_is_named_by_its_path() {
        let found = paths(json!({
            "name": "-bad",
            "status": "approved",
            "services": [
                {"service_name": "a", "image": "x", "ports": {"0": "1", "80": "http"}, "labels": {"oak.addon.id": "z"}},
                {"service_name": "a", "image": "", "command": "echo 'open", "colour": 1},
                {"image": "x", "volumes": ["relative:data"], "environment": {"A": {"b": 1}}}
            ],
            "networks": [{"name": "n"}, {"name": "n", "enable_ipv6": "yes"}]
        }));
        for p in [
            "name",
            "status",
            "services[0].ports.0",
            "services[0].ports.80",
            "services[0].labels.oak.addon.id",
            "services[1].image",
            "services[1].command",
            "services[1].colour",
            "services[2].service_name",
            "services[2].volumes[0]",
            "services[2].environment.A",
            "networks[1].name",
            "networks[1].enable_ipv6",
        ] {
            assert!(found.iter().any(|f| f == p), "{p} missing from {found:?}");
        }
    }

    #[test]
    fn sizes_are_bounded() {
        let services: Vec<Value> = (0..=MAX_SERVICES)
            .map(|i| json!({"service_name": format!("s{i}"), "image": "x"}))
            .collect();
        assert_eq!(paths(json!({"name": "n", "services": services})), ["services"]);
        assert_eq!(paths(json!({"name": "n", "services": []})), ["services"]);
        assert_eq!(
            paths(
                json!({"name": "n".repeat(MAX_NAME + 1), "services": [{"service_name": "a", "image": "x"}]})
            ),
            ["name"]
        );
    }

    #[test]
    fn container_names_follow_the_plane_and_find_slots() {
        assert_eq!(container_name(Plane::Root, "hello"), "root_hello");
        assert_eq!(container_name(Plane::Root, "root_scheduler"), "root_scheduler");
        assert_eq!(
            Slot::for_service(Plane::Root, "scheduler"),
            Some(Slot::RootScheduler)
        );
        assert_eq!(
            Slot::for_service(Plane::Root, "root_scheduler"),
            Some(Slot::RootScheduler)
        );
        assert_eq!(
            Slot::for_service(Plane::Cluster, "scheduler"),
            Some(Slot::ClusterScheduler)
        );
        assert_eq!(Slot::for_service(Plane::Root, "cluster_scheduler"), None);
        assert_eq!(Slot::for_service(Plane::Root, "hello"), None);
    }

    #[test]
    fn statuses_round_trip() {
        for s in AddonStatus::ALL {
            assert_eq!(AddonStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(
            MarketplaceStatus::parse("failed_verification"),
            Some(MarketplaceStatus::VerificationFailed)
        );
    }

    #[test]
    fn the_example_descriptors_are_valid() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/addons");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let value: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                parse_spec(&value).unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 3, "{seen} examples");
    }

    #[test]
    fn commands_split_like_a_shell() {
        assert_eq!(
            split_command(r#"sh -c "echo \"hi\" there""#).unwrap(),
            ["sh", "-c", r#"echo "hi" there"#]
        );
        assert_eq!(split_command("a\\ b  ''").unwrap(), ["a b", ""]);
        assert!(split_command("\"open").is_err());
        assert!(split_command("").unwrap().is_empty());
    }
}
