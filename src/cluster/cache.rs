//! Watch caches of everything admission reads: IPPools and ElfMachineTemplates (kube-runtime
//! reflectors), IPAddresses (kept only in the [`IpamIndex`]) and IPClaims (the
//! [`ClaimCache`]), ElfMachines (a reflector without managedFields, whose devices' `ipAddrs`
//! feed the index: an address a live machine carries is never offered, claim or no claim; the
//! background loops subscribe to its changes), plus the ElfMachine CRD itself (to learn where
//! DNS servers go). The big ones keep a few fields per object, not the objects.
//! Every list is read in pages of [`LIST_PAGE`]. [`Caches::ready`] is true once every watch has
//! listed.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

use super::claims::ClaimCache;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::crd::{ElfMachine, ElfMachineTemplate, IPAddress, IPClaim, IPPool};
use super::index::IpamIndex;

/// The name of CAPE's ElfMachine CRD.
pub const ELFMACHINE_CRD: &str = "elfmachines.infrastructure.cluster.x-k8s.io";

/// Read-only views of the cluster, kept current by watches.
#[derive(Clone)]
pub struct Caches {
    pub pools: Store<IPPool>,
    pub claims: Arc<ClaimCache>,
    pub templates: Store<ElfMachineTemplate>,
    pub index: Arc<IpamIndex>,
    pub schema: Arc<MachineSchema>,
    /// Every ElfMachine, without managedFields.
    pub machines: Store<ElfMachine>,
    machine_feed: MachineFeed,
    synced: Arc<AtomicUsize>,
}

/// Where machine changes go once the background loops subscribed.
type MachineFeed = Arc<Mutex<Option<mpsc::UnboundedSender<ElfMachine>>>>;

/// What the installed ElfMachine CRD accepts, learned from the CRD the apiserver serves.
#[derive(Debug, Default)]
pub struct MachineSchema {
    device_nameservers: AtomicBool,
}

impl MachineSchema {
    /// Whether devices have their own `nameservers` (CAPE ≥ 1.7.2). When not, DNS servers go
    /// to `spec.network.nameservers`.
    pub fn device_nameservers(&self) -> bool {
        self.device_nameservers.load(Ordering::Relaxed)
    }

    /// Sets what the CRD supports (tests and the CRD watch).
    pub fn set_device_nameservers(&self, yes: bool) {
        self.device_nameservers.store(yes, Ordering::Relaxed);
    }

    /// Reads the v1beta1 schema of the ElfMachine CRD.
    pub fn learn(&self, crd: &CustomResourceDefinition) {
        let has = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == "v1beta1")
            .and_then(|v| v.schema.as_ref())
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .and_then(|s| serde_json::to_value(s).ok())
            .map(|s| {
                s.pointer(
                    "/properties/spec/properties/network/properties/devices/items/properties/nameservers",
                )
                .is_some()
            })
            .unwrap_or(false);
        self.set_device_nameservers(has);
    }
}

/// The number of watches [`Caches::start`] runs.
const WATCHES: usize = 6;

impl Caches {
    /// Starts every watch on `tasks`. The caches fill in the background; see [`Caches::ready`].
    pub fn start(client: &Client, tasks: &mut JoinSet<()>) -> Self {
        let index = Arc::new(IpamIndex::default());
        let schema = Arc::new(MachineSchema::default());
        let synced = Arc::new(AtomicUsize::new(0));

        let pools = {
            let index = index.clone();
            let mut listed = Vec::new();
            watch(client, tasks, synced.clone(), move |change| match change {
                Change::Applied(p) => index.apply_pool(p),
                Change::Deleted(p) => index.delete_pool(p),
                Change::Relisting => listed.clear(),
                Change::Listed(p) => listed.push(p.clone()),
                Change::Relisted => index.reset_pools(&std::mem::take(&mut listed)),
            })
        };
        {
            let index = index.clone();
            follow::<IPAddress>(client, tasks, synced.clone(), move |change| match change {
                Change::Applied(a) | Change::Listed(a) => index.apply_address(a),
                Change::Deleted(a) => index.delete_address(a),
                Change::Relisting => index.begin_address_relist(),
                Change::Relisted => index.end_address_relist(),
            });
        }
        let claims = Arc::new(ClaimCache::default());
        {
            let claims = claims.clone();
            follow::<IPClaim>(client, tasks, synced.clone(), move |change| match change {
                Change::Applied(c) | Change::Listed(c) => claims.apply(c),
                Change::Deleted(c) => claims.delete(c),
                Change::Relisting => claims.begin_relist(),
                Change::Relisted => claims.end_relist(),
            });
        }
        let templates = watch(
            client,
            tasks,
            synced.clone(),
            |_: Change<'_, ElfMachineTemplate>| {},
        );
        {
            let schema = schema.clone();
            let api: Api<CustomResourceDefinition> = Api::all(client.clone());
            let config =
                watcher::Config::default().fields(&format!("metadata.name={ELFMACHINE_CRD}"));
            let stream = watcher(api, config).default_backoff();
            tasks.spawn(drive(stream, synced.clone(), move |change| match change {
                Change::Applied(crd) | Change::Listed(crd) => schema.learn(crd),
                Change::Deleted(_) | Change::Relisting | Change::Relisted => {}
            }));
        }
        let machine_feed = MachineFeed::default();
        let machines = watch_machines(
            client,
            tasks,
            synced.clone(),
            index.clone(),
            machine_feed.clone(),
        );
        Caches {
            pools,
            claims,
            templates,
            index,
            schema,
            machines,
            machine_feed,
            synced,
        }
    }

    /// Every machine now in the cache, then every machine added or changed from now on (not
    /// deletions): what the background loops react to. One subscriber at a time.
    pub fn subscribe_machines(
        &self,
    ) -> impl Stream<Item = Result<ElfMachine, watcher::Error>> + Send + use<> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut feed = self.machine_feed.lock().unwrap_or_else(|e| e.into_inner());
        for m in self.machines.state() {
            let _ = tx.send((*m).clone());
        }
        *feed = Some(tx);
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok)
    }

    /// True once every watch has completed its first list.
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= WATCHES
    }

    /// Waits until [`Caches::ready`].
    pub async fn wait_ready(&self) {
        while !self.ready() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

/// A watch event as the handlers see it. A relist is `Relisting`, then `Listed` for each
/// object, then `Relisted`: whatever was not listed is gone.
pub enum Change<'a, K> {
    Applied(&'a K),
    Deleted(&'a K),
    Relisting,
    Listed(&'a K),
    Relisted,
}

/// Starts a reflector for `K` across all namespaces and returns its store; `handle` sees
/// every change after the store has applied it.
fn watch<K>(
    client: &Client,
    tasks: &mut JoinSet<()>,
    synced: Arc<AtomicUsize>,
    handle: impl FnMut(Change<'_, K>) + Send + 'static,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store::<K>();
    let api: Api<K> = Api::all(client.clone());
    // managedFields is never read here and is most of a small object's size. Listed in pages,
    // like the big ones: a fleet's lists are never held whole.
    let stream = watcher(api, watcher::Config::default().page_size(LIST_PAGE))
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer);
    tasks.spawn(drive(stream, synced, handle));
    reader
}

/// Watches `K` across all namespaces without keeping the objects: `handle` keeps what it
/// needs. The first list is read in pages, so that a large cluster is never held whole.
fn follow<K>(
    client: &Client,
    tasks: &mut JoinSet<()>,
    synced: Arc<AtomicUsize>,
    handle: impl FnMut(Change<'_, K>) + Send + 'static,
) where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let api: Api<K> = Api::all(client.clone());
    let stream = watcher(api, watcher::Config::default().page_size(LIST_PAGE)).default_backoff();
    tasks.spawn(drive(stream, synced, handle));
}

/// The addresses a machine's devices carry in `ipAddrs`, whatever their `networkType` (a
/// device switched to DHCP and back keeps what it lists).
pub fn carried_addresses(machine: &ElfMachine) -> Vec<std::net::Ipv4Addr> {
    machine
        .spec
        .network
        .devices
        .iter()
        .flat_map(|d| d.ip_addrs.iter())
        .filter_map(|a| a.split('/').next().and_then(|ip| ip.trim().parse().ok()))
        .collect()
}

fn machine_key_of(m: &ElfMachine) -> String {
    format!(
        "{}/{}",
        m.metadata.namespace.as_deref().unwrap_or_default(),
        m.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Keeps of a cached machine only what the loops read from the cache: its identity
/// (namespace, name, uid, resourceVersion), deletion timestamp and finalizers, and each
/// device's network type and `ipAddrs`. Labels, annotations, owners and the rest of the
/// devices are read live where needed (the reconciler allocates from a live read). A few
/// KiB less per machine, which is most of what a fleet of machines costs in memory.
fn slim_machine(m: &mut ElfMachine) {
    let meta = &mut m.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.generate_name = None;
    let network = &mut m.spec.network;
    network.nameservers = Vec::new();
    for d in &mut network.devices {
        d.netmask = None;
        d.routes = Vec::new();
        d.addresses_from_pools = Vec::new();
        d.nameservers = Vec::new();
        d.ip_addrs.shrink_to_fit();
    }
    network.devices.shrink_to_fit();
}

/// Watches ElfMachines into a store, feeds the addresses they carry to the index, and passes
/// changes to the subscriber. The store, the index and the feed change under one lock, so a
/// subscriber that starts from the store misses nothing.
fn watch_machines(
    client: &Client,
    tasks: &mut JoinSet<()>,
    synced: Arc<AtomicUsize>,
    index: Arc<IpamIndex>,
    feed: MachineFeed,
) -> Store<ElfMachine> {
    let (reader, mut writer) = reflector::store::<ElfMachine>();
    let api: Api<ElfMachine> = Api::all(client.clone());
    let stream = watcher(api, watcher::Config::default().page_size(LIST_PAGE))
        .default_backoff()
        .modify(slim_machine);
    tasks.spawn(async move {
        let mut counted = false;
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(error = %e, kind = "ElfMachine", "watch failed, retrying");
                    continue;
                }
            };
            let feed = feed.lock().unwrap_or_else(|e| e.into_inner());
            writer.apply_watcher_event(&event);
            match &event {
                watcher::Event::Apply(m) | watcher::Event::InitApply(m) => {
                    index.carry(&machine_key_of(m), carried_addresses(m));
                    if let Some(tx) = feed.as_ref() {
                        let _ = tx.send(m.clone());
                    }
                }
                watcher::Event::Delete(m) => index.forget_machine(&machine_key_of(m)),
                watcher::Event::Init => index.begin_machine_relist(),
                watcher::Event::InitDone => {
                    index.end_machine_relist();
                    if !counted {
                        counted = true;
                        synced.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
        }
    });
    reader
}

/// The test-only delay point that makes this watch lag behind the others (each change
/// waits there before it is applied): `claim-watch`, `address-watch`, `pool-watch`.
#[cfg(feature = "fault-points")]
fn lag_point<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "IPClaim" => "claim-watch",
        "IPAddress" => "address-watch",
        "IPPool" => "pool-watch",
        _ => "other-watch",
    }
}

/// Objects per page when listing (every kind but the one-object CRD watch).
const LIST_PAGE: u32 = 500;

/// Polls a watch stream forever, counting its first complete list towards readiness.
async fn drive<K: Resource<DynamicType = ()>>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    synced: Arc<AtomicUsize>,
    mut handle: impl FnMut(Change<'_, K>) + Send + 'static,
) {
    let mut counted = false;
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        #[cfg(feature = "fault-points")]
        if matches!(
            item,
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_))
        ) {
            crate::fault::delay(lag_point::<K>()).await;
        }
        match item {
            Ok(watcher::Event::Apply(obj)) => handle(Change::Applied(&obj)),
            Ok(watcher::Event::Delete(obj)) => handle(Change::Deleted(&obj)),
            Ok(watcher::Event::Init) => handle(Change::Relisting),
            Ok(watcher::Event::InitApply(obj)) => handle(Change::Listed(&obj)),
            Ok(watcher::Event::InitDone) => {
                handle(Change::Relisted);
                if !counted {
                    counted = true;
                    synced.fetch_add(1, Ordering::AcqRel);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, kind = std::any::type_name::<K>(), "watch failed, retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

    #[test]
    fn a_slim_machine_keeps_what_the_loops_read() {
        let mut m: ElfMachine = serde_json::from_value(serde_json::json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
            "kind": "ElfMachine",
            "metadata": {
                "name": "m", "namespace": "ns", "uid": "0b7c1c52-2d7e-4d5b-9a53-0e8f3c1d2a77",
                "resourceVersion": "7", "deletionTimestamp": "2026-01-01T00:00:00Z",
                "finalizers": ["a", "b"], "labels": {"l": "v"}, "annotations": {"a": "v"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "u"}]
            },
            "spec": {"network": {"nameservers": ["10.0.0.2"], "devices": [
                {"networkType": "IPV4", "ipAddrs": ["10.0.0.5"], "netmask": "255.255.255.0",
                 "routes": [{"gateway": "10.0.0.1"}], "nameservers": ["10.0.0.3"]},
                {"networkType": "IPV4"}
            ]}}
        }))
        .unwrap();
        slim_machine(&mut m);
        assert_eq!(
            (m.name_any(), m.namespace(), m.resource_version()),
            (
                "m".to_string(),
                Some("ns".to_string()),
                Some("7".to_string())
            )
        );
        assert_eq!(
            m.uid().as_deref(),
            Some("0b7c1c52-2d7e-4d5b-9a53-0e8f3c1d2a77")
        );
        assert!(m.metadata.deletion_timestamp.is_some());
        assert_eq!(m.finalizers(), ["a", "b"]);
        assert!(m.metadata.labels.is_none() && m.metadata.annotations.is_none());
        assert!(m.metadata.owner_references.is_none());
        assert_eq!(
            carried_addresses(&m),
            ["10.0.0.5".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        let d = &m.spec.network.devices;
        assert_eq!(d.len(), 2);
        assert!(crate::assign::needs_address(&d[1]) && !crate::assign::needs_address(&d[0]));
        assert!(d[0].routes.is_empty() && d[0].netmask.is_none());
    }
}
