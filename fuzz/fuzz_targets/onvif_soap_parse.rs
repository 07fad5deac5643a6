//! SOAP responses from a device service, through the parsing the handler relies on (oxvif's
//! envelope parser and response lookup for every call the handler makes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use oxvif::soap::{find_response, parse_soap_body};

const RESPONSES: [&str; 8] = [
    "GetSystemDateAndTimeResponse",
    "GetDeviceInformationResponse",
    "GetNetworkInterfacesResponse",
    "GetServicesResponse",
    "GetCapabilitiesResponse",
    "GetProfilesResponse",
    "GetStreamUriResponse",
    "Fault",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if text.len() > verge_onvif::transport::MAX_SOAP_RESPONSE {
        return;
    }
    if let Ok(body) = parse_soap_body(text) {
        for r in RESPONSES {
            let _ = find_response(&body, r);
        }
    }
});
