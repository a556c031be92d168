//! The QMP commands libxl sends for xl's USB configuration
//! (`usbctrl`/`usbdev` in xl.cfg, `xl usbctrl-attach`, `usbdev-attach`,
//! `usbdev-detach`), which the proxy serves instead of QEMU.

use serde_json::Value;

use crate::config::Model;

/// A QMP error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpError {
    /// QEMU's error class (libxl maps some to its own codes).
    pub class: &'static str,
    /// The message xl prints.
    pub desc: String,
}

impl From<crate::mailbox::NoAnswer> for QmpError {
    fn from(_: crate::mailbox::NoAnswer) -> Self {
        QmpError::generic("xen-usb-dm: the controller did not answer")
    }
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self {
            class: "GenericError",
            desc: desc.into(),
        }
    }
}

/// A USB command to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsbCmd {
    /// `device_add` of a USB host controller (`usbctrl`).
    AddController {
        /// libxl's id, `xenusb-<devid>`.
        id: String,
        /// Which controller (from QEMU's driver name).
        model: Model,
        /// xHCI: the ports xl asked for (`p2`/`p3`).
        ports: Option<u32>,
    },
    /// `device_add usb-host` (`usbdev`).
    AddHost {
        /// libxl's id, `xenusb-<hostbus>-<hostaddr>`.
        id: String,
        /// The controller's id (`bus` without its `.0`).
        controller: String,
        /// The port on it xl picked (1-based), if any.
        port: Option<u32>,
        /// Host bus number.
        hostbus: u32,
        /// Host device address.
        hostaddr: u32,
    },
    /// `device_del` of one of our controllers.
    DelController {
        /// Its id.
        id: String,
    },
    /// `device_del` of one of our devices.
    DelDevice {
        /// Its id.
        id: String,
    },
}

/// What the proxy knows of the ids it serves.
pub trait Owned {
    /// `id` names one of our controllers.
    fn owns_controller(&self, id: &str) -> bool;
    /// `id` names one of our devices.
    fn owns_device(&self, id: &str) -> bool;
}

/// QEMU's USB host controller drivers, by the model we serve for them.
pub fn controller_model(driver: &str) -> Option<Model> {
    Some(match driver {
        "nec-usb-xhci" | "qemu-xhci" => Model::Xhci,
        "usb-ehci" | "ich9-usb-ehci1" | "ich9-usb-ehci2" => Model::Ehci,
        "piix3-usb-uhci" | "piix4-usb-uhci" | "vt82c686b-usb-uhci" => Model::Uhci,
        d if d.starts_with("ich9-usb-uhci") => Model::Uhci,
        _ => return None,
    })
}

/// A QMP integer argument, given as a number or a string (`-device` and
/// QMP both accept `"port": "1"`).
fn int_arg(args: &Value, key: &str) -> Result<Option<u32>, QmpError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|v| u32::try_from(v).ok())
            .map(Some)
            .ok_or_else(|| {
                QmpError::generic(format!("Parameter '{key}' expects an unsigned integer"))
            }),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| {
            QmpError::generic(format!("Parameter '{key}' expects an unsigned integer"))
        }),
        Some(_) => Err(QmpError::generic(format!(
            "Parameter '{key}' expects an unsigned integer"
        ))),
    }
}

fn str_arg<'a>(args: &'a Value, key: &str) -> Result<Option<&'a str>, QmpError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(QmpError::generic(format!(
            "Parameter '{key}' expects a string"
        ))),
    }
}

/// Decides whether a QMP command is ours: `None` to forward it to QEMU,
/// else the command to serve or the error to answer.
pub fn classify(msg: &Value, owned: &dyn Owned) -> Option<Result<UsbCmd, QmpError>> {
    let exec = msg.get("execute")?.as_str()?;
    let empty = Value::Object(Default::default());
    let args = msg.get("arguments").unwrap_or(&empty);
    match exec {
        "device_add" => device_add(args, owned),
        "device_del" => {
            let id = args.get("id")?.as_str()?;
            if owned.owns_controller(id) {
                Some(Ok(UsbCmd::DelController { id: id.into() }))
            } else if owned.owns_device(id) {
                Some(Ok(UsbCmd::DelDevice { id: id.into() }))
            } else {
                None
            }
        }
        _ => None,
    }
}

fn device_add(args: &Value, owned: &dyn Owned) -> Option<Result<UsbCmd, QmpError>> {
    let driver = args.get("driver")?.as_str()?;
    let id = args.get("id").and_then(Value::as_str);
    if let Some(model) = controller_model(driver) {
        let Some(id) = id else {
            return Some(Err(QmpError::generic(
                "xen-usb-dm serves USB controllers: device_add needs an \"id\"",
            )));
        };
        if owned.owns_controller(id) || owned.owns_device(id) {
            return Some(Err(QmpError::generic(format!(
                "Duplicate device ID '{id}'"
            ))));
        }
        let ports = match (
            int_arg(args, "p2"),
            int_arg(args, "p3"),
            int_arg(args, "ports"),
        ) {
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Some(Err(e)),
            (Ok(a), Ok(b), Ok(c)) => a.max(b).max(c),
        };
        return Some(Ok(UsbCmd::AddController {
            id: id.into(),
            model,
            ports,
        }));
    }
    // A device: ours if it goes on one of our controllers.
    let bus = args.get("bus").and_then(Value::as_str)?;
    let controller = bus.strip_suffix(".0").unwrap_or(bus);
    if !owned.owns_controller(controller) {
        return None;
    }
    if driver != "usb-host" {
        return Some(Err(QmpError::generic(format!(
            "xen-usb-dm serves {controller}: '{driver}' cannot be added to it over QMP \
             (host devices only: usb-host)"
        ))));
    }
    let Some(id) = id else {
        return Some(Err(QmpError::generic(
            "xen-usb-dm: device_add usb-host needs an \"id\"",
        )));
    };
    if owned.owns_controller(id) || owned.owns_device(id) {
        return Some(Err(QmpError::generic(format!(
            "Duplicate device ID '{id}'"
        ))));
    }
    let parsed = (|| {
        if str_arg(args, "hostport")?.is_some() || str_arg(args, "hostdevice")?.is_some() {
            return Err(QmpError::generic(
                "xen-usb-dm: usb-host is matched by hostbus and hostaddr",
            ));
        }
        let (Some(hostbus), Some(hostaddr)) =
            (int_arg(args, "hostbus")?, int_arg(args, "hostaddr")?)
        else {
            return Err(QmpError::generic(
                "xen-usb-dm: usb-host needs hostbus and hostaddr",
            ));
        };
        Ok(UsbCmd::AddHost {
            id: id.into(),
            controller: controller.into(),
            port: int_arg(args, "port")?,
            hostbus,
            hostaddr,
        })
    })();
    Some(parsed)
}

/// The device numbers QEMU uses on PCI bus 0, from its `query-pci` reply.
pub fn qemu_slots(reply: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    for bus in reply
        .get("return")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if bus.get("bus").and_then(Value::as_u64) != Some(0) {
            continue;
        }
        for d in bus
            .get("devices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(s) = d.get("slot").and_then(Value::as_u64) {
                if s < 32 {
                    out.push(s as u8);
                }
            }
        }
    }
    out
}

/// A free device number on bus 0, from the top (QEMU hands out slots from
/// the bottom when a device is hot-plugged without an address, e.g.
/// libxl's PCI passthrough).
pub fn free_slot(used_by_qemu: &[u8], ours: &[u8]) -> Option<u8> {
    (1..32u8)
        .rev()
        .find(|s| !used_by_qemu.contains(s) && !ours.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Ids;
    impl Owned for Ids {
        fn owns_controller(&self, id: &str) -> bool {
            id == "xenusb-0"
        }
        fn owns_device(&self, id: &str) -> bool {
            id == "xenusb-1-3"
        }
    }

    #[allow(clippy::needless_pass_by_value)]
    fn cmd(v: Value) -> Option<Result<UsbCmd, QmpError>> {
        classify(&v, &Ids)
    }

    #[test]
    fn libxls_usb_commands_are_recognised() {
        // libxl__device_usbctrl_add_hvm, version=3.
        assert_eq!(
            cmd(
                json!({"execute":"device_add","arguments":{"driver":"nec-usb-xhci","id":"xenusb-1","p2":8,"p3":8},"id":7})
            ),
            Some(Ok(UsbCmd::AddController {
                id: "xenusb-1".into(),
                model: Model::Xhci,
                ports: Some(8)
            }))
        );
        assert_eq!(
            cmd(json!({"execute":"device_add","arguments":{"driver":"usb-ehci","id":"xenusb-2"}})),
            Some(Ok(UsbCmd::AddController {
                id: "xenusb-2".into(),
                model: Model::Ehci,
                ports: None
            }))
        );
        assert_eq!(
            cmd(
                json!({"execute":"device_add","arguments":{"driver":"piix3-usb-uhci","id":"xenusb-3"}})
            ),
            Some(Ok(UsbCmd::AddController {
                id: "xenusb-3".into(),
                model: Model::Uhci,
                ports: None
            }))
        );
        // libxl__device_usbdev_add_hvm.
        assert_eq!(
            cmd(
                json!({"execute":"device_add","arguments":{"id":"xenusb-2-5","driver":"usb-host","bus":"xenusb-0.0","port":"1","hostbus":2,"hostaddr":5}})
            ),
            Some(Ok(UsbCmd::AddHost {
                id: "xenusb-2-5".into(),
                controller: "xenusb-0".into(),
                port: Some(1),
                hostbus: 2,
                hostaddr: 5
            }))
        );
        assert_eq!(
            cmd(json!({"execute":"device_del","arguments":{"id":"xenusb-1-3"}})),
            Some(Ok(UsbCmd::DelDevice {
                id: "xenusb-1-3".into()
            }))
        );
        assert_eq!(
            cmd(json!({"execute":"device_del","arguments":{"id":"xenusb-0"}})),
            Some(Ok(UsbCmd::DelController {
                id: "xenusb-0".into()
            }))
        );
    }

    #[test]
    fn everything_else_goes_to_qemu() {
        for v in [
            json!({"execute":"query-status"}),
            json!({"execute":"cont","id":1}),
            json!({"execute":"device_add","arguments":{"driver":"xen-pci-passthrough","id":"pci-pt-03_00.0","hostaddr":"0000:03:00.0"}}),
            json!({"execute":"device_add","arguments":{"driver":"usb-host","bus":"usb.0","hostbus":1,"hostaddr":2}}),
            json!({"execute":"device_del","arguments":{"id":"pci-pt-03_00.0"}}),
            json!({"execute":"device_add"}),
            json!({"execute":5}),
            json!({"foo":"bar"}),
        ] {
            assert_eq!(cmd(v.clone()), None, "{v}");
        }
    }

    #[test]
    fn bad_usb_arguments_are_qmp_errors() {
        for v in [
            json!({"execute":"device_add","arguments":{"driver":"nec-usb-xhci"}}),
            json!({"execute":"device_add","arguments":{"driver":"nec-usb-xhci","id":"xenusb-0"}}),
            json!({"execute":"device_add","arguments":{"driver":"nec-usb-xhci","id":"x","p2":-1}}),
            json!({"execute":"device_add","arguments":{"driver":"nec-usb-xhci","id":"x","p2":"many"}}),
            json!({"execute":"device_add","arguments":{"driver":"usb-host","bus":"xenusb-0.0","id":"d","hostbus":1}}),
            json!({"execute":"device_add","arguments":{"driver":"usb-host","bus":"xenusb-0.0","id":"d","hostbus":1,"hostaddr":[]}}),
            json!({"execute":"device_add","arguments":{"driver":"usb-host","bus":"xenusb-0.0","hostbus":1,"hostaddr":2}}),
            json!({"execute":"device_add","arguments":{"driver":"usb-host","bus":"xenusb-0.0","id":"xenusb-1-3","hostbus":1,"hostaddr":3}}),
            json!({"execute":"device_add","arguments":{"driver":"usb-tablet","bus":"xenusb-0.0","id":"t"}}),
        ] {
            assert!(matches!(cmd(v.clone()), Some(Err(_))), "{v}");
        }
    }

    #[test]
    fn slots_are_taken_from_the_top_around_qemus() {
        let reply = json!({"return":[{"bus":0,"devices":[{"slot":0},{"slot":1},{"slot":2},{"slot":3},{"slot":31}]}]});
        let q = qemu_slots(&reply);
        assert_eq!(q, [0, 1, 2, 3, 31]);
        assert_eq!(free_slot(&q, &[]), Some(30));
        assert_eq!(free_slot(&q, &[30, 29]), Some(28));
        let all: Vec<u8> = (0..32).collect();
        assert_eq!(free_slot(&all, &[]), None);
        assert!(qemu_slots(&json!({"return": "x"})).is_empty());
    }
}
