//! A private containerd for a test: its own root, state and socket under a temp directory (nothing touches
//! `/run/containerd`), the test image imported, and every task, container and shim gone again on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::procs::workspace_root;

/// A running containerd daemon owned by the test.
#[derive(Debug)]
pub struct Containerd {
    child: Child,
    /// The directory holding config, root, state, socket and log.
    pub dir: PathBuf,
    /// The gRPC socket.
    pub socket: PathBuf,
}

fn need(binary: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(binary).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{binary}` is not installed: run ./scripts/test.sh (it installs containerd, runc, busybox-static, skopeo and docker-registry)"
    );
}

impl Containerd {
    /// Starts containerd in `<tmp>/oakestra-ctrd-<tag>-<pid>` and waits until `ctr version` answers.
    pub fn start(tag: &str) -> Self {
        for b in ["containerd", "ctr", "runc", "containerd-shim-runc-v2"] {
            need(b);
        }
        let dir = std::env::temp_dir().join(format!("oakestra-ctrd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the containerd directory");
        let socket = dir.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            sock = socket.display(),
            opt = dir.join("opt").display(),
        );
        std::fs::write(dir.join("config.toml"), config).expect("write the containerd config");
        let log = std::fs::File::create(dir.join("containerd.log")).expect("create the containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let me = Self { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if me.socket.exists() && me.ctr("default", &["version"]).status.success() {
                return me;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not come up within 20 s:\n{}",
                me.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr --address <socket> -n <namespace> <args>`.
    pub fn ctr(&self, namespace: &str, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", namespace])
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// The daemon's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// Builds the busybox test image (`scripts/testbed/mk-oci-image.sh`) under this directory and imports it into
    /// `namespace` as `name`. Returns the OCI layout directory (for `skopeo copy oci:<dir>:<tag>`).
    pub fn import_test_image(&self, namespace: &str, name: &str) -> PathBuf {
        let layout = build_test_image(&self.dir.join("image"), name);
        let tar = layout.with_extension("tar");
        let out = self.ctr(namespace, &["images", "import", &tar.display().to_string()]);
        assert!(
            out.status.success(),
            "ctr images import failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        layout
    }

    fn lines(&self, namespace: &str, args: &[&str]) -> Vec<String> {
        String::from_utf8_lossy(&self.ctr(namespace, args).stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Kills and deletes every task and container in every namespace (the shims outlive containerd otherwise).
    pub fn sweep(&self) {
        for ns in self.lines("default", &["namespaces", "ls", "-q"]) {
            for id in self.lines(&ns, &["containers", "ls", "-q"]) {
                let _ = self.ctr(&ns, &["tasks", "kill", "-a", "-s", "SIGKILL", &id]);
                for _ in 0..50 {
                    if self.ctr(&ns, &["tasks", "delete", &id]).status.success()
                        || !self.lines(&ns, &["tasks", "ls", "-q"]).contains(&id)
                    {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = self.ctr(&ns, &["containers", "delete", &id]);
                let _ = self.ctr(&ns, &["snapshots", "rm", &format!("{id}-snapshotter")]);
            }
            // runc leaves the namespace's parent cgroups behind; remove them when empty (rmdir fails otherwise).
            if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
                for c in controllers.flatten() {
                    let _ = std::fs::remove_dir(c.path().join(&ns));
                }
            }
            let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&ns));
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.sweep();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Rootfs mounts of tasks that could not be deleted would keep the directory busy.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Builds the busybox OCI image named `name` at `out` (an OCI layout directory, plus `out.tar`).
pub fn build_test_image(out: &Path, name: &str) -> PathBuf {
    need("busybox");
    let script = workspace_root().join("scripts/testbed/mk-oci-image.sh");
    let _ = std::fs::remove_dir_all(out);
    let _ = std::fs::remove_file(out.with_extension("tar"));
    let result = Command::new("bash")
        .arg(&script)
        .arg(out)
        .arg(name)
        .output()
        .expect("run mk-oci-image.sh");
    assert!(
        result.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&result.stderr)
    );
    out.to_path_buf()
}

/// A local registry (Debian's `docker-registry`) on 127.0.0.1:<port>, storage in a temp directory.
#[derive(Debug)]
pub struct LocalRegistry {
    child: Child,
    dir: PathBuf,
    /// `127.0.0.1:<port>`.
    pub host: String,
}

impl LocalRegistry {
    /// Starts the registry and waits until `/v2/` answers.
    pub fn start(tag: &str) -> Self {
        need("docker-registry");
        let dir = std::env::temp_dir().join(format!("oakestra-registry-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the registry directory");
        let port = crate::harness::free_port();
        let host = format!("127.0.0.1:{port}");
        std::fs::write(
            dir.join("config.yml"),
            format!(
                "version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: \"{host}\"}}\n",
                dir.join("data").display()
            ),
        )
        .expect("write the registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).expect("registry log"))
            .spawn()
            .expect("start docker-registry");
        let me = Self { child, dir, host };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&me.host).is_err() {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not listen within 20 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    /// Pushes the OCI layout at `layout` (tag `latest`) as `<host>/<repo>:latest` with skopeo.
    pub fn push(&self, layout: &Path, repo: &str) -> String {
        need("skopeo");
        let dest = format!("{}/{repo}:latest", self.host);
        let out = Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout.display()))
            .arg(format!("docker://{dest}"))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dest
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
