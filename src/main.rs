//! The `creditgate` command: `demo`, `serve --config FILE`, `check --config FILE [--against URL]`,
//! `admin …` (the admin API's client, `creditgate::cli`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use creditgate::cli::{self, Endpoint};
use creditgate::config::{Config, LogFormat};
use creditgate::server::{self, StartOptions};
use creditgate::{auth, demo};

/// mimalloc instead of glibc's malloc: a request makes some 40 allocations (headers, bodies,
/// futures of a few kilobytes), which glibc serves at ~100–150 instructions each and, for the
/// blocks past its per-thread cache (1 KiB), by consolidating its free lists first.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// creditgate: a metering reverse proxy for AI backends.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One-command tour: fake AI backend, gateway on the embedded store, a demo key and curl examples.
    Demo,
    /// Run the gateway.
    Serve {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config and print the route → operation → cost table; warn (on stderr) about free
    /// routes to an upstream that metered routes use.
    ///
    /// With `--against URL`: print instead what a reload of the file would change in the gateway
    /// whose admin listener is at URL (routes, prices, plans, packages, upstreams, settings).
    Check {
        /// Config file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// A running gateway's admin listener, e.g. http://127.0.0.1:9090.
        #[arg(long, value_name = "URL")]
        against: Option<String>,
        /// With --against: the environment variable holding the admin token.
        #[arg(long, default_value = "CREDITGATE_ADMIN_TOKEN", value_name = "VAR")]
        token_env: String,
        /// With --against: longest wait for the gateway's answer, in milliseconds.
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        timeout_ms: u64,
    },
    /// The admin API from the command line: accounts, keys, top-ups, usage, ledger. The token is
    /// read from $CREDITGATE_ADMIN_TOKEN. Exit codes: 0 ok, 1 error answer, 2 usage, 3
    /// unreachable, 4 unauthorized.
    Admin(cli::admin::AdminArgs),
    /// Print the OpenAPI 3.1 document that both listeners serve at /openapi.json.
    Openapi,
}

const DEMO_CONFIG: &str = include_str!("../config/demo.toml");

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { config, against: None, .. } => return check(&config),
        Command::Check { config, against: Some(url), token_env, timeout_ms } => {
            return check_against(&config, &Endpoint { url, token_env, timeout_ms });
        }
        Command::Admin(args) => return cli::finish(cli::admin::run(args)),
        Command::Openapi => {
            println!("{}", creditgate::openapi::DOCUMENT.as_str());
            return ExitCode::SUCCESS;
        }
        Command::Serve { config } => {
            Config::load(&config).map_err(|e| format!("invalid config: {e}")).and_then(|c| run(c, Some(config), false))
        }
        Command::Demo => {
            Config::parse(DEMO_CONFIG).map_err(|e| format!("invalid demo config: {e}")).and_then(|mut c| {
                // Free ports unless the usual ones are free; the backend always on a free port.
                c.server.listen = free_or_zero("127.0.0.1:8080");
                c.server.admin_listen = Some(free_or_zero("127.0.0.1:9090"));
                if let Some(d) = c.demo.as_mut() {
                    d.backend_listen = "127.0.0.1:0".into();
                }
                run(c, None, true)
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("creditgate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn free_or_zero(addr: &str) -> String {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => addr.to_owned(),
        Err(_) => "127.0.0.1:0".to_owned(),
    }
}

fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("creditgate: invalid config: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rules = creditgate::classify::Rules::new(&config);
    let table = rules.table();
    let w0 = table.iter().map(|r| r.0.chars().count()).max().unwrap_or(5).max(5);
    let w1 = table.iter().map(|r| r.1.len()).max().unwrap_or(9).max(9);
    println!("{:<w0$}  {:<w1$}  cost (credits)", "route", "operation");
    for (route, op, cost) in &table {
        println!("{route:<w0$}  {op:<w1$}  {cost}");
    }
    for warning in rules.shared_upstream_warnings() {
        eprintln!("{warning}");
    }
    if let Err(e) = creditgate::state::Runtime::new(config) {
        println!("note: {e} (set it before `creditgate serve`)");
    }
    println!("config OK: {}", path.display());
    ExitCode::SUCCESS
}

/// `check --against`: exit 1 for an invalid file, else the admin client's exit codes.
fn check_against(path: &Path, endpoint: &Endpoint) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return cli::finish(Err(cli::CliError::Invalid(format!("invalid config: {e}")))),
    };
    for warning in creditgate::classify::Rules::new(&config).shared_upstream_warnings() {
        eprintln!("{warning}");
    }
    cli::finish(cli::check::against(path, &config, endpoint).map(|report| print!("{report}")))
}

fn run(config: Config, path: Option<PathBuf>, tour: bool) -> Result<(), String> {
    init_logging(&config);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut admin_token = std::env::var(&config.server.admin_token_env).ok().filter(|t| !t.is_empty());
        if config.demo.is_some() && admin_token.is_none() {
            admin_token = Some(format!("adm_{}", auth::keys::random_alnum(32)));
        }
        let mut config = config;
        let demo = config.demo.clone();
        if let Some(d) = &demo {
            let addr: SocketAddr = d.backend_listen.parse().map_err(|e| format!("demo.backend_listen: {e}"))?;
            let bound = demo::start_backend(addr).await.map_err(|e| format!("demo backend on {addr}: {e}"))?;
            if addr.port() == 0 {
                for up in config.upstreams.values_mut() {
                    up.urls = vec![format!("http://{bound}")];
                }
            }
            tracing::info!(%bound, "demo backend listening");
        }
        let opts = StartOptions { admin_token: admin_token.clone(), config_path: path, store: None };
        let gateway = server::start(config, opts).await.map_err(|e| e.to_string())?;
        if let Some(d) = &demo {
            let key = demo::seed(&gateway.state, &d.account, &d.plan).await.map_err(|e| e.to_string())?;
            println!(
                "{}",
                demo::banner(
                    gateway.public_addr,
                    gateway.admin_addr,
                    admin_token.as_deref().unwrap_or(""),
                    &key,
                    &d.account
                )
            );
        } else if tour {
            unreachable!("the demo config has a [demo] section");
        }
        let reloader = server::spawn_reloader(gateway.state.clone());
        shutdown_signal().await;
        // The grace in force now (a reload may have changed it).
        let grace = Duration::from_millis(gateway.state.runtime.load().config.server.shutdown_grace_ms);
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: refusing new connections, finishing requests in flight"
        );
        reloader.abort();
        gateway.shutdown(grace).await;
        Ok(())
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    // Colour codes only on a terminal: in a log file they are noise a reader has to strip.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).init(),
        LogFormat::Text => builder.fmt_fields(EscapedFields).init(),
    }
}

/// Text-log fields as tracing-subscriber's default writes them, with every control character
/// (and the Unicode line and paragraph separators) escaped: a value the client chose — a tier,
/// a path, an error message quoting its input — cannot end the line and start a forged one.
///
/// Done here, once for every field of every event and span, rather than at each call site: the
/// default formatter prints `%` (Display) fields raw, and a new log line must not have to
/// remember. JSON logs need nothing: their encoder escapes. Field names lose their ANSI italics.
struct EscapedFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        mut writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut raw = String::new();
        tracing_subscriber::fmt::format::DefaultFields::new()
            .format_fields(tracing_subscriber::fmt::format::Writer::new(&mut raw), fields)?;
        for c in raw.chars() {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                write!(writer, "{}", c.escape_default())?;
            } else {
                std::fmt::Write::write_char(&mut writer, c)?;
            }
        }
        Ok(())
    }
}
