//! `Authorization: Bearer <token>`: reading the token out of the header value, and comparing secrets in constant
//! time. Shared by every tier that checks a token (users and clusters at root, root at the cluster).

/// The token of an `Authorization` header value `Bearer <token>` (scheme case-insensitive, spaces trimmed), if it
/// is one and the token is not empty.
pub fn token(header_value: &str) -> Option<&str> {
    let (scheme, token) = header_value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether two secrets are equal, in time independent of where they first differ.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0_u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_token_and_compares_secrets() {
        assert_eq!(token("Bearer abc"), Some("abc"));
        assert_eq!(token("  bearer   abc  "), Some("abc"));
        assert_eq!(token("Basic abc"), None);
        assert_eq!(token("Bearer "), None);
        assert_eq!(token("Bearer"), None);
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "abcd"));
    }
}
