//! Host paths as the API shows them: absolute, UTF-8, with bytes that are not
//! UTF-8 written as `\xNN` and a backslash as `\\` (lossless, unambiguous).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Escapes raw path bytes.
pub fn escape(raw: &OsStr) -> String {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                out.push_str("\\\\");
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// The host path (`/etc/passwd`) of a path relative to the root (`etc/passwd`).
pub fn host_path(rel: &Path) -> String {
    let mut s = String::from("/");
    s.push_str(&escape(rel.as_os_str()));
    s
}

/// Reverses [`escape`]. Never panics, whatever the input (paths come from API
/// objects anyone with create rights can write): a backslash that starts no
/// valid escape stands for itself.
pub fn unescape(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1),
            b.get(i + 2).copied().and_then(hex),
            b.get(i + 3).copied().and_then(hex),
        ) {
            (b'\\', Some(b'\\'), _, _) => {
                out.push(b'\\');
                i += 2;
            }
            (b'\\', Some(b'x'), Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 4;
            }
            (c, _, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// The root-relative path of a host path written by [`host_path`].
pub fn rel_path(host: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(unescape(host.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::ffi::OsStr;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Any bytes survive escape then unescape.
        #[test]
        fn escape_round_trips_any_bytes(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let os = OsStr::from_bytes(&raw);
            prop_assert_eq!(unescape(&escape(os)), os);
        }

        /// Any string (a FileChange path written by anyone) unescapes without
        /// panicking, and what it stands for round-trips.
        #[test]
        fn unescape_never_panics(s in ".{0,40}", tail in r"(\\\\|\\x[0-9a-fé]{0,2}|é|x)*") {
            let text = format!("{s}{tail}");
            let raw = unescape(&text);
            prop_assert_eq!(unescape(&escape(&raw)), raw.clone());
            let _ = rel_path(&text);
        }
    }

    #[test]
    fn malformed_escapes_stand_for_themselves() {
        for s in [r"\x", "\\x\u{e9}1", r"a\", r"\xg0", r"\x4"] {
            let _ = unescape(s);
        }
        assert_eq!(unescape(r"\xzz"), OsStr::new(r"\xzz"));
        assert_eq!(unescape(r"\x41"), OsStr::new("A"));
    }

    #[test]
    fn escapes_non_utf8_and_backslashes() {
        let raw = OsStr::from_bytes(b"etc/caf\xe9\\x");
        assert_eq!(escape(raw), "etc/caf\\xe9\\\\x");
        assert_eq!(host_path(Path::new("etc/hosts")), "/etc/hosts");
        assert_eq!(host_path(Path::new("")), "/");
        for raw in [&b"etc/caf\xe9\\x"[..], b"a\\x41b", b"plain"] {
            let os = OsStr::from_bytes(raw);
            assert_eq!(unescape(&escape(os)), os);
        }
    }
}
