//! The kubelet's one door to containerd: its native gRPC API (containerd
//! 1.6, through `containerd-client`), every call in the kubelet's own
//! containerd namespace. Content, snapshots, the diff service and images
//! for pulls (1.6 has no transfer service); containers and tasks for
//! running; the event stream for exits.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1 as api;
use containerd_client::services::v1::snapshots as snap;
use containerd_client::tonic::{self, Request, Status};
use containerd_client::types::{Descriptor, Mount};
use futures::Stream;
use tonic::transport::Channel;

pub const SNAPSHOTTER: &str = "overlayfs";
pub const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("connecting to containerd at {socket}: {source}")]
    Connect {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("containerd {op} {what}: {status}")]
    Call {
        op: &'static str,
        what: String,
        status: Box<Status>,
    },
}

impl ContainerdError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Call { status, .. } if status.code() == tonic::Code::NotFound)
    }

    pub fn is_already_exists(&self) -> bool {
        matches!(self, Self::Call { status, .. } if status.code() == tonic::Code::AlreadyExists)
    }
}

type Result<T> = std::result::Result<T, ContainerdError>;

fn call(op: &'static str, what: impl Into<String>) -> impl FnOnce(Status) -> ContainerdError {
    let what = what.into();
    move |status| ContainerdError::Call {
        op,
        what,
        status: Box::new(status),
    }
}

/// A client bound to one containerd namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    /// The runc shim's options for new containers: which OCI runtime
    /// binary it runs (runc or crun); `None` keeps the shim's default.
    runtime_options: Option<prost_types::Any>,
    /// The lease every call of this handle runs under (see [`Containerd::leased`]).
    lease: Option<String>,
}

/// How long a lease outlives a kubelet that crashed before releasing it.
const LEASE_EXPIRY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Distinguishes the leases of one process.
static LEASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The runc v2 shim's options message (`containerd.runc.v1.Options`),
/// only the field the kubelet sets.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncOptions {
    #[prost(string, tag = "6")]
    binary_name: String,
}

/// A container's task as containerd reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskState {
    Running { pid: u32 },
    Stopped { exit_status: u32 },
    Other,
}

/// The stdio of an exec process: FIFO paths ("" for a stream not used)
/// and whether it has a terminal.
#[derive(Clone, Debug, Default)]
pub struct ExecIo {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// A task exit from the event stream.
#[derive(Clone, Debug)]
pub struct Exit {
    pub container_id: String,
    pub exit_status: u32,
    pub exited_at: Option<prost_types::Timestamp>,
}

impl Containerd {
    /// `runtime_binary`: the OCI runtime the shim runs (`runc`, `crun`, or
    /// a path); `None` for the shim's default (runc).
    pub async fn connect(
        socket: &Path,
        namespace: &str,
        runtime_binary: Option<&str>,
    ) -> Result<Self> {
        let channel = containerd_client::connect(socket).await.map_err(|source| {
            ContainerdError::Connect {
                socket: socket.display().to_string(),
                source,
            }
        })?;
        let runtime_options = runtime_binary.map(|b| prost_types::Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: prost::Message::encode_to_vec(&RuncOptions {
                binary_name: b.to_string(),
            }),
        });
        Ok(Self {
            channel,
            namespace: namespace.to_string(),
            runtime_options,
            lease: None,
        })
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        if let Ok(ns) = self.namespace.parse() {
            r.metadata_mut().insert("containerd-namespace", ns);
        }
        if let Some(Ok(lease)) = self.lease.as_ref().map(|l| l.parse()) {
            r.metadata_mut().insert("containerd-lease", lease);
        }
        r
    }

    /// A handle whose calls run under a new lease, so that containerd's
    /// garbage collector keeps what they make (content, snapshots) until
    /// something references it: without one, a collection that runs
    /// between preparing a snapshot and creating the container that uses
    /// it (any removal schedules one) deletes the snapshot, and the task
    /// fails to mount its rootfs. Give it back with [`Containerd::release`]
    /// once the work is referenced; a crashed kubelet's lease expires.
    pub async fn leased(&self, purpose: &str) -> Result<Self> {
        let n = LEASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("skiff-{purpose}-{}-{n}", std::process::id());
        let expire = k8s_openapi::jiff::Timestamp::now()
            .checked_add(LEASE_EXPIRY)
            .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
        let labels = HashMap::from([("containerd.io/gc.expire".to_string(), expire.to_string())]);
        api::leases_client::LeasesClient::new(self.channel.clone())
            .create(self.req(api::CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(call("lease create", id.clone()))?;
        Ok(Self {
            lease: Some(id),
            ..self.clone()
        })
    }

    /// Ends this handle's lease; what it made stays if it is referenced.
    pub async fn release(&self) {
        let Some(id) = &self.lease else { return };
        let r = api::leases_client::LeasesClient::new(self.channel.clone())
            .delete(self.req(api::DeleteRequest {
                id: id.clone(),
                sync: false,
            }))
            .await;
        if let Err(s) = r {
            tracing::warn!(lease = %id, error = %s, "releasing a containerd lease failed; it expires on its own");
        }
    }

    /// containerd's version (for `nodeInfo.containerRuntimeVersion`).
    pub async fn version(&self) -> Result<String> {
        let v = api::version_client::VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(call("version", ""))?;
        Ok(v.into_inner().version)
    }

    // ---- content ----

    /// Whether the content store holds `digest`.
    pub async fn has_content(&self, digest: &str) -> Result<bool> {
        let r = api::content_client::ContentClient::new(self.channel.clone())
            .info(self.req(api::InfoRequest {
                digest: digest.into(),
            }))
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(call("content info", digest)(s)),
        }
    }

    /// Writes one blob from `chunks`, committed under its expected digest
    /// with `labels` (the garbage collector's references).
    pub async fn write_content<S>(
        &self,
        desc: &Descriptor,
        chunks: S,
        labels: HashMap<String, String>,
    ) -> Result<()>
    where
        S: Stream<Item = std::result::Result<bytes::Bytes, String>> + Send + 'static,
    {
        use futures::StreamExt as _;
        let reference = format!("skiff-pull-{}", desc.digest);
        let (total, expected) = (desc.size, desc.digest.clone());
        let requests = async_stream(reference, total, expected, chunks, labels);
        let mut responses = match api::content_client::ContentClient::new(self.channel.clone())
            .write(self.req(requests))
            .await
        {
            Ok(r) => r.into_inner(),
            // Another pull wrote it first.
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(call("content write", &desc.digest)(s)),
        };
        while let Some(r) = responses.next().await {
            match r {
                Ok(_) => {}
                // Committing content that exists is a success.
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(call("content write", &desc.digest)(s)),
            }
        }
        Ok(())
    }

    // ---- snapshots ----

    pub async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        let r = snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .stat(self.req(snap::StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            }))
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(call("snapshot stat", key)(s)),
        }
    }

    /// An active snapshot `key` on `parent`; its mounts.
    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>> {
        let r = snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .prepare(self.req(snap::PrepareSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
                parent: parent.into(),
                labels,
            }))
            .await
            .map_err(call("snapshot prepare", key))?;
        Ok(r.into_inner().mounts)
    }

    /// The mounts of an existing active snapshot.
    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let r = snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .mounts(self.req(snap::MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            }))
            .await
            .map_err(call("snapshot mounts", key))?;
        Ok(r.into_inner().mounts)
    }

    pub async fn commit(&self, name: &str, key: &str) -> Result<()> {
        snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .commit(self.req(snap::CommitSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                name: name.into(),
                key: key.into(),
                ..Default::default()
            }))
            .await
            .map_err(call("snapshot commit", name))?;
        Ok(())
    }

    pub async fn remove_snapshot(&self, key: &str) -> Result<()> {
        let r = snap::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .remove(self.req(snap::RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.into(),
            }))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(call("snapshot remove", key)(s)),
        }
    }

    /// Unpacks a layer from the content store onto `mounts`.
    pub async fn apply(&self, layer: &Descriptor, mounts: Vec<Mount>) -> Result<()> {
        api::diff_client::DiffClient::new(self.channel.clone())
            .apply(self.req(api::ApplyRequest {
                diff: Some(layer.clone()),
                mounts,
                ..Default::default()
            }))
            .await
            .map_err(call("diff apply", &layer.digest))?;
        Ok(())
    }

    // ---- images ----

    pub async fn image(&self, name: &str) -> Result<Option<api::Image>> {
        let r = api::images_client::ImagesClient::new(self.channel.clone())
            .get(self.req(api::GetImageRequest { name: name.into() }))
            .await;
        match r {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(call("image get", name)(s)),
        }
    }

    /// Records (or moves) the image `name` to `target`.
    pub async fn put_image(&self, name: &str, target: Descriptor) -> Result<()> {
        let image = api::Image {
            name: name.into(),
            target: Some(target),
            ..Default::default()
        };
        let mut images = api::images_client::ImagesClient::new(self.channel.clone());
        match images
            .create(self.req(api::CreateImageRequest {
                image: Some(image.clone()),
                ..Default::default()
            }))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                images
                    .update(self.req(api::UpdateImageRequest {
                        image: Some(image),
                        ..Default::default()
                    }))
                    .await
                    .map_err(call("image update", name))?;
                Ok(())
            }
            Err(s) => Err(call("image create", name)(s)),
        }
    }

    /// Reads a whole blob (manifests and configs: small).
    pub async fn read_content(&self, digest: &str) -> Result<Vec<u8>> {
        use futures::StreamExt as _;
        let mut s = api::content_client::ContentClient::new(self.channel.clone())
            .read(self.req(api::ReadContentRequest {
                digest: digest.into(),
                ..Default::default()
            }))
            .await
            .map_err(call("content read", digest))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend(chunk.map_err(call("content read", digest))?.data);
        }
        Ok(out)
    }

    // ---- containers and tasks ----

    pub async fn create_container(
        &self,
        id: &str,
        image: &str,
        spec: &serde_json::Value,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let container = api::Container {
            id: id.into(),
            image: image.into(),
            labels,
            runtime: Some(api::container::Runtime {
                name: RUNTIME.into(),
                options: self.runtime_options.clone(),
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE.into(),
                value: serde_json::to_vec(spec).unwrap_or_default(),
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: id.into(),
            ..Default::default()
        };
        api::containers_client::ContainersClient::new(self.channel.clone())
            .create(self.req(api::CreateContainerRequest {
                container: Some(container),
            }))
            .await
            .map_err(call("container create", id))?;
        Ok(())
    }

    /// Containers whose labels match `filter` (containerd's filter syntax).
    pub async fn containers(&self, filter: &str) -> Result<Vec<api::Container>> {
        let r = api::containers_client::ContainersClient::new(self.channel.clone())
            .list(self.req(api::ListContainersRequest {
                filters: vec![filter.into()],
            }))
            .await
            .map_err(call("container list", filter))?;
        Ok(r.into_inner().containers)
    }

    pub async fn delete_container(&self, id: &str) -> Result<()> {
        let r = api::containers_client::ContainersClient::new(self.channel.clone())
            .delete(self.req(api::DeleteContainerRequest { id: id.into() }))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(call("container delete", id)(s)),
        }
    }

    /// Creates and starts the container's task with stdout and stderr
    /// going to `log` (a `binary://` or `file://` URI the shim opens).
    pub async fn start_task(&self, id: &str, rootfs: Vec<Mount>, log: &str) -> Result<u32> {
        let mut tasks = api::tasks_client::TasksClient::new(self.channel.clone());
        tasks
            .create(self.req(api::CreateTaskRequest {
                container_id: id.into(),
                rootfs,
                stdout: log.into(),
                stderr: log.into(),
                options: self.runtime_options.clone(),
                ..Default::default()
            }))
            .await
            .map_err(call("task create", id))?;
        let started = tasks
            .start(self.req(api::StartRequest {
                container_id: id.into(),
                ..Default::default()
            }))
            .await
            .map_err(call("task start", id))?;
        Ok(started.into_inner().pid)
    }

    pub async fn task(&self, id: &str) -> Result<Option<TaskState>> {
        let r = api::tasks_client::TasksClient::new(self.channel.clone())
            .get(self.req(api::GetRequest {
                container_id: id.into(),
                ..Default::default()
            }))
            .await;
        let p = match r {
            Ok(r) => r.into_inner().process,
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(call("task get", id)(s)),
        };
        Ok(p.map(|p| {
            // containerd.v1.types.Status: 2 running, 3 created, 4 stopped.
            match p.status {
                2 => TaskState::Running { pid: p.pid },
                3 | 4 => TaskState::Stopped {
                    exit_status: p.exit_status,
                },
                _ => TaskState::Other,
            }
        }))
    }

    pub async fn kill(&self, id: &str, signal: u32) -> Result<()> {
        let r = api::tasks_client::TasksClient::new(self.channel.clone())
            .kill(self.req(api::KillRequest {
                container_id: id.into(),
                signal,
                all: true,
                ..Default::default()
            }))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::NotFound | tonic::Code::FailedPrecondition
                ) =>
            {
                Ok(())
            }
            Err(s) => Err(call("task kill", id)(s)),
        }
    }

    /// Deletes a stopped task (after a kill, once it exited).
    pub async fn delete_task(&self, id: &str) -> Result<()> {
        let r = api::tasks_client::TasksClient::new(self.channel.clone())
            .delete(self.req(api::DeleteTaskRequest {
                container_id: id.into(),
            }))
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(call("task delete", id)(s)),
        }
    }

    /// Runs `process` (an OCI process spec) in the container's task and
    /// waits for its exit status, no longer than `timeout`. No I/O.
    pub async fn exec_wait(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        timeout: std::time::Duration,
    ) -> Result<Option<u32>> {
        let mut tasks = api::tasks_client::TasksClient::new(self.channel.clone());
        tasks
            .exec(self.req(api::ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                spec: Some(prost_types::Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                    value: serde_json::to_vec(process).unwrap_or_default(),
                }),
                ..Default::default()
            }))
            .await
            .map_err(call("exec", id))?;
        let started = tasks
            .start(self.req(api::StartRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            }))
            .await
            .map_err(call("exec start", id));
        let waited = match started {
            Ok(_) => {
                let wait = tasks.wait(self.req(api::WaitRequest {
                    container_id: id.into(),
                    exec_id: exec_id.into(),
                }));
                match tokio::time::timeout(timeout, wait).await {
                    Ok(Ok(r)) => Ok(Some(r.into_inner().exit_status)),
                    Ok(Err(s)) => Err(call("exec wait", id)(s)),
                    Err(_) => {
                        let _ = tasks
                            .kill(self.req(api::KillRequest {
                                container_id: id.into(),
                                exec_id: exec_id.into(),
                                signal: 9,
                                all: false,
                            }))
                            .await;
                        Ok(None)
                    }
                }
            }
            Err(e) => Err(e),
        };
        let _ = tasks
            .delete_process(self.req(api::DeleteProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            }))
            .await;
        waited
    }

    /// Creates and starts an exec process in the container's task with
    /// its stdio on the FIFOs in `io` (paths the shim opens; empty: none).
    pub async fn exec_start(
        &self,
        id: &str,
        exec_id: &str,
        process: &serde_json::Value,
        io: &ExecIo,
    ) -> Result<()> {
        let mut tasks = api::tasks_client::TasksClient::new(self.channel.clone());
        tasks
            .exec(self.req(api::ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                stdin: io.stdin.clone(),
                stdout: io.stdout.clone(),
                stderr: io.stderr.clone(),
                terminal: io.terminal,
                spec: Some(prost_types::Any {
                    type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                    value: serde_json::to_vec(process).unwrap_or_default(),
                }),
            }))
            .await
            .map_err(call("exec", id))?;
        if let Err(e) = tasks
            .start(self.req(api::StartRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            }))
            .await
        {
            self.exec_delete(id, exec_id).await;
            return Err(call("exec start", id)(e));
        }
        Ok(())
    }

    /// Waits for an exec process to exit: its status.
    pub async fn exec_wait_exit(&self, id: &str, exec_id: &str) -> Result<u32> {
        let r = api::tasks_client::TasksClient::new(self.channel.clone())
            .wait(self.req(api::WaitRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            }))
            .await
            .map_err(call("exec wait", id))?;
        Ok(r.into_inner().exit_status)
    }

    /// Resizes an exec process's terminal.
    pub async fn exec_resize(&self, id: &str, exec_id: &str, width: u32, height: u32) {
        let _ = api::tasks_client::TasksClient::new(self.channel.clone())
            .resize_pty(self.req(api::ResizePtyRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                width,
                height,
            }))
            .await;
    }

    /// Closes an exec process's stdin (the client is done sending).
    pub async fn exec_close_stdin(&self, id: &str, exec_id: &str) {
        let _ = api::tasks_client::TasksClient::new(self.channel.clone())
            .close_io(self.req(api::CloseIoRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                stdin: true,
            }))
            .await;
    }

    /// Kills (if it still runs) and removes an exec process.
    pub async fn exec_delete(&self, id: &str, exec_id: &str) {
        let mut tasks = api::tasks_client::TasksClient::new(self.channel.clone());
        let _ = tasks
            .delete_process(self.req(api::DeleteProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
            }))
            .await;
    }

    /// Signals an exec process.
    pub async fn exec_kill(&self, id: &str, exec_id: &str, signal: u32) {
        let _ = api::tasks_client::TasksClient::new(self.channel.clone())
            .kill(self.req(api::KillRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                signal,
                all: false,
            }))
            .await;
    }

    /// Removes a container whole: SIGKILL to a task still running (waiting
    /// up to 5 s for it to stop), then the task, the container and its
    /// rootfs snapshot. Each step tolerates what is already gone.
    pub async fn remove(&self, id: &str) {
        if matches!(self.task(id).await, Ok(Some(TaskState::Running { .. }))) {
            let _ = self.kill(id, 9).await;
            for _ in 0..50 {
                if !matches!(self.task(id).await, Ok(Some(TaskState::Running { .. }))) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        let _ = self.delete_task(id).await;
        let _ = self.delete_container(id).await;
        let _ = self.remove_snapshot(id).await;
    }

    /// Task exits in this namespace, as they happen.
    pub async fn exits(&self) -> Result<impl Stream<Item = Exit> + use<>> {
        use futures::StreamExt as _;
        use prost::Message as _;
        let filter = format!("namespace=={},topic==\"/tasks/exit\"", self.namespace);
        let s = api::events_client::EventsClient::new(self.channel.clone())
            .subscribe(api::SubscribeRequest {
                filters: vec![filter],
            })
            .await
            .map_err(call("events subscribe", "/tasks/exit"))?
            .into_inner();
        Ok(s.take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|env| {
                std::future::ready(env.ok().and_then(|env| {
                    let any = env.event?;
                    let exit =
                        containerd_client::events::TaskExit::decode(any.value.as_slice()).ok()?;
                    // An exec's exit has its own id; the container's is its pid 1.
                    (exit.id == exit.container_id || exit.id.is_empty()).then_some(Exit {
                        container_id: exit.container_id,
                        exit_status: exit.exit_status,
                        exited_at: exit.exited_at,
                    })
                }))
            }))
    }
}

/// The request stream of one content write: the data in chunks, the
/// last chunk carrying the commit with the total and the expected digest
/// (containerd writes a commit's data before committing).
fn async_stream<S>(
    reference: String,
    total: i64,
    expected: String,
    chunks: S,
    labels: HashMap<String, String>,
) -> impl Stream<Item = api::WriteContentRequest> + Send + 'static
where
    S: Stream<Item = std::result::Result<bytes::Bytes, String>> + Send + 'static,
{
    use futures::StreamExt as _;
    // WriteAction: 0 stat, 1 write, 2 commit. One chunk is held back so
    // that the last one goes out with the commit.
    let marked = chunks
        .take_while(|c| std::future::ready(c.is_ok()))
        .filter_map(|c| std::future::ready(c.ok()))
        .map(Some)
        .chain(futures::stream::once(async { None }));
    marked
        .scan(
            (None::<bytes::Bytes>, 0i64),
            move |(held, offset), next: Option<bytes::Bytes>| {
                let out = match (held.take(), &next) {
                    (Some(chunk), Some(_)) => {
                        let req = api::WriteContentRequest {
                            action: 1,
                            r#ref: reference.clone(),
                            total,
                            offset: *offset,
                            data: chunk.to_vec(),
                            ..Default::default()
                        };
                        *offset += chunk.len() as i64;
                        Some(req)
                    }
                    (last, None) => Some(api::WriteContentRequest {
                        action: 2,
                        r#ref: reference.clone(),
                        total,
                        offset: *offset,
                        data: last.map(|c| c.to_vec()).unwrap_or_default(),
                        expected: expected.clone(),
                        labels: labels.clone(),
                    }),
                    (None, Some(_)) => None,
                };
                *held = next;
                std::future::ready(Some(out))
            },
        )
        .filter_map(std::future::ready)
}
