//! One order from start to certificate: all domains, HTTP-01, a CSR from a fresh key.

use std::{collections::HashMap, future::Future, time::Duration};

use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeStatus, ChallengeType, Identifier,
    NewOrder, OrderStatus, Problem, RetryPolicy,
};
use sidecert_contract::KeyAlgorithm;

use crate::{
    acme::client::{NONCE_ATTEMPTS, is_bad_nonce, nonce_retry},
    certificate::x509::{CertInfo, Held, PrivateKey},
    error::{Error, Result},
};

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

/// A certificate fresh from the CA (the same pair and facts as one read from the Secret).
pub type Issued = Held;

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
                        return Err(Error::order(format!(
                            "authorization for {} is {other:?}",
                            a.identifier()
                        )));
                    }
                }
                let ident = a.identifier().to_string();
                let ch = a
                    .challenge(ChallengeType::Http01)
                    .ok_or_else(|| Error::order(format!("the CA offers no http-01 challenge for {ident}")))?;
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
