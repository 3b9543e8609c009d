//! The EC2 instance types motorpool offers, with their sizes and prices.

use motorpool_provider::NodeType;

/// Common general purpose (t3, m5, m6i, m7i), compute optimised (c5, c6i,
/// c7i) and memory optimised (r5, r6i, r7i) x86_64 instance types: vCPUs,
/// memory in GiB and the **on-demand Linux price in USD per hour in
/// us-east-1** (N. Virginia). Prices as of 2026-11-20, written down from
/// AWS's published on-demand price list (these list prices have not moved
/// since the families launched); they are not fetched at run time. Other
/// regions cost more or less (typically +5 to +30%) and spot is cheaper: the
/// plan's hourly cost is an estimate for comparing sizes, not a bill.
///
/// `resources: {cpus, memory_gb}` picks the cheapest type here that fits.
/// Note that t3 types are burstable: the cheapest fit for a small size is
/// often a t3; name an `m`/`c`/`r` type as `node_type` for steady CPU.
pub fn catalog() -> Vec<NodeType> {
    const TYPES: &[(&str, u32, f64, f64)] = &[
        // Burstable general purpose.
        ("t3.micro", 2, 1.0, 0.0104),
        ("t3.small", 2, 2.0, 0.0208),
        ("t3.medium", 2, 4.0, 0.0416),
        ("t3.large", 2, 8.0, 0.0832),
        ("t3.xlarge", 4, 16.0, 0.1664),
        ("t3.2xlarge", 8, 32.0, 0.3328),
        // General purpose.
        ("m5.large", 2, 8.0, 0.096),
        ("m5.xlarge", 4, 16.0, 0.192),
        ("m5.2xlarge", 8, 32.0, 0.384),
        ("m5.4xlarge", 16, 64.0, 0.768),
        ("m5.8xlarge", 32, 128.0, 1.536),
        ("m6i.large", 2, 8.0, 0.096),
        ("m6i.xlarge", 4, 16.0, 0.192),
        ("m6i.2xlarge", 8, 32.0, 0.384),
        ("m6i.4xlarge", 16, 64.0, 0.768),
        ("m6i.8xlarge", 32, 128.0, 1.536),
        ("m7i.large", 2, 8.0, 0.1008),
        ("m7i.xlarge", 4, 16.0, 0.2016),
        ("m7i.2xlarge", 8, 32.0, 0.4032),
        ("m7i.4xlarge", 16, 64.0, 0.8064),
        ("m7i.8xlarge", 32, 128.0, 1.6128),
        // Compute optimised.
        ("c5.large", 2, 4.0, 0.085),
        ("c5.xlarge", 4, 8.0, 0.17),
        ("c5.2xlarge", 8, 16.0, 0.34),
        ("c5.4xlarge", 16, 32.0, 0.68),
        ("c5.9xlarge", 36, 72.0, 1.53),
        ("c6i.large", 2, 4.0, 0.085),
        ("c6i.xlarge", 4, 8.0, 0.17),
        ("c6i.2xlarge", 8, 16.0, 0.34),
        ("c6i.4xlarge", 16, 32.0, 0.68),
        ("c6i.8xlarge", 32, 64.0, 1.36),
        ("c7i.large", 2, 4.0, 0.08925),
        ("c7i.xlarge", 4, 8.0, 0.1785),
        ("c7i.2xlarge", 8, 16.0, 0.357),
        ("c7i.4xlarge", 16, 32.0, 0.714),
        ("c7i.8xlarge", 32, 64.0, 1.428),
        // Memory optimised.
        ("r5.large", 2, 16.0, 0.126),
        ("r5.xlarge", 4, 32.0, 0.252),
        ("r5.2xlarge", 8, 64.0, 0.504),
        ("r5.4xlarge", 16, 128.0, 1.008),
        ("r5.8xlarge", 32, 256.0, 2.016),
        ("r6i.large", 2, 16.0, 0.126),
        ("r6i.xlarge", 4, 32.0, 0.252),
        ("r6i.2xlarge", 8, 64.0, 0.504),
        ("r6i.4xlarge", 16, 128.0, 1.008),
        ("r6i.8xlarge", 32, 256.0, 2.016),
        ("r7i.large", 2, 16.0, 0.1323),
        ("r7i.xlarge", 4, 32.0, 0.2646),
        ("r7i.2xlarge", 8, 64.0, 0.5292),
        ("r7i.4xlarge", 16, 128.0, 1.0584),
        ("r7i.8xlarge", 32, 256.0, 2.1168),
    ];
    TYPES
        .iter()
        .map(|&(name, cpus, memory_gb, price)| NodeType::new(name, cpus, memory_gb, price))
        .collect()
}
