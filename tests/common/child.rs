//! The webhook binary (`cape-static-ip serve`, built with the test-only `fault-points`
//! feature) as a child process of the test, so that a test can SIGKILL it, arm a fault point
//! (src/fault.rs) and start it again on the same ports.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How every child of one test is started: the same ports (the webhook registration stays
/// valid across restarts), certificates and flags.
#[derive(Debug, Clone)]
pub struct ChildConfig {
    pub webhook: SocketAddr,
    pub admin: SocketAddr,
    pub certs_dir: PathBuf,
    pub ca_pem: String,
    pub kubeconfig: PathBuf,
    pub claim_grace: Duration,
    pub request_timeout: Duration,
    pub resync: Duration,
    pub log_dir: PathBuf,
    /// The CA of the client certificate the test apiserver presents to webhooks
    /// (`--auth-client-ca-file`, with `--auth-mode enforce`).
    pub caller_ca_file: PathBuf,
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl ChildConfig {
    /// Fresh ports and dev certificates; the webhook user's kubeconfig of the control plane.
    pub fn new(
        tag: &str,
        kubeconfig: PathBuf,
        caller_ca_file: PathBuf,
        claim_grace: Duration,
    ) -> Self {
        let (certs_dir, ca_pem) = super::webhook::dev_certs(tag);
        ChildConfig {
            webhook: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            certs_dir,
            ca_pem,
            kubeconfig,
            claim_grace,
            request_timeout: claim_grace.saturating_sub(Duration::from_secs(10)),
            resync: Duration::from_secs(2),
            log_dir: super::tools::temp_dir(&format!("child-{tag}")),
            caller_ca_file,
        }
    }

    /// Starts the binary with `env` added (fault points) and its output in `<log_dir>/<name>.log`.
    pub fn spawn(&self, name: &str, env: &[(&str, &str)]) -> ChildWebhook {
        let log = self.log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("child log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cape-static-ip"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(self.webhook.to_string())
            .arg("--admin-listen")
            .arg(self.admin.to_string())
            .arg("--tls-cert-file")
            .arg(self.certs_dir.join("tls.crt"))
            .arg("--tls-key-file")
            .arg(self.certs_dir.join("tls.key"))
            .arg("--claim-grace")
            .arg(humantime::format_duration(self.claim_grace).to_string())
            .arg("--apiserver-request-timeout")
            .arg(humantime::format_duration(self.request_timeout).to_string())
            .arg("--resync")
            .arg(humantime::format_duration(self.resync).to_string())
            .arg("--shutdown-delay")
            .arg("0s")
            .arg("--drain")
            .arg("1s")
            .arg("--auth-mode")
            .arg("enforce")
            .arg("--auth-client-ca-file")
            .arg(&self.caller_ca_file)
            .arg("--auth-allowed-users")
            .arg("kube-apiserver-kubelet-client,cape-static-ip-apiserver")
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("CAPE_STATIC_IP_FAULT_POINT")
            .env_remove("CAPE_STATIC_IP_FAULT_DELAY")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("child log"))
            .stderr(file);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,kube=warn,hyper=warn,rustls=warn");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting cape-static-ip serve");
        ChildWebhook {
            child,
            log,
            admin: self.admin,
        }
    }
}

/// A running child; SIGKILLed when dropped.
pub struct ChildWebhook {
    child: Child,
    pub log: PathBuf,
    admin: SocketAddr,
}

impl ChildWebhook {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether its log has a line containing `text` so far.
    pub fn logged(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains(text))
    }

    /// Waits until `/readyz` answers 200 (caches synced); panics if it exits first.
    pub async fn ready(&mut self) {
        let url = format!("http://{}/readyz", self.admin);
        let http = reqwest::Client::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(status) = self.child.try_wait().expect("child status") {
                panic!(
                    "cape-static-ip exited ({status}) before it was ready:\n{}",
                    self.tail()
                );
            }
            if let Ok(r) = http.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("cape-static-ip not ready after 60s:\n{}", self.tail());
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("child status").is_none()
    }

    /// Waits until it exits (a fault point fired); panics after `limit`.
    pub async fn exited(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("child status") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "cape-static-ip still running after {limit:?}:\n{}",
            self.tail()
        );
    }

    /// SIGKILL, and wait.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGSTOP / SIGCONT (freeze it while the cluster changes).
    pub fn signal(&self, signal: &str) {
        super::tools::run(
            Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(self.pid().to_string()),
        );
    }
}

impl Drop for ChildWebhook {
    fn drop(&mut self) {
        self.kill();
    }
}
