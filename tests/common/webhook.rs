//! Runs the webhook in-process over TLS and registers it with the apiserver for one test
//! namespace, exactly as production registers it (by URL instead of Service).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use cape_static_ip::cmd::serve::{self, Options, Running};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

/// A webhook process (in this test binary) registered for one namespace.
pub struct Webhook {
    pub running: Running,
    pub config: String,
    pub ca_pem: String,
    pub certs_dir: std::path::PathBuf,
    client: Client,
}

/// Options for [`start`].
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    pub background: bool,
    pub claim_grace: Duration,
    pub resync: Duration,
    pub default_pool_namespace: String,
    pub failure_policy: &'static str,
    /// Run the webhook with the given client's credentials instead of the least-privilege
    /// user bound to the shipped ClusterRole.
    pub use_given_client: bool,
    /// Register with the `matchConditions` every shipped registration carries (the default);
    /// `false` registers as on an apiserver before 1.28, called for every CREATE and UPDATE.
    pub match_conditions: bool,
    /// Serve these files instead of a fresh dev pair (for example a kubelet-style `..data`
    /// layout that a test rotates); `certs_dir` is then the certificate file's directory.
    pub tls: Option<TlsFiles>,
    /// The server's deadlines and caps.
    pub limits: cape_static_ip::webhook::listener::Limits,
    /// `--reuse-delay`.
    pub reuse_delay: Duration,
    /// The address both endpoints listen on (port 0: any); default `127.0.0.1`.
    pub listen_ip: std::net::IpAddr,
    /// Who may send reviews; `None`: `enforce`, accepting the credentials the test control
    /// plane's apiserver presents ([`super::controlplane::ControlPlane::caller_auth`]).
    pub auth: Option<cape_static_ip::webhook::auth::AuthOptions>,
    /// The cap on pending claims.
    pub caps: cape_static_ip::assign::pending::Caps,
}

/// A serving certificate and key on disk, and the CA (PEM) that signed the certificate.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca_pem: String,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        WebhookOptions {
            background: true,
            claim_grace: Duration::from_secs(120),
            resync: Duration::from_secs(300),
            default_pool_namespace: "cape-system".into(),
            failure_policy: "Fail",
            use_given_client: false,
            match_conditions: true,
            tls: None,
            limits: Default::default(),
            reuse_delay: Duration::ZERO,
            listen_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            auth: None,
            caps: Default::default(),
        }
    }
}

/// Writes dev certificates for 127.0.0.1, ::1 and localhost into a fresh temporary directory.
pub fn dev_certs(tag: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!(
        "cape-static-ip-certs-{tag}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let certs = cape_static_ip::webhook::certs::generate(
        &["127.0.0.1".into(), "::1".into(), "localhost".into()],
        30,
    )
    .expect("certs");
    cape_static_ip::webhook::certs::write(&dir, &certs).expect("write certs");
    (dir, certs.ca_cert)
}

/// Starts a webhook with `client`'s credentials and registers it for `namespace`.
pub async fn start(client: &Client, namespace: &str, options: WebhookOptions) -> Webhook {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if std::env::var_os("RUST_LOG").is_some() {
        serve::init_logging(cape_static_ip::cli::LogFormat::Text);
    }
    let (dir, ca_pem, cert_file, key_file) = match &options.tls {
        None => {
            let (dir, ca_pem) = dev_certs(namespace);
            let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
            (dir, ca_pem, cert, key)
        }
        Some(tls) => (
            tls.cert.parent().expect("a certificate file").to_path_buf(),
            tls.ca_pem.clone(),
            tls.cert.clone(),
            tls.key.clone(),
        ),
    };
    // The webhook runs as the user bound to manifests/rbac.yaml's ClusterRole: every test
    // proves those permissions suffice.
    let started = super::controlplane::started();
    let webhook_client = match (options.use_given_client, started.as_slice()) {
        (false, [cp]) => cp.client_as_webhook_user().await,
        _ => client.clone(),
    };
    let auth = match (&options.auth, started.as_slice()) {
        (Some(auth), _) => auth.clone(),
        (None, [cp]) => cp.caller_auth(cape_static_ip::webhook::auth::Mode::Enforce),
        (None, _) => cape_static_ip::webhook::auth::AuthOptions::off(),
    };
    let running = serve::start(
        webhook_client,
        Options {
            listen: SocketAddr::new(options.listen_ip, 0),
            admin_listen: SocketAddr::new(options.listen_ip, 0),
            tls_cert_file: cert_file,
            tls_key_file: key_file,
            default_pool_namespace: options.default_pool_namespace.clone(),
            resync: options.resync,
            claim_grace: options.claim_grace,
            reuse_delay: options.reuse_delay,
            cert_reload: Duration::from_millis(200),
            drain: Duration::from_secs(5),
            shutdown_delay: Duration::ZERO,
            background: options.background,
            limits: options.limits.clone(),
            auth,
            caps: options.caps,
        },
    )
    .await
    .expect("webhook starts");
    running.ready().await;
    let config = format!("cape-static-ip-test-{namespace}");
    register_with(
        client,
        &config,
        running.webhook_addr,
        &ca_pem,
        namespace,
        options.failure_policy,
        options.match_conditions,
    )
    .await;
    wait_until_called(client, namespace).await;
    Webhook {
        running,
        config,
        ca_pem,
        certs_dir: dir,
        client: client.clone(),
    }
}

/// The client certificate the test control plane's apiserver presents to webhooks, for tests
/// that post reviews straight to the webhook as the apiserver would.
pub fn caller_identity() -> Option<reqwest::Identity> {
    match super::controlplane::started().as_slice() {
        [cp] => Some(
            reqwest::Identity::from_pem(cp.caller_cert_and_key().as_bytes())
                .expect("the caller certificate and key load"),
        ),
        _ => None,
    }
}

/// An HTTPS client for the webhook that trusts `ca_pem` and, with `identity`, presents that
/// client certificate.
pub fn https_client(ca_pem: &str, identity: Option<reqwest::Identity>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30));
    if let Some(identity) = identity {
        builder = builder.identity(identity);
    }
    builder.build().unwrap()
}

/// Registers a MutatingWebhookConfiguration for `namespace` pointing at `addr`, with the
/// shipped `matchConditions`.
pub async fn register(
    client: &Client,
    name: &str,
    addr: SocketAddr,
    ca_pem: &str,
    namespace: &str,
    failure_policy: &str,
) {
    register_with(client, name, addr, ca_pem, namespace, failure_policy, true).await;
}

/// [`register`], with or without the `matchConditions` (without: as on an apiserver before
/// 1.28, which calls the webhook for every CREATE and UPDATE of an ElfMachine).
pub async fn register_with(
    client: &Client,
    name: &str,
    addr: SocketAddr,
    ca_pem: &str,
    namespace: &str,
    failure_policy: &str,
    match_conditions: bool,
) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    let config = MutatingWebhookConfiguration {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: "elfmachines.static-ip.infrastructure.cluster.x-k8s.io".into(),
            admission_review_versions: vec!["v1".into()],
            client_config: WebhookClientConfig {
                url: Some(format!("https://{addr}/mutate-elfmachine")),
                ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
                service: None,
            },
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["infrastructure.cluster.x-k8s.io".into()]),
                api_versions: Some(vec!["*".into()]),
                operations: Some(vec!["CREATE".into(), "UPDATE".into()]),
                resources: Some(vec!["elfmachines".into()]),
                scope: Some("Namespaced".into()),
            }]),
            failure_policy: Some(failure_policy.into()),
            side_effects: "NoneOnDryRun".into(),
            timeout_seconds: Some(10),
            match_policy: Some("Equivalent".into()),
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_string(),
                    namespace.to_string(),
                )])),
                ..Default::default()
            }),
            reinvocation_policy: Some("IfNeeded".into()),
            match_conditions: match_conditions
                .then(cape_static_ip::webhook::review::match_conditions),
            ..Default::default()
        }]),
    };
    api.create(&PostParams::default(), &config)
        .await
        .expect("register webhook");
}

/// Waits until the apiserver calls the webhook for `namespace` (its configuration is
/// picked up asynchronously): a dry-run create that only our webhook would deny.
pub async fn wait_until_called(client: &Client, namespace: &str) {
    let api = machines(client, namespace);
    let probe = json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
        "kind": "ElfMachine",
        "metadata": {"name": "webhook-probe", "namespace": namespace,
                     "labels": {"cluster.x-k8s.io/ip-pool-name": "no-such-pool-probe"}},
        "spec": {"network": {"devices": [{"networkType": "IPV4"}]}}
    });
    let obj: kube::core::DynamicObject = serde_json::from_value(probe).unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for _ in 0..200 {
        if let Err(kube::Error::Api(s)) = api.create(&pp, &obj).await
            && s.message.contains("no-such-pool-probe")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the apiserver never called the webhook for namespace {namespace}");
}

impl Webhook {
    /// Unregisters and stops.
    pub async fn stop(self) {
        let api: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        let _ = api.delete(&self.config, &DeleteParams::default()).await;
        self.running.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.certs_dir);
    }
}

/// A dynamic API for ElfMachines in `namespace`.
pub fn machines(client: &Client, namespace: &str) -> Api<kube::core::DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &resource(
            "infrastructure.cluster.x-k8s.io",
            "v1beta1",
            "ElfMachine",
            "elfmachines",
        ),
    )
}

/// A dynamic API for metal3 IPClaims in `namespace`.
pub fn ipclaims(client: &Client, namespace: &str) -> Api<kube::core::DynamicObject> {
    dynamic(
        client,
        namespace,
        "ipam.metal3.io",
        "v1alpha1",
        "IPClaim",
        "ipclaims",
    )
}

/// A dynamic API for any namespaced kind.
pub fn dynamic(
    client: &Client,
    namespace: &str,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<kube::core::DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &resource(group, version, kind, plural),
    )
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> kube::discovery::ApiResource {
    kube::discovery::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Creates any object given as JSON in `namespace`.
pub async fn create(
    client: &Client,
    namespace: &str,
    object: Value,
) -> Result<kube::core::DynamicObject, kube::Error> {
    let api_version = object["apiVersion"].as_str().unwrap().to_string();
    let kind = object["kind"].as_str().unwrap().to_string();
    let (group, version) = api_version.split_once('/').unwrap_or(("", &api_version));
    let plural = format!("{}s", kind.to_lowercase()).replace("ipaddresss", "ipaddresses");
    let api = dynamic(client, namespace, group, version, &kind, &plural);
    let obj: kube::core::DynamicObject = serde_json::from_value(object).unwrap();
    api.create(&PostParams::default(), &obj).await
}

/// An IPPool.
pub fn pool(name: &str, spec: Value, labels: Value) -> Value {
    json!({
        "apiVersion": "ipam.metal3.io/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    })
}

/// An ElfMachineTemplate with pool-selection labels.
pub fn template(name: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
        "kind": "ElfMachineTemplate",
        "metadata": {"name": name, "labels": labels},
        "spec": {"template": {"spec": {"template": "vm-template", "network": {"devices": [{"networkType": "IPV4", "vlan": "vlan-1"}]}}}}
    })
}

/// An ElfMachine exactly as a CAPI MachineSet creates it: explicit name, cluster-name label,
/// cloned-from annotations, a non-controller ownerRef to the MachineSet, no uid.
pub fn capi_machine(name: &str, template: &str, devices: Value) -> Value {
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
        "kind": "ElfMachine",
        "metadata": {
            "name": name,
            "labels": {
                "cluster.x-k8s.io/cluster-name": "demo",
                "cluster.x-k8s.io/deployment-name": "demo-md-0",
                "cluster.x-k8s.io/set-name": "demo-md-0-8f7qk"
            },
            "annotations": {
                "cluster.x-k8s.io/cloned-from-name": template,
                "cluster.x-k8s.io/cloned-from-groupkind": "ElfMachineTemplate.infrastructure.cluster.x-k8s.io"
            },
            "ownerReferences": [{
                "apiVersion": "cluster.x-k8s.io/v1beta2",
                "kind": "MachineSet",
                "name": "demo-md-0-8f7qk",
                "uid": "0b7c1c52-2d7e-4d5b-9a53-0e8f3c1d2a77"
            }]
        },
        "spec": {
            "osType": "LINUX",
            "template": "vm-template",
            "ha": true,
            "cloneMode": "FastClone",
            "numCPUS": 4,
            "numCoresPerSocket": 4,
            "memoryMiB": 6144,
            "diskGiB": 0,
            "network": {"nameservers": [], "devices": devices}
        }
    })
}
