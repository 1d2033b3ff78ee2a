//! What reaches a person: tables sized to their content, text with its
//! control characters made visible, CSV cells a spreadsheet will not execute.
//!
//! File names come from the nodes, where anyone who can create a file chooses
//! them: `\x1b]...` in a name would otherwise drive the reviewer's terminal
//! (retitle it, hide lines, fake output), and `=HYPERLINK(...)` as a CSV cell
//! runs as a formula in the spreadsheet the export is opened in.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Characters shown escaped: C0 and C1 controls and DEL, and the Unicode
/// direction marks and overrides that reorder what a terminal shows.
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every hidden character written as `\xNN` (ASCII) or `\u{NNNN}`.
/// Paths in FileChanges already write a backslash as `\\` and non-UTF-8 bytes
/// as `\xNN`, so the escapes here cannot be confused with a name's own text.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hidden) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !hidden(c) {
            out.push(c);
        } else if c.is_ascii() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

/// One CSV cell: escaped like any displayed text, prefixed with `'` when a
/// spreadsheet would take it for a formula (OWASP's list: `=`, `+`, `-`, `@`,
/// tab, carriage return), quoted when it holds a separator or a quote.
pub fn csv_field(s: &str) -> String {
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let escaped = escape(s);
    let cell = if formula {
        format!("'{escaped}")
    } else {
        escaped.into_owned()
    };
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell
    }
}

/// How a column lines up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A table like kubectl's: each column as wide as its widest cell, three
/// spaces between columns, nothing cut (a node name may be 253 characters).
#[derive(Debug, Default)]
pub struct Table {
    columns: Vec<(String, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(columns: &[(&str, Align)]) -> Table {
        Table {
            columns: columns
                .iter()
                .map(|(h, a)| ((*h).to_string(), *a))
                .collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; every cell is escaped for the terminal.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| escape(c.as_ref()).into_owned())
                .collect(),
        );
    }

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self
            .columns
            .iter()
            .map(|(h, _)| h.chars().count())
            .collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let headers: Vec<&str> = self.columns.iter().map(|(h, _)| h.as_str()).collect();
        for cells in std::iter::once(headers).chain(
            self.rows
                .iter()
                .map(|r| r.iter().map(String::as_str).collect()),
        ) {
            let mut line = String::new();
            for (i, ((_, align), width)) in self.columns.iter().zip(&widths).enumerate() {
                let cell = cells.get(i).copied().unwrap_or("");
                if i > 0 {
                    line.push_str("   ");
                }
                let pad = width.saturating_sub(cell.chars().count());
                match align {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_direction_overrides_are_shown_escaped() {
        assert_eq!(escape("/etc/passwd"), "/etc/passwd");
        assert!(matches!(escape("/etc/passwd"), Cow::Borrowed(_)));
        assert_eq!(escape("/tmp/\x1b]0;pwned\x07x"), "/tmp/\\x1b]0;pwned\\x07x");
        assert_eq!(escape("a\nb\rc\td\x7f"), "a\\x0ab\\x0dc\\x09d\\x7f");
        assert_eq!(escape("x\u{9b}31m"), "x\\u{009b}31m", "C1 CSI");
        assert_eq!(escape("evil\u{202e}txt.sh"), "evil\\u{202e}txt.sh");
        // A name's own backslashes were escaped by the agent already.
        assert_eq!(escape("/etc/a\\\\x1b"), "/etc/a\\\\x1b");
        assert_eq!(escape("/etc/é"), "/etc/é");
    }

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("/etc/passwd"), "/etc/passwd");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    #[test]
    fn csv_cells_a_spreadsheet_would_run_are_made_text() {
        assert_eq!(
            csv_field("=HYPERLINK(\"http://x\",\"a\")"),
            "\"'=HYPERLINK(\"\"http://x\"\",\"\"a\"\")\""
        );
        assert_eq!(csv_field("+1"), "'+1");
        assert_eq!(csv_field("-2+3"), "'-2+3");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("\t=1"), "'\\x09=1");
        assert_eq!(csv_field("\r=1"), "'\\x0d=1");
        assert_eq!(csv_field("/etc/=x"), "/etc/=x", "only a leading sign");
        assert_eq!(csv_field("a\nb"), "a\\x0ab", "no raw line break either");
    }

    #[test]
    fn columns_are_as_wide_as_their_content() {
        let long = format!("{}.example.com", "n".repeat(253 - 12));
        assert_eq!(long.len(), 253);
        let mut t = Table::new(&[("NODE", Align::Left), ("ADDED", Align::Right)]);
        t.row([long.as_str(), "1"]);
        t.row(["short", "12345678"]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[1].starts_with(&long), "the name is not cut");
        // Every line ends its right-aligned column at the same place.
        let ends: Vec<usize> = lines.iter().map(|l| l.chars().count()).collect();
        assert_eq!(ends, [253 + 3 + 8; 3], "{text}");
        assert!(lines[0].starts_with("NODE "));
        assert!(lines[2].starts_with("short "));
        assert!(lines[1].ends_with("       1"));
    }

    #[test]
    fn table_cells_are_escaped() {
        let mut t = Table::new(&[("PATH", Align::Left)]);
        t.row(["/tmp/\x1b[2Jx"]);
        let text = t.render();
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.contains("/tmp/\\x1b[2Jx"));
    }
}
