//! `${name}` statements of the sql action. Each placeholder becomes a positional parameter
//! (`$1`, `$2`, ... in order of first use), so values are always bound, never pasted into SQL.

use crate::hookpoint::Hookpoint;
use crate::placeholder::Placeholder;

/// A statement ready to run: SQL text with `$n` parameters and what binds to each.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    pub sql: String,
    /// `params[i]` binds `$(i + 1)`.
    pub params: Vec<Placeholder>,
}

impl Statement {
    /// Compiles `text` for `hookpoint`, refusing placeholders that hookpoint cannot fill.
    ///
    /// The scan skips quoted strings, quoted identifiers and comments, and refuses a placeholder
    /// inside quotes (`'${clientid}'` would be the literal text `$1`) and positional `$n`
    /// parameters (they would clash with the ones generated here).
    pub fn compile(text: &str, hookpoint: Hookpoint) -> Result<Statement, String> {
        let mut sql = String::with_capacity(text.len());
        let mut params: Vec<Placeholder> = Vec::new();
        let mut rest = text;
        while let Some(c) = rest.chars().next() {
            if let Some((end, is_comment)) = quoted_len(rest) {
                if !is_comment && rest[..end].contains("${") {
                    return Err(format!(
                        "a placeholder inside quotes is not substituted: write `${{name}}` without quotes (near `{}`)",
                        &rest[..end.min(40)]
                    ));
                }
                sql.push_str(&rest[..end]);
                rest = &rest[end..];
            } else if let Some(body) = rest.strip_prefix("${") {
                let end = body.find('}').ok_or("unterminated `${`")?;
                let name = &body[..end];
                let placeholder = Placeholder::parse(name, hookpoint)?;
                let position = match params.iter().position(|p| *p == placeholder) {
                    Some(i) => i + 1,
                    None => {
                        params.push(placeholder);
                        params.len()
                    }
                };
                sql.push('$');
                sql.push_str(&position.to_string());
                rest = &body[end + 1..];
            } else if c == '$' && rest[1..].starts_with(|d: char| d.is_ascii_digit()) {
                return Err("positional parameters ($1, $2, ...) are not allowed; use ${name} placeholders".into());
            } else {
                sql.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        Ok(Statement { sql, params })
    }
}

/// The length of the quoted string, quoted identifier or comment at the start of `s`, if any,
/// and whether it is a comment.
fn quoted_len(s: &str) -> Option<(usize, bool)> {
    let closing = |open: usize, close: &str| s[open..].find(close).map(|i| open + i + close.len()).unwrap_or(s.len());
    if s.starts_with('\'') {
        // '' inside a string is an escaped quote: two adjacent strings scan the same way.
        Some((closing(1, "'"), false))
    } else if s.starts_with('"') {
        Some((closing(1, "\""), false))
    } else if s.starts_with("--") {
        Some((closing(2, "\n"), true))
    } else if s.starts_with("/*") {
        Some((closing(2, "*/"), true))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_numbered_parameters() {
        let s = Statement::compile(
            "insert into t (a, b, c) values (${clientid}, ${topic}, ${clientid}) -- ${not} a placeholder",
            Hookpoint::SessionSubscribed,
        )
        .unwrap();
        assert_eq!(s.sql, "insert into t (a, b, c) values ($1, $2, $1) -- ${not} a placeholder");
        assert_eq!(s.params, vec![Placeholder::Clientid, Placeholder::Topic]);
    }

    #[test]
    fn strings_and_identifiers_are_left_alone() {
        let s =
            Statement::compile("select 'it''s $', \"odd$col\" from t where x = ${qos}", Hookpoint::SessionSubscribed)
                .unwrap();
        assert_eq!(s.sql, "select 'it''s $', \"odd$col\" from t where x = $1");
    }

    #[test]
    fn mistakes_are_refused() {
        let refused = [
            ("select ${payload}", "not available on session.subscribed"),
            ("select ${nope}", "unknown placeholder"),
            ("select '${clientid}'", "inside quotes"),
            ("select $1", "positional"),
            ("select ${clientid", "unterminated"),
        ];
        for (text, expected) in refused {
            let err = Statement::compile(text, Hookpoint::SessionSubscribed).unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }
}
