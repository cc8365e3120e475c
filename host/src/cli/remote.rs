//! Commands that talk to a running host's admin API: `deploy`,
//! `plugins list`, `plugins rollback`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::supervisor::RouteInfo;

/// Where the host is and how to prove the right to change it.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// The host's admin URL (its `[admin] listen` address).
    #[arg(
        long = "host",
        env = "SWITCHYARD_ADMIN_URL",
        default_value = "http://127.0.0.1:9464"
    )]
    pub url: String,
}

/// A changing request also needs the host's token.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The bearer token the host expects (the value of the variable its
    /// `[admin] token_env` names).
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

fn client(timeout: Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .context("cannot create an HTTP client")
}

fn endpoint(url: &str, path: &str) -> Result<String> {
    let base = url.trim_end_matches('/');
    if !base.starts_with("http://") {
        bail!(
            "`{url}` is not an http:// URL (the admin API speaks plain HTTP on localhost; reach a remote host through a tunnel)"
        );
    }
    Ok(format!("{base}{path}"))
}

/// Sends a request; turns the host's JSON error into this command's error.
async fn call(request: reqwest::RequestBuilder, url: &str) -> Result<Vec<u8>> {
    let response = request.send().await.map_err(|e| {
        let why = if e.is_connect() {
            "nothing answers there (is the host running, with its admin listener on?)".to_owned()
        } else if e.is_timeout() {
            "no answer in time".to_owned()
        } else {
            e.to_string()
        };
        anyhow::anyhow!("cannot reach the host at {url}: {why}")
    })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .with_context(|| format!("cannot read the answer from {url}"))?;
    if status.is_success() {
        return Ok(body.to_vec());
    }
    let message = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    bail!("the host refused ({status}): {message}")
}

fn need_token(token: &TokenArgs) -> Result<&str> {
    token
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .context("this needs the host's admin token: set SWITCHYARD_ADMIN_TOKEN or pass --token")
}

fn route_info(body: &[u8]) -> Result<RouteInfo> {
    serde_json::from_slice(body).context("the host's answer is not a plugin description")
}

/// The version a change handed to the route: the one it takes with its
/// next message, or the one it runs if it already took it.
fn describe(info: &RouteInfo) -> String {
    match &info.pending {
        Some(p) => format!(
            "{} {} ({})",
            info.plugin,
            p.version,
            crate::plugin::short_digest(&p.digest)
        ),
        None => format!(
            "{} {} ({})",
            info.plugin,
            info.version,
            crate::plugin::short_digest(&info.digest)
        ),
    }
}

/// `switchyard deploy FILE --plugin NAME`.
pub async fn deploy(file: &Path, plugin: &str, host: &HostArgs, token: &TokenArgs) -> Result<()> {
    let token = need_token(token)?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let url = endpoint(&host.url, &format!("/plugins/{plugin}"))?;
    eprintln!(
        "deploying {} ({} bytes) as plugin {plugin} to {}",
        file.display(),
        bytes.len(),
        host.url
    );
    // Compiling a large component can take a while on the host.
    let body = call(
        client(Duration::from_secs(300))?
            .put(&url)
            .bearer_auth(token)
            .header("content-type", "application/wasm")
            .body(bytes),
        &url,
    )
    .await?;
    let info = route_info(&body)?;
    println!(
        "deployed {}; the route takes it with its next message",
        describe(&info)
    );
    Ok(())
}

/// `switchyard plugins rollback NAME`.
pub async fn rollback(plugin: &str, host: &HostArgs, token: &TokenArgs) -> Result<()> {
    let token = need_token(token)?;
    let url = endpoint(&host.url, &format!("/plugins/{plugin}/rollback"))?;
    let body = call(
        client(Duration::from_secs(300))?
            .post(&url)
            .bearer_auth(token),
        &url,
    )
    .await?;
    let info = route_info(&body)?;
    println!(
        "rolled back to {}; the route takes it with its next message",
        describe(&info)
    );
    Ok(())
}

/// `switchyard plugins list`.
pub async fn list(host: &HostArgs, json: bool) -> Result<()> {
    let url = endpoint(&host.url, "/plugins")?;
    let body = call(client(Duration::from_secs(30))?.get(&url), &url).await?;
    let routes: Vec<RouteInfo> =
        serde_json::from_slice(&body).context("the host's answer is not a plugin list")?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&routes).context("cannot print JSON")?
        );
        return Ok(());
    }
    println!(
        "{:<20} {:<12} {:<20} {:<9} {:<26} PENDING",
        "PLUGIN", "VERSION", "DIGEST", "SOURCE", "LOADED AT"
    );
    for r in &routes {
        let pending = r.pending.as_ref().map_or("-".to_owned(), |p| {
            format!("{} {}", p.version, crate::plugin::short_digest(&p.digest))
        });
        println!(
            "{:<20} {:<12} {:<20} {:<9} {:<26} {pending}",
            r.plugin,
            r.version,
            crate::plugin::short_digest(&r.digest),
            r.source,
            crate::cli::dlq::time(r.loaded_at_ms),
        );
    }
    Ok(())
}
