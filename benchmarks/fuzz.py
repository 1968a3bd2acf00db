"""Fuzzing every command that reads a cache with mutated copies of a good one (issue #13).

Mutations, random and targeted: manifest values (with manifest_sha256 recomputed, as an attacker
would, or left stale), attributes (types, values, missing keys), array metadata (shapes, chunk
shapes, dtypes, encodings, codecs, zarr format), chunk bytes (bit flips, truncation, deletion),
symlinks and special files. Each mutated copy goes through `verify`, `info`, `copy` and `merge`
(every mutation) and `show` and a 2-step `from-cache` (every `expensive_every`-th), in a worker
process under a memory cap (RLIMIT_AS) and a time cap per mutation. Each outcome is:
- refused: non-zero exit, the last line an `Error: ...` (or verify's FAILED report), no traceback;
- identical: exit 0 and the good cache's result (the same decoded samples, the same info numbers,
  the same picture, the same losses);
- other: anything else (a traceback, a hang, an allocation beyond the cap, exit 0 with a different
  result). The goal is 0.

    python benchmarks/fuzz.py [--mutations 2000] [--seed 1]

runs tests/test_fuzz.py (which builds the tiny teacher, student and cache) with that many
mutations and prints the counts that docs/benchmarks.md ("Fuzzing") reports.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

COMMANDS = ("verify", "info", "copy", "merge", "show", "from-cache")
ARRAYS = ("attention", "attention_scale", "visual", "visual_scale", "logit_ids", "logit_values", "logit_tail")


# ---------------------------------------------------------------------------------------------
# Mutations: (name, edit(path)) from a seeded generator, so a worker rebuilds them from (seed, i)


def _json_edit(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _manifest_edit(root: Path, edit, rehash: bool) -> None:
    import pyarrow.parquet as pq

    from alignkd_cache.store.manifest import sha256, to_table

    rows = pq.read_table(root / "manifest.parquet").to_pylist()
    edit(rows)
    pq.write_table(to_table(rows), root / "manifest.parquet")
    if rehash:
        digest = sha256((root / "manifest.parquet").read_bytes())
        _json_edit(root / "zarr.json", lambda d: d["attributes"].update(manifest_sha256=digest))


def _odd_value(rng: random.Random, like):
    """A value of the same or another type, ordinary or extreme."""
    pool = [
        -1,
        0,
        1,
        2,
        7,
        300,
        2**15,
        2**31 - 1,
        -(2**31),
        10**8,
        "",
        "x",
        "written",
        "skipped",
        None,
        True,
        1.5,
    ]
    if isinstance(like, list):
        pool += [[], like[:1], like + like, [-200] * 3, [10**6] * 2, [0] * 5000]
    if isinstance(like, int) and not isinstance(like, bool):
        pool += [like + 1, like - 1, -like, like * 1000]
    if isinstance(like, dict):
        pool += [{}, {"a": 1}]
    return rng.choice(pool)


def _leaves(doc, prefix=()):
    """Every (path, value) in a JSON document, dicts and lists included."""
    yield prefix, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _leaves(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _leaves(value, (*prefix, i))


def _set_path(doc, path, value, delete=False):
    for key in path[:-1]:
        doc = doc[key]
    if delete and isinstance(doc, dict):
        doc.pop(path[-1], None)
    else:
        doc[path[-1]] = value


def _random_json(rng: random.Random, file: str, only=None):
    def edit(root: Path):
        doc = json.loads((root / file).read_text())
        leaves = [(p, v) for p, v in _leaves(doc) if p and (only is None or p[0] == only)]
        path, value = rng.choice(leaves)
        _set_path(doc, path, _odd_value(rng, value), delete=rng.random() < 0.2)
        (root / file).write_text(json.dumps(doc))

    return edit


def _random_array_json(rng: random.Random, block: str):
    """A random edit of one of the block's arrays' metadata (those the cache's kind has)."""

    def edit(root: Path):
        arrays = sorted(p.name for p in (root / "blocks" / block).iterdir() if (p / "zarr.json").is_file())
        _random_json(rng, f"blocks/{block}/{rng.choice(arrays)}/zarr.json")(root)

    return edit


def _random_manifest(rng: random.Random, rehash: bool):
    """A random manifest edit. Edits that leave a valid cache holding other data (another
    in-vocabulary token, a renamed id, another image file or skip reason) are not generated: no check
    can tell them from a cache built that way; everything else must be refused or change nothing."""
    column = rng.choice(
        ["id", "index", "status", "skip_reason", "images", "image_keys", "input_ids", "num_visual",
         "supervised_positions", "logit_positions", "block", "attention_offset", "attention_rows", "logit_offset",
         "logit_rows", "visual_blocks", "visual_offsets", "image_layouts"]
    )  # fmt: skip

    def edit(rows):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from alignkd_cache.store.manifest import to_table

        row = rng.choice(rows)
        kept = row[column]
        value = _odd_value(rng, kept)
        if column == "id":
            value = rng.choice(["", rows[0]["id"], rows[-1]["id"]])
        elif column == "skip_reason":
            value = None
        elif column == "images":
            value = rng.choice([None, [], ["/etc/passwd"], ["../../secret.png"], ["images/../../x.png"]])
        elif column == "input_ids" and kept:
            value = list(kept)
            value[rng.randrange(len(value))] = rng.choice([-1, -7, 10**6, 2**31 - 1])
        elif column in ("supervised_positions", "logit_positions") and kept:
            value = list(kept)
            value[rng.randrange(len(value))] = rng.choice([-1, 0, 1, 10**6, value[0]])
        elif column == "image_layouts" and kept:
            value = _odd_layouts(rng, kept)
        row[column] = value
        try:  # as Parquet: a null in a non-nullable column fails only when written
            pq.write_table(to_table([row]), pa.BufferOutputStream())
        except Exception:  # noqa: BLE001 - the manifest schema cannot hold it: no mutation
            row[column] = kept

    return (
        f"manifest {column}{'' if rehash else ' (stale hash)'}",
        lambda root: _manifest_edit(root, edit, rehash),
    )


def _odd_layouts(rng: random.Random, kept: list) -> list:
    """The row's image layouts with one segment (or one image's whole layout) made invalid: an
    unknown role, a dimension below 1 or off by one (no longer covering the image's tokens), null."""
    value = [[dict(s) for s in layout] for layout in kept]
    k = rng.randrange(len(value))
    if rng.random() < 0.2:
        value[k] = rng.choice([None, [], [None], value[k] + value[k]])
        return value
    segment = value[k][rng.randrange(len(value[k]))]
    name = rng.choice(["role", "rows", "cols"])
    if name == "role":
        segment["role"] = rng.choice([None, "", "x", "written", "tile_-1_0", "grid ", "GRID"])
    else:
        segment[name] = rng.choice([None, 0, -1, -segment[name], segment[name] + 1, 2**31 - 1])
    return value


def _chunk_files(root: Path) -> list[Path]:
    """Every data file: the arrays' chunk files, and a layer0 cache's stub files."""
    return sorted(p for p in [*root.glob("blocks/*/*/c/**/*"), *root.glob("layer0/**/*")] if p.is_file())


def _chunk_edit(rng: random.Random, how: str):
    def edit(root: Path):
        chunk = rng.choice(_chunk_files(root))
        data = bytearray(chunk.read_bytes())
        if how == "flip" and data:
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            data = data[: rng.randrange(len(data) + 1)]
        elif how == "append":
            data += bytes(rng.randrange(256) for _ in range(16))
        elif how == "delete":
            chunk.unlink()
            return
        chunk.write_bytes(bytes(data))

    return f"chunk {how}", edit


def _special(rng: random.Random, secret: Path):
    def target(root: Path) -> Path:
        return rng.choice(
            [root / "zarr.json", root / "manifest.parquet", root / "blocks" / "b000000", *_chunk_files(root)]
        )

    def symlink(root: Path):
        link = target(root)
        if link.is_dir():
            shutil.rmtree(link)
        else:
            link.unlink()
        link.symlink_to(secret if rng.random() < 0.7 else secret.parent)

    def fifo(root: Path):
        os.mkfifo(rng.choice(_chunk_files(root)).parent / "fifo")

    def extra(root: Path):
        name = rng.choice([".zarray", ".zgroup", ".zattrs", "notes.txt", "zarr.json.bak"])
        (rng.choice([root, root / "blocks" / "b000000"]) / name).write_text('{"zarr_format": 2}')

    def empty_dir(root: Path):  # harmless: the result must be identical
        (root / "blocks" / "b000000" / "scratch").mkdir()

    return rng.choice(
        [("symlink", symlink), ("fifo", fifo), ("extra file", extra), ("empty directory", empty_dir)]
    )


def _targeted(secret: Path) -> list[tuple[str, object]]:
    """The cases issue #13 names, each once."""

    def image_row(rows):
        return next(r for r in rows if r["status"] == "written" and r["images"])

    def row_set(field, value):
        return lambda root: _manifest_edit(root, lambda rows: image_row(rows).update({field: value}), True)

    def layout_set(field, change):
        def edit(rows):
            segment = image_row(rows)["image_layouts"][0][0]
            segment[field] = change(segment[field])

        return lambda root: _manifest_edit(root, edit, True)

    def token(where, value):
        def edit(rows):
            r = image_row(rows)
            image_at = r["input_ids"].index(-200) if -200 in r["input_ids"] else 0
            r["input_ids"][len(r["input_ids"]) - 1 if where == "text" else image_at] = value

        return lambda root: _manifest_edit(root, edit, True)

    def attrs(edit):
        return lambda root: _json_edit(root / "zarr.json", lambda d: edit(d["attributes"]))

    def array(name, edit):
        def apply(root):  # a layer0 cache has no attention or visual array: its ids take the edit
            folder = root / "blocks/b000000" / name
            _json_edit((folder if folder.is_dir() else folder.parent / "logit_ids") / "zarr.json", edit)

        return apply

    def link(rel):
        def edit(root):
            (root / rel).unlink()
            (root / rel).symlink_to(secret)

        return edit

    def link_block(root):
        shutil.move(root / "blocks/b000001", root.parent / (root.name + "-outside"))
        (root / "blocks/b000001").symlink_to(root.parent / (root.name + "-outside"))

    return [
        ("negative attention_offset", row_set("attention_offset", -2)),
        ("logit_offset past the array", row_set("logit_offset", 10**6)),
        ("input id = vocab", token("text", 10**6)),
        ("negative input id", token("text", -1)),
        ("image-token id in the text", token("text", -200)),
        ("block pointing nowhere", row_set("block", 999)),
        ("visual_blocks pointing nowhere", row_set("visual_blocks", [999])),
        ("status outside the two", row_set("status", "done")),
        ("10^6 input ids", row_set("input_ids", [1] * 10**6)),
        ("duplicate id", lambda root: _manifest_edit(root, lambda rows: rows[1].update(id=rows[0]["id"]), True)),
        ("layout not covering the image's tokens", layout_set("rows", lambda v: v + 1)),
        ("layout of 0 rows", layout_set("rows", lambda v: 0)),
        ("layout of negative columns", layout_set("cols", lambda v: -v)),
        ("layout role unknown", layout_set("role", lambda v: "pixels")),
        ("encoding f32 on uint8 attention", array("attention", lambda d: d["attributes"].update(encoding="f32"))),
        ("logit_targets sampled on top-k", attrs(lambda a: a.update(logit_targets="sampled"))),
        ("complete 'no'", attrs(lambda a: a.update(complete="no"))),
        ("visual shape [2, 10^8, 96]", array("visual", lambda d: d.update(shape=[2, 10**8, 96]))),
        ("attention shape [10^8, N_v]", array("attention", lambda d: d["shape"].__setitem__(0, 10**8))),
        ("chunk shape 10^8 rows", array("attention", lambda d: d["chunk_grid"]["configuration"].update(chunk_shape=[10**8, 1]))),
        ("zarr v2 root", lambda root: _json_edit(root / "zarr.json", lambda d: d.update(zarr_format=2))),
        ("v2 .zarray with pickle", lambda root: (root / "blocks/b000000/.zarray").write_text('{"zarr_format": 2, "dtype": "|O", "filters": [{"id": "pickle"}]}')),
        ("stale manifest hash", lambda root: _manifest_edit(root, lambda rows: image_row(rows).update(logit_offset=0), False)),
        ("chunk symlinked to a secret", lambda root: link(_chunk_files(root)[0].relative_to(root))(root)),
        ("manifest symlinked to a secret", link("manifest.parquet")),
        ("block directory symlinked outside", link_block),
    ]  # fmt: skip


def mutation(i: int, seed: int, secret: Path) -> tuple[str, object]:
    """The i-th mutation: the targeted ones first, then seeded random ones."""
    targeted = _targeted(secret)
    if i < len(targeted):
        return targeted[i]
    rng = random.Random(f"{seed}-{i}")
    kind = rng.choice(["manifest", "manifest", "attrs", "array", "chunk", "special"])
    if kind == "manifest":
        return _random_manifest(rng, rehash=rng.random() < 0.8)
    if kind == "attrs":
        return "attributes", _random_json(rng, "zarr.json", only="attributes")
    if kind == "array":
        return "array metadata", _random_array_json(rng, rng.choice(["b000000", "b000001"]))
    if kind == "chunk":
        return _chunk_edit(rng, rng.choice(["flip", "flip", "truncate", "append", "delete"]))
    return _special(rng, secret)


# ---------------------------------------------------------------------------------------------
# Running the commands and classifying outcomes (in the worker)


def content(url) -> str:
    """A digest of everything a training run reads from a cache."""
    from alignkd_cache.sources import tokenized_from_row
    from alignkd_cache.store.reader import CacheReader

    reader = CacheReader(str(url))
    digest = hashlib.sha256(json.dumps(reader.ids).encode())
    for sid in reader.ids:
        s, sample = reader.read(sid), tokenized_from_row(reader.row(sid), reader.attrs["image_token_id"])
        digest.update(json.dumps([sample.input_ids, sample.labels, s.image_keys]).encode())
        for t in (s.attention, *s.visual, s.logits.positions, s.logits.ids, s.logits.values, s.logits.tail):
            digest.update(b"-" if t is None else t.numpy().tobytes())
    digest.update(json.dumps(reader.skipped, sort_keys=True).encode())
    return digest.hexdigest()


def info_numbers(output: str) -> dict:
    """What info derives from the manifest and attributes (stored byte counts are what the files
    hold, damaged or not: info reads no chunk)."""
    info = json.loads(output)
    raw = {name: s["raw_fp16_per_sample"] for name, s in info["signals"].items()}
    return {"counts": info["counts"], "encodings": info["encodings"], "raw": raw}


def losses(out: Path) -> list:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    timing = ("seconds", "signals_s", "signals_share")  # wall-clock fields differ between any two runs
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


def outcome(result, same) -> str:
    """refused / identical / other: ... for one CliRunner result; `same()` compares an exit-0 result."""
    text = result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"other: {type(result.exception).__name__}: {str(result.exception)[:200]}"
    if "Traceback" in text:
        return f"other: a traceback in the output: {text[text.index('Traceback') :][-300:]!r}"
    if result.exit_code == 0:
        try:
            return "identical" if same() else "other: exit 0 with a different result"
        except Exception as e:  # noqa: BLE001 - a result that cannot be read back differs
            return f"other: exit 0, result unreadable ({type(e).__name__}: {str(e)[:150]})"
    last = text.strip().splitlines()[-1] if text.strip() else ""
    if "Error: " in last or last.startswith("FAILED: "):  # a progress bar may share the line
        return "refused"
    return f"other: exit {result.exit_code} without an error line ({last[:150]!r})"


class Worker:
    def __init__(self, a):
        from click.testing import CliRunner

        from cli.cache import main as cache_cli
        from cli.train import main as train_cli

        self.a, self.run = a, CliRunner()
        self.cache_cli, self.train_cli = cache_cli, train_cli
        self.work = Path(a.work)
        self.secret = self.work / "secret.txt"
        self.secret.write_text("root:x:0:0:SECRET\n")
        good = Path(a.good)
        self.base = {
            "content": content(good),
            "info": info_numbers(self.cli("info", "--json", good).stdout),
            "merge": self.merged(good),
            "show": self.show(good),
            "from-cache": self.train(good),
        }

    def cli(self, *args, train=False):
        return self.run.invoke(self.train_cli if train else self.cache_cli, [str(x) for x in args])

    def merged(self, url):
        out = self.work / "merged"
        shutil.rmtree(out, ignore_errors=True)
        result = self.cli("merge", url, self.a.good2, "--out", out)
        return result, (lambda: content(out))

    def show(self, url):
        png = self.work / "show.png"
        png.unlink(missing_ok=True)
        result = self.cli(
            "show", url, "--sample", self.a.sample, "--image-root", self.a.image_root, "--out", png
        )
        return result, (lambda: png.read_bytes())

    def train(self, url):
        out = self.work / "run"
        shutil.rmtree(out, ignore_errors=True)
        args = ["from-cache", "--student", self.a.student, "--cache", url, "--image-root", self.a.image_root,
                "--out", out, "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]  # fmt: skip
        result = self.cli(*args, train=True)
        return result, (lambda: losses(out))

    def baseline(self, name):
        result, value = self.base[name]
        assert result.exit_code == 0, f"{name} fails on the good cache: {result.output}"
        return value()

    def one(self, i: int) -> dict:
        name, edit = mutation(i, self.a.seed, self.secret)
        bad = self.work / f"m{i}"
        shutil.copytree(self.a.good, bad, symlinks=True)
        edit(bad)
        copy_dst = self.work / f"copy{i}"
        results = {
            "verify": outcome(self.cli("verify", bad), lambda: content(bad) == self.base["content"]),
            "info": outcome(
                (r := self.cli("info", "--json", bad)), lambda: info_numbers(r.stdout) == self.base["info"]
            ),
            "copy": outcome(
                self.cli("copy", bad, copy_dst), lambda: content(copy_dst) == self.base["content"]
            ),
        }
        result, value = self.merged(bad)
        results["merge"] = outcome(result, lambda: value() == self.base_value("merge"))
        if i % self.a.expensive_every == 0:
            for cmd, run in (("show", self.show), ("from-cache", self.train)):
                result, value = run(bad)
                results[cmd] = outcome(result, lambda v=value, c=cmd: v() == self.base_value(c))
        for path in self.work.glob("*"):  # the mutated copy and whatever the commands wrote
            if path != self.secret:
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        return {"i": i, "mutation": name, "outcomes": results}

    def base_value(self, name):
        if not hasattr(self, "_values"):
            self._values = {}
        if name not in self._values:
            self._values[name] = self.baseline(name)
        return self._values[name]


def _vm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_main(a) -> None:
    worker = Worker(a)
    for name in ("merge", "show", "from-cache"):
        worker.base_value(name)  # computed before the cap, once
    cap = _vm_bytes() + a.memory_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))

    def hang(*_):
        raise TimeoutError(f"over the {a.time_s} s time cap")

    signal.signal(signal.SIGALRM, hang)
    for i in range(a.start, a.start + a.count):
        signal.alarm(a.time_s)
        try:
            record = worker.one(i)
        except BaseException as e:  # noqa: BLE001 - a mutation that breaks the harness counts as other
            record = {
                "i": i,
                "mutation": "?",
                "outcomes": {"harness": f"other: {type(e).__name__}: {e}"[:300]},
            }
        signal.alarm(0)
        print(json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# The parent: runs workers, restarts after a crash, counts


def fuzz(good, good2, student, image_root, sample, work, mutations, seed=1, expensive_every=10,
         memory_mib=1024, time_s=120) -> dict:  # fmt: skip
    """Run `mutations` mutations; returns counts and the 'other' outcomes."""
    work = Path(work)
    records, start = [], 0
    env = os.environ | {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "HF_HUB_OFFLINE": "1"}
    while start < mutations:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        args = [sys.executable, __file__, "--worker", "--good", good, "--good2", good2, "--student", student,
                "--image-root", image_root, "--sample", sample, "--work", work, "--seed", seed,
                "--start", start, "--count", mutations - start, "--expensive-every", expensive_every,
                "--memory-mib", memory_mib, "--time-s", time_s]  # fmt: skip
        root = Path(__file__).resolve().parents[1]
        proc = subprocess.run([str(x) for x in args], capture_output=True, text=True, env=env, cwd=root)
        done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        records += done
        start += len(done)
        if start < mutations:  # the worker died on mutation `start`: record it, go on after it
            why = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
            records.append(
                {"i": start, "mutation": "?", "outcomes": {"worker": f"other: died: {why[0][:200]}"}}
            )
            start += 1
            if not done and start == 1:
                raise RuntimeError(f"the fuzz worker does not start: {proc.stderr[-2000:]}")
    counts = Counter()
    others = []
    for r in records:
        for cmd, result in r["outcomes"].items():
            kind = result.split(":")[0]
            counts[kind] += 1
            if kind == "other":
                others.append(f"#{r['i']} {r['mutation']} / {cmd}: {result}")
    per_command = {
        c: Counter(r["outcomes"][c].split(":")[0] for r in records if c in r["outcomes"]) for c in COMMANDS
    }
    return {"mutations": len(records), "runs": dict(counts), "per_command": per_command, "others": others}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("good", "good2", "student", "image-root", "sample", "work"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name, default in (
        ("start", 0),
        ("count", 0),
        ("expensive-every", 10),
        ("memory-mib", 1024),
        ("time-s", 120),
    ):
        parser.add_argument(f"--{name}", type=int, default=default, help=argparse.SUPPRESS)
    parser.add_argument("--mutations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    a = parser.parse_args()
    if a.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        worker_main(a)
        return
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"alignkd-fuzz-{os.getpid()}.json"
    env = os.environ | {"ALIGNKD_FUZZ_MUTATIONS": str(a.mutations), "ALIGNKD_FUZZ_SEED": str(a.seed),
                        "ALIGNKD_FUZZ_REPORT": str(report)}  # fmt: skip
    started = time.time()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_fuzz.py"], env=env,
                   cwd=Path(__file__).resolve().parents[1], check=False)  # fmt: skip
    print(json.dumps(json.loads(report.read_text()) | {"seconds": round(time.time() - started)}, indent=1))


if __name__ == "__main__":
    main()
