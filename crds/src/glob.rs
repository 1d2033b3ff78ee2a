//! Globs as the agent compiles them. The API server's CEL rules refuse what
//! they can see (unclosed `[` or `{`, nested `{`, a dangling `\`); the
//! operator and the agent both check every glob with this very compiler, so
//! a policy the agent could not compile is reported invalid, never served.

use globset::{Glob, GlobBuilder};

/// The matcher of a wildcard in a path's last segment (`/etc/*.conf`).
pub fn path_pattern(last: &str) -> Result<Glob, globset::Error> {
    GlobBuilder::new(last).literal_separator(true).build()
}

/// An exclude glob: with a `/` it matches whole paths, else file names.
pub fn exclude(glob: &str) -> Result<Glob, globset::Error> {
    if glob.contains('/') {
        GlobBuilder::new(glob).literal_separator(true).build()
    } else {
        Glob::new(glob)
    }
}

/// The wildcard of a path's last segment, if it has one.
pub fn last_segment_pattern(path: &str) -> Option<(&str, &str)> {
    path.rsplit_once('/')
        .filter(|(_, last)| last.contains(['*', '?', '[']))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_globset_refuses() {
        for bad in ["{a,b", "[z", "a\\"] {
            assert!(exclude(bad).is_err(), "{bad}");
        }
        for good in ["*.swp", "/var/lib/app/cache/**", "{a,b}.conf", "[ab]x"] {
            assert!(exclude(good).is_ok(), "{good}");
        }
    }
}
