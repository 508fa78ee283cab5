//! kube-controller-manager (k8s.io/kubernetes v1.34.4, built from the same wrapper module as
//! kube-apiserver by `hack/controlplane/build.sh --controller-manager`, cached per machine)
//! running only the controllers a test names, against the shared control plane with the admin
//! kubeconfig. The control plane has no controller-manager otherwise: nothing collects
//! garbage and no namespace finishes deleting unless a test starts one.
//!
//! It runs as a child of the test binary, its log in
//! `<control plane dir>/controller-manager-<n>/kube-controller-manager.log`, killed on Drop; a
//! detached watchdog kills it if the test binary dies first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

use super::controlplane::ControlPlane;

/// How long the garbage collector may take to collect its first object after the start.
const GC_READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A running kube-controller-manager.
pub struct ControllerManager {
    child: Child,
    watchdog: Child,
    log: PathBuf,
}

/// The binary, built on first use on this machine (blocking; ~1.5 min with kube-apiserver's
/// build cache warm). Panics with build.sh's output.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| super::tools::tool("--controller-manager"))
}

/// Starts kube-controller-manager with only `controllers` (e.g. `["garbagecollector"]`),
/// leader election off and no serving port.
pub fn start(cp: &ControlPlane, controllers: &[&str]) -> ControllerManager {
    static N: AtomicUsize = AtomicUsize::new(0);
    let bin = binary();
    let dir = cp.dir().join(format!(
        "controller-manager-{}",
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("controller-manager dir");
    let log = dir.join("kube-controller-manager.log");
    let log_file = std::fs::File::create(&log).expect("controller-manager log file");
    let child = Command::new(bin)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .arg(format!("--controllers={}", controllers.join(",")))
        .arg("--leader-elect=false")
        .arg("--secure-port=0")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log fd"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    let watchdog = super::tools::watchdog(
        &format!("controller-manager-watchdog {}", dir.display()),
        &child,
    );
    ControllerManager {
        child,
        watchdog,
        log,
    }
}

impl ControllerManager {
    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Panics with its log if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "kube-controller-manager exited ({status}):\n{}",
                self.log_tail(40)
            );
        }
    }

    /// Waits until the garbage collector works: a ConfigMap in `namespace` whose owner does
    /// not exist is collected. Panics with the log if it is not within a minute and a half.
    pub async fn wait_for_garbage_collector(&mut self, client: &kube::Client, namespace: &str) {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        let canary: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "gc-canary", "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": "gc-canary-owner",
                "uid": "7d1f6f2e-1c1b-4c57-9a0e-000000000000"}]}
        }))
        .unwrap();
        api.create(&PostParams::default(), &canary)
            .await
            .expect("creating the garbage collector's canary");
        let t0 = Instant::now();
        while api
            .get_opt("gc-canary")
            .await
            .expect("reading canary")
            .is_some()
        {
            self.assert_running();
            assert!(
                t0.elapsed() < GC_READY_TIMEOUT,
                "the garbage collector did not collect its canary within {GC_READY_TIMEOUT:?}:\n{}",
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for ControllerManager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}
