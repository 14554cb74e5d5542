//! The command line: every command, flag and argument (clap derive). `docs/CLI.md` describes
//! the same surface for people.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hatch_proto::api::RecordingMode;

/// Open a terminal on an instance through the Hatch relay.
#[derive(Debug, Parser)]
#[command(name = "hatch", version, about, propagate_version = true)]
pub struct Cli {
    /// Show each HTTP exchange and, on errors, the request id.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Profile of the config file to use (default: $HATCH_PROFILE, else "default").
    #[arg(long, global = true, value_name = "PROFILE")]
    pub profile: Option<String>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the API URL, access key and CA file of a profile to the config file.
    Configure(ConfigureArgs),
    /// Open an interactive shell on an instance (`~.` after Enter disconnects).
    #[command(visible_alias = "ssh")]
    Session(SessionArgs),
    /// Run one command on an instance, streaming stdin, stdout and its exit status.
    Exec(ExecArgs),
    /// Forward local TCP connections to a port as the instance sees it (`ssh -L`).
    PortForward(PortForwardArgs),
    /// Carry one connection on stdin and stdout, for `ssh -o ProxyCommand='hatch proxy -i %h'`.
    Proxy(ProxyArgs),
    /// Reattach a session whose client went away (a closed terminal, a killed `hatch`), like
    /// `tmux attach`: the same shell, with the output it still holds.
    Attach(AttachArgs),
    /// Print a one-time login link to the relay's browser console (with -i, one that opens a
    /// terminal on that instance), so the browser needs no access key.
    Console(ConsoleArgs),
    /// List your sessions, or show one.
    Sessions(SessionsArgs),
    /// Terminate a session (both sides are closed).
    Terminate {
        /// Session id, `s-...`.
        session_id: String,
    },
    /// List the instances you can see, or change one (tags, registration, agent secret).
    Instances(InstancesArgs),
    /// The account's session-manager switch and session preferences (the owner only).
    #[command(subcommand)]
    Account(AccountCommand),
    /// Users of the account and the policies attached to them.
    #[command(subcommand)]
    Users(UsersCommand),
    /// Access keys of the owner and of users.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Policy documents: what users may do.
    #[command(subcommand)]
    Policies(PoliciesCommand),
    /// Activations: what agents register instances with.
    #[command(subcommand)]
    Activations(ActivationsCommand),
    /// The account's audit log: one line per API action (`hatch:ReadAudit`).
    Audit(AuditArgs),
    /// Replay a recorded session in the terminal with its timing: a session id (the
    /// recording is fetched from the relay) or an asciicast v2 file.
    Play(PlayArgs),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: CompletionShell,
    },
}

/// `hatch audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only events from then on: RFC 3339 (`2026-12-04T08:00:00Z`) or seconds since the epoch.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Print each event as the relay's JSON, one per line (as in the relay's audit.log).
    #[arg(long)]
    pub json: bool,
}

/// `hatch play`.
#[derive(Debug, Args)]
pub struct PlayArgs {
    /// A session id (`s-...`), or the path of an asciicast v2 file (`hatch sessions recording
    /// ID -o FILE`, asciinema's own files).
    pub target: String,
    /// Playback speed: 2 plays twice as fast.
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub speed: f64,
    /// Longest pause shown between two outputs, in seconds (before the speed applies).
    #[arg(long, value_name = "S")]
    pub idle_limit: Option<f64>,
}

/// `hatch configure`.
#[derive(Debug, Args)]
pub struct ConfigureArgs {
    /// API URL, `https://HOST:PORT` (prompted for when absent and stdin is a terminal).
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// Access key (prompted for when absent and stdin is a terminal).
    #[arg(long, value_name = "KEY")]
    pub access_key: Option<String>,
    /// PEM file of the CA that signed the relay's certificate; "" removes it.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// `hatch session`.
#[derive(Debug, Args)]
pub struct SessionArgs {
    /// Target instance, `i-...`.
    #[arg(long, short = 'i', value_name = "INSTANCE_ID")]
    pub instance: String,
    /// User to run the shell as (checked by policy as hatch:RunAs).
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Flow control of the data stream.
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// `hatch console`.
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Open a terminal on this instance right after the login, `i-...`.
    #[arg(long, short = 'i', value_name = "INSTANCE_ID")]
    pub instance: Option<String>,
    /// Open the link in the default browser too (`xdg-open`, or `$BROWSER`).
    #[arg(long)]
    pub open: bool,
}

/// `hatch attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Session id, `s-...` (see `hatch sessions --active`).
    pub session_id: String,
    /// Take the session over even when another client is attached to it (that client is
    /// detached with close 4014 and does not reconnect).
    #[arg(long)]
    pub force: bool,
    /// Flow control of the data stream.
    #[command(flatten)]
    pub stream: StreamArgs,
}

/// Flow control of `hatch session` and `hatch exec`.
#[derive(Debug, Args, Clone, Copy)]
pub struct StreamArgs {
    /// Bytes of input in flight before the agent acknowledges them (at least 64 KiB): the
    /// replay buffer a resume is served from. Stdin is not read while it is full.
    #[arg(long, value_name = "BYTES", default_value_t = hatch_proto::resume::DEFAULT_WINDOW)]
    pub window: usize,
}

/// `hatch exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Target instance, `i-...`.
    #[arg(long, short = 'i', value_name = "INSTANCE_ID")]
    pub instance: String,
    /// User to run the command as (checked by policy as hatch:RunAs).
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
    /// Run the command in a pseudo-terminal (for `top`, `sudo` prompts, `vim`), as `ssh -t`.
    /// Without it the command gets pipes: bytes pass unchanged, stderr stays apart.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Flow control of the data stream.
    #[command(flatten)]
    pub stream: StreamArgs,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// `hatch port-forward`.
#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// Target instance, `i-...`.
    #[arg(long, short = 'i', value_name = "INSTANCE_ID")]
    pub instance: String,
    /// Where to listen, `[ADDR:]PORT` (default address 127.0.0.1; default port the remote
    /// one; port 0 picks a free one and prints it).
    #[arg(long, value_name = "[ADDR:]PORT")]
    pub local: Option<String>,
    /// Where connections go, `[HOST:]PORT` as the instance resolves it (default host: the
    /// instance itself, `localhost`).
    #[arg(long, value_name = "[HOST:]PORT")]
    pub remote: String,
}

/// `hatch proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Target instance, `i-...`.
    #[arg(long, short = 'i', value_name = "INSTANCE_ID")]
    pub instance: String,
    /// Where the connection goes, `[HOST:]PORT` as the instance resolves it.
    #[arg(long, value_name = "[HOST:]PORT", default_value = "localhost:22")]
    pub remote: String,
}

/// `hatch sessions`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SessionsArgs {
    /// Only active sessions (the default lists both).
    #[arg(long, conflicts_with = "closed")]
    pub active: bool,
    /// Only closed sessions.
    #[arg(long)]
    pub closed: bool,
    /// Print the relay's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Sessions per page asked of the relay (1 to 1000; the relay's default is 100).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: Option<u32>,
    /// Follow every page instead of showing only the newest one.
    #[arg(long)]
    pub all: bool,
    /// `show ID`.
    #[command(subcommand)]
    pub show: Option<SessionsCommand>,
}

/// Subcommands of `hatch sessions`.
#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// Show one session.
    Show {
        /// Session id, `s-...`.
        session_id: String,
        /// Print the relay's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Save a recorded session's recording (asciicast v2, as asciinema plays it).
    Recording {
        /// Session id, `s-...`.
        session_id: String,
        /// Write it to FILE (created, or replaced); default: stdout.
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

/// `--json`, on every command that prints an answer of the relay.
#[derive(Debug, Args, Clone, Copy)]
pub struct Format {
    /// Print the relay's JSON instead of a table or a sentence.
    #[arg(long)]
    pub json: bool,
}

/// `hatch instances`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InstancesArgs {
    /// Print the relay's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Without one: list the instances.
    #[command(subcommand)]
    pub command: Option<InstancesCommand>,
}

/// Subcommands of `hatch instances`.
#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// Replace all the tags of an instance (policy conditions match them as `hatch:tag/KEY`).
    Tag {
        /// Instance id, `i-...`.
        instance_id: String,
        /// The new tags; the instance keeps no other.
        #[arg(value_name = "KEY=VALUE", required_unless_present = "clear", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// Remove every tag instead.
        #[arg(long, conflicts_with = "tags")]
        clear: bool,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Deregister an instance: its sessions end, its agent can no longer connect, and it is no
    /// longer listed.
    Deregister {
        /// Instance id, `i-...`.
        instance_id: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Revoke the secret an instance's agent authenticates with (a leaked state file): its
    /// sessions end, and the agent must register again (as a new instance; this one stays
    /// listed, offline).
    RevokeSecret {
        /// Instance id, `i-...`.
        instance_id: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
}

/// Subcommands of `hatch account`.
#[derive(Debug, Subcommand)]
pub enum AccountCommand {
    /// Show the session-manager switch and the session preferences.
    Show {
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Turn session management on or off for the whole account. Off refuses every new session
    /// and ends the live ones (close 4010).
    Switch {
        /// `on` or `off`.
        state: Switch,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Set the session preferences of sessions started afterwards (the relay's own are caps);
    /// without a flag, show them.
    Prefs {
        /// Close a session after this many seconds without input or output (0: the relay's
        /// `--idle-timeout`).
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// Close a session this many seconds after it started (0: the relay's
        /// `--max-duration`).
        #[arg(long, value_name = "SECS")]
        max_duration: Option<u64>,
        /// Record the account's sessions started afterwards at the relay: `off`, `output`
        /// (what they show) or `full` (and what is typed).
        #[arg(long, value_name = "MODE", value_parser = recording_mode)]
        recording: Option<RecordingMode>,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
}

/// `--recording`'s value.
fn recording_mode(s: &str) -> Result<RecordingMode, String> {
    RecordingMode::parse(s).ok_or_else(|| format!("{s:?} is not off, output or full"))
}

/// The two positions of the session-manager switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// Sessions may start.
    On,
    /// No session may start; live ones end.
    Off,
}

/// Subcommands of `hatch users`.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// List the account's users and their policies.
    List {
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Create a user (with no policy: it may do nothing until one is attached).
    Create {
        /// 1-64 letters, digits, `.`, `_`, `@`, `-`.
        name: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Delete a user and its access keys.
    Delete {
        /// The user's name.
        name: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Attach a policy to a user.
    Attach {
        /// The user's name.
        name: String,
        /// The policy's name.
        policy: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Detach a policy from a user.
    Detach {
        /// The user's name.
        name: String,
        /// The policy's name.
        policy: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
}

/// Subcommands of `hatch keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List access keys (never their secrets).
    List {
        /// Only this user's keys.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Create an access key, a user's or (without --user) the owner's; its secret is printed
    /// this once.
    Create {
        /// The user the key is for.
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Revoke an access key: it authenticates nothing from now on.
    Revoke {
        /// Access key id, `ak-...`.
        key_id: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
}

/// Subcommands of `hatch policies`.
#[derive(Debug, Subcommand)]
pub enum PoliciesCommand {
    /// List the account's policies and the users they are attached to.
    List {
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Show one policy and its document.
    Show {
        /// The policy's name.
        name: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Create or replace a policy from a JSON document (docs/POLICY.md); the relay checks it
    /// first.
    Put {
        /// 1-128 letters, digits, `.`, `_`, `-`.
        name: String,
        /// The document; `-` reads it from stdin.
        file: PathBuf,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Delete a policy (refused while it is attached to a user).
    Delete {
        /// The policy's name.
        name: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
}

/// Subcommands of `hatch activations`.
#[derive(Debug, Subcommand)]
pub enum ActivationsCommand {
    /// List the account's activations (never their codes).
    List {
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Create an activation; its code is printed this once (`hatch-agent register
    /// --activation-id ID --activation-code CODE`).
    Create {
        /// Region its instances join: 1-64 letters, digits or `-`.
        #[arg(long, value_name = "REGION")]
        region: String,
        /// A tag each instance gets (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// How many instances may register with it.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..))]
        max_registrations: u32,
        /// How long it is valid, in seconds (at most 30 days).
        #[arg(long, value_name = "SECS", default_value_t = 86_400,
              value_parser = clap::value_parser!(u64).range(1..))]
        valid_for: u64,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
    /// Revoke an activation: no instance may register with it any more.
    Revoke {
        /// Activation id, `act-...`.
        activation_id: String,
        /// `--json`.
        #[command(flatten)]
        format: Format,
    },
}

/// Longest tag key the relay accepts (bytes).
const MAX_TAG_KEY: usize = 128;
/// Longest tag value the relay accepts (bytes).
const MAX_TAG_VALUE: usize = 256;

/// One `KEY=VALUE` tag: split at the first `=`; the key 1-128 letters, digits, `.`, `_`, `-`,
/// `:`, the value at most 256 bytes without control characters, possibly empty (as the relay
/// accepts).
pub fn parse_tag(arg: &str) -> Result<(String, String), String> {
    let Some((key, value)) = arg.split_once('=') else {
        return Err(format!("{arg:?} is not KEY=VALUE"));
    };
    let key_ok = !key.is_empty()
        && key.len() <= MAX_TAG_KEY
        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
    if !key_ok {
        return Err(format!(
            "tag key {key:?} must be 1-{MAX_TAG_KEY} letters, digits, `.`, `_`, `-` or `:`"
        ));
    }
    if value.len() > MAX_TAG_VALUE {
        return Err(format!("the value of tag {key} is longer than {MAX_TAG_VALUE} bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("the value of tag {key} has a control character"));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Shells `hatch completions` writes scripts for.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum CompletionShell {
    /// GNU bash.
    Bash,
    /// Z shell.
    Zsh,
    /// fish.
    Fish,
}

impl CompletionShell {
    /// The clap_complete generator.
    pub fn generator(self) -> clap_complete::Shell {
        match self {
            CompletionShell::Bash => clap_complete::Shell::Bash,
            CompletionShell::Zsh => clap_complete::Shell::Zsh,
            CompletionShell::Fish => clap_complete::Shell::Fish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_everything_after_the_double_dash() {
        let cli =
            Cli::try_parse_from(["hatch", "exec", "--instance", "i-1", "--", "sh", "-c", "exit 9"])
                .unwrap();
        match cli.command {
            Command::Exec(e) => assert_eq!(e.command, ["sh", "-c", "exit 9"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ssh_is_an_alias_of_session() {
        let cli = Cli::try_parse_from(["hatch", "ssh", "-i", "i-1", "--user", "ops"]).unwrap();
        assert!(matches!(cli.command, Command::Session(s) if s.user.as_deref() == Some("ops")));
    }

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(["hatch"].iter().chain(args)).map(|c| c.command)
    }

    #[test]
    fn instances_lists_as_before_and_takes_subcommands() {
        assert!(matches!(
            parse(&["instances"]).unwrap(),
            Command::Instances(InstancesArgs { json: false, command: None })
        ));
        assert!(matches!(
            parse(&["instances", "--json"]).unwrap(),
            Command::Instances(InstancesArgs { json: true, command: None })
        ));
        match parse(&["instances", "tag", "i-1", "env=prod", "role=web", "--json"]).unwrap() {
            Command::Instances(InstancesArgs {
                command: Some(InstancesCommand::Tag { instance_id, tags, clear, format }),
                ..
            }) => {
                assert_eq!(instance_id, "i-1");
                assert_eq!(tags, [("env".into(), "prod".into()), ("role".into(), "web".into())]);
                assert!(!clear && format.json);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["instances", "tag", "i-1", "--clear"]).unwrap(),
            Command::Instances(InstancesArgs {
                command: Some(InstancesCommand::Tag { clear: true, .. }),
                ..
            })
        ));
        // No tags by accident does not clear them; tags and --clear together are refused.
        assert!(parse(&["instances", "tag", "i-1"]).is_err());
        assert!(parse(&["instances", "tag", "i-1", "a=b", "--clear"]).is_err());
        assert!(parse(&["instances", "tag", "i-1", "novalue"]).is_err());
        assert!(matches!(
            parse(&["instances", "revoke-secret", "i-1"]).unwrap(),
            Command::Instances(InstancesArgs {
                command: Some(InstancesCommand::RevokeSecret { .. }),
                ..
            })
        ));
        assert!(matches!(
            parse(&["instances", "deregister", "i-1", "--json"]).unwrap(),
            Command::Instances(InstancesArgs {
                command: Some(InstancesCommand::Deregister { format: Format { json: true }, .. }),
                ..
            })
        ));
    }

    #[test]
    fn tags_are_key_equals_value() {
        let ok: &[(&str, (&str, &str))] = &[
            ("env=prod", ("env", "prod")),
            ("env=", ("env", "")),
            ("url=a=b", ("url", "a=b")),
            ("team:app.v-1_x=x y", ("team:app.v-1_x", "x y")),
        ];
        for (arg, (k, v)) in ok {
            assert_eq!(parse_tag(arg).unwrap(), ((*k).to_owned(), (*v).to_owned()), "{arg}");
        }
        let long_key = format!("{}=v", "k".repeat(129));
        let long_value = format!("k={}", "v".repeat(257));
        let bad_values = ["env=a\nb", "env=\u{1b}[2J", "env=\u{9b}"];
        for bad in ["env", "=prod", "e nv=x", "e/nv=x", "é=x", &long_key, &long_value]
            .into_iter()
            .chain(bad_values)
        {
            assert!(parse_tag(bad).is_err(), "{bad}");
        }
        assert!(parse_tag(&format!("{}={}", "k".repeat(128), "v".repeat(256))).is_ok());
    }

    #[test]
    fn account_commands() {
        assert!(matches!(
            parse(&["account", "switch", "off", "--json"]).unwrap(),
            Command::Account(AccountCommand::Switch {
                state: Switch::Off,
                format: Format { json: true }
            })
        ));
        assert!(parse(&["account", "switch", "maybe"]).is_err());
        assert!(parse(&["account", "switch"]).is_err());
        assert!(matches!(
            parse(&["account", "prefs", "--idle-timeout", "0", "--max-duration", "3600"]).unwrap(),
            Command::Account(AccountCommand::Prefs {
                idle_timeout: Some(0),
                max_duration: Some(3600),
                ..
            })
        ));
        assert!(parse(&["account", "prefs", "--idle-timeout", "-1"]).is_err());
        assert!(matches!(
            parse(&["account", "prefs", "--recording", "full"]).unwrap(),
            Command::Account(AccountCommand::Prefs {
                recording: Some(RecordingMode::Full),
                idle_timeout: None,
                ..
            })
        ));
        assert!(parse(&["account", "prefs", "--recording", "on"]).is_err());
        assert!(matches!(
            parse(&["account", "show"]).unwrap(),
            Command::Account(AccountCommand::Show { format: Format { json: false } })
        ));
    }

    #[test]
    fn iam_commands() {
        assert!(matches!(
            parse(&["users", "attach", "alice", "read-only", "--json"]).unwrap(),
            Command::Users(UsersCommand::Attach { name, policy, format: Format { json: true } })
                if name == "alice" && policy == "read-only"
        ));
        assert!(parse(&["users", "attach", "alice"]).is_err());
        assert!(matches!(
            parse(&["keys", "list", "--user", "alice"]).unwrap(),
            Command::Keys(KeysCommand::List { user: Some(u), .. }) if u == "alice"
        ));
        assert!(matches!(
            parse(&["keys", "create"]).unwrap(),
            Command::Keys(KeysCommand::Create { user: None, .. })
        ));
        assert!(matches!(
            parse(&["policies", "put", "p1", "-"]).unwrap(),
            Command::Policies(PoliciesCommand::Put { file, .. }) if file == Path::new("-")
        ));
        match parse(&[
            "activations",
            "create",
            "--region",
            "eu-1",
            "--tag",
            "env=dev",
            "--tag",
            "a=b",
        ])
        .unwrap()
        {
            Command::Activations(ActivationsCommand::Create {
                region,
                tags,
                max_registrations,
                valid_for,
                ..
            }) => {
                assert_eq!(region, "eu-1");
                assert_eq!(tags.len(), 2);
                // The relay's own defaults, spelt out in --help.
                assert_eq!((max_registrations, valid_for), (1, 86_400));
            }
            other => panic!("{other:?}"),
        }
        assert!(parse(&["activations", "create"]).is_err(), "--region is required");
        for zero in [["--max-registrations", "0"], ["--valid-for", "0"]] {
            let args = ["activations", "create", "--region", "r", zero[0], zero[1]];
            assert!(parse(&args).is_err(), "{zero:?}");
        }
    }

    #[test]
    fn sessions_filters_conflict() {
        assert!(Cli::try_parse_from(["hatch", "sessions", "--active", "--closed"]).is_err());
        let cli = Cli::try_parse_from(["hatch", "sessions", "show", "s-1"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Sessions(SessionsArgs { show: Some(SessionsCommand::Show { .. }), .. })
        ));
    }
}
