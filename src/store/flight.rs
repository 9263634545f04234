//! One operation per adapter name at a time: a fetch, a revalidation or an eviction.
//!
//! The first caller for a name leads: it gets a [`Lead`] and runs the work in a spawned task
//! (so no waiter going away can cancel it); everyone after it follows: they get the same
//! [`Flight`] and await its outcome. The registry is also the per-name lock: an eviction never
//! starts on a name with a fetch or revalidation in flight, and a fetch of a name being evicted
//! waits for the eviction to finish. Waiting is a `tokio::sync::watch`, which does not need a
//! tokio runtime: monoio workers await it directly.

use std::{
    collections::HashMap,
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
            let mut map = self.flights.lock();
            if map
                .get(&self.name)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                map.remove(&self.name);
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

/// Either lead a new flight or follow the running one.
pub enum Join {
    Lead(Lead),
    Follow(Arc<Flight>),
}

/// The registry of running flights.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<AdapterName, Arc<Flight>>>,
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<AdapterName, Arc<Flight>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lead a `kind` flight for `name`, or follow the one already running (of any kind).
    pub fn join(self: &Arc<Self>, name: &AdapterName, kind: FlightKind) -> Join {
        let mut map = self.lock();
        if let Some(f) = map.get(name) {
            return Join::Follow(f.clone());
        }
        Join::Lead(self.insert(&mut map, name, kind))
    }

    /// Lead a flight for `name` only if none runs, checking `allow` under the registry lock
    /// (the evictor claims the entry there, so claim and registration are one step).
    pub fn try_lead(
        self: &Arc<Self>,
        name: &AdapterName,
        kind: FlightKind,
        allow: impl FnOnce() -> bool,
    ) -> Option<Lead> {
        let mut map = self.lock();
        if map.contains_key(name) || !allow() {
            return None;
        }
        Some(self.insert(&mut map, name, kind))
    }

    fn insert(
        self: &Arc<Self>,
        map: &mut HashMap<AdapterName, Arc<Flight>>,
        name: &AdapterName,
        kind: FlightKind,
    ) -> Lead {
        let (tx, _) = watch::channel(None);
        let flight = Arc::new(Flight { kind, tx });
        map.insert(name.clone(), flight.clone());
        Lead {
            flights: self.clone(),
            name: name.clone(),
            flight,
            done: false,
        }
    }

    /// Flights running now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub fn count(&self, kind: FlightKind) -> usize {
        self.lock().values().filter(|f| f.kind == kind).count()
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
                Join::Lead(_) => panic!("second must follow"),
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
