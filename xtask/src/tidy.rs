//! House rules checked as a normal test: every Rust file opens with a `//!` line
//! saying what it is for, and no file has trailing whitespace, ignored tests or
//! leftover debugging macros.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn workspace_files(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" || name == "node_modules" || name == "channelbox-data" {
                continue;
            }
            if path.is_dir() {
                workspace_files(&path, out);
            } else if ["rs", "toml", "md", "html", "js", "sh"]
                .iter()
                .any(|ext| path.extension().is_some_and(|e| e == *ext))
            {
                out.push(path);
            }
        }
    }

    #[test]
    fn house_rules_hold() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let mut files = Vec::new();
        workspace_files(root, &mut files);
        assert!(files.len() > 10, "found the workspace's files");
        // Spelled in pieces so that this file does not trip its own rules.
        let ignore_attr = concat!("#[", "ignore");
        let dbg_macro = concat!("dbg", "!(");
        let mut problems = Vec::new();
        for path in files {
            let text = std::fs::read_to_string(&path).expect("readable file");
            let shown = path.strip_prefix(root).unwrap_or(&path).display().to_string();
            if path.extension().is_some_and(|e| e == "rs") {
                if !text.starts_with("//!") {
                    problems.push(format!("{shown}: does not start with a `//!` line"));
                }
                if text.contains(ignore_attr) {
                    problems.push(format!("{shown}: has an ignored test"));
                }
                if text.contains(dbg_macro) {
                    problems.push(format!("{shown}: has a debugging macro"));
                }
            }
            for (i, line) in text.lines().enumerate() {
                if line.ends_with(' ') || line.ends_with('\t') {
                    problems.push(format!("{shown}:{}: trailing whitespace", i + 1));
                }
            }
        }
        assert!(problems.is_empty(), "house rules broken:\n{}", problems.join("\n"));
    }
}
