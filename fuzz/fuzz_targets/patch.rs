//! The JSON patch builder ([`patch::build`]) on ElfMachines as admission sees them (any mix of
//! devices, routes, nameservers, finalizers) and any leases on existing devices.
//!
//! Property: the patch applies (`json_patch::patch`) and yields exactly the expected object:
//! leased devices get `ipAddrs`, `netmask`, the gateway route (kept once) and DNS servers
//! (per device, or merged into `spec.network.nameservers`, at most 3); our finalizer is there
//! once and the others keep their order; a generated name is set; nothing else changes.
#![no_main]

use std::net::Ipv4Addr;

use arbitrary::{Arbitrary, Unstructured};
use cape_static_ip::assign::Lease;
use cape_static_ip::contract::STATIC_IP_FINALIZER;
use cape_static_ip::ipam::PoolKey;
use cape_static_ip::webhook::patch::{self, Extras, MAX_NAMESERVERS};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

/// A small address space, so that gateways, routes and DNS servers collide often.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Near(u8),
    Any(u32),
}

impl Addr {
    fn ip(self) -> Ipv4Addr {
        match self {
            Addr::Near(n) => Ipv4Addr::new(10, 0, 0, n % 8),
            Addr::Any(n) => Ipv4Addr::from(n),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Text {
    Addr(Addr),
    Empty,
    Other(String),
}

impl Text {
    fn value(&self) -> Value {
        match self {
            Text::Addr(a) => json!(a.ip().to_string()),
            Text::Empty => json!(""),
            Text::Other(s) => json!(s),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Route {
    gateway: Option<Text>,
    network: Option<Text>,
    netmask: Option<Text>,
}

#[derive(Arbitrary, Debug)]
enum List<T> {
    Missing,
    Null,
    Items(Vec<T>),
}

#[derive(Arbitrary, Debug)]
struct Device {
    network_type: u8,
    ip_addrs: List<Addr>,
    netmask: Option<Text>,
    routes: List<Route>,
    nameservers: List<Addr>,
    /// Fields this project does not model; they must survive.
    vlan: Option<String>,
}

#[derive(Arbitrary, Debug)]
struct FuzzLease {
    device: u8,
    address: Addr,
    prefix: u8,
    gateway: Option<Addr>,
    dns: Vec<Addr>,
}

#[derive(Arbitrary, Debug)]
struct Input {
    devices: Vec<Device>,
    network_nameservers: List<Addr>,
    finalizers: List<Text>,
    our_finalizer_at: Option<u8>,
    leases: Vec<FuzzLease>,
    name: Option<String>,
    device_nameservers: bool,
}

fn list<T>(l: &List<T>, f: impl Fn(&T) -> Value) -> Option<Value> {
    match l {
        List::Missing => None,
        List::Null => Some(Value::Null),
        List::Items(items) => Some(Value::Array(items.iter().map(f).collect())),
    }
}

fn device_json(d: &Device) -> Value {
    let mut m = Map::new();
    let types = ["IPV4", "IPV4_DHCP", "NONE", ""];
    m.insert(
        "networkType".into(),
        json!(types[usize::from(d.network_type) % types.len()]),
    );
    if let Some(v) = &d.vlan {
        m.insert("vlan".into(), json!(v));
    }
    if let Some(v) = list(&d.ip_addrs, |a| json!(a.ip().to_string())) {
        m.insert("ipAddrs".into(), v);
    }
    if let Some(t) = &d.netmask {
        m.insert("netmask".into(), t.value());
    }
    let route = |r: &Route| {
        let mut o = Map::new();
        for (k, v) in [
            ("gateway", &r.gateway),
            ("network", &r.network),
            ("netmask", &r.netmask),
        ] {
            if let Some(t) = v {
                o.insert(k.into(), t.value());
            }
        }
        Value::Object(o)
    };
    if let Some(v) = list(&d.routes, route) {
        m.insert("routes".into(), v);
    }
    if let Some(v) = list(&d.nameservers, |a| json!(a.ip().to_string())) {
        m.insert("nameservers".into(), v);
    }
    Value::Object(m)
}

fn machine(input: &Input) -> Value {
    let mut network = Map::new();
    network.insert(
        "devices".into(),
        Value::Array(input.devices.iter().map(device_json).collect()),
    );
    if let Some(v) = list(&input.network_nameservers, |a| json!(a.ip().to_string())) {
        network.insert("nameservers".into(), v);
    }
    let mut metadata = Map::new();
    metadata.insert("namespace".into(), json!("default"));
    if input.name.is_none() {
        metadata.insert("name".into(), json!("m"));
    } else {
        metadata.insert("generateName".into(), json!("m-"));
    }
    // As admission sees it: finalizers are a list of strings (ObjectMeta) or absent.
    if let List::Items(items) = &input.finalizers {
        let mut f: Vec<Value> = items.iter().map(Text::value).collect();
        if let Some(at) = input.our_finalizer_at {
            f.insert(usize::from(at) % (f.len() + 1), json!(STATIC_IP_FINALIZER));
        }
        metadata.insert("finalizers".into(), Value::Array(f));
    }
    json!({
        "apiVersion": "infrastructure.cluster.x-k8s.io/v1beta1",
        "kind": "ElfMachine",
        "metadata": metadata,
        "spec": {"template": "t", "network": network},
    })
}

fn netmask(prefix: u8) -> Ipv4Addr {
    let p = u32::from(prefix.min(32));
    Ipv4Addr::from(if p == 0 { 0 } else { u32::MAX << (32 - p) })
}

/// The expected object, computed apart from the builder.
fn expected(object: &Value, leases: &[Lease], name: Option<&str>, per_device: bool) -> Value {
    let mut out = object.clone();
    if let Some(n) = name {
        out["metadata"]["name"] = json!(n);
    }
    let fin = out["metadata"]
        .as_object_mut()
        .unwrap()
        .entry("finalizers")
        .or_insert_with(|| json!([]));
    if !fin
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == STATIC_IP_FINALIZER)
    {
        fin.as_array_mut().unwrap().push(json!(STATIC_IP_FINALIZER));
    }
    let original_dns: Vec<String> = object["spec"]["network"]["nameservers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut dns = original_dns.clone();
    for l in leases {
        let d = &mut out["spec"]["network"]["devices"][l.device];
        d["ipAddrs"] = json!([l.address.to_string()]);
        d["netmask"] = json!(netmask(l.prefix).to_string());
        if let Some(gw) = l.gateway {
            let gw = gw.to_string();
            let mut routes = d["routes"].as_array().cloned().unwrap_or_default();
            let present = routes.iter().any(|r| {
                r["gateway"] == json!(gw)
                    && r.get("network")
                        .and_then(Value::as_str)
                        .is_none_or(str::is_empty)
            });
            if !present {
                routes.push(json!({"gateway": gw}));
            }
            d["routes"] = Value::Array(routes);
        }
        if !l.dns_servers.is_empty() {
            let list: Vec<String> = l.dns_servers.iter().map(|a| a.to_string()).collect();
            if per_device {
                d["nameservers"] = json!(list[..list.len().min(MAX_NAMESERVERS)]);
            } else {
                for s in list {
                    if !dns.contains(&s) && dns.len() < MAX_NAMESERVERS {
                        dns.push(s);
                    }
                }
            }
        }
    }
    if dns != original_dns {
        out["spec"]["network"]["nameservers"] = json!(dns);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    if input.devices.is_empty() {
        return;
    }
    let object = machine(&input);
    // One lease per device at most, on devices that exist (as the assigner gives them).
    let mut leases: Vec<Lease> = Vec::new();
    for l in &input.leases {
        let device = usize::from(l.device) % input.devices.len();
        if leases.iter().any(|x| x.device == device) {
            continue;
        }
        leases.push(Lease {
            device,
            pool: PoolKey {
                namespace: "default".into(),
                name: "p".into(),
            },
            claim: format!("default-m-{device}"),
            address: l.address.ip(),
            prefix: l.prefix,
            gateway: l.gateway.map(Addr::ip),
            dns_servers: l.dns.iter().map(|a| a.ip()).collect(),
        });
    }
    let name = input.name.as_deref().map(|s| format!("m-{s}"));
    let extras = Extras {
        name: name.as_deref(),
        finalizer: true,
        device_nameservers: input.device_nameservers,
    };
    let ops = patch::build(&object, &leases, &extras);
    let mut out = object.clone();
    json_patch::patch(&mut out, &ops).expect("the patch applies to the machine");
    let want = expected(&object, &leases, name.as_deref(), input.device_nameservers);
    assert_eq!(out, want, "patch {ops:?}");
    // Idempotent: the same leases on the patched object change nothing more.
    let again_extras = Extras {
        name: None,
        ..extras
    };
    let mut again = out.clone();
    json_patch::patch(&mut again, &patch::build(&out, &leases, &again_extras))
        .expect("the patch applies twice");
    assert_eq!(again, out, "a second patch changes nothing");
});
