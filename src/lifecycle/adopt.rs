//! Adopt: the claims of existing machines record the machine's uid and our labels.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::api::{Patch as KubePatch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Lifecycle, LifecycleError, api};
use crate::assign::owner_labels;
use crate::cluster::claims::ClaimInfo;
use crate::cluster::crd::{ElfMachine, IPClaim};
use crate::contract::*;

impl Lifecycle {
    /// Records the machine's uid and our labels on the given claims of an existing machine.
    /// The claims must have been read before the machine: a claim made after this machine
    /// was read may belong to a newer machine of the same name. Each patch carries the uid
    /// of the claim as read, so a claim replaced meanwhile is left alone.
    pub(super) async fn adopt_claims(
        &self,
        machine: &ElfMachine,
        claims: &[Arc<ClaimInfo>],
    ) -> Result<(), LifecycleError> {
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
}
