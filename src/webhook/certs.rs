//! Development certificates: a CA and a serving certificate for the webhook, written by
//! `cape-static-ip certs` for `make run`, the tests and the curl replay. Production uses
//! cert-manager (see `manifests/`). Also reads a certificate's expiry for the metrics.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Why certificates could not be written.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A CA and a serving certificate signed by it, as PEM.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

/// Generates a CA and a serving certificate for `hosts` (IP addresses become IP SANs, other
/// names DNS SANs), valid for `days`.
pub fn generate(hosts: &[String], days: i64) -> Result<DevCerts, CertsError> {
    let now = OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "cape-static-ip development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(days);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let (cert, key) = sign_leaf(&issuer, hosts, days)?;
    Ok(DevCerts {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        cert,
        key,
    })
}

/// Signs a new serving certificate for `hosts`, valid for `days`, with an existing CA (PEM
/// certificate and key, as written by [`write`] or by cert-manager into a Secret's `ca.crt`):
/// a rotation keeps the CA (the webhook configuration's `caBundle`) and replaces the leaf.
/// The returned set carries the given CA.
pub fn generate_leaf(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    hosts: &[String],
    days: i64,
) -> Result<DevCerts, CertsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(ca_cert_pem, &ca_key)?;
    let (cert, key) = sign_leaf(&issuer, hosts, days)?;
    Ok(DevCerts {
        ca_cert: ca_cert_pem.to_owned(),
        ca_key: ca_key_pem.to_owned(),
        cert,
        key,
    })
}

/// A serving certificate (PEM certificate, PEM key) for `hosts` signed by `issuer`: IP
/// addresses become IP SANs, other names DNS SANs; valid from an hour ago for `days`.
fn sign_leaf(
    issuer: &Issuer<'_, &KeyPair>,
    hosts: &[String],
    days: i64,
) -> Result<(String, String), CertsError> {
    let now = OffsetDateTime::now_utc();
    let mut leaf = CertificateParams::new(hosts.to_vec())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(
        DnType::CommonName,
        hosts
            .first()
            .map(String::as_str)
            .unwrap_or("cape-static-ip"),
    );
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - Duration::hours(1);
    leaf.not_after = now + Duration::days(days);
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes `ca.crt`, `ca.key`, `tls.crt` and `tls.key` into `dir`. Each file is first
/// written to a new temporary file, created exclusively (`create_new`) with its final mode
/// (0600 for keys, 0644 for certificates): a key is never readable by others, not even for
/// a moment, and a file planted in its place is never written through. The temporary file
/// is then renamed over the target, so a server reading `dir` sees the old file or the new
/// one, never half of one.
pub fn write(dir: &Path, certs: &DevCerts) -> Result<(), CertsError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertsError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for (name, content, secret) in [
        ("ca.crt", &certs.ca_cert, false),
        ("ca.key", &certs.ca_key, true),
        ("tls.crt", &certs.cert, false),
        ("tls.key", &certs.key, true),
    ] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
        let mode = if secret { 0o600 } else { 0o644 };
        if let Err(e) = write_new(&tmp, content.as_bytes(), mode) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&tmp)(e));
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(&path)(e));
        }
    }
    Ok(())
}

/// Creates `path`, which must not exist, with `mode` (before the umask) and writes `content`.
fn write_new(path: &Path, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(content)?;
    file.sync_all()
}

/// The notAfter of a DER certificate, as Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_has_the_requested_names_and_expiry() {
        let certs = generate(&["127.0.0.1".into(), "localhost".into()], 30).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(certs.cert.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c)
            .unwrap();
        let expiry = not_after(der.as_ref()).unwrap();
        let in_30_days = OffsetDateTime::now_utc().unix_timestamp() + 30 * 86400;
        assert!((expiry - in_30_days).abs() < 60);
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref()).unwrap();
        let sans = parsed
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len();
        assert_eq!(sans, 2);
    }

    #[test]
    fn keys_are_written_owner_only_and_replace_existing_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!(
            "cape-static-ip-certs-write-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let first = generate(&["127.0.0.1".into()], 30).unwrap();
        write(&dir, &first).unwrap();
        // A second write replaces every file (a rotation), with the same modes.
        let second = generate(&["127.0.0.1".into()], 30).unwrap();
        write(&dir, &second).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["ca.crt", "ca.key", "tls.crt", "tls.key"],
            "no temporary file left"
        );
        for (name, mode, content) in [
            ("ca.key", 0o600, &second.ca_key),
            ("tls.key", 0o600, &second.key),
            ("ca.crt", 0o644, &second.ca_cert),
            ("tls.crt", 0o644, &second.cert),
        ] {
            let path = dir.join(name);
            let meta = std::fs::metadata(&path).unwrap();
            // Modes are given at creation; the umask can only take bits away.
            let got = meta.permissions().mode() & 0o777;
            assert_eq!(got & !mode, 0, "{name}: mode {got:o}");
            if mode == 0o600 {
                assert_eq!(got, 0o600, "{name}: readable by its owner only");
            }
            assert_eq!(&std::fs::read_to_string(&path).unwrap(), content, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn leaf_signed_by_an_existing_ca_chains_to_it() {
        let first = generate(&["127.0.0.1".into()], 30).unwrap();
        let next = generate_leaf(&first.ca_cert, &first.ca_key, &["127.0.0.1".into()], 45).unwrap();
        assert_eq!(next.ca_cert, first.ca_cert);
        assert_ne!(next.cert, first.cert);
        assert_ne!(next.key, first.key);
        let der = |pem: &str| -> rustls::pki_types::CertificateDer<'static> {
            rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let (ca, leaf) = (der(&first.ca_cert), der(&next.cert));
        let (_, ca) = x509_parser::parse_x509_certificate(ca.as_ref()).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        leaf.verify_signature(Some(ca.public_key())).unwrap();
        let in_45_days = OffsetDateTime::now_utc().unix_timestamp() + 45 * 86400;
        assert!((leaf.validity().not_after.timestamp() - in_45_days).abs() < 60);
    }
}
