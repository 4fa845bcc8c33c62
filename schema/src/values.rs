//! Strongly typed scalar values used by manifests: sizes, durations, CIDRs, MAC
//! addresses, interface names, resource names and references, cron schedules.
//!
//! Every type parses from its manifest text form, prints back to the same canonical
//! form, and describes itself in the JSON Schema.

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::resource::Kind;

/// Why a scalar value was rejected. The message is shown to the user after the
/// location of the offending node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub String);

fn verr(msg: impl Into<String>) -> ValueError {
    ValueError(msg.into())
}

/// Parses `s` as a number only when it is made of ASCII digits (`u8::from_str` and
/// friends also accept a leading `+`, which the JSON Schema patterns refuse).
fn parse_digits<T: TryFrom<u64>>(s: &str, radix_hex: bool) -> Option<T> {
    let ok = |c: u8| c.is_ascii_digit() || (radix_hex && c.is_ascii_hexdigit());
    if s.is_empty() || !s.bytes().all(ok) {
        return None;
    }
    let n = u64::from_str_radix(s, if radix_hex { 16 } else { 10 }).ok()?;
    T::try_from(n).ok()
}

/// Implements Display/FromStr-based serde for a type.
macro_rules! serde_via_str {
    ($t:ty, $expect:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expect)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(|e: ValueError| E::custom(e.0))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

// ---------------------------------------------------------------- ByteSize

/// A size in bytes. Written as an integer, or a string with a binary (`Ki Mi Gi Ti`)
/// or decimal (`K M G T`) suffix: `512Mi`, `10G`, `4096`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, suffix) = t.split_at(split);
        if num.is_empty() {
            return Err(verr(format!(
                "invalid size {s:?}: expected an integer with an optional suffix Ki, Mi, Gi, Ti, K, M, G or T"
            )));
        }
        let n: u64 = num
            .parse()
            .map_err(|_| verr(format!("invalid size {s:?}: number too large")))?;
        let mult: u64 = match suffix {
            "" => 1,
            "Ki" => 1 << 10,
            "Mi" => 1 << 20,
            "Gi" => 1 << 30,
            "Ti" => 1 << 40,
            "K" | "k" => 1_000,
            "M" => 1_000_000,
            "G" => 1_000_000_000,
            "T" => 1_000_000_000_000,
            other => {
                return Err(verr(format!(
                    "invalid size suffix {other:?} in {s:?}: use Ki, Mi, Gi, Ti (binary) or K, M, G, T (decimal)"
                )));
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| verr(format!("size {s:?} overflows 64 bits")))
    }
}

impl fmt::Display for ByteSize {
    /// Prints the largest exact binary unit: `16Mi`, `1536Ki`, `1000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (suffix, shift) in [("Ti", 40u32), ("Gi", 30), ("Mi", 20), ("Ki", 10)] {
            let unit = 1u64 << shift;
            if n != 0 && n.is_multiple_of(unit) {
                return write!(f, "{}{}", n / unit, suffix);
            }
        }
        write!(f, "{n}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size: integer bytes or a string like 512Mi")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(|e: ValueError| E::custom(e.0))
            }
        }
        d.deserialize_any(V)
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> Cow<'static, str> {
        "ByteSize".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Bytes: an integer, or a string with suffix Ki Mi Gi Ti (binary) or K M G T (decimal)",
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": "^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$"}
            ]
        })
    }
}

// ---------------------------------------------------------------- Duration

/// A duration such as `500ms`, `30s`, `5m`, `2h` (units may be combined: `1h30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DurationSpec(pub std::time::Duration);

impl FromStr for DurationSpec {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            verr(format!(
                "invalid duration {s:?}: expected e.g. 500ms, 30s, 5m, 2h, 1d"
            ))
        };
        let mut rest = s.trim();
        if rest.is_empty() {
            return Err(bad());
        }
        let too_long = || verr(format!("duration {s:?} is too long"));
        let mut total_ms: u64 = 0;
        while !rest.is_empty() {
            let split = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
            if split == 0 {
                return Err(bad());
            }
            let n: u64 = parse_digits(&rest[..split], false).ok_or_else(too_long)?;
            rest = &rest[split..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let ms: u64 = match unit {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                _ => return Err(bad()),
            };
            total_ms = n
                .checked_mul(ms)
                .and_then(|x| total_ms.checked_add(x))
                .ok_or_else(too_long)?;
        }
        Ok(DurationSpec(std::time::Duration::from_millis(total_ms)))
    }
}

impl fmt::Display for DurationSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, size) in [
            ("d", 86_400_000u128),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ] {
            if ms.is_multiple_of(size) {
                return write!(f, "{}{}", ms / size, unit);
            }
        }
        write!(f, "{ms}ms")
    }
}

serde_via_str!(DurationSpec, "a duration like 30s, 5m or 2h");

impl JsonSchema for DurationSpec {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d))+$", "description": "e.g. 500ms, 30s, 5m, 2h"})
    }
}

// ---------------------------------------------------------------- Cidr

/// An address with prefix length, e.g. `10.10.0.1/24` or `fd00::1/64`.
/// The host part is kept (it is the interface address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: IpAddr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// The network this address belongs to (host bits cleared), as a CIDR.
    pub fn network(&self) -> Cidr {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                IpAddr::V4((bits & mask).into())
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                IpAddr::V6((bits & mask).into())
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }

    /// Whether `ip` lies inside this address's network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        // Different families never contain each other (and a v6 prefix would overflow a
        // v4 mask).
        ip.is_ipv4() == self.addr.is_ipv4()
            && Cidr {
                addr: ip,
                prefix: self.prefix,
            }
            .network()
                == self.network()
    }
}

impl FromStr for Cidr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            verr(format!(
                "invalid CIDR {s:?}: expected address/prefix, e.g. 10.0.0.1/24"
            ))
        })?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| verr(format!("invalid IP address {a:?} in {s:?}")))?;
        let prefix: u8 = parse_digits(p, false)
            .ok_or_else(|| verr(format!("invalid prefix length {p:?} in {s:?}")))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(verr(format!(
                "prefix length {prefix} in {s:?} exceeds {max}"
            )));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

serde_via_str!(Cidr, "an address with prefix length, e.g. 10.0.0.1/24");

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": "^[0-9a-fA-F:.]+/[0-9]{1,3}$", "description": "address/prefix, e.g. 10.10.0.1/24"})
    }
}

// ---------------------------------------------------------------- MacAddr

/// A unicast Ethernet MAC address `52:54:00:aa:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || {
            verr(format!(
                "invalid MAC address {s:?}: expected six hex pairs like 52:54:00:aa:00:01"
            ))
        };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 {
                return Err(bad());
            }
            *b = parse_digits(p, true).ok_or_else(bad)?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        if out[0] & 1 == 1 {
            return Err(verr(format!(
                "MAC address {s} is multicast: the first octet must be even"
            )));
        }
        Ok(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

serde_via_str!(MacAddr, "a MAC address like 52:54:00:aa:00:01");

impl JsonSchema for MacAddr {
    fn schema_name() -> Cow<'static, str> {
        "MacAddr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": "^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"})
    }
}

// ---------------------------------------------------------------- IfName

/// A Linux interface name: 1 to 15 bytes, no `/`, whitespace or `:`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IfName(pub String);

impl IfName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for IfName {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        if s.is_empty() || s.len() > 15 {
            return Err(verr(format!(
                "interface name {s:?} must be 1 to 15 bytes long (Linux IFNAMSIZ), it is {}",
                s.len()
            )));
        }
        if s == "."
            || s == ".."
            || s.chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(verr(format!(
                "interface name {s:?} contains a character Linux refuses (/, :, space)"
            )));
        }
        Ok(IfName(s.to_string()))
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

serde_via_str!(IfName, "a Linux interface name (at most 15 bytes)");

impl JsonSchema for IfName {
    fn schema_name() -> Cow<'static, str> {
        "IfName".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "minLength": 1, "maxLength": 15, "pattern": "^[^/: \\t\\n]+$"})
    }
}

// ---------------------------------------------------------------- Name

/// A resource name: `[a-z0-9]([a-z0-9-]*[a-z0-9])?`, at most 63 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Name(pub String);

impl Name {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the resource-name rule.
pub fn check_name(s: &str) -> Result<(), ValueError> {
    let ok_char = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let b = s.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 63
        && ok_char(b[0])
        && ok_char(b[b.len() - 1])
        && b.iter().all(|&c| ok_char(c) || c == b'-');
    if valid {
        Ok(())
    } else {
        Err(verr(format!(
            "invalid name {s:?}: use lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
        )))
    }
}

impl FromStr for Name {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        check_name(s)?;
        Ok(Name(s.to_string()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

serde_via_str!(Name, "a resource name");

impl JsonSchema for Name {
    fn schema_name() -> Cow<'static, str> {
        "Name".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"})
    }
}

// ---------------------------------------------------------------- NodeName

/// A cluster node's name (by default its host name): DNS labels of letters, digits and
/// `-` joined by `.`, at most 253 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeName(pub String);

impl NodeName {
    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `label` is one DNS label: 1 to 63 letters, digits or `-`, not starting or
/// ending with `-`.
fn is_dns_label(label: &str) -> bool {
    let b = label.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

impl FromStr for NodeName {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        if s.len() <= 253 && s.split('.').all(is_dns_label) {
            Ok(NodeName(s.to_string()))
        } else {
            Err(verr(format!(
                "invalid node name {s:?}: a host name (letters, digits and '-' in labels joined by '.')"
            )))
        }
    }
}

/// Node names look up maps keyed by them with a plain `&str`.
impl std::borrow::Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

serde_via_str!(NodeName, "a node name (a host name)");

impl JsonSchema for NodeName {
    fn schema_name() -> Cow<'static, str> {
        "NodeName".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "maxLength": 253,
            "pattern": "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"})
    }
}

// ---------------------------------------------------------------- ResourceRef

/// A typed reference `Kind/name`, used by `dependsOn` and backup targets.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceRef {
    /// Referenced kind.
    pub kind: Kind,
    /// Referenced name.
    pub name: String,
}

impl FromStr for ResourceRef {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        let (k, n) = s.split_once('/').ok_or_else(|| {
            verr(format!(
                "invalid reference {s:?}: expected Kind/name, e.g. Network/lan0"
            ))
        })?;
        let kind: Kind = k.parse()?;
        check_name(n)?;
        Ok(ResourceRef {
            kind,
            name: n.to_string(),
        })
    }
}

impl fmt::Display for ResourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

serde_via_str!(ResourceRef, "a reference Kind/name");

impl JsonSchema for ResourceRef {
    fn schema_name() -> Cow<'static, str> {
        "ResourceRef".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "pattern": "^(Network|Bond|StoragePool|Volume|Container|VirtualMachine|BackupSchedule)/[a-z0-9]([a-z0-9-]*[a-z0-9])?$"})
    }
}

// ---------------------------------------------------------------- Cron

/// A 5-field cron pattern or one of `@hourly @daily @weekly @monthly @yearly`
/// (also `@annually`, `@midnight`), checked with croner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CronSpec(pub String);

impl CronSpec {
    /// Parses into a croner pattern.
    pub fn pattern(&self) -> Result<croner::Cron, ValueError> {
        parse_cron(&self.0)
    }
}

fn parse_cron(s: &str) -> Result<croner::Cron, ValueError> {
    let t = s.trim();
    let fields = t.split_whitespace().count();
    if !t.starts_with('@') && fields != 5 {
        return Err(verr(format!(
            "invalid cron schedule {s:?}: expected 5 fields (minute hour day-of-month month day-of-week) or @hourly/@daily/@weekly/@monthly/@yearly, found {fields} fields"
        )));
    }
    croner::parser::CronParser::builder()
        .dom_and_dow(false)
        .build()
        .parse(t)
        .map_err(|e| verr(format!("invalid cron schedule {s:?}: {e}")))
}

impl FromStr for CronSpec {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        parse_cron(s)?;
        Ok(CronSpec(s.trim().to_string()))
    }
}

impl fmt::Display for CronSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

serde_via_str!(CronSpec, "a 5-field cron pattern or @daily");

impl JsonSchema for CronSpec {
    fn schema_name() -> Cow<'static, str> {
        "Cron".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "description": "5-field cron pattern or @hourly/@daily/@weekly/@monthly/@yearly"})
    }
}

/// A time zone name from the IANA database, e.g. `Europe/Berlin` or `UTC`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TimeZone(pub chrono_tz::Tz);

impl FromStr for TimeZone {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        s.parse::<chrono_tz::Tz>().map(TimeZone).map_err(|_| {
            verr(format!(
                "unknown time zone {s:?}: use an IANA name such as UTC or Europe/Berlin"
            ))
        })
    }
}

impl fmt::Display for TimeZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.name())
    }
}

serde_via_str!(TimeZone, "an IANA time zone name");

impl JsonSchema for TimeZone {
    fn schema_name() -> Cow<'static, str> {
        "TimeZone".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({"type": "string", "description": "IANA time zone, e.g. UTC or Europe/Berlin"})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_host_names() {
        for ok in ["pve1", "node-a.example.org", "A1"] {
            assert_eq!(ok.parse::<NodeName>().unwrap().to_string(), ok);
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", ".a", &"x".repeat(64)] {
            assert!(bad.parse::<NodeName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!("16Mi".parse::<ByteSize>().unwrap().0, 16 << 20);
        assert_eq!("10G".parse::<ByteSize>().unwrap().0, 10_000_000_000);
        assert_eq!("4096".parse::<ByteSize>().unwrap().0, 4096);
        assert_eq!(ByteSize(32 << 20).to_string(), "32Mi");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert!("12Q".parse::<ByteSize>().is_err());
        assert!("Mi".parse::<ByteSize>().is_err());
        assert!("99999999999Ti".parse::<ByteSize>().is_err());
        assert!("16777216Ti".parse::<ByteSize>().is_err(), "2^64 overflows");
        assert_eq!("16777215Ti".parse::<ByteSize>().unwrap().0, 16777215 << 40);
        assert!("+1Gi".parse::<ByteSize>().is_err());
        assert!("+4096".parse::<ByteSize>().is_err());
        assert!("18446744073709551616".parse::<ByteSize>().is_err());
        let v: ByteSize = serde_json::from_str("1048576").unwrap();
        assert_eq!(v.0, 1 << 20);
    }

    #[test]
    fn durations() {
        assert_eq!("500ms".parse::<DurationSpec>().unwrap().0.as_millis(), 500);
        assert_eq!("1h30m".parse::<DurationSpec>().unwrap().0.as_secs(), 5400);
        assert_eq!("2h".parse::<DurationSpec>().unwrap().to_string(), "2h");
        assert!("5 minutes".parse::<DurationSpec>().is_err());
        assert!("".parse::<DurationSpec>().is_err());
        assert!("10".parse::<DurationSpec>().is_err());
        assert!("+5s".parse::<DurationSpec>().is_err());
        assert!("5s+3s".parse::<DurationSpec>().is_err());
    }

    #[test]
    fn duration_overflow_is_refused() {
        for long in [
            "9999999999999999d",
            "99999999999999999999d",
            "999999999999999999999999999999999d",
            "18446744073709551615ms1ms",
            "213503982334601d",
        ] {
            let e = long.parse::<DurationSpec>().unwrap_err();
            assert!(e.0.contains("too long"), "{long}: {e}");
        }
        // The largest representable value still parses.
        assert_eq!(
            "18446744073709551615ms"
                .parse::<DurationSpec>()
                .unwrap()
                .0
                .as_millis(),
            u128::from(u64::MAX)
        );
    }

    #[test]
    fn leading_plus_is_refused() {
        assert!("10.0.0.1/+24".parse::<Cidr>().is_err());
        assert!("10.0.0.1/ 24".parse::<Cidr>().is_err());
        assert!("10.0.0.1/24".parse::<Cidr>().is_ok());
        assert!("52:54:00:+a:00:01".parse::<MacAddr>().is_err());
        assert!("+2:54:00:aa:00:01".parse::<MacAddr>().is_err());
        assert!("52:54:00:aa:00:-1".parse::<MacAddr>().is_err());
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.10.0.7/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "10.10.0.0/24");
        assert!(c.contains("10.10.0.200".parse().unwrap()));
        assert!(!c.contains("10.10.1.1".parse().unwrap()));
        assert!("10.0.0.1/33".parse::<Cidr>().is_err());
        assert!("10.0.0.1".parse::<Cidr>().is_err());
        assert!("fd00::1/64".parse::<Cidr>().is_ok());
        let v6: Cidr = "fd00::1/64".parse().unwrap();
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(!c.contains("fd00::1".parse().unwrap()));
    }

    #[test]
    fn macs_and_names() {
        assert_eq!(
            "52:54:00:AA:00:01".parse::<MacAddr>().unwrap().to_string(),
            "52:54:00:aa:00:01"
        );
        assert!("53:54:00:aa:00:01".parse::<MacAddr>().is_err());
        assert!("52:54:00:aa:00".parse::<MacAddr>().is_err());
        assert!("averyveryverylongname".parse::<IfName>().is_err());
        assert!("br0".parse::<IfName>().is_ok());
        assert!("web-1".parse::<Name>().is_ok());
        for bad in ["Web", "-a", "a-", "a_b", ""] {
            assert!(bad.parse::<Name>().is_err(), "{bad}");
        }
        let r: ResourceRef = "Network/lan0".parse().unwrap();
        assert_eq!(r.kind, Kind::Network);
        assert!("Netwerk/lan0".parse::<ResourceRef>().is_err());
    }

    #[test]
    fn cron_patterns() {
        assert!("0 2 * * *".parse::<CronSpec>().is_ok());
        assert!("@daily".parse::<CronSpec>().is_ok());
        assert!("*/15 * * * 1-5".parse::<CronSpec>().is_ok());
        assert!("0 2 * *".parse::<CronSpec>().is_err());
        assert!("61 * * * *".parse::<CronSpec>().is_err());
        assert!("0 0 2 * * *".parse::<CronSpec>().is_err());
        assert!("Europe/Berlin".parse::<TimeZone>().is_ok());
        assert!("Mars/Olympus".parse::<TimeZone>().is_err());
    }
}
