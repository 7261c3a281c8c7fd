//! Request and response heads: the first frame on each request stream.
//!
//! Binary, big-endian, length-prefixed fields (see `docs/protocol.md`):
//!
//! ```text
//! RequestHead  := 0x01 method:str16 target:str32 client:addr headers
//! ResponseHead := 0x02 status:u16 headers
//! headers      := count:u16 (name:str16 value:str32){count}
//! addr         := 0x00 | 0x04 ip:4 port:u16 | 0x06 ip:16 port:u16
//! ```
//!
//! Decoding validates everything with the `http` crate's parsers (method, target, header
//! names and values, status), so a head that decodes is a well-formed HTTP head.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Uri};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use thiserror::Error;

const REQUEST_TAG: u8 = 0x01;
/// Longest encoded client address: family, an IPv6 address, a port.
const MAX_ADDR_LEN: usize = 1 + 16 + 2;
const RESPONSE_TAG: u8 = 0x02;
/// Most header fields one head may carry.
pub const MAX_HEADER_COUNT: usize = 1024;

/// Why a head frame could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum HeadError {
    /// The frame ended inside a field.
    #[error("head frame is truncated")]
    Truncated,
    /// Bytes were left after the last field.
    #[error("head frame has trailing bytes")]
    TrailingBytes,
    /// The first byte names another kind of head.
    #[error("unexpected head kind {0:#04x}")]
    WrongKind(u8),
    /// The method is not a valid HTTP method token.
    #[error("invalid method")]
    BadMethod,
    /// The request target is not a valid URI.
    #[error("invalid request target")]
    BadTarget,
    /// The status is outside 100..=999.
    #[error("invalid status code")]
    BadStatus,
    /// A header name is not a valid token.
    #[error("invalid header name")]
    BadHeaderName,
    /// A header value holds forbidden bytes.
    #[error("invalid header value")]
    BadHeaderValue,
    /// More than [`MAX_HEADER_COUNT`] header fields.
    #[error("too many header fields")]
    TooManyHeaders,
    /// Unknown client address family.
    #[error("invalid client address")]
    BadAddress,
}

/// The head of one forwarded request (relay → agent).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestHead {
    /// HTTP method.
    pub method: Method,
    /// Request target in origin form (`/path?query`), or `*`.
    pub target: Uri,
    /// Header fields to pass to the app, hop-by-hop fields already removed, `Host` kept.
    pub headers: HeaderMap,
    /// The HTTP client's address as the relay saw it.
    pub client: Option<SocketAddr>,
}

/// The head of one response (agent → relay).
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseHead {
    /// HTTP status.
    pub status: StatusCode,
    /// Header fields from the app.
    pub headers: HeaderMap,
}

impl RequestHead {
    /// The head as one complete frame, ready to write on the stream. Sized exactly: the
    /// stream holds it until the peer acknowledges it.
    pub fn to_frame(&self) -> Vec<u8> {
        let target = self
            .target
            .path_and_query()
            .map_or(1, |pq| pq.as_str().len());
        let len = 1 + 2 + self.method.as_str().len() + 4 + target + MAX_ADDR_LEN;
        let mut out =
            Vec::with_capacity(crate::FRAME_HEADER_LEN + len + headers_len(&self.headers));
        crate::encode_frame_with(&mut out, |out| self.encode(out));
        out
    }

    /// Appends the encoded head to `out` (no frame header).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(REQUEST_TAG);
        put_str16(out, self.method.as_str().as_bytes());
        let target = self.target.path_and_query().map_or("/", |pq| pq.as_str());
        let target = if self.target == "*" { "*" } else { target };
        put_str32(out, target.as_bytes());
        match self.client {
            None => out.push(0),
            Some(SocketAddr::V4(a)) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            Some(SocketAddr::V6(a)) => {
                out.push(6);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
        }
        put_headers(out, &self.headers);
    }

    /// Decodes a head from a whole frame payload (copying the target and header values).
    pub fn decode(payload: &[u8]) -> Result<Self, HeadError> {
        Self::decode_from(Reader::copying(payload))
    }

    /// Decodes a head from a whole frame payload, sharing its bytes: the target and the
    /// header values point into `payload` instead of each being copied (one allocation
    /// per field saved on every request).
    pub fn decode_shared(payload: &Bytes) -> Result<Self, HeadError> {
        Self::decode_from(Reader::sharing(payload))
    }

    fn decode_from(mut r: Reader<'_>) -> Result<Self, HeadError> {
        let tag = r.u8()?;
        if tag != REQUEST_TAG {
            return Err(HeadError::WrongKind(tag));
        }
        let method = Method::from_bytes(r.str16()?).map_err(|_| HeadError::BadMethod)?;
        let target = r.str32()?;
        if target.is_empty() {
            return Err(HeadError::BadTarget);
        }
        let target =
            Uri::from_maybe_shared(r.bytes_of(target)).map_err(|_| HeadError::BadTarget)?;
        if target.scheme().is_some() || (target.path_and_query().is_none() && target != "*") {
            return Err(HeadError::BadTarget);
        }
        let client = match r.u8()? {
            0 => None,
            4 => {
                let ip: [u8; 4] = r.take(4)?.try_into().map_err(|_| HeadError::Truncated)?;
                Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), r.u16()?))
            }
            6 => {
                let ip: [u8; 16] = r.take(16)?.try_into().map_err(|_| HeadError::Truncated)?;
                Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), r.u16()?))
            }
            _ => return Err(HeadError::BadAddress),
        };
        let headers = r.headers()?;
        r.finish()?;
        Ok(Self {
            method,
            target,
            headers,
            client,
        })
    }
}

impl ResponseHead {
    /// The head as one complete frame, ready to write on the stream (sized exactly).
    pub fn to_frame(&self) -> Vec<u8> {
        let len = crate::FRAME_HEADER_LEN + 1 + 2 + headers_len(&self.headers);
        let mut out = Vec::with_capacity(len);
        crate::encode_frame_with(&mut out, |out| self.encode(out));
        out
    }

    /// Appends the encoded head to `out` (no frame header).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(RESPONSE_TAG);
        out.extend_from_slice(&self.status.as_u16().to_be_bytes());
        put_headers(out, &self.headers);
    }

    /// Decodes a head from a whole frame payload (copying the header values).
    pub fn decode(payload: &[u8]) -> Result<Self, HeadError> {
        Self::decode_from(Reader::copying(payload))
    }

    /// Decodes a head from a whole frame payload, its header values pointing into
    /// `payload` (see [`RequestHead::decode_shared`]).
    pub fn decode_shared(payload: &Bytes) -> Result<Self, HeadError> {
        Self::decode_from(Reader::sharing(payload))
    }

    fn decode_from(mut r: Reader<'_>) -> Result<Self, HeadError> {
        let tag = r.u8()?;
        if tag != RESPONSE_TAG {
            return Err(HeadError::WrongKind(tag));
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| HeadError::BadStatus)?;
        let headers = r.headers()?;
        r.finish()?;
        Ok(Self { status, headers })
    }
}

fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s[..usize::from(len)]);
}

fn put_str32(out: &mut Vec<u8>, s: &[u8]) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s[..len as usize]);
}

/// The encoded size of `headers` (at most: `put_headers` may cut a field or the count).
fn headers_len(headers: &HeaderMap) -> usize {
    let fields: usize = headers
        .iter()
        .map(|(name, value)| 2 + name.as_str().len() + 4 + value.len())
        .sum();
    2 + fields
}

fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    let count = headers.len().min(MAX_HEADER_COUNT);
    out.extend_from_slice(&(count as u16).to_be_bytes());
    for (name, value) in headers.iter().take(count) {
        put_str16(out, name.as_str().as_bytes());
        put_str32(out, value.as_bytes());
    }
}

/// Set by the relay: the client's address as the relay's TCP peer saw it.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// Set by the relay: always `https` (the front door, or the TLS load balancer before it).
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// Set by the relay: the host (and port) the client asked for.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The names the relay adds to every request that are not among the `http` crate's
/// standard names: matched when decoding, so that they allocate nothing.
static FORWARDED_NAMES: [HeaderName; 3] = [X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO];

fn header_name(name: &[u8]) -> Result<HeaderName, HeadError> {
    if let Some(known) = FORWARDED_NAMES
        .iter()
        .find(|known| known.as_str().as_bytes() == name)
    {
        return Ok(known.clone());
    }
    HeaderName::from_bytes(name).map_err(|_| HeadError::BadHeaderName)
}

/// A cursor over a payload; every read checks bounds.
struct Reader<'a> {
    /// What is left to read.
    rest: &'a [u8],
    /// The whole payload, when fields may share it rather than be copied.
    shared: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    fn copying(payload: &'a [u8]) -> Self {
        Self {
            rest: payload,
            shared: None,
        }
    }

    fn sharing(payload: &'a Bytes) -> Self {
        Self {
            rest: payload,
            shared: Some(payload),
        }
    }

    /// `field` (read from this payload) as `Bytes`: a shared slice, or a copy.
    fn bytes_of(&self, field: &'a [u8]) -> Bytes {
        match self.shared {
            // `field` was taken from `payload`, so it lies within it.
            Some(payload) => payload.slice_ref(field),
            None => Bytes::copy_from_slice(field),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], HeadError> {
        if self.rest.len() < n {
            return Err(HeadError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, HeadError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, HeadError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, HeadError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn str16(&mut self) -> Result<&'a [u8], HeadError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn str32(&mut self) -> Result<&'a [u8], HeadError> {
        let len = self.u32()?;
        self.take(len as usize)
    }

    fn headers(&mut self) -> Result<HeaderMap, HeadError> {
        let count = usize::from(self.u16()?);
        if count > MAX_HEADER_COUNT {
            return Err(HeadError::TooManyHeaders);
        }
        let mut headers = HeaderMap::with_capacity(count);
        for _ in 0..count {
            let name = header_name(self.str16()?)?;
            let value = self.str32()?;
            let value = HeaderValue::from_maybe_shared(self.bytes_of(value))
                .map_err(|_| HeadError::BadHeaderValue)?;
            headers.append(name, value);
        }
        Ok(headers)
    }

    fn finish(&self) -> Result<(), HeadError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(HeadError::TrailingBytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_request() -> RequestHead {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("abc.example.org"));
        headers.append("cookie", HeaderValue::from_static("a=1"));
        headers.append("cookie", HeaderValue::from_static("b=2"));
        RequestHead {
            method: Method::POST,
            target: Uri::from_static("/api/x?y=1"),
            headers,
            client: Some("[2001:db8::1]:5555".parse().expect("addr")),
        }
    }

    #[test]
    fn request_head_round_trips_with_repeated_headers() {
        let head = sample_request();
        let frame = head.to_frame();
        // IPv6 client: the size estimate is exact.
        assert_eq!(frame.capacity(), frame.len(), "sized exactly, no regrowth");
        let (payload, used) = crate::decode_frame(&frame, crate::MAX_HEAD_FRAME)
            .expect("frame")
            .expect("whole");
        assert_eq!(used, frame.len());
        assert_eq!(RequestHead::decode(payload), Ok(head));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let mut out = Vec::new();
        sample_request().encode(&mut out);
        for cut in 0..out.len() {
            assert!(RequestHead::decode(&out[..cut]).is_err());
        }
        out.push(0);
        assert_eq!(RequestHead::decode(&out), Err(HeadError::TrailingBytes));
    }

    #[test]
    fn absolute_targets_and_bad_header_bytes_are_refused() {
        let mut forged = vec![REQUEST_TAG];
        put_str16(&mut forged, b"GET");
        put_str32(&mut forged, b"http://evil/");
        forged.push(0);
        forged.extend_from_slice(&0u16.to_be_bytes());
        assert_eq!(RequestHead::decode(&forged), Err(HeadError::BadTarget));

        let mut bad_value = vec![RESPONSE_TAG, 0, 200, 0, 1];
        put_str16(&mut bad_value, b"x-a");
        put_str32(&mut bad_value, b"line\r\nbreak");
        assert_eq!(
            ResponseHead::decode(&bad_value),
            Err(HeadError::BadHeaderValue)
        );
    }

    #[test]
    fn a_shared_decode_points_into_the_frame_and_equals_a_copying_one() {
        let mut head = sample_request();
        head.headers
            .insert("x-forwarded-for", HeaderValue::from_static("192.0.2.7"));
        let mut out = Vec::new();
        head.encode(&mut out);
        let payload = Bytes::from(out);
        let shared = RequestHead::decode_shared(&payload).expect("decodes");
        assert_eq!(shared, head);
        assert_eq!(RequestHead::decode(&payload), Ok(head));
        let within = payload.as_ptr_range();
        for value in shared.headers.values() {
            assert!(
                within.contains(&value.as_bytes().as_ptr()),
                "{value:?} was copied"
            );
        }

        let response = ResponseHead {
            status: StatusCode::OK,
            headers: shared.headers,
        };
        let mut out = Vec::new();
        response.encode(&mut out);
        let payload = Bytes::from(out);
        assert_eq!(ResponseHead::decode_shared(&payload), Ok(response));
    }

    proptest! {
        #[test]
        fn response_heads_round_trip(status in 100u16..1000, values in proptest::collection::vec("[ -~]{0,40}", 0..20)) {
            let mut headers = HeaderMap::new();
            for (i, v) in values.iter().enumerate() {
                let name = HeaderName::from_bytes(format!("x-h{}", i % 5).as_bytes()).expect("name");
                headers.append(name, HeaderValue::from_str(v).expect("value"));
            }
            let head = ResponseHead { status: StatusCode::from_u16(status).expect("status"), headers };
            let mut out = Vec::new();
            head.encode(&mut out);
            prop_assert_eq!(ResponseHead::decode(&out), Ok(head.clone()));
            prop_assert_eq!(ResponseHead::decode_shared(&Bytes::from(out)), Ok(head));
        }

        #[test]
        fn request_heads_round_trip(path in "/[a-zA-Z0-9/._~-]{0,60}", query in proptest::option::of("[a-z0-9=&]{0,30}"), port in 0u16..) {
            let target = match &query { Some(q) => format!("{path}?{q}"), None => path.clone() };
            let head = RequestHead {
                method: Method::GET,
                target: target.parse().expect("uri"),
                headers: HeaderMap::new(),
                client: Some(SocketAddr::from(([10, 1, 2, 3], port))),
            };
            let mut out = Vec::new();
            head.encode(&mut out);
            prop_assert_eq!(RequestHead::decode(&out), Ok(head.clone()));
            prop_assert_eq!(RequestHead::decode_shared(&Bytes::from(out)), Ok(head));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = RequestHead::decode(&bytes);
            let _ = ResponseHead::decode(&bytes);
            let shared = Bytes::from(bytes);
            let _ = RequestHead::decode_shared(&shared);
            let _ = ResponseHead::decode_shared(&shared);
        }
    }
}
