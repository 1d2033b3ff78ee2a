//! Label and annotation keys shared by the operator, the agents and users.
//!
//! `kubectl get fc -l fim.kube-fim.io/node=worker-1,fim.kube-fim.io/category=Modified`
//! filters changes. Labels are filters only, never decisions: anyone with patch
//! rights can set one, so approval is `status.approval` (see
//! [`crate::change`]), not a label. Label values longer than 63 characters (node names may reach
//! 253) are shortened by [`label_value`].

/// Node a FileChange was detected on.
pub const NODE: &str = "fim.kube-fim.io/node";
/// Policy a FileChange belongs to.
pub const POLICY: &str = "fim.kube-fim.io/policy";
/// Category (Added, Modified, Removed, Summary) of a FileChange.
pub const CATEGORY: &str = "fim.kube-fim.io/category";
/// Package verdict (Verified, Mismatch) of a FileChange whose file an
/// installed package owns; absent otherwise.
pub const PACKAGE: &str = "fim.kube-fim.io/package";
/// Entry name of a FileChange.
pub const ENTRY: &str = "fim.kube-fim.io/entry";
/// Namespace of the pod of a container's FileChange (container drift).
pub const NAMESPACE: &str = "fim.kube-fim.io/namespace";
/// Pod of a container's FileChange (container drift).
pub const POD: &str = "fim.kube-fim.io/pod";
/// Annotation an admin sets on a FileIntegrityNode, to the id of its
/// `status.baselineAlarm`, to clear that alarm (the recorded act: the API
/// server's audit log and the object's managed fields say who and when).
pub const CLEAR_BASELINE_ALARM: &str = "fim.kube-fim.io/clear-baseline-alarm";
/// Marks objects made by kube-fim (`app.kubernetes.io/managed-by`).
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY`].
pub const MANAGED_BY_VALUE: &str = "kube-fim";

/// A label value for `value`: itself when it is a valid label value, otherwise
/// a prefix and a hash suffix that stay unique and within 63 characters.
pub fn label_value(value: &str) -> String {
    let valid = value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && value
            .bytes()
            .next()
            .is_none_or(|b| b.is_ascii_alphanumeric())
        && value
            .bytes()
            .last()
            .is_none_or(|b| b.is_ascii_alphanumeric());
    if valid {
        return value.to_string();
    }
    let digest = fnv1a64(value.as_bytes());
    let prefix: String = value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(46)
        .collect();
    let prefix = prefix.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() {
        format!("h{digest:016x}")
    } else {
        format!("{prefix}-{digest:016x}")
    }
}

/// FNV-1a: stable across releases and platforms, which `std`'s hasher is not.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept() {
        assert_eq!(label_value("worker-1"), "worker-1");
        assert_eq!(
            label_value("ip-10-0-0-1.ec2.internal"),
            "ip-10-0-0-1.ec2.internal"
        );
    }

    #[test]
    fn long_names_are_shortened_uniquely() {
        let a = "a".repeat(100) + ".example.com";
        let b = "a".repeat(100) + ".example.org";
        let (la, lb) = (label_value(&a), label_value(&b));
        assert!(la.len() <= 63, "{la}");
        assert_ne!(la, lb);
        assert_eq!(la, label_value(&a));
    }
}
