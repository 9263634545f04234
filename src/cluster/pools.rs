//! Base-model pools: which base models the cluster serves, as one summary in the view.
//!
//! A *pool* is the set of backends serving one base model; a request names its pool by
//! [`pool_hash`] of the base model's name (any of a backend's names: vLLM's `root`, then its
//! served names). The summary answers, without a lock: is this name a base model somewhere in
//! the cluster, does any backend serve this adapter's base, and which names are served (for the
//! answers that say so).
//!
//! Pools matter once the cluster serves two base models or more ([`Pools::multi`]): with one,
//! every request goes where it goes today (pool 0), and no adapter's base is learnt. And the
//! clear answers (404 for a model nobody serves, 400 for an adapter whose base nobody serves)
//! are given only when every node has reported its backends' names ([`Pools::complete`]):
//! while one is unknown, the name may be its.

use std::sync::Arc;

use super::hashkey::pool_hash;

/// The cluster's base models (see the module doc).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pools {
    /// [`pool_hash`] of every name a backend of the cluster serves, sorted.
    hashes: Box<[u64]>,
    /// The names a request can use (vLLM's `id`s, not a `root` that differs), sorted,
    /// deduplicated.
    names: Box<[Arc<str>]>,
    /// Per backend of the cluster (deduplicated): its names, `root` first.
    backends: Box<[Arc<[Arc<str>]>]>,
    /// Two base models or more (distinct roots).
    multi: bool,
    /// Every node reported every backend's names.
    complete: bool,
}

impl Pools {
    /// From every node of the topology: `None` when nothing was reported yet, else each of its
    /// backends' names (`root` first; empty: not learnt yet).
    pub fn build<'a>(nodes: impl IntoIterator<Item = Option<Vec<&'a [String]>>>) -> Pools {
        let mut complete = true;
        let mut backends: Vec<Vec<&str>> = Vec::new();
        for node in nodes {
            let Some(node) = node.filter(|b| !b.is_empty()) else {
                complete = false;
                continue;
            };
            for models in node {
                if models.is_empty() {
                    complete = false;
                    continue;
                }
                let names: Vec<&str> = models.iter().map(String::as_str).collect();
                if !backends.contains(&names) {
                    backends.push(names);
                }
            }
        }
        let mut roots: Vec<&str> = backends.iter().map(|b| b[0]).collect();
        roots.sort_unstable();
        roots.dedup();
        let mut hashes: Vec<u64> = backends.iter().flatten().map(|n| pool_hash(n)).collect();
        let mut names: Vec<&str> = backends.iter().flat_map(|b| served(b)).copied().collect();
        names.sort_unstable();
        names.dedup();
        hashes.sort_unstable();
        hashes.dedup();
        Pools {
            hashes: hashes.into(),
            names: names.into_iter().map(Arc::from).collect(),
            backends: backends
                .into_iter()
                .map(|b| b.into_iter().map(Arc::from).collect())
                .collect(),
            multi: roots.len() > 1,
            complete,
        }
    }

    /// The cluster serves two base models or more: requests are routed within their pool.
    #[inline]
    pub fn multi(&self) -> bool {
        self.multi
    }

    /// Every node's backends reported their names: what is not served is served nowhere.
    #[inline]
    pub fn complete(&self) -> bool {
        self.complete
    }

    /// Some backend of the cluster serves pool `pool` (a [`pool_hash`]).
    #[inline]
    pub fn serves(&self, pool: u64) -> bool {
        self.hashes.binary_search(&pool).is_ok()
    }

    /// Every base-model name a request can use (vLLM's `id`s), sorted: what the answers list
    /// as served.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }

    /// Each distinct backend's names (`root` first).
    pub fn backends(&self) -> impl Iterator<Item = &[Arc<str>]> {
        self.backends.iter().map(|b| &**b)
    }

    /// The names of the backends serving `pool`: what a client would call that base model.
    pub fn names_of(&self, pool: u64) -> Option<&[Arc<str>]> {
        self.backends
            .iter()
            .find(|b| b.iter().any(|n| pool_hash(n) == pool))
            .map(|b| &**b)
    }
}

/// The served names of a backend's names (`root` first, then the served names deduplicated,
/// so a lone name is a `root` served under its own path): a request naming a `root` that differs
/// is vLLM's 404. A backend served both under its path and under another name lists only the
/// other (the wire format cannot tell that case apart; the path still routes).
fn served<'a, 'b>(names: &'b [&'a str]) -> &'b [&'a str] {
    match names {
        [_, rest @ ..] if !rest.is_empty() => rest,
        all => all,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn one_base_model_is_not_multi() {
        let (a, b) = (s(&["/m/m1", "M1"]), s(&["/m/m1", "M1"]));
        let p = Pools::build([Some(vec![&a[..], &b[..]]), Some(vec![&a[..]])]);
        assert!(!p.multi() && p.complete());
        assert!(p.serves(pool_hash("M1")) && p.serves(pool_hash("/m/m1")));
        assert!(!p.serves(pool_hash("M2")));
        assert_eq!(
            p.names().collect::<Vec<_>>(),
            ["M1"],
            "a root with served names is no name"
        );
        assert_eq!(p.backends().count(), 1);
    }

    #[test]
    fn two_base_models_across_nodes() {
        let (m1, m2) = (s(&["/m/m1", "M1"]), s(&["/m/m2", "M2", "m2-alias"]));
        let p = Pools::build([Some(vec![&m1[..], &m1[..]]), Some(vec![&m1[..], &m2[..]])]);
        assert!(p.multi() && p.complete());
        assert!(p.serves(pool_hash("m2-alias")) && p.serves(pool_hash("/m/m2")));
        assert_eq!(p.names().collect::<Vec<_>>(), ["M1", "M2", "m2-alias"]);
        let plain = s(&["/m/m3"]);
        let p3 = Pools::build([Some(vec![&m1[..], &plain[..]])]);
        assert_eq!(
            p3.names().collect::<Vec<_>>(),
            ["/m/m3", "M1"],
            "served as its path"
        );
        let names: Vec<&str> = p
            .names_of(pool_hash("M2"))
            .unwrap()
            .iter()
            .map(|n| &**n)
            .collect();
        assert_eq!(names, ["/m/m2", "M2", "m2-alias"]);
        assert_eq!(p.names_of(pool_hash("M3")), None);
    }

    #[test]
    fn unknown_nodes_or_names_are_incomplete() {
        let m1 = s(&["M1"]);
        let empty: Vec<String> = Vec::new();
        assert!(!Pools::build([Some(vec![&m1[..]]), None]).complete());
        assert!(!Pools::build([Some(vec![&m1[..], &empty[..]])]).complete());
        assert!(!Pools::build([Some(vec![])]).complete());
        assert!(!Pools::default().complete() && !Pools::default().multi());
    }
}
