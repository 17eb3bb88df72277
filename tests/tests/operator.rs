//! What an operator runs before the daemon: `lb config check` on the
//! shipped example configuration and on broken copies of it, as text and
//! as JSON, and its exit status.

use std::path::{Path, PathBuf};
use std::process::Output;

use tests::harness::lb_binary;

/// The example configuration shipped in dist/.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/lb.toml")
}

fn config_check(file: &Path, json: bool) -> Output {
    let mut command = std::process::Command::new(lb_binary());
    command.args(["config", "check"]).arg(file);
    if json {
        command.arg("--json");
    }
    command.output().expect("run lb config check")
}

fn the_example_configuration_is_valid_and_counted() {
    let output = config_check(&example(), false);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.ends_with(": valid: 1 VIP(s), 3 backend(s)\n"), "{text}");

    let output = config_check(&example(), true);
    assert!(output.status.success());
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], true);
    assert_eq!((report["vips"].as_u64(), report["backends"].as_u64()), (Some(1), Some(3)));
}

/// A mistake in the example makes the check fail with exit status 1 and
/// name the file, the line and the field, on stderr and in the JSON report.
fn a_broken_configuration_is_refused_with_its_line_and_field() {
    let text = std::fs::read_to_string(example()).unwrap();
    let broken = text.replace("weight = 2", "weight = 0");
    assert_ne!(broken, text, "the example has a backend of weight 2");
    let line = broken.lines().position(|line| line.starts_with("weight = 0")).unwrap() + 1;
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), &broken).unwrap();
    let place = format!("{}:{line}: vip.backend.weight:", file.path().display());

    let output = config_check(file.path(), false);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty(), "nothing printed as valid");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains(&place), "{stderr}");

    let output = config_check(file.path(), true);
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["valid"], false);
    assert!(report["error"].as_str().unwrap().starts_with(&place), "{report}");

    let missing = config_check(Path::new("/nonexistent/lb.toml"), false);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/lb.toml"));
}

tests::root_tests!(
    the_example_configuration_is_valid_and_counted,
    a_broken_configuration_is_refused_with_its_line_and_field,
);
