//! Ethernet addresses.

use std::fmt;
use std::str::FromStr;

/// An Ethernet (EUI-48) address. Written and serialized as six
/// colon-separated pairs of hex digits (`52:54:00:12:34:56`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// ff:ff:ff:ff:ff:ff.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);
    /// 00:00:00:00:00:00, the unknown target of an ARP request.
    pub const ZERO: MacAddr = MacAddr([0; 6]);

    /// Whether the group bit is set (multicast, broadcast included).
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// A unicast address other than all zeros: the only kind a NIC may
    /// have and a host may send from.
    pub fn is_unicast(&self) -> bool {
        !self.is_multicast() && *self != MacAddr::ZERO
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// Why a text is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMac(pub String);

impl fmt::Display for BadMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not a MAC address (six hex octets separated by ':')", self.0)
    }
}

impl std::error::Error for BadMac {}

impl FromStr for MacAddr {
    type Err = BadMac;

    /// Six colon-separated pairs of hex digits.
    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.chars().take(64).collect());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut mac {
            let p =
                parts.next().filter(|p| p.len() == 2 && p.bytes().all(|c| c.is_ascii_hexdigit())).ok_or_else(bad)?;
            *octet = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl serde::Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x0a]);

    #[test]
    fn addresses_parse_print_and_classify() {
        assert_eq!("02:00:00:00:00:0a".parse::<MacAddr>(), Ok(A));
        assert_eq!("52:54:00:AB:cd:EF".parse::<MacAddr>(), Ok(MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef])));
        assert_eq!(A.to_string(), "02:00:00:00:00:0a");
        for bad in
            ["02:00:00:00:00", "02:00:00:00:00:0a:0b", "2:00:00:00:00:0a", "zz:00:00:00:00:0a", "", "+1:00:00:00:00:00"]
        {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        assert!(A.is_unicast() && !MacAddr::BROADCAST.is_unicast() && !MacAddr::ZERO.is_unicast());
        assert!(MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_multicast());
        let json = serde_json::to_string(&A).expect("json");
        assert_eq!(json, "\"02:00:00:00:00:0a\"");
        assert_eq!(serde_json::from_str::<MacAddr>(&json).expect("back"), A);
        assert!(serde_json::from_str::<MacAddr>("\"02:00\"").is_err());
    }

    proptest::proptest! {
        #[test]
        fn display_then_parse_is_identity(b in proptest::prelude::any::<[u8; 6]>()) {
            proptest::prop_assert_eq!(MacAddr(b).to_string().parse::<MacAddr>(), Ok(MacAddr(b)));
        }
    }
}

/// Serde helpers that keep a MAC as its six bytes, for binary formats
/// whose layout must not change (`#[serde(with = "wanmig_types::mac_as_bytes")]`).
pub mod as_bytes {
    use super::MacAddr;

    /// Serializes the six bytes.
    pub fn serialize<S: serde::Serializer>(mac: &MacAddr, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&mac.0, s)
    }

    /// Deserializes six bytes.
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        <[u8; 6] as serde::Deserialize>::deserialize(d).map(MacAddr)
    }
}
