//! The background loops, one file each, run by every replica without leader election (every
//! write is idempotent or guarded by a precondition):
//! - [`release`]: a machine being deleted whose VM is gone (CAPE's finalizer removed) gets
//!   its claims and addresses deleted, then our finalizer removed; retried with backoff;
//! - [`reconcile`]: a machine that needs an address but was admitted without us (webhook down
//!   with `failurePolicy: Ignore`, created before installation, network changed later) is
//!   allocated by the same code as admission and patched with an optimistic lock;
//! - [`adopt`]: the Go controller's claims of existing machines get our owner annotations;
//! - [`sweep`]: claims and addresses that no live machine carries or needs are released
//!   (the address a device carries is the truth, never the index in a claim's name);
//! - [`pool_guard`]: pools holding our addresses carry our finalizer;
//! - [`pool_status`]: `IPPool.status.indexes` is kept equal to the addresses, in batches.

mod adopt;
mod pool_guard;
mod pool_status;
mod reconcile;
mod release;
mod sweep;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::ResourceExt;
use kube::runtime::controller::{Action, Controller};

use crate::assign::Assigner;
use crate::cluster::claims::ClaimInfo;
use crate::cluster::crd::ElfMachine;
use crate::contract::*;
use crate::metrics::Metrics;

/// Housekeeping that can wait starts only after admission has been quiet this long...
const QUIET: Duration = Duration::from_secs(2);
/// ...waiting at most this long per pass: pool status is then written anyway, and binding
/// claims to machines is left to the next pass.
const MAX_YIELD: Duration = Duration::from_secs(60);

/// Timing of the loops.
#[derive(Debug, Clone, Copy)]
pub struct LifecycleOptions {
    pub resync: Duration,
    pub claim_grace: Duration,
    /// `--reuse-delay`: released addresses are kept (cooling) this long instead of deleted.
    pub reuse_delay: Duration,
}

/// Why one pass over a machine failed (it is retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("{action}: {source}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Assign(#[from] crate::assign::AssignError),
}

fn api(action: impl Into<String>) -> impl FnOnce(kube::Error) -> LifecycleError {
    let action = action.into();
    move |source| LifecycleError::Api { action, source }
}

/// The background loops.
pub struct Lifecycle {
    assigner: Assigner,
    metrics: Arc<Metrics>,
    options: LifecycleOptions,
    failures: Mutex<HashMap<String, u32>>,
    /// Pools whose `status.indexes` the apiserver refused as too large, with the number of
    /// entries refused: not retried until the pool holds fewer.
    oversized: Mutex<HashMap<(String, String), usize>>,
}
impl Lifecycle {
    pub fn new(assigner: Assigner, metrics: Arc<Metrics>, options: LifecycleOptions) -> Self {
        Lifecycle {
            assigner,
            metrics,
            options,
            failures: Mutex::new(HashMap::new()),
            oversized: Mutex::new(HashMap::new()),
        }
    }

    /// Runs every loop until the task is dropped.
    pub async fn run(self) {
        // The machine cache is shared with admission (the addresses machines carry).
        self.assigner.caches.wait_ready().await;
        let machines = self.assigner.caches.machines.clone();
        let trigger = self.assigner.caches.subscribe_machines();
        let controller = Controller::for_stream(trigger, machines.clone());
        let this = Arc::new(self);
        let periodic = {
            let this = this.clone();
            let machines = machines.clone();
            async move {
                let period = (this.options.claim_grace / 2).clamp(
                    Duration::from_secs(1),
                    this.options.resync.max(Duration::from_secs(1)),
                );
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    if machines.wait_until_ready().await.is_err() {
                        return;
                    }
                    let cached = machines.state();
                    this.metrics
                        .release_waiting
                        .observe(cached.iter().map(|m| &**m));
                    this.sweep_claims(&machines).await;
                    this.sweep_addresses().await;
                    this.guard_pools().await;
                    this.update_pool_status().await;
                }
            }
        };
        let reconciler = controller
            .run(
                |machine, ctx: Arc<Lifecycle>| async move { ctx.reconcile(machine).await },
                |machine, error, ctx: Arc<Lifecycle>| ctx.retry(&machine, error),
                this.clone(),
            )
            .for_each(|_| async {});
        tokio::join!(reconciler, periodic);
    }

    fn retry(&self, machine: &ElfMachine, error: &LifecycleError) -> Action {
        let key = machine_key(
            &machine.namespace().unwrap_or_default(),
            &machine.name_any(),
        );
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        let delay = Duration::from_millis(250u64.saturating_mul(1 << (*n).min(8)))
            .min(Duration::from_secs(60));
        tracing::warn!(machine = %key, error = %error, retry_in = ?delay, "machine not reconciled");
        Action::requeue(delay)
    }

    async fn reconcile(&self, machine: Arc<ElfMachine>) -> Result<Action, LifecycleError> {
        let ns = machine.namespace().unwrap_or_default();
        let name = machine.name_any();
        if machine.metadata.deletion_timestamp.is_some() {
            if waits_for_release(&machine) {
                self.release_machine(&machine).await?;
            }
        } else {
            self.fill_missing(&machine).await?;
        }
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&machine_key(&ns, &name));
        Ok(Action::requeue(self.options.resync))
    }

    /// The claims that belong to a machine: ours (annotation) and the Go controller's (name),
    /// looked up by name in every namespace that has a pool.
    fn claims_of(&self, namespace: &str, name: &str, devices: usize) -> Vec<Arc<ClaimInfo>> {
        let key = machine_key(namespace, name);
        let claims = &self.assigner.caches.claims;
        // Ours, by the machine they name (any claim name), then the Go controller's by name.
        let mut found = claims.of_machine(&key);
        for claim_ns in self.claim_namespaces(namespace) {
            for device in 0..devices.max(1) + 8 {
                if let Some(c) = claims.get(&claim_ns, &claim_name(namespace, name, device))
                    && c.machine.is_none()
                {
                    found.push(c);
                }
            }
        }
        found
    }

    /// Namespaces where a machine's claims may live: every namespace that has a pool.
    fn claim_namespaces(&self, machine_ns: &str) -> Vec<String> {
        let mut set: Vec<String> = self
            .assigner
            .caches
            .index
            .pool_metas()
            .iter()
            .map(|m| m.key.namespace.clone())
            .collect();
        set.push(machine_ns.to_string());
        set.sort();
        set.dedup();
        set
    }

    /// Waits until no address has been assigned for [`QUIET`], or until `deadline`; true when
    /// quiet. Binding claims and pool status can wait, a scale-up should not.
    async fn quiet_by(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            if self.assigner.activity.idle_for() >= QUIET {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(QUIET / 4).await;
        }
    }
}

/// Whether a machine is ours to release now: being deleted, with our finalizer and
/// without CAPE's (its VM is gone).
fn waits_for_release(machine: &ElfMachine) -> bool {
    let finalizers = machine.finalizers();
    machine.metadata.deletion_timestamp.is_some()
        && finalizers.iter().any(|f| f == STATIC_IP_FINALIZER)
        && !finalizers.iter().any(|f| f == CAPE_FINALIZER)
}

fn api_err(ns: &str, name: &str) -> impl FnOnce(kube::Error) -> LifecycleError {
    api(format!("patching ElfMachine {ns}/{name}"))
}
