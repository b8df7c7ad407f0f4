//! A small AML encoder: the subset of ACPI Machine Language a DSDT that
//! declares fixed devices needs (ACPI 6.5, chapter 20), and the resource
//! descriptors of their `_CRS` (chapter 6.4).
//!
//! Every function returns the encoded bytes of one object; nesting is by
//! passing the encoded children as the body. Names are compile-time
//! constants or generated from validated numbers, so a malformed name is a
//! bug in this crate and panics; nothing here takes guest or user input.

const ZERO_OP: u8 = 0x00;
const ONE_OP: u8 = 0x01;
const NAME_OP: u8 = 0x08;
const BYTE_PREFIX: u8 = 0x0A;
const WORD_PREFIX: u8 = 0x0B;
const DWORD_PREFIX: u8 = 0x0C;
const STRING_PREFIX: u8 = 0x0D;
const QWORD_PREFIX: u8 = 0x0E;
const SCOPE_OP: u8 = 0x10;
const BUFFER_OP: u8 = 0x11;
const PACKAGE_OP: u8 = 0x12;
const DUAL_NAME_PREFIX: u8 = 0x2E;
const MULTI_NAME_PREFIX: u8 = 0x2F;
const ROOT_CHAR: u8 = b'\\';
const EXT_OP_PREFIX: u8 = 0x5B;
const DEVICE_OP: u8 = 0x82;

/// Largest length a PkgLength can encode (28 bits).
const PKG_LENGTH_MAX: usize = (1 << 28) - 1;

/// A PkgLength for a body of `body_len` bytes: the encoded length counts
/// its own bytes too. One byte holds up to 63; longer ones put the byte
/// count in bits 7..6 of the first byte, its low nibble in bits 3..0, and
/// the rest in the following bytes.
fn pkg_length(body_len: usize) -> Vec<u8> {
    if body_len + 1 < 0x40 {
        return vec![(body_len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = body_len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut out = vec![((extra as u8) << 6) | (total & 0xF) as u8];
            out.extend((0..extra).map(|i| (total >> (4 + 8 * i)) as u8));
            return out;
        }
    }
    panic!("AML package of {body_len} bytes exceeds {PKG_LENGTH_MAX}: the table builder bounds its input far below");
}

/// `op`, a PkgLength, then `body`.
fn with_pkg_length(op: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = op.to_vec();
    out.extend(pkg_length(body.len()));
    out.extend_from_slice(body);
    out
}

/// One NameSeg: 1 to 4 characters `[A-Z_][A-Z0-9_]*`, padded with `_`.
fn name_seg(seg: &str) -> [u8; 4] {
    let b = seg.as_bytes();
    let valid = (1..=4).contains(&b.len())
        && (b[0].is_ascii_uppercase() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_');
    assert!(valid, "invalid AML name segment {seg:?}");
    let mut out = [b'_'; 4];
    out[..b.len()].copy_from_slice(b);
    out
}

/// A NameString: optionally rooted (`\`), segments separated by `.`.
pub fn name_string(path: &str) -> Vec<u8> {
    let (mut out, rel) = match path.strip_prefix('\\') {
        Some(rest) => (vec![ROOT_CHAR], rest),
        None => (Vec::new(), path),
    };
    let segs: Vec<[u8; 4]> = rel.split('.').map(name_seg).collect();
    match segs.len() {
        1 => {}
        2 => out.push(DUAL_NAME_PREFIX),
        n => {
            out.push(MULTI_NAME_PREFIX);
            out.push(u8::try_from(n).expect("a name of at most 255 segments"));
        }
    }
    out.extend(segs.iter().flatten());
    out
}

/// An integer, in the shortest encoding.
pub fn integer(v: u64) -> Vec<u8> {
    match v {
        0 => vec![ZERO_OP],
        1 => vec![ONE_OP],
        2..=0xFF => vec![BYTE_PREFIX, v as u8],
        0x100..=0xFFFF => [&[WORD_PREFIX][..], &(v as u16).to_le_bytes()].concat(),
        0x1_0000..=0xFFFF_FFFF => [&[DWORD_PREFIX][..], &(v as u32).to_le_bytes()].concat(),
        _ => [&[QWORD_PREFIX][..], &v.to_le_bytes()].concat(),
    }
}

/// A string (ASCII, no NUL).
pub fn string(s: &str) -> Vec<u8> {
    assert!(s.bytes().all(|c| (1..0x80).contains(&c)), "AML strings are ASCII without NUL: {s:?}");
    let mut out = vec![STRING_PREFIX];
    out.extend_from_slice(s.as_bytes());
    out.push(0);
    out
}

/// A compressed EISA id (`EisaId("PNP0501")`): three letters of five bits
/// and four hex digits, stored big-endian, encoded as a DWORD integer.
pub fn eisa_id(id: &str) -> Vec<u8> {
    let b = id.as_bytes();
    let valid = b.len() == 7 && b[..3].iter().all(u8::is_ascii_uppercase) && b[3..].iter().all(u8::is_ascii_hexdigit);
    assert!(valid, "invalid EISA id {id:?}");
    let letters = b[..3].iter().fold(0u16, |acc, &c| (acc << 5) | u16::from(c - 0x40));
    let digits = u16::from_str_radix(&id[3..], 16).expect("four hex digits, checked above");
    let [l0, l1] = letters.to_be_bytes();
    let [d0, d1] = digits.to_be_bytes();
    integer(u64::from(u32::from_le_bytes([l0, l1, d0, d1])))
}

/// `Name(path, value)`.
pub fn name(path: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![NAME_OP];
    out.extend(name_string(path));
    out.extend_from_slice(value);
    out
}

/// `Scope(path) { body }`.
pub fn scope(path: &str, body: &[u8]) -> Vec<u8> {
    with_pkg_length(&[SCOPE_OP], &[name_string(path), body.to_vec()].concat())
}

/// `Device(path) { body }`.
pub fn device(path: &str, body: &[u8]) -> Vec<u8> {
    with_pkg_length(&[EXT_OP_PREFIX, DEVICE_OP], &[name_string(path), body.to_vec()].concat())
}

/// `Package() { elements }`; at most 255 elements.
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let count = u8::try_from(elements.len()).expect("a package of at most 255 elements");
    let mut body = vec![count];
    body.extend(elements.iter().flatten());
    with_pkg_length(&[PACKAGE_OP], &body)
}

/// `Buffer() { bytes }`.
pub fn buffer(bytes: &[u8]) -> Vec<u8> {
    let mut body = integer(bytes.len() as u64);
    body.extend_from_slice(bytes);
    with_pkg_length(&[BUFFER_OP], &body)
}

/// `ResourceTemplate() { descriptors }`: a buffer of the descriptors and an
/// end tag (checksum 0: "treat as correct").
pub fn resource_template(descriptors: &[&[u8]]) -> Vec<u8> {
    let mut bytes: Vec<u8> = descriptors.concat();
    bytes.extend_from_slice(&[0x79, 0x00]);
    buffer(&bytes)
}

/// `Memory32Fixed(ReadWrite, base, len)` (large item 0x06).
pub fn memory32_fixed_rw(base: u32, len: u32) -> [u8; 12] {
    let mut d = [0u8; 12];
    d[..4].copy_from_slice(&[0x86, 9, 0, 1]);
    d[4..8].copy_from_slice(&base.to_le_bytes());
    d[8..].copy_from_slice(&len.to_le_bytes());
    d
}

/// `Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }`
/// (extended interrupt, large item 0x09): an edge-triggered line of its own,
/// what an irqfd raises.
pub fn interrupt_edge_high(gsi: u32) -> [u8; 9] {
    // Flags: bit 0 consumer, bit 1 edge; active high and exclusive are 0.
    let mut d = [0x89, 6, 0, 0b0011, 1, 0, 0, 0, 0];
    d[5..].copy_from_slice(&gsi.to_le_bytes());
    d
}

/// `IO(Decode16, base, base, 1, len)`: a fixed range of I/O ports (small
/// item 0x08).
pub fn io(base: u16, len: u8) -> [u8; 8] {
    let [lo, hi] = base.to_le_bytes();
    [0x47, 1, lo, hi, lo, hi, 1, len]
}

/// `IRQNoFlags() { irq }`: an ISA IRQ, edge-triggered, active high (small
/// item 0x04, two bytes).
pub fn irq_no_flags(irq: u8) -> [u8; 3] {
    assert!(irq < 16, "ISA IRQ {irq} does not exist");
    let [lo, hi] = (1u16 << irq).to_le_bytes();
    [0x22, lo, hi]
}

/// A reader of what this module writes, for tests: the objects of a term
/// list, and the descriptors of a resource template.
#[cfg(test)]
pub(crate) mod parse {
    /// A named object.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Obj {
        /// `Scope`, with its name (segments joined by `.`, `\` kept).
        Scope(String, Vec<Obj>),
        /// `Device`.
        Device(String, Vec<Obj>),
        /// `Name`.
        Name(String, Value),
    }

    /// A data object.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Value {
        /// Any integer encoding.
        Int(u64),
        /// A string.
        Str(String),
        /// A buffer's bytes.
        Buffer(Vec<u8>),
        /// A package's elements.
        Package(Vec<Value>),
    }

    struct Reader<'a>(&'a [u8]);

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err(format!("truncated: {n} bytes wanted, {} left", self.0.len()));
            }
            let (a, b) = self.0.split_at(n);
            self.0 = b;
            Ok(a)
        }
        fn byte(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }
        /// A PkgLength; returns the body that follows it.
        fn package(&mut self) -> Result<&'a [u8], String> {
            let before = self.0.len();
            let first = self.byte()?;
            let extra = usize::from(first >> 6);
            let mut len = if extra == 0 { usize::from(first & 0x3F) } else { usize::from(first & 0xF) };
            for i in 0..extra {
                len |= usize::from(self.byte()?) << (4 + 8 * i);
            }
            let header = before - self.0.len();
            let body = len.checked_sub(header).ok_or("PkgLength shorter than itself")?;
            self.take(body)
        }
        fn name(&mut self) -> Result<String, String> {
            let mut out = String::new();
            if self.0.first() == Some(&b'\\') {
                self.take(1)?;
                out.push('\\');
            }
            let count = match self.0.first() {
                Some(0x2E) => {
                    self.take(1)?;
                    2
                }
                Some(0x2F) => {
                    self.take(1)?;
                    self.byte()?
                }
                _ => 1,
            };
            for i in 0..count {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(std::str::from_utf8(self.take(4)?).map_err(|e| e.to_string())?);
            }
            Ok(out)
        }
        fn value(&mut self) -> Result<Value, String> {
            let le = |b: &[u8]| b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
            Ok(match self.byte()? {
                0x00 => Value::Int(0),
                0x01 => Value::Int(1),
                0xFF => Value::Int(u64::MAX),
                0x0A => Value::Int(le(self.take(1)?)),
                0x0B => Value::Int(le(self.take(2)?)),
                0x0C => Value::Int(le(self.take(4)?)),
                0x0E => Value::Int(le(self.take(8)?)),
                0x0D => {
                    let end = self.0.iter().position(|&c| c == 0).ok_or("unterminated string")?;
                    let s = String::from_utf8(self.take(end)?.to_vec()).map_err(|e| e.to_string())?;
                    self.take(1)?;
                    Value::Str(s)
                }
                0x11 => {
                    let mut body = Reader(self.package()?);
                    let Value::Int(size) = body.value()? else { return Err("buffer size is not an integer".into()) };
                    if size != body.0.len() as u64 {
                        return Err(format!("buffer declares {size} bytes, holds {}", body.0.len()));
                    }
                    Value::Buffer(body.0.to_vec())
                }
                0x12 => {
                    let mut body = Reader(self.package()?);
                    let count = body.byte()?;
                    let elements = (0..count).map(|_| body.value()).collect::<Result<Vec<_>, _>>()?;
                    if !body.0.is_empty() {
                        return Err("bytes after the last package element".into());
                    }
                    Value::Package(elements)
                }
                op => return Err(format!("unexpected data opcode {op:#04x}")),
            })
        }
    }

    /// The objects of a term list (a table body, or a scope's).
    pub fn terms(bytes: &[u8]) -> Result<Vec<Obj>, String> {
        let mut r = Reader(bytes);
        let mut out = Vec::new();
        while !r.0.is_empty() {
            out.push(match r.byte()? {
                0x08 => {
                    let n = r.name()?;
                    Obj::Name(n, r.value()?)
                }
                0x10 => {
                    let mut body = Reader(r.package()?);
                    let n = body.name()?;
                    Obj::Scope(n, terms(body.0)?)
                }
                0x5B if r.0.first() == Some(&0x82) => {
                    r.take(1)?;
                    let mut body = Reader(r.package()?);
                    let n = body.name()?;
                    Obj::Device(n, terms(body.0)?)
                }
                op => return Err(format!("unexpected opcode {op:#04x}")),
            });
        }
        Ok(out)
    }

    /// A resource descriptor of a `_CRS` buffer.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Resource {
        /// Memory32Fixed: writable, base, length.
        Memory32Fixed(bool, u32, u32),
        /// Extended interrupt: flags, interrupt numbers.
        Interrupt(u8, Vec<u32>),
        /// IO: min, max, alignment, length.
        Io(u16, u16, u8, u8),
        /// IRQ mask (IRQNoFlags).
        Irq(u16),
    }

    /// The descriptors of a resource template, which must end with an end tag.
    pub fn resources(bytes: &[u8]) -> Result<Vec<Resource>, String> {
        let mut r = Reader(bytes);
        let mut out = Vec::new();
        loop {
            let tag = r.byte()?;
            if tag & 0x80 == 0 {
                let body = r.take(usize::from(tag & 7))?;
                match (tag >> 3, body) {
                    (0x0F, [_]) => {
                        return if r.0.is_empty() { Ok(out) } else { Err("bytes after the end tag".into()) };
                    }
                    (0x08, &[_, a, b, c, d, align, len]) => {
                        out.push(Resource::Io(u16::from_le_bytes([a, b]), u16::from_le_bytes([c, d]), align, len))
                    }
                    (0x04, &[a, b]) => out.push(Resource::Irq(u16::from_le_bytes([a, b]))),
                    _ => return Err(format!("unexpected small descriptor {tag:#04x}")),
                }
            } else {
                let len = u16::from_le_bytes([r.byte()?, r.byte()?]);
                let body = r.take(usize::from(len))?;
                let u32_at = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
                match (tag, body.len()) {
                    (0x86, 9) => out.push(Resource::Memory32Fixed(body[0] & 1 == 1, u32_at(1), u32_at(5))),
                    (0x89, n) if n >= 2 && n == 2 + 4 * usize::from(body[1]) => out.push(Resource::Interrupt(
                        body[0],
                        (0..usize::from(body[1])).map(|i| u32_at(2 + 4 * i)).collect(),
                    )),
                    _ => return Err(format!("unexpected large descriptor {tag:#04x} of {len} bytes")),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse::{Obj, Resource, Value, resources, terms};
    use super::*;

    #[test]
    fn encodings_match_the_spec() {
        assert_eq!(name_string("_HID"), b"_HID");
        assert_eq!(name_string("\\_SB"), b"\\_SB_");
        assert_eq!(name_string("\\_SB.COM1"), b"\\\x2e_SB_COM1");
        assert_eq!(name_string("A.B.C"), b"\x2f\x03A___B___C___");
        assert_eq!(integer(0), [0x00]);
        assert_eq!(integer(1), [0x01]);
        assert_eq!(integer(5), [0x0A, 5]);
        assert_eq!(integer(0x3f8), [0x0B, 0xf8, 0x03]);
        assert_eq!(integer(0xD000_0000), [0x0C, 0, 0, 0, 0xD0]);
        assert_eq!(integer(1 << 32), [0x0E, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(string("LNRO0005"), b"\x0dLNRO0005\0");
        // Well-known compressed ids.
        assert_eq!(eisa_id("PNP0501"), integer(0x0105_D041));
        assert_eq!(eisa_id("PNP0A03"), integer(0x030A_D041));
        // Name(_S5_, Package(){5, 0}) as iasl compiles it.
        assert_eq!(name("_S5_", &package(&[integer(5), integer(0)])), b"\x08_S5_\x12\x05\x02\x0a\x05\x00");
        assert_eq!(io(0x3f8, 8), [0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]);
        assert_eq!(irq_no_flags(4), [0x22, 0x10, 0]);
        assert_eq!(memory32_fixed_rw(0xD000_1000, 0x1000), [0x86, 9, 0, 1, 0, 0x10, 0, 0xD0, 0, 0x10, 0, 0]);
        assert_eq!(interrupt_edge_high(6), [0x89, 6, 0, 3, 1, 6, 0, 0, 0]);
    }

    #[test]
    fn pkg_length_is_the_shortest_form_and_reads_back() {
        let lens = proptest::prop_oneof![0usize..200, 3900usize..4200, 1_048_000usize..1_049_000];
        proptest::test_runner::TestRunner::default()
            .run(&lens, |len| {
                let enc = pkg_length(len);
                let want_bytes = match len + enc.len() {
                    0..0x40 => 1,
                    0x40..0x1000 => 2,
                    0x1000..0x10_0000 => 3,
                    _ => 4,
                };
                proptest::prop_assert_eq!(enc.len(), want_bytes);
                // Through a buffer, the reader gets exactly the bytes back.
                let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let objs = terms(&name("B", &buffer(&bytes))).map_err(proptest::test_runner::TestCaseError::fail)?;
                proptest::prop_assert_eq!(objs, vec![Obj::Name("B___".into(), Value::Buffer(bytes))]);
                Ok(())
            })
            .expect("PkgLength round-trips");
    }

    #[test]
    fn nested_objects_read_back() {
        let crs = resource_template(&[&memory32_fixed_rw(0xD000_0000, 0x1000), &interrupt_edge_high(5)]);
        // A body long enough to need a two-byte PkgLength.
        let padding: Vec<u8> = (0..20).flat_map(|i| name(&format!("N{i:03}"), &integer(i))).collect();
        let dev = device("V000", &[name("_HID", &string("LNRO0005")), name("_CRS", &crs), padding].concat());
        let table = [scope("\\_SB", &dev), name("\\_S5", &package(&[integer(5), integer(0)]))].concat();
        let objs = terms(&table).expect("parses");
        let [Obj::Scope(sb, devices), Obj::Name(s5, Value::Package(p))] = &objs[..] else { panic!("{objs:?}") };
        assert_eq!((sb.as_str(), s5.as_str(), &p[..]), ("\\_SB_", "\\_S5_", &[Value::Int(5), Value::Int(0)][..]));
        let [Obj::Device(v, body)] = &devices[..] else { panic!("{devices:?}") };
        assert_eq!((v.as_str(), body.len()), ("V000", 22));
        assert_eq!(body[0], Obj::Name("_HID".into(), Value::Str("LNRO0005".into())));
        let Obj::Name(_, Value::Buffer(b)) = &body[1] else { panic!("{:?}", body[1]) };
        assert_eq!(
            resources(b).expect("descriptors"),
            [Resource::Memory32Fixed(true, 0xD000_0000, 0x1000), Resource::Interrupt(3, vec![5])]
        );
        let com = resource_template(&[&io(0x3f8, 8), &irq_no_flags(4)]);
        let objs = terms(&name("_CRS", &com)).expect("parses");
        let [Obj::Name(_, Value::Buffer(b))] = &objs[..] else { panic!("{objs:?}") };
        assert_eq!(resources(b).expect("descriptors"), [Resource::Io(0x3f8, 0x3f8, 1, 8), Resource::Irq(1 << 4)]);
    }

    #[test]
    #[should_panic(expected = "invalid AML name segment")]
    fn bad_names_are_bugs() {
        name_string("com1");
    }
}
