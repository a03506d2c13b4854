//! Plugin slots: which addon container currently fills a core component's slot (the root or cluster scheduler),
//! how the tier delegates a placement to it over the reference scheduler contract (`POST /api/calculate/deploy`,
//! answer on the tier's `POST /api/result/deploy`), and the counters of delegations and fallbacks.
//!
//! The tier never waits on a plugin longer than the slot timeout: an unreachable plugin, one that does not answer in
//! time or one that picks a candidate the tier cannot use makes the tier place with its built-in scheduler, logged
//! and counted.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::Method;
use oakestra_protocol::{addons::Slot, bearer::same_secret};
use oakestra_runtime::client;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::oneshot;

/// The path a scheduler plugin takes jobs on.
pub const CALCULATE_PATH: &str = "/api/calculate/deploy";
/// The path a scheduler plugin answers on (at the tier).
pub const RESULT_PATH: &str = "/api/result/deploy";
/// The path a scheduler plugin reads candidates from (at the tier).
pub const RESOURCES_PATH: &str = "/api/v1/resources";

/// Where a slot's plugin listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// The installed addon filling the slot.
    pub addon_id: String,
    /// Its service (container) name.
    pub container: String,
    /// `http://<container address>:<port>`.
    pub url: String,
}

/// A plugin's answer for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginAnswer {
    /// The candidate it chose (`candidate_id`).
    Candidate(String),
    /// It found none (`status`, e.g. `NO_ACTIVE_CLUSTER_WITH_CAPACITY`).
    Refused(String),
}

/// What came of asking the slot's plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delegation {
    /// No plugin fills the slot: the built-in scheduler decides.
    BuiltIn,
    /// The plugin answered.
    Answer(PluginAnswer),
    /// The plugin could not be used (unreachable, timed out): the built-in scheduler decides. Already counted.
    Fallback(String),
}

/// Counters of one slot.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotStats {
    /// Placements the plugin decided.
    pub delegated: u64,
    /// Placements the built-in scheduler made because the plugin could not be used.
    pub fallbacks: u64,
    /// The last fallback's reason.
    pub last_fallback: Option<String>,
}

/// The slots of one tier.
#[derive(Debug)]
pub struct Slots {
    token: String,
    timeout: Duration,
    endpoints: RwLock<BTreeMap<Slot, Endpoint>>,
    pending: Mutex<HashMap<String, oneshot::Sender<PluginAnswer>>>,
    stats: Mutex<BTreeMap<Slot, SlotStats>>,
    /// Per slot: whether a plugin fills it (read by a tier's pure placement state without locking).
    flags: BTreeMap<Slot, Arc<AtomicBool>>,
}

impl Slots {
    /// Slots whose plugins authenticate with `token` and get `timeout` per placement.
    pub fn new(token: String, timeout: Duration) -> Self {
        Self {
            token,
            timeout,
            endpoints: RwLock::new(BTreeMap::new()),
            pending: Mutex::new(HashMap::new()),
            stats: Mutex::new(BTreeMap::new()),
            flags: Slot::ALL
                .into_iter()
                .map(|s| (s, Arc::new(AtomicBool::new(false))))
                .collect(),
        }
    }

    /// The flag that is set while a plugin fills `slot`.
    pub fn filled_flag(&self, slot: Slot) -> Arc<AtomicBool> {
        self.flags.get(&slot).cloned().unwrap_or_default()
    }

    /// The token plugins present (`Authorization: Bearer`), handed to them as `OAK_PLUGIN_TOKEN`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The time a placement waits for a plugin.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Whether `presented` is the plugin token.
    pub fn is_plugin_token(&self, presented: &str) -> bool {
        same_secret(presented, &self.token)
    }

    /// The plugin filling `slot`, if any.
    pub fn endpoint(&self, slot: Slot) -> Option<Endpoint> {
        self.endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&slot)
            .cloned()
    }

    /// Makes `endpoint` fill `slot` (or empties it), logging a change.
    pub fn set(&self, slot: Slot, endpoint: Option<Endpoint>) {
        let mut map = self.endpoints.write().unwrap_or_else(PoisonError::into_inner);
        let before = map.get(&slot).cloned();
        if let Some(flag) = self.flags.get(&slot) {
            flag.store(endpoint.is_some(), Ordering::Relaxed);
        }
        if before == endpoint {
            return;
        }
        match &endpoint {
            Some(e) => {
                tracing::warn!(slot = slot.name(), addon = %e.addon_id, url = %e.url, "plugin now fills the slot: placements are delegated to it");
                map.insert(slot, e.clone());
            }
            None => {
                tracing::warn!(
                    slot = slot.name(),
                    "slot emptied: the built-in scheduler places again"
                );
                map.remove(&slot);
            }
        }
    }

    fn stats_of<T>(&self, slot: Slot, f: impl FnOnce(&mut SlotStats) -> T) -> T {
        let mut stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        f(stats.entry(slot).or_default())
    }

    /// Counts a fallback to the built-in scheduler (also for a plugin answer the tier could not use).
    pub fn count_fallback(&self, slot: Slot, job_id: &str, reason: &str) {
        tracing::warn!(
            slot = slot.name(),
            job = job_id,
            reason,
            "scheduler plugin not used: the built-in scheduler places"
        );
        self.stats_of(slot, |s| {
            s.fallbacks += 1;
            s.last_fallback = Some(reason.to_owned());
        });
    }

    /// The counters of every slot that has any.
    pub fn stats(&self) -> BTreeMap<Slot, SlotStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The counters and endpoints of every slot, for the operator.
    pub fn report(&self) -> Value {
        let endpoints = self
            .endpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let stats = self.stats.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut out = serde_json::Map::new();
        for slot in Slot::ALL {
            out.insert(
                slot.name().to_owned(),
                serde_json::json!({
                    "plugin": endpoints.get(&slot),
                    "stats": stats.get(&slot).cloned().unwrap_or_default(),
                }),
            );
        }
        Value::Object(out)
    }

    /// Asks the plugin filling `slot` to place job `job_id` (the job document, sent with `_id` = `job_id`), and
    /// waits for its answer on the tier's result path, at most the slot timeout in all.
    pub async fn ask(&self, slot: Slot, job_id: &str, mut job: Value) -> Delegation {
        let Some(endpoint) = self.endpoint(slot) else {
            return Delegation::BuiltIn;
        };
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(job_id.to_owned(), tx);
        if let Value::Object(m) = &mut job {
            m.insert("_id".into(), Value::String(job_id.to_owned()));
        }
        let url = format!("{}{CALCULATE_PATH}", endpoint.url);
        let sent = client::call(Method::POST, &url, Some(&self.token), Some(&job), self.timeout).await;
        let outcome = match sent {
            Ok(r) if r.is_success() => {
                let left = self.timeout.saturating_sub(started.elapsed());
                match tokio::time::timeout(left, rx).await {
                    Ok(Ok(answer)) => Ok(answer),
                    Ok(Err(_)) => Err("the pending placement was dropped".to_owned()),
                    Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
                }
            }
            Ok(r) => Err(format!("{url} answered {}", r.status)),
            Err(e) => Err(format!("{url} unreachable: {e}")),
        };
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(job_id);
        match outcome {
            Ok(answer) => {
                self.stats_of(slot, |s| s.delegated += 1);
                tracing::info!(slot = slot.name(), job = job_id, answer = ?answer, ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "scheduler plugin answered");
                Delegation::Answer(answer)
            }
            Err(reason) => {
                self.count_fallback(slot, job_id, &reason);
                Delegation::Fallback(reason)
            }
        }
    }

    /// Hands a plugin's answer to the placement waiting for it; false if none waits (too late or unknown).
    pub fn deliver(&self, job_id: &str, answer: PluginAnswer) -> bool {
        let waiting = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(job_id);
        waiting.is_some_and(|tx| tx.send(answer).is_ok())
    }

    /// Reads a result body `{job_id, candidate_id}` or `{job_id, status}`.
    pub fn parse_result(body: &Value) -> Result<(String, PluginAnswer), String> {
        let job_id = body
            .get("job_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256)
            .ok_or("job_id must be a non-empty string of at most 256 characters")?;
        if let Some(c) = body
            .get("candidate_id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= 256)
        {
            return Ok((job_id.to_owned(), PluginAnswer::Candidate(c.to_owned())));
        }
        if let Some(s) = body
            .get("status")
            .and_then(Value::as_str)
            .filter(|s| s.len() <= 256)
        {
            return Ok((job_id.to_owned(), PluginAnswer::Refused(s.to_owned())));
        }
        Err("needs candidate_id (a string) or status (a string)".into())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[tokio::test]
    async fn an_empty_slot_means_the_built_in_scheduler() {
        let s = Slots::new("t".into(), Duration::from_millis(200));
        assert_eq!(
            s.ask(Slot::RootScheduler, "j/0", json!({})).await,
            Delegation::BuiltIn
        );
    }

    #[tokio::test]
    async fn an_unreachable_plugin_falls_back_and_is_counted() {
        let s = Slots::new("t".into(), Duration::from_millis(300));
        // A port nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        s.set(
            Slot::RootScheduler,
            Some(Endpoint {
                addon_id: "a".into(),
                container: "root_scheduler".into(),
                url: format!("http://127.0.0.1:{port}"),
            }),
        );
        assert!(matches!(
            s.ask(Slot::RootScheduler, "j/0", json!({})).await,
            Delegation::Fallback(_)
        ));
        assert_eq!(s.report()["root_scheduler"]["stats"]["fallbacks"], 1);
        assert!(
            !s.deliver("j/0", PluginAnswer::Candidate("c".into())),
            "nobody waits any more"
        );
    }

    #[test]
    fn results_are_read_strictly() {
        assert_eq!(
            Slots::parse_result(&json!({"job_id": "j/1", "candidate_id": "c"})).unwrap(),
            ("j/1".into(), PluginAnswer::Candidate("c".into()))
        );
        assert!(Slots::parse_result(&json!({"job_id": "j/1"})).is_err());
        assert!(Slots::parse_result(&json!({"candidate_id": "c"})).is_err());
        assert!(Slots::new("abc".into(), Duration::ZERO).is_plugin_token("abc"));
    }
}
