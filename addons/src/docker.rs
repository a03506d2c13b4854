//! The local Docker daemon, through bollard: the few calls the verifier and the monitor make (pull, inspect, networks,
//! volumes, containers, logs), each with a deadline, errors as text naming the object. Connecting negotiates the API
//! version (Debian's dockerd 20.10 speaks 1.41, bollard defaults to a newer one).

use std::{collections::HashMap, path::Path, time::Duration};

use bollard::{
    API_DEFAULT_VERSION,
    models::{
        ContainerCreateBody, EndpointSettings, HostConfig, NetworkConnectRequest, NetworkCreateRequest,
        NetworkingConfig, PortBinding, VolumeCreateRequest,
    },
    query_parameters::{
        CreateContainerOptions, CreateImageOptions, InspectContainerOptions, InspectNetworkOptions,
        ListContainersOptions, LogsOptions, RemoveContainerOptions, RemoveImageOptions, StopContainerOptions,
    },
};
use futures_util::StreamExt;
use oakestra_protocol::addons::{AddonNetwork, AddonVolume};

/// Deadline of one plain call.
const CALL: Duration = Duration::from_secs(20);
/// Deadline of one image pull.
const PULL: Duration = Duration::from_secs(300);
/// Seconds a container gets to stop before it is killed.
const STOP_GRACE_SECS: i32 = 5;

/// A connected daemon.
#[derive(Debug, Clone)]
pub struct Docker {
    inner: bollard::Docker,
}

/// What the monitor needs to know of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    /// Container id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// The image reference it was created from.
    pub image: String,
    /// Whether it runs.
    pub running: bool,
    /// Its exit code when it does not run.
    pub exit_code: i64,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Network name → its address there.
    pub networks: HashMap<String, String>,
    /// Published ports: `"<port>/<proto>"` → `(host ip, host port)`.
    pub ports: Vec<(String, String, String)>,
}

/// How to run one container.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Command (empty: the image's).
    pub cmd: Vec<String>,
    /// `KEY=value` lines.
    pub env: Vec<String>,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Networks to join, the first at creation.
    pub networks: Vec<String>,
    /// `source:target[:mode]` binds and named volumes.
    pub binds: Vec<String>,
    /// `(container port "<n>/<proto>", host ip, host port)`.
    pub ports: Vec<(String, String, String)>,
}

fn text(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

async fn deadline<T>(
    what: &str,
    limit: Duration,
    f: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(|e| text(what, e)),
        Err(_) => Err(format!(
            "{what}: no answer from Docker within {} s",
            limit.as_secs()
        )),
    }
}

/// Whether a bollard error is Docker's 404.
fn is_not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }
    )
}

/// `(repository, tag)` of an image reference; the tag defaults to `latest` (a digest reference keeps its digest).
pub fn split_reference(image: &str) -> (String, String) {
    if let Some((repo, digest)) = image.split_once('@') {
        return (repo.to_owned(), digest.to_owned());
    }
    let last_slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[last_slash..].rfind(':') {
        Some(i) => (
            image[..last_slash + i].to_owned(),
            image[last_slash + i + 1..].to_owned(),
        ),
        None => (image.to_owned(), "latest".to_owned()),
    }
}

/// Docker's name for this machine's architecture.
pub fn host_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        other => other,
    }
}

impl Docker {
    /// Connects to the daemon at `socket`, agrees on an API version and pings it.
    pub async fn connect(socket: &Path) -> Result<Self, String> {
        let path = socket.to_string_lossy().into_owned();
        if !socket.exists() {
            return Err(format!("Docker is not running: no socket at {path}"));
        }
        let inner = bollard::Docker::connect_with_unix(&path, CALL.as_secs(), API_DEFAULT_VERSION)
            .map_err(|e| text(&format!("cannot connect to Docker at {path}"), e))?;
        let inner = deadline("Docker version negotiation", CALL, inner.negotiate_version()).await?;
        deadline("Docker ping", CALL, inner.ping()).await?;
        Ok(Self { inner })
    }

    /// Whether the daemon still answers.
    pub async fn ping(&self) -> Result<(), String> {
        deadline("Docker ping", CALL, self.inner.ping()).await.map(drop)
    }

    /// Whether `image` is present locally.
    pub async fn has_image(&self, image: &str) -> Result<bool, String> {
        match tokio::time::timeout(CALL, self.inner.inspect_image(image)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if is_not_found(&e) => Ok(false),
            Ok(Err(e)) => Err(text(&format!("inspecting image {image}"), e)),
            Err(_) => Err(format!("inspecting image {image}: no answer from Docker")),
        }
    }

    /// Pulls `image`; the error is the registry's or Docker's reason.
    pub async fn pull(&self, image: &str) -> Result<(), String> {
        let (repo, tag) = split_reference(image);
        let options = CreateImageOptions {
            from_image: Some(repo),
            tag: Some(tag),
            ..Default::default()
        };
        let pull = async {
            let mut stream = self.inner.create_image(Some(options), None, None);
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| text(&format!("pulling {image}"), e))?;
                if let Some(detail) = info.error_detail {
                    return Err(format!(
                        "pulling {image}: {}",
                        detail.message.unwrap_or_else(|| "unknown error".into())
                    ));
                }
            }
            Ok(())
        };
        tokio::time::timeout(PULL, pull)
            .await
            .unwrap_or_else(|_| Err(format!("pulling {image}: not done within {} s", PULL.as_secs())))
    }

    /// The `(os, architecture)` of a local image.
    pub async fn platform(&self, image: &str) -> Result<(String, String), String> {
        let inspect = deadline(
            &format!("inspecting image {image}"),
            CALL,
            self.inner.inspect_image(image),
        )
        .await?;
        Ok((
            inspect.os.unwrap_or_default(),
            inspect.architecture.unwrap_or_default(),
        ))
    }

    /// Removes a local image (errors only logged by callers).
    pub async fn remove_image(&self, image: &str) -> Result<(), String> {
        deadline(
            &format!("removing image {image}"),
            CALL,
            self.inner
                .remove_image(image, Some(RemoveImageOptions::default()), None),
        )
        .await
        .map(drop)
    }

    /// Creates `net` unless a network of that name exists.
    pub async fn ensure_network(
        &self,
        net: &AddonNetwork,
        labels: HashMap<String, String>,
    ) -> Result<(), String> {
        match tokio::time::timeout(
            CALL,
            self.inner
                .inspect_network(&net.name, None::<InspectNetworkOptions>),
        )
        .await
        {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if is_not_found(&e) => {}
            Ok(Err(e)) => return Err(text(&format!("inspecting network {}", net.name), e)),
            Err(_) => return Err(format!("inspecting network {}: no answer from Docker", net.name)),
        }
        let request = NetworkCreateRequest {
            name: net.name.clone(),
            driver: Some(net.driver.clone()),
            enable_ipv6: Some(net.enable_ipv6),
            labels: Some(labels),
            ..Default::default()
        };
        deadline(
            &format!("creating network {}", net.name),
            CALL,
            self.inner.create_network(request),
        )
        .await
        .map(drop)
    }

    /// The IPv4 gateway of network `name` (the host's side, where a container reaches services of the host).
    pub async fn network_gateway(&self, name: &str) -> Result<Option<String>, String> {
        let net = deadline(
            &format!("inspecting network {name}"),
            CALL,
            self.inner.inspect_network(name, None::<InspectNetworkOptions>),
        )
        .await?;
        Ok(net
            .ipam
            .and_then(|i| i.config)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|c| c.gateway)
            .find(|g| g.parse::<std::net::Ipv4Addr>().is_ok()))
    }

    /// Creates `volume` (creating an existing volume is a no-op in Docker).
    pub async fn ensure_volume(&self, volume: &AddonVolume) -> Result<(), String> {
        let request = VolumeCreateRequest {
            name: Some(volume.name.clone()),
            driver: Some(volume.driver.clone()),
            driver_opts: Some(volume.driver_opts.clone().into_iter().collect()),
            labels: Some(volume.labels.clone().into_iter().collect()),
            ..Default::default()
        };
        deadline(
            &format!("creating volume {}", volume.name),
            CALL,
            self.inner.create_volume(request),
        )
        .await
        .map(drop)
    }

    /// The container named `name`, if any.
    pub async fn container(&self, name: &str) -> Result<Option<ContainerInfo>, String> {
        let inspect = match tokio::time::timeout(
            CALL,
            self.inner
                .inspect_container(name, None::<InspectContainerOptions>),
        )
        .await
        {
            Ok(Ok(i)) => i,
            Ok(Err(e)) if is_not_found(&e) => return Ok(None),
            Ok(Err(e)) => return Err(text(&format!("inspecting container {name}"), e)),
            Err(_) => return Err(format!("inspecting container {name}: no answer from Docker")),
        };
        let state = inspect.state.unwrap_or_default();
        let config = inspect.config.unwrap_or_default();
        let settings = inspect.network_settings.unwrap_or_default();
        let networks = settings
            .networks
            .unwrap_or_default()
            .into_iter()
            .map(|(n, e)| (n, e.ip_address.unwrap_or_default()))
            .collect();
        let mut ports = Vec::new();
        let bindings = inspect
            .host_config
            .and_then(|h| h.port_bindings)
            .unwrap_or_default();
        for (port, list) in bindings {
            for b in list.unwrap_or_default() {
                ports.push((
                    port.clone(),
                    b.host_ip.unwrap_or_default(),
                    b.host_port.unwrap_or_default(),
                ));
            }
        }
        ports.sort();
        Ok(Some(ContainerInfo {
            id: inspect.id.unwrap_or_default(),
            name: inspect
                .name
                .unwrap_or_default()
                .trim_start_matches('/')
                .to_owned(),
            image: config.image.unwrap_or_default(),
            running: state.running.unwrap_or(false),
            exit_code: state.exit_code.unwrap_or(0),
            labels: config.labels.unwrap_or_default(),
            networks,
            ports,
        }))
    }

    /// Names of every container (running or not) carrying label `key`.
    pub async fn containers_labelled(
        &self,
        key: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>, String> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), vec![key.to_owned()])])),
            ..Default::default()
        };
        let list = deadline(
            "listing containers",
            CALL,
            self.inner.list_containers(Some(options)),
        )
        .await?;
        Ok(list
            .into_iter()
            .map(|c| {
                let name = c
                    .names
                    .unwrap_or_default()
                    .first()
                    .map(|n| n.trim_start_matches('/').to_owned())
                    .unwrap_or_default();
                (name, c.labels.unwrap_or_default())
            })
            .collect())
    }

    /// Creates and starts a container; returns its id.
    pub async fn run(&self, spec: &RunSpec) -> Result<String, String> {
        let mut port_bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for (port, ip, host) in &spec.ports {
            port_bindings
                .entry(port.clone())
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: (!ip.is_empty()).then(|| ip.clone()),
                    host_port: Some(host.clone()),
                });
        }
        let first = spec.networks.first().cloned();
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: (!spec.cmd.is_empty()).then(|| spec.cmd.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            exposed_ports: Some(port_bindings.keys().cloned().collect()),
            host_config: Some(HostConfig {
                binds: Some(spec.binds.clone()),
                port_bindings: Some(port_bindings),
                network_mode: first.clone(),
                ..Default::default()
            }),
            networking_config: first.clone().map(|n| NetworkingConfig {
                endpoints_config: Some(HashMap::from([(n, EndpointSettings::default())])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let created = deadline(
            &format!("creating container {}", spec.name),
            CALL,
            self.inner.create_container(Some(options), body),
        )
        .await?;
        // API 1.41 attaches one network at creation; the others are connected before the start.
        for net in spec.networks.iter().skip(1) {
            let request = NetworkConnectRequest {
                container: created.id.clone(),
                ..Default::default()
            };
            deadline(
                &format!("connecting container {} to network {net}", spec.name),
                CALL,
                self.inner.connect_network(net, request),
            )
            .await?;
        }
        deadline(
            &format!("starting container {}", spec.name),
            CALL,
            self.inner.start_container(&created.id, None),
        )
        .await?;
        Ok(created.id)
    }

    /// Stops and removes container `name`; a missing container is not an error.
    pub async fn remove(&self, name: &str) -> Result<(), String> {
        let stop = StopContainerOptions {
            t: Some(STOP_GRACE_SECS),
            ..Default::default()
        };
        match tokio::time::timeout(CALL, self.inner.stop_container(name, Some(stop))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_not_found(&e) => return Ok(()),
            // 304: already stopped; anything else: the forced removal below still tries.
            Ok(Err(_)) | Err(_) => {}
        }
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match tokio::time::timeout(CALL, self.inner.remove_container(name, Some(options))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) if is_not_found(&e) => Ok(()),
            Ok(Err(e)) => Err(text(&format!("removing container {name}"), e)),
            Err(_) => Err(format!("removing container {name}: no answer from Docker")),
        }
    }

    /// Starts a stopped container again.
    pub async fn restart(&self, name: &str) -> Result<(), String> {
        deadline(
            &format!("restarting container {name}"),
            CALL,
            self.inner.restart_container(name, None),
        )
        .await
    }

    /// The last `lines` lines of a container's output (stdout and stderr), lossily decoded.
    pub async fn logs_tail(&self, name: &str, lines: usize) -> String {
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: lines.to_string(),
            ..Default::default()
        };
        let collect = async {
            let mut out = String::new();
            let mut stream = self.inner.logs(name, Some(options));
            while let Some(Ok(chunk)) = stream.next().await {
                out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                if out.len() > 64 * 1024 {
                    break;
                }
            }
            out
        };
        tokio::time::timeout(CALL, collect).await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_repository_and_tag() {
        assert_eq!(split_reference("busybox"), ("busybox".into(), "latest".into()));
        assert_eq!(
            split_reference("127.0.0.1:5000/oakestra/hello:v1"),
            ("127.0.0.1:5000/oakestra/hello".into(), "v1".into())
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/oakestra/hello"),
            ("127.0.0.1:5000/oakestra/hello".into(), "latest".into())
        );
        assert_eq!(
            split_reference("a/b@sha256:00"),
            ("a/b".into(), "sha256:00".into())
        );
    }
}
