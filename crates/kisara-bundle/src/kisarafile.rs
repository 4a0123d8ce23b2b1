//! The Kisarafile (also read under the name `Kubefile`): how a bundle is built.
//!
//! ```text
//! FROM scratch | <bundle>       first instruction (only ARG may come before it)
//! ARG NAME[=default]            build-time variable, overridden by --build-arg
//! ENV K=V [K2=V2 ...] | ENV K V bundle environment (also seen by RUN and CMD)
//! LABEL k=v [k2=v2 ...]
//! COPY SRC... DEST              from the build context into the bundle's work tree
//! RUN command                   a shell command in the work tree, at build time
//! APP name path                 a compose file or a Kisara service spec
//! IMAGE ref                     an extra image to carry
//! LAUNCH app [app ...]          the apps `bundle up` launches (default: all, in APP order)
//! CMD command | CMD ["a","b"]   run on the operator's machine once the apps are up
//! ```
//! `#` starts a comment line; a trailing `\` continues an instruction on the next line.
//! `$VAR`, `${VAR}` and `${VAR:-default}` are expanded from ARG and ENV at build time (an
//! unknown variable is an error rather than a silent empty string), except in RUN and CMD,
//! whose shell expands them from its environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{BundleError, Result};

/// File names a build looks for in its context, in order.
pub const FILE_NAMES: [&str; 2] = ["Kisarafile", "Kubefile"];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// `None` for `scratch`.
    From(Option<String>),
    Arg {
        name: String,
        default: Option<String>,
    },
    Env(Vec<(String, String)>),
    Label(Vec<(String, String)>),
    Copy {
        sources: Vec<String>,
        dest: String,
    },
    Run(String),
    App {
        name: String,
        path: String,
    },
    Image(String),
    Launch(Vec<String>),
    /// An argv (exec form) or `sh -c` of the text (shell form).
    Cmd(Vec<String>),
}

/// One instruction and the line it starts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub instruction: Instruction,
}

/// A parsed Kisarafile.
#[derive(Debug, Clone)]
pub struct Kisarafile {
    pub path: PathBuf,
    pub steps: Vec<Step>,
}

impl Kisarafile {
    pub fn read(path: &Path) -> Result<Kisarafile> {
        let text = std::fs::read_to_string(path).map_err(|e| BundleError::Kisarafile {
            file: path.to_path_buf(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        parse(path, &text)
    }

    /// The Kisarafile (or Kubefile) in a build context directory.
    pub fn find_in(dir: &Path) -> Option<PathBuf> {
        FILE_NAMES.iter().map(|n| dir.join(n)).find(|p| p.is_file())
    }
}

/// Parses a Kisarafile's text; `path` only names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Kisarafile> {
    let err = |line: usize, message: String| BundleError::Kisarafile {
        file: path.to_path_buf(),
        line,
        message,
    };
    let mut steps = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    let mut lines = text.lines().enumerate().peekable();
    while let Some((idx, raw)) = lines.next() {
        let number = idx + 1;
        let trimmed = raw.trim();
        // Comment lines are dropped, also in the middle of a continued instruction.
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix('\\') {
            Some(b) => (true, b.trim_end()),
            None => (false, trimmed),
        };
        let (start, mut logical) = pending.take().unwrap_or((number, String::new()));
        if !logical.is_empty() && !body.is_empty() {
            logical.push(' ');
        }
        logical.push_str(body);
        if continues && lines.peek().is_some() {
            pending = Some((start, logical));
            continue;
        }
        if continues {
            return Err(err(start, "the file ends in a line continuation".into()));
        }
        if logical.trim().is_empty() {
            continue;
        }
        let instruction = parse_instruction(&logical).map_err(|m| err(start, m))?;
        steps.push(Step {
            line: start,
            instruction,
        });
    }
    // FROM comes first; only ARG may precede it (to parameterise the base).
    match steps
        .iter()
        .find(|s| !matches!(s.instruction, Instruction::Arg { .. }))
    {
        Some(Step {
            instruction: Instruction::From(_),
            ..
        }) => {}
        Some(s) => return Err(err(s.line, "the first instruction must be FROM".into())),
        None => return Err(err(1, "no FROM instruction".into())),
    }
    if let Some(second) = steps
        .iter()
        .filter(|s| matches!(s.instruction, Instruction::From(_)))
        .nth(1)
    {
        return Err(err(second.line, "only one FROM is allowed".into()));
    }
    Ok(Kisarafile {
        path: path.to_path_buf(),
        steps,
    })
}

fn parse_instruction(line: &str) -> std::result::Result<Instruction, String> {
    let (keyword, rest) = match line.split_once(char::is_whitespace) {
        Some((k, r)) => (k, r.trim()),
        None => (line, ""),
    };
    let need = |what: &str| format!("{} needs {what}", keyword.to_ascii_uppercase());
    match keyword.to_ascii_uppercase().as_str() {
        "FROM" => {
            let words = split_words(rest)?;
            match words.as_slice() {
                [w] if w == "scratch" => Ok(Instruction::From(None)),
                [w] => Ok(Instruction::From(Some(w.clone()))),
                _ => Err(need("exactly one argument: scratch or a bundle name")),
            }
        }
        "ARG" => {
            let words = split_words(rest)?;
            let [w] = words.as_slice() else {
                return Err(need("one NAME or NAME=default"));
            };
            let (name, default) = match w.split_once('=') {
                Some((n, d)) => (n.to_string(), Some(d.to_string())),
                None => (w.clone(), None),
            };
            check_var_name(&name)?;
            Ok(Instruction::Arg { name, default })
        }
        "ENV" | "LABEL" => {
            let words = split_words(rest)?;
            if words.is_empty() {
                return Err(need("KEY=VALUE pairs"));
            }
            let pairs = if keyword.eq_ignore_ascii_case("ENV")
                && !words[0].contains('=')
                && words.len() >= 2
            {
                // The old `ENV KEY value with spaces` form.
                let value = split_value_after_key(rest);
                vec![(words[0].clone(), value)]
            } else {
                words
                    .iter()
                    .map(|w| {
                        w.split_once('=')
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .ok_or_else(|| format!("expected KEY=VALUE, found {w:?}"))
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?
            };
            if keyword.eq_ignore_ascii_case("ENV") {
                for (k, _) in &pairs {
                    check_var_name(k)?;
                }
                Ok(Instruction::Env(pairs))
            } else {
                if let Some((k, _)) = pairs.iter().find(|(k, _)| k.is_empty()) {
                    return Err(format!("empty label key in {k:?}"));
                }
                Ok(Instruction::Label(pairs))
            }
        }
        "COPY" => {
            let mut words = list_or_words(rest)?;
            if words.len() < 2 {
                return Err(need("at least one source and a destination"));
            }
            let dest = words.pop().unwrap_or_default();
            Ok(Instruction::Copy {
                sources: words,
                dest,
            })
        }
        "RUN" => {
            if rest.is_empty() {
                return Err(need("a command"));
            }
            if rest.starts_with('[') {
                let argv = json_list(rest)?;
                Ok(Instruction::Run(
                    argv.iter()
                        .map(|a| shell_quote(a))
                        .collect::<Vec<_>>()
                        .join(" "),
                ))
            } else {
                Ok(Instruction::Run(rest.to_string()))
            }
        }
        "APP" => {
            let words = split_words(rest)?;
            let [name, path] = words.as_slice() else {
                return Err(need("a name and a path: APP name path"));
            };
            check_app_name(name)?;
            let path = path.strip_prefix("local://").unwrap_or(path).to_string();
            Ok(Instruction::App {
                name: name.clone(),
                path,
            })
        }
        "IMAGE" => {
            let words = split_words(rest)?;
            let [r] = words.as_slice() else {
                return Err(need("one image reference"));
            };
            Ok(Instruction::Image(r.clone()))
        }
        "LAUNCH" => {
            let apps = list_or_words(rest)?;
            if apps.is_empty() {
                return Err(need("at least one app name"));
            }
            for a in &apps {
                check_app_name(a)?;
            }
            Ok(Instruction::Launch(apps))
        }
        "CMD" => {
            if rest.is_empty() {
                return Err(need("a command"));
            }
            if rest.starts_with('[') {
                let argv = json_list(rest)?;
                if argv.is_empty() {
                    return Err(need("a non-empty command"));
                }
                Ok(Instruction::Cmd(argv))
            } else {
                Ok(Instruction::Cmd(vec![
                    "sh".into(),
                    "-c".into(),
                    rest.to_string(),
                ]))
            }
        }
        "" => Err("empty instruction".into()),
        other => Err(format!("unknown instruction {other}")),
    }
}

fn check_var_name(name: &str) -> std::result::Result<(), String> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid variable name {name:?}"))
    }
}

/// App names become container labels and module names: keep them plain.
pub fn check_app_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid app name {name:?} (letters, digits, '-', '_', '.'; up to 63)"
        ))
    }
}

/// `["a", "b"]` (JSON) or shell-like words.
fn list_or_words(s: &str) -> std::result::Result<Vec<String>, String> {
    if s.starts_with('[') {
        json_list(s)
    } else {
        split_words(s)
    }
}

fn json_list(s: &str) -> std::result::Result<Vec<String>, String> {
    serde_json::from_str::<Vec<String>>(s).map_err(|e| format!("invalid JSON list: {e}"))
}

/// The rest of `ENV KEY value with spaces` after the key, unquoted.
fn split_value_after_key(rest: &str) -> String {
    let after = rest
        .split_once(char::is_whitespace)
        .map_or("", |(_, v)| v.trim());
    split_words(after)
        .map(|w| w.join(" "))
        .unwrap_or_else(|_| after.to_string())
}

/// Splits on whitespace, honouring single quotes, double quotes and backslash escapes.
pub fn split_words(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Expands `$VAR`, `${VAR}` and `${VAR:-default}` from `vars`; `$$` is a literal `$`.
/// An unknown variable without a default is an error naming it.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> std::result::Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r
                .find('}')
                .ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
            let inner = &r[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            match (
                vars.get(name)
                    .filter(|v| !v.is_empty() || default.is_none()),
                default,
            ) {
                (Some(v), _) => out.push_str(v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => return Err(format!("undefined variable {name}")),
            }
            rest = &r[end + 1..];
        } else {
            let len = after
                .char_indices()
                .find(|&(i, c)| {
                    !(c.is_ascii_alphanumeric() || c == '_') || (i == 0 && c.is_ascii_digit())
                })
                .map_or(after.len(), |(i, _)| i);
            if len == 0 {
                out.push('$');
                rest = after;
            } else {
                let name = &after[..len];
                let v = vars
                    .get(name)
                    .ok_or_else(|| format!("undefined variable {name}"))?;
                out.push_str(v);
                rest = &after[len..];
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Instruction as I;

    fn p(text: &str) -> Result<Kisarafile> {
        parse(Path::new("Kisarafile"), text)
    }

    fn steps(text: &str) -> Vec<Instruction> {
        p(text)
            .unwrap_or_else(|e| panic!("{text:?}: {e}"))
            .steps
            .into_iter()
            .map(|s| s.instruction)
            .collect()
    }

    #[test]
    fn instructions_table() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let cases: Vec<(&str, Instruction)> = vec![
            ("FROM scratch", I::From(None)),
            ("from base:1.0", I::From(Some("base:1.0".into()))),
            (
                "ARG VERSION=1.2",
                I::Arg {
                    name: "VERSION".into(),
                    default: Some("1.2".into()),
                },
            ),
            (
                "ARG X",
                I::Arg {
                    name: "X".into(),
                    default: None,
                },
            ),
            (
                r#"ENV A=1 B="two words""#,
                I::Env(vec![
                    ("A".into(), "1".into()),
                    ("B".into(), "two words".into()),
                ]),
            ),
            (
                "ENV GREETING hello there",
                I::Env(vec![("GREETING".into(), "hello there".into())]),
            ),
            (
                "LABEL org.example.team=ctf tier=2",
                I::Label(vec![
                    ("org.example.team".into(), "ctf".into()),
                    ("tier".into(), "2".into()),
                ]),
            ),
            (
                "COPY a.yaml b/ dest/",
                I::Copy {
                    sources: s(&["a.yaml", "b/"]),
                    dest: "dest/".into(),
                },
            ),
            (
                r#"COPY ["with space.yaml", "d"]"#,
                I::Copy {
                    sources: s(&["with space.yaml"]),
                    dest: "d".into(),
                },
            ),
            ("RUN echo hi > x", I::Run("echo hi > x".into())),
            (r#"RUN ["touch", "a b"]"#, I::Run("touch 'a b'".into())),
            (
                "APP web local://compose.yaml",
                I::App {
                    name: "web".into(),
                    path: "compose.yaml".into(),
                },
            ),
            (
                "IMAGE 127.0.0.1:5000/x/y:1",
                I::Image("127.0.0.1:5000/x/y:1".into()),
            ),
            ("LAUNCH web db", I::Launch(s(&["web", "db"]))),
            (r#"LAUNCH ["web"]"#, I::Launch(s(&["web"]))),
            ("CMD echo up", I::Cmd(s(&["sh", "-c", "echo up"]))),
            (r#"CMD ["echo", "up"]"#, I::Cmd(s(&["echo", "up"]))),
        ];
        for (line, want) in cases {
            let text = if line.to_ascii_uppercase().starts_with("FROM") {
                line.to_string()
            } else {
                format!("FROM scratch\n{line}")
            };
            let got = steps(&text);
            assert_eq!(got.last(), Some(&want), "{line}");
        }
    }

    #[test]
    fn comments_continuations_and_line_numbers() {
        let k = p("# a bundle\n\nFROM scratch\nRUN echo a \\\n  # inner comment\n  && echo b\nAPP web \\\n   compose.yaml\n")
            .unwrap();
        assert_eq!(k.steps.len(), 3);
        assert_eq!(k.steps[0].line, 3);
        assert_eq!(k.steps[1].line, 4);
        assert_eq!(k.steps[1].instruction, I::Run("echo a && echo b".into()));
        assert_eq!(k.steps[2].line, 7);
    }

    #[test]
    fn errors_name_file_and_line() {
        let cases = [
            ("FROM scratch\nFETCH x", 2, "unknown instruction FETCH"),
            ("FROM scratch\n\nAPP onlyname", 3, "APP needs"),
            (
                "APP web x.yaml\nFROM scratch",
                1,
                "first instruction must be FROM",
            ),
            ("", 1, "no FROM"),
            ("FROM scratch\nFROM other", 2, "only one FROM"),
            ("FROM scratch\nENV 1BAD=x", 2, "invalid variable name"),
            ("FROM scratch\nLABEL novalue", 2, "KEY=VALUE"),
            ("FROM scratch\nCOPY onlyone", 2, "at least one source"),
            ("FROM scratch\nRUN echo 'open", 2, ""),
            ("FROM scratch\nAPP bad/name x.yaml", 2, "invalid app name"),
            ("FROM scratch\nRUN a \\", 2, "ends in a line continuation"),
            ("FROM scratch\nCMD [\"x\"", 2, "invalid JSON list"),
            ("FROM a b", 1, "exactly one argument"),
        ];
        for (text, line, needle) in cases {
            match p(text) {
                Err(BundleError::Kisarafile {
                    file,
                    line: l,
                    message,
                }) => {
                    assert_eq!(file, Path::new("Kisarafile"), "{text}");
                    assert_eq!(l, line, "{text}: {message}");
                    assert!(message.contains(needle), "{text}: {message}");
                }
                other => {
                    // A RUN with an unterminated quote is the shell's business, not ours.
                    if needle.is_empty() {
                        continue;
                    }
                    panic!("{text:?}: expected an error, got {other:?}")
                }
            }
        }
        let e = p("FROM scratch\nBOGUS").unwrap_err().to_string();
        assert!(e.starts_with("Kisarafile:2: "), "{e}");
    }

    #[test]
    fn arg_may_precede_from() {
        let got = steps("ARG BASE=scratch\nFROM ${BASE}");
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn expansion() {
        let vars: BTreeMap<String, String> = [("A", "1"), ("NAME", "web"), ("EMPTY", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let cases = [
            ("plain", Ok("plain")),
            ("$A-${NAME}", Ok("1-web")),
            ("${MISSING:-dflt}", Ok("dflt")),
            ("${EMPTY:-dflt}", Ok("dflt")),
            ("cost $$5", Ok("cost $5")),
            ("end$", Ok("end$")),
            ("$NAME.yaml", Ok("web.yaml")),
            ("$MISSING", Err("undefined variable MISSING")),
            ("${A", Err("unterminated")),
        ];
        for (input, want) in cases {
            let got = expand(input, &vars);
            match want {
                Ok(w) => assert_eq!(got.as_deref(), Ok(w), "{input}"),
                Err(needle) => assert!(got.unwrap_err().contains(needle), "{input}"),
            }
        }
    }

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"a "b c" 'd e' f\ g"#).unwrap(),
            ["a", "b c", "d e", "f g"]
        );
        assert!(split_words("'x").is_err());
    }
}
