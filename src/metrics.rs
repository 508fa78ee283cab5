//! Prometheus metrics, served on the admin port's `/metrics`.

use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, text::encode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
    pub pool_used: Family<PoolOnly, Gauge>,
    pub pool_free: Family<PoolOnly, Gauge>,
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
        let pool_used = Family::<PoolOnly, Gauge>::default();
        let pool_free = Family::<PoolOnly, Gauge>::default();
        registry.register(
            "pool_used_addresses",
            "Addresses of a pool held by an IPAddress (as the watch cache sees them)",
            pool_used.clone(),
        );
        registry.register(
            "pool_free_addresses",
            "Addresses of a pool still free to allocate",
            pool_free.clone(),
        );
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
        Metrics {
            registry,
            reviews,
            allocations,
            releases,
            caches_synced,
            certificate_expiry,
            pool_used,
            pool_free,
        }
    }
}

impl Metrics {
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
