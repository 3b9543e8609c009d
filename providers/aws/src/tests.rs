//! Unit tests without any endpoint: settings, tokens, error mapping, catalog.
//! The EC2 calls themselves are tested against moto's server in `tests/`.

use super::*;
use crate::errors::classify;

fn field(e: &ProviderError) -> Option<&str> {
    match e {
        ProviderError::Invalid { field, .. } => field.as_deref(),
        _ => None,
    }
}

#[test]
fn error_codes_map_to_typed_errors() {
    let c = |code: &str, status: u16| classify("RunInstances", Some(code), Some(status), "m");
    for code in ["RequestLimitExceeded", "Throttling", "ThrottlingException"] {
        assert!(
            matches!(c(code, 400), ProviderError::Throttled(_)),
            "{code}"
        );
    }
    for code in ["ServiceUnavailable", "InternalError", "Unavailable"] {
        assert!(matches!(c(code, 503), ProviderError::Server(_)), "{code}");
    }
    assert!(matches!(
        c("InsufficientInstanceCapacity", 500),
        ProviderError::Capacity(_)
    ));
    for code in [
        "VcpuLimitExceeded",
        "InstanceLimitExceeded",
        "VolumeLimitExceeded",
        "MaxSpotInstanceCountExceeded",
    ] {
        assert!(matches!(c(code, 400), ProviderError::Quota(_)), "{code}");
    }
    for code in ["AuthFailure", "UnauthorizedOperation", "ExpiredToken"] {
        assert!(matches!(c(code, 403), ProviderError::Auth(_)), "{code}");
    }
    assert!(matches!(
        c("InvalidInstanceID.NotFound", 400),
        ProviderError::NotFound(_)
    ));
    // Unknown codes fall back on the HTTP status.
    assert!(matches!(c("SomethingNew", 502), ProviderError::Server(_)));
    assert!(matches!(
        classify("X", None, Some(503), "m"),
        ProviderError::Server(_)
    ));
    assert!(matches!(
        classify("X", None, Some(429), "m"),
        ProviderError::Throttled(_)
    ));
    // The retryable ones are exactly throttling and server errors.
    assert!(c("RequestLimitExceeded", 400).is_retryable());
    assert!(!c("InsufficientInstanceCapacity", 500).is_retryable());
    assert!(!c("InvalidAMIID.NotFound", 400).is_retryable());
}

#[test]
fn bad_requests_name_the_spec_field() {
    let c = |code: &str, message: &str| classify("RunInstances", Some(code), Some(400), message);
    assert_eq!(
        field(&c(
            "InvalidAMIID.NotFound",
            "The image id '[ami-1]' does not exist"
        )),
        Some("provider.image")
    );
    assert_eq!(
        field(&c("InvalidAMIID.Malformed", "bad")),
        Some("provider.image")
    );
    assert_eq!(
        field(&c(
            "InvalidSubnetID.NotFound",
            "The subnet ID 'subnet-1' does not exist"
        )),
        Some("provider.subnet_ids")
    );
    assert_eq!(
        field(&c("InvalidGroup.NotFound", "no such group")),
        Some("provider.security_group_ids")
    );
    assert_eq!(
        field(&c("InvalidKeyPair.NotFound", "no such key")),
        Some("provider.key_name")
    );
    assert_eq!(
        field(&c(
            "InvalidParameterValue",
            "Value (nope) for parameter iamInstanceProfile.name is invalid"
        )),
        Some("provider.iam_instance_profile")
    );
    assert_eq!(
        field(&c(
            "InvalidParameterValue",
            "Invalid value 'x9.huge' for InstanceType."
        )),
        Some("node_type")
    );
    let e = c(
        "InvalidAMIID.NotFound",
        "The image id '[ami-1]' does not exist",
    );
    assert!(
        e.to_string().contains("provider.image") && e.to_string().contains("ami-1"),
        "{e}"
    );
}

#[test]
fn settings_are_checked_before_any_call() {
    let ok = AwsProvider::new(AwsConfig::default()).expect("defaults are valid");
    assert_eq!(ok.default_image(), DEFAULT_IMAGE);
    let bad = |config: AwsConfig| AwsProvider::new(config).expect_err("invalid");
    let e = bad(AwsConfig {
        image: Some("ubuntu".into()),
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.image"));
    let e = bad(AwsConfig {
        subnet_ids: vec!["subnet-0abc".into(), "sub-1".into()],
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.subnet_ids"));
    let e = bad(AwsConfig {
        security_group_ids: vec!["group".into()],
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.security_group_ids"));
    let e = bad(AwsConfig {
        page_size: 2,
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.page_size"));
    let e = bad(AwsConfig {
        root_volume_gb: Some(0),
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.root_volume_gb"));
    let e = bad(AwsConfig {
        endpoint_url: Some("localhost:5000".into()),
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.endpoint_url"));
    let e = bad(AwsConfig {
        region: Some("US East".into()),
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.region"));
    let mut tags = Tags::new();
    tags.insert("motorpool-project".into(), "x".into());
    let e = bad(AwsConfig {
        tags,
        ..AwsConfig::default()
    });
    assert_eq!(field(&e), Some("provider.tags"));
}

#[test]
fn images_are_ami_ids_or_ssm_parameters() {
    assert_eq!(
        normalize_image("ami-0123456789abcdef0").as_deref(),
        Ok("ami-0123456789abcdef0")
    );
    assert_eq!(
        normalize_image(
            "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
        )
        .as_deref(),
        Ok(
            "resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
        )
    );
    assert_eq!(
        normalize_image("resolve:ssm:my-golden-ami").as_deref(),
        Ok("resolve:ssm:my-golden-ami")
    );
    assert!(normalize_image("ami-").is_err());
    assert!(normalize_image("ami-xyz").is_err());
    assert!(normalize_image("").is_err());
}

#[test]
fn client_tokens_fit_ec2_and_fail_over_tokens_differ() {
    assert_eq!(client_token(""), None);
    assert_eq!(client_token("mp-abc").as_deref(), Some("mp-abc"));
    let long = "x".repeat(100);
    let t = client_token(&long).expect("a token");
    assert!(t.len() <= 64 && t.is_ascii(), "{t}");
    assert_eq!(client_token(&long), Some(t.clone()), "stable");
    assert_ne!(client_token(&"y".repeat(100)), Some(t));
    assert!(client_token("with space").is_some_and(|t| !t.contains(' ')));
    let base = "mp-0123456789abcdef";
    assert_eq!(attempt_token(base, 0), base);
    let a1 = attempt_token(base, 1);
    let a2 = attempt_token(base, 2);
    assert!(a1 != a2 && a1 != base && a1.len() <= 64 && a2.len() <= 64);
}

#[test]
fn launches_spread_over_subnets_and_try_spot_before_on_demand() {
    let subnets: Vec<String> = ["subnet-0a", "subnet-0b", "subnet-0c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let p = AwsProvider::new(AwsConfig {
        subnet_ids: subnets.clone(),
        spot: true,
        ..AwsConfig::default()
    })
    .expect("valid");
    let a = p.attempts(Some("tok-1"));
    assert_eq!(a.len(), 6);
    assert!(a[..3].iter().all(|(spot, _)| *spot));
    assert!(a[3..].iter().all(|(spot, _)| !*spot));
    // Every subnet once per market, in the same rotation.
    let first: Vec<_> = a[..3].iter().map(|(_, s)| s.clone()).collect();
    let second: Vec<_> = a[3..].iter().map(|(_, s)| s.clone()).collect();
    assert_eq!(first, second);
    let mut sorted: Vec<String> = first.into_iter().flatten().collect();
    sorted.sort();
    assert_eq!(sorted, subnets);
    // The same token always starts in the same subnet; different tokens spread.
    assert_eq!(p.attempts(Some("tok-1")), a);
    let starts: std::collections::BTreeSet<Option<String>> = (0..30)
        .map(|n| p.attempts(Some(&format!("tok-{n}")))[0].1.clone())
        .collect();
    assert_eq!(starts.len(), 3, "30 tokens start in every subnet");
    // No subnets: one attempt per market in the default subnet.
    let plain = AwsProvider::new(AwsConfig::default()).expect("valid");
    assert_eq!(plain.attempts(Some("t")), vec![(false, None)]);
}

#[test]
fn instance_ids_are_recognised() {
    assert!(is_instance_id("i-0123456789abcdef0"));
    assert!(is_instance_id("i-12345678"));
    assert!(!is_instance_id("local-1"));
    assert!(!is_instance_id("i-xyz"));
    assert!(!is_instance_id("i-0123456789abcdef"));
}

#[test]
fn catalog_picks_the_cheapest_fit_and_has_prices() {
    let c = catalog();
    assert!(c.len() >= 40);
    assert!(c.iter().all(|t| t.hourly_price > 0.0 && t.cpus >= 2));
    let mut names: Vec<&str> = c.iter().map(|t| t.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), c.len(), "names are unique");
    let pick = |cpus, mem| {
        motorpool_provider::cheapest_fit(&c, cpus, mem)
            .map(|t| t.name.clone())
            .unwrap_or_default()
    };
    assert_eq!(pick(2, 4.0), "t3.medium");
    assert_eq!(pick(16, 32.0), "c5.4xlarge");
    assert_eq!(pick(8, 64.0), "r5.2xlarge");
    assert_eq!(pick(32, 256.0), "r5.8xlarge");
}
