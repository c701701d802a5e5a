//! The `switchboard` command: `serve`, `check-config`, `simulate`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use switchboard::app::Application;
use switchboard::config::Settings;

/// mimalloc instead of glibc's malloc: a webhook makes many small, short-lived
/// allocations (headers, form pairs, JSON), and under glibc malloc/free were a
/// quarter of the gateway's CPU in the benchmark profile (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the position in its `mi_option_e`;
/// libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before mimalloc hands it
/// back to the system. Its default (1 s) is the embedded store's checkpoint
/// period: the checkpointer's buffers were handed back just before they
/// were needed again, and every reuse then faulted fresh (zeroed) pages,
/// 5% of the gateway's CPU in the benchmark profile. `MIMALLOC_PURGE_DELAY`
/// still overrides it.
const PURGE_DELAY_MS: std::ffi::c_long = 10_000;

fn tune_allocator() {
    // SAFETY: plain calls into mimalloc's option API, made before any other
    // thread exists; an option set as a default yields to its environment
    // variable.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

#[derive(Parser)]
#[command(name = "switchboard", version, about = "A digital channel gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The configuration file (default: $SWITCHBOARD_CONFIG, else ./switchboard.toml, else the demo).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Run the built-in demo: every channel on the offline sandbox provider.
        #[arg(long)]
        demo: bool,
    },
    /// Validate the configuration: exit 0, or print every problem and exit 1.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Send a webhook to a running gateway exactly as the channel's provider would.
    Simulate {
        /// The channel to simulate.
        channel_id: String,
        /// The customer's message.
        #[arg(long, conflicts_with = "file")]
        text: Option<String>,
        /// A payload to send as the provider's body (signed as the provider would).
        #[arg(long)]
        file: Option<PathBuf>,
        /// The customer's digital ID (default: a demo number or ID for the kind).
        #[arg(long)]
        from: Option<String>,
        /// The gateway's base URL (default: from server.listen).
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Which configuration to use: an explicit file, `$SWITCHBOARD_CONFIG`,
/// `./switchboard.toml`, or none (the demo).
fn config_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit
        .or_else(|| std::env::var_os("SWITCHBOARD_CONFIG").map(PathBuf::from))
        .or_else(|| {
            Path::new("switchboard.toml")
                .exists()
                .then(|| PathBuf::from("switchboard.toml"))
        })
}

fn load(path: Option<PathBuf>, demo: bool) -> anyhow::Result<Settings> {
    match (config_path(path), demo) {
        (Some(p), false) => Ok(Settings::load(&p)?),
        _ => {
            // The demo configuration, with the environment's overrides applied.
            let base = toml::to_string(&switchboard::demo::settings())?;
            Ok(Settings::from_toml(&base)?)
        }
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,actix_server=warn,switchboard::http=warn".into());
    // SWITCHBOARD_LOG=json gives one JSON object per line, for log pipelines.
    if std::env::var("SWITCHBOARD_LOG").as_deref() == Ok("json") {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            None => serve(None, false).await,
            Some(Command::Serve { config, demo }) => serve(config, demo).await,
            Some(Command::CheckConfig { config }) => check_config(config),
            Some(Command::Simulate {
                channel_id,
                text,
                file,
                from,
                url,
                config,
            }) => simulate(channel_id, text, file, from, url, config).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(config: Option<PathBuf>, demo: bool) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(config, demo)?;
    if let Err(e) = settings.clone().validate() {
        anyhow::bail!("the configuration has problems:\n{e}");
    }
    let app = Application::build(settings).await?;
    let g = app.gateway.clone();
    let url = app.url().to_string();
    println!("switchboard listening on {url}");
    if g.settings.demo {
        println!(
            "demo mode: every channel uses the built-in sandbox provider; data in {}",
            g.settings.store.path.display()
        );
        for a in &g.settings.agents {
            println!(
                "agent {} token {}",
                a.id,
                a.token.as_deref().unwrap_or("(hashed)")
            );
        }
        for s in &g.settings.services {
            println!(
                "service {} token {}",
                s.id,
                s.token.as_deref().unwrap_or("(hashed)")
            );
        }
        println!("agent API:       {url}/api/v1/me  (Authorization: Bearer <token>)");
        println!("routing feed:    {url}/api/v1/routing/events");
        println!("API description: {url}/openapi.json");
        for c in g
            .settings
            .channels
            .iter()
            .filter(|c| c.kind == switchboard::domain::ChannelKind::Chat)
        {
            println!("web chat:        {url}/chat/{}", c.id);
        }
        for c in &g.settings.channels {
            println!(
                "channel {} ({}): try  switchboard simulate {} --url {url} --text \"hello\"",
                c.id, c.kind, c.id
            );
        }
        if let Some(smtp) = g
            .settings
            .channels
            .iter()
            .filter(|c| c.kind == switchboard::domain::ChannelKind::Email)
            .find_map(|c| c.settings.get("smtp").and_then(|v| v.as_table()))
        {
            println!(
                "SMTP sink:       {}:{} takes the email channels' mail and delivers none of it; what it took: {url}/sandbox/smtp/messages",
                smtp.get("host").and_then(|v| v.as_str()).unwrap_or("127.0.0.1"),
                smtp.get("port").and_then(|v| v.as_integer()).unwrap_or_default()
            );
        }
        println!(
            "failures on purpose: an SMS containing {} is reported undelivered; mail to any address at {} is refused",
            switchboard::demo::SANDBOX_FAIL_MARKER,
            switchboard::demo_smtp::FAIL_DOMAIN
        );
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    app.run_until_stopped().await?;
    Ok(std::process::ExitCode::SUCCESS)
}

fn check_config(config: Option<PathBuf>) -> anyhow::Result<std::process::ExitCode> {
    let path = config_path(config);
    let settings = match &path {
        Some(p) => Settings::load(p),
        None => {
            let problems = switchboard::demo::settings().problems();
            if problems.is_empty() {
                println!("no configuration file: the demo configuration would be used: ok");
                return Ok(std::process::ExitCode::SUCCESS);
            }
            for p in &problems {
                println!("demo configuration: {p}");
            }
            return Ok(std::process::ExitCode::FAILURE);
        }
    };
    let settings = match settings {
        Ok(s) => s,
        Err(e) => {
            println!("{e}");
            return Ok(std::process::ExitCode::FAILURE);
        }
    };
    let problems = settings.problems();
    if problems.is_empty() {
        println!(
            "{}: ok ({} channels, {} queues, {} agents)",
            path.unwrap().display(),
            settings.channels.len(),
            settings.queues.len(),
            settings.agents.len()
        );
        Ok(std::process::ExitCode::SUCCESS)
    } else {
        for p in &problems {
            println!("{p}");
        }
        Ok(std::process::ExitCode::FAILURE)
    }
}

async fn simulate(
    channel_id: String,
    text: Option<String>,
    file: Option<PathBuf>,
    from: Option<String>,
    url: Option<String>,
    config: Option<PathBuf>,
) -> anyhow::Result<std::process::ExitCode> {
    let settings = load(config, false)?;
    let ch = settings
        .channel(&channel_id)
        .with_context(|| format!("no channel {channel_id} in the configuration"))?
        .clone();
    let base = url.unwrap_or_else(|| format!("http://{}", settings.server.listen));
    let base = base.trim_end_matches('/').to_string();
    // Providers sign the public URL; a local gateway without one is reached at --url.
    let public_url = settings
        .server
        .public_url
        .clone()
        .unwrap_or_else(|| base.clone());
    if ch.kind == switchboard::domain::ChannelKind::Chat {
        // Web chat has no provider webhook: be a visitor, as the widget is.
        let text = text.as_deref().unwrap_or("Hello from the simulator");
        return match switchboard::adapters::chat::simulate_visitor(
            &base,
            &channel_id,
            text,
            from.as_deref(),
        )
        .await
        {
            Ok(answer) => {
                println!("{answer}");
                Ok(std::process::ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("{e}");
                Ok(std::process::ExitCode::FAILURE)
            }
        };
    }
    let req = switchboard::simulate::build(
        &ch,
        &public_url,
        text.as_deref(),
        file.as_deref(),
        from.as_deref(),
    )?;
    let mut rb = reqwest::Client::new()
        .post(format!("{base}{}", req.path))
        .header("content-type", req.content_type.clone());
    for (k, v) in &req.headers {
        rb = rb.header(k, v);
    }
    let resp = rb
        .body(req.body)
        .send()
        .await
        .with_context(|| format!("posting to {base}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), body);
    Ok(if status.is_success() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default is still open to change when `main` sets it (this test
    /// process has allocated plenty by now), and position 15 is the purge
    /// delay: its environment variable sets it.
    #[test]
    fn the_allocator_keeps_freed_memory_for_ten_seconds() {
        tune_allocator();
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(v) => assert_eq!(delay.to_string(), v),
            Err(_) => assert_eq!(delay, PURGE_DELAY_MS),
        }
    }
}
