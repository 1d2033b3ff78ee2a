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

/// Reverses [`escape`].
pub fn unescape(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] == b'\\' {
            out.push(b'\\');
            i += 2;
        } else if b[i] == b'\\' && i + 3 < b.len() && b[i + 1] == b'x' {
            match u8::from_str_radix(&s[i + 2..i + 4], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 4;
                }
                Err(_) => {
                    out.push(b[i]);
                    i += 1;
                }
            }
        } else {
            out.push(b[i]);
            i += 1;
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
    use std::ffi::OsStr;

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
