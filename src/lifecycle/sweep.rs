//! Sweep: the claims and addresses that nothing needs any more are released.
//!
//! The address a device carries is the truth, never the index in a claim's name. A claim of
//! ours is kept while any of these holds, and released (at the version read, so that a
//! request taking it over meanwhile wins) only when none does:
//! - this replica has seen it change within `--claim-grace` (a create may still be in
//!   admission, or a request has just taken it over), judged on this replica's monotonic
//!   clock from when it saw that version, never against the apiserver's timestamps;
//! - a device of any live ElfMachine carries its address in `ipAddrs` (any network type);
//! - its machine exists, is not being deleted, and has a device that still needs an address
//!   (the device may take it back).
//!
//! An IPAddress of ours is released on the same terms when no claim points at it
//! (`status.address`, or the requested-IP annotation of a claim being filled in): an
//! interrupted request, or a create whose answer was lost and whose retry took another
//! address. A claim left Terminating by metal3's finalizer with no metal3 controller to
//! remove it is finished once it has been stuck for the grace period.

use std::net::Ipv4Addr;
use std::sync::Arc;

use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};

use super::Lifecycle;
use crate::assign::needs_address;
use crate::cluster::claims::ClaimInfo;
use crate::cluster::crd::ElfMachine;
use crate::cluster::index::AddressInfo;
use crate::cluster::writer;

impl Lifecycle {
    /// Releases every claim of ours that nothing needs (see the module comment).
    pub(super) async fn sweep_claims(&self, machines: &Store<ElfMachine>) {
        let grace = self.options.claim_grace;
        for claim in self.assigner.caches.claims.all() {
            if claim.unchanged_for() <= grace {
                continue;
            }
            if claim.deleting {
                self.finish_terminating(&claim).await;
                continue;
            }
            let Some(owner) = claim.machine.as_deref() else {
                continue;
            };
            let address = self.claim_address(&claim);
            let index = &self.assigner.caches.index;
            if address.is_some_and(|ip| index.carried_by_other_than(ip, None)) {
                continue;
            }
            let Some((mns, mname)) = owner.split_once('/') else {
                continue;
            };
            if machines
                .get(&ObjectRef::new(mname).within(mns))
                .is_some_and(|m| wants_or_carries(&m, address))
            {
                continue;
            }
            match self.release_if_unneeded(&claim, address, mns, mname).await {
                Ok(true) => {
                    tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), machine = %owner, "released a claim no machine carries or needs")
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not release claim"),
            }
        }
    }

    /// The address a cached claim holds: the IPAddress it points at, else the one it was
    /// made for.
    pub(super) fn claim_address(&self, claim: &ClaimInfo) -> Option<Ipv4Addr> {
        let index = &self.assigner.caches.index;
        claim
            .address
            .as_deref()
            .and_then(|name| {
                index
                    .addresses_of_claim(&claim.namespace, &claim.name)
                    .into_iter()
                    .find(|a| *a.name == *name)
                    .map(|a| a.address)
            })
            .or(claim.requested)
    }

    /// Confirms on live objects that nothing needs the claim, then releases it at the
    /// version read. Returns whether it was released.
    async fn release_if_unneeded(
        &self,
        claim: &ClaimInfo,
        address: Option<Ipv4Addr>,
        mns: &str,
        mname: &str,
    ) -> Result<bool, super::LifecycleError> {
        let client = &self.assigner.client;
        let live = writer::get_claim(client, &claim.namespace, &claim.name)
            .await
            .map_err(super::api(format!(
                "reading IPClaim {}/{}",
                claim.namespace, claim.name
            )))?;
        // Changed since the cache saw it (taken over, filled in): judged again later.
        let Some(live) = live.filter(|c| {
            c.uid().as_deref() == claim.uid.as_deref()
                && c.resource_version().as_deref() == claim.resource_version.as_deref()
        }) else {
            return Ok(false);
        };
        let machine = Api::<ElfMachine>::namespaced(client.clone(), mns)
            .get_opt(mname)
            .await
            .map_err(super::api(format!("reading ElfMachine {mns}/{mname}")))?;
        if machine.is_some_and(|m| wants_or_carries(&m, address)) {
            return Ok(false);
        }
        crate::fault::delay("sweep-decided").await;
        self.release_claim(&super::release::ClaimToRelease::of_live(&live), None)
            .await?;
        Ok(true)
    }

    /// A claim stuck Terminating for the grace period on finalizers that no running
    /// controller removes (metal3's, when its controller is gone): its addresses that no
    /// machine carries are released and the finalizers dropped, so its namespace can go.
    async fn finish_terminating(&self, claim: &ClaimInfo) {
        let client = &self.assigner.client;
        match writer::get_claim(client, &claim.namespace, &claim.name).await {
            Ok(Some(live))
                if live.metadata.deletion_timestamp.is_some()
                    && live.resource_version().as_deref() == claim.resource_version.as_deref() =>
            {
                if let Err(e) = self
                    .release_claim(&super::release::ClaimToRelease::of_live(&live), None)
                    .await
                {
                    tracing::warn!(error = %e, claim = %format!("{}/{}", claim.namespace, claim.name), "could not finish a terminating claim");
                } else {
                    tracing::info!(claim = %format!("{}/{}", claim.namespace, claim.name), "finished a claim stuck terminating");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not read a terminating claim"),
        }
    }

    /// Deletes our IPAddresses that no claim points at and no machine carries, once this
    /// replica has seen them unchanged for the grace period and a live read confirms it.
    pub(super) async fn sweep_addresses(&self) {
        let grace = self.options.claim_grace;
        let index = &self.assigner.caches.index;
        for address in index.addresses() {
            if !address.ours || address.deleting || address.since.elapsed() <= grace {
                continue;
            }
            // Released and cooling (`--reuse-delay`): kept until the delay has passed.
            if address
                .cooling_since
                .is_some_and(|since| since.elapsed() <= self.options.reuse_delay)
            {
                continue;
            }
            if index.carried_by_other_than(address.address, None) || self.claimed(&address) {
                continue;
            }
            let (ns, name) = (&*address.namespace, &*address.name);
            match self.release_address_if_unclaimed(&address).await {
                Ok(true) => {
                    tracing::info!(address = %format!("{ns}/{name}"), claim = %address.claim, "released an address no claim points at")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, address = %format!("{ns}/{name}"), "could not release address")
                }
            }
        }
    }

    /// Whether the claim an address names points at it (or is being filled in with it), by
    /// the claim cache; a claim changed within the grace counts as pointing: it may be in
    /// the middle of a request.
    fn claimed(&self, address: &AddressInfo) -> bool {
        let grace = self.options.claim_grace;
        self.assigner
            .caches
            .claims
            .get(&address.claim_namespace, &address.claim)
            .is_some_and(|c| {
                points_at(c.address.as_deref(), c.requested, address) || c.unchanged_for() <= grace
            })
    }

    /// Live re-check of an address before deleting it at the version read.
    async fn release_address_if_unclaimed(
        &self,
        address: &Arc<AddressInfo>,
    ) -> Result<bool, kube::Error> {
        let client = &self.assigner.client;
        let (ns, name) = (&*address.namespace, &*address.name);
        let Some(live) = writer::get_address(client, ns, name).await? else {
            return Ok(false);
        };
        // Changed since the cache judged it (a request taking it over has just written to
        // it, its claim not created yet): judged again later.
        if live.uid().as_deref() != address.uid.as_deref()
            || live.resource_version().and_then(|v| v.parse().ok()) != address.version
        {
            return Ok(false);
        }
        let claim_name = live.spec.claim.name.clone().unwrap_or_default();
        if !claim_name.is_empty()
            && let Some(claim) =
                writer::get_claim(client, &address.claim_namespace, &claim_name).await?
        {
            let pointed = claim
                .status
                .as_ref()
                .and_then(|s| s.address.as_ref())
                .and_then(|a| a.name.as_deref());
            let requested = claim
                .annotations()
                .get(crate::contract::METAL3_REQUESTED_IP)
                .and_then(|ip| ip.parse().ok());
            if points_at(pointed, requested, address) {
                return Ok(false);
            }
        }
        match writer::delete_address(
            client,
            ns,
            name,
            writer::Only::version(live.uid().as_deref(), live.resource_version().as_deref()),
        )
        .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Whether a claim (its `status.address.name`, and the IP it was made for) points at this
/// address, or is being filled in with it (no `status.address` yet).
fn points_at(pointed: Option<&str>, requested: Option<Ipv4Addr>, address: &AddressInfo) -> bool {
    match pointed {
        Some(name) => name == &*address.name,
        None => requested == Some(address.address),
    }
}

/// Whether a machine carries `address` on any device, or (alive) still has a device that
/// needs an address and may take the claim back.
fn wants_or_carries(machine: &ElfMachine, address: Option<Ipv4Addr>) -> bool {
    let devices = &machine.spec.network.devices;
    let carries = address.is_some_and(|ip| {
        let text = ip.to_string();
        devices.iter().any(|d| d.ip_addrs.contains(&text))
    });
    carries || (machine.metadata.deletion_timestamp.is_none() && devices.iter().any(needs_address))
}
