//! Reading an HTTP response body with a cap: the ACME server's answers and the reload URL's
//! are read whole, so a server that sends more than any real answer gets an error, not the
//! sidecar's memory.

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};

/// The most of an ACME server's answer that is read: a certificate chain is a few KiB, a
/// directory, order or authorization far less.
pub const MAX_ACME_RESPONSE: usize = 1024 * 1024;
/// The most of a reload URL's (or the responder self-check's) answer that is read: only the
/// status matters.
pub const MAX_RELOAD_RESPONSE: usize = 64 * 1024;

/// A body was longer than its cap.
#[derive(Debug, thiserror::Error)]
#[error("response body over the limit of {limit} bytes")]
pub struct TooLarge {
    pub limit: usize,
}

/// The error of [`collect`]: the body's own, or [`TooLarge`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reads all of `body`, at most `limit` bytes (more is [`TooLarge`], reading stops there).
pub async fn collect<B>(body: B, limit: usize) -> Result<Bytes, BoxError>
where
    B: hyper::body::Body,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(Box::new(TooLarge { limit })),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use http_body_util::Full;

    use super::*;

    #[tokio::test]
    async fn a_body_over_the_cap_is_an_error_that_says_so() {
        let at = Full::new(Bytes::from(vec![b'x'; 100]));
        assert_eq!(collect(at, 100).await.unwrap().len(), 100);
        let over = Full::new(Bytes::from(vec![b'x'; 101]));
        let err = collect(over, 100).await.unwrap_err();
        assert!(err.is::<TooLarge>(), "{err}");
        assert_eq!(err.to_string(), "response body over the limit of 100 bytes");
    }
}
