//! The cluster to talk to, chosen with kubectl's own flags.

use std::path::PathBuf;

use anyhow::{Context, bail};
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// kubectl's connection flags (kubectl passes a plugin its arguments as given).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct KubeFlags {
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config,
    /// else the in-cluster service account).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// User to impersonate for the operation.
    #[arg(long = "as", global = true, value_name = "USER")]
    pub as_user: Option<String>,
    /// Group to impersonate (repeatable); needs --as, as with kubectl.
    #[arg(long = "as-group", global = true, value_name = "GROUP")]
    pub as_groups: Vec<String>,
}

impl KubeFlags {
    /// The client configuration these flags select.
    pub async fn config(&self) -> anyhow::Result<kube::Config> {
        if !self.as_groups.is_empty() && self.as_user.is_none() {
            bail!("--as-group needs --as: groups are impersonated along with a user");
        }
        let mut config = if self.kubeconfig.is_none() && self.context.is_none() {
            kube::Config::infer().await.context(
                "loading the cluster configuration ($KUBECONFIG, ~/.kube/config or in-cluster)",
            )?
        } else {
            let file = match &self.kubeconfig {
                Some(path) => Kubeconfig::read_from(path)
                    .with_context(|| format!("reading --kubeconfig {}", path.display()))?,
                None => Kubeconfig::read()
                    .context("reading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
            };
            let options = KubeConfigOptions {
                context: self.context.clone(),
                ..KubeConfigOptions::default()
            };
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| match &self.context {
                    Some(c) => format!("loading context {c:?} of the kubeconfig"),
                    None => "loading the kubeconfig's current context".to_string(),
                })?
        };
        if let Some(user) = &self.as_user {
            config.auth_info.impersonate = Some(user.clone());
            config.auth_info.impersonate_groups =
                (!self.as_groups.is_empty()).then(|| self.as_groups.clone());
        }
        Ok(config)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::try_from(self.config().await?).context("setting up the API client")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
current-context: one
clusters:
  - name: one
    cluster: {server: "https://one.example:6443"}
  - name: two
    cluster: {server: "https://two.example:6443"}
users:
  - name: u
    user: {token: abc}
contexts:
  - name: one
    context: {cluster: one, user: u}
  - name: two
    context: {cluster: two, user: u}
"#;

    fn file() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, KUBECONFIG).unwrap();
        (dir, path)
    }

    #[tokio::test]
    async fn kubeconfig_context_and_impersonation_flags_choose_the_connection() {
        let (_dir, path) = file();
        let flags = KubeFlags {
            kubeconfig: Some(path.clone()),
            ..KubeFlags::default()
        };
        let config = flags.config().await.unwrap();
        assert_eq!(config.cluster_url.host(), Some("one.example"));
        assert_eq!(config.auth_info.impersonate, None);

        let flags = KubeFlags {
            kubeconfig: Some(path.clone()),
            context: Some("two".into()),
            as_user: Some("alice".into()),
            as_groups: vec!["auditors".into(), "ops".into()],
        };
        let config = flags.config().await.unwrap();
        assert_eq!(config.cluster_url.host(), Some("two.example"));
        assert_eq!(config.auth_info.impersonate.as_deref(), Some("alice"));
        assert_eq!(
            config.auth_info.impersonate_groups,
            Some(vec!["auditors".to_string(), "ops".to_string()])
        );
    }

    #[tokio::test]
    async fn bad_flags_say_what_is_wrong() {
        let (_dir, path) = file();
        let err = KubeFlags {
            kubeconfig: Some(path.clone()),
            context: Some("three".into()),
            ..KubeFlags::default()
        }
        .config()
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("\"three\""), "{err:#}");
        let err = KubeFlags {
            kubeconfig: Some(path.with_file_name("missing")),
            ..KubeFlags::default()
        }
        .config()
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("--kubeconfig"), "{err:#}");
        let err = KubeFlags {
            kubeconfig: Some(path),
            as_groups: vec!["ops".into()],
            ..KubeFlags::default()
        }
        .config()
        .await
        .unwrap_err();
        assert!(err.to_string().contains("--as-group needs --as"), "{err}");
    }
}
