"""`make shards`: two unpaired image domains into verified WebDataset tar shards.

    python -m pipeline.shards [write] --src-a A --src-b B --out OUT [--workers N] [--shard-size-mb 256]
        [--max-per-shard N] [--min-side 16] [--max-pixels N] [--max-file-mb 256] [--part i/N] [--recheck]
    python -m pipeline.shards merge OUT      # combine the outputs of --part runs
    python -m pipeline.shards verify OUT     # re-read every shard against index.json + manifest

How a run stays deterministic and resumable:
- Each domain's inputs are listed in a deterministic order and cut into consecutive groups
  (at most --shard-size-mb of input bytes and --max-per-shard inputs each). Group g
  becomes shard g, so a shard's contents depend only on the listing, never on timing.
- A worker writes shard g to a temporary name, renames it into place, then writes the
  shard's record (OUT/.records/<d>/<d>-<g>.json: its inputs with their signatures and the
  sha256 of each input's bytes, samples, rejects, sha256). A rerun skips every shard whose
  record matches the current inputs (paths, sizes, and content: an input whose signature,
  i.e. size/mtime/ctime/inode, changed is hashed again and must hash the same, and its new
  signature is then recorded; a URL whose listing has no metadata is hashed every time) and the
  file on disk (its size; with --recheck its sha256 too, for damage that keeps the size), and
  rewrites the others, so a run killed at any point completes with the same samples, and
  sources regenerated under the same names and sizes are not left stale.
- Finalising walks the records in shard order: exact duplicates (same stored bytes) of a
  sample in an earlier shard are removed from their shard (the shard is rewritten) and
  quarantined as "duplicate of <key>"; then manifest.parquet and quarantine.parquet are
  written, and index.json last (each to a temporary name, then renamed). A domain that stored
  no sample fails the run (exit 1) before index.json is written.
- `--part i/N` (0 <= i < N) processes the groups g with g % N == i, so parts write
  disjoint shard numbers, identical to those of a single run; each part writes its own
  view under OUT/parts/<i>-of-<N>/. `merge OUT` finalises all parts together (cross-part
  duplicates are removed from their shards and quarantined), giving exactly the result
  of a single run.
- index.json names each shard by a path relative to OUT. Readers open an entry only
  through `index_entry_url`, which refuses commands (`pipe:`), absolute paths, other
  schemes and anything resolving outside OUT: an index is data, never a command.
- One writer per OUT: a run holds an exclusive lock on OUT/.lock (merge too); a `--part`
  run holds it shared plus an exclusive lock on OUT/parts/<i>-of-<N>/.lock, so the parts
  of one job run side by side (several machines on a shared filesystem) but two writers
  of the same shards never do. The loser exits with status 2 naming the holder.
- OUT inside a source folder is left out of that folder's walk (the writer never reads its
  own shards back); a source folder that is OUT or lies inside it is refused.
- OUT may be an fsspec URL (s3://bucket/prefix, gs://..., memory://...; the backend comes with
  the extra `pip install 'unit-translate[s3]'` or `[gcs]`, and a missing one is a one-line
  error). The same steps run: a shard, record or output is written to a local temporary file
  and uploaded in one go when complete (an object becomes visible only when its upload
  completes: the object-store form of write-then-rename), a record after its shard, index.json
  last; a rerun reads the records from the store and checks each shard object's size. A store
  has no locks: the lock is a local flock named after the URL, so writers on this host exclude
  each other but writers on other hosts do not (a warning says so; pipeline.lock). A URL
  source and a URL OUT that overlap are refused (a store listing cannot skip OUT).
  Credentials come from the backend's environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS) and
  URLs in messages are redacted (pipeline.storage.redact).
Exit status: 0 every input stored, 3 some inputs quarantined, 2 OUT is in use by another
writer (or bad arguments), 1 failure (one-line reason).

Where the parts live: pipeline.layout (OUT's names, errors, exit statuses), pipeline.plan
(groups), pipeline.shardwriter (tars, workers), pipeline.records (completion records),
pipeline.index (finalising; `index_entry_url`), pipeline.verify, pipeline.lock,
pipeline.shardrun (`run`, `merge`). This module is the command line and re-exports the
public names.
"""

from __future__ import annotations

import argparse
import math
import sys

from pipeline.index import INDEX_SCHEMES, MANIFEST_COLUMNS, QUARANTINE_COLUMNS, IndexEntryError, index_entry_url
from pipeline.layout import DOMAINS, EXIT_FAIL, EXIT_LOCKED, EXIT_OK, EXIT_QUARANTINED, LockedError, ShardsError
from pipeline.lock import writer_lock
from pipeline.plan import MB, Settings
from pipeline.storage import StorageError, redact_uncaught, scrub
from pipeline.shardrun import RunArgs, merge, run
from pipeline.verify import verify

__all__ = ["DOMAINS", "EXIT_FAIL", "EXIT_LOCKED", "EXIT_OK", "EXIT_QUARANTINED", "INDEX_SCHEMES", "MANIFEST_COLUMNS",
           "QUARANTINE_COLUMNS", "IndexEntryError", "LockedError", "RunArgs", "Settings", "ShardsError", "build_parser",
           "index_entry_url", "main", "merge", "run", "verify", "writer_lock"]

PROG = "python -m pipeline.shards"
DESCRIPTION = "Two image domains into WebDataset shards (subcommands: verify OUT, merge OUT)."
COMMANDS = ("write", "verify", "merge")


def _parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part must look like i/N, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text}: need N >= 1 and 0 <= i < N")
    return i, n


def _positive(text: str) -> int:
    # ArgumentTypeError, not ValueError: argparse would print "invalid _positive value: '1.5'"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {v}")
    return v


def _positive_mb(text: str) -> float:
    """A size in MB: a finite number above 0 (0 or less would quarantine everything or cut
    shards of nothing; inf cannot become a byte count)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of MB above 0, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of MB above 0, got {text}")
    return v


def _add_write_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--src-a", required=True, help="domain A: folder, text list of paths, or .parquet (path column)")
    p.add_argument("--src-b", required=True, help="domain B: same forms as --src-a")
    p.add_argument("--out", required=True, help="output folder or fsspec URL (s3://bucket/prefix, gs://...)")
    p.add_argument("--workers", type=_positive, default=1, help="worker processes (default 1)")
    p.add_argument("--shard-size-mb", type=_positive_mb, default=Settings.shard_size / MB,
                   help="input MB per shard (default 256)")
    p.add_argument("--max-per-shard", type=_positive, default=None, help="inputs per shard (default: no limit)")
    p.add_argument("--min-side", type=_positive, default=Settings.min_side,
                   help="reject images whose smaller side is below this")
    p.add_argument("--max-pixels", type=_positive, default=Settings.max_pixels,
                   help="reject images with more pixels (decompression bombs); default 64e6")
    p.add_argument("--max-file-mb", type=_positive_mb, default=Settings.max_file_bytes / MB,
                   help="quarantine inputs larger than this unread (default 256)")
    p.add_argument("--part", type=_parse_part, default=(0, 1), help="process slice i of N (0-based) for merge")
    p.add_argument("--recheck", action="store_true",
                   help="hash every existing shard and write again those whose bytes differ from their record "
                        "(a same-size change that the size check misses; verify names such shards)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The command line: subcommands write (the default, so its name may be left out), verify, merge."""
    p = argparse.ArgumentParser(prog=PROG, description="Make, verify and merge WebDataset shards of two image domains.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", title="subcommands", metavar="{write,verify,merge}")
    # `write` keeps the bare program name: its usage and errors read as they did before subcommands.
    write = sub.add_parser("write", prog=PROG, description=DESCRIPTION,
                           help="write the shards (the default: `write` may be left out)")
    _add_write_args(write)
    write.set_defaults(func=_write, parser=write)
    for name, func, text in (("verify", _verify, "re-read every shard against index.json + manifest"),
                             ("merge", _merge, "combine the outputs of --part runs")):
        q = sub.add_parser(name, help=text)
        q.add_argument("out", help="the OUT folder (or URL) of make shards")
        q.set_defaults(func=func, parser=q)
    p.epilog = "Without a subcommand, `write` is meant:\n\n" + write.format_help()
    return p


def _write(a: argparse.Namespace) -> int:
    settings = Settings(a.min_side, a.max_pixels, max(1, int(a.shard_size_mb * MB)), a.max_per_shard,
                        max(1, int(a.max_file_mb * MB)))
    status, summary = run(RunArgs(dict(zip(DOMAINS, (a.src_a, a.src_b))), a.out, a.workers, settings, a.part,
                                  progress=not a.no_progress, recheck=a.recheck))
    print(a.clean(summary))
    return status


def _verify(a: argparse.Namespace) -> int:
    problems, summary = verify(a.out)
    for line in problems:
        print(a.clean(f"BAD {line}"), file=sys.stderr)
    print(a.clean(summary))
    return EXIT_FAIL if problems else EXIT_OK


def _merge(a: argparse.Namespace) -> int:
    status, summary = merge(a.out)
    print(a.clean(summary))
    return status


def main(argv=None) -> int:
    redact_uncaught()  # an error no branch below expects must not print a password either
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help"):
        argv = ["write", *argv]  # writing is the default: every command line from before subcommands
    a, extra = build_parser().parse_known_args(argv)  # bad arguments: usage and exit status 2
    if extra:  # under the subcommand's own usage, as when each was a parser of its own
        a.parser.error(f"unrecognized arguments: {' '.join(extra)}")

    def clean(text: str) -> str:
        """What we print, without a credential that a URL argument carries (a backend's error may
        quote it: an S3 'bucket name' user:password@bucket)."""
        for arg in argv:
            text = scrub(text, arg)
        return text

    a.clean = clean
    try:
        return a.func(a)
    except ShardsError as e:
        print(clean(f"error: {e}"), file=sys.stderr)
        return e.exit_status
    except StorageError as e:  # a store that cannot be used at all (e.g. its backend missing): one line
        print(clean(f"error: {e}"), file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
