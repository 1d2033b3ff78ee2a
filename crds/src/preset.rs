//! Predefined entry lists (`spec.preset`).

use crate::policy::{MonitoredPath, Preset};

/// `(name, path, recursive)` of the `recommended` preset: where a compromise of a
/// Linux node usually shows, in system binaries, boot files, cron and init
/// scripts and the top-level configuration files.
pub const RECOMMENDED: &[(&str, &str, bool)] = &[
    ("bin-login", "/bin/login", false),
    ("bin-passwd", "/bin/passwd", false),
    ("etc-conf", "/etc/*.conf", false),
    ("usr-bin", "/usr/bin", false),
    ("usr-sbin", "/usr/sbin", false),
    ("bin", "/bin", false),
    ("sbin", "/sbin", false),
    ("boot", "/boot", true),
    ("usr-local-bin", "/usr/local/bin", false),
    ("usr-local-sbin", "/usr/local/sbin", false),
    ("opt-bin", "/opt/bin", false),
    ("opt-sbin", "/opt/sbin", false),
    ("etc-crontab", "/etc/crontab", false),
    ("etc-init-d", "/etc/init.d", false),
    ("etc-cron-hourly", "/etc/cron.hourly", false),
    ("etc-cron-daily", "/etc/cron.daily", false),
    ("etc-cron-weekly", "/etc/cron.weekly", false),
    ("etc-cron-monthly", "/etc/cron.monthly", false),
];

impl Preset {
    /// The entries this preset adds.
    pub fn entries(self) -> Vec<MonitoredPath> {
        match self {
            Preset::Recommended => RECOMMENDED
                .iter()
                .map(|&(name, path, recursive)| MonitoredPath {
                    name: name.into(),
                    path: path.into(),
                    recursive,
                    ..MonitoredPath::default()
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::FileIntegrityPolicySpec;
    use crate::validate::validate_spec;

    #[test]
    fn recommended_entries_are_valid_and_uniquely_named() {
        let spec = FileIntegrityPolicySpec::with_paths(Preset::Recommended.entries());
        assert_eq!(validate_spec(&spec), Ok(()));
        assert_eq!(spec.paths.len(), 18);
    }

    #[test]
    fn spec_entries_override_preset_entries_by_name() {
        let mut spec = FileIntegrityPolicySpec::with_paths(vec![MonitoredPath {
            name: "boot".into(),
            path: "/boot".into(),
            enabled: false,
            ..MonitoredPath::default()
        }]);
        spec.preset = Some(Preset::Recommended);
        let entries = spec.effective_paths();
        assert_eq!(entries.len(), 18);
        let boot = entries.iter().find(|e| e.name == "boot");
        assert_eq!(boot.map(|b| b.enabled), Some(false));
    }
}
