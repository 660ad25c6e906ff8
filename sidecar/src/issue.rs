//! `sidecert-sidecar issue`: one order, no Kubernetes.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf};

use http::{Method, StatusCode};
use sidecert_contract::{ACME_CHALLENGE_PATH, KeyAlgorithm};
use tokio_util::sync::CancellationToken;

use crate::{
    Error, Result,
    acme::{AcmeHttp, Eab, OrderRequest, Publisher},
    responder::{ChallengeStore, Responder, bind, http_request, serve_responder},
    store::write_dir,
};

/// Everything `issue` needs.
#[derive(Debug, Clone)]
pub struct IssueOptions {
    pub domains: Vec<String>,
    pub directory: String,
    pub ca_bundle_pem: Option<String>,
    pub cert_dir: PathBuf,
    pub http01_listen: SocketAddr,
    pub key_algorithm: KeyAlgorithm,
    pub profile: Option<String>,
    pub email: Option<String>,
    pub eab: Option<(String, String)>,
}

/// Publishes into this process's own responder and checks it answers.
pub struct LocalPublisher {
    pub store: ChallengeStore,
    pub scope: String,
    /// Base URL of the own responder, e.g. `http://127.0.0.1:8089`.
    pub self_url: String,
}

impl Publisher for LocalPublisher {
    async fn publish(&self, tokens: &HashMap<String, String>) -> Result<()> {
        self.store.set_scope(&self.scope, tokens.clone());
        self_check(&self.self_url, tokens).await
    }

    async fn withdraw(&self) {
        self.store.set_scope(&self.scope, HashMap::new());
    }
}

/// GETs every token from the responder at `base` and compares the key authorization.
pub async fn self_check(base: &str, tokens: &HashMap<String, String>) -> Result<()> {
    for (token, ka) in tokens {
        let url = format!("{base}{ACME_CHALLENGE_PATH}{token}");
        let (status, body) = http_request(Method::GET, &url).await?;
        if status != StatusCode::OK || body != *ka {
            return Err(Error::Order(format!(
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

/// Runs one order and writes `tls.crt` and `tls.key` to the directory.
pub async fn issue(opts: &IssueOptions) -> Result<crate::acme::Issued> {
    let http = AcmeHttp::new(opts.ca_bundle_pem.as_deref(), None)?;
    let responder = Responder::default();
    responder.set_ready(true);
    let listener = bind(opts.http01_listen).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(opts.http01_listen, e))?;
    let stop = CancellationToken::new();
    let server = tokio::spawn(serve_responder(listener, responder.clone(), stop.clone()));
    let result = async {
        let eab = opts.eab.as_ref().map(|(id, key)| Eab {
            key_id: id.clone(),
            hmac_key: key.clone(),
        });
        let (account, _) =
            crate::acme::create_account(&http, &opts.directory, opts.email.as_deref(), eab.as_ref()).await?;
        let publisher = LocalPublisher {
            store: responder.store.clone(),
            scope: "issue".into(),
            self_url: self_url(addr),
        };
        let issued = crate::acme::order(
            &account,
            &OrderRequest {
                domains: opts.domains.clone(),
                profile: opts.profile.clone(),
                replaces: None,
                key_algorithm: opts.key_algorithm,
            },
            &publisher,
        )
        .await?;
        write_dir(&opts.cert_dir, &issued.chain_pem, &issued.key_pem).await?;
        Ok(issued)
    }
    .await;
    stop.cancel();
    let _ = server.await;
    result
}
