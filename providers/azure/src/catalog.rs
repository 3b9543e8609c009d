//! The Azure VM sizes motorpool offers, with their sizes and prices.

use motorpool_provider::NodeType;

/// Common general purpose (Dsv5, Ddsv5, Dasv5), memory optimised (Esv5),
/// compute optimised (Fsv2) and burstable (B) sizes: vCPUs, memory in GiB and
/// the **pay-as-you-go Linux price in USD per hour in East US**, written down
/// from Microsoft's published price list as of 2026-11; they are not fetched
/// at run time. Other regions cost more or less and Spot much less: the
/// plan's hourly cost is an estimate for comparing sizes, not a bill.
///
/// B sizes are burstable (CPU credits); name a D, E or F size as
/// `node_type` for steady CPU.
pub fn catalog() -> Vec<NodeType> {
    const SIZES: &[(&str, u32, f64, f64)] = &[
        // Burstable.
        ("Standard_B1s", 1, 1.0, 0.0104),
        ("Standard_B2s", 2, 4.0, 0.0416),
        // General purpose (Intel, with local disk, AMD).
        ("Standard_D2s_v5", 2, 8.0, 0.096),
        ("Standard_D4s_v5", 4, 16.0, 0.192),
        ("Standard_D8s_v5", 8, 32.0, 0.384),
        ("Standard_D16s_v5", 16, 64.0, 0.768),
        ("Standard_D2ds_v5", 2, 8.0, 0.113),
        ("Standard_D4ds_v5", 4, 16.0, 0.226),
        ("Standard_D2as_v5", 2, 8.0, 0.086),
        ("Standard_D4as_v5", 4, 16.0, 0.172),
        // Memory optimised.
        ("Standard_E2s_v5", 2, 16.0, 0.126),
        ("Standard_E4s_v5", 4, 32.0, 0.252),
        ("Standard_E8s_v5", 8, 64.0, 0.504),
        // Compute optimised.
        ("Standard_F2s_v2", 2, 4.0, 0.0846),
        ("Standard_F4s_v2", 4, 8.0, 0.169),
        ("Standard_F8s_v2", 8, 16.0, 0.338),
        ("Standard_F16s_v2", 16, 32.0, 0.677),
    ];
    SIZES
        .iter()
        .map(|(name, cpus, memory, price)| NodeType::new(name, *cpus, *memory, *price))
        .collect()
}
