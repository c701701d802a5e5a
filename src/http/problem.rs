//! One error type at the HTTP edge: `application/problem+json` with a stable `code`.

use crate::adapters::IntakeError;
use crate::domain::Refusal;
use crate::gateway::GatewayError;
use crate::store::StoreError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).expect("valid status"),
            code,
            detail: detail.into(),
            field: None,
            retry_after: None,
        }
    }
    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(401, "unauthorized", detail)
    }
    pub fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(403, "not_permitted", detail)
    }
    pub fn malformed(detail: impl Into<String>) -> ApiError {
        ApiError::new(400, "malformed_payload", detail)
    }
    pub fn not_found(detail: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", detail)
    }
    pub fn validation(field: &str, detail: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(422, "validation_failed", detail)
        }
    }
    pub fn too_large(detail: impl Into<String>) -> ApiError {
        ApiError::new(413, "payload_too_large", detail)
    }

    fn title(&self) -> &'static str {
        match self.code {
            "unauthorized" => "Authentication required",
            "invalid_signature" => "The webhook signature is not valid",
            "not_permitted" => "Not permitted",
            "forbidden_origin" => "This origin may not connect",
            "verify_token_mismatch" => "The verify token does not match",
            "not_found" => "Not found",
            "unknown_channel" => "No such channel",
            "unknown_queue" => "No such queue",
            "not_assigned" => "The interaction is not assigned to you",
            "already_assigned" => "The interaction is assigned to someone else",
            "invalid_transition" => "That change is not possible now",
            "opted_out" => "The contact has opted out",
            "payload_too_large" => "The body is too large",
            "attachment_too_large" => "An attachment is too large",
            "unsupported_media_type" => "That type of content is not accepted",
            "malformed_payload" => "The body could not be read",
            "validation_failed" => "A field is not valid",
            "invalid_queue" => "That queue cannot take it",
            "window_closed" => "The messaging window is closed",
            "rate_limited" => "Too many requests",
            "store_unavailable" => "The store is unavailable",
            _ => "Error",
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut body = json!({
            "type": format!("https://switchboard.dev/problems/{}", self.code),
            "title": self.title(),
            "status": self.status.as_u16(),
            "detail": self.detail,
            "code": self.code,
        });
        if let Some(field) = &self.field {
            body["field"] = json!(field);
        }
        let mut resp = HttpResponse::build(self.status);
        resp.content_type("application/problem+json");
        if let Some(secs) = self.retry_after {
            resp.insert_header(("Retry-After", secs.to_string()));
        }
        resp.body(body.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(d) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(503, "store_unavailable", d)
            },
            StoreError::Conflict => ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    503,
                    "store_unavailable",
                    "too many concurrent changes; try again",
                )
            },
            StoreError::Duplicate { key, .. } => {
                ApiError::new(409, "invalid_transition", format!("{key} already exists"))
            }
        }
    }
}

impl From<GatewayError> for ApiError {
    fn from(e: GatewayError) -> ApiError {
        match e {
            GatewayError::NotFound(d) => ApiError::not_found(d),
            GatewayError::UnknownChannel(id) => {
                ApiError::new(404, "unknown_channel", format!("no channel {id}"))
            }
            GatewayError::UnknownQueue(id) => {
                ApiError::new(404, "unknown_queue", format!("no queue {id}"))
            }
            GatewayError::Refused(r) => match r {
                Refusal::NotAssigned => ApiError::new(409, "not_assigned", r.to_string()),
                Refusal::AlreadyAssigned(_) => {
                    ApiError::new(409, "already_assigned", r.to_string())
                }
                Refusal::InvalidTransition(d) => ApiError::new(409, "invalid_transition", d),
                Refusal::NotPermitted(d) => ApiError::forbidden(d),
                Refusal::InvalidQueue(d) => ApiError::new(422, "invalid_queue", d),
            },
            GatewayError::Intake(i) => match i {
                IntakeError::InvalidSignature(d) => ApiError::new(401, "invalid_signature", d),
                IntakeError::Malformed(d) => ApiError::malformed(d),
                IntakeError::VerifyTokenMismatch(d) => {
                    ApiError::new(403, "verify_token_mismatch", d)
                }
                IntakeError::UnsupportedMediaType(d) => {
                    ApiError::new(415, "unsupported_media_type", d)
                }
            },
            GatewayError::Validation { field, message } => ApiError::validation(&field, message),
            GatewayError::AttachmentTooLarge(d) => ApiError::new(413, "attachment_too_large", d),
            GatewayError::UnsupportedMediaType(d) => {
                ApiError::new(415, "unsupported_media_type", d)
            }
            GatewayError::WindowClosed(d) => ApiError::new(422, "window_closed", d),
            GatewayError::OptedOut(d) => ApiError::new(422, "opted_out", d),
            GatewayError::Store(s) => s.into(),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
