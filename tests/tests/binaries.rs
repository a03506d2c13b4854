//! Every binary of the workspace runs, explains itself with `--help`, reports its version, and a binary whose issue
//! has not landed refuses to run with a clear error instead of pretending to work.

use oakestra_tests::procs;

/// Binary name and a phrase its `--help` must contain.
const BINARIES: &[(&str, &str)] = &[
    ("NodeEngine", "worker agent"),
    ("NetManager", "semantic overlay"),
    ("cluster-service", "cluster orchestrator"),
    ("root-service", "root orchestrator"),
];

#[test]
fn help_explains_each_binary() {
    for (name, phrase) in BINARIES {
        let out = procs::run(name, &["--help"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --help failed: {out:?}");
        assert!(
            stdout.contains("Usage:"),
            "{name} --help has no usage line:\n{stdout}"
        );
        assert!(
            stdout.contains(phrase),
            "{name} --help does not say what it is ({phrase:?}):\n{stdout}"
        );
    }
}

#[test]
fn version_is_the_workspace_version() {
    for (name, _) in BINARIES {
        let out = procs::run(name, &["--version"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --version failed: {out:?}");
        assert!(
            stdout.contains(env!("CARGO_PKG_VERSION")),
            "{name} --version printed {stdout:?}"
        );
    }
}

#[test]
fn unfinished_binaries_refuse_to_run() {
    for (name, _) in BINARIES {
        let out = procs::run(name, &["-a", "127.0.0.1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name} should exit 2: {out:?}");
        assert!(stderr.contains("not implemented yet"), "{name} stderr: {stderr}");
    }
}
