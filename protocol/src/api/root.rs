//! Cluster → root reporting (`POST /api/information/<cluster_id>`, every 15 s): the aggregation of the cluster's
//! worker documents ([`aggregate_workers`]) and a typed, lenient view of the report body ([`ClusterReport`]).
//!
//! # Aggregation rules
//!
//! The reference cluster folds its active workers' documents key by key:
//!
//! | key | rule |
//! |---|---|
//! | `cpu_percent`, `memory_percent`, `vram_percent`, `gpu_temp`, `gpu_percent`, any key ending `_percent`/`_average` | mean over the workers, zero and non-numeric values skipped (0 when every value is skipped) |
//! | `vcpus`, `vgpus`, `vram`, `memory`, any other numeric key | sum; integers stay integers when every input is one |
//! | `virtualization`, `supported_addons`, `gpu_drivers`, any other list or string key | one list of distinct values in first-seen order, at most 64: a string contributes itself, a list its strings and numbers |
//! | `csi_drivers` | deduplicated list of driver names (from `{csi_driver_name, …}` objects or plain strings) |
//! | `active_nodes` | the number of workers |
//! | `aggregation_per_architecture` | `{arch: the same aggregation over the workers of that arch}` |
//!
//! Numeric strings (`"4"`, `"12.5"`) count as numbers everywhere. The reference excludes `_id`, `ip`, `port`,
//! `candidate_name` and `candidate_location`. Beyond the reference we also skip:
//! - JSON objects (`system_info`, `disk_info`, `network_info`), `null`s and booleans (`Overlay`, `active`): none of
//!   them has a meaningful sum, mean or concatenation;
//! - `architecture`: it is what `aggregation_per_architecture` is keyed by (missing or blank reads as `"unknown"`);
//! - the keys the aggregation itself writes (`active_nodes`, `aggregation_per_architecture`, `max_node_vcpus`,
//!   `max_node_memory`), should a worker document carry them.
//!
//! For a key that is in none of the named rules, the values decide: if every non-skipped value is numeric the key is
//! summed, otherwise the values are concatenated (numbers then contribute themselves).
//!
//! # Our extensions
//!
//! The reference keeps duplicates when it concatenates, so its report grows with every worker (10,000 workers that
//! each offer `docker` put 10,000 `"docker"`s in it, twice); root only ever asks whether a value is present, so we
//! keep distinct values, at most 64 per key.
//!
//! `max_node_vcpus` and `max_node_memory` carry the largest single worker's `vcpus` and `memory` (at the top level and
//! in every per-architecture aggregate), so root can tell whether *one* node of the cluster can hold a service, which
//! the sums cannot. Reference peers ignore keys they do not know, so the extra keys are harmless to them.

use std::collections::{BTreeMap, BTreeSet};

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, DeserializeOwned},
    ser,
};
use serde_json::{Map, Number, Value};

use crate::serde_util;

/// Keys the reference never aggregates.
const EXCLUDED_KEYS: [&str; 5] = ["_id", "ip", "port", "candidate_name", "candidate_location"];
/// Keys averaged over the workers (besides any key ending in one of [`MEAN_SUFFIXES`]).
const MEAN_KEYS: [&str; 5] = [
    "cpu_percent",
    "memory_percent",
    "vram_percent",
    "gpu_temp",
    "gpu_percent",
];
/// Key suffixes that make a key averaged.
const MEAN_SUFFIXES: [&str; 2] = ["_percent", "_average"];
/// Keys summed over the workers.
const SUM_KEYS: [&str; 4] = ["vcpus", "vgpus", "vram", "memory"];
/// Keys concatenated over the workers.
const CONCAT_KEYS: [&str; 3] = ["virtualization", "supported_addons", "gpu_drivers"];

const ACTIVE_NODES: &str = "active_nodes";
const PER_ARCHITECTURE: &str = "aggregation_per_architecture";
const ARCHITECTURE: &str = "architecture";
const CSI_DRIVERS: &str = "csi_drivers";
const CSI_DRIVER_NAME: &str = "csi_driver_name";
const VCPUS: &str = "vcpus";
const MEMORY: &str = "memory";
const MAX_NODE_VCPUS: &str = "max_node_vcpus";
const MAX_NODE_MEMORY: &str = "max_node_memory";
const JOBS: &str = "jobs";
/// Most distinct values a concatenated key keeps: what root needs is membership ("does a worker offer `docker`?"),
/// and the report must stay small however many workers there are.
const MAX_DISTINCT: usize = 64;
/// The per-architecture bucket of workers without an `architecture`.
const UNKNOWN_ARCHITECTURE: &str = "unknown";

/// Folds worker documents into the body a cluster reports to root (without `jobs`), by the rules in the module docs.
///
/// Keys are processed in sorted order and workers in slice order, so the result depends only on the input. Never
/// panics: values of unexpected types are skipped.
pub fn aggregate_workers(workers: &[Map<String, Value>]) -> Map<String, Value> {
    let all: Vec<&Map<String, Value>> = workers.iter().collect();
    let mut out = aggregate_flat(&all);

    let mut by_arch: BTreeMap<String, Vec<&Map<String, Value>>> = BTreeMap::new();
    for worker in workers {
        by_arch.entry(architecture_of(worker)).or_default().push(worker);
    }
    let per_arch: Map<String, Value> = by_arch
        .into_iter()
        .map(|(arch, group)| (arch, Value::Object(aggregate_flat(&group))))
        .collect();
    out.insert(PER_ARCHITECTURE.to_owned(), Value::Object(per_arch));
    out
}

/// The architecture bucket of a worker: its `architecture` string, or `"unknown"` when missing, blank or not text.
fn architecture_of(worker: &Map<String, Value>) -> String {
    match worker.get(ARCHITECTURE) {
        Some(Value::String(arch)) if !arch.trim().is_empty() => arch.clone(),
        _ => UNKNOWN_ARCHITECTURE.to_owned(),
    }
}

/// How one key is folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Not aggregated.
    Skip,
    /// Mean of the non-zero numbers.
    Mean,
    /// Sum of the numbers.
    Sum,
    /// Strings and list elements, in order.
    Concat,
    /// Deduplicated CSI driver names.
    Csi,
    /// [`Rule::Sum`] if every value is numeric, else a concatenation that keeps numbers too.
    ByType,
}

/// The rule for `key`, from its name alone.
fn rule_for(key: &str) -> Rule {
    let reserved = [
        ACTIVE_NODES,
        PER_ARCHITECTURE,
        MAX_NODE_VCPUS,
        MAX_NODE_MEMORY,
        ARCHITECTURE,
    ];
    if EXCLUDED_KEYS.contains(&key) || reserved.contains(&key) {
        Rule::Skip
    } else if key == CSI_DRIVERS {
        Rule::Csi
    } else if MEAN_KEYS.contains(&key) || MEAN_SUFFIXES.iter().any(|suffix| key.ends_with(suffix)) {
        Rule::Mean
    } else if SUM_KEYS.contains(&key) {
        Rule::Sum
    } else if CONCAT_KEYS.contains(&key) {
        Rule::Concat
    } else {
        Rule::ByType
    }
}

/// One aggregation level: every key of the workers plus `active_nodes` and `max_node_*`, without the
/// per-architecture split.
fn aggregate_flat(workers: &[&Map<String, Value>]) -> Map<String, Value> {
    let keys: BTreeSet<&str> = workers
        .iter()
        .flat_map(|w| w.keys())
        .map(String::as_str)
        .collect();
    let mut out = Map::new();
    for key in keys {
        let values: Vec<&Value> = workers.iter().filter_map(|w| w.get(key)).collect();
        let folded = match rule_for(key) {
            Rule::Skip => None,
            Rule::Mean => Some(mean(&values)),
            Rule::Sum => Some(sum(&values)),
            Rule::Concat => Some(concat(&values, false)),
            Rule::Csi => Some(csi_names(&values)),
            Rule::ByType => by_type(&values),
        };
        if let Some(value) = folded {
            out.insert(key.to_owned(), value);
        }
    }
    out.insert(ACTIVE_NODES.to_owned(), Value::from(workers.len()));
    for (source, target) in [(VCPUS, MAX_NODE_VCPUS), (MEMORY, MAX_NODE_MEMORY)] {
        if let Some(max) = largest(workers.iter().filter_map(|w| w.get(source))) {
            out.insert(target.to_owned(), max);
        }
    }
    out
}

/// A number read from a JSON number or a numeric string.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    /// An integer (wide enough for any `i64` or `u64`).
    Int(i128),
    /// A finite float.
    Float(f64),
}

impl Num {
    /// The number `value` holds, if it is a JSON number or a string holding one (`"NaN"`, `"inf"` are not).
    fn of(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .map(Self::Int)
                .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(Self::Float)),
            Value::String(s) => {
                let text = s.trim();
                text.parse::<i128>().ok().map(Self::Int).or_else(|| {
                    text.parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .map(Self::Float)
                })
            }
            _ => None,
        }
    }

    #[allow(
        clippy::cast_precision_loss,
        reason = "resource figures; integers beyond 2^53 never occur and would only lose precision"
    )]
    fn as_f64(self) -> f64 {
        match self {
            Self::Int(i) => i as f64,
            Self::Float(f) => f,
        }
    }

    fn is_zero(self) -> bool {
        self.as_f64() == 0.0
    }

    /// The number as JSON: integers as integers while they fit `i64`/`u64`.
    fn to_value(self) -> Value {
        match self {
            Self::Int(i) => i64::try_from(i)
                .map(Value::from)
                .or_else(|_| u64::try_from(i).map(Value::from))
                .unwrap_or_else(|_| float_value(self.as_f64())),
            Self::Float(f) => float_value(f),
        }
    }
}

/// A float as a JSON number; an infinite value (a sum overflowing `f64`) is clamped to the largest finite one.
fn float_value(f: f64) -> Value {
    Number::from_f64(f.clamp(f64::MIN, f64::MAX)).map_or_else(|| Value::from(0), Value::Number)
}

/// Mean of the non-zero numbers; `0.0` when there are none.
fn mean(values: &[&Value]) -> Value {
    let numbers: Vec<f64> = values
        .iter()
        .filter_map(|v| Num::of(v))
        .filter(|n| !n.is_zero())
        .map(Num::as_f64)
        .collect();
    if numbers.is_empty() {
        return float_value(0.0);
    }
    #[allow(clippy::cast_precision_loss, reason = "a worker count")]
    let count = numbers.len() as f64;
    let total: f64 = numbers.iter().sum();
    let mean = if total.is_finite() {
        total / count
    } else {
        // Only huge values overflow the sum; scaling first keeps the mean finite.
        numbers.iter().map(|x| x / count).sum()
    };
    float_value(mean)
}

/// Sum of the numbers (non-numeric values skipped); an integer when every number is one, `0` when there are none.
fn sum(values: &[&Value]) -> Value {
    let numbers: Vec<Num> = values.iter().filter_map(|v| Num::of(v)).collect();
    let all_ints = numbers.iter().all(|n| matches!(n, Num::Int(_)));
    if all_ints {
        let total = numbers
            .iter()
            .map(|n| match n {
                Num::Int(i) => *i,
                Num::Float(_) => 0,
            })
            .fold(0_i128, i128::saturating_add);
        Num::Int(total).to_value()
    } else {
        float_value(numbers.iter().map(|n| n.as_f64()).sum())
    }
}

/// Strings and list elements in order, duplicates kept; numbers contribute themselves when `with_numbers`.
fn concat(values: &[&Value], with_numbers: bool) -> Value {
    let mut out: Vec<Value> = Vec::new();
    let mut push = |item: &Value| {
        if out.len() < MAX_DISTINCT && !out.contains(item) {
            out.push(item.clone());
        }
    };
    for value in values {
        match value {
            Value::Array(items) => items
                .iter()
                .filter(|i| matches!(i, Value::String(_) | Value::Number(_)))
                .for_each(&mut push),
            Value::String(_) => push(value),
            Value::Number(_) if with_numbers => push(value),
            _ => {}
        }
    }
    Value::Array(out)
}

/// A key no named rule covers: summed if every value that is not `null`/boolean/object is numeric, concatenated
/// otherwise; absent when no value is usable.
fn by_type(values: &[&Value]) -> Option<Value> {
    let usable: Vec<&Value> = values
        .iter()
        .copied()
        .filter(|v| matches!(v, Value::Number(_) | Value::String(_) | Value::Array(_)))
        .collect();
    if usable.is_empty() {
        None
    } else if usable.iter().all(|v| Num::of(v).is_some()) {
        Some(sum(&usable))
    } else {
        Some(concat(&usable, true))
    }
}

/// The driver name of one `csi_drivers` entry: a `{csi_driver_name, …}` object or a plain string.
fn csi_name(entry: &Value) -> Option<&str> {
    let name: &str = match entry {
        Value::String(name) => name,
        Value::Object(driver) => driver.get(CSI_DRIVER_NAME)?.as_str()?,
        _ => return None,
    };
    (!name.trim().is_empty()).then_some(name)
}

/// Distinct CSI driver names in first-seen order (a lone entry instead of a list counts as one entry).
fn csi_names(values: &[&Value]) -> Value {
    let mut seen = BTreeSet::new();
    let mut names = Vec::new();
    let entries = values.iter().flat_map(|value| match value {
        Value::Array(items) => items.iter().collect::<Vec<_>>(),
        other => vec![*other],
    });
    for name in entries.filter_map(csi_name) {
        if seen.insert(name) {
            names.push(Value::from(name));
        }
    }
    Value::Array(names)
}

/// The largest number among `values` (as the worker sent it, numeric strings as numbers), if any is numeric.
fn largest<'a>(values: impl Iterator<Item = &'a Value>) -> Option<Value> {
    values
        .filter_map(Num::of)
        .reduce(|best, n| if n.as_f64() > best.as_f64() { n } else { best })
        .map(Num::to_value)
}

// === Typed view ===

/// A cluster's aggregate as root reads it: the report body without `jobs` (see [`ClusterReport`]).
///
/// Every field is read leniently: numbers may come as strings, and a value of the wrong type (`"vcpus": "lots"`)
/// reads as 0/empty instead of failing the report. Fields are written back with the reference's JSON types.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterAggregate {
    /// Number of active workers in the cluster.
    #[serde(default, deserialize_with = "lax_i64")]
    pub active_nodes: i64,
    /// Mean CPU usage in percent over the workers that report a non-zero usage.
    #[serde(default, deserialize_with = "lax_f64")]
    pub cpu_percent: f64,
    /// Mean memory usage in percent over the workers that report a non-zero usage.
    #[serde(default, deserialize_with = "lax_f64")]
    pub memory_percent: f64,
    /// Logical cores summed over the workers.
    #[serde(default, deserialize_with = "lax_i64")]
    pub vcpus: i64,
    /// Available memory in MiB summed over the workers.
    #[serde(default, deserialize_with = "lax_i64")]
    pub memory: i64,
    /// GPUs summed over the workers.
    #[serde(default, deserialize_with = "lax_i64")]
    pub vgpus: i64,
    /// Runtime names of every worker, duplicates kept (one entry per worker that offers the runtime).
    #[serde(default, deserialize_with = "lax_strings")]
    pub virtualization: Vec<String>,
    /// Distinct CSI driver names available somewhere in the cluster.
    #[serde(default, deserialize_with = "lax_csi_drivers")]
    pub csi_drivers: Vec<String>,
    /// Addons of every worker, duplicates kept.
    #[serde(default, deserialize_with = "lax_strings")]
    pub supported_addons: Vec<String>,
    /// Our extension: the most cores of a single worker (absent from reference clusters).
    #[serde(
        default,
        deserialize_with = "lax_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_node_vcpus: Option<i64>,
    /// Our extension: the most available memory (MiB) of a single worker (absent from reference clusters).
    #[serde(
        default,
        deserialize_with = "lax_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_node_memory: Option<i64>,
    /// The same aggregation per worker architecture (`amd64`, `arm64`, `unknown`); entries that are not objects are
    /// dropped.
    #[serde(default, deserialize_with = "lax_arch_map")]
    pub aggregation_per_architecture: BTreeMap<String, ArchAggregate>,
    /// Every other key (`vram`, `gpu_temp`, `gpu_driver`, …), verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ClusterAggregate {
    /// The typed aggregate of `workers`: [`aggregate_workers`] read back through the lenient parser.
    pub fn from_workers(workers: &[Map<String, Value>]) -> Self {
        // Every field reads leniently and the input is an object, so the parse cannot fail; the default is a guard.
        Self::deserialize(Value::Object(aggregate_workers(workers))).unwrap_or_default()
    }
}

/// One entry of [`ClusterAggregate::aggregation_per_architecture`]: the aggregation over the workers of one
/// architecture. Read leniently like [`ClusterAggregate`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArchAggregate {
    /// Number of active workers of this architecture.
    #[serde(default, deserialize_with = "lax_i64")]
    pub active_nodes: i64,
    /// Mean CPU usage in percent over those workers reporting a non-zero usage.
    #[serde(default, deserialize_with = "lax_f64")]
    pub cpu_percent: f64,
    /// Logical cores summed over those workers.
    #[serde(default, deserialize_with = "lax_i64")]
    pub vcpus: i64,
    /// Available memory in MiB summed over those workers.
    #[serde(default, deserialize_with = "lax_i64")]
    pub memory: i64,
    /// GPUs summed over those workers.
    #[serde(default, deserialize_with = "lax_i64")]
    pub vgpus: i64,
    /// Our extension: the most cores of a single worker of this architecture.
    #[serde(
        default,
        deserialize_with = "lax_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_node_vcpus: Option<i64>,
    /// Our extension: the most available memory (MiB) of a single worker of this architecture.
    #[serde(
        default,
        deserialize_with = "lax_opt_i64",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_node_memory: Option<i64>,
    /// Every other key (`memory_percent`, `virtualization`, …), verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The whole report body root receives: the aggregate plus the state of every job the cluster runs.
///
/// (De)serialized by hand over a JSON object: `jobs` is taken out and the rest is read as the [`ClusterAggregate`],
/// so `jobs` never also lands in [`ClusterAggregate::extra`]. A body that is not a JSON object is an error; anything
/// inside one is read leniently (`jobs` that is not a list reads as empty, entries that are not objects are dropped).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterReport {
    /// Everything but `jobs`.
    pub aggregate: ClusterAggregate,
    /// Every job in the cluster's database.
    pub jobs: Vec<JobReport>,
}

impl Serialize for ClusterReport {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let Value::Object(mut body) = serde_json::to_value(&self.aggregate).map_err(ser::Error::custom)?
        else {
            return Err(ser::Error::custom(
                "the cluster aggregate did not serialise to an object",
            ));
        };
        let jobs = serde_json::to_value(&self.jobs).map_err(ser::Error::custom)?;
        body.insert(JOBS.to_owned(), jobs);
        body.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ClusterReport {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut body = Map::<String, Value>::deserialize(deserializer)?;
        let jobs = body.remove(JOBS).map(lax_list).unwrap_or_default();
        let aggregate = ClusterAggregate::deserialize(Value::Object(body)).map_err(de::Error::custom)?;
        Ok(Self { aggregate, jobs })
    }
}

/// One job of a [`ClusterReport`] (the cluster's job document, reduced). Read leniently.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobReport {
    /// The job id root assigned (an ObjectId as text).
    #[serde(rename = "_id", default, deserialize_with = "lax_string")]
    pub id: String,
    /// `app.appns.svc.svcns`.
    #[serde(default, deserialize_with = "lax_string")]
    pub job_name: String,
    /// The job status as the cluster sees it (see [`crate::status`]).
    #[serde(default, deserialize_with = "lax_string")]
    pub status: String,
    /// Free-text detail of the status.
    #[serde(default, deserialize_with = "lax_string")]
    pub status_detail: String,
    /// The job's instances on this cluster.
    #[serde(default, deserialize_with = "lax_vec")]
    pub instance_list: Vec<InstanceReport>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One instance of a [`JobReport`]. Read leniently; optional fields are written only when present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// The instance number within the job (root patches instances by it).
    #[serde(default, deserialize_with = "lax_i64")]
    pub instance_number: i64,
    /// The instance status (see [`crate::status`]).
    #[serde(default, deserialize_with = "lax_string")]
    pub status: String,
    /// Free-text detail of the status.
    #[serde(default, deserialize_with = "lax_string")]
    pub status_detail: String,
    /// The worker running the instance.
    #[serde(
        default,
        deserialize_with = "lax_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub worker_id: Option<String>,
    /// The worker's IP.
    #[serde(
        default,
        deserialize_with = "lax_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub host_ip: Option<String>,
    /// The worker's port; reference peers send a number or a string, we keep (and write) the text.
    #[serde(
        default,
        deserialize_with = "lax_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub host_port: Option<String>,
    /// The worker's public IP.
    #[serde(
        default,
        deserialize_with = "lax_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub publicip: Option<String>,
    /// CPU usage of the instance in percent.
    #[serde(
        default,
        deserialize_with = "lax_opt_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_percent: Option<f64>,
    /// Memory usage of the instance.
    #[serde(
        default,
        deserialize_with = "lax_opt_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_percent: Option<f64>,
    /// Disk usage of the instance in bytes.
    #[serde(
        default,
        deserialize_with = "lax_opt_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub disk: Option<f64>,
    /// The tail of the instance log.
    #[serde(
        default,
        deserialize_with = "lax_opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub logs: Option<String>,
    /// When the cluster last updated the instance (Unix seconds).
    #[serde(
        default,
        deserialize_with = "lax_opt_f64",
        skip_serializing_if = "Option::is_none"
    )]
    pub last_modified_timestamp: Option<f64>,
    /// Every other key, verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

// === Lenient readers: a value of the wrong type reads as the default instead of failing the report ===

/// Reads any JSON value and parses it with `parse`, falling back to the default on a type mismatch.
fn lax<'de, D, T>(deserializer: D, parse: fn(Value) -> Result<T, serde_json::Error>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default,
{
    let value = Value::deserialize(deserializer)?;
    Ok(parse(value).unwrap_or_default())
}

fn lax_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    lax(d, serde_util::i64::<Value>)
}

fn lax_opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    lax(d, serde_util::opt_i64::<Value>)
}

fn lax_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    lax(d, serde_util::f64::<Value>)
}

fn lax_opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    lax(d, serde_util::opt_f64::<Value>)
}

fn lax_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    lax(d, serde_util::string::<Value>)
}

fn lax_opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    lax(d, serde_util::opt_string::<Value>)
}

/// The text of a list element (strings, and numbers as their JSON text); `None` for anything else.
fn element_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// A list of strings: elements that are not text are dropped; a lone string reads as a one-element list.
fn lax_strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items.iter().filter_map(element_text).collect(),
        Value::String(s) => vec![s],
        _ => Vec::new(),
    })
}

/// Like [`lax_strings`], also taking the name out of `{csi_driver_name, …}` objects as workers send them.
fn lax_csi_drivers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Array(items) => items
            .iter()
            .filter_map(|item| csi_name(item).map(str::to_owned).or_else(|| element_text(item)))
            .collect(),
        Value::String(s) => vec![s],
        _ => Vec::new(),
    })
}

/// The elements of a JSON list that parse as `T`; anything but a list reads as empty.
fn lax_list<T: DeserializeOwned>(value: Value) -> Vec<T> {
    match value {
        Value::Array(items) => items
            .into_iter()
            .filter_map(|item| T::deserialize(item).ok())
            .collect(),
        _ => Vec::new(),
    }
}

fn lax_vec<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
    Value::deserialize(d).map(lax_list)
}

fn lax_arch_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, ArchAggregate>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Object(entries) => entries
            .into_iter()
            .filter_map(|(arch, value)| ArchAggregate::deserialize(value).ok().map(|agg| (arch, agg)))
            .collect(),
        _ => BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::test_util::round_trip;

    /// Worker documents from a JSON array literal.
    fn workers(v: Value) -> Vec<Map<String, Value>> {
        serde_json::from_value(v).unwrap()
    }

    fn agg(v: Value) -> Map<String, Value> {
        aggregate_workers(&workers(v))
    }

    #[test]
    fn means_skip_zeros_and_non_numbers() {
        let a = agg(json!([
            {"cpu_percent": 10, "memory_percent": 0, "gpu_temp": 40, "load_average": 1.0, "disk_percent": "30"},
            {"cpu_percent": 0, "memory_percent": 0.0, "gpu_temp": 60, "load_average": 3.0, "disk_percent": "x"},
            {"cpu_percent": "20", "memory_percent": "0", "gpu_temp": null, "load_average": [5], "disk_percent": {}},
            {"cpu_percent": "abc", "vram_percent": false},
        ]));
        assert_eq!(a["cpu_percent"], json!(15.0));
        assert_eq!(a["memory_percent"], json!(0.0));
        assert_eq!(a["gpu_temp"], json!(50.0));
        assert_eq!(a["load_average"], json!(2.0));
        assert_eq!(a["disk_percent"], json!(30.0));
        assert_eq!(a["vram_percent"], json!(0.0));
    }

    #[test]
    fn sums_keep_integers_when_every_input_is_one() {
        let a = agg(json!([
            {"vcpus": 4, "memory": 1024, "vram": 0.0, "vgpus": "lots", "carbon_intensity": 1, "NetManagerPort": 0},
            {"vcpus": "4", "memory": 2048.5, "vram": 8192, "vgpus": 1, "carbon_intensity": "2"},
            {"vcpus": 8, "memory": null, "vgpus": true},
        ]));
        assert_eq!(a["vcpus"], json!(16));
        assert!(a["vcpus"].is_i64());
        assert_eq!(a["memory"], json!(3072.5));
        assert_eq!(a["vram"], json!(8192.0));
        assert!(a["vram"].is_f64());
        assert_eq!(a["vgpus"], json!(1));
        assert_eq!(a["carbon_intensity"], json!(3));
        assert_eq!(a["NetManagerPort"], json!(0));
        // A canonical sum key nobody reports numerically is 0, not absent.
        assert_eq!(agg(json!([{"vgpus": "none"}]))["vgpus"], json!(0));
    }

    #[test]
    fn lists_and_strings_concatenate_distinct_values() {
        let a = agg(json!([
            {"virtualization": ["docker"], "supported_addons": null, "gpu_driver": "", "gpu_drivers": ["nvidia"],
             "host": "a", "mixed": 1},
            {"virtualization": ["docker", "unikernel"], "supported_addons": ["imageBuilder"],
             "gpu_driver": "nvidia", "gpu_drivers": 3, "host": "b", "mixed": "x"},
            {"virtualization": "crosvm", "gpu_drivers": "amdgpu", "host": "a"},
        ]));
        assert_eq!(a["virtualization"], json!(["docker", "unikernel", "crosvm"]));
        assert_eq!(a["supported_addons"], json!(["imageBuilder"]));
        assert_eq!(a["gpu_driver"], json!(["", "nvidia"]));
        assert_eq!(a["gpu_drivers"], json!(["nvidia", "amdgpu"]));
        assert_eq!(a["host"], json!(["a", "b"]));
        assert_eq!(a["mixed"], json!([1, "x"]));
        // However many workers, at most 64 distinct values per key.
        let many: Vec<Value> = (0..1000)
            .map(|i| json!({"gpu_driver": format!("d{i}")}))
            .collect();
        assert_eq!(
            agg(Value::Array(many))["gpu_driver"].as_array().unwrap().len(),
            64
        );
    }

    #[test]
    fn csi_drivers_are_deduplicated_names() {
        let a = agg(json!([
            {"csi_drivers": [{"csi_driver_name": "nfs.csi.k8s.io", "csi_driver_endpoint": "/a.sock"},
                             {"csi_driver_name": "", "csi_driver_endpoint": "/b.sock"}, 7]},
            {"csi_drivers": ["nfs.csi.k8s.io", "smb.csi.k8s.io"]},
            {"csi_drivers": [{"csi_driver_name": "smb.csi.k8s.io"}, {"csi_driver_name": "hostpath.csi"}]},
            {"csi_drivers": null},
        ]));
        assert_eq!(
            a["csi_drivers"],
            json!(["nfs.csi.k8s.io", "smb.csi.k8s.io", "hostpath.csi"])
        );
    }

    #[test]
    fn per_architecture_split() {
        let a = agg(json!([
            {"architecture": "amd64", "vcpus": 4, "memory": 1000, "cpu_percent": 10, "virtualization": ["docker"]},
            {"architecture": "arm64", "vcpus": 2, "memory": 500, "cpu_percent": 30},
            {"architecture": "amd64", "vcpus": 8, "memory": 3000, "cpu_percent": 20, "virtualization": ["docker"]},
            {"architecture": "", "vcpus": 1},
            {"vcpus": 1, "architecture": 5},
        ]));
        assert_eq!(a["active_nodes"], json!(5));
        assert_eq!(a["vcpus"], json!(16));
        assert!(!a.contains_key("architecture"));
        let per = a["aggregation_per_architecture"].as_object().unwrap();
        assert_eq!(per.keys().collect::<Vec<_>>(), ["amd64", "arm64", "unknown"]);
        let amd = per["amd64"].as_object().unwrap();
        assert_eq!(amd["active_nodes"], json!(2));
        assert_eq!(amd["vcpus"], json!(12));
        assert_eq!(amd["memory"], json!(4000));
        assert_eq!(amd["cpu_percent"], json!(15.0));
        assert_eq!(amd["virtualization"], json!(["docker"]));
        assert_eq!(amd["max_node_vcpus"], json!(8));
        assert!(!amd.contains_key("aggregation_per_architecture"));
        assert!(!amd.contains_key("architecture"));
        assert_eq!(per["arm64"]["active_nodes"], json!(1));
        assert_eq!(per["arm64"]["cpu_percent"], json!(30.0));
        assert_eq!(per["unknown"]["active_nodes"], json!(2));
        assert_eq!(per["unknown"]["vcpus"], json!(2));
    }

    #[test]
    fn excluded_and_unaggregatable_keys_are_skipped() {
        let a = agg(json!([
            {"_id": "6650c0ffee00000000000002", "ip": "10.0.0.1", "port": "3000", "candidate_name": "n1",
             "candidate_location": "48,11,100", "system_info": {"kernel_version": "6.1"}, "disk_info": {"/": "37"},
             "network_info": {}, "Overlay": true, "active": true, "nothing": null, "architecture": "amd64",
             "active_nodes": 99, "max_node_vcpus": 99, "aggregation_per_architecture": {"x": {}}, "vcpus": 2},
        ]));
        for gone in [
            "_id",
            "ip",
            "port",
            "candidate_name",
            "candidate_location",
            "system_info",
            "disk_info",
            "network_info",
            "Overlay",
            "active",
            "nothing",
            "architecture",
        ] {
            assert!(!a.contains_key(gone), "{gone} was aggregated");
        }
        assert_eq!(a["active_nodes"], json!(1));
        assert_eq!(a["max_node_vcpus"], json!(2));
        let per = a["aggregation_per_architecture"].as_object().unwrap();
        assert_eq!(per.keys().collect::<Vec<_>>(), ["amd64"]);
        assert!(!per["amd64"].as_object().unwrap().contains_key("_id"));
    }

    #[test]
    fn max_node_figures() {
        let a = agg(json!([
            {"architecture": "amd64", "vcpus": 4, "memory": 1024},
            {"architecture": "amd64", "vcpus": 16, "memory": "9000"},
            {"architecture": "arm64", "vcpus": "8", "memory": 2048},
            {"architecture": "arm64", "vcpus": "many"},
        ]));
        assert_eq!(
            (&a["max_node_vcpus"], &a["max_node_memory"]),
            (&json!(16), &json!(9000))
        );
        let arm = &a["aggregation_per_architecture"]["arm64"];
        assert_eq!(
            (&arm["max_node_vcpus"], &arm["max_node_memory"]),
            (&json!(8), &json!(2048))
        );
        // Without any numeric figure there is no maximum.
        let none = agg(json!([{"vcpus": "many"}]));
        assert!(!none.contains_key("max_node_vcpus") && !none.contains_key("max_node_memory"));
    }

    #[test]
    fn no_workers() {
        let a = aggregate_workers(&[]);
        assert_eq!(
            Value::Object(a),
            json!({"active_nodes": 0, "aggregation_per_architecture": {}})
        );
        let typed = ClusterAggregate::from_workers(&[]);
        assert_eq!(typed, ClusterAggregate::default());
    }

    #[test]
    fn typed_aggregate_from_workers() {
        let c = ClusterAggregate::from_workers(&workers(json!([
            {"architecture": "amd64", "vcpus": 4, "memory": 1024, "cpu_percent": 10, "memory_percent": 40,
             "vgpus": 0, "vram": 0, "virtualization": ["docker"], "supported_addons": [],
             "csi_drivers": [{"csi_driver_name": "nfs.csi.k8s.io", "csi_driver_endpoint": "/s"}]},
            {"architecture": "arm64", "vcpus": 2, "memory": 512, "cpu_percent": 30, "memory_percent": 0,
             "vgpus": 1, "vram": 4096, "virtualization": ["docker", "unikernel"], "supported_addons": ["FLOps"]},
        ])));
        assert_eq!((c.active_nodes, c.vcpus, c.memory, c.vgpus), (2, 6, 1536, 1));
        assert_eq!((c.cpu_percent, c.memory_percent), (20.0, 40.0));
        assert_eq!(c.virtualization, ["docker", "unikernel"]);
        assert_eq!(c.supported_addons, ["FLOps"]);
        assert_eq!(c.csi_drivers, ["nfs.csi.k8s.io"]);
        assert_eq!((c.max_node_vcpus, c.max_node_memory), (Some(4), Some(1024)));
        assert_eq!(c.extra["vram"], json!(4096));
        let arm = &c.aggregation_per_architecture["arm64"];
        assert_eq!(
            (arm.active_nodes, arm.vcpus, arm.memory, arm.vgpus),
            (1, 2, 512, 1)
        );
        assert_eq!(arm.max_node_memory, Some(512));
        assert_eq!(arm.extra["virtualization"], json!(["docker", "unikernel"]));
    }

    /// A reference-shaped report: two jobs, `host_port` a number in one instance and a string in the other.
    const REPORT: &str = r#"{
        "active_nodes": 2, "cpu_percent": 12.5, "memory_percent": 41.7, "vcpus": 8, "memory": 12000, "vgpus": 0,
        "vram": 0, "gpu_temp": 0.0, "gpu_driver": ["", ""],
        "virtualization": ["docker", "docker", "unikernel"], "csi_drivers": ["nfs.csi.k8s.io"],
        "supported_addons": [],
        "aggregation_per_architecture": {
            "amd64": {"active_nodes": 2, "cpu_percent": 12.5, "vcpus": 8, "memory": 12000, "vgpus": 0,
                      "memory_percent": 41.7, "virtualization": ["docker", "docker", "unikernel"]}
        },
        "jobs": [
            {"_id": "6650c0ffee00000000000010", "job_name": "app.ns.web.ns", "status": "RUNNING",
             "status_detail": "", "instance_list": [
                {"instance_number": 0, "status": "RUNNING", "status_detail": "", "worker_id": "6650c0ffee0000000000aa01",
                 "host_ip": "192.168.1.5", "host_port": 50103, "publicip": "131.159.0.1", "cpu_percent": 3.5,
                 "memory_percent": 0.1, "disk": 1048576.0, "logs": "listening on :80",
                 "last_modified_timestamp": 1716600000.5, "cpu_history": []}
             ], "next_instance_progressive_number": 1},
            {"_id": "6650c0ffee00000000000011", "job_name": "app.ns.db.ns", "status": "NODE_SCHEDULED",
             "instance_list": [
                {"instance_number": 1, "status": "NODE_SCHEDULED", "status_detail": "waiting",
                 "host_port": "50104"}
             ]}
        ]
    }"#;

    #[test]
    fn report_parses_and_round_trips() {
        let r: ClusterReport = serde_json::from_str(REPORT).unwrap();
        let a = &r.aggregate;
        assert_eq!(
            (a.active_nodes, a.vcpus, a.memory, a.cpu_percent),
            (2, 8, 12000, 12.5)
        );
        assert_eq!(a.virtualization, ["docker", "docker", "unikernel"]);
        assert_eq!(a.csi_drivers, ["nfs.csi.k8s.io"]);
        assert_eq!(a.max_node_vcpus, None);
        assert!(!a.extra.contains_key("jobs"), "jobs leaked into the aggregate");
        assert_eq!(a.extra["gpu_driver"], json!(["", ""]));
        assert_eq!(a.aggregation_per_architecture["amd64"].memory, 12000);
        assert_eq!(
            a.aggregation_per_architecture["amd64"].extra["memory_percent"],
            json!(41.7)
        );

        assert_eq!(r.jobs.len(), 2);
        let (web, db) = (&r.jobs[0], &r.jobs[1]);
        assert_eq!(
            (web.id.as_str(), web.job_name.as_str(), web.status.as_str()),
            ("6650c0ffee00000000000010", "app.ns.web.ns", "RUNNING")
        );
        assert_eq!(web.extra["next_instance_progressive_number"], json!(1));
        let i0 = &web.instance_list[0];
        assert_eq!(i0.host_port.as_deref(), Some("50103"));
        assert_eq!((i0.cpu_percent, i0.disk), (Some(3.5), Some(1_048_576.0)));
        assert_eq!(i0.last_modified_timestamp, Some(1_716_600_000.5));
        assert_eq!(i0.extra["cpu_history"], json!([]));
        let i1 = &db.instance_list[0];
        assert_eq!((i1.instance_number, i1.host_port.as_deref()), (1, Some("50104")));
        assert_eq!((db.status_detail.as_str(), i1.worker_id.as_deref()), ("", None));

        // Written back: the same report, except that the port is always text and `status_detail` always present.
        let back = serde_json::to_value(&r).unwrap();
        let mut want: Value = serde_json::from_str(REPORT).unwrap();
        want["jobs"][0]["instance_list"][0]["host_port"] = json!("50103");
        want["jobs"][1]["status_detail"] = json!("");
        assert_eq!(back, want);
        assert_eq!(serde_json::from_value::<ClusterReport>(back).unwrap(), r);
    }

    #[test]
    fn our_aggregate_round_trips_exactly() {
        let body = Value::Object(aggregate_workers(&workers(json!([
            {"architecture": "amd64", "vcpus": 4, "memory": 1024, "cpu_percent": 10.5, "memory_percent": 40,
             "vgpus": 0, "virtualization": ["docker"], "supported_addons": ["FLOps"], "csi_drivers": []},
        ]))));
        let parsed: ClusterAggregate = round_trip(&body.to_string());
        assert_eq!(parsed.max_node_memory, Some(1024));
    }

    #[test]
    fn garbage_values_are_tolerated() {
        let r: ClusterReport = serde_json::from_value(json!({
            "active_nodes": "two", "cpu_percent": "NaN", "memory_percent": [], "vcpus": "lots", "memory": {},
            "vgpus": 1.5, "virtualization": "docker", "csi_drivers": [{"csi_driver_name": "nfs"}, null, 3],
            "supported_addons": 7, "max_node_vcpus": "x", "max_node_memory": "2048",
            "aggregation_per_architecture": {"amd64": {"vcpus": "4", "memory": true}, "bad": 1},
            "jobs": [
                "not a job",
                {"_id": 17, "job_name": null, "status": {}, "instance_list": "none"},
                {"_id": "j2", "instance_list": [1, {"instance_number": "3", "host_port": [], "disk": "big",
                                                    "cpu_percent": "2.5"}]}
            ]
        }))
        .unwrap();
        let a = &r.aggregate;
        assert_eq!((a.active_nodes, a.vcpus, a.memory, a.vgpus), (0, 0, 0, 0));
        assert_eq!((a.cpu_percent, a.memory_percent), (0.0, 0.0));
        assert_eq!(a.virtualization, ["docker"]);
        assert_eq!(a.csi_drivers, ["nfs", "3"]);
        assert!(a.supported_addons.is_empty());
        assert_eq!((a.max_node_vcpus, a.max_node_memory), (None, Some(2048)));
        assert_eq!(a.aggregation_per_architecture.len(), 1);
        assert_eq!(a.aggregation_per_architecture["amd64"].vcpus, 4);
        assert_eq!(a.aggregation_per_architecture["amd64"].memory, 0);

        assert_eq!(r.jobs.len(), 2);
        assert_eq!((r.jobs[0].id.as_str(), r.jobs[0].status.as_str()), ("17", ""));
        assert!(r.jobs[0].instance_list.is_empty());
        let inst = &r.jobs[1].instance_list;
        assert_eq!(inst.len(), 1);
        assert_eq!(
            (
                inst[0].instance_number,
                inst[0].host_port.as_deref(),
                inst[0].disk,
                inst[0].cpu_percent
            ),
            (3, None, None, Some(2.5))
        );
        // Written back with the reference's types: numbers as numbers, ids as strings.
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!((&back["vcpus"], &back["cpu_percent"]), (&json!(0), &json!(0.0)));
        assert_eq!(back["jobs"][0]["_id"], json!("17"));
        assert_eq!(back["jobs"][1]["instance_list"][0]["instance_number"], json!(3));
    }

    #[test]
    fn non_object_reports_are_errors() {
        for bad in ["null", "[]", "1", "\"ok\"", "[{\"jobs\": []}]", "{", ""] {
            assert!(
                serde_json::from_str::<ClusterReport>(bad).is_err(),
                "accepted {bad:?}"
            );
        }
        assert!(serde_json::from_str::<ClusterReport>("{}").is_ok());
    }

    /// Keys the rules treat specially, plus free ones.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "cpu_percent",
                "memory_percent",
                "gpu_temp",
                "load_average",
                "vcpus",
                "memory",
                "vgpus",
                "virtualization",
                "csi_drivers",
                "csi_driver_name",
                "architecture",
                "active_nodes",
                "aggregation_per_architecture",
                "max_node_vcpus",
                "jobs",
                "instance_list",
                "host_port",
                "_id",
                "ip",
            ])
            .prop_map(str::to_owned),
            "[a-z_]{1,8}",
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            prop::sample::select(vec!["amd64", "arm64", "", "0", "4", "-2.5", "1e308", "NaN", "x"])
                .prop_map(Value::from),
            "[a-z0-9.]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(key(), json_value(), 0..8).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn aggregation_never_panics_and_counts_nodes(ws in prop::collection::vec(json_object(), 0..6)) {
            let a = aggregate_workers(&ws);
            let count = i64::try_from(ws.len()).unwrap();
            prop_assert_eq!(a[ACTIVE_NODES].as_i64(), Some(count));
            let per = a[PER_ARCHITECTURE].as_object().unwrap();
            let mut per_arch_total = 0;
            for nested in per.values() {
                prop_assert!(!nested.as_object().unwrap().contains_key(PER_ARCHITECTURE));
                per_arch_total += nested[ACTIVE_NODES].as_i64().unwrap();
            }
            prop_assert_eq!(per_arch_total, count);
            let typed = ClusterAggregate::from_workers(&ws);
            prop_assert_eq!(typed.active_nodes, count);
        }

        #[test]
        fn any_object_is_a_report(body in json_object()) {
            let report: ClusterReport = serde_json::from_value(Value::Object(body)).unwrap();
            let back = serde_json::to_value(&report).unwrap();
            prop_assert_eq!(serde_json::from_value::<ClusterReport>(back).unwrap(), report);
        }
    }
}
