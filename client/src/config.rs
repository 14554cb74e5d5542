//! Settings: the config file (`$XDG_CONFIG_HOME/hatch/config.toml`, else
//! `$HOME/.config/hatch/config.toml`, mode 0600), its profiles, and the environment variables
//! that override it.
//!
//! Precedence, highest first: `HATCH_API` / `HATCH_ACCESS_KEY` / `HATCH_CA`, then the selected
//! profile of the file. The profile is `--profile`, else `HATCH_PROFILE`, else `default`.
//! The environment is passed in as a function so that tests never touch the process's.
//!
//! ```toml
//! [profiles.default]
//! api = "https://relay.example.com:7444"
//! access_key = "hk_..."
//! ca_file = "/etc/hatch/ca.pem"   # optional; the system's web roots when absent
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::errors::CliError;

/// The profile used when neither `--profile` nor `HATCH_PROFILE` names one.
pub const DEFAULT_PROFILE: &str = "default";

/// Reads one environment variable; `std::env::var` in the binary, a map in tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Profiles by name.
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// One profile of the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// API base URL, `https://host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// Access key (a bearer secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key: Option<String>,
    /// PEM file of the CA that signed the relay's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Where a setting's value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An environment variable.
    Env(&'static str),
    /// The config file, in this profile.
    File(PathBuf, String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Env(var) => write!(f, "from {var}"),
            Source::File(path, profile) => {
                write!(f, "from profile {profile:?} of {}", path.display())
            }
        }
    }
}

/// The settings a command runs with, every one resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The selected profile.
    pub profile: String,
    /// API base URL without a trailing slash.
    pub api: String,
    /// Access key.
    pub access_key: String,
    /// CA file and where it was set, if any.
    pub ca_file: Option<(PathBuf, Source)>,
}

/// The config file's path: `$XDG_CONFIG_HOME/hatch/config.toml` when that is an absolute path,
/// else `$HOME/.config/hatch/config.toml`.
pub fn path(env: Env<'_>) -> Result<PathBuf, CliError> {
    if let Some(xdg) = env("XDG_CONFIG_HOME").filter(|x| Path::new(x).is_absolute()) {
        return Ok(PathBuf::from(xdg).join("hatch").join("config.toml"));
    }
    match env("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".config").join("hatch").join("config.toml")),
        None => Err(CliError::Config(
            "neither HOME nor XDG_CONFIG_HOME is set, so there is no config file; set HOME, or \
             set HATCH_API and HATCH_ACCESS_KEY"
                .to_owned(),
        )),
    }
}

/// Reads the config file; a missing file is an empty one.
pub fn load(path: &Path) -> Result<ConfigFile, CliError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => {
            return Err(CliError::Config(format!(
                "cannot read {}: {e}; fix its permissions or run `hatch configure`",
                path.display()
            )));
        }
    };
    toml::from_str(&text).map_err(|e| {
        let what = e.message().to_owned();
        CliError::Config(format!(
            "cannot parse {}: {what}; fix the file or run `hatch configure`",
            path.display()
        ))
    })
}

/// Writes the config file with mode 0600 (its directory 0700), replacing it atomically.
pub fn save(path: &Path, file: &ConfigFile) -> Result<(), CliError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

    let fail = |what: &str, p: &Path, e: std::io::Error| {
        CliError::Config(format!("cannot {what} {}: {e}", p.display()))
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| fail("create", dir, e))?;
    // Invariant: `toml` serialises a map of string-keyed tables of strings without error.
    let text = toml::to_string(file).expect("config serialises");
    let tmp = path.with_extension("toml.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| fail("write", &tmp, e))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| fail("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| fail("replace", path, e))
}

/// The profile to use: `--profile`, else `HATCH_PROFILE`, else `default`.
pub fn profile_name(flag: Option<&str>, env: Env<'_>) -> String {
    flag.map(str::to_owned)
        .or_else(|| env("HATCH_PROFILE").filter(|p| !p.is_empty()))
        .unwrap_or_else(|| DEFAULT_PROFILE.to_owned())
}

/// Resolves every setting. `file` is only consulted (and its error only returned) for a
/// setting that the environment does not give.
pub fn resolve(
    flag_profile: Option<&str>,
    env: Env<'_>,
    path: &Path,
    file: &Result<ConfigFile, CliError>,
) -> Result<Settings, CliError> {
    let profile = profile_name(flag_profile, env);
    let from_file = |pick: fn(&Profile) -> Option<String>| -> Result<Option<String>, CliError> {
        match file {
            Ok(f) => Ok(f.profiles.get(&profile).and_then(pick).filter(|v| !v.is_empty())),
            Err(e) => Err(e.clone()),
        }
    };
    let missing = |what: &str, var: &str, flag: &str| {
        CliError::Config(format!(
            "no {what} is set for profile {profile:?}; set it with `hatch configure{} {flag}` \
             or the environment variable {var}",
            if profile == DEFAULT_PROFILE {
                String::new()
            } else {
                format!(" --profile {profile}")
            }
        ))
    };

    let (api, api_source) = match env("HATCH_API").filter(|v| !v.is_empty()) {
        Some(v) => (v, Source::Env("HATCH_API")),
        None => match from_file(|p| p.api.clone())? {
            Some(v) => (v, Source::File(path.to_owned(), profile.clone())),
            None => return Err(missing("API URL", "HATCH_API", "--api URL")),
        },
    };
    let api = check_api_url(&api, &api_source)?;
    let access_key = match env("HATCH_ACCESS_KEY").filter(|v| !v.is_empty()) {
        Some(v) => v,
        None => from_file(|p| p.access_key.clone())?
            .ok_or_else(|| missing("access key", "HATCH_ACCESS_KEY", "--access-key KEY"))?,
    };
    let ca_file = match env("HATCH_CA").filter(|v| !v.is_empty()) {
        Some(v) => Some((PathBuf::from(v), Source::Env("HATCH_CA"))),
        // The CA is optional: with the API URL and key from the environment, an unreadable
        // file is not an error (a TLS failure then names the certificate problem).
        None => from_file(|p| p.ca_file.as_ref().map(|c| c.display().to_string()))
            .unwrap_or(None)
            .map(|v| (PathBuf::from(v), Source::File(path.to_owned(), profile.clone()))),
    };
    Ok(Settings { profile, api, access_key, ca_file })
}

/// Checks that `api` is an `https://` (or, for plaintext test relays, `http://`) URL with a
/// host, and strips a trailing slash.
pub fn check_api_url(api: &str, source: &Source) -> Result<String, CliError> {
    let bad = |why: &str| {
        CliError::Config(format!(
            "the API URL {api:?} ({source}) {why}; set it with `hatch configure --api \
             https://HOST:PORT` or HATCH_API"
        ))
    };
    let uri: http::Uri = api.parse().map_err(|_| bad("is not a URL"))?;
    match uri.scheme_str() {
        Some("https" | "http") => {}
        _ => return Err(bad("does not start with https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(api.trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    fn file() -> ConfigFile {
        let text = r#"
            [profiles.default]
            api = "https://file-default:7444/"
            access_key = "key-default"
            ca_file = "/file/ca.pem"

            [profiles.prod]
            api = "https://file-prod:7444"
            access_key = "key-prod"
        "#;
        toml::from_str(text).unwrap()
    }

    #[test]
    fn path_prefers_absolute_xdg_config_home() {
        let env = env_of(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "/xdg")]);
        assert_eq!(path(&env).unwrap(), PathBuf::from("/xdg/hatch/config.toml"));
        let env = env_of(&[("HOME", "/home/u"), ("XDG_CONFIG_HOME", "relative")]);
        assert_eq!(path(&env).unwrap(), PathBuf::from("/home/u/.config/hatch/config.toml"));
        let err = path(&env_of(&[])).unwrap_err();
        assert!(matches!(err, CliError::Config(m) if m.contains("HOME")));
    }

    #[test]
    fn precedence_table() {
        let p = Path::new("/cfg.toml");
        // (flag profile, env, expected (profile, api, key, ca))
        type Row<'a> = (
            Option<&'a str>,
            &'a [(&'a str, &'a str)],
            (&'a str, &'a str, &'a str, Option<&'a str>),
        );
        let table: &[Row<'_>] = &[
            (
                None,
                &[],
                ("default", "https://file-default:7444", "key-default", Some("/file/ca.pem")),
            ),
            (
                None,
                &[("HATCH_PROFILE", "prod")],
                ("prod", "https://file-prod:7444", "key-prod", None),
            ),
            (
                Some("prod"),
                &[("HATCH_PROFILE", "nope")],
                ("prod", "https://file-prod:7444", "key-prod", None),
            ),
            (
                None,
                &[("HATCH_API", "https://env:1")],
                ("default", "https://env:1", "key-default", Some("/file/ca.pem")),
            ),
            (
                Some("prod"),
                &[("HATCH_ACCESS_KEY", "env-key"), ("HATCH_CA", "/env/ca.pem")],
                ("prod", "https://file-prod:7444", "env-key", Some("/env/ca.pem")),
            ),
            // An empty variable counts as unset.
            (
                None,
                &[("HATCH_API", ""), ("HATCH_PROFILE", "")],
                ("default", "https://file-default:7444", "key-default", Some("/file/ca.pem")),
            ),
        ];
        for (flag, vars, (profile, api, key, ca)) in table {
            let env = env_of(vars);
            let s = resolve(*flag, &env, p, &Ok(file())).unwrap();
            assert_eq!(s.profile, *profile, "{vars:?}");
            assert_eq!(s.api, *api, "{vars:?}");
            assert_eq!(s.access_key, *key, "{vars:?}");
            assert_eq!(s.ca_file.map(|(c, _)| c), ca.map(PathBuf::from), "{vars:?}");
        }
    }

    #[test]
    fn env_alone_needs_no_file() {
        let env = env_of(&[("HATCH_API", "https://e:1"), ("HATCH_ACCESS_KEY", "k")]);
        let broken = Err(CliError::Config("cannot read /cfg.toml".to_owned()));
        let s = resolve(None, &env, Path::new("/cfg.toml"), &broken).unwrap();
        assert_eq!((s.api.as_str(), s.access_key.as_str(), s.ca_file), ("https://e:1", "k", None));
        // Without HATCH_ACCESS_KEY the unreadable file is the error.
        let env = env_of(&[("HATCH_API", "https://e:1")]);
        let err = resolve(None, &env, Path::new("/cfg.toml"), &broken).unwrap_err();
        assert_eq!(err, CliError::Config("cannot read /cfg.toml".to_owned()));
    }

    #[test]
    fn missing_settings_name_the_setting_and_how_to_set_it() {
        let p = Path::new("/cfg.toml");
        let err = resolve(None, &env_of(&[]), p, &Ok(ConfigFile::default())).unwrap_err();
        assert_eq!(err.exit_code(), 78);
        assert_eq!(
            err.message(false),
            "configuration: no API URL is set for profile \"default\"; set it with `hatch \
             configure --api URL` or the environment variable HATCH_API"
        );
        let env = env_of(&[("HATCH_API", "https://e:1")]);
        let err = resolve(Some("ops"), &env, p, &Ok(file())).unwrap_err();
        assert_eq!(
            err.message(false),
            "configuration: no access key is set for profile \"ops\"; set it with `hatch \
             configure --profile ops --access-key KEY` or the environment variable \
             HATCH_ACCESS_KEY"
        );
    }

    #[test]
    fn bad_api_urls_are_config_errors() {
        let p = Path::new("/cfg.toml");
        for (url, why) in [
            ("relay:7444", "does not start with https://"),
            ("ftp://relay", "does not start with https://"),
            ("https://", "is not a URL"),
            ("not a url", "is not a URL"),
        ] {
            let env = env_of(&[("HATCH_API", url), ("HATCH_ACCESS_KEY", "k")]);
            let err = resolve(None, &env, p, &Ok(ConfigFile::default())).unwrap_err();
            let line = err.message(false);
            assert!(line.contains(why) && line.contains("from HATCH_API"), "{url}: {line}");
        }
    }

    #[test]
    fn save_then_load_round_trips_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/config.toml");
        save(&p, &file()).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load(&p).unwrap(), file());
        assert_eq!(load(&dir.path().join("none.toml")).unwrap(), ConfigFile::default());
        std::fs::write(&p, "[profiles.default]\napi = 3\n").unwrap();
        let err = load(&p).unwrap_err();
        assert!(err.message(false).contains("cannot parse"), "{}", err.message(false));
    }
}
