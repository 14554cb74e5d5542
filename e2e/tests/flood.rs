//! Resource attacks on the real `hatch-relay` process: thousands of connections that never
//! finish their handshake, and a client that stops reading while its agent floods output.
//! Memory is the relay process's own `VmRSS` (`/proc/PID/status`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use hatch_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const SILENT: usize = 2000;
const HALF_TLS: usize = 2000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_at_the_handshake_timeout_and_sessions_still_connect() {
    let hard = raise_fd_limit();
    assert!(hard as usize > 2 * (SILENT + HALF_TLS), "open-file limit {hard} too low");
    let relay = Relay::start(&["--handshake-timeout", "2"]);
    let mut agent = relay.agent().await;
    let s = relay.start_session(&mut agent).await;
    let addr = relay.data_addr();
    let hello = client_hello(&relay.tls);
    let rss_before = relay.proc.rss_kib();

    // Open them all; each task holds its socket and reports when the relay ends it.
    let t0 = Instant::now();
    let mut waits = Vec::with_capacity(SILENT + HALF_TLS);
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(SILENT + HALF_TLS);
    for i in 0..SILENT + HALF_TLS {
        let hello = hello.clone();
        let opened = opened_tx.clone();
        waits.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(addr).await.expect("connect");
            let started = Instant::now();
            if i >= SILENT {
                // Half a TLS handshake: the ClientHello, then nothing (the relay's answer is
                // read and dropped below; the client never sends its Finished).
                tcp.write_all(&hello).await.expect("ClientHello");
            }
            let _ = opened.send(()).await;
            let mut buf = [0u8; 4096];
            let mut got = 0usize;
            let end = tokio::time::timeout(DEADLINE + Duration::from_secs(10), async {
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => return "eof",
                        Ok(n) => got += n,
                        Err(_) => return "reset",
                    }
                }
            })
            .await;
            (i >= SILENT, end.unwrap_or("still open"), started.elapsed(), got)
        }));
    }
    drop(opened_tx);
    let mut opened = 0;
    while opened < SILENT + HALF_TLS {
        tokio::time::timeout(DEADLINE, opened_rx.recv())
            .await
            .expect("connections opening")
            .unwrap();
        opened += 1;
    }
    let open_time = t0.elapsed();
    let rss_peak = relay.proc.rss_kib();

    // Meanwhile, a real session: both legs upgrade and carry bytes.
    let t1 = Instant::now();
    let mut c = leg(&relay, &s.client_url, &s.client_token).await.expect("client leg under attack");
    let mut a = leg(&relay, &s.agent_url, &s.agent_token).await.expect("agent leg under attack");
    send_bin(&mut c, b"\x01through").await;
    assert_eq!(recv_bin(&mut a).await, b"\x01through");
    let session_time = t1.elapsed();

    // Every stalled connection is ended by the relay.
    let mut max_life = Duration::ZERO;
    let (mut eof, mut reset, mut server_bytes) = (0, 0, 0usize);
    for w in waits {
        let (half, how, life, got) = w.await.unwrap();
        assert_ne!(how, "still open", "a stalled connection (half TLS: {half}) was never closed");
        if how == "eof" {
            eof += 1
        } else {
            reset += 1
        }
        if !half {
            assert_eq!(got, 0, "the relay sent bytes to a silent TCP connection");
        }
        server_bytes += got;
        max_life = max_life.max(life);
    }
    let rss_after = relay.proc.rss_kib();
    eprintln!(
        "{SILENT} silent + {HALF_TLS} half-TLS connections opened in {open_time:?}; a real session \
         paired and forwarded in {session_time:?} meanwhile; all closed by the relay ({eof} EOF, \
         {reset} reset), the last {max_life:?} after it opened (handshake timeout 2 s); relay \
         answered {server_bytes} TLS bytes to the half handshakes; relay VmRSS {rss_before} KiB \
         before, {rss_peak} KiB with all open, {rss_after} KiB after"
    );
    assert!(max_life < Duration::from_secs(2) + DEADLINE, "closed far past the timeout");
    // Bounded: far below what an unbounded buffer per connection would cost.
    assert!(
        rss_peak.saturating_sub(rss_before) < 256 * 1024,
        "relay grew {} KiB",
        rss_peak - rss_before
    );

    // The session opened during the attack still works, and so does a fresh one.
    send_bin(&mut a, b"\x01after").await;
    assert_eq!(recv_bin(&mut c).await, b"\x01after");
    relay.still_serves(&mut agent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_costs_bounded_relay_memory_and_loses_nothing() {
    const MSG: usize = 16 * 1024;
    const COUNT: u64 = 1024; // 16 MiB, far beyond the socket buffers of both hops
    let relay = Relay::start(&[]);
    let mut agent = relay.agent().await;
    let (s, mut c, mut a) = relay.open(&mut agent).await;
    send_bin(&mut c, b"\x01go").await;
    assert_eq!(recv_bin(&mut a).await, b"\x01go");
    let rss_before = relay.proc.rss_kib();
    let sent = Arc::new(AtomicU64::new(0));
    let sent2 = sent.clone();
    let flood = tokio::spawn(async move {
        let mut m = vec![0x01u8; MSG];
        for i in 0..COUNT {
            m[1..9].copy_from_slice(&i.to_be_bytes());
            a.send(Message::binary(m.clone())).await.unwrap();
            sent2.store(i + 1, Ordering::Relaxed);
        }
        a
    });
    // The agent stalls on backpressure: its count stops moving (poll, bounded).
    let end = Instant::now() + DEADLINE;
    let (mut last, mut still) = (u64::MAX, 0);
    while still < 20 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sent.load(Ordering::Relaxed);
        if now == last { still += 1 } else { (still, last) = (0, now) }
    }
    let stalled = sent.load(Ordering::Relaxed);
    let rss_stalled = relay.proc.rss_kib();
    assert!(stalled < COUNT, "16 MiB went through a client that reads nothing");

    // Another session is unaffected meanwhile.
    relay.still_serves(&mut agent).await;

    // Now the client reads: every message, in order, nothing lost.
    for i in 0..COUNT {
        let m = recv_bin(&mut c).await;
        assert_eq!(m.len(), MSG);
        assert_eq!(u64::from_be_bytes(m[1..9].try_into().unwrap()), i, "out of order");
    }
    let mut a = flood.await.unwrap();
    a.close(None).await.unwrap();
    let rec = relay.closed_session(&s.id).await;
    eprintln!(
        "agent stalled after {} KiB of {} KiB; relay VmRSS {rss_before} KiB before, \
         {rss_stalled} KiB while stalled; record {rec}",
        stalled * MSG as u64 / 1024,
        COUNT * MSG as u64 / 1024
    );
    // The per-direction bound is 256 KiB; allow for TLS buffers and allocator slack.
    assert!(rss_stalled.saturating_sub(rss_before) < 8 * 1024, "relay buffered the flood");
    // A close without a code from the agent leg is a normal end: recorded `exit`.
    assert_eq!(rec["close_reason"], "exit", "{rec}");
    assert_eq!(rec["bytes_agent_to_client"], COUNT * MSG as u64, "{rec}");
    assert_eq!(rec["bytes_client_to_agent"], 3, "{rec}");
}

/// How long the control-channel ping flood lasts: `HATCH_FLOOD_SECS` (default 12 s, so the
/// suite stays short; the case is a one-minute flood: `HATCH_FLOOD_SECS=60`).
fn flood_secs() -> u64 {
    std::env::var("HATCH_FLOOD_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(12)
}

/// Relay growth allowed during the ping flood. Before the bound, every answer to a ping was
/// queued while the channel kept reading: 2 GiB in 10 s.
const PING_FLOOD_MAX_GROWTH_KIB: u64 = 32 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_ping_flood_that_never_reads_costs_bounded_relay_memory() {
    let secs = flood_secs();
    let relay = Relay::start(&[]);
    let mut good = relay.agent().await;
    let ControlAgent { ws: bad_ws, secret: bad_secret, .. } = relay.agent().await;
    let rss_before = relay.proc.rss_kib();

    // The hostile agent: masked 125-byte pings nonstop on its own control channel, never a
    // read. A channel the relay ends is opened again with the same secret until the time is up.
    let flood = async {
        let end = Instant::now() + Duration::from_secs(secs);
        let (mut pings, mut channels, mut peak) = (0u64, 1u32, 0u64);
        let mut ws = Some(bad_ws);
        let ping = Message::Ping(vec![0x5a; 125].into());
        while Instant::now() < end {
            peak = peak.max(relay.proc.rss_kib());
            // Stop early once the bound is far exceeded: the point is made, and the machine is
            // shared.
            if peak.saturating_sub(rss_before) > 8 * PING_FLOOD_MAX_GROWTH_KIB {
                break;
            }
            let Some(w) = ws.as_mut() else {
                ws = relay.control_channel(&bad_secret).await.ok();
                channels += 1;
                continue;
            };
            for _ in 0..64 {
                match tokio::time::timeout(Duration::from_millis(200), w.send(ping.clone())).await {
                    Ok(Ok(())) => pings += 1,
                    // The relay stopped reading: the send waits, and the flood with it.
                    Err(_) => break,
                    // The relay closed the channel.
                    Ok(Err(_)) => {
                        ws = None;
                        break;
                    }
                }
            }
        }
        (pings, channels, peak.max(relay.proc.rss_kib()))
    };
    // Legitimate sessions meanwhile, one after another until the flood ends (this also keeps
    // the good agent answering its heartbeats).
    let done = AtomicBool::new(false);
    let flood = async {
        let r = flood.await;
        done.store(true, Ordering::Relaxed);
        r
    };
    let served = async {
        let mut n = 0u32;
        while !done.load(Ordering::Relaxed) {
            relay.still_serves(&mut good).await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        n
    };
    let ((pings, channels, rss_peak), sessions) = tokio::join!(flood, served);
    let rss_after = relay.proc.rss_kib();
    eprintln!(
        "{secs} s ping flood: {pings} pings of 125 bytes sent on {channels} control channel(s); \
         {sessions} sessions served meanwhile; relay VmRSS {rss_before} KiB before, peak \
         {rss_peak} KiB, {rss_after} KiB after"
    );
    assert!(
        rss_peak.saturating_sub(rss_before) < PING_FLOOD_MAX_GROWTH_KIB,
        "relay grew {} KiB during the ping flood",
        rss_peak.saturating_sub(rss_before)
    );
    // The channel that stopped reading was closed by the relay, with a line saying why.
    wait_for("the relay closing the flooding channel", DEADLINE, || {
        relay.proc.output().contains("agent does not read its control channel")
    })
    .await;
    // A legitimate session after it.
    relay.still_serves(&mut good).await;
}
