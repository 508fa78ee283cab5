//! Lifecycle on a real kube-apiserver: release after the VM is gone, the sweeper, the
//! fallback reconciler and the take-over from the Go controller.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::*;
use common::webhook::{self, WebhookOptions, capi_machine, create, dynamic, ipclaims, machines};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

const FINALIZER: &str = "elfmachinestaticip.infrastructure.cluster.x-k8s.io";
const CAPE_FINALIZER: &str = "elfmachine.infrastructure.cluster.x-k8s.io";

#[tokio::test]
async fn release_waits_for_capes_finalizer_then_frees_the_address() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "release").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "pools": [{"subnet": "10.20.0.0/24"}], "prefix": 24}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    let api = machines(&client, &ns);

    let mut latencies = Vec::new();
    for i in 0..20 {
        let name = format!("m-{i}");
        create_machine(&client, &ns, &name).await;
        // CAPE adds its finalizer once it starts on the VM.
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": [FINALIZER, CAPE_FINALIZER]}})),
        )
        .await
        .unwrap();
        api.delete(&name, &DeleteParams::default()).await.unwrap();
        if i == 0 {
            // While CAPE's finalizer is there, the VM may exist: the address is held.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(!gone(&client, &ns, &name).await);
            assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, 1);
            assert_eq!(count(&client, &ns, "IPAddress", "ipaddresses").await, 1);
        }
        // CAPE deleted the VM and removes its finalizer.
        let live = serde_json::to_value(api.get(&name).await.unwrap()).unwrap();
        let at = live["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .position(|f| f == CAPE_FINALIZER)
            .unwrap();
        let remove = json!([{"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": CAPE_FINALIZER},
                            {"op": "remove", "path": format!("/metadata/finalizers/{at}")}]);
        let start = Instant::now();
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(remove).unwrap()),
        )
        .await
        .unwrap();
        eventually(Duration::from_secs(10), "machine released", || {
            gone(&client, &ns, &name)
        })
        .await;
        latencies.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, 0);
        assert_eq!(count(&client, &ns, "IPAddress", "ipaddresses").await, 0);
    }
    // Operators see it on the pool: Allocated and Released events (published off the
    // request path, so eventually).
    eventually(Duration::from_secs(10), "pool events", || async {
        let events =
            kube::Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &ns)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items;
        let on_pool = |reason: &str| {
            events.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("IPPool")
            })
        };
        on_pool("Allocated") && on_pool("Released")
    })
    .await;
    latencies.sort_by(f64::total_cmp);
    println!(
        "release latency after CAPE's finalizer removal over {} machines: p50 {:.0} ms, p99 {:.0} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    hook.stop().await;
}

#[tokio::test]
async fn the_same_name_deleted_and_recreated_twenty_times() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "recreate").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    setup(&client, &ns, json!({"namePrefix": "pool", "pools": [{"start": "10.22.0.10", "end": "10.22.0.12"}], "prefix": 24})).await;
    wait_for_pool(&hook, &ns).await;
    for round in 0..20 {
        let m = create_machine(&client, &ns, "same").await;
        assert!(!ip_of(&m).is_empty(), "round {round}: {m:#}");
        assert_eq!(
            count(&client, &ns, "IPClaim", "ipclaims").await,
            1,
            "round {round}"
        );
        assert_eq!(
            count(&client, &ns, "IPAddress", "ipaddresses").await,
            1,
            "round {round}"
        );
        machines(&client, &ns)
            .delete("same", &DeleteParams::default())
            .await
            .unwrap();
        eventually(Duration::from_secs(10), "released", || {
            gone(&client, &ns, "same")
        })
        .await;
    }
    assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, 0);
    assert_eq!(count(&client, &ns, "IPAddress", "ipaddresses").await, 0);
    hook.stop().await;
}

#[tokio::test]
async fn create_delete_cycles_leak_nothing_and_pool_status_matches() {
    let cycles: usize = std::env::var("CAPE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "cycles").await;
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            claim_grace: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await;
    setup(&client, &ns, json!({"namePrefix": "pool", "pools": [{"subnet": "10.23.0.0/24"}], "prefix": 24, "gateway": "10.23.0.1"})).await;
    wait_for_pool(&hook, &ns).await;
    let start = Instant::now();
    let workers = 20;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let client = client.clone();
        let ns = ns.clone();
        tasks.spawn(async move {
            let mut i = w;
            while i < cycles {
                let name = format!("c-{i}");
                let m = create_machine(&client, &ns, &name).await;
                assert!(!ip_of(&m).is_empty());
                machines(&client, &ns)
                    .delete(&name, &DeleteParams::default())
                    .await
                    .unwrap();
                i += workers;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    eventually(
        Duration::from_secs(60),
        "every machine released",
        || async {
            machines(&client, &ns)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
        },
    )
    .await;
    let took = start.elapsed();
    // Machines deleted an instant after their create are often seen by the release before
    // their claims are: nothing may be left all the same, without waiting for the sweep.
    for (kind, plural) in [("IPClaim", "ipclaims"), ("IPAddress", "ipaddresses")] {
        let left: Vec<String> = objects(&client, &ns, kind, plural)
            .await
            .iter()
            .map(|o| {
                format!(
                    "{} (claim {}, created {})",
                    o["metadata"]["name"],
                    o["spec"]["claim"]["name"],
                    o["metadata"]["creationTimestamp"]
                )
            })
            .collect();
        assert!(left.is_empty(), "leaked {kind}s: {left:#?}");
    }
    // One machine stays: status.indexes must show exactly its claim.
    let m = create_machine(&client, &ns, "stays").await;
    let want = json!({format!("{ns}-stays-0"): ip_of(&m)});
    eventually(
        Duration::from_secs(30),
        "pool status matches the objects",
        || async {
            let p = dynamic(
                &client,
                &ns,
                "ipam.metal3.io",
                "v1alpha1",
                "IPPool",
                "ippools",
            )
            .get("pool")
            .await
            .unwrap();
            serde_json::to_value(p).unwrap()["status"]["indexes"] == want
        },
    )
    .await;
    println!(
        "{cycles} create/delete cycles at concurrency {workers}: {:.1}s, 0 leaked objects",
        took.as_secs_f64()
    );
    hook.stop().await;
}

#[tokio::test]
async fn the_sweeper_frees_nothing_live_during_500_creates() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "inflight").await;
    // The shortest grace period the CLI accepts, and sweeps every 5 s while the creates
    // run: claims of earlier machines age past the grace period while later creates are
    // still in flight.
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            claim_grace: cape_static_ip::cmd::serve::MIN_CLAIM_GRACE,
            resync: Duration::from_secs(5),
            ..Default::default()
        },
    )
    .await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "pools": [{"subnet": "10.24.0.0/22"}], "prefix": 22}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    let mut tasks = tokio::task::JoinSet::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(50));
    for i in 0..500 {
        let client = client.clone();
        let ns = ns.clone();
        let sem = sem.clone();
        tasks.spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let name = format!("n-{i}");
            let ip = ip_of(&create_machine(&client, &ns, &name).await);
            (name, ip)
        });
    }
    let mut ips = BTreeSet::new();
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (name, ip) = r.unwrap();
        all.push((ip.clone(), name));
        ips.insert(ip);
    }
    all.sort();
    let dups: Vec<_> = all
        .windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| (w[0].clone(), w[1].1.clone()))
        .collect();
    for ((ip, a), b) in &dups {
        for name in [a, b] {
            let now =
                serde_json::to_value(machines(&client, &ns).get(name).await.unwrap()).unwrap();
            eprintln!(
                "DUP {ip}: machine {name} now has {} uid {} rv {}",
                ip_of(&now),
                now["metadata"]["uid"],
                now["metadata"]["resourceVersion"]
            );
        }
    }
    assert!(dups.is_empty(), "duplicate or missing addresses: {dups:?}");
    assert_eq!(ips.len(), 500);
    // Sweeps later, everything is still there.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let created = |v: &Value| {
        v["metadata"]["creationTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
    };
    let claims = objects(&client, &ns, "IPClaim", "ipclaims").await;
    let mut gaps = Vec::new();
    for m in machines(&client, &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        let m = serde_json::to_value(m).unwrap();
        let claim = format!("{ns}-{}-0", m["metadata"]["name"].as_str().unwrap());
        if let Some(c) = claims
            .iter()
            .find(|c| c["metadata"]["name"] == json!(claim))
            && let (Some(a), Some(b)) = (created(c), created(&m))
        {
            gaps.push(b.duration_since(a).as_secs_f64());
        }
    }
    gaps.sort_by(f64::total_cmp);
    println!(
        "claim created → machine stored: max {:.0}s over {} machines",
        gaps.last().copied().unwrap_or(0.0),
        gaps.len()
    );
    assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, 500);
    let addresses: BTreeSet<String> = objects(&client, &ns, "IPAddress", "ipaddresses")
        .await
        .iter()
        .map(|a| a["spec"]["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(addresses, ips);
    hook.stop().await;
}

#[tokio::test]
async fn take_over_from_the_go_controller() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "takeover").await;
    setup(&client, &ns, json!({"namePrefix": "pool", "pools": [{"start": "10.26.0.10", "end": "10.26.0.20"}], "prefix": 24, "gateway": "10.26.0.1"})).await;
    // What the Go controller and metal3 left: machines with addresses and the finalizer,
    // claims `<ns>-<name>-0` without labels, addresses made by metal3.
    let pool_uid = serde_json::to_value(
        dynamic(
            &client,
            &ns,
            "ipam.metal3.io",
            "v1alpha1",
            "IPPool",
            "ippools",
        )
        .get("pool")
        .await
        .unwrap(),
    )
    .unwrap()["metadata"]["uid"]
        .clone();
    for (i, ip) in ["10.26.0.10", "10.26.0.11", "10.26.0.12"]
        .iter()
        .enumerate()
    {
        let name = format!("go-{i}");
        let claim = format!("{ns}-{name}-0");
        let address = format!("pool-{}", ip.replace('.', "-"));
        create(
            &client,
            &ns,
            json!({
                "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPClaim",
                "metadata": {"name": claim, "finalizers": ["ipclaim.ipam.metal3.io"]},
                "spec": {"pool": {"name": "pool", "namespace": ns}}
            }),
        )
        .await
        .unwrap();
        create(&client, &ns, json!({
            "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPAddress",
            "metadata": {"name": address, "finalizers": ["ipaddress.ipam.metal3.io"],
                         "ownerReferences": [{"apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPPool", "name": "pool", "uid": pool_uid}]},
            "spec": {"address": ip, "prefix": 24, "gateway": "10.26.0.1", "pool": {"name": "pool", "namespace": ns},
                     "claim": {"name": claim, "namespace": ns}}
        }))
        .await
        .unwrap();
        ipclaims(&client, &ns)
            .patch_status(
                &claim,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"address": {"name": address, "namespace": ns}}})),
            )
            .await
            .unwrap();
        let mut m = capi_machine(
            &name,
            "tpl",
            json!([{"networkType": "IPV4", "ipAddrs": [ip], "netmask": "255.255.255.0",
                                                        "routes": [{"gateway": "10.26.0.1"}]}]),
        );
        m["metadata"]["finalizers"] = json!([FINALIZER]);
        create(&client, &ns, m).await.unwrap();
    }
    // Now we take over.
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    wait_for_pool(&hook, &ns).await;
    eventually(Duration::from_secs(10), "claims adopted", || async {
        objects(&client, &ns, "IPClaim", "ipclaims").await.iter().all(|c| {
            c["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "cape-static-ip"
                && c["metadata"]["annotations"]["static-ip.infrastructure.cluster.x-k8s.io/machine-uid"].is_string()
        })
    })
    .await;
    // Their machines keep their addresses; a new machine gets a different one.
    for (i, ip) in ["10.26.0.10", "10.26.0.11", "10.26.0.12"]
        .iter()
        .enumerate()
    {
        let m = serde_json::to_value(
            machines(&client, &ns)
                .get(&format!("go-{i}"))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(ip_of(&m), *ip);
    }
    let fresh = create_machine(&client, &ns, "fresh").await;
    assert_eq!(ip_of(&fresh), "10.26.0.13");
    // Release works on adopted claims, metal3's finalizers included (its controller is gone).
    machines(&client, &ns)
        .delete("go-1", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "adopted machine released", || {
        gone(&client, &ns, "go-1")
    })
    .await;
    eventually(
        Duration::from_secs(10),
        "adopted claim and address deleted",
        || async {
            count(&client, &ns, "IPClaim", "ipclaims").await == 3
                && count(&client, &ns, "IPAddress", "ipaddresses").await == 3
        },
    )
    .await;
    let again = create_machine(&client, &ns, "again").await;
    assert_eq!(
        ip_of(&again),
        "10.26.0.11",
        "the released address is free again"
    );
    hook.stop().await;
}

/// A claim bound to an earlier machine of the same name (deleted without its release: its
/// finalizers removed by hand) is never reused: the new machine is denied with a message that
/// says why and what to do, and gets an address once the claim is gone.
#[tokio::test]
async fn a_claim_bound_to_an_earlier_machine_is_never_reused() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "bound").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    setup(&client, &ns, json!({"namePrefix": "pool", "pools": [{"start": "10.24.0.10", "end": "10.24.0.20"}], "prefix": 24})).await;
    wait_for_pool(&hook, &ns).await;
    let old = create_machine(&client, &ns, "again").await;
    let uid = old["metadata"]["uid"].as_str().unwrap().to_string();
    let claim = format!("{ns}-again-0");
    let claims = ipclaims(&client, &ns);
    // What the periodic pass does for every machine: bind its claims to its uid.
    claims
        .patch(
            &claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "static-ip.infrastructure.cluster.x-k8s.io/machine-uid": uid}}})),
        )
        .await
        .unwrap();
    // Gone without a release: finalizers removed by hand, then deleted.
    let api = machines(&client, &ns);
    api.patch(
        "again",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    api.delete("again", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(10), "machine gone", || {
        gone(&client, &ns, "again")
    })
    .await;

    let denied = create(
        &client,
        &ns,
        capi_machine("again", "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await
    .expect_err("a bound claim must not be reused");
    let message = denied.to_string();
    assert!(
        message.contains(&format!(
            "IPClaim {ns}/{claim} is bound to an earlier ElfMachine"
        )) && message.contains(&uid),
        "{message}"
    );
    assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, 1);

    // Once the claim is gone, the name gets an address again.
    claims
        .delete(&claim, &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "claim gone from the cache", || {
        let gone = hook
            .running
            .state
            .assigner
            .caches
            .claims
            .get(&ns, &claim)
            .is_none();
        async move { gone }
    })
    .await;
    let again = create_machine(&client, &ns, "again").await;
    assert!(!ip_of(&again).is_empty(), "{again:#}");
    hook.stop().await;
}
