"""The data stage: manifest -> audio -> EnCodec tokens -> memory-mapped shards -> batches.

Modules, in the order of the data path::

    manifest.py    read a JSONL/CSV manifest (id, path, caption, split, metadata)
    audio.py       decode, downmix, resample, cut and check one audio file, block by
                   block (no torch)
    workers.py     decoding worker processes: fresh interpreters, results in order,
                   timeouts
    codec.py       the EnCodec compression model (load_codec, Codec)
    layout.py      the on-disk shard format: header, index, checksums, atomic writes
    precompute.py  corpus -> token shards (workers, batching, resume, failures report)
    shards.py      TokenShards: the memory-mapped reader
    batches.py     Batch and iter_batches: fixed windows [B, K, T] plus a validity mask

Nothing here knows models, ops, methods or the engine. Importing this package is
light; torch and audiocraft load only in the modules that need them.
"""
