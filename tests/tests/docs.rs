//! The documentation's relative links resolve: every `[text](path)` and
//! `[text](path#section)` in README.md and docs/ names a file of the
//! repository and, with a section, a heading of that file (GitHub's anchor
//! of it). Links to other sites are not followed (nothing outside this
//! machine is reached).

use std::path::{Path, PathBuf};

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace").to_owned()
}

/// The targets of the Markdown links in `text`, in order.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("](") {
        rest = &rest[start + 2..];
        if let Some(end) = rest.find(')') {
            found.push(rest[..end].trim().to_owned());
            rest = &rest[end..];
        }
    }
    found
}

/// GitHub's anchor of a heading: lower case, punctuation dropped but for
/// `-` and `_`, spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    let mut fenced = false;
    let mut found = Vec::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            found.push(anchor(line.trim_start_matches('#')));
        }
    }
    found
}

fn every_relative_link_in_the_docs_resolves() {
    let root = repository();
    let mut pages = vec![root.join("README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let (mut checked, mut broken) = (0, Vec::new());
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, section) = link.split_once('#').unwrap_or((&link, ""));
            let target =
                if file.is_empty() { page.clone() } else { page.parent().unwrap().join(file) };
            let named = page.strip_prefix(&root).unwrap().display();
            if !target.exists() {
                broken.push(format!("{named}: {link}: no such file"));
            } else if !section.is_empty()
                && target.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&target).unwrap()).iter().any(|a| a == section)
            {
                broken.push(format!("{named}: {link}: no such section"));
            }
        }
    }
    println!("FIGURE {checked} relative links in {} pages, {} broken", pages.len(), broken.len());
    assert!(checked > 5, "the link finder found almost nothing");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    // The checker itself: a link that does not resolve is found.
    assert_eq!(links("see [a](b.md#c) and [d](e)"), ["b.md#c", "e"]);
    assert_eq!(anchor(" Least connections: an even spread"), "least-connections-an-even-spread");
}

tests::root_tests!(every_relative_link_in_the_docs_resolves);
