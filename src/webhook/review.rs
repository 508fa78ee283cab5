//! Turns an AdmissionReview for an ElfMachine into a decision: allow unchanged, deny with a
//! message, or patch in the addresses. The decision is converted to a response in exactly
//! one place ([`respond`]); only an unreadable body gets `invalid` (it has no uid to answer).

use std::collections::BTreeMap;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rand::distr::{Alphanumeric, SampleString};
use serde::Deserialize;
use serde_json::Value;
use tracing::Instrument;

use crate::assign::{Assigner, Lease, MachineView, needs_address};
use crate::cluster::crd::ElfMachineSpec;
use crate::webhook::patch::{self, Extras};

/// What to answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Allow,
    Deny { code: u16, message: String },
    Patch(json_patch::Patch),
}

/// Reviews one request end to end.
pub async fn review(
    assigner: &Assigner,
    body: AdmissionReview<DynamicObject>,
) -> AdmissionReview<DynamicObject> {
    let request: AdmissionRequest<DynamicObject> = match body.try_into() {
        Ok(r) => r,
        Err(e) => return unreadable(b"", &format!("not an admission request: {e}")),
    };
    let span = tracing::info_span!(
        "review",
        uid = %request.uid,
        namespace = request.namespace.as_deref().unwrap_or_default(),
        name = %request.name,
        operation = ?request.operation,
        dry_run = request.dry_run,
        allowed = tracing::field::Empty,
        patched = tracing::field::Empty,
    );
    // The span is attached to the future (not entered across awaits), so that concurrent
    // reviews never log under each other's span. The decision runs on its own task: when
    // the apiserver gives up on the call (its timeout) and the connection goes, the request
    // future is dropped, but a half-done assignment still finishes or gives back what it
    // wrote, and no address stays reserved in memory for a request nobody waits for.
    let decision = {
        let assigner = assigner.clone();
        let request = request.clone();
        // The caller's budget of pending claims goes with it (a task-local).
        let budget = crate::assign::pending::current_budget();
        let decide = async move { decide(&assigner, &request).await };
        tokio::spawn(crate::assign::pending::with_budget(budget, decide).instrument(span.clone()))
            .await
            .unwrap_or_else(|e| Decision::Deny {
                code: 500,
                message: format!("cape-static-ip failed while reviewing this request ({e}); retry"),
            })
    };
    span.record("allowed", !matches!(decision, Decision::Deny { .. }));
    span.record("patched", matches!(decision, Decision::Patch(_)));
    span.in_scope(|| match &decision {
        Decision::Deny { message, .. } => tracing::info!(reason = %message, "denied"),
        Decision::Patch(p) => tracing::info!(ops = p.0.len(), "patched"),
        Decision::Allow => tracing::debug!("allowed unchanged"),
    });
    respond(&request, decision).into_review()
}

/// The answer to a body that does not parse as an AdmissionReview of an object (`error` says
/// why). When the body is still JSON carrying `request.uid` (a review whose object is
/// malformed), the request is denied with 400 under that uid, so that the apiserver gets an
/// answer to its request instead of a uid mismatch; only a body without a uid gets `invalid`.
pub fn unreadable(body: &[u8], error: &dyn std::fmt::Display) -> AdmissionReview<DynamicObject> {
    let uid = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.pointer("/request/uid")?.as_str().map(str::to_string))
        .filter(|uid| !uid.is_empty());
    let mut response = match &uid {
        Some(_) => AdmissionResponse::invalid(format!(
            "the ElfMachine in this AdmissionReview cannot be read: {error}"
        )),
        None => AdmissionResponse::invalid(format!("unreadable AdmissionReview: {error}")),
    };
    response.uid = uid.unwrap_or_default();
    response.result.code = 400;
    response.result.reason = reason_for(400).to_string();
    response.into_review()
}

/// The one place a decision becomes a response.
pub fn respond(request: &AdmissionRequest<DynamicObject>, decision: Decision) -> AdmissionResponse {
    let response = AdmissionResponse::from(request);
    match decision {
        Decision::Allow => response,
        Decision::Deny { code, message } => {
            let mut denied = response.deny(message);
            denied.result.code = code;
            denied.result.reason = reason_for(code).to_string();
            denied
        }
        Decision::Patch(p) if p.0.is_empty() => response,
        Decision::Patch(p) => match response.clone().with_patch(p) {
            Ok(r) => r,
            Err(e) => {
                let mut denied =
                    response.deny(format!("internal error: could not encode the patch: {e}"));
                denied.result.code = 500;
                denied
            }
        },
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    }
}

fn deny(code: u16, message: String) -> Decision {
    Decision::Deny { code, message }
}

/// One entry of the webhook registration's `matchConditions` (CEL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchCondition {
    pub name: &'static str,
    pub expression: &'static str,
}

/// [`needs_review`] as CEL, for the apiserver: the webhook is called only when every
/// condition is true, so requests that cannot need an address never wait for us (and go
/// through while we are down). Every registration uses these: `manifests/webhook.yaml`
/// (a test checks it holds exactly these), `hack/run.sh` (renders that file) and the tests'.
/// Absent fields are guarded with `has()`; the apiserver drops `null`s of an ElfMachine
/// (its schema has no nullable field) before admission. A spec of the wrong shape (say
/// `devices: "x"`) makes a condition fail to evaluate: with `failurePolicy: Fail` the
/// apiserver refuses the request naming the expression, as its schema would next.
pub const MATCH_CONDITIONS: [MatchCondition; 3] = [
    MatchCondition {
        name: "not-being-deleted",
        expression: "!has(object.metadata.deletionTimestamp)",
    },
    MatchCondition {
        name: "a-device-needs-an-address",
        expression: "has(object.spec) && has(object.spec.network) && \
            has(object.spec.network.devices) && \
            object.spec.network.devices.exists(d, has(d.networkType) && \
            d.networkType == 'IPV4' && (!has(d.ipAddrs) || size(d.ipAddrs) == 0))",
    },
    MatchCondition {
        name: "devices-changed-on-update",
        expression: "request.operation != 'UPDATE' || \
            !has(oldObject.spec) || !has(oldObject.spec.network) || \
            !has(oldObject.spec.network.devices) || \
            !has(object.spec) || !has(object.spec.network) || !has(object.spec.network.devices) || \
            object.spec.network.devices != oldObject.spec.network.devices",
    },
];

/// [`MATCH_CONDITIONS`] as the registration's field.
pub fn match_conditions() -> Vec<k8s_openapi::api::admissionregistration::v1::MatchCondition> {
    MATCH_CONDITIONS
        .iter()
        .map(
            |c| k8s_openapi::api::admissionregistration::v1::MatchCondition {
                name: c.name.into(),
                expression: c.expression.into(),
            },
        )
        .collect()
}

/// Whether a request can need us at all; the one rule, kept equal to [`MATCH_CONDITIONS`]:
/// a CREATE or UPDATE of a machine that is not being deleted, with a device that needs an
/// address ([`needs_address`]: `networkType: IPV4` and no `ipAddrs`), and for an UPDATE only
/// when `spec.network.devices` changed (a wipe of `ipAddrs` or a hot-added NIC changes them).
/// Everything else (labels, annotations, finalizers, `providerID`, CAPE's spec fields, the
/// finalizer removals of a deletion, dry runs of any of these) is allowed unchanged. A
/// machine that already needed an address and whose devices did not change (admitted
/// without us) is left to the background reconciler, as it would be with the conditions.
/// A spec that cannot be read counts as needing review, so that [`decide`] denies it
/// saying why.
pub fn needs_review(operation: &Operation, object: &Value, old_object: Option<&Value>) -> bool {
    if !matches!(operation, Operation::Create | Operation::Update)
        || object
            .pointer("/metadata/deletionTimestamp")
            .is_some_and(|t| !t.is_null())
    {
        return false;
    }
    let Some(spec) = object.get("spec").filter(|s| !s.is_null()) else {
        return false;
    };
    let Ok(spec) = ElfMachineSpec::deserialize(spec) else {
        return true;
    };
    if !spec.network.devices.iter().any(needs_address) {
        return false;
    }
    const DEVICES: &str = "/spec/network/devices";
    *operation != Operation::Update
        || old_object.and_then(|o| o.pointer(DEVICES)) != object.pointer(DEVICES)
}

/// Decides what to do with a request (no I/O unless a device needs an address).
pub async fn decide(assigner: &Assigner, request: &AdmissionRequest<DynamicObject>) -> Decision {
    let prepared = match prepare(request) {
        Ok(p) => p,
        Err(decided) => return decided,
    };
    match assigner.assign(&prepared.machine(), request.dry_run).await {
        Ok(leases) => prepared.patched(&leases, assigner.caches.schema.device_nameservers()),
        Err(e) => deny(e.code(), e.to_string()),
    }
}

/// A request read and checked, whose devices need addresses: what [`Assigner::assign`] takes
/// ([`Prepared::machine`]) and what its leases are written into ([`Prepared::patched`]).
#[derive(Debug)]
pub struct Prepared<'a> {
    pub object: &'a DynamicObject,
    /// The object as JSON (the patch is built against it).
    pub object_json: Value,
    pub spec: ElfMachineSpec,
    pub namespace: String,
    /// `metadata.name`, or the name chosen here for a `generateName` request.
    pub name: String,
    /// The name chosen here, when the request had only `generateName`.
    pub generated: Option<String>,
    empty: BTreeMap<String, String>,
}

impl Prepared<'_> {
    /// The machine as the assigner sees it.
    pub fn machine(&self) -> MachineView<'_> {
        MachineView {
            namespace: &self.namespace,
            name: &self.name,
            uid: self.object.metadata.uid.as_deref(),
            labels: self.object.metadata.labels.as_ref().unwrap_or(&self.empty),
            annotations: self
                .object
                .metadata
                .annotations
                .as_ref()
                .unwrap_or(&self.empty),
            devices: &self.spec.network.devices,
        }
    }

    /// The decision once `leases` were obtained.
    pub fn patched(&self, leases: &[Lease], device_nameservers: bool) -> Decision {
        let extras = Extras {
            name: self.generated.as_deref(),
            finalizer: true,
            device_nameservers,
        };
        Decision::Patch(patch::build(&self.object_json, leases, &extras))
    }
}

/// The pure part of [`decide`]: reads the request and either decides at once (`Err`: allow or
/// deny, no address needed) or returns what the assigner needs. No I/O.
pub fn prepare(request: &AdmissionRequest<DynamicObject>) -> Result<Prepared<'_>, Decision> {
    if request.kind.kind != "ElfMachine"
        || request
            .sub_resource
            .as_deref()
            .is_some_and(|s| !s.is_empty())
    {
        return Err(Decision::Allow);
    }
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return Err(Decision::Allow);
    }
    let Some(object) = &request.object else {
        return Err(deny(400, "ElfMachine request has no object".into()));
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_default();
    let object_json = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => {
            return Err(deny(
                400,
                format!(
                    "ElfMachine {namespace}/{}: unreadable object: {e}",
                    request.name
                ),
            ));
        }
    };
    let old_json = request
        .old_object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok());
    if !needs_review(&request.operation, &object_json, old_json.as_ref()) {
        return Err(Decision::Allow);
    }
    let shown_name = object
        .metadata
        .name
        .clone()
        .or_else(|| {
            object
                .metadata
                .generate_name
                .as_ref()
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_default();
    let spec: ElfMachineSpec = match serde_json::from_value(
        object_json.get("spec").cloned().unwrap_or(Value::Null),
    ) {
        Ok(s) => s,
        Err(e) => {
            return Err(deny(
                400,
                format!(
                    "ElfMachine {namespace}/{shown_name}: spec.network cannot be read ({e}); fix the object's spec"
                ),
            ));
        }
    };

    // A generateName request has no name yet; choose it here so the claims can carry it.
    let mut generated = None;
    let name = match object.metadata.name.as_deref().filter(|n| !n.is_empty()) {
        Some(n) => n.to_string(),
        None => match object
            .metadata
            .generate_name
            .as_deref()
            .filter(|g| !g.is_empty())
        {
            Some(prefix) => {
                let suffix = Alphanumeric
                    .sample_string(&mut rand::rng(), 5)
                    .to_lowercase();
                let n = format!("{prefix}{suffix}");
                generated = Some(n.clone());
                n
            }
            None => {
                return Err(deny(
                    400,
                    format!("ElfMachine in {namespace} has neither metadata.name nor generateName"),
                ));
            }
        },
    };
    Ok(Prepared {
        object,
        object_json,
        spec,
        namespace,
        name,
        generated,
        empty: BTreeMap::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(body: &[u8]) -> AdmissionResponse {
        unreadable(body, &"test").response.expect("a response")
    }

    fn machine(devices: Value) -> Value {
        serde_json::json!({"metadata": {"name": "m"}, "spec": {"network": {"devices": devices}}})
    }

    #[test]
    fn needs_review_only_when_a_device_needs_an_address() {
        use serde_json::json;
        let needs = json!([{"networkType": "IPV4"}]);
        let has = json!([{"networkType": "IPV4", "ipAddrs": ["10.0.0.5"]}]);
        let create = |o: &Value| needs_review(&Operation::Create, o, None);
        let update = |o: &Value, old: &Value| needs_review(&Operation::Update, o, Some(old));
        assert!(create(&machine(needs.clone())));
        assert!(create(&machine(
            json!([{"networkType": "IPV4", "ipAddrs": []}])
        )));
        assert!(create(&machine(
            json!([has[0].clone(), {"networkType": "IPV4"}])
        )));
        assert!(!create(&machine(has.clone())));
        assert!(!create(&machine(
            json!([{"networkType": "IPV4_DHCP"}, {"networkType": "ipv4"}])
        )));
        assert!(!create(&machine(json!([]))));
        assert!(!create(&json!({"metadata": {"name": "m"}, "spec": {}})));
        assert!(!create(&json!({"metadata": {"name": "m"}})));
        // Unreadable: reviewed, so that admission denies it saying why.
        assert!(create(&machine(json!("not a list"))));
        // Being deleted: never.
        let mut deleting = machine(needs.clone());
        deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        assert!(!create(&deleting));
        assert!(!update(&deleting, &machine(needs.clone())));
        // UPDATE: only when the devices changed and one needs an address.
        let mut labelled = machine(has.clone());
        labelled["metadata"]["labels"] = json!({"x": "y"});
        assert!(!update(&labelled, &machine(has.clone())));
        assert!(
            update(&machine(needs.clone()), &machine(has.clone())),
            "a wipe"
        );
        assert!(
            update(
                &machine(json!([has[0].clone(), {"networkType": "IPV4"}])),
                &machine(has.clone())
            ),
            "a hot-added NIC"
        );
        assert!(
            update(
                &machine(needs.clone()),
                &json!({"metadata": {"name": "m"}, "spec": {}})
            ),
            "the network copied in later"
        );
        assert!(
            !update(&machine(needs.clone()), &machine(needs.clone())),
            "unchanged devices that need an address are left to the reconciler"
        );
        assert!(!update(
            &machine(json!([{"networkType": "IPV4", "ipAddrs": ["10.0.0.6"]}])),
            &machine(has.clone())
        ));
        for op in [Operation::Delete, Operation::Connect] {
            assert!(!needs_review(&op, &machine(needs.clone()), None));
        }
    }

    #[test]
    fn the_match_conditions_name_the_contract() {
        use crate::contract::NETWORK_TYPE_STATIC;
        let all: String = MATCH_CONDITIONS.iter().map(|c| c.expression).collect();
        assert!(all.contains(&format!("d.networkType == '{NETWORK_TYPE_STATIC}'")));
        assert!(
            all.contains("deletionTimestamp") && all.contains("oldObject.spec.network.devices")
        );
        assert_eq!(match_conditions().len(), MATCH_CONDITIONS.len());
        for c in MATCH_CONDITIONS {
            assert!(
                !c.expression.contains("  "),
                "{}: the YAML folds it into single spaces",
                c.name
            );
        }
    }

    fn request(text: &str) -> AdmissionRequest<DynamicObject> {
        let review: AdmissionReview<DynamicObject> = serde_json::from_str(text).expect("a review");
        review.try_into().expect("a request")
    }

    #[test]
    fn prepare_decides_alone_when_no_device_needs_an_address() {
        let r = request(include_str!("../../tests/fixtures/update-metadata.json"));
        assert_eq!(prepare(&r).unwrap_err(), Decision::Allow);
        let r = request(include_str!("../../tests/fixtures/bad-devices-string.json"));
        let Decision::Deny { code, message } = prepare(&r).unwrap_err() else {
            panic!("a string for devices is denied");
        };
        assert_eq!(code, 400);
        assert!(message.contains("spec.network cannot be read"), "{message}");
    }

    #[test]
    fn prepare_names_generated_machines_and_patched_writes_the_leases() {
        let r = request(include_str!("../../tests/fixtures/generate-name.json"));
        let p = prepare(&r).expect("a device needs an address");
        let generated = p.generated.clone().expect("a name is chosen");
        assert!(generated.starts_with("worker-") && generated.len() == "worker-".len() + 5);
        assert_eq!(p.machine().name, generated);
        let lease = Lease {
            device: 0,
            pool: crate::ipam::PoolKey {
                namespace: "default".into(),
                name: "p".into(),
            },
            claim: "c".into(),
            address: [10, 0, 0, 5].into(),
            prefix: 24,
            gateway: None,
            dns_servers: vec![],
        };
        let Decision::Patch(patch) = p.patched(&[lease], true) else {
            panic!("leases give a patch");
        };
        let mut out = p.object_json.clone();
        json_patch::patch(&mut out, &patch).expect("the patch applies");
        assert_eq!(out["metadata"]["name"], generated.as_str());
        assert_eq!(
            out["spec"]["network"]["devices"][0]["ipAddrs"],
            serde_json::json!(["10.0.0.5"])
        );
    }

    #[test]
    fn unreadable_bodies_keep_the_uid_when_there_is_one() {
        let r = response(br#"{"request": {"uid": "abc", "object": {"metadata": {"labels": 5}}}}"#);
        assert_eq!(r.uid, "abc");
        assert!(!r.allowed);
        assert_eq!(r.result.code, 400);
        assert!(
            r.result.message.contains("cannot be read"),
            "{}",
            r.result.message
        );

        for body in [
            &b"not json"[..],
            br#"{"kind": "ConfigMap"}"#,
            br#"{"request": {"uid": ""}}"#,
        ] {
            let r = response(body);
            assert_eq!(r.uid, "");
            assert!(!r.allowed);
            assert_eq!(r.result.code, 400);
        }
    }
}
