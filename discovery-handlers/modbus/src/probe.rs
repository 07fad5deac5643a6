//! Register probes: reads from settings that classify a unit as a device type.

use serde::Deserialize;

/// Most registers one probe reads (the protocol's limit for function 0x03/0x04).
pub const MAX_PROBE_REGISTERS: u16 = 125;
/// Most coils or discrete inputs one probe reads (the protocol's limit).
pub const MAX_PROBE_BITS: u16 = 2000;
/// Longest probe name (it becomes a property value and a filter item).
pub const MAX_PROBE_NAME: usize = 63;

/// What a probe reads.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum ProbeKind {
    /// Function 0x03.
    HoldingRegisters,
    /// Function 0x04.
    InputRegisters,
    /// Function 0x01.
    Coils,
    /// Function 0x02.
    DiscreteInputs,
}

impl ProbeKind {
    /// Whether values are bits.
    pub fn is_bits(self) -> bool {
        matches!(self, ProbeKind::Coils | ProbeKind::DiscreteInputs)
    }
}

/// A probe as written in discoveryDetails.
#[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProbeSetting {
    /// Device type this probe recognises; becomes `MODBUS_PROBE`.
    pub name: String,
    /// What to read.
    pub kind: ProbeKind,
    /// First address (0-based, as on the wire).
    pub address: u16,
    /// How many registers or bits (default: the length of `expect`, else 1).
    #[serde(default)]
    pub count: Option<u16>,
    /// Expected values (registers: 0–65535; bits: 0 or 1). Absent: any successful read matches.
    #[serde(default)]
    pub expect: Option<Vec<u16>>,
    /// Per-register masks applied to both sides before comparing (registers only).
    #[serde(default)]
    pub mask: Option<Vec<u16>>,
}

/// A validated probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: ProbeKind,
    /// Address.
    pub address: u16,
    /// Count, within the protocol's limits.
    pub count: u16,
    /// Expected values, `count` long or absent.
    pub expect: Option<Vec<u16>>,
    /// Masks, `count` long or absent.
    pub mask: Option<Vec<u16>>,
}

/// Why a probe setting was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// Bad name.
    #[error("probe name {0:?} must be 1 to 63 characters of A-Z a-z 0-9 . _ -")]
    Name(String),
    /// Count out of range.
    #[error("probe {name}: count {count} must be between 1 and {max}")]
    Count {
        /// Probe.
        name: String,
        /// Given.
        count: u16,
        /// Limit.
        max: u16,
    },
    /// Reads past the end of the address space.
    #[error("probe {0}: address + count runs past 65535")]
    Range(String),
    /// expect or mask has the wrong length.
    #[error("probe {name}: {field} has {len} values, count is {count}")]
    Length {
        /// Probe.
        name: String,
        /// `expect` or `mask`.
        field: &'static str,
        /// Given length.
        len: usize,
        /// Count.
        count: u16,
    },
    /// A bit probe expects something other than 0/1, or has a mask.
    #[error("probe {0}: coils and discrete inputs expect 0 or 1 and take no mask")]
    Bits(String),
}

impl TryFrom<ProbeSetting> for Probe {
    type Error = ProbeError;

    fn try_from(s: ProbeSetting) -> Result<Self, ProbeError> {
        let name_ok = !s.name.is_empty()
            && s.name.len() <= MAX_PROBE_NAME
            && s.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !name_ok {
            return Err(ProbeError::Name(s.name));
        }
        let max = if s.kind.is_bits() {
            MAX_PROBE_BITS
        } else {
            MAX_PROBE_REGISTERS
        };
        let count = s.count.unwrap_or_else(|| {
            s.expect
                .as_ref()
                .map(|e| u16::try_from(e.len()).unwrap_or(u16::MAX))
                .unwrap_or(1)
        });
        if count == 0 || count > max {
            return Err(ProbeError::Count {
                name: s.name,
                count,
                max,
            });
        }
        if u32::from(s.address) + u32::from(count) > 65_536 {
            return Err(ProbeError::Range(s.name));
        }
        for (field, values) in [("expect", &s.expect), ("mask", &s.mask)] {
            if let Some(v) = values
                && v.len() != usize::from(count)
            {
                return Err(ProbeError::Length {
                    name: s.name,
                    field,
                    len: v.len(),
                    count,
                });
            }
        }
        if s.kind.is_bits()
            && (s.mask.is_some() || s.expect.as_ref().is_some_and(|e| e.iter().any(|v| *v > 1)))
        {
            return Err(ProbeError::Bits(s.name));
        }
        Ok(Probe {
            name: s.name,
            kind: s.kind,
            address: s.address,
            count,
            expect: s.expect,
            mask: s.mask,
        })
    }
}

/// Values read by a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeValues {
    /// Registers.
    Words(Vec<u16>),
    /// Coils or discrete inputs.
    Bits(Vec<bool>),
}

impl Probe {
    /// Whether a successful read of `values` matches. A device returning a
    /// different number of values than asked for never matches.
    pub fn matches(&self, values: &ProbeValues) -> bool {
        let got: Vec<u16> = match values {
            ProbeValues::Words(w) => w.clone(),
            // Bit reads are padded to whole bytes on the wire; tokio-modbus trims
            // them to the requested count, but a longer answer is tolerated the same way.
            ProbeValues::Bits(b) => b
                .iter()
                .take(usize::from(self.count))
                .map(|v| u16::from(*v))
                .collect(),
        };
        if got.len() != usize::from(self.count) {
            return false;
        }
        let Some(expect) = &self.expect else {
            return true;
        };
        got.iter().zip(expect).enumerate().all(|(i, (g, e))| {
            let m = self
                .mask
                .as_ref()
                .and_then(|m| m.get(i).copied())
                .unwrap_or(u16::MAX);
            g & m == e & m
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(
        kind: ProbeKind,
        expect: Option<Vec<u16>>,
        mask: Option<Vec<u16>>,
    ) -> Result<Probe, ProbeError> {
        Probe::try_from(ProbeSetting {
            name: "meter".into(),
            kind,
            address: 10,
            count: None,
            expect,
            mask,
        })
    }

    #[test]
    fn values_masks_and_lengths() {
        let p = probe(
            ProbeKind::HoldingRegisters,
            Some(vec![0x1234, 0x0050]),
            Some(vec![0xffff, 0x00f0]),
        )
        .expect("valid");
        assert!(p.matches(&ProbeValues::Words(vec![0x1234, 0x1257])));
        assert!(!p.matches(&ProbeValues::Words(vec![0x1234, 0x1267])));
        assert!(!p.matches(&ProbeValues::Words(vec![0x1234])));
        let any = probe(ProbeKind::InputRegisters, None, None).expect("valid");
        assert!(any.matches(&ProbeValues::Words(vec![7])));
        let bits = probe(ProbeKind::Coils, Some(vec![1, 0]), None).expect("valid");
        assert!(bits.matches(&ProbeValues::Bits(vec![true, false, false])));
        assert!(!bits.matches(&ProbeValues::Bits(vec![false, false])));
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            probe(ProbeKind::Coils, Some(vec![2]), None),
            Err(ProbeError::Bits(_))
        ));
        assert!(matches!(
            probe(ProbeKind::HoldingRegisters, Some(vec![1]), Some(vec![1, 2])),
            Err(ProbeError::Length { .. })
        ));
        let too_many = ProbeSetting {
            name: "x".into(),
            kind: ProbeKind::HoldingRegisters,
            address: 0,
            count: Some(126),
            expect: None,
            mask: None,
        };
        assert!(matches!(
            Probe::try_from(too_many),
            Err(ProbeError::Count { .. })
        ));
        let past_end = ProbeSetting {
            name: "x".into(),
            kind: ProbeKind::HoldingRegisters,
            address: 65_535,
            count: Some(2),
            expect: None,
            mask: None,
        };
        assert!(matches!(
            Probe::try_from(past_end),
            Err(ProbeError::Range(_))
        ));
    }
}
