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
//! The kernel gives each socket's owner directly, in this network namespace (the app
//! shares it, in a container too). It is asked over netlink (`NETLINK_SOCK_DIAG`, what
//! `ss -tl` uses) for the listening sockets only: the kernel filters by state, so the
//! answer is as quick on a node with 100,000 sockets as on an idle one. The socket tables
//! (`/proc/net/tcp`, `/proc/net/tcp6`) list every socket, and reading them took 26-34 ms
//! with 14,000 connections in `TIME_WAIT` (measured): the time between the app being
//! ready and the URL being printed. They remain the fallback where netlink is not
//! available. If neither can be read, nothing is known and nothing is refused.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

/// The kernel's TCP socket tables, IPv4 then IPv6.
const TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// `st` of a listening socket in those tables (`TCP_LISTEN`).
const LISTEN_STATE: &str = "0A";

/// The uid of another user's listener that would take connections to `target`, if any.
pub fn foreign_listener(target: SocketAddr, own_uid: u32) -> Option<u32> {
    listeners()
        .into_iter()
        .find(|(local, uid)| *uid != own_uid && covers(*local, target))
        .map(|(_, uid)| uid)
}

/// Every listening TCP socket in this network namespace with its owner's uid: from
/// netlink, or from the socket tables where netlink fails (a restricted sandbox).
fn listeners() -> Vec<(SocketAddr, u32)> {
    let mut all = Vec::new();
    for family in [nix::libc::AF_INET, nix::libc::AF_INET6] {
        match sock_diag_listeners(family as u8) {
            Ok(found) => all.extend(found),
            Err(e) => {
                tracing::debug!(
                    "netlink socket diagnostics unavailable ({e}): reading the socket tables"
                );
                return table_listeners();
            }
        }
    }
    all
}

/// The listening sockets the socket tables show (every socket is listed; slow with many).
fn table_listeners() -> Vec<(SocketAddr, u32)> {
    TABLES
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(parse_listener)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Netlink message type of a socket diagnostics request and its answers.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// Netlink header flags: a request, for every matching object (a dump).
const NLM_F_REQUEST_DUMP: u16 = 0x1 | 0x300;
/// Netlink message types that end a dump: an error, or done.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Bytes in a netlink message header.
const NLMSG_HDRLEN: usize = 16;
/// Bytes in `struct inet_diag_req_v2` and in `struct inet_diag_msg`.
const DIAG_REQ_LEN: usize = 56;
const DIAG_MSG_LEN: usize = 72;
/// The kernel's `TCP_LISTEN` state number.
const TCP_LISTEN: u8 = 10;
/// How long to wait for the kernel's answer before falling back to the tables.
const SOCK_DIAG_TIMEOUT: Duration = Duration::from_secs(1);
/// Receive buffer for the answer (the kernel fills up to a page or so per read).
const SOCK_DIAG_BUF: usize = 32 * 1024;

/// Asks the kernel over netlink for the listening TCP sockets of one address family.
fn sock_diag_listeners(family: u8) -> io::Result<Vec<(SocketAddr, u32)>> {
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    let timeout = TimeVal::new(SOCK_DIAG_TIMEOUT.as_secs() as _, 0);
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    let request = listeners_request(family);
    socket::sendto(
        fd.as_raw_fd(),
        &request,
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; SOCK_DIAG_BUF];
    loop {
        let n = socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if parse_diag_answer(&buf[..n], &mut found)? {
            return Ok(found);
        }
    }
}

/// A dump request for every listening TCP socket of `family` (`nlmsghdr` followed by
/// `inet_diag_req_v2`, in host byte order like every netlink header).
fn listeners_request(family: u8) -> [u8; NLMSG_HDRLEN + DIAG_REQ_LEN] {
    let mut req = [0u8; NLMSG_HDRLEN + DIAG_REQ_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDRLEN + DIAG_REQ_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&NLM_F_REQUEST_DUMP.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number
    req[16] = family;
    req[17] = nix::libc::IPPROTO_TCP as u8;
    req[20..24].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes()); // states wanted
    req[64..72].fill(0xff); // socket id's cookie: none
    req
}

/// Reads the messages of one netlink datagram into `found`; `Ok(true)` once the dump is
/// done. A message that does not fit, or an error from the kernel, is an error.
fn parse_diag_answer(mut buf: &[u8], found: &mut Vec<(SocketAddr, u32)>) -> io::Result<bool> {
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed netlink answer");
    while !buf.is_empty() {
        let header = buf.get(..NLMSG_HDRLEN).ok_or_else(malformed)?;
        let len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = u16::from_ne_bytes([header[4], header[5]]);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(malformed());
        }
        let payload = &buf[NLMSG_HDRLEN..len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = payload.get(..4).ok_or_else(malformed)?;
                let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                return Err(io::Error::from_raw_os_error(code.saturating_neg()));
            }
            SOCK_DIAG_BY_FAMILY => found.extend(parse_diag_msg(payload)),
            _ => {}
        }
        // Messages are padded to 4 bytes.
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(false)
}

/// A listening socket's address and owner from one `inet_diag_msg`, or `None` for any
/// other socket or a message too short.
fn parse_diag_msg(msg: &[u8]) -> Option<(SocketAddr, u32)> {
    let msg = msg.get(..DIAG_MSG_LEN)?;
    if msg[1] != TCP_LISTEN {
        return None;
    }
    let port = u16::from_be_bytes([msg[4], msg[5]]);
    let src = &msg[8..24];
    let ip = match i32::from(msg[0]) {
        nix::libc::AF_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        nix::libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(src).ok()?)),
        _ => return None,
    };
    let uid = u32::from_ne_bytes([msg[64], msg[65], msg[66], msg[67]]);
    Some((SocketAddr::new(ip, port), uid))
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

    fn sample_listeners() -> Vec<(SocketAddr, u32)> {
        TCP.lines().skip(1).filter_map(parse_listener).collect()
    }

    #[test]
    fn listening_sockets_parse_with_their_owner() {
        if cfg!(target_endian = "big") {
            return; // the sample lines are little-endian
        }
        assert_eq!(
            sample_listeners(),
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
    fn the_kernel_names_our_listeners_over_netlink_as_the_tables_do() {
        let uid = nix::unistd::getuid().as_raw();
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let v4 = v4.local_addr().expect("addr");
        let found = sock_diag_listeners(nix::libc::AF_INET as u8).expect("netlink answers");
        assert!(found.contains(&(v4, uid)), "{v4} not in {found:?}");
        assert!(table_listeners().contains(&(v4, uid)));
        // A connected socket is not a listener.
        let conn = std::net::TcpStream::connect(v4).expect("connect");
        let local = conn.local_addr().expect("addr");
        let found = sock_diag_listeners(nix::libc::AF_INET as u8).expect("netlink answers");
        assert!(
            !found.iter().any(|(addr, _)| *addr == local),
            "{local} listed"
        );
        if let Ok(v6) = std::net::TcpListener::bind("[::1]:0") {
            let v6 = v6.local_addr().expect("addr");
            let found = sock_diag_listeners(nix::libc::AF_INET6 as u8).expect("netlink answers");
            assert!(found.contains(&(v6, uid)), "{v6} not in {found:?}");
        }
    }

    /// One netlink message: header (length, type) and payload, padded to 4 bytes.
    fn message(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = ((NLMSG_HDRLEN + payload.len()) as u32)
            .to_ne_bytes()
            .to_vec();
        m.extend(kind.to_ne_bytes());
        m.extend([0; 10]);
        m.extend(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn diag_msg(state: u8, ip: [u8; 4], port: u16, uid: u32) -> Vec<u8> {
        let mut m = vec![0u8; DIAG_MSG_LEN];
        m[0] = nix::libc::AF_INET as u8;
        m[1] = state;
        m[4..6].copy_from_slice(&port.to_be_bytes());
        m[8..12].copy_from_slice(&ip);
        m[64..68].copy_from_slice(&uid.to_ne_bytes());
        m
    }

    #[test]
    fn a_diagnostics_answer_parses_and_a_broken_one_is_an_error() {
        let mut answer = message(
            SOCK_DIAG_BY_FAMILY,
            &diag_msg(10, [127, 0, 0, 1], 8080, 1001),
        );
        answer.extend(message(
            SOCK_DIAG_BY_FAMILY,
            &diag_msg(1, [127, 0, 0, 1], 8081, 1002),
        ));
        let mut found = Vec::new();
        assert!(!parse_diag_answer(&answer, &mut found).expect("parses"));
        assert_eq!(found, [("127.0.0.1:8080".parse().expect("addr"), 1001)]);
        assert!(parse_diag_answer(&message(NLMSG_DONE, &[0; 4]), &mut found).expect("done"));

        let error = message(NLMSG_ERROR, &(-nix::libc::EPERM).to_ne_bytes());
        let e = parse_diag_answer(&error, &mut found).expect_err("the kernel's error");
        assert_eq!(e.raw_os_error(), Some(nix::libc::EPERM));
        // Cut short, a length past the end, a length below the header: errors, no panic.
        assert!(parse_diag_answer(&answer[..10], &mut found).is_err());
        let mut long = answer.clone();
        long[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_diag_answer(&long, &mut found).is_err());
        long[0..4].copy_from_slice(&3u32.to_ne_bytes());
        assert!(parse_diag_answer(&long, &mut found).is_err());
        // A message too short for a socket is skipped.
        let short = message(SOCK_DIAG_BY_FAMILY, &[0; 8]);
        let before = found.len();
        assert!(!parse_diag_answer(&short, &mut found).expect("parses"));
        assert_eq!(found.len(), before);
    }

    #[test]
    fn our_own_listener_is_not_foreign() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let uid = nix::unistd::getuid().as_raw();
        assert_eq!(foreign_listener(addr, uid), None);
        // Seen from another uid, it is foreign.
        assert_eq!(foreign_listener(addr, uid.wrapping_add(1)), Some(uid));
    }
}
