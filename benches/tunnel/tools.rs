//! The load tools: wrk (HTTP/1.1 GETs), h2load (HTTP/2 GETs), curl (bulk transfers),
//! each run against one variant with the server-side CPU it cost.

use crate::report::{cpu_us, read_cpu_stat};
use crate::setup::{CpuWatch, Setup, Tools};
use crate::MB;
use anyhow::{anyhow, bail, Context, Result};
use jobgate_harness::stack::Session;
use nix::sys::resource::UsageWho;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// How one variant is reached over HTTP.
#[derive(Clone)]
pub struct HttpVariant {
    pub name: String,
    /// `http://127.0.0.1:P` or `https://127.0.0.1:P` for HTTP/1.1 (wrk, curl).
    pub h1_base: String,
    /// Base URL for HTTP/2 (h2load, curl): h2c prior knowledge or TLS with ALPN.
    pub h2_base: String,
    /// Session host and cookie when going through a relay.
    pub session: Option<Session>,
    /// Relay port (curl --resolve).
    pub https_port: Option<u16>,
    pub cpu: CpuWatch,
}

pub struct LoadResult {
    pub rps: f64,
    pub requests: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub cpu_us_per_req: BTreeMap<String, f64>,
    /// Share of the machine's CPU time that sat idle during the run, in % (wrk only).
    pub idle_pct: f64,
    /// Busy CPU time of the whole machine per request, every process and the kernel
    /// included, in µs (wrk only): on a saturated machine, req/s is the cores' time
    /// divided by this.
    pub machine_cpu_us_per_req: f64,
    /// The load tool's own CPU time per request, in µs (wrk only).
    pub client_cpu_us_per_req: f64,
}

/// The variants wrk can reach; the others are noted in `skipped` for `scenario`.
///
/// wrk's TLS server name is its URL's host, 127.0.0.1 here, and a cluster's relays route
/// a connection by that name, so the cluster hop (`hop-*`) is left to h2load
/// (`--connect-to`) and curl (`--resolve`), which send the session's name.
pub fn wrk_variants(
    variants: &[HttpVariant],
    scenario: &str,
    skipped: &mut Vec<String>,
) -> Vec<HttpVariant> {
    let (reached, hops): (Vec<_>, Vec<_>) = variants
        .iter()
        .cloned()
        .partition(|v| !v.name.starts_with("hop-"));
    for v in hops {
        skipped.push(format!(
            "{scenario} for {}: wrk cannot send a session name as TLS SNI to 127.0.0.1 \
             (the h2 and bulk rows measure the hop)",
            v.name
        ));
    }
    reached
}

pub fn wrk(
    tools: &Tools,
    setup: &Setup,
    v: &HttpVariant,
    connections: usize,
    secs: u64,
) -> Result<LoadResult> {
    let wrk = tools.wrk.as_ref().context("wrk is not installed")?;
    let mut command = Command::new(wrk);
    command
        .args(["-t1", "-c"])
        .arg(connections.to_string())
        .arg("-d")
        .arg(format!("{secs}s"))
        .arg("-s")
        .arg(&setup.wrk_script)
        .arg(format!("{}/small", v.h1_base));
    if let Some(s) = &v.session {
        command
            .arg("-H")
            .arg(format!("Host: {}", s.host))
            .arg("-H")
            .arg(format!("Cookie: {}", s.cookie));
    }
    let before = v.cpu.snapshot();
    let stat_before = read_cpu_stat();
    let client_before = cpu_us(UsageWho::RUSAGE_CHILDREN);
    let out = command.output().context("running wrk")?;
    let client_us = cpu_us(UsageWho::RUSAGE_CHILDREN) - client_before;
    let stat = stat_before.zip(read_cpu_stat());
    let idle_pct = stat.map_or(f64::NAN, |(before, after)| {
        before.percent(after, |t| t.idle)
    });
    let machine_us = stat.map_or(f64::NAN, |(before, after)| before.busy_us(after));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("WRKJSON "))
        .ok_or_else(|| {
            anyhow!(
                "wrk printed no summary: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let r: Value = serde_json::from_str(line)?;
    let num = |k: &str| r.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
    let requests = num("requests");
    let errors: f64 = ["connect", "read", "write", "status", "timeout"]
        .iter()
        .map(|k| num(k))
        .sum();
    if requests.is_nan() || requests <= 0.0 || errors > 0.0 {
        bail!("wrk: {requests} requests, errors {line}");
    }
    Ok(LoadResult {
        rps: requests / (num("duration_us") / 1e6),
        requests,
        p50_us: num("p50"),
        p99_us: num("p99"),
        cpu_us_per_req: v.cpu.per_unit(&before, requests),
        idle_pct,
        machine_cpu_us_per_req: machine_us / requests,
        client_cpu_us_per_req: client_us / requests,
    })
}

pub fn h2load(
    tools: &Tools,
    v: &HttpVariant,
    clients: usize,
    streams: usize,
    secs: u64,
) -> Result<LoadResult> {
    let h2load = tools.h2load.as_ref().context("h2load is not installed")?;
    let mut command = Command::new(h2load);
    command
        .args(["-t1", "-c"])
        .arg(clients.to_string())
        .arg("-m")
        .arg(streams.to_string())
        .arg("-D")
        .arg(secs.to_string());
    match (&v.session, v.https_port) {
        // The session's name in the URL (so in TLS SNI, as a browser sends it), the
        // connection to the relay on loopback.
        (Some(s), Some(port)) => command
            .arg(format!("--connect-to=127.0.0.1:{port}"))
            .arg(format!("https://{}:{port}/small", s.host)),
        _ => command.arg(format!("{}/small", v.h2_base)),
    };
    if let Some(s) = &v.session {
        command
            .arg("-H")
            .arg(format!(":authority: {}", s.host))
            .arg("-H")
            .arg(format!("cookie: {}", s.cookie));
    }
    let before = v.cpu.snapshot();
    let out = command.output().context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |line_prefix: &str, suffix: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(line_prefix))?;
        line.trim_start_matches(line_prefix)
            .split(',')
            .find(|part| part.trim().ends_with(suffix))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let rps = field("finished in", "req/s").ok_or_else(|| anyhow!("h2load: no result: {text}"))?;
    let succeeded = field("requests:", "succeeded").unwrap_or(0.0);
    let failed =
        field("requests:", "failed").unwrap_or(0.0) + field("requests:", "errored").unwrap_or(0.0);
    let bad =
        field("status codes:", "4xx").unwrap_or(0.0) + field("status codes:", "5xx").unwrap_or(0.0);
    if succeeded <= 0.0 || failed > 0.0 || bad > 0.0 {
        bail!("h2load: {succeeded} succeeded, {failed} failed, {bad} 4xx/5xx:\n{text}");
    }
    Ok(LoadResult {
        rps,
        requests: succeeded,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        cpu_us_per_req: v.cpu.per_unit(&before, succeeded),
        idle_pct: f64::NAN,
        machine_cpu_us_per_req: f64::NAN,
        client_cpu_us_per_req: f64::NAN,
    })
}

pub struct Transfer {
    pub mb_s: f64,
    pub cpu_us_per_mb: BTreeMap<String, f64>,
}

/// What one bulk transfer moves.
pub struct Payload<'a> {
    pub bytes: u64,
    /// Path of a `bytes`-long download.
    pub download_path: &'a str,
    /// A `bytes`-long file to upload.
    pub upload_file: &'a Path,
}

/// One curl transfer: a download of `payload.download_path` or an upload to `/upload`.
pub fn curl_transfer(
    tools: &Tools,
    setup: &Setup,
    v: &HttpVariant,
    upload: bool,
    h2: bool,
    payload: &Payload,
) -> Result<Transfer> {
    let Payload {
        bytes,
        download_path,
        upload_file,
    } = *payload;
    let curl = tools.curl.as_ref().context("curl is not installed")?;
    let mut command = Command::new(curl);
    command.args(["-sS", "--max-time", "300", "-H", "Expect:"]);
    let base = if h2 { &v.h2_base } else { &v.h1_base };
    let direct_h2c = h2 && base.starts_with("http://");
    command.arg(if direct_h2c {
        "--http2-prior-knowledge"
    } else if h2 {
        "--http2"
    } else {
        "--http1.1"
    });
    let url_base = match (&v.session, v.https_port) {
        (Some(s), Some(port)) => {
            command
                .arg("--cacert")
                .arg(&setup.env.ca)
                .arg("--resolve")
                .arg(format!("{}:{port}:127.0.0.1", s.host))
                .arg("-H")
                .arg(format!("Cookie: {}", s.cookie));
            format!("https://{}:{port}", s.host)
        }
        (Some(s), None) => {
            // The relay's plain-HTTP front: routed by Host, unlocked by the cookie.
            command
                .arg("-H")
                .arg(format!("Host: {}", s.host))
                .arg("-H")
                .arg(format!("Cookie: {}", s.cookie));
            base.clone()
        }
        _ => {
            if base.starts_with("https://") {
                command.arg("--cacert").arg(&setup.env.ca);
            }
            base.clone()
        }
    };
    let response_file = setup.env.dir.join("curl-response");
    let _ = std::fs::remove_file(&response_file);
    command.arg("-o").arg(&response_file);
    if upload {
        command
            .arg("-T")
            .arg(upload_file)
            .arg("-w")
            .arg("%{http_code} %{size_upload} %{time_total}")
            .arg(format!("{url_base}/upload"));
    } else {
        command
            .arg("-w")
            .arg("%{http_code} %{size_download} %{time_total}")
            .arg(format!("{url_base}{download_path}"));
    }
    let before = v.cpu.snapshot();
    let out = command.output().context("running curl")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let fields: Vec<&str> = text.split_whitespace().collect();
    let (code, size, secs) = match fields.as_slice() {
        [c, s, t] => (
            c.parse::<u16>().unwrap_or(0),
            s.parse::<f64>().unwrap_or(0.0),
            t.parse::<f64>().unwrap_or(f64::NAN),
        ),
        _ => bail!(
            "curl: unexpected output {text:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    };
    if code != 200 || size as u64 != bytes {
        bail!(
            "curl: HTTP {code}, {size} of {bytes} bytes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if upload {
        let received: u64 = std::fs::read_to_string(&response_file)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        if received != bytes {
            bail!("upload: the sink received {received} of {bytes} bytes");
        }
    }
    Ok(Transfer {
        mb_s: bytes as f64 / secs / MB,
        cpu_us_per_mb: v.cpu.per_unit(&before, bytes as f64 / MB),
    })
}
