//! The namespace's ACME account in its Secret (shared by every sidecar there), and the
//! EAB credentials.

use std::collections::BTreeMap;

use instant_acme::{Account, AccountCredentials};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use sidecert_contract::{MANAGED_BY, MANAGED_BY_LABEL, annotations, is_sidecerts_secret};

use crate::{
    acme::{AcmeHttp, Eab},
    error::{Error, Result},
    kube::secret::is_conflict,
};

/// Key of the account credentials in the account Secret.
pub const ACCOUNT_KEY: &str = "credentials.json";

/// The namespace's ACME account: read from its Secret, or created at the CA and stored
/// there. The webhook creates the Secret empty (the sidecar's Role has no `create` on
/// Secrets); the first sidecar fills it with an `update` conditional on its version, so a
/// concurrent filler wins and its account is used. A missing Secret is created empty first
/// where the Role allows it (older Roles, the `issue` command), before any call to the CA.
/// Also returns the Secret's resourceVersion, for [`replace_account`].
pub async fn load_or_create_account(
    api: &Api<Secret>,
    secret_name: &str,
    http: &AcmeHttp,
    directory: &str,
    email: Option<&str>,
    eab: Option<&Eab>,
) -> Result<(Account, Option<String>)> {
    let secret = match api.get_opt(secret_name).await? {
        Some(s) => s,
        None => create_empty(api, secret_name).await?,
    };
    if !is_sidecerts_secret(&secret.metadata) {
        return Err(Error::ForeignAccount(secret_name.to_owned()));
    }
    if holds_account(&secret) {
        return restore(&secret, http, secret_name).await;
    }
    store_new_account(api, secret, http, directory, email, eab).await
}

/// Whether the account Secret holds credentials (the webhook creates it empty).
fn holds_account(s: &Secret) -> bool {
    s.data.as_ref().is_some_and(|d| d.contains_key(ACCOUNT_KEY))
}

/// Creates the account Secret empty and labelled as sidecert's; one made meanwhile is read.
async fn create_empty(api: &Api<Secret>, name: &str) -> Result<Secret> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => Ok(created),
        Err(e) if is_conflict(&e) => Ok(api.get(name).await?),
        Err(e) => Err(e.into()),
    }
}

/// Makes a new account at the CA and stores it in `secret` (sidecert's, read just before),
/// with `update` conditional on the version read. When another sidecar stored one
/// meanwhile, its account is used and the one made here is left unused.
async fn store_new_account(
    api: &Api<Secret>,
    mut secret: Secret,
    http: &AcmeHttp,
    directory: &str,
    email: Option<&str>,
    eab: Option<&Eab>,
) -> Result<(Account, Option<String>)> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let (account, creds) = crate::acme::create_account(http, directory, email, eab).await?;
    let json =
        serde_json::to_vec(&creds).map_err(|e| Error::order_from("serialising account credentials", e))?;
    secret
        .data
        .get_or_insert_with(Default::default)
        .insert(ACCOUNT_KEY.to_owned(), ByteString(json));
    secret
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(annotations::ISSUER_URL.to_owned(), directory.to_owned());
    // `replace` sends the resourceVersion read before: a concurrent change is a conflict.
    match api.replace(&name, &PostParams::default(), &secret).await {
        Ok(stored) => {
            tracing::info!(secret = name, "stored a new ACME account");
            Ok((account, stored.metadata.resource_version))
        }
        Err(e) if is_conflict(&e) => {
            tracing::info!(
                secret = name,
                "the account Secret was changed meanwhile; using its account"
            );
            restore(&api.get(&name).await?, http, &name).await
        }
        Err(e) => Err(e.into()),
    }
}

/// The CA has forgotten the account stored in the Secret `name` at `stale_version`: creates
/// a new account and stores it in place of the old one, with `update` (the verb the
/// sidecar's Role already grants) conditional on that version. When another sidecar has
/// replaced it meanwhile, its account is used and the one made here is left unused.
pub async fn replace_account(
    api: &Api<Secret>,
    name: &str,
    stale_version: Option<&str>,
    http: &AcmeHttp,
    directory: &str,
    email: Option<&str>,
    eab: Option<&Eab>,
) -> Result<(Account, Option<String>)> {
    let Some(secret) = api.get_opt(name).await? else {
        return load_or_create_account(api, name, http, directory, email, eab).await;
    };
    if !is_sidecerts_secret(&secret.metadata) {
        return Err(Error::ForeignAccount(name.to_owned()));
    }
    if secret.metadata.resource_version.as_deref() != stale_version {
        tracing::info!(
            secret = name,
            "the account Secret was replaced meanwhile; using it"
        );
        return restore(&secret, http, name).await;
    }
    store_new_account(api, secret, http, directory, email, eab).await
}

/// The account in the Secret `s`, which must be sidecert's: a key someone else put there
/// would make this namespace's certificates theirs to revoke, and it is never replaced.
async fn restore(s: &Secret, http: &AcmeHttp, name: &str) -> Result<(Account, Option<String>)> {
    if !is_sidecerts_secret(&s.metadata) {
        return Err(Error::ForeignAccount(name.to_owned()));
    }
    let raw = s
        .data
        .as_ref()
        .and_then(|d| d.get(ACCOUNT_KEY))
        .ok_or_else(|| Error::config(format!("account Secret {name} has no {ACCOUNT_KEY}")))?;
    let creds: AccountCredentials = serde_json::from_slice(&raw.0)
        .map_err(|e| Error::config_from(format!("account Secret {name}"), e))?;
    let account = crate::acme::restore_account(http, creds).await?;
    Ok((account, s.metadata.resource_version.clone()))
}

/// Reads EAB credentials (`keyId`, `hmacKey`) from a Secret.
pub async fn read_eab(api: &Api<Secret>, name: &str) -> Result<Eab> {
    let s = api.get(name).await?;
    let get = |k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .ok_or_else(|| Error::config(format!("EAB Secret {name} has no {k}")))
    };
    Ok(Eab {
        key_id: get("keyId")?,
        hmac_key: get("hmacKey")?,
    })
}

/// Where the namespace's account comes from, and this replica's copy of it (with the
/// resourceVersion of the Secret it was read from).
pub struct Accounts {
    pub secrets: Api<Secret>,
    pub http: AcmeHttp,
    pub directory: String,
    pub email: Option<String>,
    /// The Secret with the EAB credentials, if any.
    pub eab_secret: Option<String>,
    cached: tokio::sync::Mutex<Option<(Account, Option<String>)>>,
}

impl Accounts {
    pub fn new(
        secrets: Api<Secret>,
        http: AcmeHttp,
        directory: String,
        email: Option<String>,
        eab_secret: Option<String>,
    ) -> Self {
        Self {
            secrets,
            http,
            directory,
            email,
            eab_secret,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The account: this replica's copy, else read from its Secret (created if absent).
    pub async fn get(&self) -> Result<Account> {
        let mut g = self.cached.lock().await;
        if let Some((a, _)) = g.as_ref() {
            return Ok(a.clone());
        }
        let (name, eab) = self.source().await?;
        let (account, version) = load_or_create_account(
            &self.secrets,
            &name,
            &self.http,
            &self.directory,
            self.email.as_deref(),
            eab.as_ref(),
        )
        .await?;
        *g = Some((account.clone(), version));
        Ok(account)
    }

    /// The copy may be stale: re-read the Secret next time.
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    /// The account Secret's name and the EAB credentials, if any.
    async fn source(&self) -> Result<(String, Option<Eab>)> {
        let eab = match &self.eab_secret {
            Some(name) => Some(read_eab(&self.secrets, name).await?),
            None => None,
        };
        Ok((
            sidecert_contract::account_secret_name(&self.directory, self.email.as_deref()),
            eab,
        ))
    }

    /// The CA no longer knows the account `forgotten` (its URL): replace it in the Secret,
    /// unless this replica already moved on to another one (a second order that failed
    /// with the same stale account must not replace the new one).
    pub async fn replace_forgotten(&self, forgotten: &str) {
        let mut g = self.cached.lock().await;
        let Some((current, version)) = g.as_ref() else {
            return; // Re-read from the Secret at the next order.
        };
        if current.id() != forgotten {
            return;
        }
        let version = version.clone();
        *g = None;
        let replaced = async {
            let (name, eab) = self.source().await?;
            tracing::warn!(
                secret = name,
                "the ACME server does not know the account; replacing it"
            );
            replace_account(
                &self.secrets,
                &name,
                version.as_deref(),
                &self.http,
                &self.directory,
                self.email.as_deref(),
                eab.as_ref(),
            )
            .await
        };
        match replaced.await {
            Ok(account) => *g = Some(account),
            Err(e) => tracing::warn!(error = %e, "replacing the ACME account; retried with the next order"),
        }
    }
}
