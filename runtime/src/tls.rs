//! MQTT over TLS: a rustls client config (ring provider, TLS 1.3) that trusts only the
//! certificates of one PEM file, the hub's CA or the hub's own certificate, never the system's
//! roots. The agent pins its hub this way (`mqtt.tls_ca_file`); the hub's own client uses it
//! too.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A client config trusting exactly the certificates in `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let what = |e: &dyn std::fmt::Display| format!("{}: {e}", ca_file.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| what(&e))? {
        let cert = cert.map_err(|e| what(&e))?;
        roots.add(cert).map_err(|e| what(&e))?;
    }
    if roots.is_empty() {
        return Err(what(&"no certificate in the file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| what(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_missing_an_empty_or_a_garbled_file() {
        let dir = tempfile::tempdir().expect("dir");
        assert!(client_config(&dir.path().join("none.pem")).is_err());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        assert!(
            client_config(&empty)
                .err()
                .is_some_and(|e| e.contains("no certificate"))
        );
        let garbled = dir.path().join("garbled.pem");
        std::fs::write(
            &garbled,
            "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        assert!(client_config(&garbled).is_err());
    }
}
