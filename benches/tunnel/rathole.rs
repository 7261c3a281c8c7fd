//! rathole with its TLS transport: the plain L4 tunnel jobgate is measured against
//! (issue 18). Variant `rathole-tls`: client → rathole server (plain TCP, where a relay
//! would terminate HTTPS) → one TLS connection → rathole client → nginx, the same backend
//! as every other variant.
//!
//! rathole is built once from the crates registry into `target/bench-tools` by
//! `benches/build-rathole.sh` (outside every timed part; its own `Cargo.lock`, one pin; the
//! `tls` feature needs Debian's `libssl-dev` and `pkg-config`). `JOBGATE_BENCH_RATHOLE=PATH` uses another binary;
//! `JOBGATE_BENCH_WITHOUT=rathole` leaves the variant out.

use crate::setup::Setup;
use anyhow::{bail, Context, Result};
use jobgate_harness::process::{free_port, Proc};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The variant's name in the report.
pub const VARIANT: &str = "rathole-tls";
/// The rathole release measured against (the one the issue's numbers come from).
pub const RATHOLE_VERSION: &str = "0.5.0";
/// How long the tunnel may take to carry its first request.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// The password of the throw-away PKCS#12 identity rathole's server needs.
const PKCS12_PASSWORD: &str = "bench";

/// A running rathole server and client, tunnelling to nginx's HTTP/1.1 and h2c ports.
pub struct Rathole {
    pub server: Proc,
    pub client: Proc,
    /// Where clients connect for HTTP/1.1 and for h2c (prior knowledge).
    pub h1: u16,
    pub h2c: u16,
}

/// The rathole binary: `JOBGATE_BENCH_RATHOLE`, or the one built into `target/bench-tools`
/// (built now if missing); `None` (with the reason) when left out or unbuildable.
pub fn find_or_build() -> std::result::Result<PathBuf, String> {
    let without = std::env::var("JOBGATE_BENCH_WITHOUT").unwrap_or_default();
    if without.split(',').any(|t| t.trim() == "rathole") {
        return Err("rathole: left out (JOBGATE_BENCH_WITHOUT)".into());
    }
    if let Some(path) = std::env::var_os("JOBGATE_BENCH_RATHOLE") {
        return Ok(PathBuf::from(path));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-tools");
    let bin = root.join("bin/rathole");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!(
        "[setup] building rathole {RATHOLE_VERSION} from crates.io into {} (once, a few minutes)",
        root.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/build-rathole.sh");
    let status = Command::new("sh").arg(&script).arg(&root).status();
    match status {
        Ok(s) if s.success() && bin.exists() => Ok(bin),
        Ok(s) => Err(format!(
            "rathole: {} failed ({s}); it needs libssl-dev and pkg-config",
            script.display()
        )),
        Err(e) => Err(format!("rathole: cannot run {}: {e}", script.display())),
    }
}

/// Starts rathole's server and client with the TLS transport (the bench's throw-away
/// certificate), forwarding to `h1_target` and `h2c_target`, and waits until a request
/// goes through.
pub fn start(setup: &Setup, bin: &Path, (h1_target, h2c_target): (u16, u16)) -> Result<Rathole> {
    let dir = setup.env.dir.join("rathole");
    std::fs::create_dir_all(&dir)?;
    let pfx = dir.join("identity.pfx");
    let made = Command::new("openssl")
        .args(["pkcs12", "-export", "-out"])
        .arg(&pfx)
        .arg("-inkey")
        .arg(&setup.env.key)
        .arg("-in")
        .arg(&setup.env.cert)
        .arg("-passout")
        .arg(format!("pass:{PKCS12_PASSWORD}"))
        .output()
        .context("running openssl pkcs12 (Debian's openssl)")?;
    if !made.status.success() {
        bail!("openssl pkcs12: {}", String::from_utf8_lossy(&made.stderr));
    }
    let (control, h1, h2c) = (free_port()?, free_port()?, free_port()?);
    let server = format!(
        r#"[server]
bind_addr = "127.0.0.1:{control}"
[server.transport]
type = "tls"
[server.transport.tcp]
nodelay = true
[server.transport.tls]
pkcs12 = "{pfx}"
pkcs12_password = "{PKCS12_PASSWORD}"
[server.services.h1]
token = "bench"
bind_addr = "127.0.0.1:{h1}"
nodelay = true
[server.services.h2c]
token = "bench"
bind_addr = "127.0.0.1:{h2c}"
nodelay = true
"#,
        pfx = pfx.display()
    );
    let client = format!(
        r#"[client]
remote_addr = "127.0.0.1:{control}"
[client.transport]
type = "tls"
[client.transport.tcp]
nodelay = true
[client.transport.tls]
trusted_root = "{ca}"
hostname = "rathole.{domain}"
[client.services.h1]
token = "bench"
local_addr = "127.0.0.1:{h1_target}"
nodelay = true
[client.services.h2c]
token = "bench"
local_addr = "127.0.0.1:{h2c_target}"
nodelay = true
"#,
        ca = setup.env.ca.display(),
        domain = jobgate_harness::DOMAIN,
    );
    let (server_toml, client_toml) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(&server_toml, server)?;
    std::fs::write(&client_toml, client)?;
    let mut command = Command::new(bin);
    command.arg("--server").arg(&server_toml);
    let server = Proc::start("rathole server", command)?;
    let mut command = Command::new(bin);
    command.arg("--client").arg(&client_toml);
    let client = Proc::start("rathole client", command)?;
    let deadline = Instant::now() + READY_WITHIN;
    while !answers(h1) {
        if Instant::now() > deadline {
            bail!(
                "rathole carried no request within {READY_WITHIN:?}:\nserver: {}\nclient: {}",
                server.stderr(),
                client.stderr()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Rathole {
        server,
        client,
        h1,
        h2c,
    })
}

/// Whether a GET of the small file through the tunnel answers 200.
fn answers(port: u16) -> bool {
    let Ok(mut tcp) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    if tcp
        .write_all(b"GET /small HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}
