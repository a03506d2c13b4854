//! Client-supplied text made safe to log: [`Escaped`] writes control characters (newlines, ANSI escapes, …) and
//! the invisible Unicode format characters (bidi overrides, zero-width characters, line separators, tags) as
//! `\n` / `\u{1b}` escapes, and cuts very long strings, so one request cannot forge log lines, recolour a terminal or
//! flood the log.
//!
//! Use it for every string a peer chose (a login user name, a cluster name, a job id from a report) that is logged
//! with `%`: `tracing::info!(username = %Escaped(&name), "login refused")`. `?` (Debug) already escapes control
//! characters, but not the format characters, and never truncates.

use std::fmt::{self, Write};

/// How many characters of a string [`Escaped`] writes before cutting it (and saying how long it was).
pub const MAX_LOGGED_CHARS: usize = 256;

/// Displays a string with control and invisible format characters escaped and at most [`MAX_LOGGED_CHARS`]
/// characters of it written; a longer string ends with `…[+N bytes]`.
///
/// A backslash is written as `\\`, so the escapes cannot be confused with text that spells one.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (written, (at, c)) in self.0.char_indices().enumerate() {
            if written == MAX_LOGGED_CHARS {
                return write!(f, "…[+{} bytes]", self.0.len() - at);
            }
            match c {
                '\\' => f.write_str("\\\\")?,
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                c if needs_escape(c) => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Whether `c` must not reach a log as itself: a control character (Unicode category Cc), a line or paragraph
/// separator, or a format character (category Cf: bidi embeddings, overrides and isolates, zero-width characters,
/// the byte-order mark, interlinear annotations, tags, …), which are invisible or reorder what a terminal shows.
pub fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            u32::from(c),
            0x00AD
                | 0x0600..=0x0605
                | 0x061C
                | 0x06DD
                | 0x070F
                | 0x0890..=0x0891
                | 0x08E2
                | 0x180E
                | 0x200B..=0x200F
                | 0x2028..=0x202E
                | 0x2060..=0x206F
                | 0xFEFF
                | 0xFFF9..=0xFFFB
                | 0x110BD
                | 0x110CD
                | 0x13430..=0x1343F
                | 0x1BCA0..=0x1BCA3
                | 0x1D173..=0x1D17A
                | 0xE0001
                | 0xE0020..=0xE007F
        )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn esc(s: &str) -> String {
        Escaped(s).to_string()
    }

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(esc("Admin"), "Admin");
        assert_eq!(esc("clientsrvr.test.nginx.test"), "clientsrvr.test.nginx.test");
        assert_eq!(esc("grüße, 東京"), "grüße, 東京");
        assert_eq!(esc(""), "");
    }

    #[test]
    fn forged_log_lines_and_terminal_escapes_are_escaped() {
        assert_eq!(esc("x\nINFO login: Admin\r\n"), "x\\nINFO login: Admin\\r\\n");
        assert_eq!(esc("\x1b[31mred\x1b[0m"), "\\u{1b}[31mred\\u{1b}[0m");
        assert_eq!(esc("a\tb\0c\x7f"), "a\\tb\\u{0}c\\u{7f}");
        assert_eq!(esc("\u{202e}txt.exe"), "\\u{202e}txt.exe");
        assert_eq!(
            esc("a\u{200b}b\u{2028}c\u{feff}"),
            "a\\u{200b}b\\u{2028}c\\u{feff}"
        );
        assert_eq!(esc("\u{85}"), "\\u{85}", "C1 control (next line)");
        assert_eq!(esc("back\\slash"), "back\\\\slash");
    }

    #[test]
    fn long_strings_are_cut_with_their_length() {
        let long = "a".repeat(10_000);
        let out = esc(&long);
        assert!(out.starts_with(&"a".repeat(MAX_LOGGED_CHARS)), "{out}");
        assert!(
            out.ends_with(&format!("…[+{} bytes]", 10_000 - MAX_LOGGED_CHARS)),
            "{out}"
        );
        let exact = "b".repeat(MAX_LOGGED_CHARS);
        assert_eq!(esc(&exact), exact, "a string of exactly the limit is not cut");
        // Multi-byte characters are counted as characters and never split.
        let wide = "é".repeat(MAX_LOGGED_CHARS + 1);
        assert!(esc(&wide).ends_with("…[+2 bytes]"), "{}", esc(&wide));
    }

    proptest! {
        #[test]
        fn output_holds_no_control_or_format_character(s in any::<String>()) {
            let out = esc(&s);
            prop_assert!(!out.chars().any(needs_escape), "{out:?}");
            // At most the limit of (escaped) characters plus the marker.
            prop_assert!(out.chars().count() <= MAX_LOGGED_CHARS * 10 + 32, "{}", out.len());
        }

        #[test]
        fn short_strings_without_specials_are_kept(s in "[a-zA-Z0-9 ._:/@-]{0,256}") {
            prop_assert_eq!(esc(&s), s);
        }

        #[test]
        fn escapes_are_unambiguous(a in any::<String>(), b in any::<String>()) {
            let (a, b): (String, String) = (a.chars().take(100).collect(), b.chars().take(100).collect());
            if a != b {
                prop_assert_ne!(esc(&a), esc(&b));
            }
        }
    }
}
