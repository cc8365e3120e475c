#!/usr/bin/env python3
"""Where a RabbitMQ consumer's deliveries pause, from a packet capture.

Capture the broker's traffic while a consumer drains a queue, then read it:

    tshark -i lo -f "tcp port 5672" -w amqp.pcap &
    AMQP_BENCH_ROUNDS=1 AMQP_BENCH_MESSAGES=20000 cargo bench -p switchyard --bench amqp_vs_native
    kill %1
    scripts/amqp-pauses.py amqp.pcap [--prefetch 200]

For every connection that received at least 100 deliveries it prints the
acknowledgements it sent (how many deliveries each covered), how long the
consumer held how many unacknowledged deliveries, and the pauses in
deliveries longer than a millisecond: whether the consumer's window was
full then (the consumer holds the broker back) or the broker had credit
(the broker sets the pace), and how many pauses ended after an
acknowledgement reached the broker. Needs `tshark`.
"""

import argparse
import statistics
import subprocess
import sys
from collections import defaultdict

AMQP_PORT = "5672"
BASIC = "60"
DELIVER = "60"
ACK = "80"


def frames(pcap):
    """(time, client port, method, delivery tag, multiple) of each basic.deliver and basic.ack."""
    fields = [
        "frame.time_relative",
        "tcp.srcport",
        "tcp.dstport",
        "amqp.method.class",
        "amqp.method.method",
        "amqp.method.arguments.delivery_tag",
        "amqp.method.arguments.multiple",
    ]
    cmd = ["tshark", "-r", pcap, "-Y", "amqp", "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    cmd += ["-E", "occurrence=a", "-E", "aggregator=,"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        f = line.split("\t")
        if len(f) < 5:
            continue
        time, src, dst = float(f[0]), f[1], f[2]
        tags = f[5].split(",") if len(f) > 5 and f[5] else []
        multiples = f[6].split(",") if len(f) > 6 and f[6] else []
        tag_i = mult_i = 0
        for cls, method in zip(f[3].split(","), f[4].split(",")):
            if cls != BASIC or method not in (DELIVER, ACK):
                continue
            tag = int(tags[tag_i]) if tag_i < len(tags) else 0
            tag_i += 1
            if method == DELIVER and src == AMQP_PORT:
                yield time, dst, "deliver", tag, False
            elif method == ACK:
                multiple = multiples[mult_i] if mult_i < len(multiples) else ""
                mult_i += 1
                # A broker's ack is a publisher confirm, not a consumer's.
                if src != AMQP_PORT:
                    yield time, src, "ack", tag, multiple in ("1", "True", "true")


def report(port, events, prefetch):
    deliveries = [e for e in events if e[1] == "deliver"]
    acks = [e for e in events if e[1] == "ack"]
    span = deliveries[-1][0] - deliveries[0][0]
    print(f"connection {port}: {len(deliveries)} deliveries, {len(acks)} acks, "
          f"{span:.3f} s from the first delivery to the last")
    covered, acked = [], 0
    for _, _, tag, multiple in acks:
        covered.append(tag - acked if multiple else 1)
        acked = max(acked, tag)
    if covered:
        covered.sort()
        print(f"  deliveries an ack covers: median {covered[len(covered) // 2]}, "
              f"mean {statistics.mean(covered):.1f}, max {covered[-1]}")
    delivered = acked = 0
    held = defaultdict(float)
    last_time = events[0][0]
    last_delivery = None
    last_ack = None
    pauses = []
    for time, kind, tag, _ in events:
        unacked = delivered - acked
        band = ("full" if unacked >= prefetch else
                "over 3/4" if unacked * 4 >= prefetch * 3 else
                "1/4 to 3/4" if unacked * 4 >= prefetch else "under 1/4")
        held[band] += time - last_time
        last_time = time
        if kind == "deliver":
            if last_delivery is not None and time - last_delivery > 0.001:
                after_ack = (time - last_ack
                             if last_ack is not None and last_ack > last_delivery else None)
                pauses.append((time - last_delivery, unacked, after_ack))
            last_delivery = time
            delivered = max(delivered, tag)
        else:
            last_ack = time
            acked = max(acked, tag)
    total = sum(held.values()) or 1.0
    for band in ("under 1/4", "1/4 to 3/4", "over 3/4", "full"):
        print(f"  unacknowledged {band} of the prefetch: {held[band]:.3f} s "
              f"({100 * held[band] / total:.0f} %)")
    paused = sum(p[0] for p in pauses)
    full = sum(p[0] for p in pauses if p[1] >= prefetch)
    print(f"  pauses over 1 ms: {len(pauses)}, {paused:.3f} s; window full {full:.3f} s, "
          f"broker had credit {paused - full:.3f} s")
    ended = [p for p in pauses if p[2] is not None]
    if ended:
        print(f"  pauses with an ack inside: {len(ended)}, {sum(p[0] for p in ended):.3f} s; "
              f"deliveries resumed a median {1e3 * statistics.median(p[2] for p in ended):.2f} ms "
              f"after the ack")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pcap")
    parser.add_argument("--prefetch", type=int, default=200)
    args = parser.parse_args()
    by_connection = defaultdict(list)
    for time, port, kind, tag, multiple in frames(args.pcap):
        by_connection[port].append((time, kind, tag, multiple))
    shown = 0
    for port, events in sorted(by_connection.items()):
        events.sort(key=lambda e: (e[0], e[1] == "deliver"))
        if sum(1 for e in events if e[1] == "deliver") >= 100:
            report(port, events, args.prefetch)
            shown += 1
    if not shown:
        sys.exit(f"{args.pcap}: no connection received 100 deliveries")


if __name__ == "__main__":
    main()
