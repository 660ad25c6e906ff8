//! The HTTP side of admission: `/mutate`, `/healthz`, `/readyz`, what readiness waits for,
//! and the draining middleware. The handlers are thin: a body in, [`Reviewer::review`], an
//! answer out (never a 500).

use actix_web::{
    HttpResponse,
    body::MessageBody,
    dev::{ServiceRequest, ServiceResponse},
    http::ConnectionType,
    middleware::Next,
    web,
};

use crate::{
    admission::reviewer::Reviewer,
    error::{Error, MAX_BODY_BYTES},
    readiness::Readiness,
};

/// Shared state of the HTTP handlers.
pub struct AppState {
    pub reviewer: Reviewer,
    pub ready: Readiness,
}

async fn mutate(state: web::Data<AppState>, body: web::Bytes) -> HttpResponse {
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
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .route("/mutate", web::post().to(mutate))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz));
    }
}
