//! The CAPE contract (DESIGN.md §2, issue 4) as test bodies shared by `tests/contract.rs`
//! (CAPE v1.8.1 + metal3 v1.13.2 CRDs) and `tests/contract_legacy.rs` (CAPE v0.3.6 + metal3
//! v1.1.3). Every case runs against a real kube-apiserver with the webhook registered for a
//! fresh namespace; objects are created through the API exactly as CAPI creates them.
//!
//! Include with `#[path = "common/contract_cases.rs"] mod contract_cases;` beside `mod common;`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use serde_json::{Value, json};

use crate::common::controlplane::{CrdSet, shared, temp_namespace};
use crate::common::webhook::{
    self, Webhook, WebhookOptions, capi_machine, create, dynamic, ipclaims, machines, pool,
    template,
};

pub const FINALIZER: &str = "elfmachinestaticip.infrastructure.cluster.x-k8s.io";

/// Serializes the cases that put default pools into, or need none in, the shared `default`
/// namespace (every test of a binary shares one apiserver).
static DEFAULT_NAMESPACE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One test's world: a namespace with the webhook registered for it.
pub struct Env {
    pub set: CrdSet,
    pub client: kube::Client,
    pub ns: String,
    pub hook: Webhook,
    /// Held while the test runs: [`dns_placement_follows_crd_changes`] changes the shared
    /// ElfMachine CRD only when no other test runs.
    _crd: tokio::sync::RwLockReadGuard<'static, ()>,
}

/// See [`Env`]'s `_crd`.
static CRD: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

pub async fn env(set: CrdSet, prefix: &str, options: WebhookOptions) -> Env {
    let crd = CRD.read().await;
    let cp = shared(set);
    let client = cp.client().await;
    let ns = temp_namespace(&client, prefix).await;
    let hook = webhook::start(&client, &ns, options).await;
    Env {
        set,
        client,
        ns,
        hook,
        _crd: crd,
    }
}

fn to_value(o: DynamicObject) -> Value {
    serde_json::to_value(o).unwrap()
}

impl Env {
    /// Creates an IPPool in `ns` and waits until this webhook's caches know it.
    pub async fn pool_in(&self, ns: &str, name: &str, spec: Value, labels: Value) {
        create(&self.client, ns, pool(name, spec, labels))
            .await
            .unwrap_or_else(|e| panic!("creating IPPool {ns}/{name}: {e}"));
        self.wait_for_pool(ns, name).await;
    }

    pub async fn pool(&self, name: &str, spec: Value, labels: Value) {
        self.pool_in(&self.ns.clone(), name, spec, labels).await
    }

    pub async fn wait_for_pool(&self, ns: &str, name: &str) {
        let key = cape_static_ip::ipam::select::PoolKey::new(ns, name);
        let index = &self.hook.running.state.assigner.caches.index;
        for _ in 0..250 {
            let known = !matches!(
                index.with_pool(&key, |_| ()),
                Err(cape_static_ip::cluster::index::PoolUnavailable::Missing(_))
            );
            if known && index.pool_metas().iter().any(|m| m.key == key) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("pool {ns}/{name} never reached the cache");
    }

    pub async fn template(&self, name: &str, labels: Value) {
        create(&self.client, &self.ns, template(name, labels))
            .await
            .unwrap();
        let key = kube::runtime::reflector::ObjectRef::new(name).within(&self.ns);
        for _ in 0..250 {
            if self
                .hook
                .running
                .state
                .assigner
                .caches
                .templates
                .get(&key)
                .is_some()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Creates an ElfMachine; `Err` is the denial message.
    pub async fn create_machine(&self, object: Value) -> Result<Value, String> {
        match create(&self.client, &self.ns, object).await {
            Ok(o) => Ok(to_value(o)),
            Err(kube::Error::Api(s)) => Err(s.message),
            Err(e) => panic!("create failed without an API status: {e}"),
        }
    }

    pub async fn machine_ok(&self, object: Value) -> Value {
        let name = object["metadata"]["name"].clone();
        self.create_machine(object)
            .await
            .unwrap_or_else(|e| panic!("machine {name} denied: {e}"))
    }

    pub async fn machine_denied(&self, object: Value) -> String {
        let name = object["metadata"]["name"].clone();
        match self.create_machine(object).await {
            Ok(m) => panic!("machine {name} admitted, expected a denial: {m:#}"),
            Err(message) => {
                println!("denied {name}: {message}");
                message
            }
        }
    }

    pub async fn get_machine(&self, name: &str) -> Value {
        to_value(machines(&self.client, &self.ns).get(name).await.unwrap())
    }

    pub async fn list(&self, ns: &str, kind: &str) -> Vec<Value> {
        let plural = match kind {
            "IPClaim" => "ipclaims",
            "IPAddress" => "ipaddresses",
            "IPPool" => "ippools",
            _ => panic!("{kind}"),
        };
        dynamic(&self.client, ns, "ipam.metal3.io", "v1alpha1", kind, plural)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(to_value)
            .collect()
    }

    pub async fn claim_names(&self, ns: &str) -> BTreeSet<String> {
        self.list(ns, "IPClaim")
            .await
            .iter()
            .map(|c| c["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub async fn address_names(&self, ns: &str) -> BTreeSet<String> {
        self.list(ns, "IPAddress")
            .await
            .iter()
            .map(|c| c["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn claim(&self, machine: &str, device: usize) -> String {
        format!("{}-{machine}-{device}", self.ns)
    }

    /// The DNS servers the machine's device received, wherever this CRD set puts them.
    pub fn dns(&self, m: &Value, device: usize) -> Value {
        match self.set {
            CrdSet::Current => m["spec"]["network"]["devices"][device]["nameservers"].clone(),
            CrdSet::Legacy => m["spec"]["network"]["nameservers"].clone(),
        }
    }

    pub async fn stop(self) {
        self.hook.stop().await;
    }
}

/// An ElfMachine as CAPI creates it, with `labels` added and no template annotation unless
/// `template` is given.
pub fn machine(name: &str, template: Option<&str>, labels: Value, devices: Value) -> Value {
    let mut m = capi_machine(name, template.unwrap_or(""), devices);
    if template.is_none() {
        m["metadata"].as_object_mut().unwrap().remove("annotations");
    }
    if let Some(extra) = labels.as_object() {
        for (k, v) in extra {
            m["metadata"]["labels"][k] = v.clone();
        }
    }
    m
}

pub fn ipv4() -> Value {
    json!([{"networkType": "IPV4", "vlan": "vlan-1"}])
}

pub fn ip(m: &Value, device: usize) -> String {
    m["spec"]["network"]["devices"][device]["ipAddrs"][0]
        .as_str()
        .unwrap_or_else(|| panic!("device {device} has no address: {m:#}"))
        .to_string()
}

fn assert_contains(message: &str, parts: &[&str]) {
    for p in parts {
        assert!(
            message.contains(p),
            "denial should mention {p:?}:\n{message}"
        );
    }
}

fn pool_label(name: &str) -> Value {
    json!({"cluster.x-k8s.io/ip-pool-name": name})
}

// ---------------------------------------------------------------------------------------------
// Pool selection
// ---------------------------------------------------------------------------------------------

/// Rule 1: `addressesFromPools[0]` naming a metal3 IPPool wins over the labels; other kinds
/// are ignored; the name is looked up in the machine's namespace, then `default`. On CAPE
/// v0.3.6 the field does not exist: the apiserver prunes it and the labels decide.
pub async fn rule1_device_pool_reference(set: CrdSet) {
    let e = env(set, "rule1", WebhookOptions::default()).await;
    let spec = |third: u8| {
        json!({"namePrefix": format!("p{third}"), "prefix": 24,
               "pools": [{"start": format!("10.1.{third}.10"), "end": format!("10.1.{third}.20")}]})
    };
    e.pool("by-label", spec(1), json!({})).await;
    e.pool("by-ref", spec(2), json!({})).await;
    let in_default = format!("rule1-{}", e.ns);
    e.pool_in("default", &in_default, spec(3), json!({})).await;

    let with_ref = |name: &str, reference: Value| {
        machine(
            name,
            None,
            pool_label("by-label"),
            json!([{"networkType": "IPV4", "addressesFromPools": [reference]}]),
        )
    };
    let metal3 = e
        .machine_ok(with_ref(
            "metal3",
            json!({"apiGroup": "ipam.metal3.io", "kind": "IPPool", "name": "by-ref"}),
        ))
        .await;
    let bare = e
        .machine_ok(with_ref(
            "bare",
            json!({"apiGroup": "", "kind": "", "name": "by-ref"}),
        ))
        .await;
    let other = e
        .machine_ok(with_ref(
            "other-kind",
            json!({"apiGroup": "ipam.cluster.x-k8s.io", "kind": "InClusterIPPool", "name": "by-ref"}),
        ))
        .await;
    let fallback = e
        .machine_ok(with_ref(
            "in-default",
            json!({"apiGroup": "ipam.metal3.io", "kind": "IPPool", "name": in_default}),
        ))
        .await;
    match set {
        CrdSet::Current => {
            assert_eq!(ip(&metal3, 0), "10.1.2.10");
            assert_eq!(ip(&bare, 0), "10.1.2.11");
            assert_eq!(ip(&other, 0), "10.1.1.10", "other kinds are ignored");
            assert_eq!(ip(&fallback, 0), "10.1.3.10", "then namespace default");
            let claims = e.list("default", "IPClaim").await;
            let claim = claims
                .iter()
                .find(|c| c["metadata"]["name"] == e.claim("in-default", 0))
                .expect("the claim lives in the pool's namespace");
            assert_eq!(claim["spec"]["pool"]["name"], in_default.as_str());
            assert_eq!(claim["spec"]["pool"]["namespace"], "default");
            // A reference that exists nowhere is a denial naming both namespaces searched.
            let msg = e
                .machine_denied(with_ref(
                    "missing-ref",
                    json!({"apiGroup": "ipam.metal3.io", "kind": "IPPool", "name": "nope"}),
                ))
                .await;
            assert_contains(&msg, &["nope", "addressesFromPools", &e.ns, "default"]);
        }
        CrdSet::Legacy => {
            // Pruned: every machine falls through to the label.
            for (m, want) in [
                (&metal3, "10.1.1.10"),
                (&bare, "10.1.1.11"),
                (&other, "10.1.1.12"),
                (&fallback, "10.1.1.13"),
            ] {
                assert_eq!(ip(m, 0), want);
                assert!(
                    m["spec"]["network"]["devices"][0]
                        .get("addressesFromPools")
                        .is_none()
                );
            }
        }
    }
    e.stop().await;
}

/// Rule 2: `ip-pool-name` (+ `ip-pool-namespace`) on the machine, else on its template; a
/// machine's label wins; the pool is looked for in the given namespace (default: the
/// machine's), then `default`.
pub async fn rule2_pool_name_labels(set: CrdSet) {
    let e = env(set, "rule2", WebhookOptions::default()).await;
    let other_ns = temp_namespace(&e.client, "rule2-other").await;
    let spec = |third: u8| {
        json!({"namePrefix": format!("p{third}"), "prefix": 24, "gateway": format!("10.2.{third}.1"),
               "pools": [{"start": format!("10.2.{third}.10"), "end": format!("10.2.{third}.20")}]})
    };
    e.pool("on-machine", spec(1), json!({})).await;
    e.pool("on-template", spec(2), json!({})).await;
    e.pool_in(&other_ns, "elsewhere", spec(3), json!({})).await;
    let in_default = format!("rule2-{}", e.ns);
    e.pool_in("default", &in_default, spec(4), json!({})).await;
    e.template("tpl", pool_label("on-template")).await;

    let m = e
        .machine_ok(machine(
            "label-wins",
            Some("tpl"),
            pool_label("on-machine"),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.2.1.10");
    let m = e
        .machine_ok(machine("from-template", Some("tpl"), json!({}), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.2.2.10");
    assert_eq!(
        m["spec"]["network"]["devices"][0]["routes"],
        json!([{"gateway": "10.2.2.1"}])
    );
    let m = e
        .machine_ok(machine(
            "other-ns",
            None,
            json!({"cluster.x-k8s.io/ip-pool-name": "elsewhere",
                   "cluster.x-k8s.io/ip-pool-namespace": other_ns}),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.2.3.10");
    assert!(
        e.claim_names(&other_ns)
            .await
            .contains(&e.claim("other-ns", 0)),
        "the claim is in the pool's namespace"
    );
    let m = e
        .machine_ok(machine("to-default", None, pool_label(&in_default), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.2.4.10");
    // ip-pool-namespace names a namespace without that pool: then `default`.
    let m = e
        .machine_ok(machine(
            "ns-then-default",
            None,
            json!({"cluster.x-k8s.io/ip-pool-name": in_default,
                   "cluster.x-k8s.io/ip-pool-namespace": other_ns}),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.2.4.11");
    // An empty label on the machine counts as unset: the template's label applies.
    let m = e
        .machine_ok(machine(
            "empty-label",
            Some("tpl"),
            json!({"cluster.x-k8s.io/ip-pool-name": ""}),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.2.2.11");

    let msg = e
        .machine_denied(machine("missing", None, pool_label("nope-pool"), ipv4()))
        .await;
    assert_contains(
        &msg,
        &[
            "nope-pool",
            "cluster.x-k8s.io/ip-pool-name",
            &e.ns,
            "default",
        ],
    );
    // The template names a pool that is missing: the denial says it was the template's label.
    e.template("tpl-missing", pool_label("gone-pool")).await;
    let msg = e
        .machine_denied(machine("via-tpl", Some("tpl-missing"), json!({}), ipv4()))
        .await;
    assert_contains(&msg, &["gone-pool", "ElfMachineTemplate"]);
    e.stop().await;
}

/// Rule 3: `ip-pool-group` / `network-name` matched against pool labels, candidates in name
/// order; a full pool overflows to the next.
pub async fn rule3_group_and_network_labels(set: CrdSet) {
    let e = env(set, "rule3", WebhookOptions::default()).await;
    let other_ns = temp_namespace(&e.client, "rule3-other").await;
    let one = |third: u8, last: u8| {
        json!({"namePrefix": format!("g{third}-{last}"), "prefix": 24,
               "pools": [{"start": format!("10.3.{third}.{last}"), "end": format!("10.3.{third}.{last}")}]})
    };
    let group = json!({"cluster.x-k8s.io/ip-pool-group": "g1"});
    // Created out of order: name order decides, not creation order.
    e.pool("b-pool", one(1, 20), group.clone()).await;
    e.pool("a-pool", one(1, 10), group.clone()).await;
    e.pool(
        "net-pool",
        one(2, 10),
        json!({"cluster.x-k8s.io/network-name": "net-a"}),
    )
    .await;
    e.pool(
        "both",
        one(3, 10),
        json!({"cluster.x-k8s.io/network-name": "net-b", "cluster.x-k8s.io/ip-pool-group": "g2"}),
    )
    .await;
    e.pool(
        "wrong-net",
        one(3, 20),
        json!({"cluster.x-k8s.io/network-name": "net-c", "cluster.x-k8s.io/ip-pool-group": "g2"}),
    )
    .await;
    e.pool_in(
        &other_ns,
        "remote",
        one(4, 10),
        json!({"cluster.x-k8s.io/ip-pool-group": "g3"}),
    )
    .await;
    e.template("tpl-group", group.clone()).await;

    let first = e
        .machine_ok(machine("first", None, group.clone(), ipv4()))
        .await;
    assert_eq!(ip(&first, 0), "10.3.1.10", "a-pool first (name order)");
    let second = e
        .machine_ok(machine("second", Some("tpl-group"), json!({}), ipv4()))
        .await;
    assert_eq!(
        ip(&second, 0),
        "10.3.1.20",
        "a-pool is full: overflow to b-pool"
    );
    let msg = e
        .machine_denied(machine("third", None, group.clone(), ipv4()))
        .await;
    assert_contains(&msg, &["no free address", "a-pool", "b-pool"]);

    let m = e
        .machine_ok(machine(
            "net",
            None,
            json!({"cluster.x-k8s.io/network-name": "net-a"}),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.3.2.10");
    let m = e
        .machine_ok(machine(
            "both",
            None,
            json!({"cluster.x-k8s.io/network-name": "net-b", "cluster.x-k8s.io/ip-pool-group": "g2"}),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.3.3.10", "both labels must match");
    let m = e
        .machine_ok(machine(
            "remote",
            None,
            json!({"cluster.x-k8s.io/ip-pool-group": "g3", "cluster.x-k8s.io/ip-pool-namespace": other_ns}),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.3.4.10");

    let msg = e
        .machine_denied(machine(
            "no-group",
            None,
            json!({"cluster.x-k8s.io/ip-pool-group": "nothing-here"}),
            ipv4(),
        ))
        .await;
    assert_contains(
        &msg,
        &[
            "cluster.x-k8s.io/ip-pool-group=nothing-here",
            &e.ns,
            "cape-system",
            "default",
        ],
    );
    e.stop().await;
}

/// Rule 4: default pools by either label, in the machine's namespace, then the configured
/// default namespace, then `default`; group/network labels narrow; name order + overflow.
pub async fn rule4_default_pools(set: CrdSet) {
    let defaults_ns = temp_namespace(&shared(set).client().await, "rule4-defaults").await;
    let e = env(
        set,
        "rule4",
        WebhookOptions {
            default_pool_namespace: defaults_ns.clone(),
            ..Default::default()
        },
    )
    .await;
    let one = |third: u8, last: u8| {
        json!({"namePrefix": format!("d{third}-{last}"), "prefix": 24,
               "pools": [{"start": format!("10.4.{third}.{last}"), "end": format!("10.4.{third}.{last}")}]})
    };
    {
        // No default pool anywhere yet: the denial names the configured namespace in its
        // place between the machine's namespace and `default`.
        let _default = DEFAULT_NAMESPACE.lock().await;
        let msg = e
            .machine_denied(machine("too-early", None, json!({}), ipv4()))
            .await;
        let order = format!("{}, {defaults_ns}, default", e.ns);
        assert_contains(&msg, &[&order]);
        assert!(!msg.contains("cape-system"), "{msg}");
    }
    // In the configured default namespace: a group-labelled default pool, a plain one.
    e.pool_in(
        &defaults_ns,
        "cfg-grouped",
        one(1, 10),
        json!({"ippool.cluster.x-k8s.io/is-default": "true", "cluster.x-k8s.io/ip-pool-group": "gx"}),
    )
    .await;
    e.pool_in(
        &defaults_ns,
        "cfg-plain",
        one(1, 20),
        json!({"cluster.x-k8s.io/ip-pool-default": ""}),
    )
    .await;
    // Not a default pool: is-default must be "true".
    e.pool(
        "not-default",
        one(2, 5),
        json!({"ippool.cluster.x-k8s.io/is-default": "false"}),
    )
    .await;

    let m = e
        .machine_ok(machine("plain-1", None, json!({}), ipv4()))
        .await;
    assert_eq!(
        ip(&m, 0),
        "10.4.1.10",
        "name order in the configured namespace"
    );
    let m = e
        .machine_ok(machine("plain-2", None, json!({}), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.4.1.20", "overflow to the next default pool");

    // Now two default pools in the machine's namespace: they come first.
    e.pool(
        "ns-b",
        one(3, 20),
        json!({"ippool.cluster.x-k8s.io/is-default": "true"}),
    )
    .await;
    e.pool(
        "ns-a",
        one(3, 10),
        json!({"cluster.x-k8s.io/ip-pool-default": "yes"}),
    )
    .await;
    e.pool(
        "ns-grouped",
        one(3, 30),
        json!({"cluster.x-k8s.io/ip-pool-default": "", "cluster.x-k8s.io/network-name": "net-z"}),
    )
    .await;
    let m = e
        .machine_ok(machine("local-1", None, json!({}), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.4.3.10");
    let m = e
        .machine_ok(machine("local-2", None, json!({}), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.4.3.20");
    // Narrowed by network-name: a default pool with that label (rule 3 finds it in the
    // machine's namespace as well, since it carries the label).
    let m = e
        .machine_ok(machine(
            "narrowed-net",
            None,
            json!({"cluster.x-k8s.io/network-name": "net-z"}),
            ipv4(),
        ))
        .await;
    assert_eq!(ip(&m, 0), "10.4.3.30");
    // Narrowed by group: only the configured namespace's grouped default pool (full now)...
    let msg = e
        .machine_denied(machine(
            "narrowed-group",
            None,
            json!({"cluster.x-k8s.io/ip-pool-group": "gx"}),
            ipv4(),
        ))
        .await;
    assert_contains(&msg, &["no free address", "cfg-grouped"]);
    e.stop().await;
}

/// Rule 4's last namespace, `default`, and the denial when there is no pool at all. Both
/// touch the `default` namespace that every test shares, so they hold a lock.
pub async fn rule4_default_namespace_and_no_pool(set: CrdSet) {
    let _guard = DEFAULT_NAMESPACE.lock().await;
    let e = env(set, "rule4-default", WebhookOptions::default()).await;
    let msg = e
        .machine_denied(machine("nothing", None, json!({}), ipv4()))
        .await;
    assert_contains(
        &msg,
        &[
            "no IPPool found",
            "addressesFromPools",
            "cluster.x-k8s.io/ip-pool-name",
            "cluster.x-k8s.io/ip-pool-group",
            "cluster.x-k8s.io/network-name",
            "cluster.x-k8s.io/ip-pool-default",
            "ippool.cluster.x-k8s.io/is-default",
            &e.ns,
            "cape-system",
            "default",
            "nothing",
        ],
    );
    assert!(e.claim_names(&e.ns).await.is_empty());

    let name = format!("last-resort-{}", e.ns);
    e.pool_in(
        "default",
        &name,
        json!({"namePrefix": name, "prefix": 24, "pools": [{"start": "10.5.0.10", "end": "10.5.0.20"}]}),
        json!({"cluster.x-k8s.io/ip-pool-default": ""}),
    )
    .await;
    let m = e
        .machine_ok(machine("from-default", None, json!({}), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.5.0.10");
    assert!(
        e.claim_names("default")
            .await
            .contains(&e.claim("from-default", 0))
    );
    dynamic(
        &e.client,
        "default",
        "ipam.metal3.io",
        "v1alpha1",
        "IPPool",
        "ippools",
    )
    .delete(&name, &DeleteParams::default())
    .await
    .unwrap();
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

/// `start`/`end`, `subnet` only (first = network + 1), `start` + `subnet`; a range's own
/// prefix/gateway/dnsServers win over the pool's; prefix from the subnet's length.
pub async fn range_forms_and_overrides(set: CrdSet) {
    let e = env(set, "ranges", WebhookOptions::default()).await;
    e.pool(
        "forms",
        json!({
            "namePrefix": "forms", "prefix": 16, "gateway": "10.6.0.1", "dnsServers": ["10.6.0.2"],
            "pools": [
                {"start": "10.6.1.10", "end": "10.6.1.10"},
                {"subnet": "10.7.0.0/30"},
                {"start": "10.8.0.253", "subnet": "10.8.0.0/24", "prefix": 24,
                 "gateway": "10.8.0.1", "dnsServers": ["10.8.0.2", "10.8.0.3"]}
            ]
        }),
        json!({}),
    )
    .await;
    let label = pool_label("forms");
    let mut got = Vec::new();
    for i in 0..6 {
        got.push(
            e.machine_ok(machine(&format!("m{i}"), None, label.clone(), ipv4()))
                .await,
        );
    }
    let ips: Vec<String> = got.iter().map(|m| ip(m, 0)).collect();
    // Ranges in declaration order. The subnet-only range 10.7.0.0/30 starts at network + 1
    // and, having no prefix of its own, takes the pool's /16: .3 is not a broadcast there.
    // The start+subnet range ends at the /24's broadcast, which is never given.
    assert_eq!(
        ips,
        [
            "10.6.1.10",
            "10.7.0.1",
            "10.7.0.2",
            "10.7.0.3",
            "10.8.0.253",
            "10.8.0.254"
        ],
    );
    let msg = e
        .machine_denied(machine("m6", None, label.clone(), ipv4()))
        .await;
    assert_contains(&msg, &["no free address", "forms"]);
    let dev = |i: usize| &got[i]["spec"]["network"]["devices"][0];
    assert_eq!(dev(0)["netmask"], "255.255.0.0", "pool prefix");
    assert_eq!(dev(0)["routes"], json!([{"gateway": "10.6.0.1"}]));
    assert_eq!(e.dns(&got[0], 0), json!(["10.6.0.2"]));
    assert_eq!(dev(1)["netmask"], "255.255.0.0");
    assert_eq!(dev(4)["netmask"], "255.255.255.0", "range prefix wins");
    assert_eq!(
        dev(4)["routes"],
        json!([{"gateway": "10.8.0.1"}]),
        "range gateway wins"
    );
    match set {
        CrdSet::Current => assert_eq!(e.dns(&got[4], 0), json!(["10.8.0.2", "10.8.0.3"])),
        CrdSet::Legacy => assert_eq!(
            e.dns(&got[4], 0),
            json!(["10.8.0.2", "10.8.0.3"]),
            "spec.network.nameservers of machine m4 (starts empty)"
        ),
    }

    // A subnet-only pool without any prefix: the subnet's length is the prefix.
    e.pool(
        "subnet-prefix",
        json!({"namePrefix": "sp", "pools": [{"subnet": "10.9.4.0/22"}]}),
        json!({}),
    )
    .await;
    let m = e
        .machine_ok(machine("sp", None, pool_label("subnet-prefix"), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.9.4.1");
    assert_eq!(
        m["spec"]["network"]["devices"][0]["netmask"],
        "255.255.252.0"
    );
    assert!(m["spec"]["network"]["devices"][0].get("routes").is_none());
    e.stop().await;
}

/// Never the gateway, the network or the broadcast address of the prefix.
pub async fn never_gateway_network_or_broadcast(set: CrdSet) {
    let e = env(set, "gwnet", WebhookOptions::default()).await;
    e.pool(
        "tiny",
        json!({"namePrefix": "tiny", "gateway": "10.10.0.1",
               "pools": [{"start": "10.10.0.0", "end": "10.10.0.3", "prefix": 30}]}),
        json!({}),
    )
    .await;
    let m = e
        .machine_ok(machine("only", None, pool_label("tiny"), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.10.0.2");
    let msg = e
        .machine_denied(machine("none-left", None, pool_label("tiny"), ipv4()))
        .await;
    assert_contains(&msg, &["no free address", "tiny", "none-left"]);
    assert_eq!(e.address_names(&e.ns).await.len(), 1);
    // /31 and /32 have no network or broadcast address: every address is usable.
    e.pool(
        "p2p",
        json!({"namePrefix": "p2p",
               "pools": [{"start": "10.10.1.4", "end": "10.10.1.5", "prefix": 31},
                         {"start": "10.10.2.7", "end": "10.10.2.7", "prefix": 32}]}),
        json!({}),
    )
    .await;
    let mut got = Vec::new();
    for i in 0..3 {
        let m = e
            .machine_ok(machine(
                &format!("p2p-{i}"),
                None,
                pool_label("p2p"),
                ipv4(),
            ))
            .await;
        got.push((
            ip(&m, 0),
            m["spec"]["network"]["devices"][0]["netmask"].clone(),
        ));
    }
    assert_eq!(
        got,
        [
            ("10.10.1.4".to_string(), json!("255.255.255.254")),
            ("10.10.1.5".to_string(), json!("255.255.255.254")),
            ("10.10.2.7".to_string(), json!("255.255.255.255")),
        ]
    );
    e.stop().await;
}

/// `preAllocations[claim]` is honoured and never given to another claim.
pub async fn pre_allocations(set: CrdSet) {
    let e = env(set, "prealloc", WebhookOptions::default()).await;
    e.pool(
        "pre",
        json!({"namePrefix": "pre", "prefix": 24,
               "pools": [{"start": "10.11.0.10", "end": "10.11.0.12"}],
               "preAllocations": {format!("{}-pinned-0", e.ns): "10.11.0.10"}}),
        json!({}),
    )
    .await;
    let a = e
        .machine_ok(machine("a", None, pool_label("pre"), ipv4()))
        .await;
    let b = e
        .machine_ok(machine("b", None, pool_label("pre"), ipv4()))
        .await;
    assert_eq!(ip(&a, 0), "10.11.0.11", "the pre-allocated .10 is skipped");
    assert_eq!(ip(&b, 0), "10.11.0.12");
    let msg = e
        .machine_denied(machine("c", None, pool_label("pre"), ipv4()))
        .await;
    assert_contains(&msg, &["no free address"]);
    let pinned = e
        .machine_ok(machine("pinned", None, pool_label("pre"), ipv4()))
        .await;
    assert_eq!(ip(&pinned, 0), "10.11.0.10");
    assert!(e.address_names(&e.ns).await.contains("pre-10-11-0-10"));

    // A pre-allocation outside every range makes the pool invalid (stricter than metal3): a
    // denial naming the pool and the field.
    e.pool(
        "pre-outside",
        json!({"namePrefix": "preo", "prefix": 24,
               "pools": [{"start": "10.11.1.10", "end": "10.11.1.12"}],
               "preAllocations": {format!("{}-outside-0", e.ns): "10.11.0.200"}}),
        json!({}),
    )
    .await;
    let msg = e
        .machine_denied(machine("outside", None, pool_label("pre-outside"), ipv4()))
        .await;
    assert_contains(
        &msg,
        &[
            &format!("{}/pre-outside", e.ns),
            &format!("spec.preAllocations[{}-outside-0]", e.ns),
        ],
    );
    e.stop().await;
}

/// metal3 v1.13.2 and v1.1.3 have no `allocationStrategy` in their IPPool schema: the
/// apiserver prunes it, so allocation stays sequential. (Random allocation is covered by the
/// allocator's unit and property tests in src/ipam/allocate.rs.)
pub async fn allocation_strategy_is_pruned_by_these_crds(set: CrdSet) {
    let e = env(set, "strategy", WebhookOptions::default()).await;
    e.pool(
        "rnd",
        json!({"namePrefix": "rnd", "prefix": 24, "allocationStrategy": "random",
               "pools": [{"start": "10.12.0.10", "end": "10.12.0.250"}]}),
        json!({}),
    )
    .await;
    let stored = to_value(
        dynamic(
            &e.client,
            &e.ns,
            "ipam.metal3.io",
            "v1alpha1",
            "IPPool",
            "ippools",
        )
        .get("rnd")
        .await
        .unwrap(),
    );
    assert!(
        stored["spec"].get("allocationStrategy").is_none(),
        "this CRD set now keeps allocationStrategy: test random on the control plane: {stored:#}"
    );
    for (i, want) in ["10.12.0.10", "10.12.0.11", "10.12.0.12"]
        .iter()
        .enumerate()
    {
        let m = e
            .machine_ok(machine(&format!("s{i}"), None, pool_label("rnd"), ipv4()))
            .await;
        assert_eq!(ip(&m, 0), *want);
    }
    e.stop().await;
}

/// Invalid pools are denials that name the pool and the field. Pools the apiserver itself
/// rejects (its schema) cannot exist and are reported as such.
pub async fn invalid_pools(set: CrdSet) {
    let e = env(set, "invalid", WebhookOptions::default()).await;
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "malformed",
            json!({"namePrefix": "x", "prefix": 24, "pools": [{"start": "10.13.0.x", "end": "10.13.0.20"}]}),
            vec!["spec.pools[0].start", "10.13.0.x"],
        ),
        (
            "backwards",
            json!({"namePrefix": "x", "prefix": 24, "pools": [{"start": "10.13.0.20", "end": "10.13.0.10"}]}),
            vec!["spec.pools[0]", "start 10.13.0.20 is after end 10.13.0.10"],
        ),
        (
            "outside",
            json!({"namePrefix": "x", "pools": [{"start": "10.13.1.10", "end": "10.13.1.20", "subnet": "10.13.0.0/24"}]}),
            vec!["spec.pools[0].start", "outside subnet 10.13.0.0/24"],
        ),
        (
            "no-prefix",
            json!({"namePrefix": "x", "pools": [{"start": "10.13.0.10", "end": "10.13.0.20"}]}),
            vec!["spec.pools[0]", "prefix"],
        ),
        (
            "ipv6",
            json!({"namePrefix": "x", "prefix": 64, "pools": [{"start": "fd00::10", "end": "fd00::20"}]}),
            vec!["spec.pools[0].start", "IPv6"],
        ),
        (
            "empty",
            json!({"namePrefix": "x", "pools": []}),
            vec!["spec.pools is empty"],
        ),
        (
            "bad-gateway",
            json!({"namePrefix": "x", "prefix": 24, "gateway": "10.13.0.300", "pools": [{"start": "10.13.0.10", "end": "10.13.0.20"}]}),
            vec!["gateway", "10.13.0.300"],
        ),
    ];
    for (name, spec, parts) in cases {
        let created = create(&e.client, &e.ns, pool(name, spec, json!({}))).await;
        if let Err(err) = created {
            println!("IPPool {name}: rejected by the {set:?} schema itself: {err}");
            continue;
        }
        e.wait_for_pool(&e.ns, name).await;
        let msg = e
            .machine_denied(machine(
                &format!("on-{name}"),
                None,
                pool_label(name),
                ipv4(),
            ))
            .await;
        let key = format!("{}/{name}", e.ns);
        let mut want = vec![key.as_str()];
        want.extend(parts);
        assert_contains(&msg, &want);
    }
    assert!(e.claim_names(&e.ns).await.is_empty());
    assert!(e.address_names(&e.ns).await.is_empty());
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Shapes of machines
// ---------------------------------------------------------------------------------------------

/// Several IPV4 devices: claims `-0`, `-1`, different addresses from one pool; DHCP/NONE
/// devices in between are untouched and take no claim.
pub async fn several_devices(set: CrdSet) {
    let e = env(set, "devices", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "gateway": "10.14.0.1", "dnsServers": ["10.14.0.2"],
               "pools": [{"start": "10.14.0.10", "end": "10.14.0.20"}]}),
        json!({}),
    )
    .await;
    let devices = json!([
        {"networkType": "IPV4", "vlan": "a"},
        {"networkType": "IPV4_DHCP", "vlan": "b"},
        {"networkType": "IPV4", "vlan": "c",
         "routes": [{"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.14.0.9"}]},
        {"networkType": "NONE", "vlan": "d"}
    ]);
    let m = e
        .machine_ok(machine("multi", None, pool_label("p"), devices.clone()))
        .await;
    let d = &m["spec"]["network"]["devices"];
    assert_eq!(ip(&m, 0), "10.14.0.10");
    assert_eq!(ip(&m, 2), "10.14.0.11");
    assert_eq!(d[1], devices[1]);
    assert_eq!(d[3], devices[3]);
    assert_eq!(
        d[2]["routes"],
        json!([{"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.14.0.9"},
               {"gateway": "10.14.0.1"}]),
        "other routes of the device are kept"
    );
    assert_eq!(
        e.claim_names(&e.ns).await,
        BTreeSet::from([e.claim("multi", 0), e.claim("multi", 2)])
    );
    assert_eq!(m["metadata"]["finalizers"], json!([FINALIZER]));
    e.stop().await;
}

/// All or nothing: device 1 cannot get an address, so the create is denied and device 0's
/// claim and address are removed again.
pub async fn all_or_nothing(set: CrdSet) {
    let e = env(set, "allornothing", WebhookOptions::default()).await;
    e.pool(
        "one",
        json!({"namePrefix": "one", "prefix": 24, "pools": [{"start": "10.15.0.10", "end": "10.15.0.10"}]}),
        json!({}),
    )
    .await;
    let two = json!([{"networkType": "IPV4"}, {"networkType": "IPV4"}]);
    let msg = e
        .machine_denied(machine("greedy", None, pool_label("one"), two))
        .await;
    assert_contains(&msg, &["greedy", "device 1", "no free address", "one"]);
    assert!(
        e.claim_names(&e.ns).await.is_empty(),
        "device 0's claim is given back"
    );
    assert!(
        e.address_names(&e.ns).await.is_empty(),
        "device 0's address is given back"
    );
    assert!(
        machines(&e.client, &e.ns)
            .get_opt("greedy")
            .await
            .unwrap()
            .is_none()
    );
    // ...and the address is free again for the next machine.
    let m = e
        .machine_ok(machine("modest", None, pool_label("one"), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.15.0.10");

    if set == CrdSet::Current {
        // Devices from different pools (addressesFromPools): device 1's pool is full (the
        // machine above holds its only address); device 0's pool has room.
        e.pool(
            "roomy",
            json!({"namePrefix": "roomy", "prefix": 24, "pools": [{"start": "10.15.1.10", "end": "10.15.1.20"}]}),
            json!({}),
        )
        .await;
        let devices = json!([
            {"networkType": "IPV4"},
            {"networkType": "IPV4", "addressesFromPools": [{"apiGroup": "ipam.metal3.io", "kind": "IPPool", "name": "one"}]}
        ]);
        let msg = e
            .machine_denied(machine("split", None, pool_label("roomy"), devices))
            .await;
        assert_contains(&msg, &["split", "device 1", "no free address", "one"]);
        assert_eq!(
            e.claim_names(&e.ns).await,
            BTreeSet::from([e.claim("modest", 0)]),
            "device 0's claim in roomy is given back"
        );
        assert_eq!(
            e.address_names(&e.ns).await,
            BTreeSet::from(["one-10-15-0-10".to_string()]),
            "device 0's address in roomy is given back"
        );
        let m = e
            .machine_ok(machine("after", None, pool_label("roomy"), ipv4()))
            .await;
        assert_eq!(
            ip(&m, 0),
            "10.15.1.10",
            "roomy's first address is free again"
        );
    }
    e.stop().await;
}

/// A machine that already has its addresses (clusterctl move, restore) is untouched: no
/// claim, no finalizer; a device beside it that needs one still gets one.
pub async fn existing_addresses_untouched(set: CrdSet) {
    let e = env(set, "existing", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "gateway": "10.16.0.1",
               "pools": [{"start": "10.16.0.10", "end": "10.16.0.20"}]}),
        json!({}),
    )
    .await;
    let have = json!({"networkType": "IPV4", "ipAddrs": ["10.16.0.99"], "netmask": "255.255.255.0",
                      "routes": [{"gateway": "10.16.0.1"}]});
    let m = e
        .machine_ok(machine(
            "moved",
            None,
            pool_label("p"),
            json!([have.clone()]),
        ))
        .await;
    assert_eq!(m["spec"]["network"]["devices"][0], have);
    assert!(m["metadata"].get("finalizers").is_none());
    assert!(e.claim_names(&e.ns).await.is_empty());
    let m = e
        .machine_ok(machine(
            "half",
            None,
            pool_label("p"),
            json!([have.clone(), {"networkType": "IPV4"}]),
        ))
        .await;
    assert_eq!(m["spec"]["network"]["devices"][0], have);
    assert_eq!(ip(&m, 1), "10.16.0.10");
    assert_eq!(
        e.claim_names(&e.ns).await,
        BTreeSet::from([e.claim("half", 1)])
    );
    e.stop().await;
}

/// `generateName` without a name: the webhook names the machine so the claim can carry it.
pub async fn generate_name(set: CrdSet) {
    let e = env(set, "genname", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "pools": [{"start": "10.17.0.10", "end": "10.17.0.20"}]}),
        json!({}),
    )
    .await;
    let mut object = machine("x", None, pool_label("p"), ipv4());
    let meta = object["metadata"].as_object_mut().unwrap();
    meta.remove("name");
    meta.insert("generateName".into(), json!("worker-"));
    let m = e.machine_ok(object).await;
    let name = m["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        name.starts_with("worker-") && name.len() > "worker-".len(),
        "{name}"
    );
    assert_eq!(ip(&m, 0), "10.17.0.10");
    assert_eq!(
        e.claim_names(&e.ns).await,
        BTreeSet::from([e.claim(&name, 0)])
    );
    // The stored machine is that name.
    assert_eq!(ip(&e.get_machine(&name).await, 0), "10.17.0.10");
    e.stop().await;
}

/// Server-side dry run shows the address that would be chosen and writes nothing.
pub async fn dry_run(set: CrdSet) {
    let e = env(set, "dryrun", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "gateway": "10.18.0.1",
               "pools": [{"start": "10.18.0.10", "end": "10.18.0.20"}]}),
        json!({}),
    )
    .await;
    let object = machine(
        "dry",
        None,
        pool_label("p"),
        json!([{"networkType": "IPV4"}, {"networkType": "IPV4"}]),
    );
    let obj: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let shown = to_value(machines(&e.client, &e.ns).create(&pp, &obj).await.unwrap());
    assert_eq!(ip(&shown, 0), "10.18.0.10");
    assert_eq!(
        ip(&shown, 1),
        "10.18.0.11",
        "two devices, two different addresses"
    );
    assert_eq!(shown["metadata"]["finalizers"], json!([FINALIZER]));
    assert!(e.claim_names(&e.ns).await.is_empty());
    assert!(e.address_names(&e.ns).await.is_empty());
    assert!(
        machines(&e.client, &e.ns)
            .get_opt("dry")
            .await
            .unwrap()
            .is_none()
    );
    // The real create gets what the dry run showed.
    let real = e.machine_ok(object).await;
    assert_eq!(ip(&real, 0), "10.18.0.10");
    assert_eq!(ip(&real, 1), "10.18.0.11");
    e.stop().await;
}

/// UPDATE: a hot-added NIC gets an address; a wiped `ipAddrs` gets back the SAME address
/// from its claim, never a new one.
pub async fn update_hot_add_and_wiped(set: CrdSet) {
    let e = env(set, "update", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "gateway": "10.19.0.1",
               "pools": [{"start": "10.19.0.10", "end": "10.19.0.20"}]}),
        json!({}),
    )
    .await;
    let m = e
        .machine_ok(machine("upd", None, pool_label("p"), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.19.0.10");
    // Another machine takes .11 so that a "new" address would differ.
    e.machine_ok(machine("other", None, pool_label("p"), ipv4()))
        .await;

    let api = machines(&e.client, &e.ns);
    let mut devices = m["spec"]["network"]["devices"].clone();
    devices
        .as_array_mut()
        .unwrap()
        .push(json!({"networkType": "IPV4", "vlan": "hot"}));
    let patched = to_value(
        api.patch(
            "upd",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"network": {"devices": devices}}})),
        )
        .await
        .unwrap(),
    );
    assert_eq!(ip(&patched, 0), "10.19.0.10");
    assert_eq!(
        ip(&patched, 1),
        "10.19.0.12",
        "the hot-added NIC gets an address"
    );
    assert!(e.claim_names(&e.ns).await.contains(&e.claim("upd", 1)));

    // A re-apply of the template's devices wipes ipAddrs.
    let wiped =
        json!([{"networkType": "IPV4", "vlan": "vlan-1"}, {"networkType": "IPV4", "vlan": "hot"}]);
    let claims_before = e.claim_names(&e.ns).await;
    let addresses_before = e.address_names(&e.ns).await;
    let again = to_value(
        api.patch(
            "upd",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"network": {"devices": wiped}}})),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        ip(&again, 0),
        "10.19.0.10",
        "the same address, from the claim"
    );
    assert_eq!(ip(&again, 1), "10.19.0.12");
    assert_eq!(
        again["spec"]["network"]["devices"][0]["netmask"],
        "255.255.255.0"
    );
    assert_eq!(
        again["spec"]["network"]["devices"][0]["routes"],
        json!([{"gateway": "10.19.0.1"}])
    );
    assert_eq!(e.claim_names(&e.ns).await, claims_before);
    assert_eq!(e.address_names(&e.ns).await, addresses_before);
    e.stop().await;
}

/// A client of the admin user that counts every non-watch request it sends to IPAM objects,
/// ElfMachines and ElfMachineTemplates.
async fn counting_client(set: CrdSet) -> (kube::Client, Arc<AtomicUsize>) {
    let cp = shared(set);
    let kubeconfig = kube::config::Kubeconfig::read_from(cp.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let layer =
        tower::util::MapRequestLayer::new(move |req: axum::http::Request<kube::client::Body>| {
            let path = req.uri().path();
            let watch = req.uri().query().unwrap_or_default().contains("watch=");
            let interesting = ["ipclaims", "ipaddresses", "ippools", "elfmachine"]
                .iter()
                .any(|p| path.contains(p));
            if interesting && !watch {
                println!("webhook client: {} {}", req.method(), req.uri());
                counter.fetch_add(1, Ordering::SeqCst);
            }
            req
        });
    let client = kube::client::ClientBuilder::try_from(config)
        .unwrap()
        .with_layer(&layer)
        .build();
    (client, count)
}

/// Status-only and metadata-only updates cost no API call: the webhook's own client is
/// counted (every request but watches) while they happen.
pub async fn status_and_metadata_updates_cost_nothing(set: CrdSet) {
    let crd = CRD.read().await;
    let cp = shared(set);
    let admin = cp.client().await;
    let ns = temp_namespace(&admin, "nocall").await;
    let (counted, count) = counting_client(set).await;
    let hook = webhook::start(
        &counted,
        &ns,
        WebhookOptions {
            background: false,
            use_given_client: true,
            ..Default::default()
        },
    )
    .await;
    let e = Env {
        set,
        client: admin,
        ns,
        hook,
        _crd: crd,
    };
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "pools": [{"start": "10.20.0.10", "end": "10.20.0.20"}]}),
        json!({}),
    )
    .await;
    let before_create = count.load(Ordering::SeqCst);
    let m = e
        .machine_ok(machine("quiet", None, pool_label("p"), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.20.0.10");
    assert!(
        count.load(Ordering::SeqCst) > before_create,
        "the counter sees the webhook's writes (else this test proves nothing)"
    );
    // Let the watch relists and any trailing request settle, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = count.load(Ordering::SeqCst);
    let api = machines(&e.client, &e.ns);
    for i in 0..3 {
        api.patch(
            "quiet",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": format!("t{i}")},
                                              "annotations": {"note": format!("n{i}")}}})),
        )
        .await
        .unwrap();
        api.patch_status(
            "quiet",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ready": false, "failureMessage": format!("f{i}")}})),
        )
        .await
        .unwrap();
        // A spec change that does not touch the network either.
        api.patch(
            "quiet",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"numCPUS": 4 + i}})),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        count.load(Ordering::SeqCst),
        before,
        "metadata, status and non-network updates made API calls"
    );
    let stored = e.get_machine("quiet").await;
    assert_eq!(ip(&stored, 0), "10.20.0.10");
    assert_eq!(e.claim_names(&e.ns).await.len(), 1);
    e.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Raw AdmissionReviews
// ---------------------------------------------------------------------------------------------

/// An AdmissionReview as kube-apiserver sends it for an ElfMachine.
pub fn review(
    uid: &str,
    operation: &str,
    namespace: &str,
    object: &Value,
    old: Option<&Value>,
    dry_run: bool,
) -> Value {
    let gvk = json!({"group": "infrastructure.cluster.x-k8s.io", "version": "v1beta1", "kind": "ElfMachine"});
    let gvr = json!({"group": "infrastructure.cluster.x-k8s.io", "version": "v1beta1", "resource": "elfmachines"});
    let mut object = object.clone();
    object["metadata"]["namespace"] = json!(namespace);
    let options_kind = if operation == "CREATE" {
        "CreateOptions"
    } else {
        "UpdateOptions"
    };
    let mut options = json!({"kind": options_kind, "apiVersion": "meta.k8s.io/v1",
                             "fieldManager": "capi-machineset"});
    if dry_run {
        options["dryRun"] = json!(["All"]);
    }
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": object["metadata"]["name"].as_str().unwrap_or_default(),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {
                "username": "system:serviceaccount:capi-system:capi-manager",
                "uid": "5a3e9a59-2b14-4c3c-9b3f-7d0a0f4c1e21",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:capi-system", "system:authenticated"]
            },
            "object": object,
            "oldObject": old.cloned().unwrap_or(Value::Null),
            "dryRun": dry_run,
            "options": options
        }
    })
}

/// POSTs a body straight to the webhook over HTTPS; returns (status, body as JSON or text).
pub async fn post_raw(hook: &Webhook, body: Vec<u8>) -> (u16, Result<Value, String>) {
    // As the apiserver does: with its client certificate.
    let client = crate::common::webhook::https_client(
        &hook.ca_pem,
        crate::common::webhook::caller_identity(),
    );
    let url = format!("https://{}/mutate-elfmachine", hook.running.webhook_addr);
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the webhook answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).map_err(|_| text))
}

/// The JSON patch of a response (decoded from base64).
pub fn response_patch(answer: &Value) -> Option<json_patch::Patch> {
    let b64 = answer["response"]["patch"].as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// The same request delivered twice yields the same address and one claim; and everything
/// the patch writes survives the schema (the stored object equals the patched request).
pub async fn replayed_request_and_nothing_pruned(set: CrdSet) {
    let e = env(set, "replay", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "gateway": "10.21.0.1",
               "dnsServers": ["10.21.0.2", "10.21.0.3"],
               "pools": [{"start": "10.21.0.10", "end": "10.21.0.20"}]}),
        json!({}),
    )
    .await;
    let object = machine(
        "twice",
        None,
        pool_label("p"),
        json!([{"networkType": "IPV4", "vlan": "a",
                "routes": [{"network": "192.168.0.0", "netmask": "255.255.0.0", "gateway": "10.21.0.9"}]},
               {"networkType": "IPV4_DHCP"}]),
    );
    let body = review(
        "3c2e1f0a-aaaa-4bbb-8ccc-000000000001",
        "CREATE",
        &e.ns,
        &object,
        None,
        false,
    );
    let bytes = serde_json::to_vec(&body).unwrap();
    let (s1, a1) = post_raw(&e.hook, bytes.clone()).await;
    let (s2, a2) = post_raw(&e.hook, bytes).await;
    let (a1, a2) = (a1.unwrap(), a2.unwrap());
    assert_eq!((s1, s2), (200, 200));
    for a in [&a1, &a2] {
        assert_eq!(a["response"]["uid"], "3c2e1f0a-aaaa-4bbb-8ccc-000000000001");
        assert_eq!(a["response"]["allowed"], true, "{a:#}");
        assert_eq!(a["response"]["patchType"], "JSONPatch");
    }
    let sent = body["request"]["object"].clone();
    let mut p1 = sent.clone();
    json_patch::patch(&mut p1, &response_patch(&a1).unwrap()).unwrap();
    let mut p2 = sent.clone();
    json_patch::patch(&mut p2, &response_patch(&a2).unwrap()).unwrap();
    assert_eq!(ip(&p1, 0), "10.21.0.10");
    assert_eq!(
        p1["spec"], p2["spec"],
        "the same request twice: the same address"
    );
    assert_eq!(
        e.claim_names(&e.ns).await,
        BTreeSet::from([e.claim("twice", 0)])
    );
    assert_eq!(e.address_names(&e.ns).await.len(), 1);

    // Now the apiserver sends the same object for real: the webhook answers with the same
    // patch (the claim exists) and the stored object must hold every field it wrote.
    let stored = e.machine_ok(object).await;
    assert_eq!(e.claim_names(&e.ns).await.len(), 1);
    assert_eq!(
        stored["spec"]["network"], p1["spec"]["network"],
        "a field written by the webhook was pruned or changed by the {set:?} schema"
    );
    assert_eq!(
        stored["metadata"]["finalizers"],
        p1["metadata"]["finalizers"]
    );
    // And every path the patch touches exists in the stored object.
    for op in &response_patch(&a1).unwrap().0 {
        let path = op.path().to_string();
        let path = path.trim_end_matches("/-");
        assert!(
            stored.pointer(path).is_some(),
            "{path} was pruned: {stored:#}"
        );
    }
    // Nothing written to the IPAM objects is pruned either (metal3 v1.13.2 and v1.1.3).
    let claim = &e.list(&e.ns, "IPClaim").await[0];
    assert_eq!(claim["spec"]["pool"]["name"], "p");
    assert_eq!(claim["spec"]["pool"]["namespace"], e.ns.as_str());
    assert_eq!(claim["status"]["address"]["name"], "p-10-21-0-10");
    assert_eq!(
        claim["metadata"]["labels"]["cluster.x-k8s.io/ip-owner-name"],
        format!("{}-twice", e.ns)
    );
    let address = &e.list(&e.ns, "IPAddress").await[0];
    assert_eq!(
        address["spec"],
        json!({
            "address": "10.21.0.10", "prefix": 24, "gateway": "10.21.0.1",
            "dnsServers": ["10.21.0.2", "10.21.0.3"],
            "pool": address["spec"]["pool"].clone(),
            "claim": address["spec"]["claim"].clone()
        })
    );
    assert_eq!(address["spec"]["pool"]["name"], "p");
    assert_eq!(
        address["spec"]["claim"]["name"],
        e.claim("twice", 0).as_str()
    );
    // No ownerReference to the pool: the garbage collector would delete the address with a
    // deleted pool while the machine still carries it (the pool carries our finalizer).
    assert!(
        address["metadata"]["ownerReferences"].is_null(),
        "{:#}",
        address["metadata"]
    );
    e.stop().await;
}

/// CAPE v0.3.6 has no device `nameservers`: DNS servers are merged into
/// `spec.network.nameservers`, deduplicated, at most 3. (Current: per device.)
pub async fn dns_placement(set: CrdSet) {
    let e = env(set, "dns", WebhookOptions::default()).await;
    e.pool(
        "a",
        json!({"namePrefix": "a", "prefix": 24, "dnsServers": ["10.22.0.2", "8.8.8.8"],
               "pools": [{"start": "10.22.0.10", "end": "10.22.0.20"}]}),
        json!({}),
    )
    .await;
    e.pool(
        "b",
        json!({"namePrefix": "b", "prefix": 24, "dnsServers": ["10.23.0.2", "10.23.0.3"],
               "pools": [{"start": "10.23.0.10", "end": "10.23.0.20"}]}),
        json!({}),
    )
    .await;
    // Device 0 from pool a (label); device 1 from b (addressesFromPools on Current, a second
    // machine on Legacy).
    let mut object = machine("dns", None, pool_label("a"), ipv4());
    object["spec"]["network"]["nameservers"] = json!(["8.8.8.8"]);
    match set {
        CrdSet::Current => {
            object["spec"]["network"]["devices"] = json!([
                {"networkType": "IPV4"},
                {"networkType": "IPV4", "addressesFromPools": [{"apiGroup": "ipam.metal3.io", "kind": "IPPool", "name": "b"}]}
            ]);
            let m = e.machine_ok(object).await;
            let d = &m["spec"]["network"]["devices"];
            assert_eq!(d[0]["nameservers"], json!(["10.22.0.2", "8.8.8.8"]));
            assert_eq!(d[1]["nameservers"], json!(["10.23.0.2", "10.23.0.3"]));
            assert_eq!(m["spec"]["network"]["nameservers"], json!(["8.8.8.8"]));
        }
        CrdSet::Legacy => {
            let m = e.machine_ok(object).await;
            assert_eq!(
                m["spec"]["network"]["nameservers"],
                json!(["8.8.8.8", "10.22.0.2"]),
                "merged, deduplicated"
            );
            assert!(
                m["spec"]["network"]["devices"][0]
                    .get("nameservers")
                    .is_none()
            );
            // Two devices from pools a and b (a group of two pools, a full): capped at 3.
            e.pool(
                "c",
                json!({"namePrefix": "c", "prefix": 24, "dnsServers": ["10.24.0.2", "10.24.0.3", "10.24.0.4"],
                       "pools": [{"start": "10.24.0.10", "end": "10.24.0.20"}]}),
                json!({}),
            )
            .await;
            let mut object = machine(
                "dns-many",
                None,
                pool_label("c"),
                json!([{"networkType": "IPV4"}, {"networkType": "IPV4"}]),
            );
            object["spec"]["network"]["nameservers"] = json!(["10.24.0.3"]);
            let m = e.machine_ok(object).await;
            assert_eq!(
                m["spec"]["network"]["nameservers"],
                json!(["10.24.0.3", "10.24.0.2", "10.24.0.4"]),
                "deduplicated, at most 3"
            );
        }
    }
    e.stop().await;
}

/// A failed UPDATE (the hot-added NIC finds its pool full) is denied and gives back only
/// what it took: the claims the machine already had stay, with their addresses.
pub async fn update_failure_keeps_existing_claims(set: CrdSet) {
    let e = env(set, "updfail", WebhookOptions::default()).await;
    e.pool(
        "one",
        json!({"namePrefix": "one", "prefix": 24, "pools": [{"start": "10.26.0.10", "end": "10.26.0.10"}]}),
        json!({}),
    )
    .await;
    let m = e
        .machine_ok(machine("solo", None, pool_label("one"), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.26.0.10");
    let mut devices = m["spec"]["network"]["devices"].clone();
    devices
        .as_array_mut()
        .unwrap()
        .push(json!({"networkType": "IPV4", "vlan": "hot"}));
    let err = machines(&e.client, &e.ns)
        .patch(
            "solo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"network": {"devices": devices}}})),
        )
        .await
        .expect_err("the hot-add finds no address");
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_contains(&status.message, &["solo", "device 1", "no free address"]);
    assert_eq!(
        e.claim_names(&e.ns).await,
        BTreeSet::from([e.claim("solo", 0)])
    );
    assert_eq!(
        e.address_names(&e.ns).await,
        BTreeSet::from(["one-10-26-0-10".to_string()])
    );
    let stored = e.get_machine("solo").await;
    assert_eq!(
        stored["spec"]["network"]["devices"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(ip(&stored, 0), "10.26.0.10");
    e.stop().await;
}

/// An address written without its claim (a request interrupted between the two creates):
/// a dry run shows that address and writes nothing; the real create adopts it and writes
/// the claim.
pub async fn half_written_pair_dry_run_then_adopted(set: CrdSet) {
    let e = env(set, "halfpair", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "pools": [{"start": "10.25.0.10", "end": "10.25.0.20"}]}),
        json!({}),
    )
    .await;
    let claim = e.claim("half", 0);
    create(
        &e.client,
        &e.ns,
        json!({
            "apiVersion": "ipam.metal3.io/v1alpha1",
            "kind": "IPAddress",
            "metadata": {"name": "p-10-25-0-15"},
            "spec": {
                "address": "10.25.0.15", "prefix": 24,
                "pool": {"apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPPool", "name": "p", "namespace": e.ns},
                "claim": {"apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPClaim", "name": claim, "namespace": e.ns}
            }
        }),
    )
    .await
    .unwrap();
    let index = &e.hook.running.state.assigner.caches.index;
    for _ in 0..250 {
        if !index.addresses_of_claim(&e.ns, &claim).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let object = machine("half", None, pool_label("p"), ipv4());
    let obj: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let shown = to_value(machines(&e.client, &e.ns).create(&pp, &obj).await.unwrap());
    assert_eq!(ip(&shown, 0), "10.25.0.15");
    assert!(
        e.claim_names(&e.ns).await.is_empty(),
        "a dry run must not write the missing claim"
    );
    let real = e.machine_ok(object).await;
    assert_eq!(ip(&real, 0), "10.25.0.15");
    let claims = e.list(&e.ns, "IPClaim").await;
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0]["metadata"]["name"], claim.as_str());
    assert_eq!(claims[0]["status"]["address"]["name"], "p-10-25-0-15");
    e.stop().await;
}

/// The same review delivered twice at the same time (an apiserver retry racing the first
/// try): one address, one claim, both answers agree.
pub async fn concurrent_duplicate_requests(set: CrdSet) {
    let e = env(set, "dupe", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "pools": [{"start": "10.27.0.10", "end": "10.27.0.40"}]}),
        json!({}),
    )
    .await;
    for round in 0..5 {
        let name = format!("race-{round}");
        let object = machine(&name, None, pool_label("p"), ipv4());
        let body = review(
            &format!("uid-{round}"),
            "CREATE",
            &e.ns,
            &object,
            None,
            false,
        );
        let bytes = serde_json::to_vec(&body).unwrap();
        let (r1, r2) = tokio::join!(
            post_raw(&e.hook, bytes.clone()),
            post_raw(&e.hook, bytes.clone())
        );
        let mut ips = Vec::new();
        for (status, answer) in [r1, r2] {
            let answer = answer.unwrap();
            assert_eq!(status, 200);
            assert_eq!(answer["response"]["allowed"], true, "{answer:#}");
            let mut patched = body["request"]["object"].clone();
            json_patch::patch(&mut patched, &response_patch(&answer).unwrap()).unwrap();
            ips.push(ip(&patched, 0));
        }
        assert_eq!(ips[0], ips[1], "round {round}: two answers, two addresses");
        let of_claim: Vec<Value> = e
            .list(&e.ns, "IPAddress")
            .await
            .into_iter()
            .filter(|a| a["spec"]["claim"]["name"] == e.claim(&name, 0).as_str())
            .collect();
        assert_eq!(of_claim.len(), 1, "round {round}: {of_claim:#?}");
    }
    assert_eq!(e.claim_names(&e.ns).await.len(), 5);
    assert_eq!(e.address_names(&e.ns).await.len(), 5);
    e.stop().await;
}

/// Take-over from the Go controller (or metal3): a claim `<ns>-<machine>-<device>` that already
/// holds an address (no annotations of ours) is adopted: the machine gets that address and no
/// second claim or address is made.
pub async fn existing_claim_is_adopted(set: CrdSet) {
    let e = env(set, "adopt", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "gateway": "10.28.0.1",
               "pools": [{"start": "10.28.0.10", "end": "10.28.0.40"}]}),
        json!({}),
    )
    .await;
    let claim = e.claim("goctl", 0);
    let reference = |kind: &str, name: &str| json!({"apiVersion": "ipam.metal3.io/v1alpha1", "kind": kind, "name": name, "namespace": e.ns});
    create(
        &e.client,
        &e.ns,
        json!({"apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPClaim",
               "metadata": {"name": claim, "labels": {"cluster.x-k8s.io/ip-owner-name": format!("{}-goctl", e.ns)}},
               "spec": {"pool": reference("IPPool", "p")}}),
    )
    .await
    .unwrap();
    create(
        &e.client,
        &e.ns,
        json!({"apiVersion": "ipam.metal3.io/v1alpha1", "kind": "IPAddress",
               "metadata": {"name": "p-10-28-0-33"},
               "spec": {"address": "10.28.0.33", "prefix": 24, "gateway": "10.28.0.1",
                        "pool": reference("IPPool", "p"), "claim": reference("IPClaim", &claim)}}),
    )
    .await
    .unwrap();
    ipclaims(&e.client, &e.ns)
        .patch_status(
            &claim,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"address": reference("IPAddress", "p-10-28-0-33")}})),
        )
        .await
        .unwrap();
    for _ in 0..250 {
        if e.hook
            .running
            .state
            .assigner
            .caches
            .claims
            .get(&e.ns, &claim)
            .is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = e
        .machine_ok(machine("goctl", None, pool_label("p"), ipv4()))
        .await;
    assert_eq!(ip(&m, 0), "10.28.0.33");
    assert_eq!(
        m["spec"]["network"]["devices"][0]["routes"],
        json!([{"gateway": "10.28.0.1"}])
    );
    assert_eq!(e.claim_names(&e.ns).await, BTreeSet::from([claim]));
    assert_eq!(
        e.address_names(&e.ns).await,
        BTreeSet::from(["p-10-28-0-33".to_string()])
    );
    e.stop().await;
}

/// A machine created without devices gets its network later (CAPE >= 1.8 copies a failure
/// domain's network in): that UPDATE assigns the address and adds the finalizer.
pub async fn network_copied_in_later(set: CrdSet) {
    let e = env(set, "latenet", WebhookOptions::default()).await;
    e.pool(
        "p",
        json!({"namePrefix": "p", "prefix": 24, "pools": [{"start": "10.29.0.10", "end": "10.29.0.20"}]}),
        json!({}),
    )
    .await;
    let m = e
        .machine_ok(machine("bare", None, pool_label("p"), json!([])))
        .await;
    assert!(m["metadata"].get("finalizers").is_none());
    let updated = to_value(
        machines(&e.client, &e.ns)
            .patch(
                "bare",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"network": {"devices": [
                    {"networkType": "IPV4", "vlan": "fd-vlan"}
                ]}}})),
            )
            .await
            .unwrap(),
    );
    assert_eq!(ip(&updated, 0), "10.29.0.10");
    assert_eq!(updated["metadata"]["finalizers"], json!([FINALIZER]));
    assert_eq!(
        e.claim_names(&e.ns).await,
        BTreeSet::from([e.claim("bare", 0)])
    );
    e.stop().await;
}

/// DNS placement is learned from the ElfMachine CRD the apiserver serves, and follows it when
/// it changes: on CAPE v0.3.6 CRDs, adding a device-level `nameservers` to the schema (as
/// upgrading CAPE to >= 1.7.2 does) moves DNS servers to the device; removing it moves them
/// back. Runs alone (it changes the CRD every test of the binary uses).
pub async fn dns_placement_follows_crd_changes(set: CrdSet) {
    assert_eq!(
        set,
        CrdSet::Legacy,
        "starts from a CRD without device nameservers"
    );
    let _alone = CRD.write().await;
    let cp = shared(set);
    let client = cp.client().await;
    let ns = temp_namespace(&client, "crdswitch").await;
    let hook = webhook::start(&client, &ns, WebhookOptions::default()).await;
    let schema = hook.running.state.assigner.caches.schema.clone();
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(client.clone());
    let name = "elfmachines.infrastructure.cluster.x-k8s.io";
    let crd = serde_json::to_value(crds.get(name).await.unwrap()).unwrap();
    let version = crd["spec"]["versions"]
        .as_array()
        .unwrap()
        .iter()
        .position(|v| v["name"] == "v1beta1")
        .unwrap();
    let path = format!(
        "/spec/versions/{version}/schema/openAPIV3Schema/properties/spec/properties/network/properties/devices/items/properties/nameservers"
    );
    assert!(
        crd.pointer(&path).is_none(),
        "CAPE v0.3.6 has no device nameservers"
    );
    let create = |name: String| {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            to_value(
                webhook::create(&client, &ns, machine(&name, None, pool_label("p"), ipv4()))
                    .await
                    .unwrap(),
            )
        }
    };
    webhook::create(
        &client,
        &ns,
        pool(
            "p",
            json!({"namePrefix": "p", "prefix": 24, "dnsServers": ["10.31.0.2"],
                   "pools": [{"start": "10.31.0.10", "end": "10.31.0.200"}]}),
            json!({}),
        ),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = create("before".into()).await;
    assert_eq!(m["spec"]["network"]["nameservers"], json!(["10.31.0.2"]));

    let add = json!([{"op": "add", "path": path,
                      "value": {"type": "array", "items": {"type": "string"}}}]);
    crds.patch(
        name,
        &PatchParams::default(),
        &Patch::<Value>::Json(serde_json::from_value(add).unwrap()),
    )
    .await
    .unwrap();
    let mut moved = None;
    for i in 0..100 {
        if schema.device_nameservers() {
            // The apiserver may still serve the old schema for a moment (it would prune).
            let m = create(format!("after-{i}")).await;
            if m["spec"]["network"]["devices"][0]["nameservers"] == json!(["10.31.0.2"]) {
                moved = Some(m);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved =
        moved.expect("DNS servers never moved to the device after the CRD gained nameservers");
    assert_eq!(moved["spec"]["network"]["nameservers"], json!([]));

    let remove = json!([{"op": "remove", "path": path}]);
    crds.patch(
        name,
        &PatchParams::default(),
        &Patch::<Value>::Json(serde_json::from_value(remove).unwrap()),
    )
    .await
    .unwrap();
    for _ in 0..100 {
        if !schema.device_nameservers() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!schema.device_nameservers(), "the removal was not noticed");
    let m = create("back".into()).await;
    assert_eq!(m["spec"]["network"]["nameservers"], json!(["10.31.0.2"]));
    hook.stop().await;
}
