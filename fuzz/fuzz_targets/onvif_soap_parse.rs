//! SOAP responses from a device service, through exactly the code production runs on them:
//! `verge_onvif::camera::describe_with` over a transport that answers every request with the
//! fuzz input, so oxvif's envelope parser, its response lookup and its typed parsers for
//! GetSystemDateAndTime, GetDeviceInformation, GetNetworkInterfaces, GetServices,
//! GetCapabilities, GetProfiles and GetStreamUri (Media1 and Media2) all see it, followed by
//! our MAC choice, URL redaction and clipping. One body answers every call, so an input holding
//! several response elements in its Body walks the whole description. The input is also tried
//! wrapped in an envelope, so mutations start inside the Body instead of at the envelope.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use verge_onvif::camera::{Credentials, MAX_FIELD_LEN, MAX_PROFILES, describe_with};
use verge_onvif::redact::strip_userinfo;
use verge_onvif::transport::Canned;

const HEAD: &str = "<?xml version=\"1.0\"?><s:Envelope xmlns:s=\"http://www.w3.org/2003/05/soap-envelope\" \
    xmlns:tds=\"http://www.onvif.org/ver10/device/wsdl\" xmlns:tt=\"http://www.onvif.org/ver10/schema\" \
    xmlns:trt=\"http://www.onvif.org/ver10/media/wsdl\" xmlns:tr2=\"http://www.onvif.org/ver20/media/wsdl\"><s:Body>";
const TAIL: &str = "</s:Body></s:Envelope>";
const PASSWORD: &str = "fuzz-password";

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fn describe(body: String) {
    let creds = Credentials {
        username: "admin".into(),
        password: PASSWORD.into(),
        source: "username_default/password_default".into(),
    };
    let t = Arc::new(Canned::always(body));
    let result = runtime().block_on(describe_with(
        "http://10.0.0.1/onvif/device_service",
        Some(&creds),
        t.clone(),
        t,
    ));
    if let Ok(d) = result {
        assert!(d.streams.len() <= MAX_PROFILES);
        for s in [&d.manufacturer, &d.model, &d.firmware, &d.serial] {
            assert!(s.chars().count() <= MAX_FIELD_LEN);
        }
        for (token, uri) in &d.streams {
            assert!(token.chars().count() <= MAX_FIELD_LEN);
            // Whatever the camera sent, what would be published holds no credentials.
            assert!(!uri.contains(PASSWORD), "{uri}");
            // Published URIs came out of the url crate's parser without userinfo: parsed
            // again, there is still none to strip.
            if let Ok(again) = strip_userinfo(uri) {
                assert_eq!(&again, uri);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if text.len() > verge_onvif::transport::MAX_SOAP_RESPONSE {
        return;
    }
    describe(text.to_string());
    describe(format!("{HEAD}{text}{TAIL}"));
});
