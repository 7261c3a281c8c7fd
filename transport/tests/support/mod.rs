//! Helpers shared by the transport tests: a real tinyproxy, an echo acceptor.
#![allow(dead_code)]

use jobgate_transport::Connection;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Generous bound for a proxy to come up on a busy machine.
const STARTUP: Duration = Duration::from_secs(30);

pub struct Tinyproxy {
    child: tokio::process::Child,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts tinyproxy in the foreground on a free port; `extra` is appended to its config.
pub async fn tinyproxy(extra: &str) -> Tinyproxy {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        probe.local_addr().expect("addr").port()
    };
    let dir = std::env::temp_dir().join(format!("jobgate-tinyproxy-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let conf = dir.join("tinyproxy.conf");
    let body = format!(
        "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 20\nAllow 127.0.0.1\nLogLevel Info\n{extra}\n"
    );
    std::fs::write(&conf, body).expect("config");
    let child = tokio::process::Command::new("tinyproxy")
        .arg("-d")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("tinyproxy must be installed (apt-get install tinyproxy)");
    let deadline = tokio::time::Instant::now() + STARTUP;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "tinyproxy did not listen on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Tinyproxy { child, port, dir }
}

/// Echoes every stream the connection accepts until it ends.
pub async fn echo(connection: Connection) {
    while let Ok((mut send, mut recv)) = connection.accept_bi().await {
        tokio::spawn(async move {
            if tokio::io::copy(&mut recv, &mut send).await.is_ok() {
                let _ = send.shutdown().await;
            }
        });
    }
}
