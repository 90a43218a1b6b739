//! House rules checked as a normal test: every Rust file opens with a `//!` line
//! saying what it is for; no file has trailing whitespace, ignored tests or
//! leftover debugging macros; no Rust file is over 500 lines and no function
//! over 80 lines outside tests and the bench tools; no build output is
//! tracked by git.

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

    /// Longest Rust source file, in lines.
    const MAX_FILE_LINES: usize = 500;
    /// Longest function outside tests and the bench tools, in lines.
    const MAX_FN_LINES: usize = 80;

    /// Whether a path holds tests or bench tools, where long functions are
    /// scenarios rather than logic.
    fn is_test_or_bench_tool(shown: &str) -> bool {
        shown.contains("/tests/")
            || shown.contains("/benches/")
            || shown.starts_with("channelbox-bench/")
            || shown == "xtask/src/bench.rs"
    }

    /// The lines (0-based, inclusive ranges) of items marked `#[cfg(test)]`:
    /// from the attribute to the end of the item it marks (a `mod tests;`
    /// declaration, or a body closed by `}` at the attribute's indentation,
    /// as rustfmt lays it out). Only these are exempt: code after a test
    /// module is checked like any other.
    fn test_items(lines: &[&str]) -> Vec<(usize, usize)> {
        let mut items = Vec::new();
        let mut i = 0;
        while i < lines.len() {
            let line = lines[i];
            let trimmed = line.trim_start();
            if !trimmed.starts_with("#[cfg(test)]") {
                i += 1;
                continue;
            }
            let indent = &line[..line.len() - trimmed.len()];
            let close = format!("{indent}}}");
            // The marked item's first line that ends its head: `{` or `;`.
            let head = (i + 1..lines.len()).find(|&j| {
                let t = lines[j].trim_end();
                !lines[j].trim_start().starts_with("#[") && (t.ends_with('{') || t.ends_with(';'))
            });
            let end = match head {
                Some(j) if lines[j].trim_end().ends_with(';') => j,
                Some(j) => (j + 1..lines.len())
                    .find(|&k| lines[k] == close)
                    .unwrap_or(lines.len() - 1),
                None => lines.len() - 1,
            };
            items.push((i, end));
            i = end + 1;
        }
        items
    }

    /// Functions longer than `max` lines, as (name, first line, length). It
    /// relies on rustfmt's layout: a body closes with `}` at the indentation of
    /// its `fn`. Items marked `#[cfg(test)]` (see `test_items`) are not looked
    /// at; everything else in the file is, to its last line.
    fn long_functions(text: &str, max: usize) -> Vec<(String, usize, usize)> {
        let lines: Vec<&str> = text.lines().collect();
        let end = lines.len();
        let exempt = test_items(&lines);
        let in_test = |i: usize| exempt.iter().any(|&(a, b)| (a..=b).contains(&i));
        let mut found = Vec::new();
        for i in 0..end {
            if in_test(i) {
                continue;
            }
            let line = lines[i];
            let indent = &line[..line.len() - line.trim_start().len()];
            let mut words = line.split_whitespace().peekable();
            while words
                .peek()
                .is_some_and(|w| w.starts_with("pub") || ["async", "const", "unsafe"].contains(w))
            {
                words.next();
            }
            if words.next() != Some("fn") {
                continue;
            }
            let name = words
                .next()
                .unwrap_or("")
                .split(['(', '<'])
                .next()
                .unwrap_or("")
                .to_owned();
            // A declaration without a body (a trait's) ends with `;`.
            let Some(open) = (i..end).find(|&j| {
                let t = lines[j].trim_end();
                t.ends_with('{') || t.ends_with(';')
            }) else {
                continue;
            };
            if lines[open].trim_end().ends_with(';') {
                continue;
            }
            let close = format!("{indent}}}");
            if let Some(last) = (open + 1..end).find(|&j| lines[j] == close) {
                let length = last - i + 1;
                if length > max {
                    found.push((name, i + 1, length));
                }
            }
        }
        found
    }

    #[test]
    fn the_function_length_rule_measures_bodies() {
        let short = "fn a() {\n    one();\n}\n";
        assert!(long_functions(short, 3).is_empty());
        let long = format!("pub async fn b(\n    x: u8,\n) {{\n{}}}\n", "    step();\n".repeat(5));
        assert_eq!(long_functions(&long, 5), vec![("b".to_owned(), 1, 9)]);
        let tests = format!("#[cfg(test)]\nmod tests {{\n{long}}}\n");
        assert!(long_functions(&tests, 5).is_empty(), "test modules are exempt");
        // A test module in the middle of a file exempts itself, not what follows.
        let after = format!("#[cfg(test)]\nmod tests {{\n    fn t() {{}}\n}}\n\n{long}");
        assert_eq!(long_functions(&after, 5), vec![("b".to_owned(), 6, 9)]);
        let declared = format!("#[cfg(test)]\nmod tests;\n{long}");
        assert_eq!(long_functions(&declared, 5), vec![("b".to_owned(), 3, 9)]);
        let test_fn = format!(
            "    #[cfg(test)]\n    #[allow(dead_code)]\n    fn helper() {{\n{}    }}\n",
            "        x();\n".repeat(9)
        );
        assert!(long_functions(&test_fn, 5).is_empty(), "a test-only function is exempt");
        assert!(long_functions("    fn declared(&self);\n", 0).is_empty());
    }

    #[test]
    fn no_build_output_is_tracked() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        let out = std::process::Command::new("git")
            .args(["ls-files", "-z"])
            .current_dir(root)
            .output()
            .expect("git runs (the tidy test reads the tracked files)");
        assert!(out.status.success(), "git ls-files failed");
        let tracked = String::from_utf8_lossy(&out.stdout);
        let builds: Vec<&str> = tracked
            .split('\0')
            .filter(|p| p.starts_with("target/") || p.contains("/target/"))
            .collect();
        assert!(builds.is_empty(), "tracked build output: {builds:?}");
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
                let lines = text.lines().count();
                if lines > MAX_FILE_LINES {
                    problems.push(format!("{shown}: {lines} lines (at most {MAX_FILE_LINES})"));
                }
                if !is_test_or_bench_tool(&shown) {
                    for (name, line, length) in long_functions(&text, MAX_FN_LINES) {
                        problems.push(format!(
                            "{shown}:{line}: fn {name} is {length} lines (at most {MAX_FN_LINES})"
                        ));
                    }
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
