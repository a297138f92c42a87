//! Config files in TOML: every problem reported at once, each as `line N: message`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// A configuration problem, one line each for `config check`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Problem(pub String);

/// Parses a config file's text, each problem naming `path`.
pub fn parse_named<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<T, Vec<Problem>> {
    parse_toml(text).map_err(|problems| {
        problems
            .into_iter()
            .map(|e| Problem(format!("{}: {e}", path.display())))
            .collect()
    })
}

/// Reads a config file's text, or the one problem of not being able to.
pub fn read(path: &Path) -> Result<String, Vec<Problem>> {
    std::fs::read_to_string(path)
        .map_err(|e| vec![Problem(format!("{}: cannot read: {e}", path.display()))])
}

/// Makes the data directory (and its parents) if it is not there.
pub fn create_data_dir(path: &Path) -> Result<(), crate::StartupError> {
    std::fs::create_dir_all(path).map_err(|source| crate::StartupError::DataDir {
        path: path.to_path_buf(),
        source,
    })
}

/// Makes a path given relative to a config file's folder `base` absolute.
pub fn resolve(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

/// `config check`'s answer: `FILE: ok` and success, or each problem on a line of stderr and
/// failure.
pub fn check_report<T>(file: &Path, loaded: Result<T, Vec<Problem>>) -> ExitCode {
    match loaded {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for p in problems {
                eprintln!("{p}");
            }
            ExitCode::FAILURE
        }
    }
}

/// One line for a TOML error: `line N: message` (the message names the key or value).
pub fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", message.trim())
        }
        None => message.trim().to_owned(),
    }
}

/// Parses a TOML config, reporting every problem serde finds rather than only the first, one
/// `line N: message` each.
///
/// serde stops at its first error. So after each one, the `key = value` entry it points at is
/// blanked (its bytes replaced with spaces, newlines kept, so later problems keep their line
/// numbers) and the text parsed again. It stops when the text parses, when an error cannot be
/// pinned to one entry (a syntax error, a whole table), or when the only problem left is a
/// required key it blanked itself, which would be a problem of its own making. Problems come
/// in the file's order.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Vec<String>> {
    const PROBLEMS_MAX: usize = 64;
    let mut work = text.to_owned();
    let mut problems = Vec::new();
    let mut blanked: Vec<String> = Vec::new();
    while problems.len() < PROBLEMS_MAX {
        let e = match toml::from_str::<T>(&work) {
            Ok(value) if problems.is_empty() => return Ok(value),
            Ok(_) => break,
            Err(e) => e,
        };
        if blanked
            .iter()
            .any(|key| e.message().contains(&format!("missing field `{key}`")))
        {
            break;
        }
        let problem = describe_toml_error(&work, &e);
        if problems.iter().any(|(_, p)| *p == problem) {
            break; // blanking made no progress
        }
        problems.push((e.span().map_or(0, |at| at.start), problem));
        // An empty span (a required key missing from the top level) holds no entry.
        let Some((range, key)) = e
            .span()
            .filter(|at| !at.is_empty())
            .and_then(|at| entry_at(&work, at))
        else {
            break;
        };
        let mut bytes = std::mem::take(&mut work).into_bytes();
        for b in &mut bytes[range] {
            if *b != b'\n' && *b != b'\r' {
                *b = b' ';
            }
        }
        // Only ASCII bytes were written over whole entries, so the text stays UTF-8; a text
        // that no longer parses as TOML ends the search (a dotted key, an inline table).
        match String::from_utf8(bytes) {
            Ok(t) if toml::de::DeTable::parse(&t).is_ok() => work = t,
            _ => break,
        }
        blanked.push(key);
    }
    // In the file's order, not serde's (blanking keeps every byte where it was).
    problems.sort_by_key(|(at, _)| *at);
    Err(problems.into_iter().map(|(_, p)| p).collect())
}

/// The byte range of the innermost `key = value` entry holding all of `at`, and its key.
fn entry_at(text: &str, at: std::ops::Range<usize>) -> Option<(std::ops::Range<usize>, String)> {
    type Best = Option<(std::ops::Range<usize>, String)>;
    fn walk(table: &toml::de::DeTable<'_>, at: &std::ops::Range<usize>, best: &mut Best) {
        for (key, value) in table.iter() {
            let range = key.span().start..value.span().end;
            if range.start <= at.start
                && at.end <= range.end
                && best.as_ref().is_none_or(|(b, _)| range.len() < b.len())
            {
                *best = Some((range, key.get_ref().to_string()));
            }
            walk_value(value.get_ref(), at, best);
        }
    }
    fn walk_value(value: &toml::de::DeValue<'_>, at: &std::ops::Range<usize>, best: &mut Best) {
        match value {
            toml::de::DeValue::Table(t) => walk(t, at, best),
            toml::de::DeValue::Array(items) => {
                for item in items.iter() {
                    walk_value(item.get_ref(), at, best);
                }
            }
            _ => {}
        }
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut best = None;
    walk(doc.get_ref(), &at, &mut best);
    best
}
