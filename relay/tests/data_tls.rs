//! The relay's own TLS driver (rustls's unbuffered API in `data/tls.rs`) against real rustls
//! clients driven by hand, so the test controls what goes on the wire: TCP writes of a few bytes,
//! KeyUpdates, close_notify without FIN, and bytes that are not TLS at all.

mod data_support;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use data_support::*;
use hatch_proto::token::Role;
use hatch_relay::data::IoBackend;
use hatch_relay::plane::CloseReason;
use rustls::ClientConnection;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

both_backends!(
    handshake_and_records_split_into_tiny_tcp_writes,
    handshake_messages_split_across_tiny_records,
    tls12_client_is_served,
    client_key_updates_while_the_relay_writes,
    key_update_and_ping_flood_without_reading_is_bounded,
    client_close_notify_without_fin_ends_the_session,
    ciphertext_garbage_gets_an_alert,
    oversized_record_gets_an_alert,
    non_tls_bytes_get_an_alert_and_a_close,
    handshake_message_larger_than_a_buffer_is_refused,
    handshake_message_fragmented_after_the_handshake_is_refused,
);

/// A client config trusting the relay's dev CA, for the given protocol versions.
fn client_config(
    relay: &Relay,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let pki = hatch_relay::certs::ensure_dev_pki(relay._dir.path(), &[]).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(&pki.ca_file).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A TLS client driven by hand over a TCP stream: every byte rustls emits goes out in TCP writes
/// of at most `piece` bytes.
struct Manual {
    tcp: TcpStream,
    tls: ClientConnection,
    piece: usize,
    /// Decrypted bytes not yet consumed.
    plain: Vec<u8>,
}

impl Manual {
    async fn connect(relay: &Relay, cfg: Arc<rustls::ClientConfig>, piece: usize) -> Manual {
        let tcp = TcpStream::connect(relay.addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = ClientConnection::new(cfg, name).unwrap();
        let mut m = Manual { tcp, tls, piece, plain: Vec::new() };
        while m.tls.is_handshaking() {
            m.send().await;
            if m.tls.is_handshaking() {
                assert!(m.recv().await.unwrap(), "relay closed during the handshake");
            }
        }
        m.send().await;
        m
    }

    /// Sends what rustls has queued, in TCP writes of `piece` bytes.
    async fn send(&mut self) {
        let mut out = Vec::new();
        while self.tls.wants_write() {
            self.tls.write_tls(&mut out).unwrap();
        }
        for p in out.chunks(self.piece) {
            self.tcp.write_all(p).await.unwrap();
            if self.piece < 64 {
                // Let each piece leave as its own segment and be read on its own.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }

    /// One socket read into rustls: `Ok(false)` at EOF, an error for a TLS failure (an alert).
    async fn recv(&mut self) -> std::io::Result<bool> {
        let mut buf = vec![0u8; 32 * 1024];
        let n =
            tokio::time::timeout(WAIT, self.tcp.read(&mut buf)).await.expect("read timed out")?;
        if n == 0 {
            return Ok(false);
        }
        // rustls takes at most what its deframing buffer has room for per call.
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            self.tls.read_tls(&mut rest)?;
            self.tls
                .process_new_packets()
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            let mut chunk = [0u8; 4096];
            loop {
                match self.tls.reader().read(&mut chunk) {
                    Ok(0) => break,
                    Ok(k) => self.plain.extend_from_slice(&chunk[..k]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(true)
    }

    async fn write(&mut self, b: &[u8]) {
        let mut pos = 0;
        while pos < b.len() {
            pos += self.tls.writer().write(&b[pos..]).unwrap();
            self.send().await;
        }
    }

    /// Reads until at least `n` plaintext bytes are there and takes exactly `n`.
    async fn take(&mut self, n: usize) -> Vec<u8> {
        while self.plain.len() < n {
            assert!(self.recv().await.unwrap(), "eof after {} of {n} bytes", self.plain.len());
        }
        self.plain.drain(..n).collect()
    }

    /// Upgrades as a leg of `sid` and checks the 101.
    async fn upgrade(&mut self, relay: &Relay, sid: &str, role: Role) {
        let t = relay.token(sid, role);
        let req = upgrade_request(sid, role.as_str(), &format!("Authorization: Bearer {t}\r\n"));
        self.write(req.as_bytes()).await;
        while !self.plain.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(self.recv().await.unwrap(), "eof before the 101");
        }
        let end = self.plain.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head: Vec<u8> = self.plain.drain(..end).collect();
        assert!(head.starts_with(b"HTTP/1.1 101 "), "{}", String::from_utf8_lossy(&head));
    }

    /// Reads one unmasked server frame: (opcode, payload).
    async fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let h = self.take(2).await;
        let len = match h[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes(self.take(2).await.try_into().unwrap())),
            127 => u64::from_be_bytes(self.take(8).await.try_into().unwrap()),
            n => u64::from(n),
        };
        (h[0] & 0x0F, self.take(len as usize).await)
    }
}

/// Frames of `n` bytes with recognizable contents.
fn payload(i: usize, n: usize) -> Vec<u8> {
    (0..n).map(|k| ((i * 31 + k) % 251) as u8).collect()
}

async fn handshake_and_records_split_into_tiny_tcp_writes(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let cfg = client_config(&relay, &[&rustls::version::TLS13]);
    // The ClientHello, the client's Finished and the request arrive a byte at a time.
    let mut c = Manual::connect(&relay, cfg, 1).await;
    c.upgrade(&relay, "s-tiny", Role::Client).await;
    let mut a =
        relay.dial("s-tiny", Role::Agent, &relay.token("s-tiny", Role::Agent)).await.unwrap();
    // Small frames a byte at a time, then a frame of several records in 997-byte writes.
    for i in 0..3 {
        c.write(&client_frame(0x82, &payload(i, 40))).await;
        assert_eq!(recv_bin(&mut a).await, payload(i, 40));
    }
    c.piece = 997;
    let big = payload(7, 40_000);
    c.write(&client_frame(0x82, &big)).await;
    assert_eq!(recv_bin(&mut a).await, big);
    // And the other way: records the relay encrypts, several per write.
    let back = payload(9, 100_000);
    send_bin(&mut a, &back).await;
    assert_eq!(c.read_frame().await, (0x2, back));
    close_with(&mut a, 1000).await;
    assert_eq!(c.read_frame().await.0, 0x8);
    let end = relay.next_end().await;
    assert_eq!(end.bytes_client_to_agent, 3 * 40 + 40_000);
}

async fn handshake_messages_split_across_tiny_records(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    // 32-byte records (rustls's smallest): the ClientHello and Finished span many records, which
    // the relay's rustls reassembles across reads, and every frame spans several records.
    let mut cfg = (*client_config(&relay, &[&rustls::version::TLS13])).clone();
    cfg.max_fragment_size = Some(32);
    let mut c = Manual::connect(&relay, Arc::new(cfg), 5).await;
    c.upgrade(&relay, "s-frag", Role::Client).await;
    let mut a =
        relay.dial("s-frag", Role::Agent, &relay.token("s-frag", Role::Agent)).await.unwrap();
    c.write(&client_frame(0x82, &payload(3, 300))).await;
    assert_eq!(recv_bin(&mut a).await, payload(3, 300));
    c.piece = 16 * 1024;
    let big = payload(4, 50_000);
    c.write(&client_frame(0x82, &big)).await;
    assert_eq!(recv_bin(&mut a).await, big);
    send_bin(&mut a, b"back").await;
    assert_eq!(c.read_frame().await, (0x2, b"back".to_vec()));
    close_with(&mut a, 1000).await;
    assert_eq!(c.read_frame().await.0, 0x8);
    assert_eq!(relay.next_end().await.bytes_client_to_agent, 50_300);
}

async fn tls12_client_is_served(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let cfg = client_config(&relay, &[&rustls::version::TLS12]);
    let mut c = Manual::connect(&relay, cfg, 3).await;
    assert_eq!(c.tls.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    c.upgrade(&relay, "s-tls12", Role::Client).await;
    let mut a =
        relay.dial("s-tls12", Role::Agent, &relay.token("s-tls12", Role::Agent)).await.unwrap();
    c.piece = 4096;
    let big = payload(1, 70_000);
    c.write(&client_frame(0x82, &big)).await;
    assert_eq!(recv_bin(&mut a).await, big);
    let back = payload(2, 70_000);
    send_bin(&mut a, &back).await;
    assert_eq!(c.read_frame().await, (0x2, back));
    c_close(&mut c).await;
    assert_eq!(recv_close(&mut a).await, 1000);
    assert_eq!(relay.next_end().await.reason, CloseReason::ClientClosed);
}

/// Sends a masked close frame (1000) from a manual client.
async fn c_close(c: &mut Manual) {
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.extend_from_slice(b"bye");
    c.write(&client_frame(0x88, &p)).await;
}

async fn client_key_updates_while_the_relay_writes(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let cfg = client_config(&relay, &[&rustls::version::TLS13]);
    let mut c = Manual::connect(&relay, cfg, 16 * 1024).await;
    c.upgrade(&relay, "s-ku", Role::Client).await;
    let mut a = relay.dial("s-ku", Role::Agent, &relay.token("s-ku", Role::Agent)).await.unwrap();
    // The agent streams output while the client rolls its keys (asking the relay to roll its
    // own): every byte must still decrypt on the client, so the relay's KeyUpdate reply went
    // out before any record under its new key.
    const FRAMES: usize = 300;
    let sender = tokio::spawn(async move {
        for i in 0..FRAMES {
            send_bin(&mut a, &payload(i, 2_000)).await;
        }
        a
    });
    let mut updates = 0;
    for i in 0..FRAMES {
        if i % 10 == 0 {
            c.tls.refresh_traffic_keys().unwrap();
            c.write(&client_frame(0x82, &payload(i, 10))).await;
            updates += 1;
        }
        assert_eq!(c.read_frame().await, (0x2, payload(i, 2_000)), "frame {i}");
    }
    assert_eq!(updates, 30);
    let mut a = sender.await.unwrap();
    for i in (0..FRAMES).step_by(10) {
        assert_eq!(recv_bin(&mut a).await, payload(i, 10));
    }
    close_with(&mut a, 1000).await;
    assert_eq!(c.read_frame().await.0, 0x8);
    assert_eq!(relay.next_end().await.reason, CloseReason::Exit);
}

async fn key_update_and_ping_flood_without_reading_is_bounded(io: IoBackend) {
    use std::sync::atomic::{AtomicU64, Ordering};
    let relay = Relay::start(io, |_| {});
    let cfg = client_config(&relay, &[&rustls::version::TLS13]);
    let mut c = Manual::connect(&relay, cfg, 16 * 1024).await;
    c.upgrade(&relay, "s-ku-flood", Role::Client).await;
    let _a = relay
        .dial("s-ku-flood", Role::Agent, &relay.token("s-ku-flood", Role::Agent))
        .await
        .unwrap();
    // Everything that makes the relay write on this leg at once, nonstop, never reading: a
    // KeyUpdate asking for the relay's (rustls queues at most one reply) and a 125-byte ping
    // (application data, which also renews rustls's allowance of KeyUpdate requests).
    let rounds = Arc::new(AtomicU64::new(0));
    let rounds2 = rounds.clone();
    let flood = tokio::spawn(async move {
        loop {
            c.tls.refresh_traffic_keys().unwrap();
            c.write(&client_frame(0x89, &[0x5A; 125])).await;
            rounds2.fetch_add(1, Ordering::Relaxed);
        }
    });
    let start = tokio::time::Instant::now();
    let (mut most, mut last, mut still, mut i) = (0, 0, 0, 0);
    while (still < 20 && !flood.is_finished()) || start.elapsed() < Duration::from_secs(3) {
        assert!(start.elapsed() < 2 * WAIT, "the flood never stalled: {last} rounds");
        let sid = format!("s-ku-beside-{i}");
        i += 1;
        let (mut c2, mut a2) = relay.pair(&sid).await;
        send_bin(&mut c2, b"still here").await;
        assert_eq!(recv_bin(&mut a2).await, b"still here");
        most = most.max(relay.metric("hatch_data_buffers_in_use"));
        let now = rounds.load(Ordering::Relaxed);
        still = if now == last { still + 1 } else { 0 };
        last = now;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ended = flood.is_finished();
    eprintln!(
        "key update flood: {last} rounds (leg closed: {ended}); at most {most} buffers in use"
    );
    assert!(most <= 8, "{most} pooled buffers in use during the flood");
    flood.abort();
}

async fn client_close_notify_without_fin_ends_the_session(io: IoBackend) {
    // Resuming off: a close_notify without a close frame is a lost leg, which then ends the
    // session (with resuming on it would detach it, as any lost leg).
    let mut relay = Relay::start(io, |c| c.resume_window = None);
    let cfg = client_config(&relay, &[&rustls::version::TLS13]);
    let mut c = Manual::connect(&relay, cfg, 16 * 1024).await;
    c.upgrade(&relay, "s-cn", Role::Client).await;
    let mut a = relay.dial("s-cn", Role::Agent, &relay.token("s-cn", Role::Agent)).await.unwrap();
    c.write(&client_frame(0x82, b"last")).await;
    assert_eq!(recv_bin(&mut a).await, b"last");
    // close_notify, but the TCP connection stays open for writing.
    c.tls.send_close_notify();
    c.send().await;
    assert_eq!(recv_close(&mut a).await, 4005);
    let end = relay.next_end().await;
    assert_eq!(end.reason, CloseReason::ClientLost);
    assert_eq!(end.bytes_client_to_agent, 4);
    // The relay answers with its own close_notify before its FIN.
    while c.recv().await.unwrap() {}
    assert!(c.tls.process_new_packets().unwrap().peer_has_closed());
}

/// A leg whose TLS client then writes `bytes` straight to the socket, past rustls.
async fn leg_then_raw(relay: &Relay, sid: &str, bytes: &[u8]) -> Manual {
    let cfg = client_config(relay, &[&rustls::version::TLS13]);
    let mut c = Manual::connect(relay, cfg, 16 * 1024).await;
    c.upgrade(relay, sid, Role::Client).await;
    c.tcp.write_all(bytes).await.unwrap();
    c
}

/// Reads until the relay's fatal alert or EOF; returns the client's error text.
async fn alert_text(c: &mut Manual) -> String {
    loop {
        match c.recv().await {
            Ok(true) => {}
            Ok(false) => return "eof".into(),
            Err(e) => return e.to_string(),
        }
    }
}

async fn ciphertext_garbage_gets_an_alert(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let mut a = relay.dial("s-mac", Role::Agent, &relay.token("s-mac", Role::Agent)).await.unwrap();
    // An application-data record whose contents are not under the session's key.
    let mut rec = vec![0x17, 0x03, 0x03, 0x00, 0x40];
    rec.extend_from_slice(&[0xAB; 0x40]);
    let mut c = leg_then_raw(&relay, "s-mac", &rec).await;
    let text = alert_text(&mut c).await;
    assert!(text.contains("BadRecordMac"), "{text}");
    assert_eq!(recv_close(&mut a).await, 4005);
    assert_eq!(relay.next_end().await.reason, CloseReason::Error);
    let (mut c2, mut a2) = relay.pair("s-after-mac").await;
    send_bin(&mut c2, b"ok").await;
    assert_eq!(recv_bin(&mut a2).await, b"ok");
}

async fn oversized_record_gets_an_alert(io: IoBackend) {
    let mut relay = Relay::start(io, |_| {});
    let mut a = relay.dial("s-big", Role::Agent, &relay.token("s-big", Role::Agent)).await.unwrap();
    // A record header announcing 65,535 bytes, far over the limit of
    // 16 KiB + 256: refused from the header, with an alert.
    let mut c = leg_then_raw(&relay, "s-big", &[0x17, 0x03, 0x03, 0xFF, 0xFF, 1, 2, 3]).await;
    let text = alert_text(&mut c).await;
    assert!(text.contains("received fatal alert"), "{text}");
    assert_eq!(recv_close(&mut a).await, 4005);
    assert_eq!(relay.next_end().await.reason, CloseReason::Error);
}

/// A relay whose handshake deadline is far beyond `WAIT`: a close seen within `WAIT` was the
/// relay refusing the input, not the deadline.
fn patient_relay(io: IoBackend) -> Relay {
    Relay::start(io, |c| c.handshake_timeout = Duration::from_secs(600))
}

async fn non_tls_bytes_get_an_alert_and_a_close(io: IoBackend) {
    let relay = patient_relay(io);
    for (bytes, alert) in [
        // Not TLS at all: decode_error.
        (&b"GET /v1/stream/s?role=client HTTP/1.1\r\n\r\n"[..], true),
        // A record header announcing 65,535 bytes: refused before any of them arrive.
        (&[0x16, 0x03, 0x01, 0xFF, 0xFF, 0, 0, 0][..], true),
        // A handshake message announcing 16 MiB: rustls refuses it without an alert.
        (&[0x16, 0x03, 0x01, 0x00, 0x04, 0xFF, 0xFF, 0xFF, 0xFF][..], false),
    ] {
        let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        let mut got = Vec::new();
        let r = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got))
            .await
            .expect("relay did not close");
        assert!(r.is_ok(), "{bytes:?}: {r:?}");
        if alert {
            // One plaintext fatal alert record, then the close.
            assert_eq!(got.len(), 7, "{bytes:?} → {got:?}");
            assert_eq!((got[0], got[5]), (0x15, 2), "{bytes:?} → {got:?}");
        } else {
            assert!(got.is_empty(), "{bytes:?} → {got:?}");
        }
    }
    let (mut c, mut a) = relay.pair("s-after").await;
    send_bin(&mut c, b"ok").await;
    assert_eq!(recv_bin(&mut a).await, b"ok");
}

async fn handshake_message_larger_than_a_buffer_is_refused(io: IoBackend) {
    let relay = patient_relay(io);
    // A ClientHello announcing 60,000 bytes (under rustls's 64 KiB limit), sent as full records:
    // rustls keeps every record until the message is whole, which a 32 KiB buffer never holds.
    let mut wire = Vec::new();
    let mut body = vec![0x01, 0x00, 0xEA, 0x60];
    body.resize(60_004, 0);
    for rec in body.chunks(16 * 1024) {
        wire.extend_from_slice(&[0x16, 0x03, 0x01]);
        wire.extend_from_slice(&(rec.len() as u16).to_be_bytes());
        wire.extend_from_slice(rec);
    }
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    // The relay may close before all of it is written.
    let _ = tcp.write_all(&wire).await;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await.expect("relay did not close").ok();
    assert!(got.is_empty(), "{got:?}");
    let (mut c, mut a) = relay.pair("s-after-big-hello").await;
    send_bin(&mut c, b"ok").await;
    assert_eq!(recv_bin(&mut a).await, b"ok");
}

async fn handshake_message_fragmented_after_the_handshake_is_refused(io: IoBackend) {
    use rustls::crypto::cipher::{OutboundChunks, OutboundPlainMessage};
    use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion};

    let mut relay = Relay::start(io, |_| {});
    let mut cfg = (*client_config(&relay, &[&rustls::version::TLS13])).clone();
    cfg.enable_secret_extraction = true;
    let mut c = Manual::connect(&relay, Arc::new(cfg), 16 * 1024).await;
    c.upgrade(&relay, "s-hsfrag", Role::Client).await;
    let mut a =
        relay.dial("s-hsfrag", Role::Agent, &relay.token("s-hsfrag", Role::Agent)).await.unwrap();
    c.write(&client_frame(0x82, b"before")).await;
    assert_eq!(recv_bin(&mut a).await, b"before");
    // rustls's client never fragments a KeyUpdate: take its keys and send the first record of
    // one split across two (legal TLS): the message type and half its length. rustls keeps that
    // record to reassemble the message, so the relay refuses the leg. (Both records in one read
    // would be reassembled at once and served.)
    let aead = c.tls.negotiated_cipher_suite().unwrap().tls13().unwrap().aead_alg;
    let Manual { mut tcp, tls, .. } = c;
    let (seq, secrets) = tls.dangerous_extract_secrets().unwrap().tx;
    let (key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key, iv),
        _ => panic!("not a TLS 1.3 suite"),
    };
    let mut enc = aead.encrypter(key, iv);
    let m = OutboundPlainMessage {
        typ: ContentType::Handshake,
        version: ProtocolVersion::TLSv1_2,
        payload: OutboundChunks::Single(&[0x18, 0x00]),
    };
    tcp.write_all(&enc.encrypt(m, seq).unwrap().encode()).await.unwrap();
    // The relay closes the leg (FIN, no alert: the refusal is the relay's, not rustls's).
    let mut rest = Vec::new();
    let r = tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await.expect("leg not closed");
    assert!(r.is_ok(), "{r:?}");
    // Nothing before the FIN: a record rustls could not decrypt would have drawn an alert.
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(recv_close(&mut a).await, 4005);
    assert_eq!(relay.next_end().await.reason, CloseReason::Error);
}
