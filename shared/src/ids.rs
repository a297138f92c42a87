//! Identifier newtypes (region, site, fridge, device, sku, unit, order), validated once at the
//! edge so that every id is safe to put in an MQTT topic, a SQL row and a log line.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Longest identifier accepted anywhere, in bytes.
pub const ID_LEN_MAX: usize = 64;

/// Longest id a device may be enrolled under, in bytes: shorter than other ids, so that the ids
/// a device gives its own orders (`{device}-{n}`, `n` up to 20 digits) stay within
/// [`ID_LEN_MAX`]. Checked at enrollment and in an agent's config ([`DeviceId::check_enrollable`]);
/// ids read back from a store or the wire may be longer, enrolled before the limit.
pub const DEVICE_ID_LEN_MAX: usize = ID_LEN_MAX - 21;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} {value:?} may only contain letters, digits, '.', '_', ':' and '-'")]
    BadCharacter { kind: &'static str, value: String },
}

fn validate(kind: &'static str, max: usize, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if !ok {
        return Err(IdError::BadCharacter {
            kind,
            value: value.chars().take(ID_LEN_MAX).collect(),
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        id_type!($(#[$doc])* $name, $kind, ID_LEN_MAX);
    };
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, $max, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A geo shard served by exactly one hub.
    RegionId, "region id"
);
id_type!(
    /// A physical place with fridges and POS terminals.
    SiteId, "site id"
);
id_type!(
    /// A fridge; also the id of the fridge's ledger.
    FridgeId, "fridge id"
);
id_type!(
    /// An enrolled device (a fridge's agent or a POS agent); its MQTT client id.
    DeviceId, "device id"
);
id_type!(
    /// A catalog item.
    Sku, "sku"
);
id_type!(
    /// One physical meal package (label or RFID).
    UnitId, "unit id"
);
id_type!(
    /// An order (sale or reservation).
    OrderId, "order id"
);

impl DeviceId {
    /// Refuses an id longer than [`DEVICE_ID_LEN_MAX`].
    pub fn check_enrollable(&self) -> Result<(), IdError> {
        if self.0.len() > DEVICE_ID_LEN_MAX {
            return Err(IdError::TooLong {
                kind: "device id",
                max: DEVICE_ID_LEN_MAX,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects_by_table() {
        let cases: &[(&str, bool)] = &[
            ("fridge-1", true),
            ("a.b_c:d-e", true),
            ("", false),
            ("has/slash", false),
            ("plus+", false),
            ("hash#", false),
            ("space here", false),
            ("ünicode", false),
        ];
        for (value, ok) in cases {
            assert_eq!(FridgeId::new(*value).is_ok(), *ok, "{value:?}");
        }
        assert!(matches!(
            DeviceId::new("x".repeat(ID_LEN_MAX + 1)),
            Err(IdError::TooLong { .. })
        ));
        assert!(DeviceId::new("x".repeat(ID_LEN_MAX)).is_ok(), "as stored");
        let enrollable = |n: usize| DeviceId::new("x".repeat(n)).map(|d| d.check_enrollable());
        assert_eq!(enrollable(DEVICE_ID_LEN_MAX), Ok(Ok(())));
        assert_eq!(
            enrollable(DEVICE_ID_LEN_MAX + 1),
            Ok(Err(IdError::TooLong {
                kind: "device id",
                max: DEVICE_ID_LEN_MAX
            }))
        );
        // A device's longest id still numbers its orders up to u64::MAX.
        let device = "x".repeat(DEVICE_ID_LEN_MAX);
        assert!(OrderId::new(format!("{device}-{}", u64::MAX)).is_ok());
        assert!(FridgeId::new("x".repeat(ID_LEN_MAX)).is_ok());
    }

    #[test]
    fn deserialize_validates() {
        let bad: Result<Sku, _> = serde_json::from_str("\"a/b\"");
        assert!(bad.is_err());
        let good: Sku = serde_json::from_str("\"lasagna-lf\"").expect("valid sku");
        assert_eq!(good.as_str(), "lasagna-lf");
    }
}
