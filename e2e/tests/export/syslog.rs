//! A real rsyslog: RFC 5424 over TCP, and over TLS verified against the
//! sink's CA.

use super::*;

/// A real rsyslog (Debian's `rsyslogd`, e2e/deps.sh installs it) listening
/// on TCP with octet-counted framing, writing each message's host, app name,
/// message id and text to a file.
struct Rsyslog {
    process: Option<std::process::Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Rsyslog {
    fn new() -> Rsyslog {
        Rsyslog::with(false)
    }

    /// With `tls`, the listener speaks TLS (RFC 5425, rsyslog's gtls driver)
    /// with a server certificate for 127.0.0.1 issued by a CA of its own
    /// (`ca.crt` in its directory).
    fn with(tls: bool) -> Rsyslog {
        let dir = tempfile::tempdir().unwrap();
        let port = kube_fim_e2e::free_port();
        let d = dir.path().display().to_string();
        let tls_conf = if tls {
            let openssl = |args: &[&str]| {
                let out = std::process::Command::new("openssl")
                    .args(args)
                    .current_dir(dir.path())
                    .output()
                    .expect("openssl is installed (e2e/deps.sh)");
                assert!(out.status.success(), "openssl {args:?}: {out:?}");
            };
            openssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-subj",
                "/CN=kube-fim-e2e-ca",
                "-days",
                "1",
            ]);
            openssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=127.0.0.1",
            ]);
            std::fs::write(dir.path().join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "1",
                "-extfile",
                "san.ext",
            ]);
            format!(
                r#"global(DefaultNetstreamDriver="gtls" DefaultNetstreamDriverCAFile="{d}/ca.crt" DefaultNetstreamDriverCertFile="{d}/server.crt" DefaultNetstreamDriverKeyFile="{d}/server.key")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
"#
            )
        } else {
            "module(load=\"imtcp\")\n".to_string()
        };
        let conf = format!(
            r#"global(workDirectory="{dir}" maxMessageSize="64k")
{tls_conf}template(name="fields" type="string" string="%hostname%|%app-name%|%msgid%|%msg%\n")
ruleset(name="fim") {{
  action(type="omfile" file="{dir}/received.log" template="fields")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="fim")
"#,
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("rsyslog.conf"), conf).unwrap();
        Rsyslog {
            process: None,
            dir,
            port,
        }
    }

    fn start(&mut self) {
        let conf = self.dir.path().join("rsyslog.conf");
        let pid = self.dir.path().join("rsyslog.pid");
        let _ = std::fs::remove_file(&pid);
        let child = std::process::Command::new("rsyslogd")
            .args(["-n", "-f"])
            .arg(&conf)
            .arg("-i")
            .arg(&pid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("rsyslogd is not installed ({e}): `apt-get install rsyslog` (e2e/deps.sh installs it)")
            });
        self.process = Some(child);
        // Listening once a connection is accepted.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "rsyslogd did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Per message: host, app name, message id, and the text parsed as JSON.
    fn received(&self) -> Vec<(String, String, String, Value)> {
        std::fs::read_to_string(self.dir.path().join("received.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(4, '|');
                let host = parts.next()?.to_string();
                let app = parts.next()?.to_string();
                let msgid = parts.next()?.to_string();
                let json = serde_json::from_str(parts.next()?.trim()).ok()?;
                Some((host, app, msgid, json))
            })
            .collect()
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_rsyslog_receives_rfc5424_once_it_listens() {
    ensure_export_rbac();
    let suite = unique_name("exp-syslog");
    let _operator = Operator::start(&suite, &suite, &[]);
    let mut rsyslog = Rsyslog::new();
    let name = format!("{suite}-syslog");
    let spec = FileChangeSinkSpec {
        syslog: Some(kube_fim_crds::SyslogTransport {
            host: "127.0.0.1".into(),
            port: i32::from(rsyslog.port),
            tls: false,
            app_name: "kube-fim".into(),
        }),
        ..FileChangeSinkSpec::default()
    };
    let sinks = create_sink(&sink(&name, &suite, spec)).await;
    let node = format!("{suite}-n");
    let names = create_changes(&node, "p", &node, 4).await;

    // Nothing listens yet: the sink says so.
    let (_, _, message) = eventually("the sink Degraded", Duration::from_secs(60), || {
        let sinks = sinks.clone();
        let name = name.clone();
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            match condition(&s, "Degraded") {
                Some(c) if c.0 == "True" => Ok(c),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(message.contains("cannot reach the receiver"), "{message}");

    rsyslog.start();
    eventually(
        "rsyslog has every change, in order",
        Duration::from_secs(90),
        || {
            let got: Vec<String> = rsyslog
                .received()
                .into_iter()
                .filter(|(host, ..)| *host == node)
                .map(|(_, _, _, e)| {
                    e["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            let names = names.clone();
            async move {
                if got == names {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    let (_, app, msgid, event) = rsyslog
        .received()
        .into_iter()
        .find(|(host, ..)| *host == node)
        .unwrap();
    assert_eq!((app.as_str(), msgid.as_str()), ("kube-fim", "FileChange"));
    assert_eq!(event["class_uid"], 1001);
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn syslog_over_tls_verifies_the_server_against_the_ca_the_sink_names() {
    ensure_export_rbac();
    let suite = unique_name("exp-tls");
    let _operator = Operator::start(&suite, &suite, &[]);
    let mut rsyslog = Rsyslog::with(true);
    rsyslog.start();
    let ca = std::fs::read_to_string(rsyslog.dir.path().join("ca.crt")).unwrap();

    // The CA, in a Secret of the operator's namespace the operator may read by name only.
    let secret = format!("{suite}-ca");
    let objects = format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: {secret}, namespace: kube-fim}}
stringData:
  ca.crt: |
{ca}---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {secret}, namespace: kube-fim}}
rules:
  - apiGroups: [""]
    resources: [secrets]
    resourceNames: [{secret}]
    verbs: [get]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {secret}, namespace: kube-fim}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {secret}}}
subjects:
  - {{kind: ServiceAccount, name: kube-fim-operator, namespace: kube-fim}}
"#,
        ca = ca.lines().map(|l| format!("    {l}\n")).collect::<String>()
    );
    let run = kubectl_stdin(&["apply", "-f", "-"], &objects);
    assert!(run.success, "{}", run.stderr);

    // Without the CA, the system roots do not trust rsyslog's certificate.
    let name = format!("{suite}-syslog");
    let syslog = kube_fim_crds::SyslogTransport {
        host: "127.0.0.1".into(),
        port: i32::from(rsyslog.port),
        tls: true,
        app_name: "kube-fim".into(),
    };
    let spec = FileChangeSinkSpec {
        syslog: Some(syslog),
        ..FileChangeSinkSpec::default()
    };
    let sinks = create_sink(&sink(&name, &suite, spec.clone())).await;
    let node = format!("{suite}-n");
    let names = create_changes(&node, "p", &node, 3).await;
    let message = eventually("the sink Degraded", Duration::from_secs(60), || {
        let sinks = sinks.clone();
        let name = name.clone();
        async move {
            let s = sinks.get(&name).await.map_err(|e| e.to_string())?;
            match condition(&s, "Degraded") {
                Some(c) if c.0 == "True" => Ok(c.2),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(message.contains("TLS"), "{message}");
    assert!(rsyslog.received().iter().all(|(host, ..)| *host != node));

    // With it, every change arrives.
    let mut s = sinks.get(&name).await.unwrap();
    s.spec.tls = Some(kube_fim_crds::SinkTls {
        ca_secret_ref: Some(kube_fim_crds::SecretKeyRef {
            name: secret.clone(),
            key: "ca.crt".into(),
        }),
        client_certificate_secret_name: None,
    });
    sinks
        .replace(&name, &PostParams::default(), &s)
        .await
        .unwrap();
    eventually(
        "rsyslog has every change over TLS",
        Duration::from_secs(120),
        || {
            let got: Vec<String> = rsyslog
                .received()
                .into_iter()
                .filter(|(host, ..)| *host == node)
                .map(|(_, _, _, e)| {
                    e["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect();
            let names = names.clone();
            async move {
                if got == names {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            }
        },
    )
    .await;
    sinks.delete(&name, &DeleteParams::default()).await.unwrap();
    let _ = kubectl_stdin(&["delete", "-f", "-"], &objects);
}
