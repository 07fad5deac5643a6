//! A response PDU from a unit → tokio-modbus's decoding → our identity decoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio_modbus::Response;
use tokio_modbus::bytes::Bytes;
use verge_modbus::ident::Identity;

fuzz_target!(|data: &[u8]| {
    let serial = data.first().copied();
    // The PDU as a unit would send it, with the 0x2B/0x0E prefix forced half the time
    // so most inputs reach the object loop.
    let pdu = if serial.is_some_and(|b| b & 1 == 0) {
        let mut p = vec![0x2b, 0x0e];
        p.extend_from_slice(data.get(1..).unwrap_or_default());
        p
    } else {
        data.to_vec()
    };
    if let Ok(Response::ReadDeviceIdentification(r)) = Response::try_from(Bytes::from(pdu)) {
        let mut id = Identity::default();
        id.merge(r.device_id_objects.iter().map(|o| (o.id, o.value.as_ref())), serial);
        let part = id.id_part();
        for v in [&id.vendor, &id.product_code, &id.model, &id.serial] {
            assert!(v.chars().count() <= verge_modbus::ident::MAX_OBJECT_CHARS);
            assert!(!v.chars().any(char::is_control));
        }
        let _ = (part, id.is_empty());
    }
    // Raw object bytes straight into the text decoder.
    let _ = verge_modbus::ident::object_text(data);
});
