//! The webhook is only in the path of requests that need an address (issue 15): the
//! registration's `matchConditions` equal the rule admission applies (`needs_review`), on the
//! real kube-apiserver; with the webhook down (`failurePolicy: Fail`) every other change to a
//! machine goes through, deletion included, and the release completes once it is back; and a
//! machine's life costs one admission call instead of one per write.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cape_static_ip::webhook::review::{MATCH_CONDITIONS, needs_review};
use common::controlplane::{CrdSet, shared, temp_namespace};
use common::life::{self, CAPE_FINALIZER, PATCHES, admission_calls, calls_between, total};
use common::util::{count, eventually, gone, setup, wait_for_pool};
use common::webhook::{self, WebhookOptions, capi_machine, machines};
use kube::Client;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::admission::Operation;
use serde_json::{Value, json};

const FINALIZER: &str = "elfmachinestaticip.infrastructure.cluster.x-k8s.io";

/// Every webhook's release loop watches the machines of all namespaces: the test that stops
/// its webhook runs alone, so that no other test's loop releases its machine meanwhile.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every YAML document of `text` as JSON (PyYAML, as tests/manifests.rs reads manifests).
fn yaml_docs(text: &str) -> Vec<Value> {
    const SCRIPT: &str =
        "import yaml,json,sys; print(json.dumps(list(yaml.safe_load_all(sys.stdin))))";
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (with PyYAML)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "python3 could not parse the YAML");
    let docs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn kubectl() -> PathBuf {
    let out = Command::new("bash")
        .arg(root().join("hack/controlplane/build.sh"))
        .arg("--print")
        .output()
        .expect("hack/controlplane/build.sh --print");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.ends_with("/kubectl"))
        .map(PathBuf::from)
        .expect("build.sh names kubectl")
}

/// `kubectl kustomize DIR`, the webhook configuration of the output.
fn rendered_webhook(kubectl: &Path, dir: &Path) -> Value {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .find(|d| d["kind"] == "MutatingWebhookConfiguration")
        .expect("a MutatingWebhookConfiguration")
}

/// manifests/webhook.yaml holds exactly `MATCH_CONDITIONS` (hack/run.sh renders that file,
/// the tests register the constant); the component for apiservers before 1.28 removes them and
/// changes nothing else.
#[test]
fn manifests_carry_the_match_conditions() {
    let text = std::fs::read_to_string(root().join("manifests/webhook.yaml")).unwrap();
    let doc = yaml_docs(&text).remove(0);
    let shipped: Vec<(String, String)> = doc["webhooks"][0]["matchConditions"]
        .as_array()
        .expect("manifests/webhook.yaml has matchConditions")
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["expression"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let constant: Vec<(String, String)> = MATCH_CONDITIONS
        .iter()
        .map(|c| (c.name.to_string(), c.expression.to_string()))
        .collect();
    assert_eq!(
        shipped, constant,
        "manifests/webhook.yaml and MATCH_CONDITIONS (src/webhook/review.rs) differ"
    );
    let run_sh = std::fs::read_to_string(root().join("hack/run.sh")).unwrap();
    assert!(
        run_sh.contains("cp manifests/webhook.yaml .dev/webhook/webhook.yaml"),
        "hack/run.sh registers manifests/webhook.yaml"
    );

    // The component for apiservers before 1.28, used as its README section shows.
    let kubectl = kubectl();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("blast-radius-kustomize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifests = root().join("manifests");
    let rel = |to: &Path| {
        // The kustomization refers to the base by a relative path (kustomize refuses absolute
        // ones).
        let depth = dir.components().count();
        let mut up = PathBuf::new();
        for _ in 0..depth - 1 {
            up.push("..");
        }
        up.join(to.strip_prefix("/").unwrap())
    };
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "resources: [{}]\ncomponents: [{}]\n",
            rel(&manifests).display(),
            rel(&manifests.join("components/without-match-conditions")).display()
        ),
    )
    .unwrap();
    let legacy = rendered_webhook(&kubectl, &dir);
    let mut base = rendered_webhook(&kubectl, &manifests);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(base["webhooks"][0].get("matchConditions").is_some());
    assert!(
        legacy["webhooks"][0].get("matchConditions").is_none(),
        "{legacy:#}"
    );
    base["webhooks"][0]
        .as_object_mut()
        .unwrap()
        .remove("matchConditions");
    assert_eq!(legacy, base, "the component changes only matchConditions");
}

/// Admission calls of `hook` so far, by operation, read from its admin port's /metrics.
async fn calls(hook: &webhook::Webhook) -> BTreeMap<String, u64> {
    let text = reqwest::get(format!("http://{}/metrics", hook.running.admin_addr))
        .await
        .expect("/metrics")
        .text()
        .await
        .unwrap();
    admission_calls(&text)
}

fn machine(name: &str, devices: Value) -> Value {
    capi_machine(name, "tpl", devices)
}

/// What a request sends, and whether the rule says we are called.
enum Step {
    Create {
        object: Value,
        dry_run: bool,
    },
    Update {
        name: &'static str,
        patch: Value,
        dry_run: bool,
    },
}

/// For each request of a table: whether the apiserver called the webhook (its admission
/// count moved) equals `needs_review` on the same object (and old object), and both equal
/// what the contract wants.
#[tokio::test]
async fn the_apiserver_calls_us_exactly_when_needs_review_says() {
    let _shared = ALONE.read().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "conditions").await;
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            background: false,
            ..Default::default()
        },
    )
    .await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "pools": [{"subnet": "10.40.0.0/24"}], "prefix": 24, "gateway": "10.40.0.1"}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    let api = machines(&client, &ns);
    let needs = json!([{"networkType": "IPV4", "vlan": "a"}]);
    let has = json!([{"networkType": "IPV4", "vlan": "a", "ipAddrs": ["10.40.0.200"], "netmask": "255.255.255.0"}]);
    let mac = |d: &Value| {
        let mut d = d.clone();
        d[0]["macAddr"] = json!("52:54:00:00:00:01");
        d
    };
    let mut no_network = machine("bare", json!([]));
    no_network["spec"]
        .as_object_mut()
        .unwrap()
        .remove("network");
    let cases: Vec<(&str, Step, bool)> = vec![
        (
            "create, a device needs an address",
            Step::Create {
                object: machine("u", needs.clone()),
                dry_run: false,
            },
            true,
        ),
        (
            "create, every device has its address",
            Step::Create {
                object: machine("static", has.clone()),
                dry_run: false,
            },
            false,
        ),
        (
            "create, DHCP only",
            Step::Create {
                object: machine("dhcp", json!([{"networkType": "IPV4_DHCP"}])),
                dry_run: false,
            },
            false,
        ),
        (
            "create, no network",
            Step::Create {
                object: no_network,
                dry_run: false,
            },
            false,
        ),
        (
            "create, empty ipAddrs",
            Step::Create {
                object: machine("empty", json!([{"networkType": "IPV4", "ipAddrs": []}])),
                dry_run: false,
            },
            true,
        ),
        (
            "create, one device of two needs one",
            Step::Create {
                object: machine(
                    "mixed",
                    json!([has[0].clone(), {"networkType": "IPV4", "vlan": "b"}]),
                ),
                dry_run: false,
            },
            true,
        ),
        (
            "dry-run create that needs an address",
            Step::Create {
                object: machine("dry", needs.clone()),
                dry_run: true,
            },
            true,
        ),
        (
            "dry-run create that needs none",
            Step::Create {
                object: machine("dry2", has.clone()),
                dry_run: true,
            },
            false,
        ),
        (
            "update: labels",
            Step::Update {
                name: "u",
                patch: json!({"metadata": {"labels": {"x": "y"}}}),
                dry_run: false,
            },
            false,
        ),
        (
            "update: annotations",
            Step::Update {
                name: "u",
                patch: json!({"metadata": {"annotations": {"x": "y"}}}),
                dry_run: false,
            },
            false,
        ),
        (
            "update: CAPE's finalizer added",
            Step::Update {
                name: "u",
                patch: json!({"metadata": {"finalizers": [FINALIZER, CAPE_FINALIZER]}}),
                dry_run: false,
            },
            false,
        ),
        (
            "update: providerID",
            Step::Update {
                name: "u",
                patch: json!({"spec": {"providerID": "elf://abc"}}),
                dry_run: false,
            },
            false,
        ),
        (
            "update: a device field, addresses kept",
            Step::Update {
                name: "static",
                patch: json!({"spec": {"network": {"devices": mac(&has)}}}),
                dry_run: false,
            },
            false,
        ),
        (
            "update: labels of a DHCP machine",
            Step::Update {
                name: "dhcp",
                patch: json!({"metadata": {"labels": {"x": "y"}}}),
                dry_run: false,
            },
            false,
        ),
        (
            "dry-run update wiping ipAddrs",
            Step::Update {
                name: "u",
                patch: json!({"spec": {"network": {"devices": needs.clone()}}}),
                dry_run: true,
            },
            true,
        ),
        (
            "update wiping ipAddrs (template re-applied)",
            Step::Update {
                name: "u",
                patch: json!({"spec": {"network": {"devices": needs.clone()}}}),
                dry_run: false,
            },
            true,
        ),
        (
            "update: a NIC hot-added",
            Step::Update {
                name: "static",
                patch: json!({"spec": {"network": {"devices": [mac(&has)[0].clone(), {"networkType": "IPV4", "vlan": "hot"}]}}}),
                dry_run: false,
            },
            true,
        ),
        (
            "update: the network copied in later",
            Step::Update {
                name: "bare",
                patch: json!({"spec": {"network": {"devices": needs.clone()}}}),
                dry_run: false,
            },
            true,
        ),
    ];
    let mut called_any = (false, false);
    for (what, step, wanted) in cases {
        let before = total(&calls(&hook).await);
        let (operation, object, old) = match step {
            Step::Create { object, dry_run } => {
                let mut sent = object.clone();
                sent["metadata"]["namespace"] = json!(ns);
                let obj: kube::core::DynamicObject = serde_json::from_value(sent.clone()).unwrap();
                let pp = PostParams {
                    dry_run,
                    ..Default::default()
                };
                api.create(&pp, &obj)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                (Operation::Create, sent, None)
            }
            Step::Update {
                name,
                patch,
                dry_run,
            } => {
                let old = serde_json::to_value(api.get(name).await.unwrap()).unwrap();
                let mut new = old.clone();
                json_patch::merge(&mut new, &patch);
                let pp = PatchParams {
                    dry_run,
                    ..Default::default()
                };
                api.patch(name, &pp, &Patch::Merge(&patch))
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                (Operation::Update, new, Some(old))
            }
        };
        let called = total(&calls(&hook).await) > before;
        let rule = needs_review(&operation, &object, old.as_ref());
        println!("{what}: called {called}, needs_review {rule}");
        assert_eq!(
            rule, wanted,
            "{what}: needs_review disagrees with the contract"
        );
        assert_eq!(
            called, wanted,
            "{what}: the apiserver's matchConditions disagree with needs_review"
        );
        if called {
            called_any.0 = true;
        } else {
            called_any.1 = true;
        }
    }
    assert_eq!(called_any, (true, true));
    // The updates that needed us got their addresses back (the same one after the wipe).
    let u = serde_json::to_value(api.get("u").await.unwrap()).unwrap();
    assert_eq!(
        u["spec"]["network"]["devices"][0]["ipAddrs"],
        json!(["10.40.0.2"])
    );

    // Deletion: CAPE's finalizer removed, then ours: neither is sent to us.
    api.delete("u", &DeleteParams::default()).await.unwrap();
    for finalizers in [json!([FINALIZER]), json!(null)] {
        let before = total(&calls(&hook).await);
        let old = serde_json::to_value(api.get("u").await.unwrap()).unwrap();
        let patch = json!({"metadata": {"finalizers": finalizers}});
        let mut new = old.clone();
        json_patch::merge(&mut new, &patch);
        api.patch("u", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        assert_eq!(
            total(&calls(&hook).await),
            before,
            "a finalizer removal during deletion called us"
        );
        assert!(!needs_review(&Operation::Update, &new, Some(&old)));
    }
    hook.stop().await;
}

async fn patch_ok(client: &Client, ns: &str, name: &str, what: &str, patch: Value) {
    machines(client, ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("with the webhook down, {what} of {name} was refused: {e}"));
}

fn refused_by_the_apiserver(result: Result<kube::core::DynamicObject, kube::Error>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains("failed calling webhook"),
            "{what}: refused, but not for the webhook being down: {}",
            s.message
        ),
        Ok(_) => panic!("{what}: admitted without the webhook"),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// With the webhook down and `failurePolicy: Fail`: metadata, finalizer and spec updates of a
/// machine that has its address go through, and so does its deletion once CAPE's finalizer
/// goes; a create (or an update) that needs an address is refused with the apiserver's
/// message. Back up, the release loop finds the machine waiting on our finalizer alone (its
/// watch lists every machine when it starts) and releases it. The same registration without
/// the conditions refuses the same metadata update (what the conditions change).
#[tokio::test]
async fn everything_else_goes_through_while_the_webhook_is_down() {
    let _alone = ALONE.write().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "down").await;
    let options = WebhookOptions::default();
    let hook = webhook::start(&client, &ns, options.clone()).await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "pools": [{"subnet": "10.41.0.0/24"}], "prefix": 24, "gateway": "10.41.0.1"}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    let api = machines(&client, &ns);
    for name in ["gone", "kept"] {
        common::util::create_machine(&client, &ns, name).await;
        patch_ok(
            &client,
            &ns,
            name,
            "CAPE's finalizer",
            json!({"metadata": {"finalizers": [FINALIZER, CAPE_FINALIZER]}}),
        )
        .await;
    }
    assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, 2);

    // The webhook stops; its registration stays (failurePolicy Fail), pointing at a closed port.
    let dead = hook.running.webhook_addr;
    let (config, ca_pem) = (hook.config.clone(), hook.ca_pem.clone());
    hook.running.shutdown().await;

    for name in ["gone", "kept"] {
        patch_ok(
            &client,
            &ns,
            name,
            "a label",
            json!({"metadata": {"labels": {"node.cluster.x-k8s.io/pool": "workers"}}}),
        )
        .await;
        patch_ok(
            &client,
            &ns,
            name,
            "an annotation",
            json!({"metadata": {"annotations": {"cluster.x-k8s.io/paused": ""}}}),
        )
        .await;
        patch_ok(
            &client,
            &ns,
            name,
            "providerID",
            json!({"spec": {"providerID": format!("elf://{name}")}}),
        )
        .await;
        patch_ok(
            &client,
            &ns,
            name,
            "a finalizer added",
            json!({"metadata": {"finalizers": [FINALIZER, CAPE_FINALIZER, "example.com/other"]}}),
        )
        .await;
        patch_ok(
            &client,
            &ns,
            name,
            "a finalizer removed",
            json!({"metadata": {"finalizers": [FINALIZER, CAPE_FINALIZER]}}),
        )
        .await;
    }
    // A machine whose devices all have addresses can be created (we would not touch it).
    let fixed = machine(
        "fixed",
        json!([{"networkType": "IPV4", "ipAddrs": ["10.41.0.250"], "netmask": "255.255.255.0"}]),
    );
    webhook::create(&client, &ns, fixed)
        .await
        .expect("a create that needs no address");
    // One that needs an address is refused, as today (dry run too); so is a wipe of ipAddrs.
    refused_by_the_apiserver(
        webhook::create(
            &client,
            &ns,
            machine("new", json!([{"networkType": "IPV4"}])),
        )
        .await,
        "a create that needs an address",
    );
    let obj: kube::core::DynamicObject =
        serde_json::from_value(machine("new", json!([{"networkType": "IPV4"}]))).unwrap();
    refused_by_the_apiserver(
        api.create(
            &PostParams {
                dry_run: true,
                ..Default::default()
            },
            &obj,
        )
        .await,
        "a dry-run create that needs an address",
    );
    refused_by_the_apiserver(
        api.patch("kept", &PatchParams::default(), &Patch::Merge(json!({"spec": {"network": {"devices": [{"networkType": "IPV4", "vlan": "vlan-1"}]}}}))).await,
        "an update wiping ipAddrs",
    );

    // Deletion: CAPE deletes the VM and removes its finalizer; only ours is left.
    api.delete("gone", &DeleteParams::default()).await.unwrap();
    patch_ok(
        &client,
        &ns,
        "gone",
        "CAPE's finalizer removed",
        json!({"metadata": {"finalizers": [FINALIZER]}}),
    )
    .await;
    let waiting = serde_json::to_value(api.get("gone").await.unwrap()).unwrap();
    assert_eq!(waiting["metadata"]["finalizers"], json!([FINALIZER]));
    assert!(waiting["metadata"]["deletionTimestamp"].is_string());
    assert_eq!(
        count(&client, &ns, "IPClaim", "ipclaims").await,
        2,
        "nothing released while we are down"
    );

    // The same registration without the conditions (an apiserver before 1.28) refuses even a
    // label: what the conditions change. The apiserver picks a configuration up shortly.
    webhook::register_with(&client, &config, dead, &ca_pem, &ns, "Fail", false).await;
    eventually(std::time::Duration::from_secs(10), "a label refused without the conditions", || async {
        matches!(
            api.patch("kept", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"probe": "x"}}}))).await,
            Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook")
        )
    })
    .await;

    // Back up (registered with the conditions again): the release loop releases "gone".
    let hook = webhook::start(&client, &ns, options).await;
    eventually(
        std::time::Duration::from_secs(30),
        "the deleted machine released",
        || gone(&client, &ns, "gone"),
    )
    .await;
    eventually(
        std::time::Duration::from_secs(10),
        "its claim and address deleted",
        || async {
            let claims = common::util::objects(&client, &ns, "IPClaim", "ipclaims").await;
            let addresses = count(&client, &ns, "IPAddress", "ipaddresses").await;
            claims.len() == 1
                && claims[0]["metadata"]["name"] == format!("{ns}-kept-0")
                && addresses == 1
        },
    )
    .await;
    let kept = serde_json::to_value(api.get("kept").await.unwrap()).unwrap();
    assert_eq!(
        kept["metadata"]["labels"]["node.cluster.x-k8s.io/pool"],
        "workers"
    );
    assert!(kept["spec"]["network"]["devices"][0]["ipAddrs"][0].is_string());
    hook.stop().await;
}

/// A realistic life (create, [`PATCHES`] metadata and spec patches as CAPI and CAPE make them,
/// deletion with CAPE's finalizer removed, release) costs one admission call per machine with
/// the conditions, and at least `2 + PATCHES` more without them (each patch, CAPE's finalizer
/// removal and our own). Counted from the webhook's /metrics. `make bench` prints the same
/// for 100.
#[tokio::test]
async fn a_machine_life_costs_one_admission_call() {
    let _shared = ALONE.read().await;
    const N: u64 = 10;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let with = temp_namespace(&client, "life-with").await;
    let without = temp_namespace(&client, "life-without").await;
    let hook = webhook::start(&client, &with, WebhookOptions::default()).await;
    let config = format!("cape-static-ip-test-{without}");
    webhook::register_with(
        &client,
        &config,
        hook.running.webhook_addr,
        &hook.ca_pem,
        &without,
        "Fail",
        false,
    )
    .await;
    for (ns, subnet) in [(&with, "10.42.0.0/24"), (&without, "10.43.0.0/24")] {
        setup(
            &client,
            ns,
            json!({"namePrefix": "pool", "pools": [{"subnet": subnet}], "prefix": 24}),
        )
        .await;
        wait_for_pool(&hook, ns).await;
    }
    // The registration without conditions is picked up: a label update reaches us.
    webhook::create(
        &client,
        &without,
        machine("probe", json!([{"networkType": "IPV4_DHCP"}])),
    )
    .await
    .unwrap();
    eventually(
        std::time::Duration::from_secs(10),
        "the second registration in effect",
        || async {
            let before = total(&calls(&hook).await);
            patch_ok(
                &client,
                &without,
                "probe",
                "a label",
                json!({"metadata": {"labels": {"probe": format!("{before}")}}}),
            )
            .await;
            total(&calls(&hook).await) > before
        },
    )
    .await;

    let mut figures = Vec::new();
    for ns in [&without, &with] {
        let before = calls(&hook).await;
        life::machine_lives(&client, ns, "m", "tpl", N as usize, 5).await;
        let spent = calls_between(&before, &calls(&hook).await);
        assert_eq!(
            count(&client, ns, "IPClaim", "ipclaims").await,
            0,
            "every address released"
        );
        figures.push(spent);
    }
    println!(
        "admission calls for {N} machine lives: without conditions {:?}, with {:?}",
        figures[0], figures[1]
    );
    // Without: every create, and at least every update (the apiserver runs mutating admission
    // again when an update it started from its watch cache meets a newer version, so back-to-
    // back writes to one machine can cost more than one call each).
    assert_eq!(
        figures[0].get("CREATE"),
        Some(&N),
        "without conditions: every create"
    );
    let updates = figures[0].get("UPDATE").copied().unwrap_or(0);
    assert!(
        updates >= N * (PATCHES as u64 + 2),
        "without conditions every update is sent: {updates}"
    );
    assert_eq!(
        figures[1],
        BTreeMap::from([("CREATE".to_string(), N)]),
        "with the conditions: the creates only"
    );
    let _ = kube::Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(client.clone())
        .delete(&config, &DeleteParams::default())
        .await;
    hook.stop().await;
}
