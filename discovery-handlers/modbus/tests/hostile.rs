//! modbus-tcp against hostile peers: garbage, wrong transaction ids, oversized
//! lengths, wrong unit ids, endless "more follows", a peer that accepts and never
//! answers, and one that hangs up. No panic, no hang, no device from nonsense.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use verge_modbus::ModbusTcp;

#[derive(Clone, Copy, Debug)]
enum Mode {
    Garbage,
    WrongTransaction,
    Oversized,
    WrongUnit,
    Mute,
    HangUp,
    EndlessMoreFollows,
    ShortObject,
}

/// Reads one MBAP request; returns (transaction id, unit, pdu).
async fn read_request(s: &mut TcpStream) -> Option<(u16, u8, Vec<u8>)> {
    let mut hdr = [0u8; 7];
    s.read_exact(&mut hdr).await.ok()?;
    let len = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
    let mut pdu = vec![0u8; len.saturating_sub(1).min(260)];
    s.read_exact(&mut pdu).await.ok()?;
    Some((u16::from_be_bytes([hdr[0], hdr[1]]), hdr[6], pdu))
}

fn frame(tid: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut f = tid.to_be_bytes().to_vec();
    f.extend([0, 0]);
    f.extend(((pdu.len() + 1) as u16).to_be_bytes());
    f.push(unit);
    f.extend(pdu);
    f
}

async fn serve(mode: Mode, mut s: TcpStream) {
    let mut n: u32 = 0;
    loop {
        if matches!(mode, Mode::HangUp) {
            return;
        }
        let Some((tid, unit, pdu)) = read_request(&mut s).await else {
            return;
        };
        n += 1;
        let function = pdu.first().copied().unwrap_or(0);
        let reply: Vec<u8> = match mode {
            Mode::Garbage => (0..40u32)
                .map(|i| (i.wrapping_mul(37).wrapping_add(n)) as u8)
                .collect(),
            Mode::WrongTransaction => frame(
                tid.wrapping_add(1),
                unit,
                &[0x2b, 0x0e, 0x01, 0x83, 0, 0, 1, 0, 1, b'W'],
            ),
            Mode::Oversized => {
                let mut f = tid.to_be_bytes().to_vec();
                f.extend([0, 0, 0xff, 0xff, unit, function]);
                f.extend([0u8; 64]);
                f
            }
            Mode::WrongUnit => frame(
                tid,
                unit.wrapping_add(1),
                &[0x2b, 0x0e, 0x01, 0x83, 0, 0, 1, 0, 1, b'U'],
            ),
            Mode::Mute => continue,
            Mode::HangUp => return,
            Mode::EndlessMoreFollows => {
                // Always "more follows", next object = requested + 1: a scan must stop asking.
                let object = pdu.get(3).copied().unwrap_or(0);
                frame(
                    tid,
                    unit,
                    &[
                        0x2b,
                        0x0e,
                        pdu.get(2).copied().unwrap_or(1),
                        0x83,
                        0xff,
                        object.wrapping_add(1),
                        1,
                        0,
                        4,
                        b'L',
                        b'O',
                        b'O',
                        b'P',
                    ],
                )
            }
            Mode::ShortObject => frame(tid, unit, &[0x2b, 0x0e, 0x01, 0x83, 0, 0, 1, 0, 200, b'x']),
        };
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

async fn hostile(mode: Mode) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(mode, s));
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_neither_crash_nor_hang_nor_make_devices() {
    let modes = [
        Mode::Garbage,
        Mode::WrongTransaction,
        Mode::Oversized,
        Mode::WrongUnit,
        Mode::Mute,
        Mode::HangUp,
        Mode::ShortObject,
    ];
    let mut ports = Vec::new();
    for m in modes {
        ports.push(hostile(m).await);
    }
    let endless = hostile(Mode::EndlessMoreFollows).await;
    ports.push(endless);
    let h = ModbusTcp::default();
    let details = format!(
        "hosts: [127.0.0.1]\nports: {ports:?}\nunitIds: [\"1-3\"]\nrequestTimeoutMillis: 200\nconnectTimeoutMillis: 300\nscanBudgetSeconds: 10\nrescanIntervalSeconds: 1\nprobes: [{{name: any, kind: holdingRegisters, address: 0}}]\n"
    );
    let started = Instant::now();
    let mut stream = discover(&h, &details).await;
    let devices = next(&mut stream, Duration::from_secs(10)).await.devices;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "scan of hostile peers took {took:?}"
    );
    // Only the peer whose frames are valid (if endless) identifies; its loop is cut short.
    for d in &devices {
        assert_eq!(
            prop(d, "MODBUS_PORT"),
            Some(endless.to_string().as_str()),
            "device from a hostile peer: {d:?}"
        );
        assert_eq!(prop(d, "MODBUS_VENDOR"), Some("LOOP"));
    }
    assert_eq!(devices.len(), 3, "{:#?}", ids(&devices));
    println!("hostile scan: {took:?}");
    // A second pass over the same peers finds the same, so nothing is sent.
    let again = tokio::time::timeout(
        Duration::from_millis(2500),
        futures::StreamExt::next(&mut stream),
    )
    .await;
    assert!(again.is_err(), "unchanged list sent again: {again:?}");
}
