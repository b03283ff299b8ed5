//! TLS with rustls (ring provider), both ways: terminating the clients' TLS when a
//! certificate and key are configured (without them the proxy answers SSLRequest with 'N', as
//! a server without `ssl = on` does), and encrypting the proxy's own connection to the
//! upstream as the upstream URL's `sslmode` says: `prefer` (libpq's default) and `require`
//! encrypt without checking the server's certificate, as libpq does; `verify-ca` checks it
//! against the CA file of `sslrootcert`, `verify-full` also checks that it names the host.
//! Also the `tls-server-end-point` channel-binding data of each leg's certificate, for SCRAM
//! `-PLUS` (RFC 5929).

use std::{path::PathBuf, sync::Arc};

use tokio_rustls::{
    TlsAcceptor, TlsConnector,
    rustls::{
        self, ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme,
        client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        crypto::CryptoProvider,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    },
};

/// The proxy's certificate and key for client connections, both in PEM.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How the proxy checks the upstream's certificate (libpq's `sslmode` and `sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamVerify {
    /// Encrypt only (`prefer`, `require` without a CA file).
    None,
    /// `verify-ca` (or `require` with `sslrootcert`): the chain leads to this CA file.
    Ca(PathBuf),
    /// `verify-full`: and the certificate names the host.
    Full(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read the TLS key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the TLS certificate and key do not make a valid configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("cannot read the upstream's CA file (sslrootcert) {path}: {reason}")]
    RootCert { path: String, reason: String },
}

/// TLS for client connections.
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: TlsAcceptor,
    /// The proxy certificate's channel-binding data (`None`: its signature algorithm has no
    /// hash to bind with, as PostgreSQL decides; `-PLUS` is then not offered).
    pub end_point: Option<Vec<u8>>,
}

/// The `tls-server-end-point` channel-binding data of a certificate: its hash with the hash
/// function of its signature algorithm, SHA-256 in place of MD5 and SHA-1 (RFC 5929, as
/// PostgreSQL computes it). `None` for algorithms without one (Ed25519, RSASSA-PSS).
pub fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let oid = parsed.signature_algorithm.algorithm.to_id_string();
    match oid.as_str() {
        // md5/sha1/sha256 with RSA; ecdsa with sha1/sha256.
        "1.2.840.113549.1.1.4"
        | "1.2.840.113549.1.1.5"
        | "1.2.840.113549.1.1.11"
        | "1.2.840.10045.4.1"
        | "1.2.840.10045.4.3.2" => Some(sha2::Sha256::digest(cert).to_vec()),
        "1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3" => {
            Some(sha2::Sha384::digest(cert).to_vec())
        }
        "1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4" => {
            Some(sha2::Sha512::digest(cert).to_vec())
        }
        _ => None,
    }
}

pub fn client_tls(files: &TlsFiles) -> Result<ClientTls, TlsError> {
    let first = CertificateDer::pem_file_iter(&files.cert)
        .ok()
        .and_then(|mut certs| certs.next())
        .and_then(Result::ok);
    Ok(ClientTls {
        acceptor: acceptor(files)?,
        end_point: first.and_then(|cert| end_point(&cert)),
    })
}

pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, TlsError> {
    let cert_path = files.cert.display().to_string();
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert_path,
            reason: "no certificate in the file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| TlsError::Key {
        path: files.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A connector for the upstream: without a CA file it encrypts without verifying the
/// server's certificate (libpq's `sslmode=require`); with one it verifies the chain, and the
/// host name too for `verify-full`.
pub fn upstream_connector(verify: &UpstreamVerify) -> Result<TlsConnector, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        UpstreamVerify::None => Arc::new(EncryptOnly(Arc::clone(&provider))),
        UpstreamVerify::Ca(path) | UpstreamVerify::Full(path) => {
            let root_error = |reason: String| TlsError::RootCert {
                path: path.display().to_string(),
                reason,
            };
            let mut roots = rustls::RootCertStore::empty();
            for cert in
                CertificateDer::pem_file_iter(path).map_err(|e| root_error(e.to_string()))?
            {
                roots
                    .add(cert.map_err(|e| root_error(e.to_string()))?)
                    .map_err(|e| root_error(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(root_error("no certificate in the file".into()));
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::clone(&provider),
            )
            .build()
            .map_err(|e| root_error(e.to_string()))?;
            match verify {
                UpstreamVerify::Full(_) => webpki,
                _ => Arc::new(AnyName(webpki)),
            }
        }
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `verify-ca`: the chain must lead to the CA, whatever host the certificate names.
#[derive(Debug)]
struct AnyName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Accepts any certificate, but still checks that the handshake is signed by its key.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS for the proxy's own connections through tokio-postgres (control, shadow, route checks,
/// `auth_query`, and the CLI's commands), as their URL's `sslmode` asks (`prefer`, the
/// default, or `require`): encrypted without verifying the server's certificate, as libpq
/// does for those modes, with channel binding offered to SCRAM.
#[derive(Clone)]
pub struct PostgresTls(TlsConnector);

impl PostgresTls {
    /// One connector for the process (building a rustls configuration is not free).
    pub fn shared() -> Self {
        static CONNECTOR: std::sync::OnceLock<TlsConnector> = std::sync::OnceLock::new();
        Self(
            CONNECTOR
                .get_or_init(|| {
                    upstream_connector(&UpstreamVerify::None)
                        // Without a CA file nothing is read; ring supports the safe default
                        // protocol versions, so the configuration always builds.
                        .expect("an encrypt-only rustls client configuration")
                })
                .clone(),
        )
    }
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for PostgresTls
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type TlsConnect = PostgresTlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<PostgresTlsConnect> {
        let name = ServerName::try_from(domain.to_owned())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(PostgresTlsConnect {
            connector: self.0.clone(),
            name,
        })
    }
}

pub struct PostgresTlsConnect {
    connector: TlsConnector,
    name: ServerName<'static>,
}

type Connecting<S> = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::io::Result<PostgresTlsStream<S>>> + Send>,
>;

impl<S> tokio_postgres::tls::TlsConnect<S> for PostgresTlsConnect
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PostgresTlsStream<S>;
    type Error = std::io::Error;
    type Future = Connecting<S>;

    fn connect(self, stream: S) -> Connecting<S> {
        Box::pin(async move {
            let tls = self.connector.connect(self.name, stream).await?;
            Ok(PostgresTlsStream(Box::new(tls)))
        })
    }
}

/// A TLS connection of the proxy's own.
pub struct PostgresTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead
    for PostgresTlsStream<S>
{
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite
    for PostgresTlsStream<S>
{
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio_postgres::tls::TlsStream
    for PostgresTlsStream<S>
{
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        self.0
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| end_point(cert))
            .map_or_else(
                tokio_postgres::tls::ChannelBinding::none,
                tokio_postgres::tls::ChannelBinding::tls_server_end_point,
            )
    }
}
