//! QMP's key names (QKeyCode, qapi/ui.json) as HID keyboard usages (HID
//! Usage Tables chapter 10).

/// The HID usage of qcode `name`.
pub fn usage(name: &str) -> Option<u8> {
    let b = name.as_bytes();
    // Letters and digits.
    if b.len() == 1 {
        return match b[0] {
            c @ b'a'..=b'z' => Some(0x04 + (c - b'a')),
            b'0' => Some(0x27),
            c @ b'1'..=b'9' => Some(0x1e + (c - b'1')),
            _ => None,
        };
    }
    // F1..F24.
    if let Some(n) = name.strip_prefix('f').and_then(|n| n.parse::<u8>().ok()) {
        return match n {
            1..=12 => Some(0x3a + n - 1),
            13..=24 => Some(0x68 + n - 13),
            _ => None,
        };
    }
    // Keypad digits.
    if let Some(n) = name.strip_prefix("kp_").and_then(|n| n.parse::<u8>().ok()) {
        return match n {
            0 => Some(0x62),
            1..=9 => Some(0x59 + n - 1),
            _ => None,
        };
    }
    Some(match name {
        "ret" => 0x28,
        "esc" => 0x29,
        "backspace" => 0x2a,
        "tab" => 0x2b,
        "spc" => 0x2c,
        "minus" => 0x2d,
        "equal" => 0x2e,
        "bracket_left" => 0x2f,
        "bracket_right" => 0x30,
        "backslash" => 0x31,
        "semicolon" => 0x33,
        "apostrophe" => 0x34,
        "grave_accent" => 0x35,
        "comma" => 0x36,
        "dot" => 0x37,
        "slash" => 0x38,
        "caps_lock" => 0x39,
        "print" | "sysrq" => 0x46,
        "scroll_lock" => 0x47,
        "pause" => 0x48,
        "insert" => 0x49,
        "home" => 0x4a,
        "pgup" => 0x4b,
        "delete" => 0x4c,
        "end" => 0x4d,
        "pgdn" => 0x4e,
        "right" => 0x4f,
        "left" => 0x50,
        "down" => 0x51,
        "up" => 0x52,
        "num_lock" => 0x53,
        "kp_divide" => 0x54,
        "kp_multiply" | "asterisk" => 0x55,
        "kp_subtract" => 0x56,
        "kp_add" => 0x57,
        "kp_enter" => 0x58,
        "kp_decimal" => 0x63,
        "less" => 0x64,
        "menu" | "compose" => 0x65,
        "power" => 0x66,
        "kp_equals" => 0x67,
        "help" => 0x75,
        "stop" => 0x78,
        "again" => 0x79,
        "undo" => 0x7a,
        "cut" => 0x7b,
        "copy" => 0x7c,
        "paste" => 0x7d,
        "find" => 0x7e,
        "audiomute" => 0x7f,
        "volumeup" => 0x80,
        "volumedown" => 0x81,
        "kp_comma" => 0x85,
        "ro" => 0x87,
        "katakanahiragana" | "hiragana" => 0x88,
        "yen" => 0x89,
        "henkan" => 0x8a,
        "muhenkan" => 0x8b,
        "lang1" => 0x90,
        "lang2" => 0x91,
        "ctrl" => 0xe0,
        "shift" => 0xe1,
        "alt" => 0xe2,
        "meta_l" => 0xe3,
        "ctrl_r" => 0xe4,
        "shift_r" => 0xe5,
        "alt_r" => 0xe6,
        "meta_r" => 0xe7,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::usage;

    #[test]
    fn qcodes_map_to_hid_usages() {
        assert_eq!(usage("a"), Some(0x04));
        assert_eq!(usage("z"), Some(0x1d));
        assert_eq!(usage("1"), Some(0x1e));
        assert_eq!(usage("0"), Some(0x27));
        assert_eq!(usage("f1"), Some(0x3a));
        assert_eq!(usage("f12"), Some(0x45));
        assert_eq!(usage("f13"), Some(0x68));
        assert_eq!(usage("kp_0"), Some(0x62));
        assert_eq!(usage("kp_9"), Some(0x61));
        assert_eq!(usage("ctrl"), Some(0xe0));
        assert_eq!(usage("meta_r"), Some(0xe7));
        assert_eq!(usage("delete"), Some(0x4c));
        for bad in ["", "A", "f0", "f25", "kp_10", "shiftt", "ä", "-1"] {
            assert_eq!(usage(bad), None, "{bad:?}");
        }
    }
}
