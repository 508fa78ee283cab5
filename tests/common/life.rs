//! A realistic life of ElfMachines, as CAPI and CAPE live it, and the webhook's admission
//! calls counted from its own metrics. Shared by tests/blast_radius.rs and `make bench`.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use kube::Client;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};

use super::webhook::{capi_machine, create, machines};

pub const CAPE_FINALIZER: &str = "elfmachine.infrastructure.cluster.x-k8s.io";

/// The metadata and spec patches a machine gets between its create and its deletion, in the
/// order CAPI and CAPE make them; none needs an address.
pub const PATCHES: usize = 10;

fn patches(name: &str, device: &Value) -> [Patch<Value>; PATCHES] {
    let mut with_mac = device.clone();
    with_mac["macAddr"] = json!("52:54:00:12:34:56");
    let merge = Patch::Merge;
    [
        // CAPE starts on the machine: its finalizer (appended, as controller-runtime does).
        Patch::Json(
            serde_json::from_value(json!([
                {"op": "add", "path": "/metadata/finalizers/-", "value": CAPE_FINALIZER}
            ]))
            .unwrap(),
        ),
        // CAPI's Machine controller: the Machine as controller owner.
        merge(json!({"metadata": {"ownerReferences": [
            {"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "MachineSet",
             "name": "demo-md-0-8f7qk", "uid": "0b7c1c52-2d7e-4d5b-9a53-0e8f3c1d2a77"},
            {"apiVersion": "cluster.x-k8s.io/v1beta2", "kind": "Machine", "name": name,
             "uid": "6f0d7c2e-1111-4c3b-8e55-9a0b1c2d3e4f", "controller": true,
             "blockOwnerDeletion": true}
        ]}})),
        // CAPI propagates the Machine's labels and annotations in place.
        merge(json!({"metadata": {"labels": {"node.cluster.x-k8s.io/pool": "workers"}}})),
        merge(
            json!({"metadata": {"annotations": {"cluster.x-k8s.io/cloned-from-name": "tpl",
                                                  "machine.cluster.x-k8s.io/exclude-node-draining": "false"}}}),
        ),
        // CAPE: the VM exists; its id and host.
        merge(
            json!({"spec": {"providerID": format!("elf://4b0c7e1a-0000-4000-8000-{:0>12}", name.len())}}),
        ),
        merge(json!({"spec": {"host": "host-7"}})),
        // CAPE records its placement group.
        merge(
            json!({"metadata": {"annotations": {"cape.infrastructure.cluster.x-k8s.io/placement-group-name": "demo-md-0"}}}),
        ),
        // A device field that needs no address (the NIC's MAC once the VM exists): the
        // devices change, every device keeps its address.
        merge(json!({"spec": {"network": {"devices": [with_mac]}}})),
        // clusterctl move pauses the machine and later un-pauses it.
        merge(json!({"metadata": {"annotations": {"cluster.x-k8s.io/paused": ""}}})),
        merge(json!({"metadata": {"annotations": {"cluster.x-k8s.io/paused": null}}})),
    ]
}

/// `n` machines (one IPV4 device each, pool chosen by template `template`) created,
/// patched [`PATCHES`] times each, deleted, and CAPE's finalizer removed once "the VM is
/// gone"; returns once every machine is gone (the release loop removed our finalizer).
/// `concurrency` machines live at once.
pub async fn machine_lives(
    client: &Client,
    ns: &str,
    prefix: &str,
    template: &str,
    n: usize,
    concurrency: usize,
) {
    futures::stream::iter(0..n)
        .for_each_concurrent(concurrency, |i| async move {
            one_life(client, ns, &format!("{prefix}-{i}"), template).await;
        })
        .await;
}

async fn one_life(client: &Client, ns: &str, name: &str, template: &str) {
    let api = machines(client, ns);
    // The device as the template has it: patched devices keep the same `vlan`.
    let devices = json!([{"networkType": "IPV4", "vlan": "vlan-1"}]);
    let created = create(client, ns, capi_machine(name, template, devices))
        .await
        .unwrap_or_else(|e| panic!("create {ns}/{name}: {e}"));
    let created = serde_json::to_value(created).unwrap();
    let device = created["spec"]["network"]["devices"][0].clone();
    assert!(
        device["ipAddrs"][0].is_string(),
        "{name} got no address: {created}"
    );
    for (k, patch) in patches(name, &device).into_iter().enumerate() {
        api.patch(name, &PatchParams::default(), &patch)
            .await
            .unwrap_or_else(|e| panic!("patch {k} of {ns}/{name}: {e}"));
    }
    api.delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete {ns}/{name}: {e}"));
    // CAPE deleted the VM: its finalizer goes, guarded by its position.
    let live = serde_json::to_value(api.get(name).await.unwrap()).unwrap();
    let at = live["metadata"]["finalizers"]
        .as_array()
        .and_then(|f| f.iter().position(|f| f == CAPE_FINALIZER))
        .unwrap_or_else(|| panic!("{name} has no CAPE finalizer: {live}"));
    let remove: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": format!("/metadata/finalizers/{at}"), "value": CAPE_FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{at}")}
    ]))
    .unwrap();
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(remove))
        .await
        .unwrap_or_else(|e| panic!("removing CAPE's finalizer of {ns}/{name}: {e}"));
    // Our release loop frees the address and removes our finalizer.
    for _ in 0..1500 {
        if api.get_opt(name).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{ns}/{name} was not released within 30 s");
}

/// Admission calls by operation (`CREATE`, `UPDATE`), summed over results, from the text
/// exposition of the webhook's metrics (`cape_static_ip_admission_duration_seconds_count`).
pub fn admission_calls(metrics: &str) -> BTreeMap<String, u64> {
    let mut calls = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("cape_static_ip_admission_duration_seconds_count{")
        else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let operation = labels
            .split(',')
            .find_map(|l| l.strip_prefix("operation=\""))
            .map(|o| o.trim_end_matches('"').to_string())
            .unwrap_or_default();
        let n: f64 = value.trim().parse().unwrap_or(0.0);
        *calls.entry(operation).or_insert(0) += n as u64;
    }
    calls
}

/// `after - before`, per operation (operations with no call left out).
pub fn calls_between(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// The total of [`calls_between`].
pub fn total(calls: &BTreeMap<String, u64>) -> u64 {
    calls.values().sum()
}
