//! MQTT topic names (docs/PROTOCOL.md), built and parsed in one place.

use crate::ids::{DeviceId, RegionId};

/// Which per-device topic a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic {
    Up,
    Down,
    Presence,
}

impl DeviceTopic {
    fn as_str(self) -> &'static str {
        match self {
            DeviceTopic::Up => "up",
            DeviceTopic::Down => "down",
            DeviceTopic::Presence => "presence",
        }
    }
}

pub fn device(region: &RegionId, device: &DeviceId, which: DeviceTopic) -> String {
    format!("larder/v1/{region}/d/{device}/{}", which.as_str())
}

pub fn catalog(region: &RegionId) -> String {
    format!("larder/v1/{region}/catalog")
}

/// The filter the hub subscribes to for one of its regions' per-device topics.
pub fn region_devices_filter(region: &RegionId, which: DeviceTopic) -> String {
    format!("larder/v1/{region}/d/+/{}", which.as_str())
}

/// The filter for one per-device topic of every region's devices.
pub fn all_devices_filter(which: DeviceTopic) -> String {
    format!("larder/v1/+/d/+/{}", which.as_str())
}

/// Parses `larder/v1/{region}/catalog`: the region whose catalog topic it is.
pub fn parse_catalog(topic: &str) -> Option<RegionId> {
    let region = topic.strip_prefix("larder/v1/")?.strip_suffix("/catalog")?;
    RegionId::new(region).ok()
}

/// Parses `larder/v1/{region}/d/{device}/{up|down|presence}`.
pub fn parse_device(topic: &str) -> Option<(RegionId, DeviceId, DeviceTopic)> {
    let mut parts = topic.split('/');
    let (Some("larder"), Some("v1"), Some(region), Some("d"), Some(device), Some(which), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let which = match which {
        "up" => DeviceTopic::Up,
        "down" => DeviceTopic::Down,
        "presence" => DeviceTopic::Presence,
        _ => return None,
    };
    Some((
        RegionId::new(region).ok()?,
        DeviceId::new(device).ok()?,
        which,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_topics_parse_back_and_nothing_else_does() {
        let r = RegionId::new("north").expect("id");
        assert_eq!(parse_catalog(&catalog(&r)), Some(r.clone()));
        for other in [
            "larder/v1/north/d/pos-1/up",
            "larder/v1/a/b/catalog",
            "larder/v2/north/catalog",
            "larder/v1//catalog",
        ] {
            assert_eq!(parse_catalog(other), None, "{other}");
        }
    }

    #[test]
    fn round_trip_and_rejects() {
        let r = RegionId::new("north").expect("id");
        let d = DeviceId::new("pos-1").expect("id");
        let t = device(&r, &d, DeviceTopic::Up);
        assert_eq!(t, "larder/v1/north/d/pos-1/up");
        assert_eq!(parse_device(&t), Some((r, d, DeviceTopic::Up)));
        for bad in [
            "larder/v1/north/d/pos-1",
            "larder/v1/north/d/pos-1/up/x",
            "larder/v2/north/d/pos-1/up",
            "larder/v1/north/x/pos-1/up",
            "larder/v1/north/d/pos-1/sideways",
            "larder/v1/no rth/d/pos-1/up",
        ] {
            assert_eq!(parse_device(bad), None, "{bad}");
        }
    }
}
