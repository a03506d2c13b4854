//! The containerd client: images (already present, imported, or pulled from a registry), container and task
//! lifecycle, and cleanup, all in one containerd namespace (`oakestra` by default).
//!
//! Only the services containerd 1.6 offers are used (crates.md §1): the image pull happens here, client side
//! ([`crate::registry`] fetches, `Content.Write` stores, `Diff.Apply` unpacks), because 1.6 has no Transfer service.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
    UsageRequest, snapshots_client::SnapshotsClient,
};
use containerd_client::services::v1::{
    ApplyRequest, Container, CreateContainerRequest, CreateImageRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteTaskRequest, GetImageRequest, GetRequest, Image, InfoRequest, KillRequest,
    ListContainersRequest, ReadContentRequest, StartRequest, UpdateImageRequest, WaitRequest, WriteAction,
    WriteContentRequest, container::Runtime, containers_client::ContainersClient,
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient, tasks_client::TasksClient, version_client::VersionClient,
};
use containerd_client::services::v1::{
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
};
use containerd_client::tonic::metadata::{Ascii, MetadataValue};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Descriptor as CtrDescriptor;
use containerd_client::types::Mount;
use serde_json::Value;

use crate::registry::{Descriptor, ImageRef, Platform, Registry, RegistryError, select_platform};
use crate::spec::{self, ImageConfig, SpecError};

/// containerd's runc shim.
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// The type URL containerd expects on an OCI runtime spec packed as `Any`.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// Largest JSON blob (index, manifest, config) read from the content store.
const MAX_JSON_BLOB: i64 = 4 * 1024 * 1024;
/// Chunk size of content writes.
const WRITE_CHUNK: usize = 1024 * 1024;
/// How often a pull tells its progress (the cluster and root see it as the instance's `status_detail`).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// `pulling <image>: 12.3 of 45.6 MiB`.
fn pull_progress(image: &str, done: u64, total: u64) -> String {
    // Display only: f64 holds any realistic image size exactly enough.
    #[allow(clippy::cast_precision_loss, reason = "a rounded size for people")]
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    format!("pulling {image}: {:.1} of {:.1} MiB", mib(done), mib(total))
}

/// Why a containerd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The socket does not answer.
    #[error("cannot connect to containerd at {socket}: {reason}")]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A containerd call answered with an error.
    #[error("containerd {call} {subject}: {code:?}: {message}")]
    Call {
        /// The RPC.
        call: &'static str,
        /// What it was about (image, container id, digest).
        subject: String,
        /// The gRPC code.
        code: Code,
        /// containerd's message.
        message: String,
    },
    /// The registry could not deliver the image.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The image exists but cannot be used.
    #[error("image {image}: {reason}")]
    Image {
        /// The image reference.
        image: String,
        /// What is wrong.
        reason: String,
    },
    /// The deployment cannot become a runtime spec.
    #[error(transparent)]
    Spec(#[from] SpecError),
}

impl RuntimeError {
    fn call(call: &'static str, subject: impl Into<String>, status: &Status) -> Self {
        Self::Call {
            call,
            subject: subject.into(),
            code: status.code(),
            message: status.message().to_owned(),
        }
    }

    /// Whether containerd said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Self::Call {
                code: Code::NotFound,
                ..
            }
        )
    }
}

/// An image ready to run: its name in containerd, its config and the snapshot its layers are unpacked to.
#[derive(Debug, Clone)]
pub struct PreparedImage {
    /// The name the image is stored under.
    pub name: String,
    /// The image config.
    pub config: ImageConfig,
    /// The top layer's chain id (the parent of every container snapshot).
    pub chain_id: String,
}

/// A container in the namespace, as listed.
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    /// The container id (the task id for ours).
    pub id: String,
    /// Its labels (ours carry `oakestra.*`).
    pub labels: HashMap<String, String>,
    /// Creation time, seconds since the epoch.
    pub created_s: i64,
}

/// The state of a container's task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// No task exists.
    Missing,
    /// Created or running (or paused): the process is there.
    Alive {
        /// The init process pid.
        pid: u32,
    },
    /// The process exited.
    Stopped {
        /// Its exit code.
        exit_code: u32,
    },
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code (128 + signal for a signalled process).
    pub code: u32,
}

/// A containerd connection bound to one namespace.
#[derive(Debug, Clone)]
pub struct Containerd {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    namespace_md: MetadataValue<Ascii>,
    snapshotter: String,
    registry: Registry,
}

impl Containerd {
    /// Connects to the socket and checks containerd answers.
    pub async fn connect(
        socket: &Path,
        namespace: &str,
        snapshotter: &str,
        registry: Registry,
    ) -> Result<Self, RuntimeError> {
        let fail = |reason: String| RuntimeError::Connect {
            socket: socket.to_owned(),
            reason,
        };
        let namespace_md: MetadataValue<Ascii> = namespace
            .parse()
            .map_err(|_| fail(format!("namespace {namespace:?} is not ASCII")))?;
        let channel = tokio::time::timeout(Duration::from_secs(10), containerd_client::connect(socket))
            .await
            .map_err(|_| fail("no answer within 10 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let this = Self {
            channel,
            socket: socket.to_owned(),
            namespace: namespace.to_owned(),
            namespace_md,
            snapshotter: snapshotter.to_owned(),
            registry,
        };
        this.version().await.map_err(|e| fail(e.to_string()))?;
        Ok(this)
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The namespace every call works in.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// containerd's version string.
    pub async fn version(&self) -> Result<String, RuntimeError> {
        let v = VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(|s| RuntimeError::call("Version", "", &s))?
            .into_inner();
        Ok(v.version)
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert("containerd-namespace", self.namespace_md.clone());
        r
    }

    fn req_leased<T>(&self, msg: T, lease: &Lease) -> Request<T> {
        let mut r = self.req(msg);
        if let Ok(v) = lease.id.parse::<MetadataValue<Ascii>>() {
            r.metadata_mut().insert("containerd-lease", v);
        }
        r
    }

    /// A short-lived lease that keeps what a pull or create writes from the garbage collector until it is
    /// referenced (containerd expires it itself after an hour should we crash before deleting it).
    async fn lease(&self, purpose: &str) -> Result<Lease, RuntimeError> {
        let expire = time_rfc3339(std::time::SystemTime::now() + Duration::from_secs(3600));
        let id = format!("oakestra-{purpose}-{}", unique());
        let labels = HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]);
        LeasesClient::new(self.channel.clone())
            .create(self.req(CreateLeaseRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(|s| RuntimeError::call("Leases.Create", &id, &s))?;
        Ok(Lease { id })
    }

    async fn drop_lease(&self, lease: Lease) {
        let result = LeasesClient::new(self.channel.clone())
            .delete(self.req(DeleteLeaseRequest {
                id: lease.id.clone(),
                sync: false,
            }))
            .await;
        if let Err(s) = result {
            tracing::warn!(lease = %lease.id, error = %s.message(), "cannot delete lease (it expires by itself)");
        }
    }

    // === Images ================================================================================================

    /// Makes `reference` runnable: uses the image if containerd already has it (pulled before, or imported with
    /// `ctr images import`), otherwise pulls it (telling `progress` how far, at most once a second); then makes sure
    /// its layers are unpacked.
    pub async fn ensure_image(
        &self,
        reference: &str,
        platform: &Platform,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<PreparedImage, RuntimeError> {
        let image_ref = ImageRef::parse(reference)?;
        let name = image_ref.name();
        let stored = match self.get_image(&name).await? {
            Some(image) => Some(image),
            // An image imported under the literal text of the reference.
            None if name != reference => self.get_image(reference).await?,
            None => None,
        };
        let (name, manifest) = match stored {
            Some(image) => {
                let target = image.target.ok_or_else(|| RuntimeError::Image {
                    image: reference.to_owned(),
                    reason: "the stored image has no target".into(),
                })?;
                let manifest = self
                    .local_manifest(&image_ref, &from_ctr(&target), platform)
                    .await?;
                tracing::debug!(image = %image.name, "image present");
                (image.name, manifest)
            }
            None => (name.clone(), self.pull(&image_ref, platform, progress).await?),
        };
        let config_bytes = self.read_blob(&manifest.config.digest, MAX_JSON_BLOB).await?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| RuntimeError::Image {
            image: reference.to_owned(),
            reason: format!("invalid image config {}: {e}", manifest.config.digest),
        })?;
        if config.rootfs.diff_ids.len() != manifest.layers.len() {
            return Err(RuntimeError::Image {
                image: reference.to_owned(),
                reason: format!(
                    "the config lists {} layers, the manifest {}",
                    config.rootfs.diff_ids.len(),
                    manifest.layers.len()
                ),
            });
        }
        let chain_id = self
            .unpack(&name, &manifest.layers, &config.rootfs.diff_ids, &manifest.config)
            .await?;
        Ok(PreparedImage {
            name,
            config,
            chain_id,
        })
    }

    async fn get_image(&self, name: &str) -> Result<Option<Image>, RuntimeError> {
        match ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest {
                name: name.to_owned(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(RuntimeError::call("Images.Get", name, &s)),
        }
    }

    /// The manifest for `platform` behind a stored image's target (a manifest, or an index to choose from).
    async fn local_manifest(
        &self,
        image: &ImageRef,
        target: &Descriptor,
        platform: &Platform,
    ) -> Result<Manifest, RuntimeError> {
        let bad = |reason: String| RuntimeError::Image {
            image: image.name(),
            reason,
        };
        let mut desc = target.clone();
        // An index may nest another index; two levels are plenty.
        for _ in 0..3 {
            let bytes = self.read_blob(&desc.digest, MAX_JSON_BLOB).await?;
            let doc: Value = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("{} is not JSON: {e}", desc.digest)))?;
            if let Some(entries) = doc.get("manifests").and_then(Value::as_array) {
                let choices: Vec<Descriptor> = entries
                    .iter()
                    .filter_map(|e| serde_json::from_value(e.clone()).ok())
                    .collect();
                desc = select_platform(image, &choices, platform)?.clone();
                continue;
            }
            return serde_json::from_value(doc)
                .map_err(|e| bad(format!("invalid manifest {}: {e}", desc.digest)));
        }
        Err(bad("indexes nested too deeply".into()))
    }

    /// Pulls `image` from its registry into the content store and records it as an image, telling `progress` the
    /// bytes so far and in all (at most once a second).
    async fn pull(
        &self,
        image: &ImageRef,
        platform: &Platform,
        progress: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<Manifest, RuntimeError> {
        let name = image.name();
        let started = std::time::Instant::now();
        tracing::info!(image = %name, "pulling");
        progress(&format!("pulling {name}"));
        let resolved = self.registry.resolve(image, platform).await?;
        let lease = self.lease("pull").await?;
        let total: u64 = resolved
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or(0))
            .sum();
        let done = std::sync::atomic::AtomicU64::new(0);
        let last_told = std::sync::Mutex::new(std::time::Instant::now());
        let tell = |added: u64, force: bool| {
            let so_far = done.fetch_add(added, std::sync::atomic::Ordering::Relaxed) + added;
            let mut last = last_told
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if force || last.elapsed() >= PROGRESS_EVERY {
                *last = std::time::Instant::now();
                progress(&pull_progress(&name, so_far, total));
            }
        };
        let result = async {
            for layer in &resolved.layers {
                if self.has_content(&layer.digest).await? {
                    tell(u64::try_from(layer.size).unwrap_or(0), false);
                    continue;
                }
                let mut stream = self.registry.fetch_blob(image, layer).await?;
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, RegistryError>>(4);
                let tell = &tell;
                let feeder = async move {
                    loop {
                        match stream.next_chunk().await {
                            Ok(Some(chunk)) => {
                                tell(u64::try_from(chunk.len()).unwrap_or(u64::MAX), false);
                                if tx.send(Ok(chunk)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => return,
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                };
                let (_, written) =
                    tokio::join!(feeder, self.write_content(layer, rx, HashMap::new(), &lease));
                written?;
            }
            // The final count, whatever the clock said.
            tell(0, true);
            let mut gc: HashMap<String, String> = HashMap::new();
            gc.insert(
                "containerd.io/gc.ref.content.config".into(),
                resolved.config.digest.clone(),
            );
            for (i, layer) in resolved.layers.iter().enumerate() {
                gc.insert(
                    format!("containerd.io/gc.ref.content.l.{i}"),
                    layer.digest.clone(),
                );
            }
            for (desc, bytes) in &resolved.blobs {
                let labels = if desc.digest == resolved.manifest.digest {
                    gc.clone()
                } else if desc.digest == resolved.target.digest {
                    HashMap::from([(
                        "containerd.io/gc.ref.content.m.0".to_owned(),
                        resolved.manifest.digest.clone(),
                    )])
                } else {
                    HashMap::new()
                };
                if self.has_content(&desc.digest).await? {
                    continue;
                }
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let _ = tx.send(Ok(bytes.clone())).await;
                drop(tx);
                self.write_content(desc, rx, labels, &lease).await?;
            }
            let record = Image {
                name: name.clone(),
                labels: HashMap::new(),
                target: Some(to_ctr(&resolved.target)),
                created_at: None,
                updated_at: None,
            };
            let mut images = ImagesClient::new(self.channel.clone());
            match images
                .create(self.req(CreateImageRequest {
                    image: Some(record.clone()),
                    source_date_epoch: None,
                }))
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::AlreadyExists => {
                    images
                        .update(self.req(UpdateImageRequest {
                            image: Some(record),
                            update_mask: None,
                            source_date_epoch: None,
                        }))
                        .await
                        .map_err(|s| RuntimeError::call("Images.Update", &name, &s))?;
                }
                Err(s) => return Err(RuntimeError::call("Images.Create", &name, &s)),
            }
            Ok(Manifest {
                config: resolved.config.clone(),
                layers: resolved.layers.clone(),
            })
        }
        .await;
        self.drop_lease(lease).await;
        if result.is_ok() {
            tracing::info!(image = %name, elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX), "pulled");
        }
        result
    }

    async fn has_content(&self, digest: &str) -> Result<bool, RuntimeError> {
        match ContentClient::new(self.channel.clone())
            .info(self.req(InfoRequest {
                digest: digest.to_owned(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(RuntimeError::call("Content.Info", digest, &s)),
        }
    }

    /// Streams the chunks from `source` into the content store under `desc.digest` (containerd verifies size and
    /// digest on commit).
    async fn write_content(
        &self,
        desc: &Descriptor,
        mut source: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, RegistryError>>,
        labels: HashMap<String, String>,
        lease: &Lease,
    ) -> Result<(), RuntimeError> {
        let reference = format!("oakestra-{}-{}", desc.digest, unique());
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
        let digest = desc.digest.clone();
        let total = desc.size;
        let producer = async move {
            let mut offset: i64 = 0;
            while let Some(chunk) = source.recv().await {
                let chunk = chunk?;
                for piece in chunk.chunks(WRITE_CHUNK) {
                    let req = WriteContentRequest {
                        action: WriteAction::Write as i32,
                        r#ref: reference.clone(),
                        total,
                        expected: digest.clone(),
                        offset,
                        data: piece.to_vec(),
                        labels: HashMap::new(),
                    };
                    offset = offset.saturating_add(i64::try_from(piece.len()).unwrap_or(i64::MAX));
                    if tx.send(req).await.is_err() {
                        return Ok(());
                    }
                }
            }
            let commit = WriteContentRequest {
                action: WriteAction::Commit as i32,
                r#ref: reference,
                total,
                expected: digest,
                offset,
                data: Vec::new(),
                labels,
            };
            let _ = tx.send(commit).await;
            Ok::<(), RegistryError>(())
        };
        let mut content = ContentClient::new(self.channel.clone());
        let request = self.req_leased(tokio_stream::wrappers::ReceiverStream::new(rx), lease);
        let consumer = async {
            let mut responses = content
                .write(request)
                .await
                .map_err(|s| RuntimeError::call("Content.Write", &desc.digest, &s))?
                .into_inner();
            loop {
                match responses.message().await {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(s) if s.code() == Code::AlreadyExists => return Ok(()),
                    Err(s) => return Err(RuntimeError::call("Content.Write", &desc.digest, &s)),
                }
            }
        };
        let (produced, consumed) = tokio::join!(producer, consumer);
        produced?;
        consumed
    }

    /// Reads a whole blob (at most `limit` bytes) from the content store.
    pub async fn read_blob(&self, digest: &str, limit: i64) -> Result<Vec<u8>, RuntimeError> {
        let mut stream = ContentClient::new(self.channel.clone())
            .read(self.req(ReadContentRequest {
                digest: digest.to_owned(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| RuntimeError::call("Content.Read", digest, &s))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(part) = stream
            .message()
            .await
            .map_err(|s| RuntimeError::call("Content.Read", digest, &s))?
        {
            out.extend_from_slice(&part.data);
            if i64::try_from(out.len()).unwrap_or(i64::MAX) > limit {
                return Err(RuntimeError::Image {
                    image: digest.to_owned(),
                    reason: format!("blob larger than {limit} bytes"),
                });
            }
        }
        Ok(out)
    }

    /// Unpacks the layers not yet unpacked (a `ctr import` on overlayfs has done it already) and returns the top
    /// chain id. The image config gets a GC label pointing at the top snapshot, as containerd's own unpacker does,
    /// so the snapshots live as long as the image.
    async fn unpack(
        &self,
        image: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
        config: &Descriptor,
    ) -> Result<String, RuntimeError> {
        let chain = spec::chain_ids(diff_ids);
        let Some(top) = chain.last().cloned() else {
            return Err(RuntimeError::Image {
                image: image.to_owned(),
                reason: "the image has no layers".into(),
            });
        };
        if self.snapshot_exists(&top).await? {
            return Ok(top);
        }
        let lease = self.lease("unpack").await?;
        let result = async {
            let mut snapshots = SnapshotsClient::new(self.channel.clone());
            for (i, (layer, chain_id)) in layers.iter().zip(&chain).enumerate() {
                if self.snapshot_exists(chain_id).await? {
                    continue;
                }
                let parent = if i == 0 {
                    String::new()
                } else {
                    chain[i - 1].clone()
                };
                let key = format!("extract-{}-{chain_id}", unique());
                let mounts = snapshots
                    .prepare(self.req_leased(
                        PrepareSnapshotRequest {
                            snapshotter: self.snapshotter.clone(),
                            key: key.clone(),
                            parent,
                            labels: HashMap::new(),
                        },
                        &lease,
                    ))
                    .await
                    .map_err(|s| RuntimeError::call("Snapshots.Prepare", &key, &s))?
                    .into_inner()
                    .mounts;
                let applied = DiffClient::new(self.channel.clone())
                    .apply(self.req_leased(
                        ApplyRequest {
                            diff: Some(to_ctr(layer)),
                            mounts,
                            payloads: HashMap::new(),
                            sync_fs: false,
                        },
                        &lease,
                    ))
                    .await;
                if let Err(s) = applied {
                    self.remove_snapshot(&key).await;
                    return Err(RuntimeError::call("Diff.Apply", &layer.digest, &s));
                }
                let committed = snapshots
                    .commit(self.req_leased(
                        CommitSnapshotRequest {
                            snapshotter: self.snapshotter.clone(),
                            name: chain_id.clone(),
                            key: key.clone(),
                            labels: HashMap::new(),
                        },
                        &lease,
                    ))
                    .await;
                match committed {
                    Ok(_) => {}
                    // Another deploy of the same image unpacked it meanwhile.
                    Err(s) if s.code() == Code::AlreadyExists => self.remove_snapshot(&key).await,
                    Err(s) => {
                        self.remove_snapshot(&key).await;
                        return Err(RuntimeError::call("Snapshots.Commit", chain_id, &s));
                    }
                }
            }
            self.label_config(config, &top).await
        }
        .await;
        self.drop_lease(lease).await;
        result.map(|()| top)
    }

    async fn label_config(&self, config: &Descriptor, top: &str) -> Result<(), RuntimeError> {
        use containerd_client::services::v1::{Info, UpdateRequest};
        let key = format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter);
        let info = Info {
            digest: config.digest.clone(),
            size: 0,
            created_at: None,
            updated_at: None,
            labels: HashMap::from([(key.clone(), top.to_owned())]),
        };
        ContentClient::new(self.channel.clone())
            .update(self.req(UpdateRequest {
                info: Some(info),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{key}")],
                }),
            }))
            .await
            .map_err(|s| RuntimeError::call("Content.Update", &config.digest, &s))?;
        Ok(())
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool, RuntimeError> {
        match SnapshotsClient::new(self.channel.clone())
            .stat(self.req(StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_owned(),
            }))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(RuntimeError::call("Snapshots.Stat", key, &s)),
        }
    }

    async fn remove_snapshot(&self, key: &str) {
        let _ = SnapshotsClient::new(self.channel.clone())
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_owned(),
            }))
            .await;
    }

    // === Containers and tasks ===================================================================================

    /// The snapshot key of a container's root filesystem (the reference's naming).
    pub fn snapshot_key(id: &str) -> String {
        format!("{id}-snapshotter")
    }

    /// The cgroup path runc puts a task in (`/<namespace>/<id>`).
    pub fn cgroups_path(&self, id: &str) -> String {
        format!("/{}/{id}", self.namespace)
    }

    /// Creates the container `id` with its own writable snapshot on top of `image` and the runtime spec `spec`.
    pub async fn create_container(
        &self,
        id: &str,
        image: &PreparedImage,
        spec: &Value,
        labels: HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let lease = self.lease("create").await?;
        let result = async {
            let key = Self::snapshot_key(id);
            SnapshotsClient::new(self.channel.clone())
                .prepare(self.req_leased(
                    PrepareSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: key.clone(),
                        parent: image.chain_id.clone(),
                        labels: HashMap::new(),
                    },
                    &lease,
                ))
                .await
                .map_err(|s| RuntimeError::call("Snapshots.Prepare", &key, &s))?;
            let spec_bytes = serde_json::to_vec(spec).map_err(|e| RuntimeError::Image {
                image: image.name.clone(),
                reason: format!("cannot encode the runtime spec: {e}"),
            })?;
            let container = Container {
                id: id.to_owned(),
                labels,
                image: image.name.clone(),
                runtime: Some(Runtime {
                    name: RUNC_RUNTIME.to_owned(),
                    options: None,
                }),
                spec: Some(prost_types::Any {
                    type_url: SPEC_TYPE_URL.to_owned(),
                    value: spec_bytes,
                }),
                snapshotter: self.snapshotter.clone(),
                snapshot_key: key.clone(),
                created_at: None,
                updated_at: None,
                extensions: HashMap::new(),
                sandbox: String::new(),
            };
            let created = ContainersClient::new(self.channel.clone())
                .create(self.req_leased(
                    CreateContainerRequest {
                        container: Some(container),
                    },
                    &lease,
                ))
                .await;
            if let Err(s) = created {
                self.remove_snapshot(&key).await;
                return Err(RuntimeError::call("Containers.Create", id, &s));
            }
            Ok(())
        }
        .await;
        self.drop_lease(lease).await;
        result
    }

    /// Creates the task of container `id` (not started) with stdout and stderr appended to `log`; returns its pid.
    pub async fn create_task(&self, id: &str, log: &Path) -> Result<u32, RuntimeError> {
        let key = Self::snapshot_key(id);
        let mounts: Vec<Mount> = SnapshotsClient::new(self.channel.clone())
            .mounts(self.req(MountsRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.clone(),
            }))
            .await
            .map_err(|s| RuntimeError::call("Snapshots.Mounts", &key, &s))?
            .into_inner()
            .mounts;
        // The runc shim opens `file://` URIs with O_APPEND and shares one descriptor when both are equal.
        let uri = format!("file://{}", log.display());
        let created = TasksClient::new(self.channel.clone())
            .create(self.req(CreateTaskRequest {
                container_id: id.to_owned(),
                rootfs: mounts,
                stdin: String::new(),
                stdout: uri.clone(),
                stderr: uri,
                terminal: false,
                checkpoint: None,
                options: None,
                runtime_path: String::new(),
            }))
            .await
            .map_err(|s| RuntimeError::call("Tasks.Create", id, &s))?;
        Ok(created.into_inner().pid)
    }

    /// Starts the created task of `id`.
    pub async fn start_task(&self, id: &str) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel.clone())
            .start(self.req(StartRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| RuntimeError::call("Tasks.Start", id, &s))?;
        Ok(())
    }

    /// Blocks until the task of `id` exits.
    pub async fn wait(&self, id: &str) -> Result<Exit, RuntimeError> {
        let r = TasksClient::new(self.channel.clone())
            .wait(self.req(WaitRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
            .map_err(|s| RuntimeError::call("Tasks.Wait", id, &s))?;
        Ok(Exit {
            code: r.into_inner().exit_status,
        })
    }

    /// Sends `signal` to the task's init process (`all`: to every process of the container).
    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), RuntimeError> {
        TasksClient::new(self.channel.clone())
            .kill(self.req(KillRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
                signal,
                all,
            }))
            .await
            .map_err(|s| RuntimeError::call("Tasks.Kill", id, &s))?;
        Ok(())
    }

    /// The state of the task of container `id`.
    pub async fn task_state(&self, id: &str) -> Result<TaskState, RuntimeError> {
        match TasksClient::new(self.channel.clone())
            .get(self.req(GetRequest {
                container_id: id.to_owned(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(r) => {
                let Some(p) = r.into_inner().process else {
                    return Ok(TaskState::Missing);
                };
                // containerd.v1.types.Status: 3 = STOPPED.
                if p.status == 3 {
                    Ok(TaskState::Stopped {
                        exit_code: p.exit_status,
                    })
                } else {
                    Ok(TaskState::Alive { pid: p.pid })
                }
            }
            Err(s) if s.code() == Code::NotFound => Ok(TaskState::Missing),
            Err(s) => Err(RuntimeError::call("Tasks.Get", id, &s)),
        }
    }

    /// Removes everything of container `id`: kills and deletes the task, deletes the container and its snapshot.
    /// Every step is tried even when an earlier one fails (the reference's leak, issue #441); objects already gone
    /// count as removed. Returns the exit code the task had, if it had one, or the first real error.
    pub async fn remove(&self, id: &str) -> Result<Option<u32>, RuntimeError> {
        let mut first_error: Option<RuntimeError> = None;
        let mut keep = |e: RuntimeError| {
            if !e.is_not_found() && first_error.is_none() {
                first_error = Some(e);
            }
        };
        if let Err(e) = self.kill(id, 9, true).await {
            // A task that is already stopped cannot be signalled; that is fine.
            if !matches!(
                &e,
                RuntimeError::Call {
                    code: Code::FailedPrecondition,
                    ..
                }
            ) {
                keep(e);
            }
        }
        let mut exit_code = None;
        match TasksClient::new(self.channel.clone())
            .delete(self.req(DeleteTaskRequest {
                container_id: id.to_owned(),
            }))
            .await
        {
            Ok(r) => exit_code = Some(r.into_inner().exit_status),
            Err(s) => keep(RuntimeError::call("Tasks.Delete", id, &s)),
        }
        if let Err(s) = ContainersClient::new(self.channel.clone())
            .delete(self.req(DeleteContainerRequest { id: id.to_owned() }))
            .await
        {
            keep(RuntimeError::call("Containers.Delete", id, &s));
        }
        let key = Self::snapshot_key(id);
        if let Err(s) = SnapshotsClient::new(self.channel.clone())
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.clone(),
            }))
            .await
        {
            keep(RuntimeError::call("Snapshots.Remove", &key, &s));
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(exit_code),
        }
    }

    /// Every container in the namespace.
    pub async fn list(&self) -> Result<Vec<ContainerInfo>, RuntimeError> {
        let r = ContainersClient::new(self.channel.clone())
            .list(self.req(ListContainersRequest { filters: vec![] }))
            .await
            .map_err(|s| RuntimeError::call("Containers.List", &self.namespace, &s))?;
        Ok(r.into_inner()
            .containers
            .into_iter()
            .map(|c| ContainerInfo {
                id: c.id,
                labels: c.labels,
                created_s: c.created_at.map(|t| t.seconds).unwrap_or_default(),
            })
            .collect())
    }

    /// Bytes the container's writable snapshot uses (the `disk` of a resources report).
    pub async fn disk_usage(&self, id: &str) -> Result<i64, RuntimeError> {
        let key = Self::snapshot_key(id);
        let r = SnapshotsClient::new(self.channel.clone())
            .usage(self.req(UsageRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.clone(),
            }))
            .await
            .map_err(|s| RuntimeError::call("Snapshots.Usage", &key, &s))?;
        Ok(r.into_inner().size)
    }
}

/// A lease id.
#[derive(Debug)]
struct Lease {
    id: String,
}

/// The part of an image manifest a container needs.
#[derive(Debug, Clone, serde::Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

fn to_ctr(d: &Descriptor) -> CtrDescriptor {
    CtrDescriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone().into_iter().collect(),
    }
}

fn from_ctr(d: &CtrDescriptor) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: d.annotations.clone().into_iter().collect(),
        platform: None,
    }
}

/// A process-unique suffix for ingest refs, snapshot keys and lease ids.
fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos}-{n}", std::process::id())
}

/// `t` as RFC 3339 UTC (`2026-11-22T10:00:00Z`), what containerd's `gc.expire` label wants.
fn time_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let days = i64::try_from(secs / 86_400).unwrap_or_default();
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    (y, u32::try_from(m).unwrap_or(1), u32::try_from(d).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        let t = std::time::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        assert_eq!(time_rfc3339(t), "2026-11-18T11:06:40Z");
        assert_eq!(time_rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let leap = std::time::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(time_rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn unique_never_repeats() {
        assert_ne!(unique(), unique());
    }
}
