//! The layout rule of `src/lib.rs`: every top-level module of `src/` is listed in its Layout
//! section, and a module only imports (`crate::x`, `crate::{x, ...}`) modules listed above it,
//! so the import graph between top-level modules is a DAG that reads top to bottom. Unit tests
//! (`#[cfg(test)] mod tests { ... }` at the end of a file) may import anything.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

const SRC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src");

/// The module names of the Layout list, in order (`//! - [`name`]: ...` or `//! - `name`: ...`).
fn layout() -> Vec<String> {
    let lib = fs::read_to_string(Path::new(SRC).join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! - "))
        .filter_map(|item| {
            let item = item.strip_prefix('[').unwrap_or(item);
            let name = item.strip_prefix('`')?.split('`').next()?;
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
                .then(|| name.to_owned())
        })
        .collect()
}

/// Top-level modules of `src/` (files and directories), `lib` and `main` aside.
fn modules() -> BTreeSet<String> {
    fs::read_dir(SRC)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_stem()?.to_str()?.to_owned();
            (p.is_dir() || p.extension()? == "rs").then_some(name)
        })
        .filter(|n| n != "lib" && n != "main")
        .collect()
}

fn rs_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in fs::read_dir(path).unwrap() {
            rs_files(&e.unwrap().path(), out);
        }
    } else if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// `text` without a trailing `#[cfg(test)] mod tests { ... }`.
fn without_unit_tests(text: &str) -> &str {
    let mut from = 0;
    while let Some(i) = text[from..].find("#[cfg(test)]") {
        let at = from + i;
        let rest = text[at + "#[cfg(test)]".len()..].trim_start();
        if let Some(rest) = rest.strip_prefix("mod tests")
            && rest.trim_start().starts_with('{')
        {
            return &text[..at];
        }
        from = at + 1;
    }
    text
}

fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level names a file's `crate::` paths start with.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The heads of a `crate::{a, b::{c, d}, ...}` group: names at depth 1.
            let (mut depth, mut head) = (1, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => head = true,
                    c if head && depth == 1 && !c.is_whitespace() => {
                        out.insert(ident(&group[j..]).to_owned());
                        head = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest).to_owned());
        }
    }
    out
}

#[test]
fn modules_only_import_modules_listed_above_them() {
    let order = layout();
    let modules = modules();
    let listed: BTreeSet<String> = order.iter().cloned().collect();
    let unlisted: Vec<_> = modules.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "modules missing from the Layout of src/lib.rs: {unlisted:?}"
    );
    let mut wrong = Vec::new();
    for (rank, module) in order.iter().enumerate() {
        let dir = Path::new(SRC).join(module);
        let mut files = Vec::new();
        rs_files(&dir, &mut files);
        rs_files(&dir.with_extension("rs"), &mut files);
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            for target in imports(without_unit_tests(&text)) {
                if target == *module || !modules.contains(&target) {
                    continue;
                }
                let above = order[..rank].contains(&target);
                if !above {
                    let file = file.strip_prefix(SRC).unwrap().display().to_string();
                    wrong.push(format!("{module} imports {target} (in src/{file})"));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports of a module listed below (or not listed) in the Layout of src/lib.rs:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_checker_sees_imports() {
    let text = "use crate::{a, b::{c, d}, e::f};\nlet x = crate::g::h();\n\
                #[cfg(test)]\nmod tests {\n    use crate::z;\n}\n";
    let found = imports(without_unit_tests(text));
    let want: BTreeSet<String> = ["a", "b", "e", "g"].map(String::from).into();
    assert_eq!(found, want);
    assert!(layout().starts_with(&["error".to_owned(), "config".to_owned()]));
}
