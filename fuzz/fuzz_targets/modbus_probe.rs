//! Probe validation and evaluation on arbitrary settings and values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_modbus::probe::{Probe, ProbeKind, ProbeSetting, ProbeValues};

fn words(d: &[u8]) -> Vec<u16> {
    d.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])).collect()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let kind = match data[0] % 4 {
        0 => ProbeKind::HoldingRegisters,
        1 => ProbeKind::InputRegisters,
        2 => ProbeKind::Coils,
        _ => ProbeKind::DiscreteInputs,
    };
    let address = u16::from_be_bytes([data[1], data[2]]);
    let count = (data[3] & 1 == 1).then(|| u16::from(data[4]));
    let rest = &data[6..];
    let split = usize::from(data[5]).min(rest.len());
    let (a, b) = rest.split_at(split);
    let half = a.len() / 2;
    let setting = ProbeSetting {
        name: "fuzz".into(),
        kind,
        address,
        count,
        expect: (data[3] & 2 == 2).then(|| words(&a[..half])),
        mask: (data[3] & 4 == 4).then(|| words(&a[half..])),
    };
    if let Ok(p) = Probe::try_from(setting) {
        assert!(p.count >= 1 && u32::from(p.address) + u32::from(p.count) <= 65_536);
        let _ = p.matches(&ProbeValues::Words(words(b)));
        let _ = p.matches(&ProbeValues::Bits(b.iter().map(|x| x & 1 == 1).collect()));
    }
});
