//! `${VAR}` and `$VAR` in the config text, expanded before the YAML is parsed, exactly as Go's
//! `os.ExpandEnv` does it (the Go loraplex calls it on the whole file), so a file written for
//! it reads the same here:
//!
//! - `$NAME` takes the longest run of ASCII letters, digits and `_`; `${NAME}` anything up to
//!   the first `}`; `$1`, `$*`, `$$`... (one shell special character) are names too;
//! - unset variables become the empty string;
//! - a `$` followed by nothing name-like stays as it is (`$`, `$}`, `a$-b`);
//! - `${` with no closing brace and `${}` are dropped.
//!
//! The lookup is a closure so tests (and the fuzzer) never touch the process environment.

/// Expand `text` with `lookup` (`None`: unset, which expands to nothing).
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    if !text.contains('$') {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if after.is_empty() {
            // A trailing `$` is kept.
            out.push('$');
            rest = after;
            break;
        }
        match name_at(after) {
            Name::Var(name, used) => {
                out.push_str(&lookup(name).unwrap_or_default());
                rest = &after[used..];
            }
            Name::Bad(used) => rest = &after[used..],
            Name::Literal => {
                out.push('$');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

enum Name<'a> {
    /// A variable name and how many bytes after the `$` it took.
    Var(&'a str, usize),
    /// Broken `${...` syntax: drop this many bytes after the `$`.
    Bad(usize),
    /// Not a variable: keep the `$`.
    Literal,
}

/// Characters that are a whole name on their own, as in a shell (`$1`, `$*`, `$$`).
fn is_special(b: u8) -> bool {
    matches!(
        b,
        b'*' | b'#' | b'$' | b'@' | b'!' | b'?' | b'-' | b'0'..=b'9'
    )
}

fn is_name_byte(b: u8) -> bool {
    b == b'_' || b.is_ascii_alphanumeric()
}

/// The name that starts `s` (the text right after a `$`; never empty).
fn name_at(s: &str) -> Name<'_> {
    let bytes = s.as_bytes();
    if bytes[0] == b'{' {
        if bytes.len() > 2 && is_special(bytes[1]) && bytes[2] == b'}' {
            return Name::Var(&s[1..2], 3);
        }
        return match s[1..].find('}') {
            Some(0) => Name::Bad(2),
            Some(end) => Name::Var(&s[1..1 + end], end + 2),
            None => Name::Bad(1),
        };
    }
    if is_special(bytes[0]) {
        return Name::Var(&s[..1], 1);
    }
    let len = bytes.iter().take_while(|&&b| is_name_byte(b)).count();
    if len == 0 {
        Name::Literal
    } else {
        Name::Var(&s[..len], len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/usr/gopher".into()),
            "home_1" => Some("/usr/foo".into()),
            "H" => Some("(Value of H)".into()),
            "*" => Some("all the args".into()),
            "$" => Some("PID".into()),
            "#" => Some("NARGS".into()),
            "1" => Some("ARGUMENT1".into()),
            "HF_TOKEN" => Some("hf_abc".into()),
            "weird name" => Some("W".into()),
            _ => None,
        }
    }

    /// The cases of Go's own `TestExpand` (os/env_test.go), plus a few of ours.
    #[test]
    fn matches_go_os_expand() {
        for (input, want) in [
            ("", ""),
            ("$*", "all the args"),
            ("$$", "PID"),
            ("${*}", "all the args"),
            ("$1", "ARGUMENT1"),
            ("${1}", "ARGUMENT1"),
            ("now is the time", "now is the time"),
            ("$HOME", "/usr/gopher"),
            ("$home_1", "/usr/foo"),
            ("${HOME}", "/usr/gopher"),
            ("${H}OME", "(Value of H)OME"),
            (
                "A$$$#$1$H$home_1*B",
                "APIDNARGSARGUMENT1(Value of H)/usr/foo*B",
            ),
            ("start$+middle$^end$", "start$+middle$^end$"),
            ("mixed$|bag$$$", "mixed$|bagPID$"),
            ("$", "$"),
            ("$}", "$}"),
            ("${", ""),
            ("${}", ""),
            // Ours: unset is empty, braces take any name, UTF-8 passes through.
            ("token: \"${HF_TOKEN}\"", "token: \"hf_abc\""),
            ("a${UNSET}b$UNSET.c", "ab.c"),
            ("${weird name}", "W"),
            ("é$HOMEé", "é/usr/gopheré"),
            ("x${HOME", "xHOME"),
            ("$12", "ARGUMENT12"),
        ] {
            assert_eq!(expand(input, env), want, "{input:?}");
        }
    }
}
