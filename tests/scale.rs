//! Concurrency and scale correctness on a real control plane: several webhook replicas (each
//! with its own client, caches and in-process reservations) allocating from ONE pool at once,
//! with AdmissionReviews sent straight to them over HTTPS and creates through the apiserver.
//! The apiserver (the IPAddress name) is the only arbiter between replicas: no duplicate,
//! every address used exactly once, a full pool denies cleanly and writes nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use cape_static_ip::cluster::crd::IPAddress;
use cape_static_ip::cmd::serve::{self, Options, Running};
use cape_static_ip::ipam::PoolKey;
use common::controlplane::{CrdSet, shared, temp_namespace};
use common::webhook::{self, capi_machine, create, dev_certs, dynamic, machines, pool, template};
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

/// Requests in flight at once (what a busy MachineSet controller plus the apiserver produce).
const IN_FLIGHT: usize = 50;

/// How one allocation attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Address(Ipv4Addr),
    Denied(String),
}

/// Starts one replica: its own client, caches and reservations; no background loops.
async fn replica(client: Client, certs: &Path) -> Running {
    let running = serve::start(
        client,
        Options {
            listen: "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert_file: certs.join("tls.crt"),
            tls_key_file: certs.join("tls.key"),
            default_pool_namespace: "cape-system".into(),
            resync: Duration::from_secs(300),
            claim_grace: Duration::from_secs(120),
            reuse_delay: std::time::Duration::ZERO,
            cert_reload: Duration::from_secs(60),
            drain: Duration::from_secs(5),
            shutdown_delay: Duration::ZERO,
            background: false,
            limits: Default::default(),
            // Reviews are posted straight to the replicas, for machines that never appear.
            auth: cape_static_ip::webhook::auth::AuthOptions::off(),
            caps: Default::default(),
        },
    )
    .await
    .expect("replica starts");
    running.ready().await;
    running
}

fn https_client(ca_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The AdmissionReview the apiserver sends for a CAPI create of ElfMachine `name`.
fn review(ns: &str, name: &str, i: usize) -> Value {
    let mut object = capi_machine(name, "tpl", json!([{"networkType": "IPV4"}]));
    object["metadata"]["namespace"] = json!(ns);
    let gvk = json!({"group": "infrastructure.cluster.x-k8s.io", "version": "v1beta1", "kind": "ElfMachine"});
    let gvr = json!({"group": "infrastructure.cluster.x-k8s.io", "version": "v1beta1", "resource": "elfmachines"});
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("00000000-0000-4000-8000-{i:012}"),
            "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
            "name": name, "namespace": ns, "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:capi-system:capi-controller-manager"},
            "object": object, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// Sends a review straight to a replica and reads the address from the patch it answers.
async fn send_review(http: &reqwest::Client, addr: SocketAddr, body: &Value) -> Outcome {
    let resp: Value = http
        .post(format!("https://{addr}/mutate-elfmachine"))
        .json(body)
        .send()
        .await
        .expect("webhook reachable")
        .error_for_status()
        .expect("webhook answers 200")
        .json()
        .await
        .expect("an AdmissionReview");
    let r = &resp["response"];
    assert_eq!(r["uid"], body["request"]["uid"], "{resp}");
    if r["allowed"] != json!(true) {
        return Outcome::Denied(r["status"]["message"].as_str().unwrap_or("").to_string());
    }
    let patch = base64::engine::general_purpose::STANDARD
        .decode(r["patch"].as_str().expect("a patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut object = body["request"]["object"].clone();
    json_patch::patch(&mut object, &patch).expect("the patch applies");
    Outcome::Address(machine_ip(&object).expect("an address in the patched object"))
}

fn machine_ip(m: &Value) -> Option<Ipv4Addr> {
    m["spec"]["network"]["devices"][0]["ipAddrs"][0]
        .as_str()?
        .parse()
        .ok()
}

/// Creates ElfMachine `name` through the apiserver (which calls the registered replica).
async fn create_machine(client: &Client, ns: &str, name: &str) -> Outcome {
    match create(
        client,
        ns,
        capi_machine(name, "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await
    {
        Ok(m) => Outcome::Address(
            machine_ip(&serde_json::to_value(m).unwrap()).expect("the stored machine has an IP"),
        ),
        Err(kube::Error::Api(s)) => Outcome::Denied(s.message),
        Err(e) => panic!("create {ns}/{name}: {e}"),
    }
}

/// Registers `addr` for `ns` and waits until the apiserver calls it.
async fn register(client: &Client, config: &str, addr: SocketAddr, ca_pem: &str, ns: &str) {
    webhook::register(client, config, addr, ca_pem, ns, "Fail").await;
    let probe: kube::core::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
        "kind": "ElfMachine",
        "metadata": {"name": "probe", "namespace": ns,
                     "labels": {"cluster.x-k8s.io/ip-pool-name": "no-such-pool-probe"}},
        "spec": {"network": {"devices": [{"networkType": "IPV4"}]}}
    }))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for _ in 0..200 {
        if let Err(kube::Error::Api(s)) = machines(client, ns).create(&dry, &probe).await
            && s.message.contains("no-such-pool-probe")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the apiserver never called the webhook for {ns}");
}

async fn unregister(client: &Client, config: &str) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let _ = api.delete(config, &DeleteParams::default()).await;
}

/// Waits until every replica's index knows the pool.
async fn wait_for_pool(replicas: &[&Running], key: &PoolKey) {
    for _ in 0..200 {
        if replicas
            .iter()
            .all(|r| r.state.assigner.caches.index.with_pool(key, |_| ()).is_ok())
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the replicas never saw IPPool {key:?}");
}

async fn ipam_objects(client: &Client, ns: &str, kind: &str, plural: &str) -> Vec<Value> {
    dynamic(client, ns, "ipam.metal3.io", "v1alpha1", kind, plural)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| serde_json::to_value(o).unwrap())
        .collect()
}

/// Every handed-out address is distinct, and exactly the IPAddress objects of the namespace,
/// each with one claim whose status points at it.
async fn check_objects(client: &Client, ns: &str, handed: &BTreeSet<Ipv4Addr>) {
    let addresses = ipam_objects(client, ns, "IPAddress", "ipaddresses").await;
    let claims = ipam_objects(client, ns, "IPClaim", "ipclaims").await;
    let stored: BTreeMap<String, Ipv4Addr> = addresses
        .iter()
        .map(|a| {
            (
                a["metadata"]["name"].as_str().unwrap().to_string(),
                a["spec"]["address"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect();
    let stored_ips: BTreeSet<Ipv4Addr> = stored.values().copied().collect();
    assert_eq!(addresses.len(), handed.len(), "IPAddress objects");
    assert_eq!(
        &stored_ips, handed,
        "IPAddress objects = addresses handed out"
    );
    assert_eq!(claims.len(), handed.len(), "IPClaim objects");
    let mut bound = BTreeSet::new();
    for c in &claims {
        let name = c["status"]["address"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("claim without status.address: {c:#}"));
        let ip = stored
            .get(name)
            .unwrap_or_else(|| panic!("claim points at a missing IPAddress: {c:#}"));
        assert!(bound.insert(*ip), "two claims bound to {ip}");
    }
}

/// 10.20.0.10 – 10.20.1.53: exactly 300 addresses (the /16's gateway is outside the range).
fn pool_300() -> Value {
    pool(
        "scale",
        json!({
            "namePrefix": "scale",
            "pools": [{"start": "10.20.0.10", "end": "10.20.1.53"}],
            "prefix": 16, "gateway": "10.20.255.254"
        }),
        json!({}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_fill_a_300_address_pool_without_a_duplicate() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "scale").await;
    let (certs, ca_pem) = dev_certs("scale");
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(cp.client().await, &certs).await);
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.webhook_addr).collect();
    let config = format!("cape-static-ip-scale-{ns}");
    register(&client, &config, addrs[0], &ca_pem, &ns).await;

    create(&client, &ns, pool_300()).await.unwrap();
    create(
        &client,
        &ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "scale"})),
    )
    .await
    .unwrap();
    let key = PoolKey {
        namespace: ns.clone(),
        name: "scale".into(),
    };
    wait_for_pool(&replicas.iter().collect::<Vec<_>>(), &key).await;

    // 300 requests: every 10th through the apiserver (to replica 0), the rest straight to the
    // replicas, round-robin; IN_FLIGHT at once. Requests 303 and 304 go through the apiserver.
    let http = https_client(&ca_pem);
    let started = Instant::now();
    let attempt = |i: usize| {
        let (client, ns, http, addrs) = (client.clone(), ns.clone(), http.clone(), addrs.clone());
        async move {
            let name = format!("m-{i:03}");
            let outcome = if i % 10 == 9 || i >= 303 {
                create_machine(&client, &ns, &name).await
            } else {
                send_review(&http, addrs[i % 3], &review(&ns, &name, i)).await
            };
            (i, outcome)
        }
    };
    let outcomes: Vec<(usize, Outcome)> = futures::stream::iter((0..300).map(attempt))
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    println!("300 allocations over 3 replicas in {:?}", started.elapsed());
    let mut handed = BTreeSet::new();
    for (i, outcome) in &outcomes {
        match outcome {
            Outcome::Address(ip) => {
                assert!(handed.insert(*ip), "request {i}: {ip} handed out twice")
            }
            Outcome::Denied(m) => panic!("request {i} denied: {m}"),
        }
    }
    assert_eq!(handed.len(), 300);
    check_objects(&client, &ns, &handed).await;
    let stored_machines = machines(&client, &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(
        stored_machines.len(),
        30,
        "ElfMachines created through the apiserver"
    );

    // The pool is full: 5 more, through every path, are denied cleanly and write nothing.
    let more: Vec<(usize, Outcome)> = futures::stream::iter((300..305).map(attempt))
        .buffer_unordered(5)
        .collect()
        .await;
    for (i, outcome) in &more {
        match outcome {
            Outcome::Denied(m) => assert!(m.contains("no free address"), "request {i}: {m}"),
            Outcome::Address(ip) => panic!("request {i} got {ip} from a full pool"),
        }
    }
    assert!(
        more.iter().any(|(i, _)| *i >= 303),
        "one of the 5 went through the apiserver"
    );
    check_objects(&client, &ns, &handed).await;
    for r in &replicas {
        let (free, used) = r
            .state
            .assigner
            .caches
            .index
            .with_pool(&key, |s| (s.free(), s.used()))
            .unwrap();
        assert_eq!((free, used), (0, 300), "no reservation left behind");
    }

    unregister(&client, &config).await;
    for r in replicas {
        r.shutdown().await;
    }
    let _ = std::fs::remove_dir_all(&certs);
}

/// A replica whose IPAddress watch lags behind the others: its index still believes 100
/// addresses taken by another replica are free. It must learn from the apiserver's 409s,
/// never hand out a duplicate, and still fill the pool exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_with_a_lagging_cache_hands_out_no_duplicate() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "lag").await;
    let (certs, ca_pem) = dev_certs("lag");
    let lagging = replica(cp.client().await, &certs).await;
    let current = replica(cp.client().await, &certs).await;
    create(
        &client,
        &ns,
        pool(
            "lag",
            json!({
                "namePrefix": "lag",
                "pools": [{"start": "10.30.0.1", "end": "10.30.0.200"}],
                "prefix": 24, "gateway": "10.30.0.254"
            }),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &client,
        &ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "lag"})),
    )
    .await
    .unwrap();
    let key = PoolKey {
        namespace: ns.clone(),
        name: "lag".into(),
    };
    wait_for_pool(&[&lagging, &current], &key).await;
    let http = https_client(&ca_pem);

    // 100 allocations through the up-to-date replica.
    let first: Vec<Outcome> = futures::stream::iter((0..100).map(|i| {
        let (http, ns, addr) = (http.clone(), ns.clone(), current.webhook_addr);
        async move { send_review(&http, addr, &review(&ns, &format!("a-{i:03}"), i)).await }
    }))
    .buffer_unordered(20)
    .collect()
    .await;
    let mut handed = BTreeSet::new();
    for o in &first {
        match o {
            Outcome::Address(ip) => assert!(handed.insert(*ip), "{ip} twice"),
            Outcome::Denied(m) => panic!("denied: {m}"),
        }
    }

    // Rewind the lagging replica's index to before those 100 (what a paused IPAddress watch
    // leaves it with): it believes the pool is empty again.
    let index = lagging.state.assigner.caches.index.clone();
    for _ in 0..200 {
        if index.with_pool(&key, |s| s.used()).unwrap() == 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let existing: Vec<IPAddress> = Api::<IPAddress>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(existing.len(), 100);
    for a in &existing {
        index.delete_address(a);
    }
    assert_eq!(index.with_pool(&key, |s| s.used()).unwrap(), 0);

    // The other 100 addresses, mostly through the lagging replica, concurrently.
    let second: Vec<(usize, Outcome)> = futures::stream::iter((100..200).map(|i| {
        let (http, ns) = (http.clone(), ns.clone());
        let addr = if i % 4 == 0 {
            current.webhook_addr
        } else {
            lagging.webhook_addr
        };
        async move {
            let o = send_review(&http, addr, &review(&ns, &format!("b-{i:03}"), i)).await;
            (i, o)
        }
    }))
    .buffer_unordered(25)
    .collect()
    .await;
    let mut denied = Vec::new();
    for (i, o) in &second {
        match o {
            Outcome::Address(ip) => assert!(handed.insert(*ip), "request {i}: {ip} twice"),
            Outcome::Denied(m) => denied.push(format!("request {i}: {m}")),
        }
    }
    assert!(denied.is_empty(), "denied although free: {denied:#?}");
    assert_eq!(handed.len(), 200);
    check_objects(&client, &ns, &handed).await;

    lagging.shutdown().await;
    current.shutdown().await;
    let _ = std::fs::remove_dir_all(&certs);
}
