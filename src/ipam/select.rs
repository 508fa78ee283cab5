//! Which IPPools a device may use (DESIGN.md §2 "Pool selection"): the rules in order, first hit
//! wins, and a [`NoPool`] error that says what was looked for and where.
//!
//! Labels are read from the ElfMachine, else its ElfMachineTemplate, per key (a key on the machine
//! wins; an empty value counts as unset).
//!
//! 1. [`Rule::DevicePoolRef`]: the device's `addressesFromPools[0]` name, in the machine's
//!    namespace then `default`; the first that exists is the only candidate. None: [`NoPool`] (the
//!    user named a pool: no fall-through).
//! 2. [`Rule::PoolNameLabel`]: label `ip-pool-name`, in [`ip-pool-namespace` label, else the
//!    machine's namespace; then `default`]. Same as rule 1.
//! 3. [`Rule::GroupOrNetworkLabel`]: labels `ip-pool-group` and/or `network-name`: every pool (default
//!    or not) carrying the same values for each of these keys the machine has, in the
//!    `ip-pool-namespace` label's namespace, else the machine's. When none matches, rule 4 runs
//!    **narrowed** by the same labels (this is how "group/network labels, when present, narrow the
//!    default candidates" applies: a default pool in `cape-system` or `default` labelled with the
//!    machine's group is found even though rule 3 only looks in one namespace). Nothing there
//!    either: [`NoPool::NoMatchingPool`].
//! 4. [`Rule::DefaultPool`]: pools labelled `cluster.x-k8s.io/ip-pool-default` (any value) or
//!    `ippool.cluster.x-k8s.io/is-default: "true"`, in the machine's namespace, then the configured
//!    default namespace, then `default`; the first namespace with at least one gives the
//!    candidates.
//!
//! Candidates of one rule are in name order (the next is tried when one is full).

use std::collections::BTreeMap;
use std::fmt;

/// Names the pool (rule 2).
pub const LABEL_POOL_NAME: &str = "cluster.x-k8s.io/ip-pool-name";
/// Namespace for rules 2 and 3.
pub const LABEL_POOL_NAMESPACE: &str = "cluster.x-k8s.io/ip-pool-namespace";
/// Pool group (rule 3, narrows rule 4).
pub const LABEL_POOL_GROUP: &str = "cluster.x-k8s.io/ip-pool-group";
/// Network name (rule 3, narrows rule 4).
pub const LABEL_NETWORK_NAME: &str = "cluster.x-k8s.io/network-name";
/// A default pool (any value), as the Go controller's README documents.
pub const LABEL_DEFAULT: &str = "cluster.x-k8s.io/ip-pool-default";
/// A default pool when `"true"` (later upstream).
pub const LABEL_IS_DEFAULT: &str = "ippool.cluster.x-k8s.io/is-default";

/// The namespace every lookup ends in.
const DEFAULT_NAMESPACE: &str = "default";

/// `namespace/name` of an IPPool.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolKey {
    pub namespace: String,
    pub name: String,
}

impl PoolKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        PoolKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What selection needs to know about an IPPool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolMeta {
    pub key: PoolKey,
    pub labels: BTreeMap<String, String>,
}

impl PoolMeta {
    /// Labelled as a default pool.
    pub fn is_default(&self) -> bool {
        self.labels.contains_key(LABEL_DEFAULT)
            || self.labels.get(LABEL_IS_DEFAULT).map(String::as_str) == Some("true")
    }
}

/// One device of one ElfMachine.
#[derive(Debug, Clone, Copy)]
pub struct DeviceRequest<'a> {
    pub machine_namespace: &'a str,
    pub machine_labels: &'a BTreeMap<String, String>,
    /// The ElfMachineTemplate's labels, when it was found.
    pub template_labels: Option<&'a BTreeMap<String, String>>,
    /// `addressesFromPools[0].name`, only when it names a metal3 IPPool.
    pub pool_ref: Option<&'a str>,
}

/// Which rule chose the candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    DevicePoolRef,
    PoolNameLabel,
    GroupOrNetworkLabel,
    DefaultPool,
}

/// The pools to try, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub rule: Rule,
    /// Never empty.
    pub candidates: Vec<PoolKey>,
}

/// Where a label was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LabelSource {
    ElfMachine,
    ElfMachineTemplate,
}

impl fmt::Display for LabelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelSource::ElfMachine => "ElfMachine",
            LabelSource::ElfMachineTemplate => "ElfMachineTemplate",
        })
    }
}

/// A selection label as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelValue {
    pub key: &'static str,
    pub value: String,
    pub on: LabelSource,
}

impl fmt::Display for LabelValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={} (on the {})", self.key, self.value, self.on)
    }
}

/// No pool for the device. The caller prefixes the device index / machine name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPool {
    /// Rule 1.
    #[error("IPPool {name:?} (addressesFromPools[0] of the device) not found in namespaces {}", join(.namespaces))]
    PoolRefNotFound {
        name: String,
        namespaces: Vec<String>,
    },
    /// Rule 2.
    #[error("IPPool {name:?} (label {LABEL_POOL_NAME} on the {on}) not found in namespaces {}", join(.namespaces))]
    NamedPoolNotFound {
        name: String,
        on: LabelSource,
        namespaces: Vec<String>,
    },
    /// Rule 3, then rule 4 narrowed by the same labels.
    #[error(
        "no IPPool found: no IPPool in namespace {namespace} has labels {}; no default pool \
         (label {LABEL_DEFAULT} or {LABEL_IS_DEFAULT}=true) with these labels in namespaces {}",
        join(.labels), join(.default_namespaces)
    )]
    NoMatchingPool {
        labels: Vec<LabelValue>,
        namespace: String,
        default_namespaces: Vec<String>,
    },
    /// Rule 4.
    #[error(
        "no IPPool found: the device has no addressesFromPools; labels {LABEL_POOL_NAME}, \
         {LABEL_POOL_GROUP}, {LABEL_NETWORK_NAME} are not set on the ElfMachine or its template; \
         no default pool (label {LABEL_DEFAULT} or {LABEL_IS_DEFAULT}=true) in namespaces {}",
        join(.namespaces)
    )]
    NoDefaultPool { namespaces: Vec<String> },
}

fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl DeviceRequest<'_> {
    /// A selection label: the machine's, else the template's; empty values count as unset.
    pub fn label(&self, key: &'static str) -> Option<LabelValue> {
        let non_empty =
            |m: &BTreeMap<String, String>| m.get(key).filter(|v| !v.is_empty()).cloned();
        non_empty(self.machine_labels)
            .map(|value| LabelValue {
                key,
                value,
                on: LabelSource::ElfMachine,
            })
            .or_else(|| {
                self.template_labels
                    .and_then(non_empty)
                    .map(|value| LabelValue {
                        key,
                        value,
                        on: LabelSource::ElfMachineTemplate,
                    })
            })
    }
}

fn dedup(namespaces: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for ns in namespaces {
        if !out.iter().any(|o| o == ns) {
            out.push((*ns).to_string());
        }
    }
    out
}

/// The first namespace in which a pool called `name` exists.
fn find_named(pools: &[PoolMeta], name: &str, namespaces: &[String]) -> Option<PoolKey> {
    namespaces.iter().find_map(|ns| {
        pools
            .iter()
            .find(|p| p.key.namespace == *ns && p.key.name == name)
            .map(|p| p.key.clone())
    })
}

fn matches_labels(pool: &PoolMeta, labels: &[LabelValue]) -> bool {
    labels
        .iter()
        .all(|l| pool.labels.get(l.key) == Some(&l.value))
}

fn sorted_keys<'p>(pools: impl Iterator<Item = &'p PoolMeta>) -> Vec<PoolKey> {
    let mut keys: Vec<PoolKey> = pools.map(|p| p.key.clone()).collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Rule 4 (narrowed by `labels` when non-empty): the default pools of the first namespace that
/// has any.
fn find_defaults(pools: &[PoolMeta], namespaces: &[String], labels: &[LabelValue]) -> Vec<PoolKey> {
    namespaces
        .iter()
        .map(|ns| {
            sorted_keys(
                pools.iter().filter(|p| {
                    p.key.namespace == *ns && p.is_default() && matches_labels(p, labels)
                }),
            )
        })
        .find(|keys| !keys.is_empty())
        .unwrap_or_default()
}

/// Chooses the candidate pools of one device. `default_namespace` is the configured default
/// namespace (`cape-system` unless changed). O(number of pools). (Long: the four rules of
/// the contract, in order, one block each.)
pub fn select(
    req: &DeviceRequest,
    pools: &[PoolMeta],
    default_namespace: &str,
) -> Result<Selection, NoPool> {
    let machine_ns = req.machine_namespace;

    // 1. addressesFromPools[0]
    if let Some(name) = req.pool_ref.filter(|n| !n.is_empty()) {
        let namespaces = dedup(&[machine_ns, DEFAULT_NAMESPACE]);
        return match find_named(pools, name, &namespaces) {
            Some(key) => Ok(Selection {
                rule: Rule::DevicePoolRef,
                candidates: vec![key],
            }),
            None => Err(NoPool::PoolRefNotFound {
                name: name.to_string(),
                namespaces,
            }),
        };
    }

    let pool_ns = req.label(LABEL_POOL_NAMESPACE);
    let lookup_ns = pool_ns.as_ref().map_or(machine_ns, |l| l.value.as_str());

    // 2. ip-pool-name
    if let Some(name) = req.label(LABEL_POOL_NAME) {
        let namespaces = dedup(&[lookup_ns, DEFAULT_NAMESPACE]);
        return match find_named(pools, &name.value, &namespaces) {
            Some(key) => Ok(Selection {
                rule: Rule::PoolNameLabel,
                candidates: vec![key],
            }),
            None => Err(NoPool::NamedPoolNotFound {
                name: name.value,
                on: name.on,
                namespaces,
            }),
        };
    }

    let default_namespaces = dedup(&[machine_ns, default_namespace, DEFAULT_NAMESPACE]);

    // 3. ip-pool-group and/or network-name, then defaults narrowed by them
    let labels: Vec<LabelValue> = [LABEL_POOL_GROUP, LABEL_NETWORK_NAME]
        .into_iter()
        .filter_map(|k| req.label(k))
        .collect();
    if !labels.is_empty() {
        let candidates = sorted_keys(
            pools
                .iter()
                .filter(|p| p.key.namespace == lookup_ns && matches_labels(p, &labels)),
        );
        if !candidates.is_empty() {
            return Ok(Selection {
                rule: Rule::GroupOrNetworkLabel,
                candidates,
            });
        }
        let candidates = find_defaults(pools, &default_namespaces, &labels);
        if !candidates.is_empty() {
            return Ok(Selection {
                rule: Rule::DefaultPool,
                candidates,
            });
        }
        return Err(NoPool::NoMatchingPool {
            labels,
            namespace: lookup_ns.to_string(),
            default_namespaces,
        });
    }

    // 4. default pools
    let candidates = find_defaults(pools, &default_namespaces, &[]);
    if candidates.is_empty() {
        return Err(NoPool::NoDefaultPool {
            namespaces: default_namespaces,
        });
    }
    Ok(Selection {
        rule: Rule::DefaultPool,
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn meta(ns: &str, name: &str, kv: &[(&str, &str)]) -> PoolMeta {
        PoolMeta {
            key: PoolKey::new(ns, name),
            labels: labels(kv),
        }
    }

    fn keys(v: &[(&str, &str)]) -> Vec<PoolKey> {
        v.iter().map(|(ns, n)| PoolKey::new(*ns, *n)).collect()
    }

    fn pools() -> Vec<PoolMeta> {
        vec![
            meta("team-a", "p1", &[]),
            meta("default", "p1", &[]),
            meta("default", "p2", &[]),
            meta(
                "team-a",
                "g-b",
                &[(LABEL_POOL_GROUP, "prod"), (LABEL_NETWORK_NAME, "mgmt")],
            ),
            meta("team-a", "g-a", &[(LABEL_POOL_GROUP, "prod")]),
            meta("team-a", "g-c", &[(LABEL_POOL_GROUP, "dev")]),
            meta("cape-system", "d2", &[(LABEL_DEFAULT, "")]),
            meta(
                "cape-system",
                "d1",
                &[(LABEL_IS_DEFAULT, "true"), (LABEL_POOL_GROUP, "edge")],
            ),
            meta("cape-system", "not-default", &[(LABEL_IS_DEFAULT, "false")]),
            meta(
                "default",
                "dd",
                &[(LABEL_IS_DEFAULT, "true"), (LABEL_POOL_GROUP, "edge")],
            ),
            meta(
                "default",
                "dx",
                &[(LABEL_IS_DEFAULT, "true"), (LABEL_POOL_GROUP, "far")],
            ),
        ]
    }

    fn run(
        ns: &str,
        machine: &[(&str, &str)],
        template: Option<&[(&str, &str)]>,
        pool_ref: Option<&str>,
        pools: &[PoolMeta],
    ) -> Result<Selection, NoPool> {
        let m = labels(machine);
        let t = template.map(labels);
        select(
            &DeviceRequest {
                machine_namespace: ns,
                machine_labels: &m,
                template_labels: t.as_ref(),
                pool_ref,
            },
            pools,
            "cape-system",
        )
    }

    #[test]
    fn rule1_pool_ref() {
        let p = pools();
        let s = run("team-a", &[(LABEL_POOL_NAME, "p2")], None, Some("p1"), &p).unwrap();
        assert_eq!(s.rule, Rule::DevicePoolRef);
        assert_eq!(s.candidates, keys(&[("team-a", "p1")]));
        let s = run("team-a", &[], None, Some("p2"), &p).unwrap();
        assert_eq!(s.candidates, keys(&[("default", "p2")]));
        // named but missing: no fall-through to labels or defaults
        let e = run("team-a", &[(LABEL_POOL_NAME, "p1")], None, Some("nope"), &p).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"IPPool "nope" (addressesFromPools[0] of the device) not found in namespaces team-a, default"#
        );
        // empty ref counts as none
        let s = run("team-a", &[], None, Some(""), &p).unwrap();
        assert_eq!(s.rule, Rule::DefaultPool);
    }

    #[test]
    fn rule2_pool_name_label() {
        let p = pools();
        let s = run("team-a", &[], Some(&[(LABEL_POOL_NAME, "p1")]), None, &p).unwrap();
        assert_eq!(s.rule, Rule::PoolNameLabel);
        assert_eq!(s.candidates, keys(&[("team-a", "p1")]));
        // machine's label wins over the template's
        let s = run(
            "team-a",
            &[(LABEL_POOL_NAME, "p2")],
            Some(&[(LABEL_POOL_NAME, "p1")]),
            None,
            &p,
        )
        .unwrap();
        assert_eq!(s.candidates, keys(&[("default", "p2")]));
        // an empty machine label does not hide the template's
        let s = run(
            "team-a",
            &[(LABEL_POOL_NAME, "")],
            Some(&[(LABEL_POOL_NAME, "p1")]),
            None,
            &p,
        )
        .unwrap();
        assert_eq!(s.candidates, keys(&[("team-a", "p1")]));
        // ip-pool-namespace, then default
        let s = run(
            "team-b",
            &[(LABEL_POOL_NAMESPACE, "team-a")],
            Some(&[(LABEL_POOL_NAME, "p1")]),
            None,
            &p,
        )
        .unwrap();
        assert_eq!(s.candidates, keys(&[("team-a", "p1")]));
        let s = run("team-b", &[(LABEL_POOL_NAME, "p1")], None, None, &p).unwrap();
        assert_eq!(s.candidates, keys(&[("default", "p1")]));
        let e = run("team-a", &[], Some(&[(LABEL_POOL_NAME, "zz")]), None, &p).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"IPPool "zz" (label cluster.x-k8s.io/ip-pool-name on the ElfMachineTemplate) not found in namespaces team-a, default"#
        );
        let e = run("default", &[(LABEL_POOL_NAME, "zz")], None, None, &p).unwrap_err();
        assert_eq!(
            e,
            NoPool::NamedPoolNotFound {
                name: "zz".into(),
                on: LabelSource::ElfMachine,
                namespaces: vec!["default".into()]
            }
        );
    }

    #[test]
    fn rule3_group_and_network() {
        let p = pools();
        let s = run("team-a", &[(LABEL_POOL_GROUP, "prod")], None, None, &p).unwrap();
        assert_eq!(s.rule, Rule::GroupOrNetworkLabel);
        assert_eq!(s.candidates, keys(&[("team-a", "g-a"), ("team-a", "g-b")]));
        // both keys must match
        let s = run(
            "team-a",
            &[(LABEL_POOL_GROUP, "prod")],
            Some(&[(LABEL_NETWORK_NAME, "mgmt")]),
            None,
            &p,
        )
        .unwrap();
        assert_eq!(s.candidates, keys(&[("team-a", "g-b")]));
        let s = run("team-a", &[(LABEL_NETWORK_NAME, "mgmt")], None, None, &p).unwrap();
        assert_eq!(s.candidates, keys(&[("team-a", "g-b")]));
        // ip-pool-namespace
        let s = run(
            "team-z",
            &[(LABEL_POOL_GROUP, "dev"), (LABEL_POOL_NAMESPACE, "team-a")],
            None,
            None,
            &p,
        )
        .unwrap();
        assert_eq!(s.candidates, keys(&[("team-a", "g-c")]));
    }

    #[test]
    fn rule3_falls_to_defaults_narrowed_by_labels() {
        let p = pools();
        // no "edge" pool in team-a: default pools with group=edge, first namespace that has one
        let s = run("team-a", &[(LABEL_POOL_GROUP, "edge")], None, None, &p).unwrap();
        assert_eq!(s.rule, Rule::DefaultPool);
        assert_eq!(s.candidates, keys(&[("cape-system", "d1")]));
        let s = run("team-a", &[(LABEL_POOL_GROUP, "far")], None, None, &p).unwrap();
        assert_eq!(s.candidates, keys(&[("default", "dx")]));
        let e = run(
            "team-a",
            &[(LABEL_POOL_GROUP, "nope")],
            Some(&[(LABEL_NETWORK_NAME, "n1")]),
            None,
            &p,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no IPPool found: no IPPool in namespace team-a has labels \
             cluster.x-k8s.io/ip-pool-group=nope (on the ElfMachine), \
             cluster.x-k8s.io/network-name=n1 (on the ElfMachineTemplate); no default pool \
             (label cluster.x-k8s.io/ip-pool-default or ippool.cluster.x-k8s.io/is-default=true) \
             with these labels in namespaces team-a, cape-system, default"
        );
    }

    #[test]
    fn rule4_defaults() {
        let p = pools();
        let s = run("team-a", &[], None, None, &p).unwrap();
        assert_eq!(s.rule, Rule::DefaultPool);
        assert_eq!(
            s.candidates,
            keys(&[("cape-system", "d1"), ("cape-system", "d2")])
        );
        // a default pool in the machine's namespace wins
        let mut p2 = p.clone();
        p2.push(meta("team-a", "local", &[(LABEL_DEFAULT, "yes")]));
        let s = run("team-a", &[], None, None, &p2).unwrap();
        assert_eq!(s.candidates, keys(&[("team-a", "local")]));
        // only "default"
        let p3: Vec<_> = p
            .iter()
            .filter(|m| m.key.namespace != "cape-system")
            .cloned()
            .collect();
        let s = run("team-a", &[], None, None, &p3).unwrap();
        assert_eq!(s.candidates, keys(&[("default", "dd"), ("default", "dx")]));
        let e = run("team-a", &[], None, None, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no IPPool found: the device has no addressesFromPools; labels \
             cluster.x-k8s.io/ip-pool-name, cluster.x-k8s.io/ip-pool-group, \
             cluster.x-k8s.io/network-name are not set on the ElfMachine or its template; no \
             default pool (label cluster.x-k8s.io/ip-pool-default or \
             ippool.cluster.x-k8s.io/is-default=true) in namespaces team-a, cape-system, default"
        );
        // namespaces deduplicated
        let e = run("default", &[], None, None, &[]).unwrap_err();
        assert_eq!(
            e,
            NoPool::NoDefaultPool {
                namespaces: vec!["default".into(), "cape-system".into()]
            }
        );
    }

    #[test]
    fn pool_key_display_and_order() {
        let mut v = keys(&[("b", "a"), ("a", "z"), ("a", "b")]);
        v.sort();
        assert_eq!(v, keys(&[("a", "b"), ("a", "z"), ("b", "a")]));
        assert_eq!(PoolKey::new("ns", "p").to_string(), "ns/p");
    }
}
