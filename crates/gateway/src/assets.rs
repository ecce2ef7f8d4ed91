//! Static files: the browser client (`/wsgate.js`, always served) and, with `--demo`,
//! the demo page at `/` (its ticker is the binary's: `wsgate --demo`).

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

use crate::http_api::Body;

/// The dependency-free ES module client (clients/js/wsgate.js).
const CLIENT_JS: &str = include_str!("../../../clients/js/wsgate.js");
/// The demo page (clients/js/demo/index.html).
const DEMO_HTML: &str = include_str!("../../../clients/js/demo/index.html");

fn static_file(content_type: &'static str, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-content-type-options", "nosniff")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("valid response")
}

/// `GET /wsgate.js`.
pub fn client_js() -> Response<Body> {
    static_file("text/javascript; charset=utf-8", CLIENT_JS)
}

/// `GET /` with `--demo`.
pub fn page() -> Response<Body> {
    static_file("text/html; charset=utf-8", DEMO_HTML)
}
