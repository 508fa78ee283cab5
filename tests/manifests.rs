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

use cape_static_ip::cluster::cache::ELFMACHINE_CRD;
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
    // (group, resource, resourceNames) -> verbs
    type Rule = (String, String, Vec<String>);
    let mut granted: BTreeMap<Rule, BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(rule.get("nonResourceURLs").is_none());
        let groups = strings(&rule["apiGroups"]);
        let resources = strings(&rule["resources"]);
        let verbs = strings(&rule["verbs"]);
        let names = match rule.get("resourceNames") {
            Some(n) => strings(n),
            None => Vec::new(),
        };
        for s in groups.iter().chain(&resources).chain(&verbs).chain(&names) {
            assert!(!s.contains('*'), "wildcard {s:?} in the ClusterRole");
        }
        for g in &groups {
            for r in &resources {
                granted
                    .entry((g.clone(), r.clone(), names.clone()))
                    .or_default()
                    .extend(verbs.iter().cloned());
            }
        }
    }
    // Each verb is a call in src/: `watch` + `list` are the reflectors and watchers
    // (cluster/cache.rs, the machine watch of the background loop), `get` a get_opt /
    // get_metadata_opt by name (cluster/writer.rs, assign.rs, the release loop), `create`,
    // `delete` and `patch` the writer's and the loops' writes (`ippools` patch: the pool
    // guard's finalizer), `ippools/status` the pool status pass, events.k8s.io the event
    // publisher (events.rs). No `ippools get`: pools come from the watch only. No core
    // `events`: events are events.k8s.io/v1.
    let watch = ["list", "watch"];
    let read = ["get", "list", "watch"];
    let write = ["get", "list", "watch", "create", "delete", "patch"];
    let expected: BTreeMap<Rule, BTreeSet<String>> = [
        (
            "ipam.metal3.io",
            "ippools",
            &[][..],
            set(&["list", "watch", "patch"]),
        ),
        ("ipam.metal3.io", "ippools/status", &[], set(&["patch"])),
        ("ipam.metal3.io", "ipaddresses", &[], set(&write)),
        ("ipam.metal3.io", "ipclaims", &[], set(&write)),
        ("ipam.metal3.io", "ipclaims/status", &[], set(&["patch"])),
        (
            "infrastructure.cluster.x-k8s.io",
            "elfmachines",
            &[],
            set(&["get", "list", "watch", "patch"]),
        ),
        (
            "infrastructure.cluster.x-k8s.io",
            "elfmachinetemplates",
            &[],
            set(&read),
        ),
        (
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            &[ELFMACHINE_CRD],
            set(&watch),
        ),
        ("events.k8s.io", "events", &[], set(&["create", "patch"])),
        (
            "authentication.k8s.io",
            "tokenreviews",
            &[],
            set(&["create"]),
        ),
    ]
    .into_iter()
    .map(|(g, r, names, v)| {
        let names = names.iter().map(|n| (*n).to_owned()).collect();
        ((g.to_owned(), r.to_owned(), names), v)
    })
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
    // A Fail webhook is as critical as the apiserver's own add-ons.
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");

    // Never two replicas on one node (required: replicas <= schedulable nodes, README), and
    // a rollout that needs no extra node.
    let anti = &pod["affinity"]["podAntiAffinity"];
    assert!(
        anti.get("preferredDuringSchedulingIgnoredDuringExecution")
            .is_none()
    );
    let terms = anti["requiredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .expect("required anti-affinity");
    assert_eq!(terms.len(), 1);
    assert_eq!(terms[0]["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(&terms[0]["labelSelector"]["matchLabels"], pod_labels);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 0);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxUnavailable"], 1);
    // Spread over zones where there are zones (a zoneless cluster still schedules).
    let spread = pod["topologySpreadConstraints"].as_array().expect("spread");
    assert_eq!(spread.len(), 1);
    assert_eq!(spread[0]["topologyKey"], "topology.kubernetes.io/zone");
    assert_eq!(spread[0]["maxSkew"], 1);
    assert_eq!(spread[0]["whenUnsatisfiable"], "ScheduleAnyway");
    assert_eq!(&spread[0]["labelSelector"]["matchLabels"], pod_labels);

    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let args = strings(&c["args"]);
    assert_eq!(args[0], "serve");
    // Both families: IPv6-only and IPv6-first clusters reach the pod too.
    assert!(args.contains(&"--listen=[::]:9443".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--admin-listen=[::]:8080".to_owned()),
        "{args:?}"
    );
    // Events name the replica that wrote them.
    let env = c["env"].as_array().expect("env");
    let pod_name = env
        .iter()
        .find(|e| e["name"] == "POD_NAME")
        .expect("POD_NAME");
    assert_eq!(
        pod_name["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
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

    // README "Sizing": no CPU limit (no throttling in a burst); memory from the measured peak
    // with 100,000 IPAM objects (a full relist, 81-87 MiB): requested at 1.5x, limited at ~3x.
    let res = &c["resources"];
    assert_eq!(res["requests"]["cpu"], "50m");
    assert_eq!(res["requests"]["memory"], "128Mi");
    assert!(res["limits"].get("cpu").is_none(), "no CPU limit");
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
    // A drain never waits on a pod that is not ready anyway.
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow");
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], pod_labels);
}

/// `port -> container port` of a Service that selects the Deployment's pods.
fn service_ports(base: &Base, name: &str) -> BTreeMap<i64, i64> {
    let svc = base.one("Service", name);
    let dep = base.one("Deployment", "cape-static-ip");
    let pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .unwrap();
    for (k, v) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            pod_labels.get(k),
            Some(v),
            "Service {name} selector {k} matches the pods"
        );
    }
    let container_port = |port: &Value| -> i64 {
        if let Some(n) = port.as_i64() {
            return n;
        }
        dep["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| &p["name"] == port)
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("no container port {port}"))
    };
    svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["port"].as_i64().unwrap(),
                container_port(&p["targetPort"]),
            )
        })
        .collect()
}

#[test]
fn the_webhook_service_carries_https_only_and_metrics_have_their_own() {
    let base = Base::load();
    // The apiserver's Service: the admin port (plain HTTP, pool names and usage) is not on it.
    assert_eq!(service_ports(base, SERVICE), BTreeMap::from([(443, 9443)]));
    assert_eq!(
        service_ports(base, "cape-static-ip-metrics"),
        BTreeMap::from([(8080, 8080)])
    );
    assert_eq!(base.all("Service").len(), 2);
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
        // A new key at every renewal, whatever cert-manager's version defaults to.
        let key = c.spec.private_key.as_ref().expect("privateKey");
        assert_eq!(key.rotation_policy.as_deref(), Some("Always"));
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

/// The kubectl built by hack/controlplane/build.sh (its kustomize renders the base).
fn kubectl() -> String {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/controlplane/build.sh"))
        .arg("--print")
        .output()
        .expect("hack/controlplane/build.sh --print");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with("/kubectl"))
        .expect("build.sh --print names kubectl")
        .to_owned()
}

/// `kubectl kustomize dir`, as JSON objects.
fn render(dir: &Path) -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(dir)
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let file = scratch("rendered").join("rendered.yaml");
    std::fs::write(&file, &out.stdout).unwrap();
    let objects = load_yaml(&file);
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
    objects
}

/// A fresh directory under target/ (kustomize refuses absolute resource paths, so overlays
/// live at a fixed depth below the crate: `../../manifests`).
fn scratch(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!(
            "manifests-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every name that embeds the install namespace says `ns`, and nothing else says
/// `cape-system` but the default-pool namespace (a contract value, not the install's).
fn assert_installed_in(objects: &[Value], ns: &str) {
    let of = |kind: &str, name: &str| -> &Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let cluster_scoped = [
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    ];
    for o in objects {
        let kind = o["kind"].as_str().unwrap();
        if !cluster_scoped.contains(&kind) {
            assert_eq!(
                o["metadata"]["namespace"], ns,
                "{kind} {}",
                o["metadata"]["name"]
            );
        }
    }
    assert_eq!(
        objects.iter().filter(|o| o["kind"] == "Namespace").count(),
        1
    );
    of("Namespace", ns);
    let cert: Certificate =
        serde_json::from_value(of("Certificate", "cape-static-ip-webhook").clone()).unwrap();
    let svc = format!("{SERVICE}.{ns}.svc");
    assert_eq!(cert.spec.common_name.as_deref(), Some(svc.as_str()));
    assert_eq!(
        cert.spec.dns_names,
        [svc.clone(), format!("{svc}.cluster.local")]
    );
    let hook = of("MutatingWebhookConfiguration", "cape-static-ip");
    assert_eq!(
        hook["metadata"]["annotations"][INJECT_CA_FROM],
        format!("{ns}/cape-static-ip-webhook")
    );
    assert_eq!(
        hook["webhooks"][0]["clientConfig"]["service"]["namespace"],
        ns
    );
    let excluded =
        strings(&hook["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["values"]);
    assert_eq!(excluded, ["kube-system", ns]);
    let binding = of("ClusterRoleBinding", "cape-static-ip");
    assert_eq!(binding["subjects"][0]["namespace"], ns);

    let text = serde_json::to_string(objects).unwrap();
    let rest = text.replace("--default-pool-namespace=cape-system", "");
    if ns != NAMESPACE {
        assert!(
            !rest.contains(NAMESPACE),
            "{NAMESPACE} is still written somewhere when installed in {ns}"
        );
    }
}

#[test]
fn the_base_renders_for_its_namespace() {
    let objects = render(&manifests_dir());
    assert_installed_in(&objects, NAMESPACE);
}

#[test]
fn an_overlay_installs_into_another_namespace() {
    // What a user writes: the base, a component naming the namespace, then the base's
    // follow-namespace component.
    let dir = scratch("overlay");
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
    assert_installed_in(&render(&dir), "capi-ipam");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_base_with_its_namespace_changed_installs_there() {
    // A copy of manifests/ with `namespace:` edited (`kustomize edit set namespace`).
    let dir = scratch("edited");
    let copy = dir.join("manifests");
    let status = Command::new("cp")
        .arg("-r")
        .arg(manifests_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let k = copy.join("kustomization.yaml");
    let text = std::fs::read_to_string(&k).unwrap();
    assert!(text.contains("\nnamespace: cape-system\n"));
    std::fs::write(
        &k,
        text.replace("\nnamespace: cape-system\n", "\nnamespace: ipam-webhooks\n"),
    )
    .unwrap();
    assert_installed_in(&render(&copy), "ipam-webhooks");
    std::fs::remove_dir_all(&dir).unwrap();
}
