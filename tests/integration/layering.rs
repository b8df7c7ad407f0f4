//! The workspace's layering, as the README's "Layout" table states it:
//! every crate depends only on crates listed below it, and the table lists
//! every crate of the workspace. (No KVM needed.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("cli/ has a parent").to_path_buf()
}

/// The crates of the README's layout table, top to bottom: (folder, package).
fn layout_table() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme.split("\n## Layout").nth(1).expect("a Layout section");
    section
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let folder = cells.get(1)?.trim_matches('`').trim_end_matches('/').to_string();
            let package = cells.get(2)?.trim_matches('`').to_string();
            package.starts_with("wanmig").then_some((folder, package))
        })
        .collect()
}

/// The workspace's members and, for each, the wanmig crates it depends on
/// (normal dependencies, and dev-dependencies but for the integration
/// tests' own package, which may use anything).
fn dependencies() -> BTreeMap<String, Vec<String>> {
    let ws: toml::Table = toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml"))
        .expect("root Cargo.toml parses");
    let members = ws["workspace"]["members"].as_array().expect("members");
    let mut out = BTreeMap::new();
    for m in members {
        let dir = m.as_str().expect("member is a path");
        let manifest: toml::Table =
            toml::from_str(&std::fs::read_to_string(root().join(dir).join("Cargo.toml")).expect("member manifest"))
                .expect("member Cargo.toml parses");
        let name = manifest["package"]["name"].as_str().expect("package name").to_string();
        let mut deps = Vec::new();
        let tables: &[&str] = if name == "wanmig" { &["dependencies"] } else { &["dependencies", "dev-dependencies"] };
        for t in tables {
            if let Some(table) = manifest.get(*t).and_then(|v| v.as_table()) {
                deps.extend(table.keys().filter(|k| k.starts_with("wanmig")).cloned());
            }
        }
        out.insert(name, deps);
    }
    out
}

#[test]
fn every_crate_depends_only_on_crates_below_it_in_the_readme() {
    let table = layout_table();
    let deps = dependencies();
    let rank: BTreeMap<&str, usize> = table.iter().enumerate().map(|(i, (_, p))| (p.as_str(), i)).collect();
    for name in deps.keys() {
        assert!(rank.contains_key(name.as_str()), "crate {name} is missing from the README's Layout table");
    }
    for (folder, package) in &table {
        assert!(deps.contains_key(package), "the README lists {package} ({folder}/), which is not a workspace member");
    }
    let mut upward = Vec::new();
    for (name, ds) in &deps {
        for d in ds {
            let (me, it) = (rank[name.as_str()], rank.get(d.as_str()).copied());
            match it {
                None => upward.push(format!("{name} depends on {d}, which the Layout table does not list")),
                Some(it) if it <= me => upward.push(format!("{name} depends on {d}, listed above (or at) it")),
                Some(_) => {}
            }
        }
    }
    assert!(upward.is_empty(), "dependencies that point up the README's Layout table:\n{}", upward.join("\n"));
}

/// The module path (`a::b`) of each `.rs` file under `src`.
fn modules(src: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("source dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src").with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
                parts.pop();
            }
            out.insert(parts.join("::"), p);
        }
    }
    out
}

/// The modules of its crate that a file's code refers to (`crate::a::b`,
/// `super::x`, `self::y`, or a child module by name), excluding itself.
fn references(module: &str, text: &str, mods: &BTreeMap<String, PathBuf>) -> Vec<String> {
    let here: Vec<&str> = if module.is_empty() { Vec::new() } else { module.split("::").collect() };
    let children: Vec<String> = mods
        .keys()
        .filter(|m| m.rsplit_once("::").map_or(here.is_empty() && !m.is_empty(), |(p, _)| p == module))
        .cloned()
        .collect();
    // Comments say nothing about imports, and an in-file test module's
    // `super` is the file itself: read up to the first `#[cfg(test)]`.
    let code: String = text
        .lines()
        .take_while(|l| l.trim() != "#[cfg(test)]")
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |i: usize| i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_');
    let mut i = 0;
    while i < bytes.len() {
        if !ident(i) || (i > 0 && (ident(i - 1) || bytes[i - 1] == b':')) {
            i += 1;
            continue;
        }
        let start = i;
        while ident(i) {
            i += 1;
        }
        let word = &code[start..i];
        let base: Option<Vec<&str>> = match word {
            "crate" => Some(Vec::new()),
            "super" => Some(here[..here.len().saturating_sub(1)].to_vec()),
            "self" => Some(here.clone()),
            w if children.iter().any(|c| c.rsplit("::").next() == Some(w)) => {
                let mut b = here.clone();
                b.push(w);
                i = start; // re-read as the first segment below
                let _ = b;
                Some(here.clone())
            }
            _ => None,
        };
        let Some(base) = base else { continue };
        // `pub(super)`, `pub(crate)`: visibility, not a path.
        if i != start && !code[i..].starts_with("::") {
            continue;
        }
        // The path that follows: segments, or a `{a, b::c}` group.
        let rest = &code[if i == start { start } else { i }..];
        let rest = if i == start { rest } else { rest.strip_prefix("::").unwrap_or("") };
        let firsts: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            group[..end].split(',').map(|s| s.trim()).collect()
        } else {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
            vec![&rest[..end]]
        };
        for path in firsts {
            let mut target = base.clone();
            let mut best = target.join("::");
            for seg in path.split("::").filter(|s| !s.is_empty()) {
                target.push(seg);
                let m = target.join("::");
                if !mods.contains_key(&m) {
                    break;
                }
                best = m;
            }
            // The crate root only declares modules and re-exports; what
            // a file takes from it is not an import between two files.
            if best != module && !best.is_empty() && mods.contains_key(&best) {
                out.push(best);
            }
        }
        if i == start {
            i += word.len();
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn no_crate_has_files_that_import_each_other() {
    let ws: toml::Table = toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml"))
        .expect("root Cargo.toml parses");
    let mut cycles = Vec::new();
    for m in ws["workspace"]["members"].as_array().expect("members") {
        let src = root().join(m.as_str().expect("path")).join("src");
        let mods = modules(&src);
        let graph: BTreeMap<String, Vec<String>> = mods
            .iter()
            .filter(|(name, _)| !name.is_empty())
            .map(|(name, path)| {
                (name.clone(), references(name, &std::fs::read_to_string(path).expect("source"), &mods))
            })
            .collect();
        // A cycle exists iff some module reaches itself.
        for start in graph.keys() {
            let mut seen = std::collections::BTreeSet::new();
            let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
            while let Some((at, trail)) = stack.pop() {
                for next in graph.get(&at).into_iter().flatten() {
                    if next == start {
                        let mut t = trail.clone();
                        t.push(next.clone());
                        cycles.push(format!("{}: {}", m.as_str().unwrap_or("?"), t.join(" -> ")));
                    } else if seen.insert(next.clone()) {
                        let mut t = trail.clone();
                        t.push(next.clone());
                        stack.push((next.clone(), t));
                    }
                }
            }
        }
    }
    cycles.sort();
    cycles.dedup();
    assert!(
        cycles.is_empty(),
        "files of a crate that import each other (a module path of \"\" is the crate root):\n{}",
        cycles.join("\n")
    );
}
