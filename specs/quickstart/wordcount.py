"""The quickstart's word count, as Python functions motorpool runs in its
long-lived Python workers (no interpreter per task).

words(line) -> (word, 1) pairs: lowercased, punctuation stripped.
add(a, b)   -> a + b: the reduce, also applied map-side as a combiner.
"""

import re

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(line):
    for word in WORD.findall(line.lower()):
        yield word, 1


def add(a, b):
    return a + b
