//! The IPClaims of the cluster, fed by their watch, kept as a small [`ClaimInfo`] each (what
//! admission and the background loops read) rather than as whole objects: with 100k cached
//! IPAM objects the labels and annotations of full objects would cost most of the memory.
//! Decisions that delete or change a claim are always taken on the live object; this cache
//! only says where to look.
//!
//! Age is judged on this replica's monotonic clock, never against the apiserver's timestamps:
//! [`ClaimInfo::since`] is when this replica first saw the claim's current resourceVersion. A
//! claim is created (or last changed) before any replica sees it, so `since.elapsed()` never
//! overstates its age, whatever the clocks say; after a restart every claim starts young.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::crd::IPClaim;
use super::intern::Interner;
use super::uid::Uid;
use crate::contract::{
    ANNOTATION_DEVICE, ANNOTATION_MACHINE, ANNOTATION_MACHINE_UID, METAL3_REQUESTED_IP,
};

/// (namespace, name) of a claim.
type ClaimId = (Arc<str>, Arc<str>);

/// One IPClaim, as the cache keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub uid: Option<Uid>,
    pub created: Option<Timestamp>,
    /// Has a deletion timestamp.
    pub deleting: bool,
    /// `spec.pool.name`.
    pub pool: Option<Arc<str>>,
    /// Our annotations: the machine (`namespace/name`), its uid once adopted, the device.
    pub machine: Option<Box<str>>,
    pub machine_uid: Option<Box<str>>,
    pub device: Option<Box<str>>,
    /// `status.address.name`.
    pub address: Option<Box<str>>,
    /// The address the claim was made for (metal3's requested-IP annotation, which we set).
    pub requested: Option<Ipv4Addr>,
    pub resource_version: Option<Box<str>>,
    /// When this replica first saw this resourceVersion of the claim.
    pub since: Instant,
}

impl ClaimInfo {
    /// How long the claim has been unchanged, at least (see the module comment).
    pub fn unchanged_for(&self) -> std::time::Duration {
        self.since.elapsed()
    }
}

impl ClaimInfo {
    fn of(claim: &IPClaim, namespace: Arc<str>, name: Arc<str>, pool: Option<Arc<str>>) -> Self {
        let annotation = |key: &str| claim.annotations().get(key).map(|v| v.as_str().into());
        ClaimInfo {
            namespace,
            name,
            uid: claim.uid().map(Uid::from),
            created: claim.creation_timestamp().map(|t| t.0),
            deleting: claim.metadata.deletion_timestamp.is_some(),
            pool,
            machine: annotation(ANNOTATION_MACHINE),
            machine_uid: annotation(ANNOTATION_MACHINE_UID),
            device: annotation(ANNOTATION_DEVICE),
            address: claim
                .status
                .as_ref()
                .and_then(|s| s.address.as_ref())
                .and_then(|a| a.name.as_deref())
                .map(Into::into),
            requested: claim
                .annotations()
                .get(METAL3_REQUESTED_IP)
                .and_then(|ip| ip.parse().ok()),
            resource_version: claim.resource_version().map(Into::into),
            since: Instant::now(),
        }
    }
}

#[derive(Default)]
struct Inner {
    claims: HashMap<ClaimId, Arc<ClaimInfo>>,
    /// One shared copy of each namespace and pool name.
    strings: Interner,
    /// The claims seen since the watch started a relist.
    relisting: Option<HashSet<ClaimId>>,
    /// Machine (`namespace/name`, our annotation) → its claims.
    by_machine: HashMap<Box<str>, HashSet<ClaimId>>,
}

impl Inner {
    fn intern(&mut self, s: &str) -> Arc<str> {
        self.strings.get(s)
    }

    fn remove(&mut self, id: &ClaimId) {
        if let Some(old) = self.claims.remove(id)
            && let Some(owner) = old.machine.as_deref()
            && let Some(set) = self.by_machine.get_mut(owner)
        {
            set.remove(id);
            if set.is_empty() {
                self.by_machine.remove(owner);
            }
        }
    }
}

/// Thread-safe cache of every IPClaim.
#[derive(Default)]
pub struct ClaimCache {
    inner: Mutex<Inner>,
}

impl ClaimCache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The claim `namespace/name`, if the watch has shown it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<ClaimInfo>> {
        let id: ClaimId = (namespace.into(), name.into());
        self.lock().claims.get(&id).cloned()
    }

    /// The claims whose owner annotation names this machine (`namespace/name`).
    pub fn of_machine(&self, machine: &str) -> Vec<Arc<ClaimInfo>> {
        let inner = self.lock();
        inner
            .by_machine
            .get(machine)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| inner.claims.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every cached claim.
    pub fn all(&self) -> Vec<Arc<ClaimInfo>> {
        self.lock().claims.values().cloned().collect()
    }

    /// How many claims are cached.
    pub fn len(&self) -> usize {
        self.lock().claims.len()
    }

    /// Whether no claim is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A claim was added or changed.
    pub fn apply(&self, claim: &IPClaim) {
        let mut inner = self.lock();
        let ns = inner.intern(&claim.namespace().unwrap_or_default());
        let pool = claim.spec.pool.name.as_deref().map(|p| inner.intern(p));
        let probe: ClaimId = (ns.clone(), claim.name_any().into());
        let id = match inner.claims.get_key_value(&probe) {
            Some((id, _)) => id.clone(),
            None => probe,
        };
        if let Some(seen) = inner.relisting.as_mut() {
            seen.insert(id.clone());
        }
        let mut info = ClaimInfo::of(claim, ns, id.1.clone(), pool);
        if let Some(old) = inner.claims.get(&id)
            && old.resource_version == info.resource_version
        {
            info.since = old.since;
        }
        inner.remove(&id);
        if let Some(owner) = info.machine.clone() {
            inner
                .by_machine
                .entry(owner)
                .or_default()
                .insert(id.clone());
        }
        inner.claims.insert(id, Arc::new(info));
    }

    /// A claim was deleted.
    pub fn delete(&self, claim: &IPClaim) {
        let id: ClaimId = (
            claim.namespace().unwrap_or_default().into(),
            claim.name_any().into(),
        );
        self.lock().remove(&id);
    }

    /// The watch starts a relist; see [`ClaimCache::end_relist`].
    pub fn begin_relist(&self) {
        self.lock().relisting = Some(HashSet::new());
    }

    /// The relist is complete: claims it did not list are gone.
    pub fn end_relist(&self) {
        let mut inner = self.lock();
        if let Some(seen) = inner.relisting.take() {
            let gone: Vec<ClaimId> = inner
                .claims
                .keys()
                .filter(|id| !seen.contains(*id))
                .cloned()
                .collect();
            for id in gone {
                inner.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::crd::IPClaimSpec;

    fn claim(ns: &str, name: &str, machine: Option<&str>) -> IPClaim {
        let mut c = IPClaim::new(name, IPClaimSpec::default());
        c.metadata.namespace = Some(ns.into());
        c.spec.pool.name = Some("pool".into());
        if let Some(m) = machine {
            c.annotations_mut()
                .insert(ANNOTATION_MACHINE.into(), m.into());
        }
        c
    }

    #[test]
    fn keeps_what_is_read_and_follows_relists() {
        let cache = ClaimCache::default();
        cache.apply(&claim("a", "one", Some("a/m")));
        cache.apply(&claim("a", "two", None));
        let one = cache.get("a", "one").unwrap();
        assert_eq!(one.machine.as_deref(), Some("a/m"));
        assert_eq!(one.pool.as_deref(), Some("pool"));
        assert!(cache.get("b", "one").is_none());

        cache.begin_relist();
        cache.apply(&claim("a", "two", Some("a/n")));
        cache.end_relist();
        assert!(cache.get("a", "one").is_none());
        assert_eq!(
            cache.get("a", "two").unwrap().machine.as_deref(),
            Some("a/n")
        );
        assert_eq!(cache.len(), 1);
        assert!(cache.of_machine("a/m").is_empty());
        assert_eq!(cache.of_machine("a/n").len(), 1);

        cache.delete(&claim("a", "two", None));
        assert!(cache.is_empty());
    }

    #[test]
    fn age_is_this_replicas_own_and_never_read_from_timestamps() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let cache = ClaimCache::default();
        // As a replica whose clock runs an hour ahead of the apiserver's sees a claim created
        // an instant ago: its creationTimestamp looks an hour old. It is young all the same.
        let mut c = claim("a", "one", Some("a/m"));
        c.metadata.creation_timestamp = Some(Time(
            Timestamp::now() - std::time::Duration::from_secs(3600),
        ));
        c.metadata.resource_version = Some("1".into());
        cache.apply(&c);
        let seen = cache.get("a", "one").unwrap();
        assert!(seen.unchanged_for() < std::time::Duration::from_secs(60));

        // The same version again (a relist) keeps its age; a new version starts young again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        cache.apply(&c);
        let again = cache.get("a", "one").unwrap();
        assert_eq!(again.since, seen.since);
        c.metadata.resource_version = Some("2".into());
        cache.apply(&c);
        assert!(cache.get("a", "one").unwrap().since > seen.since);
    }
}
