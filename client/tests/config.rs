//! The real `hatch` binary's configuration: `configure` writes a 0600 file under HOME or
//! XDG_CONFIG_HOME, the environment overrides it, and a missing or unreadable setting is a
//! one-line error naming the setting, exit 78.

mod support;

use std::os::unix::fs::PermissionsExt;

use support::{hatch, run, stderr, stdout};

#[test]
fn configure_writes_a_private_file_that_later_commands_use() {
    let home = tempfile::tempdir().unwrap();
    let ca = home.path().join("ca.pem");
    hatch_relay::certs::ensure_dev_pki(&home.path().join("pki"), &[]).unwrap();
    std::fs::copy(home.path().join("pki/ca.pem"), &ca).unwrap();

    let mut cmd = hatch(home.path());
    cmd.args([
        "configure",
        "--profile",
        "lab",
        "--api",
        "https://127.0.0.1:9/",
        "--access-key",
        "secret-key",
    ])
    .arg("--ca")
    .arg(&ca);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let path = home.path().join(".config/hatch/config.toml");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!(
            "[profiles.lab]\napi = \"https://127.0.0.1:9\"\naccess_key = \"secret-key\"\nca_file = \"{}\"\n",
            ca.display()
        )
    );

    // The profile is used (the port is closed, so the error names its URL), via flag or env.
    let mut cmd = hatch(home.path());
    cmd.args(["--profile", "lab", "instances"]);
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(255));
    assert!(stderr(&out).contains("cannot connect to https://127.0.0.1:9"), "{}", stderr(&out));
    let mut cmd = hatch(home.path());
    cmd.env("HATCH_PROFILE", "lab").env("HATCH_API", "https://127.0.0.1:7").arg("instances");
    let out = run(cmd);
    assert!(stderr(&out).contains("cannot connect to https://127.0.0.1:7"), "{}", stderr(&out));

    // The default profile is not configured.
    let out = run({
        let mut c = hatch(home.path());
        c.arg("instances");
        c
    });
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "hatch: configuration: no API URL is set for profile \"default\"; set it with `hatch \
         configure --api URL` or the environment variable HATCH_API\n"
    );
}

#[test]
fn xdg_config_home_is_honoured() {
    let home = tempfile::tempdir().unwrap();
    let xdg = home.path().join("xdg");
    let mut cmd = hatch(home.path());
    cmd.env("XDG_CONFIG_HOME", &xdg).args([
        "configure",
        "--api",
        "https://h:1",
        "--access-key",
        "k",
    ]);
    assert_eq!(run(cmd).status.code(), Some(0));
    assert!(xdg.join("hatch/config.toml").exists());
    assert!(!home.path().join(".config").exists());
}

#[test]
fn missing_and_unreadable_settings_are_one_line_errors() {
    let home = tempfile::tempdir().unwrap();
    let go = |env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = hatch(home.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args);
        run(cmd)
    };
    let out = go(&[("HATCH_API", "https://127.0.0.1:9")], &["sessions"]);
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(
        stderr(&out),
        "hatch: configuration: no access key is set for profile \"default\"; set it with `hatch \
         configure --access-key KEY` or the environment variable HATCH_ACCESS_KEY\n"
    );

    let out = go(&[("HATCH_API", "127.0.0.1:9"), ("HATCH_ACCESS_KEY", "k")], &["sessions"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("\"127.0.0.1:9\" (from HATCH_API) does not start with https://"),
        "{}",
        stderr(&out)
    );

    let missing_ca = home.path().join("nope.pem");
    let out = go(
        &[
            ("HATCH_API", "https://127.0.0.1:9"),
            ("HATCH_ACCESS_KEY", "k"),
            ("HATCH_CA", missing_ca.to_str().unwrap()),
        ],
        &["instances"],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).starts_with(&format!(
            "hatch: configuration: cannot use the CA file {} (from HATCH_CA): No such file",
            missing_ca.display()
        )),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1);

    let not_pem = home.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let out = go(
        &[],
        &[
            "configure",
            "--api",
            "https://h:1",
            "--access-key",
            "k",
            "--ca",
            not_pem.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("holds no PEM certificate"), "{}", stderr(&out));

    // An unparsable config file names itself.
    let path = home.path().join(".config/hatch/config.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "[profiles.default\n").unwrap();
    let out = go(&[], &["instances"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).starts_with(&format!("hatch: configuration: cannot parse {}", path.display())),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let home = tempfile::tempdir().unwrap();
    for args in
        [&["exec", "--instance", "i-1"][..], &["sessions", "--active", "--closed"], &["frobnicate"]]
    {
        let mut cmd = hatch(home.path());
        cmd.args(args);
        assert_eq!(run(cmd).status.code(), Some(64), "{args:?}");
    }
    let mut cmd = hatch(home.path());
    cmd.arg("--help");
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("session"));
}

#[test]
fn completions_for_bash_zsh_and_fish() {
    let home = tempfile::tempdir().unwrap();
    for (shell, marker) in
        [("bash", "complete -F _hatch"), ("zsh", "#compdef hatch"), ("fish", "complete -c hatch")]
    {
        let mut cmd = hatch(home.path());
        cmd.args(["completions", shell]);
        let out = run(cmd);
        assert_eq!(out.status.code(), Some(0));
        assert!(stdout(&out).contains(marker), "{shell}");
        assert!(stdout(&out).contains("exec"), "{shell}");
        // Generated from the command line: the IAM commands and their subcommands come along.
        for word in ["activations", "revoke-secret", "detach"] {
            assert!(stdout(&out).contains(word), "{shell}: {word}");
        }
    }
}
