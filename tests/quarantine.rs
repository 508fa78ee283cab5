//! Address quarantine (`--reuse-delay`) on a real kube-apiserver, with two replicas running
//! the background loops: a released address is kept as a cooling IPAddress (the lock, with a
//! `released-at` annotation and no claim) and not handed out while the pool has another free
//! address; a pool with no other free address reuses it; after the delay it is deleted and
//! free again; a webhook restarted during the delay still honours it (the record is in the
//! apiserver, not in memory).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use cape_static_ip::cmd::serve::{self, Options, Running};
use common::controlplane::{CrdSet, shared, temp_namespace};
use common::util::*;
use common::webhook::{self, WebhookOptions, machines};
use kube::api::DeleteParams;
use serde_json::{Value, json};

const RELEASED_AT: &str = "static-ip.infrastructure.cluster.x-k8s.io/released-at";

/// A second replica: background loops on, not registered (the apiserver calls the first).
async fn second_replica(client: kube::Client, options: &WebhookOptions) -> Running {
    let (certs, _) = webhook::dev_certs("quarantine-second");
    let running = serve::start(
        client,
        Options {
            listen: "127.0.0.1:0".parse::<SocketAddr>().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            tls_cert_file: certs.join("tls.crt"),
            tls_key_file: certs.join("tls.key"),
            default_pool_namespace: "cape-system".into(),
            resync: options.resync,
            claim_grace: options.claim_grace,
            reuse_delay: options.reuse_delay,
            cert_reload: Duration::from_secs(60),
            drain: Duration::from_secs(1),
            shutdown_delay: Duration::ZERO,
            background: true,
            limits: Default::default(),
            // Not registered: nothing calls it.
            auth: cape_static_ip::webhook::auth::AuthOptions::off(),
            caps: Default::default(),
        },
    )
    .await
    .expect("second replica starts");
    running.ready().await;
    running
}

async fn delete_machine(client: &kube::Client, ns: &str, name: &str) {
    machines(client, ns)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "machine released", || {
        gone(client, ns, name)
    })
    .await;
}

/// The IPAddresses of the namespace by address, with whether each is cooling.
async fn addresses(client: &kube::Client, ns: &str) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = objects(client, ns, "IPAddress", "ipaddresses")
        .await
        .iter()
        .map(|a: &Value| {
            (
                a["spec"]["address"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                a["metadata"]["annotations"][RELEASED_AT].is_string(),
            )
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn released_addresses_cool_for_the_reuse_delay() {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "cool").await;
    let delay = Duration::from_secs(15);
    let options = WebhookOptions {
        reuse_delay: delay,
        claim_grace: Duration::from_secs(3),
        resync: Duration::from_secs(1),
        ..Default::default()
    };
    let hook = webhook::start(&client, &ns, options.clone()).await;
    let second = second_replica(client.clone(), &options).await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "pools": [{"start": "10.31.0.10", "end": "10.31.0.13"}], "prefix": 24}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;

    // Released: the address is kept, cooling, without its claim.
    let a = create_machine(&client, &ns, "a").await;
    assert_eq!(ip_of(&a), "10.31.0.10");
    delete_machine(&client, &ns, "a").await;
    assert_eq!(addresses(&client, &ns).await, [("10.31.0.10".into(), true)]);
    assert_eq!(count(&client, &ns, "IPClaim", "ipclaims").await, 0);

    // While it cools, the pool's other addresses are handed out.
    let b = create_machine(&client, &ns, "b").await;
    assert_eq!(ip_of(&b), "10.31.0.11", "a cooling address is not reused");

    // A webhook restarted during the delay still honours it.
    hook.stop().await;
    let hook = webhook::start(&client, &ns, options.clone()).await;
    wait_for_pool(&hook, &ns).await;
    eventually(Duration::from_secs(10), "cooling address cached", || {
        let n = hook.running.state.assigner.caches.index.cooling().len();
        async move { n == 1 }
    })
    .await;
    let c = create_machine(&client, &ns, "c").await;
    assert_eq!(ip_of(&c), "10.31.0.12", "still cooling after a restart");
    let d = create_machine(&client, &ns, "d").await;
    assert_eq!(ip_of(&d), "10.31.0.13");

    // The pool has no other free address: the cooling one is used rather than denied.
    let e = create_machine(&client, &ns, "e").await;
    assert_eq!(
        ip_of(&e),
        "10.31.0.10",
        "a full pool reuses its cooling address"
    );
    let all = addresses(&client, &ns).await;
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.iter().all(|(_, cooling)| !cooling), "{all:?}");

    // After the delay, a released address is deleted and free again.
    delete_machine(&client, &ns, "b").await;
    assert!(
        addresses(&client, &ns)
            .await
            .contains(&("10.31.0.11".into(), true))
    );
    eventually(
        delay + Duration::from_secs(30),
        "cooling address deleted after the delay",
        || async { addresses(&client, &ns).await.len() == 3 },
    )
    .await;
    let f = create_machine(&client, &ns, "f").await;
    assert_eq!(ip_of(&f), "10.31.0.11", "free again after the delay");

    second.shutdown().await;
    hook.stop().await;
}
