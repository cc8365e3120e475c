//! What the broker benchmarks share: rounds timed in wall-clock and CPU
//! time, and their medians.

#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use switchyard::envelope::{Envelope, Kind};
use switchyard::transport::Transport;

/// Where `cargo xtask build-plugins` puts the plugin components.
pub fn dist() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("dist").join("plugins"))
        .unwrap_or_default()
        .display()
        .to_string()
}

/// Enqueues `n` small `Tick` events, in chunks.
pub async fn fill(transport: &dyn Transport, n: usize) {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(5_000);
        let batch: Vec<Envelope> = (0..chunk)
            .map(|i| {
                Envelope::new(
                    "Tick",
                    Kind::Event,
                    format!("{{\"n\":{i}}}").into_bytes(),
                    "application/json",
                )
            })
            .collect();
        transport.enqueue(batch).await.unwrap();
        left -= chunk;
    }
}

/// Whether the filter `cargo bench` was given (after its own `--bench`)
/// leaves out the benchmark `name`.
pub fn filtered_out(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .is_some_and(|filter| !name.contains(&filter))
}

/// A number from the environment, or `default`.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// User plus system CPU time of this process.
// getrusage is the one portable way to read it; the benchmarks only.
#[allow(unsafe_code)]
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// The whole machine's busy and total CPU time so far, in clock ticks,
/// from `/proc/stat` (zeros where there is none).
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// One timed run over `messages` messages.
pub struct Round {
    pub elapsed: Duration,
    pub cpu: Duration,
    /// The share of the whole machine's CPU (every core: the broker's, the
    /// consumer's, anything else's) busy during the round, 0 to 1.
    pub machine_busy: f64,
    /// From the first message handled to the last: the round without what
    /// a run costs once (connecting, declaring, noticing the end, stopping).
    pub steady: Option<Duration>,
}

impl Round {
    pub fn rate(&self, n: usize) -> f64 {
        n as f64 / self.elapsed.as_secs_f64()
    }
    pub fn cpu_per_message_us(&self, n: usize) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / n as f64
    }
    /// Messages per second between the first message handled and the last.
    pub fn steady_rate(&self, n: usize) -> Option<f64> {
        self.steady
            .filter(|d| !d.is_zero())
            .map(|d| n.saturating_sub(1) as f64 / d.as_secs_f64())
    }
}

/// Starts timing a round.
pub struct Timer {
    started: Instant,
    cpu: Duration,
    machine: (u64, u64),
}

impl Timer {
    pub fn start() -> Self {
        Timer {
            started: Instant::now(),
            cpu: cpu_time(),
            machine: machine_ticks(),
        }
    }
    pub fn stop(self) -> Round {
        let (busy, total) = machine_ticks();
        let total = total.saturating_sub(self.machine.1);
        Round {
            elapsed: self.started.elapsed(),
            cpu: cpu_time() - self.cpu,
            machine_busy: if total == 0 {
                0.0
            } else {
                busy.saturating_sub(self.machine.0) as f64 / total as f64
            },
            steady: None,
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The rounds of a native consumer and of Switchyard on the same work.
#[derive(Default)]
pub struct Comparison {
    native_rates: Vec<f64>,
    switchyard_rates: Vec<f64>,
    native_cpu: Vec<f64>,
    switchyard_cpu: Vec<f64>,
    /// Switchyard's steady rate over the native one's, per round where both
    /// have one.
    steady_ratios: Vec<f64>,
}

impl Comparison {
    /// Records and prints one round.
    pub fn round(&mut self, number: usize, messages: usize, native: &Round, switchyard: &Round) {
        println!(
            "round {number}: native {:>9.0} msg/s {:>6.1} µs CPU/msg, machine {:>3.0} % busy | switchyard {:>9.0} msg/s {:>6.1} µs CPU/msg, machine {:>3.0} % busy | ratio {:.2}",
            native.rate(messages),
            native.cpu_per_message_us(messages),
            100.0 * native.machine_busy,
            switchyard.rate(messages),
            switchyard.cpu_per_message_us(messages),
            100.0 * switchyard.machine_busy,
            switchyard.rate(messages) / native.rate(messages),
        );
        if let (Some(n), Some(s)) = (
            native.steady_rate(messages),
            switchyard.steady_rate(messages),
        ) {
            println!(
                "         first to last message handled: native {n:>9.0} msg/s | switchyard {s:>9.0} msg/s | ratio {:.2}",
                s / n
            );
            self.steady_ratios.push(s / n);
        }
        self.native_rates.push(native.rate(messages));
        self.switchyard_rates.push(switchyard.rate(messages));
        self.native_cpu.push(native.cpu_per_message_us(messages));
        self.switchyard_cpu
            .push(switchyard.cpu_per_message_us(messages));
    }

    /// No round recorded.
    pub fn is_empty(&self) -> bool {
        self.native_rates.is_empty()
    }

    /// Prints the medians and the ratio.
    pub fn summary(self) {
        let nr = median(self.native_rates);
        let sr = median(self.switchyard_rates);
        println!(
            "median: native {nr:.0} msg/s, {:.1} µs CPU/msg; switchyard {sr:.0} msg/s, {:.1} µs CPU/msg; switchyard/native = {:.0}%",
            median(self.native_cpu),
            median(self.switchyard_cpu),
            100.0 * sr / nr
        );
        if !self.steady_ratios.is_empty() {
            println!(
                "        first to last message handled: switchyard/native = {:.0}% (median of the rounds' ratios)",
                100.0 * median(self.steady_ratios)
            );
        }
    }
}

/// The journal record of hop `hop` (0 to 9) of flow `flow`: ten events,
/// each caused by the one before, the first one's id the flow's
/// correlation id.
pub fn journal_record(flow: usize, hop: usize) -> switchyard::journal::Record {
    use switchyard::journal::{Outcome, Record, Sent};
    let id = |h: usize| format!("0193{flow:08x}-{h:04x}-7000-8000-000000000000");
    Record {
        at_ms: 1_760_000_000_000 + (flow * 10 + hop) as u64,
        message_id: id(hop),
        message_type: format!("Step{hop}"),
        kind: "event".into(),
        plugin: format!("plugin{hop}"),
        plugin_version: "1.0.0".into(),
        plugin_digest: "sha256:0123456789abcdef".into(),
        attempt: 1,
        outcome: Outcome::Handled,
        took_us: 120,
        failures: Vec::new(),
        error: None,
        retry_at_ms: None,
        dead_letter: None,
        replay_of: None,
        sent: (hop < 9)
            .then(|| Sent {
                id: id(hop + 1),
                message_type: format!("Step{}", hop + 1),
                kind: "event".into(),
            })
            .into_iter()
            .collect(),
        replied: false,
        saga_instance: None,
        correlation_id: (hop > 0).then(|| id(0)),
        causation_id: (hop > 0).then(|| id(hop - 1)),
        trace_id: None,
        host: "bench".into(),
        payload: None,
        attributes: Vec::new(),
    }
}
