//! Outcomes: each result counted and announced, and when admission last assigned.

use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::{AssignError, Assigner, Lease, MachineView};
use crate::events::{self, Note};
use crate::ipam::select::PoolKey;
use crate::metrics::PoolLabels;

/// When the last assignment happened, so that background writes that can wait (binding
/// claims to machine uids, pool status) do not compete with a scale-up for the apiserver.
#[derive(Debug, Default)]
pub struct Activity {
    /// When the last assignment was, by this process's monotonic clock.
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Activity {
    /// Records an assignment now.
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    /// How long ago the last assignment was (`Duration::MAX` if none).
    pub fn idle_for(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(Duration::MAX, |t| t.elapsed())
    }
}

impl Assigner {
    /// Counts and announces the addresses a request obtained.
    pub(super) fn record_success(&self, m: &MachineView<'_>, leases: &[Lease]) {
        for lease in leases {
            self.metrics
                .allocations
                .get_or_create(&PoolLabels {
                    pool: lease.pool.to_string(),
                    result: "allocated".into(),
                })
                .inc();
            let uid = self.pool_uid(&lease.pool);
            self.events.emit(Note {
                regarding: events::pool_ref(&lease.pool.namespace, &lease.pool.name, uid),
                warning: false,
                reason: "Allocated",
                action: "Allocate",
                message: format!(
                    "{} to ElfMachine {}/{} device {} (IPClaim {})",
                    lease.address, m.namespace, m.name, lease.device, lease.claim
                ),
            });
        }
    }

    /// Counts a failed request, and announces a full pool on the pool itself.
    pub(super) fn record_failure(&self, m: &MachineView<'_>, e: &AssignError) {
        let AssignError::Exhausted { tried, .. } = e else {
            self.metrics
                .allocations
                .get_or_create(&PoolLabels {
                    pool: String::new(),
                    result: e.reason().into(),
                })
                .inc();
            return;
        };
        for key in tried.split(", ").filter_map(|k| k.split_once('/')) {
            self.metrics
                .allocations
                .get_or_create(&PoolLabels {
                    pool: format!("{}/{}", key.0, key.1),
                    result: "exhausted".into(),
                })
                .inc();
            let uid = self.pool_uid(&PoolKey {
                namespace: key.0.into(),
                name: key.1.into(),
            });
            self.events.emit(Note {
                regarding: events::pool_ref(key.0, key.1, uid),
                warning: true,
                reason: "Exhausted",
                action: "Allocate",
                message: format!("no free address for ElfMachine {}/{}", m.namespace, m.name),
            });
        }
    }

    pub(super) fn pool_uid(&self, key: &PoolKey) -> Option<String> {
        self.caches
            .pools
            .get(&ObjectRef::new(&key.name).within(&key.namespace))
            .and_then(|p| p.uid())
    }
}
