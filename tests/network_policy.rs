//! The optional component `manifests/network-policy`: rendered by kustomize in an
//! overlay that patches the sources (as the README shows), checked against the base it is
//! added to (pods, port names), and accepted by the real apiserver (server-side dry run).

mod common;

use std::path::Path;
use std::process::Command;

use common::controlplane::{CrdSet, shared};
use serde_json::{Value, json};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl() -> String {
    run(Command::new("bash")
        .arg(root().join("hack/controlplane/build.sh"))
        .arg("--print"))
    .lines()
    .find(|l| l.ends_with("/kubectl"))
    .expect("build.sh --print names kubectl")
    .to_string()
}

/// `kubectl kustomize` of an overlay in a temporary directory inside the repository (kustomize
/// takes only relative paths to bases and components).
fn render(kustomization: &str) -> Vec<Value> {
    let dir = root().join(format!("target/network-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kustomization.yaml"), kustomization).unwrap();
    let yaml = run(Command::new(kubectl()).arg("kustomize").arg(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    let file = std::env::temp_dir().join(format!("np-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml).unwrap();
    let json = run(Command::new("python3")
        .arg("-c")
        .arg("import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))")
        .arg(&file));
    let _ = std::fs::remove_file(&file);
    serde_json::from_str(&json).unwrap()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

const OVERLAY: &str = "resources: [../../manifests]
components: [../../manifests/network-policy]
patches:
  - target: {kind: NetworkPolicy, name: cape-static-ip-webhook}
    patch: |
      - op: replace
        path: /spec/ingress/0/from
        value: [{ipBlock: {cidr: 10.20.0.0/24}}, {ipBlock: {cidr: 10.20.1.5/32}}]
      - op: replace
        path: /spec/ingress/1/from/0/namespaceSelector/matchLabels
        value: {kubernetes.io/metadata.name: observability}
";

#[test]
fn the_component_admits_the_webhook_port_from_the_sources_and_the_admin_port_from_monitoring() {
    let objects = render(OVERLAY);
    let policy = one(&objects, "NetworkPolicy");
    let deployment = one(&objects, "Deployment");
    let pod = &deployment["spec"]["template"];
    assert_eq!(policy["metadata"]["namespace"], "cape-system");
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"], pod["metadata"]["labels"],
        "the policy selects exactly the webhook's pods"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let ingress = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(ingress.len(), 2, "nothing else is admitted: {ingress:#?}");
    let ports: Vec<&str> = pod["spec"]["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for (rule, port) in ingress.iter().zip(["webhook", "admin"]) {
        assert_eq!(rule["ports"], json!([{"port": port, "protocol": "TCP"}]));
        assert!(ports.contains(&port), "container port {port} in {ports:?}");
    }
    assert_eq!(
        ingress[0]["from"],
        json!([{"ipBlock": {"cidr": "10.20.0.0/24"}}, {"ipBlock": {"cidr": "10.20.1.5/32"}}])
    );
    assert_eq!(
        ingress[1]["from"],
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "observability"}}}])
    );

    // Unpatched, the placeholder admits nobody (TEST-NET-1), rather than everybody.
    let plain =
        render("resources: [../../manifests]\ncomponents: [../../manifests/network-policy]\n");
    assert_eq!(
        one(&plain, "NetworkPolicy")["spec"]["ingress"][0]["from"],
        json!([{"ipBlock": {"cidr": "192.0.2.0/24"}}])
    );
}

#[test]
fn the_apiserver_accepts_the_component() {
    let cp = shared(CrdSet::Current);
    let objects = render(OVERLAY);
    let policy = one(&objects, "NetworkPolicy");
    let namespace = one(&objects, "Namespace");
    let dir = cp.dir().join("network-policy-test");
    std::fs::create_dir_all(&dir).unwrap();
    let ns_file = dir.join("namespace.json");
    std::fs::write(&ns_file, namespace.to_string()).unwrap();
    let file = dir.join("policy.json");
    std::fs::write(&file, policy.to_string()).unwrap();
    let kubectl = kubectl();
    let k = |args: &[&str]| {
        run(Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(cp.kubeconfig())
            .args(args))
    };
    k(&["apply", "--server-side", "-f", ns_file.to_str().unwrap()]);
    let out = k(&[
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.trim()
            .ends_with("cape-static-ip-webhook serverside-applied (server dry run)"),
        "{out}"
    );
}
