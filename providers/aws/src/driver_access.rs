//! Public drivers (`public_driver_cidrs`): the security group that lets the
//! machines running `motorpool` reach a cluster's driver from outside its
//! VPC, and the network interface a driver (or a pool instance, which may
//! become one) is launched with.
//!
//! - **One group per project and VPC**, named `motorpool-<project>-driver-access`
//!   and tagged `motorpool-project`, found by name or made
//!   (`CreateSecurityGroup`; a concurrent maker's `InvalidGroup.Duplicate`
//!   means it is there). Its inbound rules are exactly TCP
//!   [`CLOUD_AGENT_PORT`]–[`CLOUD_RUNTIME_PORT`] from each listed CIDR:
//!   ranges no longer listed are revoked, new ones authorised.
//! - **The interface**: a public IP (`AssociatePublicIpAddress`), the
//!   subnet of the attempt, and the spec's `security_group_ids` (else the
//!   VPC's `default` group, which a launch without interfaces would get)
//!   plus the access group.
//!
//! Only these ports open, only to those ranges; every call on them still
//! needs the project's credential over TLS.

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    Filter, InstanceNetworkInterfaceSpecification, IpPermission, IpRange, ResourceType, Tag,
    TagSpecification,
};
use motorpool_provider::{CLOUD_AGENT_PORT, CLOUD_RUNTIME_PORT, ProviderError, Result, tags};

use crate::errors::{Ec2Error, from_sdk};

/// The security groups and the VPC a public driver is launched into.
#[derive(Debug, Clone)]
pub struct AccessGroups {
    /// The access group's id.
    pub access: String,
    /// The other groups of the interface.
    pub others: Vec<String>,
}

impl AccessGroups {
    /// The network interface of a launch into `subnet` (None: the default VPC's choice).
    pub fn interface(&self, subnet: Option<String>) -> InstanceNetworkInterfaceSpecification {
        let mut groups = self.others.clone();
        groups.push(self.access.clone());
        InstanceNetworkInterfaceSpecification::builder()
            .device_index(0)
            .associate_public_ip_address(true)
            .delete_on_termination(true)
            .set_subnet_id(subnet)
            .set_groups(Some(groups))
            .build()
    }
}

/// The access group's name for `project`.
pub fn group_name(project: &str) -> String {
    format!("motorpool-{project}-driver-access")
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// Find or make the project's access group with exactly `cidrs` open, in
/// the VPC of `subnet` (else the default VPC); the groups to launch with.
pub async fn ensure(
    ec2: &Client,
    project: &str,
    cidrs: &[String],
    subnet: Option<&str>,
    security_group_ids: &[String],
) -> Result<AccessGroups> {
    let vpc = vpc_of(ec2, subnet).await?;
    let name = group_name(project);
    let access = match find_group(ec2, &vpc, &name).await? {
        Some(id) => id,
        None => match create_group(ec2, &vpc, &name, project).await {
            Ok(id) => id,
            // Made at the same moment by another apply: use theirs.
            Err(e) if e.code.as_deref() == Some("InvalidGroup.Duplicate") => {
                find_group(ec2, &vpc, &name).await?.ok_or(e.error)?
            }
            Err(e) => return Err(e.error),
        },
    };
    set_rules(ec2, &access, cidrs).await?;
    let others = if security_group_ids.is_empty() {
        vec![find_group(ec2, &vpc, "default").await?.ok_or_else(|| {
            ProviderError::invalid(
                Some("security_group_ids".into()),
                format!("VPC {vpc} has no `default` security group: name `security_group_ids`"),
            )
        })?]
    } else {
        security_group_ids.to_vec()
    };
    Ok(AccessGroups { access, others })
}

/// The VPC of `subnet`, or the region's default VPC.
async fn vpc_of(ec2: &Client, subnet: Option<&str>) -> Result<String> {
    let vpc = match subnet {
        Some(subnet) => ec2
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .map_err(|e| ProviderError::from(from_sdk("DescribeSubnets", e)))?
            .subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_string),
        None => ec2
            .describe_vpcs()
            .filters(filter("is-default", "true"))
            .send()
            .await
            .map_err(|e| ProviderError::from(from_sdk("DescribeVpcs", e)))?
            .vpcs()
            .first()
            .and_then(|v| v.vpc_id())
            .map(str::to_string),
    };
    vpc.ok_or_else(|| {
        ProviderError::invalid(
            Some("subnet_ids".into()),
            "public drivers need a VPC: this region has no default VPC, name `subnet_ids`",
        )
    })
}

async fn find_group(ec2: &Client, vpc: &str, name: &str) -> Result<Option<String>> {
    let out = ec2
        .describe_security_groups()
        .filters(filter("vpc-id", vpc))
        .filters(filter("group-name", name))
        .send()
        .await
        .map_err(|e| ProviderError::from(from_sdk("DescribeSecurityGroups", e)))?;
    Ok(out
        .security_groups()
        .iter()
        .find(|g| g.group_name() == Some(name))
        .and_then(|g| g.group_id())
        .map(str::to_string))
}

async fn create_group(
    ec2: &Client,
    vpc: &str,
    name: &str,
    project: &str,
) -> std::result::Result<String, Ec2Error> {
    let out = ec2
        .create_security_group()
        .group_name(name)
        .description("motorpool: the agent and driver ports of public drivers")
        .vpc_id(vpc)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::SecurityGroup)
                .tags(Tag::builder().key(tags::PROJECT).value(project).build())
                .build(),
        )
        .send()
        .await
        .map_err(|e| from_sdk("CreateSecurityGroup", e))?;
    out.group_id().map(str::to_string).ok_or_else(|| Ec2Error {
        code: None,
        error: ProviderError::Internal("CreateSecurityGroup returned no group id".into()),
    })
}

/// The rule for `cidrs` on the agent's and the driver's ports.
fn rule(cidrs: &[String]) -> IpPermission {
    IpPermission::builder()
        .ip_protocol("tcp")
        .from_port(i32::from(CLOUD_AGENT_PORT))
        .to_port(i32::from(CLOUD_RUNTIME_PORT))
        .set_ip_ranges(Some(
            cidrs
                .iter()
                .map(|c| IpRange::builder().cidr_ip(c).build())
                .collect(),
        ))
        .build()
}

/// Make the group's inbound rules exactly `cidrs` on the two ports.
async fn set_rules(ec2: &Client, group: &str, cidrs: &[String]) -> Result<()> {
    let out = ec2
        .describe_security_groups()
        .group_ids(group)
        .send()
        .await
        .map_err(|e| ProviderError::from(from_sdk("DescribeSecurityGroups", e)))?;
    let open: Vec<String> = out
        .security_groups()
        .iter()
        .flat_map(|g| g.ip_permissions())
        .filter(|p| {
            p.from_port() == Some(i32::from(CLOUD_AGENT_PORT))
                && p.to_port() == Some(i32::from(CLOUD_RUNTIME_PORT))
        })
        .flat_map(|p| p.ip_ranges())
        .filter_map(|r| r.cidr_ip().map(str::to_string))
        .collect();
    let stale: Vec<String> = open
        .iter()
        .filter(|c| !cidrs.contains(c))
        .cloned()
        .collect();
    let missing: Vec<String> = cidrs
        .iter()
        .filter(|c| !open.contains(c))
        .cloned()
        .collect();
    if !stale.is_empty() {
        ec2.revoke_security_group_ingress()
            .group_id(group)
            .ip_permissions(rule(&stale))
            .send()
            .await
            .map_err(|e| ProviderError::from(from_sdk("RevokeSecurityGroupIngress", e)))?;
    }
    if !missing.is_empty() {
        match ec2
            .authorize_security_group_ingress()
            .group_id(group)
            .ip_permissions(rule(&missing))
            .send()
            .await
        {
            Ok(_) => {}
            Err(e) => {
                let e = from_sdk("AuthorizeSecurityGroupIngress", e);
                // Authorised at the same moment by another apply.
                if e.code.as_deref() != Some("InvalidPermission.Duplicate") {
                    return Err(e.error);
                }
            }
        }
    }
    Ok(())
}
