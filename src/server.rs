//! Starting and stopping a gateway: binds both listeners (port 0 works, so tests can start one
//! on a free port), serves the public and admin routers, drains gracefully, reloads the config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::Router;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::KeyCache;
use crate::config::{Config, ConfigError};
use crate::state::{AppState, IdGen, Runtime, Shared};
use crate::store::Store;

/// Why a gateway could not start; one line naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config is invalid (or names an unset environment variable).
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] crate::ledger::LedgerError),
}

/// Options besides the config.
#[derive(Default)]
pub struct StartOptions {
    /// Admin token; `None` reads the variable `server.admin_token_env` names.
    pub admin_token: Option<String>,
    /// Config file, for reloads.
    pub config_path: Option<PathBuf>,
    /// A store to use instead of opening the configured one (tests, demo).
    pub store: Option<Store>,
}

/// A running gateway.
pub struct Gateway {
    /// Bound public address.
    pub public_addr: SocketAddr,
    /// Bound admin address.
    pub admin_addr: Option<SocketAddr>,
    /// Shared state (store, config generation).
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Binds the listeners and starts serving.
pub async fn start(config: Config, opts: StartOptions) -> Result<Gateway, StartError> {
    let admin_token = match opts.admin_token {
        Some(t) => Some(t),
        None => std::env::var(&config.server.admin_token_env).ok(),
    }
    .filter(|t| !t.is_empty());
    if config.server.admin_listen.is_some() && admin_token.is_none() {
        return Err(ConfigError {
            key: "server.admin_token_env".into(),
            reason: format!(
                "environment variable {} is not set; the admin listener needs a token",
                config.server.admin_token_env
            ),
        }
        .into());
    }
    let runtime = Runtime::new(config.clone())?;
    let store = match opts.store {
        Some(s) => s,
        None => Store::open(&config.store).await?,
    };
    crate::ledger::Ledger::set_limits(&store, runtime.store_limits);
    let workers = match config.server.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let state = AppState(Arc::new(Shared {
        runtime: ArcSwap::from_pointee(runtime),
        ledger: Arc::new(store),
        keys: KeyCache::default(),
        clients: crate::proxy::Clients::new(
            Duration::from_millis(config.server.connect_timeout_ms),
            workers,
            &crate::proxy::tls::TlsSettings {
                ca_files: config.tls.ca_file.iter().cloned().collect(),
                client_cert: None,
                http2: true,
            },
        )?,
        background: tokio::runtime::Handle::current(),
        workers: std::sync::OnceLock::new(),
        ids: IdGen::default(),
        admin_token,
        config_path: opts.config_path,
        metrics: crate::metrics::Metrics::default(),
        jobs_wake: tokio::sync::Notify::new(),
    }));

    state.metrics.backends.set(state.runtime.load().upstreams.backends());
    let (shutdown, _) = watch::channel(false);
    let mut tasks = Vec::new();
    let public_addr = config.listen_addr();
    // Listener limits are read at start (a reload does not rebind listeners).
    let limits = crate::listener::Limits::of(&config.server);
    let (public_addr, worker_tasks) =
        serve_on_workers(public_addr, crate::stack::public_router(state.clone()), limits, workers, &state, &shutdown)?;
    tasks.extend(worker_tasks);
    let admin_addr = match config.admin_addr() {
        Some(addr) => {
            let (addr, task) = serve(addr, crate::admin::router(state.clone()), limits, &state, &shutdown).await?;
            tasks.push(task);
            Some(addr)
        }
        None => None,
    };
    tasks.push(crate::notify::spawn(state.clone(), shutdown.subscribe()));
    tasks.push(crate::notify::export::spawn(state.clone(), shutdown.subscribe()));
    tasks.push(crate::jobs::spawn(state.clone(), shutdown.subscribe()));
    tasks.push(crate::meter::spawn_refund_sweeper(state.clone(), shutdown.subscribe()));
    tasks.push(crate::ratelimit::spawn_sweeper(state.clone(), shutdown.subscribe()));
    tasks.push(crate::proxy::spawn_health_checks(state.clone(), shutdown.subscribe()));
    tracing::info!(%public_addr, ?admin_addr, store = state.ledger.kind(), "creditgate listening");
    Ok(Gateway { public_addr, admin_addr, state, shutdown, tasks })
}

async fn serve(
    addr: SocketAddr,
    router: Router,
    limits: crate::listener::Limits,
    state: &AppState,
    shutdown: &watch::Sender<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| StartError::Bind { addr, source })?;
    let permits = crate::listener::connection_permits(&limits);
    let task = tokio::spawn(crate::listener::serve(
        crate::listener::Side::Admin,
        listener,
        router,
        limits,
        permits,
        state.clone(),
        shutdown.subscribe(),
    ));
    Ok((bound, task))
}

/// Serves `router` on `addr` from `workers` threads, each running a single-threaded runtime
/// with its own listening socket on the same address (`SO_REUSEPORT`: the kernel spreads new
/// connections over them) and its own upstream client. A connection then lives on one thread
/// from accept to close — no work-stealing, no cross-thread wake-ups — which is what brings a
/// hyper proxy's CPU per request near nginx's (`../shared/PERF.md`). The returned tasks end when
/// their worker has drained.
fn serve_on_workers(
    addr: SocketAddr,
    router: Router,
    limits: crate::listener::Limits,
    workers: usize,
    state: &AppState,
    shutdown: &watch::Sender<bool>,
) -> Result<(SocketAddr, Vec<JoinHandle<()>>), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    // The first socket settles the port (port 0 picks one); the others bind the same one.
    let mut bound = addr;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 0..workers {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(bind_error)?;
        socket.set_reuseaddr(true).map_err(bind_error)?;
        socket.set_reuseport(true).map_err(bind_error)?;
        socket.bind(bound).map_err(bind_error)?;
        let listener = socket.listen(1024).map_err(bind_error)?;
        bound = listener.local_addr().map_err(bind_error)?;
        // Registered with this runtime by `listen`; each worker registers its own with its own.
        sockets.push(listener.into_std().map_err(bind_error)?);
    }
    let permits = crate::listener::connection_permits(&limits);
    let mut tasks = Vec::with_capacity(workers);
    let mut handles = Vec::with_capacity(workers);
    for (index, socket) in sockets.into_iter().enumerate() {
        let (router, state, stop, permits) = (router.clone(), state.clone(), shutdown.subscribe(), permits.clone());
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(bind_error)?;
        handles.push(runtime.handle().clone());
        std::thread::Builder::new()
            .name(format!("creditgate-worker-{index}"))
            .spawn(move || {
                state.clients.enter_worker(index);
                runtime.block_on(async move {
                    tokio::spawn(timer_floor());
                    state.ledger.attach_worker().await;
                    match TcpListener::from_std(socket) {
                        Ok(listener) => {
                            let side = crate::listener::Side::Public;
                            crate::listener::serve(side, listener, router, limits, permits, state, stop).await
                        }
                        Err(e) => tracing::error!(error = %e, index, "worker cannot listen"),
                    }
                });
                drop(done);
            })
            .map_err(bind_error)?;
        tasks.push(tokio::spawn(async move {
            let _ = finished.await;
        }));
    }
    let _ = state.workers.set(handles);
    Ok((bound, tasks))
}

impl Gateway {
    /// Stops accepting, lets in-flight requests finish (up to `grace`), then returns.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("shutdown grace period over; dropping remaining connections");
        }
    }
}

/// Reloads the config on SIGHUP and when the file's modification time changes.
pub fn spawn_reloader(state: AppState) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Some(path) = state.config_path.clone() else { return };
        let mtime = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let mut last: Option<SystemTime> = mtime(&path);
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let by_signal = tokio::select! {
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => true,
                _ = tick.tick() => false,
            };
            let now = mtime(&path);
            if !by_signal && now == last {
                continue;
            }
            last = now;
            match state.reload() {
                Ok(()) => tracing::info!(path = %path.display(), "config reloaded"),
                Err(e) => tracing::error!(error = %e, "config reload rejected; the previous config stays in force"),
            }
        }
    })
}

/// How far ahead a worker's runtime always has a timer due ([`timer_floor`]).
const TIMER_FLOOR: Duration = Duration::from_secs(1);

/// Keeps a timer due at most [`TIMER_FLOOR`] ahead on the calling worker's runtime, for as long
/// as it runs. tokio wakes its driver — an eventfd write, then one more `epoll_wait` — whenever
/// a timer is set that is due before every timer the driver last went to sleep for, even when
/// it is set on the driver's own thread, and every request sets one (the upstream's connect and
/// first-byte limits; on Redis, the store's wait): one extra write and one extra wake-up per
/// request, measured with `/proc/<pid>/io`. With this timer due sooner than those (their
/// defaults are seconds), they never are. The cost: one wake-up per second per worker, busy or
/// idle. Timeouts configured below a second set timers that still wake the driver: correct, only
/// slower.
async fn timer_floor() {
    let mut tick = tokio::time::interval(TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}
