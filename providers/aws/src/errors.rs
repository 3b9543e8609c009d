//! EC2 errors, typed: the AWS error code decides the [`ProviderError`] (and so
//! what the engine retries), and for bad requests the spec field to blame.

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use motorpool_provider::ProviderError;

/// A failed EC2 call: the typed error, and the AWS error code when there was one
/// (launch needs the code to decide whether to try the next subnet or market).
#[derive(Debug, Clone)]
pub(crate) struct Ec2Error {
    pub code: Option<String>,
    pub error: ProviderError,
}

impl From<Ec2Error> for ProviderError {
    fn from(e: Ec2Error) -> Self {
        e.error
    }
}

impl Ec2Error {
    pub fn is_capacity(&self) -> bool {
        matches!(self.error, ProviderError::Capacity(_))
    }

    /// A spot request that on-demand may still satisfy: no spot capacity,
    /// a spot-only limit, a price or an instance type spot does not offer.
    pub fn spot_unavailable(&self) -> bool {
        matches!(
            self.error,
            ProviderError::Capacity(_) | ProviderError::Quota(_)
        ) || matches!(
            self.code.as_deref(),
            Some("SpotMaxPriceTooLow" | "Unsupported" | "UnsupportedOperation")
        )
    }
}

/// Turn an SDK error of operation `op` into an [`Ec2Error`].
pub(crate) fn from_sdk<E>(op: &str, err: SdkError<E>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err.raw_response().map(|r| r.status().as_u16());
    match &err {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let code = err.code().map(str::to_string);
            let message = err
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| DisplayErrorContext(&err).to_string());
            Ec2Error {
                error: classify(op, code.as_deref(), status, &message),
                code,
            }
        }
        SdkError::TimeoutError(_) => Ec2Error {
            code: None,
            error: ProviderError::Server(format!("EC2 {op} timed out")),
        },
        SdkError::DispatchFailure(d) => {
            let text = DisplayErrorContext(&err).to_string();
            let error = if mentions_credentials(&text) {
                ProviderError::Auth(format!("EC2 {op}: {text}"))
            } else if d.is_user() {
                ProviderError::invalid(
                    Some("provider.endpoint_url".to_string()),
                    format!("EC2 {op}: cannot send the request: {text}"),
                )
            } else {
                // I/O, timeouts, connection resets: transient, worth a retry.
                ProviderError::Server(format!("EC2 {op}: cannot reach the endpoint: {text}"))
            };
            Ec2Error { code: None, error }
        }
        _ => {
            let text = DisplayErrorContext(&err).to_string();
            let error = if mentions_credentials(&text) {
                ProviderError::Auth(format!(
                    "EC2 {op}: no usable AWS credentials ({text}); set AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run where an instance role is available"
                ))
            } else {
                ProviderError::Internal(format!("EC2 {op}: {text}"))
            };
            Ec2Error { code: None, error }
        }
    }
}

fn mentions_credentials(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("credential") || t.contains("no identity") || t.contains("identity resolver")
}

/// The typed error of an EC2 error `code` (and HTTP `status`).
pub(crate) fn classify(
    op: &str,
    code: Option<&str>,
    status: Option<u16>,
    message: &str,
) -> ProviderError {
    let text = match code {
        Some(c) => format!("EC2 {op}: {c}: {message}"),
        None => format!("EC2 {op}: {message}"),
    };
    let Some(code) = code else {
        return match status {
            Some(429) => ProviderError::Throttled(text),
            Some(s) if s >= 500 => ProviderError::Server(text),
            Some(401 | 403) => ProviderError::Auth(text),
            _ => ProviderError::Internal(text),
        };
    };
    match code {
        "RequestLimitExceeded"
        | "Throttling"
        | "ThrottlingException"
        | "RequestThrottled"
        | "RequestThrottledException"
        | "TooManyRequestsException"
        | "SlowDown" => ProviderError::Throttled(text),
        "ServiceUnavailable" | "Unavailable" | "InternalError" | "InternalFailure"
        | "ServerInternal" => ProviderError::Server(text),
        "InsufficientInstanceCapacity"
        | "InsufficientCapacity"
        | "InsufficientHostCapacity"
        | "InsufficientReservedInstanceCapacity"
        | "InsufficientCapacityOnHost" => ProviderError::Capacity(text),
        "AuthFailure"
        | "UnauthorizedOperation"
        | "ExpiredToken"
        | "RequestExpired"
        | "InvalidClientTokenId"
        | "SignatureDoesNotMatch"
        | "MissingAuthenticationToken"
        | "OptInRequired"
        | "Blocked"
        | "PendingVerification" => ProviderError::Auth(text),
        "InvalidInstanceID.NotFound" => ProviderError::NotFound(text),
        c if c.ends_with("LimitExceeded") || c == "MaxSpotInstanceCountExceeded" => {
            ProviderError::Quota(text)
        }
        c if c.starts_with("Invalid")
            || c.starts_with("Missing")
            || c.starts_with("Unsupported")
            || c == "IdempotentParameterMismatch"
            || c == "IncorrectInstanceState"
            || c == "DryRunOperation" =>
        {
            ProviderError::Invalid {
                field: field_of(c, message),
                message: text,
            }
        }
        _ => match status {
            Some(s) if s >= 500 => ProviderError::Server(text),
            Some(429) => ProviderError::Throttled(text),
            Some(s) if (400..500).contains(&s) => ProviderError::invalid(None, text),
            _ => ProviderError::Internal(text),
        },
    }
}

/// The spec field a bad-request error is about, when the code or message tells.
fn field_of(code: &str, message: &str) -> Option<String> {
    let field = |f: &str| Some(format!("provider.{f}"));
    let family = code.split('.').next().unwrap_or(code);
    match family {
        "InvalidAMIID" | "InvalidAMIName" => return field("image"),
        "InvalidSubnetID" | "InvalidSubnet" => return field("subnet_ids"),
        "InvalidGroup" | "InvalidGroupId" | "InvalidSecurityGroupID" => {
            return field("security_group_ids");
        }
        "InvalidKeyPair" => return field("key_name"),
        "InvalidBlockDeviceMapping" => return field("root_volume_gb"),
        "InvalidInstanceType" => return Some("node_type".to_string()),
        "InvalidUserData" => return Some("user_data".to_string()),
        _ => {}
    }
    let m = message.to_ascii_lowercase();
    if m.contains("iaminstanceprofile") || m.contains("iam instance profile") {
        field("iam_instance_profile")
    } else if m.contains("instancetype") || m.contains("instance type") {
        Some("node_type".to_string())
    } else if m.contains("volume") || m.contains("blockdevice") {
        field("root_volume_gb")
    } else if m.contains("ami") || m.contains("imageid") || m.contains("image id") {
        field("image")
    } else if m.contains("subnet") {
        field("subnet_ids")
    } else if m.contains("security group") || m.contains("groupid") {
        field("security_group_ids")
    } else if m.contains("key pair") || m.contains("keyname") {
        field("key_name")
    } else if m.contains("tag") {
        field("tags")
    } else {
        None
    }
}
