//! The transports: how a batch of formatted events reaches a receiver, and
//! what counts as its acknowledgement.
//!
//! - `file`: appended as NDJSON, then `fsync`: acknowledged once on disk.
//!   With `maxSizeMegabytes`, rotated before a batch would pass it (`path` to
//!   `path.1`, …, the oldest beyond `maxFiles` deleted), so a batch is never
//!   split across two files.
//! - `webhook`: one HTTP POST of NDJSON per batch (hyper with the workspace's
//!   rustls); acknowledged by a 2xx answer.
//! - `otlp`: one `ExportLogsServiceRequest` per batch, one log record per
//!   event, built with the collector protocol's generated messages
//!   (`opentelemetry-proto`). `http`: OTLP/HTTP with the JSON encoding,
//!   acknowledged by a 2xx answer; `grpc`: the `LogsService/Export` call
//!   (tonic, HTTP/2 over the same rustls connector), acknowledged by an OK
//!   status. Either way, an answer naming rejected records is no
//!   acknowledgement.
//! - `syslog`: RFC 5424 messages with octet-counting framing (RFC 6587) over
//!   TCP, TLS (RFC 5425) when asked. Syslog has no acknowledgement: a batch
//!   counts as delivered once written and flushed to the connection.
//!
//! Credentials and CA bundles are read from Secrets of the operator's
//! namespace, each time the transport is built; nothing of them is logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube_fim_crds::{FileChangeSinkSpec, OtlpProtocol, SecretKeyRef, SinkTls, SyslogTransport};
use opentelemetry_proto::tonic::collector::logs::v1::logs_service_client::LogsServiceClient;
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsPartialSuccess, ExportLogsServiceRequest,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber};
use opentelemetry_proto::tonic::resource::v1::Resource;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;
use tokio::io::AsyncWrite;

/// The longest one request or write may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Kinds of failure, the `reason` label of `kube_fim_sink_failures_total`.
pub const FAILURE_REASONS: [&str; 5] = ["config", "connect", "rejected", "io", "timeout"];

/// Why a batch was not delivered.
#[derive(Debug, Error)]
pub enum SendError {
    /// The sink cannot be used as configured (a missing Secret, an unsupported protocol).
    #[error("configuration: {0}")]
    Config(String),
    /// The receiver could not be reached.
    #[error("cannot reach the receiver: {0}")]
    Connect(String),
    /// The receiver answered, and not with an acknowledgement.
    #[error("the receiver refused the batch: {0}")]
    Rejected(String),
    /// Writing failed.
    #[error("{0}")]
    Io(String),
    /// No answer in time.
    #[error("no answer within {}s", TIMEOUT.as_secs())]
    Timeout,
}

impl SendError {
    pub fn reason(&self) -> &'static str {
        match self {
            SendError::Config(_) => "config",
            SendError::Connect(_) => "connect",
            SendError::Rejected(_) => "rejected",
            SendError::Io(_) => "io",
            SendError::Timeout => "timeout",
        }
    }
}

/// One event ready to send.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// Stable event id (the FileChange's name).
    pub id: String,
    pub node: String,
    pub detected: Timestamp,
    /// The event in the sink's format, one line.
    pub line: String,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A sink's transport, ready to send.
pub enum Transport {
    File(FileTarget),
    Http(Box<HttpTarget>),
    Grpc(Box<GrpcTarget>),
    Syslog(SyslogTarget),
}

pub struct HttpTarget {
    url: hyper::Uri,
    authorization: Option<String>,
    client: HttpClient<Https, Full<Bytes>>,
    otlp: bool,
}

/// The file transport: where, and when to rotate.
#[derive(Clone, Debug)]
pub struct FileTarget {
    pub path: PathBuf,
    /// Rotate before a batch would take the file past this size.
    pub max_bytes: Option<u64>,
    /// Rotated files kept.
    pub max_files: u32,
}

impl FileTarget {
    /// A file that is never rotated.
    pub fn unbounded(path: PathBuf) -> Self {
        FileTarget {
            path,
            max_bytes: None,
            max_files: 0,
        }
    }
}

pub struct GrpcTarget {
    endpoint: String,
    authorization: Option<tonic::metadata::AsciiMetadataValue>,
    client: LogsServiceClient<tonic::transport::Channel>,
}

pub struct SyslogTarget {
    spec: SyslogTransport,
    tls: Option<Arc<rustls::ClientConfig>>,
    conn: Option<Box<dyn AsyncWrite + Send + Sync + Unpin>>,
}

async fn secret_value(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<Vec<u8>, SendError> {
    let secret = secrets
        .get(&r.name)
        .await
        .map_err(|e| SendError::Config(format!("reading Secret {}: {e}", r.name)))?;
    secret
        .data
        .and_then(|mut d| d.remove(&r.key))
        .map(|b| b.0)
        .ok_or_else(|| SendError::Config(format!("Secret {} has no key {:?}", r.name, r.key)))
}

/// The TLS client configuration of `tls` (system roots when it names no CA).
async fn tls_config(
    tls: Option<&SinkTls>,
    secrets: &Api<Secret>,
) -> Result<rustls::ClientConfig, SendError> {
    let mut roots = rustls::RootCertStore::empty();
    match tls.and_then(|t| t.ca_secret_ref.as_ref()) {
        Some(r) => {
            let pem = secret_value(secrets, r).await?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| {
                    SendError::Config(format!("CA bundle in Secret {}: {e}", r.name))
                })?;
                roots
                    .add(cert)
                    .map_err(|e| SendError::Config(format!("CA in Secret {}: {e}", r.name)))?;
            }
            if roots.is_empty() {
                return Err(SendError::Config(format!(
                    "Secret {} key {:?} holds no PEM certificate",
                    r.name, r.key
                )));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                // A system root rustls cannot parse is skipped, as browsers do.
                let _ = roots.add(cert);
            }
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SendError::Config(format!("TLS: {e}")))?
    .with_root_certificates(roots);
    match tls.and_then(|t| t.client_certificate_secret_name.as_ref()) {
        Some(name) => {
            let cert_ref = SecretKeyRef {
                name: name.clone(),
                key: "tls.crt".into(),
            };
            let key_ref = SecretKeyRef {
                name: name.clone(),
                key: "tls.key".into(),
            };
            let certs: Result<Vec<CertificateDer<'static>>, _> =
                CertificateDer::pem_slice_iter(&secret_value(secrets, &cert_ref).await?).collect();
            let certs =
                certs.map_err(|e| SendError::Config(format!("tls.crt of Secret {name}: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(&secret_value(secrets, &key_ref).await?)
                .map_err(|e| SendError::Config(format!("tls.key of Secret {name}: {e}")))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| SendError::Config(format!("client certificate {name}: {e}")))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

impl Transport {
    /// The transport of `spec`, with its Secrets read from `secrets`.
    pub async fn build(
        spec: &FileChangeSinkSpec,
        secrets: &Api<Secret>,
    ) -> Result<Self, SendError> {
        if let Some(file) = &spec.file {
            return Ok(Transport::File(FileTarget {
                path: PathBuf::from(&file.path),
                max_bytes: file.max_size_megabytes.map(|m| u64::from(m) << 20),
                max_files: file.max_files,
            }));
        }
        if let Some(syslog) = &spec.syslog {
            let tls = match syslog.tls {
                true => Some(Arc::new(tls_config(spec.tls.as_ref(), secrets).await?)),
                false => None,
            };
            return Ok(Transport::Syslog(SyslogTarget {
                spec: syslog.clone(),
                tls,
                conn: None,
            }));
        }
        let (url, auth, otlp) = match (&spec.webhook, &spec.otlp) {
            (Some(w), _) => (w.url.clone(), w.authorization_secret_ref.as_ref(), false),
            (None, Some(o)) if o.protocol == OtlpProtocol::Grpc => {
                return GrpcTarget::build(o, spec.tls.as_ref(), secrets)
                    .await
                    .map(|t| Transport::Grpc(Box::new(t)));
            }
            (None, Some(o)) => {
                let mut url = o.endpoint.clone();
                let has_path = url
                    .parse::<hyper::Uri>()
                    .map(|u| !matches!(u.path(), "" | "/"))
                    .unwrap_or(false);
                if !has_path {
                    url = format!("{}/v1/logs", url.trim_end_matches('/'));
                }
                (url, o.authorization_secret_ref.as_ref(), true)
            }
            (None, None) => {
                return Err(SendError::Config(
                    "no transport: set one of otlp, syslog, webhook, file".into(),
                ));
            }
        };
        let url: hyper::Uri = url
            .parse()
            .map_err(|e| SendError::Config(format!("URL {url:?}: {e}")))?;
        let authorization = match auth {
            Some(r) => Some(authorization(secrets, r).await?),
            None => None,
        };
        let tls = tls_config(spec.tls.as_ref(), secrets).await?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Transport::Http(Box::new(HttpTarget {
            url,
            authorization,
            client,
            otlp,
        })))
    }

    /// Sends a batch; `Ok` once the receiver acknowledged all of it.
    pub async fn send(&mut self, batch: &[Outgoing]) -> Result<(), SendError> {
        if batch.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(TIMEOUT, self.send_inner(batch)).await {
            Ok(result) => result,
            Err(_) => {
                if let Transport::Syslog(s) = self {
                    s.conn = None;
                }
                Err(SendError::Timeout)
            }
        }
    }

    async fn send_inner(&mut self, batch: &[Outgoing]) -> Result<(), SendError> {
        match self {
            Transport::File(target) => append(target.clone(), ndjson(batch)).await,
            Transport::Http(target) => target.post(batch).await,
            Transport::Grpc(target) => target.export(batch).await,
            Transport::Syslog(target) => target.send(batch).await,
        }
    }
}

/// The value of an `Authorization` header kept in a Secret.
async fn authorization(secrets: &Api<Secret>, r: &SecretKeyRef) -> Result<String, SendError> {
    Ok(String::from_utf8(secret_value(secrets, r).await?)
        .map_err(|_| SendError::Config(format!("Secret {} key {:?} is not UTF-8", r.name, r.key)))?
        .trim()
        .to_string())
}

/// The lines of a batch, each ending in a newline.
pub fn ndjson(batch: &[Outgoing]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in batch {
        out.extend_from_slice(e.line.as_bytes());
        out.push(b'\n');
    }
    out
}

/// `path.n`: the `n`th rotated file of `path`.
fn rotated(path: &std::path::Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Shifts `path.1` … `path.(keep-1)` up by one (deleting `path.keep`), then
/// renames `path` to `path.1`, and makes the renames durable. A crash in
/// between leaves a gap in the numbers, never a lost or a mixed file.
fn rotate(path: &std::path::Path, keep: u32) -> std::io::Result<()> {
    let ignore_missing = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let keep = keep.max(1);
    ignore_missing(std::fs::remove_file(rotated(path, keep)))?;
    for n in (1..keep).rev() {
        ignore_missing(std::fs::rename(rotated(path, n), rotated(path, n + 1)))?;
    }
    std::fs::rename(path, rotated(path, 1))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

async fn append(target: FileTarget, data: Vec<u8>) -> Result<(), SendError> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let path = target.path;
        if let Some(max) = target.max_bytes {
            let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if len > 0 && len + data.len() as u64 > max {
                rotate(&path, target.max_files)
                    .map_err(|e| SendError::Io(format!("rotating {}: {e}", path.display())))?;
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| SendError::Io(format!("opening {}: {e}", path.display())))?;
        f.write_all(&data)
            .and_then(|()| f.sync_data())
            .map_err(|e| SendError::Io(format!("writing {}: {e}", path.display())))
    })
    .await
    .map_err(|e| SendError::Io(format!("writer task: {e}")))?
}

impl HttpTarget {
    async fn post(&self, batch: &[Outgoing]) -> Result<(), SendError> {
        let (body, content_type) = if self.otlp {
            let body = serde_json::to_vec(&otlp_request(batch))
                .map_err(|e| SendError::Config(format!("encoding the OTLP request: {e}")))?;
            (body, "application/json")
        } else {
            (ndjson(batch), "application/x-ndjson")
        };
        let mut request = Request::post(self.url.clone()).header("content-type", content_type);
        if let Some(auth) = &self.authorization {
            request = request.header("authorization", auth);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Config(format!("request: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| SendError::Connect(error_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(SendError::Rejected(format!("HTTP {status}: {text}")));
        }
        if self.otlp {
            // An empty or unreadable body is a full success (OTLP/HTTP allows it).
            let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let partial = ExportLogsPartialSuccess {
                rejected_log_records: answer["partialSuccess"]["rejectedLogRecords"]
                    .as_str()
                    .and_then(|s| s.parse::<i64>().ok())
                    .or_else(|| answer["partialSuccess"]["rejectedLogRecords"].as_i64())
                    .unwrap_or(0),
                error_message: answer["partialSuccess"]["errorMessage"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            };
            return acknowledged(Some(&partial));
        }
        Ok(())
    }
}

/// A partial success names records the collector dropped: not delivered.
fn acknowledged(partial: Option<&ExportLogsPartialSuccess>) -> Result<(), SendError> {
    match partial {
        Some(p) if p.rejected_log_records > 0 => Err(SendError::Rejected(format!(
            "the collector rejected {} log records: {:?}",
            p.rejected_log_records, p.error_message
        ))),
        _ => Ok(()),
    }
}

impl GrpcTarget {
    async fn build(
        otlp: &kube_fim_crds::OtlpTransport,
        tls: Option<&SinkTls>,
        secrets: &Api<Secret>,
    ) -> Result<Self, SendError> {
        let authorization = match &otlp.authorization_secret_ref {
            Some(r) => Some(authorization(secrets, r).await?.parse().map_err(|_| {
                SendError::Config(format!(
                    "Secret {} key {:?} is not a valid header value",
                    r.name, r.key
                ))
            })?),
            None => None,
        };
        // The connector offers `h2` by ALPN itself.
        let tls = tls_config(tls, secrets).await?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http2()
            .build();
        let endpoint = tonic::transport::Endpoint::from_shared(otlp.endpoint.clone())
            .map_err(|e| SendError::Config(format!("endpoint {:?}: {e}", otlp.endpoint)))?
            .connect_timeout(TIMEOUT)
            .timeout(TIMEOUT);
        // Connects on the first export, and again after a failure.
        let channel = endpoint.connect_with_connector_lazy(connector);
        Ok(GrpcTarget {
            endpoint: otlp.endpoint.clone(),
            authorization,
            client: LogsServiceClient::new(channel),
        })
    }

    async fn export(&mut self, batch: &[Outgoing]) -> Result<(), SendError> {
        let mut request = tonic::Request::new(otlp_request(batch));
        if let Some(auth) = &self.authorization {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        let answer = self.client.export(request).await.map_err(|status| {
            let text = format!(
                "{}: {:?} {}",
                self.endpoint,
                status.code(),
                status.message()
            );
            match status.code() {
                tonic::Code::Unavailable | tonic::Code::Unknown => {
                    SendError::Connect(format!("{text}: {}", error_chain(&status)))
                }
                tonic::Code::DeadlineExceeded => SendError::Timeout,
                _ => SendError::Rejected(text),
            }
        })?;
        acknowledged(answer.into_inner().partial_success.as_ref())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn text(value: &str) -> Option<AnyValue> {
    Some(AnyValue {
        value: Some(any_value::Value::StringValue(value.to_string())),
    })
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: text(value),
        ..Default::default()
    }
}

/// A nanosecond count as OTLP carries it (0, "unknown", before 1970).
fn unix_nanos(t: Timestamp) -> u64 {
    u64::try_from(t.as_nanosecond()).unwrap_or(0)
}

/// The OTLP `ExportLogsServiceRequest` of a batch: one log record per event,
/// its body the event, `event.id` its stable id.
pub fn otlp_request(batch: &[Outgoing]) -> ExportLogsServiceRequest {
    let now = unix_nanos(Timestamp::now());
    let records = batch
        .iter()
        .map(|e| LogRecord {
            time_unix_nano: unix_nanos(e.detected),
            observed_time_unix_nano: now,
            severity_number: SeverityNumber::Warn as i32,
            severity_text: "WARN".into(),
            event_name: "kube_fim.file_change".into(),
            body: text(&e.line),
            attributes: vec![kv("event.id", &e.id), kv("host.name", &e.node)],
            ..Default::default()
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "kube-fim-operator")],
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: "kube-fim".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: records,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// An RFC 5424 field of printable US-ASCII without spaces, `-` when empty.
fn syslog_token(s: &str, max: usize) -> String {
    let t: String = s
        .chars()
        .filter(|c| ('!'..='~').contains(c))
        .take(max)
        .collect();
    if t.is_empty() { "-".into() } else { t }
}

/// One RFC 5424 message: facility log audit (13), severity notice (5).
pub fn rfc5424(app_name: &str, event: &Outgoing) -> String {
    const PRI: u8 = 13 * 8 + 5;
    format!(
        "<{PRI}>1 {} {} {} - FileChange [origin software=\"kube-fim\" swVersion=\"{}\"] {}",
        event.detected.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"),
        syslog_token(&event.node, 255),
        syslog_token(app_name, 48),
        env!("CARGO_PKG_VERSION"),
        event.line
    )
}

/// Octet-counting framing (RFC 6587 3.4.1, RFC 5425 4.3): `LEN SP MSG`.
pub fn frame(message: &str) -> String {
    format!("{} {message}", message.len())
}

/// Writes all of `buf` and flushes. (The workspace builds tokio without its
/// `io-util` extension traits; this is the one place that needs them.)
async fn write_all<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    mut buf: &[u8],
) -> std::io::Result<()> {
    use std::pin::Pin;
    while !buf.is_empty() {
        let n = std::future::poll_fn(|cx| Pin::new(&mut *w).poll_write(cx, buf)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    std::future::poll_fn(|cx| Pin::new(&mut *w).poll_flush(cx)).await
}

impl SyslogTarget {
    async fn connect(&self) -> Result<Box<dyn AsyncWrite + Send + Sync + Unpin>, SendError> {
        let addr = format!("{}:{}", self.spec.host, self.spec.port);
        let tcp = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| SendError::Connect(format!("{addr}: {e}")))?;
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some(config) => {
                let name = ServerName::try_from(self.spec.host.clone())
                    .map_err(|e| SendError::Config(format!("host {:?}: {e}", self.spec.host)))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| SendError::Connect(format!("TLS with {addr}: {e}")))?;
                Ok(Box::new(tls))
            }
        }
    }

    async fn send(&mut self, batch: &[Outgoing]) -> Result<(), SendError> {
        let mut data = String::new();
        for e in batch {
            data.push_str(&frame(&rfc5424(&self.spec.app_name, e)));
        }
        if self.conn.is_none() {
            self.conn = Some(self.connect().await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(SendError::Connect("no connection".into()));
        };
        let written = write_all(conn.as_mut(), data.as_bytes()).await;
        if let Err(e) = written {
            // The next attempt reconnects and sends the whole batch again.
            self.conn = None;
            return Err(SendError::Io(format!("writing to syslog: {e}")));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn event(line: &str) -> Outgoing {
        Outgoing {
            id: "node-a-passwd-1".into(),
            node: "node-a".into(),
            detected: "2026-12-07T05:01:02.345678Z".parse().unwrap(),
            line: line.into(),
        }
    }

    #[test]
    fn syslog_messages_follow_rfc5424_with_octet_counting() {
        let m = rfc5424("kube-fim", &event(r#"{"class_uid":1001}"#));
        assert_eq!(
            m,
            format!(
                "<109>1 2026-12-07T05:01:02.345678Z node-a kube-fim - FileChange [origin software=\"kube-fim\" swVersion=\"{}\"] {{\"class_uid\":1001}}",
                env!("CARGO_PKG_VERSION")
            )
        );
        // The receiver's parser reads it back (a maintained RFC 5424 parser).
        let parsed = syslog_loose::parse_message(&m, syslog_loose::Variant::RFC5424);
        assert_eq!(parsed.hostname, Some("node-a"));
        assert_eq!(parsed.appname, Some("kube-fim"));
        assert_eq!(parsed.msgid, Some("FileChange"));
        assert_eq!(
            parsed.facility,
            Some(syslog_loose::SyslogFacility::LOG_AUDIT)
        );
        assert_eq!(parsed.msg, r#"{"class_uid":1001}"#);
        assert_eq!(
            frame("héllo"),
            "6 héllo",
            "length in octets, not characters"
        );
        let mut odd = event("x");
        odd.node = "bad host\nname".into();
        assert!(
            rfc5424("a b", &odd)
                .starts_with("<109>1 2026-12-07T05:01:02.345678Z badhostname ab - ")
        );
    }

    #[test]
    fn otlp_requests_carry_one_record_per_event_with_its_id() {
        let v = serde_json::to_value(otlp_request(&[event("one"), event("two")])).unwrap();
        let records = &v["resourceLogs"][0]["scopeLogs"][0]["logRecords"];
        assert_eq!(records.as_array().unwrap().len(), 2);
        assert_eq!(records[1]["body"]["stringValue"], "two");
        assert_eq!(records[0]["timeUnixNano"], "1796619662345678000");
        assert_eq!(records[0]["attributes"][0]["key"], "event.id");
        assert_eq!(
            records[0]["attributes"][0]["value"]["stringValue"],
            "node-a-passwd-1"
        );
    }

    #[test]
    fn ndjson_is_one_line_per_event() {
        assert_eq!(
            ndjson(&[event("{}"), event("{\"a\":1}")]),
            b"{}\n{\"a\":1}\n"
        );
    }

    #[tokio::test]
    async fn the_file_transport_appends() {
        let dir = std::env::temp_dir().join(format!("kube-fim-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events.ndjson");
        let _ = std::fs::remove_file(&path);
        let mut t = Transport::File(FileTarget::unbounded(path.clone()));
        t.send(&[event("a")]).await.unwrap();
        t.send(&[event("b"), event("c")]).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a\nb\nc\n");
        let mut missing = Transport::File(FileTarget::unbounded(dir.join("no/such/dir/x")));
        let err = missing.send(&[event("a")]).await.unwrap_err();
        assert_eq!(err.reason(), "io");
        assert!(err.to_string().contains("no/such/dir"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn the_file_transport_rotates_before_a_batch_would_pass_the_size() {
        let dir = std::env::temp_dir().join(format!("kube-fim-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("evidence.ndjson");
        let mut t = Transport::File(FileTarget {
            path: path.clone(),
            max_bytes: Some(8),
            max_files: 2,
        });
        let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
        // "aaa\n" + "bbb\n" fill 8 bytes exactly: no rotation yet.
        t.send(&[event("aaa")]).await.unwrap();
        t.send(&[event("bbb")]).await.unwrap();
        assert_eq!(read(&path), "aaa\nbbb\n");
        // The next batch would pass 8: the file moves to .1, whole.
        t.send(&[event("ccc"), event("ddd")]).await.unwrap();
        assert_eq!(read(&path), "ccc\nddd\n");
        assert_eq!(read(&rotated(&path, 1)), "aaa\nbbb\n");
        // A batch bigger than the limit still goes whole, into a fresh file.
        t.send(&[event("a-batch-longer-than-8-bytes")])
            .await
            .unwrap();
        assert_eq!(read(&path), "a-batch-longer-than-8-bytes\n");
        assert_eq!(read(&rotated(&path, 1)), "ccc\nddd\n");
        assert_eq!(read(&rotated(&path, 2)), "aaa\nbbb\n");
        // Two kept: the oldest goes.
        t.send(&[event("eee")]).await.unwrap();
        assert_eq!(read(&path), "eee\n");
        assert_eq!(read(&rotated(&path, 1)), "a-batch-longer-than-8-bytes\n");
        assert_eq!(read(&rotated(&path, 2)), "ccc\nddd\n");
        assert!(!rotated(&path, 3).exists());
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["evidence.ndjson", "evidence.ndjson.1", "evidence.ndjson.2"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
