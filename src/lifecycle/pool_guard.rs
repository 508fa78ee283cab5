//! Pool guard: a pool that holds addresses we wrote carries our finalizer, so it cannot be
//! deleted (a GitOps prune, a restore) and re-created empty while machines carry its
//! addresses. Our IPAddresses carry no ownerReference to their pool for the same reason:
//! the garbage collector would delete them with the pool. Once a pool being deleted holds
//! none of our addresses any more, the finalizer goes and the deletion completes.

use std::collections::HashMap;

use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, TestOperation};
use kube::api::{Patch as KubePatch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use super::Lifecycle;
use crate::cluster::crd::IPPool;
use crate::contract::POOL_FINALIZER;

impl Lifecycle {
    /// Adds our finalizer to pools that hold our addresses, and removes it from pools being
    /// deleted that hold none.
    pub(super) async fn guard_pools(&self) {
        let mut ours: HashMap<(String, String), usize> = HashMap::new();
        for a in self.assigner.caches.index.addresses() {
            if a.ours && !a.deleting {
                *ours
                    .entry((a.pool.namespace.clone(), a.pool.name.clone()))
                    .or_default() += 1;
            }
        }
        for pool in self.assigner.caches.pools.state() {
            let key = (pool.namespace().unwrap_or_default(), pool.name_any());
            let held = ours.get(&key).copied().unwrap_or(0);
            let has = pool.finalizers().iter().any(|f| f == POOL_FINALIZER);
            let deleting = pool.metadata.deletion_timestamp.is_some();
            let result = if held > 0 && !has && !deleting {
                self.set_pool_finalizer(&pool, true).await
            } else if held == 0 && has && deleting {
                self.set_pool_finalizer(&pool, false).await
            } else {
                continue;
            };
            match result {
                Ok(()) => {
                    tracing::info!(pool = %format!("{}/{}", key.0, key.1), held, added = !deleting, "pool finalizer updated")
                }
                Err(e) => {
                    tracing::warn!(pool = %format!("{}/{}", key.0, key.1), error = %e, "could not update the pool's finalizer")
                }
            }
        }
    }

    /// Adds or removes our finalizer, guarded by the pool's resourceVersion (a pool changed
    /// meanwhile is handled on the next pass).
    async fn set_pool_finalizer(&self, pool: &IPPool, add: bool) -> Result<(), kube::Error> {
        let ns = pool.namespace().unwrap_or_default();
        let api = Api::<IPPool>::namespaced(self.assigner.client.clone(), &ns);
        let version = PatchOperation::Test(TestOperation {
            path: "/metadata/resourceVersion".parse().expect("valid pointer"),
            value: json!(pool.resource_version()),
        });
        let finalizers = pool.finalizers();
        let change = if add && finalizers.is_empty() {
            PatchOperation::Add(AddOperation {
                path: "/metadata/finalizers".parse().expect("valid pointer"),
                value: json!([POOL_FINALIZER]),
            })
        } else if add {
            PatchOperation::Add(AddOperation {
                path: "/metadata/finalizers/-".parse().expect("valid pointer"),
                value: json!(POOL_FINALIZER),
            })
        } else {
            let Some(at) = finalizers.iter().position(|f| f == POOL_FINALIZER) else {
                return Ok(());
            };
            PatchOperation::Remove(RemoveOperation {
                path: format!("/metadata/finalizers/{at}")
                    .parse()
                    .expect("valid pointer"),
            })
        };
        match api
            .patch(
                &pool.name_any(),
                &PatchParams::default(),
                &KubePatch::Json::<()>(Patch(vec![version, change])),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if matches!(s.code, 404 | 409 | 422) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
