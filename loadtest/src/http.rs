//! A minimal HTTP/1.1 client over hyper for `/metrics` scrapes and the HTTP publish API.

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::net::Url;

/// One keep-alive HTTP/1.1 connection.
pub struct HttpConn {
    url: Url,
    send: SendRequest<Full<Bytes>>,
}

impl HttpConn {
    /// Connects to `url`'s host over an already open `stream`.
    pub async fn open(url: &Url, stream: TcpStream) -> Result<HttpConn> {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        // The connection future drives the socket; it ends when `send` is dropped.
        tokio::spawn(conn);
        Ok(HttpConn {
            url: url.clone(),
            send,
        })
    }

    /// Sends one request and returns status and body.
    pub async fn request(
        &mut self,
        method: hyper::Method,
        body: Bytes,
        bearer: Option<&str>,
    ) -> Result<(u16, Bytes)> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(&self.url.path)
            .header(hyper::header::HOST, &self.url.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(key) = bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        self.send.ready().await?;
        let resp = self.send.send_request(req.body(Full::new(body))?).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

/// `GET url` on a fresh connection; the body as text.
pub async fn get(url: &str) -> Result<String> {
    let url = Url::parse(url)?;
    let stream = TcpStream::connect(url.addr)
        .await
        .with_context(|| format!("connect {}", url.authority))?;
    let mut conn = HttpConn::open(&url, stream).await?;
    let (status, body) = conn.request(hyper::Method::GET, Bytes::new(), None).await?;
    anyhow::ensure!(status == 200, "GET {}: HTTP {status}", url.path);
    Ok(String::from_utf8_lossy(&body).into_owned())
}
