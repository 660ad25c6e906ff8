//! Where certificates live: the Kubernetes Secret (and the account Secret), and optionally
//! a directory.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use instant_acme::{Account, AccountCredentials};
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api,
    api::{ObjectMeta, PostParams},
};
use sidecert_contract::{MANAGED_BY, MANAGED_BY_LABEL, annotations};
use time::OffsetDateTime;

use crate::{
    Error, Result,
    acme::{AcmeHttp, Eab, Issued},
    cert::{CertInfo, rfc3339},
};

/// Key of the account credentials in the account Secret.
pub const ACCOUNT_KEY: &str = "credentials.json";
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_TYPE: &str = "kubernetes.io/tls";
const WRITE_ATTEMPTS: u32 = 8;

/// A certificate the sidecar holds (from the Secret, or fresh from the CA).
#[derive(Clone)]
pub struct Held {
    pub chain_pem: String,
    pub key_pem: String,
    pub info: CertInfo,
}

impl From<Issued> for Held {
    fn from(i: Issued) -> Self {
        Self {
            chain_pem: i.chain_pem,
            key_pem: i.key_pem,
            info: i.info,
        }
    }
}

/// What a Secret holds, as far as the sidecar is concerned.
pub fn read_held(secret: &Secret) -> Option<(Held, bool)> {
    let data = secret.data.as_ref()?;
    let chain_pem = String::from_utf8(data.get(TLS_CRT)?.0.clone()).ok()?;
    let key_pem = String::from_utf8(data.get(TLS_KEY)?.0.clone()).ok()?;
    let info = CertInfo::from_pem_chain(&chain_pem).ok()?;
    let temporary = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(annotations::TEMPORARY))
        .is_some_and(|v| v == "true");
    Some((
        Held {
            chain_pem,
            key_pem,
            info,
        },
        temporary,
    ))
}

/// True when `secret` holds exactly `held`'s chain and key.
pub fn holds(secret: &Secret, held: &Held) -> bool {
    let bytes = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| v.0.as_slice())
    };
    bytes(TLS_CRT) == Some(held.chain_pem.as_bytes()) && bytes(TLS_KEY) == Some(held.key_pem.as_bytes())
}

/// A Secret's certificate if it is a real one (not temporary) for exactly `domains`, not
/// expired at `now`, and with its own key beside it.
pub fn valid_held(secret: &Secret, domains: &[String], now: OffsetDateTime) -> Option<Held> {
    let (held, temporary) = read_held(secret)?;
    (!temporary && held.info.covers(domains, now) && crate::cert::key_matches(&held.info, &held.key_pem))
        .then_some(held)
}

/// What goes into the annotations beside the certificate.
pub struct WriteMeta<'a> {
    pub issuer_url: &'a str,
    pub renew_at: OffsetDateTime,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Writes the certificate into the Secret `name`, replacing whatever is there (the
/// temporary certificate) in place; conflicts are resolved by re-reading.
pub async fn write_secret(api: &Api<Secret>, name: &str, held: &Held, meta: &WriteMeta<'_>) -> Result<()> {
    let mut last = None;
    for _ in 0..WRITE_ATTEMPTS {
        let existing = api.get_opt(name).await?;
        let creating = existing.is_none();
        let mut secret = existing.unwrap_or_else(|| Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    MANAGED_BY.to_owned(),
                )])),
                ..Default::default()
            },
            type_: Some(TLS_TYPE.to_owned()),
            ..Default::default()
        });
        fill_secret(&mut secret, held, meta);
        let r = if creating {
            api.create(&PostParams::default(), &secret).await
        } else {
            api.replace(name, &PostParams::default(), &secret).await
        };
        match r {
            Ok(_) => return Ok(()),
            Err(e) if is_conflict(&e) || (creating && is_not_found(&e)) => {
                tracing::debug!(secret = name, "write conflict, re-reading");
                last = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(
        || Error::Order("Secret write kept conflicting".into()),
        Error::from,
    ))
}

/// Sets data and annotations of a TLS Secret (pure; unit-tested).
pub fn fill_secret(secret: &mut Secret, held: &Held, meta: &WriteMeta<'_>) {
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    data.insert(TLS_CRT.into(), ByteString(held.chain_pem.clone().into_bytes()));
    data.insert(TLS_KEY.into(), ByteString(held.key_pem.clone().into_bytes()));
    secret.string_data = None;
    let a = secret.metadata.annotations.get_or_insert_with(BTreeMap::new);
    a.remove(annotations::TEMPORARY);
    a.insert(
        annotations::NOT_AFTER.into(),
        rfc3339(held.info.lifetime.not_after),
    );
    a.insert(annotations::RENEW_AT.into(), rfc3339(meta.renew_at));
    a.insert(annotations::ISSUER_URL.into(), meta.issuer_url.to_owned());
    a.insert(
        annotations::DOMAINS_ON_SECRET.into(),
        held.info.domains.iter().cloned().collect::<Vec<_>>().join(","),
    );
}

/// The namespace's ACME account: read from its Secret, or created at the CA and stored
/// (create-if-absent; a concurrent creator wins and its account is used). Also returns the
/// Secret's resourceVersion, for [`forget_account`].
pub async fn load_or_create_account(
    api: &Api<Secret>,
    secret_name: &str,
    http: &AcmeHttp,
    directory: &str,
    email: Option<&str>,
    eab: Option<&Eab>,
) -> Result<(Account, Option<String>)> {
    if let Some(s) = api.get_opt(secret_name).await? {
        return restore(&s, http, secret_name).await;
    }
    let (account, creds) = crate::acme::create_account(http, directory, email, eab).await?;
    let json = serde_json::to_vec(&creds)
        .map_err(|e| Error::Order(format!("serialising account credentials: {e}")))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                annotations::ISSUER_URL.to_owned(),
                directory.to_owned(),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(ACCOUNT_KEY.to_owned(), ByteString(json))])),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(secret = secret_name, "created ACME account");
            Ok((account, created.metadata.resource_version))
        }
        Err(e) if is_conflict(&e) => {
            tracing::info!(
                secret = secret_name,
                "account Secret appeared meanwhile, using it"
            );
            let s = api.get(secret_name).await?;
            restore(&s, http, secret_name).await
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
    let Some(mut secret) = api.get_opt(name).await? else {
        return load_or_create_account(api, name, http, directory, email, eab).await;
    };
    if secret.metadata.resource_version.as_deref() != stale_version {
        tracing::info!(
            secret = name,
            "the account Secret was replaced meanwhile; using it"
        );
        return restore(&secret, http, name).await;
    }
    let (account, creds) = crate::acme::create_account(http, directory, email, eab).await?;
    let json = serde_json::to_vec(&creds)
        .map_err(|e| Error::Order(format!("serialising account credentials: {e}")))?;
    secret
        .data
        .get_or_insert_with(Default::default)
        .insert(ACCOUNT_KEY.to_owned(), ByteString(json));
    // `replace` sends the resourceVersion read above: a concurrent change is a conflict.
    match api.replace(name, &PostParams::default(), &secret).await {
        Ok(stored) => {
            tracing::info!(
                secret = name,
                "replaced the ACME account the server had forgotten"
            );
            Ok((account, stored.metadata.resource_version))
        }
        Err(e) if is_conflict(&e) => {
            tracing::info!(
                secret = name,
                "the account Secret was replaced meanwhile; using it"
            );
            restore(&api.get(name).await?, http, name).await
        }
        Err(e) => Err(e.into()),
    }
}

async fn restore(s: &Secret, http: &AcmeHttp, name: &str) -> Result<(Account, Option<String>)> {
    let raw = s
        .data
        .as_ref()
        .and_then(|d| d.get(ACCOUNT_KEY))
        .ok_or_else(|| Error::Config(format!("account Secret {name} has no {ACCOUNT_KEY}")))?;
    let creds: AccountCredentials =
        serde_json::from_slice(&raw.0).map_err(|e| Error::Config(format!("account Secret {name}: {e}")))?;
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
            .ok_or_else(|| Error::Config(format!("EAB Secret {name} has no {k}")))
    };
    Ok(Eab {
        key_id: get("keyId")?,
        hmac_key: get("hmacKey")?,
    })
}

/// Writes `tls.crt` and `tls.key` into `dir` so that readers never see half a pair.
///
/// Like the kubelet's Secret volumes: the pair goes into a fresh `..<version>` directory,
/// the `..data` symlink is swapped to it with one rename, and `tls.crt`/`tls.key` are
/// symlinks through `..data`. Readers that open `..data/tls.crt` and `..data/tls.key` (or
/// the top-level links, in quick succession) see one consistent pair.
pub async fn write_dir(dir: &Path, chain_pem: &str, key_pem: &str) -> Result<()> {
    let dir = dir.to_owned();
    let (chain, key) = (chain_pem.to_owned(), key_pem.to_owned());
    tokio::task::spawn_blocking(move || write_dir_blocking(&dir, &chain, &key))
        .await
        .map_err(|e| Error::Http(format!("writer task: {e}")))?
}

fn write_dir_blocking(dir: &Path, chain: &str, key: &str) -> Result<()> {
    use std::{fs, os::unix::fs::symlink};
    let io = |p: &Path, e| Error::io(p.display(), e);
    fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let version = format!("..{nanos}-{}", std::process::id());
    let vdir = dir.join(&version);
    fs::create_dir(&vdir).map_err(|e| io(&vdir, e))?;
    write_file(&vdir.join(TLS_CRT), chain.as_bytes(), 0o644)?;
    write_file(&vdir.join(TLS_KEY), key.as_bytes(), 0o600)?;
    let tmp = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp);
    symlink(&version, &tmp).map_err(|e| io(&tmp, e))?;
    let data = dir.join("..data");
    let old = fs::read_link(&data).ok();
    fs::rename(&tmp, &data).map_err(|e| io(&data, e))?;
    for name in [TLS_CRT, TLS_KEY] {
        let link = dir.join(name);
        let target = PathBuf::from("..data").join(name);
        if fs::read_link(&link).ok().as_deref() != Some(target.as_path()) {
            let tmp = dir.join(format!("..{name}_tmp"));
            let _ = fs::remove_file(&tmp);
            symlink(&target, &tmp).map_err(|e| io(&tmp, e))?;
            fs::rename(&tmp, &link).map_err(|e| io(&link, e))?;
        }
    }
    if let Some(old) = old
        && old != Path::new(&version)
    {
        let _ = fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io(path.display(), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(path.display(), e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn dir_swap_keeps_one_version() {
        let dir = std::env::temp_dir().join(format!("sidecert-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_dir(&dir, "C1", "K1").await.unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("tls.crt")).unwrap(), "C1");
        write_dir(&dir, "C2", "K2").await.unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("tls.crt")).unwrap(), "C2");
        assert_eq!(std::fs::read_to_string(dir.join("..data/tls.key")).unwrap(), "K2");
        let versions = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("..") && n.as_bytes().get(2).is_some_and(u8::is_ascii_digit)
            })
            .count();
        assert_eq!(versions, 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
