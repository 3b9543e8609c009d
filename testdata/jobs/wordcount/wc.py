"""Word count, both ways motorpool runs a map/reduce.

Streaming (Hadoop Streaming style), one process per task:
    python3 wc.py map [--sleep SECONDS]   stdin: text lines; stdout: word<TAB>1
    python3 wc.py reduce                  stdin: word<TAB>n lines sorted by word

Python functions, run in motorpool's long-lived Python workers:
    tokenize(line) -> (word, 1) pairs;  add(a, b) -> a + b
"""

import sys
import time


def tokenize(line):
    for word in line.split():
        yield word, 1


def add(a, b):
    return a + b


def map_stream(sleep):
    out = sys.stdout
    for line in sys.stdin:
        for word in line.split():
            out.write(word + "\t1\n")
    if sleep:
        time.sleep(sleep)


def reduce_stream():
    current, total = None, 0
    out = sys.stdout
    for line in sys.stdin:
        word, _, count = line.rstrip("\n").partition("\t")
        if word != current:
            if current is not None:
                out.write(f"{current}\t{total}\n")
            current, total = word, 0
        total += int(count)
    if current is not None:
        out.write(f"{current}\t{total}\n")


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "map":
        sleep = float(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[2] == "--sleep" else 0.0
        map_stream(sleep)
    elif mode == "reduce":
        reduce_stream()
    else:
        sys.exit("usage: wc.py map [--sleep SECONDS] | reduce")
