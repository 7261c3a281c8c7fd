//! A small typed client for etcd's v3 JSON/HTTP gateway (`/v3/kv/*`, `/v3/lease/*`).
//!
//! Why not the `etcd-client` crate: it brings tonic, prost and a protobuf build step, minutes of
//! compile time for the handful of calls a relay makes (a lease, its keep-alive, conditional
//! puts, ranges). The gateway speaks the same API as JSON over HTTP/1.1 (keys and values in
//! base64, 64-bit integers as strings), which hyper already speaks. Calls are rare (a claim per
//! new session, a keep-alive every few seconds), so each opens its own connection: no pool to
//! keep healthy across an etcd restart, and the next endpoint is tried when one does not answer.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::net::TcpStream;

/// How long one etcd call may take (connect, request, answer) before the next endpoint is
/// tried. etcd answers in milliseconds; a few seconds rides out a leader election, and stays
/// under a lease's TTL so a keep-alive still lands in time on another endpoint.
pub const ETCD_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest etcd answer read: a range over every route of a large centre (20,000 sessions of
/// ~200 bytes, base64) fits with room to spare; a larger one is refused, not buffered.
pub const MAX_ETCD_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint is not `http://host:port`.
    #[error("bad etcd endpoint {0:?}: expected http://host:port")]
    BadEndpoint(String),
    /// No endpoint answered.
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// etcd answered with an error (its message).
    #[error("etcd refused: {0}")]
    Refused(String),
    /// etcd's answer was not what its API documents.
    #[error("unexpected etcd answer: {0}")]
    Malformed(String),
}

/// An etcd lease: keys written under it vanish when it is not kept alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseId(pub i64);

/// One key and its value, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The lease the key lives under (0: none).
    pub lease: i64,
}

/// The result of a conditional claim of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours now (it was free, or already held with our value).
    Won,
    /// Someone else holds it: their value.
    Held(Vec<u8>),
    /// The key is barred: the name ended for good (a shared end marker exists).
    Barred,
}

/// A client for one etcd cluster, through any of its endpoints.
#[derive(Debug, Clone)]
pub struct EtcdClient {
    /// `host:port` of each endpoint, tried in order.
    endpoints: Vec<String>,
}

impl EtcdClient {
    /// A client for `http://host:port[,http://host:port…]`.
    pub fn new(urls: &str) -> Result<Self, EtcdError> {
        let endpoints = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                let authority = u
                    .strip_prefix("http://")
                    .map(|rest| rest.trim_end_matches('/'))
                    .filter(|a| !a.is_empty() && !a.contains('/'))
                    .ok_or_else(|| EtcdError::BadEndpoint(u.to_owned()))?;
                Ok(authority.to_owned())
            })
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(EtcdError::BadEndpoint(urls.to_owned()));
        }
        Ok(Self { endpoints })
    }

    /// Grants a lease of `ttl_secs`.
    pub async fn lease_grant(&self, ttl_secs: u64) -> Result<LeaseId, EtcdError> {
        let answer = self
            .call("/v3/lease/grant", &json!({ "TTL": ttl_secs }))
            .await?;
        int_field(&answer, "ID").map(LeaseId)
    }

    /// Renews a lease; `Ok(false)` when it has already expired (its keys are gone).
    pub async fn lease_keepalive(&self, lease: LeaseId) -> Result<bool, EtcdError> {
        let answer = self
            .call("/v3/lease/keepalive", &json!({ "ID": lease.0.to_string() }))
            .await?;
        // A streaming call: the gateway wraps each message in `result`. An expired lease
        // answers a TTL of 0, which proto3 JSON leaves out.
        let result = answer.get("result").unwrap_or(&answer);
        Ok(int_field(result, "TTL").unwrap_or(0) > 0)
    }

    /// Ends a lease now: every key under it is deleted.
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({ "ID": lease.0.to_string() }))
            .await?;
        Ok(())
    }

    /// Writes `key` = `value`, under `lease` when given.
    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<(), EtcdError> {
        self.call("/v3/kv/put", &put_request(key, value, lease))
            .await?;
        Ok(())
    }

    /// Reads one key.
    pub async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, EtcdError> {
        let answer = self
            .call("/v3/kv/range", &json!({ "key": B64.encode(key) }))
            .await?;
        Ok(decode_kvs(&answer)?.into_iter().next())
    }

    /// Reads every key under `prefix`, and the store's revision they were read at (a watch
    /// started at the next revision misses nothing).
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let request =
            json!({ "key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix)) });
        let answer = self.call("/v3/kv/range", &request).await?;
        let revision = answer
            .get("header")
            .map(|h| int_field(h, "revision"))
            .transpose()?
            .unwrap_or(0);
        Ok((decode_kvs(&answer)?, revision))
    }

    /// Claims `key` for `value` under `lease` in one transaction: it wins if the key does not
    /// exist; if it does, the holder's value comes back (ours counts as won, the lease moved
    /// to this one). Two relays claiming one name at once: etcd serialises the transactions,
    /// exactly one sees the key absent.
    pub async fn claim(
        &self,
        key: &[u8],
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Claim, EtcdError> {
        let compare = json!({ "target": "CREATE", "result": "EQUAL", "create_revision": "0" });
        let Some(held) = self.put_if(key, compare, value, lease).await? else {
            return Ok(Claim::Won);
        };
        match held {
            // Ours already (a resume on the relay that held it): renew it under our lease.
            Some(kv) if kv.value == value => self.move_if_value(key, value, value, lease).await,
            Some(kv) => Ok(Claim::Held(kv.value)),
            // Deleted between compare and read cannot happen inside one txn; treat as a race.
            None => Err(EtcdError::Malformed("claim failed on a missing key".into())),
        }
    }

    /// Like [`EtcdClient::claim`] for a key that is free, but only while `bar` does not
    /// exist either, in the same transaction: a name that ended for good (its end marker
    /// written by any relay) is never claimed again, not even by a relay racing the end.
    pub async fn claim_unless(
        &self,
        key: &[u8],
        value: &[u8],
        lease: LeaseId,
        bar: &[u8],
    ) -> Result<Claim, EtcdError> {
        let (k, b) = (B64.encode(key), B64.encode(bar));
        let request = json!({
            "compare": [
                { "key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0" },
                { "key": b, "target": "CREATE", "result": "EQUAL", "create_revision": "0" },
            ],
            "success": [{ "request_put": put_request(key, value, Some(lease)) }],
            "failure": [{ "request_range": { "key": k } }, { "request_range": { "key": b } }],
        });
        let answer = self.call("/v3/kv/txn", &request).await?;
        if succeeded(&answer) {
            return Ok(Claim::Won);
        }
        let range = |i: usize| -> Result<Option<KeyValue>, EtcdError> {
            Ok(answer
                .get("responses")
                .and_then(|r| r.get(i))
                .and_then(|r| r.get("response_range"))
                .map(decode_kvs)
                .transpose()?
                .and_then(|kvs| kvs.into_iter().next()))
        };
        if range(1)?.is_some() {
            return Ok(Claim::Barred);
        }
        match range(0)? {
            // Ours already (a resume on the relay that held it): renew it under our lease.
            Some(kv) if kv.value == value => self.move_if_value(key, value, value, lease).await,
            Some(kv) => Ok(Claim::Held(kv.value)),
            // Released between the compare and now: try again once.
            None => Box::pin(self.claim_unless(key, value, lease, bar)).await,
        }
    }

    /// Writes the end marker `bar` (under `bar_lease`) and deletes `key`, if `key` holds
    /// `value` or nothing: `false` (nothing written) when another holder has it, since then
    /// the name lives on elsewhere and only a stale connection of it ended here.
    pub async fn bar_unless_held(
        &self,
        key: &[u8],
        value: &[u8],
        bar: &[u8],
        bar_value: &[u8],
        bar_lease: LeaseId,
    ) -> Result<bool, EtcdError> {
        let k = B64.encode(key);
        let put_bar = json!({ "request_put": put_request(bar, bar_value, Some(bar_lease)) });
        let ours = json!({
            "compare": [{ "key": k, "target": "VALUE", "result": "EQUAL", "value": B64.encode(value) }],
            "success": [{ "request_delete_range": { "key": k } }, put_bar.clone()],
        });
        if succeeded(&self.call("/v3/kv/txn", &ours).await?) {
            return Ok(true);
        }
        let free = json!({
            "compare": [{ "key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [put_bar],
        });
        Ok(succeeded(&self.call("/v3/kv/txn", &free).await?))
    }

    /// Creates `key` = `value` (no lease) unless it exists; what it holds afterwards.
    pub async fn create_or_get(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, EtcdError> {
        let k = B64.encode(key);
        let request = json!({
            "compare": [{ "key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [{ "request_put": put_request(key, value, None) }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let answer = self.call("/v3/kv/txn", &request).await?;
        if succeeded(&answer) {
            return Ok(value.to_vec());
        }
        answer
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .map(decode_kvs)
            .transpose()?
            .and_then(|kvs| kvs.into_iter().next())
            .map(|kv| kv.value)
            .ok_or_else(|| {
                EtcdError::Malformed(format!(
                    "{} neither created nor read",
                    String::from_utf8_lossy(key)
                ))
            })
    }

    /// Moves `key` from holder value `from` to `to` under `lease`, only if it still holds
    /// `from` (a resume taking a name over from a dead relay).
    pub async fn move_if_value(
        &self,
        key: &[u8],
        from: &[u8],
        to: &[u8],
        lease: LeaseId,
    ) -> Result<Claim, EtcdError> {
        let compare = json!({ "target": "VALUE", "result": "EQUAL", "value": B64.encode(from) });
        let Some(held) = self.put_if(key, compare, to, lease).await? else {
            return Ok(Claim::Won);
        };
        match held {
            Some(kv) => Ok(Claim::Held(kv.value)),
            // Gone meanwhile (its owner's lease expired): a fresh claim decides.
            None => Box::pin(self.claim(key, to, lease)).await,
        }
    }

    /// One transaction: puts `value` at `key` under `lease` if `compare` (an etcd compare
    /// without its key) holds. `None`: written; `Some(current)`: not written, and what the
    /// key holds now (`None` if it is absent).
    async fn put_if(
        &self,
        key: &[u8],
        mut compare: Value,
        value: &[u8],
        lease: LeaseId,
    ) -> Result<Option<Option<KeyValue>>, EtcdError> {
        let k = B64.encode(key);
        compare["key"] = Value::from(k.clone());
        let request = json!({
            "compare": [compare],
            "success": [{ "request_put": put_request(key, value, Some(lease)) }],
            "failure": [{ "request_range": { "key": k } }],
        });
        let answer = self.call("/v3/kv/txn", &request).await?;
        if succeeded(&answer) {
            return Ok(None);
        }
        let held = answer
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_range"))
            .map(decode_kvs)
            .transpose()?
            .and_then(|kvs| kvs.into_iter().next());
        Ok(Some(held))
    }

    /// Deletes `key` only while it holds `value` (a relay releasing its own claim never
    /// deletes one another relay has taken since).
    pub async fn delete_if_value(&self, key: &[u8], value: &[u8]) -> Result<bool, EtcdError> {
        let k = B64.encode(key);
        let request = json!({
            "compare": [{ "key": k, "target": "VALUE", "result": "EQUAL", "value": B64.encode(value) }],
            "success": [{ "request_delete_range": { "key": k } }],
        });
        let answer = self.call("/v3/kv/txn", &request).await?;
        Ok(succeeded(&answer))
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let body = Bytes::from(body.to_string());
        let mut last = String::new();
        for endpoint in &self.endpoints {
            match tokio::time::timeout(ETCD_CALL_TIMEOUT, post(endpoint, path, body.clone())).await
            {
                Ok(Ok(answer)) => return check(answer),
                Ok(Err(e)) => last = format!("{endpoint}: {e}"),
                Err(_) => last = format!("{endpoint}: no answer in {ETCD_CALL_TIMEOUT:?}"),
            }
        }
        Err(EtcdError::Unreachable(last))
    }
}

/// A change to a watched key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// The key was written (its new value).
    Put(KeyValue),
    /// The key was deleted (or its lease ended).
    Delete(Vec<u8>),
}

impl EtcdClient {
    /// Streams every change under `prefix` from `start_revision` on into `events`, until the
    /// stream breaks (etcd restarted, the endpoint died) or `events` is closed. The caller
    /// re-reads the range and watches again from its revision: nothing is missed.
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
        events: tokio::sync::mpsc::Sender<WatchEvent>,
    ) -> Result<(), EtcdError> {
        let request = json!({ "create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let body = Bytes::from(request.to_string());
        let mut last = String::new();
        for endpoint in &self.endpoints {
            let opened = tokio::time::timeout(
                ETCD_CALL_TIMEOUT,
                open_stream(endpoint, "/v3/watch", body.clone()),
            )
            .await;
            let response = match opened {
                Ok(Ok(response)) => response,
                Ok(Err(e)) => {
                    last = format!("{endpoint}: {e}");
                    continue;
                }
                Err(_) => {
                    last = format!("{endpoint}: no answer in {ETCD_CALL_TIMEOUT:?}");
                    continue;
                }
            };
            return stream_events(response, &events).await;
        }
        Err(EtcdError::Unreachable(last))
    }
}

/// Reads a watch stream's newline-separated JSON messages into `events`.
async fn stream_events(
    response: hyper::Response<hyper::body::Incoming>,
    events: &tokio::sync::mpsc::Sender<WatchEvent>,
) -> Result<(), EtcdError> {
    let mut body = response.into_body();
    let mut pending: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| EtcdError::Unreachable(format!("watch: {e}")))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        pending.extend_from_slice(data);
        if pending.len() > MAX_ETCD_RESPONSE_BYTES {
            return Err(EtcdError::Malformed("watch message too large".into()));
        }
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let message: Value = serde_json::from_slice(&line)
                .map_err(|e| EtcdError::Malformed(format!("watch: {e}")))?;
            let message = check(message)?;
            let result = message.get("result").unwrap_or(&message);
            if result
                .get("canceled")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                // Compacted past our revision, or cancelled by etcd: the caller re-reads.
                return Err(EtcdError::Refused("watch cancelled".into()));
            }
            for event in result
                .get("events")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(kv) = event.get("kv") else { continue };
                let kv = decode_kvs(&json!({ "kvs": [kv] }))?.into_iter().next();
                let Some(kv) = kv else { continue };
                let event = match event.get("type").and_then(Value::as_str) {
                    Some("DELETE") => WatchEvent::Delete(kv.key),
                    _ => WatchEvent::Put(kv),
                };
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    Err(EtcdError::Unreachable("watch stream ended".into()))
}

/// Opens a streaming POST: the response head, its body still to read.
async fn open_stream(
    endpoint: &str,
    path: &str,
    body: Bytes,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let stream = TcpStream::connect(endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // The connection lives as long as its body is read: the task ends with it.
    tokio::spawn(connection);
    let request = http::Request::post(path)
        .header(http::header::HOST, endpoint)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    match response.status().is_success() {
        true => Ok(response),
        false => Err(format!("HTTP {}", response.status())),
    }
}

/// One POST on a fresh connection; the answer's JSON.
async fn post(endpoint: &str, path: &str, body: Bytes) -> Result<Value, String> {
    let stream = TcpStream::connect(endpoint)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(connection);
    let request = http::Request::post(path)
        .header(http::header::HOST, endpoint)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let bytes = Limited::new(response.into_body(), MAX_ETCD_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    driver.abort();
    // Streaming calls (keep-alive) answer one JSON object per line: the first is ours.
    let first = bytes
        .split(|b| *b == b'\n')
        .find(|l| !l.is_empty())
        .unwrap_or(&[]);
    let value: Value = serde_json::from_slice(first).map_err(|e| format!("HTTP {status}: {e}"))?;
    Ok(value)
}

/// An error answer (`{"error": …, "code": …}`, or a stream's `{"error": {…}}`) as `Refused`.
fn check(answer: Value) -> Result<Value, EtcdError> {
    match answer.get("error") {
        None => Ok(answer),
        Some(Value::String(message)) => Err(EtcdError::Refused(message.clone())),
        Some(other) => Err(EtcdError::Refused(
            other
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
                .to_owned(),
        )),
    }
}

/// A put request's JSON.
fn put_request(key: &[u8], value: &[u8], lease: Option<LeaseId>) -> Value {
    let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
    if let (Some(lease), Some(map)) = (lease, put.as_object_mut()) {
        map.insert("lease".into(), Value::String(lease.0.to_string()));
    }
    put
}

/// The key just past every key starting with `prefix` (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from the prefix on.
    vec![0]
}

/// A 64-bit integer field, which the gateway writes as a string (or a number).
fn int_field(object: &Value, name: &str) -> Result<i64, EtcdError> {
    match object.get(name) {
        Some(Value::String(s)) => s
            .parse()
            .map_err(|_| EtcdError::Malformed(format!("{name}={s:?}"))),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| EtcdError::Malformed(format!("{name}={n}"))),
        _ => Err(EtcdError::Malformed(format!("no {name} in {object}"))),
    }
}

/// The `kvs` of a range answer, decoded (absent when there are none).
/// Whether a transaction's compare held.
fn succeeded(answer: &Value) -> bool {
    answer
        .get("succeeded")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

fn decode_kvs(answer: &Value) -> Result<Vec<KeyValue>, EtcdError> {
    let Some(kvs) = answer.get("kvs").and_then(Value::as_array) else {
        return Ok(Vec::new());
    };
    kvs.iter()
        .map(|kv| {
            let field = |name: &str| -> Result<Vec<u8>, EtcdError> {
                match kv.get(name).and_then(Value::as_str) {
                    // proto3 leaves an empty value out.
                    None => Ok(Vec::new()),
                    Some(s) => B64
                        .decode(s)
                        .map_err(|e| EtcdError::Malformed(format!("{name}: {e}"))),
                }
            };
            Ok(KeyValue {
                key: field("key")?,
                value: field("value")?,
                lease: int_field(kv, "lease").unwrap_or(0),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"routes/"), b"routes0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_must_be_plain_http() {
        assert!(EtcdClient::new("http://127.0.0.1:2379,http://10.0.0.2:2379").is_ok());
        assert!(EtcdClient::new("https://127.0.0.1:2379").is_err());
        assert!(EtcdClient::new("127.0.0.1:2379").is_err());
        assert!(EtcdClient::new("").is_err());
    }

    #[test]
    fn error_answers_are_refusals() {
        assert!(matches!(
            check(json!({"error": "lease not found", "code": 5})),
            Err(EtcdError::Refused(_))
        ));
        assert!(
            matches!(check(json!({"error": {"message": "x"}})), Err(EtcdError::Refused(m)) if m == "x")
        );
        assert!(check(json!({"header": {}})).is_ok());
    }
}
