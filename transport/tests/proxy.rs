//! CONNECT through a real tinyproxy (installed by `.ci/run` / tests/e2e/common.sh:
//! `apt-get install tinyproxy`). A missing tinyproxy fails these tests.

mod support;

use jobgate_transport::proxy::{Proxy, ProxyError};
use support::tinyproxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A TCP echo server standing in for the relay.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn connect_through_tinyproxy_carries_bytes_both_ways() {
    let proxy = tinyproxy("").await;
    let target = echo_server().await;
    let p = Proxy::parse(&format!("http://127.0.0.1:{}", proxy.port)).expect("url");
    let mut tunnel = p.connect("127.0.0.1", target).await.expect("tunnel");
    let data: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    tunnel.write_all(&data).await.expect("write");
    let mut back = vec![0u8; data.len()];
    tunnel.read_exact(&mut back).await.expect("read");
    assert!(back == data, "bytes through the tunnel differ");
}

#[tokio::test]
async fn proxy_auth_required_is_a_clear_refusal() {
    let proxy = tinyproxy("BasicAuth jobgate s3cret").await;
    let target = echo_server().await;
    let p = Proxy::parse(&format!("http://127.0.0.1:{}", proxy.port)).expect("url");
    match p.connect("127.0.0.1", target).await {
        Err(ProxyError::Refused {
            status, ref proxy, ..
        }) => {
            assert_eq!(status, 407);
            assert!(
                proxy.contains(&proxy_port(proxy)),
                "message names the proxy"
            );
        }
        other => panic!("expected 407 refusal, got {other:?}"),
    }
    let authed =
        Proxy::parse(&format!("http://jobgate:s3cret@127.0.0.1:{}", proxy.port)).expect("url");
    let mut tunnel = authed
        .connect("127.0.0.1", target)
        .await
        .expect("authenticated tunnel");
    tunnel.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tunnel.read_exact(&mut back).await.expect("read");
    assert_eq!(&back, b"ping");
}

fn proxy_port(display: &str) -> String {
    display.rsplit(':').next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn refused_error_message_names_proxy_and_answer() {
    let proxy = tinyproxy("BasicAuth jobgate s3cret").await;
    let p = Proxy::parse(&format!("http://127.0.0.1:{}", proxy.port)).expect("url");
    let err = p
        .connect("127.0.0.1", 9)
        .await
        .expect_err("must be refused");
    let text = err.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{}", proxy.port)),
        "{text}"
    );
    assert!(text.contains("407"), "{text}");
}
