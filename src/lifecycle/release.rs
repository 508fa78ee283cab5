//! Release: a machine being deleted whose VM is gone gives back its claims and addresses,
//! then loses our finalizer.

use json_patch::{Patch, PatchOperation, RemoveOperation, TestOperation};
use kube::api::{Patch as KubePatch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Lifecycle, LifecycleError, api};
use crate::cluster::crd::{ElfMachine, IPAddress, IPClaim};
use crate::cluster::writer;
use crate::contract::*;
use crate::events::{self, Note};
use crate::ipam::pool::address_name;
use crate::ipam::select::PoolKey;
use crate::metrics::PoolLabels;

impl Lifecycle {
    /// Deletes a machine's claims and addresses, then removes our finalizer.
    pub(super) async fn release_machine(&self, cached: &ElfMachine) -> Result<(), LifecycleError> {
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
    pub(super) async fn still_releasing(
        &self,
        ns: &str,
        name: &str,
        uid: &str,
    ) -> Result<bool, LifecycleError> {
        let live = Api::<ElfMachine>::namespaced(self.assigner.client.clone(), ns)
            .get_opt(name)
            .await
            .map_err(api(format!("reading ElfMachine {ns}/{name}")))?;
        Ok(live.is_some_and(|m| {
            m.uid().as_deref() == Some(uid) && m.metadata.deletion_timestamp.is_some()
        }))
    }

    /// Deletes one claim (as just read) and every address that names it.
    pub(super) async fn release_claim(&self, live: &IPClaim) -> Result<(), LifecycleError> {
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
}

/// Removes our finalizer, guarded by a test of the finalizer at that index.
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
