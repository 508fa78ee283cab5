//! Fault tests: the webhook binary runs as a child process, built with the test-only
//! `fault-points` feature (src/fault.rs), and dies at each boundary of the admission write
//! chain and of release; the control plane's kube-apiserver and etcd are killed and
//! restarted; watches expire; the webhook answers later than `timeoutSeconds`. After each,
//! as CAPI would, the create or delete is retried, and the test asserts:
//! - no address is carried by two devices (duplicates: 0);
//! - every live machine has an address on each device;
//! - after the claim grace period, no IPClaim or IPAddress is left that no live machine
//!   carries the address of (left: 0), and deleted machines are gone.
//!
//! One control plane for this binary, one test at a time (they restart its processes).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::child::{ChildConfig, ChildWebhook};
use common::controlplane::{ControlPlane, CrdSet, shared, temp_namespace};
use common::util::{eventually, objects};
use common::webhook::{
    capi_machine, create, ipclaims, machines, pool, register, template, wait_until_called,
};
use futures::StreamExt;
use kube::Client;
use kube::api::{DeleteParams, ListParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

/// One test at a time in this binary.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shortest grace the binary accepts (see `--apiserver-request-timeout`).
const GRACE: Duration = Duration::from_secs(30);

/// How long CAPI keeps retrying one create or delete here before the test gives up.
const RETRY_LIMIT: Duration = Duration::from_secs(180);

fn devices(n: usize) -> Value {
    Value::Array((0..n).map(|_| json!({"networkType": "IPV4"})).collect())
}

/// IPPool `name` (prefix `name`) on `subnet` and template `tpl` selecting it, in `ns`.
async fn pool_and_template(client: &Client, ns: &str, name: &str, subnet: &str, tpl: &str) {
    let prefix: u8 = subnet
        .rsplit('/')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    create(
        client,
        ns,
        pool(
            name,
            json!({"namePrefix": name, "pools": [{"subnet": subnet}], "prefix": prefix}),
            json!({}),
        ),
    )
    .await
    .unwrap();
    create(
        client,
        ns,
        template(tpl, json!({"cluster.x-k8s.io/ip-pool-name": name})),
    )
    .await
    .unwrap();
}

/// A namespace with an IPPool `pool` on `subnet` and a template `tpl` selecting it, and the
/// webhook (the child listening at `hook`) registered for it.
async fn namespace(client: &Client, prefix: &str, subnet: &str, hook: &ChildConfig) -> String {
    let ns = temp_namespace(client, prefix).await;
    pool_and_template(client, &ns, "pool", subnet, "tpl").await;
    register(
        client,
        &format!("cape-static-ip-test-{ns}"),
        hook.webhook,
        &hook.ca_pem,
        &ns,
        "Fail",
    )
    .await;
    ns
}

/// Creates a machine as a CAPI MachineSet does: again after every failure, until it exists.
/// Returns the machine and how many attempts failed.
async fn create_as_capi(
    client: &Client,
    ns: &str,
    name: &str,
    template: &str,
    n: usize,
) -> (Value, usize) {
    let start = Instant::now();
    let mut failed = 0;
    loop {
        match create(client, ns, capi_machine(name, template, devices(n))).await {
            Ok(m) => return (serde_json::to_value(m).unwrap(), failed),
            Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => {
                let m = machines(client, ns).get(name).await;
                if let Ok(m) = m {
                    return (serde_json::to_value(m).unwrap(), failed);
                }
            }
            Err(e) => {
                assert!(
                    start.elapsed() < RETRY_LIMIT,
                    "creating ElfMachine {ns}/{name}: still failing after {RETRY_LIMIT:?}: {e}"
                );
            }
        }
        failed += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Deletes a machine as CAPI does: again until the delete is accepted (404 included).
async fn delete_as_capi(client: &Client, ns: &str, name: &str) -> usize {
    let start = Instant::now();
    let mut failed = 0;
    loop {
        match machines(client, ns)
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => return failed,
            Err(kube::Error::Api(s)) if s.code == 404 => return failed,
            Err(e) => assert!(
                start.elapsed() < RETRY_LIMIT,
                "deleting ElfMachine {ns}/{name}: {e}"
            ),
        }
        failed += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The addresses the devices of a machine carry.
fn carried(m: &Value) -> Vec<Option<String>> {
    m["spec"]["network"]["devices"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| d["ipAddrs"][0].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What a namespace holds.
#[derive(Debug, Default, Clone, PartialEq)]
struct Census {
    live: usize,
    deleting: usize,
    /// Devices of live machines without an address.
    missing: usize,
    /// Addresses carried by more than one device.
    duplicates: usize,
    addresses: usize,
    claims: usize,
    /// IPAddresses whose address no live machine carries.
    stray_addresses: usize,
    /// IPClaims that point at no address a live machine carries.
    stray_claims: usize,
    /// Addresses on live machines without an IPAddress and a claim pointing at it.
    unbacked: usize,
}

impl Census {
    fn left(&self) -> usize {
        self.stray_addresses + self.stray_claims + self.deleting
    }

    /// Every live device has an address of its own, backed by an IPAddress and a claim.
    fn sound(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.unbacked == 0
    }
}

async fn census(client: &Client, ns: &str) -> Census {
    let mut c = Census::default();
    let mut on_devices = Vec::new();
    for m in machines(client, ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
    {
        if m.metadata.deletion_timestamp.is_some() {
            c.deleting += 1;
            continue;
        }
        c.live += 1;
        for ip in carried(&serde_json::to_value(&m).unwrap()) {
            match ip {
                Some(ip) => on_devices.push(ip),
                None => c.missing += 1,
            }
        }
    }
    let unique: BTreeSet<String> = on_devices.iter().cloned().collect();
    c.duplicates = on_devices.len() - unique.len();
    let addresses = objects(client, ns, "IPAddress", "ipaddresses").await;
    let mut address_ip = BTreeMap::new();
    for a in &addresses {
        let ip = a["spec"]["address"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        address_ip.insert(
            a["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ip.clone(),
        );
        if !unique.contains(&ip) {
            c.stray_addresses += 1;
        }
    }
    c.addresses = addresses.len();
    let claims = objects(client, ns, "IPClaim", "ipclaims").await;
    c.claims = claims.len();
    let mut backed = BTreeSet::new();
    for claim in &claims {
        let points = claim["status"]["address"]["name"]
            .as_str()
            .and_then(|a| address_ip.get(a));
        match points {
            Some(ip) if unique.contains(ip) => {
                backed.insert(ip.clone());
            }
            _ => c.stray_claims += 1,
        }
    }
    c.unbacked = unique.difference(&backed).count();
    c
}

/// The census of each of `namespaces` once the grace period has passed on the webhook's
/// clock (it runs from the webhook's start, `started`) and a few sweeps have run, and
/// nothing is left behind; panics if something still is after a few grace periods.
async fn settled(
    client: &Client,
    namespaces: &[String],
    hook: &ChildWebhook,
    started: Instant,
) -> Vec<Census> {
    let start = Instant::now();
    let limit = GRACE * 4;
    let after = GRACE + Duration::from_secs(6);
    loop {
        let mut all = Vec::new();
        for ns in namespaces {
            all.push(census(client, ns).await);
        }
        if started.elapsed() > after && all.iter().all(|c| c.left() == 0) {
            println!(
                "nothing left {:.1}s after the webhook started (grace {GRACE:?})",
                started.elapsed().as_secs_f64()
            );
            return all;
        }
        if start.elapsed() > limit {
            panic!(
                "objects left after {limit:?}: {:#?}\nwebhook log ({}):\n{}",
                namespaces.iter().zip(&all).collect::<Vec<_>>(),
                hook.log.display(),
                hook.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A child started unarmed and ready, through which the apiserver is known to call it for
/// each of `namespaces` (the registration is picked up asynchronously).
async fn unarmed(
    config: &ChildConfig,
    name: &str,
    client: &Client,
    namespaces: &[String],
) -> ChildWebhook {
    let mut hook = config.spawn(name, &[]);
    hook.ready().await;
    for ns in namespaces {
        wait_until_called(client, ns).await;
    }
    hook
}

fn config(cp: &ControlPlane, tag: &str) -> ChildConfig {
    ChildConfig::new(tag, cp.webhook_kubeconfig(), cp.caller_ca_file(), GRACE)
}

/// One scenario's namespace `f-<tag>` (pool on `subnet`, template, registration) and the
/// configuration of its children. The apiserver is seen calling an unarmed child for the
/// namespace first (the registration is picked up asynchronously); that child is stopped.
async fn scenario(tag: &str, subnet: &str) -> (Client, ChildConfig, String) {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let config = config(cp, tag);
    let ns = namespace(&client, &format!("f-{tag}"), subnet, &config).await;
    let mut calm = unarmed(
        &config,
        &format!("{tag}-registration"),
        &client,
        std::slice::from_ref(&ns),
    )
    .await;
    calm.kill();
    (client, config, ns)
}

/// One row of the report.
fn report(scenario: &str, creates: usize, retries: usize, c: &Census) {
    println!(
        "FAULT {scenario:<38} creates {creates:>4}  retries {retries:>4}  duplicates {}  missing {}  unbacked {}  left after grace {}  (machines {}, IPAddresses {}, IPClaims {})",
        c.duplicates,
        c.missing,
        c.unbacked,
        c.left(),
        c.live,
        c.addresses,
        c.claims
    );
}

/// Each fault point of admission and of release: the webhook dies there, comes back
/// unarmed, CAPI retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_killed_at_each_write_leaves_no_address_twice_and_nothing_behind() {
    let _alone = ALONE.lock().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let config = config(cp, "points");
    let admission = [
        "after-address",
        "after-address:2",
        "after-claim",
        "after-claim:2",
        "after-claim-status",
        "after-claim-status:2",
        "before-answer",
    ];
    let release = [
        "after-claim-delete",
        "after-claim-delete:2",
        "after-address-delete",
        "after-address-delete:2",
        "before-finalizer-removal",
    ];
    let mut namespaces = Vec::new();
    for (i, point) in admission.iter().chain(&release).enumerate() {
        let prefix = format!("f-{}", point.replace(':', "-"));
        namespaces.push(namespace(&client, &prefix, &format!("10.60.{i}.0/24"), &config).await);
    }
    let mut hook = unarmed(&config, "registration", &client, &namespaces).await;
    // Every namespace starts with one machine made in calm weather.
    for ns in &namespaces {
        create_as_capi(&client, ns, "calm", "tpl", 2).await;
    }
    hook.kill();

    let mut rows = Vec::new();
    for (point, ns) in admission.iter().zip(&namespaces) {
        // A create that dies there and is never retried (the MachineSet scaled down): what
        // it wrote is released after the grace period.
        let mut armed = config.spawn(
            &format!("{point}-lost"),
            &[("CAPE_STATIC_IP_FAULT_POINT", point)],
        );
        armed.ready().await;
        let lost = create(&client, ns, capi_machine("lost", "tpl", devices(2))).await;
        let status = armed.exited(Duration::from_secs(60)).await;
        assert!(!status.success(), "{point}: {status}");
        assert!(
            lost.is_err(),
            "{point}: a create went through a webhook that died before answering"
        );
        // A create that dies there and is retried as CAPI does.
        let mut armed = config.spawn(point, &[("CAPE_STATIC_IP_FAULT_POINT", point)]);
        armed.ready().await;
        let task = {
            let (client, ns) = (client.clone(), ns.clone());
            tokio::spawn(async move { create_as_capi(&client, &ns, "m", "tpl", 2).await })
        };
        let status = armed.exited(Duration::from_secs(60)).await;
        assert!(!status.success(), "{point}: {status}");
        let _again = unarmed(&config, &format!("{point}-again"), &client, &[]).await;
        let (m, retries) = task.await.unwrap();
        let ips = carried(&m);
        assert!(
            ips.iter().all(Option::is_some),
            "{point}: ElfMachine {ns}/m has no address on some device: {ips:?}"
        );
        // One more create after the crash.
        create_as_capi(&client, ns, "after", "tpl", 2).await;
        let c = census(&client, ns).await;
        assert!(c.sound(), "{point}: {c:?}");
        rows.push((point.to_string(), ns.clone(), 4, retries, c.left()));
    }
    for (point, ns) in release.iter().zip(&namespaces[admission.len()..]) {
        let mut calm = unarmed(&config, &format!("{point}-before"), &client, &[]).await;
        create_as_capi(&client, ns, "m", "tpl", 2).await;
        calm.kill();
        let mut armed = config.spawn(point, &[("CAPE_STATIC_IP_FAULT_POINT", point)]);
        armed.ready().await;
        let mut retries = delete_as_capi(&client, ns, "m").await;
        let status = armed.exited(Duration::from_secs(60)).await;
        assert!(!status.success(), "{point}: {status}");
        let _again = unarmed(&config, &format!("{point}-again"), &client, &[]).await;
        retries += delete_as_capi(&client, ns, "m").await + 1;
        eventually(Duration::from_secs(60), "deleted machine gone", || async {
            machines(&client, ns).get_opt("m").await.unwrap().is_none()
        })
        .await;
        let c = census(&client, ns).await;
        assert!(c.sound(), "{point}: {c:?}");
        rows.push((point.to_string(), ns.clone(), 2, retries, c.left()));
    }

    // The grace period runs on the replica's own clock: one more start, then wait.
    let started = Instant::now();
    let last = unarmed(&config, "settle", &client, &[]).await;
    let final_census = settled(&client, &namespaces, &last, started).await;
    // Pools holding our addresses carry our finalizer (the shipped ClusterRole allows it).
    for ns in &namespaces {
        eventually(Duration::from_secs(30), "pool finalizer", || async {
            let pools = common::webhook::dynamic(
                &client,
                ns,
                "ipam.metal3.io",
                "v1alpha1",
                "IPPool",
                "ippools",
            );
            let pool = pools.get("pool").await.unwrap();
            pool.metadata
                .finalizers
                .unwrap_or_default()
                .iter()
                .any(|f| f == "static-ip.infrastructure.cluster.x-k8s.io/pool-in-use")
        })
        .await;
    }
    for ((point, _, creates, retries, before), c) in rows.iter().zip(&final_census) {
        report(point, *creates, *retries, c);
        println!("      left before the grace period: {before}");
        assert!(c.sound(), "{point}: {c:?}");
        assert_eq!(c.left(), 0, "{point}: {c:?}");
    }
}

/// kube-apiserver SIGKILLed and restarted in the middle of a burst of 200 two-device
/// machines: every create goes through in the end, no address twice, and no address is
/// left that no machine carries (a create whose answer was lost is "maybe written").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_killed_in_a_burst_leaks_nothing() {
    let _alone = ALONE.lock().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let config = config(cp, "burst");
    let ns = namespace(&client, "f-burst", "10.61.0.0/22", &config).await;
    let started = Instant::now();
    let hook = unarmed(&config, "burst", &client, std::slice::from_ref(&ns)).await;
    const MACHINES: usize = 200;
    const KILL_AFTER: usize = 40;
    let done = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let killer = {
        let done = done.clone();
        tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < KILL_AFTER {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let cp = shared(CrdSet::Current);
            tokio::task::spawn_blocking(move || {
                cp.kill("apiserver");
                std::thread::sleep(Duration::from_secs(1));
                cp.start_again("apiserver");
            })
            .await
            .unwrap();
            done.load(Ordering::SeqCst)
        })
    };
    let burst = futures::stream::iter(0..MACHINES)
        .map(|i| {
            let (client, ns, done, retries) =
                (client.clone(), ns.clone(), done.clone(), retries.clone());
            async move {
                let (m, failed) = create_as_capi(&client, &ns, &format!("b-{i}"), "tpl", 2).await;
                done.fetch_add(1, Ordering::SeqCst);
                retries.fetch_add(failed, Ordering::SeqCst);
                m
            }
        })
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await;
    let killed_at = killer.await.unwrap();
    assert_eq!(burst.len(), MACHINES);
    let c = census(&client, &ns).await;
    assert!(c.sound(), "{c:?}");
    println!(
        "burst: apiserver killed after {KILL_AFTER} creates, back after {killed_at}; right after the burst: {c:?}"
    );
    let c = settled(&client, std::slice::from_ref(&ns), &hook, started)
        .await
        .remove(0);
    report(
        "apiserver killed in 200-machine burst",
        MACHINES,
        retries.load(Ordering::SeqCst),
        &c,
    );
    assert_eq!(c.live, MACHINES);
    assert!(c.sound() && c.left() == 0, "{c:?}");
    assert_eq!(c.addresses, 2 * MACHINES, "{c:?}");
}

/// etcd restarted while the webhook idles: it keeps assigning, sees new pools and
/// releases deleted machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_while_idle_and_the_webhook_keeps_working() {
    let _alone = ALONE.lock().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let config = config(cp, "etcd");
    let ns = namespace(&client, "f-etcd", "10.62.0.0/24", &config).await;
    let started = Instant::now();
    let mut hook = unarmed(&config, "etcd", &client, std::slice::from_ref(&ns)).await;
    create_as_capi(&client, &ns, "before", "tpl", 2).await;
    tokio::task::spawn_blocking(move || {
        let cp = shared(CrdSet::Current);
        cp.kill("etcd");
        std::thread::sleep(Duration::from_secs(2));
        cp.start_again("etcd");
    })
    .await
    .unwrap();
    let (_, mut retries) = create_as_capi(&client, &ns, "after", "tpl", 2).await;
    // A pool made after the restart is seen (the pool watch resumed).
    pool_and_template(&client, &ns, "pool2", "10.62.1.0/24", "tpl2").await;
    let (m, failed) = create_as_capi(&client, &ns, "new-pool", "tpl2", 1).await;
    retries += failed;
    let ip = carried(&m)[0].clone().unwrap_or_default();
    assert!(ip.starts_with("10.62.1."), "{ip}");
    // A deleted machine is released (the machine watch resumed).
    retries += delete_as_capi(&client, &ns, "before").await;
    eventually(
        Duration::from_secs(60),
        "deleted machine released",
        || async {
            machines(&client, &ns)
                .get_opt("before")
                .await
                .unwrap()
                .is_none()
        },
    )
    .await;
    assert!(hook.running(), "the webhook exited:\n{}", hook.tail());
    let c = settled(&client, std::slice::from_ref(&ns), &hook, started)
        .await
        .remove(0);
    report("etcd restarted while idle", 3, retries, &c);
    assert_eq!((c.live, c.sound(), c.left()), (2, true, 0), "{c:?}");
}

/// etcd's current revision, through its JSON gateway.
async fn etcd_revision(http: &reqwest::Client, etcd: &str) -> i64 {
    let r: Value = http
        .post(format!("{etcd}/v3/kv/range"))
        .json(&json!({"key": "AA=="}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["header"]["revision"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {r}"))
}

/// The webhook's watches expire while it is frozen (kube-apiserver restarted, etcd compacted
/// past everything it saw): it resumes them without a restart and misses nothing that
/// changed meanwhile (a new pool, a deleted machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_resume_without_a_missed_event() {
    let _alone = ALONE.lock().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let config = config(cp, "compact");
    let ns = namespace(&client, "f-compact", "10.63.0.0/24", &config).await;
    let started = Instant::now();
    let mut hook = unarmed(&config, "compact", &client, std::slice::from_ref(&ns)).await;
    create_as_capi(&client, &ns, "keep", "tpl", 1).await;
    create_as_capi(&client, &ns, "gone", "tpl", 1).await;
    let pid = hook.pid();

    hook.signal("STOP");
    let pools = common::webhook::dynamic(
        &client,
        &ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPPool",
        "ippools",
    );
    let seen = pools
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    tokio::task::spawn_blocking(move || {
        let cp = shared(CrdSet::Current);
        cp.kill("apiserver");
        cp.start_again("apiserver");
    })
    .await
    .unwrap();
    // Changes the frozen webhook cannot see as they happen.
    pool_and_template(&client, &ns, "pool2", "10.63.1.0/24", "tpl2").await;
    machines(&client, &ns)
        .delete("gone", &DeleteParams::default())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let etcd = cp.etcd_url();
    let revision = etcd_revision(&http, &etcd).await;
    let compacted = http
        .post(format!("{etcd}/v3/kv/compaction"))
        .json(&json!({"revision": revision.to_string(), "physical": true}))
        .send()
        .await
        .unwrap();
    assert!(
        compacted.status().is_success(),
        "{:?}",
        compacted.text().await
    );
    // Every resourceVersion the webhook holds is at or before `seen`: gone now.
    let mut watch = pools
        .watch(&WatchParams::default(), &seen)
        .await
        .map(|s| s.boxed());
    let expired = match &mut watch {
        Err(kube::Error::Api(s)) => s.code == 410,
        Err(e) => panic!("watch from {seen}: {e}"),
        Ok(stream) => matches!(
            stream.next().await,
            Some(Ok(WatchEvent::Error(e))) if e.code == 410
        ),
    };
    assert!(
        expired,
        "a watch from resourceVersion {seen} did not expire (410)"
    );
    drop(watch);
    hook.signal("CONT");

    eventually(
        Duration::from_secs(60),
        "the deleted machine released",
        || async {
            machines(&client, &ns)
                .get_opt("gone")
                .await
                .unwrap()
                .is_none()
        },
    )
    .await;
    let (m, retries) = create_as_capi(&client, &ns, "new-pool", "tpl2", 1).await;
    let ip = carried(&m)[0].clone().unwrap_or_default();
    assert!(ip.starts_with("10.63.1."), "{ip}");
    assert!(hook.running() && hook.pid() == pid, "the webhook restarted");
    let c = settled(&client, std::slice::from_ref(&ns), &hook, started)
        .await
        .remove(0);
    report("watch expired (410 after compaction)", 3, retries, &c);
    assert_eq!((c.live, c.sound(), c.left()), (2, true, 0), "{c:?}");
}

/// The webhook answers later than `timeoutSeconds` (10 s): the apiserver fails the create.
/// One create is abandoned, one is retried by CAPI; after the grace period nothing is left
/// but the retried machine's addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_slower_than_its_timeout_leaves_nothing_behind() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("slow", "10.64.0.0/24").await;
    let started = Instant::now();
    let mut hook = config.spawn(
        "slow",
        &[(
            "CAPE_STATIC_IP_FAULT_DELAY",
            "before-answer:1=13s,before-answer:2=13s",
        )],
    );
    hook.ready().await;
    let abandoned = create(&client, &ns, capi_machine("abandoned", "tpl", devices(2))).await;
    assert!(abandoned.is_err(), "the slow answer was accepted");
    let (m, retries) = create_as_capi(&client, &ns, "retried", "tpl", 2).await;
    assert!(retries >= 1, "the first answer was not late");
    assert!(carried(&m).iter().all(Option::is_some), "{m}");
    let c = settled(&client, std::slice::from_ref(&ns), &hook, started)
        .await
        .remove(0);
    report("webhook slower than timeoutSeconds", 2, retries + 1, &c);
    assert_eq!((c.live, c.sound(), c.left()), (1, true, 0), "{c:?}");
    assert_eq!((c.addresses, c.claims), (2, 2), "{c:?}");
}

/// The addresses of every IPAddress in `ns`.
async fn address_ips(client: &Client, ns: &str) -> Vec<String> {
    objects(client, ns, "IPAddress", "ipaddresses")
        .await
        .iter()
        .filter_map(|a| a["spec"]["address"].as_str().map(str::to_owned))
        .collect()
}

/// Two creates of one machine at once (a client that tried again before the first answer):
/// the first request writes the address and pauses before its claim; the second finds that
/// address without a claim, takes it over and completes the pair, and the machine is stored
/// with it; the first then finds the claim taken and gives back what it wrote. The address
/// the machine carries must stay, backed by its claim (before, the give-back deleted it by
/// name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_give_back_never_removes_an_address_another_request_took_over() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("takeover", "10.65.0.0/24").await;
    let mut hook = config.spawn(
        "takeover",
        &[("CAPE_STATIC_IP_FAULT_DELAY", "after-address:1=6s")],
    );
    hook.ready().await;
    let first = {
        let (client, ns) = (client.clone(), ns.clone());
        tokio::spawn(
            async move { create(&client, &ns, capi_machine("m", "tpl", devices(1))).await },
        )
    };
    eventually(
        Duration::from_secs(10),
        "the first request wrote its address",
        || async { address_ips(&client, &ns).await.len() == 1 },
    )
    .await;
    // The replica's address cache sees it an instant later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = create(&client, &ns, capi_machine("m", "tpl", devices(1)))
        .await
        .expect("the second create takes the address over and is stored");
    let taken = carried(&serde_json::to_value(&second).unwrap());
    let first = first.await.unwrap();
    assert!(
        first.is_err(),
        "two creates of one name were both stored: {first:?}"
    );
    let c = census(&client, &ns).await;
    report("give-back racing a take-over", 2, 0, &c);
    assert!(c.sound(), "{taken:?}: {c:?}\n{}", hook.tail());
    assert!(
        hook.logged("taken over by another request: kept"),
        "precondition: the first request gave back after the take-over:\n{}",
        hook.tail()
    );
    assert_eq!(address_ips(&client, &ns).await.len(), 1, "{c:?}");
    // The address stays locked: the next machine gets another one.
    let (next, _) = create_as_capi(&client, &ns, "next", "tpl", 1).await;
    assert_ne!(carried(&next), taken);
    let c = census(&client, &ns).await;
    assert!(c.sound(), "{c:?}");
}

/// A machine gone without its release (its finalizers removed by hand): past the grace the
/// sweep reads its claim and the machine live, finds no machine, and decides to release the
/// claim; before it deletes, the machine is created again under the same name carrying that
/// address (a restore, `clusterctl move`). The address must stay locked, and the next
/// machine gets another one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_that_already_decided_never_frees_what_a_re_created_machine_carries() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("sweep-race", "10.66.0.0/24").await;
    let mut hook = config.spawn(
        "sweep-race",
        &[("CAPE_STATIC_IP_FAULT_DELAY", "sweep-decided:1=12s")],
    );
    hook.ready().await;
    let (m, _) = create_as_capi(&client, &ns, "m", "tpl", 1).await;
    let ip = carried(&m)[0].clone().expect("an address");
    let api = machines(&client, &ns);
    api.patch(
        "m",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    api.delete("m", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(10), "machine gone", || async {
        api.get_opt("m").await.unwrap().is_none()
    })
    .await;
    eventually(
        GRACE * 2,
        "the sweep decided to release the claim",
        || async { hook.logged("fault point sweep-decided (hit 1)") },
    )
    .await;
    let mut restored = capi_machine("m", "tpl", devices(1));
    restored["spec"]["network"]["devices"][0]["ipAddrs"] = json!([ip]);
    restored["spec"]["network"]["devices"][0]["netmask"] = json!("255.255.255.0");
    create(&client, &ns, restored)
        .await
        .expect("the restored machine is stored");
    eventually(
        Duration::from_secs(20),
        "the sweep went on after its pause",
        || async {
            hook.logged("released a claim no machine carries or needs")
                || hook.logged("could not release claim")
        },
    )
    .await;
    assert!(
        address_ips(&client, &ns).await.contains(&ip),
        "the IPAddress of {ip}, carried by the restored machine, was deleted:\n{}",
        hook.tail()
    );
    let (next, _) = create_as_capi(&client, &ns, "next", "tpl", 1).await;
    assert_ne!(carried(&next)[0].as_deref(), Some(ip.as_str()));
    let c = census(&client, &ns).await;
    report("sweep decided, then same name re-created", 3, 0, &c);
    assert_eq!((c.duplicates, c.missing), (0, 0), "{c:?}");
}

/// Ages are judged on each replica's own monotonic clock, never its wall clock against the
/// apiserver's timestamps. A replica whose wall clock runs an hour ahead keeps the claim of
/// a create still in admission (its answer held 8 s); one whose clock runs an hour behind
/// still releases, after the grace, what an interrupted create left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_is_an_hour_off_judges_ages_rightly() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("clock", "10.67.0.0/24").await;

    // An hour ahead: a claim written an instant ago is young.
    let mut ahead = config.spawn(
        "clock-ahead",
        &[
            ("CAPE_STATIC_IP_FAULT_CLOCK_OFFSET", "1h"),
            ("CAPE_STATIC_IP_FAULT_DELAY", "before-answer:1=8s"),
        ],
    );
    ahead.ready().await;
    let held = create(&client, &ns, capi_machine("held", "tpl", devices(1)))
        .await
        .expect("the held create is stored");
    let ip = carried(&serde_json::to_value(&held).unwrap());
    let c = census(&client, &ns).await;
    report("clock an hour ahead, create held 8 s", 1, 0, &c);
    assert!(c.sound(), "{ip:?}: {c:?}\n{}", ahead.tail());
    let (next, _) = create_as_capi(&client, &ns, "next", "tpl", 1).await;
    assert_ne!(carried(&next), ip);
    ahead.kill();

    // An hour behind: what a create interrupted after its writes left is released.
    let mut dies = config.spawn(
        "clock-dies",
        &[("CAPE_STATIC_IP_FAULT_POINT", "after-claim-status")],
    );
    dies.ready().await;
    let lost = create(&client, &ns, capi_machine("lost", "tpl", devices(1))).await;
    assert!(lost.is_err(), "a create went through a webhook that died");
    assert!(!dies.exited(Duration::from_secs(30)).await.success());
    let started = Instant::now();
    let behind = config.spawn(
        "clock-behind",
        &[("CAPE_STATIC_IP_FAULT_CLOCK_OFFSET", "-1h")],
    );
    let mut behind = behind;
    behind.ready().await;
    let c = census(&client, &ns).await;
    assert_eq!(
        c.left(),
        2,
        "precondition: the lost create left its pair: {c:?}"
    );
    let c = settled(&client, std::slice::from_ref(&ns), &behind, started)
        .await
        .remove(0);
    report("clock an hour behind, lost create", 3, 0, &c);
    assert!(c.sound(), "{c:?}");
    assert_eq!((c.live, c.left()), (2, 0), "{c:?}");
}

/// The caches are other watches than the machine's: a machine deleted an instant after its
/// create can be seen deleted before its claims are seen at all (here the claim watch lags
/// 3 s per change). Its release must still take its claims and addresses, at once, not
/// leave them for the sweep (before: the claims stayed, their addresses went).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_ahead_of_the_claim_cache_leaves_nothing() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("lagging", "10.68.0.0/24").await;
    let mut hook = config.spawn(
        "lagging",
        &[("CAPE_STATIC_IP_FAULT_DELAY", "claim-watch=3s")],
    );
    hook.ready().await;
    let (m, _) = create_as_capi(&client, &ns, "m", "tpl", 2).await;
    assert!(carried(&m).iter().all(Option::is_some), "{m}");
    delete_as_capi(&client, &ns, "m").await;
    let api = machines(&client, &ns);
    eventually(Duration::from_secs(20), "deleted machine gone", || async {
        api.get_opt("m").await.unwrap().is_none()
    })
    .await;
    let c = census(&client, &ns).await;
    report("release ahead of the claim cache", 1, 0, &c);
    assert!(
        hook.logged("caches behind the machine") || hook.logged("listing its claims"),
        "precondition: the release ran before the claims were cached:\n{}",
        hook.tail()
    );
    assert_eq!((c.addresses, c.claims), (0, 0), "{c:?}\n{}", hook.tail());
}

/// A release whose claim delete went through but whose answer was lost (a timeout, a 5xx)
/// is retried while the claim cache still shows the claim: the retry finds the claim gone
/// and must still delete its address (before, it took "gone" for "released by another
/// replica, addresses included" and left the address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_retried_after_a_lost_answer_leaves_nothing() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("lost-answer", "10.69.0.0/24").await;
    let mut hook = config.spawn(
        "lost-answer",
        &[
            ("CAPE_STATIC_IP_FAULT_FAIL", "after-claim-delete:1"),
            ("CAPE_STATIC_IP_FAULT_DELAY", "claim-watch=3s"),
        ],
    );
    hook.ready().await;
    let (m, _) = create_as_capi(&client, &ns, "m", "tpl", 1).await;
    assert!(carried(&m).iter().all(Option::is_some), "{m}");
    // Past the claim watch's lag, so that the claim is cached when the release runs.
    tokio::time::sleep(Duration::from_secs(8)).await;
    delete_as_capi(&client, &ns, "m").await;
    let api = machines(&client, &ns);
    eventually(Duration::from_secs(30), "deleted machine gone", || async {
        api.get_opt("m").await.unwrap().is_none()
    })
    .await;
    let c = census(&client, &ns).await;
    report("release retried after a lost answer", 1, 1, &c);
    assert!(
        hook.logged("fault point after-claim-delete (hit 1): failing"),
        "precondition: the first release lost its answer:\n{}",
        hook.tail()
    );
    assert_eq!((c.addresses, c.claims), (0, 0), "{c:?}\n{}", hook.tail());
}

/// A request taking over an address whose claim is gone writes to it, then creates the
/// claim; the sweep, which releases addresses no claim points at, must not delete it in
/// between (before, it judged the address by when it first saw it, and deleted it at the
/// version it read live: the machine then carried an address nothing held). Here the
/// take-over is the background loop filling a machine whose `ipAddrs` were wiped while
/// the webhook was not registered, and it pauses 10 s between its two writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_never_frees_an_address_a_request_is_taking_over() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("takeover-sweep", "10.70.0.0/24").await;
    let mut hook = config.spawn(
        "takeover-sweep",
        &[(
            "CAPE_STATIC_IP_FAULT_DELAY",
            "after-address-take-over:1=10s",
        )],
    );
    hook.ready().await;
    let (m, _) = create_as_capi(&client, &ns, "m", "tpl", 1).await;
    let ip = carried(&m)[0].clone().expect("an address");
    // The claim is deleted by hand; the address stays (the machine carries it).
    let claims = ipclaims(&client, &ns);
    for c in objects(&client, &ns, "IPClaim", "ipclaims").await {
        let name = c["metadata"]["name"].as_str().unwrap().to_string();
        claims
            .delete(&name, &DeleteParams::default())
            .await
            .unwrap();
    }
    // Past the grace on the webhook's clock: the address is old.
    tokio::time::sleep(GRACE + Duration::from_secs(4)).await;
    assert_eq!(address_ips(&client, &ns).await, std::slice::from_ref(&ip));
    // Wiped while the webhook is not registered: stored as is.
    let hooks: kube::Api<
        k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
    > = kube::Api::all(client.clone());
    hooks
        .delete(
            &format!("cape-static-ip-test-{ns}"),
            &DeleteParams::default(),
        )
        .await
        .unwrap();
    let api = machines(&client, &ns);
    // Until the apiserver has dropped the registration, the webhook puts an address back.
    eventually(Duration::from_secs(20), "the wipe is stored", || async {
        let wipe = json!([{"op": "remove", "path": "/spec/network/devices/0/ipAddrs"}]);
        let _ = api
            .patch(
                "m",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::<()>::Json(serde_json::from_value(wipe).unwrap()),
            )
            .await;
        let m = serde_json::to_value(api.get("m").await.unwrap()).unwrap();
        carried(&m)[0].is_none()
    })
    .await;
    eventually(
        Duration::from_secs(40),
        "the background loop gives the machine an address again",
        || async {
            let m = serde_json::to_value(api.get("m").await.unwrap()).unwrap();
            carried(&m)[0].is_some()
        },
    )
    .await;
    assert!(
        hook.logged("fault point after-address-take-over (hit 1)"),
        "precondition: the address was taken over:\n{}",
        hook.tail()
    );
    // A few sweeps later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = census(&client, &ns).await;
    report("sweep during a take-over", 1, 0, &c);
    assert!(c.sound(), "{c:?}\n{}", hook.tail());
}

/// A replica that read a machine being deleted and then paused (here 4 s after its live
/// read) goes on after another replica released the machine and the name was created again:
/// the new machine's claim and address have the same names, made in the same second as the
/// old machine's deletion (timestamps are second-granular). The paused release must leave
/// them, and the new machine's finalizer, alone (before: it took the new claim for the old
/// machine's and deleted it with its address; the new machine carried an address nothing
/// held).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_paused_never_touches_a_re_created_machine_of_the_name() {
    let _alone = ALONE.lock().await;
    let (client, config, ns) = scenario("paused-release", "10.71.0.0/24").await;
    let mut serving = unarmed(&config, "paused-release-serving", &client, &[]).await;
    // Another replica, not registered: its background loops only, each release pausing.
    let cp = shared(CrdSet::Current);
    let slow_config = ChildConfig::new(
        "paused-release-slow",
        cp.webhook_kubeconfig(),
        cp.caller_ca_file(),
        GRACE,
    );
    let mut slow = slow_config.spawn(
        "paused-release-slow",
        &[("CAPE_STATIC_IP_FAULT_DELAY", "release-read=4s")],
    );
    slow.ready().await;
    let api = machines(&client, &ns);
    let mut raced = 0;
    for round in 0..3 {
        create_as_capi(&client, &ns, "same", "tpl", 1).await;
        // Both replicas have the machine and are done with it (a replica is busy with a
        // machine just created for up to two seconds, and a delete waits for that); the
        // delete lands early in a second.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let subsec = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_millis();
        tokio::time::sleep(Duration::from_millis(u64::from(1020 - subsec))).await;
        let paused_before = slow.tail().matches("fault point release-read").count();
        let old = api
            .delete("same", &DeleteParams::default())
            .await
            .unwrap()
            .left()
            .expect("the machine waits for our finalizer");
        let deleted_at = old.metadata.deletion_timestamp.clone().unwrap().0;
        let gone = Instant::now();
        while api.get_opt("same").await.unwrap().is_some() {
            assert!(
                gone.elapsed() < Duration::from_secs(10),
                "round {round}: never released"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (m, _) = create_as_capi(&client, &ns, "same", "tpl", 1).await;
        let claims = objects(&client, &ns, "IPClaim", "ipclaims").await;
        let claim_made: Option<String> = claims
            .first()
            .and_then(|c| c["metadata"]["creationTimestamp"].as_str().map(Into::into));
        let same_second = claim_made
            .as_deref()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .is_some_and(|t| t <= deleted_at);
        // The slow replica read the old machine live before it was gone, and is paused.
        let paused = slow.tail().matches("fault point release-read").count() > paused_before;
        println!(
            "round {round}: old machine deleted {deleted_at}, new claim made {claim_made:?}, slow replica paused on the old machine: {paused}"
        );
        if same_second && paused {
            raced += 1;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
        let c = census(&client, &ns).await;
        report("paused release, same name re-created", round + 1, 0, &c);
        assert!(
            c.sound() && (c.live, c.addresses, c.claims) == (1, 1, 1),
            "round {round} (claim made {claim_made:?}, old machine deleted {deleted_at}, paused {paused}): {c:?}\n{}",
            slow.tail()
        );
        let now = api.get("same").await.unwrap();
        assert_eq!(
            now.metadata.uid,
            m["metadata"]["uid"].as_str().map(Into::into)
        );
        assert!(
            now.metadata
                .finalizers
                .iter()
                .flatten()
                .any(|f| f.contains("staticip")),
            "round {round}: the new machine lost our finalizer: {:?}",
            now.metadata.finalizers
        );
        delete_as_capi(&client, &ns, "same").await;
        eventually(Duration::from_secs(20), "machine gone", || async {
            api.get_opt("same").await.unwrap().is_none()
        })
        .await;
        // The slow replica's own pause on this release passes.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    assert!(
        raced >= 1,
        "precondition: in no round did the slow replica pause on the old machine while the new one's claim was made in the second of the deletion"
    );
    slow.kill();
    serving.kill();
}
