//! Prometheus metrics on an explicit registry, every name prefixed `sidecert_webhook_`.

use std::time::Instant;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::error::{Error, Result};

/// The webhook's metrics.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Reviews by kind, operation and result (`mutated`, `unchanged`, `invalid`).
    pub requests: IntCounterVec,
    /// Review duration by kind and operation.
    pub duration: HistogramVec,
    /// Objects patched, by kind.
    pub injections: IntCounterVec,
    /// Reviews without a patch, by reason.
    pub skips: IntCounterVec,
    /// Admission warnings returned, by kind.
    pub warnings: IntCounterVec,
    /// Failed side effects, by effect and error.
    pub side_effect_failures: IntCounterVec,
    /// Live checks of Pods the caches did not select, by result: `selected` (the caches
    /// lagged), `not_selected`, `cache_current` (no Service list needed), `paused` (after a
    /// failure), or the error's metric label.
    pub live_lookups: IntCounterVec,
    /// `serve --self-signed`: expiry of the served certificate (Unix seconds).
    pub serving_cert_not_after: Gauge,
    /// `serve --self-signed`: expiry of the current CA (Unix seconds).
    pub ca_not_after: Gauge,
    /// `serve --self-signed`: certificate rotations, by kind (`serving`, `ca_rollover`,
    /// `ca_promote`, `ca_replace`).
    pub rotations: IntCounterVec,
    /// 1 while this replica holds the leader Lease (and runs the Ingress reconciler).
    pub leader: IntGauge,
    /// Ingress reconciliations, by result (`ok`, or the error's metric label).
    pub reconciles: IntCounterVec,
    /// Connections and requests the HTTPS server refused, by what (`connection`, `review`,
    /// `body`) and reason (`per_address`, `total`, `timeout`, `too_large`, `error`).
    pub refusals: IntCounterVec,
    /// Reconciler actions, by kind (`route_added`, `route_removed`, `solver_deleted`,
    /// `rollout_restart`, ...).
    pub reconciler_actions: IntCounterVec,
}

fn prom(e: prometheus::Error) -> Error {
    Error::config("metrics", e)
}

impl Metrics {
    pub fn new() -> Result<Self> {
        let registry = Registry::new_custom(Some("sidecert_webhook".to_owned()), None).map_err(prom)?;
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), labels).map_err(prom)?;
            registry.register(Box::new(c.clone())).map_err(prom)?;
            Ok(c)
        };
        let requests = counter(
            "requests_total",
            "Admission reviews by kind, operation and result",
            &["kind", "operation", "result"],
        )?;
        let injections = counter("injections_total", "Objects patched, by kind", &["kind"])?;
        let skips = counter("skips_total", "Reviews without a patch, by reason", &["reason"])?;
        let warnings = counter(
            "warnings_total",
            "Admission warnings returned, by kind",
            &["kind"],
        )?;
        let side_effect_failures = counter(
            "side_effect_failures_total",
            "Side effects that failed (the object was admitted with a warning)",
            &["effect", "error"],
        )?;
        let live_lookups = counter(
            "live_lookups_total",
            "Live checks against the API server of Pods the watch caches did not select, by result",
            &["result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Admission review duration").buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
            ]),
            &["kind", "operation"],
        )
        .map_err(prom)?;
        registry.register(Box::new(duration.clone())).map_err(prom)?;
        let rotations = counter(
            "certificate_rotations_total",
            "Serving certificates issued and CA rollover steps taken (serve --self-signed)",
            &["kind"],
        )?;
        let gauge = |name: &str, help: &str| -> Result<Gauge> {
            let g = Gauge::new(name, help).map_err(prom)?;
            registry.register(Box::new(g.clone())).map_err(prom)?;
            Ok(g)
        };
        let serving_cert_not_after = gauge(
            "serving_cert_not_after_seconds",
            "Expiry of the served certificate, Unix seconds (serve --self-signed)",
        )?;
        let ca_not_after = gauge(
            "ca_not_after_seconds",
            "Expiry of the webhook's current CA, Unix seconds (serve --self-signed)",
        )?;
        let leader = IntGauge::new(
            "leader",
            "1 while this replica holds the leader Lease and runs the Ingress reconciler",
        )
        .map_err(prom)?;
        registry.register(Box::new(leader.clone())).map_err(prom)?;
        let reconciles = counter(
            "reconciles_total",
            "Ingress reconciliations, by result",
            &["result"],
        )?;
        let reconciler_actions = counter(
            "reconciler_actions_total",
            "Changes the Ingress reconciler made, by kind",
            &["action"],
        )?;
        let refusals = counter(
            "refusals_total",
            "Connections and requests the HTTPS server refused or cut off, by what and reason",
            &["what", "reason"],
        )?;
        Ok(Self {
            registry,
            refusals,
            leader,
            reconciles,
            reconciler_actions,
            requests,
            duration,
            injections,
            skips,
            warnings,
            side_effect_failures,
            live_lookups,
            serving_cert_not_after,
            ca_not_after,
            rotations,
        })
    }

    /// The text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only for malformed metric families, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }

    /// A timer that records the duration on drop.
    pub fn timer(&self) -> ReviewTimer<'_> {
        ReviewTimer {
            metrics: self,
            start: Instant::now(),
            kind: "unknown",
            operation: "unknown",
            result: "invalid",
        }
    }
}

/// Records one review's count and duration when dropped.
pub struct ReviewTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
    pub kind: &'static str,
    pub operation: &'static str,
    pub result: &'static str,
}

impl Drop for ReviewTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .requests
            .with_label_values(&[self.kind, self.operation, self.result])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[self.kind, self.operation])
            .observe(self.start.elapsed().as_secs_f64());
    }
}
