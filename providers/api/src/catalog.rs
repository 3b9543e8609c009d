//! Node types: what a provider offers (cpus, memory, price), and how a
//! `resources: {cpus, memory_gb}` request picks the cheapest type that fits.

use serde::{Deserialize, Serialize};

/// One entry of a provider's catalog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeType {
    pub name: String,
    pub cpus: u32,
    pub memory_gb: f64,
    /// On-demand price in USD per hour (0 for the local machine).
    pub hourly_price: f64,
}

impl NodeType {
    pub fn new(name: &str, cpus: u32, memory_gb: f64, hourly_price: f64) -> Self {
        NodeType {
            name: name.to_string(),
            cpus,
            memory_gb,
            hourly_price,
        }
    }
}

/// The cheapest node type with at least `cpus` and `memory_gb`; ties go to the
/// smaller machine, then to the name, so the choice is stable.
pub fn cheapest_fit(catalog: &[NodeType], cpus: u32, memory_gb: f64) -> Option<&NodeType> {
    catalog
        .iter()
        .filter(|t| t.cpus >= cpus && t.memory_gb >= memory_gb)
        .min_by(|a, b| {
            a.hourly_price
                .total_cmp(&b.hourly_price)
                .then(a.cpus.cmp(&b.cpus))
                .then(a.memory_gb.total_cmp(&b.memory_gb))
                .then(a.name.cmp(&b.name))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_cheapest_type_that_fits() {
        let catalog = vec![
            NodeType::new("big", 16, 64.0, 0.8),
            NodeType::new("small", 2, 4.0, 0.1),
            NodeType::new("medium", 4, 16.0, 0.2),
        ];
        assert_eq!(
            cheapest_fit(&catalog, 3, 8.0).map(|t| t.name.as_str()),
            Some("medium")
        );
        assert_eq!(
            cheapest_fit(&catalog, 1, 1.0).map(|t| t.name.as_str()),
            Some("small")
        );
        assert!(cheapest_fit(&catalog, 64, 1.0).is_none());
    }
}
