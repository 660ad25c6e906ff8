//! The HTTP side of admission: `/mutate`, `/healthz`, `/readyz`, what readiness waits for,
//! and the draining middleware. The handlers are thin: a review slot, the body (bounded in
//! size and time), [`Reviewer::review`], an answer out (never a 500).

use std::time::Duration;

use actix_web::{
    HttpRequest, HttpResponse, HttpResponseBuilder,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::{ConnectionType, StatusCode, header},
    middleware::Next,
    web,
};
use tokio::time::Instant;

use crate::{
    admission::{
        limits::{BodyError, Limits, Refused, ReviewLimiter, read_body},
        reviewer::Reviewer,
    },
    error::{Error, MAX_BODY_BYTES},
    readiness::Readiness,
};

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub reviewer: Reviewer,
    pub ready: Readiness,
    /// Review slots per source address and in total.
    pub reviews: ReviewLimiter,
    /// How long a review may wait for its slot and its body, together.
    pub read_timeout: Duration,
    /// `/mutate` answers only a client that presented a certificate of `--client-ca-file`.
    pub require_client_certificate: bool,
}

/// Whether the connection's client presented a certificate, which the TLS handshake then
/// verified against `--client-ca-file` (set per connection by [`crate::https`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificate(pub bool);

impl AppState {
    /// The state with `limits`' review slots and read timeout.
    pub fn new(reviewer: Reviewer, ready: Readiness, limits: &Limits) -> Self {
        Self {
            reviewer,
            ready,
            reviews: ReviewLimiter::new(limits),
            read_timeout: limits.request_read_timeout,
            require_client_certificate: false,
        }
    }

    /// The same state, answering `/mutate` only to a client with a verified certificate.
    #[must_use]
    pub fn requiring_client_certificate(mut self, required: bool) -> Self {
        self.require_client_certificate = required;
        self
    }

    fn refused(&self, what: &str, reason: &str) {
        self.reviewer
            .metrics
            .refusals
            .with_label_values(&[what, reason])
            .inc();
    }
}

/// A plain-text answer that closes the connection: what is left of the request (an unread
/// or trickling body) is not waited for.
fn closing(status: StatusCode, text: String) -> HttpResponse {
    HttpResponseBuilder::new(status)
        .content_type("text/plain")
        .force_close()
        .body(text)
}

async fn mutate(req: HttpRequest, state: web::Data<AppState>, payload: web::Payload) -> HttpResponse {
    // Before a slot or a byte of the body: an unauthenticated caller costs nothing.
    if state.require_client_certificate
        && req.conn_data::<ClientCertificate>() != Some(&ClientCertificate(true))
    {
        state.refused("review", "unauthenticated");
        return closing(
            StatusCode::UNAUTHORIZED,
            "sidecert: /mutate answers only the API server (a client certificate of --client-ca-file)"
                .to_owned(),
        );
    }
    // One deadline for the slot and the body: the API server sends its review at once, so
    // only a client that trickles (or a flood) meets it.
    let deadline = Instant::now() + state.read_timeout;
    let peer = req.peer_addr().map(|a| a.ip());
    let _slot = match state.reviews.acquire(peer, deadline).await {
        Ok(slot) => slot,
        Err(refused) => {
            state.refused("review", refused.label());
            let status = match refused {
                Refused::PerAddress => StatusCode::TOO_MANY_REQUESTS,
                Refused::Total => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut rsp = closing(status, format!("no review slot free: {refused}"));
            rsp.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return rsp;
        }
    };
    let expected = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok());
    let body = match read_body(payload, expected, MAX_BODY_BYTES, deadline).await {
        Ok(body) => body,
        Err(e) => {
            let (reason, status) = match &e {
                BodyError::Timeout => ("timeout", StatusCode::REQUEST_TIMEOUT),
                BodyError::TooLarge(_) => ("too_large", StatusCode::PAYLOAD_TOO_LARGE),
                BodyError::Payload(_) => ("error", StatusCode::BAD_REQUEST),
            };
            state.refused("body", reason);
            tracing::debug!(peer = ?peer, error = %e, "request body refused");
            return closing(status, e.to_string());
        }
    };
    match state.reviewer.review(&body).await {
        Ok(json) => HttpResponse::Ok().content_type("application/json").body(json),
        Err(e @ Error::TooLarge(_)) => HttpResponse::PayloadTooLarge()
            .content_type("text/plain")
            .body(e.to_string()),
        Err(e @ (Error::InvalidReview(_) | Error::UndecodableReview(_))) => HttpResponse::BadRequest()
            .content_type("text/plain")
            .body(e.to_string()),
        Err(e) => {
            // Only serialising our own response can fail here; still answer, never panic.
            tracing::error!(error = %e, "review failed");
            HttpResponse::BadRequest()
                .content_type("text/plain")
                .body(e.to_string())
        }
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok")
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.ready.waiting_for() {
        None => HttpResponse::Ok().content_type("text/plain").body("ok"),
        Some(why) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(why),
    }
}

/// Middleware: while the server drains, every response carries `Connection: close`, so a
/// client that still reuses a kept-alive connection gets its answer and then a closed
/// connection, instead of a reset when the listener goes.
pub async fn close_when_draining(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let mut res = next.call(req).await?;
    if state.is_some_and(|s| s.ready.draining()) {
        res.response_mut()
            .head_mut()
            .set_connection_type(ConnectionType::Close);
    }
    Ok(res)
}

/// The routes of the HTTPS server (`/mutate`, `/healthz`, `/readyz`).
pub fn routes(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        cfg.app_data(state)
            .route("/mutate", web::post().to(mutate))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz));
    }
}
