//! Reconcile: a machine that needs an address but was admitted without us is allocated by
//! the same code as admission and patched with an optimistic lock.

use std::collections::BTreeMap;
use std::sync::Arc;

use json_patch::{Patch, PatchOperation, TestOperation};
use kube::api::{Patch as KubePatch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Lifecycle, LifecycleError, api_err};
use crate::assign::{MachineView, needs_address};
use crate::cluster::claims::ClaimInfo;
use crate::cluster::crd::ElfMachine;
use crate::contract::*;
use crate::events::{self, Note};
use crate::webhook::patch::{self, Extras};

impl Lifecycle {
    /// Allocates for devices that need an address and patches the machine; records the
    /// machine's uid on its claims.
    pub(super) async fn fill_missing(&self, cached: &ElfMachine) -> Result<(), LifecycleError> {
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
}
