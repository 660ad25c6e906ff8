//! Bundle trust checks: the `caBundle`s of the MutatingWebhookConfiguration, whether the
//! served certificate chains to each, and the server-side apply body that sets them.

use k8s_openapi::{ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration};
use serde_json::json;
use time::OffsetDateTime;
use x509_parser::time::ASN1Time;

use crate::{
    mutate::outcome::to_json,
    tls::ca::{parse_cert, pem_certificates},
};

/// The raw `caBundle` of every webhook in the configuration (empty when unset).
pub fn webhook_bundles(cfg: &MutatingWebhookConfiguration) -> Vec<Vec<u8>> {
    cfg.webhooks
        .iter()
        .flatten()
        .map(|w| {
            w.client_config
                .ca_bundle
                .as_ref()
                .map(|b| b.0.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// Whether `leaf` chains to a CA in each of `bundles` (at least one bundle): a CA whose
/// subject is the leaf's issuer, that is valid at `now` and whose key verifies the leaf's
/// signature.
pub fn trusted_by_all(leaf_der: &[u8], bundles: &[Vec<u8>], now: OffsetDateTime) -> bool {
    let Ok(leaf) = parse_cert(leaf_der) else {
        return false;
    };
    let at = ASN1Time::from(now);
    !bundles.is_empty()
        && bundles.iter().all(|bundle| {
            pem_certificates(bundle).iter().any(|der| {
                parse_cert(der).is_ok_and(|ca| {
                    leaf.issuer() == ca.subject()
                        && ca.validity().is_valid_at(at)
                        && leaf.verify_signature(Some(ca.public_key())).is_ok()
                })
            })
        })
}

/// Whether the CA `der` is in each of `bundles` (at least one).
pub fn in_all_bundles(der: &[u8], bundles: &[Vec<u8>]) -> bool {
    !bundles.is_empty()
        && bundles
            .iter()
            .all(|b| pem_certificates(b).iter().any(|c| c.as_slice() == der))
}

/// The server-side apply body that sets `bundle` on every webhook of `cfg` (only `name` and
/// `clientConfig.caBundle`, only for webhooks that exist); `None` when all already have it.
pub fn ca_bundle_apply(cfg: &MutatingWebhookConfiguration, bundle: &str) -> Option<serde_json::Value> {
    let hooks = cfg.webhooks.as_deref().unwrap_or_default();
    let current = webhook_bundles(cfg);
    if hooks.is_empty() || current.iter().all(|b| b.as_slice() == bundle.as_bytes()) {
        return None;
    }
    let encoded = to_json(&ByteString(bundle.as_bytes().to_vec()));
    let webhooks: Vec<_> = hooks
        .iter()
        .map(|w| json!({"name": w.name, "clientConfig": {"caBundle": encoded}}))
        .collect();
    Some(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": cfg.metadata.name},
        "webhooks": webhooks,
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::{
        api::admissionregistration::v1::{MutatingWebhook, WebhookClientConfig},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;
    use crate::tls::{
        ca::{Ca, issue_serving},
        rotation::later,
        settings::{dns_names, subject_alt_names},
    };

    fn config(bundles: &[Option<&str>]) -> MutatingWebhookConfiguration {
        MutatingWebhookConfiguration {
            metadata: ObjectMeta {
                name: Some("sidecert".into()),
                ..ObjectMeta::default()
            },
            webhooks: Some(
                bundles
                    .iter()
                    .enumerate()
                    .map(|(i, b)| MutatingWebhook {
                        name: format!("h{i}.sidecert.io"),
                        client_config: WebhookClientConfig {
                            ca_bundle: b.map(|b| ByteString(b.as_bytes().to_vec())),
                            url: Some("https://10.0.0.1/mutate".into()),
                            service: None,
                        },
                        ..MutatingWebhook::default()
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn issued_certificates_chain_to_their_ca_only() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate("ns", now, Duration::from_secs(3600)).unwrap();
        let other = Ca::generate("ns", now, Duration::from_secs(3600)).unwrap();
        let sans = subject_alt_names(&dns_names("svc", "ns", &[]), &["10.0.0.1".parse().unwrap()]).unwrap();
        let served = issue_serving(&ca, &sans, now, Duration::from_secs(40)).unwrap();
        assert_eq!(served.not_after, later(now, Duration::from_secs(40)));
        assert_eq!(served.ca_der, ca.der);
        // Never past the CA's expiry.
        let capped = issue_serving(&ca, &sans, now, Duration::from_secs(7200)).unwrap();
        assert_eq!(capped.not_after, ca.not_after);

        let leaf = parse_cert(&served.leaf_der).unwrap();
        let names: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(names.contains(&"DNSName(svc.ns.svc)".to_owned()), "{names:?}");
        assert!(names.contains(&"IPAddress(0a:00:00:01)".to_owned()), "{names:?}");

        let both = format!("{}{}", other.cert_pem, ca.cert_pem);
        assert!(trusted_by_all(
            &served.leaf_der,
            &[both.clone().into_bytes()],
            now
        ));
        assert!(!trusted_by_all(
            &served.leaf_der,
            &[other.cert_pem.clone().into_bytes()],
            now
        ));
        assert!(!trusted_by_all(
            &served.leaf_der,
            &[both.clone().into_bytes(), Vec::new()],
            now
        ));
        assert!(!trusted_by_all(&served.leaf_der, &[], now));
        // The CA must still be valid.
        assert!(!trusted_by_all(
            &served.leaf_der,
            &[both.into_bytes()],
            now + time::Duration::hours(2)
        ));
        assert!(in_all_bundles(&ca.der, &[ca.cert_pem.clone().into_bytes()]));
        assert!(!in_all_bundles(&ca.der, &[other.cert_pem.clone().into_bytes()]));
    }

    #[test]
    fn apply_body_names_each_webhook_with_only_its_bundle() {
        let cfg = config(&[None, Some("old")]);
        let body = ca_bundle_apply(&cfg, "PEM").unwrap();
        assert_eq!(body["kind"], "MutatingWebhookConfiguration");
        assert_eq!(body["metadata"]["name"], "sidecert");
        let hooks = body["webhooks"].as_array().unwrap();
        assert_eq!(hooks.len(), 2);
        assert_eq!(
            hooks[0],
            json!({"name": "h0.sidecert.io", "clientConfig": {"caBundle": "UEVN"}})
        );
        assert_eq!(hooks[1]["name"], "h1.sidecert.io");
        // Already current everywhere, or no webhooks: nothing to apply.
        assert!(ca_bundle_apply(&config(&[Some("PEM"), Some("PEM")]), "PEM").is_none());
        assert!(ca_bundle_apply(&config(&[]), "PEM").is_none());
    }
}
