//! The krew manifest template (kubectl-fim/krew/fim.yaml), rendered the way
//! krew-release-bot renders it at a release tag, is a valid krew Plugin for
//! this binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;

const TEMPLATE: &str = include_str!("../krew/fim.yaml");

/// krew-release-bot's two template functions: `.TagName`, and
/// `addURIAndSha URL TAG`, which writes `uri:` and `sha256:` of the archive.
fn render(tag: &str) -> String {
    let text = TEMPLATE.replace("{{ .TagName }}", tag);
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if let Some(call) = trimmed.strip_prefix("{{addURIAndSha ") {
            let indent = &line[..line.len() - trimmed.len()];
            let url = call.split('"').nth(1).expect("a quoted URL");
            assert!(
                call.ends_with("\" .TagName }}"),
                "addURIAndSha takes the tag: {line}"
            );
            out.push_str(&format!("{indent}uri: {url}\n"));
            out.push_str(&format!(
                "{indent}sha256: {}\n",
                "0123456789abcdef".repeat(4)
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn the_krew_manifest_renders_to_a_plugin_for_this_binary() {
    let tag = format!("v{}", env!("CARGO_PKG_VERSION"));
    let rendered = render(&tag);
    assert!(!rendered.contains("{{"), "unrendered template: {rendered}");
    let plugin: Value = serde_saphyr::from_str(&rendered).unwrap();
    assert_eq!(
        plugin["apiVersion"],
        "krew.googlecontainertools.github.com/v1alpha2"
    );
    assert_eq!(plugin["kind"], "Plugin");
    // `kubectl krew install fim` puts `kubectl-fim` on PATH: `kubectl fim`.
    assert_eq!(plugin["metadata"]["name"], "fim");
    let spec = &plugin["spec"];
    assert_eq!(spec["version"], tag.as_str());
    let short = spec["shortDescription"].as_str().unwrap();
    assert!(
        !short.is_empty() && short.len() <= 60,
        "krew wants a short description: {short:?}"
    );
    assert!(spec["description"].as_str().unwrap().len() > short.len());
    assert!(
        spec["homepage"]
            .as_str()
            .unwrap()
            .starts_with("https://github.com/kube-fim/")
    );
    let platforms = spec["platforms"].as_array().unwrap();
    let mut seen = Vec::new();
    for p in platforms {
        let labels = &p["selector"]["matchLabels"];
        let (os, arch) = (
            labels["os"].as_str().unwrap(),
            labels["arch"].as_str().unwrap(),
        );
        seen.push(format!("{os}/{arch}"));
        assert_eq!(p["bin"], "kubectl-fim", "{os}/{arch}");
        let uri = p["uri"].as_str().unwrap();
        assert_eq!(
            uri,
            format!(
                "https://github.com/kube-fim/kube-fim/releases/download/{tag}/kubectl-fim_{tag}_{os}_{arch}.tar.gz"
            )
        );
        let sha = p["sha256"].as_str().unwrap();
        assert!(sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()));
        let files = p["files"].as_array().unwrap();
        assert!(
            files.iter().any(|f| f["from"] == "kubectl-fim"),
            "the archive's binary is installed: {files:?}"
        );
    }
    assert_eq!(seen, ["linux/amd64", "linux/arm64"]);
}
