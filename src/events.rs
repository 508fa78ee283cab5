//! Kubernetes Events for operators: `Allocated`, `Released` and `Exhausted` on IPPools, and
//! `AddressesAssigned` on ElfMachines that exist. Events are queued and
//! published by a background task, never on the admission path; when the queue is full an
//! event is dropped (events are best effort, the objects are the record). The publisher
//! lingers [`LINGER`] after the first note of a round, and the notes of that round (a
//! scale-up, a scale-down) are folded into one event per object and reason: a burst costs
//! the apiserver a few event writes, not one per machine.
//!
//! Events are written as `events.k8s.io/v1` objects by [`Publisher`], not by kube-runtime's
//! recorder: the recorder identifies an event without its note, so a second `Allocated`
//! within its cache time only bumps `series.count` of the first, and the text `kubectl
//! describe` shows stays the first note. Here an event's name is derived from its object,
//! reason, type and note: a different note is a new Event (its text is what `kubectl
//! describe` shows), and only the very same note repeated is counted in `series`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;

/// How many events may wait to be published.
const QUEUE: usize = 1024;
/// At most this many queued notes are folded into one round of events.
const BATCH: usize = QUEUE;
/// How long a round waits for more notes after its first one.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);
/// The longest note an Event accepts (events.k8s.io/v1: 1 kB).
const MAX_NOTE: usize = 1024;
/// The controller name events are reported by.
pub const REPORTING_CONTROLLER: &str = "cape-static-ip";
/// Events whose repeats are counted at most; beyond it the oldest counts are forgotten (a
/// repeat of a forgotten note then counts from 2 again).
const SEEN: usize = 4096;

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
    /// Starts the publisher on `tasks`. The reporting instance is `POD_NAME` (the Deployment
    /// sets it from the downward API), else the host name.
    pub fn start(client: Client, tasks: &mut tokio::task::JoinSet<()>) -> Self {
        let (tx, mut rx) = mpsc::channel::<Note>(QUEUE);
        let mut publisher = Publisher::new(client, instance_name());
        tasks.spawn(async move {
            while let Some(first) = rx.recv().await {
                tokio::time::sleep(LINGER).await;
                let mut batch = vec![first];
                while batch.len() < BATCH {
                    match rx.try_recv() {
                        Ok(note) => batch.push(note),
                        Err(_) => break,
                    }
                }
                for note in fold(batch) {
                    if let Err(e) = publisher.publish(&note).await {
                        tracing::warn!(
                            error = %e,
                            reason = note.reason,
                            regarding = ?note.regarding.name,
                            "event not published"
                        );
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

/// `POD_NAME`, else `HOSTNAME`, else `cape-static-ip`.
fn instance_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| REPORTING_CONTROLLER.into())
}

/// Writes events.k8s.io/v1 Events: one Event per distinct (object, reason, type, note), a
/// repeat of the same note counted in its `series`.
pub struct Publisher {
    client: Client,
    instance: String,
    /// Makes this process's event names its own: a restarted container (same pod name)
    /// never patches the series of an event its predecessor wrote.
    nonce: u64,
    /// Events this process has written: name → how many times.
    seen: HashMap<String, i32>,
    /// Names in `seen`, oldest first (to forget the oldest beyond [`SEEN`]).
    order: std::collections::VecDeque<String>,
}

impl Publisher {
    /// A publisher reporting as `cape-static-ip` from `instance` (the pod's name).
    pub fn new(client: Client, instance: String) -> Self {
        Publisher {
            client,
            instance,
            nonce: rand::random(),
            seen: HashMap::new(),
            order: Default::default(),
        }
    }

    /// Publishes one event: created the first time its note is seen, its `series` counted up
    /// on a repeat.
    pub async fn publish(&mut self, note: &Note) -> Result<(), kube::Error> {
        let name = event_name(note, &self.instance, self.nonce);
        let namespace = note
            .regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let now = MicroTime(crate::fault::now());
        if let Some(count) = self.seen.get(&name) {
            let count = count + 1;
            let patch = json!({"series": {"count": count, "lastObservedTime": now}});
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.remember(name, count);
                    return Ok(());
                }
                // Expired (the apiserver's --event-ttl): written anew below.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let mut note_text = note.message.clone();
        if note_text.len() > MAX_NOTE {
            let mut cut = MAX_NOTE - '…'.len_utf8();
            while !note_text.is_char_boundary(cut) {
                cut -= 1;
            }
            note_text.truncate(cut);
            note_text.push('…');
        }
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            event_time: Some(now),
            reporting_controller: Some(REPORTING_CONTROLLER.into()),
            reporting_instance: Some(self.instance.clone()),
            action: Some(note.action.into()),
            reason: Some(note.reason.into()),
            regarding: Some(note.regarding.clone()),
            note: Some(note_text),
            type_: Some(if note.warning { "Warning" } else { "Normal" }.into()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &event).await {
            // The same note, written by this process before it forgot the name: its text is
            // there already.
            Ok(_) => {
                self.remember(name, 1);
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.remember(name, 1);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn remember(&mut self, name: String, count: i32) {
        if self.seen.insert(name.clone(), count).is_none() {
            self.order.push_back(name);
            while self.order.len() > SEEN {
                if let Some(old) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            }
        }
    }
}

/// An Event's name: the object's name and a hash of everything that identifies the event
/// (object, reason, action, type, note) and of the publishing process.
fn event_name(note: &Note, instance: &str, nonce: u64) -> String {
    let mut h = std::hash::DefaultHasher::new();
    let r = &note.regarding;
    (&r.api_version, &r.kind, &r.namespace, &r.name, &r.uid).hash(&mut h);
    (note.reason, note.action, note.warning, &note.message).hash(&mut h);
    (instance, nonce).hash(&mut h);
    let object = r.name.as_deref().unwrap_or("unnamed");
    // A DNS subdomain: at most 253 characters, the hash included.
    let object: String = object.chars().take(200).collect();
    format!("{}.{:016x}", object.trim_end_matches('.'), h.finish())
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
    use std::collections::BTreeSet;

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
    fn an_event_is_named_by_its_note() {
        let a = note("pool-a", "Allocated", "10.0.0.1 to m1");
        let name = event_name(&a, "pod-1", 7);
        assert!(name.starts_with("pool-a."), "{name}");
        assert_eq!(name, event_name(&a.clone(), "pod-1", 7), "a repeat");
        let other_text = note("pool-a", "Allocated", "10.0.0.2 to m2");
        let other_reason = note("pool-a", "Released", "10.0.0.1 to m1");
        let other_pool = note("pool-b", "Allocated", "10.0.0.1 to m1");
        let names: BTreeSet<String> = [
            name.clone(),
            event_name(&other_text, "pod-1", 7),
            event_name(&other_reason, "pod-1", 7),
            event_name(&other_pool, "pod-1", 7),
            event_name(&a, "pod-2", 7),
            event_name(&a, "pod-1", 8),
        ]
        .into_iter()
        .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        let long = note(&"x".repeat(253), "Allocated", "n");
        let long = event_name(&long, "pod-1", 7);
        assert!(long.len() <= 253, "{}", long.len());
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
                .starts_with(&format!("{BATCH} times: 10.0.0.0 to machine-0; "))
        );
        assert!(folded[0].message.ends_with("; …"));
    }
}
