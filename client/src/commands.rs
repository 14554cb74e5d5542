//! What each command does, from parsed arguments to an exit code. Settings are resolved here
//! (so `configure` and `completions` work without any), the API is called through [`api`], and
//! sessions are streamed through [`stream`].

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::CommandFactory;
use hatch_proto::api::{Mode, StartSessionRequest, StartSessionResponse, codes};
use serde_json::Value;

use crate::api::{self, Client};
use crate::cli::{
    AttachArgs, Cli, Command, ConfigureArgs, SessionsArgs, SessionsCommand, StreamArgs,
};
use crate::config::{self, Env, Source};
use crate::errors::{CliError, Subject};
use crate::output;
use crate::stream::{self, StreamOptions};
use crate::terminal;

/// Most pages `hatch sessions --all` follows (a relay that always answers with a next page
/// must not keep the command running forever).
const MAX_PAGES: usize = 1000;

/// How long the best-effort "last seen" look-up after TargetNotConnected may take.
const LAST_SEEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one parsed command; `Ok` carries the exit code.
pub async fn dispatch(cli: Cli, env: Env<'_>) -> Result<u8, CliError> {
    let verbose = cli.verbose > 0;
    let profile = cli.profile.as_deref();
    match cli.command {
        Command::Configure(args) => configure(args, profile, env),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error (`| head`).
            let mut script = Vec::new();
            clap_complete::generate(shell.generator(), &mut Cli::command(), "hatch", &mut script);
            print(&String::from_utf8_lossy(&script))?;
            Ok(0)
        }
        Command::Session(args) => {
            let client = client(profile, env, verbose)?;
            let req = StartSessionRequest {
                instance_id: checked_id(&args.instance, "instance")?,
                mode: Mode::Shell,
                command: None,
                run_as: args.user,
                term: env("TERM").filter(|_| terminal::stdin_is_tty()),
                tty: None,
                remote_host: None,
                remote_port: None,
            };
            session(&client, req, args.stream, terminal::stdin_is_tty()).await
        }
        Command::Exec(args) => {
            let client = client(profile, env, verbose)?;
            // As `ssh host cmd`: a PTY only with -t (then TERM goes along, and raw mode, RESIZE
            // and `~` escapes when stdin is a terminal too); otherwise pipes, stderr apart,
            // and the local terminal left as it is.
            let req = StartSessionRequest {
                instance_id: checked_id(&args.instance, "instance")?,
                mode: Mode::Exec,
                command: Some(args.command),
                run_as: args.user,
                term: env("TERM").filter(|_| args.tty),
                tty: Some(args.tty),
                remote_host: None,
                remote_port: None,
            };
            session(&client, req, args.stream, args.tty && terminal::stdin_is_tty()).await
        }
        Command::Attach(args) => attach(&client(profile, env, verbose)?, args).await,
        Command::PortForward(args) => {
            crate::forward::port_forward(&client(profile, env, verbose)?, args).await
        }
        Command::Proxy(args) => crate::forward::proxy(&client(profile, env, verbose)?, args).await,
        Command::Sessions(args) => sessions(&client(profile, env, verbose)?, args).await,
        Command::Terminate { session_id } => {
            let client = client(profile, env, verbose)?;
            let id = checked_id(&session_id, "session")?;
            let subject = Subject {
                action: "hatch:TerminateSession",
                session: Some(id.clone()),
                ..Subject::default()
            };
            client.delete(&format!("/v1/sessions/{id}"), &subject).await?;
            println!("Terminated session {id}");
            Ok(0)
        }
        Command::Instances { json } => {
            let client = client(profile, env, verbose)?;
            let subject = Subject { action: "hatch:DescribeInstances", ..Subject::default() };
            let answer: Value = client.get("/v1/instances", &subject).await?;
            if json {
                print_json(&answer)?;
            } else {
                let rows = output::items(&answer, "instances");
                print(&output::table(&rows, output::INSTANCE_COLUMNS, output::now()))?;
            }
            Ok(0)
        }
    }
}

fn client(profile: Option<&str>, env: Env<'_>, verbose: bool) -> Result<Client, CliError> {
    let path = config::path(env);
    let (path, file) = match path {
        Ok(p) => {
            let f = config::load(&p);
            (p, f)
        }
        Err(e) => (PathBuf::new(), Err(e)),
    };
    let settings = config::resolve(profile, env, &path, &file)?;
    Client::new(&settings, verbose)
}

/// Ids go into URL paths: accept only the characters ids are made of.
pub(crate) fn checked_id(id: &str, what: &str) -> Result<String, CliError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(CliError::Usage(format!("{id:?} is not a valid {what} id")))
    }
}

async fn session(
    client: &Client,
    req: StartSessionRequest,
    flow: StreamArgs,
    interactive: bool,
) -> Result<u8, CliError> {
    let instance = req.instance_id.clone();
    let subject = Subject {
        action: "hatch:StartSession",
        instance: Some(instance.clone()),
        ..Subject::default()
    };
    let started: StartSessionResponse = match client.post("/v1/sessions", &req, &subject).await {
        Ok(s) => s,
        Err(CliError::Api(mut failure)) if failure.body.code == codes::TARGET_NOT_CONNECTED => {
            if failure.subject.last_seen.is_none() {
                failure.subject.last_seen = last_seen(client, &instance).await;
            }
            return Err(CliError::Api(failure));
        }
        Err(e) => return Err(e),
    };
    // Say which session this is: always for a shell; for a command where a person reads it
    // (or with -v), so that its stderr in a file or a pipe holds only the command's own bytes,
    // as with `ssh host cmd`.
    let shell = req.mode == Mode::Shell;
    if shell || interactive || std::io::stderr().is_terminal() || client.verbose() {
        eprintln!("Starting session {} on {}", started.session_id, instance);
    }
    let ws = stream::connect(&started, client.tls(), &instance).await?;
    let link = hatch_proto::resume::LinkConfig {
        window: flow.window.max(stream::MIN_WINDOW),
        ..Default::default()
    };
    let opts = StreamOptions { instance, interactive, link, attach: false };
    let resume = stream::Reconnect {
        client,
        session_id: started.session_id.clone(),
        window: stream::reconnect_window(started.resume_window_s),
        action: "hatch:StartSession",
    };
    stream::run(ws, &opts, Some(&resume)).await
}

/// `hatch attach`: a resume token for the caller's own session (refused while another client
/// is attached, unless `--force`), then the stream as a client with no state of its own.
async fn attach(client: &Client, args: AttachArgs) -> Result<u8, CliError> {
    let sid = checked_id(&args.session_id, "session")?;
    let subject =
        Subject { action: "hatch:StartSession", session: Some(sid.clone()), ..Subject::default() };
    let info: hatch_proto::api::SessionInfo =
        client.get(&format!("/v1/sessions/{sid}"), &subject).await?;
    let body = hatch_proto::api::ResumeSessionRequest { force: args.force };
    let subject = Subject { instance: Some(info.instance_id.clone()), ..subject };
    let started: StartSessionResponse =
        client.post(&format!("/v1/sessions/{sid}/resume"), &body, &subject).await?;
    eprintln!("Attaching to session {sid} on {}", info.instance_id);
    let ws = stream::connect(&started, client.tls(), &info.instance_id).await?;
    let link = hatch_proto::resume::LinkConfig {
        window: args.stream.window.max(stream::MIN_WINDOW),
        ..Default::default()
    };
    let opts = StreamOptions {
        instance: info.instance_id,
        interactive: terminal::stdin_is_tty(),
        link,
        attach: true,
    };
    let window = stream::reconnect_window(started.resume_window_s);
    let resume =
        stream::Reconnect { client, session_id: sid, window, action: "hatch:StartSession" };
    stream::run(ws, &opts, Some(&resume)).await
}

/// When the instance's agent was last seen, in words, from `GET /v1/instances`; `None` when
/// that is not known or not allowed.
async fn last_seen(client: &Client, instance: &str) -> Option<String> {
    let subject = Subject { action: "hatch:DescribeInstances", ..Subject::default() };
    let answer: Value =
        tokio::time::timeout(LAST_SEEN_TIMEOUT, client.get("/v1/instances", &subject))
            .await
            .ok()?
            .ok()?;
    let row = output::items(&answer, "instances").into_iter().find(|i| {
        i.get("instance_id").or_else(|| i.get("id")).and_then(Value::as_str) == Some(instance)
    })?;
    let seen = row.get("last_seen").or_else(|| row.get("last_seen_at"))?;
    if seen.is_null() {
        return Some("never".to_owned());
    }
    output::ago(seen, output::now())
}

async fn sessions(client: &Client, args: SessionsArgs) -> Result<u8, CliError> {
    if let Some(SessionsCommand::Show { session_id, json }) = args.show {
        let id = checked_id(&session_id, "session")?;
        let subject = Subject {
            action: "hatch:DescribeSessions",
            session: Some(id.clone()),
            ..Subject::default()
        };
        let answer: Value = client.get(&format!("/v1/sessions/{id}"), &subject).await?;
        if json || args.json {
            print_json(&answer)?;
        } else {
            print(&output::details(&answer, output::now()))?;
        }
        return Ok(0);
    }
    let mut query = Vec::new();
    match (args.active, args.closed) {
        (true, _) => query.push("state=active".to_owned()),
        (_, true) => query.push("state=closed".to_owned()),
        _ => {}
    }
    if let Some(limit) = args.limit {
        query.push(format!("limit={limit}"));
    }
    let subject = Subject { action: "hatch:DescribeSessions", ..Subject::default() };
    let mut sessions = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut q = query.clone();
        if let Some(token) = &next {
            checked_id(token, "page token")?;
            q.push(format!("next_token={token}"));
        }
        let path = if q.is_empty() {
            "/v1/sessions".to_owned()
        } else {
            format!("/v1/sessions?{}", q.join("&"))
        };
        let answer: Value = client.get(&path, &subject).await?;
        sessions.extend(output::items(&answer, "sessions").into_iter().cloned());
        next = answer.get("next_token").and_then(Value::as_str).map(str::to_owned);
        if next.is_none() || !args.all {
            break;
        }
    }
    if args.json {
        let mut answer = serde_json::json!({ "sessions": sessions });
        if let Some(token) = &next {
            answer["next_token"] = Value::from(token.clone());
        }
        print_json(&answer)?;
    } else {
        let rows: Vec<&Value> = sessions.iter().collect();
        print(&output::table(&rows, output::SESSION_COLUMNS, output::now()))?;
        if next.is_some() {
            eprintln!("hatch: more sessions than shown; run with --all to list every page");
        }
    }
    Ok(0)
}

fn print(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| CliError::Local(format!("writing to stdout: {e}")))
}

fn print_json(v: &Value) -> Result<(), CliError> {
    // Invariant: a `Value` always serialises.
    print(&format!("{}\n", serde_json::to_string_pretty(v).expect("json value serialises")))
}

fn configure(args: ConfigureArgs, profile: Option<&str>, env: Env<'_>) -> Result<u8, CliError> {
    let path = config::path(env)?;
    let mut file = config::load(&path)?;
    let name = config::profile_name(profile, env);
    let current = file.profiles.get(&name).cloned().unwrap_or_default();
    let interactive = std::io::stdin().is_terminal();

    let api = match args.api {
        Some(a) => Some(a),
        None if interactive => prompt("API URL", current.api.as_deref(), false)?,
        None => current.api.clone(),
    };
    let access_key = match args.access_key {
        Some(k) => Some(k),
        None if interactive => prompt("Access key", current.access_key.as_deref(), true)?,
        None => current.access_key.clone(),
    };
    let ca_file = match args.ca {
        Some(c) if c.as_os_str().is_empty() => None,
        Some(c) => Some(c),
        None if interactive => {
            let shown = current.ca_file.as_ref().map(|c| c.display().to_string());
            prompt("CA file (empty: system roots)", shown.as_deref(), false)?.map(PathBuf::from)
        }
        None => current.ca_file.clone(),
    };

    let (Some(api), Some(access_key)) = (api, access_key) else {
        return Err(CliError::Usage(
            "`hatch configure` needs --api URL and --access-key KEY (or a terminal to ask on)"
                .to_owned(),
        ));
    };
    let source = Source::File(path.clone(), name.clone());
    let api = config::check_api_url(&api, &source)?;
    let ca_file = match ca_file {
        Some(c) => {
            let abs = std::path::absolute(&c).unwrap_or(c);
            // Fails now, naming the file, rather than at the first session.
            api::tls_config(Some(&(abs.clone(), Source::File(path.clone(), name.clone()))))?;
            Some(abs)
        }
        None => None,
    };
    file.profiles.insert(
        name.clone(),
        config::Profile { api: Some(api), access_key: Some(access_key), ca_file },
    );
    config::save(&path, &file)?;
    eprintln!("hatch: wrote profile {name:?} to {}", path.display());
    Ok(0)
}

/// Asks for one value on the terminal; Enter keeps `current`.
fn prompt(what: &str, current: Option<&str>, secret: bool) -> Result<Option<String>, CliError> {
    let shown = match current {
        Some(c) if secret => format!(" [{}]", masked(c)),
        Some(c) => format!(" [{c}]"),
        None => String::new(),
    };
    eprint!("{what}{shown}: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::Local(format!("reading stdin: {e}")))?;
    let line = line.trim();
    Ok(if line.is_empty() { current.map(str::to_owned) } else { Some(line.to_owned()) })
}

/// A secret as the prompt shows it: `****` and its last 4 characters when it is longer than
/// that. Cut by characters: a byte cut inside a multi-byte character would panic.
fn masked(secret: &str) -> String {
    match secret.char_indices().rev().nth(3) {
        Some((i, _)) if i > 0 => format!("****{}", &secret[i..]),
        _ => "****".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_shows_only_its_last_four_characters() {
        assert_eq!(masked("AKIA0123456789WXYZ"), "****WXYZ");
        assert_eq!(masked("abcd"), "****");
        assert_eq!(masked(""), "****");
        // Multi-byte characters: cut between characters, never inside one.
        assert_eq!(masked("ééa"), "****");
        assert_eq!(masked("xééaé"), "****ééaé");
        assert_eq!(masked("x€€€€"), "****€€€€");
    }

    #[test]
    fn ids_with_path_characters_are_refused() {
        assert_eq!(checked_id("i-0123456789abcdef", "instance").unwrap(), "i-0123456789abcdef");
        for bad in ["", "../v1/instances", "i-1?x=1", "s 1", "i-1/", &"a".repeat(200)] {
            let err = checked_id(bad, "instance").unwrap_err();
            assert_eq!(err.exit_code(), 64, "{bad}");
        }
    }
}
