//! Asking one unit who it is: identification, then probes.

use std::future::Future;
use std::time::Duration;

use tokio_modbus::client::{Context, Reader};
use tokio_modbus::prelude::{
    ConformityLevel, ExceptionCode, ReadCode, ReadDeviceIdentificationResponse, Slave, SlaveContext,
};

use crate::ident::{Identity, OBJ_VENDOR_URL};
use crate::probe::{Probe, ProbeKind, ProbeValues};
use crate::settings::Common;

/// Most continuation requests ("more follows") per identification read: a
/// hostile unit could otherwise keep a scan busy forever.
pub const MAX_IDENT_CONTINUATIONS: usize = 8;

/// What one unit turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Identification objects, when the unit answered 0x2B/0x0E.
    pub identity: Option<Identity>,
    /// Names of the probes that matched, in settings order.
    pub matched: Vec<String>,
}

/// The result of one request.
#[derive(Debug)]
pub enum Call<T> {
    /// A normal response.
    Ok(T),
    /// An exception response.
    Exception(ExceptionCode),
    /// No answer within the timeout.
    Silent,
    /// The link failed or answered nonsense (garbage, wrong transaction id, wrong unit).
    Broken(String),
}

/// Runs one request under `timeout`.
pub async fn call<T>(
    timeout: Duration,
    request: impl Future<Output = tokio_modbus::Result<T>>,
) -> Call<T> {
    match tokio::time::timeout(timeout, request).await {
        Err(_) => Call::Silent,
        Ok(Err(e)) => Call::Broken(e.to_string()),
        Ok(Ok(Err(code))) => Call::Exception(code),
        Ok(Ok(Ok(v))) => Call::Ok(v),
    }
}

/// Whether an exception says "nobody is there": a gateway could not reach the unit.
pub fn means_absent(code: ExceptionCode) -> bool {
    matches!(
        code,
        ExceptionCode::GatewayPathUnavailable | ExceptionCode::GatewayTargetDevice
    )
}

/// The outcome of asking a unit, and whether the link is still usable.
#[derive(Debug)]
pub struct Asked {
    /// `None`: no unit, or a unit that is not a device (no identification, no probe matched).
    pub found: Option<Found>,
    /// Whether the unit exists at all (it answered something).
    pub present: bool,
    /// False after a timeout or a broken answer: TCP callers reconnect, so a late
    /// reply cannot be taken for the next request's.
    pub link_ok: bool,
}

/// Reads one identification stream (basic or regular), following "more follows"
/// a bounded number of times.
async fn read_identification(
    ctx: &mut Context,
    code: ReadCode,
    first_object: u8,
    timeout: Duration,
    serial_id: Option<u8>,
    identity: &mut Identity,
) -> Call<ConformityLevel> {
    let mut object = first_object;
    let mut level = None;
    for _ in 0..MAX_IDENT_CONTINUATIONS {
        let response: ReadDeviceIdentificationResponse =
            match call(timeout, ctx.read_device_identification(code, object)).await {
                Call::Ok(r) => r,
                Call::Exception(e) => return Call::Exception(e),
                Call::Silent => return Call::Silent,
                Call::Broken(e) => return Call::Broken(e),
            };
        identity.merge(
            response
                .device_id_objects
                .iter()
                .map(|o| (o.id, o.value.as_ref())),
            serial_id,
        );
        level.get_or_insert(response.conformity_level);
        // Continue only forwards, so a unit repeating itself cannot loop us.
        if !response.more_follows || response.next_object_id <= object {
            break;
        }
        object = response.next_object_id;
    }
    match level {
        Some(l) => Call::Ok(l),
        None => Call::Broken("no identification response".into()),
    }
}

async fn read_probe(ctx: &mut Context, probe: &Probe, timeout: Duration) -> Call<ProbeValues> {
    let (a, n) = (probe.address, probe.count);
    let words = |c: Call<Vec<u16>>| match c {
        Call::Ok(v) => Call::Ok(ProbeValues::Words(v)),
        Call::Exception(e) => Call::Exception(e),
        Call::Silent => Call::Silent,
        Call::Broken(e) => Call::Broken(e),
    };
    let bits = |c: Call<Vec<bool>>| match c {
        Call::Ok(v) => Call::Ok(ProbeValues::Bits(v)),
        Call::Exception(e) => Call::Exception(e),
        Call::Silent => Call::Silent,
        Call::Broken(e) => Call::Broken(e),
    };
    match probe.kind {
        ProbeKind::HoldingRegisters => words(call(timeout, ctx.read_holding_registers(a, n)).await),
        ProbeKind::InputRegisters => words(call(timeout, ctx.read_input_registers(a, n)).await),
        ProbeKind::Coils => bits(call(timeout, ctx.read_coils(a, n)).await),
        ProbeKind::DiscreteInputs => bits(call(timeout, ctx.read_discrete_inputs(a, n)).await),
    }
}

fn regular_supported(level: ConformityLevel) -> bool {
    !matches!(
        level,
        ConformityLevel::BasicIdentification | ConformityLevel::BasicIdentificationStreamOnly
    )
}

/// Asks `unit` on `ctx`: identification (when enabled), then every probe.
/// `gap` is waited after each request (RTU inter-frame time; zero on TCP).
pub async fn ask(ctx: &mut Context, unit: u8, common: &Common, gap: Duration) -> Asked {
    ctx.set_slave(Slave(unit));
    let timeout = common.request_timeout;
    let ident = &common.identification;
    let mut identity = None;
    let mut present = false;
    let mut link_ok = true;
    let absent = |link_ok| Asked {
        found: None,
        present: false,
        link_ok,
    };

    if ident.enabled {
        let mut id = Identity::default();
        let basic = read_identification(
            ctx,
            ReadCode::Basic,
            0,
            timeout,
            ident.serial_object_id,
            &mut id,
        )
        .await;
        tokio::time::sleep(gap).await;
        match basic {
            Call::Ok(level) => {
                present = true;
                if ident.regular && regular_supported(level) {
                    let regular = read_identification(
                        ctx,
                        ReadCode::Regular,
                        OBJ_VENDOR_URL,
                        timeout,
                        ident.serial_object_id,
                        &mut id,
                    )
                    .await;
                    tokio::time::sleep(gap).await;
                    // The unit identified itself already; a failing regular read only costs the extras.
                    match regular {
                        Call::Silent | Call::Broken(_) => link_ok = false,
                        Call::Ok(_) | Call::Exception(_) => {}
                    }
                }
                if let Some(serial) = ident.serial_object_id
                    && link_ok
                    && id.serial.is_empty()
                {
                    let r = read_identification(
                        ctx,
                        ReadCode::Specific,
                        serial,
                        timeout,
                        Some(serial),
                        &mut id,
                    )
                    .await;
                    tokio::time::sleep(gap).await;
                    if matches!(r, Call::Silent | Call::Broken(_)) {
                        link_ok = false;
                    }
                }
                identity = Some(id);
            }
            Call::Exception(code) if means_absent(code) => return absent(true),
            // 0x01–0x04 and the rest: a unit is there, without identification.
            Call::Exception(code) => {
                tracing::debug!(unit, ?code, "unit answers identification with an exception");
                present = true;
            }
            Call::Silent => return absent(false),
            Call::Broken(e) => {
                tracing::debug!(unit, error = %e, "identification answer unusable");
                return absent(false);
            }
        }
    }

    let mut matched = Vec::new();
    if link_ok {
        for probe in &common.probes {
            let r = read_probe(ctx, probe, timeout).await;
            tokio::time::sleep(gap).await;
            match r {
                Call::Ok(values) => {
                    present = true;
                    if probe.matches(&values) {
                        matched.push(probe.name.clone());
                    }
                }
                Call::Exception(code) if means_absent(code) && !present => return absent(true),
                Call::Exception(_) => present = true,
                Call::Silent | Call::Broken(_) => {
                    link_ok = false;
                    if !present {
                        return absent(false);
                    }
                    break;
                }
            }
        }
    }
    let found = (identity.is_some() || !matched.is_empty()).then_some(Found { identity, matched });
    Asked {
        found,
        present,
        link_ok,
    }
}
