//! Client settings both MQTT clients (the agent's transport and the hub's subscription to an
//! external broker) build from a broker URL: rumqttc options, TLS trust, socket tuning.

use std::path::Path;
use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use super::BrokerAddr;

/// MQTT client options for `addr`, with TLS when the URL asked for it.
pub fn options(
    client_id: &str,
    addr: &BrokerAddr,
    tls: Option<Arc<ClientConfig>>,
) -> Result<MqttOptions, String> {
    let mut opts = MqttOptions::new(client_id, addr.host.clone(), addr.port);
    if addr.tls {
        let config = tls.ok_or("mqtts:// needs a CA file to verify the broker (--tls-ca)")?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    Ok(opts)
}

/// Sends small packets (acks, batches) at once instead of waiting on Nagle's algorithm, which
/// with delayed ACKs adds about 40 ms to every exchange.
pub fn no_delay(events: &mut rumqttc::EventLoop) {
    let mut net = events.network_options();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
}

/// A TLS client config (rustls with the ring provider) that trusts the certificates in
/// `ca_file` (PEM).
pub fn tls_config(ca_file: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("cannot read CA file {}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA file {}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "CA file {} holds no certificate",
            ca_file.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
