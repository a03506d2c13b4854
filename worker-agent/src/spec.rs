//! The OCI runtime spec of an instance: the image config plus the deployment's `cmd`, `environment`, hostname, limits.
//!
//! Pure: it turns an [`ImageConfig`] and a [`DeployCommand`] into the JSON document runc reads, so every rule
//! (argument override, environment merge, cgroup limits, the default mounts and devices) is unit-tested here.

use std::collections::BTreeMap;

use oakestra_protocol::mqtt::worker::DeployCommand;
use serde::Deserialize;
use serde_json::{Value, json};

/// The part of an OCI image config (`application/vnd.oci.image.config.v1+json`) a container starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageConfig {
    /// `config` of the image config document.
    #[serde(default)]
    pub config: ImageRunConfig,
    /// Layer digests of the uncompressed layers, bottom first.
    #[serde(default)]
    pub rootfs: RootFs,
}

/// `config.*` of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ImageRunConfig {
    /// `uid[:gid]` or a name.
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    /// `KEY=value` entries.
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    /// Executable and leading arguments.
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (after the entrypoint).
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// The process's working directory.
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RootFs {
    /// `sha256:` digests of the uncompressed layer tars.
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// Why no spec could be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// Neither the deployment nor the image names a program to run.
    #[error("nothing to run: the deployment has no `cmd` and image {image:?} has no Entrypoint or Cmd")]
    NoCommand {
        /// The image reference.
        image: String,
    },
    /// The image's `User` is a name; resolving names needs the image's `/etc/passwd`, which we do not read.
    #[error(
        "image {image:?} runs as user {user:?}: only numeric `uid[:gid]` (or `root`) users are supported"
    )]
    UserName {
        /// The image reference.
        image: String,
        /// The image's `User`.
        user: String,
    },
    /// An `environment` entry is not `KEY=value`.
    #[error("environment entry {entry:?} is not KEY=value with a non-empty KEY")]
    Environment {
        /// The entry.
        entry: String,
    },
}

/// Host paths and policy the spec refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecOptions {
    /// The container hostname (`instance-<n>`).
    pub hostname: String,
    /// cgroup path runc creates (`/oakestra/<task id>`).
    pub cgroups_path: String,
    /// Host file bind-mounted read-only at `/etc/hosts`.
    pub hosts_file: String,
    /// Host file bind-mounted read-only at `/etc/resolv.conf`.
    pub resolv_conf: String,
    /// Host file bind-mounted read-only at `/etc/hostname`.
    pub hostname_file: String,
}

/// The default `PATH` when the image sets none (containerd's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// CPU quota period in µs; `vcpus` becomes a quota of `vcpus` periods.
pub const CPU_PERIOD_US: u64 = 100_000;

/// The arguments the container runs: the deployment's `cmd` replaces everything (as the reference does); otherwise
/// the image's Entrypoint followed by its Cmd.
pub fn process_args(image: &ImageConfig, deploy: &DeployCommand) -> Vec<String> {
    let cmd: Vec<String> = deploy.cmd.iter().filter(|s| !s.is_empty()).cloned().collect();
    if !cmd.is_empty() {
        return cmd;
    }
    let mut args = image.config.entrypoint.clone().unwrap_or_default();
    args.extend(image.config.cmd.clone().unwrap_or_default());
    args
}

/// The environment: image `Env`, then `HOSTNAME`, then the deployment's `environment`; a later entry replaces an
/// earlier one with the same key, and the first occurrence keeps its position.
pub fn environment(
    image: &ImageConfig,
    deploy: &DeployCommand,
    hostname: &str,
) -> Result<Vec<String>, SpecError> {
    let mut order: Vec<String> = Vec::new();
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |entry: &str, strict: bool| -> Result<(), SpecError> {
        let (key, value) = match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() => (k, v),
            _ if strict => {
                return Err(SpecError::Environment {
                    entry: entry.to_owned(),
                });
            }
            // An image with a malformed entry still runs; the entry is dropped.
            _ => return Ok(()),
        };
        if values.insert(key.to_owned(), value.to_owned()).is_none() {
            order.push(key.to_owned());
        }
        Ok(())
    };
    let image_env = image.config.env.clone().unwrap_or_default();
    if !image_env.iter().any(|e| e.starts_with("PATH=")) {
        put(DEFAULT_PATH, false)?;
    }
    for entry in &image_env {
        put(entry, false)?;
    }
    put(&format!("HOSTNAME={hostname}"), false)?;
    for entry in &deploy.environment {
        put(entry, true)?;
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = values.get(&k).cloned().unwrap_or_default();
            format!("{k}={v}")
        })
        .collect())
}

/// `uid`/`gid` from the image's `User`.
pub fn user(image: &ImageConfig, image_ref: &str) -> Result<(u32, u32), SpecError> {
    let text = image.config.user.clone().unwrap_or_default();
    let text = text.trim();
    if text.is_empty() || text == "root" || text == "root:root" {
        return Ok((0, 0));
    }
    let (u, g) = text.split_once(':').unwrap_or((text, ""));
    let name_error = || SpecError::UserName {
        image: image_ref.to_owned(),
        user: text.to_owned(),
    };
    let uid: u32 = u.parse().map_err(|_| name_error())?;
    let gid: u32 = if g.is_empty() || g == "root" {
        if g.is_empty() { uid } else { 0 }
    } else {
        g.parse().map_err(|_| name_error())?
    };
    Ok((uid, gid))
}

/// The cgroup resources for the deployment's `memory` (MiB) and `vcpus`; zero means "no limit".
pub fn resources(deploy: &DeployCommand) -> Value {
    let mut resources = json!({
        // Deny every device, then allow the usual ones (runc adds the standard char devices itself).
        "devices": [{"allow": false, "access": "rwm"}],
    });
    if deploy.memory > 0 {
        let bytes = u64::try_from(deploy.memory)
            .unwrap_or(0)
            .saturating_mul(1024 * 1024);
        resources["memory"] = json!({"limit": bytes});
    }
    if deploy.vcpus > 0 {
        let quota = u64::try_from(deploy.vcpus)
            .unwrap_or(0)
            .saturating_mul(CPU_PERIOD_US);
        resources["cpu"] = json!({"quota": quota, "period": CPU_PERIOD_US});
    }
    resources
}

/// Capabilities a default (unprivileged) container gets: the Docker/containerd default set.
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The whole runtime spec (OCI runtime-spec 1.0.2, as containerd 1.6 and runc 1.1 expect it).
pub fn build(image: &ImageConfig, deploy: &DeployCommand, opts: &SpecOptions) -> Result<Value, SpecError> {
    let args = process_args(image, deploy);
    if args.is_empty() {
        return Err(SpecError::NoCommand {
            image: deploy.image.clone(),
        });
    }
    let env = environment(image, deploy, &opts.hostname)?;
    let (uid, gid) = user(image, &deploy.image)?;
    let cwd = image
        .config
        .working_dir
        .clone()
        .filter(|d| d.starts_with('/'))
        .unwrap_or_else(|| "/".to_owned());
    let mut resources = resources(deploy);
    let mut devices = Vec::new();
    if deploy.privileged {
        // As the reference: `privileged` grants FUSE, nothing more.
        devices.push(json!({"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 438, "uid": 0, "gid": 0}));
        if let Some(list) = resources["devices"].as_array_mut() {
            list.push(json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"}));
        }
    }
    let ro_bind = |src: &str, dst: &str| json!({"destination": dst, "type": "bind", "source": src, "options": ["rbind", "ro", "nosuid", "nodev"]});
    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd,
            "capabilities": {
                "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true,
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": opts.hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
            ro_bind(&opts.hosts_file, "/etc/hosts"),
            ro_bind(&opts.resolv_conf, "/etc/resolv.conf"),
            ro_bind(&opts.hostname_file, "/etc/hostname"),
        ],
        "linux": {
            "cgroupsPath": opts.cgroups_path,
            "resources": resources,
            "devices": devices,
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"},
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    }))
}

/// The chain ids of an image's layers (the snapshot names containerd unpacks them under): the first is the first
/// diff id; each next one is `sha256(<previous chain id> + " " + <diff id>)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(parent) => {
                let digest = Sha256::digest(format!("{parent} {diff}").as_bytes());
                format!("sha256:{}", oakestra_runtime::hex::encode(&digest))
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entry: Option<&[&str]>, cmd: Option<&[&str]>, env: &[&str], user: Option<&str>) -> ImageConfig {
        let v = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        ImageConfig {
            config: ImageRunConfig {
                user: user.map(str::to_owned),
                env: Some(v(env)),
                entrypoint: entry.map(v),
                cmd: cmd.map(v),
                working_dir: None,
            },
            rootfs: RootFs::default(),
        }
    }

    fn deploy(cmd: &[&str], env: &[&str]) -> DeployCommand {
        DeployCommand {
            image: "docker.io/library/x:latest".into(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            environment: env.iter().map(|s| (*s).to_owned()).collect(),
            ..DeployCommand::default()
        }
    }

    fn opts() -> SpecOptions {
        SpecOptions {
            hostname: "instance-3".into(),
            cgroups_path: "/oakestra/a.b.c.d.instance.3".into(),
            hosts_file: "/s/hosts".into(),
            resolv_conf: "/s/resolv.conf".into(),
            hostname_file: "/s/hostname".into(),
        }
    }

    #[test]
    fn cmd_replaces_entrypoint_and_cmd() {
        let img = image(Some(&["/entry"]), Some(&["a", "b"]), &[], None);
        assert_eq!(process_args(&img, &deploy(&[], &[])), ["/entry", "a", "b"]);
        assert_eq!(
            process_args(&img, &deploy(&["sh", "-c", "x"], &[])),
            ["sh", "-c", "x"]
        );
        assert_eq!(process_args(&img, &deploy(&[""], &[])), ["/entry", "a", "b"]);
        let none = image(None, None, &[], None);
        assert!(matches!(
            build(&none, &deploy(&[], &[]), &opts()),
            Err(SpecError::NoCommand { .. })
        ));
    }

    #[test]
    fn environment_merges_by_key() {
        let img = image(None, Some(&["sh"]), &["PATH=/bin", "A=1", "B=2", "junk"], None);
        let env = environment(&img, &deploy(&[], &["B=3", "C=4", "HOSTNAME=mine"]), "instance-0").unwrap();
        assert_eq!(env, ["PATH=/bin", "A=1", "B=3", "HOSTNAME=mine", "C=4"]);
        let no_path = image(None, Some(&["sh"]), &[], None);
        let env = environment(&no_path, &deploy(&[], &[]), "instance-1").unwrap();
        assert_eq!(env, [DEFAULT_PATH, "HOSTNAME=instance-1"]);
        let err = environment(&img, &deploy(&[], &["=x"]), "h").unwrap_err();
        assert_eq!(err, SpecError::Environment { entry: "=x".into() });
        assert!(err.to_string().contains("\"=x\""));
    }

    #[test]
    fn users() {
        let u = |s: Option<&str>| user(&image(None, None, &[], s), "img");
        assert_eq!(u(None), Ok((0, 0)));
        assert_eq!(u(Some("root")), Ok((0, 0)));
        assert_eq!(u(Some("1000")), Ok((1000, 1000)));
        assert_eq!(u(Some("1000:5")), Ok((1000, 5)));
        assert_eq!(u(Some("1000:root")), Ok((1000, 0)));
        assert!(matches!(u(Some("nginx")), Err(SpecError::UserName { .. })));
    }

    #[test]
    fn limits_become_cgroup_resources() {
        let mut d = deploy(&[], &[]);
        assert!(resources(&d).get("memory").is_none());
        assert!(resources(&d).get("cpu").is_none());
        d.memory = 32;
        d.vcpus = 2;
        let r = resources(&d);
        assert_eq!(r["memory"]["limit"], 32 * 1024 * 1024);
        assert_eq!(r["cpu"], json!({"quota": 200_000, "period": 100_000}));
        d.memory = -5;
        assert!(resources(&d).get("memory").is_none());
    }

    #[test]
    fn whole_spec() {
        let img = image(None, Some(&["sh"]), &[], None);
        let mut d = deploy(&[], &["X=1"]);
        d.privileged = true;
        let s = build(&img, &d, &opts()).unwrap();
        assert_eq!(s["hostname"], "instance-3");
        assert_eq!(s["process"]["args"], json!(["sh"]));
        assert_eq!(s["process"]["cwd"], "/");
        assert_eq!(s["linux"]["cgroupsPath"], "/oakestra/a.b.c.d.instance.3");
        assert_eq!(s["linux"]["devices"][0]["path"], "/dev/fuse");
        let mounts = s["mounts"].as_array().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["destination"] == "/etc/resolv.conf" && m["source"] == "/s/resolv.conf")
        );
        assert!(s["process"]["env"].as_array().unwrap().contains(&json!("X=1")));
    }

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = "sha256:aaaa".to_owned();
        let b = "sha256:bbbb".to_owned();
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        use sha2::{Digest, Sha256};
        let expect = format!(
            "sha256:{}",
            oakestra_runtime::hex::encode(&Sha256::digest(b"sha256:aaaa sha256:bbbb"))
        );
        assert_eq!(ids[1], expect);
        assert!(chain_ids(&[]).is_empty());
    }
}
