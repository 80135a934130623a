//! The dashboard at `/ui/`: three static files built into the binary
//! (`control/ui/`). They hold no cluster data, so they are served without
//! authentication. The page asks for a token, keeps it in the tab's
//! session storage, and sends it on every API call it makes, so each read
//! and write is the logged-in user's and RBAC applies as to kubectl.
//! Pages list, then watch; nothing is fetched from anywhere but this
//! server (the Content-Security-Policy says so to the browser).

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

use super::{Body, full};

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../../ui/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../ui/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../../ui/app.css"),
    },
];

/// Scripts, styles and API calls from this origin only; no frames, no
/// forms posted anywhere, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// One validator for all the files: they change together, with the binary.
fn etag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        // FNV-1a over every file.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for a in ASSETS {
            for b in a.body.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("\"{h:016x}\"")
    })
}

/// Answers a request whose path starts with `/ui`: `segs` are the path's
/// segments after it.
pub fn serve(
    method: &Method,
    segs: &[&str],
    trailing_slash: bool,
    headers: &HeaderMap,
) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = full(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    if segs.is_empty() && !trailing_slash {
        let mut r = full(StatusCode::MOVED_PERMANENTLY, "text/plain", "");
        r.headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
        return r;
    }
    let name = match segs {
        [] => "",
        [one] => one,
        _ => "-",
    };
    let Some(asset) = ASSETS.iter().find(|a| a.name == name) else {
        return full(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag()));
    let mut r = if fresh {
        full(StatusCode::NOT_MODIFIED, asset.content_type, Bytes::new())
    } else if method == Method::HEAD {
        full(StatusCode::OK, asset.content_type, Bytes::new())
    } else {
        full(
            StatusCode::OK,
            asset.content_type,
            Bytes::from_static(asset.body.as_bytes()),
        )
    };
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(tag) = HeaderValue::from_str(etag()) {
        h.insert(header::ETAG, tag);
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, inm: Option<&str>) -> Response<Body> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).skip(1).collect();
        let mut h = HeaderMap::new();
        if let Some(t) = inm {
            h.insert(
                header::IF_NONE_MATCH,
                HeaderValue::from_str(t).expect("tag"),
            );
        }
        serve(&Method::GET, &segs, path.ends_with('/'), &h)
    }

    #[test]
    fn serves_the_page_its_script_and_style_and_nothing_else() {
        let r = get("/ui/", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert!(
            r.headers()[header::CONTENT_TYPE]
                .to_str()
                .expect("ascii")
                .starts_with("text/html")
        );
        assert!(
            r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .expect("ascii")
                .contains("connect-src 'self'")
        );
        assert_eq!(get("/ui/app.js", None).status(), StatusCode::OK);
        assert_eq!(get("/ui/app.css", None).status(), StatusCode::OK);
        assert_eq!(
            get("/ui/../etc/passwd", None).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(get("/ui/a/b", None).status(), StatusCode::NOT_FOUND);
        let moved = get("/ui", None);
        assert_eq!(moved.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(moved.headers()[header::LOCATION], "/ui/");
        let h = HeaderMap::new();
        assert_eq!(
            serve(&Method::POST, &[], true, &h).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn a_cached_copy_is_revalidated() {
        let tag = get("/ui/app.js", None).headers()[header::ETAG]
            .to_str()
            .expect("ascii")
            .to_string();
        assert_eq!(
            get("/ui/app.js", Some(&tag)).status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(
            get("/ui/app.js", Some("\"other\"")).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for a in ASSETS {
            let body = a.body.replace("http://www.w3.org/2000/svg", "");
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{} names another origin",
                a.name
            );
        }
    }
}
