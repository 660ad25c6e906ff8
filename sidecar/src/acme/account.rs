//! The ACME account: created (with external account binding where the CA requires it) or
//! restored from stored credentials.

use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};

use crate::{
    acme::client::{AcmeHttp, nonce_retry},
    error::{Error, Result},
};

const EXTERNAL_ACCOUNT_REQUIRED: &str = "urn:ietf:params:acme:error:externalAccountRequired";

/// External account binding credentials.
#[derive(Clone)]
pub struct Eab {
    pub key_id: String,
    /// The HMAC key as given by the CA: base64url (padding optional).
    pub hmac_key: String,
}

impl Eab {
    fn key(&self) -> Result<ExternalAccountKey> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.hmac_key.trim().trim_end_matches('='))
            .map_err(|e| Error::config_from("EAB HMAC key is not base64url", e))?;
        Ok(ExternalAccountKey::new(self.key_id.clone(), &raw))
    }
}

/// Creates a new ACME account.
pub async fn create_account(
    http: &AcmeHttp,
    directory: &str,
    email: Option<&str>,
    eab: Option<&Eab>,
) -> Result<(Account, AccountCredentials)> {
    let contact = email.map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let eab = eab.map(Eab::key).transpose()?;
    let new = NewAccount {
        contact: &contacts,
        terms_of_service_agreed: true,
        only_return_existing: false,
    };
    let r = nonce_retry!(
        Account::builder_with_http(Box::new(http.clone()))
            .create(&new, directory.to_owned(), eab.as_ref())
            .await
    );
    match r {
        Err(instant_acme::Error::Api(p)) if p.r#type.as_deref() == Some(EXTERNAL_ACCOUNT_REQUIRED) => {
            Err(Error::config_from(
                "the ACME server requires External Account Binding; give its key id and HMAC key \
                 (`issue --eab-key-id --eab-hmac-key`, or for `run` a Secret with keyId and \
                 hmacKey named by SIDECERT_EAB_SECRET, the chart's acme.eabSecret)",
                p,
            ))
        }
        r => Ok(r?),
    }
}

/// Restores an account from stored credentials (fetches the directory).
pub async fn restore_account(http: &AcmeHttp, credentials: AccountCredentials) -> Result<Account> {
    Ok(Account::builder_with_http(Box::new(http.clone()))
        .from_credentials(credentials)
        .await?)
}
