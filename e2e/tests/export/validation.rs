//! Sinks the API server refuses and accepts (`examples/sinks/`).

use super::*;

/// One refused sink from `examples/sinks/invalid/`, with what its header promises.
fn bad_sinks() -> Vec<(String, String, String, String)> {
    let dir = repo_root().join("examples/sinks/invalid");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("examples/sinks/invalid exists") {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .unwrap_or_else(|| panic!("{} lacks `# {key}:`", path.display()))
                .to_string()
        };
        out.push((
            path.file_name().unwrap().to_string_lossy().into_owned(),
            header("expect-field"),
            header("expect-message"),
            text,
        ));
    }
    out.sort();
    out
}

#[test]
fn bad_sinks_are_refused_by_the_api_server_naming_the_field() {
    ensure_export_rbac();
    let cases = bad_sinks();
    assert!(cases.len() >= 8, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (file, field, message, text) in &cases {
        let run = kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], text);
        if run.success {
            failures.push(format!("{file}: accepted"));
        } else if !run.stderr.contains(field.as_str()) || !run.stderr.contains(message.as_str()) {
            failures.push(format!(
                "{file}: expected {field:?} and {message:?}, the API server said: {}",
                run.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn good_sinks_are_accepted_and_explained() {
    ensure_export_rbac();
    let dir = repo_root().join("examples/sinks");
    let mut seen = HashMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let run = kubectl(["apply", "--dry-run=server", "-f", path.to_str().unwrap()]);
        assert!(run.success, "{}: {}", path.display(), run.stderr);
        seen.insert(path, ());
    }
    assert!(seen.len() >= 4, "an example per transport");
    let run = kubectl(["explain", "filechangesink.spec.syslog.port"]);
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("TCP port"), "{}", run.stdout);
    let run = kubectl(["explain", "fcs.status.positions"]);
    assert!(run.success, "{}", run.stderr);
    assert!(run.stdout.contains("restart resumes"), "{}", run.stdout);
}
