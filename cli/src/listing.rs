//! `dfget --recursive`: the links of an HTML directory index (as served by nginx `autoindex`,
//! Apache `mod_autoindex`, `python -m http.server`), kept only when they point below the
//! directory being downloaded.

use url::Url;

/// One entry of an index page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A file: its URL and its path relative to the listed directory (`/`-separated,
    /// percent-decoded, every segment checked).
    File {
        /// Absolute URL.
        url: Url,
        /// Relative path below the directory.
        rel: String,
    },
    /// A subdirectory (its URL ends with `/`).
    Dir {
        /// Absolute URL.
        url: Url,
        /// Relative path below the directory, without the trailing `/`.
        rel: String,
    },
}

/// A link of the page that is not followed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The `href` as written.
    pub href: String,
    /// Why it is skipped.
    pub reason: &'static str,
}

/// The directory form of `url`: path ending with `/`, no query or fragment.
pub fn as_dir(url: &Url) -> Url {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    if !u.path().ends_with('/') {
        let p = format!("{}/", u.path());
        u.set_path(&p);
    }
    u
}

/// Checks one percent-decoded path segment for use as a file name.
fn safe_segment(seg: &str) -> bool {
    !seg.is_empty() && seg != "." && seg != ".." && !seg.contains(['/', '\\', '\0'])
}

/// Parses the index page `html` of directory `dir` (a URL ending with `/`, see [`as_dir`])
/// and returns its entries directly below `dir` (files and subdirectories) plus the links it
/// skipped: parent and sort links, links with `..` segments, links to other hosts or outside
/// `dir`, and names that are not safe as file names. Entries are unique and sorted.
pub fn parse_index(dir: &Url, html: &str) -> (Vec<Entry>, Vec<Skipped>) {
    let doc = scraper::Html::parse_document(html);
    let mut entries = Vec::new();
    let mut skipped = Vec::new();
    let hrefs = doc.root_element().descendants().filter_map(|n| {
        let el = n.value().as_element()?;
        (el.name() == "a")
            .then(|| el.attr("href"))?
            .map(str::to_owned)
    });
    for href in hrefs {
        let h = href.trim();
        if h.is_empty() || h.starts_with('#') || h.starts_with('?') {
            continue; // anchors and sort links of the index itself
        }
        if h == "../" || h == ".." || h == "./" || h == "." {
            continue; // parent and self
        }
        let raw_path = h.split(['?', '#']).next().unwrap_or("");
        if raw_path
            .split('/')
            .any(|s| s == ".." || s == "%2e%2e" || s == "%2E%2E")
        {
            skipped.push(Skipped {
                href,
                reason: "contains a '..' segment",
            });
            continue;
        }
        let Ok(url) = dir.join(h) else {
            skipped.push(Skipped {
                href,
                reason: "not a valid URL",
            });
            continue;
        };
        if url.scheme() != dir.scheme()
            || url.host_str() != dir.host_str()
            || url.port_or_known_default() != dir.port_or_known_default()
        {
            skipped.push(Skipped {
                href,
                reason: "points to another host",
            });
            continue;
        }
        let Some(rest) = url.path().strip_prefix(dir.path()) else {
            skipped.push(Skipped {
                href,
                reason: "outside the directory being downloaded",
            });
            continue;
        };
        if rest.is_empty() {
            continue; // the directory itself
        }
        let is_dir = rest.ends_with('/');
        let trimmed = rest.trim_end_matches('/');
        let mut segs = Vec::new();
        let mut ok = true;
        for seg in trimmed.split('/') {
            let decoded = percent_decode(seg);
            if !safe_segment(&decoded) {
                ok = false;
                break;
            }
            segs.push(decoded);
        }
        if !ok {
            skipped.push(Skipped {
                href,
                reason: "not a safe file name",
            });
            continue;
        }
        // Only direct children: deeper links are reached through their own directory.
        if segs.len() != 1 {
            skipped.push(Skipped {
                href,
                reason: "not directly in the directory",
            });
            continue;
        }
        let rel = segs.join("/");
        let mut clean = url.clone();
        clean.set_fragment(None);
        entries.push(if is_dir {
            Entry::Dir { url: clean, rel }
        } else {
            Entry::File { url: clean, rel }
        });
    }
    entries.sort_by(|a, b| key(a).cmp(key(b)));
    entries.dedup();
    (entries, skipped)
}

fn key(e: &Entry) -> &str {
    match e {
        Entry::File { rel, .. } | Entry::Dir { rel, .. } => rel,
    }
}

/// Percent-decodes one path segment (invalid UTF-8 is replaced).
fn percent_decode(seg: &str) -> String {
    percent_encoding::percent_decode_str(seg)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> Url {
        Url::parse("http://h:8080/pub/data/").expect("url")
    }

    #[test]
    fn nginx_style_index() {
        let html = r#"<html><body><h1>Index of /pub/data/</h1><pre>
<a href="../">../</a>
<a href="a.bin">a.bin</a>
<a href="sub/">sub/</a>
<a href="with%20space.txt">with space.txt</a>
<a href="?C=N;O=D">Name</a>
<a href="/pub/data/abs.bin">abs</a>
<a href="/etc/passwd">evil</a>
<a href="sub/../../x">evil2</a>
<a href="http://other/x">other</a>
<a href="a.bin">dup</a>
<a href="%2e%2e/y">enc</a>
</pre></body></html>"#;
        let (e, s) = parse_index(&dir(), html);
        let rels: Vec<(&str, bool)> = e
            .iter()
            .map(|e| match e {
                Entry::File { rel, .. } => (rel.as_str(), false),
                Entry::Dir { rel, .. } => (rel.as_str(), true),
            })
            .collect();
        assert_eq!(
            rels,
            vec![
                ("a.bin", false),
                ("abs.bin", false),
                ("sub", true),
                ("with space.txt", false)
            ]
        );
        let skipped: Vec<&str> = s.iter().map(|s| s.href.as_str()).collect();
        assert!(skipped.contains(&"/etc/passwd"));
        assert!(skipped.contains(&"sub/../../x"));
        assert!(skipped.contains(&"http://other/x"));
        assert!(skipped.contains(&"%2e%2e/y"));
    }

    #[test]
    fn decoding() {
        assert_eq!(percent_decode("a%20b"), "a b");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%2F"), "/");
        assert!(!safe_segment(&percent_decode("%2F")));
        assert_eq!(
            as_dir(&Url::parse("http://h/x?q=1").expect("url")).as_str(),
            "http://h/x/"
        );
    }
}
