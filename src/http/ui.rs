//! The agent's digital inbox (`/agent/`): plain HTML, CSS and JavaScript
//! embedded in the binary, speaking only the agent API with the session
//! cookie of `POST /agent/session`. No build step.

use actix_web::{web, HttpResponse};

const INDEX_HTML: &str = include_str!("../../assets/agent/index.html");
const APP_JS: &str = include_str!("../../assets/agent/app.js");
const APP_CSS: &str = include_str!("../../assets/agent/app.css");
const I18N_JS: &str = include_str!("../../assets/agent/i18n.js");

/// Only the page's own scripts, styles and API; images from the API
/// (attachments) and local previews (blob:) of files about to be sent.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/agent", web::get().to(redirect))
        .route("/agent/", web::get().to(index))
        .route("/agent/app.js", web::get().to(app_js))
        .route("/agent/app.css", web::get().to(app_css))
        .route("/agent/i18n.js", web::get().to(i18n_js));
}

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type.to_string())
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .body(body)
}

async fn redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("Location", "/agent/"))
        .finish()
}

async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("X-Frame-Options", "DENY"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .insert_header(("Content-Security-Policy", CSP))
        .body(INDEX_HTML)
}

async fn app_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn app_css() -> HttpResponse {
    asset("text/css; charset=utf-8", APP_CSS)
}

async fn i18n_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", I18N_JS)
}
