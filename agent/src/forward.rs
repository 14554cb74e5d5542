//! Port sessions on the agent: where a forwarded connection may go (`--allow-forward`), and the
//! session itself (the mux pump of `hatch-forward`, connecting each stream to the destination).
//!
//! A destination is allowed when a pattern matches its port and its host: a name pattern
//! matches the host exactly as the client named it (case-insensitive), an address or network
//! pattern matches when every address the name resolves to is inside it. The addresses
//! checked are the ones connected to (resolved once per connection), so a name cannot resolve
//! to an allowed address for the check and another for the connect. The default allows only
//! the instance's own loopback.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hatch_forward::{Dialed, Reader, Writer};
use hatch_proto::mux::code;

/// What `--allow-forward` allows when it is not given: the instance's loopback, any port.
pub const DEFAULT_ALLOW: &[&str] = &["127.0.0.0/8:*", "[::1]:*"];

/// One `--allow-forward` pattern: `HOST:PORTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    host: HostPattern,
    ports: (u16, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    Name(String),
    Net(IpAddr, u8),
}

impl std::str::FromStr for Pattern {
    type Err = String;

    /// `HOST:PORT`, `HOST:LOW-HIGH` or `HOST:*`; HOST is `*`, a name, an address, a network
    /// (`10.0.0.0/8`), or an IPv6 address or network in brackets (`[::1]`, `[fd00::/8]`).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("--allow-forward {s:?}: {why} (expected HOST:PORT, HOST:LOW-HIGH or HOST:*)")
        };
        let (host, ports) = s.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let ports = match ports {
            "*" => (1, u16::MAX),
            p => match p.split_once('-') {
                Some((a, b)) => (
                    a.parse().map_err(|_| bad("bad port"))?,
                    b.parse().map_err(|_| bad("bad port"))?,
                ),
                None => {
                    let p = p.parse().map_err(|_| bad("bad port"))?;
                    (p, p)
                }
            },
        };
        if ports.0 == 0 || ports.0 > ports.1 {
            return Err(bad("bad port range"));
        }
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let host = if host == "*" {
            HostPattern::Any
        } else if let Some((addr, bits)) = host.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| bad("bad network address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits: u8 =
                bits.parse().ok().filter(|b| *b <= max).ok_or_else(|| bad("bad prefix length"))?;
            HostPattern::Net(addr, bits)
        } else if let Ok(addr) = host.parse::<IpAddr>() {
            HostPattern::Net(addr, if addr.is_ipv4() { 32 } else { 128 })
        } else if !host.is_empty()
            && host.len() <= 253
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        {
            HostPattern::Name(host.to_ascii_lowercase())
        } else {
            return Err(bad("bad host"));
        };
        Ok(Pattern { host, ports })
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V4(_)) => {
            a.to_ipv4_mapped().is_some_and(|a| in_net(IpAddr::V4(a), net, bits))
        }
        _ => false,
    }
}

/// The agent's `--allow-forward` list.
#[derive(Debug, Clone)]
pub struct AllowForward(Vec<Pattern>);

impl Default for AllowForward {
    fn default() -> Self {
        AllowForward(
            DEFAULT_ALLOW.iter().map(|p| p.parse().expect("default patterns parse")).collect(),
        )
    }
}

impl AllowForward {
    /// The list from `--allow-forward` values (the default when there are none).
    pub fn parse(patterns: &[String]) -> Result<Self, String> {
        if patterns.is_empty() {
            return Ok(AllowForward::default());
        }
        patterns.iter().map(|p| p.parse()).collect::<Result<_, _>>().map(AllowForward)
    }

    /// Whether `host:port`, resolved to `addrs`, may be connected to.
    pub fn allows(&self, host: &str, port: u16, addrs: &[IpAddr]) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let for_port = || self.0.iter().filter(move |p| (p.ports.0..=p.ports.1).contains(&port));
        let by_name = for_port().any(|p| match &p.host {
            HostPattern::Any => true,
            HostPattern::Name(n) => *n == host,
            HostPattern::Net(..) => false,
        });
        // Every address inside some network pattern (`localhost` is 127.0.0.1 and ::1).
        let by_address = !addrs.is_empty()
            && addrs.iter().all(|a| {
                for_port()
                    .any(|p| matches!(p.host, HostPattern::Net(net, bits) if in_net(*a, net, bits)))
            });
        by_name || by_address
    }
}

/// A connect to `host:port` that resolves, checks the addresses against `allow`, and connects
/// to exactly those.
pub fn dialer(
    host: String,
    port: u16,
    allow: Arc<AllowForward>,
) -> Arc<dyn Fn() -> Dialed + Send + Sync> {
    Arc::new(move || {
        let (host, allow) = (host.clone(), allow.clone());
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| (code::UNREACHABLE, format!("cannot resolve {host}: {e}")))?
                .collect();
            let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
            if !allow.allows(&host, port, &ips) {
                return Err((
                    code::NOT_ALLOWED,
                    format!("{host}:{port} is not allowed by the agent's --allow-forward"),
                ));
            }
            let mut last = None;
            for a in addrs {
                match tokio::net::TcpStream::connect(a).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let (r, w) = s.into_split();
                        return Ok((Box::new(r) as Reader, Box::new(w) as Writer));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    (code::REFUSED, format!("{host}:{port}: connection refused"))
                }
                Some(e) => (code::UNREACHABLE, format!("{host}:{port}: {e}")),
                None => (code::UNREACHABLE, format!("{host} has no address")),
            })
        }) as Dialed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn patterns_match_names_networks_and_ports() {
        let d = AllowForward::default();
        assert!(d.allows("localhost", 22, &ips(&["127.0.0.1", "::1"])));
        assert!(d.allows("127.0.0.1", 5432, &ips(&["127.0.0.1"])));
        assert!(!d.allows("10.0.0.5", 5432, &ips(&["10.0.0.5"])));
        // A name that resolves partly outside the allowed network is refused.
        assert!(!d.allows("mixed", 80, &ips(&["127.0.0.1", "10.0.0.1"])));
        let a = AllowForward::parse(&[
            "db.internal:5432".into(),
            "10.0.0.0/8:8000-8099".into(),
            "[fd00::/8]:*".into(),
        ])
        .unwrap();
        assert!(a.allows("DB.internal", 5432, &ips(&["192.168.1.1"])));
        assert!(!a.allows("db.internal", 5433, &ips(&["192.168.1.1"])));
        assert!(a.allows("x", 8050, &ips(&["10.1.2.3"])));
        assert!(!a.allows("x", 8100, &ips(&["10.1.2.3"])));
        assert!(a.allows("y", 1, &ips(&["fd00::1"])));
        assert!(!a.allows("127.0.0.1", 22, &ips(&["127.0.0.1"])), "the default is replaced");
        for bad in ["nohost", "h:0", "h:9-3", "h:x", "10.0.0.0/33:1", "a b:1", ":1"] {
            assert!(AllowForward::parse(&[bad.into()]).is_err(), "{bad}");
        }
    }
}
