//! The built binary's command line. Being an integration test, this also makes
//! `cargo test --workspace` build `verge-controller` itself, which the end-to-end tests in
//! `tests/tests/controller.rs` run as a host process.

use std::process::Command;

#[test]
fn help_lists_every_tunable_with_its_env_var() {
    let out = Command::new(env!("CARGO_BIN_EXE_verge-controller"))
        .arg("--help")
        .output()
        .expect("run verge-controller --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--lease-duration",
        "VERGE_LEASE_DURATION",
        "--node-loss-delay",
        "--pending-timeout",
        "--failed-backoff-max",
        "--watch-namespace",
        "--http-addr",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn inconsistent_lease_settings_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_verge-controller"))
        .args(["--lease-duration", "5s", "--lease-renew-deadline", "10s"])
        .output()
        .expect("run verge-controller");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--lease-renew-deadline"));
}
