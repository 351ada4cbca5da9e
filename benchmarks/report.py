"""Results out: a Markdown table, a JSON file with the raw numbers, PNG charts, and the
docs page that shows the latest quick-mode table."""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import Row

PACKAGES = (
    "mlstore",
    "fsspec",
    "s3fs",
    "boto3",
    "obstore",
    "multi-storage-client",
    "torch",
    "s3torchconnector",
    "moto",
    "xxhash",
)


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU, Python, OS and the versions of what was measured."""
    ram = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "cpu": cpu,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": platform.platform(),
        "packages": versions,
    }


def machine_line(m: dict[str, Any]) -> str:
    ram = f"{m['ram_bytes'] / 2**30:.0f} GiB RAM" if m.get("ram_bytes") else "RAM unknown"
    return (
        f"{m['cores']} cores ({m['cpu'] or 'CPU unknown'}), {ram}, "
        f"{m['implementation']} {m['python']}, {m['os']}"
    )


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _met(r: Row) -> str:
    if r.met is None:
        return ""
    return "yes" if r.met else "**NO**"


def _ok(r: Row) -> str:
    if r.verified is None:
        return ""
    return "ok" if r.verified else "**WRONG**"


def table(rows: Sequence[Row]) -> str:
    head = (
        "| scenario | peer | median | before | unit | ratio vs mlstore | ratio before "
        "| target | met? | bytes | notes |\n"
        "|---|---|---:|---:|---|---:|---:|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        peer = f"**{r.peer}**" if r.is_mlstore else r.peer
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        before = "" if r.previous_ratio is None else f"{r.previous_ratio:.2f}"
        lines.append(
            f"| {r.scenario} | {peer} | {_num(r.median)} | {_num(r.previous)} | {r.unit} | "
            f"{ratio} | {before} | {r.target} | {_met(r)} | {_ok(r)} | {r.note} |"
        )
    return head + "\n".join(lines) + "\n"


def with_previous(rows: Sequence[Row], saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """Give each row its median and ratio from ``saved`` (the JSON of the run before,
    if it was of the same mode): returns what names that run, for the page."""
    if not saved:
        return None
    before = {(r["scenario"], r["peer"]): r for r in saved.get("rows", [])}
    for r in rows:
        old = before.get((r.scenario, r.peer))
        if old is not None:
            r.previous, r.previous_ratio = old.get("median"), old.get("ratio")
    return {"date": saved.get("date"), "command": saved.get("command")}


LEGEND = (
    "*before* and *ratio before*: the same row in the run before this one (blank: the "
    "row is new). "
    "*ratio vs mlstore*: how many times better mlstore's row is than this row "
    "(> 1: mlstore wins; for ops/s and GB/s mlstore / peer, for seconds, bytes, GETs and "
    "RSS peer / mlstore). *median*: median of the repetitions. *bytes*: every byte each "
    "peer returned was checked against the xxh3 of what was written."
)


def missed(rows: Sequence[Row]) -> list[Row]:
    return [r for r in rows if r.met is False]


def markdown(rows: Sequence[Row], info: dict[str, Any]) -> str:
    out = [
        "# Benchmark results",
        "",
        f"Command: `{info['command']}` ({info['mode']} mode, {info['reps']} repetitions, "
        f"{info['duration_s']:.0f} s)",
        "",
        f"Machine: {machine_line(info['machine'])}",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in info["machine"]["packages"].items()),
        "",
        table(rows),
        LEGEND,
        "",
    ]
    miss = missed(rows)
    if miss:
        out += ["Missed targets:", ""]
        out += [f"- {r.scenario} / {r.peer}: {r.target} (median {_num(r.median)})" for r in miss]
        out.append("")
    return "\n".join(out)


def write_json(path: Path, rows: Sequence[Row], info: dict[str, Any]) -> None:
    path.write_text(json.dumps({**info, "rows": [r.as_dict() for r in rows]}, indent=2) + "\n")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def charts(rows: Sequence[Row], outdir: Path) -> list[Path]:
    """One horizontal bar chart per scenario (mlstore in orange), and a summary."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no charts (pip install matplotlib)")
        return []
    written = []
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        if r.median is not None:
            groups.setdefault((r.scenario, r.unit), []).append(r)
    for (scenario, unit), group in groups.items():
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(group) + 1.2))
        names = [r.peer for r in group]
        values = [r.median or 0 for r in group]
        colors = ["tab:orange" if r.is_mlstore else "tab:blue" for r in group]
        bars = ax.barh(names, values, color=colors)
        for bar, r in zip(bars, group, strict=True):
            ax.text(
                bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {_num(r.median)}",
                va="center", fontsize=8,
            )  # fmt: skip
        ax.invert_yaxis()
        better = "higher is better" if group[0].higher_is_better else "lower is better"
        ax.set_xlabel(f"{unit} ({better})")
        ax.set_title(scenario)
        ax.margins(x=0.15)
        fig.tight_layout()
        path = outdir / f"{_slug(scenario)}-{_slug(unit)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    # summary: for every target, achieved / required (>= 1: met), log scale
    targets = [r for r in rows if r.met is not None and r.margin]
    if targets:
        from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

        fig, ax = plt.subplots(figsize=(11, 0.35 * len(targets) + 1.5))
        labels = [f"{r.scenario} | {r.peer} | {r.target}"[:90] for r in targets]
        y = list(range(len(targets)))
        colors = ["tab:green" if r.met else "tab:red" for r in targets]
        ax.barh(y, [r.margin or 0 for r in targets], color=colors)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_xscale("log")
        ticks = [0.1, 0.25, 0.5, 1, 2, 4, 10]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.set_xticklabels([f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1.0, color="black", linewidth=1)
        ax.invert_yaxis()
        ax.set_xlabel("achieved / required (>= 1: target met)")
        ax.set_title("mlstore against its targets")
        fig.tight_layout()
        path = outdir / "summary-targets.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _before_line(info: dict[str, Any]) -> str:
    before = info.get("previous")
    if not before:
        return ""
    return (
        f"The *before* columns are the run of {before.get('date')} "
        f"(`{before.get('command')}`), the page's previous figures, beside the new ones."
    )


def docs_page(rows: Sequence[Row], info: dict[str, Any], charts_written: Sequence[Path]) -> str:
    m = info["machine"]
    chart_list = "\n".join(f"- `benchmarks/results/{p.name}`" for p in charts_written)
    miss = missed(rows)
    missed_text = (
        "\n".join(f"- {r.scenario} / {r.peer}: {r.target}" for r in miss) if miss else "- none"
    )
    return f"""# Benchmarks

mlstore exists to make training reads faster and cheaper than the alternatives, so every
claim is a ratio measured side by side, in one run, against the tools a user would pick
instead: s3fs read directly, fsspec's `simplecache::` and `blockcache::` over s3fs,
boto3 `get_object`, obstore, NVIDIA's Multi-Storage Client (MSC) with its node cache,
AWS's s3torchconnector (for the DataLoader), and a raw local file `read()` /
`readinto()` of the same bytes (the limit for a warm disk hit). The S3 server is a
`moto_server` in its own process; the "cloud profile" puts a proxy in front of it that
adds a fixed latency to every request ({int(info["latency"] * 1000)} ms), as real object
stores answer in 10-100 ms. Every byte every peer returns is checked against the xxh3 of
what was written, so no one wins by skipping work. Each figure is the median of several
repetitions, interleaved across peers; ratios are taken within the run.

## How to run

```bash
pip install torch==2.13.0                    # first, so nothing pulls another torch
pip install -e ".[bench]"                    # s3fs, boto3, moto, obstore, MSC, s3torchconnector
python benchmarks/run.py --quick             # about 15 minutes on 2 cores (B6: about 4)
python benchmarks/run.py                     # full sizes, about 20 minutes
python benchmarks/run.py --only B1,B4        # some scenarios
```

Results go to `benchmarks/results/`: `latest.md` (the table), `latest.json` (every
sample), and one PNG chart per scenario. A complete quick run also rewrites this page.
No BLAS is involved anywhere in these paths: `OPENBLAS_*` variables (thread counts and
the like) have no effect on the figures.

## Latest quick-mode results

Produced by `{info["command"]}` in {info["duration_s"]:.0f} s on {info["date"]}.
{_before_line(info)}

Machine: {machine_line(m)}.

Packages: {", ".join(f"{k} {v}" for k, v in m["packages"].items())}.

{table(rows)}
{LEGEND}

Targets missed in this run:

{missed_text}

Charts of this run:

{chart_list}

## Scenarios

- **B1** warm memory-tier hit, 256 KiB `read_bytes`, ops/s. Peers: simplecache warm
  `cat_file`, MSC warm `read()` (it has no memory tier: a hit reads its cache file),
  local `read()`.
- **B2** warm disk-tier hit in a fresh process (memory tier empty), each key read once,
  xxh3 verification on. Peers: simplecache warm, MSC warm (with its default HEAD per
  hit, and without it), local `read()`, all in fresh processes.
- **B3** warm disk-tier hit of 64 MiB objects via `open().readinto`, GB/s, fresh process.
  Peers: local `readinto()`, simplecache warm, MSC warm `open().readinto`.
- **B4** cold `read_many` of 256 KiB objects, a fresh cache each repetition; mlstore
  with its default transport (s3fs) and with the obstore transport (`mlstore[fast]`).
  Peers: s3fs `cat` batched and serial, boto3 serial and threaded, obstore serial and
  async, simplecache.
- **B5** B4 through the cloud profile, with the latency floor (requests x latency /
  concurrency) and the server path's own ceiling. Peers: as B4, serial ones on a subset.
- **B6** PyTorch DataLoader epochs, map-style, batch 32, 64 KiB samples, cloud profile,
  `RandomSampler` with a seeded generator, `fork` workers kept for epoch 2, each loader
  in a fresh process with a cold cache in a fresh directory; samples/s of epoch 1 and
  epoch 2 and each worker's peak RSS. mlstore: `mlstore.torch.MapDataset` over the
  prefix (a manifest, listed before the timer) with 4 workers, and with 2 workers with
  and without `PrefetchSampler`. Peers: a plain `Dataset` calling s3fs `cat_file` (one
  filesystem per worker), s3torchconnector's `S3MapDataset.from_prefix`, and a thin
  `Dataset` over an MSC `StorageClient` with its cache (MSC ships no torch dataset).
  Context rows: the fastest raw client's GETs/s of the same objects through the same
  proxy at 0 ms and at the profile's latency (the server's ceiling). Notes give the
  requests per epoch at the proxy, the loader's CPU per sample (its process and its
  workers) and how many cores the whole machine kept busy.
- **B7** 8 processes cold-read the same objects at once; GETs counted at the proxy.
  Peers: simplecache with a shared cache directory; MSC with a shared cache directory,
  through `read()` (no lock) and through `open().read()` (a HEAD, then one process
  downloads under a file lock while the others wait).
- **B8** 200 random 64 KiB reads in a 64 MiB object: cold, warm, and cold through the
  cloud profile. Peers: blockcache (s3fs's 50 MiB blocks, and 8 MiB blocks like
  mlstore's), s3fs, obstore `get_range`.
- **B9** 30% duplicate content: disk bytes and remote bytes over the unique bytes.
  Peer: simplecache.
- **B10** the memory tier's size against its budget; peak RSS while streaming a large
  object through `open()`. Peers: s3fs `open()`, boto3 `iter_chunks`, obstore `stream()`.
- **B11** 1, 2, 4 and 8 processes sharing one node cache, each a fresh process, all
  timed over the same window: aggregate 4 KiB disk hits (memory tier off, no request
  reaches the store) and cold fills of each process's own objects from moto (0 ms), and
  the 4 KiB hit of a fresh process with 1k and 100k entries in the index. Peers: the
  same processes `read()`-ing, or writing (temp file + `rename`), files of the same
  bytes in a plain directory; for fills, mlstore with its cache off (the server's
  ceiling). Notes give the scaling over 1 process and the cores the processes kept busy.
- **B12** disk hits after the ttl ran out, beside fresh disk hits: 2 fresh processes
  read the same 4 KiB objects once each (memory tier off). Past the ttl, within the
  stale window, a copy is served at once and checked in the background by one process
  of the node; the notes give the HEADs the node made per object. The reference row
  without a window (every read checked first) is the revalidation cliff of earlier
  releases; a row with the checks made through the obstore transport shows what the
  checks' CPU costs the hits on 2 cores.

## Reading the numbers

- The machines have 2 cores, and moto_server (plus the proxy, in the cloud profile) runs
  on them beside the client. For cold reads the client's CPU per object decides the
  rate, so the cold scenarios note it (`client CPU ... ms/object`, all threads of the
  benchmark process); it is steadier than the rates when the machine is busy.
- moto copies the whole object for every ranged GET (about 60 ms for a 64 KiB range of
  a 64 MiB object), so on this server a ranged read costs in proportion to the object's
  size: fewer, larger blocks win B8's cold rows by more than they would on a real store,
  and streaming a large object in ranges (B10) is slow for s3fs and mlstore alike.
- B5's latency floor assumes a server that scales with concurrency. The row
  `ceiling: ... via proxy, 0 ms` is the fastest raw client through the same proxy with
  no added latency: the server path's own limit on this machine.
- B7: `bytes` WRONG for simplecache means some of its readers got truncated files:
  simplecache writes into its cache file in place, and a neighbour process reads it
  before it is complete.
- MSC (`multi-storage-client`, its Python client; the optional Rust client is not in
  the PyPI wheel) is a `StorageClient` built with `StorageClientConfig.from_dict`: one
  profile, a storage provider of type `s3` (`base_path` the bucket, `endpoint_url` the
  same moto_server or proxy as every peer), static `S3Credentials`, `caching_enabled`,
  and a `cache` section with `location` a fresh directory per scenario (as
  simplecache's), `size` 8G (above any dataset here, so nothing is evicted) and the
  default FIFO eviction. `check_source_version` is off in its main rows (a hit sends no
  request, as with simplecache); B2's `default config` row keeps MSC's default, a HEAD
  before every hit to compare the cached ETag. MSC has no batch read of many objects'
  bytes, so its reads go one by one, as simplecache's do; it has no memory tier and
  does not check the cached bytes. It is not (yet) in B4-B5 or B8-B10; in B6 it is a
  thin map-style `Dataset` whose `__getitem__` is `client.read` (one client per worker).
- s3torchconnector (B6) is `S3MapDataset.from_prefix` with `endpoint=` the proxy over
  plain HTTP, `S3ClientConfig(force_path_style=True)`, the credentials from the
  environment and `transform` reading the whole object; its CRT client is built in
  each worker after the fork. It has no cache, so its epoch 2 makes every request again.
- B6's s3fs `Dataset` makes two requests per sample: s3fs's `cat_file` sends a HEAD
  (the object's size, to choose its chunked path) before the GET, as it does by default.
- B6's worker RSS is each worker's `VmHWM`; a forked worker starts with the pages it
  shares with its parent (torch and the client library), given in the notes.
- Peak RSS (B10) is `VmHWM` of the child process: `getrusage()` on Linux also counts
  the forked parent's pages from before `exec`.

moto is the ceiling on this kind of machine (a few hundred small GETs per second, and
concurrency does not help against it), which is why the cold scenarios are also run
through the cloud profile, where concurrency shows.
{analysis()}"""


def analysis() -> str:
    """The hand-written account of missed targets (benchmarks/analysis.md), if any: it
    outlives one run, so it is kept apart from the generated table."""
    path = Path(__file__).parent / "analysis.md"
    return "\n" + path.read_text() if path.exists() else ""
