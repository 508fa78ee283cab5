//! Watch caches (kube-runtime reflectors) of everything admission reads: IPPools,
//! IPAddresses, IPClaims and ElfMachineTemplates, plus the ElfMachine CRD itself
//! (to learn where DNS servers go). Each watch also feeds the [`IpamIndex`].
//! [`Caches::ready`] is true once every watch has listed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

use super::crd::{ElfMachineTemplate, IPAddress, IPClaim, IPPool};
use super::index::IpamIndex;

/// The name of CAPE's ElfMachine CRD.
pub const ELFMACHINE_CRD: &str = "elfmachines.infrastructure.cluster.x-k8s.io";

/// Read-only views of the cluster, kept current by watches.
#[derive(Clone)]
pub struct Caches {
    pub pools: Store<IPPool>,
    pub addresses: Store<IPAddress>,
    pub claims: Store<IPClaim>,
    pub templates: Store<ElfMachineTemplate>,
    pub index: Arc<IpamIndex>,
    pub schema: Arc<MachineSchema>,
    synced: Arc<AtomicUsize>,
}

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
const WATCHES: usize = 5;

impl Caches {
    /// Starts every watch on `tasks`. The caches fill in the background; see [`Caches::ready`].
    pub fn start(client: &Client, tasks: &mut JoinSet<()>) -> Self {
        let index = Arc::new(IpamIndex::default());
        let schema = Arc::new(MachineSchema::default());
        let synced = Arc::new(AtomicUsize::new(0));

        let pools = {
            let index = index.clone();
            watch(client, tasks, synced.clone(), move |change| match change {
                Change::Applied(p) => index.apply_pool(p),
                Change::Deleted(p) => index.delete_pool(p),
                Change::Relisted(all) => index.reset_pools(all),
            })
        };
        let addresses = {
            let index = index.clone();
            watch(client, tasks, synced.clone(), move |change| match change {
                Change::Applied(a) => index.apply_address(a),
                Change::Deleted(a) => index.delete_address(a),
                Change::Relisted(all) => index.reset_addresses(all),
            })
        };
        let claims = watch(client, tasks, synced.clone(), |_: Change<'_, IPClaim>| {});
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
                Change::Applied(crd) => schema.learn(crd),
                Change::Relisted(crds) => crds.iter().for_each(|crd| schema.learn(crd)),
                Change::Deleted(_) => {}
            }));
        }
        Caches {
            pools,
            addresses,
            claims,
            templates,
            index,
            schema,
            synced,
        }
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

/// A watch event as the handlers see it: relists arrive whole, once listed.
pub enum Change<'a, K> {
    Applied(&'a K),
    Deleted(&'a K),
    Relisted(&'a [K]),
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
    // managedFields is never read here and is most of a small object's size: dropping it
    // before the store keeps ~100k cached IPAM objects within the memory budget.
    let stream = watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer);
    tasks.spawn(drive(stream, synced, handle));
    reader
}

/// Polls a watch stream forever, counting its first complete list towards readiness.
async fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    synced: Arc<AtomicUsize>,
    mut handle: impl FnMut(Change<'_, K>) + Send + 'static,
) {
    let mut counted = false;
    let mut stream = std::pin::pin!(stream);
    let mut relist: Vec<K> = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::Apply(obj)) => handle(Change::Applied(&obj)),
            Ok(watcher::Event::Delete(obj)) => handle(Change::Deleted(&obj)),
            Ok(watcher::Event::Init) => relist.clear(),
            Ok(watcher::Event::InitApply(obj)) => relist.push(obj),
            Ok(watcher::Event::InitDone) => {
                handle(Change::Relisted(&relist));
                relist = Vec::new();
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
