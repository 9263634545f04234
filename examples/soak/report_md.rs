//! The soak's report as Markdown, and its verdict.

use std::{collections::BTreeMap, fmt::Write};

use serde_json::Value;

use crate::report::{Rec, Run};

/// Rows listed at most in a list of requests (the count is always complete).
const MAX_ROWS: usize = 40;

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn short(s: &str, n: usize) -> String {
    let flat: String = s.replace(['\n', '|'], " ");
    if flat.chars().count() > n {
        format!("{}…", flat.chars().take(n).collect::<String>())
    } else {
        flat
    }
}

/// The report and whether every check passed.
pub fn render(run: &Run) -> (String, bool) {
    let mut out = String::new();
    let mut failed: Vec<String> = Vec::new();
    let statuses: Vec<String> = run.statuses().into_iter().collect();
    let span = |rs: &[&Rec]| {
        let first = rs.iter().map(|r| r.start_ms).min().unwrap_or(run.t0);
        let last = rs.iter().map(|r| r.end_ms).max().unwrap_or(run.t0);
        (last.saturating_sub(first)) as f64 / 1000.0
    };
    let all: Vec<&Rec> = run.recs.iter().collect();

    // Requests per node.
    let mut t = String::new();
    let cols: Vec<String> = statuses.iter().map(|s| format!("answered {s}")).collect();
    writeln!(
        t,
        "| node | sent | {} | lost to a kill | **unanswered** | retried elsewhere (refused) |",
        cols.join(" | ")
    )
    .unwrap();
    writeln!(t, "|---|---:|{}---:|---:|---:|", "---:|".repeat(cols.len())).unwrap();
    let row = |label: String, rs: &[&Rec], t: &mut String| {
        let by: Vec<String> = statuses
            .iter()
            .map(|s| {
                let n = rs
                    .iter()
                    .filter(|r| r.answered() && &r.outcome() == s)
                    .count();
                n.to_string()
            })
            .collect();
        let lost = rs.iter().filter(|r| run.lost_to_kill(r)).count();
        let unanswered = rs.iter().filter(|r| run.unanswered(r)).count();
        let retried = rs.iter().filter(|r| r.tries > 1).count();
        writeln!(
            t,
            "| {label} | {} | {} | {lost} | **{unanswered}** | {retried} |",
            rs.len(),
            by.join(" | ")
        )
        .unwrap();
    };
    for i in 0..run.nodes {
        let rs: Vec<&Rec> = all.iter().copied().filter(|r| r.node == i).collect();
        row(format!("{i}"), &rs, &mut t);
    }
    row("all".into(), &all, &mut t);
    let unanswered: Vec<&Rec> = all.iter().copied().filter(|r| run.unanswered(r)).collect();
    if !unanswered.is_empty() {
        failed.push(format!("{} unanswered", unanswered.len()));
    }

    // Outside the fault windows.
    let outside: Vec<&Rec> = all
        .iter()
        .copied()
        .filter(|r| run.windows_of(r).is_empty())
        .collect();
    let ok_outside = outside.iter().filter(|r| run.success(r)).count();
    let rate = 100.0 * ok_outside as f64 / (outside.len().max(1)) as f64;
    if outside.is_empty() || rate < 99.9 {
        failed.push(format!("success outside fault windows {rate:.3}% < 99.9%"));
    }
    let mut kinds = String::new();
    writeln!(
        kinds,
        "| kind | sent | success | success outside windows | p50 ms | p99 ms | max ms |"
    )
    .unwrap();
    writeln!(kinds, "|---|---:|---:|---:|---:|---:|---:|").unwrap();
    let mut by_kind: BTreeMap<&str, Vec<&Rec>> = BTreeMap::new();
    for r in &all {
        by_kind.entry(r.kind.as_str()).or_default().push(r);
    }
    for (kind, rs) in &by_kind {
        let out: Vec<&&Rec> = rs.iter().filter(|r| run.windows_of(r).is_empty()).collect();
        let mut lat: Vec<u64> = out
            .iter()
            .filter(|r| run.success(r))
            .map(|r| r.end_ms - r.start_ms)
            .collect();
        lat.sort_unstable();
        writeln!(
            kinds,
            "| {kind} | {} | {} | {}/{} | {} | {} | {} |",
            rs.len(),
            rs.iter().filter(|r| run.success(r)).count(),
            out.iter().filter(|r| run.success(r)).count(),
            out.len(),
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            lat.last().copied().unwrap_or(0)
        )
        .unwrap();
    }

    // Fault windows and what did not succeed.
    let mut w = String::new();
    writeln!(
        w,
        "| # | fault | node | from s | to s | grace s | requests met | not success |"
    )
    .unwrap();
    writeln!(w, "|---|---|---:|---:|---:|---:|---:|---:|").unwrap();
    for win in &run.windows {
        let met: Vec<&Rec> = all
            .iter()
            .copied()
            .filter(|r| win.touches(r.start_ms, r.end_ms))
            .collect();
        let bad = met.iter().filter(|r| !run.success(r)).count();
        writeln!(
            w,
            "| {} | {} | {} | {:.1} | {:.1} | {} | {} | {bad} |",
            win.id,
            win.kind,
            win.node.map_or("-".into(), |n| n.to_string()),
            run.secs(win.begin),
            run.secs(win.end),
            win.grace / 1000,
            met.len()
        )
        .unwrap();
    }
    let wrong: Vec<&Rec> = all.iter().copied().filter(|r| run.wrong(r)).collect();
    if !wrong.is_empty() {
        failed.push(format!(
            "{} answers with the wrong adapter or weights",
            wrong.len()
        ));
    }
    let unmatched: Vec<&Rec> = all
        .iter()
        .copied()
        .filter(|r| {
            r.answered() && !run.success(r) && !run.wrong(r) && run.windows_of(r).is_empty()
        })
        .collect();
    if !unmatched.is_empty() {
        failed.push(format!(
            "{} non-success answers outside every fault window",
            unmatched.len()
        ));
    }
    let list = |rs: &[&Rec], out: &mut String| {
        writeln!(
            out,
            "| start s | end s | node | kind | model | status | tries | error / body |"
        )
        .unwrap();
        writeln!(out, "|---:|---:|---:|---|---|---:|---:|---|").unwrap();
        for r in rs.iter().take(MAX_ROWS) {
            let why = r.error.clone().or(r.detail.clone()).unwrap_or_else(|| {
                let (a, w) = (r.answer_adapter.as_deref(), r.weights.as_deref());
                let stale = run.stale_since(r).map_or(String::new(), |t| {
                    format!(" (stale: replaced at the origin at {:.1} s)", run.secs(t))
                });
                format!(
                    "answered adapter={} weights={}{stale}",
                    a.unwrap_or("?"),
                    w.unwrap_or("?")
                )
            });
            writeln!(
                out,
                "| {:.3} | {:.3} | {} | {} | {} | {} | {} | {} |",
                run.secs(r.start_ms),
                run.secs(r.end_ms),
                r.node,
                if r.src == "load" {
                    r.kind.clone()
                } else {
                    format!("{} ({})", r.kind, r.src)
                },
                r.model,
                r.status,
                r.tries,
                short(&why, 160)
            )
            .unwrap();
        }
        if rs.len() > MAX_ROWS {
            writeln!(out, "\n({} more)", rs.len() - MAX_ROWS).unwrap();
        }
    };

    // Stores, vLLM, processes.
    let mut s = String::new();
    writeln!(
        s,
        "| node | partial adapters seen by vLLM | weights gone while loaded | weights changed while loaded | ledger `size` | files on disk (apparent) | items / adapter dirs | pinned after | restarts (loraplex, vLLM) | RSS MiB start → end (max) | fds start → end (max) | log ERROR lines |"
    )
    .unwrap();
    writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    .unwrap();
    for i in 0..run.nodes {
        let ev = &run.vllm_events[i];
        let count = |k: &str| ev.iter().filter(|e| e["kind"] == k).count();
        let (partial, gone, changed) = (
            count("partial"),
            count("weights_gone"),
            count("weights_changed"),
        );
        if partial > 0 {
            failed.push(format!("node {i}: {partial} partial adapters seen by vLLM"));
        }
        if gone > 0 {
            failed.push(format!("node {i}: {gone} weights gone while loaded"));
        }
        let f = &run.finals[i];
        let (size, disk) = (f["stats"]["size"].as_u64(), f["disk_bytes"].as_u64());
        let matched = size.is_some() && size == disk;
        if !matched {
            failed.push(format!("node {i}: ledger {size:?} != disk {disk:?}"));
        }
        let pinned = f["stats"]["pinned"].as_u64();
        if pinned != Some(0) {
            failed.push(format!("node {i}: pinned after the load {pinned:?}"));
        }
        let procs: Vec<_> = run.procs.iter().filter(|p| p.0 == i).collect();
        let at = |phase: &str| procs.iter().find(|p| p.1 == phase);
        let fmt = |get: fn(&(usize, String, u64, u64, u64)) -> u64, div: u64| {
            let v = |p: Option<&&(usize, String, u64, u64, u64)>| {
                p.map_or("?".into(), |p| format!("{}", get(p) / div))
            };
            let max = procs.iter().map(|p| get(p) / div).max();
            let max = max.map_or("?".into(), |m| m.to_string());
            format!("{} → {} ({max})", v(at("start")), v(at("end")))
        };
        let restarts = |t: &str| run.restarts.get(&(t.to_owned(), i)).copied().unwrap_or(0);
        writeln!(
            s,
            "| {i} | {partial} | {gone} | {changed} | {} | {} | {} / {} | {} | {}, {} | {} | {} | {} |",
            show(&f["stats"]["size"]),
            show(&f["disk_bytes"]),
            show(&f["stats"]["items"]),
            show(&f["disk_adapters"]),
            show(&f["stats"]["pinned"]),
            restarts("loraplex"),
            restarts("vllm"),
            fmt(|p| p.3, 1024),
            fmt(|p| p.4, 1),
            run.log_errors[i].len(),
        )
        .unwrap();
        if run.log_errors[i].iter().any(|l| l.contains("panicked")) {
            failed.push(format!("node {i}: a panic in loraplex.log"));
        }
    }
    let partials: Vec<String> = run
        .vllm_events
        .iter()
        .enumerate()
        .flat_map(|(i, ev)| {
            ev.iter()
                .filter(|e| e["kind"] != "weights_changed")
                .map(move |e| {
                    format!(
                        "- node {i} at {:.3} s: {e}",
                        run.secs(e["t"].as_u64().unwrap_or(0))
                    )
                })
        })
        .collect();

    let mut errors = String::new();
    for (i, lines) in run.log_errors.iter().enumerate() {
        // The same message again and again says little more: one line per distinct message.
        let mut seen = std::collections::BTreeSet::new();
        for l in lines {
            let msg = l.split_once(" ERROR ").map_or(l.as_str(), |(_, m)| m);
            let key: String = msg
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .take(80)
                .collect();
            if seen.insert(key) && seen.len() <= 10 {
                writeln!(errors, "- node {i}: `{}`", short(l, 300)).unwrap();
            }
        }
        if seen.len() > 10 {
            writeln!(
                errors,
                "- node {i}: ({} more distinct messages)",
                seen.len() - 10
            )
            .unwrap();
        }
    }

    let stale: Vec<&Rec> = all
        .iter()
        .copied()
        .filter(|r| run.stale_since(r).is_some())
        .collect();

    let changing: BTreeMap<&str, usize> = all
        .iter()
        .filter(|r| r.kind == "changing" && run.success(r))
        .filter_map(|r| r.weights.as_deref())
        .fold(BTreeMap::new(), |mut m, w| {
            *m.entry(w).or_default() += 1;
            m
        });

    let pass = failed.is_empty();
    writeln!(
        out,
        "# Chaos soak: {} nodes, {} requests over {:.0} s, {} fault windows\n",
        run.nodes,
        all.len(),
        span(&all),
        run.windows.len()
    )
    .unwrap();
    if pass {
        writeln!(out, "**PASS**: every check below holds.\n").unwrap();
    } else {
        writeln!(out, "**FAIL**: {}.\n", failed.join("; ")).unwrap();
    }
    writeln!(out, "## Requests (by the node that took them)\n\n{t}").unwrap();
    writeln!(
        out,
        "Success outside the fault windows: **{ok_outside} / {} = {rate:.3}%** (goal ≥ 99.9%).\n",
        outside.len()
    )
    .unwrap();
    writeln!(out, "{kinds}").unwrap();
    writeln!(out, "## Fault windows\n\n{w}").unwrap();
    writeln!(
        out,
        "### Non-success answers outside every fault window: {}\n",
        unmatched.len()
    )
    .unwrap();
    if !unmatched.is_empty() {
        list(&unmatched, &mut out);
        out.push('\n');
    }
    writeln!(
        out,
        "### Wrong answers (adapter or weights): {}\n",
        wrong.len()
    )
    .unwrap();
    if !wrong.is_empty() {
        list(&wrong, &mut out);
        out.push('\n');
    }
    writeln!(out, "### Unanswered: {}\n", unanswered.len()).unwrap();
    if !unanswered.is_empty() {
        list(&unanswered, &mut out);
        out.push('\n');
    }
    let lost: Vec<&Rec> = all
        .iter()
        .copied()
        .filter(|r| run.lost_to_kill(r))
        .collect();
    writeln!(out, "### Lost to a kill: {}\n", lost.len()).unwrap();
    if !lost.is_empty() {
        list(&lost, &mut out);
        out.push('\n');
    }
    writeln!(
        out,
        "## Stores, vLLM, processes (after the load, nodes idle)\n\n{s}"
    )
    .unwrap();
    if !partials.is_empty() {
        writeln!(out, "What vLLM met:\n\n{}\n", partials.join("\n")).unwrap();
    }
    if !errors.is_empty() {
        writeln!(
            out,
            "loraplex ERROR lines (distinct, 10 per node at most):\n\n{errors}"
        )
        .unwrap();
    }
    writeln!(
        out,
        "Stale answers (a version replaced at the origin more than the TTL + {} s before): {} \
         ({} outside the fault windows, listed above if any).\n",
        crate::report::STALE_SLACK_MS / 1000,
        stale.len(),
        stale
            .iter()
            .filter(|r| run.windows_of(r).is_empty())
            .count()
    )
    .unwrap();
    writeln!(
        out,
        "Versions of `soak/changing` served (weights hash: answers): {}\n",
        changing
            .iter()
            .map(|(w, n)| format!("`{w}`: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    out.push_str(RULES);
    (out, pass)
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "?".into(),
        v => v.to_string(),
    }
}

const RULES: &str = "## How to read it\n\n\
- *answered*: a response head and its whole body (all of `Content-Length`, or a chunked body \
up to its last chunk); a 2xx stream must end with `data: [DONE]`, a 2xx JSON body must parse.\n\
- *success*: answered 2xx (a warm-up only if every adapter in it is `ok`), or an evict answered \
503 \"in use\" (the documented answer while requests hold the adapter), or a 404 for an adapter \
no origin has (`missing`).\n\
- *lost to a kill*: not answered, and a process on its path was `kill -9`ed while it was in \
flight: the node that took it (the client's connection died with it), or, once the head had \
arrived, any loraplex or vLLM (a started answer can only be cut). A load balancer would give a 502.\n\
- *unanswered*: every other request without an answer (reset, early close, truncated body or \
stream, client timeout). Must be 0.\n\
- *wrong*: a 2xx answer naming another adapter than asked, or weights the origin never served \
under that name (the stand-in vLLM names both in every answer). Must be 0.\n\
- *stale*: a 2xx answer naming a version the origin had replaced more than `invalidation.ttl` + \
15 s before the request (the first request after the TTL starts the check): not a success.\n\
- *retried elsewhere*: the client's connection was refused (nothing sent) and it tried another \
node, as a load balancer does; nothing else is retried.\n\
- A request *meets* a fault window when it was in flight during the window or its grace after \
it (how long the fault's effects may last). Success outside the windows counts the requests that \
met none.\n\
- Ledger: `/admin/cache/stats` `size` against the apparent size of every file under the storage \
dir outside `.loraplex-tmp`, read when every node is idle; pinned: stats `pinned` then.\n";
