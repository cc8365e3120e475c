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
//!
//! A whole pipeline file is deployed the same way: its text is kept like a
//! build, under its digest, with [`PIPELINE_FILE`] in place of a plugin's
//! name, together with the builds of the plugins it names. A host applies
//! it as a local edit of its file ([`Supervisor::apply_pipeline`]), after
//! putting those builds in its deployments.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;
use tokio_postgres::types::ToSql;

use crate::config::{FleetConfig, Pipeline};
use crate::envelope::now_ms;
use crate::plugin::short_digest;
use crate::supervisor::{Deployed, Deployments, Supervisor};

/// The channel a deploy notifies; the payload is the pipeline's name.
pub const CHANNEL: &str = "switchyard_fleet";

/// The name a deploy of the pipeline file has in place of a plugin's (no
/// plugin can be named so: a plugin's name is a lowercase identifier).
pub const PIPELINE_FILE: &str = "(pipeline file)";

/// The longest one round of a follower (converge, report, judge) may
/// take; the follower then connects again.
const ROUND_TIMEOUT: Duration = Duration::from_secs(15);

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
    at_ms    BIGINT NOT NULL,
    state    TEXT NOT NULL DEFAULT 'deployed',
    canary   TEXT,
    watch_until_ms BIGINT,
    margin   DOUBLE PRECISION,
    min_attempts BIGINT,
    verdict  TEXT,
    decided_at_ms BIGINT
);
CREATE INDEX IF NOT EXISTS fleet_deploys_by_plugin ON {schema}.fleet_deploys (pipeline, plugin, seq);
CREATE UNIQUE INDEX IF NOT EXISTS fleet_deploys_one_canary ON {schema}.fleet_deploys (pipeline, plugin)
    WHERE state = 'canary';
CREATE TABLE IF NOT EXISTS {schema}.fleet_hosts (
    pipeline      TEXT NOT NULL,
    host          TEXT NOT NULL,
    started_at_ms BIGINT NOT NULL,
    seen_at_ms    BIGINT NOT NULL,
    running       TEXT NOT NULL,
    problem       TEXT,
    stopped       BOOLEAN NOT NULL DEFAULT false,
    settled_at_ms BIGINT,
    PRIMARY KEY (pipeline, host)
);
";

/// Columns added since the tables were first made: added where missing,
/// after a look that takes no lock on the tables.
const ADDED_COLUMNS: [(&str, &str, &str); 2] = [
    ("fleet_hosts", "pipeline_digest", "TEXT"),
    ("fleet_deploys", "baseline", "TEXT"),
];

/// The version of a plugin the fleet should run: the last deploy of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Desired {
    pub digest: String,
    pub version: String,
    /// The deploy's place in the history.
    pub seq: i64,
    pub at_ms: u64,
    /// Where the deploy stands: all hosts, a canary, or decided.
    pub state: RolloutState,
    /// The digest the fleet ran before: what the hosts outside a canary
    /// run, and what a rolled-back deploy returns to.
    pub previous: Option<String>,
    /// The hosts that run a canary.
    pub canary: Vec<String>,
    /// When a canary is promoted if nothing went wrong (ms since the epoch).
    pub watch_until_ms: Option<u64>,
    /// How much worse the canary's failure rate may be than the rest's.
    pub margin: f64,
    /// The failed and successful attempts a canary needs before its rate
    /// is judged.
    pub min_attempts: u64,
    /// Why it was promoted or rolled back.
    pub verdict: Option<String>,
    /// For a canary: the attempts that had succeeded and failed on each
    /// other host running the previous version when the canary began, so
    /// that the canary is compared with the same window of theirs.
    #[serde(default)]
    pub baseline: BTreeMap<String, (u64, u64)>,
}

/// Where a deploy stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RolloutState {
    /// Every host runs it.
    Deployed,
    /// The canary hosts run it, the others the previous version.
    Canary,
    /// The canary did well: every host runs it.
    Promoted,
    /// The canary did worse than the rest: every host runs the previous
    /// version.
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Deployed => "deployed",
            RolloutState::Canary => "canary",
            RolloutState::Promoted => "promoted",
            RolloutState::RolledBack => "rolled-back",
        }
    }

    fn parse(s: &str) -> RolloutState {
        match s {
            "canary" => RolloutState::Canary,
            "promoted" => RolloutState::Promoted,
            "rolled-back" => RolloutState::RolledBack,
            _ => RolloutState::Deployed,
        }
    }
}

impl Desired {
    /// The digest the fleet runs outside a canary: what every host runs
    /// once the rollout is decided.
    pub fn fleet_digest(&self) -> Option<&str> {
        self.digest_for("")
    }

    /// The digest `host` should run for this deploy, if any.
    pub fn digest_for(&self, host: &str) -> Option<&str> {
        match self.state {
            RolloutState::Deployed | RolloutState::Promoted => Some(&self.digest),
            RolloutState::Canary if self.canary.iter().any(|h| h == host) => Some(&self.digest),
            RolloutState::Canary | RolloutState::RolledBack => self.previous.as_deref(),
        }
    }
}

/// A canary: on how many hosts, for how long, judged how.
#[derive(Clone, Debug, PartialEq)]
pub struct Canary {
    pub hosts: usize,
    pub watch: Duration,
    /// How much higher (0.05: five points) the canary's failure rate may be
    /// than the rest's before it is rolled back.
    pub margin: f64,
    pub min_attempts: u64,
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
    pub state: RolloutState,
    pub canary: Vec<String>,
    pub verdict: Option<String>,
}

/// What one host runs of one plugin, and how it has gone since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub digest: String,
    pub version: String,
    /// Attempts that succeeded, and that failed, since this host started
    /// running this version (as far as it has counted).
    #[serde(default)]
    pub handled: u64,
    #[serde(default)]
    pub failed: u64,
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
    /// When it last finished an attempt at a message, as far as its
    /// reports saw (ms since the epoch).
    pub settled_at_ms: Option<u64>,
    /// The digest of the pipeline file deployed to the fleet that it runs;
    /// `None` when it runs its own file.
    #[serde(default)]
    pub pipeline: Option<String>,
}

impl HostReport {
    /// Running, and heard from within [`GONE_AFTER`].
    pub fn live(&self) -> bool {
        !self.stopped
            && now_ms().saturating_sub(self.seen_at_ms)
                <= u64::try_from(GONE_AFTER.as_millis()).unwrap_or(u64::MAX)
    }
}

/// One thing a deploy changes: a plugin's build, or the pipeline file
/// (under [`PIPELINE_FILE`], its text as the bytes).
#[derive(Clone, Copy, Debug)]
pub struct Change<'a> {
    pub plugin: &'a str,
    pub bytes: &'a [u8],
    pub version: &'a str,
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
        crate::pg::create_tables(&client, &SCHEMA.replace("{schema}", schema))
            .await
            .with_context(|| format!("cannot create the fleet's tables (schema {schema})"))?;
        // Unquoted, the schema's name is folded to lower case.
        let folded = schema.to_lowercase();
        for (table, column, kind) in ADDED_COLUMNS {
            let found = client
                .query_opt(
                    "SELECT 1 FROM information_schema.columns
                     WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
                    &[&folded, &table, &column],
                )
                .await
                .with_context(|| format!("cannot read the fleet's tables (schema {schema})"))?;
            if found.is_none() {
                client
                    .batch_execute(&format!(
                        "ALTER TABLE {schema}.{table} ADD COLUMN IF NOT EXISTS {column} {kind}"
                    ))
                    .await
                    .with_context(|| {
                        format!("cannot add {column} to the fleet's {table} (schema {schema})")
                    })?;
            }
        }
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
                "SELECT DISTINCT ON (plugin) plugin, digest, version, seq, at_ms, state, previous,
                     canary, watch_until_ms, margin, min_attempts, verdict, baseline
                 FROM {schema}.fleet_deploys WHERE pipeline = $1 ORDER BY plugin, seq DESC",
                &[&self.pipeline],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let canary: Option<String> = r.try_get(7)?;
                Ok((
                    r.try_get::<_, String>(0)?,
                    Desired {
                        digest: r.try_get(1)?,
                        version: r.try_get(2)?,
                        seq: r.try_get(3)?,
                        at_ms: unms(r.try_get(4)?),
                        state: RolloutState::parse(&r.try_get::<_, String>(5)?),
                        previous: r.try_get(6)?,
                        canary: canary
                            .and_then(|c| serde_json::from_str(&c).ok())
                            .unwrap_or_default(),
                        watch_until_ms: r.try_get::<_, Option<i64>>(8)?.map(unms),
                        margin: r.try_get::<_, Option<f64>>(9)?.unwrap_or(0.0),
                        min_attempts: r.try_get::<_, Option<i64>>(10)?.map_or(0, unms),
                        verdict: r.try_get(11)?,
                        baseline: r
                            .try_get::<_, Option<String>>(12)?
                            .and_then(|b| serde_json::from_str(&b).ok())
                            .unwrap_or_default(),
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
        canary: Option<&Canary>,
    ) -> Result<DeployRecord> {
        let change = Change {
            plugin,
            bytes,
            version,
        };
        self.record_all(&[change], by, canary, None, None)
            .await?
            .pop()
            .ok_or_else(|| anyhow!("the deploy was not recorded"))
    }

    /// Records every change as one deploy, in one transaction: the hosts
    /// see all of them or none. `note` is kept as the deploys' verdict (a
    /// rollback says which deploy it undoes). With `planned` (the deploy
    /// number of each desired version the changes were planned against,
    /// as [`Fleet::seqs`] gives), a deploy recorded since refuses them.
    pub async fn record_all(
        &self,
        changes: &[Change<'_>],
        by: &str,
        canary: Option<&Canary>,
        note: Option<&str>,
        planned: Option<&BTreeMap<String, i64>>,
    ) -> Result<Vec<DeployRecord>> {
        if canary.is_some() && changes.len() != 1 {
            bail!("a canary tries one plugin's build");
        }
        self.client
            .batch_execute("BEGIN")
            .await
            .map_err(|e| anyhow!("the fleet's tables (schema {}): {e}", self.schema))?;
        let recorded = self
            .record_in_transaction(changes, by, canary, note, planned)
            .await;
        let end = if recorded.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        };
        let ended = self.client.batch_execute(end).await;
        let records = recorded?;
        ended.map_err(|e| anyhow!("the deploy was not recorded: {e}"))?;
        Ok(records)
    }

    /// [`Fleet::record_all`]'s work, inside its transaction.
    async fn record_in_transaction(
        &self,
        changes: &[Change<'_>],
        by: &str,
        canary: Option<&Canary>,
        note: Option<&str>,
        planned: Option<&BTreeMap<String, i64>>,
    ) -> Result<Vec<DeployRecord>> {
        // One deploy of a pipeline at a time: what it was planned against
        // is what it changes.
        self.query(
            "SELECT pg_advisory_xact_lock(hashtext('switchyard_fleet ' || $1))",
            &[&self.pipeline],
        )
        .await?;
        let desired = self.desired().await?;
        if let Some(planned) = planned
            && Self::seqs(&desired) != *planned
        {
            bail!(
                "the fleet's deploys changed while this one was being checked (now up to deploy #{}): nothing was recorded; run it again",
                desired.values().map(|d| d.seq).max().unwrap_or(0)
            );
        }
        let mut records = Vec::with_capacity(changes.len());
        for change in changes {
            let before = desired.get(change.plugin);
            records.push(self.insert_deploy(change, before, by, canary, note).await?);
        }
        self.query("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.pipeline])
            .await?;
        Ok(records)
    }

    /// The deploy number of each desired version: what a deploy is
    /// planned against.
    pub fn seqs(desired: &BTreeMap<String, Desired>) -> BTreeMap<String, i64> {
        desired.iter().map(|(k, d)| (k.clone(), d.seq)).collect()
    }

    /// Records one change; `before` is the deploy of its plugin the fleet
    /// had.
    async fn insert_deploy(
        &self,
        change: &Change<'_>,
        before: Option<&Desired>,
        by: &str,
        canary: Option<&Canary>,
        note: Option<&str>,
    ) -> Result<DeployRecord> {
        let Change {
            plugin,
            bytes,
            version,
        } = *change;
        let digest = crate::plugin::digest_of(bytes);
        let at = now_ms();
        if let Some(b) = before
            && b.state == RolloutState::Canary
        {
            bail!(
                "{plugin} {} is being tried on a canary (deploy #{}) until {}; wait for its verdict, or end it with `switchyard fleet rollback`",
                b.version,
                b.seq,
                b.watch_until_ms
                    .map_or("its end".to_owned(), crate::transport::cloudevents::rfc3339)
            );
        }
        // What the fleet runs now: a rolled-back deploy's predecessor.
        let previous = before.and_then(|b| b.fleet_digest().map(str::to_owned));
        // The other hosts' counts on the previous version as the canary
        // begins: it is judged against what they do from now on.
        let mut baseline: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let hosts: Vec<String> = match canary {
            None => Vec::new(),
            Some(c) => {
                if previous.is_none() {
                    bail!(
                        "{plugin} has no version deployed to the fleet to compare a canary with (and to return to): deploy the version the fleet runs first, without --canary"
                    );
                }
                let reports = self.live_hosts().await?;
                if reports.len() <= c.hosts {
                    let names: Vec<&str> = reports.iter().map(|h| h.host.as_str()).collect();
                    bail!(
                        "a canary of {} host(s) needs more live hosts than that to compare with; {} live: {}",
                        c.hosts,
                        reports.len(),
                        names.join(", ")
                    );
                }
                for h in reports.iter().skip(c.hosts) {
                    if let Some(r) = h
                        .running
                        .get(plugin)
                        .filter(|r| Some(&r.digest) == previous.as_ref())
                    {
                        baseline.insert(h.host.clone(), (r.handled, r.failed));
                    }
                }
                reports.into_iter().take(c.hosts).map(|h| h.host).collect()
            }
        };
        let baseline_json = canary
            .map(|_| serde_json::to_string(&baseline))
            .transpose()?;
        let state = if canary.is_some() {
            RolloutState::Canary
        } else {
            RolloutState::Deployed
        };
        let canary_json = canary.map(|_| serde_json::to_string(&hosts)).transpose()?;
        let watch_until = canary
            .map(|c| ms(at.saturating_add(u64::try_from(c.watch.as_millis()).unwrap_or(u64::MAX))));
        let margin = canary.map(|c| c.margin);
        let min_attempts = canary.map(|c| ms(c.min_attempts));
        self.query(
            "INSERT INTO {schema}.fleet_builds (digest, component, added_at_ms)
             VALUES ($1, $2, $3) ON CONFLICT (digest) DO NOTHING",
            &[&digest, &bytes, &ms(at)],
        )
        .await?;
        let rows = self
            .query(
                "INSERT INTO {schema}.fleet_deploys
                 (pipeline, plugin, digest, version, previous, by_whom, at_ms, state, canary,
                  watch_until_ms, margin, min_attempts, verdict, baseline)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING seq",
                &[
                    &self.pipeline,
                    &plugin,
                    &digest,
                    &version,
                    &previous,
                    &by,
                    &ms(at),
                    &state.as_str(),
                    &canary_json,
                    &watch_until,
                    &margin,
                    &min_attempts,
                    &note,
                    &baseline_json,
                ],
            )
            .await?;
        let seq = rows
            .first()
            .map(|r| r.try_get::<_, i64>(0))
            .transpose()?
            .ok_or_else(|| anyhow!("the deploy was not recorded"))?;
        // A deploy that raced past the check above ends a canary before it:
        // only the last deploy of a plugin is ever judged.
        self.query(
            "UPDATE {schema}.fleet_deploys SET state = 'rolled-back', decided_at_ms = $4::bigint,
                 verdict = 'rolled back: deploy #' || $3::bigint::text || ' came before its verdict'
             WHERE pipeline = $1 AND plugin = $2 AND state = 'canary' AND seq < $3::bigint",
            &[&self.pipeline, &plugin, &seq, &ms(at)],
        )
        .await?;
        Ok(DeployRecord {
            seq,
            plugin: plugin.to_owned(),
            digest,
            version: version.to_owned(),
            previous,
            by: by.to_owned(),
            at_ms: at,
            state,
            canary: hosts,
            verdict: note.map(str::to_owned),
        })
    }

    /// Ends the canary deploy `seq` of `plugin` now, rolled back, saying
    /// who ended it. False when it was no longer a canary.
    pub async fn end_canary(&self, plugin: &str, seq: i64, by: &str) -> Result<bool> {
        let verdict = format!("rolled back by {by} before its verdict");
        let rows = self
            .query(
                "UPDATE {schema}.fleet_deploys SET state = 'rolled-back', verdict = $4,
                     decided_at_ms = $5
                 WHERE pipeline = $1 AND plugin = $2 AND seq = $3 AND state = 'canary'
                 RETURNING seq",
                &[&self.pipeline, &plugin, &seq, &verdict, &ms(now_ms())],
            )
            .await?;
        if rows.is_empty() {
            return Ok(false);
        }
        self.query("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.pipeline])
            .await?;
        Ok(true)
    }

    /// The text of the pipeline file deployed as `digest`.
    pub async fn pipeline_text(&self, digest: &str) -> Result<String> {
        String::from_utf8(self.component(digest).await?)
            .map_err(|_| anyhow!("the fleet's pipeline file {digest} is not UTF-8 text"))
    }

    /// The deploy history, newest first, at most `limit` rows.
    pub async fn history(&self, limit: i64) -> Result<Vec<DeployRecord>> {
        let rows = self
            .query(
                "SELECT seq, plugin, digest, version, previous, by_whom, at_ms, state, canary, verdict
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
                    state: RolloutState::parse(&r.try_get::<_, String>(7)?),
                    canary: r
                        .try_get::<_, Option<String>>(8)?
                        .and_then(|c| serde_json::from_str(&c).ok())
                        .unwrap_or_default(),
                    verdict: r.try_get(9)?,
                })
            })
            .collect()
    }

    /// What `host` runs now; `stopped` when it is its last report.
    #[allow(clippy::too_many_arguments)]
    pub async fn report(
        &self,
        host: &str,
        started_at_ms: u64,
        running: &BTreeMap<String, Running>,
        problem: Option<&str>,
        stopped: bool,
        settled_at_ms: Option<u64>,
        pipeline_file: Option<&str>,
    ) -> Result<()> {
        let running = serde_json::to_string(running)?;
        self.query(
            "INSERT INTO {schema}.fleet_hosts
                 (pipeline, host, started_at_ms, seen_at_ms, running, problem, stopped, settled_at_ms,
                  pipeline_digest)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (pipeline, host) DO UPDATE SET started_at_ms = $3, seen_at_ms = $4,
                 running = $5, problem = $6, stopped = $7, settled_at_ms = $8, pipeline_digest = $9",
            &[
                &self.pipeline,
                &host,
                &ms(started_at_ms),
                &ms(now_ms()),
                &running,
                &problem,
                &stopped,
                &settled_at_ms.map(ms),
                &pipeline_file,
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

    /// The hosts running and heard from within [`GONE_AFTER`], by name.
    pub async fn live_hosts(&self) -> Result<Vec<HostReport>> {
        Ok(self
            .hosts()
            .await?
            .into_iter()
            .filter(HostReport::live)
            .collect())
    }

    /// Every host that has reported, by name.
    pub async fn hosts(&self) -> Result<Vec<HostReport>> {
        let rows = self
            .query(
                "SELECT host, started_at_ms, seen_at_ms, running, problem, stopped, settled_at_ms,
                     pipeline_digest
                 FROM {schema}.fleet_hosts WHERE pipeline = $1 ORDER BY host",
                &[&self.pipeline],
            )
            .await?;
        rows.iter()
            .map(|r| {
                // A row no host of ours wrote (or a newer host's) shows as
                // running nothing rather than failing the whole report.
                let running: String = r.try_get(3)?;
                Ok(HostReport {
                    host: r.try_get(0)?,
                    started_at_ms: unms(r.try_get(1)?),
                    seen_at_ms: unms(r.try_get(2)?),
                    running: serde_json::from_str(&running).unwrap_or_default(),
                    problem: r.try_get(4)?,
                    stopped: r.try_get(5)?,
                    settled_at_ms: r.try_get::<_, Option<i64>>(6)?.map(unms),
                    pipeline: r.try_get(7)?,
                })
            })
            .collect()
    }

    /// What a host whose own file is `own` should start on: the pipeline
    /// file deployed to the fleet, if there is one it can use (else its
    /// own), with the desired build of each of its plugins put into the
    /// host's deployments where it is not already the current one.
    pub async fn prepare(&self, own: &Pipeline) -> Result<Prepared> {
        let desired = self.desired().await?;
        let host = host_id();
        let mut prepared = Prepared {
            pipeline: None,
            installed: Vec::new(),
        };
        if let Some((digest, d)) = desired
            .get(PIPELINE_FILE)
            .and_then(|d| d.digest_for(&host).map(|g| (g.to_owned(), d)))
        {
            match self.pipeline_for(own, &digest, d.seq).await {
                Ok(p) => {
                    tracing::info!(digest = %short_digest(&digest), deploy = d.seq, "Fleet: starting on the pipeline file deployed to the fleet");
                    prepared.pipeline = Some((digest, p));
                }
                Err(e) => tracing::warn!(
                    error = %format!("{e:#}"),
                    "Fleet: cannot use the pipeline file deployed to the fleet; starting on this host's"
                ),
            }
        }
        let start = prepared.pipeline.as_ref().map_or(own, |(_, p)| p);
        prepared.installed = self.install(start, &desired, &host).await?;
        Ok(prepared)
    }

    /// What a host whose own file is `own` runs of the pipeline file
    /// deployed as `digest` (deploy `seq`): read as if it were `own`'s file
    /// (relative paths are the host's own), with the host's own sections
    /// ([`with_own_sections`]).
    pub async fn pipeline_for(&self, own: &Pipeline, digest: &str, seq: i64) -> Result<Pipeline> {
        let text = self.pipeline_text(digest).await?;
        let deployed = parse_as(
            &text,
            own,
            &format!("the fleet's pipeline file (deploy #{seq})"),
        )?;
        Ok(with_own_sections(own, deployed))
    }

    /// Puts the build `host` should run of each of `pipeline`'s plugins
    /// into the host's deployments where it is not the current one already.
    /// Returns the plugins it changed.
    async fn install(
        &self,
        pipeline: &Pipeline,
        desired: &BTreeMap<String, Desired>,
        host: &str,
    ) -> Result<Vec<String>> {
        let store = Deployments::new(&pipeline.state_dir, &pipeline.name);
        let mut changed = Vec::new();
        for (plugin, want) in desired {
            if plugin == PIPELINE_FILE {
                continue;
            }
            if pipeline.plugin(plugin).is_none() {
                tracing::debug!(plugin = %plugin, "Fleet: a version is deployed for a plugin this pipeline does not have; ignored");
                continue;
            }
            let Some(digest) = want.digest_for(host) else {
                continue;
            };
            let current = store.current(plugin)?.map(|(d, _)| d.digest);
            if current.as_deref() == Some(digest) {
                continue;
            }
            let bytes = self.component(digest).await?;
            let version = self.version_of(digest).await?;
            let entry = Deployed {
                digest: digest.to_owned(),
                version: version.clone(),
                deployed_at_ms: now_ms(),
                size: u64::try_from(bytes.len()).unwrap_or(u64::MAX),
            };
            store.push(plugin, &bytes, entry)?;
            tracing::info!(plugin = %plugin, version = %version, digest = %short_digest(digest), "Fleet: took the version deployed to the fleet");
            changed.push(plugin.clone());
        }
        Ok(changed)
    }

    /// The version a deploy of `digest` declared.
    pub async fn version_of(&self, digest: &str) -> Result<String> {
        let rows = self
            .query(
                "SELECT version FROM {schema}.fleet_deploys WHERE pipeline = $1 AND digest = $2
                 ORDER BY seq DESC LIMIT 1",
                &[&self.pipeline, &digest],
            )
            .await?;
        Ok(rows
            .first()
            .map(|r| r.try_get::<_, String>(0))
            .transpose()?
            .unwrap_or_else(|| "unknown".into()))
    }

    /// Judges every canary of the pipeline from the hosts' reports: rolls
    /// it back when its failure rate is worse than the rest's by more than
    /// its margin (once it has `min_attempts`), promotes it when its watch
    /// is over. Any host may judge; the first to decide wins. Returns the
    /// decisions it made, as (plugin, state, verdict).
    pub async fn judge(
        &self,
        desired: &BTreeMap<String, Desired>,
    ) -> Result<Vec<(String, RolloutState, String)>> {
        let hosts = self.live_hosts().await?;
        let mut decided = Vec::new();
        for (plugin, d) in desired {
            if d.state != RolloutState::Canary {
                continue;
            }
            let Tally {
                new_ok,
                new_failed,
                old_ok,
                old_failed,
            } = tally(plugin, d, &hosts);
            let rate = |ok: u64, failed: u64| {
                if ok + failed == 0 {
                    0.0
                } else {
                    failed as f64 / (ok + failed) as f64
                }
            };
            let (new_rate, old_rate) = (rate(new_ok, new_failed), rate(old_ok, old_failed));
            let judged = new_ok + new_failed >= d.min_attempts.max(1);
            let (state, verdict) = if judged && new_rate > old_rate + d.margin {
                (
                    RolloutState::RolledBack,
                    format!(
                        "rolled back: {:.1} % of the canary's attempts failed ({new_failed} of {}), against {:.1} % on the other hosts over the same time ({old_failed} of {}), more than the margin of {:.1} points",
                        new_rate * 100.0,
                        new_ok + new_failed,
                        old_rate * 100.0,
                        old_ok + old_failed,
                        d.margin * 100.0
                    ),
                )
            } else if d.watch_until_ms.is_some_and(|until| now_ms() >= until) {
                if judged {
                    (
                        RolloutState::Promoted,
                        format!(
                            "promoted: {:.1} % of the canary's attempts failed ({new_failed} of {}), against {:.1} % on the other hosts over the same time",
                            new_rate * 100.0,
                            new_ok + new_failed,
                            old_rate * 100.0
                        ),
                    )
                } else {
                    // Not seen to work is not promoted: a canary host that
                    // refused the build, died or got no traffic proves
                    // nothing.
                    (
                        RolloutState::RolledBack,
                        format!(
                            "rolled back: the canary's live hosts made {} attempts on it in its watch, fewer than the {} needed to judge it",
                            new_ok + new_failed,
                            d.min_attempts.max(1)
                        ),
                    )
                }
            } else {
                continue;
            };
            let rows = self
                .query(
                    "UPDATE {schema}.fleet_deploys SET state = $3, verdict = $4, decided_at_ms = $5
                     WHERE pipeline = $1 AND seq = $2 AND state = 'canary' RETURNING seq",
                    &[
                        &self.pipeline,
                        &d.seq,
                        &state.as_str(),
                        &verdict,
                        &ms(now_ms()),
                    ],
                )
                .await?;
            if !rows.is_empty() {
                self.query("SELECT pg_notify($1, $2)", &[&CHANNEL, &self.pipeline])
                    .await?;
                decided.push((plugin.clone(), state, verdict));
            }
        }
        Ok(decided)
    }
}

/// The attempts a canary is judged on: those of its hosts on the new
/// version, and those of the other hosts on the previous one since the
/// canary began.
#[derive(Debug, PartialEq, Eq)]
struct Tally {
    new_ok: u64,
    new_failed: u64,
    old_ok: u64,
    old_failed: u64,
}

/// Counts canary `d` of `plugin` from the live hosts' reports. A host on
/// the previous version counts from its baseline (taken as the canary
/// began); one without a baseline, or that restarted since (its counts
/// start again with it), counts in full: all of that is in the window.
fn tally(plugin: &str, d: &Desired, hosts: &[HostReport]) -> Tally {
    let mut t = Tally {
        new_ok: 0,
        new_failed: 0,
        old_ok: 0,
        old_failed: 0,
    };
    for h in hosts {
        let Some(r) = h.running.get(plugin) else {
            continue;
        };
        if d.canary.contains(&h.host) {
            if r.digest == d.digest {
                t.new_ok += r.handled;
                t.new_failed += r.failed;
            }
            continue;
        }
        if Some(&r.digest) != d.previous.as_ref() {
            continue;
        }
        let (ok0, failed0) = match d.baseline.get(&h.host) {
            Some(&(ok, failed))
                if h.started_at_ms <= d.at_ms && r.handled >= ok && r.failed >= failed =>
            {
                (ok, failed)
            }
            _ => (0, 0),
        };
        t.old_ok += r.handled - ok0;
        t.old_failed += r.failed - failed0;
    }
    t
}

/// What a starting host runs ([`Fleet::prepare`]).
pub struct Prepared {
    /// The pipeline file deployed to the fleet, by digest, when the host
    /// starts on it instead of its own.
    pub pipeline: Option<(String, Pipeline)>,
    /// The plugins whose deployed build it took.
    pub installed: Vec<String>,
}

/// `deployed`'s plugins (their builds, routes, grants, limits and retries:
/// what a running host can change) with every other section of `own`,
/// the host's file: its transport, stores, listeners, telemetry and
/// `[host]` settings stay its own, as a restart alone could change them.
pub fn with_own_sections(own: &Pipeline, deployed: Pipeline) -> Pipeline {
    // Spelled out so that a new section must be placed on one side.
    let Pipeline {
        name: _,
        source: _,
        transport: _,
        cache_dir: _,
        dead_letters: _,
        state: _,
        journal: _,
        fleet: _,
        telemetry: _,
        admin: _,
        admin_token_env: _,
        ingress: _,
        watch: _,
        watch_interval: _,
        state_dir: _,
        max_message_size: _,
        crash_loop_limit: _,
        schemas: _,
        plugins,
    } = deployed;
    Pipeline {
        plugins,
        ..own.clone()
    }
}

/// `text` parsed as a pipeline file in the place of `own`'s (relative
/// paths are resolved from there); `shown` names it in errors.
pub fn parse_as(text: &str, own: &Pipeline, shown: &str) -> Result<Pipeline> {
    let (pipeline, diagnostics) = crate::config::parse(text, &own.source);
    match pipeline {
        Some(p) if !diagnostics.has_errors() => Ok(p),
        _ => Err(crate::config::ConfigError::Invalid {
            path: std::path::PathBuf::from(shown),
            text: text.to_owned(),
            diagnostics,
        }
        .into()),
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
    view: tokio::sync::watch::Sender<Option<FleetView>>,
) {
    let pipeline = control.pipeline().await.name;
    let host = host_id();
    let started = now_ms();
    // Builds a host refused: not tried again until another is desired.
    let mut refused: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut file = FileFollower::default();
    let mut baselines = Baselines::new();
    let (mut attempts_seen, mut settled_at) = (0.0, None);
    let mut fleet: Option<(
        Fleet,
        tokio::sync::mpsc::UnboundedReceiver<tokio_postgres::Notification>,
    )> = None;
    loop {
        if fleet.is_none() {
            let connected = tokio::time::timeout(ROUND_TIMEOUT, listen(&config, &pipeline))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no answer within {}s", ROUND_TIMEOUT.as_secs())));
            match connected {
                Ok(f) => fleet = Some(f),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "Fleet: cannot reach the database; the host keeps running what it runs and tries again")
                }
            }
        }
        if let Some((f, _)) = &fleet {
            let round = async {
                let desired = f
                    .desired()
                    .await
                    .context("cannot read the desired versions")?;
                let file_problem = file.converge(f, &control, &host, &desired).await;
                let problem = converge(f, &control, &host, &desired, &mut refused).await;
                let problem = match (file_problem, problem) {
                    (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                    (a, b) => a.or(b),
                };
                let running_file = file.running(&control).await;
                control.set_fleet_file_in_force(running_file.is_some());
                let (running, attempts) = running_of(&control, &mut baselines).await;
                // Attempts in all: when they grew, the host settled something.
                if attempts > attempts_seen {
                    attempts_seen = attempts;
                    settled_at = Some(now_ms());
                }
                f.report(
                    &host,
                    started,
                    &running,
                    problem.as_deref(),
                    false,
                    settled_at,
                    running_file.as_deref(),
                )
                .await
                .context("cannot report this host")?;
                for (plugin, state, verdict) in f
                    .judge(&desired)
                    .await
                    .context("cannot judge the canaries")?
                {
                    if state == RolloutState::RolledBack {
                        tracing::warn!(plugin = %plugin, "Fleet: canary {verdict}");
                    } else {
                        tracing::info!(plugin = %plugin, "Fleet: canary {verdict}");
                    }
                }
                // For the console, when the host has one.
                if !view.is_closed() {
                    let hosts = f.hosts().await?;
                    view.send_replace(Some(FleetView {
                        host: host.clone(),
                        desired,
                        hosts,
                        at_ms: now_ms(),
                    }));
                }
                anyhow::Ok(())
            };
            // A database that stops answering is left, not waited on.
            let failed = match tokio::time::timeout(ROUND_TIMEOUT, round).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some(format!(
                    "the database did not answer within {}s",
                    ROUND_TIMEOUT.as_secs()
                )),
            };
            if let Some(why) = failed {
                tracing::warn!(error = %why, "Fleet: reconnecting");
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

/// Per plugin: the digest counted from, and the successful and failed
/// attempts the host had made in all when it started running it.
type Baselines = BTreeMap<String, (String, f64, f64)>;

/// The metrics that count attempts, per plugin.
const COUNTED: [&str; 2] = ["switchyard.messages.handled", "switchyard.messages.failed"];

/// What the host runs, per plugin, with the attempts made since it began
/// running each version (a version not counted from yet starts its count
/// in `baselines` now), and the attempts the host has made in all: one
/// reading of the routes and the metrics.
async fn running_of(
    control: &Supervisor,
    baselines: &mut Baselines,
) -> (BTreeMap<String, Running>, f64) {
    let totals = control
        .services()
        .telemetry
        .metrics
        .totals(&COUNTED, "plugin");
    let total = |metric: &str, plugin: &str| {
        totals
            .get(&(metric.to_owned(), plugin.to_owned()))
            .copied()
            .unwrap_or(0.0)
    };
    let mut running = BTreeMap::new();
    for r in control.list().await {
        let (ok, failed) = (total(COUNTED[0], &r.plugin), total(COUNTED[1], &r.plugin));
        let base = baselines
            .entry(r.plugin.clone())
            .or_insert_with(|| (r.digest.clone(), ok, failed));
        if base.0 != r.digest {
            *base = (r.digest.clone(), ok, failed);
        }
        let since = Running {
            handled: (ok - base.1).max(0.0) as u64,
            failed: (failed - base.2).max(0.0) as u64,
            digest: r.digest,
            version: r.version,
        };
        running.insert(r.plugin, since);
    }
    (running, totals.values().sum())
}

/// Swaps every plugin whose desired build this host does not run; what
/// went wrong, if anything.
async fn converge(
    fleet: &Fleet,
    control: &Supervisor,
    host: &str,
    desired: &BTreeMap<String, Desired>,
    refused: &mut BTreeMap<String, (String, String)>,
) -> Option<String> {
    let routes: BTreeMap<String, crate::supervisor::RouteInfo> = control
        .list()
        .await
        .into_iter()
        .map(|r| (r.plugin.clone(), r))
        .collect();
    let mut problems = Vec::new();
    let mut swapped = false;
    for (plugin, want) in desired {
        let Some(now) = routes.get(plugin) else {
            continue;
        };
        let Some(digest) = want.digest_for(host) else {
            continue;
        };
        // Running it, or handed to the route already (a busy or
        // reconnecting route takes it after its batch).
        let pending = now.pending.as_ref().map(|p| p.digest.as_str());
        if now.digest == digest || pending == Some(digest) {
            refused.remove(plugin);
            continue;
        }
        if let Some((refused_digest, why)) = refused.get(plugin)
            && refused_digest == digest
        {
            problems.push(format!("{plugin} {}: refused: {why}", short_digest(digest)));
            continue;
        }
        let bytes = match fleet.component(digest).await {
            Ok(b) => b,
            Err(e) => {
                problems.push(format!("{plugin}: {e:#}"));
                continue;
            }
        };
        match control.deploy(plugin, bytes).await {
            Ok(_) => {
                tracing::info!(plugin = %plugin, digest = %short_digest(digest), "Fleet: handed the version deployed to the fleet to its route");
                swapped = true;
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(plugin = %plugin, digest = %short_digest(digest), error = %why, "Fleet: refused the version deployed to the fleet; keeps running the one it has");
                problems.push(format!("{plugin} {}: refused: {why}", short_digest(digest)));
                // A refusal stands until another build is desired or
                // another swap changes what it was checked against; a
                // failure (the disk, say) is tried again at the next poll.
                if matches!(e, crate::supervisor::ChangeError::Refused(_)) {
                    refused.insert(plugin.clone(), (digest.to_owned(), why));
                }
            }
        }
    }
    // What was refused against the pipeline as it was may pass now.
    if swapped {
        refused.clear();
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

/// What a follower's console sees of the fleet: the desired versions and
/// the hosts, as the follower last read them.
#[derive(Clone, Debug)]
pub struct FleetView {
    /// This host's name in the fleet.
    pub host: String,
    pub desired: BTreeMap<String, Desired>,
    pub hosts: Vec<HostReport>,
    /// When it was read (ms since the epoch).
    pub at_ms: u64,
}

/// A follower's hold on the pipeline file deployed to the fleet.
#[derive(Default)]
struct FileFollower {
    /// The newest file read: its digest, and the pipeline the host would
    /// run of it or why its text cannot be used (only what the text itself
    /// decides is kept; a failed read is tried again at the next poll).
    read: Option<(String, Result<Pipeline, String>)>,
    /// The file the host last ran, as it ran it.
    applied: Option<(String, Pipeline)>,
    /// The last refusal: of which file with which builds, why, and when.
    refused: Option<(String, String, std::time::Instant)>,
}

/// A file a host refused is tried again after this long, or as soon as it,
/// or a build it names, changes.
const RETRY_REFUSED: Duration = Duration::from_secs(60);

impl FileFollower {
    /// Brings the host to the pipeline file the fleet wants of it, if any:
    /// the builds it names go into the host's deployments, then the whole
    /// is applied as an edit of the host's own file would be; a file the
    /// host refuses leaves its deployments as they were. What went wrong,
    /// if anything.
    async fn converge(
        &mut self,
        fleet: &Fleet,
        control: &Arc<Supervisor>,
        host: &str,
        desired: &BTreeMap<String, Desired>,
    ) -> Option<String> {
        let want = desired.get(PIPELINE_FILE)?;
        let digest = want.digest_for(host)?.to_owned();
        let shown = short_digest(&digest).to_owned();
        let own = control.pipeline().await;
        if self.read.as_ref().is_none_or(|(d, _)| *d != digest) {
            let text = match fleet.pipeline_text(&digest).await {
                Ok(t) => t,
                Err(e) => return Some(format!("{PIPELINE_FILE} {shown}: {e:#}")),
            };
            let label = format!("the fleet's pipeline file (deploy #{})", want.seq);
            let parsed = parse_as(&text, &own, &label)
                .map(|p| with_own_sections(&own, p))
                .map_err(|e| format!("{e:#}"));
            if let Err(why) = &parsed {
                tracing::error!(digest = %shown, "Fleet: cannot use the pipeline file deployed to the fleet; keeps running the one it has:\n{why}");
            }
            self.read = Some((digest.clone(), parsed));
        }
        let new = match self.read.as_ref().map(|(_, p)| p) {
            Some(Ok(p)) => p.clone(),
            Some(Err(why)) => {
                return Some(format!("{PIPELINE_FILE} {shown}: cannot be used: {why}"));
            }
            None => return None,
        };
        if new == own {
            self.applied = Some((digest, new));
            self.refused = None;
            return None;
        }
        // A refusal stands for this file with these builds, for a while.
        let key = std::iter::once(digest.as_str())
            .chain(new.plugins.iter().filter_map(|p| {
                desired
                    .get(p.name.as_str())
                    .and_then(|d| d.digest_for(host))
            }))
            .collect::<Vec<_>>()
            .join(" ");
        if let Some((k, why, at)) = &self.refused
            && *k == key
            && at.elapsed() < RETRY_REFUSED
        {
            return Some(format!("{PIPELINE_FILE} {shown}: refused: {why}"));
        }
        let installed = match fleet.install(&new, desired, host).await {
            Ok(i) => i,
            Err(e) => return Some(format!("{PIPELINE_FILE} {shown}: {e:#}")),
        };
        // Its own task: a round that runs out of time must not cut a
        // change off half applied.
        let applying = {
            let (control, new) = (control.clone(), new.clone());
            tokio::spawn(async move { control.apply_pipeline(new).await })
        };
        let result = match applying.await {
            Ok(r) => r,
            Err(e) => Err(crate::supervisor::ChangeError::Failed(anyhow!(
                "applying stopped: {e}"
            ))),
        };
        match result {
            Ok(report) => {
                tracing::info!(digest = %shown, deploy = want.seq, added = ?report.added, removed = ?report.removed, swapped = ?report.swapped, "Fleet: runs the pipeline file deployed to the fleet");
                self.applied = Some((digest, new));
                self.refused = None;
                (!report.failed.is_empty()).then(|| {
                    format!(
                        "{PIPELINE_FILE} {shown}: routes that did not start: {}",
                        report.failed.join(", ")
                    )
                })
            }
            Err(e) => {
                let why = e.to_string();
                // Its builds leave the host's deployments again.
                let store = Deployments::new(&new.state_dir, &new.name);
                for plugin in &installed {
                    if let Err(e) = store.pop(plugin) {
                        tracing::warn!(plugin = %plugin, error = %format!("{e:#}"), "Fleet: cannot take back a build of the refused pipeline file");
                    }
                }
                if matches!(e, crate::supervisor::ChangeError::Refused(_)) {
                    self.refused = Some((key, why.clone(), std::time::Instant::now()));
                }
                Some(format!("{PIPELINE_FILE} {shown}: refused: {why}"))
            }
        }
    }

    /// The digest of the fleet's pipeline file the host runs: the newest
    /// it read, or else the one it last ran, if the host runs it still.
    async fn running(&self, control: &Supervisor) -> Option<String> {
        let now = control.pipeline().await;
        if let Some((digest, Ok(p))) = &self.read
            && *p == now
        {
            return Some(digest.clone());
        }
        let (digest, p) = self.applied.as_ref()?;
        (*p == now).then(|| digest.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(host: &str, digest: &str, handled: u64, failed: u64, started: u64) -> HostReport {
        HostReport {
            host: host.into(),
            started_at_ms: started,
            seen_at_ms: 0,
            running: BTreeMap::from([(
                "p".to_owned(),
                Running {
                    digest: digest.into(),
                    version: "1".into(),
                    handled,
                    failed,
                },
            )]),
            problem: None,
            stopped: false,
            settled_at_ms: None,
            pipeline: None,
        }
    }

    fn canary() -> Desired {
        Desired {
            digest: "new".into(),
            version: "2".into(),
            seq: 2,
            at_ms: 1_000,
            state: RolloutState::Canary,
            previous: Some("old".into()),
            canary: vec!["a".into()],
            watch_until_ms: Some(2_000),
            margin: 0.05,
            min_attempts: 10,
            verdict: None,
            baseline: BTreeMap::from([("b".to_owned(), (900, 300)), ("c".to_owned(), (50, 0))]),
        }
    }

    #[test]
    fn a_canary_is_compared_with_the_same_window_of_the_other_hosts() {
        let hosts = [
            report("a", "new", 90, 10, 0),
            // 100 attempts since the canary began, none failed: its many
            // failures before do not excuse the canary's.
            report("b", "old", 1_000, 300, 0),
            // Restarted after the canary began: all it counted is new.
            report("c", "old", 20, 2, 1_500),
            // On neither version: not counted.
            report("d", "other", 500, 500, 0),
        ];
        assert_eq!(
            tally("p", &canary(), &hosts),
            Tally {
                new_ok: 90,
                new_failed: 10,
                old_ok: 100 + 20,
                old_failed: 2,
            }
        );
    }

    #[test]
    fn a_host_without_a_baseline_counts_in_full() {
        let hosts = [report("a", "new", 5, 0, 0), report("e", "old", 40, 4, 0)];
        let t = tally("p", &canary(), &hosts);
        assert_eq!((t.old_ok, t.old_failed), (40, 4));
        assert_eq!((t.new_ok, t.new_failed), (5, 0));
    }
}
