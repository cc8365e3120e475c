//! Deploys to a fleet (`[fleet]`): the plugin versions every host of a
//! pipeline should run, kept in PostgreSQL, and what each host runs.
//!
//! `switchyard deploy -p PIPELINE` checks a build against the pipeline and
//! records it ([`Fleet::record`]): the component's bytes under their digest,
//! and a row of the deploy history, whose last row per plugin is the desired
//! version. A `NOTIFY` on [`CHANNEL`] tells the hosts at once; each also
//! looks every `poll_interval`, in case a notification was missed.
//!
//! A host follows ([`follow`]): before its routes start it puts the desired
//! builds into its own deployments, so that it starts on them
//! ([`Fleet::prepare`]); while it runs, it hands every new desired build to
//! its supervisor, which checks and swaps it as a local deploy does (a build
//! it refuses is not tried again and is reported), and it reports what it
//! runs, when, and any problem, to the `fleet_hosts` table that
//! `switchyard fleet status` reads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::config::{FleetConfig, Pipeline};
use crate::envelope::now_ms;
use crate::supervisor::{Deployed, Deployments, Supervisor};

/// The channel a deploy notifies; the payload is the pipeline's name.
pub const CHANNEL: &str = "switchyard_fleet";

/// A host not seen for this long is shown as gone.
pub const GONE_AFTER: Duration = Duration::from_secs(30);

/// The tables, created if missing; `{schema}` is replaced.
const SCHEMA: &str = "
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.fleet_builds (
    digest      TEXT PRIMARY KEY,
    component   BYTEA NOT NULL,
    added_at_ms BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.fleet_deploys (
    seq      BIGSERIAL PRIMARY KEY,
    pipeline TEXT NOT NULL,
    plugin   TEXT NOT NULL,
    digest   TEXT NOT NULL,
    version  TEXT NOT NULL,
    previous TEXT,
    by_whom  TEXT NOT NULL,
    at_ms    BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS fleet_deploys_by_plugin ON {schema}.fleet_deploys (pipeline, plugin, seq);
CREATE TABLE IF NOT EXISTS {schema}.fleet_hosts (
    pipeline      TEXT NOT NULL,
    host          TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    seen_at_ms    BIGINT NOT NULL,
    running       TEXT NOT NULL,
    problem       TEXT,
    stopped       BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (pipeline, host)
);
";

/// The version of a plugin the fleet should run: the last deploy of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desired {
    pub digest: String,
    pub version: String,
    /// The deploy's place in the history.
    pub seq: i64,
    pub at_ms: u64,
}

/// One row of the deploy history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub seq: i64,
    pub plugin: String,
    pub digest: String,
    pub version: String,
    /// The digest the plugin was meant to run before, if any.
    pub previous: Option<String>,
    pub by: String,
    pub at_ms: u64,
}

/// What one host runs of one plugin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub digest: String,
    pub version: String,
}

/// One host of the pipeline, as it last reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostReport {
    pub host: String,
    pub started_at_ms: u64,
    pub seen_at_ms: u64,
    /// Per plugin.
    pub running: BTreeMap<String, Running>,
    /// Why it does not run what is desired, if it knows.
    pub problem: Option<String>,
    /// It stopped (cleanly) after this report.
    pub stopped: bool,
}

impl HostReport {
    /// Running, and heard from within [`GONE_AFTER`].
    pub fn live(&self) -> bool {
        !self.stopped
            && now_ms().saturating_sub(self.seen_at_ms)
                <= u64::try_from(GONE_AFTER.as_millis()).unwrap_or(u64::MAX)
    }
}

/// A pipeline's fleet tables.
pub struct Fleet {
    client: Client,
    schema: String,
    pipeline: String,
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unms(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Fleet {
    /// Connects to the fleet's database and creates its tables if missing.
    pub async fn connect(config: &FleetConfig, pipeline: &str) -> Result<Fleet> {
        let url = config.url.resolve("fleet")?;
        let client = crate::pg::connect(&url, "fleet")
            .await
            .context("cannot reach the [fleet] database")?;
        Self::with_client(client, &config.schema, pipeline).await
    }

    async fn with_client(client: Client, schema: &str, pipeline: &str) -> Result<Fleet> {
        client
            .batch_execute(&SCHEMA.replace("{schema}", schema))
            .await
            .with_context(|| format!("cannot create the fleet's tables (schema {schema})"))?;
        Ok(Fleet {
            client,
            schema: schema.to_owned(),
            pipeline: pipeline.to_owned(),
        })
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        self.client
            .query(&sql.replace("{schema}", &self.schema), params)
            .await
            .map_err(|e| anyhow!("the fleet's tables (schema {}): {e}", self.schema))
    }

    /// The desired version of every plugin deployed to the fleet.
    pub async fn desired(&self) -> Result<BTreeMap<String, Desired>> {
        let rows = self
            .query(
                "SELECT DISTINCT ON (plugin) plugin, digest, version, seq, at_ms
                 FROM {schema}.fleet_deploys WHERE pipeline = $1 ORDER BY plugin, seq DESC",
                &[&self.pipeline],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<_, String>(0)?,
                    Desired {
                        digest: r.try_get(1)?,
                        version: r.try_get(2)?,
                        seq: r.try_get(3)?,
                        at_ms: unms(r.try_get(4)?),
                    },
                ))
            })
            .collect()
    }

    /// The component with `digest`, checked against it.
    pub async fn component(&self, digest: &str) -> Result<Vec<u8>> {
        let rows = self
            .query(
                "SELECT component FROM {schema}.fleet_builds WHERE digest = $1",
                &[&digest],
            )
            .await?;
        let Some(row) = rows.first() else {
            bail!("the fleet has no build {digest}");
        };
        let bytes: Vec<u8> = row.try_get(0)?;
        let found = crate::plugin::digest_of(&bytes);
        if found != digest {
            bail!("the fleet's build {digest} reads back as {found}: not used");
        }
        Ok(bytes)
    }

    /// Records `bytes` (checked as version `version` of `plugin`) as the
    /// version the fleet should run, and tells the hosts. Returns the
    /// deploy's record.
    pub async fn record(
        &self,
        plugin: &str,
        bytes: &[u8],
        version: &str,
        by: &str,
    ) -> Result<DeployRecord> {
        let digest = crate::plugin::digest_of(bytes);
        let at = now_ms();
        let previous = self.desired().await?.remove(plugin).map(|d| d.digest);
        self.query(
            "INSERT INTO {schema}.fleet_builds (digest, component, added_at_ms)
             VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
            &[&digest, &bytes, &ms(at)],
        )
        .await?;
        let rows = self
            .query(
                "INSERT INTO {schema}.fleet_deploys
                 (pipeline, plugin, digest, version, previous, by_whom, at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq",
                &[
                    &self.pipeline,
                    &plugin,
                    &digest,
                    &version,
                    &previous,
                    &by,
                    &ms(at),
                ],
            )
            .await?;
        let seq = rows
            .first()
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()?
            .ok_or_else(|| anyhow!("the deploy was not recorded"))?;
        self.query("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.pipeline])
            .await?;
        Ok(DeployRecord {
            seq,
            plugin: plugin.to_owned(),
            digest,
            version: version.to_owned(),
            previous,
            by: by.to_owned(),
            at_ms: at,
        })
    }

    /// The deploy history, newest first, at most `limit` rows.
    pub async fn history(&self, limit: i64) -> Result<Vec<DeployRecord>> {
        let rows = self
            .query(
                "SELECT seq, plugin, digest, version, previous, by_whom, at_ms
                 FROM {schema}.fleet_deploys WHERE pipeline = $1 ORDER BY seq DESC LIMIT $2",
                &[&self.pipeline, &limit],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DeployRecord {
                    seq: r.try_get(0)?,
                    plugin: r.try_get(1)?,
                    digest: r.try_get(2)?,
                    version: r.try_get(3)?,
                    previous: r.try_get(4)?,
                    by: r.try_get(5)?,
                    at_ms: unms(r.try_get(6)?),
                })
            })
            .collect()
    }

    /// What `host` runs now; `stopped` when it is its last report.
    pub async fn report(
        &self,
        host: &str,
        started_at_ms: u64,
        running: &BTreeMap<String, Running>,
        problem: Option<&str>,
        stopped: bool,
    ) -> Result<()> {
        let running = serde_json::to_string(running)?;
        self.query(
            "INSERT INTO {schema}.fleet_hosts
                 (pipeline, host, started_at_ms, seen_at_ms, running, problem, stopped)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (pipeline, host) DO UPDATE SET started_at_ms = $3, seen_at_ms = $4,
                 running = $5, problem = $6, stopped = $7",
            &[
                &self.pipeline,
                &host,
                &ms(started_at_ms),
                &ms(now_ms()),
                &running,
                &problem,
                &stopped,
            ],
        )
        .await?;
        Ok(())
    }

    /// Notes that `host` stopped, leaving what it ran as it last said.
    pub async fn stopped(&self, host: &str) -> Result<()> {
        self.query(
            "UPDATE {schema}.fleet_hosts SET stopped = true, seen_at_ms = $3
             WHERE pipeline = $1 AND host = $2",
            &[&self.pipeline, &host, &ms(now_ms())],
        )
        .await?;
        Ok(())
    }

    /// Every host that has reported, by name.
    pub async fn hosts(&self) -> Result<Vec<HostReport>> {
        let rows = self
            .query(
                "SELECT host, started_at_ms, seen_at_ms, running, problem, stopped
                 FROM {schema}.fleet_hosts WHERE pipeline = $1 ORDER BY host",
                &[&self.pipeline],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let running: String = r.try_get(3)?;
                Ok(HostReport {
                    host: r.try_get(0)?,
                    started_at_ms: unms(r.try_get(1)?),
                    seen_at_ms: unms(r.try_get(2)?),
                    running: serde_json::from_str(&running).unwrap_or_default(),
                    problem: r.try_get(4)?,
                    stopped: r.try_get(5)?,
                })
            })
            .collect()
    }

    /// Puts the desired build of each of `pipeline`'s plugins into the
    /// host's own deployments, where it is not already the current one, so
    /// that the host starts on it. Returns the plugins it changed.
    pub async fn prepare(&self, pipeline: &Pipeline) -> Result<Vec<String>> {
        let store = Deployments::new(&pipeline.state_dir, &pipeline.name);
        let mut changed = Vec::new();
        for (plugin, want) in self.desired().await? {
            if pipeline.plugin(&plugin).is_none() {
                tracing::warn!(plugin = %plugin, "Fleet: a version is deployed for a plugin this pipeline does not have; ignored");
                continue;
            }
            let current = store.current(&plugin)?.map(|(d, _)| d.digest);
            if current.as_deref() == Some(want.digest.as_str()) {
                continue;
            }
            let bytes = self.component(&want.digest).await?;
            let entry = Deployed {
                digest: want.digest.clone(),
                version: want.version.clone(),
                deployed_at_ms: now_ms(),
                size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            };
            store.push(&plugin, &bytes, entry)?;
            tracing::info!(plugin = %plugin, version = %want.version, digest = %crate::plugin::short_digest(&want.digest), "Fleet: starting on the version deployed to the fleet");
            changed.push(plugin);
        }
        Ok(changed)
    }
}

/// This host's name in the fleet: `SWITCHYARD_HOST_ID`, or the machine's
/// name and the process id.
pub fn host_id() -> String {
    std::env::var("SWITCHYARD_HOST_ID")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| format!("{}:{}", crate::dlq::host_name(), std::process::id()))
}

/// Follows the fleet's desired versions until `stop` turns true: at every
/// notification and every `poll_interval`, swaps each plugin whose desired
/// build it does not run, and reports what it runs.
pub async fn follow(
    config: FleetConfig,
    control: Arc<Supervisor>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let pipeline = control.pipeline().await.name;
    let host = host_id();
    let started = now_ms();
    // Builds a host refused: not tried again until another is desired.
    let mut refused: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut fleet: Option<(
        Fleet,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    )> = None;
    loop {
        if fleet.is_none() {
            match listen(&config, &pipeline).await {
                Ok(f) => fleet = Some(f),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "Fleet: cannot reach the database; the host keeps running what it runs and tries again")
                }
            }
        }
        if let Some((f, _)) = &fleet {
            let problem = converge(f, &control, &mut refused).await;
            let running = running_of(&control).await;
            if let Err(e) = f
                .report(&host, started, &running, problem.as_deref(), false)
                .await
            {
                tracing::warn!(error = %format!("{e:#}"), "Fleet: cannot report this host; reconnecting");
                fleet = None;
            }
        }
        let notified = async {
            match fleet.as_mut() {
                Some((_, notices)) => {
                    while let Some(n) = notices.recv().await {
                        if n.payload() == pipeline {
                            return false;
                        }
                    }
                    true
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(config.poll_interval) => {}
            _ = stop.changed() => {}
            ended = notified => if ended {
                fleet = None;
            },
        }
        if *stop.borrow() {
            // The last word: this host is not gone, it stopped.
            if let Some((f, _)) = &fleet
                && let Err(e) = f.stopped(&host).await
            {
                tracing::warn!(error = %format!("{e:#}"), "Fleet: cannot report that this host stopped");
            }
            return;
        }
    }
}

/// A connection that listens on [`CHANNEL`], and the tables over another.
async fn listen(
    config: &FleetConfig,
    pipeline: &str,
) -> Result<(
    Fleet,
    tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
)> {
    let url = config.url.resolve("fleet")?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = crate::pg::connect_listening(&url, "fleet", tx)
        .await
        .context("cannot reach the [fleet] database")?;
    client
        .batch_execute(&format!("LISTEN {CHANNEL}"))
        .await
        .context("cannot listen for the fleet's deploys")?;
    Ok((
        Fleet::with_client(client, &config.schema, pipeline).await?,
        rx,
    ))
}

/// What the host runs, per plugin.
async fn running_of(control: &Supervisor) -> BTreeMap<String, Running> {
    control
        .list()
        .await
        .into_iter()
        .map(|r| {
            (
                r.plugin,
                Running {
                    digest: r.digest,
                    version: r.version,
                },
            )
        })
        .collect()
}

/// Swaps every plugin whose desired build this host does not run; what
/// went wrong, if anything.
async fn converge(
    fleet: &Fleet,
    control: &Supervisor,
    refused: &mut BTreeMap<String, (String, String)>,
) -> Option<String> {
    let desired = match fleet.desired().await {
        Ok(d) => d,
        Err(e) => return Some(format!("cannot read the desired versions: {e:#}")),
    };
    let running = running_of(control).await;
    let mut problems = Vec::new();
    for (plugin, want) in desired {
        let Some(now) = running.get(&plugin) else {
            continue;
        };
        if now.digest == want.digest {
            refused.remove(&plugin);
            continue;
        }
        if let Some((digest, why)) = refused.get(&plugin)
            && *digest == want.digest
        {
            problems.push(format!("{plugin} {}: refused: {why}", want.version));
            continue;
        }
        let bytes = match fleet.component(&want.digest).await {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{plugin}: {e:#}"));
                continue;
            }
        };
        match control.deploy(&plugin, bytes).await {
            Ok(info) => {
                tracing::info!(plugin = %plugin, version = %info.version, digest = %crate::plugin::short_digest(&info.digest), "Fleet: now runs the version deployed to the fleet")
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(plugin = %plugin, version = %want.version, error = %why, "Fleet: refused the version deployed to the fleet; keeps running the one it has");
                problems.push(format!("{plugin} {}: refused: {why}", want.version));
                refused.insert(plugin, (want.digest, why));
            }
        }
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}
