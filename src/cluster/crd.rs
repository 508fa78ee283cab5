//! Typed views of the custom resources we read and write: metal3's `IPPool`, `IPClaim` and
//! `IPAddress` (ipam.metal3.io/v1alpha1) and CAPE's `ElfMachine` and `ElfMachineTemplate`
//! (infrastructure.cluster.x-k8s.io/v1beta1).
//!
//! They model only the fields this project uses. We never write an object back from these
//! types (which would drop the fields they do not model): existing objects are changed with
//! explicit JSON patches, and only objects we create ourselves are serialized whole.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// metal3 `IPPool`.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "ipam.metal3.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    namespaced,
    status = "IPPoolStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolSpec {
    #[serde(default)]
    pub name_prefix: String,
    #[serde(default)]
    pub pools: Vec<IPPoolRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pre_allocations: BTreeMap<String, String>,
    /// `sequential` (default) or `random`; metal3 ≥ 1.14.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_strategy: Option<String>,
}

/// One entry of `IPPool.spec.pools`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolRange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
}

/// `IPPool.status`, as metal3 writes it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPPoolStatus {
    /// claim name → address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub indexes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
}

/// metal3 `IPClaim`.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "ipam.metal3.io",
    version = "v1alpha1",
    kind = "IPClaim",
    plural = "ipclaims",
    namespaced,
    status = "IPClaimStatus"
)]
#[serde(rename_all = "camelCase")]
pub struct IPClaimSpec {
    pub pool: ObjectReference,
}

/// `IPClaim.status`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPClaimStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<ObjectReference>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
}

/// metal3 `IPAddress`. Its name `<namePrefix>-<ip>` is the lock on the address.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "ipam.metal3.io",
    version = "v1alpha1",
    kind = "IPAddress",
    plural = "ipaddresses",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressSpec {
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    pub pool: ObjectReference,
    pub claim: ObjectReference,
}

impl IPAddress {
    /// The pool's namespace: `spec.pool.namespace`, else the address's own.
    pub fn pool_namespace(&self) -> String {
        or_own_namespace(&self.spec.pool, self)
    }

    /// The claim's namespace: `spec.claim.namespace`, else the address's own.
    pub fn claim_namespace(&self) -> String {
        or_own_namespace(&self.spec.claim, self)
    }
}

fn or_own_namespace(reference: &ObjectReference, address: &IPAddress) -> String {
    reference
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .or_else(|| address.metadata.namespace.clone())
        .unwrap_or_default()
}

/// CAPE `ElfMachine`: only the network part is modelled.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1beta1",
    kind = "ElfMachine",
    plural = "elfmachines",
    namespaced
)]
#[serde(rename_all = "camelCase")]
pub struct ElfMachineSpec {
    #[serde(default)]
    pub network: NetworkSpec,
}

/// `ElfMachine.spec.network`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    #[serde(default, deserialize_with = "null_as_default")]
    pub devices: Vec<NetworkDevice>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nameservers: Vec<String>,
}

/// One entry of `ElfMachine.spec.network.devices`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDevice {
    #[serde(default)]
    pub network_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ip_addrs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netmask: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub routes: Vec<NetworkRoute>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses_from_pools: Vec<TypedLocalObjectReference>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nameservers: Vec<String>,
}

/// One entry of a device's `routes`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netmask: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

/// A typed reference as used in `addressesFromPools`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypedLocalObjectReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

/// CAPE `ElfMachineTemplate`: we read only its metadata (labels select the pool).
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "infrastructure.cluster.x-k8s.io",
    version = "v1beta1",
    kind = "ElfMachineTemplate",
    plural = "elfmachinetemplates",
    namespaced
)]
pub struct ElfMachineTemplateSpec {
    #[serde(default)]
    pub template: serde_json::Value,
}

/// Treats an explicit JSON `null` like a missing field.
fn null_as_default<'de, D, T>(de: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(de)?.unwrap_or_default())
}
