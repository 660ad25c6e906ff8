//! The manager loop of `serve --self-signed`: follows the CA Secret and the
//! MutatingWebhookConfiguration (watches plus a timer), takes the CA steps the rotation
//! rules call for, publishes the `caBundle`, re-issues the serving certificate and sets
//! readiness. See [`crate::tls`] for the whole design.

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, stream};
use k8s_openapi::api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use rcgen::SanType;
use sidecert_runtime::Backoff;
use time::OffsetDateTime;

use crate::{
    error::{Error, Result},
    metrics::Metrics,
    readiness::Readiness,
    tls::{
        bundle::{ca_bundle_apply, in_all_bundles, trusted_by_all, webhook_bundles},
        ca::{Ca, CaSet, FIELD_MANAGER, Served, issue_serving},
        resolver::MemoryResolver,
        rotation::{
            CONFIG_RECHECK, CaStep, RECHECK, Rollover, ca_step, earlier, later, next_wake, serving_due,
            sign_with_next,
        },
        settings::{Settings, subject_alt_names},
    },
};

/// The wait after failed passes: 2 s, 4 s, ... up to [`RECHECK`].
pub const RETRY: Backoff = Backoff::new(Duration::from_secs(2), RECHECK);

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::tls("certificate task", e))?
}

/// Keeps the serving certificate, the CA Secret and the `caBundle` in line.
pub struct SelfSigned {
    settings: Settings,
    sans: Vec<SanType>,
    secrets: Api<Secret>,
    hooks: Api<MutatingWebhookConfiguration>,
    resolver: Arc<MemoryResolver>,
    metrics: Metrics,
    readiness: Readiness,
    cas: CaSet,
    served: Served,
    /// The next CA and when this replica first saw it in every webhook's live `caBundle`.
    next_seen: Option<(Vec<u8>, OffsetDateTime)>,
    waiting_for_config: bool,
}

impl SelfSigned {
    /// Loads or creates the CA and issues the first serving certificate. Serve with the
    /// returned resolver, then [`SelfSigned::run`].
    pub async fn start(
        client: Client,
        settings: Settings,
        metrics: Metrics,
        readiness: Readiness,
    ) -> Result<(Self, Arc<MemoryResolver>)> {
        let sans = subject_alt_names(&settings.dns_names, &settings.ip_sans)?;
        let secrets = Api::<Secret>::namespaced(client.clone(), &settings.namespace);
        let hooks = Api::<MutatingWebhookConfiguration>::all(client);
        let (_, cas) = load_or_create(&secrets, &settings).await?;
        let served = {
            let (ca, sans, validity) = (cas.current.clone(), sans.clone(), settings.serving_validity);
            blocking(move || issue_serving(&ca, &sans, OffsetDateTime::now_utc(), validity)).await?
        };
        metrics.rotations.with_label_values(&["serving"]).inc();
        let resolver = Arc::new(MemoryResolver::new(served.key.clone()));
        readiness.set_certificate(false);
        let this = Self {
            settings,
            sans,
            secrets,
            hooks,
            resolver: resolver.clone(),
            metrics,
            readiness,
            cas,
            served,
            next_seen: None,
            waiting_for_config: false,
        };
        this.record();
        tracing::info!(
            namespace = %this.settings.namespace,
            secret = %this.settings.ca_secret_name,
            names = ?this.settings.dns_names,
            not_after = %this.served.not_after,
            "serving certificate issued from the webhook's CA"
        );
        Ok((this, resolver))
    }

    fn record(&self) {
        self.metrics
            .ca_not_after
            .set(self.cas.current.not_after.unix_timestamp() as f64);
        self.metrics
            .serving_cert_not_after
            .set(self.served.not_after.unix_timestamp() as f64);
    }

    /// Follows the CA Secret and the configuration (watches, plus a timer) until the process
    /// ends.
    pub async fn run(mut self) {
        let fields = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
        let secret_events = watcher(self.secrets.clone(), fields(&self.settings.ca_secret_name))
            .default_backoff()
            .map(|_| ())
            .boxed();
        let hook_events = watcher(
            self.hooks.clone(),
            fields(&self.settings.webhook_configuration_name),
        )
        .default_backoff()
        .map(|_| ())
        .boxed();
        let mut events = stream::select(secret_events, hook_events);
        let mut failures: u32 = 0;
        loop {
            let wait = match self.reconcile(OffsetDateTime::now_utc()).await {
                Ok(wait) => {
                    failures = 0;
                    wait
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let wait = RETRY.delay(failures);
                    tracing::warn!(error = %e, retry_in = ?wait, "serving certificate management");
                    wait
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                Some(()) = events.next() => {
                    // Let a burst of events (a watch's initial list) settle.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// One pass: CA step, `caBundle`, serving certificate, readiness. Returns how long to
    /// sleep before the next pass.
    pub async fn reconcile(&mut self, now: OffsetDateTime) -> Result<Duration> {
        // 1. The CA Secret (on failure, keep the CA we know and carry on with it).
        let mut first_error = None;
        match self.ca_pass(now).await {
            Ok(()) => {}
            Err(e) => first_error = Some(e),
        }
        // 2. The live configuration and its caBundle.
        let mut config_missing = false;
        let live = match self.publish().await {
            Ok(Some(cfg)) => Some(cfg),
            Ok(None) => {
                config_missing = true;
                None
            }
            Err(e) => {
                first_error.get_or_insert(e);
                None
            }
        };
        let bundles = live.as_ref().map(webhook_bundles);
        match (&self.cas.next, &bundles) {
            (Some(next), Some(b)) if in_all_bundles(&next.der, b) => {
                if self.next_seen.as_ref().is_none_or(|(der, _)| *der != next.der) {
                    tracing::info!("the next CA is in the live caBundle");
                    self.next_seen = Some((next.der.clone(), now));
                }
            }
            // Unknown (API error): keep what we saw.
            (Some(_), None) if !config_missing => {}
            _ => self.next_seen = None,
        }
        // 3. The serving certificate.
        let next_since = self.next_seen.as_ref().map(|(_, t)| *t);
        let signing = match &self.cas.next {
            Some(next) if sign_with_next(next_since, now, self.settings.rollover_delay) => next,
            _ => &self.cas.current,
        };
        if self.served.ca_der != signing.der
            || serving_due(
                self.served.not_after,
                signing.not_after,
                self.settings.serving_rotate_before,
                now,
            )
        {
            let (ca, sans, validity) = (signing.clone(), self.sans.clone(), self.settings.serving_validity);
            let new_ca = self.served.ca_der != signing.der;
            let served = blocking(move || issue_serving(&ca, &sans, now, validity)).await?;
            self.resolver.store(served.key.clone());
            self.served = served;
            self.metrics.rotations.with_label_values(&["serving"]).inc();
            tracing::info!(not_after = %self.served.not_after, new_ca, "new serving certificate");
        }
        self.record();
        // 4. Readiness: the served certificate chains to the live caBundle.
        if let Some(b) = &bundles {
            let trusted = trusted_by_all(&self.served.leaf_der, b, now);
            if trusted != self.readiness.certificate() {
                tracing::info!(trusted, "serving certificate trusted by the live caBundle");
            }
            self.readiness.set_certificate(trusted);
            self.waiting_for_config = false;
        } else if config_missing {
            if !self.waiting_for_config {
                // At install the chart creates it in the same release: its watch tells us.
                tracing::info!(
                    configuration = %self.settings.webhook_configuration_name,
                    "waiting for the MutatingWebhookConfiguration"
                );
                self.waiting_for_config = true;
            }
            self.readiness.set_certificate(false);
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // 5. The next deadline.
        let s = &self.settings;
        let mut deadlines = vec![
            earlier(self.served.not_after, s.serving_rotate_before),
            earlier(self.cas.current.not_after, s.ca_rotate_before),
        ];
        if let Some(t) = next_since {
            deadlines.push(later(t, s.rollover_delay));
        }
        if let Some(t) = self.cas.rollover_started {
            deadlines.push(later(t, s.rollover_delay.saturating_mul(2)));
        }
        let max = if config_missing { CONFIG_RECHECK } else { RECHECK };
        Ok(next_wake(now, deadlines, max))
    }

    /// Reads the CA Secret and takes the CA step it calls for.
    async fn ca_pass(&mut self, now: OffsetDateTime) -> Result<()> {
        let (mut secret, mut cas) = load_or_create(&self.secrets, &self.settings).await?;
        for _ in 0..3 {
            let rollover = cas.next.as_ref().map(|next| Rollover {
                started: cas.rollover_started,
                serving_next: self.served.ca_der == next.der,
            });
            let step = ca_step(
                cas.current.not_after,
                rollover,
                now,
                self.settings.ca_rotate_before,
                self.settings.rollover_delay,
            );
            let wanted = match step {
                CaStep::Keep => break,
                CaStep::StartRollover => {
                    let (ns, validity) = (self.settings.namespace.clone(), self.settings.ca_validity);
                    let next = blocking(move || Ca::generate(&ns, now, validity)).await?;
                    CaSet {
                        current: cas.current.clone(),
                        next: Some(next),
                        rollover_started: Some(now),
                    }
                }
                CaStep::Replace => {
                    tracing::warn!(not_after = %cas.current.not_after, "the CA has expired; replacing it");
                    let (ns, validity) = (self.settings.namespace.clone(), self.settings.ca_validity);
                    CaSet {
                        current: blocking(move || Ca::generate(&ns, now, validity)).await?,
                        next: None,
                        rollover_started: None,
                    }
                }
                CaStep::Promote => match cas.next.clone() {
                    Some(next) => CaSet {
                        current: next,
                        next: None,
                        rollover_started: None,
                    },
                    None => break,
                },
            };
            wanted.write_into(&mut secret);
            let kind = match step {
                CaStep::StartRollover => "ca_rollover",
                CaStep::Replace => "ca_replace",
                _ => "ca_promote",
            };
            // `replace` carries the resourceVersion we read: a conflict means another replica
            // moved first; read again and decide again.
            match self
                .secrets
                .replace(&self.settings.ca_secret_name, &PostParams::default(), &secret)
                .await
            {
                Ok(written) => {
                    tracing::info!(step = kind, "CA Secret updated");
                    self.metrics.rotations.with_label_values(&[kind]).inc();
                    cas = CaSet::from_secret(&written)?;
                    secret = written;
                }
                Err(e) if is_status(&e, 409) => {
                    tracing::debug!("CA Secret changed meanwhile; reading it again");
                    (secret, cas) = load_or_create(&self.secrets, &self.settings).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if cas.current.der != self.cas.current.der {
            tracing::info!(not_after = %cas.current.not_after, "current CA changed");
        }
        self.cas = cas;
        Ok(())
    }

    /// Sets the `caBundle` of every webhook in the configuration when it differs; returns the
    /// live configuration (`None` when it does not exist).
    async fn publish(&self) -> Result<Option<MutatingWebhookConfiguration>> {
        let name = &self.settings.webhook_configuration_name;
        let Some(cfg) = self.hooks.get_opt(name).await? else {
            return Ok(None);
        };
        let Some(body) = ca_bundle_apply(&cfg, &self.cas.bundle()) else {
            return Ok(Some(cfg));
        };
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let cfg = self.hooks.patch(name, &params, &Patch::Apply(&body)).await?;
        tracing::info!(
            configuration = %name,
            cas = if self.cas.next.is_some() { 2 } else { 1 },
            "caBundle published"
        );
        Ok(Some(cfg))
    }
}

/// Reads the CA Secret or creates it. Two replicas racing: the create of one fails with 409
/// and it reads the other's. A Secret without a usable CA gets a new one.
pub async fn load_or_create(secrets: &Api<Secret>, settings: &Settings) -> Result<(Secret, CaSet)> {
    let name = &settings.ca_secret_name;
    let mut last_error = None;
    for _ in 0..5 {
        let existing = secrets.get_opt(name).await?;
        let fresh = || {
            let (ns, validity) = (settings.namespace.clone(), settings.ca_validity);
            blocking(move || {
                Ok(CaSet {
                    current: Ca::generate(&ns, OffsetDateTime::now_utc(), validity)?,
                    next: None,
                    rollover_started: None,
                })
            })
        };
        match existing {
            Some(secret) => match CaSet::from_secret(&secret) {
                Ok(cas) => return Ok((secret, cas)),
                Err(e) => {
                    tracing::warn!(error = %e, secret = %name, "the CA Secret holds no usable CA; writing a new one");
                    let cas = fresh().await?;
                    let mut secret = secret;
                    cas.write_into(&mut secret);
                    match secrets.replace(name, &PostParams::default(), &secret).await {
                        Ok(written) => return Ok((written, cas)),
                        Err(e) if is_status(&e, 409) => last_error = Some(e),
                        Err(e) => return Err(e.into()),
                    }
                }
            },
            None => {
                let cas = fresh().await?;
                let secret = cas.to_new_secret(name, &settings.namespace);
                match secrets.create(&PostParams::default(), &secret).await {
                    Ok(written) => {
                        tracing::info!(secret = %name, not_after = %cas.current.not_after, "created the webhook's CA");
                        return Ok((written, cas));
                    }
                    // Another replica created it first: use that one.
                    Err(e) if is_status(&e, 409) => last_error = Some(e),
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Err(match last_error {
        Some(e) => e.into(),
        None => Error::Config(format!("CA Secret {name}: gave up after repeated conflicts")),
    })
}
