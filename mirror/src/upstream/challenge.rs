//! `WWW-Authenticate` parsing (RFC 9110 §11.6.1).
//!
//! One header value may hold several challenges (`Basic realm="a", Bearer realm="b"`), and the
//! comma separates both challenges and their parameters, so the parser decides per element
//! whether it starts a new challenge (a token not followed by `=`) or continues the current one.
//! Registries send malformed values often enough that the parser is lenient: it never fails,
//! it skips what it cannot read.

use std::fmt;

/// One authentication challenge. Scheme and parameter names are lowercased.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: String,
    pub params: Vec<(String, String)>,
    /// The `token68` form (`Negotiate abc==`), used by no registry but legal.
    pub token68: Option<String>,
}

impl Challenge {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn is_scheme(&self, scheme: &str) -> bool {
        self.scheme.eq_ignore_ascii_case(scheme)
    }
}

/// Formats the challenge the way it would appear in a header, quoting every parameter value.
impl fmt::Display for Challenge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme)?;
        if let Some(t) = &self.token68 {
            return write!(f, " {t}");
        }
        for (i, (k, v)) in self.params.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { "," })?;
            write!(f, "{k}=\"")?;
            for c in v.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        Ok(())
    }
}

/// Parses every challenge in one `WWW-Authenticate` value.
pub fn parse(value: &str) -> Vec<Challenge> {
    let mut p = Parser { s: value.chars().collect(), pos: 0 };
    let mut out = Vec::new();
    loop {
        p.skip_while(|c| c == ',' || is_ows(c));
        if p.peek().is_none() {
            return out;
        }
        let scheme = p.token();
        if scheme.is_empty() {
            // Not a token character: skip it rather than give up on the rest of the header.
            p.pos += 1;
            continue;
        }
        let mut ch = Challenge { scheme: scheme.to_ascii_lowercase(), ..Challenge::default() };
        if p.peek().is_some_and(is_ows) {
            p.skip_while(is_ows);
            ch.token68 = p.try_token68();
            if ch.token68.is_none() {
                p.params(&mut ch.params);
            }
        }
        out.push(ch);
    }
}

/// Parses all the values of a `WWW-Authenticate` header (it may be repeated).
pub fn parse_all<'a>(values: impl IntoIterator<Item = &'a http::HeaderValue>) -> Vec<Challenge> {
    values.into_iter().flat_map(|v| parse(&String::from_utf8_lossy(v.as_bytes()))).collect()
}

struct Parser {
    s: Vec<char>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.s.get(self.pos).copied()
    }

    fn skip_while(&mut self, f: impl Fn(char) -> bool) {
        while self.peek().is_some_and(&f) {
            self.pos += 1;
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> String {
        let start = self.pos;
        self.skip_while(f);
        self.s.get(start..self.pos).map(|s| s.iter().collect()).unwrap_or_default()
    }

    fn token(&mut self) -> String {
        self.take_while(is_tchar)
    }

    /// A token68 is only recognised when it is the whole credential: followed by the end,
    /// or by a comma that starts the next challenge.
    fn try_token68(&mut self) -> Option<String> {
        let start = self.pos;
        let body = self.take_while(is_token68_char);
        let pad = self.take_while(|c| c == '=');
        self.skip_while(is_ows);
        if !body.is_empty() && matches!(self.peek(), None | Some(',')) {
            return Some(body + &pad);
        }
        self.pos = start;
        None
    }

    /// Reads `name=value` pairs until something that is not one: that is the next challenge.
    fn params(&mut self, params: &mut Vec<(String, String)>) {
        loop {
            self.skip_while(|c| c == ',' || is_ows(c));
            let start = self.pos;
            let name = self.token();
            self.skip_while(is_ows);
            if name.is_empty() || self.peek() != Some('=') {
                self.pos = start;
                return;
            }
            self.pos += 1;
            self.skip_while(is_ows);
            let value = if self.peek() == Some('"') { self.quoted() } else { self.token() };
            params.push((name.to_ascii_lowercase(), value));
            self.skip_while(is_ows);
            match self.peek() {
                Some(',') => self.pos += 1,
                // Junk after a value: drop it up to the next comma so later params survive.
                Some(_) => self.skip_while(|c| c != ','),
                None => return,
            }
        }
    }

    /// A quoted-string with backslash escapes; an unterminated one runs to the end.
    fn quoted(&mut self) -> String {
        self.pos += 1;
        let mut out = String::new();
        while let Some(c) = self.peek() {
            self.pos += 1;
            match c {
                '"' => return out,
                '\\' => {
                    if let Some(next) = self.peek() {
                        out.push(next);
                        self.pos += 1;
                    }
                }
                c => out.push(c),
            }
        }
        out
    }
}

fn is_ows(c: char) -> bool {
    c == ' ' || c == '\t'
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn is_token68_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/".contains(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ch(scheme: &str, params: &[(&str, &str)]) -> Challenge {
        Challenge {
            scheme: scheme.into(),
            params: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            token68: None,
        }
    }

    #[test]
    fn docker_hub_bearer() {
        let v = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#;
        let got = parse(v);
        assert_eq!(got.len(), 1);
        assert!(got[0].is_scheme("bearer"));
        assert_eq!(got[0].param("realm"), Some("https://auth.docker.io/token"));
        assert_eq!(got[0].param("Service"), Some("registry.docker.io"));
        assert_eq!(got[0].param("scope"), Some("repository:library/alpine:pull"));
    }

    #[test]
    fn several_challenges_and_case() {
        let v = r#"BASIC Realm="x, y" , bearer realm=tok , service="s\"q\\" ,Negotiate"#;
        assert_eq!(
            parse(v),
            vec![
                ch("basic", &[("realm", "x, y")]),
                ch("bearer", &[("realm", "tok"), ("service", "s\"q\\")]),
                ch("negotiate", &[]),
            ]
        );
    }

    #[test]
    fn token68_and_errors() {
        let got = parse("Negotiate abc+/==, Basic realm=\"r\"");
        assert_eq!(got[0].token68.as_deref(), Some("abc+/=="));
        assert_eq!(got[1], ch("basic", &[("realm", "r")]));
        let got = parse(r#"Bearer realm="r",error="insufficient_scope""#);
        assert_eq!(got[0].param("error"), Some("insufficient_scope"));
        // Empty list elements and an unterminated quote are tolerated.
        let got = parse(r#",, Bearer ,realm="r",, service="unterminated"#);
        assert_eq!(got, vec![ch("bearer", &[("realm", "r"), ("service", "unterminated")])]);
        assert!(parse("").is_empty());
        assert!(parse("   ,, ").is_empty());
    }

    #[test]
    fn display_quotes_and_escapes() {
        let c = ch("Bearer", &[("realm", "a\"b\\c"), ("service", "s")]);
        assert_eq!(c.to_string(), r#"Bearer realm="a\"b\\c",service="s""#);
    }

    fn arb_challenge() -> impl Strategy<Value = Challenge> {
        let name = "[a-z][a-z0-9_-]{0,8}";
        let value = "[^\\x00-\\x1f\\x7f]{0,20}";
        (name, prop::collection::vec((name, value), 0..4)).prop_map(|(scheme, params)| Challenge {
            scheme,
            params,
            token68: None,
        })
    }

    proptest! {
        #[test]
        fn never_panics(s in ".{0,200}") {
            let _ = parse(&s);
        }

        #[test]
        fn never_panics_on_header_like_input(s in "[a-zA-Z =,\"\\\\\t]{0,80}") {
            let _ = parse(&s);
        }

        #[test]
        fn round_trip(list in prop::collection::vec(arb_challenge(), 1..4)) {
            let header = list.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
            prop_assert_eq!(parse(&header), list);
        }
    }
}
