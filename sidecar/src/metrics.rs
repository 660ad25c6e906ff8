//! Metrics on an explicit registry with the `sidecert_` prefix.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the sidecar exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `sidecert_certificate_not_after_seconds{secret}`
    pub not_after: GaugeVec,
    /// `sidecert_certificate_renew_at_seconds{secret}`
    pub renew_at: GaugeVec,
    /// `sidecert_ready{secret}`: 1 when the Secret holds a valid certificate.
    pub ready: IntGaugeVec,
    /// `sidecert_leader{secret}`: 1 while this replica holds the certificate's Lease.
    pub leader: IntGaugeVec,
    /// `sidecert_acme_requests_total{endpoint,status}`
    pub acme_requests: IntCounterVec,
    /// `sidecert_acme_request_duration_seconds{endpoint}`
    pub acme_duration: HistogramVec,
    /// `sidecert_orders_total{result}` (`issued`, `failed`, `validation_failed`, `aborted`)
    pub orders: IntCounterVec,
    /// `sidecert_failures_total{secret,kind}`
    pub failures: IntCounterVec,
    /// `sidecert_http01_requests_total{result}` (`served`, `unknown`): challenge requests
    /// this replica's responder answered.
    pub http01: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("sidecert".into()), None)?;
        let gauge = |name: &str, help: &str, labels: &[&str]| -> Result<GaugeVec, prometheus::Error> {
            let g = GaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let igauge = |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let acme_duration = HistogramVec::new(
            HistogramOpts::new(
                "acme_request_duration_seconds",
                "Duration of requests to the ACME server.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["endpoint"],
        )?;
        registry.register(Box::new(acme_duration.clone()))?;
        Ok(Self {
            not_after: gauge(
                "certificate_not_after_seconds",
                "Expiry of the certificate, Unix seconds.",
                &["secret"],
            )?,
            renew_at: gauge(
                "certificate_renew_at_seconds",
                "Planned renewal moment, Unix seconds.",
                &["secret"],
            )?,
            ready: igauge(
                "ready",
                "1 when the Secret holds a valid certificate for its domains.",
                &["secret"],
            )?,
            leader: igauge(
                "leader",
                "1 while this replica holds the certificate's Lease.",
                &["secret"],
            )?,
            acme_requests: counter(
                "acme_requests_total",
                "Requests to the ACME server by endpoint and HTTP status.",
                &["endpoint", "status"],
            )?,
            orders: counter("orders_total", "ACME orders by result.", &["result"])?,
            failures: counter(
                "failures_total",
                "Failed issuance attempts and Secret writes by kind.",
                &["secret", "kind"],
            )?,
            http01: counter(
                "http01_requests_total",
                "HTTP-01 challenge requests answered by this replica.",
                &["result"],
            )?,
            acme_duration,
            registry,
        })
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Maps an ACME URL path to a bounded endpoint label: the first path segment that names a
/// resource decides (`/acme/order/{account}/{id}`, Pebble's `/my-order/{id}`), so the random
/// IDs after it, which may contain any letters, are never read.
pub fn acme_endpoint(method: &http::Method, path: &str) -> &'static str {
    if method == http::Method::HEAD {
        return "new-nonce";
    }
    // Within a segment, the more specific words first: "finalize-order", "new-order".
    const WORDS: [(&str, &str); 13] = [
        ("nonce", "new-nonce"),
        ("renewal", "renewal-info"),
        ("ari", "renewal-info"),
        ("directory", "directory"),
        ("finalize", "finalize"),
        ("authz", "authorization"),
        ("chal", "challenge"),
        ("cert", "certificate"),
        ("order", "order"),
        ("acct", "account"),
        ("account", "account"),
        ("sign-me-up", "account"),
        ("revoke", "other"),
    ];
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        let segment = segment.to_ascii_lowercase();
        if segment == "dir" {
            return "directory";
        }
        if let Some((_, label)) = WORDS.iter().find(|(word, _)| segment.contains(word)) {
            return label;
        }
    }
    "other"
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn metrics_are_prefixed() {
        let m = Metrics::new().unwrap();
        m.orders.with_label_values(&["issued"]).inc();
        m.ready.with_label_values(&["web-tls"]).set(1);
        let text = m.encode();
        assert!(
            text.contains("sidecert_orders_total{result=\"issued\"} 1"),
            "{text}"
        );
        assert!(text.contains("sidecert_ready{secret=\"web-tls\"} 1"));
    }

    #[test]
    fn endpoints_are_bounded() {
        use http::Method;
        assert_eq!(acme_endpoint(&Method::GET, "/dir"), "directory");
        assert_eq!(acme_endpoint(&Method::HEAD, "/nonce-plz"), "new-nonce");
        assert_eq!(acme_endpoint(&Method::POST, "/order-plz"), "order");
        assert_eq!(acme_endpoint(&Method::POST, "/finalize-order/x"), "finalize");
        assert_eq!(acme_endpoint(&Method::POST, "/chalZ/x"), "challenge");
        assert_eq!(acme_endpoint(&Method::POST, "/authZ/x"), "authorization");
        assert_eq!(acme_endpoint(&Method::POST, "/certZ/x"), "certificate");
        assert_eq!(acme_endpoint(&Method::POST, "/sign-me-up"), "account");
        assert_eq!(
            acme_endpoint(&Method::GET, "/draft-ietf-acme-ari-03/renewalInfo/x"),
            "renewal-info"
        );
        // Let's Encrypt's paths.
        assert_eq!(acme_endpoint(&Method::GET, "/directory"), "directory");
        assert_eq!(acme_endpoint(&Method::POST, "/acme/new-acct"), "account");
        assert_eq!(acme_endpoint(&Method::POST, "/acme/new-order"), "order");
        assert_eq!(acme_endpoint(&Method::POST, "/acme/order/123/456"), "order");
        assert_eq!(
            acme_endpoint(&Method::POST, "/acme/authz/123/789"),
            "authorization"
        );
        assert_eq!(
            acme_endpoint(&Method::POST, "/acme/chall/123/789/AbC"),
            "challenge"
        );
        assert_eq!(acme_endpoint(&Method::POST, "/acme/finalize/123/456"), "finalize");
        assert_eq!(acme_endpoint(&Method::POST, "/acme/cert/fa12"), "certificate");
        assert_eq!(
            acme_endpoint(&Method::GET, "/acme/renewal-info/aa.bb"),
            "renewal-info"
        );
        // Random IDs that spell other words do not change the label.
        assert_eq!(acme_endpoint(&Method::POST, "/my-order/xARIacctNonce"), "order");
        assert_eq!(acme_endpoint(&Method::POST, "/certZ/renewalDIR"), "certificate");
        assert_eq!(acme_endpoint(&Method::POST, "/chalZ/orderCERTari"), "challenge");
        assert_eq!(acme_endpoint(&Method::POST, "/unknown/x"), "other");
    }
}
