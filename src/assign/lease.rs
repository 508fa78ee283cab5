//! What a device obtains (a [`Lease`]) and the labels and annotations that name its owner.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::MachineView;
use crate::cluster::crd::IPAddress;
use crate::contract::*;
use crate::ipam::pool::Pool;
use crate::ipam::select::PoolKey;

/// An address held by one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub device: usize,
    pub pool: PoolKey,
    pub claim: String,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
}

pub(super) fn lease_of(
    pool: &Pool,
    device: usize,
    key: &PoolKey,
    claim: &str,
    ip: Ipv4Addr,
) -> Lease {
    let range = pool.range_of(ip);
    Lease {
        device,
        pool: key.clone(),
        claim: claim.to_string(),
        address: ip,
        prefix: range.map(|r| r.prefix).unwrap_or(32),
        gateway: range.and_then(|r| r.gateway),
        dns_servers: range.map(|r| r.dns_servers.clone()).unwrap_or_default(),
    }
}

/// The lease an existing IPAddress describes (as metal3 or the Go controller wrote it).
pub(super) fn lease_of_address(
    a: &IPAddress,
    device: usize,
    pool: &PoolKey,
    claim: &str,
) -> Option<Lease> {
    Some(Lease {
        device,
        pool: pool.clone(),
        claim: claim.to_string(),
        address: a.spec.address.parse().ok()?,
        prefix: a
            .spec
            .prefix
            .and_then(|p| u8::try_from(p).ok())
            .filter(|p| (1..=32).contains(p))?,
        gateway: a.spec.gateway.as_deref().and_then(|g| g.parse().ok()),
        dns_servers: a
            .spec
            .dns_servers
            .iter()
            .filter_map(|d| d.parse().ok())
            .collect(),
    })
}

/// Labels on the claims and addresses we write.
pub fn owner_labels(namespace: &str, name: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_string(), MANAGER.to_string()),
        (LABEL_MACHINE_NAMESPACE.to_string(), namespace.to_string()),
    ]);
    if name.len() <= MAX_LABEL_VALUE {
        labels.insert(LABEL_MACHINE_NAME.to_string(), name.to_string());
    }
    let owner = format!("{namespace}-{name}");
    if owner.len() <= MAX_LABEL_VALUE {
        labels.insert(LABEL_OWNER_NAME.to_string(), owner);
    }
    labels
}

pub(super) fn owner_annotations(m: &MachineView<'_>, device: usize) -> BTreeMap<String, String> {
    let mut annotations = BTreeMap::from([
        (
            ANNOTATION_MACHINE.to_string(),
            machine_key(m.namespace, m.name),
        ),
        (ANNOTATION_DEVICE.to_string(), device.to_string()),
    ]);
    if let Some(uid) = m.uid {
        annotations.insert(ANNOTATION_MACHINE_UID.to_string(), uid.to_string());
    }
    annotations
}
