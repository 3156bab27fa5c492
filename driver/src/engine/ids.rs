//! Stable identifiers. Volumes, snapshots, layers and layer families are
//! named by random 128-bit UUIDs that never change and are never reused, so
//! records, files and (later) cluster objects can refer to them safely.

use std::fmt;
use std::str::FromStr;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub(crate) u128);

        impl $name {
            /// A new random identifier.
            pub fn new_random() -> Self {
                Self(uuid::Uuid::new_v4().as_u128())
            }

            /// The identifier as a `u128` (its on-disk form).
            pub fn as_u128(self) -> u128 {
                self.0
            }

            /// Rebuilds an identifier from its on-disk form.
            pub fn from_u128(v: u128) -> Self {
                Self(v)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&uuid::Uuid::from_u128(self.0).hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({self})", stringify!($name))
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(s: &str) -> Result<Self, InvalidId> {
                uuid::Uuid::parse_str(s)
                    .map(|u| Self(u.as_u128()))
                    .map_err(|_| InvalidId(s.to_string()))
            }
        }
    };
}

uuid_id!(
    /// A volume: a writable chain of layers.
    VolumeId
);
uuid_id!(
    /// A snapshot: a frozen layer and everything under it.
    SnapshotId
);
uuid_id!(
    /// A layer: one data file plus its presence map.
    LayerId
);
uuid_id!(
    /// A family: the tree of layers that share index slots (a volume, its
    /// snapshots, its clones and their descendants).
    FamilyId
);

uuid_id!(
    /// A background job (merge, flatten).
    JobId
);

/// A string that is not a UUID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid ID (expected a UUID such as 4f9c0a7e-1b2d-4c3e-9f00-0123456789ab)")]
pub struct InvalidId(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_round_trips_through_display_and_parse() {
        let id = VolumeId::new_random();
        let parsed: VolumeId = id.to_string().parse().expect("parses");
        assert_eq!(parsed, id);
    }

    #[test]
    fn garbage_is_not_an_id() {
        assert!("not-a-uuid".parse::<SnapshotId>().is_err());
    }
}
