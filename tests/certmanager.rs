//! The manifests against cert-manager's real CRDs, on the real apiserver.
//!
//! cert-manager's controllers cannot be built here, but its CRDs can be had: they come from the
//! Go module `github.com/cert-manager/cert-manager` v1.21 (`deploy/crds/`, located by
//! `hack/controlplane/certmanager-crds.sh`). This test installs them, has the apiserver accept
//! the whole kustomize base (`kubectl apply -k manifests --server-side --dry-run=server`), then
//! applies the certificate objects, the Service, the Deployment and the webhook configuration,
//! plays cert-manager's part (the Secrets its controllers write, the `caBundle` its cainjector
//! fills from `cert-manager.io/inject-ca-from`) and checks that everything is wired together.
//!
//! Its own test binary (so its own control plane): the shipped MutatingWebhookConfiguration
//! catches ElfMachines in every namespace and calls a Service with no pods behind it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use cape_static_ip::cluster::certmanager::{Certificate, INJECT_CA_FROM, Issuer};
use common::controlplane::{ControlPlane, CrdSet, shared};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use kube::api::{DeleteParams, ObjectMeta, PostParams};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};

const CRDS: [&str; 6] = [
    "certificaterequests.cert-manager.io",
    "certificates.cert-manager.io",
    "clusterissuers.cert-manager.io",
    "issuers.cert-manager.io",
    "challenges.acme.cert-manager.io",
    "orders.acme.cert-manager.io",
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a command; panics with its output unless it succeeds. Returns stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn kubectl_binary() -> String {
    run(Command::new("bash")
        .arg(root().join("hack/controlplane/build.sh"))
        .arg("--print"))
    .lines()
    .find(|l| l.ends_with("/kubectl"))
    .expect("build.sh --print names kubectl")
    .to_string()
}

struct Kubectl {
    binary: String,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(cp: &ControlPlane) -> Self {
        Kubectl {
            binary: kubectl_binary(),
            kubeconfig: cp.kubeconfig().to_path_buf(),
        }
    }

    fn run(&self, args: &[&str]) -> String {
        run(Command::new(&self.binary)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .current_dir(root()))
    }
}

/// A kustomization (`manifests`, or an overlay) as rendered by `kubectl kustomize`, as JSON
/// objects.
fn rendered(kubectl: &Kubectl, dir: &str) -> Vec<Value> {
    let yaml = kubectl.run(&["kustomize", dir]);
    let mut python = Command::new("python3");
    python.args([
        "-c",
        "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
    ]);
    let out = {
        use std::io::Write;
        let mut child = python
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (with PyYAML)");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };
    assert!(
        out.status.success(),
        "python3 could not read the rendered manifests: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(objects, kind);
    assert_eq!(found.len(), 1, "exactly one {kind} in manifests/");
    found[0]
}

fn name_of(object: &Value) -> String {
    object["metadata"]["name"].as_str().unwrap().to_string()
}

/// Writes `objects` as a `v1/List` into `dir/file` and returns its path.
fn list_file(dir: &Path, file: &str, objects: &[&Value]) -> PathBuf {
    let path = dir.join(file);
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    std::fs::write(&path, serde_json::to_vec_pretty(&list).unwrap()).unwrap();
    path
}

fn secret(namespace: &str, name: &str, data: &[(&str, &str)], annotations: Value) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            annotations: serde_json::from_value(annotations).unwrap(),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// cainjector's job for one webhook configuration: `inject-ca-from: <ns>/<Certificate>` →
/// that Certificate's `secretName` → the Secret's `ca.crt` → every webhook's `caBundle`.
async fn inject_ca(client: &kube::Client, name: &str) {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut config = configs.get(name).await.unwrap();
    let from = config
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(INJECT_CA_FROM))
        .unwrap_or_else(|| panic!("{name} has no {INJECT_CA_FROM} annotation"))
        .clone();
    let (namespace, certificate) = from
        .split_once('/')
        .unwrap_or_else(|| panic!("{INJECT_CA_FROM}: {from:?} is not <namespace>/<name>"));
    let certificate = Api::<Certificate>::namespaced(client.clone(), namespace)
        .get(certificate)
        .await
        .unwrap_or_else(|e| panic!("{INJECT_CA_FROM} names Certificate {from}: {e}"));
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&certificate.spec.secret_name)
        .await
        .unwrap();
    let ca = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .expect("the serving Secret has ca.crt")
        .clone();
    for webhook in config.webhooks.iter_mut().flatten() {
        webhook.client_config.ca_bundle = Some(ca.clone());
    }
    configs
        .replace(name, &PostParams::default(), &config)
        .await
        .unwrap();
}

/// A TLS handshake (in memory) between our server configuration for `cert`/`key` and a client
/// that trusts only `ca_pem` and verifies `name`, as the apiserver does when it calls the
/// webhook through its Service. Returns the leaf the server presented.
fn handshake(cert: &Path, key: &Path, ca_pem: &[u8], name: &str) -> Result<Vec<u8>, String> {
    let server_config = cape_static_ip::webhook::tls::ReloadingCert::new(cert.into(), key.into())
        .map_err(|e| e.to_string())?
        .server_config(false);
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(ca.map_err(|e| e.to_string())?).unwrap();
    }
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let mut client =
        rustls::ClientConnection::new(Arc::new(client_config), name).map_err(|e| e.to_string())?;
    let mut server =
        rustls::ServerConnection::new(Arc::new(server_config)).map_err(|e| e.to_string())?;
    for _ in 0..10 {
        if !client.is_handshaking() && !server.is_handshaking() {
            break;
        }
        let mut bytes = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut bytes).unwrap();
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            server.read_tls(&mut rest).unwrap();
            server.process_new_packets().map_err(|e| e.to_string())?;
        }
        let mut bytes = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut bytes).unwrap();
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            client.read_tls(&mut rest).unwrap();
            client.process_new_packets().map_err(|e| e.to_string())?;
        }
    }
    assert!(!client.is_handshaking(), "handshake did not finish");
    Ok(client.peer_certificates().unwrap()[0].as_ref().to_vec())
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], flag: &str) -> &'a str {
    args.iter()
        .find_map(|a| a.strip_prefix(&format!("--{flag}=")))
        .unwrap_or_else(|| panic!("the container has no --{flag}=: {args:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_are_accepted_with_the_cert_manager_crds_and_wired_together() {
    let cp = shared(CrdSet::Current);
    let kubectl = Kubectl::new(cp);
    install_cert_manager_crds(&kubectl);
    // The base as shipped, then installed into another namespace by an overlay (the
    // webhook configuration is cluster-wide: one after the other).
    wired_together(cp, &kubectl, "manifests").await;
    let overlay = format!("target/certmanager-overlay-{}", std::process::id());
    let dir = root().join(&overlay);
    std::fs::create_dir_all(dir.join("namespace")).unwrap();
    std::fs::write(
        dir.join("namespace/kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\nnamespace: capi-ipam\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
         resources:\n  - ../../manifests\n\
         components:\n  - namespace\n  - ../../manifests/components/follow-namespace\n",
    )
    .unwrap();
    let ns = wired_together(cp, &kubectl, &overlay).await;
    assert_eq!(ns, "capi-ipam");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn install_cert_manager_crds(kubectl: &Kubectl) {
    // cert-manager's CRDs, from its Go module.
    let crds = run(Command::new("bash").arg(root().join("hack/controlplane/certmanager-crds.sh")));
    let crds = crds.trim();
    assert!(
        crds.contains("github.com/cert-manager/cert-manager@v1.21."),
        "{crds}"
    );
    kubectl.run(&["apply", "--server-side", "-f", crds]);
    let mut wait = vec!["wait", "--for=condition=Established", "--timeout=60s"];
    let crd_refs: Vec<String> = CRDS.iter().map(|c| format!("crd/{c}")).collect();
    wait.extend(crd_refs.iter().map(String::as_str));
    kubectl.run(&wait);
}

/// Server-side dry run of everything in `dir`, then the wiring of what it installs (with
/// cert-manager's and cainjector's parts played), a TLS handshake for the Service's DNS name
/// included. Returns the namespace it installed into.
async fn wired_together(cp: &ControlPlane, kubectl: &Kubectl, dir: &str) -> String {
    let client = cp.client().await;
    let work = cp
        .dir()
        .join("certmanager-test")
        .join(dir.replace('/', "-"));
    std::fs::create_dir_all(&work).unwrap();

    // The whole base, through every admission step of the real apiserver (schemas of the
    // cert-manager CRDs included), without persisting anything. The namespace must exist for
    // the namespaced objects of a dry run (a real apply creates it first).
    let objects = rendered(kubectl, dir);
    let namespace_object = one(&objects, "Namespace");
    let ns = name_of(namespace_object);
    let file = list_file(&work, "namespace.json", &[namespace_object]);
    kubectl.run(&["apply", "--server-side", "-f", file.to_str().unwrap()]);
    let dry_run = kubectl.run(&["apply", "-k", dir, "--server-side", "--dry-run=server"]);
    let accepted = dry_run
        .lines()
        .filter(|l| l.ends_with("serverside-applied (server dry run)"))
        .count();
    assert_eq!(
        accepted,
        objects.len(),
        "every object of manifests/ accepted:\n{dry_run}"
    );
    eprintln!("server-side dry run of {dir}:\n{dry_run}");

    // Really apply what the wiring needs (everything but RBAC), as `kubectl apply -k` would.
    let applied: Vec<&Value> = objects
        .iter()
        .filter(|o| {
            [
                "Issuer",
                "Certificate",
                "Service",
                "Deployment",
                "MutatingWebhookConfiguration",
            ]
            .contains(&o["kind"].as_str().unwrap())
        })
        .collect();
    let applied_file = list_file(&work, "applied.json", &applied);
    kubectl.run(&[
        "apply",
        "--server-side",
        "-f",
        applied_file.to_str().unwrap(),
    ]);

    // Read back through the typed cert-manager structs (which deny unknown fields).
    let certificates: Vec<Certificate> = Api::<Certificate>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let issuers: Vec<Issuer> = Api::<Issuer>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    let config_name = name_of(one(&objects, "MutatingWebhookConfiguration"));
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = configs.get(&config_name).await.unwrap();
    let from = config.metadata.annotations.as_ref().unwrap()[INJECT_CA_FROM].clone();
    assert_eq!(from.split_once('/').unwrap().0, ns);
    let serving_name = from.split_once('/').unwrap().1;
    let by_name = |n: &str| {
        certificates
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(n))
            .unwrap_or_else(|| panic!("no Certificate {ns}/{n}"))
    };
    let issuer = |n: &str| {
        issuers
            .iter()
            .find(|i| i.metadata.name.as_deref() == Some(n))
            .unwrap_or_else(|| panic!("no Issuer {ns}/{n}"))
    };
    let serving = by_name(serving_name);

    // The chain cert-manager would build: serving Certificate → CA Issuer → the CA
    // Certificate's Secret → that Certificate (isCA) → the self-signed Issuer.
    let ca_issuer = issuer(&serving.spec.issuer_ref.name);
    assert!(
        serving
            .spec
            .issuer_ref
            .is_issuer(&serving.spec.issuer_ref.name)
    );
    let ca_secret_name = &ca_issuer
        .spec
        .ca
        .as_ref()
        .expect("the serving Certificate's Issuer is a CA Issuer")
        .secret_name;
    let ca_certificate = certificates
        .iter()
        .find(|c| &c.spec.secret_name == ca_secret_name)
        .unwrap_or_else(|| panic!("no Certificate writes the CA Issuer's Secret {ca_secret_name}"));
    assert_eq!(ca_certificate.spec.is_ca, Some(true));
    let root_issuer = issuer(&ca_certificate.spec.issuer_ref.name);
    assert!(root_issuer.spec.self_signed.is_some() && root_issuer.spec.is_valid());

    // Play cert-manager: sign the CA and the serving certificate for the Certificate's names,
    // write both Secrets as its controllers do.
    assert!(!serving.spec.dns_names.is_empty());
    let pki = cape_static_ip::webhook::certs::generate(&serving.spec.dns_names, 90).unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let annotations = |c: &Certificate| {
        json!({
            "cert-manager.io/certificate-name": c.metadata.name,
            "cert-manager.io/issuer-name": c.spec.issuer_ref.name,
            "cert-manager.io/issuer-kind": "Issuer",
            "cert-manager.io/issuer-group": "cert-manager.io",
        })
    };
    for s in [
        secret(
            &ns,
            ca_secret_name,
            &[
                ("tls.crt", &pki.ca_cert),
                ("tls.key", &pki.ca_key),
                ("ca.crt", &pki.ca_cert),
            ],
            annotations(ca_certificate),
        ),
        secret(
            &ns,
            &serving.spec.secret_name,
            &[
                ("tls.crt", &pki.cert),
                ("tls.key", &pki.key),
                ("ca.crt", &pki.ca_cert),
            ],
            annotations(serving),
        ),
    ] {
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    // Play cainjector.
    inject_ca(&client, &config_name).await;

    // The wiring.
    let config = configs.get(&config_name).await.unwrap();
    let webhooks = config.webhooks.clone().unwrap();
    assert!(!webhooks.is_empty());
    let deployment_name = name_of(one(&objects, "Deployment"));
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get(&deployment_name)
        .await
        .unwrap();
    let pod = deployment.spec.as_ref().unwrap().template.clone();
    let pod_labels = pod.metadata.as_ref().unwrap().labels.clone().unwrap();
    let pod_spec = pod.spec.unwrap();
    let container = &pod_spec.containers[0];
    let args = container.args.clone().unwrap();

    // 1. The Deployment mounts the serving Certificate's Secret where --tls-cert-file and
    //    --tls-key-file point, and both files are keys of that Secret.
    let volume = pod_spec
        .volumes
        .iter()
        .flatten()
        .find(|v| {
            v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                == Some(serving.spec.secret_name.as_str())
        })
        .unwrap_or_else(|| {
            panic!(
                "the Deployment mounts no volume of Secret {}",
                serving.spec.secret_name
            )
        });
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("the serving Secret's volume is mounted");
    assert!(
        mount.sub_path.is_none(),
        "a subPath mount never sees the kubelet's ..data swap on renewal"
    );
    let stored = secrets.get(&serving.spec.secret_name).await.unwrap();
    let stored_data = stored.data.clone().unwrap();
    for file_flag in ["tls-cert-file", "tls-key-file"] {
        let path = Path::new(flag(&args, file_flag));
        assert_eq!(
            path.parent().unwrap(),
            Path::new(&mount.mount_path),
            "--{file_flag} is in the Secret's mount"
        );
        let key = path.file_name().unwrap().to_str().unwrap();
        assert!(
            stored_data.contains_key(key),
            "--{file_flag}: the Secret has no key {key}"
        );
    }

    for webhook in &webhooks {
        // 2. The Service the webhook configuration calls exists, on that port, and leads to
        //    the container port the server listens on, of the Deployment's pods.
        let service_ref = webhook
            .client_config
            .service
            .as_ref()
            .expect("the webhook is called through a Service");
        let port = service_ref.port.unwrap_or(443);
        let service = Api::<Service>::namespaced(client.clone(), &service_ref.namespace)
            .get(&service_ref.name)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{}/{} called by {}: {e}",
                    service_ref.namespace, service_ref.name, webhook.name
                )
            });
        let service_spec = service.spec.unwrap();
        let selector: BTreeMap<String, String> = service_spec.selector.clone().unwrap();
        assert!(
            selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)),
            "the Service selects the Deployment's pods: {selector:?} vs {pod_labels:?}"
        );
        let service_port = service_spec
            .ports
            .iter()
            .flatten()
            .find(|p| p.port == port)
            .unwrap_or_else(|| panic!("Service {} has no port {port}", service_ref.name));
        let container_port = match service_port.target_port.clone() {
            Some(IntOrString::String(name)) => {
                container
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name.as_deref() == Some(name.as_str()))
                    .unwrap_or_else(|| panic!("the container has no port named {name}"))
                    .container_port
            }
            Some(IntOrString::Int(n)) => n,
            None => port,
        };
        let listen = flag(&args, "listen");
        assert_eq!(
            listen.rsplit_once(':').unwrap().1,
            container_port.to_string(),
            "--listen is the port the Service targets"
        );
        assert_eq!(
            service_ref.path.as_deref(),
            Some("/mutate-elfmachine"),
            "the path the server routes"
        );
        // 3. caBundle is the CA, and the served certificate verifies for the Service's DNS
        //    name (the name the apiserver checks) under it.
        assert_eq!(
            webhook.client_config.ca_bundle.as_ref().map(|b| &b.0[..]),
            Some(pki.ca_cert.as_bytes()),
            "caBundle of {} is the CA",
            webhook.name
        );
        let dns = format!("{}.{}.svc", service_ref.name, service_ref.namespace);
        assert!(serving.spec.dns_names.contains(&dns), "{dns} in dnsNames");
        let files = work.join("mounted");
        std::fs::create_dir_all(&files).unwrap();
        for (key, value) in &stored_data {
            std::fs::write(files.join(key), &value.0).unwrap();
        }
        let ca_bundle = &webhook.client_config.ca_bundle.as_ref().unwrap().0;
        let leaf = handshake(
            &files.join("tls.crt"),
            &files.join("tls.key"),
            ca_bundle,
            &dns,
        )
        .unwrap_or_else(|e| panic!("TLS to {dns} with the injected caBundle: {e}"));
        assert_eq!(
            leaf,
            CertificateDer::from_pem_slice(pki.cert.as_bytes())
                .unwrap()
                .as_ref()
        );
        let wrong = format!("{}.elsewhere.svc", service_ref.name);
        assert!(
            handshake(
                &files.join("tls.crt"),
                &files.join("tls.key"),
                ca_bundle,
                &wrong
            )
            .is_err(),
            "the certificate must not verify for {wrong}"
        );
    }

    // Clean up: the webhook configuration would catch every ElfMachine in this cluster.
    configs
        .delete(&config_name, &DeleteParams::default())
        .await
        .unwrap();
    kubectl.run(&[
        "delete",
        "--ignore-not-found",
        "--wait=false",
        "-f",
        applied_file.to_str().unwrap(),
    ]);
    for name in [ca_secret_name, &serving.spec.secret_name] {
        secrets
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    assert!(configs.get_opt(&config_name).await.unwrap().is_none());
    ns
}
