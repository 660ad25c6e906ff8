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
use sidecert_runtime::ConnectionLimiter;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    body::{MAX_RELOAD_RESPONSE, collect},
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

/// Open connections a server of the sidecar keeps, in total. HTTP-01 requests come from the
/// CA's validators (a few addresses at a time) through the ingress controller, and probes
/// from the kubelet; a connection costs at most [`MAX_BUF`] of buffers plus hyper's own state,
/// so 128 stay within a few MiB of the sidecar's 64Mi.
pub const MAX_CONNECTIONS: usize = 128;
/// Open connections from one source address: an ingress controller's Pod proxies every
/// validation, so this is well above what validation needs, and one client that floods the
/// port holds at most a quarter of [`MAX_CONNECTIONS`].
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 32;
/// How long a client may take to send a request head (on every request of a connection, and
/// for the first: from the connection's start), so an idle or trickling connection ends.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// hyper's read buffer, the most a request head can take (hyper's minimum; its default is
/// about 400 KiB): an HTTP-01 request is a GET with a short path.
pub const MAX_BUF: usize = 8 * 1024;

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
    serve_limited(
        listener,
        shutdown,
        handler,
        ConnectionLimiter::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS),
        HEADER_READ_TIMEOUT,
    )
    .await;
}

/// [`serve`] with `connections` counting (and capping) the open connections: one over a limit
/// is closed as soon as it is accepted; and `header_read_timeout` for each request head.
async fn serve_limited<F>(
    listener: TcpListener,
    shutdown: CancellationToken,
    handler: F,
    connections: ConnectionLimiter,
    header_read_timeout: std::time::Duration,
) where
    F: Fn(Request<Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    {
        loop {
            let (stream, peer) = tokio::select! {
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
            let slot = match connections.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(refused) => {
                    tracing::debug!(%peer, reason = %refused, "connection refused");
                    drop(stream);
                    continue;
                }
            };
            let handler = handler.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                // Counted until the connection ends.
                let _slot = slot;
                let svc = service_fn(move |req| {
                    let rsp = handler(req);
                    async move { Ok::<_, Infallible>(rsp) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .max_buf_size(MAX_BUF)
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

/// A plain-HTTP request with a timeout, returning status and body (self-check, reload calls);
/// a body over [`MAX_RELOAD_RESPONSE`] is an error.
pub async fn http_request(method: Method, url: &str) -> Result<(StatusCode, String)> {
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
        let body = collect(rsp.into_body(), MAX_RELOAD_RESPONSE)
            .await
            .map_err(|e| Error::http_from(url, e))?;
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

    /// True when the server closed `stream` within `within`.
    async fn closed_within(stream: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    async fn connect_from(src: [u8; 4], addr: SocketAddr) -> tokio::net::TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((src, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    #[tokio::test]
    async fn connections_are_capped_per_address_and_in_total_and_idle_ones_end() {
        use std::time::Duration;
        let responder = Responder::default();
        responder.store.insert("lease-a", "tok1", "tok1.thumb");
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let connections = ConnectionLimiter::new(3, 2);
        let header_timeout = Duration::from_millis(1500);
        tokio::spawn(serve_limited(
            listener,
            stop.clone(),
            move |req| responder.handle(&req),
            connections.clone(),
            header_timeout,
        ));
        let short = Duration::from_millis(500);

        // Two idle connections from one address are kept; a third is closed at once.
        let mut a1 = connect_from([127, 0, 0, 3], addr).await;
        let mut a2 = connect_from([127, 0, 0, 3], addr).await;
        let mut a3 = connect_from([127, 0, 0, 3], addr).await;
        assert!(
            closed_within(&mut a3, short).await,
            "a third connection from one address"
        );
        // Another address gets the last of the total; a fourth address nothing.
        let mut b1 = connect_from([127, 0, 0, 4], addr).await;
        let mut c1 = connect_from([127, 0, 0, 5], addr).await;
        assert!(closed_within(&mut c1, short).await, "a connection over the total");
        assert!(!closed_within(&mut a1, Duration::from_millis(100)).await);
        assert_eq!(connections.open(), 3);

        // Idle connections (no request head) end at the header read timeout, and their
        // slots are free again: a validator's GET is answered.
        for s in [&mut a1, &mut a2, &mut b1] {
            assert!(
                closed_within(s, header_timeout * 3).await,
                "an idle connection ends"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(connections.open(), 0);
        let (s, b) = get(&format!("http://{addr}"), "/.well-known/acme-challenge/tok1").await;
        assert_eq!((s, b.as_str()), (StatusCode::OK, "tok1.thumb"));
        stop.cancel();
    }
}
