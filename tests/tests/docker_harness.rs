//! Self-test of the docker harness (`oakestra_tests::docker`): dockerd and a registry in a netns of the test's,
//! both sample addon images loaded, pushed to 127.0.0.1:5000, removed and pulled back, then run: the extension's
//! page is served on its published port, the scheduler plugin answers `GET /status` and exits 0 on `docker stop`.
//! Nothing outlives the test, and the host's network namespace is unchanged.

#![allow(clippy::unwrap_used, clippy::print_stderr, reason = "tests")]

use std::time::{Duration, Instant};

use oakestra_tests::{
    docker::{Dockerd, HELLO_IMAGE, REGISTRY_HOST, Registry, SCHEDULER_IMAGE, addon_images},
    netns::{HostSnapshot, Netns, require_root},
};

/// Removes the test's directory however the test ends.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fetches `url` with busybox wget inside `ns` until it answers (or panics after `secs`); returns the body.
fn fetch(ns: &Netns, url: &str, secs: u64, dockerd: &Dockerd, container: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        // This busybox's wget has no -T: `timeout` bounds each try.
        let out = ns.run(&["timeout", "5", "busybox", "wget", "-q", "-O", "-", url]);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if Instant::now() > deadline {
            let logs = dockerd.cli().args(["logs", container]).output().unwrap();
            panic!(
                "{url} did not answer within {secs} s ({}): {}{}\ncontainer log:\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn dockerd_registry_and_the_addon_images() {
    require_root();
    let started = Instant::now();
    let host = HostSnapshot::take();
    let ns = Netns::new("oak-dkh");
    let temp = TempDir(std::env::temp_dir().join(format!("oak-dkh-{}", std::process::id())));
    let dir = temp.0.clone();
    let (hello, scheduler) = addon_images();
    eprintln!("images ready after {:?}", started.elapsed());
    {
        let dockerd = Dockerd::start(ns.name(), &dir.join("docker"));
        let registry = Registry::start(ns.name(), &dir.join("registry"));
        eprintln!("dockerd and registry up after {:?}", started.elapsed());
        assert_eq!(registry.host(), REGISTRY_HOST);

        for (tar, image) in [(&hello, HELLO_IMAGE), (&scheduler, SCHEDULER_IMAGE)] {
            dockerd.load(tar);
            assert!(
                dockerd.has_image(image),
                "{image} not loaded from {}",
                tar.display()
            );
            registry.push(&dockerd, image);
            dockerd.docker(&["rmi", image]);
            assert!(!dockerd.has_image(image), "{image} still present after rmi");
            dockerd.docker(&["pull", image]);
            assert!(
                dockerd.has_image(image),
                "{image} not pulled back from {REGISTRY_HOST}"
            );
        }
        eprintln!("images pushed and pulled back after {:?}", started.elapsed());

        dockerd.docker(&[
            "run",
            "-d",
            "--name",
            "hello",
            "-p",
            "127.0.0.1:18080:8080",
            HELLO_IMAGE,
        ]);
        let page = fetch(&ns, "http://127.0.0.1:18080/", 30, &dockerd, "hello");
        assert!(page.contains("hello from an oakestra-rs extension"), "{page}");

        dockerd.docker(&[
            "run",
            "-d",
            "--name",
            "scheduler",
            "-e",
            "API_PORT=10004",
            "-p",
            "127.0.0.1:10004:10004",
            SCHEDULER_IMAGE,
        ]);
        let status = fetch(&ns, "http://127.0.0.1:10004/status", 30, &dockerd, "scheduler");
        assert_eq!(status.trim(), "ok");
        // `docker stop` sends SIGTERM: the plugin (PID 1 in its container) exits 0 at once.
        dockerd.docker(&["stop", "-t", "10", "scheduler"]);
        let code = dockerd.docker(&["inspect", "-f", "{{.State.ExitCode}}", "scheduler"]);
        assert_eq!(code.trim(), "0", "the scheduler's exit code after SIGTERM");
        eprintln!("containers checked after {:?}", started.elapsed());
    }
    // The drops stopped dockerd and the registry: nothing of theirs is mounted or left on disk.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir_text = dir.display().to_string();
    assert!(
        !mounts
            .lines()
            .any(|l| l.contains(&dir_text) || l.contains(&format!("/run/oakdk-{}-", std::process::id()))),
        "mounts left behind:\n{mounts}"
    );
    assert!(!dir.join("docker").exists() && !dir.join("registry").exists());
    drop(temp);
    drop(ns);
    assert!(!std::path::Path::new("/run/netns/oak-dkh").exists());
    // docker0, its NAT rules and the published ports lived in the test's netns only.
    host.assert_unchanged(&HostSnapshot::take());
    eprintln!("done after {:?}", started.elapsed());
}
