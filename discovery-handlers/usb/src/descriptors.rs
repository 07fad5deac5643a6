//! USB descriptors as the kernel exposes them in a device's sysfs `descriptors`
//! file: the 18-byte device descriptor, then each configuration descriptor with
//! its interface, endpoint and class-specific descriptors (`wTotalLength` bytes
//! each). The device wrote these bytes, so every length in them is checked before
//! it is used, and a broken configuration keeps what was read before it.

/// Length of a device descriptor.
pub const DEVICE_DESCRIPTOR_LEN: usize = 18;
/// Length of a configuration descriptor's own header.
const CONFIGURATION_HEADER_LEN: usize = 9;
/// Length of an interface descriptor.
const INTERFACE_DESCRIPTOR_LEN: usize = 9;
/// Most configurations the kernel keeps (`USB_MAXCONFIG`).
pub const MAX_CONFIGURATIONS: usize = 8;
/// Most bytes the sysfs file can hold: the device descriptor and eight
/// configurations of at most 65535 bytes each. Reads stop here.
pub const MAX_DESCRIPTORS_LEN: usize = DEVICE_DESCRIPTOR_LEN + MAX_CONFIGURATIONS * 0xffff;
/// Most interface descriptors (alternate settings included) kept per configuration;
/// real devices have a few dozen, and the list ends up in every rule evaluation.
pub const MAX_INTERFACES: usize = 256;

const TYPE_DEVICE: u8 = 0x01;
const TYPE_CONFIGURATION: u8 = 0x02;
const TYPE_INTERFACE: u8 = 0x04;

/// The fields of a device descriptor that discovery uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceDescriptor {
    /// idVendor.
    pub vendor_id: u16,
    /// idProduct.
    pub product_id: u16,
    /// bDeviceClass, bDeviceSubClass, bDeviceProtocol.
    pub class: (u8, u8, u8),
    /// bNumConfigurations.
    pub num_configurations: u8,
}

/// One interface descriptor (one alternate setting of an interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterfaceDescriptor {
    /// bInterfaceNumber.
    pub number: u8,
    /// bAlternateSetting.
    pub alternate: u8,
    /// bInterfaceClass, bInterfaceSubClass, bInterfaceProtocol.
    pub class: (u8, u8, u8),
}

/// One configuration and its interface descriptors, in the order the device gave them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configuration {
    /// bConfigurationValue.
    pub value: u8,
    /// Interface descriptors, every alternate setting.
    pub interfaces: Vec<InterfaceDescriptor>,
}

/// What was read from a `descriptors` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptors {
    /// The device descriptor.
    pub device: DeviceDescriptor,
    /// The configurations read in full or in part.
    pub configurations: Vec<Configuration>,
    /// Why reading stopped early, if it did; what came before it is kept.
    pub problem: Option<DescriptorError>,
}

/// Why (part of) a `descriptors` file was unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DescriptorError {
    /// Fewer bytes than a device descriptor.
    #[error("{0} bytes, fewer than the 18 of a device descriptor")]
    ShortDevice(usize),
    /// The first descriptor is not a device descriptor.
    #[error(
        "the first descriptor has bLength {length} and bDescriptorType {kind:#04x}, not a device descriptor"
    )]
    NotDevice {
        /// bLength.
        length: u8,
        /// bDescriptorType.
        kind: u8,
    },
    /// A configuration descriptor is broken.
    #[error("configuration descriptor {index} at byte {offset}: {reason}")]
    Configuration {
        /// Which one, from 0.
        index: usize,
        /// Where it starts in the file.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// More data than the kernel can write there.
    #[error("more than {MAX_DESCRIPTORS_LEN} bytes")]
    TooLong,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Parses a `descriptors` file. Only a missing or broken device descriptor is an
/// error; a broken configuration ends the list and is reported in `problem`.
pub fn parse(bytes: &[u8]) -> Result<Descriptors, DescriptorError> {
    if bytes.len() > MAX_DESCRIPTORS_LEN {
        return Err(DescriptorError::TooLong);
    }
    let Some(dev) = bytes.get(..DEVICE_DESCRIPTOR_LEN) else {
        return Err(DescriptorError::ShortDevice(bytes.len()));
    };
    if usize::from(dev[0]) != DEVICE_DESCRIPTOR_LEN || dev[1] != TYPE_DEVICE {
        return Err(DescriptorError::NotDevice {
            length: dev[0],
            kind: dev[1],
        });
    }
    let device = DeviceDescriptor {
        vendor_id: u16::from_le_bytes([dev[8], dev[9]]),
        product_id: u16::from_le_bytes([dev[10], dev[11]]),
        class: (dev[4], dev[5], dev[6]),
        num_configurations: dev[17],
    };
    let mut configurations = Vec::new();
    let mut problem = None;
    let mut offset = DEVICE_DESCRIPTOR_LEN;
    while offset < bytes.len() && configurations.len() < MAX_CONFIGURATIONS {
        let index = configurations.len();
        let fail = |reason| DescriptorError::Configuration {
            index,
            offset,
            reason,
        };
        let rest = &bytes[offset..];
        let (Some(&length), Some(&kind), Some(total), Some(&value)) =
            (rest.first(), rest.get(1), u16_at(rest, 2), rest.get(5))
        else {
            problem = Some(fail("truncated header"));
            break;
        };
        if usize::from(length) < CONFIGURATION_HEADER_LEN || kind != TYPE_CONFIGURATION {
            problem = Some(fail("not a configuration descriptor"));
            break;
        }
        let total = usize::from(total);
        if total < usize::from(length) {
            problem = Some(fail("wTotalLength is shorter than the descriptor"));
            break;
        }
        // A short read keeps the interfaces that arrived whole.
        let body = match rest.get(..total) {
            Some(b) => b,
            None => {
                problem = Some(fail("wTotalLength runs past the end of the data"));
                rest
            }
        };
        let mut interfaces = Vec::new();
        let mut at = usize::from(length);
        while let (Some(&len), Some(&kind)) = (body.get(at), body.get(at + 1)) {
            // bLength 0 or 1 would never advance: the rest is unreadable.
            if len < 2 {
                problem.get_or_insert(fail("a descriptor inside has bLength below 2"));
                break;
            }
            if kind == TYPE_INTERFACE && usize::from(len) >= INTERFACE_DESCRIPTOR_LEN {
                let Some(i) = body.get(at..at + INTERFACE_DESCRIPTOR_LEN) else {
                    break;
                };
                if interfaces.len() == MAX_INTERFACES {
                    problem.get_or_insert(fail("more than 256 interface descriptors"));
                    break;
                }
                interfaces.push(InterfaceDescriptor {
                    number: i[2],
                    alternate: i[3],
                    class: (i[5], i[6], i[7]),
                });
            }
            at += usize::from(len);
        }
        configurations.push(Configuration { value, interfaces });
        if problem.is_some() {
            break;
        }
        offset += total;
    }
    Ok(Descriptors {
        device,
        configurations,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// The Arduino of tests/peers/usb/hub.umockdev: two interfaces.
    const ARDUINO: &str = "12010002020000404123430001000102030109021B00020100803209040000000202010009040100000A000000";

    #[test]
    fn a_real_device() {
        let d = parse(&hex(ARDUINO)).expect("parses");
        assert_eq!(d.device.vendor_id, 0x2341);
        assert_eq!(d.device.product_id, 0x0043);
        assert_eq!(d.device.class, (2, 0, 0));
        assert_eq!(d.problem, None);
        assert_eq!(d.configurations.len(), 1);
        assert_eq!(d.configurations[0].value, 1);
        let classes: Vec<_> = d.configurations[0]
            .interfaces
            .iter()
            .map(|i| (i.number, i.class))
            .collect();
        assert_eq!(classes, [(0, (2, 2, 1)), (1, (0x0a, 0, 0))]);
    }

    #[test]
    fn broken_data_keeps_what_came_before() {
        let full = hex(ARDUINO);
        assert_eq!(parse(&full[..10]), Err(DescriptorError::ShortDevice(10)));
        assert!(matches!(
            parse(&hex("DEADBEEF00000000000000000000000000000000")),
            Err(DescriptorError::NotDevice { length: 0xde, .. })
        ));
        // Cut inside the second interface: the device and the first interface stay.
        let cut = parse(&full[..18 + 9 + 9 + 5]).expect("device descriptor");
        assert_eq!(cut.device.vendor_id, 0x2341);
        assert_eq!(cut.configurations[0].interfaces.len(), 1);
        assert!(matches!(
            cut.problem,
            Some(DescriptorError::Configuration { index: 0, .. })
        ));
        // A zero bLength inside a configuration must not loop.
        let mut zero = full.clone();
        zero[18 + 9] = 0;
        let z = parse(&zero).expect("device descriptor");
        assert!(z.configurations[0].interfaces.is_empty());
        assert!(z.problem.is_some());
        // Garbage after the device descriptor: no configuration, said so.
        let mut garbage = full[..18].to_vec();
        garbage.extend_from_slice(b"garbage!!");
        let g = parse(&garbage).expect("device descriptor");
        assert!(g.configurations.is_empty());
        assert!(g.problem.is_some());
        assert_eq!(
            parse(&vec![0; MAX_DESCRIPTORS_LEN + 1]),
            Err(DescriptorError::TooLong)
        );
    }
}
