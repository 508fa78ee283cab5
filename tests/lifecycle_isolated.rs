//! Lifecycle tests that must be the only webhook on their control plane (their own test
//! binary, run one at a time): a short grace period must not act on other tests' in-flight
//! creates, and "the webhook is down" means no other replica is running.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::*;
use common::webhook::{self, WebhookOptions, capi_machine, create, machines};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

const FINALIZER: &str = "elfmachinestaticip.infrastructure.cluster.x-k8s.io";

/// One test at a time in this binary.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A ValidatingAdmissionPolicy that denies ElfMachines labelled `deny: "yes"` in one
/// namespace: a create our webhook allowed is denied later in admission.
async fn deny_later_in_admission(client: &Client, ns: &str) {
    let policy: k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": format!("deny-{ns}")},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": ["infrastructure.cluster.x-k8s.io"], "apiVersions": ["*"],
                "operations": ["CREATE"], "resources": ["elfmachines"]}]},
            "validations": [{"expression": "!has(object.metadata.labels) || !('deny' in object.metadata.labels)",
                             "message": "denied by a later policy"}]
        }
    })).unwrap();
    let binding: k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("deny-{ns}")},
        "spec": {"policyName": format!("deny-{ns}"), "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}
    })).unwrap();
    Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy>::all(
        client.clone(),
    )
    .create(&PostParams::default(), &policy)
    .await
    .unwrap();
    Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>::all(
        client.clone(),
    )
    .create(&PostParams::default(), &binding)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_create_denied_later_leaves_a_claim_that_is_swept_after_the_grace_period() {
    let _alone = ALONE.lock().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "grace").await;
    let grace = Duration::from_secs(10);
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            claim_grace: grace,
            ..Default::default()
        },
    )
    .await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "pools": [{"subnet": "10.21.0.0/24"}], "prefix": 24}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    deny_later_in_admission(&client, &ns).await;

    // The policy is picked up asynchronously: retry until it denies.
    let mut denied_at = None;
    for i in 0..200 {
        let mut m = capi_machine(
            &format!("denied-{i}"),
            "tpl",
            json!([{"networkType": "IPV4"}]),
        );
        m["metadata"]["labels"]["deny"] = json!("yes");
        match create(&client, &ns, m).await {
            Err(kube::Error::Api(s)) if s.message.contains("denied by a later policy") => {
                denied_at = Some(Instant::now());
                break;
            }
            Err(e) => panic!("unexpected: {e}"),
            Ok(_) => {
                // Created before the policy was active: delete it (released normally).
                machines(&client, &ns)
                    .delete(&format!("denied-{i}"), &DeleteParams::default())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let denied_at = denied_at.expect("the policy never denied");
    eventually(
        Duration::from_secs(10),
        "only the denied machine's claim is left",
        || async { count(&client, &ns, "IPClaim", "ipclaims").await == 1 },
    )
    .await;
    // A live machine beside it must keep its claim.
    let live = create_machine(&client, &ns, "live").await;
    assert!(!ip_of(&live).is_empty());
    tokio::time::sleep(grace / 2).await;
    assert!(
        denied_at.elapsed() < grace,
        "test too slow to check the claim before the grace period"
    );
    assert_eq!(
        count(&client, &ns, "IPClaim", "ipclaims").await,
        2,
        "swept before the grace period"
    );
    eventually(grace * 3, "orphaned claim swept", || async {
        count(&client, &ns, "IPClaim", "ipclaims").await == 1
            && count(&client, &ns, "IPAddress", "ipaddresses").await == 1
    })
    .await;
    println!(
        "orphaned claim swept {:.1}s after the denial (grace {grace:?})",
        denied_at.elapsed().as_secs_f64()
    );
    let claims = objects(&client, &ns, "IPClaim", "ipclaims").await;
    assert_eq!(claims[0]["metadata"]["name"], format!("{ns}-live-0"));
    let _ =
        Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>::all(
            client.clone(),
        )
        .delete(&format!("deny-{ns}"), &DeleteParams::default())
        .await;
    let _ = Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicy>::all(
        client.clone(),
    )
    .delete(&format!("deny-{ns}"), &DeleteParams::default())
    .await;
    hook.stop().await;
}

#[tokio::test]
async fn webhook_down_then_everything_is_reconciled_within_one_resync() {
    let _alone = ALONE.lock().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "down").await;
    let resync = Duration::from_secs(10);
    let options = WebhookOptions {
        failure_policy: "Ignore",
        resync,
        ..Default::default()
    };
    let hook = webhook::start(&client, &ns, options.clone()).await;
    setup(&client, &ns, json!({"namePrefix": "pool", "pools": [{"subnet": "10.25.0.0/24"}], "prefix": 24, "gateway": "10.25.0.1"})).await;
    wait_for_pool(&hook, &ns).await;
    for i in 0..50 {
        create_machine(&client, &ns, &format!("old-{i}")).await;
    }
    // The webhook goes away (its registration stays, with failurePolicy Ignore).
    let config = hook.config.clone();
    hook.running.shutdown().await;
    for i in 0..50 {
        machines(&client, &ns)
            .delete(&format!("old-{i}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    for i in 0..10 {
        let m = create_machine(&client, &ns, &format!("new-{i}")).await;
        assert!(ip_of(&m).is_empty(), "admitted without the webhook");
    }
    assert_eq!(
        machines(&client, &ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        60
    );
    let _ = config;
    let start = Instant::now();
    let hook = webhook::start(&client, &ns, options).await;
    eventually(resync, "all reconciled", || async {
        let items = machines(&client, &ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        items.len() == 10
            && items.iter().all(|m| {
                let v = serde_json::to_value(m).unwrap();
                !ip_of(&v).is_empty() && v["metadata"]["finalizers"] == json!([FINALIZER])
            })
    })
    .await;
    eventually(Duration::from_secs(5), "claims match", || async {
        count(&client, &ns, "IPClaim", "ipclaims").await == 10
            && count(&client, &ns, "IPAddress", "ipaddresses").await == 10
    })
    .await;
    println!(
        "webhook back: 50 releases and 10 late allocations reconciled in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let ips: BTreeSet<String> = machines(&client, &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|m| ip_of(&serde_json::to_value(m).unwrap()))
        .collect();
    assert_eq!(ips.len(), 10);
    hook.stop().await;
}
