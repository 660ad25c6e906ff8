//! The API client: from a kubeconfig file or the defaults, and what the API server's version
//! says about native sidecars.

use std::path::Path;

use kube::Client;

use crate::error::{Error, Result};

/// A client from a kubeconfig file, or the default (in-cluster, then `$KUBECONFIG`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    match kubeconfig {
        None => Ok(Client::try_default().await?),
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::config(path.display().to_string(), e))?;
            let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::config(path.display().to_string(), e))?;
            Ok(Client::try_from(cfg)?)
        }
    }
}
