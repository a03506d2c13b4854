//! Oakestra's own CLI against our 1-DOC: `oak-cli` 0.5.5 from PyPI, installed into a virtualenv of the test's own,
//! always logs in as Admin/Admin on port 10000, so the 1-DOC runs with the documented switch
//! `OAK_ADMIN_PASSWORD=Admin` (in a network namespace of the test's own). With it: create an application from an SLA
//! file and deploy its services (`oak a c -d`), list applications, services (until both run) and clusters, delete
//! the application; then `1doc.sh down` and the host's namespace is unchanged.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use oakestra_tests::{
    netns::{HostSnapshot, Netns, require_root},
    procs::{binary, workspace_root},
};

/// The oak-cli release the test installs.
const OAK_CLI: &str = "oak-cli==0.5.5";

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `scripts/1doc.sh <cmd>` in `ns`, with Admin's password set to `Admin` and without unikernels.
fn onedoc(ns: &Netns, home: &Path, cmd: &str) -> Output {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(workspace_root().join("scripts/1doc.sh"))
        .arg(cmd)
        .env("OAK_HOME", home)
        .env("OAK_CONTAINERD", home.join("containerd.sock"))
        .env("OAK_NO_INSTALL", "1")
        .env("OAK_NO_UNIKERNEL", "1")
        .env("OAK_ADMIN_PASSWORD", "Admin")
        .env("OAK_BIN_DIR", binary("root-service").parent().unwrap())
        .output()
        .unwrap()
}

/// Stops the 1-DOC whatever happens to the test.
struct Down<'a>(&'a Netns, PathBuf);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = onedoc(self.0, &self.1, "down");
    }
}

/// `oak <args>` in `ns` with its own HOME (its config and SLA folder), a wide terminal for its tables, and `input`
/// on stdin.
fn oak(ns: &Netns, venv: &Path, home: &Path, args: &[&str], input: &str) -> Output {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg("--")
        .arg(venv.join("bin/oak"))
        .args(args)
        .env("HOME", home)
        .env("COLUMNS", "240")
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `oak args` until its output contains every one of `want` (120 s at most).
fn oak_until(ns: &Netns, venv: &Path, home: &Path, args: &[&str], want: &[&str], logs: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = text(&oak(ns, venv, home, args, ""));
        if want.iter().all(|w| out.contains(w)) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "`oak {}` never showed {want:?}; last:\n{out}\nlogs in {}",
            args.join(" "),
            logs.display()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn oak_cli_manages_applications_on_the_one_doc() {
    require_root();
    let host_before = HostSnapshot::take();
    let work = std::env::temp_dir().join(format!("oakestra-oakcli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    // oak-cli from PyPI into a virtualenv of our own (the package registry is the only network used).
    let venv = work.join("venv");
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "python3 -m venv (Debian: python3-venv): {}",
        text(&made)
    );
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", OAK_CLI])
        .output()
        .unwrap();
    assert!(pip.status.success(), "pip install {OAK_CLI}: {}", text(&pip));

    // Its configuration: this machine runs everything, the root orchestrator is on 127.0.0.1 (port 10000 is
    // built in), and the SLA to create is the seed's clientsrvr with the local images.
    let home = work.join("home");
    let cli_dir = home.join("oak_cli");
    std::fs::create_dir_all(cli_dir.join("SLAs")).unwrap();
    std::fs::write(
        cli_dir.join(".oak_cli_config"),
        "[OAK_CLI]\nconfig_version = 1\nlocal_machine_purpose = [\"everything\"]\nsystem_manager_ip = 127.0.0.1\n",
    )
    .unwrap();
    std::fs::copy(
        workspace_root().join("examples/clientsrvr-local.json"),
        cli_dir.join("SLAs/clientsrvr-local.json"),
    )
    .unwrap();

    let ns = Netns::new("oakcli");
    let onedoc_home = work.join("1doc");
    let up = onedoc(&ns, &onedoc_home, "up");
    let _down = Down(&ns, onedoc_home.clone());
    let up_text = text(&up);
    assert!(up.status.success(), "1doc.sh up failed:\n{up_text}");
    assert!(
        up_text.contains("WARNING: OAK_ADMIN_PASSWORD=Admin"),
        "the switch is loud: {up_text}"
    );
    let logs = onedoc_home.join("logs");

    let created = oak(
        &ns,
        &venv,
        &home,
        &["a", "c", "--sla-file-name", "clientsrvr-local", "-d"],
        "",
    );
    let created_text = text(&created);
    assert!(created.status.success(), "oak a c: {created_text}");
    assert!(
        created_text.contains("Success: 'Create new application"),
        "{created_text}"
    );
    assert_eq!(
        created_text.matches("Success: 'Deploy a new instance").count(),
        2,
        "{created_text}"
    );

    let apps = oak_until(&ns, &venv, &home, &["a", "s"], &["clientsrvr"], &logs);
    println!("oak a s:\n{apps}");
    let services = oak_until(&ns, &venv, &home, &["s", "s"], &["curl", "nginx"], &logs);
    println!("oak s s:\n{services}");
    // The nginx server runs for good (the curl client runs, exits and is started again).
    let running = oak_until(&ns, &venv, &home, &["s", "s"], &["RUNNING"], &logs);
    println!("oak s s, running:\n{running}");
    let clusters = oak_until(&ns, &venv, &home, &["cl", "ls"], &["1doc"], &logs);
    println!("oak cl ls:\n{clusters}");
    assert!(clusters.contains("1-DOC"), "the cluster's location: {clusters}");

    let deleted = oak(&ns, &venv, &home, &["a", "d"], "y\n");
    let deleted_text = text(&deleted);
    assert!(
        deleted_text.contains("Success: 'Delete application"),
        "{deleted_text}"
    );
    oak_until(
        &ns,
        &venv,
        &home,
        &["a", "s"],
        &["No applications exist yet"],
        &logs,
    );

    let down = onedoc(&ns, &onedoc_home, "down");
    assert!(down.status.success(), "{}", text(&down));
    drop(_down);
    drop(ns);
    host_before.assert_unchanged(&HostSnapshot::take());
    let _ = std::fs::remove_dir_all(&work);
}
