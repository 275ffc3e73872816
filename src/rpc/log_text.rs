//! Client-supplied text made safe for a log line.
//!
//! A client name, a method name or an id goes into the log as it came; a newline in it would
//! start a forged log line, an escape sequence would drive the reader's terminal. [`LogText`]
//! writes such text with every control character (C0, DEL, C1), the Unicode line and paragraph
//! separators and the bidirectional overrides escaped as `\n`, `\r`, `\t` or `\u{..}`, and a
//! backslash doubled, so the escaped form cannot be mistaken for an escape.

use std::fmt;

/// Displays the wrapped text with control and line-breaking characters escaped.
pub struct LogText<'a>(pub &'a str);

/// True for a character that must not reach a log line as it is.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

impl fmt::Display for LogText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for c in self.0.chars() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_separator_characters_are_escaped() {
        let s = LogText("x\nFAKE\r\u{1b}[31m\u{7f}\u{85}\u{9b}\u{2028}\u{2029}\u{202e}\t\\n é😀")
            .to_string();
        assert_eq!(
            s,
            "x\\nFAKE\\r\\u{1b}[31m\\u{7f}\\u{85}\\u{9b}\\u{2028}\\u{2029}\\u{202e}\\t\\\\n é😀"
        );
        assert!(!s.chars().any(needs_escape));
        assert_eq!(LogText("plain name 1.2").to_string(), "plain name 1.2");
    }
}
