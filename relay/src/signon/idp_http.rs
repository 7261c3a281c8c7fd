//! The relay's HTTP client for the identity provider (discovery, JWKS, token endpoint):
//! one request per connection over hyper and rustls, trusting the system roots plus
//! `--oidc-ca`, never following redirects (the `openidconnect` crate asks for that: a
//! redirect could point the relay at an internal address), bounded in time and size.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use openidconnect::{HttpRequest, HttpResponse};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::net::TcpStream;

/// Longest a whole exchange with the identity provider may take (connect, TLS, request,
/// response): a login waits for it, and a slow IdP must turn into a clear 503, not a
/// browser spinning until its own timeout.
pub const IDP_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body accepted from the identity provider (discovery documents and
/// key sets are a few KiB).
pub const MAX_IDP_RESPONSE: usize = 1024 * 1024;

/// Why a request to the identity provider failed.
#[derive(Debug, Error)]
pub enum IdpHttpError {
    /// The URL is not `http(s)://host[:port]/...`.
    #[error("unusable URL {0}")]
    Url(String),
    /// Connecting, TLS or HTTP failed.
    #[error("{0}")]
    Transport(String),
    /// No answer within [`IDP_TIMEOUT`].
    #[error("no answer within {} s", IDP_TIMEOUT.as_secs())]
    Timeout,
    /// The answer was larger than [`MAX_IDP_RESPONSE`].
    #[error("answer larger than {MAX_IDP_RESPONSE} bytes")]
    TooLarge,
}

/// Why the client's trust store could not be built.
#[derive(Debug, Error)]
#[error("cannot use the CA file {path}: {why}")]
pub struct CaError {
    path: String,
    why: String,
}

/// A client for the identity provider; cheap to clone.
#[derive(Clone)]
pub struct IdpHttp {
    tls: tokio_rustls::TlsConnector,
}

impl IdpHttp {
    /// A client trusting the system roots and the certificates in `ca`, if given.
    pub fn new(ca: Option<&Path>) -> Result<Self, CaError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = ca {
            let error = |why: String| CaError {
                path: path.display().to_string(),
                why,
            };
            let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
            let mut added = 0;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.map_err(|e| error(e.to_string()))?)
                    .map_err(|e| error(e.to_string()))?;
                added += 1;
            }
            if added == 0 {
                return Err(error("no certificate in it".into()));
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError {
            path: String::new(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Sends `request` and returns the whole answer, within [`IDP_TIMEOUT`].
    pub async fn send(&self, request: HttpRequest) -> Result<HttpResponse, IdpHttpError> {
        tokio::time::timeout(IDP_TIMEOUT, self.exchange(request))
            .await
            .map_err(|_| IdpHttpError::Timeout)?
    }

    async fn exchange(&self, request: HttpRequest) -> Result<HttpResponse, IdpHttpError> {
        let uri = request.uri().clone();
        let url_error = || IdpHttpError::Url(format!("{uri}"));
        let host = uri.host().ok_or_else(url_error)?.to_owned();
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(url_error()),
        };
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let transport = |e: &dyn std::fmt::Display| IdpHttpError::Transport(e.to_string());
        // `[::1]` in a URL is `::1` to connect to.
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tcp = TcpStream::connect((bare.as_str(), port))
            .await
            .map_err(|e| transport(&e))?;
        let (parts, body) = request.into_parts();
        let mut builder = http::Request::builder()
            .method(parts.method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()).to_owned());
        for (name, value) in parts.headers.iter() {
            builder = builder.header(name, value);
        }
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let outgoing = builder
            .header(http::header::HOST, authority)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| transport(&e))?;
        if tls {
            let name = rustls::pki_types::ServerName::try_from(bare).map_err(|_| url_error())?;
            let stream = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| transport(&e))?;
            round_trip(stream, outgoing).await
        } else {
            round_trip(tcp, outgoing).await
        }
    }
}

async fn round_trip<S>(
    stream: S,
    request: http::Request<Full<Bytes>>,
) -> Result<HttpResponse, IdpHttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let transport = |e: &dyn std::fmt::Display| IdpHttpError::Transport(e.to_string());
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transport(&e))?;
    let driver = tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| transport(&e))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_IDP_RESPONSE)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                IdpHttpError::TooLarge
            } else {
                IdpHttpError::Transport(e.to_string())
            }
        })?
        .to_bytes();
    driver.abort();
    Ok(http::Response::from_parts(parts, body.to_vec()))
}
