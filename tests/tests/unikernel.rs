//! Unikernels end to end on the overlay testbed (root), with real QEMU guests (TCG here: `/dev/kvm` of these
//! machines cannot run stock guests, which the NodeEngine's KVM probe finds out by itself).
//!
//! Two workers, the first on the eBPF dataplane, the second on the TUN one, both NodeEngines with `-u=true`. The
//! test guest of `scripts/images/unikernel.sh` (a Debian kernel and a busybox initramfs in the reference tarball
//! layout) is served over HTTP from the LAN namespace and deployed through root's API on worker 1: it is RUNNING,
//! its boot shows in the instance logs, a container on worker 2 fetches its page (with the 9p-shared file) through
//! its `rr_ip` and `rr_ip_v6`, and a host port mapping reaches it. A one-shot guest fetches a container's service IP
//! and completes. Worker 1's NodeEngine restarts and adopts the running guest; worker 1's NetManager restarts, so the
//! guest is started again in a new QEMU and the container next to it attached again, both reachable as before.
//! Undeploying the guest leaves no QEMU, tap, namespace or cache lock. A broken tarball ends FAILED with the reason, a 404 too, and nothing of either stays.
#![allow(clippy::unwrap_used, reason = "test code: a panic is the clearest failure")]
#![allow(clippy::print_stderr, reason = "the test reports the boot times it saw")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oakestra_tests::{
    harness::{eventually, free_port},
    incontainer::{nsenter, tasks},
    overlaybed::OverlayBed,
    procs::workspace_root,
    stack::{Stack, call},
};
use serde_json::{Value, json};

const RR_V4: &str = "10.30.77.77";
const RR_V6: &str = "fdff:2000::77";
const CTR_RR: &str = "10.30.78.78";
const HOST_PORT: u16 = 8089;

/// A child process killed on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills every QEMU and removes every named namespace of this test's instances on drop: a failed run must not
/// leave guests behind (NodeEngines leave their instances running when they stop).
struct GuestSweeper(&'static [&'static str]);

impl Drop for GuestSweeper {
    fn drop(&mut self) {
        for app in self.0 {
            let _ = Command::new("pkill")
                .args(["-KILL", "-f", &format!("qemu-system.*{app}\\.test\\.")])
                .status();
        }
        for entry in std::fs::read_dir("/var/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.0.iter().any(|app| name.starts_with(&format!("{app}.test."))) {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }
}

/// Builds the test guest (cached after the first build) into `dir`; returns the tarball's path.
fn build_guest(dir: &Path) -> PathBuf {
    let script = workspace_root().join("scripts/images/unikernel.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--out")
        .arg(dir)
        .output()
        .expect("run scripts/images/unikernel.sh");
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tarball = dir.join("oakestra-guest-amd64.tar.gz");
    assert!(tarball.is_file(), "{} was not built", tarball.display());
    tarball
}

/// The one instance of `job` root lists, once its status is `status`.
async fn instance_in(stack: &Stack, job: &str, status: &str) -> Option<Value> {
    stack
        .instances(job)
        .await
        .into_iter()
        .find(|i| i["status"] == json!(status))
}

/// QEMU processes whose command line names `task`.
fn qemus_of(task: &str) -> Vec<u32> {
    oakestra_tests::procs::qemus_with(&format!("{task},debug-threads=on"))
}

/// `curl` of `url` inside the network namespace of process `pid`; the body, or `None`. (Not busybox wget: its
/// `-q` mode crashes in Debian 12's busybox-static.)
fn fetch_in(pid: u32, url: &str) -> Option<String> {
    let out = nsenter(pid, &["curl", "-sf", "-m", "3", url]).output().unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The service document of `job` at root.
async fn service(stack: &Stack, job: &str) -> Value {
    let url = format!("{}/api/service/{job}", stack.root_url);
    call("GET", &url, Some(&stack.token), None).await.body
}

#[tokio::test(flavor = "current_thread")]
async fn guests_run_through_the_public_api_on_both_dataplanes() {
    let images = std::env::temp_dir().join(format!("oakestra-guest-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&images);
    std::fs::create_dir_all(&images).unwrap();
    build_guest(&images);
    std::fs::write(
        images.join("broken.tar.gz"),
        b"<html>this is not a tarball</html>",
    )
    .unwrap();

    let _sweeper = GuestSweeper(&["ukg", "ukf", "ukb13", "ukb14"]);
    let mut bed = OverlayBed::start_with(
        "uk",
        &["ebpf", "tun"],
        &[],
        &["-u=true", "--unikernel-cache-keep", "0"],
    )
    .await;
    let names = [OverlayBed::name(0), OverlayBed::name(1)];
    // The images are served from the LAN namespace (this thread lives there now).
    let port = free_port();
    let _http = Reaped(
        Command::new("busybox")
            .args(["httpd", "-f", "-p", &format!("{}:{port}", bed.lan_ip), "-h"])
            .arg(&images)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lan_ip = bed.lan_ip.clone();
    let url = |file: &str| format!("http://{lan_ip}:{port}/{file}");
    bed.stack.wait_active_workers(2, 60, &bed.procs()).await;
    bed.assert_dataplanes();
    // Both workers offer unikernels and found out by themselves that KVM is no use here.
    let w1_state = bed.dir.join("w1-ne-state");
    let status_file: Value =
        serde_json::from_str(&std::fs::read_to_string(w1_state.join("status.json")).unwrap()).unwrap();
    assert_eq!(
        status_file["runtimes"],
        json!(["docker", "unikernel"]),
        "{status_file}"
    );
    let accel = status_file["unikernel_accelerator"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(accel.starts_with("tcg ("), "{accel}");
    assert_eq!(
        bed.engines[0].log().matches("unikernels run under TCG").count(),
        1,
        "one warning about TCG: {}",
        bed.engines[0].log()
    );

    // --- A guest server on worker 1 (eBPF), reachable by its service IPs and a host port.
    let guest = json!({"microservice_name": "guest", "virtualization": "unikernel", "code": url("oakestra-guest-amd64.tar.gz"),
        "arch": ["amd64"], "memory": 128, "vcpus": 1, "port": format!("{HOST_PORT}:80/tcp"),
        "addresses": {"rr_ip": RR_V4, "rr_ip_v6": RR_V6},
        "constraints": [{"type": "direct", "node": names[0]}]});
    let started = Instant::now();
    let guest_id = bed.stack.deploy("ukg", &guest).await;
    let running = eventually(180, "the guest RUNNING", &bed.procs(), || {
        instance_in(&bed.stack, &guest_id, "RUNNING")
    })
    .await;
    eprintln!(
        "guest deploy -> RUNNING (cold cache, TCG): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let task = "ukg.test.guest.test.instance.0";
    let qemu = qemus_of(task);
    assert_eq!(qemu.len(), 1, "one QEMU for the guest: {qemu:?}");
    assert!(
        running.to_string().contains(&names[0]) || running["host_ip"].is_string(),
        "{running}"
    );
    // Its namespace and tap (NetManager's), and the image locked in the cache.
    let netns = format!("/var/run/netns/{task}");
    assert!(Path::new(&netns).exists(), "{netns}");
    let cache = w1_state.join("unikernel/cache");
    let locks = |cache: &Path| -> Vec<String> {
        let mut out = Vec::new();
        for blob in std::fs::read_dir(cache.join("blobs"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for u in std::fs::read_dir(blob.path().join(".users"))
                .into_iter()
                .flatten()
                .flatten()
            {
                out.push(u.file_name().to_string_lossy().into_owned());
            }
        }
        out
    };
    assert_eq!(locks(&cache), [task]);

    // The boot is in the instance logs (the serial console), once the guest serves.
    let logs_url = format!("{}/api/service/{guest_id}/instance/0/logs", bed.stack.root_url);
    eventually(120, "the guest's boot in its logs", &bed.procs(), || async {
        let r = call("GET", &logs_url, Some(&bed.stack.token), None).await;
        r.body
            .to_string()
            .contains("oakestra-guest: serving http")
            .then_some(())
    })
    .await;

    // A container on worker 2 (TUN) fetches the guest's page through both service IPs.
    let cli = json!({"microservice_name": "cli", "memory": 32, "cmd": ["sleep", "3600"],
        "constraints": [{"type": "direct", "node": names[1]}]});
    let cli_id = bed.stack.deploy("ukc", &cli).await;
    eventually(90, "the client RUNNING", &bed.procs(), || {
        instance_in(&bed.stack, &cli_id, "RUNNING")
    })
    .await;
    let cli_pid = tasks(&bed.ctrd, &names[1])
        .into_iter()
        .find_map(|(t, pid)| t.starts_with("ukc.test.cli.test.instance.").then_some(pid))
        .expect("the client's container");
    for target in [format!("http://{RR_V4}/"), format!("http://[{RR_V6}]/")] {
        let page = eventually(
            60,
            &format!("the guest's page via {target}"),
            &bed.procs(),
            || async { fetch_in(cli_pid, &target) },
        )
        .await;
        assert!(
            page.contains("hello from the oakestra test guest"),
            "9p file in {page:?}"
        );
        assert!(
            page.contains("guest 10.18."),
            "the guest's own address in {page:?}"
        );
    }
    // The host port of worker 1 leads to the guest as well.
    let w1_addr = bed.tb.workers[0].addr.to_string();
    let page = eventually(30, "the guest through the host port", &bed.procs(), || async {
        let out = Command::new("curl")
            .args(["-sf", "-m", "3", &format!("http://{w1_addr}:{HOST_PORT}/")])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await;
    assert!(page.contains("guest 10.18."), "{page}");

    // --- A one-shot guest on worker 2 (TUN) reaches a container's service IP on worker 1, then powers off.
    let web = json!({"microservice_name": "web", "memory": 32,
        "cmd": ["sh", "-c", "mkdir -p /w && echo hi-from-ctr > /w/index.html && exec httpd -f -p 80 -h /w"],
        "addresses": {"rr_ip": CTR_RR}, "constraints": [{"type": "direct", "node": names[0]}]});
    let web_id = bed.stack.deploy("ukw", &web).await;
    eventually(90, "the web container RUNNING", &bed.procs(), || {
        instance_in(&bed.stack, &web_id, "RUNNING")
    })
    .await;
    let fetcher = json!({"microservice_name": "fetcher", "virtualization": "unikernel", "code": url("oakestra-guest-amd64.tar.gz"),
        "arch": ["amd64"], "memory": 128, "one_shot": true, "cmd": ["fetch", format!("http://{CTR_RR}/"), "90"],
        "constraints": [{"type": "direct", "node": names[1]}]});
    let fetcher_id = bed.stack.deploy("ukf", &fetcher).await;
    eventually(240, "the fetching guest COMPLETED", &bed.procs(), || {
        instance_in(&bed.stack, &fetcher_id, "COMPLETED")
    })
    .await;
    let f_log =
        std::fs::read_to_string(bed.dir.join("w2-apps/ukf.test.fetcher.test.instance.0")).unwrap_or_default();
    assert!(
        f_log.contains("oakestra-guest: fetched hi-from-ctr"),
        "the guest's console: {f_log}"
    );
    assert!(qemus_of("ukf.test.fetcher.test.instance.0").is_empty());

    // --- Worker 1's NodeEngine restarts: the guest keeps running and is adopted.
    bed.engines[0].terminate(Duration::from_secs(10));
    let ne = bed.node_engine(0, "nodeengine-2");
    bed.engines[0] = ne;
    eventually(60, "the guest adopted", &bed.procs(), || async {
        bed.engines[0]
            .log()
            .contains("adopted a running instance")
            .then_some(())
    })
    .await;
    assert_eq!(qemus_of(task), qemu, "the same QEMU after the restart");
    assert!(fetch_in(cli_pid, &format!("http://{RR_V4}/")).is_some_and(|p| p.contains("guest 10.18.")));

    // --- Worker 1's NetManager restarts: the guest's tap went with it, so the NodeEngine stops the guest and the
    // cluster starts it again (a new QEMU); the container next to it is attached again. Both answer again.
    bed.restart_netmanager(0, "netmanager-2");
    eventually(
        60,
        "the guest stopped for a new network",
        &bed.procs(),
        || async {
            bed.engines[0]
                .log()
                .contains("lost this guest's network")
                .then_some(())
        },
    )
    .await;
    let restarted = eventually(
        180,
        "the guest running again in a new QEMU",
        &bed.procs(),
        || async {
            let now = qemus_of(task);
            (!now.is_empty() && now != qemu).then_some(now)
        },
    )
    .await;
    eventually(60, "the guest RUNNING at root again", &bed.procs(), || {
        instance_in(&bed.stack, &guest_id, "RUNNING")
    })
    .await;
    for target in [format!("http://{RR_V4}/"), format!("http://{CTR_RR}/")] {
        eventually(
            120,
            &format!("{target} after the NetManager restart"),
            &bed.procs(),
            || async {
                fetch_in(cli_pid, &target).filter(|p| p.contains("guest 10.18.") || p.contains("hi-from-ctr"))
            },
        )
        .await;
    }
    assert!(
        bed.engines[0]
            .log()
            .contains("attached again after a NetManager restart"),
        "{}",
        bed.engines[0].log()
    );
    assert_eq!(qemus_of(task), restarted);

    // --- Undeploy: no QEMU, tap, namespace or cache lock left.
    let r = call(
        "DELETE",
        &format!("{}/api/service/{guest_id}/instance/0", bed.stack.root_url),
        Some(&bed.stack.token),
        None,
    )
    .await;
    assert!(r.status < 300, "{}", r.body);
    eventually(60, "the guest gone", &bed.procs(), || async {
        (qemus_of(task).is_empty() && !Path::new(&netns).exists() && locks(&cache).is_empty()).then_some(())
    })
    .await;
    // The image was unused with a keep time of 0: collected.
    assert!(
        std::fs::read_dir(cache.join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0)
            == 0,
        "image cache not collected"
    );

    // --- Broken images fail with their reason, and leave nothing behind.
    for (file, want) in [("broken.tar.gz", "not a gzip file"), ("missing.tar.gz", "404")] {
        let bad = json!({"microservice_name": "bad", "virtualization": "unikernel", "code": url(file),
            "arch": ["amd64"], "memory": 128, "constraints": [{"type": "direct", "node": names[0]}]});
        let app = format!("ukb{}", file.len());
        let bad_id = bed.stack.deploy(&app, &bad).await;
        let failed = eventually(60, &format!("{file} FAILED"), &bed.procs(), || {
            instance_in(&bed.stack, &bad_id, "FAILED")
        })
        .await;
        let detail = failed["status_detail"].as_str().unwrap_or_default().to_owned();
        let doc = service(&bed.stack, &bad_id).await;
        assert!(
            detail.contains(want) || doc.to_string().contains(want),
            "{file}: {failed}"
        );
        let bad_task = format!("{app}.test.bad.test.instance.0");
        assert!(qemus_of(&bad_task).is_empty());
        assert!(!Path::new(&format!("/var/run/netns/{bad_task}")).exists());
    }
    let tmp_left: Vec<_> = std::fs::read_dir(cache.join("tmp"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(tmp_left.is_empty(), "download leftovers: {tmp_left:?}");

    bed.finish();
    let _ = std::fs::remove_dir_all(&images);
}
