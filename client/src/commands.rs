//! What each command does, from parsed arguments to an exit code. Settings are resolved here
//! (so `configure` and `completions` work without any), the API is called through [`api`], and
//! sessions are streamed through [`stream`].

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory;
use hatch_proto::api::{
    AccountSettingsUpdate, ConsoleLinkRequest, ConsoleLinkResponse, CreateAccessKeyRequest,
    CreateActivationRequest, CreateUserRequest, ErrorBody, Mode, StartSessionRequest,
    StartSessionResponse, TagInstanceRequest, codes,
};
use serde_json::Value;

use crate::api::{self, Client};
use crate::cli::{
    AccountCommand, ActivationsCommand, AttachArgs, AuditArgs, Cli, Command, ConfigureArgs,
    ConsoleArgs, Format, InstancesArgs, InstancesCommand, KeysCommand, PoliciesCommand,
    SessionsArgs, SessionsCommand, StreamArgs, Switch, UsersCommand,
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

/// Most bytes of a policy document read from a file or stdin: far above what the relay takes
/// (it refuses a larger document and says its limit), so this only bounds what is read.
const MAX_DOCUMENT_READ: u64 = 1 << 20;

/// Longest user or policy name sent (the relay's limits are 64 and 128).
const MAX_NAME: usize = 128;

/// Where `NoSuchEntity` and `EntityAlreadyExists` send a person to look.
const USERS: &[&str] = &["hatch users list"];
const USERS_AND_POLICIES: &[&str] = &["hatch users list", "hatch policies list"];
const KEYS: &[&str] = &["hatch keys list"];
const POLICIES: &[&str] = &["hatch policies list"];
const ACTIVATIONS: &[&str] = &["hatch activations list"];

/// Runs one parsed command; `Ok` carries the exit code.
pub async fn dispatch(cli: Cli, env: Env<'_>) -> Result<u8, CliError> {
    let verbose = cli.verbose > 0;
    let profile = cli.profile.as_deref();
    match cli.command {
        Command::Configure(args) => configure(args, profile, env),
        Command::Play(args) => play(args, profile, env, verbose).await,
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
        Command::Console(args) => console(&client(profile, env, verbose)?, args, env).await,
        Command::Sessions(args) => sessions(&client(profile, env, verbose)?, args).await,
        Command::Audit(args) => audit(&client(profile, env, verbose)?, args).await,
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
        Command::Instances(args) => instances(&client(profile, env, verbose)?, args).await,
        Command::Account(command) => account(&client(profile, env, verbose)?, command).await,
        Command::Users(command) => users(&client(profile, env, verbose)?, command).await,
        Command::Keys(command) => keys(&client(profile, env, verbose)?, command).await,
        Command::Policies(command) => policies(&client(profile, env, verbose)?, command).await,
        Command::Activations(command) => {
            activations(&client(profile, env, verbose)?, command).await
        }
    }
}

/// `hatch console`: a one-time login link (`POST /v1/console/links`), printed, and with
/// `--open` handed to the browser. The link logs in once, within two minutes; it carries no
/// access key, only a code the relay forgets when it is used.
async fn console(client: &Client, args: ConsoleArgs, env: Env<'_>) -> Result<u8, CliError> {
    let instance_id = args.instance.as_deref().map(|i| checked_id(i, "instance")).transpose()?;
    let subject = Subject { instance: instance_id.clone(), ..Subject::default() };
    let link: ConsoleLinkResponse =
        client.post("/v1/console/links", &ConsoleLinkRequest { instance_id }, &subject).await?;
    print(&format!("{}\n", link.url))?;
    eprintln!("One-time login link, valid until {} (it works once).", link.expires_at);
    if args.open {
        let opener =
            env("BROWSER").filter(|b| !b.trim().is_empty()).unwrap_or_else(|| "xdg-open".into());
        match std::process::Command::new(&opener)
            .arg(&link.url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(_) => eprintln!("Opened with {opener}."),
            Err(e) => eprintln!("hatch: could not run {opener} ({e}); open the link yourself."),
        }
    }
    Ok(0)
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

/// User and policy names go into URL paths: accept only the characters the relay allows in
/// them (letters, digits, `.`, `_`, `@`, `-`), and not `.` or `..`, which a path reads as a
/// step rather than a name.
pub(crate) fn checked_name(name: &str, what: &str) -> Result<String, CliError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b))
        && name != "."
        && name != "..";
    if ok {
        Ok(name.to_owned())
    } else {
        Err(CliError::Usage(format!(
            "{name:?} is not a valid {what} name (1-{MAX_NAME} letters, digits, `.`, `_`, `@`, \
             `-`)"
        )))
    }
}

/// `KEY=VALUE` arguments as the tag map the relay takes; a key given twice is refused rather
/// than one of its values silently dropped.
pub(crate) fn tag_map(tags: Vec<(String, String)>) -> Result<BTreeMap<String, String>, CliError> {
    let mut map = BTreeMap::new();
    for (key, value) in tags {
        if map.contains_key(&key) {
            return Err(CliError::Usage(format!("tag {key} is given twice")));
        }
        map.insert(key, value);
    }
    Ok(map)
}

/// What a request of the IAM API is about: its policy action and where to look for names.
fn iam(action: &'static str, list_with: &'static [&'static str]) -> Subject {
    Subject { action, list_with, ..Subject::default() }
}

/// Prints an answer: the relay's JSON with `--json`, else what `human` makes of it.
fn show(
    answer: &Value,
    format: Format,
    human: impl FnOnce(&Value) -> String,
) -> Result<u8, CliError> {
    if format.json {
        print_json(answer)?;
    } else {
        print(&human(answer))?;
    }
    Ok(0)
}

/// A list answer as a table.
fn listed(answer: &Value, key: &str, columns: &[output::Column]) -> String {
    output::table(&output::items(answer, key), columns, output::now())
}

async fn instances(client: &Client, args: InstancesArgs) -> Result<u8, CliError> {
    let Some(command) = args.command else {
        let subject = Subject { action: "hatch:DescribeInstances", ..Subject::default() };
        let answer: Value = client.get("/v1/instances", &subject).await?;
        let format = Format { json: args.json };
        return show(&answer, format, |a| listed(a, "instances", output::INSTANCE_COLUMNS));
    };
    let subject =
        |action, id: &str| Subject { action, instance: Some(id.to_owned()), ..Subject::default() };
    match command {
        InstancesCommand::Tag { instance_id, tags, clear, format } => {
            let id = checked_id(&instance_id, "instance")?;
            let tags = if clear { BTreeMap::new() } else { tag_map(tags)? };
            let body = TagInstanceRequest { tags };
            let answer: Value = client
                .put(&format!("/v1/instances/{id}/tags"), &body, &subject("hatch:TagInstance", &id))
                .await?;
            show(&answer, format, |a| {
                format!("Tags of {id}: {}\n", output::tags(a.get("tags").unwrap_or(&Value::Null)))
            })
        }
        InstancesCommand::Deregister { instance_id, format } => {
            let id = checked_id(&instance_id, "instance")?;
            let answer: Value = client
                .delete_decoded(
                    &format!("/v1/instances/{id}"),
                    &subject("hatch:DeregisterInstance", &id),
                )
                .await?;
            show(&answer, format, |_| {
                format!(
                    "Deregistered instance {id}: its sessions were ended and its agent can no \
                     longer connect\n"
                )
            })
        }
        InstancesCommand::RevokeSecret { instance_id, format } => {
            let id = checked_id(&instance_id, "instance")?;
            let answer: Value = client
                .post(
                    &format!("/v1/instances/{id}/revoke-secret"),
                    &serde_json::json!({}),
                    &subject("hatch:RevokeInstanceSecret", &id),
                )
                .await?;
            show(&answer, format, |_| {
                format!(
                    "Revoked the agent secret of {id}: its sessions were ended and its agent \
                     cannot connect until it registers again, as a new instance\n"
                )
            })
        }
    }
}

async fn account(client: &Client, command: AccountCommand) -> Result<u8, CliError> {
    const PATH: &str = "/v1/account/settings";
    let subject = Subject { owner_only: true, ..Subject::default() };
    match command {
        AccountCommand::Show { format } => {
            let answer: Value = client.get(PATH, &subject).await?;
            show(&answer, format, output::account_settings)
        }
        AccountCommand::Switch { state, format } => {
            let on = state == Switch::On;
            let body =
                AccountSettingsUpdate { session_manager_enabled: Some(on), ..Default::default() };
            let answer: Value = client.put(PATH, &body, &subject).await?;
            show(&answer, format, |_| {
                if on {
                    "Session manager on: sessions may start\n".to_owned()
                } else {
                    "Session manager off: no session can start, and the live ones were ended\n"
                        .to_owned()
                }
            })
        }
        AccountCommand::Prefs {
            idle_timeout: None,
            max_duration: None,
            recording: None,
            format,
        } => {
            let answer: Value = client.get(PATH, &subject).await?;
            show(&answer, format, output::account_settings)
        }
        AccountCommand::Prefs { idle_timeout, max_duration, recording, format } => {
            let body = AccountSettingsUpdate {
                session_manager_enabled: None,
                idle_timeout_s: idle_timeout,
                max_duration_s: max_duration,
                recording,
            };
            let answer: Value = client.put(PATH, &body, &subject).await?;
            show(&answer, format, output::account_settings)
        }
    }
}

async fn users(client: &Client, command: UsersCommand) -> Result<u8, CliError> {
    match command {
        UsersCommand::List { format } => {
            let answer: Value = client.get("/v1/users", &iam("hatch:ListUsers", USERS)).await?;
            show(&answer, format, |a| listed(a, "users", output::USER_COLUMNS))
        }
        UsersCommand::Create { name, format } => {
            let name = checked_name(&name, "user")?;
            let body = CreateUserRequest { name: name.clone() };
            let answer: Value =
                client.post("/v1/users", &body, &iam("hatch:CreateUser", USERS)).await?;
            show(&answer, format, |a| {
                format!("Created user {name} ({})\n", output::field(a, "user_id"))
            })
        }
        UsersCommand::Delete { name, format } => {
            let name = checked_name(&name, "user")?;
            let answer: Value = client
                .delete_decoded(&format!("/v1/users/{name}"), &iam("hatch:DeleteUser", USERS))
                .await?;
            show(&answer, format, |a| {
                format!("Deleted user {name} ({})\n", output::field(a, "user_id"))
            })
        }
        UsersCommand::Attach { name, policy, format } => {
            let name = checked_name(&name, "user")?;
            let policy = checked_name(&policy, "policy")?;
            let subject = iam("hatch:AttachUserPolicy", USERS_AND_POLICIES);
            let path = format!("/v1/users/{name}/policies/{policy}");
            let answer: Value = client.put(&path, &serde_json::json!({}), &subject).await?;
            show(&answer, format, |a| {
                format!(
                    "Attached policy {policy} to user {name} (its policies: {})\n",
                    output::field(a, "policies")
                )
            })
        }
        UsersCommand::Detach { name, policy, format } => {
            let name = checked_name(&name, "user")?;
            let policy = checked_name(&policy, "policy")?;
            let subject = iam("hatch:DetachUserPolicy", USERS_AND_POLICIES);
            let path = format!("/v1/users/{name}/policies/{policy}");
            let answer: Value = client.delete_decoded(&path, &subject).await?;
            show(&answer, format, |_| format!("Detached policy {policy} from user {name}\n"))
        }
    }
}

async fn keys(client: &Client, command: KeysCommand) -> Result<u8, CliError> {
    match command {
        KeysCommand::List { user, format } => {
            let path = match user {
                Some(u) => format!("/v1/access-keys?user={}", checked_name(&u, "user")?),
                None => "/v1/access-keys".to_owned(),
            };
            let answer: Value = client.get(&path, &iam("hatch:ListAccessKeys", USERS)).await?;
            show(&answer, format, |a| listed(a, "access_keys", output::ACCESS_KEY_COLUMNS))
        }
        KeysCommand::Create { user, format } => {
            let user = user.map(|u| checked_name(&u, "user")).transpose()?;
            // A key without a user is the owner's, which only the owner may make.
            let subject =
                Subject { owner_only: user.is_none(), ..iam("hatch:CreateAccessKey", USERS) };
            let body = CreateAccessKeyRequest { user };
            let answer: Value = client.post("/v1/access-keys", &body, &subject).await?;
            if format.json {
                print_json(&answer)?;
            } else {
                print(&output::fields(&answer, &["access_key_id", "secret"]))?;
                eprintln!(
                    "hatch: the secret is shown this once and cannot be shown again; keep it now \
                     (it is the key `hatch configure --access-key` and HATCH_ACCESS_KEY take)"
                );
            }
            Ok(0)
        }
        KeysCommand::Revoke { key_id, format } => {
            let id = checked_id(&key_id, "access key")?;
            let answer: Value = client
                .delete_decoded(
                    &format!("/v1/access-keys/{id}"),
                    &iam("hatch:DeleteAccessKey", KEYS),
                )
                .await?;
            show(&answer, format, |_| format!("Revoked access key {id}\n"))
        }
    }
}

async fn policies(client: &Client, command: PoliciesCommand) -> Result<u8, CliError> {
    match command {
        PoliciesCommand::List { format } => {
            let answer: Value =
                client.get("/v1/policies", &iam("hatch:ListPolicies", POLICIES)).await?;
            show(&answer, format, |a| listed(a, "policies", output::POLICY_COLUMNS))
        }
        PoliciesCommand::Show { name, format } => {
            let name = checked_name(&name, "policy")?;
            let subject = iam("hatch:ListPolicies", POLICIES);
            let list: Value = client.get("/v1/policies", &subject).await?;
            let found = output::items(&list, "policies")
                .into_iter()
                .find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
                .cloned();
            let Some(policy) = found else {
                // The same failure as the relay's for a name it does not have.
                let body = ErrorBody {
                    code: codes::NO_SUCH_ENTITY.to_owned(),
                    message: format!("no policy {name} in this account"),
                    request_id: None,
                };
                return Err(CliError::api(404, body, subject, None));
            };
            show(&policy, format, policy_details)
        }
        PoliciesCommand::Put { name, file, format } => {
            let name = checked_name(&name, "policy")?;
            let document = read_document(&file)?;
            let answer: Value = client
                .put(&format!("/v1/policies/{name}"), &document, &iam("hatch:PutPolicy", POLICIES))
                .await?;
            // Not the users it is attached to: the relay's answer to a PUT lists none.
            show(&answer, format, |_| format!("Put policy {name}\n"))
        }
        PoliciesCommand::Delete { name, format } => {
            let name = checked_name(&name, "policy")?;
            let answer: Value = client
                .delete_decoded(
                    &format!("/v1/policies/{name}"),
                    &iam("hatch:DeletePolicy", POLICIES),
                )
                .await?;
            show(&answer, format, |_| format!("Deleted policy {name}\n"))
        }
    }
}

/// `hatch policies show`: name, users and time, then the document, every line safe to print.
fn policy_details(policy: &Value) -> String {
    let head = serde_json::json!({
        "name": policy.get("name"),
        "attached_to": policy.get("attached_to"),
        "updated_at": policy.get("updated_at"),
    });
    let mut out = output::details(&head, output::now());
    out.push_str("document:\n");
    let document = policy.get("document").unwrap_or(&Value::Null);
    // Invariant: a `Value` always serialises.
    let pretty = serde_json::to_string_pretty(document).expect("json value serialises");
    for line in pretty.lines() {
        out.push_str(&output::printable(line));
        out.push('\n');
    }
    out
}

/// A policy document from `file` (`-`: stdin), parsed here so that a typo is named with its
/// line and column rather than as the relay's "not JSON".
fn read_document(file: &Path) -> Result<Value, CliError> {
    let stdin = file == Path::new("-");
    let shown = if stdin { "stdin".to_owned() } else { file.display().to_string() };
    let mut bytes = Vec::new();
    let read = if stdin {
        std::io::stdin().lock().take(MAX_DOCUMENT_READ + 1).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(file)
            .and_then(|f| f.take(MAX_DOCUMENT_READ + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| CliError::Local(format!("reading the policy document {shown}: {e}")))?;
    if bytes.len() as u64 > MAX_DOCUMENT_READ {
        return Err(CliError::Usage(format!(
            "the policy document {shown} is larger than {MAX_DOCUMENT_READ} bytes"
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| CliError::Usage(format!("the policy document {shown} is not JSON: {e}")))
}

async fn activations(client: &Client, command: ActivationsCommand) -> Result<u8, CliError> {
    match command {
        ActivationsCommand::List { format } => {
            let answer: Value =
                client.get("/v1/activations", &iam("hatch:ListActivations", ACTIVATIONS)).await?;
            show(&answer, format, |a| listed(a, "activations", output::ACTIVATION_COLUMNS))
        }
        ActivationsCommand::Create { region, tags, max_registrations, valid_for, format } => {
            let body = CreateActivationRequest {
                region,
                tags: tag_map(tags)?,
                max_registrations,
                valid_for_s: valid_for,
            };
            let answer: Value = client
                .post("/v1/activations", &body, &iam("hatch:CreateActivation", ACTIVATIONS))
                .await?;
            if format.json {
                print_json(&answer)?;
            } else {
                print(&output::fields(&answer, &["activation_id", "activation_code"]))?;
                eprintln!(
                    "hatch: the activation code is shown this once and cannot be shown again; \
                     register an instance with `hatch-agent register --api URL --activation-id \
                     ID --activation-code CODE`"
                );
            }
            Ok(0)
        }
        ActivationsCommand::Revoke { activation_id, format } => {
            let id = checked_id(&activation_id, "activation")?;
            let answer: Value = client
                .delete_decoded(
                    &format!("/v1/activations/{id}"),
                    &iam("hatch:DeleteActivation", ACTIVATIONS),
                )
                .await?;
            show(&answer, format, |_| {
                format!("Revoked activation {id}: no instance can register with it\n")
            })
        }
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

/// `hatch audit`: every page of the account's audit events from `--since`, oldest first.
async fn audit(client: &Client, args: AuditArgs) -> Result<u8, CliError> {
    let subject = Subject { action: "hatch:ReadAudit", ..Subject::default() };
    let mut query = vec!["limit=1000".to_owned()];
    if let Some(since) = &args.since {
        let ok = !since.is_empty()
            && since.len() <= 40
            && since.bytes().all(|b| b.is_ascii_alphanumeric() || b":-+.".contains(&b));
        if !ok {
            return Err(CliError::Usage(format!(
                "--since {since:?}: give RFC 3339 (2026-12-04T08:00:00Z) or seconds since the epoch"
            )));
        }
        query.push(format!("since={}", since.replace('+', "%2B")));
    }
    let (events, _) = pages(client, "/v1/audit", &query, "events", &subject, true).await?;
    if args.json {
        let mut out = String::new();
        for e in &events {
            out.push_str(&serde_json::to_string(e).map_err(|e| CliError::Local(e.to_string()))?);
            out.push('\n');
        }
        print(&out)?;
    } else {
        let rows: Vec<&Value> = events.iter().collect();
        print(&output::table(&rows, output::AUDIT_COLUMNS, output::now()))?;
    }
    Ok(0)
}

/// The asciicast v2 recording of session `id`, from the relay.
async fn fetch_recording(client: &Client, id: &str) -> Result<bytes::Bytes, CliError> {
    let id = checked_id(id, "session")?;
    let subject = Subject {
        action: "hatch:GetSessionRecording",
        session: Some(id.clone()),
        ..Subject::default()
    };
    client
        .get_raw(&format!("/v1/sessions/{id}/recording"), &subject, crate::api::MAX_RECORDING_BODY)
        .await
}

/// `hatch play ID|FILE`: a file that exists is played as it is; anything else must be a
/// session id, whose recording is fetched.
async fn play(
    args: crate::cli::PlayArgs,
    profile: Option<&str>,
    env: Env<'_>,
    verbose: bool,
) -> Result<u8, CliError> {
    let idle = match args.idle_limit {
        None => None,
        Some(s) if s.is_finite() && s > 0.0 && s < 1e9 => {
            Some(std::time::Duration::from_secs_f64(s))
        }
        Some(s) => return Err(CliError::Usage(format!("--idle-limit {s} must be above 0"))),
    };
    let opts = crate::play::PlayOptions::new(args.speed, idle)
        .ok_or_else(|| CliError::Usage(format!("--speed {} must be above 0", args.speed)))?;
    let path = std::path::Path::new(&args.target);
    let cast = if path.is_file() {
        std::fs::read(path)
            .map_err(|e| CliError::Local(format!("reading {}: {e}", path.display())))?
            .into()
    } else {
        fetch_recording(&client(profile, env, verbose)?, &args.target).await?
    };
    let mut player = crate::play::Player::new(opts);
    player.feed(&cast);
    drop(cast);
    let bad =
        |e: crate::play::PlayError| CliError::Local(format!("cannot play {}: {e}", args.target));
    let mut finished = false;
    loop {
        let step = match player.next_step().map_err(bad)? {
            Some(step) => step,
            None if !finished => {
                finished = true;
                match player.finish().map_err(bad)? {
                    Some(step) => step,
                    None => break,
                }
            }
            None => break,
        };
        tokio::time::sleep(step.delay).await;
        print_bytes(&step.bytes)?;
    }
    Ok(0)
}

async fn sessions(client: &Client, args: SessionsArgs) -> Result<u8, CliError> {
    if let Some(SessionsCommand::Recording { session_id, output }) = &args.show {
        let cast = fetch_recording(client, session_id).await?;
        match output {
            Some(file) => {
                std::fs::write(file, &cast)
                    .map_err(|e| CliError::Local(format!("writing {}: {e}", file.display())))?;
                eprintln!("hatch: saved the recording of {session_id} to {}", file.display());
            }
            None => print_bytes(&cast)?,
        }
        return Ok(0);
    }
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
    let (sessions, next) =
        pages(client, "/v1/sessions", &query, "sessions", &subject, args.all).await?;
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

/// The `key` items of a listing at `path?query`: its first page, or with `all` every page
/// (at most [`MAX_PAGES`]); and the next page's token when there are more than were read.
async fn pages(
    client: &Client,
    path: &str,
    query: &[String],
    key: &str,
    subject: &Subject,
    all: bool,
) -> Result<(Vec<Value>, Option<String>), CliError> {
    let mut items = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut q = query.to_vec();
        if let Some(token) = &next {
            checked_id(token, "page token")?;
            q.push(format!("next_token={token}"));
        }
        let url = if q.is_empty() { path.to_owned() } else { format!("{path}?{}", q.join("&")) };
        let answer: Value = client.get(&url, subject).await?;
        items.extend(output::items(&answer, key).into_iter().cloned());
        next = answer.get("next_token").and_then(Value::as_str).map(str::to_owned);
        if next.is_none() || !all {
            break;
        }
    }
    Ok((items, next))
}

fn print(text: &str) -> Result<(), CliError> {
    print_bytes(text.as_bytes())
}

fn print_bytes(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
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
    fn names_with_path_characters_are_refused() {
        for good in ["alice", "bob@example.com", "ops.team_1-a", "a", &"n".repeat(128)] {
            assert_eq!(checked_name(good, "user").unwrap(), good);
        }
        for bad in ["", ".", "..", "../users", "a/b", "a?b", "a b", "a%2e", "é", &"n".repeat(129)]
        {
            let err = checked_name(bad, "user").unwrap_err();
            assert_eq!(err.exit_code(), 64, "{bad}");
            assert!(err.message(false).contains("is not a valid user name"), "{bad}");
        }
    }

    #[test]
    fn a_tag_given_twice_is_refused() {
        let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let map = tag_map(vec![pair("env", "prod"), pair("role", "")]).unwrap();
        assert_eq!(map.into_iter().collect::<Vec<_>>(), [pair("env", "prod"), pair("role", "")]);
        let err = tag_map(vec![pair("env", "prod"), pair("env", "dev")]).unwrap_err();
        assert_eq!(err, CliError::Usage("tag env is given twice".to_owned()));
        assert!(tag_map(Vec::new()).unwrap().is_empty());
    }

    #[test]
    fn a_policy_document_must_be_json() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.json");
        std::fs::write(&good, br#"{"Statement": []}"#).unwrap();
        assert_eq!(read_document(&good).unwrap(), serde_json::json!({"Statement": []}));
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, "{\"Statement\": [}").unwrap();
        let err = read_document(&bad).unwrap_err();
        assert_eq!(err.exit_code(), 64);
        assert!(err.message(false).contains("is not JSON: "), "{}", err.message(false));
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; (MAX_DOCUMENT_READ + 1) as usize]).unwrap();
        assert!(read_document(&big).unwrap_err().message(false).contains("larger than"));
        let err = read_document(&dir.path().join("absent.json")).unwrap_err();
        assert_eq!(err.exit_code(), 74, "{}", err.message(false));
    }

    #[test]
    fn policy_details_show_the_document_safely() {
        let policy = serde_json::json!({"name": "p", "attached_to": ["alice"],
            "updated_at": "2020-01-01T00:00:00Z",
            "document": {"Statement": [{"Sid": "x\u{9b}31m", "Effect": "Allow"}]}});
        let shown = policy_details(&policy);
        assert!(
            shown.starts_with("attached_to  alice\nname         p\nupdated_at   2020-"),
            "{shown}"
        );
        assert!(shown.contains("document:\n{\n  \"Statement\": [\n"), "{shown}");
        assert!(shown.contains("x\\u{9b}31m"), "{shown}");
        assert!(!shown.contains('\u{9b}'));
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
