//! lib.rs promises that dependencies point one way: protocol, config →
//! router → cluster → server → monitor → binaries, with the client beside them using
//! only protocol and config. This test reads the sources and fails when a
//! module names one that sits to its right.

use std::path::Path;

/// Each layer, and the crate modules it must not name.
const RULES: &[(&str, &[&str])] = &[
    (
        "protocol",
        &[
            "config", "router", "cluster", "server", "monitor", "client", "stats",
        ],
    ),
    (
        "config",
        &["router", "cluster", "server", "monitor", "client", "stats"],
    ),
    (
        "router",
        &["cluster", "server", "monitor", "client", "stats"],
    ),
    ("cluster", &["server", "monitor", "client", "stats"]),
    ("server", &["monitor"]),
    (
        "tls",
        &[
            "protocol", "config", "router", "cluster", "server", "monitor", "client", "stats",
        ],
    ),
    (
        "client",
        &["router", "cluster", "server", "monitor", "stats"],
    ),
];

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("source directory");
    for e in entries {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn dependencies_point_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for (layer, forbidden) in RULES {
        let mut files = Vec::new();
        let dir = src.join(layer);
        if dir.is_dir() {
            sources(&dir, &mut files);
        }
        let single = src.join(format!("{layer}.rs"));
        if single.is_file() {
            files.push(single);
        }
        assert!(!files.is_empty(), "no sources for module {layer}");
        for f in files {
            let text = std::fs::read_to_string(&f).expect("readable source");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for m in forbidden.iter() {
                    if code.contains(&format!("crate::{m}::"))
                        || code.contains(&format!("crate::{m};"))
                    {
                        broken.push(format!(
                            "{}:{}: {layer} names {m}: {}",
                            f.display(),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against lib.rs's layering:\n{}",
        broken.join("\n")
    );
}
