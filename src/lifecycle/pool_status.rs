//! Pool status: `IPPool.status.indexes` is kept equal to the addresses, in batches.

use std::collections::{BTreeMap, HashMap};

use kube::api::{Patch as KubePatch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{Lifecycle, MAX_YIELD};
use crate::cluster::crd::IPPool;
use crate::events::{self, Note};
use crate::ipam::select::PoolKey;

impl Lifecycle {
    /// Writes `status.indexes` (claim → address) of every pool whose status differs from
    /// the IPAddresses that exist.
    pub(super) async fn update_pool_status(&self) {
        // Status must progress even under constant load: wait for a quiet moment, not forever.
        self.quiet_by(tokio::time::Instant::now() + MAX_YIELD).await;
        let index = &self.assigner.caches.index;
        let mut wanted: HashMap<(String, String), BTreeMap<String, String>> = HashMap::new();
        for a in index.addresses() {
            if a.claim.is_empty() {
                continue;
            }
            wanted
                .entry((a.pool.namespace.clone(), a.pool.name.clone()))
                .or_default()
                .insert(a.claim.to_string(), a.address.to_string());
        }
        for pool in self.assigner.caches.pools.state() {
            let key = (pool.namespace().unwrap_or_default(), pool.name_any());
            // Only pools we can allocate from: the addresses of others (IPv6) are not indexed.
            if index
                .with_pool(&PoolKey::new(&key.0, &key.1), |_| ())
                .is_err()
            {
                continue;
            }
            let want = wanted.remove(&key).unwrap_or_default();
            let refused = self
                .oversized
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied();
            if refused.is_some_and(|n| want.len() >= n) {
                continue;
            }
            let empty = BTreeMap::new();
            let have = pool.status.as_ref().map_or(&empty, |s| &s.indexes);
            if want == *have {
                continue;
            }
            // Only what changed; a merge patch nulls out keys that went away.
            let mut indexes = serde_json::Map::new();
            for k in have.keys().filter(|k| !want.contains_key(*k)) {
                indexes.insert(k.clone(), serde_json::Value::Null);
            }
            for (k, v) in want.iter().filter(|(k, v)| have.get(*k) != Some(*v)) {
                indexes.insert(k.clone(), json!(v));
            }
            let patch = json!({"status": {"indexes": indexes, "lastUpdated": crate::fault::now().to_string()}});
            // A patch larger than etcd accepts would cost the apiserver seconds for nothing.
            let size = serde_json::to_vec(&patch).map_or(0, |b| b.len());
            if size > MAX_STATUS_PATCH {
                let why = format!("the patch alone is {size} bytes");
                self.status_too_large(&pool, key, want.len(), &why);
                continue;
            }
            match Api::<IPPool>::namespaced(self.assigner.client.clone(), &key.0)
                .patch_status(&key.1, &PatchParams::default(), &KubePatch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.oversized
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&key);
                }
                Err(kube::Error::Api(s)) if too_large(&s) => {
                    self.status_too_large(&pool, key, want.len(), &s.message);
                }
                Err(e) => {
                    tracing::warn!(pool = %format!("{}/{}", key.0, key.1), error = %e, "could not update pool status")
                }
            }
        }
    }

    /// Records that a pool's `status.indexes` cannot be stored: it is not rewritten every
    /// pass (a large request for nothing) until the pool holds fewer addresses.
    pub(super) fn status_too_large(
        &self,
        pool: &IPPool,
        key: (String, String),
        entries: usize,
        why: &str,
    ) {
        tracing::warn!(pool = %format!("{}/{}", key.0, key.1), entries, why, "status.indexes is too large for the apiserver; not written until the pool holds fewer addresses");
        self.assigner.events.emit(Note {
            regarding: events::pool_ref(&key.0, &key.1, pool.uid()),
            warning: true,
            reason: "StatusTooLarge",
            action: "UpdateStatus",
            message: format!(
                "status.indexes with {entries} entries exceeds the apiserver's size limit; it is not updated until the pool holds fewer addresses (the IPAddress objects remain the record)"
            ),
        });
        self.oversized
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, entries);
    }
}

/// The largest pool status patch sent: etcd refuses requests over 1.5 MiB by default.
const MAX_STATUS_PATCH: usize = 1_500_000;

/// Whether the apiserver refused a write for its size (its request limit, or etcd's).
fn too_large(s: &kube::core::Status) -> bool {
    s.code == 413 || s.message.contains("too large")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn size_refusals_are_recognised() {
        // What kube-apiserver 1.34 answers to a 1.9 MB status patch of a 60k-address pool.
        let etcd = kube::core::Status::failure("etcdserver: request is too large", "");
        assert!(too_large(&etcd));
        let mut body = kube::core::Status::failure("the request body is too big", "");
        body.code = 413;
        assert!(too_large(&body));
        let conflict = kube::core::Status::failure("the object has been modified", "Conflict");
        assert!(!too_large(&conflict));
    }
}
