//! What a watch remembers of each object, and what one event changed of it.
//!
//! Every watch of the operator (policies, Nodes, agents' records, FileChanges)
//! keeps, per object, only a view of what the reconcilers depend on, and
//! replaces that memory whole when the watch re-lists: objects deleted while it
//! was away must not linger. One implementation, so that re-list handling
//! cannot drift between the watches.

use std::collections::HashMap;

use kube::ResourceExt;
use kube::runtime::watcher;

/// How one event changed what a watch remembers of an object.
#[derive(Debug, PartialEq)]
pub enum Change<V> {
    /// Nothing the reconcilers depend on.
    Same,
    /// An object appeared (`old` is `None`), changed, or went away (`new` is `None`).
    Changed { old: Option<V>, new: Option<V> },
    /// The watch re-listed everything: objects may have changed or gone unseen.
    Relisted,
}

/// What a watch remembers of each object, keyed by name.
#[derive(Debug)]
pub struct Seen<V> {
    current: HashMap<String, V>,
    relist: HashMap<String, V>,
}

impl<V> Default for Seen<V> {
    fn default() -> Self {
        Seen {
            current: HashMap::new(),
            relist: HashMap::new(),
        }
    }
}

impl<V: Clone + PartialEq> Seen<V> {
    /// Records `event`, seeing each object through `view`.
    pub fn observe<K: ResourceExt>(
        &mut self,
        event: &watcher::Event<K>,
        view: impl Fn(&K) -> V,
    ) -> Change<V> {
        match event {
            watcher::Event::Apply(obj) => {
                let new = view(obj);
                match self.current.insert(obj.name_any(), new.clone()) {
                    Some(old) if old == new => Change::Same,
                    old => Change::Changed {
                        old,
                        new: Some(new),
                    },
                }
            }
            watcher::Event::Delete(obj) => match self.current.remove(&obj.name_any()) {
                Some(old) => Change::Changed {
                    old: Some(old),
                    new: None,
                },
                None => Change::Same,
            },
            watcher::Event::Init => {
                self.relist.clear();
                Change::Same
            }
            watcher::Event::InitApply(obj) => {
                self.relist.insert(obj.name_any(), view(obj));
                Change::Same
            }
            watcher::Event::InitDone => {
                self.current = std::mem::take(&mut self.relist);
                Change::Relisted
            }
        }
    }
}

impl<V> Seen<V> {
    /// The view of the object named `name`, as last seen (before a re-list in
    /// progress is done).
    pub fn get(&self, name: &str) -> Option<&V> {
        self.current.get(name)
    }

    /// Every object's view, as last seen.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.current.values()
    }
}
