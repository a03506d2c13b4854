//! Which browser origins may call root's API (`--cors-origins`): `*` (the reference's default) or a list of exact
//! origins. Pure policy, read at start; [`crate::api::cors`] applies it to requests.

/// Longest origin accepted in `--cors-origins`.
const MAX_ORIGIN: usize = 253 + 16;

/// The origins allowed to call the API from a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origins {
    /// Any origin (`*`).
    Any,
    /// Only these (`scheme://host[:port]`, compared exactly, without a trailing slash).
    Only(Vec<String>),
}

impl Origins {
    /// Parses `*` or a comma-separated list of `http(s)://host[:port]`; the error names the bad entry and the rule.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(Self::Any);
        }
        let mut list = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let rest = item
                .strip_prefix("http://")
                .or_else(|| item.strip_prefix("https://"));
            let ok = item.len() <= MAX_ORIGIN
                && rest
                    .is_some_and(|r| !r.is_empty() && !r.contains('/') && !r.contains(char::is_whitespace));
            if !ok {
                return Err(format!(
                    "{item:?}: an origin is http(s)://host[:port] without a path (or use * alone)"
                ));
            }
            list.push(item.to_owned());
        }
        if list.is_empty() {
            return Err("give * or at least one origin".into());
        }
        Ok(Self::Only(list))
    }

    /// What a browser is told for a request from `origin`: `*` when any origin may call, the origin itself when
    /// it is listed, nothing otherwise.
    pub fn allowed<'a>(&self, origin: Option<&'a str>) -> Option<&'a str> {
        match self {
            Self::Any => Some("*"),
            Self::Only(list) => origin.filter(|o| list.iter().any(|l| l == o)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_parse_with_readable_errors() {
        assert_eq!(Origins::parse("*").unwrap(), Origins::Any);
        assert_eq!(
            Origins::parse("http://a.example:4200, https://b.example").unwrap(),
            Origins::Only(vec!["http://a.example:4200".into(), "https://b.example".into()])
        );
        for bad in [
            "",
            "a.example",
            "http://a.example/path",
            "ftp://x",
            "http://",
            "*,http://a",
        ] {
            let e = Origins::parse(bad).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }

    #[test]
    fn only_listed_origins_are_allowed() {
        let o = Origins::parse("http://a.example").unwrap();
        assert_eq!(o.allowed(Some("http://a.example")), Some("http://a.example"));
        assert_eq!(o.allowed(Some("http://evil.example")), None);
        assert_eq!(o.allowed(None), None);
        assert_eq!(Origins::Any.allowed(None), Some("*"));
    }
}
