//! What each documented build line compiles: the quickstart's builds no
//! cloud SDK (a newcomer's first command stays quick), the default build
//! has every cloud.

use std::process::Command;

fn tree(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal",
            "-p",
            "motorpool",
        ])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Cloud SDKs, and what only the simulated cloud needs (SQLite).
const CLOUD_CRATES: [&str; 4] = ["aws-sdk-", "google-cloud-", "azure_", "rusqlite"];

#[test]
fn the_quickstart_build_compiles_no_cloud_sdk() {
    // scripts/quickstart: `cargo build --bin motorpool --no-default-features`.
    let tree = tree(&["--no-default-features"]);
    for sdk in CLOUD_CRATES {
        assert!(
            !tree.lines().any(|l| l.contains(sdk)),
            "the quickstart build pulls in {sdk}*:\n{tree}"
        );
    }
    assert!(tree.contains("motorpool-local"), "{tree}");
}

#[test]
fn the_default_build_has_every_cloud_provider() {
    let tree = tree(&[]);
    assert!(tree.contains("motorpool-aws"), "{tree}");
    assert!(tree.contains("aws-sdk-ec2"), "{tree}");
    assert!(tree.contains("motorpool-gcp"), "{tree}");
    assert!(tree.contains("google-cloud-compute-v1"), "{tree}");
    assert!(tree.contains("motorpool-azure"), "{tree}");
    assert!(tree.contains("azure_mgmt_compute"), "{tree}");
    assert!(tree.contains("motorpool-sim"), "{tree}");
    // TLS is rustls on ring everywhere: no aws-lc (a long C build) and no
    // OpenSSL (a system library) sneak in through a cloud SDK's defaults.
    assert!(!tree.contains("aws-lc"), "{tree}");
    assert!(!tree.contains("openssl-sys"), "{tree}");
    assert!(!tree.contains("native-tls"), "{tree}");
}
