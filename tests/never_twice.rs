//! Never one address on two live NICs, whatever users and controllers edit (issue 16), on the
//! real control plane: claims follow the addresses machines carry (devices removed, inserted,
//! reordered, wiped, switched to DHCP and back), a pool cannot be pulled out from under live
//! addresses (with kube-controller-manager's garbage collector running), the grace period
//! cannot catch a create still in admission (a validating webhook that answers only at its
//! timeout), a claim held Terminating by metal3's finalizer is released, and an address
//! reserved by a request the apiserver gave up on is offered again.
//!
//! One control plane for the file, a fresh namespace and pool (its own subnet) per test, and a
//! short claim grace with a 1 s resync, so that "past the grace" is seconds away. Every
//! webhook started here runs the background loops cluster-wide, like replicas do: each test
//! only asserts what must hold whatever other replica runs.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::{Json, Router, routing::post};
use common::controllers;
use common::controlplane::{ControlPlane, CrdSet, shared, temp_namespace};
use common::util::{eventually, objects, setup, wait_for_pool};
use common::webhook::{
    self, Webhook, WebhookOptions, capi_machine, create, dynamic, ipclaims, machines,
};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::{Api, Client};
use serde_json::{Value, json};

/// The claim grace of every webhook in this file.
const GRACE: Duration = Duration::from_secs(4);
const RESYNC: Duration = Duration::from_secs(1);
/// Waiting `GRACE + MARGIN` lets the background loops (every second) run several times past
/// the grace.
const MARGIN: Duration = Duration::from_secs(5);

const CAPE_FINALIZER: &str = "elfmachine.infrastructure.cluster.x-k8s.io";
const METAL3_CLAIM_FINALIZER: &str = "ipclaim.ipam.metal3.io";
/// The finalizer our webhook puts on pools that hold its addresses.
const POOL_IN_USE_FINALIZER: &str = "static-ip.infrastructure.cluster.x-k8s.io/pool-in-use";
/// Our annotation naming a claim's machine (`<namespace>/<name>`).
const ANNOTATION_MACHINE: &str = "static-ip.infrastructure.cluster.x-k8s.io/machine";

/// Tests that run kube-controller-manager take this for writing: its controllers act on the
/// whole control plane, so no other test of this file runs beside them.
static CONTROLLERS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// One test's namespace, pool `pool` (10.<subnet>.0.10–40, sequential) and webhook.
struct Env {
    cp: &'static ControlPlane,
    client: Client,
    ns: String,
    hook: Webhook,
    subnet: u8,
}

async fn env(prefix: &str, subnet: u8) -> Env {
    env_with(prefix, subnet, GRACE).await
}

async fn env_with(prefix: &str, subnet: u8, claim_grace: Duration) -> Env {
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, prefix).await;
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            claim_grace,
            resync: RESYNC,
            ..Default::default()
        },
    )
    .await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "prefix": 24,
               "pools": [{"start": format!("10.{subnet}.0.10"), "end": format!("10.{subnet}.0.40")}]}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    Env {
        cp,
        client,
        ns,
        hook,
        subnet,
    }
}

/// `ipAddrs[0]` of every device ("" when it has none).
fn ips(m: &Value) -> Vec<String> {
    m["spec"]["network"]["devices"]
        .as_array()
        .map(|ds| {
            ds.iter()
                .map(|d| d["ipAddrs"][0].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Every address a machine's devices list, whatever their network type.
fn carried(m: &Value) -> Vec<String> {
    m["spec"]["network"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|d| d["ipAddrs"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

impl Env {
    fn ip(&self, last: u8) -> String {
        format!("10.{}.0.{last}", self.subnet)
    }

    /// Creates a machine as CAPI does, with these devices.
    async fn machine(&self, name: &str, devices: Value) -> Value {
        let m = create(&self.client, &self.ns, capi_machine(name, "tpl", devices))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        serde_json::to_value(m).unwrap()
    }

    async fn get(&self, name: &str) -> Value {
        serde_json::to_value(machines(&self.client, &self.ns).get(name).await.unwrap()).unwrap()
    }

    /// Applies a JSON patch to a machine (an UPDATE through admission); returns the result.
    async fn patch(&self, name: &str, ops: Value) -> Value {
        let m = machines(&self.client, &self.ns)
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Json::<()>(serde_json::from_value(ops).unwrap()),
            )
            .await
            .unwrap_or_else(|e| panic!("patch {name}: {e}"));
        serde_json::to_value(m).unwrap()
    }

    async fn live_machines(&self) -> Vec<Value> {
        machines(&self.client, &self.ns)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|m| serde_json::to_value(m).unwrap())
            .filter(|m| m["metadata"]["deletionTimestamp"].is_null())
            .collect()
    }

    async fn addresses(&self) -> Vec<Value> {
        objects(&self.client, &self.ns, "IPAddress", "ipaddresses").await
    }

    async fn claims(&self) -> Vec<Value> {
        objects(&self.client, &self.ns, "IPClaim", "ipclaims").await
    }

    /// The IPAddress object of `ip`, if any.
    async fn address_of(&self, ip: &str) -> Option<Value> {
        self.addresses()
            .await
            .into_iter()
            .find(|a| a["spec"]["address"] == json!(ip))
    }

    /// Why `ip` is not held: an IPAddress that is not being deleted, whose claim exists and is
    /// not being deleted. None when it is.
    async fn not_held(&self, ip: &str) -> Option<String> {
        let Some(address) = self.address_of(ip).await else {
            return Some(format!("no IPAddress holds {ip}"));
        };
        let name = address["metadata"]["name"].as_str().unwrap_or_default();
        if !address["metadata"]["deletionTimestamp"].is_null() {
            return Some(format!("IPAddress {name} of {ip} is being deleted"));
        }
        let claim = address["spec"]["claim"]["name"]
            .as_str()
            .unwrap_or_default();
        match self
            .claims()
            .await
            .into_iter()
            .find(|c| c["metadata"]["name"] == json!(claim))
        {
            None => Some(format!(
                "IPAddress {name} of {ip} names IPClaim {claim}, which does not exist"
            )),
            Some(c) if !c["metadata"]["deletionTimestamp"].is_null() => {
                Some(format!("IPClaim {claim} (of {ip}) is being deleted"))
            }
            Some(_) => None,
        }
    }

    async fn assert_held(&self, ip: &str, what: &str) {
        if let Some(why) = self.not_held(ip).await {
            panic!("{what}: {why}\n{}", self.dump().await);
        }
    }

    /// No address is listed twice across the live machines of the namespace (one machine's
    /// devices included).
    async fn assert_never_twice(&self, when: &str) {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for m in self.live_machines().await {
            let name = m["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            for ip in carried(&m) {
                seen.entry(ip).or_default().push(name.clone());
            }
        }
        let twice: Vec<_> = seen.iter().filter(|(_, ms)| ms.len() > 1).collect();
        assert!(
            twice.is_empty(),
            "{when}: addresses on two NICs: {twice:?}\n{}",
            self.dump().await
        );
    }

    /// Every address a static (IPV4) device of a live machine carries is held.
    async fn assert_all_held(&self, when: &str) {
        for m in self.live_machines().await {
            for d in m["spec"]["network"]["devices"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if d["networkType"] != "IPV4" {
                    continue;
                }
                for ip in d["ipAddrs"].as_array().into_iter().flatten() {
                    let ip = ip.as_str().unwrap_or_default();
                    if let Some(why) = self.not_held(ip).await {
                        panic!(
                            "{when}: machine {} carries {ip}: {why}\n{}",
                            m["metadata"]["name"],
                            self.dump().await
                        );
                    }
                }
            }
        }
    }

    /// Eventually every IPAddress holds an address a live machine carries, and every claim
    /// points at one of them: what no machine carries is released.
    async fn wait_nothing_leaked(&self) {
        let limit = GRACE + Duration::from_secs(30);
        let t0 = Instant::now();
        loop {
            let carried_now: Vec<String> = self
                .live_machines()
                .await
                .iter()
                .flat_map(carried)
                .collect();
            let addresses = self.addresses().await;
            let leaked: Vec<String> = addresses
                .iter()
                .filter_map(|a| a["spec"]["address"].as_str())
                .filter(|ip| !carried_now.iter().any(|c| c == ip))
                .map(str::to_owned)
                .collect();
            let names: Vec<&str> = addresses
                .iter()
                .filter_map(|a| a["metadata"]["name"].as_str())
                .collect();
            let dangling: Vec<String> = self
                .claims()
                .await
                .iter()
                .filter(|c| {
                    !c["status"]["address"]["name"]
                        .as_str()
                        .is_some_and(|a| names.contains(&a))
                })
                .filter_map(|c| c["metadata"]["name"].as_str().map(str::to_owned))
                .collect();
            if leaked.is_empty() && dangling.is_empty() {
                return;
            }
            assert!(
                t0.elapsed() < limit,
                "not released {limit:?} after: addresses no machine carries {leaked:?}, claims without an address {dangling:?}\n{}",
                self.dump().await
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Machines, addresses and claims of the namespace, for failure messages.
    async fn dump(&self) -> String {
        let mut out = String::from("machines:\n");
        for m in self.live_machines().await {
            out.push_str(&format!("  {} {:?}\n", m["metadata"]["name"], ips(&m)));
        }
        out.push_str("IPAddresses:\n");
        for a in self.addresses().await {
            out.push_str(&format!(
                "  {} {} claim {} deleting {}\n",
                a["metadata"]["name"],
                a["spec"]["address"],
                a["spec"]["claim"]["name"],
                !a["metadata"]["deletionTimestamp"].is_null()
            ));
        }
        out.push_str("IPClaims:\n");
        for c in self.claims().await {
            out.push_str(&format!(
                "  {} -> {} deleting {} finalizers {}\n",
                c["metadata"]["name"],
                c["status"]["address"]["name"],
                !c["metadata"]["deletionTimestamp"].is_null(),
                c["metadata"]["finalizers"]
            ));
        }
        out
    }

    /// A new single-NIC machine must not get any of `taken`.
    async fn new_machine_avoids(&self, name: &str, taken: &[&str]) -> String {
        let m = self.machine(name, json!([{"networkType": "IPV4"}])).await;
        let ip = ips(&m)[0].clone();
        assert!(!ip.is_empty(), "{m:#}");
        assert!(
            !taken.contains(&ip.as_str()),
            "machine {name} was given {ip}, which a live machine carries\n{}",
            self.dump().await
        );
        ip
    }

    async fn stop(self) {
        self.hook.stop().await;
    }
}

async fn past_grace() {
    tokio::time::sleep(GRACE + MARGIN).await;
}

// ---------------------------------------------------------------------------------------
// 1. Claims follow the addresses machines carry.
// ---------------------------------------------------------------------------------------

/// Two NICs get .10 and .11; the first is removed (JSON patch). Past the grace the machine
/// still holds .11 (its IPAddress and claim exist), a new machine does not get it, and .10,
/// carried by nobody, is released.
#[tokio::test]
async fn removing_the_first_nic_keeps_the_address_the_machine_still_carries() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-removed", 41).await;
    let m = e
        .machine(
            "two",
            json!([{"networkType": "IPV4"}, {"networkType": "IPV4"}]),
        )
        .await;
    let (a, b) = (e.ip(10), e.ip(11));
    assert_eq!(ips(&m), [a.clone(), b.clone()]);

    let m = e
        .patch(
            "two",
            json!([{"op": "test", "path": "/spec/network/devices/0/ipAddrs/0", "value": a},
                   {"op": "remove", "path": "/spec/network/devices/0"}]),
        )
        .await;
    assert_eq!(ips(&m), vec![b.clone()]);

    past_grace().await;
    e.assert_held(&b, "past the grace, the address the machine carries")
        .await;
    e.wait_nothing_leaked().await;
    assert!(
        e.address_of(&a).await.is_none(),
        "{a} is carried by no machine"
    );
    e.new_machine_avoids("next", &[&b]).await;
    e.assert_never_twice("after a new machine").await;
    e.assert_all_held("after a new machine").await;
    e.stop().await;
}

/// A NIC inserted at index 0 of a machine that carries .10 gets its own address; the old NIC
/// keeps .10; both stay held past the grace.
#[tokio::test]
async fn a_nic_inserted_first_gets_its_own_address() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-inserted", 42).await;
    let m = e.machine("nic", json!([{"networkType": "IPV4"}])).await;
    let a = e.ip(10);
    assert_eq!(ips(&m), vec![a.clone()]);

    let m = e
        .patch(
            "nic",
            json!([{"op": "add", "path": "/spec/network/devices/0", "value": {"networkType": "IPV4"}}]),
        )
        .await;
    let now = ips(&m);
    assert_eq!(now.len(), 2, "{m:#}");
    assert!(!now[0].is_empty(), "the inserted NIC got no address: {m:#}");
    assert_eq!(now[1], a, "the old NIC keeps its address");
    assert_ne!(
        now[0], a,
        "the inserted NIC was given the address the old NIC carries"
    );
    e.assert_all_held("after the insert").await;

    past_grace().await;
    e.assert_all_held("past the grace").await;
    e.new_machine_avoids("next", &[&now[0], &now[1]]).await;
    e.assert_never_twice("after a new machine").await;
    e.wait_nothing_leaked().await;
    e.stop().await;
}

/// Two NICs (.10, .11) are swapped, then the first one's `ipAddrs` wiped: the wiped NIC gets
/// an address the other does not carry, and no address ends up on two NICs or two machines.
#[tokio::test]
async fn reordered_then_wiped_nics_never_share_an_address() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-reorder", 43).await;
    let m = e
        .machine(
            "re",
            json!([{"networkType": "IPV4"}, {"networkType": "IPV4"}]),
        )
        .await;
    let (a, b) = (e.ip(10), e.ip(11));
    assert_eq!(ips(&m), [a.clone(), b.clone()]);
    let devices = m["spec"]["network"]["devices"].clone();

    let m = e
        .patch(
            "re",
            json!([{"op": "replace", "path": "/spec/network/devices", "value": [devices[1], devices[0]]}]),
        )
        .await;
    assert_eq!(ips(&m), [b.clone(), a.clone()]);

    // The template is re-applied to the first NIC: its address is wiped.
    let m = e
        .patch(
            "re",
            json!([{"op": "remove", "path": "/spec/network/devices/0/ipAddrs"}]),
        )
        .await;
    let now = ips(&m);
    assert!(!now[0].is_empty(), "the wiped NIC got no address: {m:#}");
    assert_eq!(now[1], a, "the untouched NIC keeps its address");
    assert_ne!(
        now[0], a,
        "the wiped NIC was given the address the other NIC carries"
    );
    e.assert_never_twice("after the wipe").await;
    e.assert_all_held("after the wipe").await;

    past_grace().await;
    e.assert_all_held("past the grace").await;
    e.new_machine_avoids("next", &[&now[0], &now[1]]).await;
    e.assert_never_twice("after a new machine").await;
    e.wait_nothing_leaked().await;
    e.stop().await;
}

/// NICs switched IPV4 → IPV4_DHCP (one keeping its `ipAddrs`, one clearing them), left so
/// past the grace while new machines take whatever is free, then switched back to IPV4: no
/// address is on two live machines.
#[tokio::test]
async fn dhcp_and_back_across_the_grace_never_puts_one_address_on_two_machines() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-dhcp", 44).await;
    let keep = e.machine("keeps", json!([{"networkType": "IPV4"}])).await;
    let clear = e.machine("clears", json!([{"networkType": "IPV4"}])).await;
    let (a, c) = (ips(&keep)[0].clone(), ips(&clear)[0].clone());
    assert_eq!(
        (a.as_str(), c.as_str()),
        (e.ip(10).as_str(), e.ip(11).as_str())
    );

    e.patch(
        "keeps",
        json!([{"op": "replace", "path": "/spec/network/devices/0/networkType", "value": "IPV4_DHCP"}]),
    )
    .await;
    e.patch(
        "clears",
        json!([{"op": "replace", "path": "/spec/network/devices/0/networkType", "value": "IPV4_DHCP"},
               {"op": "remove", "path": "/spec/network/devices/0/ipAddrs"}]),
    )
    .await;

    past_grace().await;
    // New machines take whatever is free now.
    e.machine("between-1", json!([{"networkType": "IPV4"}]))
        .await;
    e.machine("between-2", json!([{"networkType": "IPV4"}]))
        .await;
    e.assert_never_twice("while DHCP").await;

    let back = e
        .patch(
            "keeps",
            json!([{"op": "replace", "path": "/spec/network/devices/0/networkType", "value": "IPV4"}]),
        )
        .await;
    assert_eq!(ips(&back), vec![a.clone()]);
    let back = e
        .patch(
            "clears",
            json!([{"op": "replace", "path": "/spec/network/devices/0/networkType", "value": "IPV4"}]),
        )
        .await;
    assert!(
        !ips(&back)[0].is_empty(),
        "back to IPV4 without an address: {back:#}"
    );
    e.assert_never_twice("back to IPV4").await;
    e.assert_all_held("back to IPV4").await;

    past_grace().await;
    e.assert_all_held("past the grace").await;
    e.machine("after", json!([{"networkType": "IPV4"}])).await;
    e.assert_never_twice("after a new machine").await;
    e.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Pools cannot be pulled out from under live addresses.
// ---------------------------------------------------------------------------------------

/// The IPAddresses we write carry no ownerReference to their pool (the garbage collector
/// would delete them with the pool while machines carry them).
#[tokio::test]
async fn new_addresses_carry_no_owner_reference_to_the_pool() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-owner", 45).await;
    let m = e.machine("m", json!([{"networkType": "IPV4"}])).await;
    let address = e.address_of(&ips(&m)[0]).await.expect("its IPAddress");
    let to_pool: Vec<&Value> = address["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["kind"] == "IPPool")
        .collect();
    assert!(
        to_pool.is_empty(),
        "IPAddress {} is owned by its pool: {to_pool:?}",
        address["metadata"]["name"]
    );
    e.stop().await;
}

/// With kube-controller-manager's garbage collector running, a pool deleted (`kubectl
/// delete`, background propagation) while a machine holds one of its addresses: the address
/// stays, the pool stays (Terminating, held by our finalizer), a re-applied pool does not
/// hand the address out again; once the machine is released, the pool goes.
#[tokio::test]
async fn a_deleted_pool_keeps_the_addresses_machines_hold() {
    let _alone = CONTROLLERS.write().await;
    let e = env("nt-poolgc", 46).await;
    // No ownerReference to a MachineSet: the collector would judge these machines orphans.
    let holder = {
        let mut m = capi_machine("holder", "tpl", json!([{"networkType": "IPV4"}]));
        m["metadata"]["ownerReferences"].take();
        serde_json::to_value(create(&e.client, &e.ns, m).await.unwrap()).unwrap()
    };
    let a = ips(&holder)[0].clone();
    assert_eq!(a, e.ip(10));

    let pools = dynamic(
        &e.client,
        &e.ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPPool",
        "ippools",
    );
    // A pool that holds our addresses carries our finalizer.
    eventually(
        Duration::from_secs(30),
        "the pool holding an address carries our finalizer",
        || async {
            let pool = serde_json::to_value(pools.get("pool").await.unwrap()).unwrap();
            pool["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| f == POOL_IN_USE_FINALIZER)
        },
    )
    .await;

    let mut kcm = controllers::start(e.cp, &["garbagecollector"]);
    kcm.wait_for_garbage_collector(&e.client, &e.ns).await;

    let kubectl = common::tools::kubectl();
    common::tools::run(
        std::process::Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(e.cp.kubeconfig())
            .args(["delete", "ippool", "pool", "--wait=false", "-n", &e.ns]),
    );
    // The collector deletes what it may within seconds (10 s measured): give it 20.
    tokio::time::sleep(Duration::from_secs(20)).await;
    kcm.assert_running();
    e.assert_held(
        &a,
        "20 s after the pool was deleted, with the garbage collector running",
    )
    .await;
    let pool = pools
        .get_opt("pool")
        .await
        .unwrap()
        .map(|p| serde_json::to_value(p).unwrap());
    let pool = pool.unwrap_or_else(|| panic!("the pool is gone while {a} is carried"));
    assert!(
        pool["metadata"]["finalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f == POOL_IN_USE_FINALIZER),
        "{pool:#}"
    );

    // A new machine does not get the address the holder carries (it may be denied while the
    // pool is being deleted).
    let mut m = capi_machine("second", "tpl", json!([{"networkType": "IPV4"}]));
    m["metadata"]["ownerReferences"].take();
    let second = create(&e.client, &e.ns, m).await;
    if let Ok(second) = &second {
        let second = serde_json::to_value(second).unwrap();
        assert_ne!(ips(&second)[0], a, "{}", e.dump().await);
    }
    e.assert_never_twice("after a second machine").await;

    // The machines go (no VM: CAPE's finalizer is not there), then the pool.
    let api = machines(&e.client, &e.ns);
    for name in ["holder", "second"] {
        let _ = api.delete(name, &DeleteParams::default()).await;
    }
    eventually(Duration::from_secs(30), "machines released", || async {
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "the pool is gone once no machine holds its addresses",
        || async { pools.get_opt("pool").await.unwrap().is_none() },
    )
    .await;
    assert!(e.addresses().await.is_empty(), "{}", e.dump().await);
    drop(kcm);
    e.stop().await;
}

/// Deletes every object of a metal3 kind in the namespace and strips its finalizers (after the
/// delete, so that no controller adds one back), as someone forcing a cleanup does.
async fn force_delete_all(e: &Env, kind: &str, plural: &str) {
    let api = dynamic(&e.client, &e.ns, "ipam.metal3.io", "v1alpha1", kind, plural);
    for o in api.list(&ListParams::default()).await.unwrap().items {
        let name = o.metadata.name.clone().unwrap_or_default();
        api.delete(&name, &DeleteParams::default()).await.unwrap();
        match api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(err) => panic!("stripping the finalizers of {kind} {name}: {err}"),
        }
    }
    eventually(
        Duration::from_secs(10),
        &format!("every {kind} gone"),
        || {
            let api = api.clone();
            async move {
                api.list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .is_empty()
            }
        },
    )
    .await;
}

/// Everything a machine's address rests on is pulled out by force: its claim and IPAddress
/// deleted by hand, its pool deleted (finalizers stripped) and re-applied empty. The address
/// the machine carries is still never given to another machine.
#[tokio::test]
async fn an_address_a_machine_carries_is_never_offered_even_without_its_objects() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-forced", 51).await;
    let m = e.machine("holder", json!([{"networkType": "IPV4"}])).await;
    let a = ips(&m)[0].clone();
    assert_eq!(a, e.ip(10));
    force_delete_all(&e, "IPClaim", "ipclaims").await;
    force_delete_all(&e, "IPAddress", "ipaddresses").await;
    force_delete_all(&e, "IPPool", "ippools").await;
    let spec = json!({"namePrefix": "pool", "prefix": 24,
                      "pools": [{"start": e.ip(10), "end": e.ip(40)}]});
    let pool = create(&e.client, &e.ns, webhook::pool("pool", spec, json!({})))
        .await
        .unwrap();
    let uid = pool.metadata.uid.clone();
    let key = kube::runtime::reflector::ObjectRef::new("pool").within(&e.ns);
    eventually(
        Duration::from_secs(10),
        "the re-applied pool cached",
        || {
            let cached = e.hook.running.state.assigner.caches.pools.get(&key);
            let fresh = cached.is_some_and(|p| p.metadata.uid == uid);
            async move { fresh }
        },
    )
    .await;

    e.new_machine_avoids("next", &[&a]).await;
    e.assert_never_twice("after a new machine").await;
    e.stop().await;
}

// ---------------------------------------------------------------------------------------
// A validating webhook of our own: slow on purpose.
// ---------------------------------------------------------------------------------------

/// Objects annotated with this are answered at once (to see that the apiserver calls us).
const PROBE: &str = "never-twice.test/probe";

struct Slow {
    delay: Duration,
    allow: bool,
    /// Answer everything at once from now on.
    fast: AtomicBool,
    probes: AtomicUsize,
    calls: AtomicUsize,
}

/// An HTTPS server (tokio-rustls, hyper) answering AdmissionReviews: allowed (or denied) only
/// after `delay`.
struct Validator {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<Slow>,
    server: tokio::task::JoinHandle<()>,
}

async fn review(
    State(state): State<Arc<Slow>>,
    Json(review): Json<AdmissionReview<DynamicObject>>,
) -> Json<AdmissionReview<DynamicObject>> {
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(_) => return Json(AdmissionResponse::invalid("unreadable review").into_review()),
    };
    let probe = request
        .object
        .as_ref()
        .and_then(|o| o.metadata.annotations.as_ref())
        .is_some_and(|a| a.contains_key(PROBE));
    let response = AdmissionResponse::from(&request);
    if probe {
        state.probes.fetch_add(1, Ordering::SeqCst);
        return Json(response.into_review());
    }
    state.calls.fetch_add(1, Ordering::SeqCst);
    // Decided on arrival: a call that waits is answered as it would have been then.
    let fast = state.fast.load(Ordering::SeqCst);
    if !fast {
        tokio::time::sleep(state.delay).await;
    }
    if state.allow || fast {
        Json(response.into_review())
    } else {
        Json(
            response
                .deny("denied by a slow validating webhook")
                .into_review(),
        )
    }
}

impl Validator {
    async fn start(delay: Duration, allow: bool) -> Validator {
        let certs = cape_static_ip::webhook::certs::generate(&["127.0.0.1".into()], 1).unwrap();
        let tls = {
            use rustls::pki_types::pem::PemObject;
            use rustls::pki_types::{CertificateDer, PrivateKeyDer};
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(certs.cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let key = PrivateKeyDer::from_pem_slice(certs.key.as_bytes()).unwrap();
            let mut config = rustls::ServerConfig::builder()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        };
        let state = Arc::new(Slow {
            delay,
            allow,
            fast: AtomicBool::new(false),
            probes: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        });
        let router = Router::new()
            .route("/validate", post(review))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // TLS and HTTP/1 or HTTP/2 per connection, each on its own task; aborted with the
        // accepting task's runtime at the end of the test.
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tls, router) = (tls.clone(), router.clone());
                tokio::spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Validator {
            addr,
            ca_pem: certs.ca_cert,
            state,
            server,
        }
    }

    /// Registers this server as a webhook.
    async fn register(&self, client: &Client, hook: Registration<'_>) {
        let webhook = json!({
            "name": "slow.never-twice.test",
            "admissionReviewVersions": ["v1"],
            "clientConfig": {"url": format!("https://{}/validate", self.addr),
                             "caBundle": k8s_openapi::ByteString(self.ca_pem.as_bytes().to_vec())},
            "rules": [{"apiGroups": [hook.group], "apiVersions": ["*"], "operations": ["CREATE"],
                       "resources": [hook.resource], "scope": "Namespaced"}],
            "failurePolicy": hook.failure_policy,
            "sideEffects": "None",
            "timeoutSeconds": hook.timeout_seconds,
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": hook.namespace}},
            "objectSelector": {"matchLabels": hook.object_labels},
        });
        let config = json!({"metadata": {"name": hook.name}, "webhooks": [webhook]});
        if hook.mutating {
            Api::<MutatingWebhookConfiguration>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(config).unwrap(),
                )
                .await
                .unwrap();
        } else {
            Api::<ValidatingWebhookConfiguration>::all(client.clone())
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(config).unwrap(),
                )
                .await
                .unwrap();
        }
    }

    /// Waits until the apiserver calls us: `probe` (a dry-run create of an object this
    /// webhook matches, annotated with [`PROBE`]) is repeated until a probe arrives.
    async fn wait_until_called<F, Fut>(&self, mut probe: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        for _ in 0..200 {
            probe().await;
            if self.state.probes.load(Ordering::SeqCst) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the apiserver never called the validating webhook");
    }

    fn stop(self) {
        self.server.abort();
    }
}

/// Where [`Validator::register`] registers a server: CREATEs of `group`/`resource` in
/// `namespace`, objects matching `object_labels`.
struct Registration<'a> {
    name: &'a str,
    mutating: bool,
    namespace: &'a str,
    group: &'a str,
    resource: &'a str,
    object_labels: Value,
    failure_policy: &'a str,
    timeout_seconds: i32,
}

async fn unregister(client: &Client, name: &str) {
    let _ = Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await;
}

// ---------------------------------------------------------------------------------------
// 3. Grace that cannot catch a create in flight.
// ---------------------------------------------------------------------------------------

/// Runs `cape-static-ip serve --claim-grace <grace>` with no cluster to reach: it exits at
/// once, refusing the grace or failing to connect.
fn serve_with_grace(grace: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cape-static-ip"))
        .args(["serve", "--claim-grace", grace])
        .args(["--tls-cert-file", "/nonexistent/tls.crt"])
        .args(["--tls-key-file", "/nonexistent/tls.key"])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("running cape-static-ip");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The shortest `--claim-grace` the binary accepts with the apiserver's default request
/// timeout, read from its refusal of one second ("... use at least <duration>").
fn shortest_accepted_grace() -> Duration {
    let (_, text) = serve_with_grace("1s");
    let at_least = text
        .split("use at least ")
        .nth(1)
        .unwrap_or_else(|| panic!("a claim grace of 1s was not refused:\n{text}"));
    let value = at_least.lines().next().unwrap_or_default().trim();
    humantime::parse_duration(value)
        .unwrap_or_else(|e| panic!("reading {value:?} from the refusal: {e}\n{text}"))
}

/// No create stays in admission longer than the apiserver allows: k8s.io/apiserver's create
/// handler caps it at 34 s (`requestTimeoutUpperBound`), less when `--request-timeout` is
/// lower. A claim grace of 34 s is refused, the message naming the flag.
#[test]
fn the_claim_grace_must_exceed_the_apiservers_request_timeout() {
    let (ok, text) = serve_with_grace("34s");
    assert!(
        !ok && text.contains("--claim-grace") && text.contains("too short"),
        "a claim grace of 34s was not refused:\n{text}"
    );
}

/// A create held in admission almost as long as the apiserver allows (34 s, the create
/// handler's cap): after our webhook wrote the claim, a second mutating webhook answers after
/// 16 s and a validating webhook (failurePolicy Ignore) only at its timeout, 16 s. Our webhook
/// runs with the shortest claim grace the binary accepts. The machine is stored with its
/// address; past the grace its claim and address still exist, and a second machine gets
/// another address.
#[tokio::test]
async fn a_create_held_in_admission_as_long_as_the_apiserver_allows_keeps_its_claim() {
    // Every replica sweeps every namespace: none with a shorter grace may run meanwhile.
    let _alone = CONTROLLERS.write().await;
    let grace = shortest_accepted_grace();
    let e = env_with("nt-inflight", 47, grace).await;
    let mutator = Validator::start(Duration::from_secs(16), true).await;
    let validator = Validator::start(Duration::from_secs(20), true).await;
    let labels = json!({"never-twice.test/slow": "yes"});
    // Mutating webhooks are called in the order of their configurations' names: ours
    // (cape-static-ip-test-...) first, then this one.
    let mutating = format!("zz-never-twice-slow-{}", e.ns);
    let validating = format!("never-twice-slow-{}", e.ns);
    mutator
        .register(
            &e.client,
            Registration {
                name: &mutating,
                mutating: true,
                namespace: &e.ns,
                group: "infrastructure.cluster.x-k8s.io",
                resource: "elfmachines",
                object_labels: labels.clone(),
                failure_policy: "Fail",
                timeout_seconds: 20,
            },
        )
        .await;
    validator
        .register(
            &e.client,
            Registration {
                name: &validating,
                mutating: false,
                namespace: &e.ns,
                group: "infrastructure.cluster.x-k8s.io",
                resource: "elfmachines",
                object_labels: labels,
                failure_policy: "Ignore",
                timeout_seconds: 16,
            },
        )
        .await;
    let slow_machine = |name: &str, probe: bool| {
        let mut m = capi_machine(name, "tpl", json!([{"networkType": "IPV4"}]));
        m["metadata"]["labels"]["never-twice.test/slow"] = json!("yes");
        if probe {
            m["metadata"]["annotations"][PROBE] = json!("yes");
        }
        serde_json::from_value::<DynamicObject>(m).unwrap()
    };
    let api = machines(&e.client, &e.ns);
    let probe = || {
        let api = api.clone();
        let probe = slow_machine("probe", true);
        async move {
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let _ = api.create(&dry, &probe).await;
        }
    };
    mutator.wait_until_called(probe).await;
    validator.wait_until_called(probe).await;

    let t0 = Instant::now();
    let m = api
        .create(&PostParams::default(), &slow_machine("slow", false))
        .await
        .expect("the slow create is stored");
    let in_admission = t0.elapsed();
    assert!(
        mutator.state.calls.load(Ordering::SeqCst) >= 1
            && validator.state.calls.load(Ordering::SeqCst) >= 1,
        "the slow webhooks were not called"
    );
    assert!(
        in_admission >= Duration::from_secs(31),
        "precondition: the create was to be held in admission for about 32 s, not {in_admission:?}"
    );
    let a = ips(&serde_json::to_value(&m).unwrap())[0].clone();
    assert_eq!(a, e.ip(10));

    // Past the grace, counted from before the claim was written.
    tokio::time::sleep((t0 + grace + MARGIN).saturating_duration_since(Instant::now())).await;
    e.assert_held(
        &a,
        &format!(
            "{grace:?} (the claim grace) after the create started, the address of the machine that waited {in_admission:?} in admission"
        ),
    )
    .await;
    e.new_machine_avoids("second", &[&a]).await;
    e.assert_never_twice("after a second machine").await;
    unregister(&e.client, &mutating).await;
    unregister(&e.client, &validating).await;
    mutator.stop();
    validator.stop();
    e.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. Smaller paths.
// ---------------------------------------------------------------------------------------

/// A ValidatingAdmissionPolicy that denies ElfMachines labelled `deny: "yes"` in one
/// namespace: a create our webhook allowed is denied later in admission (its claim stays).
async fn deny_later_in_admission(client: &Client, ns: &str) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "metadata": {"name": format!("deny-{ns}")},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{"apiGroups": ["infrastructure.cluster.x-k8s.io"], "apiVersions": ["*"],
                "operations": ["CREATE"], "resources": ["elfmachines"]}]},
            "validations": [{"expression": "!has(object.metadata.labels) || !('deny' in object.metadata.labels)",
                             "message": "denied by a later policy"}]
        }
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("deny-{ns}")},
        "spec": {"policyName": format!("deny-{ns}"), "validationActions": ["Deny"],
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}
    }))
    .unwrap();
    Api::<ValidatingAdmissionPolicy>::all(client.clone())
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    Api::<ValidatingAdmissionPolicyBinding>::all(client.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
}

/// Adds metal3's finalizer to a claim, as its controller does; false when the claim is gone.
async fn add_metal3_finalizer(claims: &Api<DynamicObject>, name: &str) -> bool {
    match claims
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": [METAL3_CLAIM_FINALIZER]}})),
        )
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => panic!("adding metal3's finalizer to {name}: {e}"),
    }
}

/// A create denied later in admission leaves a claim; metal3's finalizer is added to it and
/// it is deleted by hand before the grace passes (retried when some replica's sweep got there
/// first). Needs [`deny_later_in_admission`]. Returns the claim's name and its address's.
async fn terminating_orphan_claim(e: &Env, claims: &Api<DynamicObject>) -> (String, Value) {
    for i in 0..200 {
        let name = format!("denied-{i}");
        let mut m = capi_machine(&name, "tpl", json!([{"networkType": "IPV4"}]));
        m["metadata"]["labels"]["deny"] = json!("yes");
        match create(&e.client, &e.ns, m).await {
            Err(kube::Error::Api(s)) if s.message.contains("denied by a later policy") => {}
            Err(err) => panic!("unexpected: {err}"),
            Ok(_) => {
                // Created before the policy was active: released normally.
                machines(&e.client, &e.ns)
                    .delete(&name, &DeleteParams::default())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        let key = format!("{}/{name}", e.ns);
        let Some(claim) = e
            .claims()
            .await
            .into_iter()
            .find(|c| c["metadata"]["annotations"][ANNOTATION_MACHINE] == json!(key))
        else {
            continue;
        };
        let claim_name = claim["metadata"]["name"].as_str().unwrap().to_string();
        if !add_metal3_finalizer(claims, &claim_name).await {
            continue;
        }
        claims
            .delete(&claim_name, &DeleteParams::default())
            .await
            .unwrap();
        return (claim_name, claim["status"]["address"]["name"].clone());
    }
    panic!("no create denied later left a claim to mark");
}

/// Claims held Terminating by metal3's finalizer while metal3's controller does not run:
/// (1) the claim of a create denied later in admission, deleted by hand: past the grace it is
/// gone with its address; (2) the claim of a live machine, deleted by hand: the machine's
/// address is not handed out again, and once the machine is deleted the claim and its
/// address are gone.
#[tokio::test]
async fn claims_held_terminating_by_metal3s_finalizer_are_released() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-metal3fin", 48).await;
    let claims = ipclaims(&e.client, &e.ns);
    deny_later_in_admission(&e.client, &e.ns).await;

    // (1) A denied create leaves a claim, which is then held Terminating.
    let (orphan, orphan_address) = terminating_orphan_claim(&e, &claims).await;
    eventually(
        GRACE + Duration::from_secs(30),
        "the Terminating claim of a machine that never existed is gone with its address",
        || async {
            let claims = e.claims().await;
            let addresses = e.addresses().await;
            !claims
                .iter()
                .any(|c| c["metadata"]["name"] == json!(orphan))
                && !addresses
                    .iter()
                    .any(|a| a["metadata"]["name"] == orphan_address)
        },
    )
    .await;

    // (2) A live machine's claim is deleted by hand and held Terminating by metal3's
    // finalizer.
    let m = e.machine("kept", json!([{"networkType": "IPV4"}])).await;
    let a = ips(&m)[0].clone();
    let address = e.address_of(&a).await.expect("its IPAddress");
    let claim = address["spec"]["claim"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(add_metal3_finalizer(&claims, &claim).await);
    claims
        .delete(&claim, &DeleteParams::default())
        .await
        .unwrap();
    past_grace().await;
    e.new_machine_avoids("other", &[&a]).await;
    e.assert_never_twice("beside a Terminating claim").await;
    // The machine goes (CAPE has removed its finalizer: no VM).
    let api = machines(&e.client, &e.ns);
    let live = e.get("kept").await;
    assert!(
        !live["metadata"]["finalizers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f == CAPE_FINALIZER)
    );
    api.delete("kept", &DeleteParams::default()).await.unwrap();
    eventually(
        GRACE + Duration::from_secs(30),
        "the machine, its Terminating claim and its address are gone",
        || async {
            api.get_opt("kept").await.unwrap().is_none()
                && !e
                    .claims()
                    .await
                    .iter()
                    .any(|c| c["metadata"]["name"] == json!(claim))
                && e.address_of(&a).await.is_none()
        },
    )
    .await;
    e.stop().await;
}

/// An address reserved for a request the apiserver gave up on is offered again. Our webhook
/// writes an IPAddress during admission; a validating webhook on IPAddresses answers only
/// after our webhook's timeout (10 s), so the apiserver cancels the ElfMachine create while
/// the address is reserved. In a pool of one address, the next machine must get it.
#[tokio::test]
async fn an_address_reserved_by_a_cancelled_request_is_offered_again() {
    let _shared = CONTROLLERS.read().await;
    let cp = shared(CrdSet::Current);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "nt-cancelled").await;
    let hook = webhook::start(
        &client,
        &ns,
        WebhookOptions {
            claim_grace: GRACE,
            resync: RESYNC,
            ..Default::default()
        },
    )
    .await;
    setup(
        &client,
        &ns,
        json!({"namePrefix": "pool", "prefix": 24, "pools": [{"start": "10.49.0.10", "end": "10.49.0.10"}]}),
    )
    .await;
    wait_for_pool(&hook, &ns).await;
    let e = Env {
        cp,
        client,
        ns,
        hook,
        subnet: 49,
    };

    let slow = Validator::start(Duration::from_secs(14), false).await;
    let config = format!("never-twice-slow-address-{}", e.ns);
    slow.register(
        &e.client,
        Registration {
            name: &config,
            mutating: false,
            namespace: &e.ns,
            group: "ipam.metal3.io",
            resource: "ipaddresses",
            object_labels: json!({}),
            failure_policy: "Fail",
            timeout_seconds: 15,
        },
    )
    .await;
    let addresses = dynamic(
        &e.client,
        &e.ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPAddress",
        "ipaddresses",
    );
    slow.wait_until_called(|| {
        let addresses = addresses.clone();
        let probe: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPAddress",
            "metadata": {"name": "probe", "annotations": {PROBE: "yes"}},
            "spec": {"address": "10.49.1.1", "prefix": 24, "pool": {"name": "pool"}, "claim": {"name": "probe"}}
        }))
        .unwrap();
        async move {
            let dry = PostParams {
                dry_run: true,
                ..Default::default()
            };
            let _ = addresses.create(&dry, &probe).await;
        }
    })
    .await;

    let cancelled = create(
        &e.client,
        &e.ns,
        capi_machine("cancelled", "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the create was to fail at our webhook's timeout: {cancelled:?}"
    );
    assert!(
        slow.state.calls.load(Ordering::SeqCst) >= 1,
        "our webhook never tried to write the IPAddress"
    );
    slow.state.fast.store(true, Ordering::SeqCst);
    unregister(&e.client, &config).await;
    // The slow answer arrives (a denial: nothing was written), then the grace passes.
    tokio::time::sleep(Duration::from_secs(5)).await;
    past_grace().await;
    assert!(e.addresses().await.is_empty(), "{}", e.dump().await);

    let next = create(
        &e.client,
        &e.ns,
        capi_machine("next", "tpl", json!([{"networkType": "IPV4"}])),
    )
    .await
    .unwrap_or_else(|err| panic!("the only address of the pool was not offered again: {err}"));
    assert_eq!(ips(&serde_json::to_value(next).unwrap()), [e.ip(10)]);
    slow.stop();
    e.stop().await;
}

/// A namespace whose claims metal3's finalizer holds (metal3's controller does not run)
/// finishes deleting, with kube-controller-manager's namespace controller running: a live
/// machine's claim, and the claim of a create denied later in admission (deleted by hand).
#[tokio::test]
async fn a_namespace_with_claims_held_by_metal3s_finalizer_finishes_deleting() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-nsdelete", 50).await;
    let claims = ipclaims(&e.client, &e.ns);
    deny_later_in_admission(&e.client, &e.ns).await;
    terminating_orphan_claim(&e, &claims).await;
    let m = e.machine("kept", json!([{"networkType": "IPV4"}])).await;
    let address = e.address_of(&ips(&m)[0]).await.expect("its IPAddress");
    let claim = address["spec"]["claim"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(add_metal3_finalizer(&claims, &claim).await);

    let mut kcm = controllers::start(e.cp, &["namespace"]);
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(e.client.clone());
    namespaces
        .delete(&e.ns, &DeleteParams::default())
        .await
        .unwrap();
    let limit = Duration::from_secs(120);
    let t0 = Instant::now();
    while namespaces.get_opt(&e.ns).await.unwrap().is_some() {
        kcm.assert_running();
        assert!(
            t0.elapsed() < limit,
            "namespace {} still there {limit:?} after its deletion:\n{}",
            e.ns,
            e.dump().await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(kcm);
    e.stop().await;
}

/// An IPAddress deleted by hand while a finalizer holds it (metal3's, or anyone's) is on its
/// way out: a device whose address was wiped must not be given it back through its claim
/// (once the finalizer goes, the NIC would carry an address nothing holds). It gets another
/// address, and the claim of the dying one is released once nothing carries it.
#[tokio::test]
async fn an_address_being_deleted_is_never_handed_out_again() {
    let _shared = CONTROLLERS.read().await;
    let e = env("nt-dying", 52).await;
    let m = e.machine("dy", json!([{"networkType": "IPV4"}])).await;
    let a = ips(&m)[0].clone();
    let address = e.address_of(&a).await.expect("an IPAddress");
    let name = address["metadata"]["name"].as_str().unwrap().to_string();
    let api = dynamic(
        &e.client,
        &e.ns,
        "ipam.metal3.io",
        "v1alpha1",
        "IPAddress",
        "ipaddresses",
    );
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": ["never-twice.test/hold"]}})),
    )
    .await
    .unwrap();
    api.delete(&name, &DeleteParams::default()).await.unwrap();
    // The template is re-applied: the NIC's address is wiped.
    let m = e
        .patch(
            "dy",
            json!([{"op": "remove", "path": "/spec/network/devices/0/ipAddrs"}]),
        )
        .await;
    let now = ips(&m)[0].clone();
    assert!(!now.is_empty(), "the wiped NIC got no address: {m:#}");
    assert_ne!(now, a, "the NIC was given back an address being deleted");
    e.assert_held(&now, "the new address").await;
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    e.assert_never_twice("after the old address went").await;
    e.assert_all_held("after the old address went").await;
    e.wait_nothing_leaked().await;
    e.stop().await;
}
