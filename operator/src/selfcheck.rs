//! `kube-fim-operator check URL`: the chart's `helm test`. It asks the
//! operator's metrics endpoint (through its Service) until a replica that
//! leads answers and every policy counts all its selected nodes Ready, so a
//! release that installed or upgraded but whose operator cannot lead, or whose
//! agents do not come up, fails `helm test`. It runs from the operator's own
//! image (no shell, no wget): plain HTTP/1.0 over a TCP stream, no client
//! library, nothing sent but the request line.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use clap::Parser;

/// Flags of `kube-fim-operator check`.
#[derive(Debug, Parser)]
#[command(
    name = "kube-fim-operator check",
    about = "Checks a running install: a leading operator answers at URL and every policy has all its selected nodes Ready"
)]
pub struct CheckArgs {
    /// The operator's metrics URL, such as http://kube-fim-operator.kube-fim.svc:8080/metrics.
    pub url: String,
    /// How long to keep asking before failing (a Service may route to a standby
    /// replica, and agents may still be baselining after an upgrade).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub timeout_seconds: u64,
}

/// Nodes of one policy, as the leader reports them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PolicyNodes {
    pub selected: i64,
    pub ready: i64,
}

/// What one scrape says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scrape {
    pub leader: bool,
    pub policies: BTreeMap<String, PolicyNodes>,
}

/// Reads the operator's exposition text (only the two series the check needs).
pub fn parse(text: &str) -> Scrape {
    let mut scrape = Scrape::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.trim().parse().unwrap_or(0.0);
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, labels_of(rest.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        match name {
            "kube_fim_operator_leader" => scrape.leader = value >= 1.0,
            "kube_fim_operator_policy_nodes" => {
                let (Some(policy), Some(state)) = (labels.get("policy"), labels.get("state"))
                else {
                    continue;
                };
                let nodes = scrape.policies.entry(policy.clone()).or_default();
                match state.as_str() {
                    "selected" => nodes.selected = value as i64,
                    "ready" => nodes.ready = value as i64,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    scrape
}

fn labels_of(text: &str) -> BTreeMap<String, String> {
    // Policy names are DNS subdomains: no quote, comma or backslash to unescape.
    text.split(',')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        })
        .collect()
}

/// Whether the install is healthy, with what a person reads either way.
pub fn verdict(scrape: &Scrape) -> Result<String, String> {
    if !scrape.leader {
        return Err("the replica that answered does not lead".into());
    }
    if scrape.policies.is_empty() {
        return Ok("the operator leads; no FileIntegrityPolicy yet (no agents to check)".into());
    }
    let summary = scrape
        .policies
        .iter()
        .map(|(p, n)| format!("{p}: {}/{} nodes ready", n.ready, n.selected))
        .collect::<Vec<_>>()
        .join(", ");
    if scrape.policies.values().all(|n| n.ready >= n.selected) {
        Ok(format!("the operator leads; {summary}"))
    } else {
        Err(format!("agents not ready: {summary}"))
    }
}

/// One `GET` of an `http://host[:port]/path` URL; the body when the status is 200.
pub fn get(url: &str, timeout: Duration) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let with_port = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("resolving {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} has no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // HTTP/1.0: the server closes after the response, which is never chunked.
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")
        .map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .take(16 << 20)
        .read_to_end(&mut response)
        .map_err(|e| format!("reading from {addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    Ok(body.to_string())
}

/// Runs the check; the process's exit code is its verdict.
pub fn run(args: CheckArgs) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_seconds);
    loop {
        let attempt = get(&args.url, Duration::from_secs(10)).and_then(|t| verdict(&parse(&t)));
        match attempt {
            Ok(ok) => return Ok(ok),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("not healthy within {}s: {e}", args.timeout_seconds));
            }
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LEADER: &str = "# HELP kube_fim_operator_leader 1 when this replica holds the leader Lease\n\
# TYPE kube_fim_operator_leader gauge\n\
kube_fim_operator_leader 1\n\
kube_fim_operator_policy_nodes{policy=\"etc\",state=\"baselining\"} 0\n\
kube_fim_operator_policy_nodes{policy=\"etc\",state=\"ready\"} 2\n\
kube_fim_operator_policy_nodes{policy=\"etc\",state=\"selected\"} 3\n";

    #[test]
    fn a_policy_with_a_node_not_ready_fails_and_says_which() {
        let scrape = parse(LEADER);
        assert_eq!(
            scrape.policies["etc"],
            PolicyNodes {
                selected: 3,
                ready: 2
            }
        );
        assert_eq!(
            verdict(&scrape).unwrap_err(),
            "agents not ready: etc: 2/3 nodes ready"
        );
        let all = LEADER.replace("state=\"ready\"} 2", "state=\"ready\"} 3");
        assert_eq!(
            verdict(&parse(&all)).unwrap(),
            "the operator leads; etc: 3/3 nodes ready"
        );
    }

    #[test]
    fn a_standby_replica_is_not_an_answer() {
        let standby = "kube_fim_operator_leader 0\n";
        assert_eq!(
            verdict(&parse(standby)).unwrap_err(),
            "the replica that answered does not lead"
        );
        assert!(verdict(&parse("kube_fim_operator_leader 1\n")).is_ok());
    }

    /// Against the operator's own metrics server (server.rs), as the Service
    /// reaches it.
    #[tokio::test(flavor = "multi_thread")]
    async fn it_reads_the_operators_metrics_server() {
        let metrics = crate::metrics::Metrics::new().unwrap();
        metrics.leader.set(1);
        metrics
            .policy_nodes
            .with_label_values(&["p", "selected"])
            .set(1);
        metrics
            .policy_nodes
            .with_label_values(&["p", "ready"])
            .set(1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let health = crate::server::Health {
            metrics,
            ready: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        };
        tokio::spawn(crate::server::serve(addr, health));
        let url = format!("http://{addr}/metrics");
        let out = tokio::task::spawn_blocking(move || {
            run(CheckArgs {
                url,
                timeout_seconds: 10,
            })
        })
        .await
        .unwrap();
        assert_eq!(out.unwrap(), "the operator leads; p: 1/1 nodes ready");
        let missing = get(&format!("http://{addr}/nothing"), Duration::from_secs(5));
        assert!(missing.unwrap_err().contains("404"));
    }
}
