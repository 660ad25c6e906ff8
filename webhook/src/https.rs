//! The HTTPS admission server, put together from actix-web's parts the way `HttpServer`
//! does, with one stage in front: a connection over its address's limit (or the total) is
//! closed as soon as it is accepted, before the TLS handshake costs anything. Then the TLS
//! handshake, the request head (`--request-read-timeout` each, and so is every later head of a
//! kept-alive connection: [`HeadDeadline`]) and HTTP/1.1 with the admission routes. [`serve_https`] serves an [`AppState`] on a listener; `serve_until` uses it, and so
//! can tests, without an API server.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use actix_http::{Extensions, HttpService, Protocol};
use actix_rt::net::{ActixStream, Ready, TcpStream};
use actix_server::Server;
use actix_service::{IntoServiceFactory, ServiceFactoryExt, fn_service, map_config};
use actix_tls::accept::rustls_0_23::{Acceptor, TlsStream};
use actix_web::{App, dev::AppConfig, middleware::from_fn, web};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod heads;

pub use heads::HeadDeadline;

use crate::{
    admission::{
        http::{AppState, ClientCertificate, close_when_draining, routes},
        limits::{ConnectionLimiter, ConnectionSlot, Limits},
    },
    metrics::Metrics,
};

/// How long an idle connection stays open. Longer than the API server's own idle timeout
/// (Go's 90 s), so the client, not the server, closes idle connections: a server that closes
/// one just as the client reuses it makes that review fail.
pub const KEEP_ALIVE: Duration = Duration::from_secs(120);

/// How the HTTPS server runs.
#[derive(Debug, Clone)]
pub struct HttpsSettings {
    /// Connection limits and the read timeout (the review slots live in the [`AppState`]).
    pub limits: Limits,
    /// Worker threads (default: one per CPU); clamped to 1..=512.
    pub workers: Option<usize>,
    /// How long in-flight requests may take after a graceful stop.
    pub shutdown_timeout: Duration,
}

/// A TCP connection that counts against its address's limit until it closes.
struct Counted {
    io: TcpStream,
    peer: SocketAddr,
    _slot: ConnectionSlot,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl ActixStream for Counted {
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_read_ready(&self.io, cx)
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<Ready>> {
        ActixStream::poll_write_ready(&self.io, cx)
    }
}

/// Why a connection ended before HTTP; only counted and logged at debug level.
#[derive(Debug)]
enum Dropped {
    Refused,
    Tls,
    Http,
}

/// Serves `state`'s routes over TLS on `listener`, with `connections` counting connections
/// (its limits apply; pass one built from `settings.limits`). The server runs once the
/// returned [`Server`] is polled; stop it through its handle.
pub fn serve_https(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    state: web::Data<AppState>,
    connections: ConnectionLimiter,
    settings: &HttpsSettings,
) -> io::Result<Server> {
    let mut tls = tls;
    // No `h2` (actix-web is built without it): the API server speaks HTTP/1.1 to webhooks.
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let read_timeout = settings.limits.request_read_timeout;
    // actix-tls stops accepting on a worker at 256 handshakes in flight (a per-thread
    // counter, set before the workers start): above what the limits admit, so that clients
    // stalled in their handshakes within the total never keep a reserved source waiting.
    actix_tls::accept::max_concurrent_tls_connect(
        settings
            .limits
            .connections
            .saturating_add(settings.limits.connections_per_address)
            .saturating_add(1),
    );
    let metrics: Metrics = state.reviewer.metrics.clone();
    let mut builder = Server::build()
        .disable_signals()
        .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1));
    if let Some(workers) = settings.workers {
        builder = builder.workers(workers.clamp(1, 512));
    }
    let graceful = builder.graceful_shutdown_signal();
    let builder = builder.listen("sidecert-https", listener, move || {
        let (connections, metrics, state) = (connections.clone(), metrics.clone(), state.clone());
        let head_metrics = metrics.clone();
        let graceful = graceful.clone();
        let mut acceptor = Acceptor::new(tls.clone());
        acceptor.set_handshake_timeout(read_timeout);
        let app = App::new()
            .wrap(from_fn(close_when_draining))
            .configure(routes(state));
        let http = HttpService::build()
            // What the handshake verified, for `/mutate` (see `--client-ca-file`).
            .on_connect_ext(|io: &HeadDeadline<TlsStream<Counted>>, ext: &mut Extensions| {
                ext.insert(ClientCertificate(
                    io.get_ref().get_ref().1.peer_certificates().is_some(),
                ));
            })
            .keep_alive(KEEP_ALIVE)
            // The first request's head (answered 408); actix times no later one on a
            // kept-alive connection, so HeadDeadline does (closing the connection).
            .client_request_timeout(read_timeout)
            .graceful_shutdown_signal(move || {
                let signal = graceful.clone();
                async move { signal.notified().await }
            })
            .finish(map_config(
                app.into_factory()
                    .map_err(|e: actix_web::Error| e.error_response()),
                |()| AppConfig::default(),
            ));
        fn_service(move |io: TcpStream| {
            let admitted = io.peer_addr().map_err(|_| None).and_then(|peer| {
                connections
                    .admit(peer.ip())
                    .map(|slot| (peer, slot))
                    .map_err(Some)
            });
            let metrics = metrics.clone();
            async move {
                match admitted {
                    Ok((peer, slot)) => {
                        // A review's answer is a few small TLS records; with Nagle's algorithm
                        // on, the last one waits for the client's delayed ACK (40 ms on Linux),
                        // which showed as a 33 ms p99 at a steady 500 requests/s in `make
                        // bench`. nginx sets TCP_NODELAY for the same reason.
                        let _ = io.set_nodelay(true);
                        Ok(Counted {
                            io,
                            peer,
                            _slot: slot,
                        })
                    }
                    Err(refused) => {
                        if let Some(refused) = refused {
                            metrics
                                .refusals
                                .with_label_values(&["connection", refused.label()])
                                .inc();
                            tracing::debug!(reason = %refused, "connection refused");
                        }
                        // Dropping the stream closes it.
                        Err(Dropped::Refused)
                    }
                }
            }
        })
        .and_then(acceptor.map_init_err(|()| ()).map_err(|_| Dropped::Tls))
        .and_then(fn_service(move |tls: TlsStream<Counted>| {
            let peer = tls.get_ref().0.peer;
            let metrics = head_metrics.clone();
            let io = HeadDeadline::new(tls, read_timeout, move || {
                metrics.refusals.with_label_values(&["head", "timeout"]).inc();
                tracing::debug!(%peer, "request head not complete in time; connection closed");
            });
            async move { Ok::<_, Dropped>((io, Protocol::Http1, Some(peer))) }
        }))
        .and_then(http.map_err(|_| Dropped::Http))
        .map_err(|e| tracing::trace!(?e, "connection ended"))
    })?;
    Ok(builder.run())
}
