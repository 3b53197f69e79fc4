//! The HTTP endpoint an adapter serves (`[http] listen`, off by default): `GET /metrics`,
//! Prometheus text; `GET /health`, 200 when every extension's pools reach their databases, 503
//! with the reason otherwise. What each reports is the adapter's ([`Observed`]). A few lines of
//! HTTP/1.1 over tokio: two read-only paths need no web framework.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What `/metrics` and `/health` report on.
pub trait Observed: Clone + Send + Sync + 'static {
    /// Prometheus text.
    fn metrics(&self) -> String;
    /// Why the adapter cannot serve, if it cannot.
    fn health(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// A request's head larger than this is refused: the two paths need a few dozen bytes.
const MAX_HEAD: usize = 8 << 10;
/// A client gets this long to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `listen` (an error names the address) and serves it from a task of its own.
pub async fn start(name: &str, listen: SocketAddr, observed: impl Observed) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("[http] listen = {listen}"))?;
    println!("{name}: metrics on http://{listen}/metrics, health on http://{listen}/health");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let observed = observed.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &observed).await {
                            tracing::debug!("http: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("http: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, observed: &impl Observed) -> anyhow::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await.context("request too slow")? {
        Ok(head) => head,
        Err(e) => {
            let response =
                "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(response.as_bytes()).await;
            return Err(e);
        }
    };
    let request_line = head.lines().next().unwrap_or_default();
    let (method, target) = match request_line.split_whitespace().collect::<Vec<_>>().as_slice() {
        [method, target, _] => (*method, *target),
        _ => ("", ""),
    };
    // A query string (Prometheus's `params`) changes nothing here.
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("", _) => ("400 Bad Request", "text/plain", "not an HTTP request\n".to_owned()),
        ("GET" | "HEAD", "/metrics") => ("200 OK", "text/plain; version=0.0.4", observed.metrics()),
        ("GET" | "HEAD", "/health") => match observed.health().await {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_owned()),
            Err(why) => ("503 Service Unavailable", "text/plain", format!("{why}\n")),
        },
        (_, "/metrics" | "/health") => ("405 Method Not Allowed", "text/plain", "GET or HEAD\n".to_owned()),
        _ => ("404 Not Found", "text/plain", "/metrics or /health\n".to_owned()),
    };
    let allow = if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" };
    // HEAD: the length GET would have, no body.
    let length = body.len();
    let body = if method == "HEAD" { "" } else { body.as_str() };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\n{allow}Connection: close\r\n\r\n{body}"
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// Reads up to the blank line that ends a request's head.
async fn read_head(stream: &mut TcpStream) -> anyhow::Result<String> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    // The blank line ends it, with or without carriage returns.
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let read = stream.read(&mut buffer).await?;
        anyhow::ensure!(read > 0, "closed before the end of the request");
        head.extend_from_slice(&buffer[..read]);
        anyhow::ensure!(head.len() <= MAX_HEAD, "request head over {MAX_HEAD} bytes");
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}
