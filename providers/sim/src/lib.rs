//! The sim provider: a simulated cloud.
//! (Being written; see the Provider trait in motorpool-provider.)

use motorpool_provider::NodeType;

/// The simulated cloud's node types, priced like a small public cloud.
pub fn catalog() -> Vec<NodeType> {
    vec![
        NodeType::new("small", 2, 4.0, 0.05),
        NodeType::new("medium", 4, 16.0, 0.19),
        NodeType::new("large", 8, 32.0, 0.38),
        NodeType::new("xlarge", 16, 64.0, 0.77),
    ]
}
