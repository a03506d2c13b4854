//! SLA validation: walks the raw JSON, collects every problem with its JSON path, offending value and rule, keeps
//! unknown fields (reported as warnings), normalises what is harmless to normalise, then builds the typed model.
//!
//! Checking the raw `serde_json::Value` instead of relying on serde's first error is what lets a user fix a whole
//! descriptor in one round trip.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use super::{Descriptor, SLA_VERSION, ServiceList, Sla, Virtualization, ports};
use crate::{
    addr::{
        plan::{SERVICE_POOL_V4, service_pool_v4_usable},
        policy::{BalancingPolicy, policy_block},
    },
    naming::{NAME_RULE, is_valid_name},
};

/// Largest `memory` (MiB): 1 TiB.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest `vcpus`.
pub const MAX_VCPUS: u64 = 1024;
/// Largest `vgpus` / `vtpus`.
pub const MAX_ACCELERATORS: u64 = 64;
/// Largest `storage` (MiB): 1 PiB.
pub const MAX_STORAGE_MIB: u64 = 1 << 30;
/// Largest `bandwidth_in` / `bandwidth_out` (Mbit/s): 1 Tbit/s.
pub const MAX_BANDWIDTH: u64 = 1_000_000;
/// Architectures a worker can report (Go's GOARCH names, as the reference uses).
pub const ARCHES: &[&str] = &["amd64", "arm64", "arm", "386", "riscv64", "ppc64le", "s390x"];
/// Constraint types we understand.
pub const CONSTRAINT_TYPES: &[&str] = &["direct", "clusters", "addons", "latency", "geo"];

const SLA_KEYS: &[&str] = &["sla_version", "customerID", "applications", "args"];
const APP_KEYS: &[&str] = &[
    "applicationID",
    "application_name",
    "application_namespace",
    "application_desc",
    "microservices",
];
const SERVICE_KEYS: &[&str] = &[
    "microserviceID",
    "microservice_name",
    "microservice_namespace",
    "virtualization",
    "cmd",
    "environment",
    "memory",
    "vcpus",
    "vgpus",
    "vtpus",
    "bandwidth_in",
    "bandwidth_out",
    "storage",
    "code",
    "arch",
    "state",
    "port",
    "addresses",
    "added_files",
    "constraints",
    "one_shot",
    "privileged",
    "volumes",
    "connectivity",
    "sla_violation_strategy",
    "target_node",
    "args",
];
const ADDRESS_KEYS: &[&str] = &["rr_ip", "rr_ip_v6", "closest_ip", "closest_ip_v6", "instances"];
const CONSTRAINT_KEYS: &[&str] = &[
    "type",
    "area",
    "cluster",
    "node",
    "location",
    "threshold",
    "rigidness",
    "convergence_time",
    "needs",
    "allowed",
];
const VOLUME_KEYS: &[&str] = &["volume_id", "csi_driver", "mount_path", "config"];

/// One finding: where, what was there, and which rule it breaks.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Issue {
    /// JSON path, e.g. `applications[0].microservices[1].microservice_name` (empty for the document itself).
    pub path: String,
    /// The offending value (`null` when the field is missing).
    pub value: Value,
    /// The rule, in words.
    pub rule: String,
}

impl Issue {
    /// A finding at `path` about `value`.
    pub fn new(path: &str, value: &Value, rule: impl Into<String>) -> Self {
        Issue {
            path: path.to_owned(),
            value: value.clone(),
            rule: rule.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "(document)"
        } else {
            &self.path
        };
        if self.value.is_null() {
            return write!(f, "{path}: {}", self.rule);
        }
        let mut shown = self.value.to_string();
        if shown.chars().count() > 80 {
            shown = shown.chars().take(77).collect::<String>() + "...";
        }
        write!(f, "{path} = {shown}: {}", self.rule)
    }
}

/// Why a descriptor was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SlaError {
    /// The text is not JSON at all.
    #[error("deployment descriptor is not valid JSON: {message}")]
    Syntax {
        /// The parser's message, with line and column.
        message: String,
    },
    /// The JSON breaks one or more rules; every problem is listed.
    #[error("deployment descriptor has {} problem(s): {}", problems.len(), join_issues(problems))]
    Invalid {
        /// Every rule violation found.
        problems: Vec<Issue>,
        /// Unknown fields and other findings that did not stop the descriptor.
        warnings: Vec<Issue>,
    },
}

fn join_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl SlaError {
    /// The problems (empty for a syntax error).
    pub fn problems(&self) -> &[Issue] {
        match self {
            SlaError::Syntax { .. } => &[],
            SlaError::Invalid { problems, .. } => problems,
        }
    }
}

/// A descriptor that passed validation, with the warnings found on the way.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated<T> {
    /// The typed descriptor.
    pub value: T,
    /// Unknown fields (kept) and other non-fatal findings.
    pub warnings: Vec<Issue>,
}

/// Parses and validates a full SLA.
pub fn parse_sla(json: &str) -> Result<Validated<Sla>, SlaError> {
    sla_from_value(from_text(json)?)
}

/// Parses and validates the dashboard's `{"microservices": […]}` form.
pub fn parse_services(json: &str) -> Result<Validated<ServiceList>, SlaError> {
    services_from_value(from_text(json)?)
}

/// Parses and validates either shape: a document with `applications` is a full SLA, one with only
/// `microservices` is the dashboard form.
pub fn parse(json: &str) -> Result<Validated<Descriptor>, SlaError> {
    descriptor_from_value(from_text(json)?)
}

/// Validates an already-parsed document of either shape.
pub fn descriptor_from_value(value: Value) -> Result<Validated<Descriptor>, SlaError> {
    let services_only = value
        .as_object()
        .is_some_and(|o| !o.contains_key("applications") && o.contains_key("microservices"));
    if services_only {
        let v = services_from_value(value)?;
        Ok(Validated {
            value: Descriptor::Services(v.value),
            warnings: v.warnings,
        })
    } else {
        let v = sla_from_value(value)?;
        Ok(Validated {
            value: Descriptor::Full(v.value),
            warnings: v.warnings,
        })
    }
}

/// Validates an already-parsed full SLA.
pub fn sla_from_value(mut value: Value) -> Result<Validated<Sla>, SlaError> {
    let mut c = Checker::default();
    c.sla(&mut value);
    c.finish(value)
}

/// Validates an already-parsed dashboard service list.
pub fn services_from_value(mut value: Value) -> Result<Validated<ServiceList>, SlaError> {
    let mut c = Checker::default();
    c.service_list(&mut value);
    c.finish(value)
}

fn from_text(json: &str) -> Result<Value, SlaError> {
    serde_json::from_str(json).map_err(|e| SlaError::Syntax {
        message: e.to_string(),
    })
}

fn at(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn whole_number(v: &Value) -> Option<u64> {
    if let Some(n) = v.as_u64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    if f.is_finite() && f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "checked integral, >= 0, < 2^53"
        )]
        Some(f as u64)
    } else {
        None
    }
}

/// An OCI image reference as users write them: `[registry[:port]/]path[:tag][@digest]`, no scheme, no spaces.
fn is_image_reference(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && !s.contains("://")
        && !s.starts_with(['/', ':', '@', '.', '-'])
        && !s.ends_with(['/', ':', '@'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:@".contains(&b))
}

fn is_http_url(s: &str) -> bool {
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/') && !r.chars().any(char::is_whitespace))
}

fn is_env_entry(s: &str) -> bool {
    match s.split_once('=') {
        Some((k, _)) => {
            !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !s.contains('\0')
        }
        None => false,
    }
}

fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Collects problems and warnings while walking one document.
#[derive(Default)]
struct Checker {
    problems: Vec<Issue>,
    warnings: Vec<Issue>,
    /// Service addresses claimed so far in this document, by normalised address → path of the first claim.
    addresses: HashMap<IpAddr, String>,
}

impl Checker {
    fn problem(&mut self, path: &str, value: &Value, rule: impl Into<String>) {
        self.problems.push(Issue::new(path, value, rule));
    }

    fn finish<T: DeserializeOwned>(self, value: Value) -> Result<Validated<T>, SlaError> {
        if !self.problems.is_empty() {
            return Err(SlaError::Invalid {
                problems: self.problems,
                warnings: self.warnings,
            });
        }
        // The checks above cover every typed field, so this only fails if checker and model disagree (a bug);
        // it still yields a clean error rather than a panic.
        match serde_json::from_value(value) {
            Ok(value) => Ok(Validated {
                value,
                warnings: self.warnings,
            }),
            Err(e) => Err(SlaError::Invalid {
                problems: vec![Issue::new("", &Value::Null, e.to_string())],
                warnings: self.warnings,
            }),
        }
    }

    /// Checks that `v` is an object, drops `null` members of known keys (absent and null mean the same), and warns
    /// about unknown keys (kept).
    fn object<'v>(
        &mut self,
        path: &str,
        v: &'v mut Value,
        known: &[&str],
    ) -> Option<&'v mut Map<String, Value>> {
        if !v.is_object() {
            self.problem(path, v, "must be a JSON object");
            return None;
        }
        let obj = v.as_object_mut()?;
        obj.retain(|k, v| !(v.is_null() && known.contains(&k.as_str())));
        for (k, val) in obj.iter() {
            if !known.contains(&k.as_str()) {
                self.warnings
                    .push(Issue::new(&at(path, k), val, "unknown field, kept as is"));
            }
        }
        Some(obj)
    }

    fn required<'v>(&mut self, obj: &'v Map<String, Value>, path: &str, key: &str) -> Option<&'v Value> {
        let v = obj.get(key);
        if v.is_none() {
            self.problem(&at(path, key), &Value::Null, "is required");
        }
        v
    }

    fn string<'v>(
        &mut self,
        obj: &'v Map<String, Value>,
        path: &str,
        key: &str,
        required: bool,
    ) -> Option<&'v str> {
        let v = if required {
            self.required(obj, path, key)?
        } else {
            obj.get(key)?
        };
        match v.as_str() {
            Some(s) => Some(s),
            None => {
                self.problem(&at(path, key), v, "must be a string");
                None
            }
        }
    }

    fn name(&mut self, obj: &Map<String, Value>, path: &str, key: &str) -> Option<String> {
        let s = self.string(obj, path, key, true)?;
        if is_valid_name(s) {
            Some(s.to_owned())
        } else {
            let v = Value::String(s.to_owned());
            self.problem(&at(path, key), &v, format!("must be {NAME_RULE}"));
            None
        }
    }

    fn boolean(&mut self, obj: &Map<String, Value>, path: &str, key: &str) {
        if let Some(v) = obj.get(key).filter(|v| !v.is_boolean()) {
            self.problem(&at(path, key), v, "must be true or false");
        }
    }

    /// A whole number in `0..=max`; integral floats (`100.0`) are normalised to integers.
    fn number(&mut self, obj: &mut Map<String, Value>, path: &str, key: &str, max: u64, unit: &str) {
        let Some(v) = obj.get(key) else { return };
        match whole_number(v) {
            Some(n) if n <= max => {
                obj.insert(key.to_owned(), Value::from(n));
            }
            Some(_) => {
                let v = v.clone();
                self.problem(&at(path, key), &v, format!("must be at most {max} {unit}"));
            }
            None => {
                let v = v.clone();
                self.problem(
                    &at(path, key),
                    &v,
                    format!("must be a whole number from 0 to {max} {unit}"),
                );
            }
        }
    }

    fn array<'v>(
        &mut self,
        obj: &'v mut Map<String, Value>,
        path: &str,
        key: &str,
    ) -> Option<&'v mut Vec<Value>> {
        let v = obj.get_mut(key)?;
        if v.is_array() {
            v.as_array_mut()
        } else {
            let v = v.clone();
            self.problem(&at(path, key), &v, "must be a JSON array");
            None
        }
    }

    /// An optional array of strings; returns the strings with their paths.
    fn strings(&mut self, obj: &mut Map<String, Value>, path: &str, key: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Some(items) = self.array(obj, path, key) else {
            return out;
        };
        let items = items.clone();
        for (i, item) in items.iter().enumerate() {
            let p = format!("{}[{i}]", at(path, key));
            match item.as_str() {
                Some(s) => out.push((p, s.to_owned())),
                None => self.problem(&p, item, "must be a string"),
            }
        }
        out
    }

    fn sla(&mut self, v: &mut Value) {
        let Some(obj) = self.object("", v, SLA_KEYS) else {
            return;
        };
        if let Some(ver) = self.string(obj, "", "sla_version", true)
            && ver != SLA_VERSION
        {
            let rule = if ver == "v1.0" {
                format!("SLA v1.0 is deprecated; use {SLA_VERSION}")
            } else {
                format!("must be {SLA_VERSION:?}")
            };
            let v = Value::String(ver.to_owned());
            self.problem("sla_version", &v, rule);
        }
        self.string(obj, "", "customerID", true);
        self.array(obj, "", "args");
        if obj.get("applications").is_none() {
            self.problem("applications", &Value::Null, "is required");
            return;
        }
        let Some(apps) = self.array(obj, "", "applications") else {
            return;
        };
        if apps.is_empty() {
            self.problem(
                "applications",
                &Value::Array(vec![]),
                "must list at least one application",
            );
        }
        let mut seen: HashMap<(String, String), String> = HashMap::new();
        for (i, app) in apps.iter_mut().enumerate() {
            let path = format!("applications[{i}]");
            if let Some(key) = self.application(&path, app) {
                if let Some(first) = seen.get(&key) {
                    let v = Value::String(format!("{}.{}", key.0, key.1));
                    self.problem(
                        &at(&path, "application_name"),
                        &v,
                        format!("application already defined at {first}"),
                    );
                } else {
                    seen.insert(key, path);
                }
            }
        }
    }

    fn application(&mut self, path: &str, v: &mut Value) -> Option<(String, String)> {
        let obj = self.object(path, v, APP_KEYS)?;
        self.string(obj, path, "applicationID", false);
        self.string(obj, path, "application_desc", false);
        let name = self.name(obj, path, "application_name");
        let ns = self.name(obj, path, "application_namespace");
        if let Some(services) = self.array(obj, path, "microservices") {
            let mut services = std::mem::take(services);
            self.services(&at(path, "microservices"), &mut services);
            obj.insert("microservices".into(), Value::Array(services));
        }
        Some((name?, ns?))
    }

    fn service_list(&mut self, v: &mut Value) {
        let Some(obj) = self.object("", v, &["microservices"]) else {
            return;
        };
        if obj.get("microservices").is_none() {
            self.problem("microservices", &Value::Null, "is required");
            return;
        }
        let Some(services) = self.array(obj, "", "microservices") else {
            return;
        };
        let mut services = std::mem::take(services);
        if services.is_empty() {
            self.problem(
                "microservices",
                &Value::Array(vec![]),
                "must list at least one service",
            );
        }
        self.services("microservices", &mut services);
        obj.insert("microservices".into(), Value::Array(services));
    }

    fn services(&mut self, path: &str, services: &mut [Value]) {
        let mut seen: HashMap<(String, String), String> = HashMap::new();
        for (i, svc) in services.iter_mut().enumerate() {
            let p = format!("{path}[{i}]");
            if let Some(key) = self.service(&p, svc) {
                if let Some(first) = seen.get(&key) {
                    let v = Value::String(format!("{}.{}", key.0, key.1));
                    self.problem(
                        &at(&p, "microservice_name"),
                        &v,
                        format!("service already defined at {first}"),
                    );
                } else {
                    seen.insert(key, p);
                }
            }
        }
    }

    fn service(&mut self, path: &str, v: &mut Value) -> Option<(String, String)> {
        let obj = self.object(path, v, SERVICE_KEYS)?;
        let name = self.name(obj, path, "microservice_name");
        let ns = self.name(obj, path, "microservice_namespace");
        for key in ["microserviceID", "state", "sla_violation_strategy", "target_node"] {
            self.string(obj, path, key, false);
        }
        let virt = self.string(obj, path, "virtualization", true).map(str::to_owned);
        let virt = virt.and_then(|s| {
            let parsed = Virtualization::parse(&s);
            if parsed.is_none() {
                self.problem(
                    &at(path, "virtualization"),
                    &Value::String(s),
                    "must be container or unikernel",
                );
            }
            parsed
        });
        self.number(obj, path, "memory", MAX_MEMORY_MIB, "MiB");
        self.number(obj, path, "vcpus", MAX_VCPUS, "vCPUs");
        self.number(obj, path, "vgpus", MAX_ACCELERATORS, "GPUs");
        self.number(obj, path, "vtpus", MAX_ACCELERATORS, "TPUs");
        self.number(obj, path, "storage", MAX_STORAGE_MIB, "MiB");
        self.number(obj, path, "bandwidth_in", MAX_BANDWIDTH, "Mbit/s");
        self.number(obj, path, "bandwidth_out", MAX_BANDWIDTH, "Mbit/s");
        self.boolean(obj, path, "one_shot");
        self.boolean(obj, path, "privileged");
        self.strings(obj, path, "cmd");
        self.strings(obj, path, "added_files");
        for (p, s) in self.strings(obj, path, "environment") {
            if !is_env_entry(&s) {
                self.problem(
                    &p,
                    &Value::String(s),
                    "must be KEY=value with KEY made of letters, digits and _",
                );
            }
        }
        let arches = self.strings(obj, path, "arch");
        for (p, a) in &arches {
            if !ARCHES.contains(&a.as_str()) {
                self.problem(
                    p,
                    &Value::String(a.clone()),
                    format!("must be one of {}", ARCHES.join(", ")),
                );
            }
        }
        self.code(obj, path, virt, arches.len());
        if let Some(port) = self.string(obj, path, "port", false).map(str::to_owned)
            && let Err(errors) = ports::parse_port_list(&port)
        {
            for e in errors {
                let shown = if e.item().is_empty() {
                    port.clone()
                } else {
                    e.item().to_owned()
                };
                self.problem(&at(path, "port"), &Value::String(shown), e.to_string());
            }
        }
        if let Some(addr) = obj.get_mut("addresses") {
            self.addresses(&at(path, "addresses"), addr);
        }
        if let Some(items) = self.array(obj, path, "constraints") {
            for (i, c) in items.iter_mut().enumerate() {
                self.constraint(&format!("{}[{i}]", at(path, "constraints")), c);
            }
        }
        if let Some(items) = self.array(obj, path, "volumes") {
            for (i, vol) in items.iter_mut().enumerate() {
                self.volume(&format!("{}[{i}]", at(path, "volumes")), vol);
            }
        }
        if let Some(items) = self.array(obj, path, "connectivity") {
            for (i, c) in items.iter_mut().enumerate() {
                self.object(
                    &format!("{}[{i}]", at(path, "connectivity")),
                    c,
                    &["target_microservice_id", "con_constraints"],
                );
            }
        }
        self.array(obj, path, "args");
        Some((name?, ns?))
    }

    fn code(
        &mut self,
        obj: &Map<String, Value>,
        path: &str,
        virt: Option<Virtualization>,
        arch_count: usize,
    ) {
        let Some(code) = self.string(obj, path, "code", true) else {
            return;
        };
        let code_path = at(path, "code");
        let shown = Value::String(code.to_owned());
        if code.trim().is_empty() {
            self.problem(&code_path, &shown, "must not be empty");
            return;
        }
        match virt {
            Some(Virtualization::Container) if !is_image_reference(code) => {
                self.problem(
                    &code_path,
                    &shown,
                    "must be an OCI image reference such as docker.io/library/nginx:latest",
                );
            }
            Some(Virtualization::Unikernel) => {
                let urls: Vec<&str> = code.split(',').map(str::trim).collect();
                for url in &urls {
                    if !is_http_url(url) {
                        let v = Value::String((*url).to_owned());
                        self.problem(
                            &code_path,
                            &v,
                            "each comma-separated unikernel image must be an http(s) URL",
                        );
                    }
                }
                if urls.len() != arch_count {
                    let v = obj.get("arch").cloned().unwrap_or(Value::Null);
                    self.problem(
                        &at(path, "arch"),
                        &v,
                        format!(
                            "a unikernel needs one arch per comma-separated code URL ({} URL(s), {arch_count} arch entr{})",
                            urls.len(),
                            if arch_count == 1 { "y" } else { "ies" }
                        ),
                    );
                }
            }
            Some(Virtualization::Container) | None => {}
        }
    }

    fn addresses(&mut self, path: &str, v: &mut Value) {
        let Some(obj) = self.object(path, v, ADDRESS_KEYS) else {
            return;
        };
        // An empty string means "not set", as dashboards send it.
        obj.retain(|k, v| !(ADDRESS_KEYS.contains(&k.as_str()) && v.as_str() == Some("")));
        let rules: [(&str, AddressRule); 4] = [
            ("rr_ip", service_v4),
            ("closest_ip", service_v4),
            ("rr_ip_v6", rr_v6),
            ("closest_ip_v6", closest_v6),
        ];
        for (key, check) in rules {
            let Some(s) = self.string(obj, path, key, false) else {
                continue;
            };
            let p = at(path, key);
            let shown = Value::String(s.to_owned());
            match check(s) {
                Err(rule) => self.problem(&p, &shown, rule),
                Ok(ip) => {
                    if let Some(first) = self.addresses.get(&ip) {
                        let rule = format!("address already requested at {first}");
                        self.problem(&p, &shown, rule);
                    } else {
                        self.addresses.insert(ip, p);
                    }
                }
            }
        }
        self.array(obj, path, "instances");
    }

    fn constraint(&mut self, path: &str, v: &mut Value) {
        let Some(obj) = self.object(path, v, CONSTRAINT_KEYS) else {
            return;
        };
        let Some(kind) = self.string(obj, path, "type", true).map(str::to_owned) else {
            return;
        };
        for key in ["node", "cluster", "area", "location"] {
            self.string(obj, path, key, false);
        }
        match kind.as_str() {
            "direct" => {
                let node = obj.get("node").and_then(Value::as_str).unwrap_or("");
                let cluster = obj.get("cluster").and_then(Value::as_str).unwrap_or("");
                if node.trim().is_empty() && cluster.trim().is_empty() {
                    self.problem(
                        path,
                        &Value::Object(obj.clone()),
                        "a direct constraint needs a node list, a cluster or both",
                    );
                }
                let node = node.to_owned();
                for n in node.split(';').map(str::trim).filter(|n| !n.is_empty()) {
                    if !is_node_name(n) {
                        let v = Value::String(n.to_owned());
                        self.problem(&at(path, "node"), &v, "each ;-separated node must be a hostname");
                    }
                }
            }
            "clusters" => self.name_list(obj, path, "allowed", "cluster"),
            "addons" => self.name_list(obj, path, "needs", "addon"),
            "latency" | "geo" => {
                for key in ["threshold", "rigidness", "convergence_time"] {
                    if let Some(v) = obj.get(key).filter(|v| !v.is_number()) {
                        let v = v.clone();
                        self.problem(&at(path, key), &v, "must be a number");
                    }
                }
            }
            other => {
                let v = Value::String(other.to_owned());
                self.problem(
                    &at(path, "type"),
                    &v,
                    format!("must be one of {}", CONSTRAINT_TYPES.join(", ")),
                );
            }
        }
    }

    fn name_list(&mut self, obj: &mut Map<String, Value>, path: &str, key: &str, what: &str) {
        if obj.get(key).is_none() {
            self.problem(
                &at(path, key),
                &Value::Null,
                format!("is required: a non-empty list of {what} names"),
            );
            return;
        }
        let names = self.strings(obj, path, key);
        if names.is_empty() && obj.get(key).is_some_and(Value::is_array) {
            self.problem(
                &at(path, key),
                &Value::Array(vec![]),
                format!("must list at least one {what} name"),
            );
        }
        for (p, n) in names {
            if n.trim().is_empty() {
                self.problem(&p, &Value::String(n), format!("{what} name must not be empty"));
            }
        }
    }

    fn volume(&mut self, path: &str, v: &mut Value) {
        let Some(obj) = self.object(path, v, VOLUME_KEYS) else {
            return;
        };
        for key in ["volume_id", "csi_driver"] {
            if let Some(s) = self.string(obj, path, key, true)
                && s.trim().is_empty()
            {
                let v = Value::String(s.to_owned());
                self.problem(&at(path, key), &v, "must not be empty");
            }
        }
        if let Some(m) = self.string(obj, path, "mount_path", false)
            && !m.starts_with('/')
        {
            let v = Value::String(m.to_owned());
            self.problem(&at(path, "mount_path"), &v, "must be an absolute path");
        }
        if let Some(c) = obj.get("config").filter(|c| !c.is_object()) {
            let c = c.clone();
            self.problem(&at(path, "config"), &c, "must be a JSON object");
        }
    }
}

/// Checks one requested service address and returns it normalised, or the rule it breaks.
type AddressRule = fn(&str) -> Result<IpAddr, String>;

/// `rr_ip` / `closest_ip`: a dotted-quad IPv4 address with numeric octets, inside 10.30.0.0/16, not its network or
/// broadcast address. Stricter than the reference, which only compared the first two octets as strings.
fn service_v4(s: &str) -> Result<IpAddr, String> {
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| "must be an IPv4 address a.b.c.d with decimal octets 0-255".to_owned())?;
    if !SERVICE_POOL_V4.contains(ip) {
        return Err(format!("must be inside the service range {SERVICE_POOL_V4}"));
    }
    if !service_pool_v4_usable(ip) {
        return Err(format!(
            "must not be the network or broadcast address of {SERVICE_POOL_V4}"
        ));
    }
    Ok(IpAddr::V4(ip))
}

fn policy_v6(s: &str, policy: BalancingPolicy) -> Result<IpAddr, String> {
    let ip: Ipv6Addr = s.parse().map_err(|_| "must be an IPv6 address".to_owned())?;
    let block = policy_block(policy);
    if block.contains(ip) {
        Ok(IpAddr::V6(ip))
    } else {
        Err(format!("must be inside the {policy} block {block}"))
    }
}

/// `rr_ip_v6`: inside the round-robin block fdff:2000::/21 (compared as an address, so any spelling works).
fn rr_v6(s: &str) -> Result<IpAddr, String> {
    policy_v6(s, BalancingPolicy::ROUND_ROBIN)
}

/// `closest_ip_v6`: inside the closest-instance block fdff:1000::/21.
fn closest_v6(s: &str) -> Result<IpAddr, String> {
    policy_v6(s, BalancingPolicy::CLOSEST)
}
