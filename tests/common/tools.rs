//! Upstream command-line tools for tests (kubectl, promtool, clusterctl), built from their Go
//! modules by hack/controlplane/build.sh and cached per machine, and small helpers to run them.

use std::io::Write;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The repository.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout and stderr.
pub fn run(cmd: &mut Command) -> (String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// An optional tool of build.sh (`--promtool`, `--clusterctl`, `--metal3`,
/// `--controller-manager`): built on first use (minutes), then cached. Returns its path (the
/// last line build.sh prints).
pub fn tool(flag: &str) -> PathBuf {
    let (stdout, _) = run(Command::new("bash")
        .arg(root().join("hack/controlplane/build.sh"))
        .arg(flag)
        .stderr(Stdio::inherit()));
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    assert!(path.is_file(), "build.sh {flag} printed {stdout:?}");
    path
}

/// A watchdog for `child`, in its own process group (so that it outlives a Ctrl-C of the test
/// binary's group long enough to act): once this test binary is gone, TERM then KILL the
/// child. Its command line names `tag`, for whoever looks at `ps`. Kill it with the child.
pub fn watchdog(tag: &str, child: &std::process::Child) -> std::process::Child {
    Command::new("bash")
        .arg("-c")
        .arg(
            r#"while kill -0 "$1" 2>/dev/null; do kill -0 "$2" 2>/dev/null || exit 0; sleep 1; done
               kill -TERM "$2" 2>/dev/null
               for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$2" 2>/dev/null || exit 0; sleep 0.3; done
               kill -KILL "$2" 2>/dev/null; true"#,
        )
        .arg(tag)
        .arg(std::process::id().to_string())
        .arg(child.id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("starting the watchdog {tag}: {e}"))
}

/// The pinned kubectl of the local control plane.
pub fn kubectl() -> PathBuf {
    let (stdout, _) = run(Command::new("bash")
        .arg(root().join("hack/controlplane/build.sh"))
        .arg("--print"));
    stdout
        .lines()
        .find(|l| l.ends_with("/kubectl"))
        .map(PathBuf::from)
        .expect("build.sh --print names kubectl")
}

/// Every document of a YAML text, as JSON (empty documents dropped). The crate has no YAML
/// parser: python3 with PyYAML reads it.
pub fn yaml_docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (with PyYAML)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python3 could not read the YAML: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// [`yaml_docs`] of a file.
pub fn yaml_file(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    yaml_docs(&text)
}

/// A fresh directory under the system's temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cape-static-ip-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
