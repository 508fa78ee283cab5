//! metal3's own IPAM controller (github.com/metal3-io/ip-address-manager v1.13.2, built by
//! `hack/controlplane/build.sh --metal3`, cached per machine) running against the shared
//! control plane, so that tests can prove this project and metal3 live side by side.
//!
//! The controller runs as a child of the test binary with the admin kubeconfig, loopback-only
//! ports, its log in `<control plane dir>/metal3-<n>/ip-address-manager.log`. It is killed on
//! Drop; a detached watchdog kills it if the test binary dies first (like cluster.sh's).
//! Its own admission webhooks are served but not registered: nothing calls them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::controlplane::ControlPlane;

/// How long the controller may take to become healthy with its workers started.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running ip-address-manager.
pub struct Metal3 {
    child: Child,
    watchdog: Child,
    dir: PathBuf,
    log: PathBuf,
    health: SocketAddr,
    /// From spawn to healthy with both IPPool controllers' workers started.
    pub started_in: Duration,
}

/// The controller's binary, built on first use on this machine (blocking; ~1.5 min on an
/// idle 2-core machine, several minutes when it is busy). Panics with build.sh's output.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| super::tools::tool("--metal3"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Status code of `GET http://addr/path`, if anything answered.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = String::new();
    s.read_to_string(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Starts the controller against `cp` (admin credentials) and waits until it is healthy and
/// both IPPool controllers (metal3 IPClaims and CAPI IPAddressClaims) have started their
/// workers. Panics with the tail of its log if it does not get there.
pub fn start(cp: &ControlPlane) -> Metal3 {
    static N: AtomicUsize = AtomicUsize::new(0);
    let bin = binary();
    let dir = cp
        .dir()
        .join(format!("metal3-{}", N.fetch_add(1, Ordering::Relaxed)));
    let certs_dir = dir.join("certs");
    let certs = cape_static_ip::webhook::certs::generate(&["127.0.0.1".into()], 30).expect("certs");
    cape_static_ip::webhook::certs::write(&certs_dir, &certs).expect("writing metal3's certs");
    let log = dir.join("ip-address-manager.log");
    let log_file = std::fs::File::create(&log).expect("metal3 log file");
    let health: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let diagnostics = format!("127.0.0.1:{}", free_port());

    let t0 = Instant::now();
    let child = Command::new(bin)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .arg("--health-addr")
        .arg(health.to_string())
        .arg("--diagnostics-address")
        .arg(&diagnostics)
        .arg("--insecure-diagnostics")
        .arg("--webhook-port")
        .arg(free_port().to_string())
        .arg("--webhook-cert-dir")
        .arg(&certs_dir)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log fd"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));

    let watchdog = super::tools::watchdog(&format!("metal3-watchdog {}", dir.display()), &child);

    let mut m = Metal3 {
        child,
        watchdog,
        dir,
        log,
        health,
        started_in: Duration::ZERO,
    };
    loop {
        if let Ok(Some(status)) = m.child.try_wait() {
            panic!(
                "metal3's ip-address-manager exited ({status}) while starting:\n{}",
                m.log_tail(40)
            );
        }
        let workers = std::fs::read_to_string(&m.log)
            .map(|l| {
                l.lines()
                    .filter(|l| l.contains("\"Starting workers\""))
                    .count()
            })
            .unwrap_or(0);
        if workers >= 2 && http_status(m.health, "/readyz") == Some(200) {
            break;
        }
        if t0.elapsed() > START_TIMEOUT {
            panic!(
                "metal3's ip-address-manager not ready after {START_TIMEOUT:?}:\n{}",
                m.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    m.started_in = t0.elapsed();
    m
}

impl Metal3 {
    /// Directory with its certificates and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Its log file (klog text).
    pub fn log(&self) -> &Path {
        &self.log
    }
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Metal3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}
