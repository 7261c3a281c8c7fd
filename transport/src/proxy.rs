//! HTTP `CONNECT` proxies for the TCP transport, chosen as curl and git choose them.
//!
//! Compute nodes often reach the outside only through `https_proxy=http://proxy:3128`.
//! The agent tunnels its TLS connection to the relay through such a proxy with `CONNECT`
//! (basic auth when the URL has `user:password@`). Which proxy applies follows curl
//! (`lib/proxy.c`, `CURLOPT_NOPROXY`): `https_proxy`, then `HTTPS_PROXY`, then `all_proxy`,
//! then `ALL_PROXY`; `no_proxy` before `NO_PROXY`; an explicit `--proxy` wins over all.

use base64::Engine;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Port curl assumes for a proxy URL without one.
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// Most bytes of a proxy's answer to `CONNECT` we read: an answer head is a few hundred
/// bytes; a proxy sending more is broken or hostile.
pub const MAX_PROXY_ANSWER: usize = 8 * 1024;

/// How long the proxy may take to connect and answer `CONNECT`.
pub const PROXY_TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy to tunnel through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// `Proxy-Authorization` value (`Basic ...`), from the URL's user info.
    authorization: Option<String>,
}

impl std::fmt::Debug for Proxy {
    /// Never shows the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self)
    }
}

impl std::fmt::Display for Proxy {
    /// `http://host:port`, without credentials (for messages and logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "http://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{}:{}", self.host, self.port)
        }
    }
}

/// What went wrong with a proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy URL cannot be used.
    #[error("proxy URL {url:?}: {why}")]
    BadUrl {
        /// The URL with any password removed.
        url: String,
        /// Why.
        why: &'static str,
    },
    /// The proxy could not be reached.
    #[error("proxy {proxy} unreachable: {source}")]
    Unreachable {
        /// The proxy.
        proxy: String,
        /// The socket error.
        source: std::io::Error,
    },
    /// The proxy answered `CONNECT` with something other than 2xx.
    #[error("proxy {proxy} refused CONNECT to {target}: {status_line}")]
    Refused {
        /// The proxy.
        proxy: String,
        /// `host:port` we asked for.
        target: String,
        /// The status code.
        status: u16,
        /// The proxy's status line, as sent.
        status_line: String,
    },
    /// The proxy sent something that is not an HTTP answer.
    #[error("proxy {proxy} sent a malformed answer to CONNECT")]
    Malformed {
        /// The proxy.
        proxy: String,
    },
    /// The proxy did not answer in time.
    #[error("proxy {proxy} did not answer CONNECT within {seconds} s")]
    TimedOut {
        /// The proxy.
        proxy: String,
        /// The timeout.
        seconds: u64,
    },
}

impl Proxy {
    /// Parses a proxy URL as curl does: no scheme means `http://`, no port means 1080.
    /// Only `http://` proxies are supported (TLS to the proxy itself is not).
    pub fn parse(url: &str) -> Result<Proxy, ProxyError> {
        let bad = |why| ProxyError::BadUrl {
            url: redact(url),
            why,
        };
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(bad("only http:// proxies are supported")),
            None => url,
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport).ok_or_else(|| bad("bad host or port"))?;
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let authorization = userinfo.map(|u| {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            let plain = format!("{}:{}", percent_decode(user), percent_decode(password));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(plain)
            )
        });
        Ok(Proxy {
            host: host.to_string(),
            port: port.unwrap_or(DEFAULT_PROXY_PORT),
            authorization,
        })
    }

    /// The proxy the environment names for reaching `target_host` over TLS, or `None`
    /// (no proxy variable set, or `NO_PROXY` matches the host).
    pub fn from_env(target_host: &str) -> Result<Option<Proxy>, ProxyError> {
        Self::from_vars(target_host, |name| std::env::var(name).ok())
    }

    /// [`Proxy::from_env`] with the environment given as a function (for tests).
    pub fn from_vars(
        target_host: &str,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Proxy>, ProxyError> {
        let set = |name: &str| var(name).filter(|v| !v.is_empty());
        let url = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]
            .iter()
            .find_map(|n| set(n));
        let Some(url) = url else { return Ok(None) };
        let no_proxy = set("no_proxy")
            .or_else(|| set("NO_PROXY"))
            .unwrap_or_default();
        if no_proxy_matches(&no_proxy, target_host) {
            return Ok(None);
        }
        Proxy::parse(&url).map(Some)
    }

    /// Connects to the proxy and asks it for a tunnel to `host:port`; returns the TCP
    /// stream carrying the tunnel. Bounded by [`PROXY_TIMEOUT`].
    pub async fn connect(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        match tokio::time::timeout(PROXY_TIMEOUT, self.connect_unbounded(host, port)).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::TimedOut {
                proxy: self.to_string(),
                seconds: PROXY_TIMEOUT.as_secs(),
            }),
        }
    }

    async fn connect_unbounded(&self, host: &str, port: u16) -> Result<TcpStream, ProxyError> {
        let unreachable = |source| ProxyError::Unreachable {
            proxy: self.to_string(),
            source,
        };
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(unreachable)?;
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &self.authorization {
            request.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(unreachable)?;
        let head = read_answer_head(&mut stream).await.map_err(|e| match e {
            Some(source) => ProxyError::Unreachable {
                proxy: self.to_string(),
                source,
            },
            None => ProxyError::Malformed {
                proxy: self.to_string(),
            },
        })?;
        let status_line = head.lines().next().unwrap_or_default().trim().to_string();
        let status = parse_status(&status_line).ok_or_else(|| ProxyError::Malformed {
            proxy: self.to_string(),
        })?;
        if !(200..300).contains(&status) {
            return Err(ProxyError::Refused {
                proxy: self.to_string(),
                target,
                status,
                status_line,
            });
        }
        Ok(stream)
    }
}

/// Reads the answer head byte by byte up to the blank line, so that no byte of the
/// tunnelled TLS stream is consumed. `Err(None)`: too long or closed early.
async fn read_answer_head(stream: &mut TcpStream) -> Result<String, Option<std::io::Error>> {
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_ANSWER {
            return Err(None);
        }
        let byte = stream.read_u8().await.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => None,
            _ => Some(e),
        })?;
        head.push(byte);
    }
    String::from_utf8(head).map_err(|_| None)
}

fn parse_status(status_line: &str) -> Option<u16> {
    let mut parts = status_line.split_whitespace();
    let version = parts.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Whether `NO_PROXY` (curl's rules) exempts `host`: a comma list, blanks skipped; `*`
/// alone matches all; an entry matches the host itself or as a dot-bounded suffix
/// (`example.com` matches `www.example.com`, `ample.com` does not); leading and trailing
/// dots are ignored; case-insensitive; a `:port` on an entry is ignored; CIDR entries
/// match IP-literal hosts.
pub fn no_proxy_matches(no_proxy: &str, host: &str) -> bool {
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.');
    if no_proxy.trim() == "*" {
        return true;
    }
    let host_ip: Option<std::net::IpAddr> = host.parse().ok();
    no_proxy
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            if let (Some(ip), Some((net, bits))) = (host_ip, entry.split_once('/')) {
                return cidr_contains(net, bits, ip);
            }
            let entry = strip_port(entry)
                .trim_start_matches('.')
                .trim_end_matches('.');
            if entry.is_empty() {
                return false;
            }
            if host.eq_ignore_ascii_case(entry) {
                return true;
            }
            host.len() > entry.len()
                && host[host.len() - entry.len()..].eq_ignore_ascii_case(entry)
                && host.as_bytes()[host.len() - entry.len() - 1] == b'.'
        })
}

fn strip_port(entry: &str) -> &str {
    if let Some(inner) = entry.strip_prefix('[') {
        return inner.split(']').next().unwrap_or(inner);
    }
    match entry.rsplit_once(':') {
        // One colon: host:port. More: an unbracketed IPv6 address, kept whole.
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => entry,
    }
}

fn cidr_contains(net: &str, bits: &str, ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    let (Ok(net), Ok(bits)) = (net.parse::<IpAddr>(), bits.parse::<u32>()) else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn split_host_port(hostport: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(port) => Some((host, Some(port.parse().ok()?))),
            None if after.is_empty() => Some((host, None)),
            None => None,
        };
    }
    match hostport.rsplit_once(':') {
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((hostport, None)),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URL with any `user:password@` removed, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}{}", &url[..s + 3], &url[at + 1..]),
        (None, Some(at)) => url[at + 1..].to_string(),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_follows_curl() {
        // Cases after curl's unit test 1614 and CURLOPT_NOPROXY.
        assert!(no_proxy_matches("example.com", "www.example.com"));
        assert!(no_proxy_matches("example.com", "EXAMPLE.com"));
        assert!(no_proxy_matches(".example.com", "example.com"));
        assert!(no_proxy_matches("example.com.", "www.example.com"));
        assert!(!no_proxy_matches("ample.com", "www.example.com"));
        assert!(!no_proxy_matches("www.example.com", "example.com"));
        assert!(no_proxy_matches("foo, , example.com:443", "example.com"));
        assert!(no_proxy_matches("*", "anything"));
        assert!(!no_proxy_matches("*.example.com", "www.example.com"));
        assert!(no_proxy_matches("10.0.0.0/8", "10.1.2.3"));
        assert!(!no_proxy_matches("10.0.0.0/8", "11.1.2.3"));
        assert!(no_proxy_matches("::1", "[::1]"));
        assert!(no_proxy_matches("fe80::/16", "fe80::1"));
        assert!(!no_proxy_matches("", "example.com"));
    }

    #[test]
    fn proxy_urls_parse_as_curl_reads_them() {
        let p = Proxy::parse("proxy.site").expect("bare host");
        assert_eq!(
            (p.host.as_str(), p.port),
            ("proxy.site", DEFAULT_PROXY_PORT)
        );
        let p = Proxy::parse("http://u%40x:p%3Aw@proxy:3128/").expect("with auth");
        assert_eq!((p.host.as_str(), p.port), ("proxy", 3128));
        let expected = base64::engine::general_purpose::STANDARD.encode("u@x:p:w");
        assert_eq!(
            p.authorization.as_deref(),
            Some(format!("Basic {expected}").as_str())
        );
        assert!(
            !format!("{p:?}").contains("p:w"),
            "credentials must not be shown"
        );
        let p = Proxy::parse("http://[::1]:8080").expect("ipv6");
        assert_eq!((p.host.as_str(), p.port), ("::1", 8080));
        let err = Proxy::parse("socks5://user:secret@h:1").expect_err("socks unsupported");
        assert!(!err.to_string().contains("secret"));
    }

    #[test]
    fn environment_precedence_is_curls() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let got = Proxy::from_vars(
            "relay.example",
            env(&[("HTTPS_PROXY", "a:1"), ("https_proxy", "b:2")]),
        );
        assert_eq!(got.expect("ok").map(|p| p.host), Some("b".into()));
        let got = Proxy::from_vars("relay.example", env(&[("ALL_PROXY", "c:3")]));
        assert_eq!(got.expect("ok").map(|p| p.host), Some("c".into()));
        let got = Proxy::from_vars(
            "relay.example",
            env(&[("https_proxy", "b:2"), ("NO_PROXY", "example")]),
        );
        assert!(
            got.expect("ok").is_none(),
            "NO_PROXY=example exempts relay.example"
        );
        let got = Proxy::from_vars(
            "relay.example",
            env(&[
                ("https_proxy", "b:2"),
                ("no_proxy", "other"),
                ("NO_PROXY", "relay.example"),
            ]),
        );
        assert!(
            got.expect("ok").is_some(),
            "no_proxy is read before NO_PROXY"
        );
    }
}
