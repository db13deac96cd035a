//! The shipped `mailvault-node` (what `deploy/local/up.sh`, `cargo build
//! --workspace` and the release build produce) has no unsafe test mode in it;
//! only the harness's `mailvault-node-test-modes` has them.

use std::path::{Path, PathBuf};
use std::process::Command;

use mailvault_chaos::{node_binary, test_modes_node_binary};

/// Names only the test-mode parser holds (see `mailvault_node::test_modes`).
const MODE_NAMES: &[&str] = &[
    "ack-before-fsync",
    "stale-reads",
    "unaudited-reads",
    "slow-leader-sync",
];

/// Whether the file holds `needle` (grep: a scan of the binary in an
/// unoptimised test took most of a minute).
fn contains(file: &Path, needle: &str) -> bool {
    let status = Command::new("grep")
        .env("LC_ALL", "C")
        .args(["-q", "-a", "-F", "-e", needle])
        .arg(file)
        .status()
        .expect("run grep");
    match status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("grep failed on {}", file.display()),
    }
}

fn mode_names_in(bin: &Path) -> Vec<&'static str> {
    MODE_NAMES.iter().copied().filter(|n| contains(bin, n)).collect()
}

/// Every built `mailvault-node` of this target directory: the one the tests
/// run, and the other profile's if it was built too.
fn shipped_binaries() -> Vec<PathBuf> {
    let bin = node_binary();
    let mut all = vec![bin.clone()];
    let target = bin.parent().and_then(Path::parent).expect("target dir");
    for profile in ["debug", "release"] {
        let other = target.join(profile).join("mailvault-node");
        if other.exists() && !all.contains(&other) {
            all.push(other);
        }
    }
    all
}

#[test]
fn shipped_node_binary_contains_no_test_mode() {
    // The check can fail: the harness's binary has every mode in it.
    let harness = test_modes_node_binary();
    assert_eq!(mode_names_in(&harness), MODE_NAMES, "{}", harness.display());
    for bin in shipped_binaries() {
        assert_eq!(
            mode_names_in(&bin),
            Vec::<&str>::new(),
            "{} has test modes compiled in",
            bin.display()
        );
    }
}

#[test]
fn shipped_node_binary_refuses_to_start_in_a_test_mode() {
    let run = |bin: PathBuf| {
        Command::new(bin)
            .env(mailvault_node::test_modes::ENV, "ack-before-fsync")
            .args(["--config", "/nonexistent/node.toml", "--check"])
            .output()
            .expect("run the node binary")
    };
    let out = run(node_binary());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("built without the `test-modes` feature"),
        "{stderr}"
    );
    // The harness's binary accepts the mode and fails on the missing config instead.
    let out = run(test_modes_node_binary());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("test-modes"), "{stderr}");
    assert!(stderr.contains("/nonexistent/node.toml"), "{stderr}");
}

/// The harness's binary is the node's sources compiled as a second package;
/// its dependencies must be the node's, or the two would drift apart.
#[test]
fn test_node_package_has_the_node_dependencies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let deps = |p: &Path, table: &str| -> toml::Value {
        let text = std::fs::read_to_string(p).unwrap();
        let doc: toml::Value = toml::from_str(&text).unwrap();
        doc[table].clone()
    };
    for table in ["dependencies", "dev-dependencies"] {
        assert_eq!(
            deps(&root.join("../node/Cargo.toml"), table),
            deps(&root.join("test-node/Cargo.toml"), table),
            "[{table}]"
        );
    }
}
