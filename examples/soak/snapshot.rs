//! The nodes' final state for `soak report --nodes`: once every node is idle, its
//! `/admin/cache/stats` and the apparent size of the files it published, saved as
//! `node-I/final.json`.

use std::{error::Error, fs, path::Path, time::Duration};

use serde_json::{Value, json};

use crate::report::ReportArgs;

/// Wait until every node is idle, then save its stats and the disk's apparent size.
pub fn take(args: &ReportArgs) -> Result<(), Box<dyn Error>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    for (i, node) in args.nodes.iter().enumerate() {
        let dir = args.work.join(format!("node-{i}"));
        let store = dir.join("store");
        // Idle, and the ledger read twice the same around a walk of the disk: nothing moved.
        let mut last = Value::Null;
        for attempt in 0..120 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(500));
            }
            let stats = rt.block_on(async {
                let resp = client
                    .get(format!("{node}/admin/cache/stats"))
                    .bearer_auth(&args.admin_token)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await?;
                resp.json::<Value>().await
            });
            let Ok(stats) = stats else { continue };
            let idle = ["fetches_in_flight", "revalidations_in_flight", "reserved"]
                .iter()
                .all(|k| stats[k] == 0);
            let (bytes, files, dirs) = disk(&store);
            let snap = json!({"stats": stats, "disk_bytes": bytes, "disk_files": files,
                "disk_adapters": dirs, "attempts": attempt + 1});
            if idle && last["stats"] == snap["stats"] {
                last = snap;
                break;
            }
            last = snap;
        }
        fs::write(dir.join("final.json"), serde_json::to_vec_pretty(&last)?)?;
    }
    Ok(())
}

/// Apparent bytes and count of the published files under `root` (hidden top-level entries
/// such as `.loraplex-tmp` left out), and the number of adapter directories.
fn disk(root: &Path) -> (u64, u64, u64) {
    fn walk(dir: &Path, top: bool, acc: &mut (u64, u64, u64)) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        if !top && dir.join("adapter_config.json").is_file() {
            acc.2 += 1;
        }
        for e in rd.flatten() {
            if top && e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                walk(&e.path(), false, acc);
            } else if ft.is_file() {
                acc.0 += e.metadata().map_or(0, |m| m.len());
                acc.1 += 1;
            }
        }
    }
    let mut acc = (0, 0, 0);
    walk(root, true, &mut acc);
    acc
}
