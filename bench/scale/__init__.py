"""Throughput of streamed ECIF scoring (``ecif.influence.streaming``) at ViT-B/32 head size.

Synthetic cached features (image 768-d, text 512-d, float32 shards on disk), projection heads to a
512-d embedding (655 360 parameters), N = 10k, 100k and 1M pairs, in one process and with Ray
tasks on 2 workers.  See ``python -m bench.scale --help``.  Benchmark code only; ``ecif`` never
imports it.
"""
