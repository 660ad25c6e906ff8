//! The API client: from a kubeconfig file or the defaults, and what the API server's version
//! says about native sidecars.

use std::path::Path;

use kube::Client;

use crate::{
    config::NativeSidecars,
    error::{Error, Result},
    mutate::container::supports_native_sidecars,
};

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

/// Resolves `--native-sidecars`. `auto` asks the API server's version (1.29+ → native); with
/// no cluster it answers native; when the server cannot be asked, a regular container.
pub async fn native_sidecars(mode: NativeSidecars, client: Option<&Client>) -> bool {
    match (mode, client) {
        (NativeSidecars::Always, _) => true,
        (NativeSidecars::Never, _) => false,
        (NativeSidecars::Auto, None) => true,
        (NativeSidecars::Auto, Some(c)) => match c.apiserver_version().await {
            Ok(v) => {
                let native = supports_native_sidecars(&v.major, &v.minor);
                tracing::info!(version = %v.git_version, native, "API server version");
                native
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the API server version; injecting regular containers");
                false
            }
        },
    }
}
