//! One operation per adapter name at a time: a fetch, a revalidation or an eviction.
//!
//! The first caller for a name leads: it gets a [`Lead`] and runs the work in a spawned task
//! (so no waiter going away can cancel it); everyone after it follows: they get the same
//! [`Flight`] and await its outcome. The registry is also the per-name lock: an eviction never
//! starts on a name with a fetch or revalidation in flight, and a fetch of a name being evicted
//! waits for the eviction to finish. Waiting is a `tokio::sync::watch`, which does not need a
//! tokio runtime: monoio workers await it directly.
//!
//! It is also the namespace: names nest as directories do (`x/y` lives inside `x`'s
//! directory), and a directory swap, an eviction or a recovery of `x` would take `x/y` with
//! it. So two names of which one contains the other are never held at once: a new fetch is
//! refused ([`Join::Conflict`], a 409) while a containing or contained name has a flight or a
//! copy on disk ([`Flights::set_stored`]). Check and registration happen under one lock, so two
//! concurrent fetches of `x` and `x/y` cannot both start.

use std::{
    collections::{BTreeSet, HashMap},
    ops::Bound,
    sync::{Arc, Mutex},
};

use tokio::sync::watch;

use super::index::Pin;
use crate::{adapter::AdapterName, error::Error};

/// What a flight is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlightKind {
    Fetch,
    Revalidate,
    Evict,
}

/// A fetch's outcome: the stored adapter pinned (the pin lives as long as the flight, so every
/// waiter can pin it too), or the error every waiter gets.
pub type FlightResult = Result<Option<Pin>, Error>;

pub struct Flight {
    pub kind: FlightKind,
    tx: watch::Sender<Option<FlightResult>>,
}

impl Flight {
    /// Wait for the outcome (runtime-agnostic).
    pub async fn wait(&self) -> FlightResult {
        let mut rx = self.tx.subscribe();
        let out = rx
            .wait_for(Option::is_some)
            .await
            .expect("the flight holds its own sender");
        out.clone().expect("waited for Some")
    }
}

/// The leader's handle. Finishing (or dropping) it removes the flight from the registry and
/// wakes every waiter.
pub struct Lead {
    flights: Arc<Flights>,
    name: AdapterName,
    flight: Arc<Flight>,
    done: bool,
}

impl Lead {
    pub fn flight(&self) -> Arc<Flight> {
        self.flight.clone()
    }

    pub fn name(&self) -> &AdapterName {
        &self.name
    }

    pub fn finish(mut self, outcome: FlightResult) {
        self.complete(outcome);
    }

    fn complete(&mut self, outcome: FlightResult) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut names = self.flights.lock();
            if names
                .flights
                .get(&self.name)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                names.flights.remove(&self.name);
            }
        }
        self.flight.tx.send_replace(Some(outcome));
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        // A leader task that panicked or was dropped with its runtime must not strand waiters.
        self.complete(Err(Error::internal(format!(
            "{:?} of {} was abandoned",
            self.flight.kind, self.name
        ))));
    }
}

/// Either lead a new flight, follow the running one, or neither: another adapter's directory
/// contains this name's, or lies inside it.
pub enum Join {
    Lead(Lead),
    Follow(Arc<Flight>),
    /// The name held now that conflicts with the one asked for.
    Conflict(AdapterName),
}

/// The names in use, under one lock.
#[derive(Default)]
struct Names {
    flights: HashMap<AdapterName, Arc<Flight>>,
    /// Names with a copy in the storage directory (indexed, or being evicted and not yet
    /// moved out of vLLM's sight).
    stored: BTreeSet<AdapterName>,
}

impl Names {
    fn held(&self, name: &str) -> bool {
        self.flights.contains_key(name) || self.stored.contains(name)
    }

    /// A name held now whose directory contains `name`'s or lies inside it.
    fn conflict(&self, name: &AdapterName) -> Option<AdapterName> {
        if let Some(outer) = name.ancestors().find(|a| self.held(a)) {
            return AdapterName::parse(outer).ok();
        }
        let inner = format!("{name}/");
        let stored = self
            .stored
            .range::<str, _>((Bound::Excluded(inner.as_str()), Bound::Unbounded))
            .next()
            .filter(|n| name.contains(n.as_str()));
        stored
            .or_else(|| self.flights.keys().find(|n| name.contains(n.as_str())))
            .cloned()
    }
}

/// The registry of running flights and stored names.
#[derive(Default)]
pub struct Flights {
    names: Mutex<Names>,
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lead a `kind` flight for `name`, follow the one already running (of any kind), or
    /// learn which held name conflicts with it.
    pub fn join(self: &Arc<Self>, name: &AdapterName, kind: FlightKind) -> Join {
        let mut names = self.lock();
        if let Some(f) = names.flights.get(name) {
            return Join::Follow(f.clone());
        }
        if let Some(other) = names.conflict(name) {
            return Join::Conflict(other);
        }
        Join::Lead(self.insert(&mut names, name, kind))
    }

    /// Record that `name` has (`true`) or no longer has a copy in the storage directory.
    /// Called by the holder of `name`'s flight (or at startup, before any flight).
    pub fn set_stored(&self, name: &AdapterName, stored: bool) {
        let mut names = self.lock();
        if stored {
            names.stored.insert(name.clone());
        } else {
            names.stored.remove(name);
        }
    }

    /// Lead a flight for `name` only if none runs, checking `allow` under the registry lock
    /// (the evictor claims the entry there, so claim and registration are one step).
    pub fn try_lead(
        self: &Arc<Self>,
        name: &AdapterName,
        kind: FlightKind,
        allow: impl FnOnce() -> bool,
    ) -> Option<Lead> {
        let mut names = self.lock();
        if names.flights.contains_key(name) || !allow() {
            return None;
        }
        Some(self.insert(&mut names, name, kind))
    }

    fn insert(self: &Arc<Self>, names: &mut Names, name: &AdapterName, kind: FlightKind) -> Lead {
        let (tx, _) = watch::channel(None);
        let flight = Arc::new(Flight { kind, tx });
        names.flights.insert(name.clone(), flight.clone());
        Lead {
            flights: self.clone(),
            name: name.clone(),
            flight,
            done: false,
        }
    }

    /// Flights running now.
    pub fn len(&self) -> usize {
        self.lock().flights.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().flights.is_empty()
    }

    pub fn count(&self, kind: FlightKind) -> usize {
        self.lock()
            .flights
            .values()
            .filter(|f| f.kind == kind)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> AdapterName {
        AdapterName::parse("a").unwrap()
    }

    #[test]
    fn first_leads_others_follow_all_see_outcome() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(lead) = flights.join(&name(), FlightKind::Fetch) else {
            panic!("first must lead")
        };
        let followers: Vec<_> = (0..3)
            .map(|_| match flights.join(&name(), FlightKind::Fetch) {
                Join::Follow(f) => f,
                _ => panic!("second must follow"),
            })
            .collect();
        assert!(
            flights
                .try_lead(&name(), FlightKind::Evict, || true)
                .is_none()
        );
        let waiters = std::thread::spawn(move || {
            let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut outs = Vec::new();
                for f in followers {
                    outs.push(f.wait().await);
                }
                outs
            })
        });
        lead.finish(Err(Error::bad_request("boom")));
        let outs = waiters.join().unwrap();
        assert_eq!(outs.len(), 3);
        for o in outs {
            assert_eq!(o.unwrap_err().message, "boom");
        }
        assert_eq!(flights.len(), 0);
        assert!(matches!(
            flights.join(&name(), FlightKind::Fetch),
            Join::Lead(_)
        ));
    }

    #[test]
    fn dropped_leader_fails_waiters() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(lead) = flights.join(&name(), FlightKind::Fetch) else {
            panic!()
        };
        let f = lead.flight();
        drop(lead);
        let out = futures_util::FutureExt::now_or_never(f.wait()).unwrap();
        assert!(out.unwrap_err().message.contains("abandoned"));
        assert_eq!(flights.len(), 0);
    }

    fn parse(s: &str) -> AdapterName {
        AdapterName::parse(s).unwrap()
    }

    fn conflict(flights: &Arc<Flights>, name: &str) -> Option<String> {
        match flights.join(&parse(name), FlightKind::Fetch) {
            Join::Conflict(other) => Some(other.to_string()),
            _ => None,
        }
    }

    #[test]
    fn nested_names_are_never_held_together() {
        let flights = Arc::new(Flights::default());
        // A fetch in flight holds its name against containing and contained ones.
        let Join::Lead(lead) = flights.join(&parse("o/x"), FlightKind::Fetch) else {
            panic!("first must lead")
        };
        assert_eq!(conflict(&flights, "o/x/y").as_deref(), Some("o/x"));
        assert_eq!(conflict(&flights, "o/x/y/z").as_deref(), Some("o/x"));
        assert_eq!(conflict(&flights, "o").as_deref(), Some("o/x"));
        assert!(matches!(
            flights.join(&parse("o/x"), FlightKind::Fetch),
            Join::Follow(_)
        ));
        // Siblings and look-alikes are independent.
        for free in ["o/x@v2", "o/xy", "o/x.y", "o/w", "p/x"] {
            assert_eq!(conflict(&flights, free), None, "{free}");
        }
        // Stored, the name still holds after its flight ends; until it is no longer stored.
        flights.set_stored(&parse("o/x"), true);
        lead.finish(Ok(None));
        assert_eq!(
            conflict(&flights, "o/x/adapter_config.json").as_deref(),
            Some("o/x")
        );
        assert_eq!(conflict(&flights, "o").as_deref(), Some("o/x"));
        flights.set_stored(&parse("o/x"), false);
        assert_eq!(conflict(&flights, "o/x/y"), None);
        assert_eq!(conflict(&flights, "o"), None);
    }

    #[test]
    fn try_lead_respects_allow() {
        let flights = Arc::new(Flights::default());
        assert!(
            flights
                .try_lead(&name(), FlightKind::Evict, || false)
                .is_none()
        );
        let lead = flights
            .try_lead(&name(), FlightKind::Evict, || true)
            .unwrap();
        assert_eq!(flights.count(FlightKind::Evict), 1);
        lead.finish(Ok(None));
        assert_eq!(flights.len(), 0);
    }
}
