//! The background loops, run by every replica without leader election (every write is
//! idempotent or guarded by a precondition):
//! - release: a machine being deleted whose VM is gone (CAPE's finalizer removed) gets its
//!   claims and addresses deleted, then our finalizer removed; retried with backoff;
//! - reconcile: a machine that needs an address but was admitted without us (webhook down
//!   with `failurePolicy: Ignore`, created before installation, network changed later) is
//!   allocated by the same code as admission and patched with an optimistic lock;
//! - adopt: claims of existing machines record the machine's uid and our labels;
//! - sweep: claims whose machine never came to exist are released after a grace period, and
//!   claims of devices that were removed are released;
//! - pool status: `IPPool.status.indexes` is kept equal to the addresses, in batches.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use json_patch::{Patch, PatchOperation, RemoveOperation, TestOperation};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch as KubePatch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::assign::{Assigner, MachineView, needs_address, owner_labels};
use crate::cluster::claims::ClaimInfo;
use crate::cluster::crd::{ElfMachine, IPAddress, IPClaim, IPPool};
use crate::cluster::writer;
use crate::contract::*;
use crate::events::{self, Note};
use crate::ipam::pool::address_name;
use crate::ipam::select::PoolKey;
use crate::metrics::{Metrics, PoolLabels};
use crate::patch::{self, Extras};

/// Housekeeping that can wait starts only after admission has been quiet this long...
const QUIET: Duration = Duration::from_secs(2);
/// ...waiting at most this long per pass: pool status is then written anyway, and binding
/// claims to machines is left to the next pass.
const MAX_YIELD: Duration = Duration::from_secs(60);

/// Timing of the loops.
#[derive(Debug, Clone, Copy)]
pub struct SweeperOptions {
    pub resync: Duration,
    pub claim_grace: Duration,
}

/// Why one pass over a machine failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Assign(#[from] crate::assign::AssignError),
}

fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> SweepError {
    let action = action.into();
    move |source| SweepError::Api { action, source }
}

/// The background loops.
pub struct Sweeper {
    assigner: Assigner,
    metrics: Arc<Metrics>,
    options: SweeperOptions,
    failures: Mutex<HashMap<String, u32>>,
    /// Pools whose `status.indexes` the apiserver refused as too large, with the number of
    /// entries refused: not retried until the pool holds fewer.
    oversized: Mutex<HashMap<(String, String), usize>>,
}

impl Sweeper {
    pub fn new(assigner: Assigner, metrics: Arc<Metrics>, options: SweeperOptions) -> Self {
        Sweeper {
            assigner,
            metrics,
            options,
            failures: Mutex::new(HashMap::new()),
            oversized: Mutex::new(HashMap::new()),
        }
    }

    /// Runs every loop until the task is dropped.
    pub async fn run(self) {
        let api: Api<ElfMachine> = Api::all(self.assigner.client.clone());
        // Our own reflector (not Controller::new) to drop managedFields, the bulk of a
        // machine written by several managers, before it is stored.
        let (machines, writer) = reflector::store();
        let trigger = watcher(api, watcher::Config::default().any_semantic())
            .default_backoff()
            .modify(|m: &mut ElfMachine| m.metadata.managed_fields = None)
            .reflect(writer)
            .applied_objects();
        let controller = Controller::for_stream(trigger, machines.clone());
        let this = Arc::new(self);
        this.assigner.caches.wait_ready().await;
        let periodic = {
            let this = this.clone();
            let machines = machines.clone();
            async move {
                let period = (this.options.claim_grace / 2).clamp(
                    Duration::from_secs(1),
                    this.options.resync.max(Duration::from_secs(1)),
                );
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    if machines.wait_until_ready().await.is_err() {
                        return;
                    }
                    let cached = machines.state();
                    this.metrics
                        .release_waiting
                        .observe(cached.iter().map(|m| &**m));
                    this.sweep_claims(&machines).await;
                    this.sweep_addresses().await;
                    this.update_pool_status().await;
                }
            }
        };
        let reconciler = controller
            .run(
                |machine, ctx: Arc<Sweeper>| async move { ctx.reconcile(machine).await },
                |machine, error, ctx: Arc<Sweeper>| ctx.retry(&machine, error),
                this.clone(),
            )
            .for_each(|_| async {});
        tokio::join!(reconciler, periodic);
    }

    fn retry(&self, machine: &ElfMachine, error: &SweepError) -> Action {
        let key = machine_key(
            &machine.namespace().unwrap_or_default(),
            &machine.name_any(),
        );
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = Duration::from_millis(250u64.saturating_mul(1 << (*n).min(8)))
            .min(Duration::from_secs(60));
        tracing::warn!(machine = %key, error = %error, retry_in = ?delay, "machine not reconciled");
        Action::requeue(delay)
    }

    async fn reconcile(&self, machine: Arc<ElfMachine>) -> Result<Action, SweepError> {
        let ns = machine.namespace().unwrap_or_default();
        let name = machine.name_any();
        let finalizers = machine.finalizers();
        if machine.metadata.deletion_timestamp.is_some() {
            if finalizers.iter().any(|f| f == STATIC_IP_FINALIZER)
                && !finalizers.iter().any(|f| f == CAPE_FINALIZER)
            {
                self.release_machine(&machine).await?;
            }
        } else {
            self.fill_missing(&machine).await?;
        }
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&machine_key(&ns, &name));
        Ok(Action::requeue(self.options.resync))
    }

    /// The claims that belong to a machine: ours (annotation) and the Go controller's (name),
    /// looked up by name in every namespace that has a pool.
    fn claims_of(&self, namespace: &str, name: &str, devices: usize) -> Vec<Arc<ClaimInfo>> {
        let key = machine_key(namespace, name);
        let claims = &self.assigner.caches.claims;
        let mut found = Vec::new();
        for claim_ns in self.claim_namespaces(namespace) {
            for device in 0..devices.max(1) + 8 {
                if let Some(c) = claims.get(&claim_ns, &claim_name(namespace, name, device))
                    && c.machine.as_deref().is_none_or(|owner| owner == key)
                {
                    found.push(c);
                }
            }
        }
        found
    }

    /// Deletes a machine's claims and addresses, then removes our finalizer.
    async fn release_machine(&self, cached: &ElfMachine) -> Result<(), SweepError> {
        let ns = cached.namespace().unwrap_or_default();
        let name = cached.name_any();
        // Decide on the live object: the cache may still show a machine that another
        // replica released, while a new machine of the same name already holds claims.
        let live = Api::<ElfMachine>::namespaced(self.assigner.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(api(format!("reading ElfMachine {ns}/{name}")))?;
        let Some(machine) = live else { return Ok(()) };
        let finalizers = machine.finalizers();
        let Some(deleted_at) = machine.metadata.deletion_timestamp.clone() else {
            return Ok(());
        };
        if machine.uid() != cached.uid()
            || !finalizers.iter().any(|f| f == STATIC_IP_FINALIZER)
            || finalizers.iter().any(|f| f == CAPE_FINALIZER)
        {
            return Ok(());
        }
        let uid = machine.uid().unwrap_or_default();
        // A claim of this machine is bound to its uid, or (not adopted yet) was made before
        // the machine was deleted; a later machine of the same name makes its claims after.
        let owned = |c: &IPClaim| match c.annotations().get(ANNOTATION_MACHINE_UID) {
            Some(bound) => *bound == uid,
            None => c.creation_timestamp().is_none_or(|t| t.0 <= deleted_at.0),
        };
        let devices = machine.spec.network.devices.len();
        // Candidates by name: what the cache knows, and for devices it knows nothing of, the
        // claim name in every namespace that has a pool (the cache may lag behind a claim
        // written an instant ago). Each is then decided on its live object.
        let mut candidates: Vec<(String, String)> = self
            .claims_of(&ns, &name, devices)
            .iter()
            .map(|c| (c.namespace.to_string(), c.name.to_string()))
            .collect();
        for i in 0..devices {
            let claim = claim_name(&ns, &name, i);
            if candidates.iter().any(|(_, n)| *n == claim) {
                continue;
            }
            for pool_ns in self.claim_namespaces(&ns) {
                candidates.push((pool_ns, claim.clone()));
            }
        }
        let mut released = 0;
        for (claim_ns, claim) in &candidates {
            let live = writer::get_claim(&self.assigner.client, claim_ns, claim)
                .await
                .map_err(api(format!("reading IPClaim {claim_ns}/{claim}")))?;
            if let Some(c) = live
                && c.annotations()
                    .get(ANNOTATION_MACHINE)
                    .is_none_or(|o| *o == machine_key(&ns, &name))
                && owned(&c)
            {
                // The claim was read while this machine still existed only if the machine
                // exists now: then no newer machine of the same name can have made it.
                if !self.still_releasing(&ns, &name, &uid).await? {
                    return Ok(());
                }
                self.release_claim(&c).await?;
                released += 1;
            }
        }
        // Addresses whose claim is already gone (an earlier pass, or another replica, deleted
        // the claim and then failed): found by the claim name they record.
        for i in 0..devices {
            let claim = claim_name(&ns, &name, i);
            for pool_ns in self.claim_namespaces(&ns) {
                for a in self
                    .assigner
                    .caches
                    .index
                    .addresses_of_claim(&pool_ns, &claim)
                {
                    let live = writer::get_address(&self.assigner.client, &a.namespace, &a.name)
                        .await
                        .map_err(api(format!("reading IPAddress {}/{}", a.namespace, a.name)))?;
                    if let Some(live) = live
                        && live.spec.claim.name.as_deref() == Some(claim.as_str())
                        && writer::get_claim(&self.assigner.client, &pool_ns, &claim)
                            .await
                            .map_err(api(format!("reading IPClaim {pool_ns}/{claim}")))?
                            .is_none()
                        && self.still_releasing(&ns, &name, &uid).await?
                    {
                        writer::delete_address(
                            &self.assigner.client,
                            &a.namespace,
                            &a.name,
                            live.uid().as_deref(),
                        )
                        .await
                        .map_err(api(format!(
                            "deleting IPAddress {}/{}",
                            a.namespace, a.name
                        )))?;
                    }
                }
            }
        }
        remove_finalizer(&self.assigner.client, &machine).await?;
        self.assigner.events.emit(Note {
            regarding: events::machine_ref(&ns, &name, machine.uid()),
            warning: false,
            reason: "AddressesReleased",
            action: "Release",
            message: format!(
                "{released} IPClaim(s) released; finalizer {STATIC_IP_FINALIZER} removed"
            ),
        });
        tracing::info!(machine = %machine_key(&ns, &name), claims = released, "released");
        Ok(())
    }

    /// Whether the machine with this uid still exists (and is being deleted).
    async fn still_releasing(&self, ns: &str, name: &str, uid: &str) -> Result<bool, SweepError> {
        let live = Api::<ElfMachine>::namespaced(self.assigner.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(api(format!("reading ElfMachine {ns}/{name}")))?;
        Ok(live.is_some_and(|m| {
            m.uid().as_deref() == Some(uid) && m.metadata.deletion_timestamp.is_some()
        }))
    }

    /// Namespaces where a machine's claims may live: every namespace that has a pool.
    fn claim_namespaces(&self, machine_ns: &str) -> Vec<String> {
        let mut set: Vec<String> = self
            .assigner
            .caches
            .index
            .pool_metas()
            .iter()
            .map(|m| m.key.namespace.clone())
            .collect();
        set.push(machine_ns.to_string());
        set.sort();
        set.dedup();
        set
    }

    /// Deletes one claim (as just read) and every address that names it.
    async fn release_claim(&self, live: &IPClaim) -> Result<(), SweepError> {
        let claim = live;
        let ns = claim.namespace().unwrap_or_default();
        let name = claim.name_any();
        let pool = claim.spec.pool.name.clone().unwrap_or_default();
        let mut addresses: Vec<String> = self
            .assigner
            .caches
            .index
            .addresses_of_claim(&ns, &name)
            .into_iter()
            .map(|a| a.name.to_string())
            .collect();
        // The caches may not show the address yet (a claim released an instant after it
        // was made): read the claim live, and derive the address's name from the requested
        // IP, so that no address outlives its claim until the grace period.
        let client = &self.assigner.client;
        if let Some(a) = live
            .status
            .as_ref()
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.name.clone())
            && !addresses.contains(&a)
        {
            addresses.push(a);
        }
        let derived = live
            .annotations()
            .get(METAL3_REQUESTED_IP)
            .and_then(|ip| ip.parse::<std::net::Ipv4Addr>().ok())
            .and_then(|ip| {
                let key = PoolKey {
                    namespace: ns.clone(),
                    name: pool.clone(),
                };
                self.assigner
                    .caches
                    .index
                    .with_pool(&key, |s| address_name(&s.pool().name_prefix, ip))
                    .ok()
            });
        if let Some(derived) = derived
            && !addresses.contains(&derived)
            && let Some(a) = writer::get_address(client, &ns, &derived)
                .await
                .map_err(api(format!("reading IPAddress {ns}/{derived}")))?
            && a.spec.claim.name.as_deref() == Some(name.as_str())
        {
            addresses.push(derived);
        }
        // Read the addresses while the claim still exists, and delete only those objects
        // (by uid) after it: once the claim is gone its machine may be released and a new
        // machine of the same name may take the same address, under the same names.
        let mut held: Vec<(String, Option<String>)> = Vec::new();
        for address in addresses.iter() {
            if let Some(a) = writer::get_address(client, &ns, address)
                .await
                .map_err(api(format!("reading IPAddress {ns}/{address}")))?
                && a.spec.claim.name.as_deref() == Some(name.as_str())
            {
                held.push((address.clone(), a.uid()));
            }
        }
        let addresses: Vec<String> = held.iter().map(|(a, _)| a.clone()).collect();
        // The claim first: metal3's controller, when it runs, must not see a live claim
        // without an address (it would allocate a new one).
        tracing::debug!(claim = %format!("{ns}/{name}"), "releasing claim");
        let claim_state =
            match writer::delete_claim(client, &ns, &name, claim.uid().as_deref()).await {
                Ok(state) => state,
                // The precondition failed: the claim was replaced meanwhile; leave the new one
                // and its address alone.
                Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
                Err(e) => return Err(api(format!("deleting IPClaim {ns}/{name}"))(e)),
            };
        if claim_state == writer::Deleted::Missing {
            // Another replica released it, addresses included; what it may have left behind
            // is found by the machine's release or the sweep, on live objects.
            return Ok(());
        }
        for (address, uid) in &held {
            let state = match writer::delete_address(client, &ns, address, uid.as_deref()).await {
                Ok(state) => state,
                // Replaced since it was read: not this claim's any more.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(api(format!("deleting IPAddress {ns}/{address}"))(e)),
            };
            if state != writer::Deleted::Finalizing {
                continue;
            }
            writer::drop_finalizers(
                &Api::<IPAddress>::namespaced(client.clone(), &ns),
                address,
                &[METAL3_ADDRESS_FINALIZER],
            )
            .await
            .map_err(api(format!(
                "removing metal3's finalizer from IPAddress {ns}/{address}"
            )))?;
        }
        if claim_state == writer::Deleted::Finalizing {
            writer::drop_finalizers(
                &Api::<IPClaim>::namespaced(client.clone(), &ns),
                &name,
                &[METAL3_CLAIM_FINALIZER],
            )
            .await
            .map_err(api(format!(
                "removing metal3's finalizer from IPClaim {ns}/{name}"
            )))?;
        }
        self.metrics
            .releases
            .get_or_create(&PoolLabels {
                pool: format!("{ns}/{pool}"),
                result: "released".into(),
            })
            .inc();
        let uid = self
            .assigner
            .caches
            .pools
            .get(&ObjectRef::new(&pool).within(&ns))
            .and_then(|p| p.uid());
        self.assigner.events.emit(Note {
            regarding: events::pool_ref(&ns, &pool, uid),
            warning: false,
            reason: "Released",
            action: "Release",
            message: format!("IPClaim {name} and its addresses {}", addresses.join(", ")),
        });
        Ok(())
    }

    /// Allocates for devices that need an address and patches the machine; records the
    /// machine's uid on its claims.
    async fn fill_missing(&self, cached: &ElfMachine) -> Result<(), SweepError> {
        let ns = cached.namespace().unwrap_or_default();
        let name = cached.name_any();
        // Claims of another controller are taken over at once; ours are bound to the
        // machine's uid by the periodic pass, off the busy moments of a scale-up.
        let unadopted: Vec<Arc<ClaimInfo>> = self
            .claims_of(&ns, &name, cached.spec.network.devices.len())
            .into_iter()
            .filter(|c| c.machine.is_none() && c.machine_uid.is_none())
            .collect();
        if unadopted.is_empty() && !cached.spec.network.devices.iter().any(needs_address) {
            return Ok(());
        }
        // Act on the live object only: the cache may show an earlier machine of this name,
        // or an older version of this one.
        let raw_api: Api<kube::core::DynamicObject> = Api::namespaced_with(
            self.assigner.client.clone(),
            &ns,
            &kube::discovery::ApiResource::erase::<ElfMachine>(&()),
        );
        let Some(live) = raw_api.get_opt(&name).await.map_err(api_err(&ns, &name))? else {
            return Ok(());
        };
        let value = serde_json::to_value(&live).unwrap_or_default();
        let Ok(machine) = serde_json::from_value::<ElfMachine>(value.clone()) else {
            return Ok(());
        };
        if machine.uid() != cached.uid() || machine.metadata.deletion_timestamp.is_some() {
            return Ok(());
        }
        let uid = machine.uid();
        self.adopt_claims(&machine, &unadopted).await?;
        if !machine.spec.network.devices.iter().any(needs_address) {
            return Ok(());
        }
        let empty = BTreeMap::new();
        let view = MachineView {
            namespace: &ns,
            name: &name,
            uid: uid.as_deref(),
            labels: machine.metadata.labels.as_ref().unwrap_or(&empty),
            annotations: machine.metadata.annotations.as_ref().unwrap_or(&empty),
            devices: &machine.spec.network.devices,
        };
        let leases = self.assigner.assign(&view, false).await?;
        // Patch guarded by the resourceVersion the decision was made on.
        let extras = Extras {
            name: None,
            finalizer: true,
            device_nameservers: self.assigner.caches.schema.device_nameservers(),
        };
        let mut ops = vec![PatchOperation::Test(TestOperation {
            path: "/metadata/resourceVersion".parse().expect("valid pointer"),
            value: json!(live.resource_version()),
        })];
        ops.extend(patch::build(&value, &leases, &extras).0);
        Api::<ElfMachine>::namespaced(self.assigner.client.clone(), &ns)
            .patch(
                &name,
                &PatchParams::default(),
                &KubePatch::Json::<()>(Patch(ops)),
            )
            .await
            .map_err(api_err(&ns, &name))?;
        tracing::info!(machine = %machine_key(&ns, &name), devices = leases.len(), "addresses assigned outside admission");
        self.assigner.events.emit(Note {
            regarding: events::machine_ref(&ns, &name, uid.clone()),
            warning: false,
            reason: "AddressesAssigned",
            action: "Allocate",
            message: leases
                .iter()
                .map(|l| format!("device {}: {}", l.device, l.address))
                .collect::<Vec<_>>()
                .join(", "),
        });
        Ok(())
    }

    /// Records the machine's uid and our labels on the given claims of an existing machine.
    /// The claims must have been read before the machine: a claim made after this machine
    /// was read may belong to a newer machine of the same name. Each patch carries the uid
    /// of the claim as read, so a claim replaced meanwhile is left alone.
    async fn adopt_claims(
        &self,
        machine: &ElfMachine,
        claims: &[Arc<ClaimInfo>],
    ) -> Result<(), SweepError> {
        let ns = machine.namespace().unwrap_or_default();
        let name = machine.name_any();
        let Some(uid) = machine.uid() else {
            return Ok(());
        };
        for claim in claims {
            // A claim bound already (or bound to an earlier machine of the same name, which
            // the sweep releases) is never rebound.
            let Some(claim_uid) = claim.uid.as_deref().filter(|_| claim.machine_uid.is_none())
            else {
                continue;
            };
            let claim_ns = claim.namespace.to_string();
            let device = claim
                .name
                .strip_prefix(&format!("{ns}-{name}-"))
                .and_then(|i| i.parse::<usize>().ok());
            let mut annotations = BTreeMap::from([
                (ANNOTATION_MACHINE.to_string(), machine_key(&ns, &name)),
                (ANNOTATION_MACHINE_UID.to_string(), uid.clone()),
            ]);
            if let Some(d) = device {
                annotations.insert(ANNOTATION_DEVICE.to_string(), d.to_string());
            }
            let patch = json!({"metadata": {
                "uid": claim_uid,
                "labels": owner_labels(&ns, &name),
                "annotations": annotations,
            }});
            match Api::<IPClaim>::namespaced(self.assigner.client.clone(), &claim_ns)
                .patch(
                    &claim.name,
                    &PatchParams::default(),
                    &KubePatch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {}
                // Deleted or replaced since it was read.
                Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => {}
                Err(e) => {
                    return Err(api(format!(
                        "recording the machine on IPClaim {claim_ns}/{}",
                        claim.name
                    ))(e));
                }
            }
        }
        Ok(())
    }

    /// Releases claims whose machine does not exist (after the grace period), claims bound to
    /// an earlier machine of the same name, and claims of removed devices; binds the claims
    /// of existing machines to their uid.
    async fn sweep_claims(&self, machines: &Store<ElfMachine>) {
        // Claims first, machines second: a machine created after this read is seen below.
        let claims = self.assigner.caches.claims.all();
        let mut adopt: BTreeMap<(String, String), Vec<Arc<ClaimInfo>>> = BTreeMap::new();
        for claim in claims {
            let Some(owner) = claim.machine.as_deref() else {
                continue;
            };
            if claim.deleting {
                continue;
            }
            let Some((mns, mname)) = owner.split_once('/') else {
                continue;
            };
            let machine = machines.get(&ObjectRef::new(mname).within(mns));
            let stale = match &machine {
                None => self.older_than_grace(claim.created),
                Some(m) => self.claim_is_stale(&claim, m),
            };
            if !stale {
                if claim.machine_uid.is_none()
                    && machine.is_some_and(|m| m.metadata.deletion_timestamp.is_none())
                {
                    adopt
                        .entry((mns.to_string(), mname.to_string()))
                        .or_default()
                        .push(claim.clone());
                }
                continue;
            }
            // Re-check with live reads before deleting anything.
            let live = Api::<ElfMachine>::namespaced(self.assigner.client.clone(), mns)
                .get_opt(mname)
                .await;
            let still_stale = match live {
                Ok(None) => true,
                Ok(Some(m)) => self.claim_is_stale(&claim, &m),
                Err(e) => {
                    tracing::warn!(error = %e, machine = %owner, "could not read machine; claim kept");
                    false
                }
            };
            if !still_stale {
                continue;
            }
            let released =
                match writer::get_claim(&self.assigner.client, &claim.namespace, &claim.name).await
                {
                    Ok(Some(live)) if live.uid().as_deref() == claim.uid.as_deref() => {
                        self.release_claim(&live).await.map(|()| true)
                    }
                    Ok(_) => Ok(false),
                    Err(e) => Err(api(format!(
                        "reading IPClaim {}/{}",
                        claim.namespace, claim.name
                    ))(e)),
                };
            match released {
                Ok(true) => {
                    tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), machine = %owner, "released a claim whose machine is gone")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not release claim"),
            }
        }
        // Binding can wait for the next pass when admission stays busy.
        let deadline = tokio::time::Instant::now() + MAX_YIELD;
        for ((ns, name), claims) in adopt {
            if !self.quiet_by(deadline).await {
                tracing::debug!("admission busy: binding claims to machines left to the next pass");
                break;
            }
            let live = Api::<ElfMachine>::namespaced(self.assigner.client.clone(), &ns)
                .get_opt(&name)
                .await;
            let result = match live {
                Ok(Some(m)) if m.metadata.deletion_timestamp.is_none() => {
                    self.adopt_claims(&m, &claims).await
                }
                Ok(_) => Ok(()),
                Err(e) => Err(api(format!("reading ElfMachine {ns}/{name}"))(e)),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, machine = %machine_key(&ns, &name), "could not bind claims to the machine");
            }
        }
    }

    /// Deletes our IPAddresses whose claim does not exist (an interrupted request), once
    /// older than the grace period and confirmed by a live read.
    async fn sweep_addresses(&self) {
        let now = Timestamp::now();
        for address in self.assigner.caches.index.addresses() {
            if !address.ours || address.deleting {
                continue;
            }
            let (ns, name) = (&*address.namespace, &*address.name);
            let (claim_ns, claim) = (&*address.claim_namespace, &*address.claim);
            if claim.is_empty() || self.assigner.caches.claims.get(claim_ns, claim).is_some() {
                continue;
            }
            let age = address
                .created
                .map(|t| now.duration_since(t).as_secs_f64())
                .unwrap_or(0.0);
            if age <= self.options.claim_grace.as_secs_f64() {
                continue;
            }
            match writer::get_claim(&self.assigner.client, claim_ns, claim).await {
                Ok(None) => {
                    match writer::delete_address(
                        &self.assigner.client,
                        ns,
                        name,
                        address.uid.as_deref(),
                    )
                    .await
                    {
                        Ok(_) => {
                            tracing::info!(address = %format!("{ns}/{name}"), claim = %claim, "released an address whose claim is gone")
                        }
                        Err(e) => tracing::warn!(error = %e, "could not release address"),
                    }
                }
                Ok(Some(_)) => {}
                Err(e) => tracing::warn!(error = %e, "could not read claim; address kept"),
            }
        }
    }

    /// Records that a pool's `status.indexes` cannot be stored: it is not rewritten every
    /// pass (a large request for nothing) until the pool holds fewer addresses.
    fn status_too_large(&self, pool: &IPPool, key: (String, String), entries: usize, why: &str) {
        tracing::warn!(pool = %format!("{}/{}", key.0, key.1), entries, why, "status.indexes is too large for the apiserver; not written until the pool holds fewer addresses");
        self.assigner.events.emit(Note {
            regarding: events::pool_ref(&key.0, &key.1, pool.uid()),
            warning: true,
            reason: "StatusTooLarge",
            action: "UpdateStatus",
            message: format!(
                "status.indexes with {entries} entries exceeds the apiserver's size limit; it is not updated until the pool holds fewer addresses (the IPAddress objects remain the record)"
            ),
        });
        self.oversized
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entries);
    }

    /// Waits until no address has been assigned for [`QUIET`], or until `deadline`; true when
    /// quiet. Binding claims and pool status can wait, a scale-up should not.
    async fn quiet_by(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            if self.assigner.activity.idle_for() >= QUIET {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(QUIET / 4).await;
        }
    }

    /// Whether a claim was created longer than `--claim-grace` ago.
    fn older_than_grace(&self, created: Option<Timestamp>) -> bool {
        created
            .map(|t| Timestamp::now().duration_since(t).as_secs_f64())
            .is_some_and(|age| age > self.options.claim_grace.as_secs_f64())
    }

    /// Whether an existing machine no longer owns this claim: bound to another uid, or its
    /// device was removed or no longer takes a static address.
    fn claim_is_stale(&self, claim: &ClaimInfo, machine: &ElfMachine) -> bool {
        if let (Some(bound), Some(uid)) = (claim.machine_uid.as_deref(), machine.uid())
            && *bound != uid
        {
            return true;
        }
        // A claim younger than the grace period may belong to an UPDATE still in flight (a
        // hot-added NIC is claimed before the machine with that NIC is stored).
        if !self.older_than_grace(claim.created) {
            return false;
        }
        let Some(device) = claim
            .device
            .as_deref()
            .and_then(|d| d.parse::<usize>().ok())
        else {
            return false;
        };
        match machine.spec.network.devices.get(device) {
            None => machine.metadata.deletion_timestamp.is_none(),
            Some(d) => d.network_type != NETWORK_TYPE_STATIC,
        }
    }

    /// Writes `status.indexes` (claim → address) of every pool whose status differs from
    /// the IPAddresses that exist.
    async fn update_pool_status(&self) {
        // Status must progress even under constant load: wait for a quiet moment, not forever.
        self.quiet_by(tokio::time::Instant::now() + MAX_YIELD).await;
        let index = &self.assigner.caches.index;
        let mut wanted: HashMap<(String, String), BTreeMap<String, String>> = HashMap::new();
        for a in index.addresses() {
            if a.claim.is_empty() {
                continue;
            }
            wanted
                .entry((a.pool.namespace.clone(), a.pool.name.clone()))
                .or_default()
                .insert(a.claim.to_string(), a.address.to_string());
        }
        for pool in self.assigner.caches.pools.state() {
            let key = (pool.namespace().unwrap_or_default(), pool.name_any());
            // Only pools we can allocate from: the addresses of others (IPv6) are not indexed.
            if index
                .with_pool(&PoolKey::new(&key.0, &key.1), |_| ())
                .is_err()
            {
                continue;
            }
            let want = wanted.remove(&key).unwrap_or_default();
            let refused = self
                .oversized
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied();
            if refused.is_some_and(|n| want.len() >= n) {
                continue;
            }
            let empty = BTreeMap::new();
            let have = pool.status.as_ref().map_or(&empty, |s| &s.indexes);
            if want == *have {
                continue;
            }
            // Only what changed; a merge patch nulls out keys that went away.
            let mut indexes = serde_json::Map::new();
            for k in have.keys().filter(|k| !want.contains_key(*k)) {
                indexes.insert(k.clone(), serde_json::Value::Null);
            }
            for (k, v) in want.iter().filter(|(k, v)| have.get(*k) != Some(*v)) {
                indexes.insert(k.clone(), json!(v));
            }
            let patch = json!({"status": {"indexes": indexes, "lastUpdated": Timestamp::now().to_string()}});
            // A patch larger than etcd accepts would cost the apiserver seconds for nothing.
            let size = serde_json::to_vec(&patch).map_or(0, |b| b.len());
            if size > MAX_STATUS_PATCH {
                let why = format!("the patch alone is {size} bytes");
                self.status_too_large(&pool, key, want.len(), &why);
                continue;
            }
            match Api::<IPPool>::namespaced(self.assigner.client.clone(), &key.0)
                .patch_status(&key.1, &PatchParams::default(), &KubePatch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.oversized
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
                Err(kube::Error::Api(s)) if too_large(&s) => {
                    self.status_too_large(&pool, key, want.len(), &s.message);
                }
                Err(e) => {
                    tracing::warn!(pool = %format!("{}/{}", key.0, key.1), error = %e, "could not update pool status")
                }
            }
        }
    }
}

/// The largest pool status patch sent: etcd refuses requests over 1.5 MiB by default.
const MAX_STATUS_PATCH: usize = 1_500_000;

/// Whether the apiserver refused a write for its size (its request limit, or etcd's).
fn too_large(s: &kube::core::Status) -> bool {
    s.code == 413 || s.message.contains("too large")
}

fn api_err(ns: &str, name: &str) -> impl FnOnce(kube::Error) -> SweepError {
    api(format!("patching ElfMachine {ns}/{name}"))
}

/// Removes our finalizer, guarded by a test of the finalizer at that index.
async fn remove_finalizer(client: &kube::Client, machine: &ElfMachine) -> Result<(), SweepError> {
    let ns = machine.namespace().unwrap_or_default();
    let name = machine.name_any();
    let api = Api::<ElfMachine>::namespaced(client.clone(), &ns);
    let failed = |source| SweepError::Api {
        action: format!("removing our finalizer from ElfMachine {ns}/{name}"),
        source,
    };
    let mut finalizers = machine.finalizers().to_vec();
    // Another replica or CAPE may change the list meanwhile (the `test` then fails): re-read
    // and try again at once rather than waiting for the retry backoff.
    for _ in 0..3 {
        let Some(at) = finalizers.iter().position(|f| f == STATIC_IP_FINALIZER) else {
            return Ok(());
        };
        let path = format!("/metadata/finalizers/{at}");
        let patch = Patch(vec![
            PatchOperation::Test(TestOperation {
                path: path.parse().expect("valid pointer"),
                value: json!(STATIC_IP_FINALIZER),
            }),
            PatchOperation::Remove(RemoveOperation {
                path: path.parse().expect("valid pointer"),
            }),
        ]);
        match api
            .patch(
                &name,
                &PatchParams::default(),
                &KubePatch::Json::<()>(patch),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                match api.get_opt(&name).await.map_err(failed)? {
                    Some(live) if live.uid() == machine.uid() => {
                        finalizers = live.finalizers().to_vec()
                    }
                    _ => return Ok(()),
                }
            }
            Err(e) => return Err(failed(e)),
        }
    }
    Err(failed(kube::Error::Api(Box::new(
        kube::core::Status::failure("the finalizer list kept changing", "Conflict"),
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_refusals_are_recognised() {
        // What kube-apiserver 1.34 answers to a 1.9 MB status patch of a 60k-address pool.
        let etcd = kube::core::Status::failure("etcdserver: request is too large", "");
        assert!(too_large(&etcd));
        let mut body = kube::core::Status::failure("the request body is too big", "");
        body.code = 413;
        assert!(too_large(&body));
        let conflict = kube::core::Status::failure("the object has been modified", "Conflict");
        assert!(!too_large(&conflict));
    }
}
