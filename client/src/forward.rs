//! `hatch port-forward` and `hatch proxy`: a port session (`mode: "port"`) whose streams carry
//! local TCP connections, or stdin and stdout, through the `hatch-forward` pump.

use hatch_forward::{Conn, End, Note, Role};
use hatch_proto::api::{Mode, StartSessionRequest, StartSessionResponse};
use hatch_proto::{close, mux};
use tokio::sync::mpsc;

use crate::api::Client;
use crate::cli::{PortForwardArgs, ProxyArgs};
use crate::commands::checked_id;
use crate::errors::{CliError, Subject};
use crate::stream;

/// What a data leg runs on.
type Leg = tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>;

/// Local connections waiting for their stream.
const ACCEPT_QUEUE: usize = 64;

/// `[HOST:]PORT` (an IPv6 host in brackets): the host, when given, and the port.
pub fn parse_endpoint(s: &str, what: &str) -> Result<(Option<String>, u16), CliError> {
    let bad = || CliError::Usage(format!("{what} {s:?} is not [HOST:]PORT"));
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (Some(h.trim_start_matches('[').trim_end_matches(']').to_owned()), p),
        None => (None, s),
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.as_deref() == Some("") {
        return Err(bad());
    }
    Ok((host, port))
}

/// Starts the port session and dials its stream.
async fn start(
    client: &Client,
    instance: &str,
    host: Option<String>,
    port: u16,
) -> Result<(StartSessionResponse, stream::Ws), CliError> {
    let instance = checked_id(instance, "instance")?;
    if port == 0 {
        return Err(CliError::Usage("the remote port must be 1-65535".into()));
    }
    let req = StartSessionRequest {
        instance_id: instance.clone(),
        mode: Mode::Port,
        command: None,
        run_as: None,
        term: None,
        tty: None,
        remote_host: host,
        remote_port: Some(port),
    };
    let subject = Subject {
        action: "hatch:StartPortForwarding",
        instance: Some(instance.clone()),
        ..Subject::default()
    };
    let started: StartSessionResponse = client.post("/v1/sessions", &req, &subject).await?;
    let ws = stream::connect(&started, client.tls(), &instance).await?;
    Ok((started, ws))
}

/// New legs through `POST /v1/sessions/{id}/resume`, within the relay's resume window.
struct Legs<'a> {
    re: stream::Reconnect<'a>,
    instance: String,
}

impl<'a> Legs<'a> {
    fn new(client: &'a Client, started: &StartSessionResponse, instance: &str) -> Legs<'a> {
        let re = stream::Reconnect {
            client,
            session_id: started.session_id.clone(),
            window: stream::reconnect_window(started.resume_window_s),
            action: "hatch:StartPortForwarding",
        };
        Legs { re, instance: instance.to_owned() }
    }
}

impl hatch_forward::Reattach<Leg> for Legs<'_> {
    fn reattach<'b>(&'b mut self, why: &'b str) -> hatch_forward::NewLeg<'b, Leg> {
        Box::pin(async move {
            if self.re.window.is_zero() {
                return Err(format!(
                    "the connection was lost ({why}); the relay keeps no sessions to resume"
                ));
            }
            eprintln!("hatch: connection lost ({why}); reconnecting");
            match self.re.until_up(&self.instance, |_| {}).await {
                Ok(ws) => {
                    eprintln!("hatch: reconnected; forwarding goes on");
                    Ok(ws)
                }
                Err(CliError::NotResumed(why)) => Err(why),
                Err(e) => Err(e.message(false)),
            }
        })
    }
}

fn config() -> hatch_forward::Config {
    hatch_forward::Config {
        link: Default::default(),
        ping_interval: stream::PING_EVERY,
        dead_after: stream::DEAD_AFTER,
    }
}

/// A stream's failure in words for stderr.
fn note_line(n: &Note) -> String {
    match n {
        Note::RemoteError { message, .. } => format!("hatch: remote error: {message}"),
        Note::OpenFailed { label, code, why } => format!(
            "hatch: connection from {label} closed: the instance could not connect it ({}): {why}",
            mux::code::describe(*code)
        ),
        Note::Reset { label, code, why } => format!(
            "hatch: connection from {label} aborted ({}): {why}",
            mux::code::describe(*code)
        ),
    }
}

/// The exit of a pump that ended.
fn ended(end: End, instance: &str) -> Result<u8, CliError> {
    match end {
        End::Done(_) => Ok(0),
        End::Closed(close::NORMAL, _) => Ok(0),
        End::Closed(code, reason) => {
            Err(CliError::Closed { code, reason, instance: Some(instance.to_owned()) })
        }
        End::Lost(why) => Err(CliError::Lost(why)),
        End::Bad(why) => Err(CliError::Lost(format!("the agent broke the protocol: {why}"))),
        End::ResumeFailed(why) => Err(CliError::Closed {
            code: close::RESUME_FAILED,
            reason: why,
            instance: Some(instance.to_owned()),
        }),
        End::NotResumed(why) => Err(CliError::NotResumed(why)),
    }
}

/// `hatch port-forward`: listens, and carries every accepted connection to the remote port
/// until Ctrl-C or the session ends.
pub async fn port_forward(client: &Client, args: PortForwardArgs) -> Result<u8, CliError> {
    let (host, port) = parse_endpoint(&args.remote, "--remote")?;
    let (laddr, lport) = match &args.local {
        Some(l) => parse_endpoint(l, "--local")?,
        None => (None, port),
    };
    let laddr = laddr.unwrap_or_else(|| "127.0.0.1".to_owned());
    let listener = tokio::net::TcpListener::bind((laddr.as_str(), lport))
        .await
        .map_err(|e| CliError::Local(format!("cannot listen on {laddr}:{lport}: {e}")))?;
    let local = listener.local_addr().map_err(|e| CliError::Local(e.to_string()))?;
    let (started, ws) = start(client, &args.instance, host.clone(), port).await?;
    let dest = format!("{}:{port}", host.as_deref().unwrap_or("localhost"));
    eprintln!(
        "Forwarding {local} -> {dest} on {} (session {}); Ctrl-C stops",
        args.instance, started.session_id
    );
    let (tx, conns) = mpsc::channel(ACCEPT_QUEUE);
    let accept = tokio::spawn(async move {
        loop {
            let (sock, from) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("hatch: accepting a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = sock.set_nodelay(true);
            let (r, w) = sock.into_split();
            let conn = Conn { read: Box::new(r), write: Box::new(w), label: from.to_string() };
            if tx.send(conn).await.is_err() {
                return;
            }
        }
    });
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
        (close::NORMAL, "stopped by the user".to_owned())
    };
    let mut legs = Legs::new(client, &started, &args.instance);
    let end =
        hatch_forward::pump(ws, Role::Client { conns }, config(), Some(&mut legs), stop, |n| {
            eprintln!("{}", note_line(&n));
        })
        .await;
    accept.abort();
    ended(end, &args.instance)
}

/// `hatch proxy`: one forwarded connection on stdin and stdout; ends when both directions
/// have ended.
pub async fn proxy(client: &Client, args: ProxyArgs) -> Result<u8, CliError> {
    let (host, port) = parse_endpoint(&args.remote, "--remote")?;
    let (started, ws) = start(client, &args.instance, host, port).await?;
    let mut legs = Legs::new(client, &started, &args.instance);
    let (tx, conns) = mpsc::channel(1);
    let conn = Conn {
        read: Box::new(tokio::io::stdin()),
        write: Box::new(tokio::io::stdout()),
        label: "stdin".into(),
    };
    tx.send(conn).await.expect("the receiver is here");
    drop(tx);
    let mut failed = false;
    let never = std::future::pending();
    let end =
        hatch_forward::pump(ws, Role::Client { conns }, config(), Some(&mut legs), never, |n| {
            failed |= !matches!(n, Note::RemoteError { .. });
            eprintln!("{}", note_line(&n));
        })
        .await;
    match ended(end, &args.instance)? {
        0 if failed => Ok(crate::errors::exit::TRANSPORT),
        c => Ok(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_with_and_without_a_host() {
        assert_eq!(parse_endpoint("22", "x").unwrap(), (None, 22));
        assert_eq!(parse_endpoint("db:5432", "x").unwrap(), (Some("db".into()), 5432));
        assert_eq!(parse_endpoint("[::1]:80", "x").unwrap(), (Some("::1".into()), 80));
        for bad in ["", "x", ":22", "h:70000", "h:-1"] {
            assert!(parse_endpoint(bad, "x").is_err(), "{bad}");
        }
    }
}
