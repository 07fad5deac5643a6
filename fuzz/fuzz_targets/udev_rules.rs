//! Hostile udev rules: `parse_rule` (what `compile_settings` runs on each of a
//! Configuration's `udevRules`) must never panic, and a parsed rule must evaluate
//! on a device without panicking. The whole input also goes through
//! `compile_settings` as discoveryDetails, the handler's entry point.
#![no_main]

use libfuzzer_sys::fuzz_target;
use verge_udev::rules::{DeviceView, parse_rule};

/// A device whose every value is the input's tail, with one parent.
#[derive(Clone)]
struct Echo(String, u8);

impl DeviceView for Echo {
    fn sysname(&self) -> Option<String> {
        Some(self.0.clone())
    }
    fn devpath(&self) -> Option<String> {
        Some(self.0.clone())
    }
    fn subsystem(&self) -> Option<String> {
        Some(self.0.clone())
    }
    fn driver(&self) -> Option<String> {
        None
    }
    fn attribute(&self, _: &str) -> Option<String> {
        Some(self.0.clone())
    }
    fn property(&self, _: &str) -> Option<String> {
        Some(self.0.clone())
    }
    fn tags(&self) -> Vec<String> {
        self.0.split(':').map(str::to_string).collect()
    }
    fn parent(&self) -> Option<Self> {
        (self.1 > 0).then(|| Echo(self.0.clone(), self.1 - 1))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = verge_udev::compile_settings(text);
    let (rule, value) = text.split_once('\n').unwrap_or((text, "video0"));
    if let Ok(r) = parse_rule(rule) {
        let _ = r.matches(&Echo(value.chars().take(256).collect(), 3));
    }
});
