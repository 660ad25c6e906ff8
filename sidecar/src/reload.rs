//! Tells the app a new certificate landed: POST to a URL inside the Pod, with retries; its
//! answer is read to at most 64 KiB ([`crate::body::MAX_RELOAD_RESPONSE`]).

use std::time::Duration;

use http::Method;
use sidecert_runtime::Backoff;

use crate::challenge::responder::http_request;

/// The pauses between calls of the reload URL: 1 s, doubling, at most 30 s.
const RELOAD_RETRY: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

/// Calls `url` (POST) up to `attempts` times with doubling pauses; logs the outcome.
pub async fn call_reload_url(url: &str, attempts: u32) -> bool {
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
            tokio::time::sleep(RELOAD_RETRY.delay(attempt)).await;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::body::MAX_RELOAD_RESPONSE;

    /// A reload URL that answers every request 200 with a `len`-byte body.
    async fn app(len: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n\r\n");
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&vec![b'x'; len]).await;
                });
            }
        });
        format!("http://{addr}/reload")
    }

    #[tokio::test]
    async fn a_reload_answer_over_64_kib_is_an_error() {
        let url = app(MAX_RELOAD_RESPONSE).await;
        let (status, body) = http_request(Method::POST, &url).await.unwrap();
        assert_eq!((status.as_u16(), body.len()), (200, MAX_RELOAD_RESPONSE));
        assert!(call_reload_url(&url, 1).await);

        let url = app(MAX_RELOAD_RESPONSE + 1).await;
        let err = http_request(Method::POST, &url).await.unwrap_err().to_string();
        assert!(
            err.contains("response body over the limit of 65536 bytes"),
            "{err}"
        );
        assert!(!call_reload_url(&url, 1).await);
    }
}
