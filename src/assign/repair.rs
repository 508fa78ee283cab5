//! Repair: a claim that exists already keeps its address (a retried request, a wiped
//! `ipAddrs`, a take-over), half-written pairs are completed, and what a failed request
//! wrote is given back.

use std::net::Ipv4Addr;

use kube::ResourceExt;

use super::lease::lease_of_address;
use super::{AssignError, Assigner, CLAIM_WAIT_STEP, CLAIM_WAIT_TRIES, Lease, MachineView};
use crate::cluster::writer::{self};
use crate::contract::*;
use crate::ipam::select::PoolKey;

/// What one request wrote, to give back on failure.
#[derive(Debug, Default)]
pub(super) struct Written {
    pub(super) addresses: Vec<(String, String, PoolKey, Ipv4Addr)>,
    pub(super) claims: Vec<(String, String)>,
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
            if let Some(lease) = self
                .existing_lease(m, device, pool, claim, true, false)
                .await?
            {
                return Ok(lease);
            }
            tokio::time::sleep(CLAIM_WAIT_STEP).await;
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

    /// The lease held by an existing claim of this device, if any. Repairs a half-written
    /// pair (an address without its claim, a claim without `status.address`) unless
    /// `dry_run`, which only shows the lease.
    pub(super) async fn existing_lease(
        &self,
        m: &MachineView<'_>,
        device: usize,
        pool: &PoolKey,
        claim: &str,
        live_read: bool,
        dry_run: bool,
    ) -> Result<Option<Lease>, AssignError> {
        let machine = machine_key(m.namespace, m.name);
        let cached = self.caches.claims.get(&pool.namespace, claim);
        let of_claim = self.caches.index.addresses_of_claim(&pool.namespace, claim);
        if !live_read && cached.is_none() && of_claim.is_empty() {
            return Ok(None);
        }
        // Read the claim live: the decision must not rest on a lagging cache.
        let live = writer::get_claim(&self.client, &pool.namespace, claim)
            .await
            .map_err(|source| AssignError::Api {
                machine: machine.clone(),
                device,
                action: format!("reading IPClaim {}/{claim}", pool.namespace),
                source,
            })?;
        if let Some(c) = &live {
            let owner = c.annotations().get(ANNOTATION_MACHINE);
            if owner.is_some_and(|o| *o != machine) {
                return Err(AssignError::Conflict {
                    machine,
                    device,
                    reason: format!(
                        "IPClaim {}/{claim} belongs to ElfMachine {}; rename one of the machines",
                        pool.namespace,
                        owner.map(String::as_str).unwrap_or_default()
                    ),
                });
            }
            // Bound to an earlier machine of this name (deleted without its release, e.g. its
            // finalizers removed by hand): never reused; the sweep releases it.
            if let Some(bound) = c.annotations().get(ANNOTATION_MACHINE_UID)
                && m.uid != Some(bound.as_str())
            {
                return Err(AssignError::Conflict {
                    machine,
                    device,
                    reason: format!(
                        "IPClaim {}/{claim} is bound to an earlier ElfMachine of this name (uid {bound}); it is released within --claim-grace once that machine is gone (or delete the claim); retry then",
                        pool.namespace
                    ),
                });
            }
            let claim_pool = c.spec.pool.name.as_deref().unwrap_or_default();
            if claim_pool != pool.name {
                return Ok(None);
            }
        }
        // The address: the one the claim points at, else one that names the claim.
        let pointed = live
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.name.clone());
        let address_name = match pointed {
            Some(name) => Some(name),
            None => of_claim
                .iter()
                .find(|a| *a.pool == *pool)
                .map(|a| a.name.to_string()),
        };
        let Some(address_name) = address_name else {
            return Ok(None);
        };
        let address = writer::get_address(&self.client, &pool.namespace, &address_name)
            .await
            .map_err(|source| AssignError::Api {
                machine: machine.clone(),
                device,
                action: format!("reading IPAddress {}/{address_name}", pool.namespace),
                source,
            })?;
        let Some(address) = address else {
            return Ok(None);
        };
        let Some(lease) = lease_of_address(&address, device, pool, claim) else {
            return Ok(None);
        };
        if dry_run {
            return Ok(Some(lease));
        }
        if live.is_none() {
            // The address was written but its claim was not (an interrupted request).
            let mut written = Written::default();
            written.addresses.push((
                pool.namespace.clone(),
                address_name,
                pool.clone(),
                lease.address,
            ));
            if !self.record_claim(m, device, &lease, &mut written).await? {
                return Ok(None);
            }
        } else if live
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.address.as_ref())
            .is_none()
        {
            writer::set_claim_address(&self.client, &pool.namespace, claim, &address_name)
                .await
                .map_err(|source| AssignError::Api {
                    machine,
                    device,
                    action: format!(
                        "setting status.address of IPClaim {}/{claim}",
                        pool.namespace
                    ),
                    source,
                })?;
        }
        Ok(Some(lease))
    }

    /// Deletes what a failed request wrote, newest first. Failures are logged: the sweeper
    /// removes whatever is left once its grace period has passed.
    pub(super) async fn give_back(&self, written: Written) {
        for (ns, name) in written.claims.iter().rev() {
            tracing::debug!(claim = %format!("{ns}/{name}"), "giving back claim");
            if let Err(e) = writer::delete_claim(&self.client, ns, name, None).await {
                tracing::warn!(claim = %format!("{ns}/{name}"), error = %e, "could not give back claim");
            }
        }
        for (ns, name, pool, ip) in written.addresses.iter().rev() {
            match writer::delete_address(&self.client, ns, name, None).await {
                Ok(_) => {
                    tracing::info!(address = %format!("{ns}/{name}"), "gave back address");
                    let _ = self
                        .caches
                        .index
                        .with_pool(pool, |s| s.observe_released(*ip));
                }
                Err(e) => {
                    tracing::warn!(address = %format!("{ns}/{name}"), error = %e, "could not give back address")
                }
            }
        }
    }
}
