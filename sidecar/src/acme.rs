//! The ACME side: an HTTP client with metrics, the account, and one order from start to
//! certificate.

use std::{
    collections::HashMap,
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
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, CertificateIdentifier,
    ChallengeStatus, ChallengeType, ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder,
    OrderStatus, Problem, RetryPolicy,
};
use sidecert_contract::KeyAlgorithm;

use crate::{
    Error, Result,
    cert::{CertInfo, PrivateKey},
    metrics::{Metrics, acme_endpoint},
};

/// Type of the problem the CA returns for a stale nonce.
const BAD_NONCE: &str = "urn:ietf:params:acme:error:badNonce";
/// How long one ACME request (connection, TLS, answer and body) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const EXTERNAL_ACCOUNT_REQUIRED: &str = "urn:ietf:params:acme:error:externalAccountRequired";
/// How often one request is re-sent after `badNonce` (instant-acme already retries thrice).
const NONCE_ATTEMPTS: u32 = 12;

/// Retries `$e` (an `.await`ed instant-acme call) while the CA answers `badNonce`.
macro_rules! nonce_retry {
    ($e:expr) => {{
        let mut attempt = 0u32;
        loop {
            match $e {
                Err(instant_acme::Error::Api(p)) if is_bad_nonce(&p) && attempt < NONCE_ATTEMPTS => {
                    attempt += 1;
                    tracing::debug!(attempt, "badNonce, retrying");
                }
                other => break other,
            }
        }
    }};
}

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
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
        let config = match ca_bundle_pem {
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in crate::cert::pem_certificates(pem)? {
                    roots
                        .add(cert)
                        .map_err(|e| Error::Config(format!("ACME CA bundle: {e}")))?;
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
        let fut = HttpClient::request(&self.inner, req);
        Box::pin(async move {
            let start = Instant::now();
            // The whole exchange, body included, is bounded: a CA that accepts the
            // connection and never answers must not hold an order (or shutdown) for ever.
            let exchange = async {
                let mut r = fut.await?;
                let body = r.body.into_bytes().await.map_err(instant_acme::Error::Other)?;
                Ok(BytesResponse {
                    parts: r.parts,
                    body: Box::new(body),
                })
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

/// External account binding credentials.
#[derive(Clone)]
pub struct Eab {
    pub key_id: String,
    /// The HMAC key as given by the CA: base64url (padding optional).
    pub hmac_key: String,
}

impl Eab {
    fn key(&self) -> Result<ExternalAccountKey> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.hmac_key.trim().trim_end_matches('='))
            .map_err(|e| Error::Config(format!("EAB HMAC key is not base64url: {e}")))?;
        Ok(ExternalAccountKey::new(self.key_id.clone(), &raw))
    }
}

/// Creates a new ACME account.
pub async fn create_account(
    http: &AcmeHttp,
    directory: &str,
    email: Option<&str>,
    eab: Option<&Eab>,
) -> Result<(Account, AccountCredentials)> {
    let contact = email.map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = eab.map(Eab::key).transpose()?;
    let new = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let r = nonce_retry!(
        Account::builder_with_http(Box::new(http.clone()))
            .create(&new, directory.to_owned(), eab.as_ref())
            .await
    );
    match r {
        Err(instant_acme::Error::Api(p)) if p.r#type.as_deref() == Some(EXTERNAL_ACCOUNT_REQUIRED) => {
            Err(Error::Config(format!(
                "the ACME server requires External Account Binding; give its key id and HMAC key \
                 (`issue --eab-key-id --eab-hmac-key`, or for `run` a Secret with keyId and \
                 hmacKey named by SIDECERT_EAB_SECRET, the chart's acme.eabSecret): {p}"
            )))
        }
        r => Ok(r?),
    }
}

/// Restores an account from stored credentials (fetches the directory).
pub async fn restore_account(http: &AcmeHttp, credentials: AccountCredentials) -> Result<Account> {
    Ok(Account::builder_with_http(Box::new(http.clone()))
        .from_credentials(credentials)
        .await?)
}

/// Where the key authorizations go before the CA is told to validate.
pub trait Publisher: Send + Sync {
    /// Makes `tokens` (token → key authorization) answerable by every replica, and checks
    /// this replica's responder serves them.
    fn publish(&self, tokens: &HashMap<String, String>) -> impl Future<Output = Result<()>> + Send;
    /// Withdraws them after the order.
    fn withdraw(&self) -> impl Future<Output = ()> + Send;
}

/// What to order.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub domains: Vec<String>,
    pub profile: Option<String>,
    pub replaces: Option<CertificateIdentifier<'static>>,
    pub key_algorithm: KeyAlgorithm,
}

/// A certificate fresh from the CA.
#[derive(Clone)]
pub struct Issued {
    /// Leaf first, then the chain.
    pub chain_pem: String,
    /// PKCS#8 PEM.
    pub key_pem: String,
    pub info: CertInfo,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("info", &self.info).finish()
    }
}

/// Runs one order: all domains, HTTP-01, CSR from a fresh key, then the chain.
pub async fn order<P: Publisher>(account: &Account, req: &OrderRequest, publisher: &P) -> Result<Issued> {
    let result = order_inner(account, req, publisher).await;
    publisher.withdraw().await;
    result
}

async fn order_inner<P: Publisher>(account: &Account, req: &OrderRequest, publisher: &P) -> Result<Issued> {
    // One key per order, kept across resumptions of the same order.
    let key = PrivateKey::generate_async(req.key_algorithm).await?;
    let mut url = None;
    let mut attempt = 0;
    loop {
        match drive(account, req, publisher, &key, &mut url).await {
            // A badNonce that instant-acme cannot retry by itself (e.g. while fetching an
            // authorization): resume the same order from its current state.
            Err(Error::Acme(instant_acme::Error::Api(p))) if is_bad_nonce(&p) && attempt < NONCE_ATTEMPTS => {
                attempt += 1;
                tracing::debug!(attempt, "badNonce during the order, resuming it");
            }
            other => return other,
        }
    }
}

/// Moves the order forward from whatever state it is in.
async fn drive<P: Publisher>(
    account: &Account,
    req: &OrderRequest,
    publisher: &P,
    key: &PrivateKey,
    url: &mut Option<String>,
) -> Result<Issued> {
    let mut order = match url.as_ref() {
        Some(u) => nonce_retry!(account.order(u.clone()).await)?,
        None => {
            let o = new_order(account, req).await?;
            tracing::info!(url = o.url(), domains = ?req.domains, "order placed");
            *url = Some(o.url().to_owned());
            o
        }
    };

    if order.state().status == OrderStatus::Pending {
        // 1. Collect the key authorizations of pending HTTP-01 challenges.
        let mut tokens = HashMap::new();
        {
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a?;
                match a.status {
                    AuthorizationStatus::Pending => {}
                    AuthorizationStatus::Valid => continue,
                    other => {
                        return Err(Error::Order(format!(
                            "authorization for {} is {other:?}",
                            a.identifier()
                        )));
                    }
                }
                let ident = a.identifier().to_string();
                let ch = a
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| Error::Order(format!("the CA offers no http-01 challenge for {ident}")))?;
                tokens.insert(ch.token.clone(), ch.key_authorization().as_str().to_owned());
            }
        }
        // 2. Publish them everywhere, then tell the CA.
        if !tokens.is_empty() {
            publisher.publish(&tokens).await?;
            let mut authzs = order.authorizations();
            while let Some(a) = authzs.next().await {
                let mut a = a?;
                if a.status != AuthorizationStatus::Pending {
                    continue;
                }
                if let Some(mut ch) = a.challenge(ChallengeType::Http01)
                    && ch.status == ChallengeStatus::Pending
                {
                    nonce_retry!(ch.set_ready().await)?;
                }
            }
        }
    }

    let poll = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(90));
    if order.state().status == OrderStatus::Pending {
        // 3. Wait for validation.
        let status = match nonce_retry!(order.poll_ready(&poll).await) {
            Ok(s) => s,
            Err(instant_acme::Error::Api(p)) if !is_bad_nonce(&p) => {
                return Err(validation_error(&mut order, Some(p)).await);
            }
            Err(e) => return Err(e.into()),
        };
        if status == OrderStatus::Invalid {
            return Err(validation_error(&mut order, None).await);
        }
    }
    match order.state().status {
        OrderStatus::Invalid => return Err(validation_error(&mut order, None).await),
        OrderStatus::Ready => {
            // 4. Finalize with our own key.
            let csr = key.csr_der(&req.domains)?;
            nonce_retry!(order.finalize_csr(&csr).await)?;
        }
        _ => {}
    }
    let chain_pem = nonce_retry!(order.poll_certificate(&poll).await)?;
    let info = CertInfo::from_pem_chain(&chain_pem)?;
    tracing::info!(not_after = %info.lifetime.not_after, domains = ?req.domains, "certificate issued");
    Ok(Issued {
        chain_pem,
        key_pem: key.pkcs8_pem(),
        info,
    })
}

async fn new_order(account: &Account, req: &OrderRequest) -> Result<instant_acme::Order> {
    let ids: Vec<Identifier> = req.domains.iter().cloned().map(Identifier::Dns).collect();
    let new_order = |replaces: bool| {
        let mut new = NewOrder::new(&ids);
        if let Some(p) = &req.profile {
            new = new.profile(p);
        }
        match &req.replaces {
            Some(r) if replaces => new.replaces(r.clone()),
            _ => new,
        }
    };
    match nonce_retry!(account.new_order(&new_order(true)).await) {
        Ok(o) => Ok(o),
        // A CA may refuse `replaces` (already replaced, unknown certificate): order plainly.
        Err(e) if req.replaces.is_some() && !is_transient(&e) => {
            tracing::info!(error = %e, "order with `replaces` refused, ordering without");
            Ok(nonce_retry!(account.new_order(&new_order(false)).await)?)
        }
        Err(e) => Err(e.into()),
    }
}

/// Errors worth retrying soon: the network, `badNonce`, rate limits, server errors.
pub fn is_transient(e: &instant_acme::Error) -> bool {
    match e {
        instant_acme::Error::Api(p) => {
            is_bad_nonce(p)
                || p.status.is_some_and(|s| s == 429 || s >= 500)
                || p.r#type
                    .as_deref()
                    .is_some_and(|t| t.ends_with(":rateLimited") || t.ends_with(":serverInternal"))
        }
        instant_acme::Error::Json(_) | instant_acme::Error::Str(_) => false,
        _ => true,
    }
}

/// Builds a [`Error::Validation`] from the authorizations' challenge errors.
async fn validation_error(order: &mut instant_acme::Order, top: Option<Problem>) -> Error {
    let mut failed = Vec::new();
    let mut details = Vec::new();
    let mut authzs = order.authorizations();
    while let Some(a) = authzs.next().await {
        let Ok(mut a) = a else { continue };
        let ident = a.identifier().to_string();
        let state = match nonce_retry!(a.refresh().await) {
            Ok(s) => s,
            Err(_) => continue,
        };
        if state.status == AuthorizationStatus::Valid {
            continue;
        }
        failed.push(ident.clone());
        for ch in &state.challenges {
            if let Some(p) = &ch.error {
                details.push(format!("{ident}: {p}"));
            }
        }
    }
    if let Some(p) = top {
        let p = p.to_string();
        if !details.iter().any(|d| d.ends_with(&p)) {
            details.push(p);
        }
    }
    if details.is_empty() {
        details.push("the order became invalid".into());
    }
    Error::Validation {
        domains: failed.join(","),
        detail: details.join("; "),
    }
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
