//! CEL rules (`x-kubernetes-validations`) of the CRD schema, and their messages.
//!
//! Regex-based rules are declared with [`regex_rule!`], which yields both the CEL
//! expression the API server evaluates and the bare pattern that
//! [`crate::validate`] runs with the `regex` crate, so the two validators share
//! one source for every pattern. RE2 (the API server's engine) and the `regex`
//! crate agree on the syntax used here, and both `matches()` and `is_match` are
//! unanchored searches.

macro_rules! regex_rule {
    ($(#[$doc:meta])* $rule:ident, $pattern_name:ident, $pattern:literal) => {
        $(#[$doc])*
        pub const $rule: &str = concat!("!self.matches(r'", $pattern, "')");
        #[doc = concat!("Pattern whose presence `", stringify!($rule), "` forbids.")]
        pub const $pattern_name: &str = $pattern;
    };
}

/// A policy must monitor something.
pub const HAS_PATHS_OR_PRESET: &str =
    "(has(self.paths) && size(self.paths) > 0) || has(self.preset) || has(self.containers)";
pub const HAS_PATHS_OR_PRESET_MSG: &str =
    "a policy needs at least one entry in spec.paths, a spec.preset or spec.containers";

/// Paths inside a container to leave out: absolute, canonical, no wildcards.
pub const CONTAINER_EXCLUDES: &str = "self.all(p, p.startsWith('/') && \
    (p == '/' || !(p.contains('//') || p.endsWith('/'))) && \
    !p.matches(r'(^|/)\\.\\.?(/|$)') && !p.matches(r'[*?\\[\\x00-\\x1f\\x7f]'))";
pub const CONTAINER_EXCLUDES_MSG: &str = "each exclude must be an absolute, canonical directory or file path \
    inside the container (no '.', '..' or empty segments, no wildcards or control characters)";

/// Paths are absolute.
pub const PATH_ABSOLUTE: &str = "self.startsWith('/')";
pub const PATH_ABSOLUTE_MSG: &str = "must be an absolute path (start with '/')";

/// No `//` and no trailing `/` (except the root itself).
pub const PATH_NO_EMPTY_SEGMENT: &str =
    "self == '/' || !(self.contains('//') || self.endsWith('/'))";
pub const PATH_NO_EMPTY_SEGMENT_MSG: &str =
    "must not contain empty segments ('//' or a trailing '/')";

regex_rule!(
    /// No `.` or `..` segment: the path is canonical, and `..` can never climb.
    PATH_NO_DOT_SEGMENT, DOT_SEGMENT_RE, r"(^|/)\.\.?(/|$)"
);
pub const PATH_NO_DOT_SEGMENT_MSG: &str = "must not contain '.' or '..' segments";

regex_rule!(
    /// Wildcards only in the last segment: a wildcard character followed by a '/'.
    PATH_WILDCARD_LAST, WILDCARD_NOT_LAST_RE, r"[*?\[][^/]*/"
);
pub const PATH_WILDCARD_LAST_MSG: &str =
    "wildcards (*, ?, [...]) are allowed in the last segment only, as in /etc/*.conf";

regex_rule!(
    /// A `[` must open a class that `]` closes.
    PATH_BRACKETS_CLOSED, UNCLOSED_BRACKET_RE, r"\[[^\]]*$"
);
pub const PATH_BRACKETS_CLOSED_MSG: &str = "'[' opens a character class that must be closed by ']'";

regex_rule!(
    /// No control characters (NUL, newlines, escapes) in paths.
    NO_CONTROL_CHARS, CONTROL_CHARS_RE, r"[\x00-\x1f\x7f]"
);
pub const NO_CONTROL_CHARS_MSG: &str = "must not contain control characters";

/// Braces of alternates: balanced and not nested (`{a,b}`).
pub const BRACES_BALANCED_RE: &str = r"^[^{}]*(\{[^{}]*\}[^{}]*)*$";
/// Exclude globs: no control characters, no unclosed `[`.
pub const EXCLUDES_VALID: &str =
    r"self.all(g, !g.matches(r'[\x00-\x1f\x7f]') && !g.matches(r'\[[^\]]*$'))";
pub const EXCLUDES_VALID_MSG: &str =
    "exclude globs must not contain control characters or an unclosed '['";
/// Exclude globs: balanced, unnested `{}` (a rule of its own: the API
/// server's CEL cost budget is per rule). The agent's glob compiler, run by
/// the operator and the agent, refuses the rest (a dangling `\`).
pub const EXCLUDES_BRACES: &str = r"self.all(g, g.matches(r'^[^{}]*(\{[^{}]*\}[^{}]*)*$'))";
pub const EXCLUDES_BRACES_MSG: &str = "exclude globs must not have unbalanced or nested '{}'";

/// Recursive `/` or `/*` only when explicitly allowed.
pub const WHOLE_HOST: &str = r"!(has(self.recursive) && self.recursive && self.path.matches(r'^/\**$')) || (has(self.allowWholeHost) && self.allowWholeHost)";
/// Pattern of a path that covers the whole host when recursive.
pub const WHOLE_HOST_RE: &str = r"^/\**$";
pub const WHOLE_HOST_MSG: &str = "recursive monitoring of / or /* traverses the whole host and floods the cluster with noise; set allowWholeHost: true to allow it";

/// Grammar of every duration field: one or more `<digits><unit>` with units h, m, s, ms.
pub const DURATION_RE: &str = r"^([0-9]{1,5}(ms|s|m|h))+$";

macro_rules! duration_rule {
    ($(#[$doc:meta])* $rule:ident, $msg:ident, $min:literal, $max:literal) => {
        $(#[$doc])*
        pub const $rule: &str = concat!(
            "self.matches(r'^([0-9]{1,5}(ms|s|m|h))+$') && duration(self) >= duration('",
            $min,
            "') && duration(self) <= duration('",
            $max,
            "')"
        );
        pub const $msg: &str = concat!(
            "must be a duration between ", $min, " and ", $max,
            " written with units h, m, s or ms, such as 90s or 1h30m"
        );
    };
}

duration_rule!(
    /// Full rescan period.
    SCAN_INTERVAL, SCAN_INTERVAL_MSG, "1m", "168h"
);
duration_rule!(
    /// Coalescing window.
    DEBOUNCE, DEBOUNCE_MSG, "0s", "60s"
);
duration_rule!(
    /// Age past which FileChanges are deleted.
    RETENTION_AGE, RETENTION_AGE_MSG, "1h", "8760h"
);

/// Recorded changes are evidence: once created, a FileChange's spec never changes.
pub const SPEC_IMMUTABLE: &str = "self == oldSelf";
pub const SPEC_IMMUTABLE_MSG: &str =
    "a FileChange's spec is a record and cannot be changed; approve it instead";

/// An approval, once given, is never rewritten.
pub const APPROVAL_IMMUTABLE: &str = "self == oldSelf";
pub const APPROVAL_IMMUTABLE_MSG: &str = "an approval is a record and cannot be changed once given";

/// ... nor removed (a transition rule on the status: the old one had it).
pub const APPROVAL_KEPT: &str = "!has(oldSelf.approval) || has(self.approval)";
pub const APPROVAL_KEPT_MSG: &str = "an approval is a record and cannot be removed once given";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_rules_use_the_shared_grammar() {
        for rule in [SCAN_INTERVAL, DEBOUNCE, RETENTION_AGE] {
            assert!(rule.contains(DURATION_RE), "{rule}");
        }
        assert!(WHOLE_HOST.contains(WHOLE_HOST_RE));
        assert!(EXCLUDES_VALID.contains(CONTROL_CHARS_RE));
        assert!(EXCLUDES_VALID.contains(UNCLOSED_BRACKET_RE));
        assert!(EXCLUDES_BRACES.contains(BRACES_BALANCED_RE));
    }
}
