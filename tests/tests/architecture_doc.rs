//! ARCHITECTURE.md names files and types; this test fails when one of them no longer exists,
//! so the map cannot silently drift from the code (rules in the file's last section).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Every `.rs` and `.proto` file under `dir` (skipping build output and hidden folders).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" || name.starts_with("target-") {
            continue;
        }
        if p.is_dir() {
            rust_files(&p, out);
        } else if name.ends_with(".rs") || name.ends_with(".proto") {
            out.push(p);
        }
    }
}

/// The backticked spans of `doc`, outside fenced code blocks.
fn code_spans(doc: &str) -> Vec<String> {
    let mut text = String::new();
    let mut fenced = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            text.push_str(line);
            text.push('\n');
        }
    }
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.trim().to_string())
        .collect()
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn is_camel(s: &str) -> bool {
    is_ident(s)
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars().any(|c| c.is_ascii_lowercase())
}

/// Whether `src` defines `name` as an item (or, with `variants`, as an enum variant).
fn defines(src: &str, name: &str, variants: bool) -> bool {
    const KINDS: [&str; 11] = [
        "struct", "enum", "trait", "type", "fn", "const", "static", "mod", "message", "rpc",
        "service",
    ];
    let ends_ident =
        |rest: &str| !rest.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
    for kind in KINDS {
        let pat = format!("{kind} {name}");
        let mut from = 0;
        while let Some(i) = src[from..].find(&pat) {
            let at = from + i;
            let before_ok =
                at == 0 || !src[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
            if before_ok && ends_ident(&src[at + pat.len()..]) {
                return true;
            }
            from = at + pat.len();
        }
    }
    variants
        && src.lines().any(|l| {
            l.trim_start()
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with([' ', '{', '(', ',']) || rest.is_empty())
        })
}

/// Whether some file matches `pattern`, whose file name may hold one `*`.
fn glob_matches(pattern: &Path) -> bool {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return false;
    };
    let name = name.to_string_lossy();
    let Some((prefix, suffix)) = name.split_once('*') else {
        return pattern.exists();
    };
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() >= prefix.len() + suffix.len() && n.starts_with(prefix) && n.ends_with(suffix)
        })
    })
}

#[test]
fn every_path_and_type_named_in_architecture_md_exists() {
    let root = root();
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md"))
        .expect("ARCHITECTURE.md at the repository root");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let sources: Vec<String> = files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .collect();
    let anywhere = |name: &str, variants: bool| sources.iter().any(|s| defines(s, name, variants));

    let mut missing = Vec::new();
    let mut checked = HashSet::new();
    for span in code_spans(&doc) {
        if span.contains(char::is_whitespace) || !checked.insert(span.clone()) {
            continue;
        }
        let mut parts = span.split("::");
        let head = parts.next().unwrap_or_default();
        let items: Vec<&str> = parts.collect();
        if head.contains('/') {
            // Paths are from the repository root; `../shared/…` lives outside the repository.
            if head.starts_with("../") || head.starts_with('/') || head.contains("://") {
                continue;
            }
            let path = root.join(head.trim_end_matches('/'));
            if head.contains('*') {
                if !glob_matches(&path) {
                    missing.push(format!("`{span}`: no file matches"));
                }
                continue;
            }
            if !path.exists() {
                missing.push(format!("`{span}`: no such path"));
                continue;
            }
            if items.is_empty() {
                continue;
            }
            let mut srcs = Vec::new();
            if path.is_dir() {
                let mut fs = Vec::new();
                rust_files(&path, &mut fs);
                srcs.extend(fs.iter().filter_map(|f| std::fs::read_to_string(f).ok()));
            } else {
                srcs.push(std::fs::read_to_string(&path).unwrap_or_default());
            }
            for item in &items {
                if !is_ident(item) || !srcs.iter().any(|s| defines(s, item, true)) {
                    missing.push(format!("`{span}`: `{item}` is not defined in {head}"));
                }
            }
        } else if is_camel(head) && items.iter().all(|i| is_ident(i)) {
            if !anywhere(head, false) {
                missing.push(format!("`{span}`: no type `{head}` in the workspace"));
            }
            for item in &items {
                if !anywhere(item, true) {
                    missing.push(format!(
                        "`{span}`: no fn or variant `{item}` in the workspace"
                    ));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names things that do not exist (fix the doc or the code):\n{}",
        missing.join("\n")
    );
    assert!(
        checked.len() > 50,
        "ARCHITECTURE.md should name the code it maps"
    );
}

#[test]
fn the_checker_catches_a_missing_name() {
    let src = "pub struct TaskStore {\n}\npub enum Command {\n    Download {\n    },\n}\nfn commit() {}\n";
    assert!(defines(src, "TaskStore", false));
    assert!(!defines(src, "TaskStor", false));
    assert!(!defines(src, "Download", false));
    assert!(defines(src, "Download", true));
    assert!(defines(src, "commit", false));
    assert!(glob_matches(&root().join("tests/tests/architecture_*.rs")));
    assert!(!glob_matches(&root().join("tests/tests/no_such_*.rs")));
    assert_eq!(
        code_spans("a `x` b\n```\n`y`\n```\n`z`"),
        vec!["x".to_string(), "z".to_string()]
    );
}
