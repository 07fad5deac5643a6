//! A Modbus TCP peer that answers with the fuzz input as its byte stream:
//! tokio-modbus's MBAP framing plus our identification loop and probes. Time is
//! paused, so a peer that stops talking costs no wall time.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use verge_modbus::probe::{Probe, ProbeKind, ProbeSetting};
use verge_modbus::settings::{Common, Filters, IdentificationSettings};

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build() else {
        return;
    };
    let data = data.to_vec();
    rt.block_on(async move {
        let (client, mut server) = tokio::io::duplex(8192);
        let peer = tokio::spawn(async move {
            let _ = server.write_all(&data).await;
            let mut sink = [0u8; 512];
            while matches!(server.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        let probe = |kind, expect: Option<Vec<u16>>| {
            Probe::try_from(ProbeSetting { name: "p".into(), kind, address: 0, count: Some(2), expect, mask: None })
                .expect("valid probe")
        };
        let common = Common {
            unit_ids: vec![1],
            request_timeout: Duration::from_millis(100),
            scan_budget: Duration::from_secs(1),
            rescan_interval: Duration::from_secs(1),
            concurrency: 1,
            identification: IdentificationSettings { enabled: true, regular: true, serial_object_id: Some(0x80) },
            probes: vec![probe(ProbeKind::HoldingRegisters, Some(vec![1, 2])), probe(ProbeKind::Coils, None)],
            filters: Filters::default(),
        };
        let mut ctx = tokio_modbus::client::tcp::attach(client);
        let asked = tokio::time::timeout(Duration::from_secs(10), verge_modbus::unit::ask(&mut ctx, 1, &common, Duration::ZERO)).await;
        assert!(asked.is_ok(), "ask did not finish in bounded time");
        drop(ctx);
        peer.abort();
    });
});
