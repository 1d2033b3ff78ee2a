//! `FileChangeSink`: where the operator ships evidence, and in which format.
//!
//! Cluster-scoped like the policies: a sink receives every node's FileChanges,
//! which is cluster-level information. Credentials and certificates are never
//! written into the object: the sink names Secrets in the operator's namespace
//! (`SecretKeyRef`), which only the operator may read.
//!
//! Validation lives in the schema: exactly one transport, URLs that parse with
//! an http(s) scheme, ports in range, absolute file paths; the API server
//! refuses a bad sink with a message naming the field. The operator records
//! delivery in the status: `Ready` (configured and delivering), `Degraded`
//! (the last delivery failed, with its error), the position each node's
//! changes are delivered up to, counts and lag.
// kube's `printcolumn(...)` attributes repeat `type_ = ...` by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::cel;

/// Exactly one transport.
pub const ONE_TRANSPORT: &str = "[has(self.otlp), has(self.syslog), has(self.webhook), has(self.file)].filter(t, t).size() == 1";
pub const ONE_TRANSPORT_MSG: &str =
    "exactly one transport must be set: spec.otlp, spec.syslog, spec.webhook or spec.file";
/// TLS settings only where a network transport reads them.
pub const TLS_NEEDS_NETWORK: &str = "!has(self.tls) || !has(self.file)";
pub const TLS_NEEDS_NETWORK_MSG: &str =
    "spec.tls applies to otlp, syslog and webhook sinks, not to spec.file";
/// An http(s) URL.
pub const HTTP_URL: &str =
    "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''";
pub const HTTP_URL_MSG: &str = "must be an absolute http:// or https:// URL with a host";
/// A TCP port.
pub const PORT_RANGE: &str = "self >= 1 && self <= 65535";
pub const PORT_RANGE_MSG: &str = "must be a port between 1 and 65535";
/// A host name or IP address, nothing more (no scheme, port or path).
pub const HOST_NAME: &str = r"self.matches(r'^[A-Za-z0-9]([A-Za-z0-9.:-]*[A-Za-z0-9])?$')";
pub const HOST_NAME_MSG: &str = "must be a host name or IP address, without scheme, port or path";
/// How long retention may hold undelivered changes.
pub const HOLD_MAX: &str = "self.matches(r'^([0-9]{1,5}(ms|s|m|h))+$') && duration(self) >= duration('1m') && duration(self) <= duration('8760h')";
pub const HOLD_MAX_MSG: &str =
    "must be a duration between 1m and 8760h written with units h, m, s or ms, such as 168h";

/// Declares a destination outside the cluster (an OpenTelemetry Collector, a
/// syslog server, an HTTPS collector or a node-local file) that the operator
/// delivers every FileChange to, at least once and in order per node, with a
/// stable event id so the receiver can deduplicate.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "fim.kube-fim.io",
    version = "v1alpha1",
    kind = "FileChangeSink",
    plural = "filechangesinks",
    shortname = "fcs",
    category = "fim",
    status = "FileChangeSinkStatus",
    doc = "FileChangeSink declares where the operator ships FileChanges (OTLP, syslog, webhook or file) and in which format (OCSF, ECS, CEF).",
    printcolumn(
        name = "Format",
        type_ = "string",
        json_path = ".spec.format",
        description = "Event format"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Configured and delivering"
    ),
    printcolumn(
        name = "Delivered",
        type_ = "integer",
        json_path = ".status.delivered",
        description = "Events delivered"
    ),
    printcolumn(
        name = "Pending",
        type_ = "integer",
        json_path = ".status.pending",
        description = "Changes not yet delivered"
    ),
    printcolumn(
        name = "Lag",
        type_ = "integer",
        json_path = ".status.lagSeconds",
        description = "Age in seconds of the oldest undelivered change"
    ),
    printcolumn(
        name = "Error",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].message",
        priority = 1,
        description = "Last delivery error"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[x_kube(validation = kube::core::Rule::new(ONE_TRANSPORT).message(ONE_TRANSPORT_MSG))]
#[x_kube(validation = kube::core::Rule::new(TLS_NEEDS_NETWORK).message(TLS_NEEDS_NETWORK_MSG).field_path(".tls"))]
pub struct FileChangeSinkSpec {
    /// OpenTelemetry logs (OTLP): one log record per change, its body the
    /// formatted event. Set exactly one transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<OtlpTransport>,

    /// Syslog (RFC 5424) over TCP, octet-counted framing (RFC 6587), with TLS
    /// (RFC 5425) when `tls` is set. Set exactly one transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog: Option<SyslogTransport>,

    /// HTTP POST of NDJSON (one event per line), as Splunk HEC's raw endpoint
    /// and generic collectors accept it. Set exactly one transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookTransport>,

    /// A file the operator appends NDJSON to, for a shipper that reads it. Set
    /// exactly one transport.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileTransport>,

    /// Event format: `ocsf` (OCSF 1.x File System Activity), `ecs` (Elastic
    /// Common Schema) or `cef` (ArcSight Common Event Format, for older SIEMs).
    #[serde(default)]
    pub format: SinkFormat,

    /// Trust and client certificate for otlp, syslog and webhook. Without it,
    /// https and syslog TLS verify the server against the operator's system
    /// roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<SinkTls>,

    /// Most events sent in one request (or written before one fsync).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 5000))]
    pub batch_size: u32,

    /// Retention keeps FileChanges this sink has not delivered yet, up to this
    /// age past the policy's limits; older ones are deleted anyway and a
    /// `SinkHoldExpired` Warning Event says which.
    #[serde(default = "default_hold_max")]
    #[x_kube(validation = kube::core::Rule::new(HOLD_MAX).message(HOLD_MAX_MSG))]
    pub hold_max: String,

    /// Content fingerprints beside BLAKE3 (which OCSF and ECS have no field
    /// for) that the agents compute for this sink: `sha256` makes every
    /// agent hash a changed file's new content with SHA-256 too, in the same
    /// read as its BLAKE3 (`after.sha256` of the FileChange; OCSF
    /// `file.hashes`, ECS `file.hash.sha256`, CEF `fileHash`), for matching
    /// against threat intelligence. Only changed files are read again: scans
    /// cost the same. Changes detected before a sink asked keep BLAKE3 only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1))]
    pub fingerprints: Vec<Fingerprint>,
}

/// A content fingerprint the agents can compute besides BLAKE3.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "lowercase")]
pub enum Fingerprint {
    /// SHA-256 (FIPS 180-4), hex.
    Sha256,
}

impl Fingerprint {
    /// The name as written in the spec and in the agent's `--fingerprints`.
    pub fn as_str(self) -> &'static str {
        match self {
            Fingerprint::Sha256 => "sha256",
        }
    }
}

/// OTLP logs transport.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OtlpTransport {
    /// Collector endpoint. For `http`, the base URL (`https://otel:4318`):
    /// `/v1/logs` is appended unless the URL already has a path. For `grpc`,
    /// the URL of the collector's gRPC receiver (`https://otel:4317`; `http://`
    /// for plaintext HTTP/2).
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = kube::core::Rule::new(HTTP_URL).message(HTTP_URL_MSG))]
    pub endpoint: String,

    /// `http` (OTLP/HTTP, JSON encoding) or `grpc` (OTLP/gRPC, the
    /// `LogsService/Export` call).
    #[serde(default)]
    pub protocol: OtlpProtocol,

    /// Secret (in the operator's namespace) whose key holds the value of an
    /// `Authorization` header, e.g. `Bearer <token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_secret_ref: Option<SecretKeyRef>,
}

/// OTLP protocol.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/HTTP with the JSON encoding (port 4318 by convention).
    #[default]
    Http,
    /// OTLP/gRPC (port 4317 by convention).
    Grpc,
}

/// Syslog transport.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyslogTransport {
    /// Host name or IP address of the syslog server.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new(HOST_NAME).message(HOST_NAME_MSG))]
    pub host: String,

    /// TCP port (6514 for syslog over TLS, 601 or 514 without).
    #[x_kube(validation = kube::core::Rule::new(PORT_RANGE).message(PORT_RANGE_MSG))]
    pub port: i32,

    /// Use TLS (RFC 5425); `spec.tls` then says whom to trust.
    #[serde(default)]
    pub tls: bool,

    /// Syslog APP-NAME.
    #[serde(default = "default_app_name")]
    #[schemars(length(min = 1, max = 48), regex(pattern = r"^[!-~]+$"))]
    pub app_name: String,
}

/// Webhook transport.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookTransport {
    /// URL the NDJSON batches are POSTed to. A 2xx answer acknowledges the
    /// batch; anything else is retried.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = kube::core::Rule::new(HTTP_URL).message(HTTP_URL_MSG))]
    pub url: String,

    /// Secret (in the operator's namespace) whose key holds the value of an
    /// `Authorization` header, e.g. `Splunk <HEC token>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_secret_ref: Option<SecretKeyRef>,
}

/// File transport.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileTransport {
    /// Absolute path, on the operator's file system, of the file events are
    /// appended to (one per line, fsynced per batch).
    #[schemars(length(min = 2, max = 1024))]
    #[x_kube(validation = kube::core::Rule::new(cel::PATH_ABSOLUTE).message(cel::PATH_ABSOLUTE_MSG))]
    #[x_kube(validation = kube::core::Rule::new(cel::PATH_NO_DOT_SEGMENT).message(cel::PATH_NO_DOT_SEGMENT_MSG))]
    #[x_kube(validation = kube::core::Rule::new(cel::NO_CONTROL_CHARS).message(cel::NO_CONTROL_CHARS_MSG))]
    pub path: String,

    /// Rotate the file before a batch would take it past this many megabytes
    /// (MiB): `path` is renamed `path.1` (`path.1` to `path.2`, and so on) and
    /// a new `path` is started, as logrotate and shippers tailing a file
    /// expect. Unset: the file grows without bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1048576))]
    pub max_size_megabytes: Option<u32>,

    /// Rotated files kept (`path.1` … `path.N`); the oldest beyond them is
    /// deleted at rotation. Only with `maxSizeMegabytes`.
    #[serde(default = "default_max_files")]
    #[schemars(range(min = 1, max = 100))]
    pub max_files: u32,
}

fn default_max_files() -> u32 {
    5
}

impl FileTransport {
    /// A file that is never rotated.
    pub fn at(path: &str) -> Self {
        FileTransport {
            path: path.into(),
            max_size_megabytes: None,
            max_files: default_max_files(),
        }
    }
}

/// Trust and identity for a network transport.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SinkTls {
    /// Secret (in the operator's namespace) whose key holds the PEM CA
    /// bundle the server's certificate must chain to, instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,

    /// Name of a `kubernetes.io/tls` Secret (in the operator's namespace)
    /// whose `tls.crt` and `tls.key` the operator presents as its client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub client_certificate_secret_name: Option<String>,
}

/// One key of a Secret in the operator's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Event format of a sink.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    /// OCSF 1.x File System Activity (class_uid 1001), JSON.
    #[default]
    Ocsf,
    /// Elastic Common Schema (`event.*`, `file.*`, `process.*`, `host.*`), JSON.
    Ecs,
    /// ArcSight Common Event Format, one line per event.
    Cef,
}

impl SinkFormat {
    /// The name as written in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkFormat::Ocsf => "ocsf",
            SinkFormat::Ecs => "ecs",
            SinkFormat::Cef => "cef",
        }
    }
}

/// Delivery state of a sink, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FileChangeSinkStatus {
    /// The sink generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`: configured, and the last delivery succeeded. `Degraded`: the
    /// last delivery failed (its message is the error); retried with backoff.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// Per node, the last change delivered: an operator restart resumes after it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub positions: Vec<DeliveredPosition>,

    /// Events delivered since the sink was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered: Option<i64>,

    /// Failed delivery attempts since the sink was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<i64>,

    /// Changes known to the operator and not yet delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<i64>,

    /// Seconds since the oldest undelivered change was detected (0 when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,

    /// When a batch was last acknowledged by the receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<Time>,
}

/// How far one node's changes are delivered. Changes of a node are delivered
/// in the order of (detection time, name); everything up to and including
/// this one has been acknowledged by the receiver.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeliveredPosition {
    /// Node name.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    /// Detection time of the last change delivered.
    pub detected_time: MicroTime,
    /// Name of the last change delivered (its event id).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

fn default_batch_size() -> u32 {
    100
}
fn default_hold_max() -> String {
    "168h".into()
}
fn default_app_name() -> String {
    "kube-fim".into()
}

impl FileChangeSinkSpec {
    /// The transport, by name (`otlp`, `syslog`, `webhook`, `file`), if exactly one is set.
    pub fn transport_name(&self) -> Option<&'static str> {
        let set: Vec<&'static str> = [
            ("otlp", self.otlp.is_some()),
            ("syslog", self.syslog.is_some()),
            ("webhook", self.webhook.is_some()),
            ("file", self.file.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, s)| s.then_some(n))
        .collect();
        match set.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// A spec with this transport and every other field at the API server's defaults.
    pub fn with_file(path: &str) -> Self {
        FileChangeSinkSpec {
            file: Some(FileTransport::at(path)),
            ..FileChangeSinkSpec::default()
        }
    }

    /// A webhook spec at the API server's defaults.
    pub fn with_webhook(url: &str) -> Self {
        FileChangeSinkSpec {
            webhook: Some(WebhookTransport {
                url: url.into(),
                authorization_secret_ref: None,
            }),
            ..FileChangeSinkSpec::default()
        }
    }
}

impl Default for FileChangeSinkSpec {
    fn default() -> Self {
        FileChangeSinkSpec {
            otlp: None,
            syslog: None,
            webhook: None,
            file: None,
            format: SinkFormat::default(),
            tls: None,
            batch_size: default_batch_size(),
            hold_max: default_hold_max(),
            fingerprints: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn the_crd_is_cluster_scoped_with_a_short_name_and_status() {
        let crd = FileChangeSink::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.short_names, Some(vec!["fcs".to_string()]));
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let yaml = serde_saphyr::to_string(&crd).unwrap_or_default();
        for rule in [ONE_TRANSPORT, HTTP_URL, PORT_RANGE, HOLD_MAX] {
            assert!(yaml.contains(&rule[..20]), "rule {rule} in the CRD");
        }
    }

    #[test]
    fn every_field_has_a_description() {
        // `kubectl explain` shows the doc comments: none may be missing.
        let crd = FileChangeSink::crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap_or_default();
        let mut missing = Vec::new();
        fn walk(v: &serde_json::Value, at: String, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (name, prop) in props {
                    let here = format!("{at}.{name}");
                    if at.contains("metadata") || name == "metadata" || at.contains("conditions") {
                        continue;
                    }
                    if prop.get("description").is_none() {
                        missing.push(here.clone());
                    }
                    walk(prop, here.clone(), missing);
                    if let Some(items) = prop.get("items") {
                        walk(items, here, missing);
                    }
                }
            }
        }
        walk(&schema["openAPIV3Schema"], String::new(), &mut missing);
        // apiVersion and kind are described by Kubernetes itself.
        missing.retain(|f| f != ".apiVersion" && f != ".kind");
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }

    #[test]
    fn the_transport_is_named_only_when_exactly_one_is_set() {
        assert_eq!(
            FileChangeSinkSpec::with_file("/var/log/fim.ndjson").transport_name(),
            Some("file")
        );
        assert_eq!(
            FileChangeSinkSpec::with_webhook("https://siem").transport_name(),
            Some("webhook")
        );
        let mut both = FileChangeSinkSpec::with_file("/x");
        both.webhook = FileChangeSinkSpec::with_webhook("https://siem").webhook;
        assert_eq!(both.transport_name(), None);
        assert_eq!(FileChangeSinkSpec::default().transport_name(), None);
    }

    #[test]
    fn defaults_are_what_the_api_server_fills_in() {
        let spec: FileChangeSinkSpec =
            serde_json::from_str(r#"{"file":{"path":"/var/log/fim"}}"#).unwrap_or_default();
        assert_eq!(spec, FileChangeSinkSpec::with_file("/var/log/fim"));
        assert_eq!(spec.format, SinkFormat::Ocsf);
        assert_eq!(spec.batch_size, 100);
        assert_eq!(spec.hold_max, "168h");
    }
}
