//! The resolved settings of `serve --self-signed`: the namespace, the names the serving
//! certificate covers, and the validity periods, checked so that rotation has room.

use std::{net::IpAddr, time::Duration};

use rcgen::SanType;

use crate::{
    config::SelfSignedArgs,
    error::{Error, Result},
};

/// Where in-cluster processes find their namespace.
pub const SERVICE_ACCOUNT_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// The resolved settings of `--self-signed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub namespace: String,
    pub ca_secret_name: String,
    pub webhook_configuration_name: String,
    pub dns_names: Vec<String>,
    pub ip_sans: Vec<IpAddr>,
    pub ca_validity: Duration,
    pub ca_rotate_before: Duration,
    pub serving_validity: Duration,
    pub serving_rotate_before: Duration,
    pub rollover_delay: Duration,
}

impl Settings {
    /// Resolves the namespace (flag, service-account file, `POD_NAMESPACE`) and checks the
    /// periods.
    pub fn from_args(args: &SelfSignedArgs) -> Result<Self> {
        let namespace = match args.namespace.as_deref().map(str::trim) {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => own_namespace(
                std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE_FILE).ok(),
                std::env::var("POD_NAMESPACE").ok(),
            )?,
        };
        check_periods(args).map_err(Error::Config)?;
        for (flag, value) in [
            ("--service-name", &args.service_name),
            ("--ca-secret-name", &args.ca_secret_name),
            ("--webhook-configuration-name", &args.webhook_configuration_name),
        ] {
            if value.trim().is_empty() {
                return Err(Error::Config(format!("{flag} is empty")));
            }
        }
        let names = dns_names(&args.service_name, &namespace, &args.extra_dns_names);
        // A bad name is a configuration error: fail now, not on every retry.
        subject_alt_names(&names, &args.extra_ip_sans)?;
        Ok(Self {
            dns_names: names,
            namespace,
            ca_secret_name: args.ca_secret_name.clone(),
            webhook_configuration_name: args.webhook_configuration_name.clone(),
            ip_sans: args.extra_ip_sans.clone(),
            ca_validity: args.ca_validity,
            ca_rotate_before: args.ca_rotate_before,
            serving_validity: args.serving_validity,
            serving_rotate_before: args.serving_rotate_before,
            rollover_delay: args.ca_rollover_delay,
        })
    }
}

/// The namespace when `--namespace` is not given: the service-account file, then
/// `POD_NAMESPACE`.
pub fn own_namespace(file: Option<String>, env: Option<String>) -> Result<String> {
    [file, env]
        .into_iter()
        .flatten()
        .map(|s| s.trim().to_owned())
        .find(|s| !s.is_empty())
        .ok_or_else(|| {
            Error::Config(format!(
                "--self-signed needs a namespace: give --namespace, or run in a Pod \
                 ({SERVICE_ACCOUNT_NAMESPACE_FILE}) or set POD_NAMESPACE"
            ))
        })
}

/// The validity periods must leave room to rotate.
pub fn check_periods(args: &SelfSignedArgs) -> Result<(), String> {
    if args.serving_validity.is_zero() || args.ca_validity.is_zero() {
        return Err("validity periods must be longer than zero".to_owned());
    }
    if args.serving_rotate_before >= args.serving_validity {
        return Err(format!(
            "--serving-rotate-before ({:?}) must be shorter than --serving-validity ({:?})",
            args.serving_rotate_before, args.serving_validity
        ));
    }
    if args.ca_rotate_before >= args.ca_validity {
        return Err(format!(
            "--ca-rotate-before ({:?}) must be shorter than --ca-validity ({:?})",
            args.ca_rotate_before, args.ca_validity
        ));
    }
    if args.ca_rotate_before <= args.ca_rollover_delay.saturating_mul(2) {
        return Err(format!(
            "--ca-rotate-before ({:?}) must be longer than twice --ca-rollover-delay ({:?}): \
             the rollover must finish before the CA expires",
            args.ca_rotate_before, args.ca_rollover_delay
        ));
    }
    Ok(())
}

/// The Service's DNS names, then the extra ones, without duplicates or blanks.
pub fn dns_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let service = service.trim();
    let own = [
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ];
    let mut names: Vec<String> = Vec::new();
    for name in own.into_iter().chain(extra.iter().map(|s| s.trim().to_owned())) {
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// Subject alternative names: the DNS names, then the IP addresses.
pub fn subject_alt_names(dns: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>> {
    let mut sans = Vec::with_capacity(dns.len() + ips.len());
    for name in dns {
        let ia5 = name
            .as_str()
            .try_into()
            .map_err(|_| Error::Config(format!("{name:?} is not a valid DNS name")))?;
        sans.push(SanType::DnsName(ia5));
    }
    sans.extend(ips.iter().copied().map(SanType::IpAddress));
    Ok(sans)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn args() -> SelfSignedArgs {
        SelfSignedArgs {
            enabled: true,
            namespace: Some("sidecert-system".into()),
            ..SelfSignedArgs::default()
        }
    }

    #[test]
    fn dns_names_cover_the_service_then_extras() {
        let names = dns_names(
            "sidecert-webhook",
            "sidecert-system",
            &["hook.example".into(), " ".into(), "sidecert-webhook".into()],
        );
        assert_eq!(
            names,
            [
                "sidecert-webhook",
                "sidecert-webhook.sidecert-system",
                "sidecert-webhook.sidecert-system.svc",
                "sidecert-webhook.sidecert-system.svc.cluster.local",
                "hook.example",
            ]
        );
    }

    #[test]
    fn sans_have_dns_names_and_ips() {
        let ip: IpAddr = "10.213.0.1".parse().unwrap();
        let sans = subject_alt_names(&["a.b".into()], &[ip]).unwrap();
        assert_eq!(sans.len(), 2);
        assert!(matches!(&sans[0], SanType::DnsName(n) if n.as_str() == "a.b"));
        assert_eq!(sans[1], SanType::IpAddress(ip));
        assert!(subject_alt_names(&["bad name\u{e9}".into()], &[]).is_err());
    }

    #[test]
    fn settings_resolve_namespace_and_check_periods() {
        let s = Settings::from_args(&args()).unwrap();
        assert_eq!(s.namespace, "sidecert-system");
        assert_eq!(s.dns_names[2], "sidecert-webhook.sidecert-system.svc");
        assert_eq!(own_namespace(None, Some("ns-env".into())).unwrap(), "ns-env");
        assert_eq!(
            own_namespace(Some("ns-file\n".into()), Some("x".into())).unwrap(),
            "ns-file"
        );
        assert!(own_namespace(Some(" ".into()), None).is_err());

        let mut a = args();
        a.serving_rotate_before = a.serving_validity;
        assert!(check_periods(&a).unwrap_err().contains("--serving-rotate-before"));
        let mut a = args();
        a.ca_rotate_before = Duration::from_secs(50);
        a.ca_rollover_delay = Duration::from_secs(30);
        assert!(check_periods(&a).unwrap_err().contains("twice"));
        let mut a = args();
        a.ca_validity = a.ca_rotate_before;
        assert!(check_periods(&a).is_err());
    }
}
