//! Turns an AdmissionReview for an ElfMachine into a decision: allow unchanged, deny with a
//! message, or patch in the addresses. The decision is converted to a response in exactly
//! one place ([`respond`]); only an unreadable body gets `invalid` (it has no uid to answer).

use std::collections::BTreeMap;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value;
use tracing::Instrument;

use crate::assign::{Assigner, MachineView, needs_address};
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
        tokio::spawn(async move { decide(&assigner, &request).await }.instrument(span.clone()))
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
        404 => "NotFound",
        409 => "Conflict",
        422 => "Invalid",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    }
}

fn deny(code: u16, message: String) -> Decision {
    Decision::Deny { code, message }
}

/// Decides what to do with a request (no I/O unless a device needs an address).
pub async fn decide(assigner: &Assigner, request: &AdmissionRequest<DynamicObject>) -> Decision {
    if request.kind.kind != "ElfMachine"
        || request
            .sub_resource
            .as_deref()
            .is_some_and(|s| !s.is_empty())
    {
        return Decision::Allow;
    }
    if !matches!(request.operation, Operation::Create | Operation::Update) {
        return Decision::Allow;
    }
    let Some(object) = &request.object else {
        return deny(400, "ElfMachine request has no object".into());
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| object.metadata.namespace.clone())
        .unwrap_or_default();
    let object_json = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => {
            return deny(
                400,
                format!(
                    "ElfMachine {namespace}/{}: unreadable object: {e}",
                    request.name
                ),
            );
        }
    };
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
            return deny(
                400,
                format!(
                    "ElfMachine {namespace}/{shown_name}: spec.network cannot be read ({e}); fix the object's spec"
                ),
            );
        }
    };
    if object.metadata.deletion_timestamp.is_some()
        || !spec.network.devices.iter().any(needs_address)
    {
        return Decision::Allow;
    }

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
                return deny(
                    400,
                    format!("ElfMachine in {namespace} has neither metadata.name nor generateName"),
                );
            }
        },
    };
    let empty = BTreeMap::new();
    let machine = MachineView {
        namespace: &namespace,
        name: &name,
        uid: object.metadata.uid.as_deref(),
        labels: object.metadata.labels.as_ref().unwrap_or(&empty),
        annotations: object.metadata.annotations.as_ref().unwrap_or(&empty),
        devices: &spec.network.devices,
    };
    match assigner.assign(&machine, request.dry_run).await {
        Ok(leases) => {
            let extras = Extras {
                name: generated.as_deref(),
                finalizer: true,
                device_nameservers: assigner.caches.schema.device_nameservers(),
            };
            Decision::Patch(patch::build(&object_json, &leases, &extras))
        }
        Err(e) => deny(e.code(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(body: &[u8]) -> AdmissionResponse {
        unreadable(body, &"test").response.expect("a response")
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
