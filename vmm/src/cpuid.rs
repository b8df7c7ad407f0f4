//! The CPU features a guest is shown, and hiding some of them (`[cpu] hide`
//! in `vm.toml`).
//!
//! A VM starts from what KVM supports on this host. Hiding a feature clears
//! its CPUID bit so the guest never uses it: the way to run a guest that
//! would use an instruction the host (or, on a software KVM, its emulator)
//! cannot execute, and the way to give VMs that must migrate between
//! different hosts a common baseline. Features that depend on a hidden one
//! are hidden with it (hiding `xsave` hides AVX and the XSAVE leaf).
//!
//! The CPUID is part of the saved vCPU state, so a restored or migrated
//! guest keeps seeing exactly what it booted with.

use kvm_bindings::kvm_cpuid_entry2;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// A feature that can be hidden: its name and where its bit lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feature {
    /// The name used in `vm.toml` (Linux's `/proc/cpuinfo` name).
    pub name: &'static str,
    /// CPUID leaf.
    pub leaf: u32,
    /// Register holding the bit.
    pub reg: Reg,
    /// Bit number.
    pub bit: u8,
    /// Other features that cannot work without this one.
    pub implies: &'static [&'static str],
}

const fn f(name: &'static str, leaf: u32, reg: Reg, bit: u8, implies: &'static [&'static str]) -> Feature {
    Feature { name, leaf, reg, bit, implies }
}

/// Every feature `hide` knows, by name.
pub const FEATURES: &[Feature] = &[
    f("sse3", 1, Reg::Ecx, 0, &[]),
    f("pclmulqdq", 1, Reg::Ecx, 1, &[]),
    f("ssse3", 1, Reg::Ecx, 9, &[]),
    f("fma", 1, Reg::Ecx, 12, &[]),
    f("cx16", 1, Reg::Ecx, 13, &[]),
    f("pcid", 1, Reg::Ecx, 17, &[]),
    f("sse4_1", 1, Reg::Ecx, 19, &[]),
    f("sse4_2", 1, Reg::Ecx, 20, &[]),
    f("x2apic", 1, Reg::Ecx, 21, &[]),
    f("movbe", 1, Reg::Ecx, 22, &[]),
    f("popcnt", 1, Reg::Ecx, 23, &[]),
    f("tsc_deadline_timer", 1, Reg::Ecx, 24, &[]),
    f("aes", 1, Reg::Ecx, 25, &[]),
    f("xsave", 1, Reg::Ecx, 26, &["osxsave", "avx", "fma", "f16c", "avx2", "avx512f"]),
    f("osxsave", 1, Reg::Ecx, 27, &[]),
    f("avx", 1, Reg::Ecx, 28, &["fma", "f16c", "avx2", "avx512f"]),
    f("f16c", 1, Reg::Ecx, 29, &[]),
    f("rdrand", 1, Reg::Ecx, 30, &[]),
    f("fsgsbase", 7, Reg::Ebx, 0, &[]),
    f("bmi1", 7, Reg::Ebx, 3, &[]),
    f("avx2", 7, Reg::Ebx, 5, &[]),
    f("smep", 7, Reg::Ebx, 7, &[]),
    f("bmi2", 7, Reg::Ebx, 8, &[]),
    f("erms", 7, Reg::Ebx, 9, &[]),
    f("invpcid", 7, Reg::Ebx, 10, &[]),
    f("avx512f", 7, Reg::Ebx, 16, &[]),
    f("rdseed", 7, Reg::Ebx, 18, &[]),
    f("adx", 7, Reg::Ebx, 19, &[]),
    f("smap", 7, Reg::Ebx, 20, &[]),
    f("umip", 7, Reg::Ecx, 2, &[]),
    f("pku", 7, Reg::Ecx, 3, &[]),
    f("la57", 7, Reg::Ecx, 16, &[]),
    f("nx", 0x8000_0001, Reg::Edx, 20, &[]),
    f("pdpe1gb", 0x8000_0001, Reg::Edx, 26, &[]),
    f("rdtscp", 0x8000_0001, Reg::Edx, 27, &[]),
];

/// Leaf 0xD describes the XSAVE state components.
const XSAVE_LEAF: u32 = 0xd;

/// The feature called `name`.
pub fn feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// `names` with every feature they imply, each once.
fn closure(names: &[String]) -> Vec<&'static Feature> {
    let mut out: Vec<&'static Feature> = Vec::new();
    let mut todo: Vec<&str> = names.iter().map(String::as_str).collect();
    while let Some(n) = todo.pop() {
        if let Some(f) = feature(n).filter(|f| !out.contains(f)) {
            out.push(f);
            todo.extend_from_slice(f.implies);
        }
    }
    out
}

/// Clears the bits of `names` (and what they imply) in `entries`. Names
/// must have been checked with [`feature`] (the config does).
pub fn hide(entries: &mut [kvm_cpuid_entry2], names: &[String]) {
    let hidden = closure(names);
    let no_xsave = hidden.iter().any(|f| f.name == "xsave");
    for e in entries {
        if no_xsave && e.function == XSAVE_LEAF {
            (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
        }
        // Leaf 7's feature flags are in subleaf 0.
        if e.function == 7 && e.index != 0 {
            continue;
        }
        for f in hidden.iter().filter(|f| f.leaf == e.function) {
            let reg = match f.reg {
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *reg &= !(1u32 << f.bit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax: !0, ebx: !0, ecx: !0, edx: !0, ..Default::default() }
    }

    #[test]
    fn names_are_unique_and_implications_resolve() {
        for (i, f) in FEATURES.iter().enumerate() {
            assert!(FEATURES[i + 1..].iter().all(|g| g.name != f.name), "{} twice", f.name);
            assert!(FEATURES.iter().all(|g| g.name == f.name || (g.leaf, g.bit, g.reg) != (f.leaf, f.bit, f.reg)));
            for i in f.implies {
                assert!(feature(i).is_some(), "{} implies unknown {i}", f.name);
            }
        }
    }

    #[test]
    fn hiding_clears_the_bit_and_what_depends_on_it() {
        let mut e = vec![entry(1, 0), entry(7, 0), entry(7, 1), entry(0xd, 0), entry(0x8000_0001, 0)];
        hide(&mut e, &["cx16".into(), "xsave".into(), "rdtscp".into()]);
        assert_eq!(e[0].ecx, !((1 << 13) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 12) | (1 << 29)));
        assert_eq!(e[0].edx, !0);
        assert_eq!(e[1].ebx, !((1 << 5) | (1 << 16)), "avx2 and avx512f go with xsave");
        assert_eq!(e[2].ebx, !0, "only subleaf 0 of leaf 7 holds these flags");
        assert_eq!((e[3].eax, e[3].ebx, e[3].ecx, e[3].edx), (0, 0, 0, 0));
        assert_eq!(e[4].edx, !(1 << 27));
        let mut untouched = vec![entry(1, 0)];
        hide(&mut untouched, &[]);
        assert_eq!(untouched[0].ecx, !0);
    }
}
