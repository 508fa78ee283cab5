//! Kubernetes Events for operators: `Allocated`, `Released` and `Exhausted` on IPPools, and
//! `AddressesAssigned` / `AddressesReleased` on ElfMachines that exist. Events are queued and
//! published by a background task, never on the admission path; when the queue is full an
//! event is dropped (events are best effort, the objects are the record).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

/// How many events may wait to be published.
const QUEUE: usize = 1024;

/// One event to publish.
#[derive(Debug, Clone)]
pub struct Note {
    pub regarding: ObjectReference,
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

/// A handle to queue events; cheap to clone. The default handle drops everything (for
/// code paths and tests without a publisher).
#[derive(Clone, Debug, Default)]
pub struct Events {
    tx: Option<mpsc::Sender<Note>>,
}

impl Events {
    /// Starts the publisher on `tasks`.
    pub fn start(client: Client, tasks: &mut tokio::task::JoinSet<()>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Note>(QUEUE);
        let reporter = Reporter {
            controller: "cape-static-ip".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let recorder = Recorder::new(client, reporter);
        tasks.spawn(async move {
            while let Some(note) = rx.recv().await {
                let event = Event {
                    type_: if note.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: note.reason.into(),
                    note: Some(note.message),
                    action: note.action.into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&event, &note.regarding).await {
                    tracing::debug!(error = %e, "event not published");
                }
            }
        });
        Events { tx: Some(tx) }
    }

    /// Queues an event; drops it when the queue is full.
    pub fn emit(&self, note: Note) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(note);
        }
    }
}

/// A reference to an IPPool.
pub fn pool_ref(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("ipam.metal3.io/v1alpha1".into()),
        kind: Some("IPPool".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}

/// A reference to an ElfMachine.
pub fn machine_ref(namespace: &str, name: &str, uid: Option<String>) -> ObjectReference {
    ObjectReference {
        api_version: Some("infrastructure.cluster.x-k8s.io/v1beta1".into()),
        kind: Some("ElfMachine".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid,
        ..Default::default()
    }
}
