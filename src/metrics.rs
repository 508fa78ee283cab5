//! Prometheus metrics, served on the admin port's `/metrics`. Per-pool gauges are built
//! from the address index on each scrape by a collector (nothing is cleared and refilled,
//! so concurrent scrapes each see every pool).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kube::ResourceExt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode};
use prometheus_client::metrics::TypedMetric;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cluster::crd::ElfMachine;
use crate::contract::{CAPE_FINALIZER, STATIC_IP_FINALIZER};

/// Labels of an admission review.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReviewLabels {
    pub operation: String,
    /// `allowed`, `patched`, `denied` or `invalid`.
    pub result: String,
}

/// Labels of an allocation or a release.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `namespace/name` of the pool.
    pub pool: String,
    pub result: String,
}

/// Labels of a per-pool gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolOnly {
    /// `namespace/name` of the pool.
    pub pool: String,
}

/// One pool's usage at scrape time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolUsage {
    /// `namespace/name` of the pool.
    pub pool: String,
    pub used: usize,
    pub free: usize,
    /// Released addresses kept out of use for `--reuse-delay` (counted in `used`).
    pub cooling: usize,
}

/// One pool gauge: name, help, and its value in a [`PoolUsage`].
type PoolGauge = (&'static str, &'static str, fn(&PoolUsage) -> usize);

/// Where the pool gauges are read from at scrape time.
type UsageSource = Arc<dyn Fn() -> Vec<PoolUsage> + Send + Sync>;

/// Builds `pool_used_addresses`, `pool_free_addresses` and `pool_cooling_addresses` per scrape
/// from one snapshot of the source: the gauges of a pool come from the same moment, and a
/// scrape never sees a half-built family.
#[derive(Clone, Default)]
struct PoolCollector {
    source: Arc<OnceLock<UsageSource>>,
}

impl std::fmt::Debug for PoolCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCollector")
            .field("source", &self.source.get().is_some())
            .finish()
    }
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows = self.source.get().map(|f| f()).unwrap_or_default();
        let families: [PoolGauge; 3] = [
            (
                "pool_used_addresses",
                "Addresses of a pool held by an IPAddress (as the watch cache sees them)",
                |r| r.used,
            ),
            (
                "pool_free_addresses",
                "Addresses of a pool still free to allocate",
                |r| r.free,
            ),
            (
                "pool_cooling_addresses",
                "released addresses kept out of use for --reuse-delay (counted as used), by pool",
                |r| r.cooling,
            ),
        ];
        for (name, help, value) in families {
            let mut family =
                encoder.encode_descriptor(name, help, None, ConstGauge::<i64>::TYPE)?;
            for row in &rows {
                let labels = PoolOnly {
                    pool: row.pool.clone(),
                };
                let gauge = ConstGauge::new(i64::try_from(value(row)).unwrap_or(i64::MAX));
                gauge.encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// Labels of a review whose caller could not be verified.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `warn` (served) or `enforce` (refused).
    pub mode: String,
    /// `no_credentials`, `bad_certificate`, `token_rejected`, `identity_not_allowed`,
    /// `token_review_failed`.
    pub reason: String,
}

/// Labels of the pending-claims gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PendingLabels {
    /// `namespace/name` of the pool.
    pub pool: String,
    /// `verified` (the authenticated apiserver) or `unverified`.
    pub caller: String,
}

/// Labels of a review refused by the pending-claims cap.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PendingRefusalLabels {
    pub pool: String,
    /// The flag whose cap was reached: `max-pending-claims-per-pool` or `max-pending-claims`.
    pub cap: String,
    pub caller: String,
}

fn review_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric this process exports.
pub struct Metrics {
    registry: Registry,
    pub reviews: Family<ReviewLabels, Histogram, fn() -> Histogram>,
    pub allocations: Family<PoolLabels, Counter>,
    pub releases: Family<PoolLabels, Counter>,
    pub caches_synced: Gauge,
    pub certificate_expiry: Gauge,
    pools: PoolCollector,
    pub release_waiting: ReleaseWaiting,
    pub unauthenticated: Family<AuthLabels, Counter>,
    pub pending_claims: Family<PendingLabels, Gauge>,
    pub pending_refusals: Family<PendingRefusalLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cape_static_ip");
        let reviews = Family::<ReviewLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            review_histogram as fn() -> Histogram,
        );
        let allocations = Family::<PoolLabels, Counter>::default();
        let releases = Family::<PoolLabels, Counter>::default();
        let caches_synced = Gauge::default();
        let certificate_expiry = Gauge::default();
        let pools = PoolCollector::default();
        registry.register_collector(Box::new(pools.clone()));
        registry.register(
            "admission_duration_seconds",
            "Time to answer an AdmissionReview",
            reviews.clone(),
        );
        registry.register(
            "allocations",
            "Addresses allocated, by pool and result",
            allocations.clone(),
        );
        registry.register(
            "releases",
            "Addresses released, by pool and result",
            releases.clone(),
        );
        registry.register(
            "caches_synced",
            "1 once every watch cache has synced",
            caches_synced.clone(),
        );
        registry.register(
            "serving_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate",
            certificate_expiry.clone(),
        );
        let release_waiting = ReleaseWaiting::default();
        registry.register(
            "release_waiting_since_timestamp_seconds",
            "deletionTimestamp of an ElfMachine whose addresses are not released yet, by what it waits for",
            release_waiting.family.clone(),
        );
        let unauthenticated = Family::<AuthLabels, Counter>::default();
        let pending_claims = Family::<PendingLabels, Gauge>::default();
        let pending_refusals = Family::<PendingRefusalLabels, Counter>::default();
        registry.register(
            "unauthenticated_reviews",
            "Reviews whose caller could not be verified, by mode and reason",
            unauthenticated.clone(),
        );
        registry.register(
            "pending_claims",
            "Claims written by this replica whose ElfMachine has not appeared yet",
            pending_claims.clone(),
        );
        registry.register(
            "pending_claim_refusals",
            "Reviews refused because the pending-claims cap was reached",
            pending_refusals.clone(),
        );
        Metrics {
            registry,
            unauthenticated,
            pending_claims,
            pending_refusals,
            reviews,
            allocations,
            releases,
            caches_synced,
            certificate_expiry,
            pools,
            release_waiting,
        }
    }
}

impl Metrics {
    /// Reads the pool gauges from `source` at every scrape (set once, when the caches
    /// start; later calls are ignored). Without a source there are no pool series.
    pub fn pools_from(&self, source: impl Fn() -> Vec<PoolUsage> + Send + Sync + 'static) {
        let _ = self.pools.source.set(Arc::new(source));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Records a review's duration when dropped.
    pub fn time_review(&self, operation: &str) -> ReviewTimer<'_> {
        ReviewTimer {
            metrics: self,
            operation: operation.to_string(),
            result: "invalid",
            start: Instant::now(),
        }
    }
}

/// Records the duration of a review on `Drop`.
pub struct ReviewTimer<'a> {
    metrics: &'a Metrics,
    operation: String,
    result: &'static str,
    start: Instant,
}

impl ReviewTimer<'_> {
    /// Sets the result label.
    pub fn result(&mut self, result: &'static str) {
        self.result = result;
    }
}

impl Drop for ReviewTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reviews
            .get_or_create(&ReviewLabels {
                operation: std::mem::take(&mut self.operation),
                result: self.result.to_string(),
            })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Labels of an ElfMachine waiting for its addresses to be released.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    /// `namespace/name` of the ElfMachine.
    pub machine: String,
    /// `vm-deletion` while CAPE's finalizer is still on the machine (CAPE is deleting the VM),
    /// `release` once only ours is left (our release has not finished).
    pub waiting_for: String,
}

/// The machines being deleted that still carry our finalizer, with their deletion time: what
/// the alert on a release stuck for an hour reads. Refreshed by the background loop from its
/// cache of ElfMachines.
#[derive(Clone, Default)]
pub struct ReleaseWaiting {
    family: Family<ReleaseLabels, Gauge>,
    shown: Arc<Mutex<HashSet<ReleaseLabels>>>,
}

impl ReleaseWaiting {
    /// Replaces the series with the machines of `machines` that wait for a release. A machine
    /// that still waits keeps its series throughout (no scrape sees it missing).
    pub fn observe<'a>(&self, machines: impl IntoIterator<Item = &'a ElfMachine>) {
        let mut now = HashSet::new();
        for m in machines {
            let Some(deleted) = &m.metadata.deletion_timestamp else {
                continue;
            };
            let finalizers = m.finalizers();
            if !finalizers.iter().any(|f| f == STATIC_IP_FINALIZER) {
                continue;
            }
            let cape = finalizers.iter().any(|f| f == CAPE_FINALIZER);
            let labels = ReleaseLabels {
                machine: format!("{}/{}", m.namespace().unwrap_or_default(), m.name_any()),
                waiting_for: if cape { "vm-deletion" } else { "release" }.into(),
            };
            self.family
                .get_or_create(&labels)
                .set(deleted.0.as_second());
            now.insert(labels);
        }
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        for gone in shown.difference(&now) {
            self.family.remove(gone);
        }
        *shown = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(name: &str, deleted: Option<&str>, finalizers: &[&str]) -> ElfMachine {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
            "kind": "ElfMachine",
            "metadata": {"name": name, "namespace": "ns", "deletionTimestamp": deleted,
                         "finalizers": finalizers},
            "spec": {"network": {"devices": []}},
        }))
        .unwrap()
    }

    fn waiting_lines(m: &Metrics) -> Vec<String> {
        m.encode()
            .lines()
            .filter(|l| l.starts_with("cape_static_ip_release_waiting_since_timestamp_seconds{"))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn release_waiting_names_each_machine_and_what_it_waits_for() {
        let m = Metrics::default();
        let both = [CAPE_FINALIZER, STATIC_IP_FINALIZER];
        let machines = [
            machine("vm", Some("2026-12-01T10:00:00Z"), &both),
            machine("ours", Some("2026-12-01T11:00:00Z"), &[STATIC_IP_FINALIZER]),
            machine("live", None, &both),
            machine("not-ours", Some("2026-12-01T10:00:00Z"), &[CAPE_FINALIZER]),
        ];
        m.release_waiting.observe(&machines);
        let mut lines = waiting_lines(&m);
        lines.sort();
        assert_eq!(
            lines,
            [
                "cape_static_ip_release_waiting_since_timestamp_seconds{machine=\"ns/ours\",waiting_for=\"release\"} 1796122800",
                "cape_static_ip_release_waiting_since_timestamp_seconds{machine=\"ns/vm\",waiting_for=\"vm-deletion\"} 1796119200",
            ]
        );
        // CAPE's finalizer went: the machine now waits for us, under the other label only.
        let machines = [machine(
            "vm",
            Some("2026-12-01T10:00:00Z"),
            &[STATIC_IP_FINALIZER],
        )];
        m.release_waiting.observe(&machines);
        assert_eq!(
            waiting_lines(&m),
            [
                "cape_static_ip_release_waiting_since_timestamp_seconds{machine=\"ns/vm\",waiting_for=\"release\"} 1796119200"
            ]
        );
        m.release_waiting.observe(&[]);
        assert!(waiting_lines(&m).is_empty());
    }

    /// Every `pool_used_addresses` and `pool_free_addresses` series of one scrape.
    fn pool_series(text: &str) -> (usize, usize) {
        let used = text
            .lines()
            .filter(|l| l.starts_with("cape_static_ip_pool_used_addresses{"))
            .count();
        let free = text
            .lines()
            .filter(|l| l.starts_with("cape_static_ip_pool_free_addresses{"))
            .count();
        (used, free)
    }

    #[test]
    fn pool_gauges_are_read_from_the_source_at_each_scrape() {
        let metrics = Metrics::default();
        assert_eq!(pool_series(&metrics.encode()), (0, 0));
        let usage = |pool: &str, used, free, cooling| PoolUsage {
            pool: pool.into(),
            used,
            free,
            cooling,
        };
        let pools = Arc::new(std::sync::Mutex::new(vec![usage("ns/a", 3, 7, 1)]));
        {
            let pools = pools.clone();
            metrics.pools_from(move || pools.lock().unwrap().clone());
        }
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE cape_static_ip_pool_used_addresses gauge"),
            "{text}"
        );
        assert!(text.contains(r#"cape_static_ip_pool_used_addresses{pool="ns/a"} 3"#));
        assert!(text.contains(r#"cape_static_ip_pool_free_addresses{pool="ns/a"} 7"#));
        assert!(text.contains(r#"cape_static_ip_pool_cooling_addresses{pool="ns/a"} 1"#));
        // A deleted pool is gone from the next scrape, a new one appears.
        *pools.lock().unwrap() = vec![usage("ns/b", 1, 0, 0)];
        let text = metrics.encode();
        assert!(!text.contains("ns/a"), "{text}");
        assert!(text.contains(r#"cape_static_ip_pool_free_addresses{pool="ns/b"} 0"#));
    }

    #[test]
    fn concurrent_scrapes_each_see_every_pool() {
        const POOLS: usize = 50;
        let metrics = Arc::new(Metrics::default());
        metrics.pools_from(|| {
            (0..POOLS)
                .map(|i| PoolUsage {
                    pool: format!("ns/pool-{i}"),
                    used: i,
                    free: POOLS - i,
                    cooling: 0,
                })
                .collect()
        });
        let scrapers: Vec<_> = (0..8)
            .map(|_| {
                let metrics = metrics.clone();
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        assert_eq!(pool_series(&metrics.encode()), (POOLS, POOLS));
                    }
                })
            })
            .collect();
        for s in scrapers {
            s.join().expect("a scrape saw every pool");
        }
    }
}
