//! Serving the relay's request streams: each one becomes an HTTP/1.1 exchange with the
//! local app, its response streamed back; a `101` turns the stream into a byte pipe.

use crate::target::TargetPool;
use http::{header, Request, StatusCode};
use hyper_util::rt::TokioIo;
use jobgate_protocol::quic::{abandon, pipe, pump_body, QuicBody};
use jobgate_protocol::{read_frame, RequestHead, ResponseHead, StreamCode, MAX_HEAD_FRAME};
use quinn::{Connection, ConnectionError, RecvStream, SendStream, VarInt};
use std::sync::Arc;

/// Serves every stream the relay opens until the connection ends, and says why it ended.
pub async fn serve_streams(connection: Connection, pool: Arc<TargetPool>) -> ConnectionError {
    loop {
        match connection.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(send, recv, pool.clone()));
            }
            Err(e) => return e,
        }
    }
}

async fn serve_stream(mut send: SendStream, mut recv: RecvStream, pool: Arc<TargetPool>) {
    let head = match read_frame(&mut recv, MAX_HEAD_FRAME).await {
        Ok(Some(payload)) => RequestHead::decode(&payload).ok(),
        _ => None,
    };
    let Some(head) = head else {
        return abandon(&mut send, &mut recv, StreamCode::MalformedHead);
    };
    let upgrade = head.headers.contains_key(header::UPGRADE);

    let mut sender = match pool.checkout().await {
        Ok(sender) => sender,
        Err(e) => {
            tracing::warn!("{e}");
            return abandon(&mut send, &mut recv, StreamCode::TargetUnavailable);
        }
    };
    // An upgrade keeps the receive half for the pipe; otherwise it is the request body.
    let (body, kept_recv) = if upgrade {
        (QuicBody::empty(), Some(recv))
    } else {
        (QuicBody::new(recv), None)
    };
    let mut request = Request::new(body);
    *request.method_mut() = head.method;
    *request.uri_mut() = head.target;
    *request.headers_mut() = head.headers;

    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!("app did not answer: {e}");
            let _ = send.reset(VarInt::from_u32(StreamCode::BadResponse.as_u32()));
            if let Some(mut recv) = kept_recv {
                let _ = recv.stop(VarInt::from_u32(StreamCode::BadResponse.as_u32()));
            }
            return;
        }
    };

    let status = response.status();
    let response_head = ResponseHead {
        status,
        headers: response.headers().clone(),
    };
    if write_head(&mut send, &response_head).await.is_err() {
        return;
    }

    if status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(recv) = kept_recv else {
            let _ = send.reset(VarInt::from_u32(StreamCode::BadResponse.as_u32()));
            return;
        };
        match hyper::upgrade::on(response).await {
            Ok(upgraded) => {
                if let Err(e) = pipe(TokioIo::new(upgraded), send, recv).await {
                    tracing::debug!("upgraded stream ended: {e}");
                }
            }
            Err(e) => tracing::debug!("app upgrade failed: {e}"),
        }
        return;
    }
    drop(kept_recv);

    match pump_body(response.into_body(), &mut send).await {
        Ok(_) => {
            let _ = send.finish();
            pool.checkin(sender);
        }
        Err(e) => {
            tracing::debug!("response body ended early: {e}");
            let _ = send.reset(VarInt::from_u32(StreamCode::Cancelled.as_u32()));
        }
    }
}

async fn write_head(send: &mut SendStream, head: &ResponseHead) -> Result<(), quinn::WriteError> {
    send.write_all(&head.to_frame()).await
}
