//! `sidecert-sidecar issue`: one order, no Kubernetes.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf};

use sidecert_contract::KeyAlgorithm;
use tokio_util::sync::CancellationToken;

use crate::{
    acme::{AcmeHttp, Eab, OrderRequest, Publisher},
    challenge::responder::{ChallengeStore, Responder, bind, self_check, self_url, serve_responder},
    dir::write_dir,
    error::{Error, Result},
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
