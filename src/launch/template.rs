//! Batch-script templates: `{{name}}` placeholders, each value quoted for where it lands
//! (`#SBATCH` lines or the shell), and which template is in effect.

use super::LaunchError;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The built-in template (also shipped as docs/examples/launch.sbatch for sites to copy).
pub const BUILTIN_TEMPLATE: &str = include_str!("../../docs/examples/launch.sbatch");
/// The site's template.
pub const SITE_TEMPLATE: &str = "/etc/jobgate/launch.sbatch";
/// The user's template, below `$HOME`.
pub const USER_TEMPLATE: &str = ".config/jobgate/launch.sbatch";

/// Characters that need no quoting, for the shell and for sbatch alike.
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, '_' | '-' | '.' | '/' | ':' | ',' | '+' | '=' | '@' | '%')
}

/// Quotes `s` as one shell word: as is when plain, else in single quotes.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(is_plain) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes `s` as one word of an `#SBATCH` line (sbatch knows double quotes and
/// backslashes, not single quotes); `None` if it cannot be written there (a line break).
pub fn sbatch_quote(s: &str) -> Option<String> {
    if s.contains(['\n', '\r', '\0']) {
        return None;
    }
    if !s.is_empty() && s.chars().all(is_plain) {
        return Some(s.to_owned());
    }
    Some(format!(
        "\"{}\"",
        s.replace('\\', r"\\").replace('"', "\\\"")
    ))
}

/// A template variable's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// One word, quoted where it lands.
    Word(String),
    /// Ready-made text, inserted as it is.
    Raw(String),
}

/// A template that cannot be rendered.
#[derive(Debug, PartialEq, Eq)]
pub struct TemplateError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Fills `{{name}}` placeholders from `vars`. `{{` always opens a placeholder; unknown
/// names, unclosed placeholders and values that cannot go where they stand are errors.
pub fn render(template: &str, vars: &BTreeMap<&str, Value>) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 512);
    for (index, line) in template.split_inclusive('\n').enumerate() {
        let error = |message: String| TemplateError {
            line: index + 1,
            message,
        };
        let sbatch_line = line.starts_with("#SBATCH");
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| error("`{{` without a closing `}}`".into()))?;
            let name = after[..end].trim();
            if !is_name(name) {
                return Err(error(format!(
                    "`{{{{{}}}}}` is not a variable name",
                    &after[..end]
                )));
            }
            match vars.get(name) {
                None => {
                    let known: Vec<&str> = vars.keys().copied().collect();
                    return Err(error(format!(
                        "unknown variable `{{{{{name}}}}}` (known: {})",
                        known.join(", ")
                    )));
                }
                Some(Value::Raw(text)) => out.push_str(text),
                Some(Value::Word(word)) if sbatch_line => {
                    out.push_str(&sbatch_quote(word).ok_or_else(|| {
                        error(format!(
                            "the value of `{{{{{name}}}}}` cannot go on an #SBATCH line"
                        ))
                    })?)
                }
                Some(Value::Word(word)) => out.push_str(&shell_quote(word)),
            }
            rest = &after[end + 2..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Where the template comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSource {
    /// A file (`--template`, the user's, the site's).
    File(PathBuf),
    /// The built-in one.
    Builtin,
}

impl std::fmt::Display for TemplateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(path) => write!(f, "{}", path.display()),
            Self::Builtin => f.write_str("the built-in template"),
        }
    }
}

/// The template in effect: `explicit`, else the first of `candidates` that exists, else
/// the built-in one.
pub fn template_source(explicit: Option<PathBuf>, candidates: &[PathBuf]) -> TemplateSource {
    explicit
        .or_else(|| candidates.iter().find(|p| p.is_file()).cloned())
        .map(TemplateSource::File)
        .unwrap_or(TemplateSource::Builtin)
}

/// The user's, then the site's template path.
pub(super) fn template_candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        paths.push(PathBuf::from(home).join(USER_TEMPLATE));
    }
    paths.push(PathBuf::from(SITE_TEMPLATE));
    paths
}

/// The template's text.
pub(super) fn load_template(source: &TemplateSource) -> Result<String, LaunchError> {
    match source {
        TemplateSource::Builtin => Ok(BUILTIN_TEMPLATE.to_owned()),
        TemplateSource::File(path) => {
            std::fs::read_to_string(path).map_err(|source| LaunchError::Io {
                action: "read the template",
                path: path.clone(),
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::test_util::{bash_words, strings};

    fn vars(pairs: &[(&'static str, Value)]) -> BTreeMap<&'static str, Value> {
        pairs.iter().cloned().collect()
    }

    #[test]
    fn shell_quoting_survives_bash() {
        let nasty = [
            "plain",
            "",
            "two words",
            "it's",
            "'",
            "$(touch /tmp/jobgate-pwned)",
            "`id`",
            "a\"b\\c",
            "line\nbreak",
            "{port}",
            "glob*?[x]",
            "~user",
            "semi;colon&amp|pipe>out",
            "ünïcode",
            "--flag=$HOME",
            "!bang",
        ];
        let line: Vec<String> = nasty.iter().map(|w| shell_quote(w)).collect();
        assert_eq!(bash_words(&line.join(" ")), strings(&nasty));
        assert_eq!(shell_quote("/usr/bin/jobgate"), "/usr/bin/jobgate");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn sbatch_quoting() {
        assert_eq!(sbatch_quote("gpu").as_deref(), Some("gpu"));
        assert_eq!(
            sbatch_quote("/h/u/.jobgate/jobs/%j.out").as_deref(),
            Some("/h/u/.jobgate/jobs/%j.out")
        );
        assert_eq!(sbatch_quote("a b").as_deref(), Some("\"a b\""));
        assert_eq!(
            sbatch_quote(r#"say "hi" \o/ # not a comment"#).as_deref(),
            Some(r#""say \"hi\" \\o/ # not a comment""#)
        );
        assert_eq!(sbatch_quote("x\ny"), None);
    }

    #[test]
    fn templates_fill_and_quote_by_context() {
        let v = vars(&[
            ("name", Value::Word("my job".into())),
            ("dir", Value::Word("/home/a b/it's".into())),
            (
                "block",
                Value::Raw("#SBATCH --time=1:00\n#SBATCH --mem=1G".into()),
            ),
        ]);
        let out = render(
            "#!/bin/bash\n#SBATCH --job-name={{name}}\n{{block}}\ncd {{ dir }} || exit 1\necho {{name}}\n",
            &v,
        )
        .expect("render");
        assert_eq!(
            out,
            "#!/bin/bash\n#SBATCH --job-name=\"my job\"\n#SBATCH --time=1:00\n#SBATCH --mem=1G\n\
             cd '/home/a b/it'\\''s' || exit 1\necho 'my job'\n"
        );
    }

    #[test]
    fn unknown_or_broken_placeholders_are_errors() {
        let v = vars(&[("time", Value::Word("1:00".into()))]);
        let err = render("#!/bin/bash\n\n#SBATCH --time={{tme}}\n", &v).expect_err("unknown");
        assert_eq!(err.line, 3);
        assert!(
            err.message.contains("unknown variable `{{tme}}`"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("time"),
            "lists the known ones: {}",
            err.message
        );
        let err = render("echo {{time\n", &v).expect_err("unclosed");
        assert_eq!(err.line, 1);
        assert!(render("echo {{$HOME}}\n", &v).is_err());
        assert!(render("echo {{}}\n", &v).is_err());
        // A line break cannot go on an #SBATCH line.
        let v = vars(&[("x", Value::Word("a\nb".into()))]);
        assert!(render("#SBATCH --comment={{x}}\n", &v).is_err());
        assert!(render("echo {{x}}\n", &v).is_ok());
        // Text without placeholders comes through unchanged, `${x}` and `{}` included.
        let plain = "#!/bin/bash\necho ${HOME} {} }}\n";
        assert_eq!(render(plain, &v).expect("plain"), plain);
    }
}
