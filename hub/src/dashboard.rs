//! The operator's web dashboard at `/` on the hub's HTTP port: Fleet, Device, Jobs and runs,
//! Models. No build step and no separate server: the pages, their scripts and styles, and the
//! vendored chart library (uPlot) are embedded in the binary at compile time.
//!
//! The hub renders each page's frame (navigation, title, the sign-in form); the page's script
//! fills it from the documented REST API under `/api/v1`, the one the CLI uses, with the
//! signed-in user's bearer token. The hub sets no cookies (see [`crate::api::access`]), so it
//! cannot know who asks for a page: the pages and assets hold no data and are open, and every
//! byte of fleet data reaches the browser through the same role checks as the CLI's requests.
//!
//! Every answer carries a Content-Security-Policy that allows only the hub's own scripts and
//! styles (no inline script) and connections to the hub (and the OpenID Connect issuer, when
//! the dashboard signs in with one).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// What the pages need from the hub's configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// The OpenID Connect issuer and the dashboard's client id, when users sign in there.
    pub oidc: Option<Sso>,
}

/// Signing in at an OpenID Connect issuer (authorization code with PKCE, a public client).
#[derive(Debug, Clone)]
pub struct Sso {
    pub issuer: String,
    pub client_id: String,
}

/// An embedded file: its name under `/ui/assets/`, content type and bytes.
struct Asset {
    name: &'static str,
    kind: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $kind:expr, $path:literal) => {
        Asset {
            name: $name,
            kind: $kind,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("app.css", CSS, "app.css"),
    asset!("app.js", JS, "app.js"),
    asset!("fleet.js", JS, "fleet.js"),
    asset!("device.js", JS, "device.js"),
    asset!("jobs.js", JS, "jobs.js"),
    asset!("run.js", JS, "run.js"),
    asset!("models.js", JS, "models.js"),
    asset!("signed-in.js", JS, "signed-in.js"),
    asset!("icon.svg", "image/svg+xml", "icon.svg"),
    asset!("uPlot.iife.min.js", JS, "vendor/uplot/uPlot.iife.min.js"),
    asset!("uPlot.min.css", CSS, "vendor/uplot/uPlot.min.css"),
    asset!(
        "uPlot.LICENSE",
        "text/plain; charset=utf-8",
        "vendor/uplot/LICENSE"
    ),
];

/// The pages, by the script that fills them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    Fleet,
    Device,
    Jobs,
    Run,
    Models,
    SignedIn,
}

impl Page {
    fn script(self) -> &'static str {
        match self {
            Page::Fleet => "fleet.js",
            Page::Device => "device.js",
            Page::Jobs => "jobs.js",
            Page::Run => "run.js",
            Page::Models => "models.js",
            Page::SignedIn => "signed-in.js",
        }
    }

    /// The navigation entry this page belongs under.
    fn section(self) -> Option<Page> {
        match self {
            Page::Fleet | Page::Device => Some(Page::Fleet),
            Page::Jobs | Page::Run => Some(Page::Jobs),
            Page::Models => Some(Page::Models),
            Page::SignedIn => None,
        }
    }
}

/// The routes: `/`, `/ui/...` and the assets. They hold no data and need no token; the gate
/// lets [`is_dashboard`] routes through.
pub fn router<S: Clone + Send + Sync + 'static>(config: Config) -> Router<S> {
    let config = Arc::new(config);
    Router::new()
        .route("/", get(fleet))
        .route("/ui/devices/{id}", get(device))
        .route("/ui/jobs", get(jobs))
        .route("/ui/runs/{id}", get(run))
        .route("/ui/models", get(models))
        .route("/ui/signed-in", get(signed_in))
        .route("/ui/assets/{name}", get(asset))
        // Asked for by browsers on their own (a JSON answer opened in a tab, for one).
        .route(
            "/favicon.ico",
            get(|headers: HeaderMap| asset(Path("icon.svg".to_string()), headers)),
        )
        .with_state(config)
}

/// Whether `route` (a matched route template) is one of the dashboard's.
pub fn is_dashboard(route: &str) -> bool {
    route == "/" || route == "/favicon.ico" || route.starts_with("/ui/")
}

async fn fleet(State(c): State<Arc<Config>>) -> Response {
    page(&c, Page::Fleet, "Fleet", "")
}

async fn device(State(c): State<Arc<Config>>, Path(id): Path<String>) -> Response {
    page(&c, Page::Device, &format!("Device {id}"), &id)
}

async fn jobs(State(c): State<Arc<Config>>) -> Response {
    page(&c, Page::Jobs, "Jobs and runs", "")
}

async fn run(State(c): State<Arc<Config>>, Path(id): Path<String>) -> Response {
    page(&c, Page::Run, &format!("Run {id}"), &id)
}

async fn models(State(c): State<Arc<Config>>) -> Response {
    page(&c, Page::Models, "Models", "")
}

async fn signed_in(State(c): State<Arc<Config>>) -> Response {
    page(&c, Page::SignedIn, "Signing in", "")
}

/// `/ui/assets/{name}`: revalidated on every use (an ETag from the content), so a hub upgrade
/// never leaves a browser on old scripts.
async fn asset(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == name) else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let tag = etag(a);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes());
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.kind)], a.body).into_response()
    };
    let h = response.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_str(tag).expect("etag"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

fn etag(a: &Asset) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let mut h = DefaultHasher::new();
                a.body.hash(&mut h);
                format!("\"{:016x}\"", h.finish())
            })
            .collect()
    });
    let i = ASSETS
        .iter()
        .position(|x| x.name == a.name)
        .expect("an asset");
    &tags[i]
}

/// A page: the frame the hub renders, its script to fill it.
fn page(c: &Config, page: Page, title: &str, subject: &str) -> Response {
    let nav: String = [
        (Page::Fleet, "/", "Fleet"),
        (Page::Jobs, "/ui/jobs", "Jobs and runs"),
        (Page::Models, "/ui/models", "Models"),
    ]
    .iter()
    .map(|(p, href, label)| {
        let current = if page.section() == Some(*p) {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<li><a href=\"{href}\"{current}>{label}</a></li>")
    })
    .collect();
    let sso = match &c.oidc {
        Some(s) => format!(
            " data-oidc-issuer=\"{}\" data-oidc-client=\"{}\"",
            escape(&s.issuer),
            escape(&s.client_id)
        ),
        None => String::new(),
    };
    let html = format!(
        include_str!("../assets/page.html"),
        title = escape(title),
        subject = escape(subject),
        nav = nav,
        sso = sso,
        script = page.script(),
    );
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    let connect = match &c.oidc {
        Some(s) => format!("'self' {}", origin_of(&s.issuer)),
        None => "'self'".into(),
    };
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
         connect-src {connect}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    );
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_str(&policy).expect("policy"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `scheme://host[:port]` of a URL (what a Content-Security-Policy source names).
fn origin_of(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
            format!("{scheme}://{host}")
        }
        None => url.to_string(),
    }
}

/// Text for HTML, in element content or a quoted attribute.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_url_brings_into_a_page_is_escaped() {
        assert_eq!(
            escape(r#"<script>"x"&'y'"#),
            "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;"
        );
        let c = Config::default();
        let r = page(
            &c,
            Page::Device,
            "Device <b>",
            "<img src=x onerror=alert(1)>",
        );
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(csp.contains("connect-src 'self';"), "{csp}");
    }

    #[test]
    fn the_issuer_is_the_one_other_place_a_page_may_connect_to() {
        assert_eq!(
            origin_of("https://login.example.com:8443/realms/shoal"),
            "https://login.example.com:8443"
        );
        let c = Config {
            oidc: Some(Sso {
                issuer: "https://login.example.com/realms/shoal".into(),
                client_id: "shoal-dashboard".into(),
            }),
        };
        let r = page(&c, Page::Fleet, "Fleet", "");
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            csp.contains("connect-src 'self' https://login.example.com;"),
            "{csp}"
        );
    }

    #[test]
    fn every_page_script_is_an_asset() {
        for p in [
            Page::Fleet,
            Page::Device,
            Page::Jobs,
            Page::Run,
            Page::Models,
            Page::SignedIn,
        ] {
            assert!(ASSETS.iter().any(|a| a.name == p.script()), "{p:?}");
        }
        assert_eq!(ASSETS.iter().filter(|a| a.kind == JS).count(), 8);
        assert_eq!(ASSETS.iter().filter(|a| a.kind == CSS).count(), 2);
    }
}
