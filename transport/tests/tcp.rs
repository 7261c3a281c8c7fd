//! The TCP transport end to end on real sockets: TLS 1.3 with ALPN `jobgate/1` on a
//! listener that also speaks h2/http1.1, direct and through a real tinyproxy.

mod support;

use jobgate_transport::proxy::Proxy;
use jobgate_transport::tcp::{self, TcpDialError};
use jobgate_transport::Connection;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: rustls::ClientConfig,
}

fn tls(alpn: &[&[u8]]) -> Tls {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let der = cert.cert.der().clone();
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .expect("server config");
    server.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        server: Arc::new(server),
        client,
    }
}

/// A stand-in for the relay's HTTPS listener: agents (ALPN jobgate/1) get an echo on
/// every stream; anything else is dropped.
async fn listener(server: Arc<rustls::ServerConfig>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let acceptor = tokio_rustls::TlsAcceptor::from(server);
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                if !tcp::is_agent(stream.get_ref().1.alpn_protocol()) {
                    return;
                }
                support::echo(tcp::accept(stream, peer, Default::default())).await;
            });
        }
    });
    port
}

async fn round_trip(connection: &Connection, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        send.write_all(&sent).await.expect("write");
        send.shutdown().await.expect("finish");
    });
    let mut back = Vec::new();
    recv.read_to_end(&mut back).await.expect("read");
    writer.await.expect("writer");
    assert!(back == data, "echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_alpn_on_the_https_listener_gets_the_multiplexer() {
    let tls = tls(&[b"jobgate/1", b"h2", b"http/1.1"]);
    let port = listener(tls.server.clone()).await;
    let connection = tcp::dial("localhost", port, None, &tls.client, Default::default())
        .await
        .expect("dial");
    round_trip(&connection, 8 * 1024 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dials_through_tinyproxy() {
    let proxy = support::tinyproxy("").await;
    let tls = tls(&[b"jobgate/1", b"h2", b"http/1.1"]);
    let port = listener(tls.server.clone()).await;
    let p = Proxy::parse(&format!("http://127.0.0.1:{}", proxy.port)).expect("url");
    let connection = tcp::dial("localhost", port, Some(&p), &tls.client, Default::default())
        .await
        .expect("dial via proxy");
    round_trip(&connection, 8 * 1024 * 1024).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_jobgate_alpn_is_named_clearly() {
    let tls = tls(&[]);
    let port = listener(tls.server.clone()).await;
    match tcp::dial("localhost", port, None, &tls.client, Default::default()).await {
        Err(e @ TcpDialError::NoAlpn { .. }) => assert!(e.to_string().contains("jobgate/1")),
        other => panic!("expected NoAlpn, got {:?}", other.map(|c| c.kind())),
    }
}
