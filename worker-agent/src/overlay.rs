//! The NodeEngine's calls to its NetManager (the overlay): `/register` once, `/container/deploy` between task
//! create and start, `/container/undeploy` when the instance goes away, `/status` to notice a NetManager that
//! restarted. Over the unix socket or a localhost port.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Method;
use oakestra_protocol::api::netmanager::{
    ContainerDeployRequest, ContainerDeployResponse, PATH_CONTAINER_DEPLOY, PATH_CONTAINER_UNDEPLOY,
    PATH_REGISTER, PATH_STATUS, PATH_UNIKERNEL_DEPLOY, PATH_UNIKERNEL_UNDEPLOY, RegisterRequest,
    UndeployRequest,
};
use oakestra_runtime::client::{self, Response};
use serde::Serialize;
use serde_json::Value;

use crate::config::Overlay;

/// How long one NetManager call may take (an attach creates a veth, addresses and NAT rules).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a status call may take (a NetManager busy attaching answers it late; the next check comes soon).
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// What a NetManager holds, from its status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plumbed {
    /// Whether a NodeEngine registered it (a NetManager that restarted is not).
    pub registered: bool,
    /// The instances it has plumbed: (job name, instance number).
    pub instances: HashSet<(String, i64)>,
}

impl Plumbed {
    /// Reads a status document; `None` if it is not one (no `registered` flag).
    pub fn from_status(status: &Value) -> Option<Self> {
        let registered = status.get("registered")?.as_bool()?;
        let instances = status
            .get("instances")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|i| Some((i.get("job")?.as_str()?.to_owned(), i.get("instance")?.as_i64()?)))
            .collect();
        Some(Self {
            registered,
            instances,
        })
    }
}

/// Why a NetManager call failed.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// No answer.
    #[error("NetManager at {at}: {reason}")]
    Unreachable {
        /// Socket or port.
        at: String,
        /// What failed.
        reason: String,
    },
    /// A non-2xx answer.
    #[error("NetManager at {at} answered {path} with HTTP {status}: {body}")]
    Refused {
        /// Socket or port.
        at: String,
        /// The path called.
        path: &'static str,
        /// The status.
        status: u16,
        /// The answer.
        body: String,
    },
}

/// Where the NetManager listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetManager {
    /// A unix socket.
    Socket(PathBuf),
    /// `http://127.0.0.1:<port>`.
    Port(u16),
}

impl NetManager {
    /// The NetManager the overlay setting names (`None`: overlay off).
    pub fn from_overlay(overlay: &Overlay) -> Option<Self> {
        match overlay {
            Overlay::Off => None,
            Overlay::Socket(p) => Some(Self::Socket(p.clone())),
            Overlay::Port(p) => Some(Self::Port(*p)),
        }
    }

    fn at(&self) -> String {
        match self {
            Self::Socket(p) => p.display().to_string(),
            Self::Port(p) => format!("127.0.0.1:{p}"),
        }
    }

    async fn post(&self, path: &'static str, body: &impl Serialize) -> Result<Response, OverlayError> {
        self.call(Method::POST, path, Some(body), CALL_TIMEOUT).await
    }

    async fn call(
        &self,
        method: Method,
        path: &'static str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<Response, OverlayError> {
        let answer = match self {
            Self::Socket(socket) => client::call_unix(method, socket, path, body, timeout).await,
            Self::Port(port) => {
                let url = format!("http://127.0.0.1:{port}{path}");
                client::call(method, &url, None, body, timeout).await
            }
        }
        .map_err(|e| OverlayError::Unreachable {
            at: self.at(),
            reason: e.to_string(),
        })?;
        if !answer.is_success() {
            return Err(OverlayError::Refused {
                at: self.at(),
                path,
                status: answer.status,
                body: answer.body.to_string(),
            });
        }
        Ok(answer)
    }

    /// `GET /status` (an oakestra-rs NetManager's): whether it is registered and which instances it has plumbed.
    /// `Ok(None)`: it has no such status (a reference NetManager), so what it holds cannot be checked.
    pub async fn plumbed(&self) -> Result<Option<Plumbed>, OverlayError> {
        let answer = match self
            .call(Method::GET, PATH_STATUS, None::<&()>, STATUS_TIMEOUT)
            .await
        {
            Ok(a) => a,
            Err(OverlayError::Refused {
                status: 404 | 405, ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(Plumbed::from_status(&answer.body))
    }

    /// `POST /register`: tells the NetManager the node id and the cluster (broker) address, plus (oakestra-rs
    /// extensions a reference NetManager ignores) the broker port and the node's MQTT secret, with which it
    /// connects as `<node id>`.
    pub async fn register(
        &self,
        node_id: &str,
        cluster_address: &str,
        mqtt_port: u16,
        mqtt_password: &str,
    ) -> Result<(), OverlayError> {
        let mut body = RegisterRequest {
            client_id: node_id.to_owned(),
            cluster_address: cluster_address.to_owned(),
            ..RegisterRequest::default()
        };
        body.extra.insert("mqtt_port".to_owned(), mqtt_port.into());
        if !mqtt_password.is_empty() {
            body.extra
                .insert("mqtt_password".to_owned(), mqtt_password.into());
        }
        self.post(PATH_REGISTER, &body).await.map(|_| ())
    }

    /// `POST /container/deploy`: attach the network namespace of `pid` to the overlay with `port_mappings`.
    pub async fn attach(
        &self,
        pid: u32,
        job_name: &str,
        instance: i64,
        port_mappings: &str,
    ) -> Result<ContainerDeployResponse, OverlayError> {
        let body = ContainerDeployRequest {
            pid: i64::from(pid),
            service_name: job_name.to_owned(),
            instance_number: instance,
            port_mappings: port_mappings.to_owned(),
            ..ContainerDeployRequest::default()
        };
        let answer = self.post(PATH_CONTAINER_DEPLOY, &body).await?;
        // The reference ignores the body; an unreadable one is not a failed attach.
        Ok(serde_json::from_value(answer.body).unwrap_or_default())
    }

    /// `POST /unikernel/deploy` (`pid: 0`, as the reference sends it): a network namespace with a tap for the
    /// guest; the answer's `guest` says how the guest's NIC is wired.
    pub async fn attach_unikernel(
        &self,
        job_name: &str,
        instance: i64,
        port_mappings: &str,
    ) -> Result<ContainerDeployResponse, OverlayError> {
        let body = ContainerDeployRequest {
            pid: 0,
            service_name: job_name.to_owned(),
            instance_number: instance,
            port_mappings: port_mappings.to_owned(),
            ..ContainerDeployRequest::default()
        };
        let answer = self.post(PATH_UNIKERNEL_DEPLOY, &body).await?;
        serde_json::from_value(answer.body).map_err(|e| OverlayError::Unreachable {
            at: self.at(),
            reason: format!("unreadable {PATH_UNIKERNEL_DEPLOY} answer: {e}"),
        })
    }

    /// `POST /container/undeploy` (the reference's body, with `pid: -1`), or `/unikernel/undeploy` for a guest.
    pub async fn detach(
        &self,
        job_name: &str,
        instance: i64,
        port_mappings: &str,
        unikernel: bool,
    ) -> Result<(), OverlayError> {
        let mut body = UndeployRequest::new(job_name, instance);
        body.pid = Some(-1);
        body.port_mappings = Some(port_mappings.to_owned());
        let path = if unikernel {
            PATH_UNIKERNEL_UNDEPLOY
        } else {
            PATH_CONTAINER_UNDEPLOY
        };
        self.post(path, &body).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::Plumbed;

    #[test]
    fn a_status_says_what_is_plumbed() {
        let status = json!({"registered": true, "uptime_s": 3, "instances": [
            {"job": "a.b.c.d", "instance": 0, "veth": "veth1"},
            {"job": "a.b.c.d", "instance": 2},
            {"job": 7, "instance": 1},
        ]});
        let p = Plumbed::from_status(&status).expect("a status");
        assert!(p.registered);
        let mut got: Vec<_> = p.instances.into_iter().collect();
        got.sort();
        assert_eq!(got, [("a.b.c.d".to_owned(), 0), ("a.b.c.d".to_owned(), 2)]);
        // A NetManager that restarted: registered false, nothing plumbed.
        let fresh = Plumbed::from_status(&json!({"registered": false, "uptime_s": 1})).expect("a status");
        assert_eq!(fresh, Plumbed::default());
        // Not a status (a reference NetManager's 404 page, an error object): nothing to check against.
        assert_eq!(Plumbed::from_status(&json!({"error": "not found"})), None);
        assert_eq!(Plumbed::from_status(&json!("404 page not found")), None);
    }
}
