//! The QUIC tuning both ends share (`jobgate_protocol::quic`), on a real loopback path:
//! packets grow past Ethernet size where the path allows it, and bulk data still flows
//! without loss at that size (a batch of large packets that no longer fits one GSO send
//! is dropped by the socket layer, which once cut bulk to a fraction of its rate).

use jobgate_protocol::quic::{
    endpoint_config, transport_config, MAX_UDP_PAYLOAD, UDP_SOCKET_BUFFER,
};
use std::sync::Arc;
use std::time::Duration;

/// Enough data for path-MTU discovery to finish and for many full GSO batches.
const BULK: usize = 64 * 1024 * 1024;
/// quinn's default upper bound: the tuning must get past it on loopback.
const ETHERNET_PAYLOAD: u16 = 1452;

/// A loopback UDP socket with the buffers relay and agent ask for.
fn udp_socket() -> std::net::UdpSocket {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let state = quinn::udp::UdpSocketState::new((&socket).into()).expect("udp state");
    let _ = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    let _ = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    socket
}

/// Both ends' transport settings, as relay and agent build them.
fn tuning() -> Arc<quinn::TransportConfig> {
    transport_config(Duration::from_secs(10), Duration::from_secs(2), 16)
}

fn endpoints() -> (quinn::Endpoint, quinn::Endpoint, std::net::SocketAddr) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let cert_der = rustls::pki_types::CertificateDer::from(cert.cert.der().to_vec());
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(cert.key_pair.serialize_der()).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key)
        .expect("server tls");
    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).expect("quic server");
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(tuning());

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).expect("root");
    let client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client_crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).expect("quic client");
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(tuning());

    let server_socket = udp_socket();
    let server_addr = server_socket.local_addr().expect("addr");
    let server = quinn::Endpoint::new(
        endpoint_config(),
        Some(server),
        server_socket,
        Arc::new(quinn::TokioRuntime),
    )
    .expect("server endpoint");
    let client_socket = udp_socket();
    let mut client = quinn::Endpoint::new(
        endpoint_config(),
        None,
        client_socket,
        Arc::new(quinn::TokioRuntime),
    )
    .expect("client endpoint");
    client.set_default_client_config(client_config);
    (server, client, server_addr)
}

#[tokio::test]
async fn bulk_data_flows_in_packets_larger_than_ethernet_without_loss() {
    let (server, client, addr) = endpoints();
    let receiver = tokio::spawn(async move {
        let connection = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("accept");
        let (mut send, mut recv) = connection.accept_bi().await.expect("stream");
        let mut received = 0usize;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
            received += chunk.bytes.len();
        }
        send.write_all(&received.to_be_bytes())
            .await
            .expect("reply");
        send.finish().expect("finish");
        let _ = connection.closed().await;
        (received, connection.stats())
    });

    let connection = client
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    let block = vec![0x5a_u8; 256 * 1024];
    for _ in 0..BULK / block.len() {
        send.write_all(&block).await.expect("write");
    }
    send.finish().expect("finish");
    let reply = recv.read_to_end(16).await.expect("reply");
    let stats = connection.stats();
    connection.close(0u32.into(), b"done");

    let (received, _) = receiver.await.expect("receiver");
    assert_eq!(received, BULK, "every byte arrived");
    assert_eq!(reply, BULK.to_be_bytes());
    let mtu = stats.path.current_mtu;
    assert!(
        mtu > ETHERNET_PAYLOAD && mtu <= MAX_UDP_PAYLOAD,
        "path-MTU discovery climbed past Ethernet size on loopback: {mtu}"
    );
    // A lost packet here is a dropped send, not congestion: loopback loses nothing else
    // at this rate. Allow a little for a socket buffer overflowing on a busy machine.
    let sent = stats.path.sent_packets.max(1);
    assert!(
        stats.path.lost_packets * 100 < sent,
        "{} of {sent} packets lost",
        stats.path.lost_packets
    );
    eprintln!(
        "mtu {mtu}, {sent} packets sent, {} lost",
        stats.path.lost_packets
    );
}
