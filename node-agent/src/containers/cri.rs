//! The node's running containers as its container runtime tells them, over
//! the CRI socket (containerd, CRI-O, k3s: the same gRPC API).
//!
//! Only what drift needs is asked: `Version` (the runtime's name, the prefix
//! of the container ids the kubelet writes into pod status), `ListContainers`
//! (the running ones) and a verbose `ContainerStatus` of each new container
//! (its image, the image's digest and its first process: the `pid` in the
//! runtime's `info` JSON). The messages below declare only the fields read;
//! protobuf skips the others, so a newer runtime needs no change here.
//!
//! Nothing the runtime answers is trusted further than a pod status would be:
//! ids must be plain (they name files and cgroups), a response is bounded in
//! size and every call in time, and the process named must carry the
//! container id in its cgroup before its mounts are read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kube_fim_crds::ContainerRef;

use super::select::Running;

/// A call that has not answered by then failed: a hung runtime must not
/// stall the drift task.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest response read (CRI's own default gRPC limit is 16 MiB).
pub const MAX_RESPONSE: usize = 16 << 20;

/// Kubernetes' labels on every container the kubelet creates.
const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
const POD_NAME: &str = "io.kubernetes.pod.name";
const POD_UID: &str = "io.kubernetes.pod.uid";
const CONTAINER_NAME: &str = "io.kubernetes.container.name";

/// `runtime.v1.ContainerState.CONTAINER_RUNNING`.
const RUNNING: i32 = 1;

#[derive(Clone, PartialEq, prost::Message)]
struct VersionRequest {
    #[prost(string, tag = "1")]
    version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct VersionResponse {
    #[prost(string, tag = "2")]
    runtime_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerStateValue {
    #[prost(int32, tag = "1")]
    state: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerFilter {
    #[prost(message, optional, tag = "2")]
    state: Option<ContainerStateValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ListContainersRequest {
    #[prost(message, optional, tag = "1")]
    filter: Option<ContainerFilter>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerMetadata {
    #[prost(string, tag = "1")]
    name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ImageSpec {
    #[prost(string, tag = "1")]
    image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Container {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(message, optional, tag = "3")]
    metadata: Option<ContainerMetadata>,
    #[prost(int32, tag = "6")]
    state: i32,
    #[prost(map = "string, string", tag = "8")]
    labels: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ListContainersResponse {
    #[prost(message, repeated, tag = "1")]
    containers: Vec<Container>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerStatusRequest {
    #[prost(string, tag = "1")]
    container_id: String,
    #[prost(bool, tag = "2")]
    verbose: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerStatus {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(int32, tag = "3")]
    state: i32,
    #[prost(message, optional, tag = "8")]
    image: Option<ImageSpec>,
    #[prost(string, tag = "9")]
    image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ContainerStatusResponse {
    #[prost(message, optional, tag = "1")]
    status: Option<ContainerStatus>,
    #[prost(map = "string, string", tag = "2")]
    info: HashMap<String, String>,
}

/// Why the runtime could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connecting to {0}: {1}")]
    Connect(PathBuf, std::io::Error),
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("{method}: gRPC status {code}: {message}")]
    Status {
        method: &'static str,
        code: String,
        message: String,
    },
    #[error("{0}: no answer within {CALL_TIMEOUT:?}")]
    Timeout(&'static str),
    #[error("{0}: response larger than {MAX_RESPONSE} bytes")]
    TooLarge(&'static str),
    #[error("{0}: malformed response: {1}")]
    Malformed(&'static str, String),
}

/// A running container as the runtime tells it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriContainer {
    pub running: Running,
    /// Its first process (host pid), when the runtime says.
    pub pid: Option<u32>,
}

/// The CRI socket of the node, as the agent sees it.
#[derive(Clone, Debug)]
pub struct Cri {
    socket: PathBuf,
    /// The runtime's name (`containerd`), asked once.
    runtime: Option<String>,
    /// What the runtime said of each container (status calls are one per new container).
    known: HashMap<String, CriContainer>,
}

/// One connection: HTTP/2 over the unix socket.
struct Channel {
    send: h2::client::SendRequest<Bytes>,
}

impl Channel {
    async fn open(socket: &std::path::Path) -> Result<Self, CriError> {
        let io = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| CriError::Connect(socket.to_path_buf(), e))?;
        let (send, connection) = h2::client::Builder::new()
            .max_frame_size(1 << 20)
            .handshake(io)
            .await?;
        // The connection ends when `send` is dropped (or the runtime closes it).
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Channel { send })
    }

    async fn call<Q: prost::Message, A: prost::Message + Default>(
        &mut self,
        method: &'static str,
        request: &Q,
    ) -> Result<A, CriError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.call_now(method, request)).await {
            Ok(answer) => answer,
            Err(_) => Err(CriError::Timeout(method)),
        }
    }

    async fn call_now<Q: prost::Message, A: prost::Message + Default>(
        &mut self,
        method: &'static str,
        request: &Q,
    ) -> Result<A, CriError> {
        let http = http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://localhost/runtime.v1.RuntimeService/{method}"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, mut stream) = send.send_request(http, false)?;
        stream.send_data(frame(request), true)?;
        let response = response.await?;
        // A call refused at once answers with the status in its headers.
        grpc_status(method, response.headers())?;
        let mut body = response.into_body();
        let mut got = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            if got.len() + chunk.len() > MAX_RESPONSE + 5 {
                return Err(CriError::TooLarge(method));
            }
            got.extend_from_slice(&chunk);
        }
        if let Some(trailers) = body.trailers().await? {
            grpc_status(method, &trailers)?;
        }
        unframe(method, &got)
    }
}

/// A gRPC message: uncompressed flag, big-endian length, the message.
fn frame<Q: prost::Message>(message: &Q) -> Bytes {
    let len = message.encoded_len();
    let mut out = BytesMut::with_capacity(5 + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer of the right size cannot fail.
    let _ = message.encode(&mut out);
    out.freeze()
}

fn unframe<A: prost::Message + Default>(method: &'static str, body: &[u8]) -> Result<A, CriError> {
    let malformed = |why: &str| CriError::Malformed(method, why.to_string());
    let (head, rest) = body
        .split_at_checked(5)
        .ok_or_else(|| malformed("no gRPC message"))?;
    if head[0] != 0 {
        return Err(malformed("compressed message"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let message = rest
        .get(..len)
        .ok_or_else(|| malformed("truncated gRPC message"))?;
    A::decode(message).map_err(|e| CriError::Malformed(method, e.to_string()))
}

fn grpc_status(method: &'static str, headers: &http::HeaderMap) -> Result<(), CriError> {
    match headers
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or("?"))
    {
        None | Some("0") => Ok(()),
        Some(code) => Err(CriError::Status {
            method,
            code: code.to_string(),
            message: headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect(),
        }),
    }
}

/// An id is a file name of the agent's state and a path component of
/// cgroups: nothing but letters and digits is taken.
fn plain(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The first process of a container from the runtime's verbose `info`
/// (containerd and CRI-O both put a JSON object with `pid` under `info`).
fn pid_of(info: &HashMap<String, String>) -> Option<u32> {
    let json: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    json.get("pid")?
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 1)
}

impl Cri {
    /// The runtime behind `socket` (a path in the agent's own file system).
    pub fn new(socket: PathBuf) -> Self {
        Cri {
            socket,
            runtime: None,
            known: HashMap::new(),
        }
    }

    /// The socket asked.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// The running containers of the node's pods, with their pods, images and
    /// first processes. Containers the runtime names badly are left out.
    pub async fn running(&mut self) -> Result<Vec<CriContainer>, CriError> {
        let mut channel = Channel::open(&self.socket).await?;
        let runtime = match &self.runtime {
            Some(r) => r.clone(),
            None => {
                let v: VersionResponse = channel
                    .call(
                        "Version",
                        &VersionRequest {
                            version: "v1".into(),
                        },
                    )
                    .await?;
                let name = if plain_name(&v.runtime_name) {
                    v.runtime_name
                } else {
                    "unknown".to_string()
                };
                self.runtime = Some(name.clone());
                name
            }
        };
        let list: ListContainersResponse = channel
            .call(
                "ListContainers",
                &ListContainersRequest {
                    filter: Some(ContainerFilter {
                        state: Some(ContainerStateValue { state: RUNNING }),
                    }),
                },
            )
            .await?;
        let mut out = Vec::new();
        let mut seen = HashMap::new();
        for c in list.containers {
            if c.state != RUNNING || !plain(&c.id) {
                continue;
            }
            let label = |k: &str| c.labels.get(k).cloned().unwrap_or_default();
            let (namespace, pod, pod_uid) = (label(POD_NAMESPACE), label(POD_NAME), label(POD_UID));
            // Not a pod's container (the runtime runs others too).
            if namespace.is_empty() || pod.is_empty() || pod_uid.is_empty() {
                continue;
            }
            if let Some(known) = self.known.get(&c.id) {
                seen.insert(c.id.clone(), known.clone());
                out.push(known.clone());
                continue;
            }
            let status: ContainerStatusResponse = channel
                .call(
                    "ContainerStatus",
                    &ContainerStatusRequest {
                        container_id: c.id.clone(),
                        verbose: true,
                    },
                )
                .await?;
            let pid = pid_of(&status.info);
            let s = status.status.unwrap_or_default();
            let name = Some(label(CONTAINER_NAME))
                .filter(|n| !n.is_empty())
                .or_else(|| c.metadata.as_ref().map(|m| m.name.clone()))
                .unwrap_or_default();
            let found = CriContainer {
                running: Running {
                    reference: ContainerRef {
                        namespace,
                        pod,
                        pod_uid,
                        name,
                        id: format!("{runtime}://{}", c.id),
                        image: s.image.map(|i| i.image).filter(|i| !i.is_empty()),
                        image_digest: Some(s.image_ref).filter(|i| !i.is_empty()),
                    },
                    bare_id: c.id.clone(),
                },
                pid,
            };
            seen.insert(c.id.clone(), found.clone());
            out.push(found);
        }
        // What the runtime no longer runs is forgotten.
        self.known = seen;
        Ok(out)
    }
}

fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// A CRI server for the tests: answers from a list of containers, as a
/// runtime would, with the same framing (real HTTP/2 over a unix socket).
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod fake {
    use super::*;
    use prost::Message;
    use std::sync::{Arc, Mutex};

    /// How the fake runtime misbehaves.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Behaviour {
        Honest,
        /// Accepts the call and never answers.
        Hang,
        /// Answers ListContainers with more than the client reads.
        Huge,
        /// Answers with bytes that are no protobuf.
        Garbage,
        /// Refuses with a gRPC error.
        Refuse,
    }

    /// A running container: id, labels, image, digest, pid.
    type Entry = (String, HashMap<String, String>, String, String, u32);

    #[derive(Clone)]
    pub struct Runtime {
        pub containers: Arc<Mutex<Vec<Entry>>>,
        pub behaviour: Arc<Mutex<Behaviour>>,
        pub status_calls: Arc<Mutex<usize>>,
    }

    impl Runtime {
        pub fn new() -> Self {
            Runtime {
                containers: Arc::default(),
                behaviour: Arc::new(Mutex::new(Behaviour::Honest)),
                status_calls: Arc::default(),
            }
        }

        /// A pod's running container: id, pod labels, image, digest, pid.
        pub fn add(&self, id: &str, ns: &str, pod: &str, uid: &str, name: &str, pid: u32) {
            let labels = HashMap::from([
                (POD_NAMESPACE.to_string(), ns.to_string()),
                (POD_NAME.to_string(), pod.to_string()),
                (POD_UID.to_string(), uid.to_string()),
                (CONTAINER_NAME.to_string(), name.to_string()),
            ]);
            self.containers.lock().unwrap().push((
                id.to_string(),
                labels,
                "localhost/web:1".to_string(),
                "localhost/web@sha256:abc".to_string(),
                pid,
            ));
        }

        fn answer(&self, method: &str, body: &[u8]) -> Vec<u8> {
            match method {
                "Version" => VersionResponse {
                    runtime_name: "containerd".into(),
                }
                .encode_to_vec(),
                "ListContainers" => {
                    let containers = self.containers.lock().unwrap();
                    ListContainersResponse {
                        containers: containers
                            .iter()
                            .map(|(id, labels, ..)| Container {
                                id: id.clone(),
                                metadata: Some(ContainerMetadata { name: "x".into() }),
                                state: RUNNING,
                                labels: labels.clone(),
                            })
                            .collect(),
                    }
                    .encode_to_vec()
                }
                "ContainerStatus" => {
                    *self.status_calls.lock().unwrap() += 1;
                    let q = ContainerStatusRequest::decode(&body[5..]).unwrap();
                    let containers = self.containers.lock().unwrap();
                    let (id, _, image, digest, pid) = containers
                        .iter()
                        .find(|c| c.0 == q.container_id)
                        .unwrap()
                        .clone();
                    ContainerStatusResponse {
                        status: Some(ContainerStatus {
                            id,
                            state: RUNNING,
                            image: Some(ImageSpec { image }),
                            image_ref: digest,
                        }),
                        info: HashMap::from([(
                            "info".to_string(),
                            format!(r#"{{"sandboxID":"s","pid":{pid},"runtimeSpec":{{}}}}"#),
                        )]),
                    }
                    .encode_to_vec()
                }
                _ => Vec::new(),
            }
        }

        /// Serves on `socket` until the test ends.
        pub fn serve(&self, socket: &std::path::Path) {
            let listener = tokio::net::UnixListener::bind(socket).unwrap();
            let me = self.clone();
            tokio::spawn(async move {
                while let Ok((io, _)) = listener.accept().await {
                    let me = me.clone();
                    tokio::spawn(async move {
                        let Ok(mut conn) = h2::server::handshake(io).await else {
                            return;
                        };
                        while let Some(Ok((request, mut respond))) = conn.accept().await {
                            let me = me.clone();
                            tokio::spawn(async move {
                                let method = request
                                    .uri()
                                    .path()
                                    .rsplit('/')
                                    .next()
                                    .unwrap_or_default()
                                    .to_string();
                                let mut body = request.into_body();
                                let mut got = Vec::new();
                                while let Some(Ok(c)) = body.data().await {
                                    let _ = body.flow_control().release_capacity(c.len());
                                    got.extend_from_slice(&c);
                                }
                                let behaviour = *me.behaviour.lock().unwrap();
                                if behaviour == Behaviour::Hang {
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                }
                                if behaviour == Behaviour::Refuse {
                                    let r = http::Response::builder()
                                        .header("content-type", "application/grpc")
                                        .header("grpc-status", "7")
                                        .header("grpc-message", "permission denied")
                                        .body(())
                                        .unwrap();
                                    let _ = respond.send_response(r, true);
                                    return;
                                }
                                let message = match (behaviour, method.as_str()) {
                                    (Behaviour::Huge, "ListContainers") => {
                                        vec![0u8; MAX_RESPONSE + 1024]
                                    }
                                    (Behaviour::Garbage, "ListContainers") => vec![0xff; 64],
                                    _ => me.answer(&method, &got),
                                };
                                let r = http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(())
                                    .unwrap();
                                let Ok(mut stream) = respond.send_response(r, false) else {
                                    return;
                                };
                                let mut framed = BytesMut::new();
                                framed.put_u8(0);
                                framed.put_u32(message.len() as u32);
                                framed.extend_from_slice(&message);
                                let mut framed = framed.freeze();
                                while !framed.is_empty() {
                                    stream.reserve_capacity(framed.len().min(1 << 16));
                                    let cap =
                                        match std::future::poll_fn(|cx| stream.poll_capacity(cx))
                                            .await
                                        {
                                            Some(Ok(c)) => c,
                                            _ => return,
                                        };
                                    let chunk = framed.split_to(cap.min(framed.len()));
                                    if stream.send_data(chunk, false).is_err() {
                                        return;
                                    }
                                }
                                let mut trailers = http::HeaderMap::new();
                                trailers.insert("grpc-status", "0".parse().unwrap());
                                let _ = stream.send_trailers(trailers);
                            });
                        }
                    });
                }
            });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::fake::{Behaviour, Runtime};
    use super::*;

    #[tokio::test]
    async fn the_runtime_names_its_running_containers_pods_images_and_processes() {
        let t = tempfile::tempdir().unwrap();
        let socket = t.path().join("cri.sock");
        let runtime = Runtime::new();
        runtime.add("abc123", "shop", "web", "u-1", "web", 4242);
        runtime.add("../../etc", "shop", "web", "u-1", "evil", 4243);
        runtime.serve(&socket);
        let mut cri = Cri::new(socket);
        let found = cri.running().await.unwrap();
        assert_eq!(found.len(), 1, "an id that is no plain name is left out");
        let c = &found[0];
        assert_eq!(c.pid, Some(4242));
        assert_eq!(c.running.bare_id, "abc123");
        let r = &c.running.reference;
        assert_eq!(
            r.id, "containerd://abc123",
            "the id as pod status writes it"
        );
        assert_eq!((r.namespace.as_str(), r.pod.as_str()), ("shop", "web"));
        assert_eq!((r.pod_uid.as_str(), r.name.as_str()), ("u-1", "web"));
        assert_eq!(r.image.as_deref(), Some("localhost/web:1"));
        assert_eq!(r.image_digest.as_deref(), Some("localhost/web@sha256:abc"));
        // A container already known costs no status call on the next pass.
        let calls = *runtime.status_calls.lock().unwrap();
        assert_eq!(cri.running().await.unwrap(), found);
        assert_eq!(*runtime.status_calls.lock().unwrap(), calls);
    }

    #[tokio::test]
    async fn a_runtime_that_hangs_lies_or_floods_is_an_error_not_a_stall() {
        for (behaviour, want) in [
            (Behaviour::Huge, "larger than"),
            (Behaviour::Garbage, "malformed"),
            (Behaviour::Refuse, "gRPC status 7: permission denied"),
        ] {
            let t = tempfile::tempdir().unwrap();
            let socket = t.path().join("cri.sock");
            let runtime = Runtime::new();
            *runtime.behaviour.lock().unwrap() = behaviour;
            runtime.serve(&socket);
            let error = Cri::new(socket).running().await.unwrap_err().to_string();
            assert!(error.contains(want), "{behaviour:?}: {error}");
        }
        // Nobody listening.
        let t = tempfile::tempdir().unwrap();
        let error = Cri::new(t.path().join("none.sock")).running().await;
        assert!(matches!(error, Err(CriError::Connect(..))), "{error:?}");
    }

    #[tokio::test]
    async fn a_runtime_that_never_answers_times_out() {
        let t = tempfile::tempdir().unwrap();
        let socket = t.path().join("cri.sock");
        let runtime = Runtime::new();
        *runtime.behaviour.lock().unwrap() = Behaviour::Hang;
        runtime.serve(&socket);
        let error = Cri::new(socket).running().await.unwrap_err();
        assert!(matches!(error, CriError::Timeout("Version")), "{error}");
    }

    #[test]
    fn the_pid_comes_from_the_runtimes_info() {
        let info = |s: &str| HashMap::from([("info".to_string(), s.to_string())]);
        assert_eq!(pid_of(&info(r#"{"pid": 77}"#)), Some(77));
        assert_eq!(pid_of(&info(r#"{"pid": 1}"#)), None, "not the host's init");
        assert_eq!(pid_of(&info(r#"{"pid": -3}"#)), None);
        assert_eq!(pid_of(&info(r#"{"pid": 99999999999}"#)), None);
        assert_eq!(pid_of(&info("not json")), None);
        assert_eq!(pid_of(&HashMap::new()), None);
    }
}
