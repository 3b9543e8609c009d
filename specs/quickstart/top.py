"""Print the most common words of a word count's output directory.

usage: python3 top.py OUTPUT_DIR [N]   (OUTPUT_DIR holds part-NNNNN files of word<TAB>count lines)
"""

import glob
import os
import sys


def main():
    out_dir = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    counts = {}
    for part in sorted(glob.glob(os.path.join(out_dir, "part-*"))):
        with open(part, encoding="utf-8") as f:
            for line in f:
                word, _, count = line.rstrip("\n").partition("\t")
                counts[word] = counts.get(word, 0) + int(count)
    total = sum(counts.values())
    print(f"{total} words, {len(counts)} distinct; the {n} most common:")
    for word, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]:
        print(f"{count:6d}  {word}")


if __name__ == "__main__":
    main()
