//! The Compute Engine machine types motorpool offers, with their sizes and prices.

use motorpool_provider::NodeType;

/// Common general purpose (e2, n2, n2d), memory optimised (e2-highmem,
/// n2-highmem) and compute optimised (c3) machine types: vCPUs, memory in GB
/// and the **on-demand Linux price in USD per hour in us-central1** (Iowa),
/// written down from Google's published price list as of 2026-11; they are
/// not fetched at run time. Other regions cost more or less, spot VMs much
/// less, and sustained-use discounts apply to n2/n2d: the plan's hourly cost
/// is an estimate for comparing sizes, not a bill.
///
/// e2-micro, e2-small and e2-medium are shared-core (a fraction of their 2
/// vCPUs, bursting); name an n2 or c3 type as `node_type` for steady CPU.
pub fn catalog() -> Vec<NodeType> {
    const TYPES: &[(&str, u32, f64, f64)] = &[
        // Shared-core and general purpose e2.
        ("e2-micro", 2, 1.0, 0.008376),
        ("e2-small", 2, 2.0, 0.016751),
        ("e2-medium", 2, 4.0, 0.033503),
        ("e2-standard-2", 2, 8.0, 0.067006),
        ("e2-standard-4", 4, 16.0, 0.134012),
        ("e2-standard-8", 8, 32.0, 0.268024),
        ("e2-standard-16", 16, 64.0, 0.536048),
        ("e2-highmem-2", 2, 16.0, 0.090390),
        ("e2-highmem-4", 4, 32.0, 0.180780),
        ("e2-highmem-8", 8, 64.0, 0.361560),
        // General purpose n2 (Intel) and n2d (AMD).
        ("n2-standard-2", 2, 8.0, 0.097118),
        ("n2-standard-4", 4, 16.0, 0.194236),
        ("n2-standard-8", 8, 32.0, 0.388472),
        ("n2-standard-16", 16, 64.0, 0.776944),
        ("n2-standard-32", 32, 128.0, 1.553888),
        ("n2-highmem-2", 2, 16.0, 0.131014),
        ("n2-highmem-4", 4, 32.0, 0.262028),
        ("n2-highmem-8", 8, 64.0, 0.524056),
        ("n2d-standard-2", 2, 8.0, 0.084492),
        ("n2d-standard-4", 4, 16.0, 0.168984),
        ("n2d-standard-8", 8, 32.0, 0.337968),
        ("n2d-standard-16", 16, 64.0, 0.675936),
        // Compute optimised c3.
        ("c3-standard-4", 4, 16.0, 0.208880),
        ("c3-standard-8", 8, 32.0, 0.417760),
        ("c3-standard-22", 22, 88.0, 1.148840),
        ("c3-standard-44", 44, 176.0, 2.297680),
    ];
    TYPES
        .iter()
        .map(|(name, cpus, memory, price)| NodeType::new(name, *cpus, *memory, *price))
        .collect()
}
