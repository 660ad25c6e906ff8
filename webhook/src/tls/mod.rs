//! The serving certificate: files reloaded when they change ([`resolver`]), or with
//! `serve --self-signed` a certificate the webhook issues itself from its own CA:
//! [`settings`] (the flags resolved), [`rotation`] (the pure rules, [`rotation::ca_step`]),
//! [`ca`] (the CA and its Secret format), [`bundle`] (trust checks on the `caBundle`),
//! [`manager`] (the loop that performs the steps).
//!
//! How `--self-signed` works:
//!
//!
//! - **CA**: a P-256 CA in the Secret `--ca-secret-name` of the release namespace (keys
//!   `ca.crt`, `ca.key`; `next-ca.crt`, `next-ca.key` during a rollover). It is read at
//!   start, or created if absent; when two replicas race, the loser of the create (409)
//!   re-reads and uses the winner's CA, so there is always one CA.
//! - **Serving certificate**: issued in memory (never written to disk) for `<svc>`,
//!   `<svc>.<ns>`, `<svc>.<ns>.svc`, `<svc>.<ns>.svc.cluster.local` and the extra names and
//!   addresses, and swapped into a [`resolver::MemoryResolver`]; connections in flight keep theirs.
//! - **caBundle**: every webhook of the MutatingWebhookConfiguration gets the current CA (and
//!   the next one during a rollover) by server-side apply with the field manager
//!   [`ca::FIELD_MANAGER`], sending only `name` and `clientConfig.caBundle` of the webhooks that
//!   exist (so a webhook removed by `helm upgrade` is never recreated half-empty).
//! - **Rotation**: the serving certificate is re-issued when less than
//!   `--serving-rotate-before` is left, or when the signing CA changes. When the CA has less
//!   than `--ca-rotate-before` left, one replica writes a next CA into the Secret (update
//!   with resourceVersion; a conflict means another replica did it); every replica publishes
//!   the bundle current+next; once the next CA has stood in the live `caBundle` for
//!   `--ca-rollover-delay`, each replica serves a certificate from the next CA; after twice
//!   that delay from the start of the rollover, a replica that already serves from the next
//!   CA promotes it (next → current) and the old CA leaves the bundle. Replicas follow each
//!   other through a watch on the Secret.
//! - **Readiness**: `/readyz` is true only while the served certificate chains to a CA in the
//!   live `caBundle` of every webhook of the configuration (checked on every change of the
//!   Secret or the configuration, and every 30 s). When the API server cannot be reached, the
//!   last answer stands and the certificate in memory keeps being served and renewed.
//!
//! RBAC this needs (the chart's Role and ClusterRole):
//!
//! ```yaml
//! # Role in the release namespace
//! - apiGroups: [""]
//!   resources: [secrets]
//!   verbs: [create]                      # create can not be limited by resourceNames
//! - apiGroups: [""]
//!   resources: [secrets]
//!   resourceNames: [sidecert-webhook-ca] # --ca-secret-name
//!   verbs: [get, list, watch, update]    # list/watch use a metadata.name field selector
//! # ClusterRole
//! - apiGroups: [admissionregistration.k8s.io]
//!   resources: [mutatingwebhookconfigurations]
//!   resourceNames: [sidecert]            # --webhook-configuration-name
//!   verbs: [get, list, watch, patch]
//! ```
//!
//! The chart must not template the CA Secret (Helm would overwrite or delete it), and must
//! leave `caBundle` out of the configuration's webhooks.

pub mod bundle;
pub mod ca;
pub mod manager;
pub mod resolver;
pub mod rotation;
pub mod settings;

pub use manager::SelfSigned;
pub use resolver::{MemoryResolver, ReloadingResolver, certified_key, client_roots, server_config};
pub use settings::Settings;
