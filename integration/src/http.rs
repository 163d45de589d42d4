//! Client-side HTTP helpers: a streaming, hashing fetch that tells a clean end of body from a
//! broken connection, and a raw TCP writer for requests nothing may normalise.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::hex;

/// How a response body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyOutcome {
    /// The body ended cleanly (the server sent everything it announced).
    Complete,
    /// The connection broke or the body was cut short; the client would retry or fall back.
    Broken(String),
}

/// A fetched response: status, headers and what was received of the body.
#[derive(Debug)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// Body bytes received (all of them if `outcome` is `Complete`).
    pub received: u64,
    /// `sha256:<hex>` of the received bytes.
    pub digest: String,
    pub outcome: BodyOutcome,
    /// The body itself, only when asked for (`keep_body`); large bodies are only hashed.
    pub body: Option<Vec<u8>>,
}

impl Fetched {
    pub fn is_complete(&self) -> bool {
        self.outcome == BodyOutcome::Complete
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a clean 200 whose body is exactly the blob `digest` of `size` bytes.
    pub fn assert_blob(&self, digest: &str, size: u64) {
        assert_eq!(self.status, StatusCode::OK, "status for {digest}: headers {:?}", self.headers);
        assert_eq!(self.outcome, BodyOutcome::Complete, "body of {digest} broke after {} bytes", self.received);
        assert_eq!(self.received, size, "body length of {digest}");
        assert_eq!(self.digest, digest, "body hash");
    }

    /// True when this response is a clean, complete body with the wrong content or length: the
    /// one outcome a mirror must never produce (a broken connection is fine, the client retries).
    pub fn is_clean_but_wrong(&self, digest: &str, size: u64) -> bool {
        self.status.is_success() && self.is_complete() && (self.received != size || self.digest != digest)
    }
}

/// Sends `request` and streams the body, hashing it as it arrives (16 clients × 100 MiB must not
/// sit in memory). `Err` only when no response head arrived; a body that breaks midway is
/// `Ok` with `BodyOutcome::Broken`.
pub async fn fetch(request: reqwest::RequestBuilder, keep_body: bool) -> Result<Fetched> {
    let response = request.send().await.context("sending request")?;
    let status = response.status();
    let headers = response.headers().clone();
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut body = keep_body.then(Vec::new);
    let mut stream = response.bytes_stream();
    let mut outcome = BodyOutcome::Complete;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                hasher.update(&chunk);
                received += chunk.len() as u64;
                if let Some(b) = body.as_mut() {
                    b.extend_from_slice(&chunk);
                }
            }
            Err(e) => {
                outcome = BodyOutcome::Broken(format!("{e:#}"));
                break;
            }
        }
    }
    Ok(Fetched { status, headers, received, digest: format!("sha256:{}", hex(&hasher.finalize())), outcome, body })
}

/// A response read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// `errors[0].code` of an OCI distribution error body.
    pub fn oci_error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v.get("errors")?.get(0)?.get("code")?.as_str().map(str::to_owned)
    }
}

/// Writes `request` verbatim to `addr` and reads one response until the server closes or the
/// announced body is complete. `Ok(None)` when the server closed without answering (acceptable
/// for abusive requests such as a 64 KiB header). Send `Connection: close` in `request`.
pub async fn raw_http(addr: SocketAddr, request: &[u8]) -> Result<Option<RawResponse>> {
    let mut stream = TcpStream::connect(addr).await.with_context(|| format!("connect {addr}"))?;
    // The server may answer and close before reading an oversized request; a failed write is not
    // a test failure by itself, what matters is what comes back.
    let _ = stream.write_all(request).await;
    let mut data = Vec::new();
    let read_all = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    data.extend_from_slice(&buf[..n]);
                    if response_complete(&data) {
                        break;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .context("raw request: no complete response within 20 s")?;
    if data.is_empty() {
        return Ok(None);
    }
    parse_response(&data).map(Some)
}

fn find_head_end(data: &[u8]) -> Option<usize> {
    data.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

fn response_complete(data: &[u8]) -> bool {
    let Some(head_end) = find_head_end(data) else {
        return false;
    };
    let Ok(resp) = parse_head(&data[..head_end]) else {
        return false;
    };
    let body = &data[head_end..];
    if let Some(len) = header_of(&resp.1, "content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        return body.len() >= len;
    }
    if header_of(&resp.1, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return decode_chunked(body).is_some();
    }
    // No framing: read until close. Status codes without a body are complete at the head.
    resp.0 == 204 || resp.0 == 304 || (100..200).contains(&resp.0)
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>)> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (Some(proto), Some(code)) = (parts.next(), parts.next()) else {
        bail!("bad status line {status_line:?}");
    };
    if !proto.starts_with("HTTP/") {
        bail!("bad status line {status_line:?}");
    }
    let status = code.parse().with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Ok((status, headers))
}

fn decode_chunked(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_str = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if body.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

fn parse_response(data: &[u8]) -> Result<RawResponse> {
    let head_end = find_head_end(data).context("response without a complete head")?;
    let (status, headers) = parse_head(&data[..head_end])?;
    let raw_body = &data[head_end..];
    let body = if header_of(&headers, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        decode_chunked(raw_body).unwrap_or_else(|| raw_body.to_vec())
    } else if let Some(len) = header_of(&headers, "content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        raw_body[..len.min(raw_body.len())].to_vec()
    } else {
        raw_body.to_vec()
    };
    Ok(RawResponse { status, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chunked_error_body() {
        let data = b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
                     1d\r\n{\"errors\":[{\"code\":\"NAME_U\"}]\r\n1\r\n}\r\n0\r\n\r\n";
        assert!(response_complete(data));
        let r = parse_response(data).unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(r.oci_error_code().as_deref(), Some("NAME_U"));
    }

    #[test]
    fn content_length_bounds_body() {
        let data = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 2\r\n\r\n{}";
        assert!(response_complete(data));
        assert!(!response_complete(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 3\r\n\r\n{}"));
        assert_eq!(parse_response(data).unwrap().body, b"{}");
    }
}
