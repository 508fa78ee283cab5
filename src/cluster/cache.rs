//! Watch caches of everything admission reads: IPPools and ElfMachineTemplates (kube-runtime
//! reflectors), IPAddresses (kept only in the [`IpamIndex`]) and IPClaims (the
//! [`ClaimCache`]), plus the ElfMachine CRD itself (to learn where DNS servers go). The two
//! big ones keep a few fields per object, not the objects. [`Caches::ready`] is true once
//! every watch has listed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinSet;

use super::claims::ClaimCache;
use super::crd::{ElfMachineTemplate, IPAddress, IPClaim, IPPool};
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
        Caches {
            pools,
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
    // managedFields is never read here and is most of a small object's size.
    let stream = watcher(api, watcher::Config::default().any_semantic())
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

/// Objects per page when listing IPAddresses and IPClaims.
const LIST_PAGE: u32 = 500;

/// Polls a watch stream forever, counting its first complete list towards readiness.
async fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    synced: Arc<AtomicUsize>,
    mut handle: impl FnMut(Change<'_, K>) + Send + 'static,
) {
    let mut counted = false;
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
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
