//! The first path end to end, on a real kube-apiserver with the current CAPE and metal3 CRDs:
//! Cluster API creates ElfMachines, the stored objects come back with their static IPs.

mod common;

use std::collections::BTreeSet;

use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::objects;
use common::webhook::{
    self, WebhookOptions, capi_machine, create, dynamic, machines, pool, template,
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
    let claim = serde_json::to_value(
        dynamic(
            &client,
            &ns,
            "ipam.metal3.io",
            "v1alpha1",
            "IPClaim",
            "ipclaims",
        )
        .get(&claim_name)
        .await
        .unwrap(),
    )
    .unwrap();
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
