//! Gives every device of a machine that needs a static address one address: selects the
//! pool, reserves a candidate in the in-memory index, records it as an IPAddress (the lock)
//! and then an IPClaim pointing at it, and gives back everything it wrote when any device
//! fails (all or nothing). The same code serves admission and the background reconciler.
//!
//! `lease` holds what a device obtains and the labels written with it, `repair` completes or
//! gives back half-written claim/address pairs, `outcome` counts and announces each result.

mod lease;
mod outcome;
pub mod pending;
mod repair;

pub use lease::{Lease, owner_labels};
pub use outcome::Activity;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, ResourceExt};

use crate::cluster::cache::Caches;
use crate::cluster::crd::{ElfMachineTemplate, NetworkDevice};
use crate::cluster::index::PoolUnavailable;
use crate::cluster::writer::{self, AddressObject, Created, Only};
use crate::contract::*;
use crate::events::Events;
use crate::ipam::allocate::AllocError;
use crate::ipam::pool::address_name;
use crate::ipam::select::{self, DeviceRequest, PoolKey};
use crate::metrics::Metrics;
use lease::{lease_of, owner_annotations};
use repair::{Existing, Written, WrittenAddress, WrittenClaim};

/// How many times one device retries after losing an address to another writer (409)
/// before giving up on a pool.
const MAX_CONFLICTS: usize = 64;
/// How long to wait for a claim that another request is filling in.
const CLAIM_WAIT_TRIES: usize = 20;
const CLAIM_WAIT_STEP: Duration = Duration::from_millis(100);

/// The machine as admission sees it.
#[derive(Debug, Clone)]
pub struct MachineView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Known once the machine exists (UPDATE, reconciler); never at CREATE.
    pub uid: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
    pub devices: &'a [NetworkDevice],
}

/// Why a machine could not get its addresses. Every message names the machine, the device
/// and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error("ElfMachine {machine} device {device}: {reason}")]
    NoPool {
        machine: String,
        device: usize,
        reason: String,
    },
    #[error("ElfMachine {machine} device {device}: {reason}; fix the IPPool or choose another")]
    BadPool {
        machine: String,
        device: usize,
        reason: String,
    },
    #[error(
        "ElfMachine {machine} device {device}: no free address in {tried}; add a range to the pool, free addresses, or label another pool"
    )]
    Exhausted {
        machine: String,
        device: usize,
        tried: String,
    },
    #[error("ElfMachine {machine} device {device}: {reason}")]
    Conflict {
        machine: String,
        device: usize,
        reason: String,
    },
    #[error("ElfMachine {machine} device {device}: {reason}")]
    Capped {
        machine: String,
        device: usize,
        reason: String,
    },
    #[error("ElfMachine {machine} device {device}: {action} failed: {source}")]
    Api {
        machine: String,
        device: usize,
        action: String,
        #[source]
        source: kube::Error,
    },
}

impl AssignError {
    /// The HTTP-like code of the denial.
    pub fn code(&self) -> u16 {
        match self {
            AssignError::NoPool { .. } => 404,
            AssignError::BadPool { .. } => 422,
            AssignError::Exhausted { .. } => 409,
            AssignError::Conflict { .. } => 409,
            AssignError::Capped { .. } => 429,
            AssignError::Api { .. } => 503,
        }
    }

    /// The `result` label of a failed allocation in `cape_static_ip_allocations_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AssignError::NoPool { .. } => "no_pool",
            AssignError::BadPool { .. } => "bad_pool",
            AssignError::Exhausted { .. } => "exhausted",
            AssignError::Conflict { .. } => "conflict",
            AssignError::Capped { .. } => "pending_cap",
            AssignError::Api { .. } => "api_error",
        }
    }
}

/// Whether a device takes a static address that it does not have yet.
pub fn needs_address(device: &NetworkDevice) -> bool {
    device.network_type == NETWORK_TYPE_STATIC && device.ip_addrs.is_empty()
}

/// Assigns addresses; shared by admission and the reconciler.
#[derive(Clone)]
pub struct Assigner {
    pub client: Client,
    pub caches: Caches,
    pub default_namespace: String,
    /// Allocation counters (by pool and result).
    pub metrics: Arc<Metrics>,
    /// Events on pools (and machines that exist), published off the request path.
    pub events: Events,
    /// When addresses were last assigned (background housekeeping yields to a burst).
    pub activity: Arc<Activity>,
    /// A claim unchanged for less than this may belong to a request still in admission
    /// (`--claim-grace`): a CREATE reuses only such a claim, older ones are the sweep's.
    pub claim_grace: Duration,
    /// Claims written at CREATE whose machine has not appeared yet, capped.
    pub pending: Arc<pending::PendingClaims>,
}

impl Assigner {
    /// Gives an address to every device of `m` that needs one. With `dry_run`, shows what
    /// would be chosen and writes nothing.
    pub async fn assign(
        &self,
        m: &MachineView<'_>,
        dry_run: bool,
    ) -> Result<Vec<Lease>, AssignError> {
        let wanted: Vec<usize> = (0..m.devices.len())
            .filter(|&i| needs_address(&m.devices[i]))
            .collect();
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        if !dry_run {
            self.activity.touch();
        }
        let template_labels = self.template_labels(m).await;
        let mut leases = Vec::new();
        let mut written = Written::default();
        for &device in &wanted {
            let result = self
                .lease_device(
                    m,
                    device,
                    template_labels.as_ref(),
                    &leases,
                    dry_run,
                    &mut written,
                )
                .await;
            match result {
                Ok(lease) => leases.push(lease),
                Err(e) => {
                    self.give_back(written).await;
                    if !dry_run {
                        self.record_failure(m, &e);
                    }
                    return Err(e);
                }
            }
        }
        if !dry_run {
            self.record_success(m, &leases);
        }
        Ok(leases)
    }

    /// The labels of the machine's ElfMachineTemplate (annotation `cloned-from-name`), from
    /// the cache, else read live (the template may have been created an instant ago).
    async fn template_labels(
        &self,
        m: &MachineView<'_>,
    ) -> Option<Result<BTreeMap<String, String>, String>> {
        let name = m.annotations.get(ANNOTATION_CLONED_FROM_NAME)?;
        let key = ObjectRef::<ElfMachineTemplate>::new(name).within(m.namespace);
        if let Some(t) = self.caches.templates.get(&key) {
            return Some(Ok(t.labels().clone()));
        }
        let api: Api<ElfMachineTemplate> = Api::namespaced(self.client.clone(), m.namespace);
        Some(match api.get_metadata_opt(name).await {
            Ok(Some(t)) => Ok(t.labels().clone()),
            Ok(None) => Err(format!(
                "its ElfMachineTemplate {}/{name} (annotation {ANNOTATION_CLONED_FROM_NAME}) does not exist",
                m.namespace
            )),
            Err(e) => Err(format!(
                "reading ElfMachineTemplate {}/{name} failed: {e}",
                m.namespace
            )),
        })
    }

    /// Leases one device: an existing claim of this machine for it when one can serve it,
    /// else a new address and claim from the first selected pool with a free address.
    async fn lease_device(
        &self,
        m: &MachineView<'_>,
        device: usize,
        template: Option<&Result<BTreeMap<String, String>, String>>,
        earlier: &[Lease],
        dry_run: bool,
        written: &mut Written,
    ) -> Result<Lease, AssignError> {
        let machine = machine_key(m.namespace, m.name);
        let candidates = self.select_pools(m, device, template)?;
        // A claim that exists already (a retried request, a wiped ipAddrs, the Go
        // controller's claim on take-over) keeps its address, unless it cannot serve this
        // device (another device carries its address, it belongs to someone else, ...).
        let names = self.claim_names(m, device);
        let mut unusable = Vec::new();
        for pool in &candidates {
            for claim in &names {
                match self
                    .existing_lease(m, device, pool, claim, false, dry_run)
                    .await?
                {
                    Existing::Lease(lease) => return Ok(lease),
                    Existing::Unusable => unusable.push(claim.clone()),
                    Existing::Absent => {}
                }
            }
        }
        let claim = self.free_claim_name(m, device, &candidates, &unusable);
        let mut full = Vec::new();
        for pool in &candidates {
            if dry_run {
                match self.peek(m, device, pool, &claim, earlier)? {
                    Some(lease) => return Ok(lease),
                    None => {
                        full.push(pool.to_string());
                        continue;
                    }
                }
            }
            // At CREATE (no uid yet), the claim counts as pending until the machine appears.
            let pending = match m.uid {
                None => Some(
                    self.pending
                        .reserve(&machine, pool, &claim, &self.caches)
                        .map_err(|reason| AssignError::Capped {
                            machine: machine.clone(),
                            device,
                            reason,
                        })?,
                ),
                Some(_) => None,
            };
            match self.take_address(m, device, pool, &claim, written).await? {
                Some(lease) => {
                    if self.record_claim(m, device, &lease, written).await? {
                        if let Some(counted) = pending {
                            counted.keep();
                        }
                        return Ok(lease);
                    }
                    // The same request is being served elsewhere: its claim wins.
                    if let Some(ours) = written.addresses.pop() {
                        self.give_back(Written {
                            addresses: vec![ours],
                            claims: Vec::new(),
                        })
                        .await;
                    }
                    return self.wait_for_claim(m, device, pool, &claim).await;
                }
                None => full.push(pool.to_string()),
            }
        }
        Err(AssignError::Exhausted {
            machine,
            device,
            tried: full.join(", "),
        })
    }

    /// The pools a device may take an address from, in the order to try them.
    fn select_pools(
        &self,
        m: &MachineView<'_>,
        device: usize,
        template: Option<&Result<BTreeMap<String, String>, String>>,
    ) -> Result<Vec<PoolKey>, AssignError> {
        let pool_ref = m.devices[device]
            .addresses_from_pools
            .first()
            .filter(|r| names_metal3_pool(r.api_group.as_deref(), &r.kind))
            .map(|r| r.name.as_str());
        let request = DeviceRequest {
            machine_namespace: m.namespace,
            machine_labels: m.labels,
            template_labels: template.and_then(|t| t.as_ref().ok()),
            pool_ref,
        };
        let metas = self.caches.index.pool_metas();
        let selection = select::select(&request, &metas, &self.default_namespace).map_err(|e| {
            let mut reason = e.to_string();
            if let Some(Err(t)) = template {
                reason.push_str(&format!(" ({t})"));
            }
            AssignError::NoPool {
                machine: machine_key(m.namespace, m.name),
                device,
                reason,
            }
        })?;
        // A pool being deleted gives no new address (it waits for its addresses to go).
        let (live, deleting): (Vec<PoolKey>, Vec<PoolKey>) =
            selection.candidates.into_iter().partition(|k| {
                self.caches
                    .pools
                    .get(&ObjectRef::new(&k.name).within(&k.namespace))
                    .is_none_or(|p| p.metadata.deletion_timestamp.is_none())
            });
        if live.is_empty()
            && let Some(first) = deleting.first()
        {
            return Err(AssignError::NoPool {
                machine: machine_key(m.namespace, m.name),
                device,
                reason: format!(
                    "IPPool {first} is being deleted (it stays until no machine holds its addresses); choose another pool"
                ),
            });
        }
        Ok(live)
    }

    /// The claim names that may already hold this device's address: the Go controller's
    /// `<ns>-<name>-<device>`, then any other claim of ours recorded for this device index.
    fn claim_names(&self, m: &MachineView<'_>, device: usize) -> Vec<String> {
        let base = claim_name(m.namespace, m.name, device);
        let mut others: Vec<String> = self
            .caches
            .claims
            .of_machine(&machine_key(m.namespace, m.name))
            .iter()
            .filter(|c| *c.name != *base)
            .filter(|c| c.device.as_deref() == Some(device.to_string().as_str()))
            .map(|c| c.name.to_string())
            .collect();
        others.sort();
        others.dedup();
        let mut names = vec![base];
        names.extend(others);
        names
    }

    /// A name for a new claim of this device: `<ns>-<name>-<device>` when it is free, else
    /// that name with `-1`, `-2`, ... (the index in a claim's name is a naming scheme, not
    /// an identity). A name taken meanwhile by a concurrent request is settled by its 409.
    fn free_claim_name(
        &self,
        m: &MachineView<'_>,
        device: usize,
        pools: &[PoolKey],
        unusable: &[String],
    ) -> String {
        let base = claim_name(m.namespace, m.name, device);
        let taken = |name: &str| {
            unusable.iter().any(|u| u == name)
                || pools
                    .iter()
                    .any(|p| self.caches.claims.get(&p.namespace, name).is_some())
        };
        if !unusable.contains(&base) {
            return base;
        }
        (1..)
            .map(|n| format!("{base}-{n}"))
            .find(|name| !taken(name))
            .unwrap_or(base)
    }

    /// What a dry run would be given in `pool`, skipping addresses chosen for the request's
    /// earlier devices.
    fn peek(
        &self,
        m: &MachineView<'_>,
        device: usize,
        pool: &PoolKey,
        claim: &str,
        earlier: &[Lease],
    ) -> Result<Option<Lease>, AssignError> {
        let skip: Vec<Ipv4Addr> = earlier.iter().map(|l| l.address).collect();
        self.caches
            .index
            .with_pool(pool, |s| {
                s.peek(claim, &skip)
                    .map(|ip| lease_of(s.pool(), device, pool, claim, ip))
            })
            .map_err(|e| self.unavailable(&machine_key(m.namespace, m.name), device, e))
    }

    fn unavailable(&self, machine: &str, device: usize, e: PoolUnavailable) -> AssignError {
        match e {
            PoolUnavailable::Missing(key) => AssignError::NoPool {
                machine: machine.to_string(),
                device,
                reason: format!("IPPool {key} does not exist"),
            },
            PoolUnavailable::Invalid(reason) => AssignError::BadPool {
                machine: machine.to_string(),
                device,
                reason,
            },
        }
    }

    /// Reserves addresses in `pool` and creates their IPAddress until one create succeeds.
    /// `None` when the pool has no free address. (Long: the reserve/create/commit steps and
    /// the three outcomes of the create read best as one loop.)
    async fn take_address(
        &self,
        m: &MachineView<'_>,
        device: usize,
        pool: &PoolKey,
        claim: &str,
        written: &mut Written,
    ) -> Result<Option<Lease>, AssignError> {
        let machine = machine_key(m.namespace, m.name);
        let index = &self.caches.index;
        let labels = owner_labels(m.namespace, m.name);
        let mut reclaimed = false;
        for _ in 0..MAX_CONFLICTS {
            let reserved = index
                .with_pool(pool, |s| {
                    let mut rng = rand::rng();
                    s.reserve(claim, &mut rng).map(|ip| {
                        let lease = lease_of(s.pool(), device, pool, claim, ip);
                        (ip, lease, address_name(&s.pool().name_prefix, ip))
                    })
                })
                .map_err(|e| self.unavailable(&machine, device, e))?;
            let (ip, lease, name) = match reserved {
                Ok(r) => r,
                // No other free address: the one released longest ago, if any is cooling
                // (`--reuse-delay`), is used rather than denying the machine.
                Err(AllocError::Exhausted(_)) if !reclaimed && self.reclaim_cooling(pool).await => {
                    reclaimed = true;
                    continue;
                }
                Err(AllocError::Exhausted(_)) => return Ok(None),
                Err(e) => {
                    return Err(AssignError::BadPool {
                        machine,
                        device,
                        reason: e.to_string(),
                    });
                }
            };
            let object = AddressObject {
                name: &name,
                pool,
                claim,
                address: ip,
                prefix: lease.prefix,
                gateway: lease.gateway,
                dns_servers: &lease.dns_servers,
                labels: &labels,
            };
            match self.create_address(&object).await {
                Ok(Created::Created(version)) => {
                    crate::fault::point("after-address");
                    crate::fault::delay("after-address").await;
                    let _ = index.with_pool(pool, |s| s.commit(ip));
                    written.addresses.push(WrittenAddress {
                        namespace: pool.namespace.clone(),
                        name,
                        pool: pool.clone(),
                        address: ip,
                        claim: claim.to_string(),
                        resource_version: version,
                    });
                    return Ok(Some(lease));
                }
                Ok(Created::Exists) => {
                    let _ = index.with_pool(pool, |s| {
                        s.unreserve(ip);
                        s.observe_used(ip);
                    });
                    // A pre-allocated address comes back on every try: someone else holds it.
                    let pinned = index
                        .with_pool(pool, |s| s.pool().pre_allocations.get(claim).copied())
                        .ok()
                        .flatten();
                    if pinned == Some(ip) {
                        return Err(AssignError::Conflict {
                            machine,
                            device,
                            reason: format!(
                                "address {ip} is pre-allocated to claim {claim} in IPPool {pool}, but IPAddress {}/{name} already holds it; delete that IPAddress or change spec.preAllocations",
                                pool.namespace
                            ),
                        });
                    }
                }
                Err(source) => {
                    let _ = index.with_pool(pool, |s| s.unreserve(ip));
                    return Err(AssignError::Api {
                        machine,
                        device,
                        action: format!("creating IPAddress {}/{name}", pool.namespace),
                        source,
                    });
                }
            }
        }
        Err(AssignError::Conflict {
            machine,
            device,
            reason: format!(
                "lost {MAX_CONFLICTS} addresses in a row to other writers in IPPool {pool}; retry"
            ),
        })
    }

    /// Deletes the cooling address of `pool` released longest ago (at its uid), so that a
    /// full pool can hand it out again. True when one was freed.
    async fn reclaim_cooling(&self, pool: &PoolKey) -> bool {
        let Some(a) = self.caches.index.oldest_cooling(pool) else {
            return false;
        };
        match writer::delete_address(
            &self.client,
            &a.namespace,
            &a.name,
            Only::uid(a.uid.as_deref()),
        )
        .await
        {
            Ok(_) => {
                tracing::info!(address = %format!("{}/{}", a.namespace, a.name), pool = %pool, "pool full: reusing a cooling address");
                let _ = self
                    .caches
                    .index
                    .with_pool(pool, |s| s.observe_released(a.address));
                true
            }
            Err(e) => {
                tracing::warn!(address = %format!("{}/{}", a.namespace, a.name), error = %e, "could not reuse a cooling address");
                false
            }
        }
    }

    /// Creates an IPAddress. A failure whose outcome is unknown (transport error, timeout,
    /// 5xx) is settled by reading the object back: if it was stored for this claim, it is
    /// ours ("maybe written" is never taken for "not written").
    /// The version created is returned, to give back only that version.
    async fn create_address(
        &self,
        object: &AddressObject<'_>,
    ) -> Result<Created<Option<String>>, kube::Error> {
        let e = match writer::create_address(&self.client, object).await {
            Ok(Created::Created(a)) => return Ok(Created::Created(a.metadata.resource_version)),
            Ok(Created::Exists) => return Ok(Created::Exists),
            Err(e) if !writer::maybe_written(&e) => return Err(e),
            Err(e) => e,
        };
        tracing::warn!(address = %format!("{}/{}", object.pool.namespace, object.name), error = %e, "creating IPAddress: outcome unknown, reading it back");
        match writer::get_address(&self.client, &object.pool.namespace, object.name).await {
            Ok(Some(a))
                if a.spec.claim.name.as_deref() == Some(object.claim)
                    && a.spec.address == object.address.to_string() =>
            {
                Ok(Created::Created(a.metadata.resource_version))
            }
            Ok(Some(_)) => Ok(Created::Exists),
            // Not stored, or unknown: the background loop releases a stored address that no
            // claim points at once the grace period has passed.
            Ok(None) | Err(_) => Err(e),
        }
    }

    /// Creates the claim for a freshly created address and points it at the address.
    /// Returns false when a claim of that name exists already (the same request delivered
    /// twice): the caller gives its address back and takes the claim's. (Long: each of its
    /// two writes has an "outcome unknown" branch that reads the object back.)
    async fn record_claim(
        &self,
        m: &MachineView<'_>,
        device: usize,
        lease: &Lease,
        written: &mut Written,
    ) -> Result<bool, AssignError> {
        let machine = machine_key(m.namespace, m.name);
        let ns = &lease.pool.namespace;
        let labels = owner_labels(m.namespace, m.name);
        let mut annotations = owner_annotations(m, device);
        // metal3's controller, when it runs beside us, allocates only this address for the
        // claim: if its cache has not seen our IPAddress yet, its create fails (409) instead
        // of giving the claim a second address.
        annotations.insert(METAL3_REQUESTED_IP.to_string(), lease.address.to_string());
        let api_err = |action: String, source| AssignError::Api {
            machine: machine.clone(),
            device,
            action,
            source,
        };
        let created = match writer::create_claim(
            &self.client,
            &lease.pool,
            &lease.claim,
            &labels,
            &annotations,
        )
        .await
        {
            Ok(Created::Created(c)) => c.metadata.resource_version,
            Ok(Created::Exists) => return Ok(false),
            Err(source) if writer::maybe_written(&source) => {
                // Stored or not? Ours if it names this machine and this address.
                match writer::get_claim(&self.client, ns, &lease.claim).await {
                    Ok(Some(c))
                        if c.annotations().get(ANNOTATION_MACHINE) == Some(&machine)
                            && c.annotations().get(METAL3_REQUESTED_IP)
                                == Some(&lease.address.to_string()) =>
                    {
                        c.metadata.resource_version
                    }
                    Ok(Some(_)) => return Ok(false),
                    _ => {
                        return Err(api_err(
                            format!("creating IPClaim {ns}/{}", lease.claim),
                            source,
                        ));
                    }
                }
            }
            Err(source) => {
                return Err(api_err(
                    format!("creating IPClaim {ns}/{}", lease.claim),
                    source,
                ));
            }
        };
        crate::fault::point("after-claim");
        written.claims.push(WrittenClaim {
            namespace: ns.clone(),
            name: lease.claim.clone(),
            resource_version: created,
        });
        let address = written
            .addresses
            .last()
            .map(|a| a.name.clone())
            .unwrap_or_default();
        let version = writer::set_claim_address(&self.client, ns, &lease.claim, &address)
            .await
            .map_err(|source| {
                api_err(
                    format!("setting status.address of IPClaim {ns}/{}", lease.claim),
                    source,
                )
            })?;
        crate::fault::point("after-claim-status");
        if let Some(c) = written.claims.last_mut() {
            c.resource_version = version;
        }
        Ok(true)
    }
}

/// Whether an `addressesFromPools` entry names a metal3 IPPool.
pub fn names_metal3_pool(api_group: Option<&str>, kind: &str) -> bool {
    let group = api_group.unwrap_or_default();
    (group == "ipam.metal3.io" && kind == "IPPool") || (group.is_empty() && kind.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metal3_pool_references() {
        assert!(names_metal3_pool(Some("ipam.metal3.io"), "IPPool"));
        assert!(names_metal3_pool(None, ""));
        assert!(!names_metal3_pool(
            Some("ipam.cluster.x-k8s.io"),
            "InClusterIPPool"
        ));
        assert!(!names_metal3_pool(None, "IPPool"));
    }

    #[test]
    fn long_names_skip_labels_but_keep_annotations() {
        let long = "m".repeat(70);
        let labels = owner_labels("ns", &long);
        assert!(!labels.contains_key(LABEL_MACHINE_NAME));
        assert!(!labels.contains_key(LABEL_OWNER_NAME));
        assert_eq!(labels[LABEL_MANAGED_BY], MANAGER);
    }
}
