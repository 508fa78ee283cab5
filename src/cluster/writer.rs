//! Every write this project makes to metal3's objects: create an IPAddress (the lock on an
//! address), create an IPClaim, point the claim at its address, and delete both on release.
//! 404 on delete and 409 on create are answers, not failures: they are returned as values.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use serde_json::json;

use super::crd::{IPAddress, IPAddressSpec, IPClaim, IPClaimSpec};
use crate::ipam::select::PoolKey;

const IPAM_API_VERSION: &str = "ipam.metal3.io/v1alpha1";

/// The outcome of a create that may lose a race.
#[derive(Debug)]
pub enum Created<K> {
    Created(K),
    /// An object of that name exists already (HTTP 409).
    Exists,
}

/// Everything an IPAddress records.
#[derive(Debug, Clone)]
pub struct AddressObject<'a> {
    pub name: &'a str,
    pub pool: &'a PoolKey,
    pub claim: &'a str,
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub dns_servers: &'a [std::net::Ipv4Addr],
    pub labels: &'a BTreeMap<String, String>,
}

fn pool_ref(pool: &PoolKey) -> ObjectReference {
    ObjectReference {
        api_version: Some(IPAM_API_VERSION.into()),
        kind: Some("IPPool".into()),
        name: Some(pool.name.clone()),
        namespace: Some(pool.namespace.clone()),
        ..Default::default()
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Creates the IPAddress, as metal3's controller would (same name and spec), but without an
/// ownerReference to the pool: the garbage collector would delete every address of a deleted
/// pool while machines still carry them (a pool re-created from Git would hand them out
/// again). Pools that hold our addresses carry our finalizer instead.
pub async fn create_address(
    client: &Client,
    a: &AddressObject<'_>,
) -> Result<Created<IPAddress>, kube::Error> {
    let api: Api<IPAddress> = Api::namespaced(client.clone(), &a.pool.namespace);
    let owner: Option<Vec<OwnerReference>> = None;
    let object = IPAddress {
        metadata: ObjectMeta {
            name: Some(a.name.into()),
            namespace: Some(a.pool.namespace.clone()),
            labels: Some(a.labels.clone()),
            owner_references: owner,
            ..Default::default()
        },
        spec: IPAddressSpec {
            address: a.address.to_string(),
            prefix: Some(a.prefix.into()),
            gateway: a.gateway.map(|g| g.to_string()),
            dns_servers: a.dns_servers.iter().map(|d| d.to_string()).collect(),
            pool: pool_ref(a.pool),
            claim: ObjectReference {
                name: Some(a.claim.into()),
                namespace: Some(a.pool.namespace.clone()),
                ..Default::default()
            },
        },
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => Ok(Created::Created(created)),
        Err(e) if is_status(&e, 409) => Ok(Created::Exists),
        Err(e) => Err(e),
    }
}

/// Creates the IPClaim for one device in the pool's namespace.
pub async fn create_claim(
    client: &Client,
    pool: &PoolKey,
    name: &str,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
) -> Result<Created<IPClaim>, kube::Error> {
    let api: Api<IPClaim> = Api::namespaced(client.clone(), &pool.namespace);
    let object = IPClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(pool.namespace.clone()),
            labels: Some(labels.clone()),
            annotations: Some(annotations.clone()),
            ..Default::default()
        },
        spec: IPClaimSpec {
            pool: pool_ref(pool),
        },
        status: None,
    };
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => Ok(Created::Created(created)),
        Err(e) if is_status(&e, 409) => Ok(Created::Exists),
        Err(e) => Err(e),
    }
}

/// Points a claim's `status.address` at its IPAddress; returns the claim's new
/// resourceVersion.
pub async fn set_claim_address(
    client: &Client,
    namespace: &str,
    claim: &str,
    address: &str,
) -> Result<Option<String>, kube::Error> {
    let api: Api<IPClaim> = Api::namespaced(client.clone(), namespace);
    let patch = json!({"status": {"address": {"name": address, "namespace": namespace}}});
    let claim = api
        .patch_status(claim, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(claim.metadata.resource_version)
}

/// Marks a claim as just taken by a request that reuses it: the write changes its
/// resourceVersion, so a release decided on the older version (a sweep, a failed request's
/// give-back) is refused by its precondition, and the claim is young again for the sweep.
/// Guarded by the claim's uid. `None` when the claim is gone (or replaced).
pub async fn touch_claim(
    client: &Client,
    namespace: &str,
    claim: &str,
    uid: Option<&str>,
) -> Result<Option<String>, kube::Error> {
    touch(
        &Api::<IPClaim>::namespaced(client.clone(), namespace),
        claim,
        uid,
    )
    .await
}

/// Marks an address without its claim as taken over by a request that completes the pair:
/// the write changes its resourceVersion, so the interrupted request's give-back (which
/// deletes only the version it created) leaves it alone. `None` when it is gone (or
/// replaced).
pub async fn touch_address(
    client: &Client,
    namespace: &str,
    address: &str,
    uid: Option<&str>,
) -> Result<Option<String>, kube::Error> {
    touch(
        &Api::<IPAddress>::namespaced(client.clone(), namespace),
        address,
        uid,
    )
    .await
}

/// Writes the leased-at annotation, guarded by the uid; the new resourceVersion, or `None`
/// when the object is gone or replaced.
async fn touch<K>(
    api: &Api<K>,
    name: &str,
    uid: Option<&str>,
) -> Result<Option<String>, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let stamp = crate::fault::now().to_string();
    let patch = json!({"metadata": {
        "uid": uid,
        "annotations": {crate::contract::ANNOTATION_LEASED_AT: stamp},
    }});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(o) => Ok(o.meta().resource_version.clone()),
        Err(e) if is_status(&e, 404) || is_status(&e, 409) || is_status(&e, 422) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Keeps a released address as a lock while `--reuse-delay` runs: annotated with when it was
/// released (guarded as `only` says). Its claim is gone; the background loop deletes it once the
/// delay has passed, and a pool with no other free address takes it back at once.
pub async fn cool_address(
    client: &Client,
    namespace: &str,
    name: &str,
    only: Only<'_>,
) -> Result<Deleted, kube::Error> {
    let api: Api<IPAddress> = Api::namespaced(client.clone(), namespace);
    let mut patch = json!({"metadata": {
        "annotations": {
            crate::contract::ANNOTATION_RELEASED_AT: crate::fault::now().to_string(),
        },
    }});
    // Preconditions: a merge patch naming another uid or resourceVersion is refused.
    if let Some(uid) = only.uid {
        patch["metadata"]["uid"] = json!(uid);
    }
    if let Some(version) = only.resource_version {
        patch["metadata"]["resourceVersion"] = json!(version);
    }
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(Deleted::Gone),
        Err(e) if is_status(&e, 404) => Ok(Deleted::Missing),
        Err(e) => Err(e),
    }
}

/// Whether a failed write may still have been stored: only an answer from the apiserver that
/// refuses the request (a 4xx status) says it was not. A transport error, a timeout or a 5xx
/// after the request was sent is "maybe written".
pub fn maybe_written(e: &kube::Error) -> bool {
    !matches!(e, kube::Error::Api(s) if (400..500).contains(&s.code))
}

/// Reads a claim; `None` when it does not exist.
pub async fn get_claim(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<IPClaim>, kube::Error> {
    Api::<IPClaim>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
}

/// Reads an address; `None` when it does not exist.
pub async fn get_address(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Option<IPAddress>, kube::Error> {
    Api::<IPAddress>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// There was no such object.
    Missing,
    /// The object is gone.
    Gone,
    /// The object is being deleted but waits for finalizers.
    Finalizing,
}

/// Which object a delete may remove: with `uid`, only that object (not a later one of the
/// same name); with `resource_version` too, only that version of it (a change since the
/// decision is answered 409 and the object stays).
#[derive(Debug, Clone, Copy, Default)]
pub struct Only<'a> {
    pub uid: Option<&'a str>,
    pub resource_version: Option<&'a str>,
}

impl<'a> Only<'a> {
    /// Any object of the name.
    pub const ANY: Only<'static> = Only {
        uid: None,
        resource_version: None,
    };

    /// The object with this uid, whatever its version.
    pub fn uid(uid: Option<&'a str>) -> Self {
        Only {
            uid,
            resource_version: None,
        }
    }

    /// This version of the object with this uid.
    pub fn version(uid: Option<&'a str>, resource_version: Option<&'a str>) -> Self {
        Only {
            uid,
            resource_version,
        }
    }
}

/// Deletes a claim, guarded by `only`.
pub async fn delete_claim(
    client: &Client,
    namespace: &str,
    name: &str,
    only: Only<'_>,
) -> Result<Deleted, kube::Error> {
    delete(
        Api::<IPClaim>::namespaced(client.clone(), namespace),
        name,
        only,
    )
    .await
}

/// Deletes an address, guarded by `only`.
pub async fn delete_address(
    client: &Client,
    namespace: &str,
    name: &str,
    only: Only<'_>,
) -> Result<Deleted, kube::Error> {
    delete(
        Api::<IPAddress>::namespaced(client.clone(), namespace),
        name,
        only,
    )
    .await
}

async fn delete<K>(api: Api<K>, name: &str, only: Only<'_>) -> Result<Deleted, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let params = DeleteParams {
        preconditions: (only.uid.is_some() || only.resource_version.is_some()).then(|| {
            Preconditions {
                uid: only.uid.map(Into::into),
                resource_version: only.resource_version.map(Into::into),
            }
        }),
        ..Default::default()
    };
    match api.delete(name, &params).await {
        // The object comes back (or a Status); it is still there only while finalizers
        // hold it.
        Ok(answer) => match answer.left() {
            Some(object)
                if object
                    .meta()
                    .finalizers
                    .as_ref()
                    .is_some_and(|f| !f.is_empty()) =>
            {
                Ok(Deleted::Finalizing)
            }
            _ => Ok(Deleted::Gone),
        },
        Err(e) if is_status(&e, 404) => Ok(Deleted::Missing),
        Err(e) => Err(e),
    }
}

/// Removes the given finalizers from an object that is being deleted (a peer that would
/// remove them may not run: metal3's controller is replaced by this project). Guarded by the
/// object's resourceVersion. Returns whether the object still exists.
pub async fn drop_finalizers<K>(
    api: &Api<K>,
    name: &str,
    finalizers: &[&str],
) -> Result<bool, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = api.get_metadata_opt(name).await? else {
        return Ok(false);
    };
    let meta = &object.metadata;
    let current = meta.finalizers.clone().unwrap_or_default();
    if meta.deletion_timestamp.is_none()
        || !current.iter().any(|f| finalizers.contains(&f.as_str()))
    {
        return Ok(true);
    }
    let remaining: Vec<&String> = current
        .iter()
        .filter(|f| !finalizers.contains(&f.as_str()))
        .collect();
    let patch =
        json!({"metadata": {"finalizers": remaining, "resourceVersion": meta.resource_version}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(true),
        Err(e) if is_status(&e, 404) => Ok(false),
        Err(e) => Err(e),
    }
}
