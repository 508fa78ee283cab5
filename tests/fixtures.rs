//! `tests/fixtures/*.json`: AdmissionReview requests exactly as kube-apiserver sent them to
//! the webhook (captured by [`capture_fixtures`] through a recording proxy), plus hand-made
//! bad bodies (`bad-*.json`). [`every_fixture_gets_an_answer`] posts each to a running webhook:
//! a request that parses always gets a response carrying its uid (allowed, or denied with a
//! message and a code), never a 500 or a dropped connection; an unreadable body gets `invalid`.
//!
//! Recapture (overwrites the captured files, keeps `bad-*`):
//! `cargo test --test fixtures -- --ignored capture_fixtures`.
//! Replay one by hand against `cape-static-ip serve`:
//! `curl --cacert certs/ca.crt --data @tests/fixtures/create.json https://127.0.0.1:9443/mutate`.

mod common;
#[allow(dead_code)]
#[path = "common/contract_cases.rs"]
mod contract_cases;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use common::controlplane::CrdSet;
use common::webhook::{self, WebhookOptions, machines};
use contract_cases::{Env, ip, machine, post_raw, response_patch};
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// The namespace the captured fixtures are written in (the capture's temporary namespace is
/// replaced by it), so that they can be replayed by hand.
const FIXTURE_NAMESPACE: &str = "default";
const POOL: &str = "fixture-pool";
const TEMPLATE: &str = "demo-worker";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn pool_spec() -> Value {
    json!({"namePrefix": POOL, "prefix": 24, "gateway": "10.30.0.1", "dnsServers": ["10.30.0.2"],
           "pools": [{"start": "10.30.0.10", "end": "10.30.0.60"}]})
}

async fn setup(prefix: &str, options: WebhookOptions) -> Env {
    let e = contract_cases::env(CrdSet::Current, prefix, options).await;
    e.pool(POOL, pool_spec(), json!({})).await;
    e.template(TEMPLATE, json!({"cluster.x-k8s.io/ip-pool-name": POOL}))
        .await;
    e
}

fn with_namespace(review: &mut Value, ns: &str) {
    if review["request"]["namespace"].is_string() {
        review["request"]["namespace"] = json!(ns);
    }
    for side in ["object", "oldObject"] {
        if review["request"][side]["metadata"].is_object() {
            review["request"][side]["metadata"]["namespace"] = json!(ns);
        }
    }
}

/// Every fixture, posted straight to the webhook over HTTPS.
#[tokio::test]
async fn every_fixture_gets_an_answer() {
    let e = setup(
        "fixtures",
        WebhookOptions {
            background: false,
            ..Default::default()
        },
    )
    .await;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir())
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "fixtures missing: {files:?}");
    let mut answers = BTreeMap::new();
    for path in &files {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let raw = std::fs::read(path).unwrap();
        let parsed: Option<Value> = serde_json::from_slice(&raw).ok();
        let body = match parsed.clone() {
            Some(mut review) => {
                with_namespace(&mut review, &e.ns);
                serde_json::to_vec(&review).unwrap()
            }
            None => raw,
        };
        let (status, answer) = post_raw(&e.hook, body).await;
        assert_eq!(status, 200, "{name}: HTTP {status}: {answer:?}");
        let answer = answer.unwrap_or_else(|t| panic!("{name}: the answer is not JSON: {t}"));
        assert_eq!(answer["kind"], "AdmissionReview", "{name}: {answer:#}");
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1", "{name}");
        let response = &answer["response"];
        assert!(response.is_object(), "{name}: no response: {answer:#}");
        let uid = parsed
            .as_ref()
            .and_then(|r| r["request"]["uid"].as_str())
            .map(str::to_string);
        if response["allowed"] == false {
            let message = response["status"]["message"].as_str().unwrap_or_default();
            let code = response["status"]["code"].as_u64().unwrap_or_default();
            assert!(!message.is_empty(), "{name}: a denial without a message");
            assert!(
                (400..500).contains(&code) || code == 503,
                "{name}: code {code}"
            );
        }
        println!(
            "{name}: allowed={} code={} patch={} message={}",
            response["allowed"],
            response["status"]["code"],
            response_patch(&answer).map_or(0, |p| p.0.len()),
            response["status"]["message"]
        );
        answers.insert(name, (uid, answer));
    }

    let get = |name: &str| -> &Value {
        &answers
            .get(name)
            .unwrap_or_else(|| panic!("fixture {name}.json missing"))
            .1
    };
    // Requests that carry a uid get it back, even when their object is malformed
    // (bad-devices-string, bad-labels-not-a-map).
    for (name, (uid, answer)) in &answers {
        if name.starts_with("bad-not-") {
            continue;
        }
        assert_eq!(
            answer["response"]["uid"].as_str(),
            uid.as_deref(),
            "{name}: the response must carry the request's uid"
        );
    }
    // Unreadable bodies: `invalid` (no uid to answer, not allowed).
    for name in ["bad-not-json", "bad-not-a-review"] {
        let r = &get(name)["response"];
        assert_eq!(r["allowed"], false, "{name}");
        assert_eq!(r["uid"], "", "{name}");
        assert!(
            r["status"]["message"]
                .as_str()
                .unwrap()
                .contains("unreadable AdmissionReview"),
            "{name}: {r:#}"
        );
    }
    let patched = |name: &str| -> Value {
        let answer = get(name);
        assert_eq!(answer["response"]["allowed"], true, "{name}: {answer:#}");
        let mut object = serde_json::from_slice::<Value>(
            &std::fs::read(dir().join(format!("{name}.json"))).unwrap(),
        )
        .unwrap()["request"]["object"]
            .clone();
        let patch = response_patch(answer).unwrap_or_else(|| panic!("{name}: no patch"));
        json_patch::patch(&mut object, &patch).unwrap();
        object
    };
    let created = patched("create");
    assert!(ip(&created, 0).starts_with("10.30.0."));
    assert_eq!(
        created["spec"]["network"]["devices"][0]["netmask"],
        "255.255.255.0"
    );
    let two = patched("two-devices");
    assert_ne!(ip(&two, 0), ip(&two, 1));
    let mixed = patched("dhcp-and-ipv4");
    assert!(
        mixed["spec"]["network"]["devices"][0]
            .get("ipAddrs")
            .is_none()
    );
    assert!(ip(&mixed, 1).starts_with("10.30.0."));
    let generated = patched("generate-name");
    assert!(
        generated["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("worker-")
    );
    let hot = patched("update-hot-add");
    assert!(ip(&hot, 1).starts_with("10.30.0."));
    let wiped = patched("update-wiped");
    assert!(ip(&wiped, 0).starts_with("10.30.0."));
    let dry = patched("dry-run");
    let dry_name = dry["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        !e.claim_names(&e.ns).await.contains(&e.claim(&dry_name, 0)),
        "a dry run writes no claim"
    );
    assert!(
        get("update-metadata")["response"].get("patch").is_none(),
        "a metadata-only update is allowed unchanged"
    );
    let denied = &get("denied-no-pool")["response"];
    assert_eq!(denied["allowed"], false);
    assert_eq!(denied["status"]["code"], 404);
    let bad = &get("bad-labels-not-a-map")["response"];
    assert_eq!(bad["allowed"], false);
    assert_eq!(bad["status"]["code"], 400);
    let bad = &get("bad-devices-string")["response"];
    assert_eq!(bad["allowed"], false);
    assert_eq!(bad["status"]["code"], 400);
    assert!(
        bad["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.network")
    );

    // The same fixture again: the same address (its claim exists now), one claim.
    let (_, again) = post_raw(&e.hook, {
        let mut review: Value =
            serde_json::from_slice(&std::fs::read(dir().join("create.json")).unwrap()).unwrap();
        with_namespace(&mut review, &e.ns);
        serde_json::to_vec(&review).unwrap()
    })
    .await;
    let mut object =
        serde_json::from_slice::<Value>(&std::fs::read(dir().join("create.json")).unwrap())
            .unwrap()["request"]["object"]
            .clone();
    json_patch::patch(&mut object, &response_patch(&again.unwrap()).unwrap()).unwrap();
    assert_eq!(ip(&object, 0), ip(&created, 0));
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Capture
// ---------------------------------------------------------------------------------------------

/// A TLS proxy in front of the webhook that records every request body.
struct Recorder {
    bodies: Arc<Mutex<Vec<Value>>>,
}

impl Recorder {
    async fn start(e: &Env) -> (Self, std::net::SocketAddr) {
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let upstream = format!("https://{}/mutate-elfmachine", e.hook.running.webhook_addr);
        // Forwards with the apiserver's client certificate (the webhook checks the caller).
        let client = webhook::https_client(&e.hook.ca_pem, webhook::caller_identity());
        let seen = bodies.clone();
        let app = axum::Router::new().route(
            "/mutate-elfmachine",
            axum::routing::post(move |body: axum::body::Bytes| {
                let client = client.clone();
                let upstream = upstream.clone();
                let seen = seen.clone();
                async move {
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        seen.lock().unwrap().push(v);
                    }
                    let answer = client
                        .post(upstream)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap()
                        .bytes()
                        .await
                        .unwrap();
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        answer,
                    )
                }
            }),
        );
        let cert = cape_static_ip::webhook::tls::ReloadingCert::new(
            e.hook.certs_dir.join("tls.crt"),
            e.hook.certs_dir.join("tls.key"),
        )
        .unwrap();
        let (_, addr, serving) = cape_static_ip::webhook::listener::Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            Some(std::sync::Arc::new(cert.server_config(false))),
            app,
            Default::default(),
        )
        .unwrap();
        tokio::spawn(serving);
        (Recorder { bodies }, addr)
    }

    fn clear(&self) {
        self.bodies.lock().unwrap().clear();
    }

    /// The one request recorded since [`Recorder::clear`].
    fn take(&self) -> Value {
        let mut bodies = self.bodies.lock().unwrap();
        assert!(!bodies.is_empty(), "the apiserver sent nothing");
        bodies.remove(0)
    }
}

fn write(name: &str, review: &Value, ns: &str) {
    let text = serde_json::to_string_pretty(review)
        .unwrap()
        .replace(ns, FIXTURE_NAMESPACE);
    std::fs::write(dir().join(format!("{name}.json")), text + "\n").unwrap();
    println!("wrote tests/fixtures/{name}.json");
}

/// Drives the apiserver through every shape of request and records what it sends.
#[tokio::test]
#[ignore = "writes tests/fixtures; run by hand to recapture"]
async fn capture_fixtures() {
    let e = setup("capture", WebhookOptions::default()).await;
    let (rec, addr) = Recorder::start(&e).await;
    // Without matchConditions, so that the apiserver also sends the metadata-only UPDATE.
    webhook::register_with(
        &e.client,
        &e.hook.config,
        addr,
        &e.hook.ca_pem,
        &e.ns,
        "Fail",
        false,
    )
    .await;
    // Wait until the apiserver calls the recorder.
    let api = machines(&e.client, &e.ns);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let mut reached = false;
    for i in 0..200 {
        let probe = machine(
            &format!("probe-{i}"),
            None,
            json!({"cluster.x-k8s.io/ip-pool-name": "no-such-fixture-pool"}),
            contract_cases::ipv4(),
        );
        let obj: kube::core::DynamicObject = serde_json::from_value(probe).unwrap();
        let _ = api.create(&dry, &obj).await;
        if !rec.bodies.lock().unwrap().is_empty() {
            reached = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reached, "the apiserver never called the recorder");
    std::fs::create_dir_all(dir()).unwrap();
    let ns = e.ns.clone();

    // CREATE as a MachineSet does it: the template's label chooses the pool.
    let capi = |name: &str, devices: Value| machine(name, Some(TEMPLATE), json!({}), devices);
    rec.clear();
    let created = e
        .machine_ok(capi("demo-md-0-8f7qk-x2b9m", contract_cases::ipv4()))
        .await;
    write("create", &rec.take(), &ns);

    rec.clear();
    e.machine_ok(capi(
        "demo-md-0-8f7qk-dhcp1",
        json!([{"networkType": "IPV4_DHCP", "vlan": "vlan-0"}, {"networkType": "IPV4", "vlan": "vlan-1"}]),
    ))
    .await;
    write("dhcp-and-ipv4", &rec.take(), &ns);

    rec.clear();
    e.machine_ok(capi(
        "demo-md-0-8f7qk-2nics",
        json!([{"networkType": "IPV4", "vlan": "vlan-1"}, {"networkType": "IPV4", "vlan": "vlan-2"}]),
    ))
    .await;
    write("two-devices", &rec.take(), &ns);

    rec.clear();
    let mut generated = capi("x", contract_cases::ipv4());
    let meta = generated["metadata"].as_object_mut().unwrap();
    meta.remove("name");
    meta.insert("generateName".into(), json!("worker-"));
    e.machine_ok(generated).await;
    write("generate-name", &rec.take(), &ns);

    rec.clear();
    let obj: kube::core::DynamicObject =
        serde_json::from_value(capi("demo-md-0-8f7qk-dryrun", contract_cases::ipv4())).unwrap();
    api.create(&dry, &obj).await.unwrap();
    write("dry-run", &rec.take(), &ns);

    rec.clear();
    e.machine_denied(machine(
        "demo-md-0-8f7qk-nopool",
        None,
        json!({"cluster.x-k8s.io/ip-pool-name": "no-such-fixture-pool"}),
        contract_cases::ipv4(),
    ))
    .await;
    write("denied-no-pool", &rec.take(), &ns);

    // UPDATEs of the first machine: a hot-added NIC, then a wipe, then metadata only.
    let mut devices = created["spec"]["network"]["devices"].clone();
    devices
        .as_array_mut()
        .unwrap()
        .push(json!({"networkType": "IPV4", "vlan": "vlan-hot"}));
    rec.clear();
    api.patch(
        "demo-md-0-8f7qk-x2b9m",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"network": {"devices": devices}}})),
    )
    .await
    .unwrap();
    write("update-hot-add", &rec.take(), &ns);

    rec.clear();
    api.patch(
        "demo-md-0-8f7qk-x2b9m",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"network": {"devices": [
            {"networkType": "IPV4", "vlan": "vlan-1"}, {"networkType": "IPV4", "vlan": "vlan-hot"}
        ]}}})),
    )
    .await
    .unwrap();
    write("update-wiped", &rec.take(), &ns);

    rec.clear();
    api.patch(
        "demo-md-0-8f7qk-x2b9m",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"cluster.x-k8s.io/control-plane": ""}}})),
    )
    .await
    .unwrap();
    write("update-metadata", &rec.take(), &ns);
    e.stop().await;
}
