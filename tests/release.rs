//! `make release` as clusterctl installs it: `hack/release.sh release` writes components.yaml and
//! metadata.yaml, a clusterctl configuration points at a local provider repository (file://)
//! holding them, `clusterctl generate provider --ipam cape-static-ip` renders the components
//! with the variable substituted and the image overridden as clusterctl's configuration says,
//! and the real apiserver accepts the result (server-side dry run, cert-manager's CRDs
//! installed). clusterctl is built from the Cluster API Go module at a
//! pinned version (hack/controlplane/build.sh --clusterctl).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::controlplane::{CrdSet, shared, temp_namespace};
use common::tools::{self, root, run, temp_dir, yaml_docs};
use serde_json::Value;

const PROVIDER: &str = "cape-static-ip";
const RELEASE_IMAGE: &str = "registry.example/cape-static-ip";
const MIRROR: &str = "mirror.example/capi";
const MIRROR_TAG: &str = "v0.1.0-rc.1";

fn version() -> String {
    run(Command::new("bash")
        .arg(root().join("hack/release.sh"))
        .arg("version"))
    .0
    .trim()
    .to_owned()
}

/// A clusterctl provider repository (`<base>/ipam-cape-static-ip/v<version>/`) holding what
/// `hack/release.sh release` wrote, and a clusterctl configuration naming it.
struct Repository {
    dir: PathBuf,
    /// Names the repository.
    config: PathBuf,
    /// Names the repository and overrides its image (a mirror).
    mirror_config: PathBuf,
    version: String,
}

impl Repository {
    fn release() -> Self {
        let version = version();
        let dir = temp_dir("clusterctl");
        let out = dir.join("out");
        let (_, said) = run(Command::new("bash")
            .arg(root().join("hack/release.sh"))
            .arg("release")
            .arg(format!("{RELEASE_IMAGE}:v{version}"))
            .env("OUT", &out)
            .env("KUBECTL", tools::kubectl()));
        eprintln!(
            "$ OUT={} hack/release.sh release {RELEASE_IMAGE}:v{version}\n{said}",
            out.display()
        );
        let release = dir.join(format!("repository/ipam-{PROVIDER}/v{version}"));
        std::fs::create_dir_all(&release).unwrap();
        for file in ["components.yaml", "metadata.yaml"] {
            std::fs::copy(out.join(file), release.join(file))
                .unwrap_or_else(|e| panic!("release.sh wrote {file}: {e}"));
        }
        let providers = format!(
            "providers:\n  - name: {PROVIDER}\n    type: IPAMProvider\n    url: file://{}\n",
            release.join("components.yaml").display()
        );
        let config = dir.join("clusterctl.yaml");
        std::fs::write(&config, &providers).unwrap();
        let mirror_config = dir.join("clusterctl-mirror.yaml");
        let mirror = format!(
            "{providers}images:\n  ipam-{PROVIDER}:\n    repository: {MIRROR}\n    tag: {MIRROR_TAG}\n"
        );
        std::fs::write(&mirror_config, &mirror).unwrap();
        eprintln!("clusterctl-mirror.yaml:\n{mirror}");
        std::fs::create_dir_all(dir.join("home")).unwrap();
        Repository {
            dir,
            config,
            mirror_config,
            version,
        }
    }

    /// `clusterctl generate provider --ipam cape-static-ip:vVERSION ARGS...` with `vars` in its
    /// environment (and nothing of the caller's clusterctl setup); returns stdout.
    fn generate(&self, config: &Path, args: &[&str], vars: &[(&str, &str)]) -> String {
        let clusterctl = tools::tool("--clusterctl");
        let provider = format!("{PROVIDER}:v{}", self.version);
        let mut cmd = Command::new(clusterctl);
        cmd.args(["generate", "provider", "--ipam", &provider, "--config"])
            .arg(config)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.join("home"))
            .env("CLUSTERCTL_DISABLE_VERSIONCHECK", "true");
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let (stdout, stderr) = run(&mut cmd);
        let shown: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        eprintln!(
            "$ {}clusterctl generate provider --ipam {provider} --config {} {}\n{}{stderr}",
            shown.concat(),
            config.file_name().unwrap().to_string_lossy(),
            args.join(" "),
            if args.contains(&"--describe") {
                stdout.as_str()
            } else {
                ""
            }
        );
        stdout
    }
}

fn of_kind<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn container(objects: &[Value]) -> &Value {
    let deployments = of_kind(objects, "Deployment");
    assert_eq!(deployments.len(), 1);
    &deployments[0]["spec"]["template"]["spec"]["containers"][0]
}

fn arg<'a>(container: &'a Value, flag: &str) -> Option<&'a str> {
    container["args"]
        .as_array()?
        .iter()
        .filter_map(Value::as_str)
        .find_map(|a| a.strip_prefix(flag)?.strip_prefix('='))
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    run(Command::new(tools::kubectl())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args))
    .0
}

#[test]
fn metadata_names_the_release_series_of_the_crate_version() {
    let repo = Repository::release();
    let metadata = tools::yaml_file(&repo.dir.join("out/metadata.yaml")).remove(0);
    assert_eq!(metadata["kind"], "Metadata");
    assert_eq!(
        metadata["apiVersion"],
        "clusterctl.cluster.x-k8s.io/v1alpha3"
    );
    let mut parts = repo.version.split('.').map(|p| p.parse::<u64>().unwrap());
    let series = &metadata["releaseSeries"][0];
    assert_eq!(series["major"], parts.next().unwrap());
    assert_eq!(series["minor"], parts.next().unwrap());
    // clusterctl v1.14 accepts providers of the v1beta2 contract and, for now, v1beta1.
    assert!(matches!(
        series["contract"].as_str(),
        Some("v1beta1" | "v1beta2")
    ));
    let _ = std::fs::remove_dir_all(&repo.dir);
}

#[tokio::test]
async fn clusterctl_renders_the_release_with_its_variables_and_the_apiserver_accepts_it() {
    let repo = Repository::release();

    // What clusterctl finds: the variable (its default is checked below) and the image.
    let described = repo.generate(&repo.config, &["--describe"], &[]);
    let listed = |header: &str| -> Vec<String> {
        described
            .lines()
            .skip_while(|l| *l != header)
            .skip(1)
            .map_while(|l| l.strip_prefix("  - "))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        listed("Variables:"),
        ["CAPE_STATIC_IP_DEFAULT_POOL_NAMESPACE"],
        "{described}"
    );
    assert_eq!(
        listed("Images:"),
        [format!("{RELEASE_IMAGE}:v{}", repo.version)],
        "{described}"
    );

    // Defaults: the released image, pools in cape-system, installed in cape-system.
    let defaults = yaml_docs(&repo.generate(&repo.config, &[], &[]));
    let c = container(&defaults);
    assert_eq!(c["image"], format!("{RELEASE_IMAGE}:v{}", repo.version));
    assert_eq!(arg(c, "--default-pool-namespace"), Some("cape-system"));
    assert_eq!(
        of_kind(&defaults, "Namespace")[0]["metadata"]["name"],
        "cape-system"
    );

    // The variable set, the image from a mirror, and another target namespace: a fresh one on the test control plane.
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "capi-ipam").await;
    let text = repo.generate(
        &repo.mirror_config,
        &["--target-namespace", &ns],
        &[("CAPE_STATIC_IP_DEFAULT_POOL_NAMESPACE", "ipam-pools")],
    );
    assert!(!text.contains("${"), "every variable substituted:\n{text}");
    let objects = yaml_docs(&text);
    let c = container(&objects);
    assert_eq!(c["image"], format!("{MIRROR}/cape-static-ip:{MIRROR_TAG}"));
    assert_eq!(arg(c, "--default-pool-namespace"), Some("ipam-pools"));
    let provider_label = format!("ipam-{PROVIDER}");
    for o in &objects {
        let labels = &o["metadata"]["labels"];
        assert_eq!(
            labels["cluster.x-k8s.io/provider"],
            provider_label.as_str(),
            "{o}"
        );
        assert!(labels.get("clusterctl.cluster.x-k8s.io").is_some(), "{o}");
        if let Some(namespace) = o["metadata"].get("namespace") {
            assert_eq!(namespace, ns.as_str(), "{o}");
        }
    }
    // clusterctl moved every reference to the namespace, not only metadata.namespace.
    let webhook = &of_kind(&objects, "MutatingWebhookConfiguration")[0];
    assert_eq!(
        webhook["webhooks"][0]["clientConfig"]["service"]["namespace"],
        ns.as_str()
    );
    let inject = webhook["metadata"]["annotations"]["cert-manager.io/inject-ca-from"]
        .as_str()
        .unwrap();
    assert!(inject.starts_with(&format!("{ns}/")), "{inject}");
    let serving = of_kind(&objects, "Certificate")
        .into_iter()
        .find(|c| c["spec"]["dnsNames"].is_array())
        .expect("a serving Certificate with dnsNames");
    assert!(
        serving["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d.as_str().unwrap().contains(&format!(".{ns}.svc"))),
        "{serving}"
    );
    for binding in of_kind(&objects, "ClusterRoleBinding") {
        for s in binding["subjects"].as_array().unwrap() {
            assert_eq!(s["namespace"], ns.as_str(), "{binding}");
        }
    }

    // The rendered provider through the real apiserver (cert-manager's CRDs installed for its
    // Issuers and Certificates), without persisting anything.
    let kubeconfig = cp.kubeconfig();
    let (crds, _) =
        run(Command::new("bash").arg(root().join("hack/controlplane/certmanager-crds.sh")));
    kubectl(kubeconfig, &["apply", "--server-side", "-f", crds.trim()]);
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/certificates.cert-manager.io",
            "crd/issuers.cert-manager.io",
        ],
    );
    let file = repo.dir.join("generated.yaml");
    std::fs::write(&file, &text).unwrap();
    let dry_run = kubectl(
        kubeconfig,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    eprintln!("$ kubectl apply --server-side --dry-run=server -f generated.yaml\n{dry_run}");
    let accepted = dry_run
        .lines()
        .filter(|l| l.ends_with("serverside-applied (server dry run)"))
        .count();
    assert_eq!(accepted, objects.len(), "every object accepted:\n{dry_run}");
    let _ = std::fs::remove_dir_all(&repo.dir);
}
