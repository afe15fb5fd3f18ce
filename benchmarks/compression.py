"""Compression of volref's outputs: size and encode/decode speed per codec, on one core.

    python -m benchmarks.compression [--store STORE] [--repeats 5] [--quick] [--json OUT]

Reads the level-0 chunks volref wrote to a refined store (``make demo``): ``volref-initial`` and
``volref-refined`` (uint8 classes), ``volref/uncertainty`` (uint8), ``volref-mitochondria``
(uint32 ids), and the phantom's image (uint16), and encodes each chunk with each candidate
Blosc setting — the codec zarr's ``BloscCodec`` runs. One Blosc thread, so MB/s are per core; medians of ``--repeats`` passes over
all chunks. ``ratio`` = raw bytes / stored bytes over the whole array. ``*`` marks what volref
writes (``volref.io.write.blosc_settings``); the table says what another setting would buy.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numcodecs
import numpy as np
import zarr
from numcodecs import Blosc

from benchmarks.common import machine, parser, store_arg, write_json
from volref.io.write import blosc_settings

#: label -> (array, how volref makes its pyramid: "nearest" labels, "mean" intensities)
ARRAYS = {
    "initial (uint8)": ("labels/volref-initial/s0", "nearest"),
    "refined (uint8)": ("labels/volref-refined/s0", "nearest"),
    "uncertainty (uint8)": ("volref/uncertainty/s0", "mean"),
    "mitochondria (uint32)": ("labels/volref-mitochondria/s0", "nearest"),
    "image (uint16)": ("s0", "mean"),
}
SHUFFLES = {"shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
#: (name, cname, clevel, shuffle for 1-byte types, shuffle for wider types)
CODECS = [
    ("zstd-5", "zstd", 5, Blosc.SHUFFLE, Blosc.BITSHUFFLE),
    ("zstd-1", "zstd", 1, Blosc.SHUFFLE, Blosc.BITSHUFFLE),
    ("zstd-1 bitshuffle", "zstd", 1, Blosc.BITSHUFFLE, Blosc.BITSHUFFLE),
    ("zstd-1 byte shuffle", "zstd", 1, Blosc.SHUFFLE, Blosc.SHUFFLE),
    ("zstd-3", "zstd", 3, Blosc.SHUFFLE, Blosc.BITSHUFFLE),
    ("zstd-9", "zstd", 9, Blosc.SHUFFLE, Blosc.BITSHUFFLE),
    ("zstd-5 bitshuffle", "zstd", 5, Blosc.BITSHUFFLE, Blosc.BITSHUFFLE),
    ("zstd-5 byte shuffle", "zstd", 5, Blosc.SHUFFLE, Blosc.SHUFFLE),
    ("lz4-5", "lz4", 5, Blosc.SHUFFLE, Blosc.BITSHUFFLE),
    ("lz4hc-5", "lz4hc", 5, Blosc.SHUFFLE, Blosc.BITSHUFFLE),
]


def chunks_of(arr: zarr.Array) -> list[np.ndarray]:
    out = []
    cz, cy, cx = arr.chunks[-3:]
    lead = (0,) * (arr.ndim - 3)
    nz, ny, nx = arr.shape[-3:]
    for z in range(0, nz, cz):
        for y in range(0, ny, cy):
            for x in range(0, nx, cx):
                out.append(np.ascontiguousarray(arr[lead + (slice(z, z + cz), slice(y, y + cy),
                                                            slice(x, x + cx))]))
    return out


def measure(codec: Blosc, chunks: list[np.ndarray], repeats: int) -> dict:
    raw = sum(c.nbytes for c in chunks)
    enc_t, dec_t, stored = [], [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        encoded = [codec.encode(c) for c in chunks]
        enc_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        decoded = [codec.decode(e) for e in encoded]
        dec_t.append(time.perf_counter() - t)
        stored = sum(len(e) for e in encoded)
    for c, d in zip(chunks, decoded):  # lossless, or the figure means nothing
        if np.frombuffer(d, dtype=c.dtype).tobytes() != c.tobytes():
            raise AssertionError(f"{codec} did not round-trip")
    return {"ratio": raw / stored, "stored_bytes": stored, "raw_bytes": raw,
            "encode_mb_s": raw / statistics.median(enc_t) / 1e6,
            "decode_mb_s": raw / statistics.median(dec_t) / 1e6,
            "encode_s": enc_t, "decode_s": dec_t}


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, quick="1 pass", repeats=5)
    ap.add_argument("--store", default=None, help="a segmented store (default: demo/phantom.ome.zarr; with --quick: a small phantom made here)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    numcodecs.blosc.set_nthreads(1)
    store_arg(args, tempfile.mkdtemp(prefix="volref-quick-"), default="demo/phantom.ome.zarr")
    root = zarr.open_group(args.store, mode="r")
    results: dict[str, dict] = {}
    print(f"{'array':<22} {'codec':<20} {'ratio':>7} {'enc MB/s':>9} {'dec MB/s':>9}")
    for label, (path, method) in ARRAYS.items():
        if path not in root:  # e.g. a store only segmented (the quick one)
            print(f"{label:<22} not in {args.store}: skipped")
            continue
        chunks = chunks_of(root[path])
        wide = chunks[0].dtype.itemsize > 1
        cname0, level0, shuffle0 = blosc_settings(chunks[0].dtype, method)
        results[label] = {}
        for name, cname, level, shuffle1, shuffle_wide in CODECS:
            shuffle = shuffle_wide if wide else shuffle1
            codec = Blosc(cname=cname, clevel=level, shuffle=shuffle)
            row = results[label][name] = measure(codec, chunks, args.repeats)
            row["volref"] = (cname, level, shuffle) == (cname0, level0, SHUFFLES[shuffle0])
            print(f"{label:<22} {name + (' *' if row['volref'] else ''):<20} {row['ratio']:>7.1f} "
                  f"{row['encode_mb_s']:>9.0f} {row['decode_mb_s']:>9.0f}", flush=True)
    payload = {"machine": machine(), "store": args.store, "repeats": args.repeats,
               "blosc_threads": 1, "results": results}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
