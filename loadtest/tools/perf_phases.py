#!/usr/bin/env python3
"""Splits `perf script -F comm,tid,period,ip,sym` samples of the relay into session-setup
phases by the first rule any frame of a sample's stack matches (so kernel time is charged to
the phase that made the system call), per thread group (hatch-control: API, control channels,
store; hatch-data-N: the data plane's shards). Usage: perf_phases.py PERF_SCRIPT.txt
[RELAY_CPU_US_PER_SETUP] -- with the second argument each share is also shown in us per setup.
"""
import collections
import re
import sys

RULES = [
    ("token verify (Ed25519)", r"TokenVerifier::verify|jsonwebtoken::decode|jsonwebtoken::crypto::verify|ed25519::verification"),
    ("token issue (Ed25519)", r"TokenSigner::issue|jsonwebtoken::crypto::sign|jsonwebtoken::encode|Ed25519KeyPair::sign"),
    ("store (SQLite)", r"sqlite3|rusqlite|control::store"),
    ("TLS handshake", r"rustls::server::hs|rustls::server::tls1[23]|ExpectClientHello|ExpectFinished|emit_server_hello|SupportedKxGroup|ring::agreement|x25519|ecdsa|ecp_nistz256|tls13::key_schedule|handshake::MidHandshake|Stream<IO,C>::handshake"),
    ("TLS records, socket writes", r"rustls::|ring_core|aes_gcm|chacha"),
    ("control channel (agent WS)", r"control::agents|agent_connect|ToAgent|tungstenite"),
    ("API HTTP (hyper/axum)", r"hyper::|axum::|control::api|control::http|serde_json"),
    ("data plane (accept, upgrade, pairing)", r"hatch_relay::data"),
    ("runtime, threads, wake-ups", r"tokio::|std::thread|parking_lot|std::sys::"),
]
RULES = [(n, re.compile(p)) for n, p in RULES]


def samples(path):
    comm, frames = None, []
    for line in open(path, errors="replace"):
        if not line.strip() or not line[0].isspace():
            if comm is not None:
                yield comm, frames
            comm, frames = (line.split()[0] if line.strip() else None), []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            frames.append(parts[1])
    if comm is not None:
        yield comm, frames


def main():
    us = float(sys.argv[2]) if len(sys.argv) > 2 else None
    by = collections.Counter()
    total = 0
    for comm, frames in samples(sys.argv[1]):
        text = "\n".join(frames)
        phase = next((n for n, rx in RULES if rx.search(text)), "other")
        group = "control" if comm.startswith("hatch-control") else "data"
        by[(phase, group)] += 1
        total += 1
    print(f"{total} samples")
    for (phase, group), n in by.most_common():
        extra = f"  {n / total * us:6.0f} us per setup" if us else ""
        print(f"  {phase:40s} {group:8s} {n * 100 / total:5.1f} %{extra}")


if __name__ == "__main__":
    main()
