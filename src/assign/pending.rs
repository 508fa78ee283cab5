//! A cap on pending claims: claims this replica's admission wrote for a CREATE whose machine
//! has not appeared yet. A real create's machine is stored an instant after its review is
//! answered; a made-up review's never is, and its claim holds an address until the sweeper
//! releases it after `--claim-grace`. So whatever the authentication mode, a burst of reviews
//! that do not lead to machines can take at most `--max-pending-claims-per-pool` addresses of
//! a pool and `--max-pending-claims` in all; beyond that a review is refused before anything
//! is written (429, naming the cap and the flag), with an Event on the pool and a metric.
//!
//! Verified callers (the apiserver with credentials, see [`crate::webhook::auth`]) and unverified ones
//! count against separate budgets of the same size, so a flood of unverified reviews in
//! `warn` mode does not block the apiserver's own creates.
//!
//! A claim stops counting when its machine appears in the machine cache (a machine that
//! existed already when the claim was counted does not count as appearing: a made-up review
//! cannot name existing machines to escape the cap), when the request that made it gives it
//! back, or, once older than the grace, when it is gone from the claim cache (released); at the
//! latest after twice the grace. This is checked before any refusal and every few seconds.
//! Counts are per replica: N replicas admit at most N times the cap.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::events::{self, Events, Note};
use crate::ipam::select::PoolKey;
use crate::metrics::{Metrics, PendingLabels, PendingRefusalLabels};

/// The flags of the cap (`serve`).
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct Caps {
    /// Most claims in one IPPool whose ElfMachine has not appeared yet (per replica and per
    /// budget: authenticated apiserver, others). Set it to about twice the largest scale-up
    /// into one pool that you expect.
    #[arg(
        long = "max-pending-claims-per-pool",
        env = "CAPE_STATIC_IP_MAX_PENDING_CLAIMS_PER_POOL",
        default_value_t = 200
    )]
    pub per_pool: usize,
    /// Most claims in all pools whose ElfMachine has not appeared yet (per replica and budget).
    #[arg(
        long = "max-pending-claims",
        env = "CAPE_STATIC_IP_MAX_PENDING_CLAIMS",
        default_value_t = 1000
    )]
    pub total: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            per_pool: 200,
            total: 1000,
        }
    }
}

/// Whose claims: the authenticated apiserver's, or anyone else's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    Verified,
    Unverified,
}

impl Budget {
    fn as_str(self) -> &'static str {
        match self {
            Budget::Verified => "verified",
            Budget::Unverified => "unverified",
        }
    }
}

tokio::task_local! {
    static BUDGET: Budget;
}

/// Runs `f` (one review) drawing pending claims from `budget`.
pub async fn with_budget<F: Future>(budget: Budget, f: F) -> F::Output {
    BUDGET.scope(budget, f).await
}

/// The budget of the review being handled ([`with_budget`]); unverified outside one.
pub fn current_budget() -> Budget {
    BUDGET.try_with(|b| *b).unwrap_or(Budget::Unverified)
}

/// (namespace, name) of a claim.
type ClaimId = (String, String);

/// What the watch caches hold.
pub trait Seen {
    /// Whether the claim cache holds claim `namespace/name`.
    fn claim_exists(&self, namespace: &str, name: &str) -> bool;
    /// Whether the machine cache holds ElfMachine `machine` (`namespace/name`).
    fn machine_exists(&self, machine: &str) -> bool;
}

impl Seen for crate::cluster::cache::Caches {
    fn claim_exists(&self, namespace: &str, name: &str) -> bool {
        self.claims.get(namespace, name).is_some()
    }

    fn machine_exists(&self, machine: &str) -> bool {
        let (ns, name) = machine.split_once('/').unwrap_or(("", machine));
        self.machines
            .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
            .is_some()
    }
}

struct Entry {
    budget: Budget,
    pool: PoolKey,
    machine: String,
    /// The machine existed when the claim was counted: its presence proves nothing.
    machine_existed: bool,
    at: Instant,
}

#[derive(Default)]
struct Ledger {
    claims: HashMap<ClaimId, Entry>,
    per_pool: HashMap<(Budget, PoolKey), usize>,
    total: HashMap<Budget, usize>,
}

impl Ledger {
    fn remove(&mut self, id: &ClaimId) -> Option<Entry> {
        let entry = self.claims.remove(id)?;
        let key = (entry.budget, entry.pool.clone());
        if let Some(n) = self.per_pool.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_pool.remove(&key);
            }
        }
        if let Some(n) = self.total.get_mut(&entry.budget) {
            *n = n.saturating_sub(1);
        }
        Some(entry)
    }
}

/// The pending claims of this replica.
pub struct PendingClaims {
    caps: Caps,
    grace: Duration,
    ledger: Mutex<Ledger>,
    metrics: Arc<Metrics>,
    events: Events,
}

impl Default for PendingClaims {
    fn default() -> Self {
        Self::new(
            Caps::default(),
            Duration::from_secs(120),
            Arc::new(Metrics::default()),
            Events::default(),
        )
    }
}

impl std::fmt::Debug for PendingClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingClaims")
            .field("caps", &self.caps)
            .finish()
    }
}

/// A claim counted while its request writes it: dropped without [`Reservation::keep`] (the
/// request failed before the claim was recorded), it stops counting.
#[must_use]
pub struct Reservation<'a> {
    pending: &'a PendingClaims,
    id: Option<ClaimId>,
}

impl Reservation<'_> {
    /// The claim was recorded: it counts until its machine appears or it is released.
    pub fn keep(mut self) {
        self.id = None;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let mut ledger = self.pending.lock();
            if let Some(e) = ledger.remove(&id) {
                self.pending.gauge(&ledger, e.budget, &e.pool);
            }
        }
    }
}

impl PendingClaims {
    pub fn new(caps: Caps, grace: Duration, metrics: Arc<Metrics>, events: Events) -> Self {
        PendingClaims {
            caps,
            grace,
            ledger: Mutex::new(Ledger::default()),
            metrics,
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gauge(&self, ledger: &Ledger, budget: Budget, pool: &PoolKey) {
        let n = ledger
            .per_pool
            .get(&(budget, pool.clone()))
            .copied()
            .unwrap_or(0);
        self.metrics
            .pending_claims
            .get_or_create(&PendingLabels {
                pool: pool.to_string(),
                caller: budget.as_str().into(),
            })
            .set(n as i64);
    }

    /// How many claims of `budget` are pending in `pool` (and in all pools).
    pub fn count(&self, budget: Budget, pool: &PoolKey) -> (usize, usize) {
        let ledger = self.lock();
        (
            ledger
                .per_pool
                .get(&(budget, pool.clone()))
                .copied()
                .unwrap_or(0),
            ledger.total.get(&budget).copied().unwrap_or(0),
        )
    }

    /// Counts claim `claim` (in the pool's namespace) of `machine` (`namespace/name`) before
    /// it is written, or says why it may not be. `seen` tells what the caches hold.
    pub fn reserve(
        &self,
        machine: &str,
        pool: &PoolKey,
        claim: &str,
        seen: &impl Seen,
    ) -> Result<Reservation<'_>, String> {
        let budget = current_budget();
        let id: ClaimId = (pool.namespace.clone(), claim.to_string());
        let mut ledger = self.lock();
        if ledger.claims.contains_key(&id) {
            // Counted already (the same request retried).
            return Ok(Reservation {
                pending: self,
                id: None,
            });
        }
        let full = |l: &Ledger| {
            let in_pool = l
                .per_pool
                .get(&(budget, pool.clone()))
                .copied()
                .unwrap_or(0);
            let total = l.total.get(&budget).copied().unwrap_or(0);
            if in_pool >= self.caps.per_pool {
                Some(("--max-pending-claims-per-pool", self.caps.per_pool, in_pool))
            } else if total >= self.caps.total {
                Some(("--max-pending-claims", self.caps.total, total))
            } else {
                None
            }
        };
        if full(&ledger).is_some() {
            self.prune_locked(&mut ledger, seen);
        }
        if let Some((flag, cap, count)) = full(&ledger) {
            drop(ledger);
            return Err(self.refuse(budget, pool, machine, flag, cap, count));
        }
        ledger.claims.insert(
            id.clone(),
            Entry {
                budget,
                pool: pool.clone(),
                machine: machine.to_string(),
                machine_existed: seen.machine_exists(machine),
                at: Instant::now(),
            },
        );
        *ledger.per_pool.entry((budget, pool.clone())).or_default() += 1;
        *ledger.total.entry(budget).or_default() += 1;
        self.gauge(&ledger, budget, pool);
        Ok(Reservation {
            pending: self,
            id: Some(id),
        })
    }

    fn refuse(
        &self,
        budget: Budget,
        pool: &PoolKey,
        machine: &str,
        flag: &str,
        cap: usize,
        count: usize,
    ) -> String {
        let scope = if flag == "--max-pending-claims" {
            "all pools".to_string()
        } else {
            format!("IPPool {pool}")
        };
        let whose = match budget {
            Budget::Verified => "from the authenticated apiserver",
            Budget::Unverified => "from callers the webhook did not authenticate",
        };
        self.metrics
            .pending_refusals
            .get_or_create(&PendingRefusalLabels {
                pool: pool.to_string(),
                cap: flag.trim_start_matches("--").into(),
                caller: budget.as_str().into(),
            })
            .inc();
        self.events.emit(Note {
            regarding: events::pool_ref(&pool.namespace, &pool.name, None),
            warning: true,
            reason: "PendingClaimsCapped",
            action: "Allocate",
            message: format!(
                "ElfMachine {machine} refused: {count} claims {whose} in {scope} wait for their machine ({flag}={cap})"
            ),
        });
        format!(
            "refused before anything was written: {count} claims {whose} in {scope} wait for an ElfMachine that has not appeared yet, the cap set by {flag}={cap}. Claims whose machine never appears are released after --claim-grace; if real scale-ups need more, raise {flag}"
        )
    }

    /// Forgets claims that no longer wait: their machine appeared, they were released
    /// (older than the grace and gone from the claim cache), or they are older than twice
    /// the grace.
    pub fn prune(&self, seen: &impl Seen) {
        let mut ledger = self.lock();
        self.prune_locked(&mut ledger, seen);
    }

    fn prune_locked(&self, ledger: &mut Ledger, seen: &impl Seen) {
        let done: Vec<ClaimId> = ledger
            .claims
            .iter()
            .filter(|(id, e)| {
                let age = e.at.elapsed();
                (!e.machine_existed && seen.machine_exists(&e.machine))
                    || age > self.grace * 2
                    || (age > self.grace && !seen.claim_exists(&id.0, &id.1))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in done {
            if let Some(e) = ledger.remove(&id) {
                self.gauge(ledger, e.budget, &e.pool);
            }
        }
    }

    /// Prunes every `period` until the task is dropped (keeps the gauge true).
    pub async fn prune_every(self: Arc<Self>, period: Duration, seen: impl Seen) {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            self.prune(&seen);
        }
    }

    /// The claim was given back by the request that wrote it.
    pub fn forget(&self, namespace: &str, claim: &str) {
        let mut ledger = self.lock();
        if let Some(e) = ledger.remove(&(namespace.to_string(), claim.to_string())) {
            self.gauge(&ledger, e.budget, &e.pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Caches holding the machines named.
    struct Fake(Vec<&'static str>);

    impl Seen for Fake {
        fn claim_exists(&self, _: &str, _: &str) -> bool {
            true
        }
        fn machine_exists(&self, machine: &str) -> bool {
            self.0.contains(&machine)
        }
    }

    fn pending(per_pool: usize, total: usize) -> PendingClaims {
        PendingClaims::new(
            Caps { per_pool, total },
            Duration::from_secs(120),
            Arc::new(Metrics::default()),
            Events::default(),
        )
    }

    #[test]
    fn counts_until_the_machine_appears_and_refuses_beyond_the_caps() {
        let p = pending(2, 3);
        let a = PoolKey::new("ns", "a");
        let b = PoolKey::new("ns", "b");
        let none = Fake(vec![]);
        p.reserve("ns/m1", &a, "ns-m1-0", &none).unwrap().keep();
        p.reserve("ns/m2", &a, "ns-m2-0", &none).unwrap().keep();
        let e = p.reserve("ns/m3", &a, "ns-m3-0", &none).err().unwrap();
        assert!(e.contains("--max-pending-claims-per-pool=2"), "{e}");
        assert!(e.contains("IPPool ns/a"), "{e}");
        // The same claim again (a retried request) is not counted twice.
        p.reserve("ns/m1", &a, "ns-m1-0", &none).unwrap().keep();
        p.reserve("ns/m4", &b, "ns-m4-0", &none).unwrap().keep();
        let e = p.reserve("ns/m5", &b, "ns-m5-0", &none).err().unwrap();
        assert!(e.contains("--max-pending-claims=3"), "{e}");
        assert_eq!(p.count(Budget::Unverified, &a), (2, 3));

        // m1 appears: checked before refusing, so m3 now fits.
        let m1 = Fake(vec!["ns/m1"]);
        p.reserve("ns/m3", &a, "ns-m3-0", &m1).unwrap().keep();
        assert_eq!(p.count(Budget::Unverified, &a), (2, 3));
        p.prune(&Fake(vec!["ns/m1", "ns/m3"]));
        assert_eq!(p.count(Budget::Unverified, &a), (1, 2));
        // A reservation dropped without keep() stops counting.
        drop(p.reserve("ns/m6", &a, "ns-m6-0", &none).unwrap());
        assert_eq!(p.count(Budget::Unverified, &a), (1, 2));
        p.forget("ns", "ns-m2-0");
        assert_eq!(p.count(Budget::Unverified, &a), (0, 1));
    }

    #[test]
    fn naming_an_existing_machine_does_not_escape_the_cap() {
        let p = pending(1, 10);
        let a = PoolKey::new("ns", "a");
        let existing = Fake(vec!["ns/old"]);
        p.reserve("ns/old", &a, "ns-old-5", &existing)
            .unwrap()
            .keep();
        p.prune(&existing);
        assert_eq!(p.count(Budget::Unverified, &a), (1, 1));
        assert!(p.reserve("ns/old", &a, "ns-old-6", &existing).is_err());
    }

    #[tokio::test]
    async fn verified_callers_have_their_own_budget() {
        let p = pending(1, 10);
        let a = PoolKey::new("ns", "a");
        let none = Fake(vec![]);
        p.reserve("ns/fake", &a, "ns-fake-0", &none).unwrap().keep();
        assert!(p.reserve("ns/fake2", &a, "ns-fake2-0", &none).is_err());
        with_budget(Budget::Verified, async {
            p.reserve("ns/real", &a, "ns-real-0", &none).unwrap().keep();
        })
        .await;
        assert_eq!(p.count(Budget::Verified, &a), (1, 1));
    }
}
