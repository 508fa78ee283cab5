//! Release: a machine being deleted whose VM is gone gives back its claims and addresses,
//! then loses our finalizer.
//!
//! Cheap on the apiserver: the claims and addresses the caches know for the machine are
//! gathered, then one read of the machine (its uid, finalizers and the addresses its devices
//! carry, live) confirms it is still there being deleted, then they are deleted with uid
//! preconditions (no read each), then our finalizer goes (at the machine's uid).
//!
//! Gathering before the read is what keeps a newer machine of the same name safe: while
//! the machine read exists, no newer one of its name can, so nothing gathered before is a
//! newer machine's, even when this replica pauses and goes on after another replica has
//! released the machine and the name was created again.
//!
//! The caches are other watches than the machine's and may lag behind it: a machine deleted
//! an instant after its create may be seen before its claims are. So the caches are trusted
//! only when they account for every address the machine carries (a cached claim of this
//! machine made for it) and every address those claims hold; otherwise the machine's claims
//! are listed live (and addresses the caches do not show read), and the machine is read
//! again after. An object neither shows (a carried address whose claim is gone) is
//! left to the sweep, which releases it once no live machine carries its address.

use std::net::Ipv4Addr;
use std::sync::Arc;

use json_patch::{Patch, PatchOperation, RemoveOperation, TestOperation};
use kube::api::{ListParams, Patch as KubePatch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Lifecycle, LifecycleError, api};
use crate::assign::owner_labels;
use crate::cluster::cache::carried_addresses;
use crate::cluster::claims::ClaimInfo;
use crate::cluster::crd::{ElfMachine, IPAddress, IPClaim};
use crate::cluster::index::AddressInfo;
use crate::cluster::writer;
use crate::contract::*;
use crate::events::{self, Note};
use crate::ipam::pool::address_name;
use crate::ipam::select::PoolKey;
use crate::metrics::PoolLabels;

/// A claim to release, as read live or as the cache knows it.
#[derive(Debug, Clone)]
pub(super) struct ClaimToRelease {
    namespace: String,
    name: String,
    uid: Option<String>,
    /// Deleted only at this version when known (a claim read live).
    resource_version: Option<String>,
    pool: String,
    /// `status.address.name`.
    address: Option<String>,
    /// The address it was made for (metal3's requested-IP annotation).
    requested: Option<Ipv4Addr>,
}

impl ClaimToRelease {
    pub(super) fn of_live(c: &IPClaim) -> Self {
        ClaimToRelease {
            namespace: c.namespace().unwrap_or_default(),
            name: c.name_any(),
            uid: c.uid(),
            resource_version: c.resource_version(),
            pool: c.spec.pool.name.clone().unwrap_or_default(),
            address: c
                .status
                .as_ref()
                .and_then(|s| s.address.as_ref())
                .and_then(|a| a.name.clone()),
            requested: c
                .annotations()
                .get(METAL3_REQUESTED_IP)
                .and_then(|ip| ip.parse().ok()),
        }
    }

    fn of_cache(c: &ClaimInfo) -> Self {
        ClaimToRelease {
            namespace: c.namespace.to_string(),
            name: c.name.to_string(),
            uid: c.uid.as_deref().map(Into::into),
            resource_version: None,
            pool: c.pool.as_deref().unwrap_or_default().into(),
            address: c.address.as_deref().map(Into::into),
            requested: c.requested,
        }
    }
}

/// An address a claim holds, as read before the claim is deleted: deleted after it by uid.
#[derive(Debug)]
struct Held {
    name: String,
    uid: Option<String>,
    /// The resourceVersion read, if known.
    version: Option<String>,
    ip: Ipv4Addr,
}

/// What one release deletes. Every object in it was read (from the caches or live) before
/// the live read of the machine that found it still there being deleted: while that machine
/// exists no newer machine of its name can exist, so nothing here is a newer machine's.
struct Plan {
    claims: Vec<(ClaimToRelease, Vec<Held>)>,
    /// Addresses of this machine's claim names whose claim is already gone.
    orphans: Vec<Arc<AddressInfo>>,
    /// Devices the plan looked up claims and addresses for.
    devices: usize,
    /// Gathered with live reads (the machine's claims listed, addresses the caches did not
    /// show read); a plan from the caches alone is complete only when they showed it all.
    live: bool,
    /// The caches alone showed every address the claims hold (whether they show a claim
    /// for every address the machine carries is judged on the machine read live).
    complete: bool,
    /// The addresses the claims are known to hold or were made for.
    covers: Vec<Ipv4Addr>,
}

impl Plan {
    /// Whether the plan is complete for the machine as read live: every device looked up,
    /// and the claims listed live, or the caches showing a claim for every address it carries.
    fn fits(&self, machine: &ElfMachine) -> bool {
        machine.spec.network.devices.len() <= self.devices
            && (self.live
                || (self.complete
                    && carried_addresses(machine)
                        .iter()
                        .all(|ip| self.covers.contains(ip))))
    }
}

impl Lifecycle {
    /// Deletes a machine's claims and addresses, then removes our finalizer.
    ///
    /// The order is what keeps a newer machine of the same name safe: a replica may read
    /// the machine, pause, and go on after another replica released it and the name was
    /// created again (the new machine's claim and address have the same names, made in the
    /// same second). So what to delete is gathered first, then the machine is read live, and
    /// only if that machine is still there being deleted is the plan carried out, every
    /// object at its uid.
    pub(super) async fn release_machine(&self, cached: &ElfMachine) -> Result<(), LifecycleError> {
        let ns = cached.namespace().unwrap_or_default();
        let name = cached.name_any();
        let key = machine_key(&ns, &name);
        let (Some(uid), Some(deleted_at)) =
            (cached.uid(), cached.metadata.deletion_timestamp.clone())
        else {
            return Ok(());
        };
        let mut known = cached.clone();
        let mut live_reads = false;
        for _ in 0..3 {
            let plan = self
                .plan_release(&known, &uid, &deleted_at.0, live_reads)
                .await?;
            // Decide on the live object: the cache may still show a machine that another
            // replica released, while a new machine of the same name already holds claims.
            let live = Api::<ElfMachine>::namespaced(self.assigner.client.clone(), &ns)
                .get_opt(&name)
                .await
                .map_err(api(format!("reading ElfMachine {ns}/{name}")))?;
            let Some(machine) = live.filter(|m| releasable(m, &uid)) else {
                return Ok(());
            };
            crate::fault::delay("release-read").await;
            if !plan.fits(&machine) {
                // The caches are behind, or the machine was edited since they saw it:
                // gathered again for the machine as read, with live reads, and the machine
                // read again after them.
                known = machine;
                live_reads = true;
                continue;
            }
            return self.carry_out(plan, &machine).await;
        }
        Err(LifecycleError::Api {
            action: format!("releasing ElfMachine {key}"),
            source: kube::Error::Api(Box::new(kube::core::Status::failure(
                "the machine kept changing while its release was gathered",
                "Conflict",
            ))),
        })
    }

    /// Gathers what to delete for `machine` (as last read): its claims, the addresses each
    /// holds, and the addresses of its claim names whose claim is gone. Without `live_reads`
    /// from the caches alone (no request: a release triggered by a stale cache costs only the
    /// machine's read); with it, the claims are listed live and addresses the caches do not
    /// show are read.
    async fn plan_release(
        &self,
        machine: &ElfMachine,
        uid: &str,
        deleted_at: &k8s_openapi::jiff::Timestamp,
        live_reads: bool,
    ) -> Result<Plan, LifecycleError> {
        let ns = machine.namespace().unwrap_or_default();
        let name = machine.name_any();
        let key = machine_key(&ns, &name);
        // A claim of this machine is bound to its uid, or was made before the machine was
        // deleted: the claims of a create of that name refused meanwhile (the name was
        // taken) are younger.
        let owned = |c: &ClaimInfo| match c.machine_uid.as_deref() {
            Some(bound) => bound == uid,
            None => c.created.is_none_or(|t| t <= *deleted_at),
        };
        let devices = machine.spec.network.devices.len();
        let cached: Vec<Arc<ClaimInfo>> = self
            .claims_of(&ns, &name, devices)
            .into_iter()
            .filter(|c| !c.deleting && owned(c))
            .collect();
        let covers: Vec<Ipv4Addr> = cached
            .iter()
            .filter_map(|c| self.claim_address(c))
            .collect();
        let claims: Vec<ClaimToRelease> = if live_reads {
            tracing::info!(machine = %key, "caches behind the machine: listing its claims live");
            self.live_claims_of(&ns, &name, uid, deleted_at, &cached)
                .await?
        } else {
            cached.iter().map(|c| ClaimToRelease::of_cache(c)).collect()
        };
        let mut complete = true;
        let mut with_held = Vec::with_capacity(claims.len());
        for c in claims {
            let (held, all) = self.addresses_held(&c, live_reads).await?;
            complete &= all;
            with_held.push((c, held));
        }
        let handled: Vec<(&str, &str)> = with_held
            .iter()
            .map(|(c, _)| (c.namespace.as_str(), c.name.as_str()))
            .collect();
        let orphans = self.orphan_addresses(&ns, &name, devices, deleted_at, &handled);
        Ok(Plan {
            claims: with_held,
            orphans,
            devices,
            live: live_reads,
            complete,
            covers,
        })
    }

    /// Deletes what the plan holds, then removes our finalizer from `machine` (at its uid).
    async fn carry_out(&self, plan: Plan, machine: &ElfMachine) -> Result<(), LifecycleError> {
        let key = machine_key(
            &machine.namespace().unwrap_or_default(),
            &machine.name_any(),
        );
        for (c, held) in &plan.claims {
            self.release_claim_holding(c, held, Some(&key)).await?;
        }
        self.release_orphans(&plan.orphans, &key).await?;
        crate::fault::point("before-finalizer-removal");
        remove_finalizer(&self.assigner.client, machine).await?;
        tracing::info!(machine = %key, claims = plan.claims.len(), "released");
        Ok(())
    }

    /// The machine's claims read live (ours by their labels and machine annotation, in
    /// every namespace with a pool), with the cached claims of the Go controller (by name)
    /// that the list cannot select. Only claims of this machine are returned: bound to its
    /// uid, or made before it was deleted (see [`Lifecycle::plan_release`]).
    async fn live_claims_of(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
        deleted_at: &k8s_openapi::jiff::Timestamp,
        cached: &[Arc<ClaimInfo>],
    ) -> Result<Vec<ClaimToRelease>, LifecycleError> {
        let key = machine_key(ns, name);
        let mut selector = format!("{LABEL_MANAGED_BY}={MANAGER},{LABEL_MACHINE_NAMESPACE}={ns}");
        if let Some(n) = owner_labels(ns, name).get(LABEL_MACHINE_NAME) {
            selector.push_str(&format!(",{LABEL_MACHINE_NAME}={n}"));
        }
        let mut out: Vec<ClaimToRelease> = Vec::new();
        for claim_ns in self.claim_namespaces(ns) {
            let list = Api::<IPClaim>::namespaced(self.assigner.client.clone(), &claim_ns)
                .list(&ListParams::default().labels(&selector))
                .await
                .map_err(api(format!("listing the IPClaims of {key} in {claim_ns}")))?;
            for c in list.items {
                let annotations = c.annotations();
                let ours = annotations.get(ANNOTATION_MACHINE) == Some(&key);
                let owned = match annotations.get(ANNOTATION_MACHINE_UID) {
                    Some(bound) => bound == uid,
                    None => c.creation_timestamp().is_none_or(|t| t.0 <= *deleted_at),
                };
                if ours && owned && c.metadata.deletion_timestamp.is_none() {
                    out.push(ClaimToRelease::of_live(&c));
                }
            }
        }
        for c in cached.iter().filter(|c| c.machine.is_none()) {
            if !out
                .iter()
                .any(|o| *o.namespace == *c.namespace && *o.name == *c.name)
            {
                out.push(ClaimToRelease::of_cache(c));
            }
        }
        Ok(out)
    }

    /// Addresses of this machine's claim names whose claim is already gone (an earlier
    /// pass, or another replica, deleted the claim and then failed), by the claim name they
    /// record; those of claims in `handled` go with their claim.
    fn orphan_addresses(
        &self,
        ns: &str,
        name: &str,
        devices: usize,
        deleted_at: &k8s_openapi::jiff::Timestamp,
        handled: &[(&str, &str)],
    ) -> Vec<Arc<AddressInfo>> {
        let index = &self.assigner.caches.index;
        let mut out = Vec::new();
        for i in 0..devices {
            let claim = claim_name(ns, name, i);
            for pool_ns in self.claim_namespaces(ns) {
                if handled.contains(&(pool_ns.as_str(), claim.as_str()))
                    || self.assigner.caches.claims.get(&pool_ns, &claim).is_some()
                {
                    continue;
                }
                out.extend(
                    index
                        .addresses_of_claim(&pool_ns, &claim)
                        .into_iter()
                        .filter(|a| {
                            !a.deleting
                                && a.cooling_since.is_none()
                                && a.created.is_none_or(|t| t <= *deleted_at)
                        }),
                );
            }
        }
        out
    }

    /// Lets the orphan addresses go, at their uid; those a live machine other than
    /// `releasing` carries are kept, and so are those whose claim the caches now show (it
    /// is released with its addresses, by its machine or by the sweep).
    async fn release_orphans(
        &self,
        orphans: &[Arc<AddressInfo>],
        releasing: &str,
    ) -> Result<(), LifecycleError> {
        let index = &self.assigner.caches.index;
        for a in orphans {
            let claimed = self
                .assigner
                .caches
                .claims
                .get(&a.claim_namespace, &a.claim)
                .is_some();
            if claimed || index.carried_by_other_than(a.address, Some(releasing)) {
                continue;
            }
            match self
                .let_go(&a.namespace, &a.name, writer::Only::uid(a.uid.as_deref()))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => {
                    return Err(api(format!(
                        "deleting IPAddress {}/{}",
                        a.namespace, a.name
                    ))(e));
                }
            }
        }
        Ok(())
    }

    /// Lets an address go: deleted, or with `--reuse-delay` kept as a cooling lock.
    async fn let_go(
        &self,
        ns: &str,
        address: &str,
        only: writer::Only<'_>,
    ) -> Result<writer::Deleted, kube::Error> {
        if self.options.reuse_delay.is_zero() {
            writer::delete_address(&self.assigner.client, ns, address, only).await
        } else {
            writer::cool_address(&self.assigner.client, ns, address, only).await
        }
    }

    /// The addresses a claim holds, read while the claim still exists: once the claim is
    /// gone its machine may be released and a new machine of the same name may take the
    /// same address, under the same names; so only these objects (by uid) are deleted
    /// after it. With `live_reads`, those the caches do not show are read; without, the
    /// second value tells whether the caches showed them all.
    async fn addresses_held(
        &self,
        claim: &ClaimToRelease,
        live_reads: bool,
    ) -> Result<(Vec<Held>, bool), LifecycleError> {
        let (ns, name, pool) = (&claim.namespace, &claim.name, &claim.pool);
        let client = &self.assigner.client;
        let cached = self.assigner.caches.index.addresses_of_claim(ns, name);
        let mut all = true;
        let mut held: Vec<Held> = cached
            .iter()
            .filter(|a| !a.deleting && a.cooling_since.is_none())
            .map(|a| Held {
                name: a.name.to_string(),
                uid: a.uid.as_deref().map(Into::into),
                version: a.version.map(|v| v.to_string()),
                ip: a.address,
            })
            .collect();
        // The caches may not show the address yet (a claim released an instant after it
        // was made): the one the claim points at, and the one named after the requested IP.
        let derived = claim.requested.and_then(|ip| {
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
        for extra in [claim.address.clone(), derived].into_iter().flatten() {
            if cached.iter().any(|a| *a.name == *extra) {
                continue;
            }
            if !live_reads {
                all = false;
                continue;
            }
            if let Some(a) = writer::get_address(client, ns, &extra)
                .await
                .map_err(api(format!("reading IPAddress {ns}/{extra}")))?
                && a.spec.claim.name.as_deref() == Some(name.as_str())
                && let Ok(ip) = a.spec.address.parse()
            {
                held.push(Held {
                    name: extra,
                    uid: a.uid(),
                    version: a.resource_version(),
                    ip,
                });
            }
        }
        Ok((held, all))
    }

    /// Deletes one claim and every address that names it (see
    /// [`Lifecycle::release_claim_holding`]), the addresses read first.
    pub(super) async fn release_claim(
        &self,
        claim: &ClaimToRelease,
        releasing: Option<&str>,
    ) -> Result<(), LifecycleError> {
        let (held, _) = self.addresses_held(claim, true).await?;
        self.release_claim_holding(claim, &held, releasing).await
    }

    /// Deletes one claim and the addresses it held: the claim first (at its uid, and at its
    /// resourceVersion when it was read live), then the addresses (at their uid).
    ///
    /// An address that a live machine other than `releasing` (the machine whose release
    /// this is, if any) carries is kept: it stays locked, and the sweep lets it go once
    /// nobody carries it.
    async fn release_claim_holding(
        &self,
        claim: &ClaimToRelease,
        held: &[Held],
        releasing: Option<&str>,
    ) -> Result<(), LifecycleError> {
        let (ns, name, pool) = (&claim.namespace, &claim.name, &claim.pool);
        let client = &self.assigner.client;
        let held: Vec<&Held> = held
            .iter()
            .filter(|h| {
                let carried = self.assigner.caches.index.carried_by_other_than(h.ip, releasing);
                if carried {
                    tracing::warn!(address = %format!("{ns}/{}", h.name), claim = %name, "address kept: a live machine carries it");
                }
                !carried
            })
            .collect();
        let addresses: Vec<String> = held.iter().map(|h| h.name.clone()).collect();
        // The claim first: metal3's controller, when it runs, must not see a live claim
        // without an address (it would allocate a new one).
        tracing::debug!(claim = %format!("{ns}/{name}"), "releasing claim");
        let claim_state = match writer::delete_claim(
            client,
            ns,
            name,
            writer::Only::version(claim.uid.as_deref(), claim.resource_version.as_deref()),
        )
        .await
        {
            Ok(state) => state,
            // The precondition failed: the claim was replaced or taken over meanwhile;
            // leave it and its address alone.
            Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
            Err(e) => return Err(api(format!("deleting IPClaim {ns}/{name}"))(e)),
        };
        crate::fault::point("after-claim-delete");
        if crate::fault::fails("after-claim-delete") {
            return Err(LifecycleError::Api {
                action: format!("deleting IPClaim {ns}/{name}"),
                source: kube::Error::Api(Box::new(kube::core::Status::failure(
                    "test fault: the answer was lost",
                    "InternalError",
                ))),
            });
        }
        // Missing: another replica, or an earlier attempt of this release whose answer was
        // lost (a timeout, a 5xx), deleted the claim; the addresses read above may still be
        // there, and are deleted all the same: at the uid read, so an object of the same
        // name made since for someone else is left alone.
        for h in &held {
            let address = &h.name;
            // A machine's release: the addresses of a machine still there being deleted,
            // at their uid. A sweep: nothing read the claim's name since the machine was
            // found gone, and a request of a new machine of that name may be taking the
            // address over (it writes to it first): at the version read.
            let only = match releasing {
                Some(_) => writer::Only::uid(h.uid.as_deref()),
                None => writer::Only::version(h.uid.as_deref(), h.version.as_deref()),
            };
            let state = match self.let_go(ns, address, only).await {
                Ok(state) => state,
                // Replaced since it was read: not this claim's any more.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(api(format!("deleting IPAddress {ns}/{address}"))(e)),
            };
            crate::fault::point("after-address-delete");
            if state != writer::Deleted::Finalizing {
                continue;
            }
            writer::drop_finalizers(
                &Api::<IPAddress>::namespaced(client.clone(), ns),
                address,
                &[METAL3_ADDRESS_FINALIZER],
            )
            .await
            .map_err(api(format!(
                "removing metal3's finalizer from IPAddress {ns}/{address}"
            )))?;
        }
        if claim_state == writer::Deleted::Missing {
            return Ok(());
        }
        if claim_state == writer::Deleted::Finalizing {
            writer::drop_finalizers(
                &Api::<IPClaim>::namespaced(client.clone(), ns),
                name,
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
            .get(&ObjectRef::new(pool).within(ns))
            .and_then(|p| p.uid());
        self.assigner.events.emit(Note {
            regarding: events::pool_ref(ns, pool, uid),
            warning: false,
            reason: "Released",
            action: "Release",
            message: format!("IPClaim {name} and its addresses {}", addresses.join(", ")),
        });
        Ok(())
    }
}

/// Whether the machine read live is the one to release (`uid`) and waits for its release.
fn releasable(machine: &ElfMachine, uid: &str) -> bool {
    machine.uid().as_deref() == Some(uid) && super::waits_for_release(machine)
}

/// Removes our finalizer, guarded by a test of the machine's uid (a newer machine of the
/// same name keeps its own) and of the finalizer at that index.
async fn remove_finalizer(
    client: &kube::Client,
    machine: &ElfMachine,
) -> Result<(), LifecycleError> {
    let ns = machine.namespace().unwrap_or_default();
    let name = machine.name_any();
    let api = Api::<ElfMachine>::namespaced(client.clone(), &ns);
    let failed = |source| LifecycleError::Api {
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
                path: "/metadata/uid".parse().expect("valid pointer"),
                value: json!(machine.uid()),
            }),
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
