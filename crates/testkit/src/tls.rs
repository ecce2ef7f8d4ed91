//! Test certificates: a CA made on the spot ([`Ca`]), certificates it signs
//! ([`Leaf`]), rustls clients and servers that use them (ring, like the product), and
//! a directory of PEM files for processes that read them ([`Pki`]).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate authority.
pub struct Ca {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA whose common name is `name`.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `sans` (DNS names or IP addresses), signed by this CA, with
    /// a new key.
    pub fn leaf(&self, sans: &[&str]) -> Leaf {
        let params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    /// A rustls client trusting this CA only, without a client certificate.
    pub fn client_config(&self) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).unwrap();
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
    }

    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(Arc::new(self.client_config()))
    }

    /// A TLS connection to `addr`, verifying the server's certificate for `server`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server: &str,
    ) -> io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from(server.to_string()).expect("a server name");
        self.connector().connect(name, tcp).await
    }
}

/// A certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub key_pem: String,
    key_der: Vec<u8>,
}

impl Leaf {
    /// Writes the certificate and the key as PEM files.
    pub fn write(&self, cert: &Path, key: &Path) {
        std::fs::write(cert, &self.cert_pem).unwrap();
        std::fs::write(key, &self.key_pem).unwrap();
    }

    /// A TLS server presenting this certificate, without client authentication.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert_der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone())),
            )
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

/// PEM files in a temporary directory: a CA's certificate (`ca.pem`), an unrelated
/// CA's (`other-ca.pem`), and the certificates added with [`Pki::leaf`].
pub struct Pki {
    pub ca: Ca,
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA named `ca_name`, and another one.
    pub fn new(ca_name: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(ca_name);
        std::fs::write(dir.path().join("ca.pem"), &ca.cert_pem).unwrap();
        let other = Ca::new("some other CA");
        std::fs::write(dir.path().join("other-ca.pem"), &other.cert_pem).unwrap();
        Pki { ca, dir }
    }

    /// Writes `{name}.pem` and `{name}.key`: a certificate for `sans` signed by the CA.
    pub fn leaf(&self, name: &str, sans: &[&str]) {
        self.ca.leaf(sans).write(
            &self.path(&format!("{name}.pem")),
            &self.path(&format!("{name}.key")),
        );
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// [`Pki::path`] as a command-line argument.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn a_client_trusts_what_its_ca_signed_and_nothing_else() {
        let ca = Ca::new("test CA");
        let leaf = ca.leaf(&["localhost"]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = leaf.acceptor();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (tcp, _) = listener.accept().await.unwrap();
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    tls.write_all(b"hi").await.unwrap();
                    tls.shutdown().await.unwrap();
                }
            }
        });
        let mut tls = ca.connect(addr, "localhost").await.expect("trusted");
        let mut got = Vec::new();
        tls.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hi");
        let stranger = Ca::new("other CA");
        assert!(stranger.connect(addr, "localhost").await.is_err());
        server.await.unwrap();
    }
}
