//! Typed views of cert-manager's `Issuer` and `Certificate` (cert-manager.io/v1), the objects
//! in `manifests/certificates.yaml` that give the webhook its serving certificate.
//!
//! They model only the fields our manifests use, and the spec structs deny unknown fields:
//! `tests/manifests.rs` deserializes every Issuer and Certificate of `manifests/` into them, so
//! a manifest that drifts (a misspelt or unmodelled field) fails the tests. Field names follow
//! cert-manager v1.21's CRDs (`deploy/crds/` of `github.com/cert-manager/cert-manager`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of cert-manager's resources.
pub const GROUP: &str = "cert-manager.io";

/// Annotation read by cert-manager's cainjector: `<namespace>/<Certificate name>` whose CA is
/// copied into a webhook configuration's `caBundle`.
pub const INJECT_CA_FROM: &str = "cert-manager.io/inject-ca-from";

/// cert-manager `Issuer` (namespaced). Exactly one of `self_signed` and `ca` is set.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "cert-manager.io",
    version = "v1",
    kind = "Issuer",
    plural = "issuers",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerSpec {
    /// `selfSigned: {}`: certificates are signed by their own private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_signed: Option<SelfSignedIssuer>,
    /// `ca: {secretName}`: certificates are signed by the CA in that Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaIssuer>,
}

/// `Issuer.spec.selfSigned`: no settings used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelfSignedIssuer {}

/// `Issuer.spec.ca`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaIssuer {
    /// Secret (in the Issuer's namespace) holding the CA's `tls.crt` and `tls.key`.
    pub secret_name: String,
}

impl IssuerSpec {
    /// A self-signed issuer.
    pub fn self_signed() -> Self {
        Self {
            self_signed: Some(SelfSignedIssuer {}),
            ca: None,
        }
    }

    /// An issuer signing with the CA stored in `secret_name`.
    pub fn ca(secret_name: impl Into<String>) -> Self {
        Self {
            self_signed: None,
            ca: Some(CaIssuer {
                secret_name: secret_name.into(),
            }),
        }
    }

    /// True when exactly one issuer type is configured, as cert-manager requires.
    pub fn is_valid(&self) -> bool {
        self.self_signed.is_some() != self.ca.is_some()
    }
}

/// cert-manager `Certificate` (namespaced): cert-manager keeps `secret_name` holding a
/// certificate for these names, signed by `issuer_ref`, and renews it before it expires.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "cert-manager.io",
    version = "v1",
    kind = "Certificate",
    plural = "certificates",
    namespaced
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificateSpec {
    /// The Secret cert-manager writes (`tls.crt`, `tls.key`, `ca.crt`).
    pub secret_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub common_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_names: Vec<String>,
    /// Marks the certificate as a CA (basic constraints), for a CA `Issuer` to use.
    #[serde(default, rename = "isCA", skip_serializing_if = "Option::is_none")]
    pub is_ca: Option<bool>,
    pub issuer_ref: IssuerRef,
    /// Go duration, e.g. `2160h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<String>,
    /// Go duration before expiry at which cert-manager renews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_before: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<CertificatePrivateKey>,
}

/// `Certificate.spec.issuerRef`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IssuerRef {
    pub name: String,
    /// `Issuer` (default) or `ClusterIssuer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `cert-manager.io` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `Certificate.spec.privateKey`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CertificatePrivateKey {
    /// `RSA`, `ECDSA` or `Ed25519`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// Bits: 2048/4096/8192 for RSA, 256/384/521 for ECDSA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// `Always` (a new key at every issuance; the default from cert-manager 1.18) or `Never`
    /// (the default before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_policy: Option<String>,
}

impl IssuerRef {
    /// Whether this reference names the namespaced `Issuer` `name` (kind and group may be
    /// left to their defaults).
    pub fn is_issuer(&self, name: &str) -> bool {
        self.name == name
            && self.kind.as_deref().is_none_or(|k| k == "Issuer")
            && self.group.as_deref().is_none_or(|g| g == GROUP)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt, Resource};

    #[test]
    fn api_identity() {
        assert_eq!(Issuer::api_version(&()), "cert-manager.io/v1");
        assert_eq!(Issuer::plural(&()), "issuers");
        assert_eq!(Certificate::kind(&()), "Certificate");
        assert_eq!(Certificate::crd().spec.scope, "Namespaced");
    }

    #[test]
    fn issuer_kinds() {
        let s: IssuerSpec = serde_json::from_str(r#"{"selfSigned":{}}"#).unwrap();
        assert_eq!(s, IssuerSpec::self_signed());
        assert!(s.is_valid());
        let c: IssuerSpec = serde_json::from_str(r#"{"ca":{"secretName":"x"}}"#).unwrap();
        assert_eq!(c, IssuerSpec::ca("x"));
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"ca":{"secretName":"x"}}"#
        );
        assert!(!IssuerSpec::default().is_valid());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(serde_json::from_str::<IssuerSpec>(r#"{"selfsigned":{}}"#).is_err());
        assert!(
            serde_json::from_str::<CertificateSpec>(
                r#"{"secretName":"s","issuerRef":{"name":"i"},"dnsName":["a"]}"#
            )
            .is_err()
        );
        let c: CertificateSpec =
            serde_json::from_str(r#"{"secretName":"s","isCA":true,"issuerRef":{"name":"i"}}"#)
                .unwrap();
        assert_eq!(c.is_ca, Some(true));
        assert!(c.issuer_ref.is_issuer("i"));
    }
}
