//! Repair and reuse: a claim that exists already keeps its address (a retried request, a
//! wiped `ipAddrs`, a take-over), half-written pairs are completed, and what a failed
//! request wrote is given back.
//!
//! The rules that keep one address off two NICs:
//! - a claim is reused for a device only if no other device of this machine, and no other
//!   live machine, carries its address; a claim of another machine, of an earlier machine of
//!   the same name (bound to another uid), or (at CREATE) one unchanged for longer than the
//!   claim grace (an interrupted request or a machine gone without its release: the sweep's)
//!   is not reused, and the device gets a new claim under another name;
//! - reusing a claim writes to it (`touch_claim`, or completing its status), so a release
//!   decided on the version read before (a sweep, a concurrent request's give-back) fails
//!   its resourceVersion precondition instead of deleting what this request hands out;
//! - a give-back deletes only the version of a claim that this request wrote.

use std::net::Ipv4Addr;

use kube::ResourceExt;

use super::lease::lease_of_address;
use super::{AssignError, Assigner, CLAIM_WAIT_STEP, CLAIM_WAIT_TRIES, Lease, MachineView};
use crate::cluster::crd::IPClaim;
use crate::cluster::writer::{self, Deleted, Only};
use crate::contract::*;
use crate::ipam::select::PoolKey;

/// An IPAddress one request created.
#[derive(Debug)]
pub(super) struct WrittenAddress {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) pool: PoolKey,
    pub(super) address: Ipv4Addr,
    /// The claim it was made for.
    pub(super) claim: String,
    /// The version this request wrote (created, or touched on a take-over): a give-back
    /// deletes only that version, so an address another request took over meanwhile stays.
    pub(super) resource_version: Option<String>,
}

/// An IPClaim one request created, with the resourceVersion of its last write.
#[derive(Debug)]
pub(super) struct WrittenClaim {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) resource_version: Option<String>,
}

/// What one request wrote, to give back on failure.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub(super) addresses: Vec<WrittenAddress>,
    pub(super) claims: Vec<WrittenClaim>,
}

/// What an existing claim name means for a device.
#[derive(Debug)]
pub(super) enum Existing {
    /// The claim (now taken by this request) holds this lease.
    Lease(Lease),
    /// No claim of that name, or one being filled in by another request.
    Absent,
    /// A claim of that name exists but cannot serve this device; use another name.
    Unusable,
}

impl Assigner {
    /// Waits (briefly) for a claim that another request is filling in, and takes its lease.
    pub(super) async fn wait_for_claim(
        &self,
        m: &MachineView<'_>,
        device: usize,
        pool: &PoolKey,
        claim: &str,
    ) -> Result<Lease, AssignError> {
        for _ in 0..CLAIM_WAIT_TRIES {
            match self
                .existing_lease(m, device, pool, claim, true, false)
                .await?
            {
                Existing::Lease(lease) => return Ok(lease),
                Existing::Unusable => break,
                Existing::Absent => tokio::time::sleep(CLAIM_WAIT_STEP).await,
            }
        }
        Err(AssignError::Conflict {
            machine: machine_key(m.namespace, m.name),
            device,
            reason: format!(
                "IPClaim {}/{claim} exists but has no address yet (another request is assigning it); retry",
                pool.namespace
            ),
        })
    }

    /// Whether a claim that exists cannot serve device `device` of `m` (see the module
    /// comment). An error for a CREATE that meets a claim bound to an earlier machine.
    fn refuse_claim(
        &self,
        m: &MachineView<'_>,
        device: usize,
        pool: &PoolKey,
        live: &IPClaim,
    ) -> Result<bool, AssignError> {
        let machine = machine_key(m.namespace, m.name);
        let claim = live.name_any();
        if live.metadata.deletion_timestamp.is_some() {
            return Ok(true);
        }
        if live
            .annotations()
            .get(ANNOTATION_MACHINE)
            .is_some_and(|o| *o != machine)
        {
            return Ok(true);
        }
        // Bound to an earlier machine of this name (deleted without its release, e.g. its
        // finalizers removed by hand): never reused; the sweep releases it.
        if let Some(bound) = live.annotations().get(ANNOTATION_MACHINE_UID)
            && m.uid != Some(bound.as_str())
        {
            if m.uid.is_some() {
                return Ok(true);
            }
            return Err(AssignError::Conflict {
                machine,
                device,
                reason: format!(
                    "IPClaim {}/{claim} is bound to an earlier ElfMachine of this name (uid {bound}); it is released within --claim-grace once that machine is gone (or delete the claim); retry then",
                    pool.namespace
                ),
            });
        }
        if live.spec.pool.name.as_deref().unwrap_or_default() != pool.name {
            return Ok(true);
        }
        // At CREATE no machine holds the claim yet: only a claim young enough to belong to
        // a request still in admission (a retry, the same request delivered twice) is this
        // machine's; an older one is an interrupted request's or an earlier machine's.
        Ok(m.uid.is_none() && self.is_stale(&pool.namespace, live))
    }

    /// Whether this replica has seen the claim unchanged, at this very version, for longer
    /// than the claim grace (its own monotonic clock; a claim it has not seen is young).
    fn is_stale(&self, namespace: &str, live: &IPClaim) -> bool {
        self.caches
            .claims
            .get(namespace, &live.name_any())
            .is_some_and(|c| {
                c.resource_version.as_deref() == live.resource_version().as_deref()
                    && c.unchanged_for() > self.claim_grace
            })
    }

    /// Whether `ip` is carried by another device of `m`, or by another live machine.
    fn carried_elsewhere(&self, m: &MachineView<'_>, device: usize, ip: Ipv4Addr) -> bool {
        let text = ip.to_string();
        let on_other_device = m
            .devices
            .iter()
            .enumerate()
            .any(|(i, d)| i != device && d.ip_addrs.contains(&text));
        let machine = machine_key(m.namespace, m.name);
        on_other_device || self.caches.index.carried_by_other_than(ip, Some(&machine))
    }

    /// The lease held by an existing claim of this name for this device. Repairs a
    /// half-written pair (an address without its claim, a claim without `status.address`)
    /// and takes the claim over (a write) unless `dry_run`, which only shows the lease.
    pub(super) async fn existing_lease(
        &self,
        m: &MachineView<'_>,
        device: usize,
        pool: &PoolKey,
        claim: &str,
        live_read: bool,
        dry_run: bool,
    ) -> Result<Existing, AssignError> {
        let machine = machine_key(m.namespace, m.name);
        let cached = self.caches.claims.get(&pool.namespace, claim);
        let of_claim = self.caches.index.addresses_of_claim(&pool.namespace, claim);
        if !live_read && cached.is_none() && of_claim.is_empty() {
            return Ok(Existing::Absent);
        }
        let api_err = |action: String, source| AssignError::Api {
            machine: machine.clone(),
            device,
            action,
            source,
        };
        // Read the claim live: the decision must not rest on a lagging cache.
        let live = writer::get_claim(&self.client, &pool.namespace, claim)
            .await
            .map_err(|source| {
                api_err(
                    format!("reading IPClaim {}/{claim}", pool.namespace),
                    source,
                )
            })?;
        if let Some(c) = &live
            && self.refuse_claim(m, device, pool, c)?
        {
            return Ok(Existing::Unusable);
        }
        // The address: the one the claim points at, else one that names the claim.
        let pointed = live
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.name.clone());
        let orphan = of_claim.iter().find(|a| *a.pool == *pool);
        let Some(address_name) = pointed
            .clone()
            .or_else(|| orphan.map(|a| a.name.to_string()))
        else {
            // A claim without an address: being filled in, or left so long ago that it is
            // the sweep's.
            return Ok(match &live {
                Some(c) if self.is_stale(&pool.namespace, c) => Existing::Unusable,
                _ => Existing::Absent,
            });
        };
        // An address whose claim is gone, left for longer than the grace: the sweep's.
        if live.is_none()
            && m.uid.is_none()
            && orphan.is_some_and(|a| a.since.elapsed() > self.claim_grace)
        {
            return Ok(Existing::Unusable);
        }
        let address = writer::get_address(&self.client, &pool.namespace, &address_name)
            .await
            .map_err(|source| {
                api_err(
                    format!("reading IPAddress {}/{address_name}", pool.namespace),
                    source,
                )
            })?;
        // An address being deleted (by hand, held by a finalizer) is on its way out: handing
        // it out would leave a NIC with an address nothing holds once it goes.
        if address
            .as_ref()
            .is_some_and(|a| a.metadata.deletion_timestamp.is_some())
        {
            return Ok(Existing::Unusable);
        }
        let Some(lease) = address
            .as_ref()
            .and_then(|a| lease_of_address(a, device, pool, claim))
        else {
            return Ok(Existing::Absent);
        };
        if self.carried_elsewhere(m, device, lease.address) {
            return Ok(Existing::Unusable);
        }
        if dry_run {
            return Ok(Existing::Lease(lease));
        }
        if !self
            .take_over(
                m,
                device,
                live.as_ref(),
                pointed.is_some(),
                address_name,
                &lease,
            )
            .await?
        {
            return Ok(Existing::Absent);
        }
        Ok(Existing::Lease(lease))
    }

    /// Makes an existing claim this request's: completes a half-written pair (an address
    /// without its claim, a claim without `status.address`) or, for a complete one, writes
    /// to the claim so that a release decided on the version read before fails its
    /// precondition. False when the claim went away meanwhile.
    async fn take_over(
        &self,
        m: &MachineView<'_>,
        device: usize,
        live: Option<&IPClaim>,
        has_address: bool,
        address_name: String,
        lease: &Lease,
    ) -> Result<bool, AssignError> {
        let (pool, claim) = (&lease.pool, lease.claim.as_str());
        let api_err = |action: String, source| AssignError::Api {
            machine: machine_key(m.namespace, m.name),
            device,
            action,
            source,
        };
        match live {
            // The address was written but its claim was not (an interrupted request, or one
            // still running). Written to first, so that the other request's give-back (at
            // the version it created) leaves it alone; gone meanwhile: not taken.
            None => {
                let Some(version) =
                    writer::touch_address(&self.client, &pool.namespace, &address_name, None)
                        .await
                        .map_err(|source| {
                            api_err(
                                format!("taking over IPAddress {}/{address_name}", pool.namespace),
                                source,
                            )
                        })?
                else {
                    return Ok(false);
                };
                crate::fault::delay("after-address-take-over").await;
                let mut written = Written::default();
                written.addresses.push(WrittenAddress {
                    namespace: pool.namespace.clone(),
                    name: address_name,
                    pool: pool.clone(),
                    address: lease.address,
                    claim: claim.to_string(),
                    resource_version: Some(version),
                });
                if !self.record_claim(m, device, lease, &mut written).await? {
                    return Ok(false);
                }
            }
            Some(_) if !has_address => {
                writer::set_claim_address(&self.client, &pool.namespace, claim, &address_name)
                    .await
                    .map_err(|source| {
                        api_err(
                            format!(
                                "setting status.address of IPClaim {}/{claim}",
                                pool.namespace
                            ),
                            source,
                        )
                    })?;
            }
            Some(c) => {
                let taken =
                    writer::touch_claim(&self.client, &pool.namespace, claim, c.uid().as_deref())
                        .await
                        .map_err(|source| {
                            api_err(
                                format!("taking over IPClaim {}/{claim}", pool.namespace),
                                source,
                            )
                        })?;
                if taken.is_none() {
                    // Released (or replaced) an instant ago.
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Deletes what a failed request wrote, newest first: each claim and address only at the
    /// version this request wrote (one another request took over meanwhile stays, and so
    /// does the address of a claim that stays). Failures are logged: the background loop releases whatever is left once
    /// the grace period has passed.
    pub(super) async fn give_back(&self, written: Written) {
        let mut kept: Vec<(String, String)> = Vec::new();
        for c in written.claims.iter().rev() {
            let (ns, name) = (&c.namespace, &c.name);
            self.pending.forget(ns, name);
            tracing::debug!(claim = %format!("{ns}/{name}"), "giving back claim");
            match writer::delete_claim(
                &self.client,
                ns,
                name,
                Only::version(None, c.resource_version.as_deref()),
            )
            .await
            {
                Ok(Deleted::Gone | Deleted::Missing | Deleted::Finalizing) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::info!(claim = %format!("{ns}/{name}"), "claim taken over by another request: kept");
                    kept.push((ns.clone(), name.clone()));
                }
                Err(e) => {
                    tracing::warn!(claim = %format!("{ns}/{name}"), error = %e, "could not give back claim");
                    kept.push((ns.clone(), name.clone()));
                }
            }
        }
        for a in written.addresses.iter().rev() {
            if kept
                .iter()
                .any(|(ns, c)| *ns == a.namespace && *c == a.claim)
            {
                continue;
            }
            let (ns, name) = (&a.namespace, &a.name);
            let only = Only::version(None, a.resource_version.as_deref());
            match writer::delete_address(&self.client, ns, name, only).await {
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    tracing::info!(address = %format!("{ns}/{name}"), "address taken over by another request: kept");
                }
                Ok(_) => {
                    tracing::info!(address = %format!("{ns}/{name}"), "gave back address");
                    let _ = self
                        .caches
                        .index
                        .with_pool(&a.pool, |s| s.observe_released(a.address));
                }
                Err(e) => {
                    tracing::warn!(address = %format!("{ns}/{name}"), error = %e, "could not give back address")
                }
            }
        }
    }
}
