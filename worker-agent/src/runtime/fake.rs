//! A recording runtime for the agent's unit tests: every call is logged, creates can be held at a gate or made
//! to fail, and instances end when a test (or a stop) says so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, watch};

use super::{DeployRequest, Ended, Error, Found, Runtime, TaskState, Usage};
use crate::guest::GuestError;

/// The fake.
#[derive(Debug)]
pub struct FakeRuntime {
    name: &'static str,
    /// `create <task>`, `start <task>`, `stop <task> <force>`, `remove <task>`, `list`.
    pub calls: Mutex<Vec<String>>,
    /// The next creates fail with this text.
    pub fail_create: Mutex<Option<String>>,
    /// When set, creates wait for it to be notified.
    pub create_gate: Mutex<Option<Arc<Notify>>>,
    /// Whether a graceful stop ends the instance (else only a forced one does).
    pub obeys_graceful_stop: Mutex<bool>,
    /// What [`Runtime::list`] returns.
    pub found: Mutex<Vec<Found>>,
    /// The labels each create was given.
    pub labels: Mutex<HashMap<String, super::Labels>>,
    ends: Mutex<HashMap<String, watch::Sender<Option<Ended>>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl FakeRuntime {
    /// A fake registering as `name`.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            calls: Mutex::default(),
            fail_create: Mutex::default(),
            create_gate: Mutex::default(),
            obeys_graceful_stop: Mutex::new(true),
            found: Mutex::default(),
            labels: Mutex::default(),
            ends: Mutex::default(),
        }
    }

    fn record(&self, call: String) {
        lock(&self.calls).push(call);
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    fn sender(&self, task: &str) -> watch::Sender<Option<Ended>> {
        lock(&self.ends)
            .entry(task.to_owned())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    /// Ends `task` as a runtime would see it exit.
    pub fn end(&self, task: &str, ended: Ended) {
        self.sender(task).send_replace(Some(ended));
    }
}

#[async_trait::async_trait]
impl Runtime for FakeRuntime {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn create(&self, req: &DeployRequest<'_>) -> Result<(), Error> {
        self.record(format!("create {}", req.task));
        lock(&self.labels).insert(req.task.to_owned(), req.labels.clone());
        (req.progress)("creating");
        let gate = lock(&self.create_gate).clone();
        if let Some(g) = gate {
            g.notified().await;
        }
        if let Some(e) = lock(&self.fail_create).clone() {
            return Err(GuestError::Image(e).into());
        }
        let _ = self.sender(req.task);
        Ok(())
    }

    async fn start(&self, task: &str) -> Result<u32, Error> {
        self.record(format!("start {task}"));
        Ok(4242)
    }

    async fn wait(&self, task: &str) -> Ended {
        let mut rx = self.sender(task).subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Ended::default();
            }
        }
    }

    async fn stop(&self, task: &str, force: bool) -> Result<(), Error> {
        self.record(format!("stop {task} {force}"));
        if force || *lock(&self.obeys_graceful_stop) {
            self.end(
                task,
                Ended {
                    code: Some(if force { 137 } else { 143 }),
                    reason: None,
                },
            );
        }
        Ok(())
    }

    async fn remove(&self, task: &str) -> Result<Option<u32>, Error> {
        self.record(format!("remove {task}"));
        Ok(None)
    }

    async fn list(&self) -> Result<Vec<Found>, Error> {
        self.record("list".to_owned());
        Ok(lock(&self.found).clone())
    }

    async fn usage(&self, _task: &str) -> Option<Usage> {
        Some(Usage::default())
    }

    async fn disk_usage(&self, _task: &str) -> i64 {
        0
    }
}

impl FakeRuntime {
    /// A listed instance in `state`.
    pub fn found(id: &str, labels: &[(&str, &str)], state: TaskState) -> Found {
        Found {
            id: id.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            state,
        }
    }
}
