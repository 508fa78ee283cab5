//! The allocation state of every pool, kept in memory and fed by the IPPool and IPAddress
//! watches. Admission reads and reserves addresses here without any API call; the apiserver
//! stays the arbiter (a create of an IPAddress that already exists fails with 409), so a
//! lagging watch can cost a retry but never a duplicate.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use kube::ResourceExt;

use super::crd::{IPAddress, IPPool};
use crate::ipam::allocate::PoolState;
use crate::ipam::pool::{Pool, PoolInput, RangeInput, parse_pool};
use crate::ipam::select::{PoolKey, PoolMeta};

/// (namespace, name) of an object.
type ObjectId = (String, String);

/// What the index knows of one pool.
enum Slot {
    Valid(Box<PoolState>),
    /// The pool's spec does not parse; the message names the field to fix.
    Invalid(String),
}

#[derive(Default)]
struct Inner {
    pools: HashMap<PoolKey, Slot>,
    metas: Arc<Vec<PoolMeta>>,
    /// IPAddress object (namespace, name) → the pool, address and claim it holds.
    objects: HashMap<ObjectId, (PoolKey, Ipv4Addr, ObjectId)>,
    /// How many IPAddress objects hold each address of each pool.
    holders: HashMap<PoolKey, HashMap<Ipv4Addr, usize>>,
    /// Claim (namespace, name) → the IPAddress objects naming it in `spec.claim`.
    by_claim: HashMap<(String, String), Vec<AddressOfClaim>>,
}

/// An IPAddress object that names a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressOfClaim {
    /// Namespace and name of the IPAddress object.
    pub namespace: String,
    pub name: String,
    pub pool: PoolKey,
    pub address: Ipv4Addr,
}

/// Shared, thread-safe allocation state. Locks are held only for in-memory work, never
/// across an API call.
#[derive(Default)]
pub struct IpamIndex {
    inner: Mutex<Inner>,
}

/// Why a pool cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolUnavailable {
    #[error("IPPool {0} does not exist")]
    Missing(PoolKey),
    #[error("{0}")]
    Invalid(String),
}

impl IpamIndex {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than stopping would: keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The labels of every known pool, sorted by namespace and name (for pool selection).
    pub fn pool_metas(&self) -> Arc<Vec<PoolMeta>> {
        self.lock().metas.clone()
    }

    /// Runs `f` on the state of one pool.
    pub fn with_pool<R>(
        &self,
        key: &PoolKey,
        f: impl FnOnce(&mut PoolState) -> R,
    ) -> Result<R, PoolUnavailable> {
        let mut inner = self.lock();
        match inner.pools.get_mut(key) {
            Some(Slot::Valid(state)) => Ok(f(state)),
            Some(Slot::Invalid(msg)) => Err(PoolUnavailable::Invalid(msg.clone())),
            None => Err(PoolUnavailable::Missing(key.clone())),
        }
    }

    /// A pool was added or changed.
    pub fn apply_pool(&self, pool: &IPPool) {
        let mut inner = self.lock();
        inner.apply_pool(pool);
        inner.rebuild_metas_with(pool);
    }

    /// A pool was deleted.
    pub fn delete_pool(&self, pool: &IPPool) {
        let mut inner = self.lock();
        let key = pool_key(pool);
        inner.pools.remove(&key);
        let metas: Vec<PoolMeta> = inner
            .metas
            .iter()
            .filter(|m| m.key != key)
            .cloned()
            .collect();
        inner.metas = Arc::new(metas);
    }

    /// The pool watch was (re)listed: `pools` is the complete set.
    pub fn reset_pools(&self, pools: &[IPPool]) {
        let mut inner = self.lock();
        let keep: std::collections::HashSet<PoolKey> = pools.iter().map(pool_key).collect();
        inner.pools.retain(|k, _| keep.contains(k));
        for p in pools {
            inner.apply_pool(p);
        }
        let mut metas: Vec<PoolMeta> = pools.iter().map(pool_meta).collect();
        metas.sort_by(|a, b| a.key.cmp(&b.key));
        inner.metas = Arc::new(metas);
    }

    /// An IPAddress was added or changed.
    pub fn apply_address(&self, address: &IPAddress) {
        self.lock().apply_address(address);
    }

    /// An IPAddress was deleted.
    pub fn delete_address(&self, address: &IPAddress) {
        let id = (address.namespace().unwrap_or_default(), address.name_any());
        self.lock().forget_object(&id);
    }

    /// The address watch was (re)listed: `addresses` is the complete set.
    pub fn reset_addresses(&self, addresses: &[IPAddress]) {
        let mut inner = self.lock();
        let keep: std::collections::HashSet<(String, String)> = addresses
            .iter()
            .map(|a| (a.namespace().unwrap_or_default(), a.name_any()))
            .collect();
        let gone: Vec<(String, String)> = inner
            .objects
            .keys()
            .filter(|k| !keep.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            inner.forget_object(&id);
        }
        for a in addresses {
            inner.apply_address(a);
        }
    }

    /// Used and free addresses of every valid pool.
    pub fn usage(&self) -> Vec<(PoolKey, usize, usize)> {
        let inner = self.lock();
        let mut out: Vec<(PoolKey, usize, usize)> = inner
            .pools
            .iter()
            .filter_map(|(k, slot)| match slot {
                Slot::Valid(s) => Some((k.clone(), s.used(), s.free())),
                Slot::Invalid(_) => None,
            })
            .collect();
        out.sort();
        out
    }

    /// The IPAddress objects whose `spec.claim` names this claim.
    pub fn addresses_of_claim(&self, namespace: &str, claim: &str) -> Vec<AddressOfClaim> {
        self.lock()
            .by_claim
            .get(&(namespace.to_string(), claim.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// Records that `ip` is taken in `key` although the watch has not shown it yet (a create
    /// answered 409).
    pub fn observe_taken(&self, key: &PoolKey, ip: Ipv4Addr) {
        let _ = self.with_pool(key, |s| s.observe_used(ip));
    }
}

impl Inner {
    fn apply_pool(&mut self, pool: &IPPool) {
        let key = pool_key(pool);
        match parse_pool(&pool_input(pool)) {
            Ok(parsed) => match self.pools.get_mut(&key) {
                Some(Slot::Valid(state)) => {
                    if pool_changed(state.pool(), &parsed) {
                        state.replace_pool(parsed);
                    }
                }
                _ => {
                    let known: Vec<Ipv4Addr> = self
                        .holders
                        .get(&key)
                        .map(|h| h.keys().copied().collect())
                        .unwrap_or_default();
                    self.pools
                        .insert(key, Slot::Valid(Box::new(PoolState::new(parsed, known))));
                }
            },
            Err(e) => {
                self.pools.insert(key, Slot::Invalid(e.to_string()));
            }
        }
    }

    fn rebuild_metas_with(&mut self, pool: &IPPool) {
        let meta = pool_meta(pool);
        let mut metas: Vec<PoolMeta> = self
            .metas
            .iter()
            .filter(|m| m.key != meta.key)
            .cloned()
            .collect();
        let at = metas.partition_point(|m| m.key < meta.key);
        metas.insert(at, meta);
        self.metas = Arc::new(metas);
    }

    fn apply_address(&mut self, address: &IPAddress) {
        let id = (address.namespace().unwrap_or_default(), address.name_any());
        let Ok(ip) = address.spec.address.parse::<Ipv4Addr>() else {
            // Not an IPv4 address: it cannot collide with anything we hand out.
            self.forget_object(&id);
            return;
        };
        let pool_ns = address.pool_namespace();
        let key = PoolKey {
            namespace: pool_ns,
            name: address.spec.pool.name.clone().unwrap_or_default(),
        };
        let claim = (
            address.claim_namespace(),
            address.spec.claim.name.clone().unwrap_or_default(),
        );
        if self.objects.get(&id) == Some(&(key.clone(), ip, claim.clone())) {
            return;
        }
        self.forget_object(&id);
        self.objects
            .insert(id.clone(), (key.clone(), ip, claim.clone()));
        self.by_claim
            .entry(claim)
            .or_default()
            .push(AddressOfClaim {
                namespace: id.0.clone(),
                name: id.1.clone(),
                pool: key.clone(),
                address: ip,
            });
        let count = self
            .holders
            .entry(key.clone())
            .or_default()
            .entry(ip)
            .or_insert(0);
        *count += 1;
        if *count == 1
            && let Some(Slot::Valid(state)) = self.pools.get_mut(&key)
        {
            state.observe_used(ip);
        }
    }

    fn forget_object(&mut self, id: &(String, String)) {
        let Some((key, ip, claim)) = self.objects.remove(id) else {
            return;
        };
        if let Some(list) = self.by_claim.get_mut(&claim) {
            list.retain(|a| !(a.name == id.1 && a.namespace == id.0));
            if list.is_empty() {
                self.by_claim.remove(&claim);
            }
        }
        let Some(holders) = self.holders.get_mut(&key) else {
            return;
        };
        let Some(count) = holders.get_mut(&ip) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            holders.remove(&ip);
            if let Some(Slot::Valid(state)) = self.pools.get_mut(&key) {
                state.observe_released(ip);
            }
        }
    }
}

/// `namespace/name` of a pool.
pub fn pool_key(pool: &IPPool) -> PoolKey {
    PoolKey {
        namespace: pool.namespace().unwrap_or_default(),
        name: pool.name_any(),
    }
}

fn pool_meta(pool: &IPPool) -> PoolMeta {
    PoolMeta {
        key: pool_key(pool),
        labels: pool.labels().clone(),
    }
}

/// Converts a metal3 IPPool into the allocator's input.
pub fn pool_input(pool: &IPPool) -> PoolInput {
    let spec = &pool.spec;
    PoolInput {
        namespace: pool.namespace().unwrap_or_default(),
        name: pool.name_any(),
        name_prefix: spec.name_prefix.clone(),
        ranges: spec
            .pools
            .iter()
            .map(|r| RangeInput {
                start: r.start.clone(),
                end: r.end.clone(),
                subnet: r.subnet.clone(),
                prefix: r.prefix,
                gateway: r.gateway.clone(),
                dns_servers: r.dns_servers.clone(),
            })
            .collect(),
        prefix: spec.prefix,
        gateway: spec.gateway.clone(),
        dns_servers: spec.dns_servers.clone(),
        pre_allocations: spec
            .pre_allocations
            .clone()
            .into_iter()
            .collect::<BTreeMap<_, _>>(),
        allocation_strategy: spec.allocation_strategy.clone(),
    }
}

/// Whether a re-parsed pool differs from the one in use (status-only updates do not).
fn pool_changed(old: &Pool, new: &Pool) -> bool {
    old != new
}
