//! What the Compute API says went wrong, as [`ProviderError`]s.
//!
//! The API fails in two places. A request can be refused at once: an HTTP
//! error with Google's body (`{"error": {"code", "message", "errors":
//! [{"reason", ...}]}}`), read here by its status and `reason`. Or it is
//! accepted as an operation that later ends `DONE` with an `error` (a
//! finished operation can still have failed): its `errors[].code` are
//! Compute's codes (`QUOTA_EXCEEDED`, `ZONE_RESOURCE_POOL_EXHAUSTED`, ...).

use motorpool_provider::ProviderError;
use serde::Deserialize;

/// Codes of a failed operation that mean the zone has no capacity now:
/// the launch fails over to the next zone.
const CAPACITY_CODES: &[&str] = &[
    "ZONE_RESOURCE_POOL_EXHAUSTED",
    "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
    "RESOURCE_POOL_EXHAUSTED",
    "UNSUPPORTED_OPERATION_IN_ZONE_RESOURCE_POOL_EXHAUSTED",
];

#[derive(Debug, Deserialize)]
struct Body {
    error: BodyError,
}

#[derive(Debug, Deserialize)]
struct BodyError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<Reason>,
}

#[derive(Debug, Deserialize)]
struct Reason {
    #[serde(default)]
    reason: String,
}

/// A refused request: its HTTP status, Google's `reason`, and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: Option<u16>,
    pub reason: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn from_gax(call: &str, e: &google_cloud_compute_v1::Error) -> ApiError {
        let status = e.http_status_code();
        let parsed = e
            .http_payload()
            .and_then(|p| serde_json::from_slice::<Body>(p).ok());
        let (reason, message) = match parsed {
            Some(body) => (
                body.error.errors.first().map(|r| r.reason.clone()),
                body.error.message,
            ),
            None if e.is_authentication() => (Some("authError".to_string()), e.to_string()),
            None => (None, e.to_string()),
        };
        ApiError {
            status,
            reason,
            message: format!("{call}: {message}"),
        }
    }

    pub fn reason_is(&self, reason: &str) -> bool {
        self.reason.as_deref() == Some(reason)
    }

    pub fn is_not_found(&self) -> bool {
        self.status == Some(404) || self.reason_is("notFound")
    }

    /// A stale fingerprint (`setLabels`, `setMetadata`): read again and retry.
    pub fn is_stale_fingerprint(&self) -> bool {
        self.status == Some(412) || self.reason_is("conditionNotMet")
    }

    pub fn is_already_exists(&self) -> bool {
        self.status == Some(409) || self.reason_is("alreadyExists")
    }
}

impl From<ApiError> for ProviderError {
    fn from(e: ApiError) -> ProviderError {
        let reason = e.reason.as_deref().unwrap_or_default();
        let message = e.message;
        match (e.status, reason) {
            (_, "rateLimitExceeded" | "userRateLimitExceeded") | (Some(429), _) => {
                ProviderError::Throttled(message)
            }
            (_, "quotaExceeded") => ProviderError::Quota(message),
            (Some(401), _) | (_, "authError" | "required") => ProviderError::Auth(message),
            (Some(403), _) | (_, "forbidden" | "accessNotConfigured") => {
                ProviderError::Auth(message)
            }
            (Some(404), _) | (_, "notFound") => ProviderError::NotFound(message),
            (Some(s), _) if s >= 500 => ProviderError::Server(message),
            (_, "backendError" | "internalError") => ProviderError::Server(message),
            // No status: the request never got an answer (connection reset,
            // a lost response): worth retrying, every call is idempotent.
            (None, _) => ProviderError::Server(message),
            (Some(_), _) => ProviderError::invalid(None, message),
        }
    }
}

/// A finished operation's failure.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationError {
    pub codes: Vec<String>,
    pub message: String,
}

impl OperationError {
    pub fn from_operation(
        call: &str,
        op: &google_cloud_compute_v1::model::Operation,
    ) -> Option<Self> {
        let error = op.error.as_ref()?;
        if error.errors.is_empty() {
            return None;
        }
        let codes = error.errors.iter().filter_map(|e| e.code.clone()).collect();
        let message = error
            .errors
            .iter()
            .filter_map(|e| e.message.clone())
            .collect::<Vec<_>>()
            .join("; ");
        Some(OperationError {
            codes,
            message: format!("{call}: {message}"),
        })
    }

    pub fn is_capacity(&self) -> bool {
        self.codes
            .iter()
            .any(|c| CAPACITY_CODES.contains(&c.as_str()))
    }

    fn has(&self, code: &str) -> bool {
        self.codes.iter().any(|c| c == code)
    }
}

impl From<OperationError> for ProviderError {
    fn from(e: OperationError) -> ProviderError {
        if e.is_capacity() {
            ProviderError::Capacity(e.message)
        } else if e.has("QUOTA_EXCEEDED") {
            ProviderError::Quota(e.message)
        } else if e.has("RESOURCE_NOT_FOUND") {
            ProviderError::NotFound(e.message)
        } else if e.has("RATE_LIMIT_EXCEEDED") {
            ProviderError::Throttled(e.message)
        } else if e.has("INTERNAL_ERROR") || e.has("SERVICE_UNAVAILABLE") {
            ProviderError::Server(e.message)
        } else {
            ProviderError::invalid(None, e.message)
        }
    }
}
