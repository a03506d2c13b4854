//! The cluster's side of the addons engine: the operator token that guards the cluster's addons manager, and the
//! marketplace lookup at root (a cluster installs what root's marketplace approved, read with the cluster secret).

use std::{path::Path, sync::Arc, time::Duration};

use axum::http::{HeaderMap, StatusCode};
use hyper::Method;
use oakestra_addons::api::{Caller, Gate, Lookup, RemoteMarketplace};
use oakestra_protocol::bearer;
use oakestra_runtime::client;

use crate::{Error, engine::Engine, store};

/// The file holding the generated operator token.
pub const ADMIN_TOKEN_FILE: &str = "addons-admin.token";

/// The addons manager's gate: the operator token, which is an admin's.
#[derive(Debug)]
pub struct ClusterGate {
    token: String,
}

impl Gate for ClusterGate {
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, (StatusCode, String)> {
        match crate::api::bearer_of(headers) {
            Some(t) if bearer::same_secret(t, &self.token) => Ok(Caller { admin: true }),
            _ => Err((
                StatusCode::UNAUTHORIZED,
                format!(
                    "the cluster's addons API needs Authorization: Bearer <the token in <data-dir>/{ADMIN_TOKEN_FILE}>"
                ),
            )),
        }
    }
}

impl ClusterGate {
    /// The gate with `given`, or the token stored in (or generated into) `<data_dir>/addons-admin.token`.
    pub fn load(given: Option<String>, data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let token = match given {
            Some(t) => {
                store::write_secret(&path, &t)?;
                t
            }
            None => store::load_or_create_secret(&path)?,
        };
        tracing::info!(file = %path.display(), "the cluster's addons API takes the operator token in this file");
        Ok(Self { token })
    }
}

/// Reads marketplace entries from root (`GET /api/cluster/marketplace/addons/<id>`, with the cluster secret).
#[derive(Debug)]
pub struct RootMarketplace {
    /// The engine (root's address and the cluster's identity).
    pub engine: Arc<Engine>,
}

impl RemoteMarketplace for RootMarketplace {
    fn entry(&self, id: String) -> Lookup {
        let engine = Arc::clone(&self.engine);
        Box::pin(async move {
            let identity = engine
                .identity()
                .ok_or("the cluster has not registered with root yet")?;
            let url = format!("{}/api/cluster/marketplace/addons/{id}", engine.root.root_url);
            let r = client::call::<()>(
                Method::GET,
                &url,
                Some(&identity.token),
                None,
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string())?;
            match r.status {
                200 => serde_json::from_value(r.body)
                    .map(Some)
                    .map_err(|e| format!("{url}: {e}")),
                404 => Ok(None),
                s => Err(format!("{url} answered {s}: {}", r.body)),
            }
        })
    }
}
