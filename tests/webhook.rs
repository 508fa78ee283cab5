//! The first path end to end, on a real kube-apiserver with the current CAPE and metal3 CRDs:
//! Cluster API creates ElfMachines, the stored objects come back with their static IPs.

mod common;

use std::collections::BTreeSet;

use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::objects;
use common::webhook::{
    self, WebhookOptions, capi_machine, create, dynamic, ipclaims, machines, pool, template,
};
use rustls::pki_types::pem::PemObject;
use serde_json::{Value, json};

const FINALIZER: &str = "elfmachinestaticip.infrastructure.cluster.x-k8s.io";

#[tokio::test]
async fn one_machine_gets_its_address_route_dns_and_finalizer() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "one").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;

    create(
        &client,
        &ns,
        pool(
            "ip-pool-1",
            json!({
                "namePrefix": "ip-pool-1",
                "pools": [{"start": "10.255.160.10", "end": "10.255.160.20"}],
                "prefix": 16, "gateway": "10.255.0.1", "dnsServers": ["10.255.0.2"]
            }),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &client,
        &ns,
        template(
            "demo-worker",
            json!({"cluster.x-k8s.io/ip-pool-name": "ip-pool-1"}),
        ),
    )
    .await
    .unwrap();
    wait_for_pool(&hook, &ns, "ip-pool-1").await;

    let created = create(
        &client,
        &ns,
        capi_machine(
            "demo-md-0-8f7qk-x2b9m",
            "demo-worker",
            json!([{"networkType": "IPV4", "vlan": "vlan-1"}]),
        ),
    )
    .await
    .unwrap();
    let m = serde_json::to_value(&created).unwrap();
    let dev = &m["spec"]["network"]["devices"][0];
    assert_eq!(dev["ipAddrs"], json!(["10.255.160.10"]), "{m:#}");
    assert_eq!(dev["netmask"], "255.255.0.0");
    assert_eq!(dev["routes"], json!([{"gateway": "10.255.0.1"}]));
    assert_eq!(dev["nameservers"], json!(["10.255.0.2"]));
    assert_eq!(dev["vlan"], "vlan-1");
    assert_eq!(m["metadata"]["finalizers"], json!([FINALIZER]));
    // Untouched: everything the webhook does not own.
    assert_eq!(m["spec"]["numCPUS"], 4);
    assert_eq!(m["metadata"]["ownerReferences"][0]["kind"], "MachineSet");

    // Stored, not just answered.
    let stored = serde_json::to_value(
        machines(&client, &ns)
            .get("demo-md-0-8f7qk-x2b9m")
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        stored["spec"]["network"]["devices"][0]["ipAddrs"],
        json!(["10.255.160.10"])
    );

    let claim_name = format!("{ns}-demo-md-0-8f7qk-x2b9m-0");
    let claim =
        serde_json::to_value(ipclaims(&client, &ns).get(&claim_name).await.unwrap()).unwrap();
    assert_eq!(claim["spec"]["pool"]["name"], "ip-pool-1");
    assert_eq!(claim["spec"]["pool"]["kind"], "IPPool");
    assert_eq!(
        claim["status"]["address"]["name"],
        "ip-pool-1-10-255-160-10"
    );
    assert_eq!(
        claim["metadata"]["labels"]["cluster.x-k8s.io/ip-owner-name"],
        format!("{ns}-demo-md-0-8f7qk-x2b9m")
    );

    let address = serde_json::to_value(
        dynamic(
            &client,
            &ns,
            "ipam.metal3.io",
            "v1alpha1",
            "IPAddress",
            "ipaddresses",
        )
        .get("ip-pool-1-10-255-160-10")
        .await
        .unwrap(),
    )
    .unwrap();
    assert_eq!(address["spec"]["address"], "10.255.160.10");
    assert_eq!(address["spec"]["prefix"], 16);
    assert_eq!(address["spec"]["gateway"], "10.255.0.1");
    assert_eq!(address["spec"]["dnsServers"], json!(["10.255.0.2"]));
    assert_eq!(address["spec"]["pool"]["name"], "ip-pool-1");
    assert_eq!(address["spec"]["claim"]["name"], claim_name);
    // No ownerReference to the pool: a deleted pool must not take live addresses with it.
    assert!(address["metadata"]["ownerReferences"].is_null());

    // The admin endpoint: ready, and the pool's gauges and the review histogram are there.
    let admin = format!("http://{}", hook.running.admin_addr);
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{admin}/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let pool = format!("pool=\"{ns}/ip-pool-1\"");
    assert!(
        metrics.contains(&format!("cape_static_ip_pool_used_addresses{{{pool}}} 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("cape_static_ip_pool_free_addresses{{{pool}}} 10")),
        "{metrics}"
    );
    assert!(metrics.contains("cape_static_ip_admission_duration_seconds_count{operation=\"CREATE\",result=\"patched\"}"), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "cape_static_ip_allocations_total{{{pool},result=\"allocated\"}} 1"
        )),
        "{metrics}"
    );
    hook.stop().await;
}

#[tokio::test]
async fn twenty_concurrent_machines_on_a_twenty_address_pool() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "twenty").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    create(&client, &ns, pool("small", json!({
        "namePrefix": "small",
        "pools": [{"start": "192.168.10.1", "end": "192.168.10.20", "prefix": 24, "gateway": "192.168.10.254"}],
    }), json!({}))).await.unwrap();
    create(
        &client,
        &ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "small"})),
    )
    .await
    .unwrap();
    wait_for_pool(&hook, &ns, "small").await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let client = client.clone();
        let ns = ns.clone();
        tasks.spawn(async move {
            create(
                &client,
                &ns,
                capi_machine(
                    &format!("m-{i:02}"),
                    "tpl",
                    json!([{"networkType": "IPV4"}]),
                ),
            )
            .await
        });
    }
    let mut addresses = BTreeSet::new();
    while let Some(r) = tasks.join_next().await {
        let m = serde_json::to_value(r.unwrap().expect("create admitted")).unwrap();
        let ip = m["spec"]["network"]["devices"][0]["ipAddrs"][0]
            .as_str()
            .unwrap()
            .to_string();
        addresses.insert(ip);
    }
    println!(
        "20 machines got {} distinct addresses: {:?}",
        addresses.len(),
        addresses
    );
    assert_eq!(addresses.len(), 20);

    let denied = create(
        &client,
        &ns,
        capi_machine("m-21", "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await;
    let kube::Error::Api(status) = denied.expect_err("the 21st machine is denied") else {
        panic!("not an API error")
    };
    println!("21st machine: {}", status.message);
    assert!(status.message.contains("m-21"), "{}", status.message);
    assert!(
        status.message.contains("no free address"),
        "{}",
        status.message
    );
    assert!(status.message.contains("small"), "{}", status.message);
    assert_eq!(objects(&client, &ns, "IPClaim", "ipclaims").await.len(), 20);
    assert_eq!(
        objects(&client, &ns, "IPAddress", "ipaddresses")
            .await
            .len(),
        20
    );
    assert!(
        machines(&client, &ns)
            .get_opt("m-21")
            .await
            .unwrap()
            .is_none()
    );
    hook.stop().await;
}

#[tokio::test]
async fn dhcp_and_none_devices_are_left_as_they_were() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "dhcp").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    create(
        &client,
        &ns,
        pool(
            "p",
            json!({
                "namePrefix": "p", "pools": [{"subnet": "172.16.8.0/24"}], "prefix": 24
            }),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &client,
        &ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "p"})),
    )
    .await
    .unwrap();
    wait_for_pool(&hook, &ns, "p").await;

    let devices = json!([
        {"networkType": "IPV4_DHCP", "vlan": "a", "macAddr": "00:11:22:33:44:55"},
        {"networkType": "NONE", "vlan": "b"},
        {"networkType": "IPV4", "vlan": "c"}
    ]);
    let m = serde_json::to_value(
        create(&client, &ns, capi_machine("mixed", "tpl", devices.clone()))
            .await
            .unwrap(),
    )
    .unwrap();
    let got = &m["spec"]["network"]["devices"];
    assert_eq!(got[0], devices[0]);
    assert_eq!(got[1], devices[1]);
    assert_eq!(got[2]["ipAddrs"], json!(["172.16.8.1"]));
    assert_eq!(got[2]["netmask"], "255.255.255.0");
    assert!(
        got[2].get("routes").is_none(),
        "no gateway, no route: {got:#}"
    );
    assert_eq!(objects(&client, &ns, "IPClaim", "ipclaims").await.len(), 1);

    // Only DHCP: nothing is written, not even the finalizer.
    let m = serde_json::to_value(
        create(
            &client,
            &ns,
            capi_machine("dhcp-only", "tpl", json!([{"networkType": "IPV4_DHCP"}])),
        )
        .await
        .unwrap(),
    )
    .unwrap();
    assert!(m["metadata"].get("finalizers").is_none());
    assert_eq!(objects(&client, &ns, "IPClaim", "ipclaims").await.len(), 1);
    hook.stop().await;
}

/// Waits until the webhook's caches know the pool (created an instant ago).
async fn wait_for_pool(hook: &webhook::Webhook, ns: &str, name: &str) {
    let key = cape_static_ip::ipam::select::PoolKey {
        namespace: ns.into(),
        name: name.into(),
    };
    for _ in 0..200 {
        if hook
            .running
            .state
            .assigner
            .caches
            .index
            .with_pool(&key, |_| ())
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("pool {ns}/{name} never reached the cache");
}

#[tokio::test]
async fn shutdown_turns_not_ready_keeps_answering_for_the_delay_then_stops() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let (dir, ca_pem) = webhook::dev_certs("shutdown");
    let running = cape_static_ip::cmd::serve::start(
        client,
        cape_static_ip::cmd::serve::Options {
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert_file: dir.join("tls.crt"),
            tls_key_file: dir.join("tls.key"),
            default_pool_namespace: "cape-system".into(),
            resync: std::time::Duration::from_secs(300),
            claim_grace: std::time::Duration::from_secs(120),
            reuse_delay: std::time::Duration::ZERO,
            cert_reload: std::time::Duration::from_secs(2),
            drain: std::time::Duration::from_secs(5),
            shutdown_delay: std::time::Duration::from_millis(1500),
            background: false,
            limits: Default::default(),
            auth: cape_static_ip::webhook::auth::AuthOptions::off(),
            caps: Default::default(),
        },
    )
    .await
    .unwrap();
    running.ready().await;
    let admin = format!("http://{}/readyz", running.admin_addr);
    let mutate = format!("https://{}/mutate-elfmachine", running.webhook_addr);
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(
            rustls::ClientConfig::builder()
                .with_root_certificates({
                    let mut roots = rustls::RootCertStore::empty();
                    for c in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                        roots.add(c.unwrap()).unwrap();
                    }
                    roots
                })
                .with_no_client_auth(),
        )
        .build()
        .unwrap();
    let fixture = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dhcp-and-ipv4.json"
    ))
    .unwrap();
    assert_eq!(http.get(&admin).send().await.unwrap().status(), 200);

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(running.run_until(async {
        let _ = rx.await;
    }));
    tx.send(()).unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Not ready any more, but reviews are still answered during the delay.
    assert_eq!(http.get(&admin).send().await.unwrap().status(), 503);
    let answer = http
        .post(&mutate)
        .body(fixture.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let review: Value = answer.json().await.unwrap();
    assert!(review["response"]["uid"].is_string(), "{review}");
    // Then the listener closes and the server returns.
    tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        http.post(&mutate).body(fixture).send().await.is_err(),
        "still accepting after shutdown"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_webhook_serves_reviews_on_the_ipv6_loopback() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "ipv6").await;
    // Both endpoints on [::1]; the apiserver calls https://[::1]:port (the certificate has an
    // IP SAN ::1). start() returns once the apiserver has reached it there.
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            listen_ip: std::net::Ipv6Addr::LOCALHOST.into(),
            background: false,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(hook.running.webhook_addr.ip().to_string(), "::1");
    assert_eq!(hook.running.admin_addr.ip().to_string(), "::1");

    create(
        &client,
        &ns,
        pool(
            "v6",
            json!({"namePrefix": "v6", "pools": [{"start": "10.6.0.10", "end": "10.6.0.20"}], "prefix": 24}),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &client,
        &ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "v6"})),
    )
    .await
    .unwrap();
    wait_for_pool(&hook, &ns, "v6").await;
    let created = create(
        &client,
        &ns,
        capi_machine("m-v6", "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await
    .unwrap();
    let m = serde_json::to_value(&created).unwrap();
    assert_eq!(
        m["spec"]["network"]["devices"][0]["ipAddrs"],
        json!(["10.6.0.10"]),
        "{m:#}"
    );
    let admin = format!("http://{}", hook.running.admin_addr);
    assert_eq!(
        admin,
        format!("http://[::1]:{}", hook.running.admin_addr.port())
    );
    let ready = reqwest::get(format!("{admin}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    hook.stop().await;
}

/// `kubectl describe` as the admin, with the kubectl built by hack/controlplane/build.sh.
fn kubectl_describe(cp: &common::controlplane::ControlPlane, args: &[&str]) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let print = std::process::Command::new("bash")
        .arg(root.join("hack/controlplane/build.sh"))
        .arg("--print")
        .output()
        .unwrap();
    let kubectl = String::from_utf8(print.stdout)
        .unwrap()
        .lines()
        .find(|l| l.ends_with("/kubectl"))
        .expect("build.sh --print names kubectl")
        .to_owned();
    let out = std::process::Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .arg("describe")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn every_note_published_is_what_kubectl_describe_shows() {
    use cape_static_ip::events::{Events, Note, Publisher, pool_ref};
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "events").await;
    let created = create(
        &client,
        &ns,
        pool(
            "evp",
            json!({"namePrefix": "evp", "pools": [{"start": "10.7.0.1", "end": "10.7.0.99"}], "prefix": 24}),
            json!({}),
        ),
    )
    .await
    .unwrap();
    let regarding = pool_ref(&ns, "evp", created.metadata.uid.clone());
    // As the webhook's user: the shipped ClusterRole lets it create and patch Events.
    let webhook_client = cp.client_as_webhook_user().await;
    let note = |message: String| Note {
        regarding: regarding.clone(),
        warning: false,
        reason: "Allocated",
        action: "Allocate",
        message,
    };

    // Through the queue: 12 allocations in a burst, however they get folded (all fit in one
    // event's 1 kB note), each address must reach `kubectl describe` (kube-runtime's recorder
    // kept the first note and only counted the others).
    let mut tasks = tokio::task::JoinSet::new();
    let events = Events::start(webhook_client.clone(), &mut tasks);
    let addresses: Vec<String> = (1..=12).map(|i| format!("10.7.0.{i}")).collect();
    for a in &addresses {
        events.emit(note(format!("{a} to ElfMachine {ns}/m-{a}")));
        // Let the publisher take some alone and fold the rest: several events.
        tokio::task::yield_now().await;
    }
    let mut described = String::new();
    for _ in 0..100 {
        described = kubectl_describe(cp, &["ippool", "evp", "-n", &ns]);
        if addresses
            .iter()
            .all(|a| described.contains(&format!("{a} to ElfMachine")))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for a in &addresses {
        assert!(
            described.contains(&format!("{a} to ElfMachine {ns}/m-{a}")),
            "{a} is not in kubectl describe:\n{described}"
        );
    }
    eprintln!("kubectl describe ippool evp (burst):\n{described}");
    tasks.shutdown().await;

    // Published directly: two different folded notes are two events, each with its text; the
    // very same note again is counted (x2) on its event.
    let mut publisher = Publisher::new(webhook_client, "cape-static-ip-test-0".into());
    let first =
        note("2 times: 10.7.0.50 to ElfMachine a/m-50; 10.7.0.51 to ElfMachine a/m-51".into());
    let second = note("3 times: 10.7.0.60 to ElfMachine a/m-60; 10.7.0.61 to ElfMachine a/m-61; 10.7.0.62 to ElfMachine a/m-62".into());
    publisher.publish(&first).await.unwrap();
    publisher.publish(&second).await.unwrap();
    publisher.publish(&second).await.unwrap();
    let described = kubectl_describe(cp, &["ippool", "evp", "-n", &ns]);
    eprintln!("kubectl describe ippool evp (published):\n{described}");
    let line = |text: &str| {
        described
            .lines()
            .find(|l| l.contains(text))
            .unwrap_or_else(|| panic!("{text:?} is not in kubectl describe:\n{described}"))
            .to_owned()
    };
    let first_line = line(&first.message);
    let second_line = line(&second.message);
    assert!(!first_line.contains("(x"), "{first_line}");
    assert!(second_line.contains("(x2 over"), "{second_line}");
    assert!(second_line.contains("Allocated"), "{second_line}");
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(client.clone(), &ns);
    let listed = events.list(&Default::default()).await.unwrap().items;
    let mine: Vec<_> = listed
        .iter()
        .filter(|e| e.reporting_instance.as_deref() == Some("cape-static-ip-test-0"))
        .collect();
    assert_eq!(mine.len(), 2, "one Event per distinct note");
    let repeated = mine
        .iter()
        .find(|e| e.note.as_deref() == Some(second.message.as_str()))
        .unwrap();
    assert_eq!(repeated.series.as_ref().map(|s| s.count), Some(2));
    assert_eq!(
        repeated.reporting_controller.as_deref(),
        Some("cape-static-ip")
    );
}

#[tokio::test]
async fn the_pool_guard_writes_its_finalizer_with_the_shipped_role() {
    use cape_static_ip::contract::POOL_FINALIZER;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "guard").await;
    // The background loop runs every claim_grace / 2: 2 s here.
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            claim_grace: std::time::Duration::from_secs(4),
            ..Default::default()
        },
    )
    .await;
    create(
        &client,
        &ns,
        pool(
            "guarded",
            json!({"namePrefix": "guarded", "pools": [{"start": "10.8.0.10", "end": "10.8.0.20"}], "prefix": 24}),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        &client,
        &ns,
        template("tpl", json!({"cluster.x-k8s.io/ip-pool-name": "guarded"})),
    )
    .await
    .unwrap();
    wait_for_pool(&hook, &ns, "guarded").await;
    create(
        &client,
        &ns,
        capi_machine("m-guard", "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await
    .unwrap();
    // The webhook runs as the user bound to manifests/rbac.yaml: the patch of the pool's
    // finalizer (lifecycle/pool_guard.rs) must be allowed.
    let pools = dynamic(
        &client,
        &ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPPool",
        "ippools",
    );
    let mut finalizers = Vec::new();
    for _ in 0..300 {
        finalizers = pools
            .get("guarded")
            .await
            .unwrap()
            .metadata
            .finalizers
            .unwrap_or_default();
        if finalizers.iter().any(|f| f == POOL_FINALIZER) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        finalizers.iter().any(|f| f == POOL_FINALIZER),
        "the pool holding our address has no {POOL_FINALIZER}: {finalizers:?}"
    );
    hook.stop().await;
}
