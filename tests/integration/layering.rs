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
