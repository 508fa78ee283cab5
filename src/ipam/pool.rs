//! Parsing and validation of a metal3 `IPPool` into a [`Pool`]: ranges, prefix, gateway and DNS
//! servers per range, pre-allocations, strategy, and the set of allocatable addresses.
//!
//! metal3 semantics, stricter where metal3 is unsafe:
//! - a range is `start`+`end`; `subnet` only (network+1 ..= last address of the subnet);
//!   `start`+`subnet` (up to the last address of the subnet); `end`+`subnet` (from network+1).
//!   `start`/`end` must lie inside `subnet` when one is given, and `start <= end`.
//! - prefix: the range's, else `spec.prefix`, else the length of the range's `subnet` (0 counts as
//!   unset, as in metal3); none is an error, never a `0.0.0.0` netmask. A range must lie inside one
//!   network of its prefix (a range straddling two /24s with prefix 24 would hand out addresses
//!   whose gateway or broadcast is wrong), so network and broadcast are well defined per range.
//! - gateway / dnsServers: the range's when non-empty, else the spec-level ones; all IPv4.
//! - `preAllocations` values must be IPv4 and inside a range (metal3's webhook rejects
//!   out-of-bounds pre-allocations too).
//! - ranges may overlap: an address belongs to the first range (declaration order) containing it,
//!   whose prefix/gateway/DNS it gets.
//!
//! Never allocatable (to anyone): the gateway of any range, the network and broadcast address of
//! the owning range's prefix (except /31 and /32), and every `preAllocations` value (those only go
//! to their own claim, see [`Pool::pre_allocation`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use super::interval::IntervalSet;

/// An `ipam.metal3.io/v1alpha1` IPPool, as plain data (the shell converts the API object).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolInput {
    pub namespace: String,
    pub name: String,
    /// `spec.namePrefix` (required, non-empty).
    pub name_prefix: String,
    /// `spec.pools[]`.
    pub ranges: Vec<RangeInput>,
    /// `spec.prefix` (fallback for ranges without one).
    pub prefix: Option<i64>,
    /// `spec.gateway` (fallback).
    pub gateway: Option<String>,
    /// `spec.dnsServers` (fallback).
    pub dns_servers: Vec<String>,
    /// `spec.preAllocations`: claim name -> ip.
    pub pre_allocations: BTreeMap<String, String>,
    /// `spec.allocationStrategy`: "sequential" (default) or "random".
    pub allocation_strategy: Option<String>,
}

/// One entry of `spec.pools[]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeInput {
    pub start: Option<String>,
    pub end: Option<String>,
    pub subnet: Option<String>,
    pub prefix: Option<i64>,
    pub gateway: Option<String>,
    pub dns_servers: Vec<String>,
}

/// How the next address is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// The lowest free address, ranges in declaration order.
    #[default]
    Sequential,
    /// A (nearly) uniformly random free address.
    Random,
}

/// One resolved range: `first..=last` with the values an address of it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub first: u32,
    pub last: u32,
    /// 1..=32.
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
}

impl Range {
    /// The dotted netmask of the range's prefix.
    pub fn netmask(&self) -> Ipv4Addr {
        netmask(self.prefix)
    }

    /// Whether `ip` lies in `first..=last`.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }

    /// Number of addresses in `first..=last` (before exclusions).
    pub fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Always false: a range has at least one address.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Network and broadcast address of the range's prefix, or `None` for /31 and /32.
    pub fn network_and_broadcast(&self) -> Option<(u32, u32)> {
        (self.prefix < 31).then(|| {
            let mask = u32::from(netmask(self.prefix));
            let network = self.first & mask;
            (network, network | !mask)
        })
    }
}

/// A validated IPPool. Build it with [`parse_pool`]; treat the public fields as read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub namespace: String,
    pub name: String,
    pub name_prefix: String,
    /// In declaration order (`spec.pools[i]` is `ranges[i]`).
    pub ranges: Vec<Range>,
    pub pre_allocations: BTreeMap<String, Ipv4Addr>,
    pub strategy: Strategy,
    /// Disjoint pieces of address space sorted by `first`, each owned by one range.
    segments: Vec<Segment>,
    /// `segment_offsets[i]` = number of addresses in `segments[..i]`.
    segment_offsets: Vec<u64>,
    /// Allocatable addresses as [`Pool::slot`] keys.
    allocatable: IntervalSet,
    /// Every range's gateway.
    gateways: BTreeSet<u32>,
    /// Every `preAllocations` value.
    pre_allocated: BTreeSet<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    first: u32,
    last: u32,
    range: usize,
}

/// A pool that cannot be used. `Display`: `IPPool <namespace>/<name>: <what is wrong>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("IPPool {pool}: {message}")]
pub struct PoolError {
    /// `namespace/name`.
    pub pool: String,
    /// What is wrong, naming the field path (`spec.pools[1].end ...`).
    pub message: String,
}

/// The dotted netmask of a prefix length (values above 32 are treated as 32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let prefix = u32::from(prefix.min(32));
    Ipv4Addr::from(u32::MAX.checked_shl(32 - prefix).unwrap_or(0))
}

/// The name of the IPAddress object of `ip`: `<namePrefix>-<ip with '.' replaced by '-'>`.
pub fn address_name(name_prefix: &str, ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{name_prefix}-{a}-{b}-{c}-{d}")
}

impl Pool {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The name of the IPAddress object of `ip` in this pool.
    pub fn address_name(&self, ip: Ipv4Addr) -> String {
        address_name(&self.name_prefix, ip)
    }

    /// Index of the range `ip` belongs to (the first in declaration order containing it).
    /// O(log ranges).
    pub fn range_index_of(&self, ip: Ipv4Addr) -> Option<usize> {
        let ip = u32::from(ip);
        let i = self.segments.partition_point(|s| s.first <= ip);
        let seg = self.segments.get(i.checked_sub(1)?)?;
        (ip <= seg.last).then_some(seg.range)
    }

    /// The range `ip` belongs to: its netmask, gateway and DNS servers are the address's.
    pub fn range_of(&self, ip: Ipv4Addr) -> Option<&Range> {
        self.range_index_of(ip).map(|i| &self.ranges[i])
    }

    /// Whether `ip` lies in a range (allocatable or not).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.range_index_of(ip).is_some()
    }

    /// Number of allocatable addresses (after exclusions; pre-allocated ones are not counted).
    pub fn size(&self) -> usize {
        usize::try_from(self.allocatable.len()).unwrap_or(usize::MAX)
    }

    /// Whether `ip` may be handed to a claim without a pre-allocation.
    pub fn is_allocatable(&self, ip: Ipv4Addr) -> bool {
        self.slot(ip)
            .is_some_and(|slot| self.allocatable.contains(slot))
    }

    /// The address pinned to `claim_name` by `spec.preAllocations`, if any.
    pub fn pre_allocation(&self, claim_name: &str) -> Option<Ipv4Addr> {
        self.pre_allocations.get(claim_name).copied()
    }

    /// Why `ip` must never be configured on a machine (gateway, network or broadcast address,
    /// outside every range), or `None` when it may (it can still be pre-allocated or in use).
    pub fn unusable_reason(&self, ip: Ipv4Addr) -> Option<String> {
        let Some(range) = self.range_of(ip) else {
            return Some("outside every range of spec.pools".to_string());
        };
        let raw = u32::from(ip);
        if self.gateways.contains(&raw) {
            return Some("a gateway".to_string());
        }
        if let Some((network, broadcast)) = range.network_and_broadcast() {
            let net = Ipv4Addr::from(network);
            if raw == network {
                return Some(format!("the network address of {net}/{}", range.prefix));
            }
            if raw == broadcast {
                return Some(format!("the broadcast address of {net}/{}", range.prefix));
            }
        }
        None
    }

    /// Allocation-order key of `ip`: `(range index << 32) | ip`, so that ascending keys are
    /// "ranges in declaration order, addresses ascending within a range".
    pub(crate) fn slot(&self, ip: Ipv4Addr) -> Option<u64> {
        self.range_index_of(ip).map(|r| slot_key(r, u32::from(ip)))
    }

    /// The allocatable set, as slot keys.
    pub(crate) fn allocatable(&self) -> &IntervalSet {
        &self.allocatable
    }

    /// Number of addresses covered by the ranges (before exclusions).
    pub(crate) fn span(&self) -> u64 {
        self.segment_offsets.last().copied().unwrap_or(0)
            + self
                .segments
                .last()
                .map_or(0, |s| u64::from(s.last - s.first) + 1)
    }

    /// The slot key of the `offset`-th address of the ranges' address space (`offset < span()`),
    /// counting segments in address order.
    pub(crate) fn slot_at_offset(&self, offset: u64) -> Option<u64> {
        let i = self
            .segment_offsets
            .partition_point(|&o| o <= offset)
            .checked_sub(1)?;
        let seg = self.segments[i];
        let ip = u64::from(seg.first) + (offset - self.segment_offsets[i]);
        (ip <= u64::from(seg.last)).then(|| slot_key(seg.range, ip as u32))
    }
}

pub(crate) fn slot_key(range: usize, ip: u32) -> u64 {
    ((range as u64) << 32) | u64::from(ip)
}

pub(crate) fn slot_ip(slot: u64) -> Ipv4Addr {
    Ipv4Addr::from((slot & 0xffff_ffff) as u32)
}

enum AddrError {
    Invalid,
    V6,
}

fn parse_v4(s: &str) -> Result<Ipv4Addr, AddrError> {
    if let Ok(ip) = s.parse::<Ipv4Addr>() {
        Ok(ip)
    } else if s.parse::<Ipv6Addr>().is_ok() {
        Err(AddrError::V6)
    } else {
        Err(AddrError::Invalid)
    }
}

fn addr(value: &str, path: &str, need: &str) -> Result<Ipv4Addr, String> {
    parse_v4(value).map_err(|e| match e {
        AddrError::Invalid => format!("{path} {value:?} is not an IPv4 address"),
        AddrError::V6 => format!("{path} {value:?} is IPv6; IPV4 devices need {need}"),
    })
}

fn opt_addr(value: Option<&String>, path: &str, need: &str) -> Result<Option<Ipv4Addr>, String> {
    match value.map(String::as_str) {
        None | Some("") => Ok(None),
        Some(v) => addr(v, path, need).map(Some),
    }
}

/// `a.b.c.d/len` -> (network, len). Host bits are masked off, as Go's `net.ParseCIDR` does.
fn opt_subnet(value: Option<&String>, path: &str) -> Result<Option<(u32, u8)>, String> {
    let Some(v) = value.map(String::as_str).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let invalid = || format!("{path} {v:?} is not an IPv4 subnet (a.b.c.d/len)");
    let (ip, len) = v.split_once('/').ok_or_else(invalid)?;
    let ip = match parse_v4(ip) {
        Ok(ip) => ip,
        Err(AddrError::V6) => {
            return Err(format!(
                "{path} {v:?} is IPv6; IPV4 devices need IPv4 ranges"
            ));
        }
        Err(AddrError::Invalid) => return Err(invalid()),
    };
    let len: u8 = len
        .parse()
        .ok()
        .filter(|&l| l <= 32 && !len.starts_with('+'))
        .ok_or_else(invalid)?;
    Ok(Some((u32::from(ip) & u32::from(netmask(len)), len)))
}

/// `Some(0)` and `None` are "unset" (metal3's int field); otherwise 1..=32.
fn opt_prefix(value: Option<i64>, path: &str) -> Result<Option<u8>, String> {
    match value {
        None | Some(0) => Ok(None),
        Some(p @ 1..=32) => Ok(Some(p as u8)),
        Some(p) => Err(format!("{path} {p} is not between 1 and 32")),
    }
}

fn dns_list(values: &[String], path: &str) -> Result<Vec<Ipv4Addr>, String> {
    values
        .iter()
        .enumerate()
        .map(|(j, v)| addr(v, &format!("{path}[{j}]"), "IPv4 DNS servers"))
        .collect()
}

fn check_name_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Err("spec.namePrefix is empty".to_string());
    }
    let valid_chars = prefix
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let starts_alnum = prefix
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    // The longest suffix is "-255-255-255-255" (16); object names are at most 253.
    if !valid_chars || !starts_alnum || prefix.len() > 253 - 16 {
        return Err(format!(
            "spec.namePrefix {prefix:?} cannot start an object name (lowercase letters, digits, \
             '-' and '.', starting with a letter or digit, at most 237 characters)"
        ));
    }
    Ok(())
}

fn ip_str(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v)
}

struct Fallbacks {
    prefix: Option<u8>,
    gateway: Option<Ipv4Addr>,
    dns: Vec<Ipv4Addr>,
}

/// One range of the pool, each field checked in turn with a message that names it (long: a
/// flat list of checks, clearest as one function).
fn parse_range(i: usize, r: &RangeInput, fb: &Fallbacks) -> Result<Range, String> {
    let p = format!("spec.pools[{i}]");
    let need = "IPv4 ranges";
    let start = opt_addr(r.start.as_ref(), &format!("{p}.start"), need)?.map(u32::from);
    let end = opt_addr(r.end.as_ref(), &format!("{p}.end"), need)?.map(u32::from);
    let subnet = opt_subnet(r.subnet.as_ref(), &format!("{p}.subnet"))?;
    let subnet_bounds = subnet.map(|(net, len)| {
        let last = net | !u32::from(netmask(len));
        (net, len, last)
    });
    if let Some((net, len, last)) = subnet_bounds {
        for (field, v) in [("start", start), ("end", end)] {
            if let Some(v) = v.filter(|&v| v < net || v > last) {
                return Err(format!(
                    "{p}.{field} {} is outside subnet {}/{len}",
                    ip_str(v),
                    ip_str(net)
                ));
            }
        }
    }
    let after_network = |net: u32, len: u8| {
        net.checked_add(1)
            .filter(|&f| f <= net | !u32::from(netmask(len)))
            .ok_or_else(|| {
                format!(
                    "{p}.subnet {}/{len} has no address after its network address",
                    ip_str(net)
                )
            })
    };
    let (first, last) = match (start, end, subnet_bounds) {
        (Some(s), Some(e), _) => (s, e),
        (None, None, Some((net, len, last))) => (after_network(net, len)?, last),
        (Some(s), None, Some((_, _, last))) => (s, last),
        (None, Some(e), Some((net, len, _))) => (after_network(net, len)?, e),
        (Some(_), None, None) => {
            return Err(format!(
                "{p}: start without end (set {p}.end or {p}.subnet)"
            ));
        }
        (None, Some(_), None) => {
            return Err(format!(
                "{p}: end without start (set {p}.start or {p}.subnet)"
            ));
        }
        (None, None, None) => {
            return Err(format!("{p}: no start, end or subnet"));
        }
    };
    if first > last {
        return Err(format!(
            "{p}: start {} is after end {}",
            ip_str(first),
            ip_str(last)
        ));
    }
    let prefix = opt_prefix(r.prefix, &format!("{p}.prefix"))?
        .or(fb.prefix)
        .or(subnet.map(|(_, len)| len).filter(|&l| l > 0))
        .ok_or_else(|| format!("{p}: no prefix (set {p}.prefix or spec.prefix)"))?;
    let mask = u32::from(netmask(prefix));
    if first & mask != last & mask {
        return Err(format!(
            "{p}: {}-{} is not inside one /{prefix} network (prefix {prefix}); \
             split it into one range per network",
            ip_str(first),
            ip_str(last)
        ));
    }
    let gateway = opt_addr(
        r.gateway.as_ref(),
        &format!("{p}.gateway"),
        "an IPv4 gateway",
    )?
    .or(fb.gateway);
    let dns_servers = if r.dns_servers.is_empty() {
        fb.dns.clone()
    } else {
        dns_list(&r.dns_servers, &format!("{p}.dnsServers"))?
    };
    Ok(Range {
        first,
        last,
        prefix,
        gateway,
        dns_servers,
    })
}

/// Validates an IPPool and computes its allocatable addresses. O(ranges + exclusions), independent
/// of the number of addresses.
pub fn parse_pool(input: &PoolInput) -> Result<Pool, PoolError> {
    let key = format!("{}/{}", input.namespace, input.name);
    parse_inner(input).map_err(|message| PoolError { pool: key, message })
}

/// The pool's spec-level fields, then its ranges (long: a flat list of checks in the order
/// the messages should come, clearest as one function).
fn parse_inner(input: &PoolInput) -> Result<Pool, String> {
    check_name_prefix(&input.name_prefix)?;
    if input.ranges.is_empty() {
        return Err("spec.pools is empty".to_string());
    }
    let strategy = match input.allocation_strategy.as_deref() {
        None | Some("") | Some("sequential") => Strategy::Sequential,
        Some("random") => Strategy::Random,
        Some(other) => {
            return Err(format!(
                "spec.allocationStrategy {other:?} is not \"sequential\" or \"random\""
            ));
        }
    };
    // An IPv6 pool usually also has an IPv6-sized spec.prefix (64): name the range's IPv6
    // address, the actual problem, rather than the prefix.
    for (i, r) in input.ranges.iter().enumerate() {
        let p = format!("spec.pools[{i}]");
        opt_addr(r.start.as_ref(), &format!("{p}.start"), "IPv4 ranges")?;
        opt_addr(r.end.as_ref(), &format!("{p}.end"), "IPv4 ranges")?;
        opt_subnet(r.subnet.as_ref(), &format!("{p}.subnet"))?;
    }
    let fb = Fallbacks {
        prefix: opt_prefix(input.prefix, "spec.prefix")?,
        gateway: opt_addr(input.gateway.as_ref(), "spec.gateway", "an IPv4 gateway")?,
        dns: dns_list(&input.dns_servers, "spec.dnsServers")?,
    };
    let ranges = input
        .ranges
        .iter()
        .enumerate()
        .map(|(i, r)| parse_range(i, r, &fb))
        .collect::<Result<Vec<_>, _>>()?;

    // Ownership: each address belongs to the first range containing it.
    let mut covered = IntervalSet::new();
    let mut segments = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        for (a, b) in covered.gaps_within(u64::from(r.first), u64::from(r.last)) {
            segments.push(Segment {
                first: a as u32,
                last: b as u32,
                range: i,
            });
        }
        covered.insert_range(u64::from(r.first), u64::from(r.last));
    }
    segments.sort_by_key(|s| s.first);
    let mut segment_offsets = Vec::with_capacity(segments.len());
    let mut total = 0u64;
    for s in &segments {
        segment_offsets.push(total);
        total += u64::from(s.last - s.first) + 1;
    }

    let mut allocatable = IntervalSet::new();
    for s in &segments {
        allocatable.insert_range(slot_key(s.range, s.first), slot_key(s.range, s.last));
    }
    let mut pool = Pool {
        namespace: input.namespace.clone(),
        name: input.name.clone(),
        name_prefix: input.name_prefix.clone(),
        ranges,
        pre_allocations: BTreeMap::new(),
        strategy,
        segments,
        segment_offsets,
        allocatable,
        gateways: BTreeSet::new(),
        pre_allocated: BTreeSet::new(),
    };

    for (claim, value) in &input.pre_allocations {
        let path = format!("spec.preAllocations[{claim}]");
        let ip = addr(value, &path, "IPv4 addresses")?;
        if !pool.contains(ip) {
            return Err(format!("{path} {ip} is outside every range of spec.pools"));
        }
        pool.pre_allocations.insert(claim.clone(), ip);
        pool.pre_allocated.insert(u32::from(ip));
    }
    pool.gateways = pool
        .ranges
        .iter()
        .filter_map(|r| r.gateway.map(u32::from))
        .collect();

    let mut excluded: Vec<u32> = pool.gateways.iter().copied().collect();
    excluded.extend(pool.pre_allocated.iter().copied());
    for (i, r) in pool.ranges.iter().enumerate() {
        if let Some((network, broadcast)) = r.network_and_broadcast() {
            for v in [network, broadcast] {
                if pool.range_index_of(Ipv4Addr::from(v)) == Some(i) {
                    excluded.push(v);
                }
            }
        }
    }
    for v in excluded {
        if let Some(slot) = pool.slot(Ipv4Addr::from(v)) {
            pool.allocatable.remove(slot);
        }
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn range(start: &str, end: &str) -> RangeInput {
        RangeInput {
            start: Some(start.into()),
            end: Some(end.into()),
            ..Default::default()
        }
    }

    fn subnet(s: &str) -> RangeInput {
        RangeInput {
            subnet: Some(s.into()),
            ..Default::default()
        }
    }

    fn input(ranges: Vec<RangeInput>) -> PoolInput {
        PoolInput {
            namespace: "default".into(),
            name: "p1".into(),
            name_prefix: "p1".into(),
            ranges,
            prefix: Some(24),
            ..Default::default()
        }
    }

    fn err(input: &PoolInput) -> String {
        parse_pool(input).unwrap_err().to_string()
    }

    #[test]
    fn netmask_and_names() {
        assert_eq!(netmask(24), ip("255.255.255.0"));
        assert_eq!(netmask(32), ip("255.255.255.255"));
        assert_eq!(netmask(1), ip("128.0.0.0"));
        assert_eq!(netmask(0), ip("0.0.0.0"));
        assert_eq!(netmask(20), ip("255.255.240.0"));
        assert_eq!(address_name("mgmt", ip("10.10.0.2")), "mgmt-10-10-0-2");
    }

    #[test]
    fn example_04_subnet_with_pre_allocations() {
        let mut p = input(vec![RangeInput {
            subnet: Some("10.10.0.0/24".into()),
            prefix: Some(24),
            gateway: Some("10.10.0.1".into()),
            dns_servers: vec!["10.10.0.53".into(), "10.10.1.53".into()],
            ..Default::default()
        }]);
        p.name_prefix = "mgmt".into();
        p.gateway = Some("10.10.0.1".into());
        p.dns_servers = vec!["10.10.0.53".into()];
        p.pre_allocations = [
            ("reserved-gateway", "10.10.0.1"),
            ("reserved-broadcast", "10.10.0.255"),
            ("default-demo-lb-0-0", "10.10.0.10"),
        ]
        .into_iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let pool = parse_pool(&p).unwrap();
        let r = &pool.ranges[0];
        assert_eq!(
            (r.first, r.last),
            (u32::from(ip("10.10.0.1")), u32::from(ip("10.10.0.255")))
        );
        assert_eq!(r.dns_servers, vec![ip("10.10.0.53"), ip("10.10.1.53")]);
        assert_eq!(r.gateway, Some(ip("10.10.0.1")));
        // 255 addresses, minus gateway .1, broadcast .255, pinned .10
        assert_eq!(pool.size(), 252);
        assert!(!pool.is_allocatable(ip("10.10.0.10")));
        assert!(pool.is_allocatable(ip("10.10.0.2")));
        assert_eq!(
            pool.pre_allocation("default-demo-lb-0-0"),
            Some(ip("10.10.0.10"))
        );
        assert_eq!(pool.address_name(ip("10.10.0.2")), "mgmt-10-10-0-2");
        assert!(pool.contains(ip("10.10.0.255")));
        assert!(!pool.contains(ip("10.10.0.0")));
        assert_eq!(pool.unusable_reason(ip("10.10.0.1")).unwrap(), "a gateway");
        assert_eq!(
            pool.unusable_reason(ip("10.10.0.255")).unwrap(),
            "the broadcast address of 10.10.0.0/24"
        );
        assert_eq!(pool.unusable_reason(ip("10.10.0.10")), None);
    }

    #[test]
    fn range_forms() {
        let cases = [
            (range("10.0.0.5", "10.0.0.9"), "10.0.0.5", "10.0.0.9"),
            (subnet("10.0.0.0/24"), "10.0.0.1", "10.0.0.255"),
            (subnet("10.0.0.77/24"), "10.0.0.1", "10.0.0.255"),
            (
                RangeInput {
                    start: Some("10.0.0.100".into()),
                    subnet: Some("10.0.0.0/24".into()),
                    ..Default::default()
                },
                "10.0.0.100",
                "10.0.0.255",
            ),
            (
                RangeInput {
                    end: Some("10.0.0.100".into()),
                    subnet: Some("10.0.0.0/24".into()),
                    ..Default::default()
                },
                "10.0.0.1",
                "10.0.0.100",
            ),
        ];
        for (r, first, last) in cases {
            let pool = parse_pool(&input(vec![r.clone()])).unwrap();
            assert_eq!(pool.ranges[0].first, u32::from(ip(first)), "{r:?}");
            assert_eq!(pool.ranges[0].last, u32::from(ip(last)), "{r:?}");
        }
    }

    #[test]
    fn prefix_resolution() {
        // range's, else pool's, else subnet's
        let mut p = input(vec![
            RangeInput {
                prefix: Some(26),
                ..range("10.0.0.5", "10.0.0.9")
            },
            range("10.0.1.5", "10.0.1.9"),
            subnet("10.0.2.0/25"),
        ]);
        let pool = parse_pool(&p).unwrap();
        assert_eq!(
            pool.ranges.iter().map(|r| r.prefix).collect::<Vec<_>>(),
            vec![26, 24, 24]
        );
        p.prefix = Some(0);
        assert_eq!(
            err(&p),
            "IPPool default/p1: spec.pools[1]: no prefix (set spec.pools[1].prefix or spec.prefix)"
        );
        p.ranges.remove(1);
        let pool = parse_pool(&p).unwrap();
        assert_eq!(pool.ranges[1].prefix, 25);
        assert_eq!(
            pool.range_of(ip("10.0.2.9")).unwrap().netmask(),
            ip("255.255.255.128")
        );
        p.prefix = Some(33);
        assert_eq!(
            err(&p),
            "IPPool default/p1: spec.prefix 33 is not between 1 and 32"
        );
        p.prefix = None;
        p.ranges[0].prefix = Some(-1);
        assert_eq!(
            err(&p),
            "IPPool default/p1: spec.pools[0].prefix -1 is not between 1 and 32"
        );
    }

    #[test]
    fn gateway_and_dns_fallbacks() {
        let mut p = input(vec![
            RangeInput {
                gateway: Some("10.0.0.254".into()),
                dns_servers: vec!["1.1.1.1".into()],
                ..range("10.0.0.5", "10.0.0.9")
            },
            RangeInput {
                gateway: Some(String::new()),
                ..range("10.0.0.20", "10.0.0.29")
            },
        ]);
        p.gateway = Some("10.0.0.1".into());
        p.dns_servers = vec!["8.8.8.8".into(), "8.8.4.4".into()];
        let pool = parse_pool(&p).unwrap();
        assert_eq!(pool.ranges[0].gateway, Some(ip("10.0.0.254")));
        assert_eq!(pool.ranges[0].dns_servers, vec![ip("1.1.1.1")]);
        assert_eq!(pool.ranges[1].gateway, Some(ip("10.0.0.1")));
        assert_eq!(
            pool.ranges[1].dns_servers,
            vec![ip("8.8.8.8"), ip("8.8.4.4")]
        );
    }

    #[test]
    fn exclusions() {
        // gateway inside the range, network and broadcast of the prefix
        let mut p = input(vec![subnet("10.0.0.0/29")]);
        p.prefix = None;
        p.gateway = Some("10.0.0.1".into());
        let pool = parse_pool(&p).unwrap();
        // .1-.7; minus gateway .1 and broadcast .7
        assert_eq!(pool.size(), 5);
        assert!(!pool.is_allocatable(ip("10.0.0.7")));
        assert!(!pool.is_allocatable(ip("10.0.0.1")));
        assert!(pool.is_allocatable(ip("10.0.0.2")));
        // start/end including the network address
        let p = input(vec![range("10.0.0.0", "10.0.0.3")]);
        let pool = parse_pool(&p).unwrap();
        assert!(!pool.is_allocatable(ip("10.0.0.0")));
        assert_eq!(pool.size(), 3);
        // /31 and /32: nothing excluded
        for (prefix, size) in [(31, 2), (32, 1)] {
            let mut p = input(vec![range(
                "10.0.0.4",
                if prefix == 31 { "10.0.0.5" } else { "10.0.0.4" },
            )]);
            p.prefix = Some(prefix);
            assert_eq!(parse_pool(&p).unwrap().size(), size);
        }
    }

    #[test]
    fn overlapping_ranges_belong_to_the_first() {
        let p = input(vec![
            RangeInput {
                prefix: Some(28),
                ..range("10.0.0.20", "10.0.0.30")
            },
            range("10.0.0.10", "10.0.0.40"),
        ]);
        let pool = parse_pool(&p).unwrap();
        assert_eq!(pool.range_index_of(ip("10.0.0.25")), Some(0));
        assert_eq!(pool.range_index_of(ip("10.0.0.15")), Some(1));
        assert_eq!(pool.range_index_of(ip("10.0.0.35")), Some(1));
        assert_eq!(pool.range_index_of(ip("10.0.0.41")), None);
        assert_eq!(pool.range_index_of(ip("10.0.0.9")), None);
        // 31 addresses; range 0 (prefix 28, 10.0.0.16/28) has no network/broadcast inside
        // .20-.30... .31 is its broadcast but belongs to range 1.
        assert_eq!(pool.size(), 31);
        assert_eq!(pool.span(), 31);
    }

    #[test]
    fn validation_messages() {
        let cases: Vec<(PoolInput, &str)> = vec![
            (
                input(vec![
                    range("10.0.0.1", "10.0.0.2"),
                    range("10.0.0.5", "10.0.0.300"),
                ]),
                r#"IPPool default/p1: spec.pools[1].end "10.0.0.300" is not an IPv4 address"#,
            ),
            (
                input(vec![range("10.0.0.9", "10.0.0.5")]),
                "IPPool default/p1: spec.pools[0]: start 10.0.0.9 is after end 10.0.0.5",
            ),
            (
                input(vec![RangeInput {
                    subnet: Some("10.0.0.0/24".into()),
                    ..range("10.1.0.1", "10.0.0.5")
                }]),
                "IPPool default/p1: spec.pools[0].start 10.1.0.1 is outside subnet 10.0.0.0/24",
            ),
            (
                input(vec![range("fd00::1", "fd00::9")]),
                r#"IPPool default/p1: spec.pools[0].start "fd00::1" is IPv6; IPV4 devices need IPv4 ranges"#,
            ),
            (
                // An IPv6 pool as users write it: the range is named, not spec.prefix.
                PoolInput {
                    prefix: Some(64),
                    ..input(vec![range("fd00::10", "fd00::20")])
                },
                r#"IPPool default/p1: spec.pools[0].start "fd00::10" is IPv6; IPV4 devices need IPv4 ranges"#,
            ),
            (
                input(vec![subnet("fd00::/64")]),
                r#"IPPool default/p1: spec.pools[0].subnet "fd00::/64" is IPv6; IPV4 devices need IPv4 ranges"#,
            ),
            (
                input(vec![subnet("10.0.0.0/33")]),
                r#"IPPool default/p1: spec.pools[0].subnet "10.0.0.0/33" is not an IPv4 subnet (a.b.c.d/len)"#,
            ),
            (
                input(vec![subnet("10.0.0.5/32")]),
                "IPPool default/p1: spec.pools[0].subnet 10.0.0.5/32 has no address after its network address",
            ),
            (input(vec![]), "IPPool default/p1: spec.pools is empty"),
            (
                PoolInput {
                    name_prefix: String::new(),
                    ..input(vec![range("10.0.0.1", "10.0.0.2")])
                },
                "IPPool default/p1: spec.namePrefix is empty",
            ),
            (
                input(vec![RangeInput {
                    start: Some("10.0.0.1".into()),
                    ..Default::default()
                }]),
                "IPPool default/p1: spec.pools[0]: start without end (set spec.pools[0].end or spec.pools[0].subnet)",
            ),
            (
                input(vec![RangeInput::default()]),
                "IPPool default/p1: spec.pools[0]: no start, end or subnet",
            ),
            (
                input(vec![range("10.0.0.10", "10.0.1.20")]),
                "IPPool default/p1: spec.pools[0]: 10.0.0.10-10.0.1.20 is not inside one /24 network (prefix 24); split it into one range per network",
            ),
            (
                input(vec![RangeInput {
                    gateway: Some("10.0.0.x".into()),
                    ..range("10.0.0.1", "10.0.0.2")
                }]),
                r#"IPPool default/p1: spec.pools[0].gateway "10.0.0.x" is not an IPv4 address"#,
            ),
            (
                PoolInput {
                    dns_servers: vec!["1.1.1.1".into(), "2001:db8::1".into()],
                    ..input(vec![range("10.0.0.1", "10.0.0.2")])
                },
                r#"IPPool default/p1: spec.dnsServers[1] "2001:db8::1" is IPv6; IPV4 devices need IPv4 DNS servers"#,
            ),
            (
                input(vec![RangeInput {
                    dns_servers: vec![String::new()],
                    ..range("10.0.0.1", "10.0.0.2")
                }]),
                r#"IPPool default/p1: spec.pools[0].dnsServers[0] "" is not an IPv4 address"#,
            ),
            (
                PoolInput {
                    pre_allocations: [("c".to_string(), "10.0.0.99".to_string())].into(),
                    ..input(vec![range("10.0.0.1", "10.0.0.2")])
                },
                "IPPool default/p1: spec.preAllocations[c] 10.0.0.99 is outside every range of spec.pools",
            ),
            (
                PoolInput {
                    pre_allocations: [("c".to_string(), "nope".to_string())].into(),
                    ..input(vec![range("10.0.0.1", "10.0.0.2")])
                },
                r#"IPPool default/p1: spec.preAllocations[c] "nope" is not an IPv4 address"#,
            ),
            (
                PoolInput {
                    allocation_strategy: Some("Random".into()),
                    ..input(vec![range("10.0.0.1", "10.0.0.2")])
                },
                r#"IPPool default/p1: spec.allocationStrategy "Random" is not "sequential" or "random""#,
            ),
            (
                PoolInput {
                    name_prefix: "Bad_".into(),
                    ..input(vec![range("10.0.0.1", "10.0.0.2")])
                },
                r#"IPPool default/p1: spec.namePrefix "Bad_" cannot start an object name (lowercase letters, digits, '-' and '.', starting with a letter or digit, at most 237 characters)"#,
            ),
        ];
        for (p, want) in cases {
            assert_eq!(err(&p), want);
        }
    }

    #[test]
    fn strategy() {
        let mut p = input(vec![range("10.0.0.1", "10.0.0.2")]);
        assert_eq!(parse_pool(&p).unwrap().strategy, Strategy::Sequential);
        p.allocation_strategy = Some("random".into());
        assert_eq!(parse_pool(&p).unwrap().strategy, Strategy::Random);
    }

    #[test]
    fn slot_offsets_cover_every_address_once() {
        let p = input(vec![
            range("10.0.0.50", "10.0.0.60"),
            range("10.0.0.10", "10.0.0.20"),
            range("10.0.0.15", "10.0.0.55"),
        ]);
        let pool = parse_pool(&p).unwrap();
        let span = pool.span();
        assert_eq!(span, 51); // .10 - .60
        let mut seen = BTreeSet::new();
        for o in 0..span {
            let slot = pool.slot_at_offset(o).unwrap();
            assert_eq!(pool.slot(slot_ip(slot)), Some(slot));
            assert!(seen.insert(slot));
        }
        assert_eq!(pool.slot_at_offset(span), None);
    }

    #[test]
    fn big_pool_parses_fast() {
        let mut p = input(vec![subnet("10.0.0.0/8")]);
        p.prefix = None;
        let pool = parse_pool(&p).unwrap();
        assert_eq!(pool.size(), (1 << 24) - 2);
    }
}
