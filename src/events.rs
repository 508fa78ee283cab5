//! Kubernetes Events for operators: `Allocated`, `Released` and `Exhausted` on IPPools, and
//! `AddressesAssigned` / `AddressesReleased` on ElfMachines that exist. Events are queued and
//! published by a background task, never on the admission path; when the queue is full an
//! event is dropped (events are best effort, the objects are the record). Notes that queue
//! up while an event is being published (a scale-up) are folded into one event per object
//! and reason, so that a burst of allocations does not double the apiserver's writes.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

/// How many events may wait to be published.
const QUEUE: usize = 1024;
/// At most this many queued notes are folded into one round of events.
const BATCH: usize = 256;
/// The longest note an Event accepts (events.k8s.io/v1: 1 kB).
const MAX_NOTE: usize = 1024;

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
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(note) => batch.push(note),
                        Err(_) => break,
                    }
                }
                for note in fold(batch) {
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

/// Folds notes about the same object with the same reason into one, in order of first
/// appearance; the folded message counts them and lists as many as fit in an Event.
fn fold(notes: Vec<Note>) -> Vec<Note> {
    let mut groups: Vec<(Note, usize)> = Vec::new();
    for note in notes {
        let same = |(g, _): &&mut (Note, usize)| {
            g.regarding == note.regarding
                && g.reason == note.reason
                && g.warning == note.warning
                && g.action == note.action
        };
        match groups.iter_mut().find(same) {
            Some((group, count)) => {
                *count += 1;
                if group.message.len() + note.message.len() + 2 <= MAX_NOTE - 32 {
                    group.message.push_str("; ");
                    group.message.push_str(&note.message);
                } else if !group.message.ends_with('…') {
                    group.message.push_str("; …");
                }
            }
            None => groups.push((note, 1)),
        }
    }
    groups
        .into_iter()
        .map(|(mut note, count)| {
            if count > 1 {
                note.message = format!("{count} times: {}", note.message);
            }
            note
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn note(pool: &str, reason: &'static str, message: &str) -> Note {
        Note {
            regarding: pool_ref("ns", pool, None),
            warning: false,
            reason,
            action: "Allocate",
            message: message.into(),
        }
    }

    #[test]
    fn notes_about_one_object_and_reason_are_folded() {
        let folded = fold(vec![
            note("a", "Allocated", "10.0.0.1 to m1"),
            note("b", "Allocated", "10.0.1.1 to m2"),
            note("a", "Allocated", "10.0.0.2 to m3"),
            note("a", "Released", "10.0.0.9"),
        ]);
        let messages: Vec<(&str, &str)> = folded
            .iter()
            .map(|n| (n.regarding.name.as_deref().unwrap(), n.message.as_str()))
            .collect();
        assert_eq!(
            messages,
            [
                ("a", "2 times: 10.0.0.1 to m1; 10.0.0.2 to m3"),
                ("b", "10.0.1.1 to m2"),
                ("a", "10.0.0.9"),
            ]
        );
    }

    #[test]
    fn a_folded_note_fits_in_an_event() {
        let many = (0..BATCH)
            .map(|i| {
                note(
                    "a",
                    "Allocated",
                    &format!("10.0.{}.{} to machine-{i}", i / 250, i % 250),
                )
            })
            .collect();
        let folded = fold(many);
        assert_eq!(folded.len(), 1);
        assert!(
            folded[0].message.len() <= MAX_NOTE,
            "{}",
            folded[0].message.len()
        );
        assert!(
            folded[0]
                .message
                .starts_with("256 times: 10.0.0.0 to machine-0; ")
        );
        assert!(folded[0].message.ends_with("; …"));
    }
}
