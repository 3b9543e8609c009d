//! What Resource Manager says went wrong, as [`ProviderError`]s.
//!
//! ARM fails in two places. A request is refused at once: an HTTP error
//! with ARM's body (`{"error": {"code", "message", "target"?}}`). Or it is
//! accepted (201/202) and its operation later ends `Failed` with the same
//! kind of `error`. Both are read here by their `code`.

use motorpool_provider::ProviderError;
use serde_json::Value;

/// Codes that mean "no capacity for this size here now".
const CAPACITY_CODES: &[&str] = &[
    "SkuNotAvailable",
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
    "SpotCapacityNotAvailable",
];

/// Codes of throttling (429 carries `Retry-After`).
const THROTTLE_CODES: &[&str] = &[
    "TooManyRequests",
    "SubscriptionRequestsThrottled",
    "ResourceRequestsThrottled",
];

const AUTH_CODES: &[&str] = &[
    "AuthorizationFailed",
    "AuthenticationFailed",
    "InvalidAuthenticationToken",
    "InvalidAuthenticationTokenTenant",
    "ExpiredAuthenticationToken",
    "LinkedAuthorizationFailed",
];

const NOT_FOUND_CODES: &[&str] = &[
    "ResourceNotFound",
    "NotFound",
    "ResourceGroupNotFound",
    "TemplateSpecNotFound",
];

/// An ARM error: the HTTP status (none for an operation's failure or a
/// lost answer), ARM's `code`, `target` and message.
#[derive(Debug, Clone, PartialEq)]
pub struct ArmError {
    pub status: Option<u16>,
    pub code: String,
    pub target: Option<String>,
    pub message: String,
    /// Seconds from a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ArmError {
    /// From an `{"error": {...}}` body (a refused request, or a failed operation's status).
    pub fn from_body(call: &str, status: Option<u16>, body: &Value) -> ArmError {
        let error = body.get("error").unwrap_or(body);
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_string);
        let code = text("code").unwrap_or_else(|| match status {
            Some(s) => format!("HTTP{s}"),
            None => "Failed".to_string(),
        });
        let message = text("message").unwrap_or_else(|| body.to_string());
        ArmError {
            status,
            code,
            target: text("target"),
            message: format!("{call}: {message}"),
            retry_after: None,
        }
    }

    pub fn is(&self, code: &str) -> bool {
        self.code.eq_ignore_ascii_case(code)
    }

    pub fn is_not_found(&self) -> bool {
        self.status == Some(404) || NOT_FOUND_CODES.iter().any(|c| self.is(c))
    }

    /// An `If-Match`/`If-None-Match` that did not hold.
    pub fn is_precondition_failed(&self) -> bool {
        self.status == Some(412) || self.is("PreconditionFailed")
    }

    pub fn is_capacity(&self) -> bool {
        CAPACITY_CODES.iter().any(|c| self.is(c))
    }

    /// Which spec field a refused parameter came from, when ARM names it.
    fn spec_field(&self) -> Option<String> {
        let target = self.target.as_deref()?.to_ascii_lowercase();
        let field = if target.contains("vmsize") {
            "node_type"
        } else if target.contains("imagereference") {
            "provider.image"
        } else if target.contains("subnet") {
            "provider.subnet_id"
        } else if target.contains("disksizegb") {
            "provider.os_disk_gb"
        } else if target.contains("location") {
            "provider.location"
        } else if target.contains("keydata") || target.contains("publickeys") {
            "provider.ssh_public_key"
        } else {
            return None;
        };
        Some(field.to_string())
    }
}

impl From<ArmError> for ProviderError {
    fn from(e: ArmError) -> ProviderError {
        let quota = e.is("QuotaExceeded")
            || (e.is("OperationNotAllowed") && e.message.to_ascii_lowercase().contains("quota"));
        let message = match e.retry_after {
            Some(s) => format!("{} (retry after {s} s)", e.message),
            None => e.message.clone(),
        };
        if e.status == Some(429) || THROTTLE_CODES.iter().any(|c| e.is(c)) {
            ProviderError::Throttled(message)
        } else if e.is_capacity() {
            ProviderError::Capacity(message)
        } else if quota {
            ProviderError::Quota(message)
        } else if e.status == Some(401)
            || e.status == Some(403)
            || AUTH_CODES.iter().any(|c| e.is(c))
        {
            ProviderError::Auth(message)
        } else if e.is_not_found() {
            ProviderError::NotFound(message)
        } else if e.status.is_some_and(|s| s >= 500)
            || e.status.is_none() && e.is("Failed")
            || e.is("InternalServerError")
            || e.is("ServiceUnavailable")
        {
            ProviderError::Server(message)
        } else {
            ProviderError::invalid(e.spec_field(), message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error(status: Option<u16>, code: &str, message: &str) -> ProviderError {
        ArmError::from_body(
            "call",
            status,
            &json!({"error": {"code": code, "message": message}}),
        )
        .into()
    }

    #[test]
    fn codes_map_to_what_the_engine_retries_or_reports() {
        assert!(matches!(
            error(Some(429), "TooManyRequests", "m"),
            ProviderError::Throttled(_)
        ));
        assert!(matches!(
            error(Some(409), "SkuNotAvailable", "m"),
            ProviderError::Capacity(_)
        ));
        assert!(matches!(
            error(None, "AllocationFailed", "m"),
            ProviderError::Capacity(_)
        ));
        assert!(matches!(
            error(
                Some(409),
                "OperationNotAllowed",
                "exceeding approved Total Regional Cores quota"
            ),
            ProviderError::Quota(_)
        ));
        assert!(matches!(
            error(
                Some(409),
                "OperationNotAllowed",
                "cannot start while deallocating"
            ),
            ProviderError::Invalid { .. }
        ));
        assert!(matches!(
            error(Some(403), "AuthorizationFailed", "m"),
            ProviderError::Auth(_)
        ));
        assert!(matches!(
            error(Some(404), "ResourceNotFound", "m"),
            ProviderError::NotFound(_)
        ));
        assert!(matches!(
            error(Some(503), "ServiceUnavailable", "m"),
            ProviderError::Server(_)
        ));
    }

    #[test]
    fn a_refused_parameter_names_the_spec_field() {
        let e: ProviderError = ArmError::from_body(
            "PUT",
            Some(400),
            &json!({"error": {"code": "InvalidParameter", "message": "bad size",
                               "target": "properties.hardwareProfile.vmSize"}}),
        )
        .into();
        assert_eq!(
            e,
            ProviderError::invalid(Some("node_type".to_string()), "PUT: bad size")
        );
    }
}
