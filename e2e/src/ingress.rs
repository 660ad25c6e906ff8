//! Requests through the plane's ingress controller as a browser would make them (`curl
//! --resolve HOST:PORT:IP`), keeping what a browser sees: the status, the body, and over
//! HTTPS the certificate chain exactly as the controller served it for the SNI name `host`.
//! The chain is recorded, not verified: the scenarios check it against what they expect
//! (the temporary certificate first, Pebble's root later).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

use crate::{Error, Result};

/// What one request got back.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header lines, as sent (`Name: value`).
    pub headers: Vec<String>,
    pub body: String,
    /// The served chain, leaf first, DER (HTTPS only).
    pub chain: Vec<Vec<u8>>,
}

impl Response {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);
/// More than any page the plane serves; a longer answer is cut there.
const MAX_RESPONSE: u64 = 1 << 20;

/// `GET https://host{path}` sent to `addr`, with SNI and Host `host`.
pub async fn https_get(addr: SocketAddr, host: &str, path: &str) -> Result<Response> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid("TLS configuration", e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(RecordOnly(provider)))
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| Error::invalid("host", e.to_string()))?;
    let tcp = connect(addr).await?;
    let tls = tokio::time::timeout(
        TIMEOUT,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .map_err(|_| Error::Timeout(TIMEOUT))?
    .map_err(|e| Error::io(format!("TLS handshake with {addr} for {host}"), e))?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_vec())
        .collect();
    let mut response = exchange(tls, addr, host, path).await?;
    response.chain = chain;
    Ok(response)
}

/// `GET http://host{path}` sent to `addr`; redirects are not followed.
pub async fn http_get(addr: SocketAddr, host: &str, path: &str) -> Result<Response> {
    exchange(connect(addr).await?, addr, host, path).await
}

async fn connect(addr: SocketAddr) -> Result<TcpStream> {
    tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::Timeout(TIMEOUT))?
        .map_err(|e| Error::io(format!("connect {addr}"), e))
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    host: &str,
    path: &str,
) -> Result<Response> {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sidecert-e2e\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    let io = |e| Error::io(format!("GET {host}{path} at {addr}"), e);
    let read = async {
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        // A peer that closes without close_notify still sent a whole answer.
        match (&mut stream).take(MAX_RESPONSE).read_to_end(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(io(e)),
        }
        Ok(raw)
    };
    let raw = tokio::time::timeout(TIMEOUT, read)
        .await
        .map_err(|_| Error::Timeout(TIMEOUT))??;
    parse(&raw)
}

fn parse(raw: &[u8]) -> Result<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| {
        Error::invalid(
            "HTTP response",
            format!("no end of headers in {} bytes", raw.len()),
        )
    })?;
    let head = String::from_utf8_lossy(raw.get(..split).unwrap_or_default());
    let body = raw.get(split + 4..).unwrap_or_default();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::invalid("HTTP status line", status_line.to_owned()))?;
    let headers: Vec<String> = lines.map(str::to_owned).collect();
    let chunked = headers.iter().any(|h| {
        h.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let body = if chunked { dechunk(body) } else { body.to_vec() };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        chain: Vec::new(),
    })
}

/// The body of a chunked answer, on bytes (a chunk's size counts bytes, not characters).
fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(rest.get(..eol).unwrap_or_default()).into_owned();
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or_default().trim(), 16) else {
            break;
        };
        let after = rest.get(eol + 2..).unwrap_or_default();
        if n == 0 {
            break;
        }
        let Some(chunk) = after.get(..n) else {
            out.extend_from_slice(after);
            break;
        };
        out.extend_from_slice(chunk);
        rest = after.get(n..).unwrap_or_default();
        rest = rest.strip_prefix(b"\r\n").unwrap_or(rest);
    }
    out
}

/// Accepts any chain (the scenarios check it themselves), still checking the handshake's
/// signatures so the chain is the one the server holds the key of.
#[derive(Debug)]
struct RecordOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for RecordOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_plain_and_chunked_answers() {
        let r = parse(b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://a.test:8443/x\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert_eq!(r.status, 308);
        assert_eq!(r.header("location"), Some("https://a.test:8443/x"));
        let r = parse(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "hello world");
        // Sizes count bytes: "é" is two.
        let r = parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhé\r\n1\r\n!\r\n0\r\n\r\n".as_bytes(),
        )
        .unwrap();
        assert_eq!(r.body, "hé!");
        assert!(parse(b"garbage").is_err());
    }
}
