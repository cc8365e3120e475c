"""FastStream, the amqp_vs_native benchmark's Python peer.

Consumes N messages from an existing RabbitMQ queue with FastStream's
defaults (each message acknowledged after its handler returns), with the
benchmark's prefetch, and prints how many seconds it took from the start
of consuming to the Nth message handled, and the CPU seconds this process
spent.

    python faststream_consumer.py AMQP_URL QUEUE N PREFETCH
"""

import asyncio
import sys
import time

from faststream.rabbit import Channel, RabbitBroker, RabbitQueue


async def consume(url: str, queue: str, n: int, prefetch: int) -> None:
    # No per-message access log: what a user tuning for throughput turns off.
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=prefetch), logger=None)
    done = asyncio.Event()
    handled = 0

    # The queue exists (the benchmark declared and filled it): no declare.
    @broker.subscriber(RabbitQueue(queue, declare=False))
    async def handle(body) -> None:
        nonlocal handled
        handled += 1
        if handled >= n:
            done.set()

    cpu = time.process_time()
    start = time.perf_counter()
    await broker.start()
    await done.wait()
    took = time.perf_counter() - start
    cpu = time.process_time() - cpu
    await broker.stop()
    print(f"{took:.6f} {cpu:.6f}")


if __name__ == "__main__":
    url, queue, count, prefetch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    asyncio.run(consume(url, queue, count, prefetch))
