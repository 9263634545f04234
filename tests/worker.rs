//! A data-plane worker whose request waits on a control-plane task that panics answers a 500 in
//! OpenAI's shape and goes on serving. The real server with one worker (every request meets the
//! same one) over real sockets, under both io drivers, with a handler that hands each request's
//! work to the control plane as the proxy does (`Control::run`).

use std::{future::Future, net::SocketAddr};

use loraplex::{
    config::{Config, ServerConfig},
    control::{Control, ControlPlane},
    http::{RequestHead, response},
    metrics::Metrics,
    server::{Handler, Server, bind, conn::Conn, runtime},
    shutdown::Shutdown,
};

/// `/panic` runs a control-plane task that panics; anything else one that answers.
struct OnControlPlane {
    control: Control,
}

impl Handler for OnControlPlane {
    fn handle(&self, conn: &mut Conn, head: RequestHead) -> impl Future<Output = bool> {
        let panics = head.path() == "/panic";
        let work = self.control.run(async move {
            if panics {
                panic!("a bug in a control-plane task");
            }
            "served"
        });
        async move {
            let mut out = Vec::new();
            match work.await {
                Ok(text) => {
                    response::write(&mut out, 200, "text/plain", &[], text.as_bytes(), true)
                }
                Err(e) => response::error(&mut out, &e, true),
            }
            conn.write_all(out).await.is_ok()
        }
    }
}

async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> (u16, String) {
    let r = client
        .get(format!("http://{addr}{path}"))
        .timeout(std::time::Duration::from_secs(20))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: no answer ({e})"));
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn survives(driver: loraplex::config::Driver) {
    let control_plane = ControlPlane::start(1).unwrap();
    let control = control_plane.control();
    let config = ServerConfig {
        workers: 1,
        driver,
        ..Config::default().server
    };
    let listeners = bind("127.0.0.1:0", 1).unwrap();
    let addr = listeners[0].local_addr().unwrap();
    let shutdown = Shutdown::new();
    let server = Server::start(
        listeners,
        runtime::resolve(driver).unwrap(),
        &config,
        shutdown.clone(),
        std::sync::Arc::new(Metrics::new()),
        None,
        move |_| OnControlPlane {
            control: control.clone(),
        },
    )
    .unwrap();
    // A fresh connection for each request too: the worker must still accept.
    let pooled = reqwest::Client::new();
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for client in [&pooled, &fresh, &pooled] {
        let (status, body) = get(client, addr, "/panic").await;
        assert_eq!(status, 500, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], "InternalServerError");
        assert_eq!(v["error"]["code"], 500);
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("a bug in a control-plane task"), "{msg}");
        assert_eq!(get(client, addr, "/ok").await, (200, "served".to_owned()));
    }
    shutdown.trigger();
    tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    drop(control_plane);
}

#[tokio::test(flavor = "multi_thread")]
async fn epoll_worker_survives_a_panicking_control_plane_task() {
    survives(loraplex::config::Driver::Epoll).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn io_uring_worker_survives_a_panicking_control_plane_task() {
    if !monoio::utils::detect_uring() {
        println!("SKIPPED: this kernel refuses io_uring; only the epoll case runs");
        return;
    }
    survives(loraplex::config::Driver::IoUring).await;
}
