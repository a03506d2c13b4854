//! `scripts/install-worker.sh` installs into a scratch directory (`--root`, `--no-apt`, stand-in binaries through
//! `--bin-dir`): binaries, `/bin` links, systemd units and default configs land where the reference puts them; a
//! second run changes nothing and keeps a user's edits; `--uninstall` removes what it installed and keeps configs
//! until `--purge`. Nothing here touches the real system: the script refuses apt and systemctl under `--root`.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
    time::SystemTime,
};

use oakestra_tests::procs;
use serde_json::Value;

fn script() -> PathBuf {
    procs::workspace_root().join("scripts/install-worker.sh")
}

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "oakestra-install-worker-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A `--bin-dir` with two small executable stand-ins for the real binaries (mode 0700: the install sets 0755).
    fn bin_dir(&self) -> PathBuf {
        let dir = self.0.join("bin-in");
        fs::create_dir_all(&dir).unwrap();
        for name in ["NodeEngine", "NetManager"] {
            let path = dir.join(name);
            fs::write(&path, format!("#!/bin/sh\necho {name} stand-in\n")).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700)).unwrap();
        }
        dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs the script with `args` (and `env`), returning its output.
fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs the script, asserting it succeeds; returns stdout + stderr.
fn run_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run(args, env);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "install-worker.sh {args:?} failed:\n{text}");
    text
}

/// Runs the script, asserting it fails; returns stderr.
fn run_err(args: &[&str]) -> String {
    let out = run(args, &[]);
    assert!(
        !out.status.success(),
        "install-worker.sh {args:?} should fail: {out:?}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Everything under `root`: kind, mode, mtime and contents (or link target) of each entry.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (String, u32, SystemTime, Vec<u8>)> {
    let mut all = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        let (kind, body) = if meta.is_symlink() {
            let target = fs::read_link(&path).unwrap();
            ("link", target.into_os_string().into_encoded_bytes())
        } else if meta.is_dir() {
            for entry in fs::read_dir(&path).unwrap() {
                todo.push(entry.unwrap().path());
            }
            ("dir", Vec::new())
        } else {
            ("file", fs::read(&path).unwrap())
        };
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        all.insert(
            rel,
            (
                kind.to_owned(),
                meta.permissions().mode() & 0o7777,
                meta.modified().unwrap(),
                body,
            ),
        );
    }
    all
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

/// The `[Section]`-less `Key=value` lines of a unit file, in order.
fn unit_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .map(str::to_owned)
        .collect()
}

#[test]
fn script_is_valid_bash_and_shellcheck_clean() {
    let out = Command::new("bash").arg("-n").arg(script()).output().unwrap();
    assert!(out.status.success(), "bash -n: {out:?}");
    let meta = fs::metadata(script()).unwrap();
    assert!(
        meta.permissions().mode() & 0o111 != 0,
        "the script is not executable"
    );
    match Command::new("shellcheck").arg(script()).output() {
        Ok(out) => assert!(
            out.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&out.stdout)
        ),
        Err(e) => {
            eprintln!("shellcheck not run ({e}); install it (apt-get install shellcheck) to lint the script")
        }
    }
}

#[test]
fn help_names_every_option() {
    let help = run_ok(&["--help"], &[]);
    for option in [
        "Usage:",
        "--cluster ",
        "--cluster-port",
        "--join-token",
        "--bin-dir",
        "--no-apt",
        "--start",
        "--root",
        "--uninstall",
        "--purge",
    ] {
        assert!(help.contains(option), "--help does not mention {option}:\n{help}");
    }
}

#[test]
fn install_twice_then_uninstall_then_purge() {
    let scratch = Scratch::new("main");
    let bin_dir = scratch.bin_dir();
    let root = scratch.0.join("root");
    let (root_s, bin_s) = (root.to_str().unwrap(), bin_dir.to_str().unwrap());
    let args = [
        "--root",
        root_s,
        "--no-apt",
        "--bin-dir",
        bin_s,
        "--cluster",
        "10.0.0.9",
        "--join-token",
        "worker-join-token-for-the-test",
    ];

    let first = run_ok(&args, &[]);
    // The join token is a secret: root-only, where the NodeEngine looks by default.
    let token = root.join("etc/oakestra/join.token");
    assert_eq!(
        fs::read_to_string(&token).unwrap(),
        "worker-join-token-for-the-test\n"
    );
    assert_eq!(mode(&token), 0o600);
    assert!(
        !first.contains("unchanged"),
        "a fresh install changed everything:\n{first}"
    );

    // Binaries: copies of the inputs at 0755, linked from /bin as the reference has them.
    for name in ["NodeEngine", "NetManager"] {
        let installed = root.join("usr/local/bin").join(name);
        assert_eq!(
            fs::read(&installed).unwrap(),
            fs::read(bin_dir.join(name)).unwrap()
        );
        assert_eq!(mode(&installed), 0o755, "{name}");
        let link = root.join("bin").join(name);
        assert!(fs::symlink_metadata(&link).unwrap().is_symlink(), "{name}");
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new("/usr/local/bin").join(name)
        );
    }

    // Units.
    let units = root.join("etc/systemd/system");
    let ne = unit_lines(&units.join("nodeengine.service"));
    let nm = unit_lines(&units.join("netmanager.service"));
    // The NodeEngine comes back within the cluster's 3 s lost grace, so a crash does not move its instances.
    for (unit, exec, restart_sec) in [
        (&ne, "ExecStart=/usr/local/bin/NodeEngine run", "RestartSec=1"),
        (
            &nm,
            "ExecStart=/usr/local/bin/NetManager --config /etc/netmanager/netcfg.json",
            "RestartSec=5",
        ),
    ] {
        for line in [
            exec,
            restart_sec,
            "Type=simple",
            "User=root",
            "Restart=always",
            "KillMode=mixed",
            "TimeoutStopSec=15",
            "WantedBy=multi-user.target",
        ] {
            assert!(unit.iter().any(|l| l == line), "{line:?} missing in {unit:?}");
        }
        assert!(
            !unit
                .iter()
                .any(|l| l.starts_with("StandardOutput") || l.starts_with("StandardError")),
            "logs go to the journal: {unit:?}"
        );
    }
    assert!(nm.iter().any(|l| l == "Before=nodeengine.service"), "{nm:?}");
    assert!(
        ne.iter()
            .any(|l| l == "After=network-online.target containerd.service netmanager.service"),
        "{ne:?}"
    );
    assert!(ne.iter().any(|l| l == "Wants=containerd.service"), "{ne:?}");
    assert_eq!(mode(&units.join("nodeengine.service")), 0o644);

    // Configs: the reference's keys, misspelt ones included, with the cluster from --cluster.
    let conf_path = root.join("etc/oakestra/conf.json");
    let conf = read_json(&conf_path);
    assert_eq!(conf["conf_version"], "1.0");
    assert_eq!(conf["cluster_address"], "10.0.0.9");
    assert_eq!(conf["cluster_port"], 10100);
    assert_eq!(conf["cluster_ssl"], false);
    assert_eq!(conf["app_logs"], "/var/log/oakestra/apps");
    assert_eq!(conf["overlay_network"], "default");
    assert_eq!(conf["public_ip"], false);
    assert_eq!(conf["overlay_network_port"], 0);
    assert_eq!(conf["mqtt_cert_file"], "");
    assert_eq!(conf["mqtt_key_file"], "");
    assert_eq!(conf["addons"], serde_json::json!([]));
    assert_eq!(conf["csi_drivers"], serde_json::json!([]));
    assert_eq!(
        conf["virtualizations"],
        serde_json::json!([{
            "virutalizaiton_name": "containerd",
            "virutalizaiton_runtime": "docker",
            "virutalizaiton_active": true,
            "virutalizaiton_config": []
        }])
    );
    let netcfg_path = root.join("etc/netmanager/netcfg.json");
    assert_eq!(
        read_json(&netcfg_path),
        serde_json::json!({"NodePublicAddress": "0.0.0.0", "NodePublicPort": "50103",
                           "ClusterUrl": "10.0.0.9", "ClusterMqttPort": "10003"})
    );
    assert!(root.join("var/log/oakestra/apps").is_dir());

    // A second run changes nothing, not even an mtime, and says so.
    let before = snapshot(&root);
    let second = run_ok(&args, &[]);
    assert_eq!(before, snapshot(&root), "the second run changed files:\n{second}");
    assert!(second.contains("unchanged"), "{second}");
    for word in ["wrote", "updated", "linked", "created"] {
        assert!(
            !second.lines().any(|l| l.trim_start().starts_with(word)),
            "second run reports {word:?}:\n{second}"
        );
    }

    // A user's edit survives a reinstall.
    let mut edited = conf.clone();
    edited["app_logs"] = "/srv/oakestra-apps".into();
    fs::write(&conf_path, serde_json::to_string(&edited).unwrap()).unwrap();
    let before = snapshot(&root);
    run_ok(&args, &[]);
    assert_eq!(
        before,
        snapshot(&root),
        "a reinstall rewrote the user's conf.json"
    );
    assert_eq!(read_json(&conf_path)["app_logs"], "/srv/oakestra-apps");

    // Uninstall: units, binaries and links go, configs and logs stay; twice is fine.
    for _ in 0..2 {
        run_ok(&["--uninstall", "--root", root_s], &[]);
        for gone in [
            "etc/systemd/system/nodeengine.service",
            "etc/systemd/system/netmanager.service",
            "usr/local/bin/NodeEngine",
            "usr/local/bin/NetManager",
            "bin/NodeEngine",
            "bin/NetManager",
        ] {
            assert!(
                fs::symlink_metadata(root.join(gone)).is_err(),
                "{gone} still there"
            );
        }
        assert_eq!(read_json(&conf_path)["app_logs"], "/srv/oakestra-apps");
        assert!(netcfg_path.is_file());
        assert!(root.join("var/log/oakestra/apps").is_dir());
    }

    // Purge: configs and logs go too; again twice.
    for _ in 0..2 {
        run_ok(&["--uninstall", "--purge", "--root", root_s], &[]);
        for gone in ["etc/oakestra", "etc/netmanager", "var/log/oakestra"] {
            assert!(
                fs::symlink_metadata(root.join(gone)).is_err(),
                "{gone} still there"
            );
        }
    }
}

/// Whether `tool` can run here (`python3` may be a shim without an interpreter behind it).
fn available(tool: &str) -> bool {
    let probe: &[&str] = if tool == "python3" {
        &["-c", "import json"]
    } else {
        &["--version"]
    };
    Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn an_existing_config_gets_only_the_cluster_keys() {
    for tool in ["python3", "jq", "none"] {
        if tool != "none" && !available(tool) {
            eprintln!("{tool} not installed: its config-editing path is not tested");
            continue;
        }
        let scratch = Scratch::new(tool);
        let bin_dir = scratch.bin_dir();
        let root = scratch.0.join("root");
        let (root_s, bin_s) = (root.to_str().unwrap(), bin_dir.to_str().unwrap());
        let env = [("INSTALL_WORKER_JSON_TOOL", tool)];
        run_ok(
            &["--root", root_s, "--bin-dir", bin_s, "--cluster", "10.0.0.9"],
            &env,
        );

        // The user's file: compact, an edited key and a key the script does not know.
        let conf_path = root.join("etc/oakestra/conf.json");
        let mut conf = read_json(&conf_path);
        conf["app_logs"] = "/srv/apps".into();
        conf["carbon_aware"] = serde_json::json!({"region": "eu"});
        fs::write(&conf_path, serde_json::to_string(&conf).unwrap()).unwrap();
        fs::set_permissions(&conf_path, fs::Permissions::from_mode(0o600)).unwrap();

        let args = [
            "--root",
            root_s,
            "--bin-dir",
            bin_s,
            "--cluster",
            "cluster.example",
            "--cluster-port",
            "10200",
        ];
        let out = run_ok(&args, &env);
        let after = read_json(&conf_path);
        let netcfg = read_json(&root.join("etc/netmanager/netcfg.json"));
        if tool == "none" {
            // Nothing can edit JSON: the file stays as it was and the script says what to set.
            assert_eq!(after, conf, "{out}");
            assert!(out.contains(r#""cluster_address": "cluster.example""#), "{out}");
            assert!(out.contains(r#""cluster_port": 10200"#), "{out}");
            assert_eq!(netcfg["ClusterUrl"], "10.0.0.9");
            continue;
        }
        let mut expected = conf.clone();
        expected["cluster_address"] = "cluster.example".into();
        expected["cluster_port"] = 10200.into();
        assert_eq!(after, expected, "{tool}: {out}");
        assert_eq!(mode(&conf_path), 0o600, "{tool}: the file's mode was not kept");
        assert_eq!(netcfg["ClusterUrl"], "cluster.example", "{tool}");
        assert_eq!(netcfg["ClusterMqttPort"], "10003", "{tool}");

        // The same options again: the values are already there, nothing is rewritten.
        let before = snapshot(&root);
        run_ok(&args, &env);
        assert_eq!(
            before,
            snapshot(&root),
            "{tool}: rewrote a config that had the values"
        );
    }
}

#[test]
fn uninstall_leaves_a_foreign_bin_file_alone() {
    let scratch = Scratch::new("foreign");
    let root = scratch.0.join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::write(root.join("bin/NodeEngine"), "the reference's binary").unwrap();
    run_ok(&["--uninstall", "--root", root.to_str().unwrap()], &[]);
    assert_eq!(
        fs::read_to_string(root.join("bin/NodeEngine")).unwrap(),
        "the reference's binary"
    );
}

#[test]
fn bad_options_are_refused_before_anything_is_written() {
    let scratch = Scratch::new("bad");
    let root = scratch.0.join("root");
    let root_s = root.to_str().unwrap();
    let empty = scratch.0.join("empty");
    fs::create_dir_all(&empty).unwrap();
    for (args, says) in [
        (vec!["--root", "/", "--no-apt"], "--root /"),
        (vec!["--root", root_s, "--start"], "--start"),
        (vec!["--root", root_s, "--purge"], "--purge"),
        (vec!["--root", root_s, "--cluster-port", "70000"], "70000"),
        (vec!["--root", root_s, "--cluster", "a\"b"], "a\"b"),
        (vec!["--root", root_s, "--frobnicate"], "--frobnicate"),
        (
            vec!["--root", root_s, "--bin-dir", empty.to_str().unwrap()],
            "NodeEngine is missing",
        ),
    ] {
        let stderr = run_err(&args);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(!root.exists(), "a refused run wrote into {root_s}");
}
