//! The alert rules shipped with the chart: `promtool check rules` accepts them
//! and `promtool test rules` proves each alert fires when it should and stays
//! quiet when it should not (Debian's `prometheus` package provides promtool).
#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)]

use std::process::Command;

use kube_fim_e2e::repo_root;

fn promtool(args: &[&str], dir: &std::path::Path) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("promtool is not installed ({e}): `apt-get install prometheus` (.ci/run installs it)"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    let rules = repo_root().join("charts/kube-fim/rules");
    let (ok, out) = promtool(&["check", "rules", "kube-fim-alerts.yaml"], &rules);
    assert!(ok, "{out}");
    assert!(out.contains("SUCCESS: 19 rules found"), "{out}");
    let tests = rules.join("tests");
    let mut files: Vec<String> = std::fs::read_dir(&tests)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = promtool(&args, &tests);
    assert!(ok, "{out}");
    // Every alert of the rule file has at least one test that expects it to fire.
    let rule_text = std::fs::read_to_string(rules.join("kube-fim-alerts.yaml")).unwrap();
    let test_text: String = files
        .iter()
        .map(|f| std::fs::read_to_string(tests.join(f)).unwrap())
        .collect();
    for line in rule_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            test_text.contains(&format!("alertname: {line}")),
            "alert {line} has no promtool test"
        );
    }
}

/// Every alert links to its runbook, a section of the README that exists.
#[test]
fn every_alert_has_a_runbook_in_the_readme() {
    let rules =
        std::fs::read_to_string(repo_root().join("charts/kube-fim/rules/kube-fim-alerts.yaml"))
            .unwrap();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let anchors: Vec<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("#### "))
        .map(|h| h.trim().to_lowercase())
        .collect();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.contains(&"KubeFimOperatorDown"), "{alerts:?}");
    assert!(alerts.contains(&"KubeFimNoLeader"), "{alerts:?}");
    let urls: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("runbook_url: "))
        .collect();
    assert_eq!(urls.len(), alerts.len(), "one runbook_url per alert");
    for (alert, url) in alerts.iter().zip(&urls) {
        let anchor = alert.to_lowercase();
        assert_eq!(
            url.trim_matches('"'),
            format!("https://github.com/kube-fim/kube-fim/blob/main/README.md#{anchor}"),
            "{alert}"
        );
        assert!(
            anchors.contains(&anchor),
            "README.md has no runbook heading `#### {alert}`"
        );
    }
}

/// `metrics.prometheusRule.alerts.<Name>` accepts exactly the alerts of the
/// rule file: a new alert can be disabled from values, a misspelt one is refused.
#[test]
fn the_values_schema_names_every_alert() {
    let rules =
        std::fs::read_to_string(repo_root().join("charts/kube-fim/rules/kube-fim-alerts.yaml"))
            .unwrap();
    let mut alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    alerts.sort_unstable();
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("charts/kube-fim/values.schema.json")).unwrap(),
    )
    .unwrap();
    let names = &schema["properties"]["metrics"]["properties"]["prometheusRule"]["properties"]["alerts"]
        ["propertyNames"]["enum"];
    let mut names: Vec<&str> = names
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, alerts);
}
