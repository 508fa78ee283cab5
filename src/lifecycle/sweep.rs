//! Sweep: claims whose machine never came to exist, and addresses whose claim is gone, are
//! released after the grace period; claims of removed devices are released.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};

use super::{Lifecycle, MAX_YIELD, api};
use crate::cluster::claims::ClaimInfo;
use crate::cluster::crd::ElfMachine;
use crate::cluster::writer;
use crate::contract::*;

impl Lifecycle {
    /// Releases claims whose machine does not exist (after the grace period), claims bound to
    /// an earlier machine of the same name, and claims of removed devices; binds the claims
    /// of existing machines to their uid.
    pub(super) async fn sweep_claims(&self, machines: &Store<ElfMachine>) {
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
    pub(super) async fn sweep_addresses(&self) {
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

    /// Whether an existing machine no longer owns this claim: bound to another uid, or its
    /// device was removed or no longer takes a static address.
    pub(super) fn claim_is_stale(&self, claim: &ClaimInfo, machine: &ElfMachine) -> bool {
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
}
