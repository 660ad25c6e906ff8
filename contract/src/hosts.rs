//! One owner per host: the claim object that says which namespace owns a host, and the
//! domains a namespace may claim (`sidecert.io/allowed-domains` on the Namespace, within the
//! chart's `allowedDomains`).
//!
//! A claim is a Lease in sidecert's own namespace named [`claim_name`] of the host, holder
//! the owning namespace. The webhook creates it only if absent, so the API server decides
//! who was first; tenants cannot write in sidecert's namespace, so a claim is sidecert's.

use std::fmt;

use crate::{ContractError, validate_domain};

/// Prefix of a host claim's name.
pub const CLAIM_PREFIX: &str = "sidecert-host-";

/// Label on every host claim (value [`CLAIM_LABEL_VALUE`]), so they are listed apart from
/// the leader Lease.
pub const CLAIM_LABEL: &str = crate::key!("claim");
pub const CLAIM_LABEL_VALUE: &str = "host";

/// Label on a claim: the namespace holding it (to count a namespace's claims).
pub const CLAIM_HOLDER_LABEL: &str = crate::key!("claim-holder");

/// Label on a claim the reconciler's leader has seen in use by a stored object (value
/// `"true"`). A claim without it was made by a review whose object may never have been
/// stored, and is released sooner.
pub const CLAIM_CONFIRMED_LABEL: &str = crate::key!("claim-confirmed");

/// Annotation on a claim: the host it claims.
pub const CLAIM_HOST_ANNOTATION: &str = crate::key!("host");

/// Annotation on a claim: the uid of the namespace holding it, so that a namespace deleted
/// and created again under the same name (perhaps by another tenant) does not inherit it.
pub const CLAIM_NAMESPACE_UID_ANNOTATION: &str = crate::key!("namespace-uid");

/// Namespace annotation narrowing the domains its objects may claim.
pub const ALLOWED_DOMAINS: &str = crate::key!("allowed-domains");

/// The longest host that has a claim: its name is `sidecert-host-<host>`, at most 253.
pub const MAX_CLAIMABLE_HOST: usize = 253 - CLAIM_PREFIX.len();

/// The claim's name for a host, as [`normalise_host`] makes it: `None` when the host is
/// longer than [`MAX_CLAIMABLE_HOST`] (no name is ever cut or hashed, so two hosts never
/// share a claim).
pub fn claim_name(host: &str) -> Option<String> {
    (host.len() <= MAX_CLAIMABLE_HOST).then(|| format!("{CLAIM_PREFIX}{host}"))
}

/// A host as claims compare it: lower case, without a trailing dot, and a valid HTTP-01 DNS
/// name (so ASCII: an internationalised name must be given in its `xn--` form).
pub fn normalise_host(host: &str) -> Result<String, ContractError> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    validate_domain(&host)?;
    Ok(host)
}

/// One entry of an allowed-domains list: a name, or `*.` and a name (one more label).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    OneLabelUnder(String),
}

/// A list of allowed domains: `shop.example.com,*.shop.example.com`. `*.x` matches exactly
/// one label under `x` (as a wildcard certificate does), not `x` itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedDomains(Vec<Pattern>);

impl AllowedDomains {
    /// Parses a comma-separated list; every entry must be valid (an annotation that narrows
    /// must not widen by a typo). An empty list allows nothing.
    pub fn parse(value: &str) -> Result<Self, ContractError> {
        let mut patterns = Vec::new();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (wild, name) = match entry.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, entry),
            };
            let name = normalise_host(name).map_err(|e| ContractError::Invalid {
                name: "allowed domain",
                reason: format!("{entry:?}: {e}"),
            })?;
            patterns.push(if wild {
                Pattern::OneLabelUnder(name)
            } else {
                Pattern::Exact(name)
            });
        }
        Ok(Self(patterns))
    }

    /// Whether `host` (normalised) is allowed.
    pub fn allows(&self, host: &str) -> bool {
        self.0.iter().any(|p| match p {
            Pattern::Exact(name) => host == name,
            Pattern::OneLabelUnder(parent) => host
                .strip_suffix(parent.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for AllowedDomains {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match p {
                Pattern::Exact(n) => f.write_str(n)?,
                Pattern::OneLabelUnder(n) => write!(f, "*.{n}")?,
            }
        }
        Ok(())
    }
}

/// Which domains a namespace may claim: the chart's list (`None`: any) narrowed by the
/// Namespace's annotation (`None`: no annotation).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainPolicy {
    pub cluster: Option<AllowedDomains>,
    /// The annotation as parsed; `Err` (an invalid annotation) allows nothing.
    pub namespace: Option<Result<AllowedDomains, String>>,
}

impl DomainPolicy {
    /// Whether a namespace under this policy may claim `host` (normalised).
    pub fn allows(&self, host: &str) -> bool {
        let cluster = self.cluster.as_ref().is_none_or(|c| c.allows(host));
        let namespace = match &self.namespace {
            None => true,
            Some(Ok(list)) => list.allows(host),
            Some(Err(_)) => false,
        };
        cluster && namespace
    }

    /// The policy with the Namespace's `sidecert.io/allowed-domains` value.
    pub fn with_namespace_annotation(mut self, value: Option<&str>) -> Self {
        self.namespace = value.map(|v| AllowedDomains::parse(v).map_err(|e| e.to_string()));
        self
    }

    /// Why `host` is refused, for a warning (call when [`Self::allows`] is false).
    pub fn refusal(&self, namespace: &str, host: &str) -> String {
        match &self.namespace {
            Some(Err(e)) => format!(
                "sidecert: namespace {namespace}'s {ALLOWED_DOMAINS} annotation is invalid ({e}), so it \
                 may claim no host; {host} gets no certificate, HTTP-01 path or temporary Secret"
            ),
            Some(Ok(list)) if !list.allows(host) => format!(
                "sidecert: {host} is not among the domains namespace {namespace} may claim \
                 ({ALLOWED_DOMAINS}: {list:?}); it gets no certificate, HTTP-01 path or temporary Secret",
                list = list.to_string()
            ),
            _ => format!(
                "sidecert: {host} is not among the domains this cluster lets sidecert claim (the \
                 chart's allowedDomains); it gets no certificate, HTTP-01 path or temporary Secret"
            ),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_matches_one_label_only() {
        let list = AllowedDomains::parse(" shop.example.com , *.shop.example.com,").unwrap();
        assert!(list.allows("shop.example.com"));
        assert!(list.allows("www.shop.example.com"));
        assert!(!list.allows("a.b.shop.example.com"));
        assert!(!list.allows("evilshop.example.com"));
        assert!(!list.allows("xshop.example.com"));
        assert!(!list.allows(".shop.example.com"));
        assert!(!list.allows("example.com"));
        assert_eq!(list.to_string(), "shop.example.com,*.shop.example.com");
        assert!(AllowedDomains::parse("").unwrap().is_empty());
        assert!(!AllowedDomains::parse("").unwrap().allows("shop.example.com"));
    }

    #[test]
    fn an_invalid_list_is_refused_whole_and_allows_nothing() {
        for bad in [
            "shop.example.com,*",
            "*.*.example.com",
            "shop example",
            "sh\u{f6}p.example",
            "a..b",
        ] {
            assert!(AllowedDomains::parse(bad).is_err(), "{bad:?}");
            let policy = DomainPolicy::default().with_namespace_annotation(Some(bad));
            assert!(!policy.allows("shop.example.com"), "{bad:?}");
            assert!(policy.refusal("shop", "shop.example.com").contains("invalid"));
        }
    }

    #[test]
    fn the_namespace_only_narrows_the_cluster_list() {
        let policy = DomainPolicy {
            cluster: Some(AllowedDomains::parse("*.example.com").unwrap()),
            namespace: None,
        };
        assert!(policy.allows("shop.example.com"));
        assert!(!policy.allows("shop.example.org"));
        let narrowed = policy
            .clone()
            .with_namespace_annotation(Some("shop.example.com,shop.example.org"));
        assert!(narrowed.allows("shop.example.com"));
        assert!(!narrowed.allows("blog.example.com"));
        assert!(
            !narrowed.allows("shop.example.org"),
            "the annotation cannot widen"
        );
        assert!(DomainPolicy::default().allows("anything.example"));
    }

    #[test]
    fn hosts_are_compared_normalised_and_never_share_a_claim() {
        assert_eq!(normalise_host(" Shop.Example.COM. ").unwrap(), "shop.example.com");
        assert!(normalise_host("sh\u{f6}p.example").is_err());
        assert_eq!(
            normalise_host("xn--shp-sna.example").unwrap(),
            "xn--shp-sna.example"
        );
        let long = format!("{}.example", ["a", "b", "c", "d"].map(|l| l.repeat(60)).join("."));
        assert!(normalise_host(&long).is_ok());
        assert!(long.len() > MAX_CLAIMABLE_HOST);
        assert_eq!(claim_name(&long), None);
        let fits = "d".repeat(MAX_CLAIMABLE_HOST);
        assert_eq!(claim_name(&fits).unwrap().len(), 253);
        assert_eq!(
            claim_name("shop.example.com").unwrap(),
            "sidecert-host-shop.example.com"
        );
    }
}
