//! The HTTP-01 responder (with `/healthz` and `/readyz`), the check that it serves what was
//! published, and the metrics server, on hyper 1.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use sidecert_contract::ACME_CHALLENGE_PATH;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    metrics::Metrics,
};

/// Key authorizations by token, grouped by where they came from (a certificate's Lease,
/// or this process), so one source can be replaced as a whole.
#[derive(Clone, Default)]
pub struct ChallengeStore {
    inner: Arc<RwLock<HashMap<String, HashMap<String, String>>>>,
}

impl ChallengeStore {
    /// Replaces every key authorization of `scope`.
    pub fn set_scope(&self, scope: &str, tokens: HashMap<String, String>) {
        if let Ok(mut g) = self.inner.write() {
            if tokens.is_empty() {
                g.remove(scope);
            } else {
                g.insert(scope.to_owned(), tokens);
            }
        }
    }

    /// Adds one key authorization to `scope`.
    pub fn insert(&self, scope: &str, token: &str, key_authorization: &str) {
        if let Ok(mut g) = self.inner.write() {
            g.entry(scope.to_owned())
                .or_default()
                .insert(token.to_owned(), key_authorization.to_owned());
        }
    }

    /// Looks a token up in every scope.
    pub fn get(&self, token: &str) -> Option<String> {
        let g = self.inner.read().ok()?;
        g.values().find_map(|m| m.get(token).cloned())
    }
}

/// Shared state of the responder.
#[derive(Clone, Default)]
pub struct Responder {
    pub store: ChallengeStore,
    ready: Arc<AtomicBool>,
    metrics: Option<Metrics>,
}

impl Responder {
    pub fn with_metrics(metrics: Metrics) -> Self {
        Self {
            metrics: Some(metrics),
            ..Self::default()
        }
    }

    fn count(&self, result: &str) {
        if let Some(m) = &self.metrics {
            m.http01.with_label_values(&[result]).inc();
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    fn handle(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        }
        let path = req.uri().path();
        if let Some(token) = path.strip_prefix(ACME_CHALLENGE_PATH) {
            return match self.store.get(token) {
                Some(ka) if !token.is_empty() => {
                    tracing::debug!(token, "answered HTTP-01 challenge");
                    self.count("served");
                    text(StatusCode::OK, &ka)
                }
                _ => {
                    self.count("unknown");
                    text(StatusCode::NOT_FOUND, "unknown token\n")
                }
            };
        }
        match path {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" if self.ready.load(Ordering::Relaxed) => text(StatusCode::OK, "ready\n"),
            "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "starting\n"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

/// Binds `addr` (an error names the address).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::io(format!("listen address {addr}"), e))
}

/// Serves the responder on `listener` until `shutdown`.
pub fn serve_responder(
    listener: TcpListener,
    responder: Responder,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    serve(listener, shutdown, move |req| responder.handle(&req))
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub fn serve_metrics(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    serve(listener, shutdown, move |req| match req.uri().path() {
        "/metrics" => {
            let mut rsp = text(StatusCode::OK, &metrics.encode());
            rsp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            rsp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

async fn serve<F>(listener: TcpListener, shutdown: CancellationToken, handler: F)
where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    {
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let handler = handler.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let rsp = handler(req);
                    async move { Ok::<_, Infallible>(rsp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    r = conn => if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended");
                    },
                }
            });
        }
    }
}

/// A plain-HTTP GET with a timeout, returning status and body (self-check, reload calls).
pub async fn http_request(method: Method, url: &str) -> Result<(StatusCode, String)> {
    use http_body_util::BodyExt;
    use hyper_util::client::legacy::Client;
    let client: Client<_, Full<Bytes>> = Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| Error::http_from(url, e))?;
    let fut = async {
        let rsp = client.request(req).await.map_err(|e| Error::http_from(url, e))?;
        let status = rsp.status();
        let body = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::http_from(url, e))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), fut)
        .await
        .map_err(|_| Error::http(format!("{url}: timed out")))?
}

/// GETs every token from the responder at `base` and compares the key authorization.
pub async fn self_check(base: &str, tokens: &HashMap<String, String>) -> Result<()> {
    for (token, ka) in tokens {
        let url = format!("{base}{ACME_CHALLENGE_PATH}{token}");
        let (status, body) = http_request(Method::GET, &url).await?;
        if status != StatusCode::OK || body != *ka {
            return Err(Error::order(format!(
                "self-check failed: {url} answered {status}"
            )));
        }
    }
    Ok(())
}

/// The base URL to reach a responder bound on `addr` from this process.
pub fn self_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    async fn get(base: &str, p: &str) -> (StatusCode, String) {
        http_request(Method::GET, &format!("{base}{p}")).await.unwrap()
    }

    #[tokio::test]
    async fn serves_tokens_health_and_404() {
        let responder = Responder::default();
        responder.store.insert("lease-a", "tok1", "tok1.thumb");
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve_responder(listener, responder.clone(), stop.clone()));
        let base = &format!("http://{addr}");
        let (s, b) = get(base, "/.well-known/acme-challenge/tok1").await;
        assert_eq!((s, b.as_str()), (StatusCode::OK, "tok1.thumb"));
        let chal = "/.well-known/acme-challenge/";
        assert_eq!(get(base, &format!("{chal}nope")).await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(base, chal).await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(base, "/healthz").await.0, StatusCode::OK);
        assert_eq!(get(base, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        responder.set_ready(true);
        assert_eq!(get(base, "/readyz").await.0, StatusCode::OK);
        responder.store.set_scope("lease-a", HashMap::new());
        assert_eq!(get(base, &format!("{chal}tok1")).await.0, StatusCode::NOT_FOUND);
        stop.cancel();
    }
}
