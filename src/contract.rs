//! The names this project shares with its peers: CAPE's finalizers and network types, the
//! labels users put on machines and pools, and the names and labels of the IPClaims we write.
//! Everything here is part of the user-facing contract (see DESIGN.md §2) and must not change
//! without a migration.

/// Our finalizer on ElfMachines: the machine is kept until its addresses are released.
/// CAPE (≥ 1.3) waits for it before creating the VM.
pub const STATIC_IP_FINALIZER: &str = "elfmachinestaticip.infrastructure.cluster.x-k8s.io";
/// CAPE's own finalizer: while present, the VM may still exist.
pub const CAPE_FINALIZER: &str = "elfmachine.infrastructure.cluster.x-k8s.io";
/// metal3's finalizer on the IPClaims its controller has seen.
pub const METAL3_CLAIM_FINALIZER: &str = "ipclaim.ipam.metal3.io";
/// metal3's finalizer on the IPAddresses it made or adopted.
pub const METAL3_ADDRESS_FINALIZER: &str = "ipaddress.ipam.metal3.io";

/// metal3's annotation on an IPClaim naming the one address its controller may give it.
pub const METAL3_REQUESTED_IP: &str = "ipAddress";

/// A device with this `networkType` (exactly) takes a static address.
pub const NETWORK_TYPE_STATIC: &str = "IPV4";

/// CAPI's annotation naming the ElfMachineTemplate a machine was cloned from.
pub const ANNOTATION_CLONED_FROM_NAME: &str = "cluster.x-k8s.io/cloned-from-name";

/// Label set on every claim and address we write, to find them again.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGER: &str = "cape-static-ip";
/// `<machine-namespace>-<machine-name>`, as some versions of the Go controller set it
/// (omitted when longer than a label value may be).
pub const LABEL_OWNER_NAME: &str = "cluster.x-k8s.io/ip-owner-name";
/// The owning machine's namespace (label, for selection).
pub const LABEL_MACHINE_NAMESPACE: &str =
    "static-ip.infrastructure.cluster.x-k8s.io/machine-namespace";
/// The owning machine's name (label, for selection; omitted when too long for a label).
pub const LABEL_MACHINE_NAME: &str = "static-ip.infrastructure.cluster.x-k8s.io/machine-name";
/// `<namespace>/<name>` of the owning machine (annotation: exact, any length).
pub const ANNOTATION_MACHINE: &str = "static-ip.infrastructure.cluster.x-k8s.io/machine";
/// The index of the device in `spec.network.devices` (annotation).
pub const ANNOTATION_DEVICE: &str = "static-ip.infrastructure.cluster.x-k8s.io/device-index";
/// The owning machine's uid, recorded once the machine exists (annotation).
pub const ANNOTATION_MACHINE_UID: &str = "static-ip.infrastructure.cluster.x-k8s.io/machine-uid";

/// When a request last took over an existing claim (annotation; its write changes the
/// claim's resourceVersion, which is what matters: see `cluster::writer::touch_claim`).
pub const ANNOTATION_LEASED_AT: &str = "static-ip.infrastructure.cluster.x-k8s.io/leased-at";

/// On an IPAddress kept after its claim was released (`--reuse-delay`): when it was
/// released. The address stays locked ("cooling") until the delay has passed.
pub const ANNOTATION_RELEASED_AT: &str = "static-ip.infrastructure.cluster.x-k8s.io/released-at";

/// Our finalizer on IPPools that hold addresses we wrote: a pool cannot disappear (and be
/// re-created empty) while machines carry its addresses. Removed once none is left.
pub const POOL_FINALIZER: &str = "static-ip.infrastructure.cluster.x-k8s.io/pool-in-use";

/// The longest value a label may have.
pub const MAX_LABEL_VALUE: usize = 63;

/// The IPClaim name for device `index` of a machine: `<namespace>-<name>-<index>`, the Go
/// controller's scheme, so that its claims are found and adopted on take-over.
pub fn claim_name(machine_namespace: &str, machine_name: &str, index: usize) -> String {
    format!("{machine_namespace}-{machine_name}-{index}")
}

/// `<namespace>/<name>`, the value of [`ANNOTATION_MACHINE`].
pub fn machine_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_names_follow_the_go_controller() {
        assert_eq!(
            claim_name("default", "demo-cp-5n7kq", 1),
            "default-demo-cp-5n7kq-1"
        );
        assert_eq!(machine_key("team-a", "m"), "team-a/m");
    }
}
