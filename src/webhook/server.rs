//! HTTP endpoints. The webhook router (`POST /mutate-elfmachine`, served over TLS) and the
//! admin router (`/livez`, `/readyz`, `/metrics`, plain HTTP) are built apart from binding,
//! so tests can drive them without a socket. A review's body must arrive within
//! `--request-body-timeout`, and at most `--max-reviews-in-flight` reviews are handled at once:
//! one beyond is denied at once (code 429) rather than queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::assign::Assigner;
use crate::assign::pending;
use crate::metrics::Metrics;
use crate::webhook::auth::{Authenticator, Credentials};
use crate::webhook::listener::Limits;
use crate::webhook::review as admission;

/// The path the MutatingWebhookConfiguration calls.
pub const MUTATE_PATH: &str = "/mutate-elfmachine";

/// How long a review waits for the caches at start-up before it is refused.
const SYNC_WAIT: Duration = Duration::from_secs(5);

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub assigner: Assigner,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown starts: not ready any more.
    pub stopping: Arc<AtomicBool>,
    /// The body deadline and size, and the cap on reviews in flight.
    pub reviews: ReviewLimits,
    /// Who may send reviews.
    pub auth: Arc<Authenticator>,
}

/// The limits kept per review: its body's size and deadline, and how many run at once.
#[derive(Clone, Debug)]
pub struct ReviewLimits {
    body_timeout: Duration,
    max_body_bytes: usize,
    max_in_flight: usize,
    in_flight: Arc<Semaphore>,
}

impl ReviewLimits {
    pub fn new(limits: &Limits) -> Self {
        ReviewLimits {
            body_timeout: limits.request_body_timeout,
            max_body_bytes: limits.max_body_bytes,
            max_in_flight: limits.max_reviews_in_flight,
            in_flight: Arc::new(Semaphore::new(limits.max_reviews_in_flight)),
        }
    }

    /// Reviews being handled now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.in_flight.available_permits()
    }
}

impl Default for ReviewLimits {
    fn default() -> Self {
        ReviewLimits::new(&Limits::default())
    }
}

/// The webhook router.
pub fn webhook_router(state: AppState) -> Router {
    Router::new()
        .route(MUTATE_PATH, post(mutate))
        .route("/mutate", post(mutate))
        .with_state(state)
}

/// The admin router.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.stopping.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if !state.assigner.caches.ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced").into_response()
    } else {
        "ok".into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    state
        .metrics
        .caches_synced
        .set(i64::from(state.assigner.caches.ready()));
    // Pool gauges are built from the index by the metrics' collector, per scrape.
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Reads a body within the deadline and size limit; the error is the response to send.
async fn read_body(limits: &ReviewLimits, body: Body) -> Result<Bytes, Response> {
    let read = Limited::new(body, limits.max_body_bytes).collect();
    let refuse = |status: StatusCode, message: String| {
        // The rest of the body is not read: the connection cannot carry another request.
        (status, [(header::CONNECTION, "close")], message).into_response()
    };
    match tokio::time::timeout(limits.body_timeout, read).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<LengthLimitError>() => Err(refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {} bytes (--max-body-bytes)",
                limits.max_body_bytes
            ),
        )),
        Ok(Err(e)) => Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the request body could not be read: {e}"),
        )),
        Err(_) => Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {} (--request-body-timeout)",
                humantime::format_duration(limits.body_timeout)
            ),
        )),
    }
}

async fn mutate(State(state): State<AppState>, credentials: Credentials, body: Body) -> Response {
    let body = match read_body(&state.reviews, body).await {
        Ok(body) => body,
        Err(response) => {
            let mut timer = state.metrics.time_review("UNKNOWN");
            timer.result("invalid");
            return response;
        }
    };
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let mut timer = state.metrics.time_review("UNKNOWN");
            timer.result("invalid");
            return json_response(admission::unreadable(&body, &e));
        }
    };
    let operation = review
        .request
        .as_ref()
        .map(|r| format!("{:?}", r.operation).to_uppercase())
        .unwrap_or_else(|| "UNKNOWN".into());
    let mut timer = state.metrics.time_review(&operation);
    // Beyond the cap, a fast and clear denial: the apiserver's caller retries, where a queue
    // would only add latency until the webhook timeout.
    let Ok(_permit) = state.reviews.in_flight.try_acquire() else {
        timer.result("shed");
        let message = format!(
            "cape-static-ip is busy: {} reviews are in flight on this replica (--max-reviews-in-flight); retry",
            state.reviews.max_in_flight
        );
        return match TryInto::<AdmissionRequest<DynamicObject>>::try_into(review) {
            Ok(request) => json_response(
                admission::respond(&request, admission::Decision::Deny { code: 429, message })
                    .into_review(),
            ),
            Err(_) => (StatusCode::TOO_MANY_REQUESTS, message).into_response(),
        };
    };
    // Then the caller: nothing is decided (and nothing written) for a refused one.
    let budget = match state.auth.admit(&credentials).await {
        Ok(budget) => budget,
        Err(decision) => {
            timer.result("denied");
            return json_response(
                match TryInto::<AdmissionRequest<DynamicObject>>::try_into(review) {
                    Ok(request) => admission::respond(&request, decision).into_review(),
                    Err(e) => admission::unreadable(&body, &e),
                },
            );
        }
    };
    if !state.assigner.caches.ready()
        && tokio::time::timeout(SYNC_WAIT, state.assigner.caches.wait_ready())
            .await
            .is_err()
        && let Ok(request) = TryInto::<AdmissionRequest<DynamicObject>>::try_into(review.clone())
    {
        timer.result("denied");
        let decision = admission::Decision::Deny {
            code: 503,
            message: "cape-static-ip is starting: its caches of IPPools and IPAddresses are not synced yet; retry".into(),
        };
        return json_response(admission::respond(&request, decision).into_review());
    }
    let answer = pending::with_budget(budget, admission::review(&state.assigner, review)).await;
    crate::fault::delay("before-answer").await;
    crate::fault::point("before-answer");
    timer.result(match &answer.response {
        Some(r) if !r.allowed => "denied",
        Some(r) if r.patch.is_some() => "patched",
        Some(_) => "allowed",
        None => "invalid",
    });
    json_response(answer)
}

/// Serializes a review, with the patch as the base64 string the API documents.
fn json_response(review: AdmissionReview<DynamicObject>) -> Response {
    let mut value = match serde_json::to_value(&review) {
        Ok(v) => v,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("could not encode the AdmissionReview: {e}"),
            )
                .into_response();
        }
    };
    if let Some(patch) = review.response.as_ref().and_then(|r| r.patch.as_ref())
        && let Some(slot) = value.pointer_mut("/response/patch")
    {
        *slot = Value::String(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}
