//! The TCP transport over a real loopback TCP connection: streams both ways, byte-exact
//! bulk, many concurrent streams, a stalled reader not blocking other streams, close, the
//! size of chunked reads.

use jobgate_protocol::CloseCode;
use jobgate_transport::{Connection, MuxConnection, Role, TransportKind};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for anything in these tests on a busy shared machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// Bulk transfer size.
const BULK: usize = 64 * 1024 * 1024;

async fn pair() -> (Connection, Connection) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let dialed = dialed.expect("connect");
    let (accepted, peer) = accepted.expect("accept");
    let client = MuxConnection::new(dialed, Role::Client, addr);
    let server = MuxConnection::new(accepted, Role::Server, peer);
    (Connection::Tcp(client), Connection::Tcp(server))
}

/// Echoes every stream the connection accepts.
fn echo(connection: Connection) {
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = connection.accept_bi().await {
            tokio::spawn(async move {
                if tokio::io::copy(&mut recv, &mut send).await.is_ok() {
                    let _ = send.shutdown().await;
                }
            });
        }
    });
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn round_trip(connection: &Connection, data: Vec<u8>) -> Vec<u8> {
    let (mut send, mut recv) = connection.open_bi().await.expect("open");
    let writer = tokio::spawn(async move {
        send.write_all(&data).await.expect("write");
        send.shutdown().await.expect("finish");
    });
    let mut back = Vec::new();
    recv.read_to_end(&mut back).await.expect("read");
    writer.await.expect("writer");
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64_mib_is_byte_exact_from_either_end() {
    let (client, server) = pair().await;
    assert_eq!(client.kind(), TransportKind::Tcp);
    echo(server.clone());
    echo(client.clone());
    let data = pattern(BULK, 7);
    let back = tokio::time::timeout(PATIENCE, round_trip(&client, data.clone()))
        .await
        .expect("in time");
    assert!(back == data, "client-opened stream corrupted 64 MiB");
    let back = tokio::time::timeout(PATIENCE, round_trip(&server, data.clone()))
        .await
        .expect("in time");
    assert!(back == data, "server-opened stream corrupted 64 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_streams_each_get_their_own_bytes() {
    let (client, server) = pair().await;
    echo(server);
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(10_000 + i as usize * 37, i as u8);
            (round_trip(&client, data.clone()).await, data)
        }));
    }
    for task in tasks {
        let (back, sent) = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("in time")
            .expect("task");
        assert!(back == sent, "a stream got another stream's bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_does_not_stall_other_streams() {
    let (client, server) = pair().await;
    // The server writes far more than any window into a stream the client never reads,
    // and says when it has filled the stream's initial window.
    let (filled_tx, filled_rx) = tokio::sync::oneshot::channel();
    let stalled_server = server.clone();
    tokio::spawn(async move {
        let (mut send, _recv) = stalled_server.accept_bi().await.expect("accept stalled");
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0;
        let mut filled_tx = Some(filled_tx);
        while send.write_all(&chunk).await.is_ok() {
            written += chunk.len();
            if written >= 256 * 1024 {
                if let Some(tx) = filled_tx.take() {
                    let _ = tx.send(());
                }
            }
        }
    });
    let (mut stalled_send, _stalled_recv) = client.open_bi().await.expect("open stalled");
    stalled_send
        .write_all(b"x")
        .await
        .expect("announce stalled stream");
    tokio::time::timeout(PATIENCE, filled_rx)
        .await
        .expect("window filled")
        .expect("filled");
    echo(server);
    let data = pattern(4 * 1024 * 1024, 3);
    let back = tokio::time::timeout(PATIENCE, round_trip(&client, data.clone()))
        .await
        .expect("other stream flows");
    assert!(back == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_ends_the_peer_and_its_streams() {
    let (client, server) = pair().await;
    client.close(CloseCode::Normal, b"bye");
    tokio::time::timeout(PATIENCE, server.closed())
        .await
        .expect("peer sees the close");
    assert!(
        server.accept_bi().await.is_err(),
        "accept after close must fail"
    );
    assert!(
        client.open_bi().await.is_err(),
        "open after close must fail"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_learns_the_close_code_and_reason_from_either_end() {
    for (closer_is_client, code) in [(true, CloseCode::Normal), (false, CloseCode::Revoked)] {
        let (client, server) = pair().await;
        // Streams in use first, as in a session: the close record must not disturb them.
        echo(server.clone());
        assert_eq!(
            round_trip(&client, pattern(4096, 3)).await,
            pattern(4096, 3)
        );
        let (closer, peer) = if closer_is_client {
            (&client, &server)
        } else {
            (&server, &client)
        };
        closer.close(code, b"token revoked");
        let why = tokio::time::timeout(PATIENCE, peer.closed())
            .await
            .expect("peer sees the close");
        assert_eq!(why.peer_close_code(), Some(code), "{why}");
        assert!(why.to_string().contains("token revoked"), "{why}");
        assert!(peer.close_reason().is_some());
        let (received, sent) = peer.bytes();
        assert!(
            received > 4096 && sent > 4096,
            "byte counts {received}/{sent}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_every_handle_closes_the_connection() {
    let (client, server) = pair().await;
    drop(client);
    tokio::time::timeout(PATIENCE, server.closed())
        .await
        .expect("peer sees the close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_times_out_while_a_live_one_does_not() {
    use jobgate_transport::{ConnectionError, MuxError, MuxSettings};
    let settings = MuxSettings {
        keep_alive: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(600),
        ..Default::default()
    };
    // A peer that accepts TCP and reads, but never says anything (a frozen relay, or a
    // proxy holding its half open after the far end vanished).
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (mut silent, _) = accepted.expect("accept");
    tokio::spawn(async move {
        let mut sink = Vec::new();
        let _ = silent.read_to_end(&mut sink).await;
    });
    let client = Connection::Tcp(MuxConnection::with_settings(
        dialed.expect("connect"),
        Role::Client,
        addr,
        settings,
    ));
    let why = tokio::time::timeout(PATIENCE, client.closed())
        .await
        .expect("the silent peer is noticed");
    assert!(
        matches!(why, ConnectionError::Tcp(MuxError::TimedOut { .. })),
        "{why}"
    );

    // Two live ends keep each other alive through many idle timeouts.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (accepted, peer) = accepted.expect("accept");
    let client =
        MuxConnection::with_settings(dialed.expect("connect"), Role::Client, addr, settings);
    let server = MuxConnection::with_settings(accepted, Role::Server, peer, settings);
    let (client, server) = (Connection::Tcp(client), Connection::Tcp(server));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(client.close_reason().is_none() && server.close_reason().is_none());
    echo(server.clone());
    assert_eq!(
        round_trip(&client, pattern(1000, 9)).await,
        pattern(1000, 9)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_beyond_the_stream_cap_fail_and_the_connection_lives_on() {
    use jobgate_transport::MuxSettings;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let (accepted, peer) = accepted.expect("accept");
    let capped = MuxSettings {
        max_streams: 4,
        ..Default::default()
    };
    let client = Connection::Tcp(MuxConnection::new(
        dialed.expect("connect"),
        Role::Client,
        addr,
    ));
    let server = Connection::Tcp(MuxConnection::with_settings(
        accepted,
        Role::Server,
        peer,
        capped,
    ));
    echo(client.clone());
    // The server opens (as the relay does).
    let mut held = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = server.open_bi().await.expect("open under the cap");
        send.write_all(b"x").await.expect("write");
        held.push((send, recv));
    }
    assert!(
        server.open_bi().await.is_err(),
        "an open over the cap must fail"
    );
    assert!(server.close_reason().is_none(), "the connection lives on");
    drop(held);
    let opened = tokio::time::timeout(PATIENCE, async {
        loop {
            if let Ok(pair) = server.open_bi().await {
                return pair;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(opened.is_ok(), "streams free up once they end");
}

/// What the receiving end of one stream reads: a head frame, then everything after it,
/// part by chunks and part through `AsyncRead`.
async fn read_head_and_rest(
    server: &Connection,
    max: usize,
) -> (Result<Option<Vec<u8>>, String>, Vec<u8>) {
    let accepted = tokio::time::timeout(PATIENCE, server.accept_bi()).await;
    let (_send, mut recv) = accepted.expect("a stream in time").expect("accept");
    let read = tokio::time::timeout(PATIENCE, recv.read_frame(max)).await;
    let head = match read.expect("a frame or an error in time") {
        Ok(head) => Ok(head.map(|h| h.to_vec())),
        Err(e) => return (Err(e.to_string()), Vec::new()),
    };
    let mut rest = Vec::new();
    if let Some(chunk) = recv.read_chunk(3).await.expect("chunk") {
        assert!(chunk.len() <= 3, "a chunk read honours its limit");
        rest.extend_from_slice(&chunk);
    }
    recv.read_to_end(&mut rest).await.expect("rest");
    (head, rest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_frame_is_read_whole_and_what_follows_it_stays_for_the_body() {
    let (client, server) = pair().await;
    let mut frame = Vec::new();
    jobgate_protocol::encode_frame(b"the head", &mut frame);

    // Frame and body in one write (they arrive in one chunk, as on a request stream).
    let (mut send, _recv) = client.open_bi().await.expect("open");
    let mut both = frame.clone();
    both.extend_from_slice(b"body bytes");
    send.write_all(&both).await.expect("write");
    send.shutdown().await.expect("finish");
    let (head, rest) = read_head_and_rest(&server, 64).await;
    assert_eq!(head, Ok(Some(b"the head".to_vec())));
    assert_eq!(rest, b"body bytes");

    // A frame that comes in pieces is gathered.
    let (mut send, _recv) = client.open_bi().await.expect("open");
    let reader = read_head_and_rest(&server, 64);
    let writer = async {
        for piece in [&frame[..2], &frame[2..6], &frame[6..]] {
            send.write_all(piece).await.expect("write");
            send.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        send.write_all(b"tail").await.expect("write");
        send.shutdown().await.expect("finish");
    };
    let ((head, rest), ()) = tokio::join!(reader, writer);
    assert_eq!(head, Ok(Some(b"the head".to_vec())));
    assert_eq!(rest, b"tail");

    // Over the limit, and cut short. (A yamux stream that never carries a byte is never
    // announced to the peer, so "no frame at all" cannot be sent this way.)
    for (bytes, limit, why) in [
        (&frame[..], 4, "over the limit"),
        (&frame[..7], 64, "cut short"),
    ] {
        let (mut send, _recv) = client.open_bi().await.expect("open");
        send.write_all(bytes).await.expect("write");
        send.shutdown().await.expect("finish");
        let (head, _) = read_head_and_rest(&server, limit).await;
        assert!(head.is_err(), "{why}: {head:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_reads_start_small_and_grow_while_data_waits() {
    let (client, server) = pair().await;
    let data = pattern(192 * 1024, 7);
    let (mut send, _recv) = client.open_bi().await.expect("open");
    // Within yamux's 256 KiB stream window: all of it can wait at the receiver unread.
    send.write_all(&data).await.expect("write");
    send.shutdown().await.expect("finish");
    let accepted = tokio::time::timeout(PATIENCE, server.accept_bi()).await;
    let (_send, mut recv) = accepted.expect("a stream in time").expect("accept");
    // Let every frame reach the receiving end before the first read.
    let arrived = tokio::time::timeout(PATIENCE, async {
        while server.bytes().0 < data.len() as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    arrived.await.expect("all of it arrives");
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut sizes = Vec::new();
    let mut back = Vec::new();
    while let Some(chunk) = recv.read_chunk(usize::MAX).await.expect("chunk") {
        sizes.push(chunk.len());
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, data, "byte-exact");
    // A stream that only ever carries a head (an idle WebSocket) holds a small buffer...
    assert!(sizes[0] <= 4 * 1024, "first read is small: {sizes:?}");
    // ...and one carrying bulk gets bigger reads, up to a bound.
    assert!(
        sizes.contains(&(64 * 1024)),
        "reads grow to 64 KiB while data waits: {sizes:?}"
    );
    assert!(sizes.iter().all(|&n| n <= 64 * 1024), "{sizes:?}");
}
