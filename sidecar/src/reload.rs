//! Tells the app a new certificate landed: POST to a URL inside the Pod, with retries.

use std::time::Duration;

use http::Method;

use crate::challenge::responder::http_request;

/// Calls `url` (POST) up to `attempts` times with doubling pauses; logs the outcome.
pub async fn call_reload_url(url: &str, attempts: u32) -> bool {
    let mut pause = Duration::from_secs(1);
    for attempt in 1..=attempts.max(1) {
        match http_request(Method::POST, url).await {
            Ok((status, _)) if status.is_success() => {
                tracing::info!(url, "reload URL called");
                return true;
            }
            Ok((status, _)) => tracing::warn!(url, %status, attempt, "reload URL failed"),
            Err(e) => tracing::warn!(url, error = %e, attempt, "reload URL failed"),
        }
        if attempt < attempts {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(30));
        }
    }
    false
}
