//! A real Kubernetes control plane for integration tests: etcd + kube-apiserver built from their
//! Go modules (hack/controlplane/build.sh, cached per machine) and started on random loopback
//! ports by hack/controlplane/cluster.sh, once per test binary. A watchdog started by the script
//! stops both processes when this test binary exits, even if it crashes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rand::Rng;

/// Which versions of the upstream CRDs (tests/crds/) are installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrdSet {
    /// CAPE v1.8.1, metal3 IPAM v1.13.2, CAPI v1.14.0.
    Current,
    /// CAPE v0.3.6, metal3 IPAM v1.1.3, CAPI v1.14.0.
    Legacy,
}

impl CrdSet {
    fn folders(self) -> &'static [&'static str] {
        match self {
            CrdSet::Current => &["cape-v1.8.1", "metal3-v1.13.2", "capi-v1.14.0"],
            CrdSet::Legacy => &["cape-v0.3.6", "metal3-v1.1.3", "capi-v1.14.0"],
        }
    }
}

#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    kubeconfig: PathBuf,
    url: String,
    admin_token: String,
    webhook_token: String,
    caller_token: String,
}

static CURRENT: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
static LEGACY: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The control plane of this test binary for `set`, started on first use (blocking: the first
/// call on a new machine builds the binaries, ~4 min; later starts take a few seconds).
/// Panics with the scripts' output if it cannot start (every caller, not only the first).
pub fn shared(set: CrdSet) -> &'static ControlPlane {
    install_crypto_provider();
    let cell = match set {
        CrdSet::Current => &CURRENT,
        CrdSet::Legacy => &LEGACY,
    };
    match cell.get_or_init(|| start(set)) {
        Ok(cp) => cp,
        Err(e) => panic!("control plane ({set:?}) failed to start:\n{e}"),
    }
}

fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{cmd:?} failed ({}):\n{text}", out.status))
    }
}

fn start(set: CrdSet) -> Result<ControlPlane, String> {
    let hack = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/controlplane");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    let dir = std::env::temp_dir().join(format!(
        "{DIR_PREFIX}{}-{}-{nanos}",
        std::process::id(),
        format!("{set:?}").to_lowercase()
    ));

    remove_stale_dirs();
    run(Command::new("bash").arg(hack.join("build.sh")))?;
    let mut up = Command::new("bash");
    up.arg(hack.join("cluster.sh")).arg("up").arg(&dir);
    for folder in set.folders() {
        up.arg("--crds").arg(folder);
    }
    up.arg("--watch").arg(std::process::id().to_string());
    let out = run(&mut up)?;
    eprintln!("{}", out.trim_end());
    bind_webhook_user(&dir)?;

    // DIR/env: `export KEY=VALUE` lines.
    let env = std::fs::read_to_string(dir.join("env")).map_err(|e| format!("reading env: {e}"))?;
    let var = |key: &str| -> Result<String, String> {
        env.lines()
            .find_map(|l| {
                l.strip_prefix("export ")?
                    .strip_prefix(key)?
                    .strip_prefix('=')
            })
            .map(str::to_owned)
            .ok_or_else(|| format!("{key} missing from {}", dir.join("env").display()))
    };
    Ok(ControlPlane {
        kubeconfig: dir.join("kubeconfig"),
        url: var("APISERVER_URL")?,
        admin_token: var("ADMIN_TOKEN")?,
        webhook_token: var("WEBHOOK_TOKEN")?,
        caller_token: var("CALLER_TOKEN")?,
        dir,
    })
}

/// Binds the shipped ClusterRole (manifests/rbac.yaml, unchanged) to the user `webhook`, so
/// that the webhook under test runs with exactly the permissions production grants.
fn bind_webhook_user(dir: &Path) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let role = run(Command::new("python3").arg("-c").arg(
        "import json,sys,yaml\n\
         docs=[d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d.get('kind')=='ClusterRole']\n\
         role=docs[0]\n\
         binding={'apiVersion':'rbac.authorization.k8s.io/v1','kind':'ClusterRoleBinding',\
         'metadata':{'name':'cape-static-ip-test-webhook-user'},\
         'roleRef':{'apiGroup':'rbac.authorization.k8s.io','kind':'ClusterRole','name':role['metadata']['name']},\
         'subjects':[{'apiGroup':'rbac.authorization.k8s.io','kind':'User','name':'webhook'}]}\n\
         print(json.dumps({'apiVersion':'v1','kind':'List','items':[role,binding]}))",
    ).arg(root.join("manifests/rbac.yaml")))?;
    let bins = run(Command::new("bash")
        .arg(root.join("hack/controlplane/build.sh"))
        .arg("--print"))?;
    let kubectl = bins
        .lines()
        .find(|l| l.ends_with("/kubectl"))
        .ok_or("build.sh --print names no kubectl")?
        .to_string();
    let file = dir.join("webhook-rbac.json");
    std::fs::write(&file, role).map_err(|e| format!("writing {}: {e}", file.display()))?;
    run(Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(dir.join("kubeconfig"))
        .arg("apply")
        .arg("-f")
        .arg(&file))?;
    Ok(())
}

/// Every control plane this test binary has started.
pub fn started() -> Vec<&'static ControlPlane> {
    [&CURRENT, &LEGACY]
        .into_iter()
        .filter_map(|cell| cell.get().and_then(|r| r.as_ref().ok()))
        .collect()
}

const DIR_PREFIX: &str = "cape-static-ip-cp-";

/// Removes the directories (etcd data: ~125 MB each) left in the temp dir by earlier test
/// binaries, once their owner has exited and its watchdog has stopped etcd and the apiserver.
/// A directory is named `cape-static-ip-cp-<owner pid>-...`; this is Linux-only (/proc).
fn remove_stale_dirs() {
    let alive = |pid: &str| Path::new("/proc").join(pid.trim()).exists();
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(owner) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        let dir = entry.path();
        let running = ["etcd.pid", "apiserver.pid", "watchdog.pid"]
            .iter()
            .any(|f| {
                std::fs::read_to_string(dir.join(f))
                    .is_ok_and(|pid| !pid.trim().is_empty() && alive(&pid))
            });
        if !owner.is_empty() && !alive(owner) && !running {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

async fn client_from(path: &Path) -> kube::Client {
    install_crypto_provider();
    let kubeconfig =
        Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
    kube::Client::try_from(config).expect("building kube client")
}

impl ControlPlane {
    /// Directory holding the cluster's data, certificates, logs (etcd.log, apiserver.log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Admin kubeconfig (group system:masters).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }
    /// Kubeconfig of the user `webhook`, which has no groups and no RBAC bindings by default.
    pub fn webhook_kubeconfig(&self) -> PathBuf {
        self.dir.join("webhook.kubeconfig")
    }
    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }
    pub fn webhook_token(&self) -> &str {
        &self.webhook_token
    }
    /// The token the apiserver presents to admission webhooks (user `cape-static-ip-apiserver`,
    /// see hack/controlplane/cluster.sh).
    pub fn caller_token(&self) -> &str {
        &self.caller_token
    }
    /// The CA that signed the client certificate the apiserver presents to admission webhooks.
    pub fn caller_ca_file(&self) -> PathBuf {
        self.dir.join("caller-ca.crt")
    }
    /// That client certificate (CN kube-apiserver-kubelet-client, O kubeadm:cluster-admins)
    /// and its key, both PEM.
    pub fn caller_cert_and_key(&self) -> String {
        let read = |f: &str| {
            std::fs::read_to_string(self.dir.join(f))
                .unwrap_or_else(|e| panic!("reading {f} of the control plane: {e}"))
        };
        format!("{}{}", read("caller.crt"), read("caller.key"))
    }
    /// What a webhook under test accepts, in `mode`: the apiserver's client certificate (its
    /// CA) and its token (TokenReview), as the identities the control plane gives them.
    pub fn caller_auth(
        &self,
        mode: cape_static_ip::webhook::auth::Mode,
    ) -> cape_static_ip::webhook::auth::AuthOptions {
        cape_static_ip::webhook::auth::AuthOptions {
            mode,
            client_ca_file: Some(self.caller_ca_file()),
            token_review: true,
            allowed_users: vec![
                "kube-apiserver-kubelet-client".into(),
                "cape-static-ip-apiserver".into(),
            ],
            ..cape_static_ip::webhook::auth::AuthOptions::off()
        }
    }

    /// The apiserver's self-signed serving certificate chain (PEM).
    pub fn apiserver_cert_pem(&self) -> PathBuf {
        self.dir.join("certs/apiserver.crt")
    }

    /// One value of DIR/env (`export KEY=VALUE`), read now.
    pub fn env(&self, key: &str) -> String {
        let file = self.dir.join("env");
        let env = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        env.lines()
            .find_map(|l| {
                l.strip_prefix("export ")?
                    .strip_prefix(key)?
                    .strip_prefix('=')
            })
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("{key} missing from {}", file.display()))
    }

    /// etcd's client URL (`http://127.0.0.1:<port>`).
    pub fn etcd_url(&self) -> String {
        self.env("ETCD_URL")
    }

    /// SIGKILLs `process` (`etcd` or `apiserver`) and waits until it is gone.
    pub fn kill(&self, process: &str) {
        self.cluster_sh("kill", process);
    }

    /// Starts `process` (`etcd` or `apiserver`) again on the same ports, with the same data
    /// and certificates, and waits until it is ready.
    pub fn start_again(&self, process: &str) {
        self.cluster_sh("start", process);
    }

    fn cluster_sh(&self, command: &str, process: &str) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/controlplane/cluster.sh");
        if let Err(e) = run(Command::new("bash")
            .arg(script)
            .arg(command)
            .arg(&self.dir)
            .arg(process))
        {
            panic!("cluster.sh {command} {process}: {e}");
        }
    }

    /// A client authenticated as the admin.
    pub async fn client(&self) -> kube::Client {
        client_from(&self.kubeconfig).await
    }

    /// A client authenticated as the user `webhook` (no groups: grant it RBAC explicitly).
    pub async fn client_as_webhook_user(&self) -> kube::Client {
        client_from(&self.webhook_kubeconfig()).await
    }
}

/// Creates a fresh namespace `<prefix>-<6 random lowercase letters>` and returns its name.
/// (There is no controller-manager: deleted namespaces never finish terminating, so tests use
/// a fresh one each.)
pub async fn temp_namespace(client: &kube::Client, prefix: &str) -> String {
    let suffix: String = {
        let mut rng = rand::rng();
        (0..6)
            .map(|_| rng.random_range(b'a'..=b'z') as char)
            .collect()
    };
    let name = format!("{prefix}-{suffix}");
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    name
}
