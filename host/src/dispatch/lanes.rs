//! Lanes: a route with `concurrency` above 1 handles each batch on that
//! many warm instances side by side, and settles it as if one instance had
//! handled it in order.
//!
//! [`split`] deals the batch out: messages with the same key (a saga's
//! instance, otherwise the partition key) go to the same lane, in their
//! order, and the lanes get as many messages each as the keys allow. Each lane runs on its
//! own worker, which reads the state as committed plus what its own lane
//! wrote. [`merge`] puts the results back in the batch's order and checks
//! each message against the ones before it: a message that read a state
//! key, key range, saga instance or timeout that an earlier message of
//! another lane wrote saw something a handling in order would not have.
//! The batch is cut there: what comes before is settled, that message and
//! everything after it go back to be received again (a message that
//! another lane did not reach goes back too, so nothing overtakes it). The
//! first message of a batch is never cut, so every batch settles at least
//! one.

use std::collections::HashMap;

use super::worker::{BatchOutcome, Processed, Verdict};
use crate::plugin::Output;
use crate::saga::SagaSpec;
use crate::state::Reads;
use crate::transport::Delivery;

/// A batch dealt out to lanes.
pub(super) struct Split {
    /// Each lane's deliveries, in batch order.
    pub lanes: Vec<Vec<Delivery>>,
    /// The lane of each delivery of the batch, by position.
    lane_of: Vec<usize>,
    /// Each delivery's history length and attempt before it was handled,
    /// to undo what handling added when it goes back.
    before: Vec<(usize, u32)>,
}

/// The key that keeps messages in one lane: the saga instance a message
/// belongs to, or its partition key.
fn key_of(d: &Delivery, saga: Option<&SagaSpec>) -> Option<String> {
    if d.malformed.is_some() {
        return None;
    }
    let e = &d.envelope;
    if let Some(spec) = saga {
        if crate::saga::fired_timeout(e).is_some() {
            return e.correlation_id.clone();
        }
        if let Some((_, instance)) = crate::saga::sender(e) {
            return Some(instance.to_owned());
        }
        if let Ok(located) = spec.locate(e) {
            return Some(located.instance);
        }
    }
    e.partition_key.clone()
}

/// Deals `batch` out to `n` lanes (see the module's documentation).
///
/// Lanes exist only within a batch (the next batch starts when this one is
/// settled), so a key need not keep its lane from one batch to the next:
/// the messages are grouped by key, and the groups, largest first, go to
/// the lane with the fewest messages so far. A message without a key is a
/// group of its own.
pub(super) fn split(batch: Vec<Delivery>, n: usize, saga: Option<&SagaSpec>) -> Split {
    let n = n.max(1);
    // The group of each delivery, and each group's size, in order of
    // first appearance.
    let mut group_of = Vec::with_capacity(batch.len());
    let mut sizes: Vec<usize> = Vec::new();
    let mut groups: HashMap<String, usize> = HashMap::new();
    for d in &batch {
        let g = match key_of(d, saga) {
            Some(key) => *groups.entry(key).or_insert_with(|| {
                sizes.push(0);
                sizes.len() - 1
            }),
            None => {
                sizes.push(0);
                sizes.len() - 1
            }
        };
        if let Some(size) = sizes.get_mut(g) {
            *size += 1;
        }
        group_of.push(g);
    }
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    // Stable: groups of one size keep their order of appearance.
    order.sort_by_key(|&g| std::cmp::Reverse(sizes.get(g).copied().unwrap_or(0)));
    let mut load = vec![0usize; n];
    let mut lane_of_group = vec![0usize; sizes.len()];
    for g in order {
        let lane = load
            .iter()
            .enumerate()
            .min_by_key(|&(_, &count)| count)
            .map_or(0, |(l, _)| l);
        if let Some(count) = load.get_mut(lane) {
            *count += sizes.get(g).copied().unwrap_or(0);
        }
        if let Some(slot) = lane_of_group.get_mut(g) {
            *slot = lane;
        }
    }
    let mut lanes: Vec<Vec<Delivery>> = (0..n).map(|_| Vec::new()).collect();
    let mut lane_of = Vec::with_capacity(batch.len());
    let mut before = Vec::with_capacity(batch.len());
    for (d, g) in batch.into_iter().zip(group_of) {
        let lane = lane_of_group.get(g).copied().unwrap_or(0);
        lane_of.push(lane);
        before.push((d.envelope.history.len(), d.envelope.attempt));
        if let Some(l) = lanes.get_mut(lane) {
            l.push(d);
        }
    }
    Split {
        lanes,
        lane_of,
        before,
    }
}

/// The lanes' outcomes as one batch's, with how many processed messages
/// were given back because of what another lane wrote.
pub(super) struct Merged {
    pub outcome: BatchOutcome,
    pub rerun: usize,
}

/// What a message's read or write touches.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Item {
    Key(String),
    Instance(String),
    Timeout(String),
}

enum Slot {
    Processed(Box<Processed>, Reads),
    Back(Box<Delivery>),
}

/// Puts the lanes' outcomes (one per lane, in lane order) back in batch
/// order and cuts the batch at the first message that read what an earlier
/// message of another lane wrote, or that its lane did not reach.
pub(super) fn merge(split: Split, results: Vec<BatchOutcome>) -> Merged {
    let Split {
        lanes: _,
        lane_of,
        before,
    } = split;
    let total = lane_of.len();
    let mut positions: Vec<Vec<usize>> = vec![Vec::new(); results.len()];
    for (i, &lane) in lane_of.iter().enumerate() {
        if let Some(p) = positions.get_mut(lane) {
            p.push(i);
        }
    }
    let mut slots: Vec<Option<Slot>> = (0..total).map(|_| None).collect();
    let mut route_error = None;
    // Deliveries a lane returned beyond its share (never expected): given
    // back rather than lost.
    let mut stray = Vec::new();
    for (lane, out) in results.into_iter().enumerate() {
        let BatchOutcome {
            processed,
            unhandled,
            route_error: e,
            reads,
        } = out;
        route_error = route_error.or(e);
        let mut reads = reads.into_iter();
        let mut at = positions.get(lane).into_iter().flatten().copied();
        for p in processed {
            let r = reads.next().unwrap_or_default();
            match at.next().and_then(|i| slots.get_mut(i)) {
                Some(slot) => *slot = Some(Slot::Processed(Box::new(p), r)),
                None => stray.push(p.delivery),
            }
        }
        for d in unhandled {
            match at.next().and_then(|i| slots.get_mut(i)) {
                Some(slot) => *slot = Some(Slot::Back(Box::new(d))),
                None => stray.push(d),
            }
        }
    }

    // The lane that last wrote each item, over the messages kept so far.
    let mut writers: HashMap<Item, usize> = HashMap::new();
    let mut cut = total;
    let mut conflict = false;
    for (i, slot) in slots.iter().enumerate() {
        let lane = lane_of.get(i).copied().unwrap_or(0);
        let Some(Slot::Processed(p, reads)) = slot else {
            cut = i;
            break;
        };
        if read_elsewhere(reads, lane, &writers) {
            cut = i;
            conflict = true;
            break;
        }
        for item in written(&p.verdict) {
            writers.insert(item, lane);
        }
    }

    let mut outcome = BatchOutcome {
        route_error,
        ..BatchOutcome::default()
    };
    let mut rerun = 0;
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(Slot::Processed(p, _)) if i < cut => outcome.processed.push(*p),
            Some(Slot::Processed(p, _)) => {
                if conflict {
                    rerun += 1;
                }
                let mut d = p.delivery;
                if let Some(&(history, attempt)) = before.get(i) {
                    d.envelope.history.truncate(history);
                    d.envelope.attempt = attempt;
                }
                outcome.unhandled.push(d);
            }
            Some(Slot::Back(d)) => outcome.unhandled.push(*d),
            None => {}
        }
    }
    outcome.unhandled.append(&mut stray);
    Merged { outcome, rerun }
}

/// Whether `reads` touch an item whose last writer so far is a lane other
/// than `lane`.
fn read_elsewhere(reads: &Reads, lane: usize, writers: &HashMap<Item, usize>) -> bool {
    if writers.is_empty() || reads.is_empty() {
        return false;
    }
    let other = |item: Item| writers.get(&item).is_some_and(|&w| w != lane);
    reads.keys.iter().any(|k| other(Item::Key(k.clone())))
        || reads
            .instances
            .iter()
            .any(|i| other(Item::Instance(i.clone())))
        || reads
            .timeouts
            .iter()
            .any(|t| other(Item::Timeout(t.clone())))
        || reads.ranges.iter().any(|(prefix, after)| {
            writers.iter().any(|(item, &w)| {
                w != lane
                    && matches!(item, Item::Key(k)
                        if k.starts_with(prefix.as_str())
                            && after.as_deref().is_none_or(|a| k.as_str() > a))
            })
        })
}

/// What a handled message wrote: its state keys, and its saga step's
/// instance and the timeout it handled.
fn written(verdict: &Verdict) -> Vec<Item> {
    let Verdict::Handled(outputs) = verdict else {
        return Vec::new();
    };
    let mut items = Vec::new();
    for o in outputs {
        match o {
            Output::State(c) => items.extend(c.writes.keys().cloned().map(Item::Key)),
            Output::Saga(step) => {
                items.push(Item::Instance(step.instance.clone()));
                items.extend(step.fired.clone().map(Item::Timeout));
            }
            _ => {}
        }
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Envelope, Kind};
    use std::time::Duration;

    fn delivery(id: &str, key: Option<&str>) -> Delivery {
        let mut e = Envelope::new("T", Kind::Event, b"{}".to_vec(), "application/json");
        e.id = id.to_owned();
        e.partition_key = key.map(str::to_owned);
        Delivery {
            envelope: e,
            receipt: 0,
            malformed: None,
            origin: None,
        }
    }

    fn handled(d: Delivery, writes: &[&str]) -> Processed {
        let changes = crate::state::Changes {
            writes: writes
                .iter()
                .map(|k| ((*k).to_owned(), Some(b"1".to_vec())))
                .collect(),
        };
        Processed {
            delivery: d,
            verdict: Verdict::Handled(vec![Output::State(changes)]),
            took: Duration::ZERO,
            span: None,
            attributes: Vec::new(),
        }
    }

    fn reads(keys: &[&str]) -> Reads {
        Reads {
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            ..Reads::default()
        }
    }

    /// Handles each lane of `split` with `f` (writes, reads of a message
    /// by id).
    fn run(split: &mut Split, f: impl Fn(&str) -> (Vec<&'static str>, Reads)) -> Vec<BatchOutcome> {
        std::mem::take(&mut split.lanes)
            .into_iter()
            .map(|lane| {
                let mut out = BatchOutcome::default();
                for d in lane {
                    let (w, r) = f(&d.envelope.id);
                    out.reads.push(r);
                    out.processed.push(handled(d, &w));
                }
                out
            })
            .collect()
    }

    fn ids(ds: &[Delivery]) -> Vec<&str> {
        ds.iter().map(|d| d.envelope.id.as_str()).collect()
    }

    #[test]
    fn a_key_keeps_its_lane_and_its_order() {
        let batch = (0..20)
            .map(|i| delivery(&format!("m{i}"), Some(["a", "b", "c"][i % 3])))
            .collect();
        let split = split(batch, 4, None);
        for lane in &split.lanes {
            let keys: std::collections::BTreeSet<_> = lane
                .iter()
                .map(|d| d.envelope.partition_key.clone())
                .collect();
            // A key is in one lane only.
            for other in split.lanes.iter().filter(|l| !std::ptr::eq(*l, lane)) {
                assert!(
                    other
                        .iter()
                        .all(|d| !keys.contains(&d.envelope.partition_key))
                );
            }
            let positions: Vec<usize> = lane
                .iter()
                .map(|d| d.envelope.id[1..].parse().unwrap())
                .collect();
            assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
        }
    }

    #[test]
    fn keyless_messages_are_dealt_in_turn() {
        let batch = (0..6).map(|i| delivery(&format!("m{i}"), None)).collect();
        let split = split(batch, 3, None);
        let sizes: Vec<usize> = split.lanes.iter().map(Vec::len).collect();
        assert_eq!(sizes, [2, 2, 2]);
        assert_eq!(ids(&split.lanes[1]), ["m1", "m4"]);
    }

    #[test]
    fn keys_are_spread_so_the_lanes_get_even_shares() {
        // Groups of 5, 3 and 2 messages and two without a key: 6 and 6.
        let keys = ["a", "a", "b", "a", "c", "b", "a", "x", "c", "b", "a", "y"];
        let batch = keys
            .iter()
            .enumerate()
            .map(|(i, k)| delivery(&format!("m{i}"), (!matches!(*k, "x" | "y")).then_some(*k)))
            .collect();
        let split = split(batch, 2, None);
        let sizes: Vec<usize> = split.lanes.iter().map(Vec::len).collect();
        assert_eq!(sizes, [6, 6]);
        let a: Vec<&str> = split.lanes[0]
            .iter()
            .filter(|d| d.envelope.partition_key.as_deref() == Some("a"))
            .map(|d| d.envelope.id.as_str())
            .collect();
        assert_eq!(a, ["m0", "m1", "m3", "m6", "m10"]);
    }

    #[test]
    fn independent_lanes_settle_in_batch_order() {
        let batch = (0..6).map(|i| delivery(&format!("m{i}"), None)).collect();
        let mut s = split(batch, 2, None);
        let results = run(&mut s, |id| {
            (vec![], reads(&[format!("own:{id}").as_str()]))
        });
        let merged = merge(s, results);
        assert_eq!(merged.rerun, 0);
        let order: Vec<&str> = merged
            .outcome
            .processed
            .iter()
            .map(|p| p.delivery.envelope.id.as_str())
            .collect();
        assert_eq!(order, ["m0", "m1", "m2", "m3", "m4", "m5"]);
        assert!(merged.outcome.unhandled.is_empty());
    }

    #[test]
    fn a_read_of_another_lanes_write_cuts_the_batch_there() {
        // m0 (lane 0) and m1 (lane 1) both read and write `count`: m1 did
        // not see m0's write, so m1 and everything after it goes back.
        let batch = (0..4).map(|i| delivery(&format!("m{i}"), None)).collect();
        let mut s = split(batch, 2, None);
        let results = run(&mut s, |id| match id {
            "m0" | "m1" => (vec!["count"], reads(&["count"])),
            _ => (vec![], reads(&[])),
        });
        let merged = merge(s, results);
        assert_eq!(merged.rerun, 3);
        assert_eq!(merged.outcome.processed.len(), 1);
        assert_eq!(ids(&merged.outcome.unhandled), ["m1", "m2", "m3"]);
    }

    #[test]
    fn a_read_of_its_own_lanes_write_is_kept() {
        let batch = vec![
            delivery("m0", Some("k")),
            delivery("m1", Some("other")),
            delivery("m2", Some("k")),
        ];
        let mut s = split(batch, 2, None);
        let results = run(&mut s, |id| match id {
            "m0" | "m2" => (vec!["count:k"], reads(&["count:k"])),
            _ => (vec!["count:other"], reads(&["count:other"])),
        });
        let merged = merge(s, results);
        assert_eq!(merged.rerun, 0);
        assert_eq!(merged.outcome.processed.len(), 3);
    }

    #[test]
    fn a_listed_range_sees_writes_of_other_lanes() {
        let batch = vec![delivery("m0", None), delivery("m1", None)];
        let mut s = split(batch, 2, None);
        let results = run(&mut s, |id| match id {
            "m0" => (vec!["count:a"], Reads::default()),
            _ => (
                vec![],
                Reads {
                    ranges: vec![("count:".into(), None)],
                    ..Reads::default()
                },
            ),
        });
        assert_eq!(merge(s, results).rerun, 1);
    }

    #[test]
    fn a_message_a_lane_did_not_reach_holds_back_the_ones_after_it() {
        let batch = (0..4).map(|i| delivery(&format!("m{i}"), None)).collect();
        let mut s = split(batch, 2, None);
        let lanes = std::mem::take(&mut s.lanes);
        let results = lanes
            .into_iter()
            .enumerate()
            .map(|(lane, ds)| {
                let mut out = BatchOutcome::default();
                for d in ds {
                    // Lane 0 stops before its second message (m2).
                    if lane == 0 && d.envelope.id == "m2" {
                        out.unhandled.push(d);
                    } else if out.unhandled.is_empty() {
                        out.reads.push(Reads::default());
                        out.processed.push(handled(d, &[]));
                    } else {
                        out.unhandled.push(d);
                    }
                }
                out
            })
            .collect();
        let merged = merge(s, results);
        assert_eq!(merged.rerun, 0);
        assert_eq!(merged.outcome.processed.len(), 2);
        assert_eq!(ids(&merged.outcome.unhandled), ["m2", "m3"]);
    }

    #[test]
    fn a_message_given_back_loses_what_handling_added_to_it() {
        let batch = vec![delivery("m0", None), delivery("m1", None)];
        let mut s = split(batch, 2, None);
        let mut results = run(&mut s, |_| (vec!["x"], reads(&["x"])));
        // m1's failed attempt was recorded before the lane moved on.
        let p = &mut results[1].processed[0];
        p.delivery.envelope.attempt = 2;
        p.delivery.envelope.history.push(crate::envelope::Attempt {
            number: 1,
            started_at_ms: 0,
            duration_us: 0,
            error_kind: "transient".into(),
            error: "x".into(),
            plugin: "p@1".into(),
            then: "retry-now".into(),
            trace_id: None,
            span_id: None,
        });
        let merged = merge(s, results);
        let back = &merged.outcome.unhandled[0];
        assert_eq!(back.envelope.id, "m1");
        assert_eq!(back.envelope.attempt, 1);
        assert!(back.envelope.history.is_empty());
    }
}
