//! The NodeEngine's calls to its NetManager (the overlay): `/register` once, `/container/deploy` between task
//! create and start, `/container/undeploy` when the instance goes away. Over the unix socket or a localhost port.

use std::path::PathBuf;
use std::time::Duration;

use hyper::Method;
use oakestra_protocol::api::netmanager::{
    ContainerDeployRequest, ContainerDeployResponse, PATH_CONTAINER_DEPLOY, PATH_CONTAINER_UNDEPLOY,
    PATH_REGISTER, PATH_UNIKERNEL_DEPLOY, PATH_UNIKERNEL_UNDEPLOY, RegisterRequest, UndeployRequest,
};
use oakestra_protocol::client::{self, Response};
use serde::Serialize;

use crate::config::Overlay;

/// How long one NetManager call may take (an attach creates a veth, addresses and NAT rules).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
        let answer = match self {
            Self::Socket(socket) => {
                client::call_unix(Method::POST, socket, path, Some(body), CALL_TIMEOUT).await
            }
            Self::Port(port) => {
                let url = format!("http://127.0.0.1:{port}{path}");
                client::call(Method::POST, &url, None, Some(body), CALL_TIMEOUT).await
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
