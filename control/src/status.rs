//! API errors and their one mapping to Kubernetes `Status` objects.
//!
//! Every failure a client can see goes through [`ApiError`], so the HTTP code,
//! the `reason` and the `details` (kind, name, causes naming fields) are
//! decided in one place, the way the upstream apiserver's `errors` package
//! does it.

use serde_json::Value;

/// One invalid field, reported in `details.causes`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    pub field: String,
    pub reason: &'static str,
    pub message: String,
}

impl Cause {
    pub fn required(field: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueRequired",
            message: "Required value".into(),
        }
    }

    /// A required value, with upstream's detail of what is missing.
    pub fn required_because(field: impl Into<String>, why: &str) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueRequired",
            message: format!("Required value: {why}"),
        }
    }

    pub fn invalid(field: impl Into<String>, value: impl std::fmt::Display, why: &str) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueInvalid",
            message: format!("Invalid value: \"{value}\": {why}"),
        }
    }

    pub fn unsupported(field: impl Into<String>, value: &str, allowed: &[&str]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(|a| format!("\"{a}\"")).collect();
        Self {
            field: field.into(),
            reason: "FieldValueNotSupported",
            message: format!(
                "Unsupported value: \"{value}\": supported values: {}",
                allowed.join(", ")
            ),
        }
    }

    pub fn duplicate(field: impl Into<String>, value: impl std::fmt::Display) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueDuplicate",
            message: format!("Duplicate value: \"{value}\""),
        }
    }

    pub fn forbidden(field: impl Into<String>, why: &str) -> Self {
        Self {
            field: field.into(),
            reason: "FieldValueForbidden",
            message: format!("Forbidden: {why}"),
        }
    }
}

/// What a `Status` says about the object concerned.
#[derive(Debug, Default)]
pub struct Details {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub group: Option<String>,
    pub causes: Vec<Cause>,
}

/// An error answered to the client as a `Status`.
#[derive(Debug, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Box<Details>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: Box::default(),
        }
    }

    fn about(mut self, group: &str, plural: &str, name: &str) -> Self {
        self.details.kind = Some(plural.to_string());
        self.details.name = Some(name.to_string());
        self.details.group = Some(group.to_string());
        self
    }

    /// The same error with another message.
    pub fn saying(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    pub fn causes(&self) -> &[Cause] {
        &self.details.causes
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    pub fn forbidden(group: &str, plural: &str, name: &str, why: &str) -> Self {
        let what = qualified(group, plural);
        let message = if name.is_empty() {
            format!("{what} is forbidden: {why}")
        } else {
            format!("{what} \"{name}\" is forbidden: {why}")
        };
        Self::new(403, "Forbidden", message).about(group, plural, name)
    }

    /// A 403 for a path that is not a resource (`/api`, `/healthz`).
    pub fn forbidden_path(why: &str) -> Self {
        Self::new(403, "Forbidden", format!("forbidden: {why}"))
    }

    pub fn not_found(group: &str, plural: &str, name: &str) -> Self {
        let what = qualified(group, plural);
        Self::new(404, "NotFound", format!("{what} \"{name}\" not found"))
            .about(group, plural, name)
    }

    pub fn path_not_found(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("the server does not allow this method ({method}) on the requested resource"),
        )
    }

    pub fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        let what = qualified(group, plural);
        Self::new(
            409,
            "AlreadyExists",
            format!("{what} \"{name}\" already exists"),
        )
        .about(group, plural, name)
    }

    pub fn conflict(group: &str, plural: &str, name: &str) -> Self {
        let what = qualified(group, plural);
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {what} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        )
        .about(group, plural, name)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 415; `accepted` lists the media types this verb takes.
    pub fn unsupported_media(content_type: &str, accepted: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type}) - accepted media types include: {accepted}"
            ),
        )
    }

    /// 422 with causes; `kind` is the object's Kind (Deployment, Pod, ...).
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let list: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let message = match list.len() {
            1 => format!("{kind} \"{name}\" is invalid: {}", list[0]),
            _ => format!("{kind} \"{name}\" is invalid: [{}]", list.join(", ")),
        };
        let mut e = Self::new(422, "Invalid", message).about(group, kind, name);
        e.details.causes = causes;
        e
    }

    /// An error another server (a kubelet) answered with `code`.
    pub fn proxied(code: u16, message: impl Into<String>) -> Self {
        let reason = match code {
            400 => "BadRequest",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "NotFound",
            503 => "ServiceUnavailable",
            _ => "InternalError",
        };
        Self::new(code, reason, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "ServiceUnavailable", message)
    }

    pub fn to_status(&self) -> Status {
        let d = &self.details;
        let details = (d.kind.is_some() || !d.causes.is_empty()).then(|| StatusDetails {
            name: d.name.clone().filter(|n| !n.is_empty()),
            group: d.group.clone().filter(|g| !g.is_empty()),
            kind: d.kind.clone(),
            uid: None,
            causes: d
                .causes
                .iter()
                .map(|c| StatusCause {
                    reason: c.reason,
                    message: c.message.clone(),
                    field: c.field.clone(),
                })
                .collect(),
        });
        Status {
            status: "Failure",
            message: Some(self.message.clone()),
            reason: Some(self.reason),
            details,
            code: Some(self.code),
            ..Status::default()
        }
    }
}

/// A `Status` object, its fields in the order upstream's encoder writes
/// them (Go's struct order: kind, apiVersion, metadata, status, message,
/// reason, details, code), so that clients comparing bodies as text (the
/// Python client's own e2e suite does) see what a real apiserver sends.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    kind: &'static str,
    #[serde(rename = "apiVersion")]
    api_version: &'static str,
    metadata: serde_json::Map<String, Value>,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<StatusDetails>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<u16>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            kind: "Status",
            api_version: "v1",
            metadata: serde_json::Map::new(),
            status: "Success",
            message: None,
            reason: None,
            details: None,
            code: None,
        }
    }
}

#[derive(Debug, serde::Serialize)]
struct StatusDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    causes: Vec<StatusCause>,
}

#[derive(Debug, serde::Serialize)]
struct StatusCause {
    reason: &'static str,
    message: String,
    field: String,
}

impl Status {
    /// The body as upstream writes it: JSON in field order, then a newline.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).unwrap_or_default();
        out.push(b'\n');
        out
    }

    /// The same as a JSON value (its key order is lost).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// `Success` with an HTTP code (201 for a binding or an eviction).
    pub fn success_with_code(code: u16) -> Self {
        Self {
            code: Some(code),
            ..Self::default()
        }
    }

    pub fn code(&self) -> u16 {
        self.code.unwrap_or(200)
    }
}

fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// The `Status` of a successful delete, as the upstream apiserver answers
/// when the object is gone at once and its kind does not return the
/// deleted object (`details.kind` is the resource, as upstream sets it).
pub fn success(group: &str, plural: &str, name: &str, uid: &str) -> Status {
    Status {
        details: Some(StatusDetails {
            name: Some(name.to_string()),
            group: (!group.is_empty()).then(|| group.to_string()),
            kind: Some(plural.to_string()),
            uid: Some(uid.to_string()),
            causes: Vec::new(),
        }),
        ..Status::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_names_the_field() {
        let e = ApiError::invalid(
            "apps",
            "Deployment",
            "web",
            vec![Cause::invalid(
                "spec.replicas",
                -1,
                "must be greater than or equal to 0",
            )],
        );
        let s = e.to_status().to_value();
        assert_eq!(s["code"], 422);
        assert_eq!(s["details"]["causes"][0]["field"], "spec.replicas");
        assert!(
            s["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("Deployment \"web\" is invalid: spec.replicas")),
            "{s}"
        );
    }

    #[test]
    fn not_found_qualifies_group() {
        let s = ApiError::not_found("apps", "deployments", "x")
            .to_status()
            .to_value();
        assert_eq!(s["message"], "deployments.apps \"x\" not found");
        assert_eq!(s["details"]["group"], "apps");
    }

    #[test]
    fn status_fields_come_in_upstream_order() {
        let body = ApiError::not_found("apps", "deployments", "x")
            .to_status()
            .to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&body),
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Failure\",\"message\":\"deployments.apps \\\"x\\\" not found\",\"reason\":\"NotFound\",\"details\":{\"name\":\"x\",\"group\":\"apps\",\"kind\":\"deployments\"},\"code\":404}\n"
        );
        let ok = success("", "configmaps", "a", "u-1").to_bytes();
        assert_eq!(
            String::from_utf8_lossy(&ok),
            "{\"kind\":\"Status\",\"apiVersion\":\"v1\",\"metadata\":{},\"status\":\"Success\",\"details\":{\"name\":\"a\",\"kind\":\"configmaps\",\"uid\":\"u-1\"}}\n"
        );
    }
}
