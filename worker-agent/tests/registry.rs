#![allow(clippy::unwrap_used, reason = "tests")]
//! The registry pull client against a real registry: Debian's `docker-registry` on 127.0.0.1, holding the busybox
//! test image that `scripts/testbed/mk-oci-image.sh` builds and `skopeo` pushes. Needs `docker-registry`, `skopeo`
//! and `busybox-static`; without them the tests fail and say to run `scripts/test.sh`, which installs them.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use oakestra_worker_agent::registry::{
    Credentials, Descriptor, ImageRef, Platform, Reference, Registry, RegistryError, Resolved,
};
use sha2::{Digest, Sha256};

/// bcrypt hash (cost 5) of `oakestra-pw`, for the htpasswd registry (user `oakestra`).
const HTPASSWD: &str = "oakestra:$2b$05$yilApSj3Jrj92w.ej3XBNuz/hrQzMNuc89bZaduQWafLPccJYdsGi\n";
const USER: &str = "oakestra";
const PASSWORD: &str = "oakestra-pw";

/// A directory removed when dropped, also when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("oakestra-registry-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `docker-registry`, killed when dropped (declared after its TempDir, so it goes first).
struct RegistryProcess {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for RegistryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn require(tool: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(tool))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    found.unwrap_or_else(|| {
        panic!(
            "`{tool}` is not installed: run scripts/test.sh, which installs docker-registry, skopeo and \
             busybox-static (or apt-get install docker-registry skopeo busybox-static)"
        )
    })
}

/// Fails the test, before doing anything, when a tool it needs is missing.
fn preflight() {
    for tool in ["docker-registry", "skopeo", "busybox"] {
        require(tool);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether something answers HTTP at `addr` (any status: an htpasswd registry answers 401).
fn answers_http(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /v2/ HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0_u8; 8];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}

/// Starts `docker-registry serve` on a free 127.0.0.1 port with storage under `dir`; `htpasswd` turns on basic
/// auth. Waits until `GET /v2/` answers.
fn start_registry(dir: &Path, htpasswd: Option<&str>) -> RegistryProcess {
    let binary = require("docker-registry");
    let storage = dir.join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        storage.display()
    );
    if let Some(entries) = htpasswd {
        let file = dir.join("htpasswd");
        std::fs::write(&file, entries).unwrap();
        config.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: oakestra-test\n    path: {}\n",
            file.display()
        ));
    }
    let config_path = dir.join("config.yml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.join("registry.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let child = Command::new(binary)
        .arg("serve")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .unwrap();
    let mut process = RegistryProcess { child, addr, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answers_http(&process.addr) {
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!(
                "docker-registry exited ({status}): {}",
                std::fs::read_to_string(&process.log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "docker-registry did not answer on {} within 30 s: {}",
            process.addr,
            std::fs::read_to_string(&process.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    process
}

fn run(command: &mut Command) -> String {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Builds the busybox test image as an OCI layout in `dir/image` and returns that path.
fn build_image(dir: &Path) -> PathBuf {
    require("busybox");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/testbed/mk-oci-image.sh");
    let out = dir.join("image");
    run(Command::new("bash")
        .arg(&script)
        .arg(&out)
        .arg("docker.io/library/bbtest:latest"));
    out
}

/// Pushes the OCI layout `image` (tag `latest`) to `target` (`host:port/repo:tag`) over plain HTTP.
fn push(image: &Path, target: &str, credentials: Option<&str>) {
    let mut command = Command::new(require("skopeo"));
    command.args(["copy", "--insecure-policy", "--dest-tls-verify=false"]);
    if let Some(credentials) = credentials {
        command.arg("--dest-creds").arg(credentials);
    }
    command
        .arg(format!("oci:{}:latest", image.display()))
        .arg(format!("docker://{target}"));
    run(&mut command);
}

fn sha256(data: &[u8]) -> String {
    let digest = Sha256::digest(data);
    format!(
        "sha256:{}",
        digest.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// Reads a whole blob through the stream (which verifies size and digest at its end).
async fn fetch_all(
    registry: &Registry,
    image: &ImageRef,
    desc: &Descriptor,
) -> Result<Vec<u8>, RegistryError> {
    let mut stream = registry.fetch_blob(image, desc).await?;
    let mut data = Vec::new();
    while let Some(chunk) = stream.next_chunk().await? {
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

/// The path of a blob's data in the registry's filesystem storage.
fn stored_blob(storage: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    storage.join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

/// Checks what resolve returned against the OCI layout the image was built from.
fn check_resolved(resolved: &Resolved, layout: &Path) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
    // The image has one manifest, no index: the tag points at the manifest.
    assert_eq!(resolved.target.digest, manifest_digest);
    assert_eq!(resolved.manifest.digest, manifest_digest);
    assert_eq!(
        resolved.manifest.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        resolved.config.media_type,
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(resolved.blobs.len(), 2, "manifest and config");
    for (desc, bytes) in &resolved.blobs {
        assert_eq!(sha256(bytes), desc.digest);
        assert_eq!(bytes.len() as i64, desc.size);
        let hex = desc.digest.strip_prefix("sha256:").unwrap();
        assert_eq!(
            bytes.as_ref(),
            std::fs::read(layout.join("blobs/sha256").join(hex))
                .unwrap()
                .as_slice()
        );
    }
    let config: serde_json::Value = serde_json::from_slice(&resolved.blobs[1].1).unwrap();
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["sh"]));
    assert_eq!(config["architecture"], Platform::host().architecture);
    assert_eq!(resolved.layers.len(), 1);
    assert_eq!(
        resolved.layers[0].media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
}

#[tokio::test]
async fn pulls_the_busybox_image_from_a_local_registry() {
    preflight();
    let dir = TempDir::new("open");
    let layout = build_image(&dir.0);
    let server = start_registry(&dir.0, None);
    let name = format!("{}/test/bb:latest", server.addr);
    push(&layout, &name, None);

    let registry = Registry::new(HashMap::new());
    let image = ImageRef::parse(&name).unwrap();
    assert_eq!(image.repository, "test/bb");
    let resolved = registry.resolve(&image, &Platform::host()).await.unwrap();
    check_resolved(&resolved, &layout);

    // Every layer streams in full and matches its digest and the layout's file.
    for layer in &resolved.layers {
        let data = fetch_all(&registry, &image, layer).await.unwrap();
        assert_eq!(sha256(&data), layer.digest);
        assert_eq!(data.len() as i64, layer.size);
        let hex = layer.digest.strip_prefix("sha256:").unwrap();
        assert_eq!(
            data,
            std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()
        );
    }

    // The same manifest by digest.
    let pinned = image.with_reference(Reference::Digest(resolved.manifest.digest.clone()));
    let again = registry.resolve(&pinned, &Platform::host()).await.unwrap();
    assert_eq!(again.manifest, resolved.manifest);
    assert_eq!(again.config, resolved.config);

    // An unknown tag: not found, naming the image.
    let missing = image.with_reference(Reference::Tag("no-such-tag".to_owned()));
    match registry.resolve(&missing, &Platform::host()).await {
        Err(e @ RegistryError::NotFound { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains(&format!("{}/test/bb:no-such-tag", server.addr)),
                "{message}"
            );
        }
        other => panic!("expected not found, got {other:?}"),
    }
    // An unknown repository too.
    let unknown = ImageRef::parse(&format!("{}/test/none:latest", server.addr)).unwrap();
    assert!(matches!(
        registry.resolve(&unknown, &Platform::host()).await,
        Err(RegistryError::NotFound { .. })
    ));

    // A descriptor whose digest the registry does not hold: not found, naming the digest.
    let mut wrong = resolved.layers[0].clone();
    wrong.digest = sha256(b"not in the registry");
    match fetch_all(&registry, &image, &wrong).await {
        Err(e @ RegistryError::NotFound { .. }) => assert!(e.to_string().contains(&wrong.digest), "{e}"),
        other => panic!("expected not found, got {:?}", other.map(|d| d.len())),
    }
    // The right digest with the wrong size: refused.
    let mut short = resolved.layers[0].clone();
    short.size -= 1;
    assert!(matches!(
        fetch_all(&registry, &image, &short).await,
        Err(RegistryError::SizeMismatch { .. })
    ));

    // Content that does not match its digest (the stored bytes altered, same length): verification fails, for a
    // layer at the end of its stream and for the manifest fetched by tag. The manifest stays valid JSON (one hex
    // digit of the config digest changes), as the registry parses it before serving it.
    let storage = dir.0.join("storage");
    let layer_path = stored_blob(&storage, &resolved.layers[0].digest);
    let mut data = std::fs::read(&layer_path).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0x20;
    std::fs::write(&layer_path, data).unwrap();
    let manifest_path = stored_blob(&storage, &resolved.manifest.digest);
    let mut data = std::fs::read(&manifest_path).unwrap();
    let at = data.windows(7).position(|w| w == b"sha256:").unwrap() + 7;
    data[at] = if data[at] == b'0' { b'1' } else { b'0' };
    std::fs::write(&manifest_path, data).unwrap();
    match fetch_all(&registry, &image, &resolved.layers[0]).await {
        Err(RegistryError::DigestMismatch { expected, actual, .. }) => {
            assert_eq!(expected, resolved.layers[0].digest);
            assert_ne!(actual, expected);
        }
        other => panic!("expected a digest mismatch, got {:?}", other.map(|d| d.len())),
    }
    match registry.resolve(&image, &Platform::host()).await {
        Err(RegistryError::DigestMismatch { expected, .. }) => assert_eq!(expected, resolved.manifest.digest),
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    drop(server);
}

#[tokio::test]
async fn pulls_with_basic_credentials_and_refuses_anonymous_access() {
    preflight();
    let dir = TempDir::new("auth");
    let layout = build_image(&dir.0);
    let server = start_registry(&dir.0, Some(HTPASSWD));
    let name = format!("{}/private/bb:v1", server.addr);
    push(&layout, &name, Some(&format!("{USER}:{PASSWORD}")));
    let image = ImageRef::parse(&name).unwrap();

    let anonymous = Registry::new(HashMap::new());
    match anonymous.resolve(&image, &Platform::host()).await {
        Err(e @ RegistryError::Unauthorized { .. }) => {
            let message = e.to_string();
            assert!(message.contains(&server.addr), "{message}");
            assert!(message.contains("private/bb"), "{message}");
        }
        other => panic!("expected unauthorized, got {other:?}"),
    }

    let wrong = Registry::new(HashMap::from([(
        server.addr.clone(),
        Credentials {
            username: USER.to_owned(),
            password: "wrong".to_owned(),
        },
    )]));
    assert!(matches!(
        wrong.resolve(&image, &Platform::host()).await,
        Err(RegistryError::Unauthorized { .. })
    ));

    let registry = Registry::new(HashMap::from([(
        server.addr.clone(),
        Credentials {
            username: USER.to_owned(),
            password: PASSWORD.to_owned(),
        },
    )]));
    let resolved = registry.resolve(&image, &Platform::host()).await.unwrap();
    check_resolved(&resolved, &layout);
    for layer in &resolved.layers {
        let data = fetch_all(&registry, &image, layer).await.unwrap();
        assert_eq!(sha256(&data), layer.digest);
    }
    drop(server);
}
