"""motorpool's Python worker: runs a job's map and reduce functions, one task
after another, for as long as its executor keeps it.

Frames on stdin/stdout: op (1 byte), payload length (u32 little endian),
payload. To the worker: L (load, JSON), then M... E (map) or R... F (reduce).
A map's input comes as M frames (its lines) or, when the input file is on
this machine, as P frames (JSON: a file's path and identity and a byte
range), which the worker reads itself. From the worker: O (output lines),
then D (done, JSON) or X (failed, JSON).

A map function takes one record per call, or (load "per": "partition") an
iterator over the whole partition's records in one call, returning an
iterable of (key, value) or a mapping.

A task's print() output is captured and sent back with D or X; the real
stdout carries only frames (anything written to fd 1 lands on stderr).
"""

import importlib.util
import io
import json
import os
import struct
import sys
import traceback
from itertools import chain

IN = os.fdopen(0, "rb", buffering=1 << 20)
OUT = os.fdopen(os.dup(1), "wb", buffering=1 << 20)
os.dup2(2, 1)
sys.stdin = open(os.devnull)
REAL_STDERR = sys.stderr

FLUSH_BYTES = 1 << 18
MAX_COMBINE_KEYS = 1_000_000
TAIL = 64 * 1024
HEAD = struct.Struct("<I")
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_MISSING = object()


def recv():
    head = IN.read(5)
    if not head or len(head) < 5:
        return None, None
    (n,) = HEAD.unpack(head[1:5])
    payload = IN.read(n) if n else b""
    if payload is None or len(payload) < n:
        return None, None
    return head[0:1], payload


def send(op, payload):
    OUT.write(op + HEAD.pack(len(payload)) + payload)


class Capture(io.TextIOBase):
    """Keeps the end of what a task prints."""

    def __init__(self):
        self.parts = []
        self.size = 0

    def writable(self):
        return True

    def write(self, s):
        self.parts.append(s)
        self.size += len(s)
        if self.size > 4 * TAIL:
            joined = "".join(self.parts)[-TAIL:]
            self.parts = [joined]
            self.size = len(joined)
        return len(s)

    def text(self):
        return "".join(self.parts)[-TAIL:]


MODULES = {}


def load_function(file, name):
    path = os.path.abspath(file)
    mod = MODULES.get(path)
    if mod is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{file}: no such file in the job directory")
        folder = os.path.dirname(path)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        modname = "motorpool_job_%d_%s" % (
            len(MODULES),
            "".join(c if c.isalnum() else "_" for c in os.path.basename(file)),
        )
        spec = importlib.util.spec_from_file_location(modname, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {file}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        MODULES[path] = mod
    fn = getattr(mod, name, None)
    if fn is None or not callable(fn):
        raise AttributeError(f"{file} has no function {name!r}")
    return fn


def key_text(k):
    if isinstance(k, str) and "\t" not in k and "\n" not in k and "\r" not in k:
        return k
    return _dumps(k)


def value_text(v):
    t = type(v)
    if t is int:
        return str(v)  # what JSON writes for an int, without the encoder's call
    if t is str and "\n" not in v and "\r" not in v:
        return v
    return _dumps(v)


def enc_text(k, v):
    return key_text(k) + "\t" + value_text(v) + "\n"


def json_text(x):
    """JSON of x as the encoder writes it; a plain ASCII str and an int
    without the encoder's call (words and counters are most of what a
    Python map hands a Python reduce)."""
    t = type(x)
    if t is str:
        # What the encoder leaves unescaped (ensure_ascii): space to tilde,
        # but for the quote and the backslash.
        if x.isascii() and x.isprintable() and '"' not in x and "\\" not in x:
            return '"' + x + '"'
    elif t is int:
        return str(x)
    return _dumps(x)


def enc_json(k, v):
    return json_text(k) + "\t" + json_text(v) + "\n"


def json_value(s):
    """json.loads(s) for JSON as json_text writes it: a non-negative int
    (no sign, no leading zero) and a string without escapes are read
    without the decoder's call."""
    if s.isascii():
        if s.isdigit() and (s[0] != "0" or len(s) == 1):
            return int(s)
        if len(s) >= 2 and s[0] == '"' and s[-1] == '"' and "\\" not in s and s.count('"') == 2:
            return s[1:-1]
    return json.loads(s)


def json_or_str(s):
    """A text value read as JSON where it is JSON (a counter, most often),
    else as the text itself."""
    try:
        return json_value(s)
    except ValueError:
        return s


def lines_of(payload):
    lines = payload.decode("utf-8", "surrogateescape").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


class Output:
    def __init__(self):
        self.parts = []
        self.size = 0
        self.records = 0

    def add(self, s):
        self.parts.append(s)
        self.size += len(s)
        self.records += 1
        if self.size >= FLUSH_BYTES:
            self.flush()

    def flush(self):
        if self.parts:
            send(b"O", "".join(self.parts).encode("utf-8", "surrogateescape"))
            self.parts = []
            self.size = 0


def error_text():
    return traceback.format_exc()[-TAIL:]


def finish(out, error, records_in, capture):
    if error is None:
        try:
            out.flush()
        except BaseException:
            error = error_text()
    if error is None:
        payload = {"records_in": records_in, "records_out": out.records, "stderr": capture.text()}
        send(b"D", _dumps(payload).encode())
    else:
        send(b"X", _dumps({"error": error, "stderr": capture.text()}).encode())
    OUT.flush()


def emit_all(result, out, enc, red):
    """Output of a partition function: a mapping (keys already distinct) or
    an iterable of (key, value) pairs, combined with `red` when there is one."""
    items = getattr(result, "items", None)
    if callable(items):
        add = out.add
        for k, v in items():
            add(enc(k, v))
        return
    if red is None:
        add = out.add
        for k, v in result:
            add(enc(k, v))
        return
    acc = {}
    get = acc.get
    missing = _MISSING
    for k, v in result:
        old = get(k, missing)
        acc[k] = v if old is missing else red(old, v)
        if len(acc) > MAX_COMBINE_KEYS:
            for k2, v2 in acc.items():
                out.add(enc(k2, v2))
            acc.clear()
    for k, v in acc.items():
        out.add(enc(k, v))


READ_CHUNK = 1 << 20


def open_local(spec, files):
    """The file a P frame names, opened once per task, when it is still the
    very file the driver planned with (device, inode, size, mtime)."""
    fd = files.get(spec["path"])
    if fd is None:
        fd = os.open(spec["path"], os.O_RDONLY | os.O_CLOEXEC)
        files[spec["path"]] = fd
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
            spec["dev"], spec["ino"], spec["size"], spec["mtime_ns"]
        ):
            raise OSError(f"{spec['path']} changed after the job was planned")
    return fd


def local_batches(spec, files):
    """The lines of a P frame's byte range, a chunk's worth at a time. A
    range starts at a line and ends after a newline, or at the file's end
    (where a last line without one still counts)."""
    fd = open_local(spec, files)
    at, end = spec["start"], spec["end"]
    carry = b""
    while at < end:
        data = os.pread(fd, min(READ_CHUNK, end - at), at)
        if not data:
            raise OSError(f"{spec['path']} is shorter than when the job was planned")
        at += len(data)
        last = data.rfind(b"\n")
        if last < 0:
            carry += data
            continue
        first = data.find(b"\n")
        # Lines are cut at newlines (ASCII), so each piece decodes as the whole would.
        lines = [(carry + data[:first]).decode("utf-8", "surrogateescape")]
        if last > first:
            lines += str(memoryview(data)[first + 1:last], "utf-8", "surrogateescape").split("\n")
        carry = data[last + 1:]
        yield lines
    if carry:
        yield [carry.decode("utf-8", "surrogateescape")]


def count_local(spec, files):
    """Lines of a P frame's range (a task that stopped reading early),
    counted as the function would have been handed them."""
    return sum(len(lines) for lines in local_batches(spec, files))


class Input:
    """A map task's input: batches of records from M or P frames up to E."""

    def __init__(self):
        self.records_in = 0
        self.ended = False
        self.files = {}
        # The P frame being read: its rest is counted if the function stops early.
        self.reading = None

    def batches(self):
        while not self.ended:
            op, payload = recv()
            if op is None:
                sys.exit(0)
            if op == b"M":
                lines = lines_of(payload)
                self.records_in += len(lines)
                yield lines
            elif op == b"P":
                self.reading = local_batches(json.loads(payload), self.files)
                for lines in self.reading:
                    self.records_in += len(lines)
                    yield lines
                self.reading = None
            elif op == b"E":
                self.ended = True
            else:
                sys.exit(2)

    def drain(self):
        """Reads the frames left unread (after an error, or a function that
        stopped early) up to E, counting their records."""
        if self.reading is not None:
            try:
                for lines in self.reading:
                    self.records_in += len(lines)
            except (OSError, ValueError):
                pass
            self.reading = None
        while not self.ended:
            op, payload = recv()
            if op is None:
                sys.exit(0)
            if op == b"M":
                self.records_in += payload.count(b"\n")
            elif op == b"P":
                try:
                    self.records_in += count_local(json.loads(payload), self.files)
                except (OSError, ValueError, KeyError):
                    pass
            elif op == b"E":
                self.ended = True
            else:
                sys.exit(2)

    def close(self):
        for fd in self.files.values():
            os.close(fd)
        self.files.clear()


def run_map(load, capture):
    """A map task: the function once per record (combined map-side with the
    reducer when there is one), or once per partition (`per: partition`)
    over an iterator of its records."""
    out = Output()
    error = None
    source = Input()
    try:
        fn = load_function(load["file"], load["map"])
        red = load_function(load["combiner_file"], load["combiner"]) if load.get("combiner") else None
        enc = enc_json if load.get("codec") == "json" else enc_text
    except BaseException:
        error = error_text()
    if error is None:
        try:
            if load.get("per") == "partition":
                # The function pulls records one at a time from C (chain),
                # not through a generator frame resumed per record.
                emit_all(fn(chain.from_iterable(source.batches())), out, enc, red)
            elif red is not None:
                acc = {}
                get = acc.get
                missing = _MISSING
                for lines in source.batches():
                    for rec in lines:
                        for k, v in fn(rec):
                            old = get(k, missing)
                            acc[k] = v if old is missing else red(old, v)
                    if len(acc) > MAX_COMBINE_KEYS:
                        for k, v in acc.items():
                            out.add(enc(k, v))
                        acc.clear()
                for k, v in acc.items():
                    out.add(enc(k, v))
            else:
                add = out.add
                for lines in source.batches():
                    for rec in lines:
                        for k, v in fn(rec):
                            add(enc(k, v))
        except BaseException:
            error = error_text()
    try:
        source.drain()
    finally:
        source.close()
    finish(out, error, source.records_in, capture)


def run_reduce(load, capture):
    out = Output()
    error = None
    records_in = 0
    try:
        red = load_function(load["file"], load["reduce"])
        as_json = load.get("codec") == "json"
        dec_key = json_value if as_json else (lambda s: s)
        dec_val = json_value if as_json else json_or_str
    except BaseException:
        error = error_text()
    cur_raw = None
    cur_val = None
    while True:
        op, payload = recv()
        if op is None:
            sys.exit(0)
        if op == b"R":
            if error is not None:
                continue
            try:
                lines = lines_of(payload)
                records_in += len(lines)
                add = out.add
                for line in lines:
                    raw, _, vtext = line.partition("\t")
                    if raw == cur_raw:
                        cur_val = red(cur_val, dec_val(vtext))
                    else:
                        if cur_raw is not None:
                            add(key_text(dec_key(cur_raw)) + "\t" + value_text(cur_val) + "\n")
                        cur_raw = raw
                        cur_val = dec_val(vtext)
            except BaseException:
                error = error_text()
        elif op == b"F":
            if error is None and cur_raw is not None:
                try:
                    out.add(key_text(dec_key(cur_raw)) + "\t" + value_text(cur_val) + "\n")
                except BaseException:
                    error = error_text()
            finish(out, error, records_in, capture)
            return
        else:
            sys.exit(2)


def main():
    while True:
        op, payload = recv()
        if op is None:
            return
        if op != b"L":
            sys.exit(2)
        load = json.loads(payload)
        capture = Capture()
        sys.stdout = capture
        sys.stderr = capture
        try:
            if load.get("mode") == "reduce":
                run_reduce(load, capture)
            else:
                run_map(load, capture)
        finally:
            sys.stdout = REAL_STDERR
            sys.stderr = REAL_STDERR


if __name__ == "__main__":
    main()
