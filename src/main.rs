//! Temporary entry point until the CLI lands: `loraplex --listen ADDR --vllm-url URL`.
fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut cfg = loraplex::config::Config::default();
    let args: Vec<String> = std::env::args().collect();
    for pair in args[1..].chunks(2) {
        match pair[0].as_str() {
            "--listen" => cfg.listen = pair[1].clone(),
            "--vllm-url" => cfg.vllm_url = pair[1].clone(),
            "--workers" => cfg.server.workers = pair[1].parse().unwrap(),
            "--model" => cfg.vllm.model_name = Some(pair[1].clone()),
            other => panic!("unknown flag {other}"),
        }
    }
    let server = loraplex::server::Server::start(cfg).expect("start");
    server.stop_on_signals();
    server.wait();
}
