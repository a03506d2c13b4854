//! The cluster's link up to root: registration with the join token (once; the identity is persisted, and a refused
//! secret triggers a re-registration that keeps the id, since root keys clusters by name), and the periodic report.
//!
//! Root being down never stops the cluster: registration retries with capped exponential back-off, and a report
//! that cannot be delivered is logged and replaced by the next one.

use std::time::Duration;

use hyper::Method;
use oakestra_protocol::api::federation::{
    CLUSTER_REGISTER_PATH, ClusterRegistered, ClusterRegistration, information_path,
};
use oakestra_runtime::client;
use serde_json::{Map, Value};

use crate::{
    Error,
    store::{Identity, Store},
};

/// Deadline of one call to root.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between registration attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How to reach root and what to tell it.
#[derive(Clone)]
pub struct RootLink {
    /// `http://host:port` of root.
    pub root_url: String,
    /// The join token.
    pub join_token: String,
    /// What the cluster registers with.
    pub registration: ClusterRegistration,
    /// Where the identity is kept.
    pub store: Store,
}

impl std::fmt::Debug for RootLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootLink")
            .field("root_url", &self.root_url)
            .field("join_token", &"<redacted>")
            .field("registration", &self.registration)
            .finish()
    }
}

/// What one report attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Root took it.
    Delivered,
    /// Root refused the secret; the cluster registered again and the report went through with the new one.
    Reregistered,
    /// Not delivered (root unreachable or refusing); the reason.
    Failed(String),
}

impl RootLink {
    /// Registers once; the identity root answers with (or an error naming what root said).
    pub async fn register(&self) -> Result<Identity, Error> {
        let url = format!("{}{CLUSTER_REGISTER_PATH}", self.root_url);
        let answer = client::call(
            Method::POST,
            &url,
            Some(&self.join_token),
            Some(&self.registration),
            CALL_TIMEOUT,
        )
        .await?;
        if !answer.is_success() {
            return Err(Error::Root {
                url,
                status: answer.status,
                body: answer.body.to_string(),
            });
        }
        let registered: ClusterRegistered =
            serde_json::from_value(answer.body.clone()).map_err(|e| Error::Root {
                url: url.clone(),
                status: answer.status,
                body: format!("unreadable answer {}: {e}", answer.body),
            })?;
        let identity = Identity {
            id: registered.id,
            token: registered.token,
        };
        self.store.set_identity(identity.clone()).await?;
        tracing::info!(cluster = %self.registration.cluster_name, id = %identity.id, "registered with root");
        Ok(identity)
    }

    /// The persisted identity, or a fresh registration, retried with back-off until root answers (or `stop`).
    pub async fn ensure_registered(&self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Option<Identity> {
        if let Ok(Some(identity)) = self.store.identity().await {
            return Some(identity);
        }
        let mut pause = Duration::from_millis(500);
        loop {
            match self.register().await {
                Ok(identity) => return Some(identity),
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "registration with root failed");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = stop.changed() => return None,
            }
            pause = oakestra_protocol::backoff::doubled(pause, MAX_BACKOFF);
        }
    }

    /// Sends one report; on a refused secret registers again (same name, same id) and resends once.
    pub async fn report(&self, identity: &mut Identity, body: &Map<String, Value>) -> Delivery {
        match self.send_report(identity, body).await {
            Ok(status) if (200..300).contains(&status) => Delivery::Delivered,
            Ok(401) => match self.register().await {
                Ok(fresh) => {
                    *identity = fresh;
                    match self.send_report(identity, body).await {
                        Ok(status) if (200..300).contains(&status) => Delivery::Reregistered,
                        Ok(status) => Delivery::Failed(format!("HTTP {status} after re-registering")),
                        Err(e) => Delivery::Failed(e.to_string()),
                    }
                }
                Err(e) => Delivery::Failed(format!("re-registration failed: {e}")),
            },
            Ok(status) => Delivery::Failed(format!("HTTP {status}")),
            Err(e) => Delivery::Failed(e.to_string()),
        }
    }

    async fn send_report(&self, identity: &Identity, body: &Map<String, Value>) -> Result<u16, Error> {
        let url = format!("{}{}", self.root_url, information_path(&identity.id));
        let answer = client::call(
            Method::POST,
            &url,
            Some(&identity.token),
            Some(body),
            CALL_TIMEOUT,
        )
        .await?;
        Ok(answer.status)
    }
}
