"""Where shards and their outputs live: a local path or an fsspec URL (s3://, gs://, http(s)://,
memory://, ...). The one place that opens a backend, names the extra it needs, retries what a
network may fail transiently, and keeps credentials out of every message.

    scheme(s)                   the scheme `s` names (s3, https, file, pipe, ...) or None for a path
    is_url(s)                   whether `s` names a store's URL rather than a local path
    join(base, *parts)          a path or URL below `base`
    filesystem(url)             (fsspec filesystem, path in it); StorageError naming the extra when missing
    read_bytes(url) / size(url) / exists(url) / remove(url) / glob(root, *pattern) / put_file(local, url)
    retrying(fn, what)          fn() again after a transient error, with exponential backoff
    redact(url)                 the URL without user:password@, query string or fragment
    scrub(text, url)            a message without the user:password or query of `url`, wherever it quotes them
    error_text(e, url)          a backend's error about `url`: redact_text, then scrub, in one line
    redact_text(text)           an error message with every URL in it redacted
    redact_uncaught()           the same for this process's log records (tracebacks included), printed
                                warnings and uncaught traceback

Credentials come from each backend's standard places (for S3: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN / AWS_PROFILE, AWS_ENDPOINT_URL for an S3-compatible
store; for GCS: GOOGLE_APPLICATION_CREDENTIALS); nothing here reads, logs or records them.
"""
from __future__ import annotations

import logging
import os
import posixpath
import re
import sys
import time
import traceback
import urllib.parse
import warnings
from typing import Callable, TypeVar

T = TypeVar("T")

# scheme -> the optional extra of pyproject.toml that installs its fsspec backend
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
RETRIES = 4  # attempts after the first, for transient errors
BACKOFF_S = 0.5  # first wait; doubled each attempt (0.5, 1, 2, 4 s)


class StorageError(OSError):
    """A store that cannot be used at all (backend not installed, bad URL): not worth a retry."""


# Errors that a retry cannot fix: the object is not there, access is refused, the request is wrong.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
              StorageError, ValueError, TypeError, KeyError)
# The same for backend errors named by class (no import of botocore needed): a malformed request,
# no credentials at all.
_PERMANENT_NAMES = {"ParamValidationError", "NoCredentialsError", "PartialCredentialsError"}


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")  # two letters or more: "c:" is a drive


def scheme(s: str) -> str | None:
    """The scheme `s` names, lower case ("s3", "https", "file", "pipe", ...); None for a local path.
    Any `name:` prefix of two letters or more counts, with or without `//` (webdataset's
    `pipe:cmd` has none), so that a shard name read from data never passes as a path."""
    m = _SCHEME.match(s)
    return m.group(1).lower() if m else None


def is_url(s) -> bool:
    """A store's URL (`scheme://…`) other than file:// (a local path); never a `pipe:` command."""
    return isinstance(s, str) and "://" in s and scheme(s) not in (None, "file", "pipe")


def local_path(s: str | os.PathLike) -> str:
    s = os.fspath(s)
    return s[len("file://"):] if s.startswith("file://") else s


# Object stores' URL schemes: there `?` and `#` are characters of an object's key (s3://b/a#1.jpg
# names the key "a#1.jpg"), not a query or a fragment as in an http(s) URL.
KEY_SCHEMES = frozenset({"s3", "s3a", "s3n", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})
SCHEME_ALIASES = {"s3a": "s3", "s3n": "s3", "gcs": "gs"}  # the same objects under another name


# A query in an object store's key that looks like a credential (a signed URL's signature pasted
# onto an s3:// URL, ?token=...): redacted although s3fs would read it as part of the key.
_SECRET_QUERY = re.compile(r"\?(?:[^?#]*&)?[^=&?#]*(?:sig|token|key|secret|pass|cred|auth)[^=&?#]*=", re.I)


def split_url(url: str) -> urllib.parse.SplitResult:
    """urllib's urlsplit, except that in an object store's URL (KEY_SCHEMES) everything after the
    bucket is the path (no fragment, and no query but one that looks like a credential:
    _SECRET_QUERY), as s3fs reads it."""
    u = urllib.parse.urlsplit(url)
    if u.scheme.lower() not in KEY_SCHEMES or "://" not in url:
        return u
    netloc, slash, path = url.split("://", 1)[1].partition("/")
    path, query = slash + path, ""
    secret = _SECRET_QUERY.search(path)
    if secret:
        path, query = path[:secret.start()], path[secret.start() + 1:]
    return urllib.parse.SplitResult(u.scheme, netloc, path, query, "")


def canonical(url: str) -> str:
    """One text for every spelling of a URL's location (what local locks and staging folders are
    keyed on): credentials and query left out, the scheme lower case and unaliased (s3a:// is
    s3://), no trailing slash."""
    u = split_url(redact(url))
    scheme = SCHEME_ALIASES.get(u.scheme.lower(), u.scheme.lower())
    return urllib.parse.urlunsplit((scheme, u.netloc, u.path.rstrip("/"), u.query, ""))


def join(base: str, *parts: str) -> str:
    """`parts` below `base`: os.path.join for a path, '/'-joined for a URL (an http(s) query kept at
    the end)."""
    if not is_url(base):
        return os.path.join(local_path(base), *parts)
    u = split_url(base)
    path = posixpath.join(u.path or "/", *parts) if parts else u.path
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def parent(url: str) -> str:
    """The folder holding `url` (or path)."""
    if not is_url(url):
        return os.path.dirname(local_path(url))
    u = split_url(url)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, posixpath.dirname(u.path), "", ""))


# host, [IPv6] host, either with a port: what may stand between `//` and the first `/`, `?`, `#`
_HOST_PORT = re.compile(r"(\[[^\]]*\]|[^:\[\]@]*)(:\d*)?")


def _bad_userinfo(url: str) -> str | None:
    """The user:password of `url` when its password holds an unencoded `/`, `?` or `#` (an AWS
    secret key often has a `/`): urllib ends the authority there and reads the credentials as a
    path. None when there is none (a plain host[:port], or the `@` already ends the authority)."""
    head, sep, rest = url.partition("://")
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    if not sep or ":" not in rest[:end] or "@" in rest[:end] or "@" not in rest[end:]:
        return None
    # An object store's bucket never has a port, so there `x:7/...@` is always credentials; a web
    # URL's `host:8080/path/a@b.jpg` is a port and a key, unless the `@` comes before the next `/`
    # (`user:2024/secret@host`): redact errs towards hiding, its text is only shown and compared.
    # A [v6] address is never a user name.
    if scheme(url) in KEY_SCHEMES or not _HOST_PORT.fullmatch(rest[:end]):
        return rest[:rest.index("@", end)]
    segment = rest[end + 1:].split("/", 1)[0]
    return rest[:end + 1 + segment.index("@")] if "@" in segment and not rest.startswith("[") else None


def _strip_bad_userinfo(url: str) -> str:
    """`url` without the user:password@ that _bad_userinfo finds."""
    userinfo = _bad_userinfo(url)
    if userinfo is None:
        return url
    head, _, rest = url.partition("://")
    return f"{head}://{rest[len(userinfo) + 1:]}"


def redact(url: str) -> str:
    """`url` without what may hold a credential: user:password@, the query string (signed URLs),
    the fragment (an object store's key keeps its `?` and `#`: split_url), and a pipe: command's
    words after the program name."""
    if url.startswith("pipe:"):
        words = url[len("pipe:"):].split()
        return f"pipe:{words[0] if words else ''} ..."
    parts = split_url(url)
    if len(parts.scheme) <= 1:
        return url  # a local path
    cleaned = _strip_bad_userinfo(url)
    if cleaned != url:
        return redact(cleaned)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url  # nothing to remove; rebuilding would turn sqlite:////abs into sqlite://abs
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """`text` (a backend's error message) with every URL in it redacted: HTTP clients name the
    URL they failed on, query string (a signed URL's signature) and user:password@ included."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)


def redact_uncaught() -> None:
    """Redact every URL in this process's log records (any logger's: MLflow's, urllib3's, ours; the
    traceback of log.exception too), in its printed warnings and in the traceback of an exception
    nobody caught. The CLIs catch the errors they expect and redact those; this is for the rest,
    whose messages (an MLflow request's URL) may carry a password. Idempotent."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "redacting", False):
        def make_record(*args, **kwargs):
            record = factory(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is the handler's to report, not ours
                return record
            if "://" in message:  # format once, here, so the arguments are redacted too
                record.msg, record.args = redact_text(message), None
            if record.exc_info and record.exc_info[0] is not None:  # log.exception(...): handlers print exc_text
                record.exc_text = _redacted_traceback(*record.exc_info).rstrip("\n")
            return record

        make_record.redacting = True
        logging.setLogRecordFactory(make_record)
    show = warnings.showwarning
    if not getattr(show, "redacting", False):
        def show_redacted(message, category, filename, lineno, file=None, line=None):
            show(redact_text(str(message)), category, filename, lineno, file, line)

        show_redacted.redacting = True
        warnings.showwarning = show_redacted
    sys.excepthook = _redacted_excepthook


def _redacted_traceback(exc_type, exc, tb) -> str:
    return redact_text("".join(traceback.format_exception(exc_type, exc, tb)))


def _redacted_excepthook(exc_type, exc, tb) -> None:
    sys.stderr.write(_redacted_traceback(exc_type, exc, tb))
    sys.stderr.flush()


def error_text(e: BaseException, url: str) -> str:
    """A backend's error about `url`, fit for a log or a report: every URL in it redacted, and what
    of `url` may be a credential removed even where it is quoted without a scheme (scrub); one
    line (botocore's validation errors span several), so a report or a log record stays one."""
    text = scrub(redact_text(str(e)), url)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _secrets(url: str) -> list[tuple[str, str, str]]:
    """(secret, delimiter before, delimiter after) for what in `url` may hold a credential: its
    user:password (also when a `/`, `?` or `#` in the password made urllib read it as host and
    path: a backend then quotes its pieces, e.g. "user:first-half" as a bucket name; each piece
    is a secret of its own), its query and its fragment."""
    parts = split_url(url)
    found = [(parts.netloc.rpartition("@")[0], "", "@"), (parts.query, "?", ""), (parts.fragment, "#", "")]
    userinfo = _bad_userinfo(url)
    if userinfo is not None:
        # a piece is quoted with no delimiter around it: only a long one (scrub's rule for those)
        found += [(userinfo, "", "@")] + [(p, "", "") for p in re.split(r"[/?#]", userinfo) if len(p) >= 8]
    return found


def scrub(text: str, url: str) -> str:
    """`text` (a message that may quote `url` or pieces of it, as backends' errors do, e.g. a
    bucket name "user:password@bucket") without what in `url` may hold a credential (_secrets),
    as written and percent-decoded; for a pipe: command, its words after the program name
    (redact's rule), which a failed command's error quotes whole."""
    if url.startswith("pipe:"):
        words = url[len("pipe:"):].split()
        if len(words) > 1:
            text = text.replace(" ".join(words), f"{words[0]} ...")
            text = text.replace(url[len("pipe:"):].strip(), f"{words[0]} ...")
        return text
    if not is_url(url):
        return text
    forms = {(form, before, after) for secret, before, after in _secrets(url)
             for form in (secret, urllib.parse.unquote(secret)) if form}
    for form, before, after in sorted(forms, key=lambda f: (-len(f[0]), f)):  # longest first: a piece is part of the whole
        text = text.replace(before + form + after, before + "***" + after)
        # quoted without its delimiter too, but only a long one: a short one ("a") would garble
        # every word it is part of, and a secret that short guards nothing
        if len(form) >= 8:
            text = text.replace(form, "***")
    return text


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL or local path. A missing backend raises
    StorageError with the one line that installs it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        extra = EXTRAS.get(scheme(url) or "")
        how = (f"pip install 'unit-translate[{extra}]'" if extra
               else f"install the fsspec backend for {scheme(url)}://")
        raise StorageError(f"{redact(url)}: {scheme(url)}:// URLs need an optional extra: {how}") from None
    except ValueError as e:  # unknown protocol
        raise StorageError(f"{redact(url)}: {e}") from None


def transient(e: BaseException) -> bool:
    """Whether a failed request may succeed if tried again (a timeout, a reset connection, a 5xx).
    An HTTP client's error for a 4xx response (aiohttp's ClientResponseError, which fsspec's http
    backend raises for 400, 401, 403, 410: read by its `status`, with no import of aiohttp) is the
    request's fault and stays so, but for 408 (request timeout) and 429 (too many requests)."""
    status = getattr(e, "status", None)
    if type(status) is int and 400 <= status < 500 and status not in (408, 429):
        return False
    return (isinstance(e, Exception) and not isinstance(e, _PERMANENT)
            and not any(c.__name__ in _PERMANENT_NAMES for c in type(e).__mro__))


def retrying(fn: Callable[[], T], what: str, retries: int = RETRIES, backoff: float = BACKOFF_S,
             on_retry: Callable[[BaseException], None] | None = None) -> T:
    """fn(), tried again up to `retries` times after a transient error, waiting `backoff` seconds
    doubled each time; the last error is raised. `what` names the operation in nothing but logs."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - backends raise their own error types
            if attempt == retries or not transient(e):
                raise
            if on_retry is not None:
                on_retry(e)
            time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


def read_bytes(url: str, retries: int = RETRIES,
               on_retry: Callable[[BaseException], None] | None = None) -> bytes:
    """The whole file or object; `on_retry` is called before each retry (a reader counts them)."""
    if not is_url(url):
        with open(local_path(url), "rb") as f:
            return f.read()
    fs, path = filesystem(url)
    return retrying(lambda: fs.cat_file(path), f"read {redact(url)}", retries, on_retry=on_retry)


def size(url: str) -> int | None:
    """Bytes of the file or object at `url`; None when there is none."""
    if not is_url(url):
        try:
            return os.path.getsize(local_path(url))
        except OSError:
            return None
    fs, path = filesystem(url)
    fs.invalidate_cache(path)  # another process (a worker, another host) may have changed it since a listing
    try:
        return int(retrying(lambda: fs.size(path), f"size {redact(url)}"))
    except FileNotFoundError:
        return None


def exists(url: str) -> bool:
    if not is_url(url):
        return os.path.exists(local_path(url))
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return bool(retrying(lambda: fs.exists(path), f"exists {redact(url)}"))


def remove(url: str) -> None:
    """Delete a file or object; nothing when it is not there."""
    if not is_url(url):
        try:
            os.remove(local_path(url))
        except FileNotFoundError:
            pass
        return
    fs, path = filesystem(url)
    try:
        retrying(lambda: fs.rm_file(path), f"remove {redact(url)}")
    except FileNotFoundError:
        pass


def glob(root: str, *pattern: str) -> list[str]:
    """Sorted paths or URLs below `root` matching the glob `pattern` parts (URLs keep their scheme
    and bucket). `root` is taken literally: an OUT named `o[1]` or `o*` is not a pattern."""
    import glob as globmod

    if not is_url(root):
        return sorted(globmod.glob(os.path.join(globmod.escape(local_path(root)), *pattern)))
    fs, path = filesystem(root)
    # fsspec's glob reads [, ], * and ? as the glob module does, and [[] etc. as the literal.
    full = posixpath.join(globmod.escape(path), *pattern)
    fs.invalidate_cache()  # listings cached by this process miss what other processes wrote since
    found = retrying(lambda: fs.glob(full), f"list {redact(join(root, *pattern))}")
    return sorted(fs.unstrip_protocol(p) for p in found)


def put_file(local: str, url: str) -> None:
    """Upload a finished local file to `url`. An object store makes an object visible only when
    its upload completes (one PUT, or a multipart upload's completion), so readers see the old
    object or the new one, never part of one: the object-store form of write-then-rename."""
    fs, path = filesystem(url)
    retrying(lambda: fs.put_file(local, path), f"upload {redact(url)}")
    fs.invalidate_cache(path)
