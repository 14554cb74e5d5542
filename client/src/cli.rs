//! The command line: every command, flag and argument (clap derive). `docs/CLI.md` describes
//! the same surface for people.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// List your sessions, or show one.
    Sessions(SessionsArgs),
    /// Terminate a session (both sides are closed).
    Terminate {
        /// Session id, `s-...`.
        session_id: String,
    },
    /// List the instances you can see.
    Instances {
        /// Print the relay's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: CompletionShell,
    },
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
