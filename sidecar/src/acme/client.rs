//! instant-acme's HTTP client: hyper + rustls, with metrics, a bound on every exchange, the
//! `Retry-After` of the last 429/503, and the `badNonce` retry every ACME call uses.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::Request;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use instant_acme::{BodyWrapper, BytesResponse, HttpClient, Problem};

use crate::{
    body::{MAX_ACME_RESPONSE, collect},
    error::{Error, Result},
    metrics::{Metrics, acme_endpoint},
};

/// Type of the problem the CA returns for a stale nonce.
const BAD_NONCE: &str = "urn:ietf:params:acme:error:badNonce";
/// How long one ACME request (connection, TLS, answer and body) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often one request is re-sent after `badNonce` (instant-acme already retries thrice).
pub(crate) const NONCE_ATTEMPTS: u32 = 12;

/// Retries `$e` (an `.await`ed instant-acme call) while the CA answers `badNonce`.
macro_rules! nonce_retry {
    ($e:expr) => {{
        let mut attempt = 0u32;
        loop {
            match $e {
                Err(instant_acme::Error::Api(p))
                    if $crate::acme::client::is_bad_nonce(&p)
                        && attempt < $crate::acme::client::NONCE_ATTEMPTS =>
                {
                    attempt += 1;
                    tracing::debug!(attempt, "badNonce, retrying");
                }
                other => break other,
            }
        }
    }};
}
pub(crate) use nonce_retry;

pub(crate) fn is_bad_nonce(p: &Problem) -> bool {
    p.r#type.as_deref() == Some(BAD_NONCE)
}

type Inner = HyperClient<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

/// instant-acme's HTTP client: hyper + rustls (ring), trusting either the given PEM bundle
/// or the webpki roots; it counts and times requests and remembers the last `Retry-After`
/// of a 429 or 503.
#[derive(Clone)]
pub struct AcmeHttp {
    inner: Inner,
    metrics: Option<Metrics>,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl AcmeHttp {
    pub fn new(ca_bundle_pem: Option<&str>, metrics: Option<Metrics>) -> Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config_from("TLS", e))?;
        let config = match ca_bundle_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in crate::certificate::x509::pem_certificates(pem)? {
                    roots
                        .add(cert)
                        .map_err(|e| Error::config_from("ACME CA bundle", e))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => builder
                .with_root_certificates(rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                })
                .with_no_client_auth(),
        };
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .enable_http1()
            .build();
        Ok(Self {
            inner: HyperClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            metrics,
            retry_after: Arc::default(),
        })
    }

    /// The `Retry-After` of the last 429/503 answer, taken (reset) by this call.
    pub fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after.lock().ok().and_then(|mut g| g.take())
    }
}

impl HttpClient for AcmeHttp {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let endpoint = acme_endpoint(req.method(), req.uri().path());
        let metrics = self.metrics.clone();
        let retry_after = self.retry_after.clone();
        let fut = self.inner.request(req);
        Box::pin(async move {
            let start = Instant::now();
            // The whole exchange, body included, is bounded: a CA that accepts the
            // connection and never answers must not hold an order (or shutdown) for ever.
            let exchange = async {
                let rsp = fut.await.map_err(|e| instant_acme::Error::Other(Box::new(e)))?;
                read_response(rsp, MAX_ACME_RESPONSE).await
            };
            let rsp = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
                .await
                .unwrap_or_else(|_| {
                    Err(instant_acme::Error::Other(Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer from the ACME server within {REQUEST_TIMEOUT:?}"),
                    ))))
                });
            if let Some(m) = &metrics {
                let status = match &rsp {
                    Ok(r) => r.parts.status.as_u16().to_string(),
                    Err(_) => "error".to_owned(),
                };
                m.acme_requests
                    .with_label_values(&[endpoint, status.as_str()])
                    .inc();
                m.acme_duration
                    .with_label_values(&[endpoint])
                    .observe(start.elapsed().as_secs_f64());
            }
            if let Ok(r) = &rsp {
                let s = r.parts.status.as_u16();
                if (s == 429 || s == 503)
                    && let Some(at) = parse_retry_after(&r.parts.headers, SystemTime::now())
                    && let Ok(mut g) = retry_after.lock()
                {
                    *g = Some(at);
                }
            }
            rsp
        })
    }
}

/// Reads an answer whole, at most `limit` bytes of body; more is an error that says so.
async fn read_response<B>(rsp: http::Response<B>, limit: usize) -> Result<BytesResponse, instant_acme::Error>
where
    B: hyper::body::Body,
    B::Error: Into<crate::body::BoxError>,
{
    let (parts, body) = rsp.into_parts();
    let body = collect(body, limit).await.map_err(|e| {
        instant_acme::Error::Other(format!("the ACME server's answer ({}): {e}", parts.status).into())
    })?;
    Ok(BytesResponse {
        parts,
        body: Box::new(body),
    })
}

/// `Retry-After` as delay-seconds or as an HTTP-date (RFC 9110, 10.2.3), at most a day ahead.
fn parse_retry_after(headers: &http::HeaderMap, now: SystemTime) -> Option<SystemTime> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or_default(),
    };
    Some(now + delay.min(Duration::from_secs(24 * 3600)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(v: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, v.parse().unwrap());
        h
    }

    #[tokio::test]
    async fn an_answer_over_1_mib_is_an_error() {
        let answer = |n: usize| {
            http::Response::builder()
                .status(200)
                .body(http_body_util::Full::new(Bytes::from(vec![b'-'; n])))
                .unwrap()
        };
        let mut ok = read_response(answer(MAX_ACME_RESPONSE), MAX_ACME_RESPONSE)
            .await
            .unwrap();
        assert_eq!(ok.body.into_bytes().await.unwrap().len(), MAX_ACME_RESPONSE);
        let err = read_response(answer(MAX_ACME_RESPONSE + 1), MAX_ACME_RESPONSE)
            .await
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "the ACME server's answer (200 OK): response body over the limit of 1048576 bytes"
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date_capped_at_a_day() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |v: &str| parse_retry_after(&headers(v), now);
        assert_eq!(at("120"), Some(now + Duration::from_secs(120)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(at(&date), Some(now + Duration::from_secs(90)));
        // A date in the past means now; more than a day ahead means a day.
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(at(&past), Some(now));
        assert_eq!(at("999999"), Some(now + Duration::from_secs(24 * 3600)));
        assert_eq!(at("soon"), None);
        assert_eq!(parse_retry_after(&http::HeaderMap::new(), now), None);
    }
}
