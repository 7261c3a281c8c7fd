//! Who owns the TCP listener the agent forwards to.
//!
//! `{port}` is a port the agent found free by binding and closing it, then gave to the
//! app: another user on the node could bind it in between, and the agent would forward
//! its user's traffic (tokens in URLs, cookies) to that user's listener. This cannot be
//! prevented for TCP (a unix socket in a 0700 directory, `{sock}`, can), but it can be
//! seen: once the port accepts connections, a listener that covers it and belongs to
//! another uid is someone else's, and the agent refuses to serve. Once the app holds the
//! port, nobody else can bind it (`SO_REUSEPORT` is per uid).
//!
//! The kernel's socket tables (`/proc/net/tcp`, `/proc/net/tcp6`) give each socket's
//! owner directly, in this network namespace (the app shares it, in a container too).
//! If they cannot be read, nothing is known and nothing is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The kernel's TCP socket tables, IPv4 then IPv6.
const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// `st` of a listening socket in those tables (`TCP_LISTEN`).
const LISTEN_STATE: &str = "0A";

/// The uid of another user's listener that would take connections to `target`, if any.
pub fn foreign_listener(target: SocketAddr, own_uid: u32) -> Option<u32> {
    TABLES
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(parse_listener)
                .collect::<Vec<_>>()
        })
        .find(|(local, uid)| *uid != own_uid && covers(*local, target))
        .map(|(_, uid)| uid)
}

/// A listening socket's local address and owner from one table line, or `None` for any
/// other line.
fn parse_listener(line: &str) -> Option<(SocketAddr, u32)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, uid) = (fields.get(1)?, fields.get(3)?, fields.get(7)?);
    if *state != LISTEN_STATE {
        return None;
    }
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some((SocketAddr::new(parse_ip(ip)?, port), uid.parse().ok()?))
}

/// The kernel prints an address as 32-bit words in host byte order, each holding four
/// bytes of the address in network order.
fn parse_ip(hex: &str) -> Option<IpAddr> {
    let mut bytes = Vec::with_capacity(16);
    for word in hex.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        16 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

/// Whether a listener bound to `local` receives connections made to `target`.
fn covers(local: SocketAddr, target: SocketAddr) -> bool {
    if local.port() != target.port() {
        return false;
    }
    let ip = match local.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    // `::` takes IPv4 connections too unless the socket is v6-only: count it.
    ip.is_unspecified() || ip == target.ip()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as the kernel writes them on a little-endian machine.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 95290 1
   1: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1002        0 95291 1
   2: 0100007F:1F92 0100007F:B3E2 01 00000000:00000000 00:00000000 00000000  1003        0 0 3";

    fn listeners() -> Vec<(SocketAddr, u32)> {
        TCP.lines().skip(1).filter_map(parse_listener).collect()
    }

    #[test]
    fn listening_sockets_parse_with_their_owner() {
        if cfg!(target_endian = "big") {
            return; // the sample lines are little-endian
        }
        assert_eq!(
            listeners(),
            [
                ("127.0.0.1:8080".parse().expect("addr"), 1001),
                ("0.0.0.0:8081".parse().expect("addr"), 1002),
            ]
        );
        let v6 = "   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1 1";
        assert_eq!(
            parse_listener(v6),
            Some(("[::]:8080".parse().expect("addr"), 1001))
        );
    }

    #[test]
    fn a_listener_covers_its_address_and_wildcards_cover_everything() {
        let target: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        for local in [
            "127.0.0.1:8080",
            "0.0.0.0:8080",
            "[::]:8080",
            "[::ffff:127.0.0.1]:8080",
        ] {
            assert!(covers(local.parse().expect("addr"), target), "{local}");
        }
        for local in ["127.0.0.2:8080", "127.0.0.1:8081", "[::1]:8080"] {
            assert!(!covers(local.parse().expect("addr"), target), "{local}");
        }
    }

    #[test]
    fn our_own_listener_is_not_foreign() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(foreign_listener(addr, uid), None);
        // Seen from another uid, it is foreign (when the tables are readable at all).
        if std::fs::read_to_string(TABLES[0]).is_ok() {
            assert_eq!(foreign_listener(addr, uid.wrapping_add(1)), Some(uid));
        }
    }
}
