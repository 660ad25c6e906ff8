//! Which namespaces sidecert may act in at all, whatever a review or the caches say:
//! never `kube-system`, `kube-public`, `kube-node-lease` or its own namespace. Whether a
//! namespace opted in (its label) is asked of the API server ([`crate::kube::namespaces`]).

use sidecert_contract::NEVER_MUTATED_NAMESPACES;

/// False for the namespaces sidecert never mutates: the system namespaces, its own
/// (`own`, empty when unknown), and a review without a namespace.
pub fn may_serve(namespace: &str, own: &str) -> bool {
    is_dns_label(namespace) && namespace != own && !NEVER_MUTATED_NAMESPACES.contains(&namespace)
}

/// A namespace name as Kubernetes allows it (an RFC 1123 label): a review that names
/// anything else is forged, and its namespace must not reach a field selector or a URL.
pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The warning of a review for a namespace sidecert does not serve.
pub fn not_served_warning(namespace: &str) -> String {
    format!(
        "sidecert: namespace {namespace:?} is not one sidecert serves (it must carry the opt-in \
         label and not be kube-system, kube-public, kube-node-lease or sidecert's own); nothing changed"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_own_and_empty_namespaces_are_never_served() {
        for ns in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "sidecert-system",
            "",
            "shop,status.phase!=x",
            "shop/../kube-system",
            "Shop",
            "-shop",
        ] {
            assert!(!may_serve(ns, "sidecert-system"), "{ns:?}");
        }
        assert!(may_serve("shop", "sidecert-system"));
        assert!(may_serve("shop", ""));
    }
}
