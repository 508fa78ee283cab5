//! Checks of the kustomize base in `manifests/` (pure: no cluster).
//!
//! The YAML is converted to JSON by `python3` with PyYAML (the crate has no YAML parser), then
//! cert-manager objects are deserialized into the typed structs of
//! `cape_static_ip::cluster::certmanager` (which deny unknown fields) and the RBAC, Deployment,
//! Service and webhook configuration are checked field by field.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use cape_static_ip::cluster::certmanager::{Certificate, INJECT_CA_FROM, Issuer};
use serde_json::Value;

const NAMESPACE: &str = "cape-system";
const SERVING_SECRET: &str = "cape-static-ip-webhook-tls";
const SERVICE: &str = "cape-static-ip-webhook";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests")
}

/// All documents of one YAML file, as JSON (empty documents dropped).
fn load_yaml(path: &Path) -> Vec<Value> {
    const SCRIPT: &str =
        "import yaml,json,sys; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))";
    let out = Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running python3 (with PyYAML) to read {}: {e}",
                path.display()
            )
        });
    assert!(
        out.status.success(),
        "python3 could not parse {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).expect("python3 printed JSON");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

struct Base {
    kustomization: Value,
    objects: Vec<Value>,
}

impl Base {
    /// The base, read once per test binary (each file costs a python3 start).
    fn load() -> &'static Base {
        static BASE: OnceLock<Base> = OnceLock::new();
        BASE.get_or_init(Base::read)
    }

    fn read() -> Self {
        let dir = manifests_dir();
        let kustomization = load_yaml(&dir.join("kustomization.yaml")).remove(0);
        let resources: Vec<String> = strings(&kustomization["resources"]);
        let mut objects = Vec::new();
        for r in &resources {
            objects.extend(load_yaml(&dir.join(r)));
        }
        Base {
            kustomization,
            objects,
        }
    }

    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, name: &str) -> &Value {
        let found: Vec<&Value> = self
            .all(kind)
            .into_iter()
            .filter(|o| o["metadata"]["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "exactly one {kind} {name} in manifests/");
        found[0]
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, got {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("expected a string, got {s}"))
                .to_owned()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn kustomization_lists_every_file_and_sets_namespace_and_image() {
    let base = Base::load();
    let k = &base.kustomization;
    assert_eq!(k["namespace"], NAMESPACE);
    let listed: BTreeSet<String> = strings(&k["resources"]).into_iter().collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(manifests_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, on_disk,
        "every manifests/*.yaml is a resource of the base"
    );

    let images = k["images"].as_array().expect("images");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["name"], "cape-static-ip");
    assert_eq!(images[0]["newTag"], "dev");
    let dep = base.one("Deployment", "cape-static-ip");
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["image"],
        "cape-static-ip"
    );

    // Namespaced objects are in cape-system (or left to the kustomization).
    for o in &base.objects {
        let ns = &o["metadata"]["namespace"];
        assert!(
            ns.is_null() || ns == NAMESPACE,
            "{} {} is in {ns}",
            o["kind"],
            o["metadata"]["name"]
        );
    }
    assert_eq!(base.one("Namespace", NAMESPACE)["apiVersion"], "v1");
    assert_eq!(
        base.one("ServiceAccount", "cape-static-ip")["metadata"]["namespace"],
        NAMESPACE
    );
}

#[test]
fn cluster_role_grants_exactly_what_the_code_uses() {
    let base = Base::load();
    let role = base.one("ClusterRole", "cape-static-ip");
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none());
        let groups = strings(&rule["apiGroups"]);
        let resources = strings(&rule["resources"]);
        let verbs = strings(&rule["verbs"]);
        for s in groups.iter().chain(&resources).chain(&verbs) {
            assert!(!s.contains('*'), "wildcard {s:?} in the ClusterRole");
        }
        for g in &groups {
            for r in &resources {
                granted
                    .entry((g.clone(), r.clone()))
                    .or_default()
                    .extend(verbs.iter().cloned());
            }
        }
    }
    let read = ["get", "list", "watch"];
    let expected: BTreeMap<(String, String), BTreeSet<String>> = [
        ("ipam.metal3.io", "ippools", set(&read)),
        ("ipam.metal3.io", "ippools/status", set(&["patch"])),
        (
            "ipam.metal3.io",
            "ipaddresses",
            set(&["get", "list", "watch", "create", "delete", "patch"]),
        ),
        (
            "ipam.metal3.io",
            "ipclaims",
            set(&["get", "list", "watch", "create", "delete", "patch"]),
        ),
        ("ipam.metal3.io", "ipclaims/status", set(&["patch"])),
        (
            "infrastructure.cluster.x-k8s.io",
            "elfmachines",
            set(&["get", "list", "watch", "patch"]),
        ),
        (
            "infrastructure.cluster.x-k8s.io",
            "elfmachinetemplates",
            set(&read),
        ),
        (
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            set(&read),
        ),
        ("", "events", set(&["create", "patch"])),
        ("events.k8s.io", "events", set(&["create", "patch"])),
        ("authentication.k8s.io", "tokenreviews", set(&["create"])),
    ]
    .into_iter()
    .map(|(g, r, v)| ((g.to_owned(), r.to_owned()), v))
    .collect();
    assert_eq!(granted, expected);

    let binding = base.one("ClusterRoleBinding", "cape-static-ip");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "cape-static-ip");
    let subjects = binding["subjects"].as_array().unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0]["kind"], "ServiceAccount");
    assert_eq!(subjects[0]["name"], "cape-static-ip");
    assert_eq!(subjects[0]["namespace"], NAMESPACE);
}

#[test]
fn deployment_is_hardened_and_probed() {
    let base = Base::load();
    let dep = base.one("Deployment", "cape-static-ip");
    let spec = &dep["spec"];
    assert_eq!(spec["replicas"], 2);
    let pod_labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], pod_labels);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "cape-static-ip");
    assert_eq!(pod["terminationGracePeriodSeconds"], 30);

    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    let term = &anti[0]["podAffinityTerm"];
    assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&term["labelSelector"]["matchLabels"], pod_labels);

    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args = strings(&c["args"]);
    assert_eq!(args[0], "serve");
    // Only the apiserver may send reviews: enforce, with the cluster CA the pod already has.
    for flag in [
        "--auth-mode=enforce",
        "--auth-client-ca-file=/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        "--auth-allowed-users=kube-apiserver-kubelet-client",
    ] {
        assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
    }
    assert_eq!(
        pod["automountServiceAccountToken"], true,
        "the CA comes with the token"
    );
    assert!(
        c.get("lifecycle").is_none(),
        "no preStop hook: the image has no shell"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");

    let res = &c["resources"];
    assert_eq!(res["requests"]["cpu"], "50m");
    assert_eq!(res["requests"]["memory"], "64Mi");
    assert_eq!(res["limits"]["cpu"], "500m");
    assert_eq!(res["limits"]["memory"], "256Mi");

    let ports: BTreeMap<String, i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("admin".to_owned(), 8080), ("webhook".to_owned(), 9443)])
    );
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        let port = &get["port"];
        assert!(
            port == "admin" || port == 8080,
            "{probe} on the admin port, got {port}"
        );
        assert!(get["scheme"].is_null() || get["scheme"] == "HTTP");
    }

    // The serving Secret, mounted as a directory (no subPath: renewals must be visible).
    let mounts = c["volumeMounts"].as_array().unwrap();
    let tls_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == "/etc/cape-static-ip/tls")
        .expect("tls mount");
    assert!(tls_mount.get("subPath").is_none());
    assert_eq!(tls_mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == tls_mount["name"])
        .expect("tls volume");
    assert_eq!(volume["secret"]["secretName"], SERVING_SECRET);

    let pdb = base.one("PodDisruptionBudget", "cape-static-ip");
    assert_eq!(pdb["apiVersion"], "policy/v1");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], pod_labels);
}

#[test]
fn service_routes_443_to_the_webhook_port_and_exposes_metrics() {
    let base = Base::load();
    let svc = base.one("Service", SERVICE);
    let dep = base.one("Deployment", "cape-static-ip");
    let pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "Service selector {k} matches the pods"
        );
    }
    let container_port = |name: &Value| -> i64 {
        if let Some(n) = name.as_i64() {
            return n;
        }
        dep["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| &p["name"] == name)
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    let ports: BTreeMap<i64, i64> = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap(),
                container_port(&p["targetPort"]),
            )
        })
        .collect();
    assert_eq!(ports, BTreeMap::from([(443, 9443), (8080, 8080)]));
}

#[test]
fn cert_manager_objects_parse_into_the_typed_structs_and_chain_up() {
    let base = Base::load();
    let issuers: BTreeMap<String, Issuer> = base
        .all("Issuer")
        .into_iter()
        .map(|o| {
            assert_eq!(o["apiVersion"], "cert-manager.io/v1");
            let i: Issuer = serde_json::from_value(o.clone()).unwrap_or_else(|e| {
                panic!(
                    "Issuer {} does not match the typed struct: {e}",
                    o["metadata"]["name"]
                )
            });
            assert!(
                i.spec.is_valid(),
                "Issuer {:?}: exactly one of selfSigned, ca",
                i.metadata.name
            );
            (i.metadata.name.clone().unwrap(), i)
        })
        .collect();
    let certs: BTreeMap<String, Certificate> = base
        .all("Certificate")
        .into_iter()
        .map(|o| {
            assert_eq!(o["apiVersion"], "cert-manager.io/v1");
            let c: Certificate = serde_json::from_value(o.clone()).unwrap_or_else(|e| {
                panic!(
                    "Certificate {} does not match the typed struct: {e}",
                    o["metadata"]["name"]
                )
            });
            (c.metadata.name.clone().unwrap(), c)
        })
        .collect();
    assert_eq!(issuers.len(), 2);
    assert_eq!(certs.len(), 2);

    // The serving certificate, named by the webhook configuration's inject-ca-from.
    let webhook = base.one("MutatingWebhookConfiguration", "cape-static-ip");
    let inject = webhook["metadata"]["annotations"][INJECT_CA_FROM]
        .as_str()
        .expect("inject-ca-from");
    let (ns, name) = inject.split_once('/').expect("namespace/name");
    assert_eq!(ns, NAMESPACE);
    let serving = certs
        .get(name)
        .unwrap_or_else(|| panic!("no Certificate {name}"));
    assert_eq!(serving.spec.secret_name, SERVING_SECRET);
    assert_ne!(serving.spec.is_ca, Some(true));
    let dns: BTreeSet<&str> = serving.spec.dns_names.iter().map(String::as_str).collect();
    assert_eq!(
        dns,
        BTreeSet::from([
            "cape-static-ip-webhook.cape-system.svc",
            "cape-static-ip-webhook.cape-system.svc.cluster.local"
        ])
    );

    // serving <- CA Issuer <- CA Certificate (isCA) <- self-signed Issuer.
    let ca_issuer_name = &serving.spec.issuer_ref.name;
    assert!(serving.spec.issuer_ref.is_issuer(ca_issuer_name));
    let ca_issuer = &issuers[ca_issuer_name];
    let ca_secret = &ca_issuer
        .spec
        .ca
        .as_ref()
        .expect("the serving cert's issuer is a CA issuer")
        .secret_name;
    let ca_cert = certs
        .values()
        .find(|c| &c.spec.secret_name == ca_secret)
        .unwrap_or_else(|| panic!("no Certificate writes the CA secret {ca_secret}"));
    assert_eq!(ca_cert.spec.is_ca, Some(true));
    let root = &ca_cert.spec.issuer_ref.name;
    assert!(ca_cert.spec.issuer_ref.is_issuer(root));
    assert!(
        issuers[root].spec.self_signed.is_some(),
        "the CA is signed by the self-signed Issuer"
    );
    for c in certs.values() {
        assert!(c.spec.duration.is_some() && c.spec.renew_before.is_some());
    }
}

#[test]
fn webhook_configuration() {
    let base = Base::load();
    let cfg = base.one("MutatingWebhookConfiguration", "cape-static-ip");
    assert_eq!(cfg["apiVersion"], "admissionregistration.k8s.io/v1");
    let hooks = cfg["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    let h = &hooks[0];
    assert_eq!(
        h["name"],
        "elfmachines.static-ip.infrastructure.cluster.x-k8s.io"
    );
    assert_eq!(strings(&h["admissionReviewVersions"]), ["v1"]);
    let svc = &h["clientConfig"]["service"];
    assert_eq!(svc["name"], SERVICE);
    assert_eq!(svc["namespace"], NAMESPACE);
    assert_eq!(svc["path"], "/mutate-elfmachine");
    assert!(svc["port"].is_null() || svc["port"] == 443);
    assert!(
        h["clientConfig"].get("caBundle").is_none(),
        "cainjector fills caBundle"
    );
    assert!(h["clientConfig"].get("url").is_none());

    let rules = h["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 1);
    let r = &rules[0];
    assert_eq!(strings(&r["operations"]), ["CREATE", "UPDATE"]);
    assert_eq!(
        strings(&r["apiGroups"]),
        ["infrastructure.cluster.x-k8s.io"]
    );
    assert_eq!(strings(&r["apiVersions"]), ["*"]);
    assert_eq!(strings(&r["resources"]), ["elfmachines"]);

    assert_eq!(h["failurePolicy"], "Fail");
    assert_eq!(h["sideEffects"], "NoneOnDryRun");
    assert_eq!(h["timeoutSeconds"], 10);
    assert_eq!(h["matchPolicy"], "Equivalent");
    assert_eq!(h["reinvocationPolicy"], "IfNeeded");

    let exprs = h["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap();
    assert_eq!(exprs.len(), 1);
    assert_eq!(exprs[0]["key"], "kubernetes.io/metadata.name");
    assert_eq!(exprs[0]["operator"], "NotIn");
    let excluded: BTreeSet<String> = strings(&exprs[0]["values"]).into_iter().collect();
    assert_eq!(excluded, set(&["kube-system", "cape-system"]));
    assert!(h["namespaceSelector"].get("matchLabels").is_none());
}
