//! The quinn ceiling: one QUIC connection, one stream, jobgate's transport tuning, TLS,
//! both ends in this process: what bulk transfers through jobgate are compared with.

use crate::report::cpu_us;
use crate::setup::Setup;
use crate::{CHUNK, MB};
use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use jobgate_harness::DOMAIN;
use nix::sys::resource::UsageWho;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn udp_socket() -> Result<std::net::UdpSocket> {
    use jobgate_protocol::quic::UDP_SOCKET_BUFFER;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
        let _ = state.set_recv_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
        let _ = state.set_send_buffer_size((&socket).into(), UDP_SOCKET_BUFFER);
    }
    Ok(socket)
}

/// One QUIC connection moving `bytes` on one stream between two threads: (MB/s, CPU µs
/// per MB of both ends).
pub fn quinn_ceiling(setup: &Setup, bytes: u64) -> Result<(f64, f64)> {
    use jobgate_protocol::quic::transport_config;
    let transport = || transport_config(Duration::from_secs(10), Duration::from_secs(2), 16);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_pem = std::fs::read(&setup.env.cert)?;
    let chain = rustls_pemfile::certs(&mut cert_pem.as_slice()).collect::<Result<Vec<_>, _>>()?;
    let key_pem = std::fs::read(&setup.env.key)?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())?.context("no key")?;
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    server_tls.alpn_protocols = vec![jobgate_protocol::ALPN.to_vec()];
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls)?,
    ));
    server.transport_config(transport());
    let server_socket = udp_socket()?;
    let server_addr = server_socket.local_addr()?;

    let server_thread = std::thread::spawn(move || -> Result<(u64, f64)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let endpoint = quinn::Endpoint::new(
                jobgate_protocol::quic::endpoint_config(),
                Some(server),
                server_socket,
                Arc::new(quinn::TokioRuntime),
            )?;
            let connection = endpoint.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = connection.accept_bi().await?;
            let cpu0 = cpu_us(UsageWho::RUSAGE_THREAD);
            let mut n = 0u64;
            while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
                n += chunk.bytes.len() as u64;
            }
            let cpu = cpu_us(UsageWho::RUSAGE_THREAD) - cpu0;
            send.write_all(&n.to_be_bytes()).await?;
            send.finish()?;
            let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            Ok((n, cpu))
        })
    });

    let mut roots = rustls::RootCertStore::empty();
    let ca_pem = std::fs::read(&setup.env.ca)?;
    for cert in rustls_pemfile::certs(&mut ca_pem.as_slice()) {
        roots.add(cert?)?;
    }
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![jobgate_protocol::ALPN.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls)?,
    ));
    client.transport_config(transport());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let rate = runtime.block_on(async move {
        let mut endpoint = quinn::Endpoint::new(
            jobgate_protocol::quic::endpoint_config(),
            None,
            udp_socket()?,
            Arc::new(quinn::TokioRuntime),
        )?;
        endpoint.set_default_client_config(client);
        let connection = endpoint
            .connect(server_addr, &format!("ceiling.{DOMAIN}"))?
            .await?;
        let (mut send, mut recv) = connection.open_bi().await?;
        let block = Bytes::from(vec![0u8; CHUNK]);
        let cpu0 = cpu_us(UsageWho::RUSAGE_THREAD);
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(CHUNK as u64) as usize;
            send.write_chunk(block.slice(..n)).await?;
            sent += n as u64;
        }
        send.finish()?;
        let mut ack = [0u8; 8];
        recv.read_exact(&mut ack).await?;
        let elapsed = start.elapsed().as_secs_f64();
        let cpu = cpu_us(UsageWho::RUSAGE_THREAD) - cpu0;
        connection.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
        if u64::from_be_bytes(ack) != bytes {
            bail!(
                "quinn ceiling: server received {} of {bytes}",
                u64::from_be_bytes(ack)
            );
        }
        Ok::<_, anyhow::Error>((bytes as f64 / elapsed / MB, cpu))
    })?;
    let (_, server_cpu) = server_thread
        .join()
        .map_err(|_| anyhow!("quinn ceiling server panicked"))??;
    Ok((rate.0, (rate.1 + server_cpu) / (bytes as f64 / MB)))
}
