//! Fuzzes what a malicious USB device controls on the passthrough side:
//! the descriptor blob usbfs hands over (`passthrough::descriptors`: parse,
//! then every query and the SuperSpeed-to-high-speed rewrite), the USB
//! core's descriptor parsers on the same bytes, and the sysfs strings the
//! device selection reads (`passthrough::rule`: speed, port paths, match
//! rules, a whole fake sysfs tree now and then).
//!
//! Input: byte 0 picks raw mode (the rest is the blob) or structured mode
//! (a device descriptor and up to 4 configurations whose headers have
//! wTotalLength fixed to the fuzzed body, so parsing gets past the
//! framing); sysfs strings come from the tail.
#![no_main]

use hcd_emul::usb::descriptor::{parse_config, parse_string, DeviceDescriptor};
use hcd_emul_fuzz::run_small_stack;
use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use passthrough::descriptors::{dt, HostDescriptors};
use passthrough::rule::{find, scan, speed_from_sysfs};
use passthrough::{HostDeviceInfo, MatchRule};

/// A device descriptor and configurations in usbfs order.
fn structured(u: &mut Unstructured) -> AResult<Vec<u8>> {
    let mut b = vec![18u8, dt::DEVICE];
    b.extend_from_slice(u.bytes(15)?);
    let n = u.int_in_range(0u8..=4)?;
    b.push(if u.ratio(15u8, 16)? {
        n
    } else {
        u.arbitrary()?
    });
    for _ in 0..n {
        let mut body = Vec::new();
        for _ in 0..u.int_in_range(0usize..=12)? {
            // One descriptor: length, type (mostly a known one), payload.
            let any: u8 = u.arbitrary()?;
            let ty = *u.choose(&[
                dt::INTERFACE,
                dt::ENDPOINT,
                dt::ENDPOINT,
                dt::SS_EP_COMPANION,
                dt::SSP_ISO_COMPANION,
                dt::CONFIG,
                0x21,
                0x24,
                any,
            ])?;
            let len = match ty {
                dt::INTERFACE => 9,
                dt::ENDPOINT => 7,
                dt::SS_EP_COMPANION => 6,
                dt::SSP_ISO_COMPANION => 8,
                _ => u.int_in_range(0u8..=16)?,
            };
            let len = if u.ratio(7u8, 8)? {
                len
            } else {
                u.arbitrary()?
            };
            body.push(len);
            body.push(ty);
            let want = usize::from(len).saturating_sub(2);
            body.extend_from_slice(u.bytes(want.min(u.len()))?);
        }
        let mut hdr = vec![9u8, dt::CONFIG, 0, 0];
        hdr.extend_from_slice(u.bytes(5)?);
        let total = if u.ratio(15u8, 16)? {
            (9 + body.len()) as u16
        } else {
            u.arbitrary()?
        };
        hdr[2..4].copy_from_slice(&total.to_le_bytes());
        if u.ratio(1u8, 16)? {
            hdr[0] = u.arbitrary()?;
        }
        b.extend_from_slice(&hdr);
        b.extend_from_slice(&body);
    }
    Ok(b)
}

fn exercise(d: &HostDescriptors, extra: u8) {
    let _ = (d.vendor(), d.product());
    let mut values: Vec<u8> = d.configs.iter().filter_map(|c| c.get(5).copied()).collect();
    values.push(extra);
    for v in values {
        if let Some(c) = d.config(v) {
            let _ = parse_config(c);
        }
        let _ = d.interfaces(v);
    }
    let _ = d.endpoints();
    let _ = d.high_speed_compatible();
    let hs = d.as_high_speed();
    assert_eq!(hs.configs.len(), d.configs.len());
    assert_eq!(hs.device.len(), 18);
    for c in &hs.configs {
        if c.len() >= 4 {
            assert_eq!(
                usize::from(u16::from_le_bytes([c[2], c[3]])),
                c.len().min(0xffff)
            );
        }
    }
    let _ = hs.endpoints();
    let _ = hs.high_speed_compatible();
    for i in 0..=d.configs.len() as u8 {
        let _ = hs.answer(dt::CONFIG, i);
        let _ = d.answer(dt::CONFIG, i);
    }
    assert_eq!(d.answer(dt::DEVICE, 0), Some(&d.device[..]));
    let _ = d.answer(extra, extra);
    let _ = DeviceDescriptor::parse(&d.device);
}

fn text(u: &mut Unstructured) -> String {
    let n = u.int_in_range(0usize..=24).unwrap_or(0);
    let b = u.bytes(n.min(u.len())).unwrap_or(&[]);
    String::from_utf8_lossy(b).into_owned()
}

/// A fake `/sys/bus/usb/devices` with one device whose attributes come
/// from the input.
fn sysfs(u: &mut Unstructured, rule: &MatchRule) {
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    let name = match u.int_in_range(0u8..=3).unwrap_or(0) {
        0 => "usb1".to_string(),
        1 => "1-1:1.0".to_string(),
        _ => text(u).replace(['/', '\0'], "_"),
    };
    let dev = dir
        .path()
        .join(if name.is_empty() || name == "." || name == ".." {
            "1-1".to_string()
        } else {
            name
        });
    if std::fs::create_dir(&dev).is_err() {
        return;
    }
    for attr in [
        "busnum",
        "devnum",
        "idVendor",
        "idProduct",
        "serial",
        "speed",
    ] {
        if u.ratio(7u8, 8).unwrap_or(true) {
            let _ = std::fs::write(dev.join(attr), text(u));
        }
    }
    let _ = scan(dir.path());
    let _ = find(dir.path(), rule);
}

fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut u = Unstructured::new(rest);
    let blob = if mode & 1 == 0 {
        // Raw: the first up-to-4 KiB is the blob.
        let n = rest.len().min(4096) / 2;
        let b = rest[..n].to_vec();
        u = Unstructured::new(&rest[n..]);
        b
    } else {
        match structured(&mut u) {
            Ok(b) => b,
            Err(_) => return,
        }
    };
    let extra = u.arbitrary::<u8>().unwrap_or(0);
    if let Ok(d) = HostDescriptors::parse(&blob) {
        exercise(&d, extra);
    }
    let _ = DeviceDescriptor::parse(&blob);
    let _ = parse_config(&blob);
    let _ = parse_string(&blob);

    // Sysfs strings and rules.
    let speed = text(&mut u);
    let _ = speed_from_sysfs(&speed);
    let port = text(&mut u);
    let rules = [
        MatchRule::Port(port.clone()),
        MatchRule::BusAddr {
            bus: u.arbitrary().unwrap_or(1),
            addr: u.arbitrary().unwrap_or(1),
        },
        MatchRule::Id {
            vendor: u.arbitrary().unwrap_or(0),
            product: u.arbitrary().unwrap_or(0),
            serial: u.arbitrary::<bool>().unwrap_or(false).then(|| text(&mut u)),
        },
    ];
    let info = HostDeviceInfo {
        bus: u.arbitrary().unwrap_or(1),
        addr: u.arbitrary().unwrap_or(1),
        port: text(&mut u),
        vendor: u.arbitrary().unwrap_or(0),
        product: u.arbitrary().unwrap_or(0),
        serial: u.arbitrary::<bool>().unwrap_or(false).then(|| text(&mut u)),
        speed: speed_from_sysfs(&speed),
    };
    for r in &rules {
        let _ = r.validate();
        let _ = r.to_string();
        let _ = r.matches(&info);
    }
    if mode & 0xe0 == 0xe0 {
        sysfs(&mut u, &rules[mode as usize % 3]);
    }
}

fuzz_target!(|data: &[u8]| {
    run_small_stack(data, run);
});
