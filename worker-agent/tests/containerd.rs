//! The containerd client against a real containerd + runc (a private daemon the test starts): an imported image and
//! the same image pulled from a local registry; create, start, wait, logs, limits, removal.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::HashMap;
use std::time::Duration;

use oakestra_protocol::mqtt::worker::DeployCommand;
use oakestra_tests::containerd::{Containerd as Daemon, LocalRegistry};
use oakestra_worker_agent::containerd::{Containerd, TaskState};
use oakestra_worker_agent::registry::{Platform, Registry};
use oakestra_worker_agent::spec::{self, SpecOptions};

const IMAGE: &str = "docker.io/library/bbtest:latest";

fn deploy(image: &str, cmd: &[&str], memory: i64) -> DeployCommand {
    DeployCommand {
        image: image.into(),
        job_name: "t.t.t.t".into(),
        cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
        memory,
        ..DeployCommand::default()
    }
}

async fn run_to_exit(
    ctr: &Containerd,
    dir: &std::path::Path,
    id: &str,
    image: &str,
    cmd: &[&str],
    memory: i64,
) -> (u32, String) {
    let prepared = ctr
        .ensure_image(image, &Platform::host(), &|_: &str| {})
        .await
        .unwrap();
    for f in ["hosts", "resolv.conf", "hostname"] {
        std::fs::write(dir.join(f), format!("{f}\n")).unwrap();
    }
    let opts = SpecOptions {
        hostname: "instance-0".into(),
        cgroups_path: ctr.cgroups_path(id),
        hosts_file: dir.join("hosts").display().to_string(),
        resolv_conf: dir.join("resolv.conf").display().to_string(),
        hostname_file: dir.join("hostname").display().to_string(),
    };
    let spec = spec::build(&prepared.config, &deploy(image, cmd, memory), &opts).unwrap();
    ctr.create_container(id, &prepared, &spec, HashMap::new())
        .await
        .unwrap();
    let log = dir.join(format!("{id}.log"));
    std::fs::write(&log, "").unwrap();
    let pid = ctr.create_task(id, &log).await.unwrap();
    assert!(pid > 0);
    assert_eq!(ctr.task_state(id).await.unwrap(), TaskState::Alive { pid });
    let waiter = {
        let ctr = ctr.clone();
        let id = id.to_owned();
        tokio::spawn(async move { ctr.wait(&id).await })
    };
    ctr.start_task(id).await.unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let code = ctr.remove(id).await.unwrap();
    assert_eq!(code, Some(exit.code));
    assert!(
        ctr.list().await.unwrap().iter().all(|c| c.id != id),
        "container left behind"
    );
    (exit.code, std::fs::read_to_string(&log).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imported_and_pulled_images_run_and_are_cleaned_up() {
    let daemon = Daemon::start("agentlib");
    let layout = daemon.import_test_image("oakestra-t1", IMAGE);
    let ctr = Containerd::connect(
        &daemon.socket,
        "oakestra-t1",
        "overlayfs",
        Registry::new(HashMap::new()),
    )
    .await
    .unwrap();
    let dir = daemon.dir.join("files");
    std::fs::create_dir_all(&dir).unwrap();

    // The imported image: output lands in the log file, hostname and env come from the spec.
    let (code, log) = run_to_exit(
        &ctr,
        &dir,
        "c1",
        IMAGE,
        &[
            "sh",
            "-c",
            "echo out-$HOSTNAME; echo err >&2; cat /etc/hostname; exit 3",
        ],
        0,
    )
    .await;
    assert_eq!(code, 3, "{log}");
    assert!(
        log.contains("out-instance-0") && log.contains("err") && log.contains("hostname"),
        "{log}"
    );

    // A memory limit is a real cgroup limit: dd's 64 MiB buffer does not fit into 16 MiB.
    let (code, log) = run_to_exit(
        &ctr,
        &dir,
        "c2",
        IMAGE,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        16,
    )
    .await;
    assert_eq!(code, 137, "expected an OOM kill (SIGKILL): {log}");

    // The same image pulled from a local registry over plain HTTP into a fresh namespace.
    let registry = LocalRegistry::start("agentlib");
    let pulled = registry.push(&layout, "test/bb");
    let ctr2 = Containerd::connect(
        &daemon.socket,
        "oakestra-t2",
        "overlayfs",
        Registry::new(HashMap::new()),
    )
    .await
    .unwrap();
    // The pull tells how far it is: first that it starts, last the whole size.
    let told = std::sync::Mutex::new(Vec::<String>::new());
    ctr2.ensure_image(&pulled, &Platform::host(), &|t: &str| {
        told.lock().unwrap().push(t.to_owned())
    })
    .await
    .unwrap();
    let told = told.into_inner().unwrap();
    assert!(
        told.first()
            .is_some_and(|t| t.starts_with("pulling ") && t.contains("test/bb")),
        "{told:?}"
    );
    let last = told.last().unwrap();
    let sizes: Vec<&str> = last.rsplit(": ").next().unwrap().split(' ').collect();
    assert!(
        matches!(sizes.as_slice(), [a, "of", b, "MiB"] if a == b && *a != "0.0"),
        "{told:?}"
    );
    let (code, log) = run_to_exit(&ctr2, &dir, "c3", &pulled, &["echo", "pulled-ok"], 0).await;
    assert_eq!((code, log.trim()), (0, "pulled-ok"));
    // A second deploy of a present image needs no registry.
    drop(registry);
    let (code, _) = run_to_exit(&ctr2, &dir, "c4", &pulled, &["true"], 0).await;
    assert_eq!(code, 0);

    // An image that exists nowhere fails with a message naming it.
    let err = ctr2
        .ensure_image("127.0.0.1:1/none/such:v1", &Platform::host(), &|_: &str| {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("none/such"), "{err}");
}
