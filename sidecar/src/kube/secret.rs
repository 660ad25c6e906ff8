//! The certificate's Secret: what it holds (classified for the state machine), writing a
//! certificate into it, and following it with a watch.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, ResourceExt,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use sidecert_contract::{MANAGED_BY, MANAGED_BY_LABEL, annotations, is_sidecerts_secret};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::{
    certificate::{
        state::{Pair, SecretContents},
        x509::{CertInfo, Held, key_matches, rfc3339},
    },
    error::{Error, Result},
};

const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const TLS_TYPE: &str = "kubernetes.io/tls";
const WRITE_ATTEMPTS: u32 = 8;

/// The pair a Secret holds, when it holds both keys as text.
fn pair(secret: &Secret) -> Option<Pair> {
    let text = |k: &str| {
        let v = secret.data.as_ref()?.get(k)?;
        String::from_utf8(v.0.clone()).ok()
    };
    Some(Pair {
        chain_pem: text(TLS_CRT)?,
        key_pem: text(TLS_KEY)?,
    })
}

/// What `secret` holds for a certificate of `domains` at `now` (pure; unit-tested): a real
/// certificate (not temporary) for exactly `domains`, not expired, with its own key beside
/// it, is valid — foreign when its issuer-url names another server than `acme_server`. A
/// Secret that is not sidecert's ([`is_sidecerts_secret`]) is [`SecretContents::NotOurs`],
/// whatever it holds.
pub fn classify(
    secret: Option<&Secret>,
    domains: &[String],
    acme_server: &str,
    now: OffsetDateTime,
) -> SecretContents {
    let Some(secret) = secret else {
        return SecretContents::Absent;
    };
    if !is_sidecerts_secret(&secret.metadata) {
        return SecretContents::NotOurs;
    }
    let Some(pair) = pair(secret) else {
        return SecretContents::Broken(None);
    };
    if secret
        .annotations()
        .get(annotations::TEMPORARY)
        .is_some_and(|v| v == "true")
    {
        return SecretContents::Temporary(Some(pair));
    }
    let info = match CertInfo::from_pem_chain(&pair.chain_pem) {
        Ok(info) if info.covers(domains, now) && key_matches(&info, &pair.key_pem) => info,
        _ => return SecretContents::Broken(Some(pair)),
    };
    let foreign = secret
        .annotations()
        .get(annotations::ISSUER_URL)
        .is_some_and(|i| i != acme_server);
    let held = Held {
        chain_pem: pair.chain_pem,
        key_pem: pair.key_pem,
        info,
    };
    if foreign {
        SecretContents::Foreign(held)
    } else {
        SecretContents::Valid(held)
    }
}

/// What goes into the annotations beside the certificate.
pub struct WriteMeta<'a> {
    pub issuer_url: &'a str,
    pub renew_at: OffsetDateTime,
}

pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Writes the certificate into the Secret `name`, replacing whatever is there (the
/// temporary certificate) in place; conflicts are resolved by re-reading. A Secret that is
/// not sidecert's ([`is_sidecerts_secret`]) is left alone: [`Error::ForeignSecret`].
pub async fn write_secret(api: &Api<Secret>, name: &str, held: &Held, meta: &WriteMeta<'_>) -> Result<()> {
    let mut last = None;
    for _ in 0..WRITE_ATTEMPTS {
        let existing = api.get_opt(name).await?;
        // Someone else's Secret (a secretName naming another team's) is never overwritten.
        if existing
            .as_ref()
            .is_some_and(|s| !is_sidecerts_secret(&s.metadata))
        {
            return Err(Error::ForeignSecret(name.to_owned()));
        }
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
    Err(last.map_or_else(|| Error::order("Secret write kept conflicting"), Error::from))
}

/// Sets data and annotations of a TLS Secret (pure; unit-tested).
pub fn fill_secret(secret: &mut Secret, held: &Held, meta: &WriteMeta<'_>) {
    let data = secret.data.get_or_insert_with(BTreeMap::new);
    data.insert(TLS_CRT.into(), ByteString(held.chain_pem.clone().into_bytes()));
    data.insert(TLS_KEY.into(), ByteString(held.key_pem.clone().into_bytes()));
    secret.string_data = None;
    // Still sidecert's once the temporary annotation is gone.
    secret
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
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

/// Follows the Secret `name`: sends every version (None when absent).
pub async fn watch_secret(api: Api<Secret>, name: String, tx: watch::Sender<Option<Secret>>) {
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut seen = false;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                seen = true;
                tx.send_replace(Some(s));
            }
            Ok(watcher::Event::Delete(_)) => {
                seen = false;
                tx.send_replace(None);
            }
            Ok(watcher::Event::Init) => seen = false,
            Ok(watcher::Event::InitDone) => {
                if !seen {
                    tx.send_replace(None);
                }
            }
            Err(e) => tracing::warn!(secret = name, error = %e, "watching the Secret"),
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SERVER: &str = "https://acme.example/directory";

    fn secret(chain: &str, key: &str, annotations: &[(&str, &str)]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("web-tls".into()),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY_LABEL.to_owned(),
                    MANAGED_BY.to_owned(),
                )])),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                ),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (TLS_CRT.to_owned(), ByteString(chain.as_bytes().to_vec())),
                (TLS_KEY.to_owned(), ByteString(key.as_bytes().to_vec())),
            ])),
            ..Default::default()
        }
    }

    #[test]
    fn classify_tells_what_the_secret_holds() {
        let domains = vec!["a.example".to_owned()];
        let now = OffsetDateTime::now_utc();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(domains.clone()).unwrap();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(90);
        let chain = params.self_signed(&key).unwrap().pem();
        let key_pem = key.serialize_pem();
        let class = |s: Option<&Secret>| classify(s, &domains, SERVER, now);

        assert!(matches!(class(None), SecretContents::Absent));
        let mut empty = secret("", "", &[]);
        empty.data = None;
        assert!(matches!(class(Some(&empty)), SecretContents::Broken(None)));
        // Another team's Secret, even one holding a good certificate for the domains: not
        // ours to take or to replace (it used to be adopted, or ordered for and refused).
        let mut theirs = secret(&chain, &key_pem, &[]);
        theirs.metadata.labels = None;
        assert!(matches!(class(Some(&theirs)), SecretContents::NotOurs));
        assert!(matches!(class(Some(&Secret::default())), SecretContents::NotOurs));
        let temporary = secret(&chain, &key_pem, &[(annotations::TEMPORARY, "true")]);
        assert!(matches!(
            class(Some(&temporary)),
            SecretContents::Temporary(Some(_))
        ));
        let ours = secret(&chain, &key_pem, &[(annotations::ISSUER_URL, SERVER)]);
        let SecretContents::Valid(held) = class(Some(&ours)) else {
            panic!("a real certificate for the domains")
        };
        assert!(class(Some(&ours)).holds(&held));
        let unsaid = secret(&chain, &key_pem, &[]);
        assert!(matches!(class(Some(&unsaid)), SecretContents::Valid(_)));
        let foreign = secret(
            &chain,
            &key_pem,
            &[(annotations::ISSUER_URL, "https://other/dir")],
        );
        assert!(matches!(class(Some(&foreign)), SecretContents::Foreign(_)));
        // Another key beside it, other domains, expired, garbage: broken, but the pair is
        // kept (the holder compares it with what it holds).
        let other_key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let mismatched = secret(&chain, &other_key, &[]);
        assert!(matches!(
            class(Some(&mismatched)),
            SecretContents::Broken(Some(_))
        ));
        let other_domains = classify(Some(&ours), &["b.example".to_owned()], SERVER, now);
        assert!(matches!(other_domains, SecretContents::Broken(Some(_))));
        let expired = classify(Some(&ours), &domains, SERVER, now + time::Duration::days(91));
        assert!(matches!(expired, SecretContents::Broken(Some(_))));
        let garbage = secret("nope", "nope", &[]);
        let SecretContents::Broken(Some(pair)) = class(Some(&garbage)) else {
            panic!("garbage is broken")
        };
        assert_eq!(pair.chain_pem, "nope");
        assert!(!class(Some(&garbage)).holds(&held));
    }

    #[test]
    fn fill_secret_writes_the_pair_and_clears_temporary() {
        let domains = vec!["a.example".to_owned()];
        let key = rcgen::KeyPair::generate().unwrap();
        let chain = rcgen::CertificateParams::new(domains.clone())
            .unwrap()
            .self_signed(&key)
            .unwrap()
            .pem();
        let held = Held {
            info: CertInfo::from_pem_chain(&chain).unwrap(),
            chain_pem: chain,
            key_pem: key.serialize_pem(),
        };
        let mut s = secret("old", "old", &[(annotations::TEMPORARY, "true")]);
        let renew_at = OffsetDateTime::now_utc();
        fill_secret(
            &mut s,
            &held,
            &WriteMeta {
                issuer_url: SERVER,
                renew_at,
            },
        );
        let now = OffsetDateTime::now_utc();
        assert!(classify(Some(&s), &domains, SERVER, now).holds(&held));
        let a = s.annotations();
        assert!(!a.contains_key(annotations::TEMPORARY));
        assert_eq!(a[annotations::ISSUER_URL], SERVER);
        assert_eq!(a[annotations::RENEW_AT], rfc3339(renew_at));
        assert_eq!(a[annotations::DOMAINS_ON_SECRET], "a.example");
    }
}
