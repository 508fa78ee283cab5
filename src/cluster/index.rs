//! The allocation state of every pool, kept in memory and fed by the IPPool and IPAddress
//! watches. Admission reads and reserves addresses here without any API call; the apiserver
//! stays the arbiter (a create of an IPAddress that already exists fails with 409), so a
//! lagging watch can cost a retry but never a duplicate.
//!
//! Each IPAddress is kept as a small [`AddressInfo`] (what allocation and the background
//! loops read), not as the whole object: 100k cached addresses must fit in a few tens of MB.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::crd::{IPAddress, IPPool};
use super::intern::Interner;
use super::uid::Uid;
use crate::contract::{ANNOTATION_LEASED_AT, ANNOTATION_RELEASED_AT, LABEL_MANAGED_BY, MANAGER};
use crate::ipam::allocate::PoolState;
use crate::ipam::pool::{Pool, PoolInput, RangeInput, parse_pool};
use crate::ipam::select::{PoolKey, PoolMeta};

/// (namespace, name) of an object; the strings are shared with the other maps.
type ObjectId = (Arc<str>, Arc<str>);

/// The IPAddress objects naming one claim: almost always one, kept without an allocation of
/// its own (a few hundred thousand of them add up).
#[derive(Debug)]
enum Ids {
    One(ObjectId),
    Many(Vec<ObjectId>),
}

impl Ids {
    fn as_slice(&self) -> &[ObjectId] {
        match self {
            Ids::One(id) => std::slice::from_ref(id),
            Ids::Many(ids) => ids,
        }
    }

    fn push(&mut self, id: ObjectId) {
        match self {
            Ids::One(first) => *self = Ids::Many(vec![first.clone(), id]),
            Ids::Many(ids) => ids.push(id),
        }
    }

    /// Removes `id`; true when none is left.
    fn remove(&mut self, id: &ObjectId) -> bool {
        match self {
            Ids::One(only) => only == id,
            Ids::Many(ids) => {
                ids.retain(|a| a != id);
                match ids.len() {
                    0 => true,
                    1 => {
                        *self = Ids::One(ids.remove(0));
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

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
    /// IPv4 IPAddress objects by (namespace, name).
    objects: HashMap<ObjectId, Arc<AddressInfo>>,
    /// How many IPAddress objects hold each address of each pool.
    holders: HashMap<Arc<PoolKey>, HashMap<Ipv4Addr, u32>>,
    /// Claim (namespace, name) → the IPAddress objects naming it in `spec.claim`.
    by_claim: HashMap<ObjectId, Ids>,
    /// One shared copy of each namespace and pool key.
    strings: Interner,
    pool_keys: HashSet<Arc<PoolKey>>,
    /// The objects seen since the address watch started a relist.
    relisting: Option<HashSet<ObjectId>>,
    /// Address → the machines (`namespace/name`) whose devices carry it in `ipAddrs`.
    carriers: HashMap<Ipv4Addr, Vec<Arc<str>>>,
    /// Machine (`namespace/name`) → the addresses its devices carry.
    carried_by: HashMap<Arc<str>, Vec<Ipv4Addr>>,
    /// The machines seen since the machine watch started a relist.
    machines_relisting: Option<HashSet<Arc<str>>>,
    /// Per pool, its cooling addresses (released, kept for `--reuse-delay`) by when this
    /// replica saw them released: kept with the objects, so that counting them (each metrics
    /// scrape) and finding the oldest (a full pool) reads no other address.
    cooling: HashMap<Arc<PoolKey>, BTreeSet<(std::time::Instant, ObjectId)>>,
}

/// One IPv4 IPAddress object, as the index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Option<Uid>,
    pub pool: Arc<PoolKey>,
    pub address: Ipv4Addr,
    pub claim_namespace: Arc<str>,
    pub claim: Arc<str>,
    pub created: Option<Timestamp>,
    /// Written by us (label `app.kubernetes.io/managed-by`).
    pub ours: bool,
    /// Has a deletion timestamp.
    pub deleting: bool,
    /// When this replica first saw the object, or saw it taken over by a request (a new
    /// `leased-at`): its monotonic clock, see the claim cache.
    pub since: std::time::Instant,
    /// The `resourceVersion` seen (etcd's revision; `None` if it is not a number): a live
    /// read of another version, or a delete at this one, tells a change since.
    pub version: Option<u64>,
    /// A digest of the `leased-at` annotation (0 without it).
    pub leased: u64,
    /// Released and kept while `--reuse-delay` runs (annotation `released-at`): when this
    /// replica first saw it so.
    pub cooling_since: Option<std::time::Instant>,
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
        let mut inner = self.lock();
        let id = inner.object_id(
            &address.namespace().unwrap_or_default(),
            &address.name_any(),
        );
        inner.forget_object(&id);
    }

    /// The address watch starts a relist: every address it lists comes through
    /// [`IpamIndex::apply_address`], then [`IpamIndex::end_address_relist`] forgets the rest.
    pub fn begin_address_relist(&self) {
        self.lock().relisting = Some(HashSet::new());
    }

    /// The relist is complete: addresses it did not list are gone.
    pub fn end_address_relist(&self) {
        let mut inner = self.lock();
        let Some(seen) = inner.relisting.take() else {
            return;
        };
        let gone: Vec<ObjectId> = inner
            .objects
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for id in gone {
            inner.forget_object(&id);
        }
    }

    /// Every IPv4 IPAddress the watch has shown.
    pub fn addresses(&self) -> Vec<Arc<AddressInfo>> {
        self.lock().objects.values().cloned().collect()
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

    /// The addresses a machine's devices carry now (`namespace/name`); replaces what it
    /// carried before. Carried addresses are never offered by any pool that contains them.
    pub fn carry(&self, machine: &str, addresses: Vec<Ipv4Addr>) {
        let mut inner = self.lock();
        let key: Arc<str> = match inner.carried_by.get_key_value(machine) {
            Some((k, _)) => k.clone(),
            None => machine.into(),
        };
        if let Some(seen) = inner.machines_relisting.as_mut() {
            seen.insert(key.clone());
        }
        inner.set_carried(key, addresses);
    }

    /// A machine is gone: what it carried is free again (unless another machine carries it).
    pub fn forget_machine(&self, machine: &str) {
        let mut inner = self.lock();
        let key: Arc<str> = machine.into();
        inner.set_carried(key, Vec::new());
    }

    /// The machine watch starts a relist; see [`IpamIndex::end_machine_relist`].
    pub fn begin_machine_relist(&self) {
        self.lock().machines_relisting = Some(HashSet::new());
    }

    /// The relist is complete: machines it did not list are gone.
    pub fn end_machine_relist(&self) {
        let mut inner = self.lock();
        let Some(seen) = inner.machines_relisting.take() else {
            return;
        };
        let gone: Vec<Arc<str>> = inner
            .carried_by
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            inner.set_carried(key, Vec::new());
        }
    }

    /// Whether a live machine other than `except` (`namespace/name`; `None`: any machine)
    /// carries `address` on one of its devices: the one rule that keeps an address locked,
    /// claim or no claim.
    pub fn carried_by_other_than(&self, address: Ipv4Addr, except: Option<&str>) -> bool {
        self.lock()
            .carriers
            .get(&address)
            .is_some_and(|m| m.iter().any(|k| Some(&**k) != except))
    }

    /// Cooling addresses (released, kept for `--reuse-delay`) per pool.
    pub fn cooling(&self) -> HashMap<PoolKey, usize> {
        self.lock()
            .cooling
            .iter()
            .map(|(pool, set)| ((**pool).clone(), set.len()))
            .collect()
    }

    /// The cooling address of `pool` released longest ago (by this replica's clock).
    pub fn oldest_cooling(&self, pool: &PoolKey) -> Option<Arc<AddressInfo>> {
        let inner = self.lock();
        let (_, id) = inner.cooling.get(pool)?.first()?;
        inner.objects.get(id).cloned()
    }

    /// The IPAddress objects whose `spec.claim` names this claim.
    pub fn addresses_of_claim(&self, namespace: &str, claim: &str) -> Vec<Arc<AddressInfo>> {
        let inner = self.lock();
        let id: ObjectId = (namespace.into(), claim.into());
        inner
            .by_claim
            .get(&id)
            .map(|ids| {
                ids.as_slice()
                    .iter()
                    .filter_map(|id| inner.objects.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Inner {
    /// Replaces what `machine` carries, and tells every pool about addresses that became
    /// carried or stopped being carried.
    fn set_carried(&mut self, machine: Arc<str>, mut addresses: Vec<Ipv4Addr>) {
        addresses.sort();
        addresses.dedup();
        let before = if addresses.is_empty() {
            self.carried_by.remove(&machine).unwrap_or_default()
        } else {
            self.carried_by
                .insert(machine.clone(), addresses.clone())
                .unwrap_or_default()
        };
        let mut changed = Vec::new();
        for ip in before.iter().filter(|ip| !addresses.contains(ip)) {
            if let Some(list) = self.carriers.get_mut(ip) {
                list.retain(|m| *m != machine);
                if list.is_empty() {
                    self.carriers.remove(ip);
                    changed.push((*ip, false));
                }
            }
        }
        for ip in addresses.iter().filter(|ip| !before.contains(ip)) {
            let list = self.carriers.entry(*ip).or_default();
            if list.is_empty() {
                changed.push((*ip, true));
            }
            list.push(machine.clone());
        }
        for (ip, carried) in changed {
            for slot in self.pools.values_mut() {
                if let Slot::Valid(state) = slot {
                    state.observe_carried(ip, carried);
                }
            }
        }
    }

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
                    let mut state = PoolState::new(parsed, known);
                    for ip in self.carriers.keys() {
                        state.observe_carried(*ip, true);
                    }
                    self.pools.insert(key, Slot::Valid(Box::new(state)));
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

    fn intern(&mut self, s: &str) -> Arc<str> {
        self.strings.get(s)
    }

    fn intern_pool(&mut self, key: PoolKey) -> Arc<PoolKey> {
        if let Some(shared) = self.pool_keys.get(&key) {
            return shared.clone();
        }
        let shared = Arc::new(key);
        self.pool_keys.insert(shared.clone());
        shared
    }

    /// The id of an object, sharing the name with the stored one when there is one.
    fn object_id(&mut self, namespace: &str, name: &str) -> ObjectId {
        let ns = self.intern(namespace);
        let probe: ObjectId = (ns, name.into());
        match self.objects.get_key_value(&probe) {
            Some((id, _)) => id.clone(),
            None => probe,
        }
    }

    fn apply_address(&mut self, address: &IPAddress) {
        let id = self.object_id(
            &address.namespace().unwrap_or_default(),
            &address.name_any(),
        );
        if let Some(seen) = self.relisting.as_mut() {
            seen.insert(id.clone());
        }
        let Ok(ip) = address.spec.address.parse::<Ipv4Addr>() else {
            // Not an IPv4 address: it cannot collide with anything we hand out.
            self.forget_object(&id);
            return;
        };
        let pool = PoolKey {
            namespace: address.pool_namespace(),
            name: address.spec.pool.name.clone().unwrap_or_default(),
        };
        let claim_ns = self.intern(&address.claim_namespace());
        let claim_name = address.spec.claim.name.clone().unwrap_or_default();
        let leased = address
            .annotations()
            .get(ANNOTATION_LEASED_AT)
            .map_or(0, |v| version_digest(Some(v)));
        let info = AddressInfo {
            namespace: id.0.clone(),
            name: id.1.clone(),
            uid: address.uid().map(Uid::from),
            pool: self.intern_pool(pool),
            address: ip,
            claim_namespace: claim_ns,
            claim: Arc::from(claim_name),
            created: address.creation_timestamp().map(|t| t.0),
            ours: address.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGER),
            deleting: address.metadata.deletion_timestamp.is_some(),
            since: self
                .objects
                .get(&id)
                .filter(|old| {
                    old.uid.as_deref() == address.uid().as_deref() && old.leased == leased
                })
                .map_or_else(std::time::Instant::now, |old| old.since),
            version: address.resource_version().and_then(|v| v.parse().ok()),
            leased,
            cooling_since: address
                .annotations()
                .contains_key(ANNOTATION_RELEASED_AT)
                .then(|| {
                    self.objects
                        .get(&id)
                        .and_then(|old| old.cooling_since)
                        .unwrap_or_else(std::time::Instant::now)
                }),
        };
        if let Some(old) = self.objects.get(&id)
            && old.pool == info.pool
            && old.address == ip
            && old.claim_namespace == info.claim_namespace
            && old.claim == info.claim
        {
            // Same holding: only the details change; keep the claim index as it is.
            let claim = old.claim.clone();
            let old = old.clone();
            let info = Arc::new(AddressInfo { claim, ..info });
            self.track_cooling(&id, Some(&old), Some(&info));
            self.objects.insert(id, info);
            return;
        }
        self.forget_object(&id);
        let claim: ObjectId = (info.claim_namespace.clone(), info.claim.clone());
        let key = info.pool.clone();
        let info = Arc::new(info);
        self.track_cooling(&id, None, Some(&info));
        self.objects.insert(id.clone(), info);
        match self.by_claim.get_mut(&claim) {
            Some(ids) => ids.push(id),
            None => {
                self.by_claim.insert(claim, Ids::One(id));
            }
        }
        let count = self
            .holders
            .entry(key.clone())
            .or_default()
            .entry(ip)
            .or_insert(0);
        *count += 1;
        if *count == 1
            && let Some(Slot::Valid(state)) = self.pools.get_mut(&*key)
        {
            state.observe_used(ip);
        }
    }

    /// Keeps [`Inner::cooling`] in step when the object `id` changes from `old` to `new`.
    fn track_cooling(
        &mut self,
        id: &ObjectId,
        old: Option<&AddressInfo>,
        new: Option<&AddressInfo>,
    ) {
        let entry = |a: &AddressInfo| {
            a.cooling_since
                .filter(|_| !a.deleting)
                .map(|since| (a.pool.clone(), (since, id.clone())))
        };
        let (old, new) = (old.and_then(entry), new.and_then(entry));
        if old == new {
            return;
        }
        if let Some((pool, key)) = old
            && let Some(set) = self.cooling.get_mut(&pool)
        {
            set.remove(&key);
            if set.is_empty() {
                self.cooling.remove(&pool);
            }
        }
        if let Some((pool, key)) = new {
            self.cooling.entry(pool).or_default().insert(key);
        }
    }

    fn forget_object(&mut self, id: &ObjectId) {
        let Some(info) = self.objects.remove(id) else {
            return;
        };
        self.track_cooling(id, Some(&info), None);
        let claim: ObjectId = (info.claim_namespace.clone(), info.claim.clone());
        if let Some(ids) = self.by_claim.get_mut(&claim)
            && ids.remove(id)
        {
            self.by_claim.remove(&claim);
        }
        let Some(holders) = self.holders.get_mut(&*info.pool) else {
            return;
        };
        let Some(count) = holders.get_mut(&info.address) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            holders.remove(&info.address);
            if let Some(Slot::Valid(state)) = self.pools.get_mut(&*info.pool) {
                state.observe_released(info.address);
            }
        }
    }
}

/// A digest of a short text (an annotation's value), for equality only.
fn version_digest(version: Option<&str>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    version.hash(&mut h);
    h.finish()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn address(name: &str, ip: &str, cooling: bool, deleting: bool) -> IPAddress {
        let mut a = serde_json::json!({
            "apiVersion": "ipam.metal3.io/v1alpha1",
            "kind": "IPAddress",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {"address": ip, "pool": {"name": "pool"}, "claim": {"name": format!("claim-{name}")}}
        });
        if cooling {
            a["metadata"]["annotations"] =
                serde_json::json!({ANNOTATION_RELEASED_AT: "2026-01-01T00:00:00Z"});
        }
        if deleting {
            a["metadata"]["deletionTimestamp"] = serde_json::json!("2026-01-01T00:00:00Z");
            a["metadata"]["finalizers"] = serde_json::json!(["x"]);
        }
        serde_json::from_value(a).unwrap()
    }

    #[test]
    fn cooling_addresses_are_counted_and_the_oldest_found_without_a_scan() {
        let index = IpamIndex::default();
        let pool = PoolKey {
            namespace: "ns".into(),
            name: "pool".into(),
        };
        let count = |index: &IpamIndex| index.cooling().get(&pool).copied().unwrap_or(0);
        let oldest = |index: &IpamIndex| index.oldest_cooling(&pool).map(|a| a.name.to_string());
        index.apply_address(&address("a", "10.0.0.1", false, false));
        index.apply_address(&address("b", "10.0.0.2", false, false));
        assert_eq!((count(&index), oldest(&index)), (0, None));
        // Released with --reuse-delay: the same object now cooling.
        index.apply_address(&address("a", "10.0.0.1", true, false));
        std::thread::sleep(std::time::Duration::from_millis(2));
        index.apply_address(&address("b", "10.0.0.2", true, false));
        assert_eq!((count(&index), oldest(&index)), (2, Some("a".into())));
        // Seen again: still released at the first sighting.
        index.apply_address(&address("a", "10.0.0.1", true, false));
        assert_eq!((count(&index), oldest(&index)), (2, Some("a".into())));
        // Being deleted: no longer offered for reuse.
        index.apply_address(&address("a", "10.0.0.1", true, true));
        assert_eq!((count(&index), oldest(&index)), (1, Some("b".into())));
        index.delete_address(&address("b", "10.0.0.2", true, false));
        assert_eq!((count(&index), oldest(&index)), (0, None));
        assert!(index.cooling().is_empty());
    }
}
