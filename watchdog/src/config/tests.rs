//! Tests of the command line and its validation.

use super::*;

fn cli(args: &[&str]) -> Cli {
    Cli::try_parse_from(std::iter::once("vma-watchdog").chain(args.iter().copied())).unwrap()
}

#[test]
fn defaults_watch_migratekit_with_auto_detection() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("new/state");
    let c = Config::load(cli(&["--state-dir", state.to_str().unwrap()])).unwrap();
    assert!(state.is_dir(), "the state directory is created");
    assert_eq!(c.match_names, ["migratekit"]);
    assert_eq!(c.detector, DetectorChoice::Auto);
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(c.listen, ["127.0.0.1:8081".parse().unwrap()]);
    assert_eq!(c.listen_if_available, ["[::1]:8081".parse().unwrap()]);
    assert!(c.api_token.is_none() && c.oma.is_none());
    assert_eq!(c.vma_id, hostname());
    assert_eq!(c.launcher.args, ["migrate", "--job-id", "{job_id}"]);
}

#[test]
fn delivery_needs_a_token_and_a_url() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let err = Config::load(cli(&["--state-dir", d, "--oma-url", "http://oma:1"])).unwrap_err();
    assert!(err.to_string().contains("--oma-token-file"), "{err}");
    let err = Config::load(cli(&[
        "--state-dir",
        d,
        "--oma-url",
        "oma:1",
        "--oma-token",
        "t",
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("http://"), "{err}");
    let c = Config::load(cli(&[
        "--state-dir",
        d,
        "--oma-url",
        "http://oma:1/",
        "--oma-token",
        "oma-secret",
        "--vma-id",
        "vma-7",
        "--listen",
        "127.0.0.1:0",
        "--api-token",
        "api-secret",
        "--launch-program",
        "/bin/true",
        "--launch-arg",
        "--job-id",
        "--launch-arg",
        "{job_id}",
    ]))
    .unwrap();
    let oma = c.oma.as_ref().unwrap();
    assert_eq!(
        (oma.url.as_str(), c.vma_id.as_str()),
        ("http://oma:1", "vma-7")
    );
    assert!(c.listen_if_available.is_empty());
    assert_eq!(c.launcher.args, ["--job-id", "{job_id}"]);
    let shown = format!(
        "{c:?} {:?}",
        cli(&["--state-dir", d, "--api-token", "api-secret"])
    );
    assert!(!shown.contains("secret"), "{shown}");
}

#[test]
fn options_are_parsed_and_names_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let c = Config::load(cli(&[
        "--state-dir",
        d,
        "--match-name",
        "a",
        "--match-name",
        "b",
        "--match-name",
        "a",
        "--log-format",
        "json",
        "--detector",
        "procfs",
    ]))
    .unwrap();
    assert_eq!(c.match_names, ["a", "b"]);
    assert_eq!(
        (c.log_format, c.detector),
        (LogFormat::Json, DetectorChoice::Procfs)
    );
}

#[test]
fn bad_values_are_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let err = Config::load(cli(&[
        "--state-dir",
        d,
        "--match-name",
        "0123456789abcdefg",
    ]))
    .unwrap_err();
    assert!(err.to_string().contains("first 15 bytes"), "{err}");
    let err = Config::load(cli(&["--state-dir", d, "--match-name", "/usr/bin/x"])).unwrap_err();
    assert!(err.to_string().contains("base name"), "{err}");
    let file = dir.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let err = Config::load(cli(&["--state-dir", file.to_str().unwrap()])).unwrap_err();
    assert!(err.to_string().contains("state directory"), "{err:#}");
    assert!(
        Cli::try_parse_from(["vma-watchdog"]).is_err(),
        "--state-dir is required"
    );
    assert!(Cli::try_parse_from(["vma-watchdog", "--state-dir", d, "--detector", "x"]).is_err());
}
