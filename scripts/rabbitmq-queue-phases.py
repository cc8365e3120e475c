#!/usr/bin/env python3
"""Reads what scripts/rabbitmq-queue-sampler.erl wrote during an
`amqp_vs_native` run and prints, for each consumer's turn (a stretch in
which the queue's messages go down from a fill to zero, in the bench's
order: the native consumer with batched acks, the one acking each,
Switchyard, FastStream), how often the queue process was running, runnable
or waiting, its reductions per message, and how often the queue counted
the consumer's unacknowledged deliveries at the prefetch.

    python3 scripts/rabbitmq-queue-phases.py [FILE] [PREFETCH]

FILE defaults to /tmp/switchyard-queue-samples.txt, PREFETCH to 200.
"""

import collections
import sys


def rows(path):
    out = []
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split(" | ")
            if len(parts) < 3 or parts[1] in ("", "-"):
                continue
            queue = parts[1].split(",")[0].split()
            if len(queue) < 3:
                continue
            rest, counts = parts[2], None
            if " m " in rest:
                rest, tail = rest.split(" m ", 1)
                ready, unacked = tail.split()[:2]
                counts = (int(ready), int(unacked))
            out.append((int(parts[0]), queue[0], int(queue[2]), counts))
    return out


def turns(samples):
    """(first, last, messages) of each stretch of falling counts."""
    found, start, last = [], None, None
    for i, (_, _, _, counts) in enumerate(samples):
        if counts is None:
            continue
        total = sum(counts)
        if last is not None and total < last and start is None:
            start = (i, last)
        if start is not None and (total == 0 or total > last):
            if i - start[0] > 5:
                found.append((start[0], i, start[1]))
            start = None
        last = total
    return found


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/switchyard-queue-samples.txt"
    prefetch = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    samples = rows(path)
    for first, last, messages in turns(samples):
        span = samples[first:last]
        seconds = (span[-1][0] - span[0][0]) / 1e6
        states = collections.Counter(s[1] for s in span)
        unacked = [s[3][1] for s in span if s[3]]
        at_prefetch = sum(1 for u in unacked if u >= prefetch)
        reductions = (span[-1][2] - span[0][2]) / messages
        share = ", ".join(
            f"{state} {100 * n / len(span):.0f} %" for state, n in states.most_common()
        )
        print(
            f"{messages} messages, {seconds:.2f} s, {len(span)} samples: queue process {share}; "
            f"{reductions:.0f} reductions per message; unacknowledged at the prefetch in "
            f"{at_prefetch} of {len(unacked)} looks"
        )


if __name__ == "__main__":
    main()
